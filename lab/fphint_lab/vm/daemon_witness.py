"""``fph-collector`` for end-to-end tests, with a witness (and, on request, a
planted fault) in its migration proxy.

    python -m fphint_lab.vm.daemon_witness --witness-dir DIR [--fault-file F] -- serve --config ...

runs the real daemon (``host_collector.cli.main``) with a migration observer
(host_collector.migrate.observer), the daemon's explicit hook for watchers:

* each migration's gate is wrapped: each page the proxy rewrites (an oracle
  answered "free" for it: docs/stream-proxy.md, the proxy zeroes exactly those
  records) is recorded, per migration;
* before an epoch loses its bitmaps they are ORed into a per-VM union: every
  page some agent hinted free during the migration, as the collector
  accepted it.

After every epoch release and when the proxy finishes, DIR/VM-N.npz is
rewritten (N counts the daemon's migrations of VM) with
``hinted/<block>`` (a bool per page) and ``rewritten/<block>`` (page
indexes). The RAM comparison then accepts a page that differs only if it is
zero on the destination *and* both rewritten and hinted: the witness sits
outside the gate's bookkeeping, so a proxy or gate that zeroes a page no
hint covered is caught.

``--fault-file F`` plants such a fault for the tests that show the
comparison catches it: F holds JSON ``{"block": "mem", "pages": [...]}``,
read when each migration's proxy is made, and the gate then also answers
"free" for those pages whenever it decides a record (the fault sits inside
the witness, so the rewrite is recorded as one, as a buggy proxy would).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from host_collector.cli import main as cli_main
from host_collector.migrate.observer import MigrationObserver, MigrationWatch
from host_collector.rewrite.gate import PageOracle, RewriteGate

LOG = logging.getLogger("daemon_witness")


class _RecordingOracle:
    """Answers as ``inner`` (plus planted pages); records every "free"."""

    def __init__(self, inner: PageOracle | None, witness: _Witness) -> None:
        self.inner = inner
        self.witness = witness

    def is_free(self, block: str, page: int) -> bool:
        free = bool(self.inner is not None and self.inner.is_free(block, page))
        if not free and page in self.witness.fault.get(block, ()):
            free = True
        if free:
            self.witness.note_rewrite(block, page)
        return free


class _WitnessGate(RewriteGate):
    """The daemon's gate, every answer passed through a recording oracle."""

    def __init__(self, inner: RewriteGate, witness: _Witness) -> None:
        self.inner = inner
        self.witness = witness

    def received(self, total: int) -> None:
        self.inner.received(total)

    def decided_through(self) -> int:
        return self.inner.decided_through()

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.inner.add_listener(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self.inner.remove_listener(callback)

    def stop_holding(self) -> None:
        self.inner.stop_holding()

    @property
    def guest_stopped(self) -> bool:
        return self.inner.guest_stopped

    def _wrap(self, oracle: PageOracle | None) -> PageOracle | None:
        if oracle is None and not self.witness.fault:
            return None
        return _RecordingOracle(oracle, self.witness)

    def oracle_for(self, end: int) -> PageOracle | None:
        return self._wrap(self.inner.oracle_for(end))

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        oracle, valid = self.inner.oracle_until(end)
        return self._wrap(oracle), valid


class _Witness:
    """One migration's record: pages rewritten, pages hinted."""

    def __init__(self, directory: Path, vm: str, number: int, fault: dict[str, set[int]]) -> None:
        self.path = directory / f"{vm}-{number}.npz"
        self.vm = vm
        self.fault = fault
        self.lock = threading.Lock()
        self.rewritten: dict[str, set[int]] = {}
        self.hinted: dict[str, npt.NDArray[np.bool_]] = {}

    def note_rewrite(self, block: str, page: int) -> None:
        with self.lock:
            self.rewritten.setdefault(block, set()).add(page)

    def note_hints(self, block: str, mask: npt.NDArray[np.bool_]) -> None:
        with self.lock:
            have = self.hinted.get(block)
            self.hinted[block] = mask.copy() if have is None or have.shape != mask.shape else (have | mask)

    def flush(self) -> None:
        with self.lock:
            arrays: dict[str, Any] = {f"hinted/{b}": m for b, m in self.hinted.items()}
            arrays.update({f"rewritten/{b}": np.array(sorted(p), dtype=np.int64) for b, p in self.rewritten.items()})
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)


def _read_fault(path: Path | None) -> dict[str, set[int]]:
    if path is None or not path.exists():
        return {}
    spec = json.loads(path.read_text())
    return {str(spec["block"]): {int(p) for p in spec["pages"]}}


class _WitnessWatch(MigrationWatch):
    """One migration: the gate wrapped, hints noted at each release, flushed at the end."""

    def __init__(self, witness: _Witness) -> None:
        self.witness = witness

    def gate(self, gate: RewriteGate) -> RewriteGate:
        return _WitnessGate(gate, self.witness)

    def epoch_released(self, epoch: Any) -> None:
        w = self.witness
        for block in epoch.blocks():
            mask = epoch.free_mask(block)
            if mask is not None:
                w.note_hints(block, np.asarray(mask, dtype=bool))
        w.flush()

    def finished(self, result: Any) -> None:
        self.witness.flush()


class WitnessObserver(MigrationObserver):
    """Numbers each VM's migrations over the daemon's life (DIR/VM-N.npz)."""

    def __init__(self, witness_dir: Path, fault_file: Path | None) -> None:
        self.dir = witness_dir
        self.fault_file = fault_file
        self.counts: dict[str, int] = {}

    def migration(self, vm: str, number: int) -> MigrationWatch:
        n = self.counts[vm] = self.counts.get(vm, 0) + 1
        return _WitnessWatch(_Witness(self.dir, vm, n, _read_fault(self.fault_file)))


def load(path: Path) -> tuple[dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[np.int64]]]:
    """(hinted masks, rewritten page indexes) per block from a witness file."""
    with np.load(path) as z:
        hinted = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("hinted/")}
        rewritten = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("rewritten/")}
    return hinted, rewritten


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    ap = argparse.ArgumentParser(prog="daemon_witness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--witness-dir", type=Path, required=True)
    ap.add_argument("--fault-file", type=Path)
    opts = ap.parse_args(args[:split])
    opts.witness_dir.mkdir(parents=True, exist_ok=True)
    return cli_main(args[split + 1 :], observer=WitnessObserver(opts.witness_dir, opts.fault_file))


if __name__ == "__main__":
    sys.exit(main())

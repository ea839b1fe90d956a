"""``fph-collector`` for end-to-end tests, with a witness (and, on request, a
planted fault) in its migration proxy.

    python -m tests.vm.daemon_witness --witness-dir DIR [--fault-file F] -- serve --config ...

runs the real daemon (``host_collector.cli.main``) after two test-only hooks:

* every :class:`MigrationProxy` the daemon's migration runs create gets its
  gate wrapped: each page the proxy rewrites (an oracle answered "free" for
  it: docs/stream-proxy.md, the proxy zeroes exactly those records) is
  recorded, per migration;
* :meth:`Collector.release_epoch` first ORs the epoch's free-page bitmaps
  into a per-VM union: every page some agent hinted free during the
  migration, as the collector accepted it.

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
import contextvars
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

LOG = logging.getLogger("daemon_witness")


class _RecordingOracle:
    """Answers as ``inner`` (plus planted pages); records every "free"."""

    def __init__(self, inner: Any, witness: _Witness) -> None:
        self.inner = inner
        self.witness = witness

    def is_free(self, block: str, page: int) -> bool:
        free = bool(self.inner is not None and self.inner.is_free(block, page))
        if not free and page in self.witness.fault.get(block, ()):
            free = True
        if free:
            self.witness.note_rewrite(block, page)
        return free


class _WitnessGate:
    """A RewriteGate (and SpanGate) that delegates to the daemon's gate."""

    def __init__(self, inner: Any, witness: _Witness) -> None:
        self.inner = inner
        self.witness = witness
        if hasattr(inner, "oracle_until"):
            self.oracle_until = self._oracle_until

    def received(self, total: int) -> None:
        self.inner.received(total)

    def decided_through(self) -> int:
        return int(self.inner.decided_through())

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.inner.add_listener(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        remove = getattr(self.inner, "remove_listener", None)
        if remove is not None:
            remove(callback)

    def _wrap(self, oracle: Any) -> Any:
        if oracle is None and not self.witness.fault:
            return None
        return _RecordingOracle(oracle, self.witness)

    def oracle_for(self, end: int) -> Any:
        return self._wrap(self.inner.oracle_for(end))

    def _oracle_until(self, end: int) -> tuple[Any, int]:
        oracle, valid = self.inner.oracle_until(end)
        return self._wrap(oracle), valid

    def __getattr__(self, name: str) -> Any:  # ledger, failure, stats...: as the inner gate
        return getattr(self.inner, name)


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


def install(witness_dir: Path, fault_file: Path | None) -> None:
    """Patch the daemon's migration code (call before running the CLI)."""
    from host_collector import epochs
    from host_collector.migrate import run

    current: dict[str, _Witness] = {}
    counts: dict[str, int] = {}
    real_proxy: type = getattr(run, "MigrationProxy")
    real_release = epochs.Collector.release_epoch
    real_run = run.MigrationRun.run
    running_vm: contextvars.ContextVar[str] = contextvars.ContextVar("running_vm", default="unknown")

    async def run_with_vm(self: Any) -> Any:
        # The proxy is made inside the run's task: it sees the VM through this.
        running_vm.set(self.plan.vm)
        return await real_run(self)

    class WitnessedProxy(real_proxy):  # type: ignore[misc]
        def __init__(self, listen: str, dest: str, gate: Any, *args: Any, **kw: Any) -> None:
            vm = running_vm.get()
            counts[vm] = counts.get(vm, 0) + 1
            w = current[vm] = _Witness(witness_dir, vm, counts[vm], _read_fault(fault_file))
            self._witness = w
            super().__init__(listen, dest, _WitnessGate(gate, w), *args, **kw)

        def _finish(self, *args: Any, **kw: Any) -> Any:
            try:
                return super()._finish(*args, **kw)
            finally:
                self._witness.flush()

    def release_epoch(self: Any, vm_name: str, epoch_id: int) -> None:
        ep = self.get_epoch(vm_name, epoch_id)
        w = current.get(vm_name)
        if ep is not None and w is not None:
            for block in ep.blocks():
                mask = ep.free_mask(block)
                if mask is not None:
                    w.note_hints(block, np.asarray(mask, dtype=bool))
        real_release(self, vm_name, epoch_id)
        if w is not None:
            w.flush()

    setattr(run, "MigrationProxy", WitnessedProxy)
    setattr(run.MigrationRun, "run", run_with_vm)
    setattr(epochs.Collector, "release_epoch", release_epoch)


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
    install(opts.witness_dir, opts.fault_file)
    from host_collector.cli import main as cli_main

    return cli_main(args[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())

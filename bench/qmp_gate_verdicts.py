#!/usr/bin/env python3
"""Cost of the epoch gate's per-record verdicts, as the proxy pays it.

For each 4 KiB PAGE record the proxy calls ``received`` (per read chunk),
``oracle_for(end)`` and ``is_free`` once. This drives an EpochLedger with the
real collector's ``Epoch`` bitmaps and a poll every 1 MiB of stream (about
30 ms at 300 MiB/s), and compares with the plain relay's gate (NoHints),
interleaved rounds so a noisy machine affects both alike.

Last line: one JSON object with records/s for both, the ratio, and the
implied stream rate the gate sustains on one core.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from host_collector.rewrite.gate import NoHints
from host_collector.rewrite.ledger import EpochLedger

RECORD = 8 + 4096  # header + page, CONTINUE set (no idstr)
PAGES = 1 << 18  # a 1 GiB block
RECORDS = 200_000
POLL_EVERY = 1 << 20


class BitmapEpoch:
    """The shape of host_collector.epochs.Epoch's query side: one numpy bool mask per block."""

    def __init__(self, epoch_id: int, rng: np.random.Generator) -> None:
        self.id = epoch_id
        self.is_open = True
        self.hints_pending = False
        self.answered = True
        self._masks = {"pc.ram": rng.random(PAGES) < 0.3}

    def is_free(self, block: str, page: int) -> bool:
        m = self._masks.get(block)
        return m is not None and 0 <= page < m.shape[0] and bool(m[page])


class BenchCollector:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(1)
        self.n = 0

    def open_epoch(self, vm: str, deadline_s: float, live_hints: bool = True) -> BitmapEpoch:
        self.n += 1
        return BitmapEpoch(self.n, self.rng)

    def close_epoch(self, vm: str, epoch_id: int, reason: str = "on demand") -> None:
        pass

    def release_epoch(self, vm: str, epoch_id: int) -> None:
        pass


def run_gate() -> float:
    led = EpochLedger(BenchCollector(), "vm")
    led.on_pass(1)
    pages = np.random.default_rng(2).integers(0, PAGES, RECORDS).tolist()
    total = 0
    zeroed = 0
    pending: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    next_poll = POLL_EVERY
    sync = 1
    for page in pages:
        total += RECORD
        led.received(total)
        pending.append((total, page))
        if total >= next_poll:
            if total // (64 * POLL_EVERY) + 1 > sync:  # a new sync every 64 MiB
                sync += 1
                led.on_pass(sync)
            led.on_poll(total, sync, sync)
            next_poll += POLL_EVERY
            for end, p in pending:
                o = led.oracle_for(end)
                if o is not None and o.is_free("pc.ram", p):
                    zeroed += 1
            pending.clear()
    dt = time.perf_counter() - t0
    assert zeroed > 0
    return RECORDS / dt


def run_plain() -> float:
    gate = NoHints()
    pages = np.random.default_rng(2).integers(0, PAGES, RECORDS).tolist()
    total = 0
    t0 = time.perf_counter()
    for page in pages:
        total += RECORD
        gate.received(total)
        if total <= gate.decided_through():
            o = gate.oracle_for(total)
            if o is not None and o.is_free("pc.ram", page):
                pass
    return RECORDS / (time.perf_counter() - t0)


def main() -> None:
    gate_rates, plain_rates = [], []
    for _ in range(5):
        plain_rates.append(run_plain())
        gate_rates.append(run_gate())
    g, p = statistics.median(gate_rates), statistics.median(plain_rates)
    print(f"gate  {g:12,.0f} records/s  ({g * 4096 / 2**20:,.0f} MiB/s of pages)")
    print(f"plain {p:12,.0f} records/s")
    print(
        json.dumps(
            {
                "gate_records_per_s": round(g),
                "plain_records_per_s": round(p),
                "gate_vs_plain": round(g / p, 3),
                "gate_mib_per_s": round(g * 4096 / 2**20),
            }
        )
    )


if __name__ == "__main__":
    main()

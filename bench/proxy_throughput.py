"""Throughput of the migration proxy against a plain byte relay, same run, same stream.

The stream is captured once from a real QEMU (``migrate exec:cat>FILE``) whose
RAM file holds runs of random and zero pages, then replayed over loopback
through each relay in turn, several rounds, alternating. A helper process
sends (sendfile, so it costs the relay's core little) and sinks; the relay
under test runs in this process on one thread.

Figures: the median and the best round of each (GB/s of source stream), and
the median over rounds of proxy/relay measured back to back.

Relays: ``relay`` (recv_into + sendall, what the proxy does in pass-through),
``proxy`` (NoHints gate: parse only), ``proxy_hints`` (a gate that frees about
half of the non-zero pages and decides at once, one oracle for the whole
stream), ``proxy_held`` (the same hints, but the gate confirms every 2 ms what
it had received 2 ms earlier, so records wait in the hold queue as with the
real epoch gate; one oracle window per confirmation), ``proxy_held_cov``
(``proxy_held`` with the migration report's coverage counter on the relay's
tap, one epoch whose free set is the hinted pages: what coverage costs), and
with ``--paced-ms T`` ``proxy_paced`` (``proxy_held`` confirming every T ms,
with the daemon's 16 MiB read-ahead: the source is paced as in a migration
whose ``query-migrate`` round trip takes T).

Parsers: each proxy mode runs with the C record loop (``_fastparse``) and,
with ``--parser both`` (the default when the extension is built), also with
the pure-Python loop (``FPH_NO_C_PARSER=1``; keys ending in ``_py``), in the
same rounds. ``parser`` in the JSON says which loop the unsuffixed modes used.

Transports: ``tcp`` (127.0.0.1, the issue's "over loopback") and ``unix``
(what a proxy on the source host can offer QEMU: ``migrate unix:PATH``); on
this 2-core machine loopback TCP caps even a direct sender->sink copy near
2.2 GB/s, so the unix figures show what the relay code itself can do.

Also reported: CPU seconds (user, sys) this process spent per GB of stream,
median over rounds (the relay or proxy thread is the only busy one), and its
inverse ``core_GBps``, what one core would carry doing only this: unlike
GB/s these hardly depend on what else runs on the machine. ``loadavg`` is
the 1-minute load average before and after the run.

Last line: one JSON object. Usage:
    .venv/bin/python bench/proxy_throughput.py [--ram-mib 1024] [--rounds 5] [--transport tcp unix]
        [--parser c python both]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from host_collector.layout import RamLayout, RamRange
from host_collector.migrate.coverage import CoverageCounter
from host_collector.proxy.migration_proxy import MigrationProxy
from host_collector.rewrite.gate import NoHints, PageOracle, RewriteGate
from host_collector.stream import parser as stream_parser

PAGE = 4096
MiB = 1 << 20


def fill_ram(path: Path, size: int, seed: int) -> tuple[bytearray, float]:
    """Runs (mean 32 pages) alternately random or zero; returns the non-zero page mask."""
    rng = np.random.default_rng(seed)
    pages = size // PAGE
    mask = bytearray(pages)
    with open(path, "wb") as f:
        f.truncate(size)
        p = 0
        random_run = True
        while p < pages:
            n = int(min(pages - p, rng.geometric(1 / 32)))
            if random_run:
                f.seek(p * PAGE)
                f.write(rng.integers(0, 256, n * PAGE, dtype=np.uint8).tobytes())
                mask[p : p + n] = b"\1" * n
            p += n
            random_run = not random_run
    return mask, sum(mask) / pages


def capture(cache: Path, ram_mib: int) -> tuple[Path, bytearray]:
    """Capture the stream of a -S q35 guest with ``ram_mib`` MiB (cached), and its non-zero page mask."""
    out = cache / f"stream-{ram_mib}M.raw"
    mask_file = cache / f"stream-{ram_mib}M.mask"
    if out.exists() and mask_file.exists():
        return out, bytearray(mask_file.read_bytes())
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with tempfile.TemporaryDirectory(prefix="fph-bench-stream-") as td:
        ram = Path(td) / "ram"
        mask, _ = fill_ram(ram, ram_mib * MiB, 1)
        mask_file.write_bytes(mask)
        qmp = Path(td) / "qmp"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
            "-S", "-machine", "q35,memory-backend=mem", "-m", f"{ram_mib}M",
            "-object", f"memory-backend-file,id=mem,size={ram_mib}M,mem-path={ram},share=on",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            while not qmp.exists():
                time.sleep(0.05)
            m = QEMUMonitorProtocol(str(qmp))
            m.connect()
            m.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
            tmp = out.with_suffix(".part")
            m.cmd("migrate", uri=f"exec:cat > {tmp}")
            while True:
                info = m.cmd("query-migrate")
                assert isinstance(info, dict)
                if info.get("status") in ("completed", "failed"):
                    break
                time.sleep(0.1)
            if info["status"] != "completed":
                raise RuntimeError(f"capture failed: {info}")
            m.close()
            tmp.rename(out)
        finally:
            proc.kill()
            proc.wait()
    return out, mask


class BitmapOracle:
    def __init__(self, free: dict[str, bytearray]) -> None:
        self.free = free

    def is_free(self, block: str, page: int) -> bool:
        m = self.free.get(block)
        return m is not None and page < len(m) and m[page] == 1


class ImmediateGate(NoHints):
    def __init__(self, oracle: PageOracle) -> None:
        self.oracle = oracle

    def oracle_for(self, end: int) -> PageOracle | None:
        return self.oracle

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        # NoHints' own says "no hints, ever": without this the mode rewrites nothing.
        return self.oracle, 1 << 63


class LaggingGate(RewriteGate):
    """Confirms, every ``tick`` seconds, what had been received one tick earlier."""

    def __init__(self, oracle: PageOracle, tick: float = 0.002) -> None:
        self.oracle = oracle
        self.tick = tick
        self.total = 0
        self.decided = 0
        self.listeners: list[Callable[[], None]] = []
        self.stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        pending = 0
        while not self.stop.wait(self.tick):
            self.decided, pending = pending, self.total
            for cb in self.listeners:
                cb()

    def received(self, total: int) -> None:
        self.total = total

    def decided_through(self) -> int:
        return self.decided

    def oracle_for(self, end: int) -> PageOracle | None:
        return self.oracle

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        # One window per confirmation, as the epoch ledger gives one per poll.
        return self.oracle, self.decided

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)


class Transport:
    """Where sockets live: loopback TCP or unix sockets in a private directory."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.n = 0

    def listen(self) -> tuple[socket.socket, str]:
        if self.kind == "tcp":
            ls = socket.create_server(("127.0.0.1", 0))
            return ls, f"tcp:127.0.0.1:{ls.getsockname()[1]}"
        self.n += 1
        path = self.tmp / f"{os.getpid()}-{self.n}.sock"
        ls = socket.socket(socket.AF_UNIX)
        ls.bind(str(path))
        ls.listen()
        return ls, f"unix:{path}"

    def spare_address(self) -> str:
        """An address for the proxy to listen on (it binds it itself)."""
        if self.kind == "tcp":
            return "tcp:127.0.0.1:0"
        self.n += 1
        return f"unix:{self.tmp / f'{os.getpid()}-{self.n}.sock'}"


def connect(addr: str) -> socket.socket:
    kind, _, rest = addr.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.create_connection((host, int(port)))
    s = socket.socket(socket.AF_UNIX)
    s.connect(rest)
    return s


def plain_relay(listener: socket.socket, dest: str, ready: threading.Event) -> None:
    ready.set()
    src, _ = listener.accept()
    dst = connect(dest)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if not n:
            break
        dst.sendall(view[:n])
    dst.shutdown(socket.SHUT_WR)
    dst.recv(1)
    dst.close()
    src.close()


def peer(stream: str, conn: Any, tmp: Path) -> None:
    """Helper process: per request, sink on an address, then sendfile the stream to the relay."""
    size = os.path.getsize(stream)
    sinks = {kind: Transport(kind, tmp).listen() for kind in ("tcp", "unix")}
    conn.send({kind: addr for kind, (_, addr) in sinks.items()})
    while True:
        req = conn.recv()
        if req is None:
            return
        kind, target = req
        sink = sinks[kind][0]
        result: dict[str, float] = {}

        def drain() -> None:
            c, _ = sink.accept()
            buf = bytearray(4 << 20)
            got = 0
            while True:
                n = c.recv_into(buf)
                if not n:
                    break
                got += n
            result["end"] = time.perf_counter()
            result["got"] = got
            c.close()

        t = threading.Thread(target=drain)
        t.start()
        s = connect(target)
        start = time.perf_counter()
        with open(stream, "rb") as f:
            sent = 0
            while sent < size:
                sent += os.sendfile(s.fileno(), f.fileno(), sent, size - sent)
        s.shutdown(socket.SHUT_WR)
        t.join()
        s.close()
        conn.send({"seconds": result["end"] - start, "sent": size, "received": result["got"]})


class Peer:
    """The helper process (:func:`peer`): sends the stream to a relay and sinks what comes out."""

    def __init__(self, stream: Path, tmp: Path) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=peer, args=(str(stream), child, tmp), daemon=True)
        self.proc.start()
        #: transport kind -> where the helper sinks
        self.sinks: dict[str, str] = self.conn.recv()

    def replay(self, kind: str, addr: str) -> None:
        self.conn.send((kind, addr))

    def result(self, timeout: float = 120.0) -> dict[str, float]:
        """The helper's figures for the last replay; fails instead of hanging if it died."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the sender/sink process did not report (exit code {self.proc.exitcode})")
        r: dict[str, float] = self.conn.recv()
        return r

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def run_one(mode: str, helper: Peer, tr: Transport, free: dict[str, bytearray]) -> dict[str, float]:
    """One replay through ``mode``; the helper's timing plus this process's CPU seconds."""
    sink = helper.sinks[tr.kind]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    if mode == "relay":
        ls, addr = tr.listen()
        ready = threading.Event()
        t = threading.Thread(target=plain_relay, args=(ls, sink, ready), daemon=True)
        t.start()
        ready.wait()
        helper.replay(tr.kind, addr)
        r = helper.result()
        t.join()
        ls.close()
    else:
        r = run_proxy(mode, helper, tr, sink, free)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    r.update(user=cpu1.ru_utime - cpu0.ru_utime, sys=cpu1.ru_stime - cpu0.ru_stime)
    return r


class _Epoch:
    """One epoch for the coverage counter: opened and answered before the stream."""

    id = 1
    opened_at = first_chunk_at = 0.0

    def __init__(self, free: dict[str, bytearray]) -> None:
        self.masks = {b: np.frombuffer(m, dtype=np.uint8).astype(np.bool_) for b, m in free.items()}

    def blocks(self) -> list[str]:
        return list(self.masks)

    def free_mask(self, block: str) -> Any:
        return self.masks.get(block)


#: ``--paced-ms``; the read-ahead is the daemon's default.
PACED_S = 0.05
READAHEAD = 16 * MiB


def run_proxy(mode: str, helper: Peer, tr: Transport, sink: str, free: dict[str, bytearray]) -> dict[str, float]:
    gate: RewriteGate
    base = mode.removesuffix("_py")
    cov: CoverageCounter | None = None
    readahead: int | None = None
    if base == "proxy":
        gate = NoHints()
    elif base == "proxy_hints":
        gate = ImmediateGate(BitmapOracle(free))
    elif base == "proxy_paced":
        gate = LaggingGate(BitmapOracle(free), tick=PACED_S)
        readahead = READAHEAD
    else:
        gate = LaggingGate(BitmapOracle(free))
    if base == "proxy_held_cov":
        pages = {b: len(m) for b, m in free.items()}
        layout = RamLayout(
            ranges=tuple(RamRange(i << 40, n * PAGE, b, 0) for i, (b, n) in enumerate(pages.items())),
            blocks={b: n * PAGE for b, n in pages.items()},
        )
        cov = CoverageCounter(layout)
        epoch = _Epoch(free)
        cov.epoch_opened(1, epoch)
        drainer = threading.Event()

        def drain_loop() -> None:  # as the daemon's status loop does, every 0.1 s
            while not drainer.wait(0.1):
                cov.drain()

        threading.Thread(target=drain_loop, daemon=True).start()
    # The proxy's parser reads the switch when it is created (on accept).
    os.environ[stream_parser.NO_C_ENV] = "1" if mode.endswith("_py") else ""
    px = MigrationProxy(
        tr.spare_address(),
        sink,
        gate,
        hold_bytes=256 * MiB,
        readahead_bytes=readahead,
        tap=cov.batch if cov is not None else None,
    )
    px.start()
    helper.replay(tr.kind, px.listen_address)
    try:
        r = helper.result()
    finally:
        res = px.wait(60)
        if isinstance(gate, LaggingGate):
            gate.stop.set()
        px.close()
    assert res is not None, "proxy did not finish"
    st = res.stats
    r.update(rewritten=st.pages_rewritten, held=st.pages_held, unjudged=st.pages_released_unjudged, paced_s=st.paced_s)
    if cov is not None:
        drainer.set()
        cov.epoch_released(epoch)
        c = cov.report(0.0, time.monotonic())
        assert c.rewritten == c.sent_after_report > 0, (
            f"{mode}: coverage counted {c.rewritten} of {c.sent_after_report}"
        )
    assert st.fallback_reason is None and res.outcome.value == "finished", res
    assert base == "proxy" or st.pages_rewritten > 0, f"{mode}: the hints rewrote nothing"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--transport", nargs="+", choices=("tcp", "unix"), default=["tcp", "unix"])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fph-bench-stream")
    ap.add_argument(
        "--parser", choices=("c", "python", "both"), default=None,
        help="record loop of the proxy runs (default: both if the C extension is built, else python)",
    )  # fmt: skip
    ap.add_argument(
        "--paced-ms",
        type=float,
        default=None,
        help="also run proxy_paced: the gate confirms every this many ms, 16 MiB read-ahead",
    )
    args = ap.parse_args()
    global PACED_S
    if args.paced_ms is not None:
        if args.paced_ms <= 0:
            ap.error("--paced-ms must be positive")
        PACED_S = args.paced_ms / 1000
    status = stream_parser.accelerator()  # "c", or why not (FPH_NO_C_PARSER is honoured)
    choice = args.parser or ("both" if status == "c" else "python")
    if choice != "python" and status != "c":
        ap.error(f"--parser {choice}: {status}")
    proxies = ["proxy", "proxy_hints", "proxy_held", "proxy_held_cov"] + (["proxy_paced"] if args.paced_ms else [])
    py_modes = [m + "_py" for m in proxies]
    modes = ["relay"] + {"c": proxies, "python": py_modes, "both": [x for p in zip(proxies, py_modes) for x in p]}[
        choice
    ]
    load_before = os.getloadavg()[0]
    args.cache.mkdir(exist_ok=True)
    stream, mask = capture(args.cache, args.ram_mib)
    nonzero = sum(mask) / len(mask)
    # Half of the non-zero pages are hinted free (every other page).
    half = np.frombuffer(mask, dtype=np.uint8).copy()
    half[1::2] = 0
    free = bytearray(half.tobytes())

    with tempfile.TemporaryDirectory(prefix="fph-bench-sock-") as td:
        tmp = Path(td)
        helper = Peer(stream, tmp)
        runs = [(kind, m) for kind in args.transport for m in modes]
        results: dict[tuple[str, str], list[dict[str, float]]] = {r: [] for r in runs}
        transports = {kind: Transport(kind, tmp) for kind in args.transport}
        for _ in range(args.rounds):
            for kind, m in runs:
                results[kind, m].append(run_one(m, helper, transports[kind], {"mem": free}))
        helper.close()

    size = os.path.getsize(stream)
    out: dict[str, Any] = {
        "stream_bytes": size,
        "ram_mib": args.ram_mib,
        "nonzero_fraction": round(nonzero, 3),
        "rounds": args.rounds,
        "parser": {
            "c": "c",
            "both": "c (python in the *_py keys)",
            "python": status if status != "c" else "python: --parser python",
        }[choice],
        "loadavg": [load_before, os.getloadavg()[0]],
    }
    gbps: dict[tuple[str, str], list[float]] = {}
    for kind, m in runs:
        rs = results[kind, m]
        gbps[kind, m] = [size / r["seconds"] / 1e9 for r in rs]
        out[f"{kind}_{m}_GBps"] = round(statistics.median(gbps[kind, m]), 3)
        out[f"{kind}_{m}_best_GBps"] = round(max(gbps[kind, m]), 3)
        for cpu in ("user", "sys"):
            out[f"{kind}_{m}_{cpu}_s_per_GB"] = round(statistics.median(r[cpu] for r in rs) / (size / 1e9), 4)
        # What one core would carry if this were all it did: GB per CPU second.
        cpu_s = statistics.median(r["user"] + r["sys"] for r in rs)
        out[f"{kind}_{m}_core_GBps"] = round(size / 1e9 / cpu_s, 2) if cpu_s > 0 else None
        print(f"{kind:4s} {m:15s} GB/s per round: {' '.join(f'{g:.2f}' for g in gbps[kind, m])}", file=sys.stderr)
    for kind in args.transport:
        for m in modes[1:]:
            # The machine is shared: compare each round's proxy run with the
            # relay run of the same round, then take the median of those ratios.
            ratios = [p / r for p, r in zip(gbps[kind, m], gbps[kind, "relay"])]
            out[f"{kind}_{m}_vs_relay"] = round(statistics.median(ratios), 3)
        for m in modes[1:]:
            if m.startswith("proxy_hints"):
                out[f"{kind}_{m}_rewritten_pages"] = results[kind, m][-1].get("rewritten")
            if m.startswith(("proxy_held", "proxy_paced")):
                out[f"{kind}_{m}_rewritten_pages"] = results[kind, m][-1].get("rewritten")
                out[f"{kind}_{m}_held_pages"] = results[kind, m][-1].get("held")
                out[f"{kind}_{m}_unjudged_pages"] = results[kind, m][-1].get("unjudged")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

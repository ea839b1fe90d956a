"""Every parser of outside input is linear in its input, depth-bounded and
raises only its own error type: the stream parser however the source slices
the stream, mtree lines built to make a backtracking regex crawl, QMP replies
of the wrong shape, configuration files, packed ranges."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fphint import ranges
from host_collector import config
from host_collector.layout import LayoutError
from host_collector.qmp.mtree import MtreeError, map_ram, parse_mtree
from host_collector.qmp.ram_layout import MemoryFacts, build_layout
from host_collector.stream import wire as s
from host_collector.stream.parser import StreamParser

DATA = Path(__file__).resolve().parent / "data" / "qmp"


def load_capture(name: str) -> MemoryFacts:
    import dataclasses
    import json

    raw = json.loads((DATA / f"{name}.json").read_text())
    names = {f.name for f in dataclasses.fields(MemoryFacts)}
    return MemoryFacts(**{k: v for k, v in raw.items() if k in names})


SPAN = "0000000000000000-0000000000000fff"


def _mem_size_stream(blocks: int) -> bytes:
    names = [f"b{i:06d}".encode() for i in range(blocks)]
    body = b"".join(bytes([len(n)]) + n + struct.pack(">Q", 4096) for n in names)
    return (
        struct.pack(">II", s.FILE_MAGIC, s.FILE_VERSION)
        + bytes([s.SECTION_START])
        + struct.pack(">I", 2)
        + bytes([3])
        + b"ram"
        + struct.pack(">II", 0, 4)
        + struct.pack(">Q", 4096 * blocks | s.FLAG_MEM_SIZE)
        + body
        + struct.pack(">Q", s.FLAG_EOS)
    )


def test_a_mem_size_list_trickling_in_is_parsed_in_linear_time() -> None:
    """15 000 blocks (240 KB, near the item limit) arriving 16 bytes at a time:
    re-parsing the list from its start at every read took minutes."""
    data = _mem_size_stream(15000)
    p = StreamParser()
    buf = bytearray()
    pos = 0
    t0 = time.monotonic()
    for i in range(0, len(data), 16):
        buf += data[i : i + 16]
        pos = p.feed(buf, pos, len(buf), 0)
    assert p.fallback is None and len(p.blocks) == 15000
    assert time.monotonic() - t0 < 3


def test_a_record_is_refused_on_its_header() -> None:
    """A CONTINUE page whose offset is beyond its block: refused before its 4 KiB arrived."""
    seed = (
        Path(__file__).resolve().parent / "fuzz" / "corpus" / "stream" / "regress-bad-offset-in-a-cut-record.bin"
    ).read_bytes()
    p = StreamParser()
    p.feed(bytearray(seed), 0, len(seed), 0)
    assert p.fallback is not None and p.fallback.offset == 168 and "beyond the end of block" in p.fallback.reason


def test_mtree_alias_lines_cost_linear_time() -> None:
    """An alias line of many " @" made the old regex backtrack quadratically."""
    name = " @x" * 1300  # just under the line limit
    text = (
        "address-space: memory\n"
        f"  {SPAN} (prio 0, i/o): system\n"
        f"    {SPAN} (prio 0, ram): alias {name} @target {SPAN}\n"
    ) * 200
    t0 = time.monotonic()
    with pytest.raises(MtreeError):
        map_ram(parse_mtree(text))
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(
    "text",
    [
        "address-space: memory\n" + f"  {SPAN} (prio {'9' * 5000}, ram): r\n",  # int() digit limit
        "address-space: memory\n" + "  " + "x" * 10000 + "\n",
        "address-space: memory\n" + f"  {SPAN} (prio 0, ram): r\n" * 2 + "x" * (5 << 20),
        "memory-region: m\n" + "".join(f"{'  ' * (i + 1)}{SPAN} (prio 0, i/o): r{i}\n" for i in range(100)),
    ],
)
def test_mtree_bounds_end_as_mtree_errors(text: str) -> None:
    with pytest.raises(MtreeError):
        map_ram(parse_mtree(text))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "address-space: memory",
                "memory-region: pc.ram",
                "memory-region: system",
                f"  {SPAN} (prio 0, i/o): system",
                f"    {SPAN} (prio 1, ram): alias a @pc.ram {SPAN}",
                f"    {SPAN} (prio 0, ram): alias a @system {SPAN}",
                f"  {SPAN} (prio 0, ram): pc.ram",
                f"      {SPAN} (prio 0, ram): pc.ram [disabled]",
                f"    {SPAN} (prio -1, rom): bios",
                "",
                "garbage",
                "  0000000000001000-0000000000000fff (prio 0, ram): backwards",
            ]
        ),
        max_size=40,
    )
)
def test_mtree_raises_only_mtree_errors(lines: list[str]) -> None:
    try:
        map_ram(parse_mtree("\n".join(lines)))
    except MtreeError:
        pass


qmp_value: Any = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1 << 65) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "type", "data", "memdev", "size", "addr", "base-memory", "plugged-memory"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(memdevs=qmp_value, devices=qmp_value, summary=qmp_value)
def test_layout_from_odd_qmp_replies_raises_only_layout_errors(memdevs: Any, devices: Any, summary: Any) -> None:
    cap = load_capture("100-pc-1g")
    facts = MemoryFacts(cap.mtree, cap.ramblocks, memdevs, devices, summary, cap.tseg_max)
    try:
        build_layout(facts)
    except LayoutError:
        pass


def test_a_real_capture_still_builds() -> None:
    assert build_layout(load_capture("100-q35-1g")).layout.ram_bytes > 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ("[collector]\nmax_deadline_s = nan\n", "positive and finite"),
        ("[collector]\nreport_idle_timeout_s = inf\n", "positive and finite"),
        ("[collector]\nmax_message_bytes = 0x7fffffffffff\n", "larger than"),
        ("[collector]\nshutdown_grace_s = -1\n", "shutdown_grace_s"),
        ('[[vm]]\nname = "a"\ntoken_file = "/dev/zero"\n', "longer than"),
        ('[[vm]]\nname = "a"\ntoken = "0123456789abcdef0"\nunix_uid = -1\n', "not a uid"),
    ],
)
def test_config_bounds(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(config.ConfigError, match=message):
        config.load(f)


def test_config_file_size_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load(f)
    with pytest.raises(config.ConfigError, match="UTF-8"):
        config.loads(b"\xff\xfe")


toml_scalar = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=6)
toml_value: Any = st.recursive(
    toml_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    collector=st.dictionaries(
        st.sampled_from(
            [
                "listen",
                "admin",
                "metrics",
                "default_deadline_ms",
                "shutdown_grace_s",
                "max_message_bytes",
                "max_deadline_s",
                "retained_epochs",
                "proxy_hold_s",
            ]
        ),
        toml_value,
        max_size=4,
    ),
    vm=st.dictionaries(
        st.sampled_from(["name", "token", "vsock_cid", "unix_uid", "ram", "blocks", "qmp"]), toml_value, max_size=5
    ),
)
def test_config_raises_only_config_errors(collector: dict[str, Any], vm: dict[str, Any]) -> None:
    data: dict[str, Any] = {
        "collector": {k: v for k, v in collector.items() if v is not None},
        "vm": [{k: v for k, v in vm.items() if v is not None}],
    }
    try:
        config.parse(data)
    except config.ConfigError:
        pass


@pytest.mark.parametrize("words", [[-1, 4096], [0, -4096], [1 << 64, 1], [0, 1 << 64], [0, math.inf]])
def test_range_words_must_be_uint64(words: list[Any]) -> None:
    with pytest.raises(ranges.RangeError):
        ranges.decode(words)

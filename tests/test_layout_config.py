"""RamLayout validation and the collector's config file: every bad input is a
clear error naming where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from fphint import addresses
from host_collector import config
from host_collector.layout import LayoutError, RamLayout, RamRange

GOOD_TOKEN = "0123456789abcdef-xyz"


def test_layout_rejects_bad_ranges() -> None:
    with pytest.raises(LayoutError, match="not aligned"):
        RamLayout.from_ranges([RamRange(4096 + 1, 4096, "a", 0)])
    with pytest.raises(LayoutError, match="overlaps"):
        RamLayout.from_ranges([RamRange(0, 8192, "a", 0), RamRange(4096, 4096, "b", 0)])
    with pytest.raises(LayoutError, match="beyond the end"):
        RamLayout((RamRange(0, 8192, "a", 0),), {"a": 4096})
    with pytest.raises(LayoutError, match="unknown RAMBlock"):
        RamLayout((RamRange(0, 4096, "a", 0),), {"b": 4096})
    with pytest.raises(LayoutError, match="2\\*\\*64"):
        RamLayout.from_ranges([RamRange((1 << 64) - 4096, 8192, "a", 0)])


def test_layout_split_and_find() -> None:
    lay = RamLayout.from_ranges(
        [RamRange(0, 0x80000000, "pc.ram", 0), RamRange(0x100000000, 0x40000000, "pc.ram", 0x80000000)]
    )
    assert lay.ram_bytes == 0xC0000000
    assert lay.find(0x100000000 + 4096) == lay.ranges[1]
    assert lay.find(0x90000000) is None
    assert lay.split(0x100000000, 0x100002000) == [("pc.ram", 0x80000, 2)]
    assert lay.split(0x7FFFF000, 0x100001000) is None  # crosses the hole


def write(tmp: Path, text: str) -> Path:
    p = tmp / "c.toml"
    p.write_text(text)
    return p


def test_config_full(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(GOOD_TOKEN + "-2\n")
    cfg = config.load(
        write(
            tmp_path,
            f"""
[collector]
listen = ["tcp:127.0.0.1:0", "unix:/run/x.sock", "vsock:4294967295:7420"]
admin = "unix:/run/a.sock"
metrics = "127.0.0.1:9464"
max_ranges_per_epoch = 1000
default_deadline_ms = 500
proxy_hold_bytes = 0x4000000
proxy_hold_s = 3

[[vm]]
name = "a"
token = "{GOOD_TOKEN}"
ram = [{{ gpa = 0x0, size = 0x100000, block = "pc.ram" }}]

[[vm]]
name = "b"
token_file = "tok"
vsock_cid = 5
""",
        )
    )
    assert [a.kind for a in cfg.listen] == ["tcp", "unix", "vsock"]
    assert cfg.limits.max_ranges_per_epoch == 1000 and cfg.default_deadline_s == 0.5
    assert cfg.limits.proxy_hold_bytes == 64 << 20 and cfg.limits.proxy_hold_s == 3.0
    assert cfg.vms[0].layout is not None and cfg.vms[0].layout.ram_bytes == 0x100000
    assert cfg.vms[1].token == GOOD_TOKEN + "-2" and cfg.vms[1].vsock_cid == 5 and cfg.vms[1].layout is None


@pytest.mark.parametrize(
    "body,message",
    [
        ('[[vm]]\nname = "a"\n', "exactly one of token and token_file"),
        ('[[vm]]\nname = "a"\ntoken = "short"\n', "at least 16"),
        (f'[[vm]]\nname = "a b"\ntoken = "{GOOD_TOKEN}"\n', "name"),
        (f'[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\n[[vm]]\nname = "b"\ntoken = "{GOOD_TOKEN}"\n', "token shared"),
        (
            f'[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\n[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}x"\n',
            "name used twice",
        ),
        (
            f'[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\nram = [{{ gpa = 1, size = 4096, block = "x" }}]\n',
            "not aligned",
        ),
        (f'[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\nram = [{{ gpa = 0, block = "x" }}]\n', "missing 'size'"),
        (f'[[vm]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\ncolour = 1\n', "unknown keys"),
        ('[collector]\nlisten = ["nowhere"]\n', "expected tcp:HOST:PORT"),
        ('[collector]\nadmin = "tcp:1.2.3.4:5"\n', "admin must be a unix"),
        ("[collector]\nmax_ranges_per_epoch = -1\n", "must be positive"),
        ('[collector]\nmax_ranges_per_epoch = "many"\n', "expected int"),
        ("[collector\n", "c.toml"),
        ('[[vm]]\nname = "a"\ntoken_file = "missing"\n', "cannot read token_file"),
    ],
)
def test_config_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, body))


@pytest.mark.parametrize(
    "spec,target",
    [
        ("tcp:127.0.0.1:7420", "127.0.0.1:7420"),
        ("localhost:1", "localhost:1"),
        ("[::1]:5", "[::1]:5"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("vsock:2:7420", "vsock:2:7420"),
    ],
)
def test_addresses(spec: str, target: str) -> None:
    assert addresses.parse(spec).grpc_target() == target


@pytest.mark.parametrize("spec", ["", "tcp:host", "unix:", "vsock:x:1", "vsock:2", "h:99999", "h:port"])
def test_bad_addresses(spec: str) -> None:
    with pytest.raises(addresses.AddressError):
        addresses.parse(spec)


def test_excluded_spans_are_checked_and_carved_from_windows() -> None:
    from host_collector.qmp.ram_layout import Excluded, _spans

    rs = [
        RamRange(0, 0x30000, "pc.ram", 0),
        RamRange(0xC0000, 0x3000, "pc.ram", 0xC0000),
        RamRange(0x100000, 0x100000, "pc.ram", 0x100000),
    ]
    with pytest.raises(LayoutError, match="overlaps a mapped range"):
        RamLayout.from_ranges(rs, excluded=[(0xA0000, 0x60000)])
    with pytest.raises(LayoutError, match="unaligned"):
        RamLayout.from_ranges(rs, excluded=[(0xA0000, 0x100)])
    spans = _spans([Excluded(0xA0000, 0x60000, "pam"), Excluded(0x30000, 0x20000, "smbase")], rs)
    assert spans == ((0x30000, 0x20000), (0xA0000, 0x20000), (0xC3000, 0x3D000))
    assert RamLayout.from_ranges(rs, excluded=spans).excluded == spans

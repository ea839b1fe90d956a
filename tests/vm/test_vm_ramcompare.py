"""The RAM-file checker on synthetic files: it must accept exactly what the
safety rule allows (equal pages, or proxy-rewritten pages that are zero on the
destination) and name every other differing page. The same checker runs on
real guests' RAM files in test_vm_migration.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fphint_lab.vm.ramcompare import NOT_REWRITTEN, NOT_ZERO, PAGE, compare_ram_files, find_pages

PAGES = 96


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, bytearray]:
    """Two identical files of random, non-zero pages; returns (src, dst, dst bytes)."""
    rng = np.random.default_rng(7)
    data = rng.integers(1, 256, size=PAGES * PAGE, dtype=np.uint8).tobytes()
    src, dst = tmp_path / "src.ram", tmp_path / "dst.ram"
    src.write_bytes(data)
    dst.write_bytes(data)
    return src, dst, bytearray(data)


def _write(dst: Path, data: bytearray) -> None:
    dst.write_bytes(bytes(data))


def test_identical_files_pass(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, _ = pair
    diff = compare_ram_files(src, dst)
    assert diff.ok and diff.pages == PAGES and diff.differing == 0


def test_one_flipped_byte_is_named(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, data = pair
    data[37 * PAGE + 4095] ^= 0x01
    _write(dst, data)
    diff = compare_ram_files(src, dst)
    assert not diff.ok
    assert [(b.page, b.reason) for b in diff.bad] == [(37, NOT_REWRITTEN)]
    assert diff.bad[0].offset == 37 * PAGE


def test_zeroed_page_is_allowed_only_if_rewritten(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, data = pair
    data[5 * PAGE : 6 * PAGE] = bytes(PAGE)
    _write(dst, data)
    assert [b.page for b in compare_ram_files(src, dst).bad] == [5]
    assert [b.page for b in compare_ram_files(src, dst, rewritten={4, 6}).bad] == [5]
    diff = compare_ram_files(src, dst, rewritten={5})
    assert diff.ok and diff.differing == 1 and diff.rewritten_zero == 1


def test_rewritten_page_must_be_zero(pair: tuple[Path, Path, bytearray]) -> None:
    """A proxy may only turn a page into zeros, never into other content."""
    src, dst, data = pair
    data[9 * PAGE : 10 * PAGE] = bytes(PAGE - 1) + b"\x01"
    _write(dst, data)
    diff = compare_ram_files(src, dst, rewritten={9})
    assert [(b.page, b.reason) for b in diff.bad] == [(9, NOT_ZERO)]


def test_rewritten_but_unchanged_page_is_fine(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, _ = pair
    diff = compare_ram_files(src, dst, rewritten=set(range(PAGES)))
    assert diff.ok and diff.differing == 0


def test_many_bad_pages_across_chunks(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, data = pair
    bad = [0, 7, 8, 31, 32, 33, 95]
    for p in bad:
        data[p * PAGE] ^= 0xFF
    _write(dst, data)
    diff = compare_ram_files(src, dst, chunk_pages=8, limit=4)
    assert diff.bad_count == len(bad) and diff.differing == len(bad)
    assert [b.page for b in diff.bad] == bad[:4]
    assert "and 3 more" in diff.describe()


def test_bool_mask_is_accepted(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, data = pair
    data[3 * PAGE : 4 * PAGE] = bytes(PAGE)
    _write(dst, data)
    mask = np.zeros(PAGES, dtype=bool)
    mask[3] = True
    assert compare_ram_files(src, dst, rewritten=mask).ok
    with pytest.raises(ValueError, match="bool"):
        compare_ram_files(src, dst, rewritten=np.zeros(PAGES + 1, dtype=bool))


def test_bad_inputs_are_refused(pair: tuple[Path, Path, bytearray], tmp_path: Path) -> None:
    src, dst, data = pair
    with pytest.raises(ValueError, match="out of range"):
        compare_ram_files(src, dst, rewritten={PAGES})
    short = tmp_path / "short.ram"
    short.write_bytes(bytes(data[:PAGE]))
    with pytest.raises(ValueError, match="bytes but"):
        compare_ram_files(src, short)
    odd = tmp_path / "odd.ram"
    odd.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="multiple"):
        compare_ram_files(odd, odd)


def test_find_pages_finds_every_copy(pair: tuple[Path, Path, bytearray]) -> None:
    src, dst, data = pair
    page = bytes(data[40 * PAGE : 41 * PAGE])
    assert find_pages(src, page) == [40]
    data[2 * PAGE : 3 * PAGE] = page
    data[90 * PAGE : 91 * PAGE] = page
    _write(dst, data)
    assert find_pages(dst, page, chunk_pages=7) == [2, 40, 90]
    near = page[:-1] + bytes([page[-1] ^ 1])
    assert find_pages(src, near) == []
    with pytest.raises(ValueError, match="one page"):
        find_pages(src, page[:100])

"""Page-by-page comparison of two guest RAM files after a migration.

With ``memory-backend-file,share=on`` the files *are* the guests' RAM. Once
the source is in ``postmigrate`` and the destination is paused (``-S``),
both are stable, and the migration was faithful when, for every 4 KiB page p
(shared/reference/reliability.md §4.5)::

    dst[p] == src[p]   or   (p was rewritten by the proxy  and  dst[p] is all zero)

Anything else is a corruption this module reports page by page. The files
are read with read(2) in chunks, which never allocates tmpfs pages for holes
(mapping them would).
"""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

PAGE = 4096
_WORDS = PAGE // 8

#: Why a page is bad.
NOT_REWRITTEN = "differs and the proxy did not rewrite it"
NOT_ZERO = "rewritten by the proxy but not zero on the destination"


@dataclass(frozen=True)
class BadPage:
    page: int
    reason: str

    @property
    def offset(self) -> int:
        return self.page * PAGE


@dataclass(frozen=True)
class RamDiff:
    """The outcome of one comparison."""

    pages: int
    #: Pages whose contents differ between the files.
    differing: int
    #: Differing pages accepted because the proxy rewrote them to zero.
    rewritten_zero: int
    #: Every page that breaks the rule (at most ``limit`` of them listed).
    bad: tuple[BadPage, ...] = field(default=())
    bad_count: int = 0

    @property
    def ok(self) -> bool:
        return self.bad_count == 0

    def describe(self) -> str:
        head = (
            f"{self.pages} pages, {self.differing} differ, {self.rewritten_zero} rewritten to zero, "
            f"{self.bad_count} bad"
        )
        lines = [head] + [f"  page {b.page} (offset {b.offset:#x}): {b.reason}" for b in self.bad]
        if self.bad_count > len(self.bad):
            lines.append(f"  ... and {self.bad_count - len(self.bad)} more")
        return "\n".join(lines)


def _mask(rewritten: Collection[int] | npt.NDArray[np.bool_] | None, pages: int) -> npt.NDArray[np.bool_]:
    if rewritten is None:
        return np.zeros(pages, dtype=bool)
    if isinstance(rewritten, np.ndarray):
        if rewritten.dtype != np.bool_ or rewritten.shape != (pages,):
            raise ValueError(f"rewritten mask must be bool[{pages}], got {rewritten.dtype}{list(rewritten.shape)}")
        return rewritten
    mask = np.zeros(pages, dtype=bool)
    idx = np.fromiter(rewritten, dtype=np.int64, count=len(rewritten))
    if idx.size and (idx.min() < 0 or idx.max() >= pages):
        raise ValueError(f"rewritten page index out of range 0..{pages - 1}")
    mask[idx] = True
    return mask


def compare_ram_files(
    src: Path,
    dst: Path,
    rewritten: Collection[int] | npt.NDArray[np.bool_] | None = None,
    *,
    chunk_pages: int = 8192,
    limit: int = 32,
) -> RamDiff:
    """Compare two RAM files of equal size page by page.

    :param rewritten: pages the proxy turned into zero pages (indexes from the
        start of the file, i.e. of the ``mem`` RAMBlock), as indexes or a bool mask.
    :raise ValueError: the files differ in size or are not whole pages.
    """
    size = src.stat().st_size
    if dst.stat().st_size != size:
        raise ValueError(f"{src} has {size} bytes but {dst} has {dst.stat().st_size}")
    if size % PAGE:
        raise ValueError(f"{src}: size {size} is not a multiple of {PAGE}")
    pages = size // PAGE
    allowed = _mask(rewritten, pages)
    differing = rewritten_zero = bad_count = 0
    bad: list[BadPage] = []
    with io.FileIO(src, "r") as fs, io.FileIO(dst, "r") as fd:
        for first in range(0, pages, chunk_pages):
            n = min(chunk_pages, pages - first)
            a = _read_pages(fs, n)
            b = _read_pages(fd, n)
            diff = np.flatnonzero((a != b).any(axis=1))
            if not diff.size:
                continue
            differing += int(diff.size)
            zero: npt.NDArray[np.bool_] = np.asarray(~b[diff].any(axis=1), dtype=bool)
            ok = allowed[first + diff] & zero
            rewritten_zero += int(ok.sum())
            for i, page_ok, is_zero in zip(diff.tolist(), ok.tolist(), map(bool, zero)):
                if page_ok:
                    continue
                bad_count += 1
                if len(bad) < limit:
                    reason = NOT_ZERO if allowed[first + i] and not is_zero else NOT_REWRITTEN
                    bad.append(BadPage(first + i, reason))
    return RamDiff(pages, differing, rewritten_zero, tuple(bad), bad_count)


def find_pages(path: Path, content: bytes, *, chunk_pages: int = 8192) -> list[int]:
    """Indexes of every page of a RAM file that holds exactly ``content``.

    Finds where a guest's page is *now*, without trusting a physical address
    read earlier (the guest kernel may have moved the page since); stale
    copies in free memory match too.
    """
    if len(content) != PAGE:
        raise ValueError(f"content must be one page ({PAGE} bytes), not {len(content)}")
    want = np.frombuffer(content, dtype=np.uint64)
    size = path.stat().st_size
    if size % PAGE:
        raise ValueError(f"{path}: size {size} is not a multiple of {PAGE}")
    pages = size // PAGE
    found: list[int] = []
    with io.FileIO(path, "r") as f:
        for first in range(0, pages, chunk_pages):
            n = min(chunk_pages, pages - first)
            rows = _read_pages(f, n)
            candidates = np.flatnonzero((rows[:, 0] == want[0]) & (rows[:, 1] == want[1]))
            found += [first + int(i) for i in candidates if np.array_equal(rows[i], want)]
    return found


def _read_pages(f: io.FileIO, n: int) -> npt.NDArray[np.uint64]:
    buf = bytearray(n * PAGE)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        k = f.readinto(view[got:])
        if not k:
            raise ValueError(f"unexpected end of file after {got} of {len(buf)} bytes")
        got += k
    return np.frombuffer(buf, dtype=np.uint64).reshape(n, _WORDS)

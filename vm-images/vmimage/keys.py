"""Cache keys: a digest of everything a build step reads.

A key changes when, and only when, an input of its step changes: the spec
(suite, mirror, package lists, sizes), the files copied into the guest, and
the builder code of that step. Editor droppings and byte-code caches are not
inputs. Files are hashed with their path relative to a named root and their
executable bit, so a rename or ``chmod +x`` is a change too.

Debian itself is not pinned (no snapshot mirror is reachable from CI): two
builds of one base key on different days may install different point
releases. The base manifest records every installed package version.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Bump when the meaning of a build changes without any hashed file changing.
FORMAT = 1

#: Key length in hex digits (64 bits: plenty for a local cache).
KEY_LEN = 16

_SKIP_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis"})
_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def iter_tree(root: Path) -> Iterator[Path]:
    """Files (and symlinks) under ``root`` in a stable order, without caches."""
    if root.is_file() or root.is_symlink():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith(_SKIP_SUFFIXES):
                yield Path(dirpath, name)


class Digest:
    """An incremental, labelled SHA-256 over text and files."""

    def __init__(self, purpose: str) -> None:
        self._h = hashlib.sha256()
        self.add_text("format", f"{purpose}/{FORMAT}")

    def add_text(self, label: str, text: str) -> None:
        data = text.encode()
        self._h.update(f"T {label} {len(data)}\n".encode())
        self._h.update(data)

    def add_file(self, label: str, path: Path) -> None:
        """Hash one file (by content) or symlink (by target) under ``label``."""
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.add_text(f"L {label}", os.readlink(path))
            return
        data = path.read_bytes()
        x = "x" if st.st_mode & 0o111 else "-"
        self._h.update(f"F {label} {x} {len(data)}\n".encode())
        self._h.update(data)

    def add_tree(self, label: str, root: Path) -> None:
        """Hash every file under ``root``; a missing root hashes as absent."""
        if not root.exists():
            self.add_text(f"absent {label}", "")
            return
        for path in iter_tree(root):
            rel = path.relative_to(root).as_posix() if path != root else "."
            self.add_file(f"{label}/{rel}", path)

    def add_trees(self, base: Path, names: Iterable[str]) -> None:
        for name in names:
            self.add_tree(name, base / name)

    def key(self) -> str:
        return self._h.hexdigest()[:KEY_LEN]

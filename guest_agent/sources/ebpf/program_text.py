"""The BPF program's C text, read from the package.

Its own module because two sides need it: the loader child compiles it
(loader.py) and the agent prints it (program.render). Neither has to import
the other for it, so loader.py never imports program.py.
"""

from __future__ import annotations

import importlib.resources

SOURCE_FILE = "scan.bpf.c"


def program_source() -> str:
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text()

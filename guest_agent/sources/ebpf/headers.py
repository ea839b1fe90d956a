"""Which kernel header tree bcc compiles against.

bcc needs headers for everything it compiles, even though our program takes
no layout from them. Distribution kernels have them at
/lib/modules/$(uname -r)/build (Debian splits them into ``build`` and
``source``; bcc handles that itself). A kernel without headers uses the tree
scripts/bcc-headers.sh assembles from Debian's linux-headers packages; bcc is
pointed at it through ``BCC_KERNEL_SOURCE``, which takes one directory only.
"""

from __future__ import annotations

import os

from ...errors import AgentError

CACHE_TREE = "/var/cache/fphint/kernel-headers/current"
KHEADERS = "/sys/kernel/kheaders.tar.xz"
SETUP_HINT = "run scripts/bcc-headers.sh (needs linux-headers-amd64)"


class HeadersMissing(AgentError):
    """No kernel headers bcc could compile against; the message says how to get them."""


def _complete(tree: str) -> bool:
    return os.path.isfile(os.path.join(tree, "include", "linux", "kconfig.h"))


def kernel_source(
    release: str | None = None,
    modules: str = "/lib/modules",
    cache_tree: str | None = None,
    environ: dict[str, str] | None = None,
) -> str | None:
    """The directory to put in BCC_KERNEL_SOURCE, or None when bcc finds
    headers by itself (native tree, or the kernel's built-in kheaders).

    :raise HeadersMissing: with what to do about it.
    """
    env = os.environ if environ is None else environ
    given = env.get("BCC_KERNEL_SOURCE")
    if given:
        if not _complete(given):
            raise HeadersMissing(f"BCC_KERNEL_SOURCE={given} has no include/linux/kconfig.h")
        return given
    release = release or os.uname().release
    for sub in ("build", "source"):
        if _complete(os.path.join(modules, release, sub)):
            return None
    cache_tree = cache_tree or CACHE_TREE
    if _complete(cache_tree):
        return os.path.realpath(cache_tree)
    if os.path.exists(KHEADERS):
        return None
    raise HeadersMissing(f"no kernel headers for bcc ({modules}/{release}/build is missing): {SETUP_HINT}")


def describe(source: str | None) -> str:
    return f"BCC_KERNEL_SOURCE={source}" if source else "native kernel headers"

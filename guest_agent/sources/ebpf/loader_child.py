"""The BPF loader child: ``python -m guest_agent.sources.ebpf.loader_child FD``.

The only code that imports bcc (and with it LLVM). It reads the request
(JSON, stdin) that loader.run wrote, compiles scan.bpf.c, loads the
programs, and sends their fds and the map fds over socket FD with a JSON
manifest (formats in loader.py), then exits without tearing bcc down. Never
imported by the agent itself: it runs in its own process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from .bpfsys import bpf_refusal
from .loader import MANIFEST_MAX
from .pagecache import mapped_files
from .program_text import SOURCE_FILE, program_source


def _load(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Compile and load; the manifest and the fds it indexes."""
    try:
        from bcc import BPF
    except ImportError as e:
        return {"error": f"bcc is not importable ({e}); use Debian's python3 with python3-bpfcc"}, []
    if req.get("kernel_source"):
        os.environ["BCC_KERNEL_SOURCE"] = req["kernel_source"]
    try:
        bpf = BPF(text=program_source().encode(), cflags=list(req["cflags"]))
    except Exception as e:
        refused = bpf_refusal()  # bcc creates the maps while compiling
        if refused:
            return {"error": f"BPF not permitted: {refused}"}, []
        return {"error": f"bcc could not compile {SOURCE_FILE}: {e}"}, []
    fds: list[int] = []
    progs: dict[str, int] = {}
    errors: dict[str, str] = {}
    kinds = {"raw_tracepoint": BPF.RAW_TRACEPOINT, "tracepoint": BPF.TRACEPOINT, "kprobe": BPF.KPROBE}
    for name, kind in req["programs"].items():
        try:
            fds.append(int(bpf.load_func(name.encode(), kinds[kind]).fd))
            progs[name] = len(fds) - 1
        except Exception as e:
            if name in req["required"]:
                return {"error": f"the kernel refused to load the scanner: {e}", "refused": True}, []
            errors[name] = str(e)
    maps: dict[str, int] = {}
    for name in req["maps"]:
        fds.append(int(bpf[name.encode()].map_fd))
        maps[name] = len(fds) - 1
    return {"programs": progs, "maps": maps, "errors": errors}, fds


def _encode(manifest: dict[str, Any]) -> bytes:
    """JSON within MANIFEST_MAX: the file list is what gives way."""
    files: list[str] = manifest.get("mapped_files", [])
    while True:
        data = json.dumps(manifest).encode()
        if len(data) <= MANIFEST_MAX or not files:
            return data
        del files[len(files) // 2 :]


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    try:
        manifest, fds = _load(json.load(sys.stdin))
    except Exception as e:  # a bug here must still reach the parent as a reason
        manifest, fds = {"error": f"the BPF loader child failed: {e!r}"}, []
    manifest.setdefault("programs", {})
    manifest.setdefault("maps", {})
    manifest["mapped_files"] = mapped_files()
    socket.send_fds(sock, [_encode(manifest)], fds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip bcc's and LLVM's teardown: the parent has the fds


if __name__ == "__main__":
    sys.exit(main(sys.argv))

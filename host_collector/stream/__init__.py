"""QEMU's migration stream, main channel: its wire format and a parser that proves what it reads.

:mod:`.wire` names the constants and phases, :mod:`.parser` finds the PAGE
records a rewrite may touch and gives up at anything it cannot prove (the C
loop in ``_fastparse.c`` is an optional accelerator of one part of it). No
I/O and no policy: the proxy (:mod:`host_collector.proxy`) decides.
"""

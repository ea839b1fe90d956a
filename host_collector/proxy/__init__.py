"""The migration proxy: relays source <-> destination and zeroes provably free pages.

It sits between the source QEMU (``migrate tcp:PROXY`` or ``unix:PROXY``)
and the destination, relays every connection, parses the source's main
channel (:mod:`host_collector.stream`) and turns PAGE records the gate
(:mod:`host_collector.rewrite`) allows into ZERO records. Anything it cannot
parse with certainty switches it to byte-for-byte pass-through; if pages
were already rewritten by then, it aborts instead (docs/stream-proxy.md).

* :mod:`.migration_proxy`: :class:`~.migration_proxy.MigrationProxy`, one
  migration's listener, connections, threads and ending;
* :mod:`.relay`: the main channel's hot path (parse, hold, judge, send),
  with nothing of its owner but three callables;
* :mod:`.results`: the outcome and counters a migration comes to;
* :mod:`.sockets`: endpoints, listening, connecting, closing, the wake pipe.
"""

"""``fph-collector migrate`` and ``fph-collector proxy``: QMP, the proxy and the epoch gate joined.

The daemon side (:mod:`.jobs`, :mod:`.run`, :mod:`.report`, :mod:`.observer`)
runs inside ``fph-collector serve``, where the agents are attached; the
command line (:mod:`.console`) is a client of the admin service. The gates
it joins to the proxy are in :mod:`host_collector.rewrite`.
"""

"""``fph-collector migrate`` and ``fph-collector proxy``: QMP, the proxy and the epoch gate joined.

The daemon side (:mod:`.jobs`, :mod:`.run`, :mod:`.gates`, :mod:`.report`)
runs inside ``fph-collector serve``, where the agents are attached; the
command line (:mod:`.console`) is a client of the admin service.
"""

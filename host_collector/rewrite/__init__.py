"""The safety rule in code: may this page record become a zero record?

docs/safety-rule.md states the rule and proves each case; this package is
everything that applies it, and nothing else (no sockets, no parsing):

* :mod:`.gate`: the contract the proxy judges through (:class:`~.gate.RewriteGate`,
  one base class with defaults for its optional methods) and ``NoHints``;
* :mod:`.ledger`: the verdicts themselves, as bookkeeping of epochs (one per
  ``MIGRATION_PASS``) and ``query-migrate`` polls, in stream offsets;
* :mod:`.epoch_gate`: the gate the daemon uses, feeding the ledger from the
  source's QMP monitor;
* :mod:`.held`: a gate that decides nothing until a standing proxy's
  in-flight check passes;
* :mod:`.recorder`: each epoch's figures, kept for the migration report.

One verdict's path: the proxy (:mod:`host_collector.proxy.relay`) asks the
gate for an oracle for a record's end offset; the ledger answers with the
epochs the rule allows; each epoch answers from its bitmap
(:class:`host_collector.epochs.Epoch`).
"""

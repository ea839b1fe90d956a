"""Real guests under QEMU (TCG) for the VM tests, the comparison bench and the demo.

Modules: ``harness`` (VM lifecycle, factory, migration helpers), ``console``
(serial shell), ``qmp`` (blocking QMP over qemu.qmp), ``ramcompare``
(page-by-page RAM file comparison), ``scenarios`` (migrations over one
emulated link), ``fphint_daemon`` (``fph-collector serve`` as its own
process, as shipped or with the witness) and ``daemon_witness`` (the
witness: the daemon with a migration observer, for tests). The guest image
comes from the builder in vm-images/ (package ``vmimage``).
"""

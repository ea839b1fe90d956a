"""fphint's lab: what the demo, the benchmarks and the tests use to run the
product against real QEMU, real guests and real processes. Dev only.

It is its own distribution, ``fphint-lab`` (lab/pyproject.toml), so it is
never in the fphint wheel that goes into guests and onto hosts;
scripts/install-deps.sh (``make setup``) installs it editable into the dev
venv, together with ``vmimage``, the guest image builder, whose code stays in
vm-images/ (editable only: the builder reads vm-images/overlay/ beside it).

* ``vm/``: guests under QEMU (harness, console, QMP, RAM comparison), the
  migration scenarios, the collector daemon harness and the witness;
* ``guest/``: the workloads installed in the guest image (fill, churn,
  pagemap, mempattern, the rogue agent);
* ``linkrelay``: the emulated, byte-counting link;
* ``collector_harness``, ``migrate_harness``, ``qemu_pair``: a collector and
  agents in-process or as ``fph-collector serve``, QEMU pairs without a guest OS;
* ``demo``: ``make demo``.

The lab runs the daemon exactly as shipped (``python -m host_collector
serve``); only tests ask ``vm.fphint_daemon.CollectorDaemon`` for the
witness, which watches through the daemon's own observer hook
(host_collector.migrate.observer). This ``__init__`` imports nothing: the
image builder installs it into guests with ``guest/``.
"""

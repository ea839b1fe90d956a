"""The in-guest workloads, stdlib only except ``rogue_agent`` (the agent's venv).

vm-images/vmimage/final.py installs this package (with its parent's
``__init__``) into the guest image's python3 site directory, where both
Debian's python3 and the agent's venv (/opt/fphint) import it, so a
workload runs as ``python3 -m fphint_lab.guest.churn ...`` (see
``fphint_lab.vm.harness.VM.workload``). On the host the tests import
``mempattern``, ``pagemap`` and ``rogue_agent`` from here to know what the
workloads write.

* ``mempattern``: the patterns written and verified;
* ``fill``: fill N MiB with garbage and free it;
* ``churn``: background allocate/write/verify/free workers, checked later;
* ``pagemap``: a process's physical pages (/proc/PID/pagemap);
* ``rogue_agent``: the real agent with one thing wrong (lies, silent, late).
"""

"""VM tests: real guests under QEMU (TCG). The harness they use is the lab's
(``fphint_lab.vm``: VM lifecycle, console, QMP, RAM comparison, scenarios,
the daemon and its witness); the workloads installed in the image are
``fphint_lab.guest``; the image builder is ``vmimage`` (vm-images/)."""

from pathlib import Path

#: The repository checkout (the image tests copy sources out of it).
REPO = Path(__file__).resolve().parents[2]

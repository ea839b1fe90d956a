"""VM fixtures for fphint's end-to-end tests: boot real guests under QEMU (TCG).

Modules: ``harness`` (VM lifecycle, factory, migration helpers), ``console``
(serial shell), ``qmp`` (blocking QMP over qemu.qmp), ``ramcompare``
(page-by-page RAM file comparison); ``guest/`` holds the workloads installed
in the image. The image builder lives in vm-images/ (package ``vmimage``),
made importable here, and so is ``mempattern`` from guest/ (what the
workloads write, for tests that look for it in RAM files).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest"
for _path in (str(REPO / "vm-images"), str(GUEST)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

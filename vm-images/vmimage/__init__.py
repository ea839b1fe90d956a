"""Reproducible Debian 12 guest images for fphint's VM tests, benchmarks and demo.

The build has two cached layers (docs/vm-images.md):

* a **base** rootfs directory (debootstrap, kernel + matching headers, bcc,
  the agent's pinned Python dependencies in /opt/fphint), keyed by its inputs;
* a **final** raw ext4 image (base + the agent wheel built from this
  repository + its systemd unit + the in-guest test workloads, the lab's
  ``fphint_lab.guest``), keyed by the base key, the agent's sources and the
  workloads, so changing either only redoes ``mkfs.ext4 -d``.

The code lives here; the lab's distribution (lab/pyproject.toml) installs
this package editable into the dev venv, so the harness imports it normally.

:func:`vmimage.builder.ensure_image` is the entry point; :mod:`vmimage.qemu`
turns an image into QEMU command lines.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

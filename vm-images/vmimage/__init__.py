"""Reproducible Debian 12 guest images for fphint's VM tests.

The build has two cached layers (docs/vm-images.md):

* a **base** rootfs directory (debootstrap, kernel + matching headers, bcc,
  the agent's pinned Python dependencies in /opt/fphint), keyed by its inputs;
* a **final** raw ext4 image (base + the agent wheel built from this
  repository + its systemd unit + the in-guest test workloads), keyed by the
  base key and the agent's sources, so changing agent code only redoes
  ``mkfs.ext4 -d``.

:func:`vmimage.builder.ensure_image` is the entry point; :mod:`vmimage.qemu`
turns an image into QEMU command lines.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

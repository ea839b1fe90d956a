"""QEMU migration stream handling: parsing, safe rewriting, proxying."""

"""Shared pieces of fphint: the wire contract (``fphint.v1``), the packed
range codec and endpoint addresses, used by both the guest agent and the
host collector."""

__version__ = "0.1.0"

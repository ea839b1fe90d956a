"""Shared pieces of fphint: the wire contract (``fphint.v1``), the packed
range codec and endpoint addresses, used by both the guest agent and the
host collector.

Errors (every one a ValueError: they refuse input)::

    FphintError            fphint/errors.py
    ├── AddressError       fphint/addresses.py   an endpoint string names no transport we support
    └── RangeError         fphint/ranges.py      a packed range list no well-behaved agent produces
"""

__version__ = "0.1.0"

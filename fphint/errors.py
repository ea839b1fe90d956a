"""The root of fphint's own errors (drawn in :mod:`fphint`)."""

from __future__ import annotations


class FphintError(ValueError):
    """Input the shared codecs refuse: a bad address or a bad packed range list.

    A ValueError because that is what it is, so callers that guard a parse
    with ``except ValueError`` keep working.
    """

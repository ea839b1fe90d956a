"""The one exception the collector turns into a gRPC status.

Anything a guest does wrong ends as a :class:`Refusal`: a status code name for
the wire, a short tag for metrics, and a message that says what was wrong.
"""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, code: str, tag: str, message: str) -> None:
        super().__init__(message)
        #: grpc.StatusCode member name, e.g. "INVALID_ARGUMENT".
        self.code = code
        #: Short label for metrics and logs, e.g. "overlap".
        self.tag = tag

    @property
    def message(self) -> str:
        return str(self.args[0])

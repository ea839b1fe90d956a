"""The root of the collector's errors, and the one way an RPC is aborted with one.

Every error the collector raises on purpose is a :class:`CollectorError`: a
message for the operator (or the guest) and the gRPC status it maps to, so
whichever service meets it ends the call the same way, through :func:`abort`.
A class names its usual status; a raise may name another (``Refusal`` and
``MigrateError`` always do). The tree is drawn in :mod:`host_collector`.
"""

from __future__ import annotations

from typing import ClassVar, NoReturn

import grpc


def status_code(code: grpc.StatusCode | str) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for a member or its name.

    :raise ValueError: no status has that name (a typo at the raise).
    """
    if isinstance(code, grpc.StatusCode):
        return code
    try:
        return grpc.StatusCode[code]
    except KeyError:
        raise ValueError(f"{code!r} is not a grpc.StatusCode name") from None


class CollectorError(Exception):
    """Something the collector refuses or cannot do, with the status it maps to."""

    #: The status of an error of this class whose raise names none.
    default_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, status: grpc.StatusCode | str | None = None) -> None:
        super().__init__(message)
        self.status: grpc.StatusCode = self.default_status if status is None else status_code(status)

    @property
    def code(self) -> str:
        """The status's name, e.g. ``"INVALID_ARGUMENT"`` (what logs and checks compare)."""
        return str(self.status.name)

    @property
    def message(self) -> str:
        return str(self.args[0])


class Refusal(CollectorError):
    """What a guest did wrong: a status for the wire, a short tag for metrics, and a
    message that says what was wrong."""

    def __init__(self, code: grpc.StatusCode | str, tag: str, message: str) -> None:
        super().__init__(message, code)
        #: Short label for metrics and logs, e.g. "overlap".
        self.tag = tag


async def abort(context: grpc.aio.ServicerContext, error: CollectorError) -> NoReturn:
    """End the RPC behind ``context`` with ``error``'s status and message."""
    await context.abort(error.status, error.message)
    raise AssertionError("unreachable")  # context.abort raises

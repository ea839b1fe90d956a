"""Stub of the C accelerator of parser.py (_fastparse.c)."""

from _typeshed import ReadableBuffer

def continue_records(
    buf: ReadableBuffer,
    pos: int,
    end: int,
    block: str,
    block_len: int,
    pages: list[tuple[int, int, str, int]],
    /,
) -> tuple[int, int]:
    """Consume complete CONTINUE PAGE/ZERO records of ``block``; (next position, ZERO records)."""

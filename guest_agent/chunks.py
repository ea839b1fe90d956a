"""The one place ranges become ``ReportChunk`` messages.

A Report call is a sequence of chunks whose packed ranges continue one codec
state (fphint.ranges) and whose sequence numbers count from 0; the last one
says ``end`` and may carry the agent's stats. Both the snapshot stream and
live hints build their calls here, so the two can never disagree on that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fphint import ranges
from fphint.v1 import hints_pb2


class ChunkEncoder:
    """The chunks of one Report call, at most ``per_chunk`` ranges each."""

    def __init__(self, epoch: int, kind: hints_pb2.ReportKind, per_chunk: int) -> None:
        if per_chunk < 1:
            raise ValueError(f"per_chunk must be at least 1, not {per_chunk}")
        self.epoch = epoch
        self.kind = kind
        self.per_chunk = per_chunk
        #: The sequence number of the next chunk (= chunks made so far).
        self.seq = 0
        self.ended = False
        self._state = ranges.CodecState()

    def chunk(
        self, batch: Sequence[tuple[int, int]], end: bool = False, stats: hints_pb2.AgentStats | None = None
    ) -> hints_pb2.ReportChunk:
        """The next chunk: ``batch`` (sorted, after every range sent before); ``end`` closes the call.

        :raise ValueError: the call already ended, the batch is too big, or stats on a chunk that does not end.
        """
        if self.ended:
            raise ValueError(f"epoch {self.epoch}: the Report call already ended")
        if len(batch) > self.per_chunk:
            raise ValueError(f"{len(batch)} ranges in one chunk, at most {self.per_chunk}")
        if stats is not None and not end:
            raise ValueError("stats go on the chunk that ends the call")
        msg = hints_pb2.ReportChunk(
            epoch=self.epoch,
            seq=self.seq,
            kind=self.kind,
            ranges=ranges.encode(batch, self._state),
            end=end,
            stats=stats,
        )
        self.seq += 1
        self.ended = end
        return msg

    def whole(
        self, rs: Sequence[tuple[int, int]], stats: hints_pb2.AgentStats | None = None
    ) -> Iterator[hints_pb2.ReportChunk]:
        """``rs`` as the rest of the call: at least one chunk, the last ends it and carries ``stats``."""
        n = max(1, -(-len(rs) // self.per_chunk))
        for i in range(n):
            last = i == n - 1
            yield self.chunk(rs[i * self.per_chunk : (i + 1) * self.per_chunk], last, stats if last else None)

    def packed(
        self, words: Sequence[int], stats: hints_pb2.AgentStats | None = None, first: int | None = None
    ) -> Iterator[hints_pb2.ReportChunk]:
        """A whole call from words already packed by ``fphint.ranges.encode``
        from a fresh codec state (the tracked answer): sliced into chunks at
        range boundaries, never decoded; the first chunk holds at most
        ``first`` ranges (the collector times the epoch's first chunk once it
        has checked it: a small one arrives sooner). Only as the first thing
        in a call.

        :raise ValueError: the call has chunks already, or an odd word count.
        """
        if self.seq or self.ended:
            raise ValueError("packed words start a Report call")
        if len(words) % 2:
            raise ValueError(f"{len(words)} packed words: not (distance, length) pairs")
        cuts = [0]
        step = 2 * self.per_chunk
        head = 2 * min(self.per_chunk, first) if first else step
        if len(words) > head:
            cuts.append(head)
        cuts += range(head + step, len(words), step)
        cuts.append(len(words))
        for i in range(len(cuts) - 1):
            last = i == len(cuts) - 2
            msg = hints_pb2.ReportChunk(
                epoch=self.epoch,
                seq=self.seq,
                kind=self.kind,
                ranges=words[cuts[i] : cuts[i + 1]],
                end=last,
                stats=stats if last else None,
            )
            self.seq += 1
            self.ended = last
            yield msg

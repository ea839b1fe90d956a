from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPORT_KIND_UNSPECIFIED: _ClassVar[ReportKind]
    REPORT_KIND_SNAPSHOT: _ClassVar[ReportKind]
    REPORT_KIND_LIVE: _ClassVar[ReportKind]
REPORT_KIND_UNSPECIFIED: ReportKind
REPORT_KIND_SNAPSHOT: ReportKind
REPORT_KIND_LIVE: ReportKind

class SourceStatus(_message.Message):
    __slots__ = ("name", "available", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentFacts(_message.Message):
    __slots__ = ("agent_version", "kernel_release", "page_size", "sources", "chosen_source", "refusal", "page_poisoning", "memory_encryption", "init_on_free", "total_ram_bytes", "hostname", "source_details")
    class SourceDetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    PAGE_POISONING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    INIT_ON_FREE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    kernel_release: str
    page_size: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceStatus]
    chosen_source: str
    refusal: str
    page_poisoning: bool
    memory_encryption: str
    init_on_free: bool
    total_ram_bytes: int
    hostname: str
    source_details: _containers.ScalarMap[str, str]
    def __init__(self, agent_version: _Optional[str] = ..., kernel_release: _Optional[str] = ..., page_size: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceStatus, _Mapping]]] = ..., chosen_source: _Optional[str] = ..., refusal: _Optional[str] = ..., page_poisoning: _Optional[bool] = ..., memory_encryption: _Optional[str] = ..., init_on_free: _Optional[bool] = ..., total_ram_bytes: _Optional[int] = ..., hostname: _Optional[str] = ..., source_details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("facts",)
    FACTS_FIELD_NUMBER: _ClassVar[int]
    facts: AgentFacts
    def __init__(self, facts: _Optional[_Union[AgentFacts, _Mapping]] = ...) -> None: ...

class HintRequest(_message.Message):
    __slots__ = ("epoch", "deadline_ms", "max_ranges", "max_ranges_per_chunk", "live_hints")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANGES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANGES_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    LIVE_HINTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    deadline_ms: int
    max_ranges: int
    max_ranges_per_chunk: int
    live_hints: bool
    def __init__(self, epoch: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., max_ranges: _Optional[int] = ..., max_ranges_per_chunk: _Optional[int] = ..., live_hints: _Optional[bool] = ...) -> None: ...

class EpochClosed(_message.Message):
    __slots__ = ("epoch", "reason")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    reason: str
    def __init__(self, epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("request", "closed")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    request: HintRequest
    closed: EpochClosed
    def __init__(self, request: _Optional[_Union[HintRequest, _Mapping]] = ..., closed: _Optional[_Union[EpochClosed, _Mapping]] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("cpu_seconds", "rss_bytes", "snapshot_us", "snapshot_pages", "truncated_ranges", "pss_bytes", "tracked")
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_US_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PAGES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_RANGES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRACKED_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: float
    rss_bytes: int
    snapshot_us: int
    snapshot_pages: int
    truncated_ranges: int
    pss_bytes: int
    tracked: bool
    def __init__(self, cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., snapshot_us: _Optional[int] = ..., snapshot_pages: _Optional[int] = ..., truncated_ranges: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., tracked: _Optional[bool] = ...) -> None: ...

class ReportChunk(_message.Message):
    __slots__ = ("epoch", "seq", "kind", "ranges", "end", "stats")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seq: int
    kind: ReportKind
    ranges: _containers.RepeatedScalarFieldContainer[int]
    end: bool
    stats: AgentStats
    def __init__(self, epoch: _Optional[int] = ..., seq: _Optional[int] = ..., kind: _Optional[_Union[ReportKind, str]] = ..., ranges: _Optional[_Iterable[int]] = ..., end: _Optional[bool] = ..., stats: _Optional[_Union[AgentStats, _Mapping]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("epoch", "chunks", "accepted_ranges", "rejected_ranges", "accepted_pages")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    chunks: int
    accepted_ranges: int
    rejected_ranges: int
    accepted_pages: int
    def __init__(self, epoch: _Optional[int] = ..., chunks: _Optional[int] = ..., accepted_ranges: _Optional[int] = ..., rejected_ranges: _Optional[int] = ..., accepted_pages: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListVMsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VMInfo(_message.Message):
    __slots__ = ("name", "attached", "peer", "chosen_source", "refusal", "ram_bytes", "agent_version", "kernel_release")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    attached: bool
    peer: str
    chosen_source: str
    refusal: str
    ram_bytes: int
    agent_version: str
    kernel_release: str
    def __init__(self, name: _Optional[str] = ..., attached: _Optional[bool] = ..., peer: _Optional[str] = ..., chosen_source: _Optional[str] = ..., refusal: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., agent_version: _Optional[str] = ..., kernel_release: _Optional[str] = ...) -> None: ...

class ListVMsResponse(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VMInfo]
    def __init__(self, vms: _Optional[_Iterable[_Union[VMInfo, _Mapping]]] = ...) -> None: ...

class CollectHintsRequest(_message.Message):
    __slots__ = ("vm", "deadline_ms", "close_on_snapshot", "include_ranges")
    VM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_ON_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RANGES_FIELD_NUMBER: _ClassVar[int]
    vm: str
    deadline_ms: int
    close_on_snapshot: bool
    include_ranges: bool
    def __init__(self, vm: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., close_on_snapshot: _Optional[bool] = ..., include_ranges: _Optional[bool] = ...) -> None: ...

class BlockPages(_message.Message):
    __slots__ = ("block", "pages", "ranges")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    block: str
    pages: int
    ranges: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block: _Optional[str] = ..., pages: _Optional[int] = ..., ranges: _Optional[_Iterable[int]] = ...) -> None: ...

class CollectHintsResponse(_message.Message):
    __slots__ = ("vm", "epoch", "close_reason", "free_pages", "accepted_ranges", "rejected_ranges", "reports", "rejected_reports", "request_to_last_chunk_s", "blocks", "agent_source", "agent_cpu_seconds", "agent_rss_bytes", "agent_snapshot_us", "page_size")
    VM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TO_LAST_CHUNK_S_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    AGENT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    AGENT_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_SNAPSHOT_US_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    vm: str
    epoch: int
    close_reason: str
    free_pages: int
    accepted_ranges: int
    rejected_ranges: int
    reports: int
    rejected_reports: int
    request_to_last_chunk_s: float
    blocks: _containers.RepeatedCompositeFieldContainer[BlockPages]
    agent_source: str
    agent_cpu_seconds: float
    agent_rss_bytes: int
    agent_snapshot_us: int
    page_size: int
    def __init__(self, vm: _Optional[str] = ..., epoch: _Optional[int] = ..., close_reason: _Optional[str] = ..., free_pages: _Optional[int] = ..., accepted_ranges: _Optional[int] = ..., rejected_ranges: _Optional[int] = ..., reports: _Optional[int] = ..., rejected_reports: _Optional[int] = ..., request_to_last_chunk_s: _Optional[float] = ..., blocks: _Optional[_Iterable[_Union[BlockPages, _Mapping]]] = ..., agent_source: _Optional[str] = ..., agent_cpu_seconds: _Optional[float] = ..., agent_rss_bytes: _Optional[int] = ..., agent_snapshot_us: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

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

class MigrateRequest(_message.Message):
    __slots__ = ("vm", "to", "dest_qmp", "listen", "progress_interval_ms", "hint_deadline_ms", "timeout_s", "max_bandwidth", "downtime_limit_ms")
    VM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    DEST_QMP_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HINT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    vm: str
    to: str
    dest_qmp: str
    listen: str
    progress_interval_ms: int
    hint_deadline_ms: int
    timeout_s: float
    max_bandwidth: int
    downtime_limit_ms: int
    def __init__(self, vm: _Optional[str] = ..., to: _Optional[str] = ..., dest_qmp: _Optional[str] = ..., listen: _Optional[str] = ..., progress_interval_ms: _Optional[int] = ..., hint_deadline_ms: _Optional[int] = ..., timeout_s: _Optional[float] = ..., max_bandwidth: _Optional[int] = ..., downtime_limit_ms: _Optional[int] = ...) -> None: ...

class ProxyRequest(_message.Message):
    __slots__ = ("vm", "to", "dest_qmp", "listen", "progress_interval_ms", "hint_deadline_ms", "count")
    VM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    DEST_QMP_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HINT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    vm: str
    to: str
    dest_qmp: str
    listen: str
    progress_interval_ms: int
    hint_deadline_ms: int
    count: int
    def __init__(self, vm: _Optional[str] = ..., to: _Optional[str] = ..., dest_qmp: _Optional[str] = ..., listen: _Optional[str] = ..., progress_interval_ms: _Optional[int] = ..., hint_deadline_ms: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class CancelMigrationRequest(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: str
    def __init__(self, vm: _Optional[str] = ...) -> None: ...

class CancelMigrationResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class MigrateEvent(_message.Message):
    __slots__ = ("ready", "progress", "report")
    READY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ready: ProxyReady
    progress: MigrateProgress
    report: MigrationReport
    def __init__(self, ready: _Optional[_Union[ProxyReady, _Mapping]] = ..., progress: _Optional[_Union[MigrateProgress, _Mapping]] = ..., report: _Optional[_Union[MigrationReport, _Mapping]] = ...) -> None: ...

class ProxyReady(_message.Message):
    __slots__ = ("migration", "listen_address", "rewriting", "plain_relay_reason")
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    LISTEN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REWRITING_FIELD_NUMBER: _ClassVar[int]
    PLAIN_RELAY_REASON_FIELD_NUMBER: _ClassVar[int]
    migration: int
    listen_address: str
    rewriting: bool
    plain_relay_reason: str
    def __init__(self, migration: _Optional[int] = ..., listen_address: _Optional[str] = ..., rewriting: _Optional[bool] = ..., plain_relay_reason: _Optional[str] = ...) -> None: ...

class MigrateProgress(_message.Message):
    __slots__ = ("migration", "elapsed_s", "status", "phase", "source_bytes", "destination_bytes", "pages_rewritten", "held_bytes", "dirty_sync_count", "remaining_bytes", "epoch", "epoch_sync", "hint_pages", "ram_pages", "rewriting")
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_SYNC_COUNT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SYNC_FIELD_NUMBER: _ClassVar[int]
    HINT_PAGES_FIELD_NUMBER: _ClassVar[int]
    RAM_PAGES_FIELD_NUMBER: _ClassVar[int]
    REWRITING_FIELD_NUMBER: _ClassVar[int]
    migration: int
    elapsed_s: float
    status: str
    phase: str
    source_bytes: int
    destination_bytes: int
    pages_rewritten: int
    held_bytes: int
    dirty_sync_count: int
    remaining_bytes: int
    epoch: int
    epoch_sync: int
    hint_pages: int
    ram_pages: int
    rewriting: bool
    def __init__(self, migration: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., status: _Optional[str] = ..., phase: _Optional[str] = ..., source_bytes: _Optional[int] = ..., destination_bytes: _Optional[int] = ..., pages_rewritten: _Optional[int] = ..., held_bytes: _Optional[int] = ..., dirty_sync_count: _Optional[int] = ..., remaining_bytes: _Optional[int] = ..., epoch: _Optional[int] = ..., epoch_sync: _Optional[int] = ..., hint_pages: _Optional[int] = ..., ram_pages: _Optional[int] = ..., rewriting: _Optional[bool] = ...) -> None: ...

class PreflightProblem(_message.Message):
    __slots__ = ("side", "setting", "why")
    SIDE_FIELD_NUMBER: _ClassVar[int]
    SETTING_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    side: str
    setting: str
    why: str
    def __init__(self, side: _Optional[str] = ..., setting: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class Preflight(_message.Message):
    __slots__ = ("safe", "problems", "warnings", "enabled", "source_version", "destination_version", "destination_checked")
    SAFE_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_CHECKED_FIELD_NUMBER: _ClassVar[int]
    safe: bool
    problems: _containers.RepeatedCompositeFieldContainer[PreflightProblem]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    enabled: _containers.RepeatedScalarFieldContainer[str]
    source_version: str
    destination_version: str
    destination_checked: bool
    def __init__(self, safe: _Optional[bool] = ..., problems: _Optional[_Iterable[_Union[PreflightProblem, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., enabled: _Optional[_Iterable[str]] = ..., source_version: _Optional[str] = ..., destination_version: _Optional[str] = ..., destination_checked: _Optional[bool] = ...) -> None: ...

class EpochReport(_message.Message):
    __slots__ = ("epoch", "sync", "request_offset", "request_sent", "hint_pages", "accepted_ranges", "rejected_ranges", "reports", "request_to_last_chunk_s", "close_reason")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SENT_FIELD_NUMBER: _ClassVar[int]
    HINT_PAGES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RANGES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TO_LAST_CHUNK_S_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sync: int
    request_offset: int
    request_sent: bool
    hint_pages: int
    accepted_ranges: int
    rejected_ranges: int
    reports: int
    request_to_last_chunk_s: float
    close_reason: str
    def __init__(self, epoch: _Optional[int] = ..., sync: _Optional[int] = ..., request_offset: _Optional[int] = ..., request_sent: _Optional[bool] = ..., hint_pages: _Optional[int] = ..., accepted_ranges: _Optional[int] = ..., rejected_ranges: _Optional[int] = ..., reports: _Optional[int] = ..., request_to_last_chunk_s: _Optional[float] = ..., close_reason: _Optional[str] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("vm", "migration", "outcome", "message", "to", "proxy_address", "issued_migrate", "started_at_unix", "wall_s", "source_status", "source_error", "source_runstate", "destination_status", "downtime_ms", "total_time_ms", "setup_time_ms", "dirty_sync_count", "qemu_transferred_bytes", "qemu_normal_pages", "qemu_zero_pages", "proxy_outcome", "source_bytes", "destination_bytes", "return_bytes", "extra_connections", "page_records", "zero_records", "pages_rewritten", "pages_held", "pages_released_unjudged", "fallback_reason", "abort_reason", "proxy_error", "rewriting", "plain_relay_reason", "gate_failure", "passes", "polls", "epochs", "epochs_not_listed", "agent_attached", "agent_source", "ram_bytes", "page_size", "preflight", "notes")
    VM_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    PROXY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MIGRATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RUNSTATE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_STATUS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SETUP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_SYNC_COUNT_FIELD_NUMBER: _ClassVar[int]
    QEMU_TRANSFERRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QEMU_NORMAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    QEMU_ZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    PROXY_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETURN_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_RECORDS_FIELD_NUMBER: _ClassVar[int]
    ZERO_RECORDS_FIELD_NUMBER: _ClassVar[int]
    PAGES_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    PAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    PAGES_RELEASED_UNJUDGED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    PROXY_ERROR_FIELD_NUMBER: _ClassVar[int]
    REWRITING_FIELD_NUMBER: _ClassVar[int]
    PLAIN_RELAY_REASON_FIELD_NUMBER: _ClassVar[int]
    GATE_FAILURE_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    POLLS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_NOT_LISTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    AGENT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFLIGHT_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    vm: str
    migration: int
    outcome: str
    message: str
    to: str
    proxy_address: str
    issued_migrate: bool
    started_at_unix: float
    wall_s: float
    source_status: str
    source_error: str
    source_runstate: str
    destination_status: str
    downtime_ms: int
    total_time_ms: int
    setup_time_ms: int
    dirty_sync_count: int
    qemu_transferred_bytes: int
    qemu_normal_pages: int
    qemu_zero_pages: int
    proxy_outcome: str
    source_bytes: int
    destination_bytes: int
    return_bytes: int
    extra_connections: int
    page_records: int
    zero_records: int
    pages_rewritten: int
    pages_held: int
    pages_released_unjudged: int
    fallback_reason: str
    abort_reason: str
    proxy_error: str
    rewriting: bool
    plain_relay_reason: str
    gate_failure: str
    passes: int
    polls: int
    epochs: _containers.RepeatedCompositeFieldContainer[EpochReport]
    epochs_not_listed: int
    agent_attached: bool
    agent_source: str
    ram_bytes: int
    page_size: int
    preflight: Preflight
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vm: _Optional[str] = ..., migration: _Optional[int] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ..., to: _Optional[str] = ..., proxy_address: _Optional[str] = ..., issued_migrate: _Optional[bool] = ..., started_at_unix: _Optional[float] = ..., wall_s: _Optional[float] = ..., source_status: _Optional[str] = ..., source_error: _Optional[str] = ..., source_runstate: _Optional[str] = ..., destination_status: _Optional[str] = ..., downtime_ms: _Optional[int] = ..., total_time_ms: _Optional[int] = ..., setup_time_ms: _Optional[int] = ..., dirty_sync_count: _Optional[int] = ..., qemu_transferred_bytes: _Optional[int] = ..., qemu_normal_pages: _Optional[int] = ..., qemu_zero_pages: _Optional[int] = ..., proxy_outcome: _Optional[str] = ..., source_bytes: _Optional[int] = ..., destination_bytes: _Optional[int] = ..., return_bytes: _Optional[int] = ..., extra_connections: _Optional[int] = ..., page_records: _Optional[int] = ..., zero_records: _Optional[int] = ..., pages_rewritten: _Optional[int] = ..., pages_held: _Optional[int] = ..., pages_released_unjudged: _Optional[int] = ..., fallback_reason: _Optional[str] = ..., abort_reason: _Optional[str] = ..., proxy_error: _Optional[str] = ..., rewriting: _Optional[bool] = ..., plain_relay_reason: _Optional[str] = ..., gate_failure: _Optional[str] = ..., passes: _Optional[int] = ..., polls: _Optional[int] = ..., epochs: _Optional[_Iterable[_Union[EpochReport, _Mapping]]] = ..., epochs_not_listed: _Optional[int] = ..., agent_attached: _Optional[bool] = ..., agent_source: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., page_size: _Optional[int] = ..., preflight: _Optional[_Union[Preflight, _Mapping]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

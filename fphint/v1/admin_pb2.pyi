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
    __slots__ = ("vm", "to", "dest_qmp", "listen", "progress_interval_ms", "hint_deadline_ms", "timeout_s", "max_bandwidth", "downtime_limit_ms", "switchover_bandwidth")
    VM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    DEST_QMP_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HINT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    vm: str
    to: str
    dest_qmp: str
    listen: str
    progress_interval_ms: int
    hint_deadline_ms: int
    timeout_s: float
    max_bandwidth: int
    downtime_limit_ms: int
    switchover_bandwidth: int
    def __init__(self, vm: _Optional[str] = ..., to: _Optional[str] = ..., dest_qmp: _Optional[str] = ..., listen: _Optional[str] = ..., progress_interval_ms: _Optional[int] = ..., hint_deadline_ms: _Optional[int] = ..., timeout_s: _Optional[float] = ..., max_bandwidth: _Optional[int] = ..., downtime_limit_ms: _Optional[int] = ..., switchover_bandwidth: _Optional[int] = ...) -> None: ...

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

class EpochCoverage(_message.Message):
    __slots__ = ("epoch", "sync", "opened_at_s", "duration_ms", "reported", "first_report_ms", "reported_free_pages", "records", "sent_after_open", "rewritten_after_open", "sent_after_report", "rewritten", "after_stop")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    FIRST_REPORT_MS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SENT_AFTER_OPEN_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_AFTER_OPEN_FIELD_NUMBER: _ClassVar[int]
    SENT_AFTER_REPORT_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    AFTER_STOP_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sync: int
    opened_at_s: float
    duration_ms: float
    reported: bool
    first_report_ms: float
    reported_free_pages: int
    records: int
    sent_after_open: int
    rewritten_after_open: int
    sent_after_report: int
    rewritten: int
    after_stop: bool
    def __init__(self, epoch: _Optional[int] = ..., sync: _Optional[int] = ..., opened_at_s: _Optional[float] = ..., duration_ms: _Optional[float] = ..., reported: _Optional[bool] = ..., first_report_ms: _Optional[float] = ..., reported_free_pages: _Optional[int] = ..., records: _Optional[int] = ..., sent_after_open: _Optional[int] = ..., rewritten_after_open: _Optional[int] = ..., sent_after_report: _Optional[int] = ..., rewritten: _Optional[int] = ..., after_stop: _Optional[bool] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("epochs", "first_report_ms", "sent_after_report", "rewritten", "fraction", "sent_after_open", "rewritten_after_open", "fraction_after_open", "epochs_over_200ms_without_report", "end_section_records", "end_section_reported_free", "records_before_first_epoch", "epochs_not_tracked", "first_report_goal_met", "fraction_goal_met", "report_every_epoch_goal_met")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FIRST_REPORT_MS_FIELD_NUMBER: _ClassVar[int]
    SENT_AFTER_REPORT_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SENT_AFTER_OPEN_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_AFTER_OPEN_FIELD_NUMBER: _ClassVar[int]
    FRACTION_AFTER_OPEN_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_OVER_200MS_WITHOUT_REPORT_FIELD_NUMBER: _ClassVar[int]
    END_SECTION_RECORDS_FIELD_NUMBER: _ClassVar[int]
    END_SECTION_REPORTED_FREE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_BEFORE_FIRST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_NOT_TRACKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_REPORT_GOAL_MET_FIELD_NUMBER: _ClassVar[int]
    FRACTION_GOAL_MET_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_EPOCH_GOAL_MET_FIELD_NUMBER: _ClassVar[int]
    epochs: _containers.RepeatedCompositeFieldContainer[EpochCoverage]
    first_report_ms: float
    sent_after_report: int
    rewritten: int
    fraction: float
    sent_after_open: int
    rewritten_after_open: int
    fraction_after_open: float
    epochs_over_200ms_without_report: int
    end_section_records: int
    end_section_reported_free: int
    records_before_first_epoch: int
    epochs_not_tracked: int
    first_report_goal_met: bool
    fraction_goal_met: bool
    report_every_epoch_goal_met: bool
    def __init__(self, epochs: _Optional[_Iterable[_Union[EpochCoverage, _Mapping]]] = ..., first_report_ms: _Optional[float] = ..., sent_after_report: _Optional[int] = ..., rewritten: _Optional[int] = ..., fraction: _Optional[float] = ..., sent_after_open: _Optional[int] = ..., rewritten_after_open: _Optional[int] = ..., fraction_after_open: _Optional[float] = ..., epochs_over_200ms_without_report: _Optional[int] = ..., end_section_records: _Optional[int] = ..., end_section_reported_free: _Optional[int] = ..., records_before_first_epoch: _Optional[int] = ..., epochs_not_tracked: _Optional[int] = ..., first_report_goal_met: _Optional[bool] = ..., fraction_goal_met: _Optional[bool] = ..., report_every_epoch_goal_met: _Optional[bool] = ...) -> None: ...

class ProxyTiming(_message.Message):
    __slots__ = ("paced_s", "send_s", "held_wait_s", "polls", "poll_ms_mean", "poll_ms_max", "backlog_at_stop_bytes", "stop_to_end_section_ms", "stop_to_drained_ms", "stop_to_eof_ms")
    PACED_S_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    HELD_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    POLLS_FIELD_NUMBER: _ClassVar[int]
    POLL_MS_MEAN_FIELD_NUMBER: _ClassVar[int]
    POLL_MS_MAX_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_AT_STOP_BYTES_FIELD_NUMBER: _ClassVar[int]
    STOP_TO_END_SECTION_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_TO_DRAINED_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_TO_EOF_MS_FIELD_NUMBER: _ClassVar[int]
    paced_s: float
    send_s: float
    held_wait_s: float
    polls: int
    poll_ms_mean: float
    poll_ms_max: float
    backlog_at_stop_bytes: int
    stop_to_end_section_ms: float
    stop_to_drained_ms: float
    stop_to_eof_ms: float
    def __init__(self, paced_s: _Optional[float] = ..., send_s: _Optional[float] = ..., held_wait_s: _Optional[float] = ..., polls: _Optional[int] = ..., poll_ms_mean: _Optional[float] = ..., poll_ms_max: _Optional[float] = ..., backlog_at_stop_bytes: _Optional[int] = ..., stop_to_end_section_ms: _Optional[float] = ..., stop_to_drained_ms: _Optional[float] = ..., stop_to_eof_ms: _Optional[float] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("vm", "migration", "outcome", "message", "to", "proxy_address", "issued_migrate", "started_at_unix", "wall_s", "source_status", "source_error", "source_runstate", "destination_status", "downtime_ms", "total_time_ms", "setup_time_ms", "dirty_sync_count", "qemu_transferred_bytes", "qemu_normal_pages", "qemu_zero_pages", "proxy_outcome", "source_bytes", "destination_bytes", "return_bytes", "extra_connections", "page_records", "zero_records", "pages_rewritten", "pages_held", "pages_released_unjudged", "fallback_reason", "abort_reason", "proxy_error", "rewriting", "plain_relay_reason", "gate_failure", "passes", "polls", "epochs", "epochs_not_listed", "agent_attached", "agent_source", "ram_bytes", "page_size", "preflight", "notes", "coverage", "timing", "switchover_bandwidth", "same_sync_rule")
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
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    SAME_SYNC_RULE_FIELD_NUMBER: _ClassVar[int]
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
    coverage: Coverage
    timing: ProxyTiming
    switchover_bandwidth: int
    same_sync_rule: bool
    def __init__(self, vm: _Optional[str] = ..., migration: _Optional[int] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ..., to: _Optional[str] = ..., proxy_address: _Optional[str] = ..., issued_migrate: _Optional[bool] = ..., started_at_unix: _Optional[float] = ..., wall_s: _Optional[float] = ..., source_status: _Optional[str] = ..., source_error: _Optional[str] = ..., source_runstate: _Optional[str] = ..., destination_status: _Optional[str] = ..., downtime_ms: _Optional[int] = ..., total_time_ms: _Optional[int] = ..., setup_time_ms: _Optional[int] = ..., dirty_sync_count: _Optional[int] = ..., qemu_transferred_bytes: _Optional[int] = ..., qemu_normal_pages: _Optional[int] = ..., qemu_zero_pages: _Optional[int] = ..., proxy_outcome: _Optional[str] = ..., source_bytes: _Optional[int] = ..., destination_bytes: _Optional[int] = ..., return_bytes: _Optional[int] = ..., extra_connections: _Optional[int] = ..., page_records: _Optional[int] = ..., zero_records: _Optional[int] = ..., pages_rewritten: _Optional[int] = ..., pages_held: _Optional[int] = ..., pages_released_unjudged: _Optional[int] = ..., fallback_reason: _Optional[str] = ..., abort_reason: _Optional[str] = ..., proxy_error: _Optional[str] = ..., rewriting: _Optional[bool] = ..., plain_relay_reason: _Optional[str] = ..., gate_failure: _Optional[str] = ..., passes: _Optional[int] = ..., polls: _Optional[int] = ..., epochs: _Optional[_Iterable[_Union[EpochReport, _Mapping]]] = ..., epochs_not_listed: _Optional[int] = ..., agent_attached: _Optional[bool] = ..., agent_source: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., page_size: _Optional[int] = ..., preflight: _Optional[_Union[Preflight, _Mapping]] = ..., notes: _Optional[_Iterable[str]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ..., timing: _Optional[_Union[ProxyTiming, _Mapping]] = ..., switchover_bandwidth: _Optional[int] = ..., same_sync_rule: _Optional[bool] = ...) -> None: ...

"""Faults injected into running fphint migrations (issue 9, item 5): a
representative subset of the matrix (bench/faults.py runs all 25 cases), on
one guest boot, through fph-collector migrate as an operator runs it.

Each case (fphint_lab/vm/fault_rig.py) waits for its phase of the stream,
injects the fault, and checks that

* the phase hit is the one aimed at, as observed afterwards from QEMU's event
  timestamps and the link's byte counts (fphint_lab/faults.py);
* the source's migration ended in a state the case allows (where two are
  correct, e.g. a fault at the switchover may come too late to stop it,
  either passes);
* the guest runs on the source with its memory intact (the churn workload
  verifies every byte it kept, same boot id, kernel log clean) or, where
  the migration completed, on the destination after the page-by-page RAM
  comparison with the witness;
* then a clean fphint migration of the same guest completes, rewrites pages
  and passes the same checks (QEMU's test_multifd_tcp_cancel pattern).

Every migration checked is recorded (fphint_lab/vm/tally.py): a line
``fphint-migration {...}``, the junit property ``fphint_migration``, and
$FPHINT_TALLY when set; scripts/reliability_tally.py sums them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from fphint_lab.faults import Kind, Phase
from fphint_lab.vm.fault_rig import FaultRig
from fphint_lab.vm.harness import VMFactory

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]
pytest.importorskip("host_collector.migrate.run", reason="fph-collector migrate (host_collector/migrate/) is needed")

#: The four kinds the issue names (collector killed and restarted, destination
#: killed, link cut, agent killed), each once, and every phase at least once
#: (the agent's case is killed mid-report, in a later pass); kept small for
#: make test's time, the other cases of the 25 are in bench/faults.py.
SUITE: tuple[tuple[Kind, Phase], ...] = (
    (Kind.DAEMON, Phase.SETUP),
    (Kind.RESET, Phase.FIRST_PASS),
    (Kind.DESTINATION, Phase.LATER_PASS),
    (Kind.AGENT, Phase.MID_REPORT),
    (Kind.DAEMON, Phase.SWITCHOVER),
)


@pytest.fixture(scope="module")
def rig(vm_module_factory: VMFactory) -> Iterator[FaultRig]:
    r = FaultRig(vm_module_factory).start()
    try:
        yield r
    finally:
        r.close()
        print("\n".join(["", "== fault campaign", *r.log]))


@pytest.mark.parametrize(("kind", "phase"), SUITE, ids=[f"{k.value}@{p.value}" for k, p in SUITE])
def test_fault_is_survived(
    rig: FaultRig, kind: Kind, phase: Phase, record_property: Callable[[str, object], None]
) -> None:
    res = rig.run_case(kind, phase, test=f"tests/vm/test_e2e_faults.py::{kind.value}@{phase.value}")
    for m in res.migrations:
        record_property("fphint_migration", m)
    record_property(
        "fphint_fault",
        f"{res.kind}@{res.aimed} observed {res.observed}: {res.source_outcome}, guest on the {res.guest_on}",
    )
    assert res.problems == [], res.as_dict()
    assert res.observed == phase.value, res.injection
    assert res.source_outcome in res.allowed, res.as_dict()
    assert res.recovery.get("bad_pages") == 0 and res.recovery.get("pages_rewritten"), res.recovery
    if res.source_outcome == "completed" and res.guest_on == "destination":
        assert res.migrations and '"corrupted_pages": 0' in res.migrations[0]
    if res.source_outcome != "completed":
        assert res.cli_rc != 0, "fph-collector migrate must not exit 0 for a migration that did not complete"
    if kind is Kind.AGENT:
        assert res.report_outcome == "completed" and res.cli_rc == 0, res.as_dict()
    if phase is Phase.MID_REPORT:
        # The collector sent the request and never saw the answer end.
        for epoch in res.injection["epochs"]:
            assert epoch["request_sent"] and epoch["request_to_last_chunk_s"] == -1, epoch

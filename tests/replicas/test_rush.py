"""The two-replica rush (issue 14): the same seeded lunch rush against one process of each
service and against two behind one address each gives the same money outcome; a hub stopped
mid-rush (SIGTERM, and SIGKILL) loses its tills to the other hub, which go on paying, and nothing
is lost or booked twice.

"The same" is exact: the plan fixes every payment, the freeze falls between two phases (not at a
time), and no outcome depends on the order concurrent payments arrive in (rush.py says how).
"""
from __future__ import annotations

import signal
from pathlib import Path

from tests.replicas.conftest import StartStack
from tests.replicas.rush import OFFLINE_TERMINALS, Rush, differences, plan

SEED = 14


async def rush_outcome(stack, root: Path, **run) -> tuple[dict, dict, Rush]:  # noqa: ANN001, ANN003
    rush = Rush(stack=stack, root=root, plan=plan(SEED))
    try:
        await rush.setup()
        await rush.run(**run)
        return await rush.outcome(), await rush.once_each(), rush
    finally:
        await rush.close()


def assert_each_once(once: dict) -> None:
    for durable in ("ledger-member-purses", "codegen-member-status"):
        seen = once[durable]
        assert seen["handled"] == seen["in_stream"] and seen["redelivered"] == 0, (durable, seen)
    posted = once["ledger.transfer.posted"]
    assert posted["in_stream"] == posted["transfers"], posted


async def test_the_two_replica_rush_books_what_one_replica_books(replica_stack: StartStack, tmp_path: Path) -> None:
    one = await replica_stack(1)
    single, single_once, _ = await rush_outcome(one, tmp_path / "one")
    await one.stop()
    two = await replica_stack(2)
    double, double_once, _ = await rush_outcome(two, tmp_path / "two")

    # The rush did what it was meant to: payments of every kind, refusals after the freeze, and
    # offline records refused at settlement.
    assert single["trial_balance"] == (True, 0, 0)
    tills = single["tills"].values()
    assert sum(approved and online for approved, online, _r, _c in tills) > 40
    assert sum(approved and not online for approved, online, _r, _c in tills) > 10
    # The frozen member: booked before the freeze, refused online after it, and what offline tills
    # accepted from them after it refused at settlement.
    the_plan = plan(SEED)
    after = [s for s in the_plan.steps if s.member == the_plan.frozen_member and s.phase == 2]
    online_after = [single["tills"][s.index] for s in after if s.terminal not in OFFLINE_TERMINALS]
    assert online_after and all(not approved and online for approved, online, _r, _c in online_after)
    assert {reason for _a, _o, reason, _c in online_after} >= {"MEMBER_FROZEN"}, online_after
    refused_offline = [r for r in single["offline_records"] if r[2] == "rejected"]
    assert len(refused_offline) == sum(s.terminal in OFFLINE_TERMINALS for s in after), refused_offline
    assert all(single["tills"][s.index][0] for s in the_plan.steps if s.phase == 1 or s.member != the_plan.frozen_member)
    assert double == single, "one replica != two replicas:\n" + "\n".join(differences(single, double))
    assert_each_once(single_once)
    assert_each_once(double_once)

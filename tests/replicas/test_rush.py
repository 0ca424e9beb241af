"""The two-replica rush (issue 14): the same seeded lunch rush against one process of each
service and against two behind one address each gives the same money outcome; a hub stopped
mid-rush (SIGTERM, and SIGKILL) loses its tills to the other hub, which go on paying, and nothing
is lost or booked twice.

"The same" is exact: the plan fixes every payment, the freeze falls between two phases (not at a
time), and no outcome depends on the order concurrent payments arrive in (rush.py says how).
"""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from onecard.devicehub.v1 import devicehub_pb2 as pb
from tests.replicas.conftest import StartStack
from tests.replicas.rush import CASH_FEN, MEMBERS, OFFLINE_TERMINALS, TOP_UP_FEN, Rush, differences, plan

SEED = 14


async def rush_outcome(stack, root: Path, *, before_close=None, **run) -> tuple[dict, dict, Rush]:  # noqa: ANN001, ANN003
    """Set up and run the seeded rush; its outcome and its once-each counts (``before_close``:
    a look at the running rush before its tills close)."""
    rush = Rush(stack=stack, root=root, plan=plan(SEED))
    try:
        await rush.setup()
        await rush.run(**run)
        if before_close is not None:
            await before_close(rush)
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


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_hub_stopped_mid_rush_loses_its_tills_to_the_other_and_nothing_is_lost_or_booked_twice(
        replica_stack: StartStack, tmp_path: Path, how: signal.Signals) -> None:
    stack = await replica_stack(2)
    doomed, survivor = stack.running["devicehub"]
    killed = asyncio.Event()

    async def stop_a_hub(done: int) -> None:
        # A third into phase 2, with the other tills' payments in flight.
        if done == 20 and not killed.is_set():
            killed.set()
            doomed.signal(how)

    online: dict[str, bool] = {}

    async def tills_online(rush: Rush) -> None:
        admin = stack.client("devicehub")
        for terminal in rush.terminals:
            got = await admin.stub.GetDevice(pb.GetDeviceRequest(tenant_id=rush.tenant_id,
                                                                 device_id=terminal.client.device_id))
            online[terminal.name] = got.device.online

    outcome, once, rush = await rush_outcome(stack, tmp_path, during_phase_2=stop_a_hub, before_close=tills_online)
    assert killed.is_set() and await doomed.process.wait_exit(timeout_s=30) is not None
    the_plan = rush.plan
    assert set(outcome["tills"]) == {s.index for s in the_plan.steps}  # every sale answered at its till

    # Nothing lost, nothing twice: what the tills approved is what the books hold, member by
    # member; a sale whose answer was lost with the hub shows NO_ANSWER_REVERSED and costs nothing.
    rejected = {(terminal, sequence) for terminal, sequence, result, _r in outcome["offline_records"]
                if result == "rejected"}
    frozen_after = {s.index for s in the_plan.steps if s.member == the_plan.frozen_member and s.phase == 2}
    spent = dict.fromkeys(outcome["balances_fen"], 0)
    for step in the_plan.steps:
        shown = rush.shown[step.index]
        if not shown.approved:
            continue
        if not shown.online and (f"POS {step.terminal}", shown.sequence) in rejected:
            assert step.index in frozen_after, step  # only the frozen member's records are refused
            continue
        spent[f"R{step.member:02d}"] += shown.charged_fen
    topped = {f"R{m:02d}": TOP_UP_FEN * the_plan.top_ups.count(m) for m in range(MEMBERS)}
    assert outcome["balances_fen"] == {n: CASH_FEN + topped[n] - spent[n] for n in spent}
    assert outcome["payments"]["net_fen"] == sum(spent.values()) == outcome["merchant_fen"]
    assert outcome["trial_balance"] == (True, 0, 0)
    assert all(result in ("booked", "rejected") for _t, _s, result, _r in outcome["offline_records"])
    assert_each_once(once)

    # The doomed hub's tills went to the other and were online there at the end: their old
    # streams' end on the doomed hub (SIGTERM) did not mark them offline.
    moved = [t for t in rush.terminals if t.client.stats.failovers]
    assert moved and all(t.client.target == survivor.device_address for t in rush.terminals)
    assert online == {t.name: True for t in rush.terminals}


"""A POS offline for a whole lunch uploads what it did: every record is settled exactly once, with
duplicates, reordering, a gap (alarm, listed, filled later), a code replayed at a second device
(booked once, alarm) and a shortfall (receivable, alarm); a second upload changes nothing. What a
rogue terminal's records come to is tests/devicehub/test_offline_evidence.py."""

from __future__ import annotations

import random
import uuid
from datetime import UTC

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import RunningService
from tests.devicehub.tx_support import (
    add_member,
    balance,
    campus,
    device,
    online,
    payment_record,
    roundtrip,
)


async def upload(conn, records: list[pb.OfflineRecord]) -> pb.UploadResult:  # noqa: ANN001
    upload_id = str(uuid.uuid4())
    answer = await roundtrip(conn, upload_id, "upload_result",
                             pb.ConnectRequest(upload=pb.Upload(upload_id=upload_id, records=records)))
    assert isinstance(answer, pb.UploadResult), answer
    return answer


async def alarms(devicehub: RunningService, tenant_id: str, device_id: str) -> dict[str, int]:
    answer = await devicehub.stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device_id))
    return {pb.AlarmKind.Name(a.kind).removeprefix("ALARM_KIND_"): a.severity for a in answer.alarms}


async def test_a_whole_lunch_offline_settles_every_record_once_twice_over(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    rng = random.Random(7)
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    # Five payments each, within every cap (1,500 at most, 7,500 a day against the canteen's 10,000).
    members = [await add_member(c, identity=identity, ledger=ledger, number=f"S{i:02d}", cash_fen=100_000,
                                codegen=codegen, card_uid=f"CA{i:06d}") for i in range(60)]
    poor = await add_member(c, identity=identity, ledger=ledger, number="POOR", cash_fen=1_000, card_uid="DD000001")
    pos_a = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    pos_b = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id, location="south-canteen")
    conn_a = await online(device_stub, pos_a)
    conn_b = await online(device_stub, pos_b)

    # Lunch on POS A: 300 payments, by code (the code's text and its credential + counter) or card.
    records: dict[int, pb.OfflineRecord] = {}
    spent: dict[str, int] = {}
    for sequence in range(1, 301):
        amount = rng.randrange(300, 1500)
        if sequence in (40, 41):  # the poor member: 1,400 + 600 on a 1,000 purse
            member, amount = poor, (1_400 if sequence == 40 else 600)
            record = payment_record(pos_a, sequence=sequence, member=member, amount_fen=amount, by_card=True)
        else:
            member = members[sequence % len(members)]
            record = payment_record(pos_a, sequence=sequence, member=member, amount_fen=amount,
                                    by_card=sequence % 3 == 0)
        records[sequence] = record
        spent[member.member_id] = spent.get(member.member_id, 0) + amount
    gap = {150, 151, 152}
    first_pass = [r for s, r in records.items() if s not in gap]
    rng.shuffle(first_pass)
    # Two uploads; some records sent twice within an upload, some in both.
    batch_1 = first_pass[:160] + first_pass[:10]
    batch_2 = first_pass[150:] + first_pass[150:155]
    rng.shuffle(batch_1)

    try:
        result_1 = await upload(conn_a, batch_1)
        result_2 = await upload(conn_a, batch_2)
        outcomes: dict[int, list[int]] = {}
        for result in (*result_1.results, *result_2.results):
            outcomes.setdefault(result.sequence, []).append(result.outcome)
        settled = {pb.RECORD_OUTCOME_BOOKED, pb.RECORD_OUTCOME_SHORTFALL}
        for sequence, seen in outcomes.items():
            # Each record settled once; every other sight of it is a duplicate.
            assert sum(o in settled for o in seen) == 1, (sequence, seen)
            assert all(o in settled or o == pb.RECORD_OUTCOME_DUPLICATE for o in seen), (sequence, seen)
        assert set(outcomes) == set(records) - gap
        # 2,000 on a 1,000 purse: whichever settled second fell short.
        assert pb.RECORD_OUTCOME_SHORTFALL in {o for s in (40, 41) for o in outcomes[s]}
        assert sorted(result_2.missing_sequences) == [150, 151, 152]
        assert result_2.last_settled_sequence == 149
        assert {"SEQUENCE_GAP", "SHORTFALL"} <= set(await alarms(devicehub, tenant_id, pos_a.device_id))

        # POS B saw a code A had booked (a screenshot shown twice): booked once, alarm on B.
        victim = records[1]
        assert victim.method == pb.METHOD_CODE
        replay = payment_record(pos_b, sequence=1, member=members[1], amount_fen=800,
                                at=victim.event_time.ToDatetime(tzinfo=UTC), code=victim.code)
        replayed = await upload(conn_b, [replay])
        assert [(r.outcome, r.reason) for r in replayed.results] == [(pb.RECORD_OUTCOME_CODE_REUSED, "CODE_REUSED")]
        assert (await alarms(devicehub, tenant_id, pos_b.device_id)).get("CODE_REPLAY") == \
            pb.ALARM_SEVERITY_CRITICAL

        # The gap arrives later: settled like the rest (the counters of the later records settled
        # first never refuse them: the device counted those too), nothing missing any more.
        filled = await upload(conn_a, [records[s] for s in sorted(gap)])
        assert [r.outcome for r in filled.results] == [pb.RECORD_OUTCOME_BOOKED] * 3
        assert (list(filled.missing_sequences), filled.last_settled_sequence) == ([], 300)
        # The gap is filled: its alarm cleared itself (the shortfall's stays for a person).
        assert set(await alarms(devicehub, tenant_id, pos_a.device_id)) == {"SHORTFALL"}
        cleared = await devicehub.stub.ListAlarms(pb.ListAlarmsRequest(
            tenant_id=tenant_id, device_id=pos_a.device_id, state=pb.ALARM_STATE_CLEARED))
        assert [(a.kind, a.cleared_by) for a in cleared.alarms] == [(pb.ALARM_KIND_SEQUENCE_GAP, "devicehub")]

        async def books() -> tuple[dict[str, int], int]:
            purses = {m.member_id: await balance(ledger, tenant_id, m.cash_id) for m in [*members, poor]}
            return purses, await balance(ledger, tenant_id, c.merchant_id)

        purses, merchant = await books()
        for m in members:
            assert purses[m.member_id] == 100_000 - spent[m.member_id]
        assert purses[poor.member_id] == 0  # 1,000 paid, 1,000 on the receivable
        assert merchant == sum(spent.values())
        receivable = await ledger.stub.GetBalances(lpb.GetBalancesRequest(
            tenant_id=tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=poor.member_id))
        assert sorted(a.balance.posted_fen for a in receivable.accounts
                      if a.account.purse_kind == lpb.PURSE_KIND_RECEIVABLE) == [-1_000]

        # Everything again (a device that lost its acknowledgements): all DUPLICATE, nothing moves.
        everything = list(records.values())
        rng.shuffle(everything)
        again = [await upload(conn_a, everything[:200]), await upload(conn_a, everything[200:])]
        assert {r.outcome for a in again for r in a.results} == {pb.RECORD_OUTCOME_DUPLICATE}
        assert len([r for a in again for r in a.results]) == 300
        assert await books() == (purses, merchant)
        assert (await upload(conn_b, [replay])).results[0].outcome == pb.RECORD_OUTCOME_DUPLICATE
        # The next welcome tells the device it may drop everything.
        await conn_a.close()
        conn_a = await online(device_stub, pos_a, last_sequence=300)
        assert conn_a.welcome.last_settled_sequence == 300
        # The fleet list says what each device may drop, as GetDevice does.
        listed = await devicehub.stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id))
        settled_of = {d.device_id: d.last_settled_sequence for d in listed.devices}
        assert settled_of == {pos_a.device_id: 300, pos_b.device_id: 1}, settled_of
        for pos in (pos_a, pos_b):
            got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=pos.device_id))
            assert got.device.last_settled_sequence == settled_of[pos.device_id]
            assert not got.device.flagged
    finally:
        await conn_a.close()
        await conn_b.close()


async def test_bad_records_are_rejected_and_answered_the_same_again(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", card_uid="AB000001")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    other = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    good = payment_record(pos, sequence=1, member=member, amount_fen=500, by_card=True)
    forged = payment_record(other, sequence=2, member=member, amount_fen=500, by_card=True)  # another device's key
    unknown_purse = payment_record(pos, sequence=3, member=member, amount_fen=500, by_card=True,
                                   legs=[pb.PlanLeg(purse_kind="subsidy", ref="nope", amount_fen=500)])
    # A card the device never saw online: no member named, the card's holder pays.
    card_only = payment_record(pos, sequence=4, member=member, amount_fen=300, by_card=True, member_id="")
    # Another spelling of the same card would be another set of counters: refused.
    lower_case = payment_record(pos, sequence=5, member=member, amount_fen=300, by_card=True, card_uid="ab000001")
    try:
        first = await upload(conn, [good, forged, unknown_purse, card_only, lower_case])
        assert [(r.sequence, r.outcome, r.reason) for r in first.results] == [
            (1, pb.RECORD_OUTCOME_BOOKED, ""), (2, pb.RECORD_OUTCOME_REJECTED, "SIGNATURE_INVALID"),
            (3, pb.RECORD_OUTCOME_REJECTED, "PURSE_NOT_ALLOWED"), (4, pb.RECORD_OUTCOME_BOOKED, ""),
            (5, pb.RECORD_OUTCOME_REJECTED, "CARD_UID_INVALID")]
        assert "RECORD_REJECTED" in await alarms(devicehub, tenant_id, pos.device_id)
        assert await balance(ledger, tenant_id, member.cash_id) == 100_000 - 800
        again = await upload(conn, [good, forged, unknown_purse])
        assert [(r.outcome, r.reason) for r in again.results] == [
            (pb.RECORD_OUTCOME_DUPLICATE, "BOOKED"), (pb.RECORD_OUTCOME_DUPLICATE, "REJECTED:SIGNATURE_INVALID"),
            (pb.RECORD_OUTCOME_DUPLICATE, "REJECTED:PURSE_NOT_ALLOWED")]
        assert again.results[0].transfer_id == first.results[0].transfer_id
        # The same sequence with other content is refused, and the first stays.
        changed = payment_record(pos, sequence=1, member=member, amount_fen=900, by_card=True)
        assert [(r.outcome, r.reason) for r in (await upload(conn, [changed])).results] == [
            (pb.RECORD_OUTCOME_REJECTED, "SEQUENCE_REUSED")]
        assert await balance(ledger, tenant_id, member.cash_id) == 100_000 - 800
        empty = await roundtrip(conn, "u-empty", "upload_result",
                                pb.ConnectRequest(upload=pb.Upload(upload_id="u-empty")))
        assert isinstance(empty, pb.StreamError) and empty.reason == "UPLOAD_EMPTY"
    finally:
        await conn.close()


def test_sequence_bookkeeping() -> None:
    from services.devicehub.settlement import _number_ranges, next_sequences, watermark

    assert next_sequences(0, [], {1, 2, 3}) == (3, [])
    assert next_sequences(3, [], {7, 5}) == (7, [4, 6])
    assert next_sequences(7, [4, 6], {6, 8}) == (8, [4])
    assert next_sequences(8, [4], {2}) == (8, [4])
    assert watermark(8, [4]) == 3 and watermark(8, []) == 8 and watermark(0, []) == 0
    highest, missing = next_sequences(0, [], {50_000})
    assert highest == 50_000 and missing[:2] == [1, 2] and len(missing) == 10_000
    assert _number_ranges([3, 7, 8, 9, 12]) == "3, 7-9, 12"

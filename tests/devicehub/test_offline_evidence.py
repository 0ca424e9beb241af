"""A rogue terminal's uploads (docs/devicehub.md §5, docs/security.md "A rogue terminal's worst
case"): every record that charges another member, an amount over the caps, a purse the rules do
not let it use, a replayed, forged or revoked code, a time outside its window or rules it could
not have held is REJECTED with its reason and moves no money; the honest records of the same
upload still book; a terminal with many rejected records is flagged until a person clears it."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nacl.signing
import onecard_codes as codes
from onecard_policy.examples import university_rule_set

from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as ppb
from tests.conftest import RunningService
from tests.devicehub.support import EnrolledDevice, is_sync
from tests.devicehub.tx_support import (
    Campus,
    Member,
    add_member,
    balance,
    campus,
    device,
    online,
    open_account,
    open_all_day,
    payment_record,
    roundtrip,
    signed,
    top_up,
)

OUTCOMES = {pb.RECORD_OUTCOME_BOOKED: "BOOKED", pb.RECORD_OUTCOME_SHORTFALL: "SHORTFALL",
            pb.RECORD_OUTCOME_DUPLICATE: "DUPLICATE", pb.RECORD_OUTCOME_CODE_REUSED: "CODE_REUSED",
            pb.RECORD_OUTCOME_REJECTED: "REJECTED"}


async def upload(conn, records: list[pb.OfflineRecord]) -> dict[int, tuple[str, str]]:  # noqa: ANN001
    """Each record's (outcome, reason), by sequence."""
    upload_id = str(uuid.uuid4())
    answer = await roundtrip(conn, upload_id, "upload_result",
                             pb.ConnectRequest(upload=pb.Upload(upload_id=upload_id, records=records)))
    assert isinstance(answer, pb.UploadResult), answer
    return {r.sequence: (OUTCOMES[r.outcome], r.reason) for r in answer.results}


async def open_alarms(hub: RunningService, tenant_id: str, device_id: str) -> dict[str, pb.Alarm]:
    answer = await hub.stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device_id))
    return {pb.AlarmKind.Name(a.kind).removeprefix("ALARM_KIND_"): a for a in answer.alarms}


async def booked(ledger: RunningService, tenant_id: str, device_id: str, sequence: int) -> bool:
    answer = await ledger.stub.LookupTransfer(lpb.LookupTransferRequest(
        tenant_id=tenant_id, idempotency_key=f"dev:{device_id}:{sequence}"))
    return answer.found


def forged_code(tenant_id: str, member: Member) -> str:
    """A well-made code for the member, signed by an issuer key the tenant never had."""
    issuer = codes.IssuerKey.generate(tenant_id=uuid.UUID(tenant_id))
    holder = nacl.signing.SigningKey.generate()
    now_s = int(datetime.now(UTC).timestamp())
    issued = codes.issue_credential(
        issuer_key=issuer, member_id=uuid.UUID(member.member_id), holder_public_key=bytes(holder.verify_key),
        not_before_s=now_s - 60, not_after_s=now_s + 3600,
        caps=codes.OfflineCaps(per_transaction_fen=100_000, per_day_fen=100_000, count_per_day=255),
        purposes=codes.Purpose.PAY)
    return codes.make_holder_code(credential_bytes=issued.credential_bytes, holder_signing_key=holder, now_s=now_s,
                                  counter=1, purpose=codes.Purpose.PAY)


def stripped(enrolled, record: pb.OfflineRecord) -> pb.OfflineRecord:  # noqa: ANN001
    """The record without the code text its credential and counter came from, signed again."""
    record.code = ""
    return signed(enrolled, record)


async def tighter_codes(codegen: RunningService, tenant_id: str) -> None:
    """The tenant's codes carry caps of 2,000 fen a payment (the rule set's own cap is 3,000)."""
    await codegen.stub.UpdateTenantCodeSettings(cpb.UpdateTenantCodeSettingsRequest(
        tenant_id=tenant_id, caps=cpb.OfflineCaps(per_transaction_fen=2000, per_day_fen=20_000, per_day_count=20),
        default_credential_validity_hours=24))


async def subsidy_purse(c: Campus, ledger: RunningService, member: Member, *, amount_fen: int) -> str:
    funding = await open_account(ledger, c.tenant_id, owner_kind=lpb.OWNER_KIND_TENANT, owner_id="school",
                                 purse_kind=lpb.PURSE_KIND_SUBSIDY_FUNDING, ref="meal-2026-11")
    purse = await open_account(ledger, c.tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member.member_id,
                               purse_kind=lpb.PURSE_KIND_SUBSIDY, ref="meal-2026-11")
    await top_up(ledger, c.tenant_id, from_id=funding, to_id=purse, amount_fen=amount_fen)
    return purse


async def test_a_rogue_terminals_records_are_rejected_and_move_no_money_while_honest_ones_book(
        identity, codegen, ledger, policy, start_devicehub, tenant_id: str) -> None:  # noqa: ANN001
    hub = await start_devicehub(flag_after_rejected_records=5)
    device_stub = devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    await tighter_codes(codegen, tenant_id)
    alice = await add_member(c, identity=identity, ledger=ledger, number="A1", codegen=codegen, card_uid="AA000001")
    bob = await add_member(c, identity=identity, ledger=ledger, number="B1", codegen=codegen, card_uid="BB000002")
    alice_subsidy = await subsidy_purse(c, ledger, alice, amount_fen=5_000)
    rogue = await device(hub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, rogue)
    try:
        now = datetime.now(UTC)
        bob_before = payment_record(rogue, sequence=3, member=bob, amount_fen=700)
        await asyncio.sleep(1.1)  # revocations count by the second
        await codegen.stub.RevokeCredential(cpb.RevokeCredentialRequest(
            tenant_id=tenant_id, credential_id=bob.credential_id, reason="phone lost"))
        await asyncio.sleep(1.1)
        honest = {
            1: payment_record(rogue, sequence=1, member=alice, amount_fen=1_500),
            2: payment_record(rogue, sequence=2, member=bob, amount_fen=800, by_card=True),
            3: bob_before,  # made before bob's credential was revoked: still good
            # Bob's card three times: with the 1,500 above, 9,900 of the canteen's 10,000 a day.
            **{s: payment_record(rogue, sequence=s, member=bob, amount_fen=2_800, by_card=True) for s in (4, 5, 6)},
        }
        shown = honest[1]
        rogue_records = {
            # Another member: alice's code charged to bob, a code payment without its code, alice's card for bob.
            10: ("MEMBER_MISMATCH", payment_record(rogue, sequence=10, member=alice, amount_fen=900,
                                                   member_id=bob.member_id)),
            11: ("CODE_MISSING", stripped(rogue, payment_record(rogue, sequence=11, member=bob, amount_fen=900))),
            12: ("MEMBER_MISMATCH", payment_record(rogue, sequence=12, member=alice, amount_fen=900, by_card=True,
                                                   member_id=bob.member_id)),
            # Over the caps: the rule set's per payment, the code's own, the canteen's day (bob's 4th).
            13: ("OFFLINE_LIMIT_EXCEEDED:credential.per_transaction_fen",
                 payment_record(rogue, sequence=13, member=alice, amount_fen=3_500)),
            14: ("OFFLINE_LIMIT_EXCEEDED:code.per_transaction_fen",
                 payment_record(rogue, sequence=14, member=alice, amount_fen=2_500)),
            15: ("LIMIT_EXCEEDED:daily-canteen", payment_record(rogue, sequence=15, member=bob, amount_fen=2_800,
                                                                by_card=True)),
            # A purse it may not use (the subsidy, offline), a discount the rules did not give.
            16: ("PURSE_NOT_ALLOWED", payment_record(rogue, sequence=16, member=alice, amount_fen=1_000, legs=[
                pb.PlanLeg(purse_kind="subsidy", ref="meal-2026-11", amount_fen=1_000)])),
            17: ("PLAN_MISMATCH", payment_record(rogue, sequence=17, member=alice, amount_fen=1_000, legs=[
                pb.PlanLeg(purse_kind="cash", amount_fen=700)])),
            # The code alice showed for record 1, dated three minutes later; a code no issuer of the
            # tenant signed; bob's code made after his credential was revoked.
            18: ("CODE_EXPIRED", payment_record(rogue, sequence=18, member=alice, amount_fen=1_500, code=shown.code,
                                                at=shown.event_time.ToDatetime(tzinfo=UTC) + timedelta(minutes=3))),
            19: ("CODE_UNKNOWN_KEY", payment_record(rogue, sequence=19, member=bob, amount_fen=900,
                                                    code=forged_code(tenant_id, bob))),
            20: ("CODE_REVOKED", payment_record(rogue, sequence=20, member=bob, amount_fen=900)),
            # Outside the window: an hour after the upload, an hour before the device's hello.
            21: ("EVENT_TIME_TOO_LATE", payment_record(rogue, sequence=21, member=alice, amount_fen=500,
                                                       by_card=True, at=now + timedelta(hours=1))),
            22: ("EVENT_TIME_TOO_EARLY", payment_record(rogue, sequence=22, member=alice, amount_fen=500,
                                                        by_card=True, at=now - timedelta(hours=1))),
            # Rules it never held.
            23: ("BUNDLE_VERSION_NOT_IN_FORCE", payment_record(rogue, sequence=23, member=alice, amount_fen=500,
                                                               by_card=True, bundle_version=7)),
        }
        # The very code of record 1 again, at its own time: the ledger books a code once.
        replay = payment_record(rogue, sequence=24, member=alice, amount_fen=1_500, code=shown.code,
                                at=shown.event_time.ToDatetime(tzinfo=UTC))
        everything = [*honest.values(), *(record for _, record in rogue_records.values()), replay]
        result = await upload(conn, everything[::-1])

        assert {s: result[s] for s in honest} == {s: ("BOOKED", "") for s in honest}
        assert {s: result[s] for s in rogue_records} == {s: ("REJECTED", reason)
                                                         for s, (reason, _) in rogue_records.items()}
        assert result[24] == ("CODE_REUSED", "CODE_REUSED")

        # No money moved for any of them: the purses paid exactly the honest records.
        assert await balance(ledger, tenant_id, alice.cash_id) == 100_000 - 1_500
        assert await balance(ledger, tenant_id, alice_subsidy) == 5_000
        assert await balance(ledger, tenant_id, bob.cash_id) == 100_000 - 800 - 700 - 3 * 2_800
        assert await balance(ledger, tenant_id, c.merchant_id) == 1_500 + 800 + 700 + 3 * 2_800
        for sequence in (*rogue_records, 24):
            assert not await booked(ledger, tenant_id, rogue.device_id, sequence), sequence

        # The terminal raised its alarms and is flagged, until a person clears the flag.
        alarms = await open_alarms(hub, tenant_id, rogue.device_id)
        assert alarms["RECORD_REJECTED"].severity == pb.ALARM_SEVERITY_WARNING
        assert alarms["CODE_REPLAY"].severity == pb.ALARM_SEVERITY_CRITICAL
        flag = alarms["DEVICE_FLAGGED"]
        assert flag.severity == pb.ALARM_SEVERITY_CRITICAL and "14 uploaded record(s) rejected" in flag.detail
        got = (await hub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=rogue.device_id))).device
        assert got.flagged and got.flagged_at == flag.opened_at
        listed = await hub.stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id))
        assert [d.flagged for d in listed.devices] == [True]

        # The same upload again changes nothing and flags nothing anew.
        again = await upload(conn, everything)
        assert {outcome for outcome, _ in again.values()} == {"DUPLICATE"}
        assert again[16] == ("DUPLICATE", "REJECTED:PURSE_NOT_ALLOWED")
        await hub.stub.ClearAlarm(pb.ClearAlarmRequest(tenant_id=tenant_id, alarm_id=flag.alarm_id, by="auditor"))
        got = (await hub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=rogue.device_id))).device
        assert not got.flagged and not got.HasField("flagged_at")
        await upload(conn, everything)
        assert "DEVICE_FLAGGED" not in await open_alarms(hub, tenant_id, rogue.device_id)
        assert await balance(ledger, tenant_id, c.merchant_id) == 1_500 + 800 + 700 + 3 * 2_800
    finally:
        await conn.close()


async def test_the_member_and_the_card_are_judged_as_of_the_records_time(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    carol = await add_member(c, identity=identity, ledger=ledger, number="C1", card_uid="CC000003")
    dave = await add_member(c, identity=identity, ledger=ledger, number="D1", card_uid="DD000004")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        before = [payment_record(pos, sequence=1, member=carol, amount_fen=400, by_card=True),
                  payment_record(pos, sequence=2, member=dave, amount_fen=500, by_card=True)]
        await asyncio.sleep(1.1)
        await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(
            tenant_id=tenant_id, member_id=carol.member_id, card_uid=carol.card_uid))
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(
            tenant_id=tenant_id, member_id=dave.member_id, reason="left the campus for a term"))
        await asyncio.sleep(0.1)
        after = [payment_record(pos, sequence=3, member=carol, amount_fen=400, by_card=True),
                 payment_record(pos, sequence=4, member=dave, amount_fen=500, by_card=True)]
        # The taps before the report and the freeze were good then (the goods were handed over);
        # the ones after are not, whatever the device knew.
        assert await upload(conn, [*after, *before]) == {
            1: ("BOOKED", ""), 2: ("BOOKED", ""), 3: ("REJECTED", "CARD_LOST"), 4: ("REJECTED", "MEMBER_FROZEN")}
        assert await balance(ledger, tenant_id, carol.cash_id) == 100_000 - 400
        assert await balance(ledger, tenant_id, dave.cash_id) == 100_000 - 500
    finally:
        await conn.close()


@dataclass
class Till:
    """A canteen POS on a hub that allows one second of clock skew, and a member with a card."""

    hub: RunningService
    stub: devicehub_pb2_grpc.DeviceServiceStub
    campus: Campus
    member: Member
    pos: EnrolledDevice


async def a_till(start_devicehub, *, identity: RunningService, ledger: RunningService,  # noqa: ANN001
                 policy: RunningService, tenant_id: str, card_uid: str) -> Till:
    hub = await start_devicehub(offline_clock_skew_s=1)
    stub = devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    member = await add_member(c, identity=identity, ledger=ledger, number=card_uid, card_uid=card_uid)
    return Till(hub, stub, c, member, await device(hub, stub, tenant_id, merchant_id=c.merchant_id))


async def test_a_record_is_dated_between_the_hellos_around_its_sequence(
        identity, codegen, ledger, policy, start_devicehub, tenant_id: str) -> None:  # noqa: ANN001
    till = await a_till(start_devicehub, identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id,
                        card_uid="EE000005")
    device_stub, erin, pos = till.stub, till.member, till.pos
    first_hello = datetime.now(UTC)
    await (await online(device_stub, pos)).close()  # hello: no record issued yet
    await asyncio.sleep(3)
    second_hello = datetime.now(UTC)
    conn = await online(device_stub, pos, last_sequence=2)  # hello: records 1 and 2 issued since
    try:
        made = {
            # Between the two hellos: as the device said.
            1: payment_record(pos, sequence=1, member=erin, amount_fen=300, by_card=True,
                              at=first_hello + timedelta(seconds=1.5)),
            # Numbered before the second hello, dated after it: the device said it had made it.
            2: payment_record(pos, sequence=2, member=erin, amount_fen=300, by_card=True,
                              at=second_hello + timedelta(seconds=2.5)),
            # Numbered after the second hello, dated before it (beyond the skew).
            3: payment_record(pos, sequence=3, member=erin, amount_fen=300, by_card=True,
                              at=first_hello + timedelta(seconds=1.5)),
            4: payment_record(pos, sequence=4, member=erin, amount_fen=300, by_card=True),
        }
        assert await upload(conn, list(made.values())) == {
            1: ("BOOKED", ""), 2: ("REJECTED", "EVENT_TIME_TOO_LATE"), 3: ("REJECTED", "EVENT_TIME_TOO_EARLY"),
            4: ("BOOKED", "")}
    finally:
        await conn.close()


async def test_a_device_may_plan_with_the_rules_it_could_have_held(
        identity, codegen, ledger, policy, start_devicehub, tenant_id: str) -> None:  # noqa: ANN001
    till = await a_till(start_devicehub, identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id,
                        card_uid="FF000006")
    device_stub, c, fay, pos = till.stub, till.campus, till.member, till.pos

    async def hello(last_sequence: int, *, bundle: int) -> None:
        """A stream that stays until the bundle of version ``bundle`` reached the device."""
        conn = await online(device_stub, pos, last_sequence=last_sequence)
        try:
            found = await conn.recv_until(is_sync(pb.SYNC_KIND_POLICY_BUNDLE))
            assert found.sync.version == bundle
            await asyncio.sleep(0.3)  # the hub notes what it sent right after sending it
        finally:
            await conn.close()

    await hello(0, bundle=1)
    # While the device is away, version 2 caps a canteen payment at 10 yuan; version 3 is a draft.
    doc = open_all_day(json.loads(json.dumps(university_rule_set()).replace(
        '"canteen-north"', json.dumps(c.merchant_id)).replace('"milk-cabinet"', json.dumps(c.vending_id))))
    doc["limits"] = [{**lim, "max": 1000} if lim["name"] == "canteen-per-payment" else lim for lim in doc["limits"]]
    v2 = (await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=json.dumps(doc)))).version.version
    await policy.stub.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=v2, published_by="admin@test"))
    v3 = (await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=json.dumps(doc), note="never published"))).version.version
    # Offline, it still holds version 1: in force when it last connected.
    away = [payment_record(pos, sequence=1, member=fay, amount_fen=2_000, by_card=True, bundle_version=1)]
    await asyncio.sleep(2)
    # It connects and gets version 2 (the hub had sent it 1 before: the stream might have ended first).
    await hello(1, bundle=v2)
    back = {2: ("BOOKED", ""), 3: ("REJECTED", "LIMIT_EXCEEDED:canteen-per-payment"),
            4: ("REJECTED", "BUNDLE_VERSION_NOT_IN_FORCE")}
    made = [payment_record(pos, sequence=2, member=fay, amount_fen=2_000, by_card=True, bundle_version=1),
            payment_record(pos, sequence=3, member=fay, amount_fen=2_000, by_card=True, bundle_version=v2),
            payment_record(pos, sequence=4, member=fay, amount_fen=500, by_card=True, bundle_version=v3)]
    await asyncio.sleep(2)
    conn = await online(device_stub, pos, last_sequence=4)
    try:
        # Once the hub has sent it version 2, version 1 is no rule set it could have planned with.
        late = payment_record(pos, sequence=5, member=fay, amount_fen=500, by_card=True, bundle_version=1)
        result = await upload(conn, [*away, *made, late])
        assert result == {1: ("BOOKED", ""), **back, 5: ("REJECTED", "BUNDLE_VERSION_NOT_IN_FORCE")}
        assert await balance(ledger, tenant_id, fay.cash_id) == 100_000 - 4_000
    finally:
        await conn.close()

"""Online payments on a POS's stream: a code, a card and a face each book once with the plan the
university rules make; refusals (replayed, revoked or foreign codes, lost cards, frozen members,
short purses) are answers, not errors."""

from __future__ import annotations

import uuid
from datetime import timedelta

import onecard_codes as codes

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import RunningService
from tests.devicehub.support import eventually
from tests.devicehub.tx_support import (
    DINNER,
    LUNCH,
    add_member,
    ask,
    balance,
    campus,
    device,
    online,
    pay,
    stamp,
)


async def test_code_card_and_face_each_book_once_with_the_plan(identity: RunningService, codegen: RunningService,
                                                              ledger: RunningService, policy: RunningService,
                                                              devicehub: RunningService, device_stub,
                                                              tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    by_code = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=10_000, codegen=codegen)
    by_card = await add_member(c, identity=identity, ledger=ledger, number="S2", cash_fen=10_000, card_uid="04A1B2C3")
    by_face = await add_member(c, identity=identity, ledger=ledger, number="S3", cash_fen=10_000,
                               face_ref="face-vendor/0003")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        for member, presentation in ((by_code, {"code": by_code.code()}), (by_card, {"card_uid": "04a1b2c3"}),
                                     (by_face, {"face_enrolment_ref": "face-vendor/0003"})):
            key = f"pos-1:{member.member_id}"
            result = await pay(conn, amount_fen=1200, key=key, **presentation)
            assert (result.approved, result.reason, result.member_id) == (True, "APPROVED", member.member_id)
            assert (result.charged_fen, result.repeated) == (1200, False) and result.transfer_id
            assert [(b.purse_kind, b.available_fen) for b in result.balances] == [("cash", 8_800)]
            assert await balance(ledger, tenant_id, member.cash_id) == 8_800
            # The ledger booked it at the device's merchant, with the device and (for a code) the code.
            transfers = await ledger.stub.ListTransfers(lpb.ListTransfersRequest(tenant_id=tenant_id,
                                                                                 account_id=member.cash_id))
            payment = [t for t in transfers.transfers if t.kind == lpb.TRANSFER_KIND_PAYMENT]
            assert [t.transfer_id for t in payment] == [result.transfer_id]
            assert payment[0].merchant_account_id == c.merchant_id and payment[0].device_id == pos.device_id
            assert bool(payment[0].code.credential_id) == ("code" in presentation)
            # A retry of the same request (same key, same code) answers the first payment; nothing moves.
            again = await pay(conn, amount_fen=1200, key=key, **presentation)
            assert (again.approved, again.repeated, again.transfer_id) == (True, True, result.transfer_id)
            assert await balance(ledger, tenant_id, member.cash_id) == 8_800
        assert await balance(ledger, tenant_id, c.merchant_id) == 3 * 1200
    finally:
        await conn.close()


async def test_dinner_is_paid_from_the_voucher_first(identity, codegen, ledger, policy, devicehub, device_stub,
                                                    tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=10_000, codegen=codegen)
    from tests.devicehub.tx_support import open_account, top_up

    funding = await open_account(ledger, tenant_id, owner_kind=lpb.OWNER_KIND_TENANT, owner_id="school",
                                 purse_kind=lpb.PURSE_KIND_SUBSIDY_FUNDING, ref="dinner-voucher")
    voucher = await open_account(ledger, tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member.member_id,
                                 purse_kind=lpb.PURSE_KIND_VOUCHER, ref="dinner-voucher")
    await top_up(ledger, tenant_id, from_id=funding, to_id=voucher, amount_fen=1_500)
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        result = await pay(conn, amount_fen=2000, at=DINNER, code=member.code())
        assert result.approved and result.charged_fen == 2000
        assert sorted((b.purse_kind, b.ref, b.available_fen) for b in result.balances) == [
            ("cash", "", 9_500), ("voucher", "dinner-voucher", 0)]
    finally:
        await conn.close()


async def test_refusals_are_answers(identity, codegen, ledger, policy, devicehub, device_stub,
                                    tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=500, codegen=codegen,
                              card_uid="CAFE0001")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        code = member.code()
        short = await pay(conn, amount_fen=1200, code=code)
        assert (short.approved, short.reason, short.member_id) == (False, "INSUFFICIENT_FUNDS", member.member_id)
        # The same code under another key is a replay.
        assert (await pay(conn, amount_fen=100, code=code)).reason == "CODE_REPLAYED"
        assert (await pay(conn, amount_fen=100, code="OC1:nonsense")).reason == "CODE_MALFORMED"
        assert (await pay(conn, amount_fen=100, code=member.code(purpose=codes.Purpose.ACCESS))).reason \
            == "CODE_WRONG_PURPOSE"
        assert (await pay(conn, amount_fen=100, card_uid="DEADBEEF")).reason == "UNKNOWN_CARD"
        assert (await pay(conn, amount_fen=100, face_enrolment_ref="nobody")).reason == "UNKNOWN_FACE"
        assert (await pay(conn, amount_fen=100, at=LUNCH.replace(hour=15), card_uid="CAFE0001")).reason \
            == "OUTSIDE_MEAL_PERIOD"
        await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member.member_id,
                                                                     card_uid="CAFE0001"))

        async def lost() -> bool:
            # More than the purse holds: a stale cache (before identity's event) cannot pay it.
            answer = await pay(conn, amount_fen=1200, card_uid="CAFE0001")
            return answer.reason == "CARD_LOST" and answer.member_id == member.member_id

        await eventually(lost)
        # A code made by another tenant's issuer is not this tenant's.
        other = await add_member(c, identity=identity, ledger=ledger, number="S2", codegen=codegen)
        other_tenant = (await identity.stub.CreateTenant(ipb.CreateTenantRequest(
            name="Other", kind=ipb.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai", currency="CNY"))).tenant.tenant_id
        foreign_pos = await device(devicehub, device_stub, other_tenant, merchant_id=str(uuid.uuid4()))
        foreign = await online(device_stub, foreign_pos)
        try:
            assert (await pay(foreign, amount_fen=100, code=other.code())).reason in ("CODE_UNKNOWN_KEY",
                                                                                      "CODE_WRONG_TENANT")
        finally:
            await foreign.close()
        assert await balance(ledger, tenant_id, member.cash_id) == 500
    finally:
        await conn.close()


async def test_a_frozen_members_code_is_refused_online(identity, codegen, ledger, policy, devicehub, device_stub,
                                                       tenant_id: str) -> None:  # noqa: ANN001
    # Open all day with no count of meals, and 1 fen a probe: until the freeze arrives every probe
    # pays, and on a busy machine that can be many; no limit may refuse them first.
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=10_000, codegen=codegen)
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        assert (await pay(conn, amount_fen=100, code=member.code())).approved
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member.member_id,
                                                                 reason="card audit"))

        async def refused() -> str:
            answer = await pay(conn, amount_fen=1, code=member.code())
            return "" if answer.approved else answer.reason

        # The member cache drops the member on identity's event; codegen revokes its credentials too.
        assert await eventually(refused, timeout=5.0) in ("MEMBER_FROZEN", "CODE_REVOKED")
        # From then on every code is refused and nothing moves.
        after = await balance(ledger, tenant_id, member.cash_id)
        for _ in range(3):
            assert await refused() in ("MEMBER_FROZEN", "CODE_REVOKED")
        assert await balance(ledger, tenant_id, member.cash_id) == after
    finally:
        await conn.close()


async def test_concurrent_payments_answer_out_of_order_by_request_id(identity, codegen, ledger, policy, devicehub,
                                                                    device_stub, campus_clock,  # noqa: ANN001
                                                                    tenant_id: str) -> None:
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    members = [await add_member(c, identity=identity, ledger=ledger, number=f"S{i}", cash_fen=10_000,
                                codegen=codegen) for i in range(5)]
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        # All sent before any answer is read: the hub works on them together. Lunch at the hub.
        campus_clock.set(LUNCH)
        for i, m in enumerate(members):
            await conn.send(authorize=pb.Authorize(
                request_id=f"r{i}", presentation=pb.Presentation(code=m.code()), purpose=pb.PURPOSE_PAY,
                amount_fen=300 + i, idempotency_key=f"k{i}", device_time=stamp(LUNCH)))
        results = {}
        while len(results) < len(members):
            message = await conn.recv_until(lambda m: m.WhichOneof("body") == "authorize_result")
            results[message.authorize_result.request_id] = message.authorize_result
        assert sorted((r.request_id, r.approved, r.charged_fen) for r in results.values()) == [
            (f"r{i}", True, 300 + i) for i in range(5)]
    finally:
        await conn.close()


async def test_a_rotated_issuer_key_and_a_revoked_credential_reach_the_hub(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    from onecard.codegen.v1 import codegen_pb2 as cpb
    from tests.devicehub.tx_support import issue_credential

    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=10_000, codegen=codegen)
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    try:
        assert (await pay(conn, amount_fen=100, code=member.code())).approved  # the hub now holds the trust list
        await codegen.stub.RotateIssuerKey(cpb.RotateIssuerKeyRequest(tenant_id=tenant_id))
        await issue_credential(codegen, tenant_id, member)  # signed by the new key
        assert (await pay(conn, amount_fen=100, code=member.code())).approved
        await codegen.stub.RevokeCredential(cpb.RevokeCredentialRequest(tenant_id=tenant_id,
                                                                        credential_id=member.credential_id))

        async def revoked() -> bool:
            # More than the purse holds, so a code accepted before the event cannot pay.
            return (await pay(conn, amount_fen=50_000, code=member.code())).reason == "CODE_REVOKED"

        await eventually(revoked, timeout=5.0)
    finally:
        await conn.close()


async def test_the_member_cache_shares_calls_expires_and_forgets_on_events() -> None:
    import asyncio

    import grpc

    from services.devicehub.members import Members

    now = [0.0]
    calls: list[str] = []
    release = asyncio.Event()

    class FakeIdentity:
        async def GetMember(self, request: ipb.GetMemberRequest, timeout: float) -> ipb.GetMemberResponse:  # noqa: N802
            calls.append(request.member_id)
            await release.wait()
            return ipb.GetMemberResponse(member=ipb.Member(tenant_id=request.tenant_id, member_id=request.member_id,
                                                           status=ipb.MEMBER_STATUS_ACTIVE, groups={"role": "x"}))

    members = Members(grpc.aio.insecure_channel("127.0.0.1:1"), timeout_s=1, ttl_s=30, clock=lambda: now[0])
    members._stub = FakeIdentity()  # type: ignore[assignment]
    release.set()
    together = await asyncio.gather(*(members.by_id("t", "m1") for _ in range(5)))
    assert calls == ["m1"] and {m.groups["role"] for m in together} == {"x"}
    await members.by_id("t", "m1")
    assert calls == ["m1"]
    members.forget("t", "m1")
    await members.by_id("t", "m1")
    assert calls == ["m1", "m1"]
    now[0] = 31.0
    await members.by_id("t", "m1")
    assert len(calls) == 3
    # An event while a read is out: that read's answer is not kept.
    release.clear()
    pending = asyncio.ensure_future(members.by_id("t", "m2"))
    await asyncio.sleep(0)
    members.forget("t", "m2")
    release.set()
    await pending
    await members.by_id("t", "m2")
    assert calls.count("m2") == 2


async def test_a_till_set_to_yesterdays_lunch_pays_by_the_hubs_clock(identity, codegen, ledger, policy, devicehub,
                                                                     device_stub, tenant_id: str) -> None:  # noqa: ANN001
    """The hub's clock decides: a till whose clock says yesterday's lunch cannot pay in a closed
    canteen, nor escape today's caps by claiming another day."""
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=50_000, codegen=codegen)
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id)
    conn = await online(device_stub, pos)
    yesterday_lunch = stamp(LUNCH - timedelta(days=1))
    try:
        closed = await ask(conn, presentation=pb.Presentation(code=member.code()), purpose=pb.PURPOSE_PAY,
                           amount_fen=1_000, idempotency_key=str(uuid.uuid4()), device_time=yesterday_lunch,
                           hub_time=LUNCH.replace(hour=15))
        assert (closed.approved, closed.reason) == (False, "OUTSIDE_MEAL_PERIOD")
        # Today's daily canteen cap (100.00 CNY) spent at today's lunch...
        for _ in range(2):
            assert (await pay(conn, amount_fen=5_000, code=member.code())).approved
        # ...is today's for a till that says it is yesterday.
        over = await ask(conn, presentation=pb.Presentation(code=member.code()), purpose=pb.PURPOSE_PAY,
                         amount_fen=500, idempotency_key=str(uuid.uuid4()), device_time=yesterday_lunch,
                         hub_time=LUNCH + timedelta(minutes=30))
        assert (over.approved, over.reason) == (False, "LIMIT_EXCEEDED:daily-canteen")
        assert await balance(ledger, tenant_id, member.cash_id) == 50_000 - 10_000
    finally:
        await conn.close()

"""Gates and shuttle readers: access rules set and versioned (an invalid document is refused with
its rule named), online passes decided by them and recorded with method, reason and nonce, and
offline records stored once per nonce."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import grpc
import onecard_codes as codes

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from runtime.grpc_client import error_info
from tests.devicehub.support import eventually, refused
from tests.devicehub.tx_support import (
    SHANGHAI,
    add_member,
    ask,
    campus,
    device,
    online,
    roundtrip,
    signed,
    stamp,
)

RULES = {"time_zone": "Asia/Shanghai", "rules": [
    {"name": "dorm-3-residents", "places": ["dorm-3"], "purposes": ["access"], "groups": {"role": ["student"]},
     "from": "06:00", "to": "23:30"},
    {"name": "night-staff", "places": ["dorm-3"], "purposes": ["access"], "groups": {"role": ["staff"]},
     "from": "22:00", "to": "02:00"},
    {"name": "bus-east", "places": ["bus-east"], "purposes": ["ride"], "from": "06:30", "to": "00:30"},
]}
# 2026-11-26, a Thursday.
MORNING = datetime(2026, 11, 26, 8, 0, tzinfo=SHANGHAI)
LATE = datetime(2026, 11, 26, 23, 45, tzinfo=SHANGHAI)


async def set_rules(devicehub, tenant_id: str, document: dict) -> pb.SetAccessRulesResponse:  # noqa: ANN001
    return await devicehub.stub.SetAccessRules(pb.SetAccessRulesRequest(tenant_id=tenant_id,
                                                                        rules_json=json.dumps(document)))


async def records(devicehub, tenant_id: str, **filters) -> list[pb.AccessRecord]:  # noqa: ANN001, ANN003
    return list((await devicehub.stub.ListAccessRecords(pb.ListAccessRecordsRequest(
        tenant_id=tenant_id, **filters))).records)


async def test_rules_are_versioned_and_an_invalid_document_names_its_rule(devicehub,  # noqa: ANN001
                                                                         tenant_id: str) -> None:
    assert (await devicehub.stub.GetAccessRules(pb.GetAccessRulesRequest(tenant_id=tenant_id))).version == 0
    first = await set_rules(devicehub, tenant_id, RULES)
    assert first.version == 1 and len(first.sha256) == 64
    assert (await set_rules(devicehub, tenant_id, RULES)).version == 1  # the same document: no new version
    bad = json.loads(json.dumps(RULES))
    bad["rules"][1]["to"] = "25:00"
    with pytest_raises() as info:
        await set_rules(devicehub, tenant_id, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value) == ("ACCESS_RULES_INVALID", {"rule": "night-staff"})
    assert await refused(devicehub.stub.SetAccessRules(pb.SetAccessRulesRequest(tenant_id=tenant_id,
                                                                                rules_json="{"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "ACCESS_RULES_INVALID")
    current = await devicehub.stub.GetAccessRules(pb.GetAccessRulesRequest(tenant_id=tenant_id))
    assert (current.version, current.sha256) == (1, first.sha256)
    assert json.loads(current.rules_json) == RULES
    changed = json.loads(json.dumps(RULES))
    changed["rules"][0]["to"] = "23:00"
    assert (await set_rules(devicehub, tenant_id, changed)).version == 2


async def test_a_gate_passes_in_its_window_refuses_outside_and_records_why(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    student = await add_member(c, identity=identity, ledger=ledger, number="S1", codegen=codegen,
                               card_uid="AA000001", face_ref="face/1")
    staff = await add_member(c, identity=identity, ledger=ledger, number="T1", groups={"role": "staff"},
                             card_uid="AA000002")
    await set_rules(devicehub, tenant_id, RULES)
    gate = await device(devicehub, device_stub, tenant_id, kind=pb.DEVICE_KIND_GATE, location="dorm-3", scene_tags=())
    conn = await online(device_stub, gate)

    async def enter(at: datetime, nonce: str, **presentation: str) -> pb.AuthorizeResult:
        return await ask(conn, presentation=pb.Presentation(**presentation), purpose=pb.PURPOSE_ACCESS,
                         device_time=stamp(at), nonce=nonce)

    try:
        by_code = await enter(MORNING, "n1", code=student.code(purpose=codes.Purpose.ACCESS))
        assert (by_code.approved, by_code.reason, by_code.rule, by_code.member_id) == (
            True, "PASS", "dorm-3-residents", student.member_id)
        assert (await enter(MORNING, "n2", card_uid="AA000001")).approved
        assert (await enter(MORNING, "n3", face_enrolment_ref="face/1")).approved
        late = await enter(LATE, "n4", card_uid="AA000001")
        assert (late.approved, late.reason, late.rule) == (False, "OUTSIDE_WINDOW", "")
        assert (await enter(LATE, "n5", card_uid="AA000002")).rule == "night-staff"
        assert (await enter(MORNING, "n6", card_uid="AA000002")).reason == "OUTSIDE_WINDOW"
        assert (await enter(MORNING, "n7", card_uid="FFFF0000")).reason == "UNKNOWN_CARD"
        # A pass code is not a payment code, and a payment code does not open a door.
        assert (await enter(MORNING, "n8", code=student.code(purpose=codes.Purpose.PAY))).reason \
            == "CODE_WRONG_PURPOSE"
        # A retry of the same nonce answers the first decision (and records nothing new).
        assert (await enter(LATE, "n1", card_uid="AA000002")).reason == "PASS"
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=staff.member_id,
                                                                 reason="x"))

        async def frozen() -> bool:
            answer = await enter(LATE, f"f-{datetime.now().timestamp()}", card_uid="AA000002")
            return answer.reason == "MEMBER_FROZEN"

        await eventually(frozen)
        stored = await records(devicehub, tenant_id, device_id=gate.device_id)
        by_nonce = {r.nonce: r for r in stored}
        assert (by_nonce["n4"].passed, by_nonce["n4"].reason, by_nonce["n4"].method) == (
            False, "OUTSIDE_WINDOW", pb.METHOD_CARD)
        assert (by_nonce["n1"].method, by_nonce["n1"].rule, by_nonce["n1"].offline) == (
            pb.METHOD_CODE, "dorm-3-residents", False)
        assert by_nonce["n3"].method == pb.METHOD_FACE and by_nonce["n7"].member_id == ""
        assert all(r.location == "dorm-3" for r in stored)
        mine = await records(devicehub, tenant_id, member_id=student.member_id)
        # (a refused code names nobody: n8 is recorded without a member)
        assert {r.nonce for r in mine} == {"n1", "n2", "n3", "n4"}
        assert (by_nonce["n8"].passed, by_nonce["n8"].reason, by_nonce["n8"].member_id) == (
            False, "CODE_WRONG_PURPOSE", "")
        # Paged, newest first.
        page = await devicehub.stub.ListAccessRecords(pb.ListAccessRecordsRequest(tenant_id=tenant_id, page_size=3))
        rest = await devicehub.stub.ListAccessRecords(pb.ListAccessRecordsRequest(
            tenant_id=tenant_id, page_size=100, page_token=page.next_page_token))
        assert [r.nonce for r in [*page.records, *rest.records]] == [r.nonce for r in stored]
        window = await records(devicehub, tenant_id, since=stamp(LATE - timedelta(minutes=1)),
                               until=stamp(LATE + timedelta(minutes=1)))
        assert {"n4", "n5"} <= {r.nonce for r in window} and "n2" not in {r.nonce for r in window}
    finally:
        await conn.close()


async def test_no_rules_is_no_rule_and_offline_records_are_stored_once_per_nonce(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    rider = await add_member(c, identity=identity, ledger=ledger, number="S1", card_uid="BB000001")
    reader = await device(devicehub, device_stub, tenant_id, kind=pb.DEVICE_KIND_SHUTTLE, location="bus-east",
                          scene_tags=())
    conn = await online(device_stub, reader)
    try:
        ride = {"presentation": pb.Presentation(card_uid="BB000001"), "purpose": pb.PURPOSE_RIDE,
                "device_time": stamp(MORNING)}
        assert (await ask(conn, nonce="r1", **ride)).reason == "NO_RULE"
        await set_rules(devicehub, tenant_id, RULES)

        async def passes() -> bool:
            return (await ask(conn, nonce=f"r-{datetime.now().timestamp()}", **ride)).rule == "bus-east"

        await eventually(passes)
        offline = [signed(reader, pb.OfflineRecord(
            sequence=i, event_time=stamp(MORNING + timedelta(minutes=i)), purpose=pb.PURPOSE_RIDE,
            method=pb.METHOD_CARD, card_uid="BB000001", passed=True, reason="PASS", nonce=f"off-{i}"))
            for i in (1, 2, 3)]
        again = signed(reader, pb.OfflineRecord(
            sequence=4, event_time=stamp(MORNING), purpose=pb.PURPOSE_RIDE, method=pb.METHOD_CARD,
            card_uid="BB000001", passed=True, reason="PASS", nonce="off-1"))
        result = await roundtrip(conn, "u1", "upload_result", pb.ConnectRequest(upload=pb.Upload(
            upload_id="u1", records=[*offline, again])))
        assert [(r.outcome, r.reason) for r in result.results] == [
            (pb.RECORD_OUTCOME_BOOKED, "")] * 3 + [(pb.RECORD_OUTCOME_DUPLICATE, "NONCE_SEEN")]
        stored = {r.nonce: r for r in await records(devicehub, tenant_id, device_id=reader.device_id)}
        assert {"off-1", "off-2", "off-3"} <= set(stored)
        assert (stored["off-1"].offline, stored["off-1"].member_id, stored["off-1"].method) == (
            True, rider.member_id, pb.METHOD_CARD)
    finally:
        await conn.close()


def pytest_raises():  # noqa: ANN201
    import pytest

    return pytest.raises(grpc.aio.AioRpcError)

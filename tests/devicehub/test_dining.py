"""The dining index: payments served per canteen (online and offline, by event time) in the
window, against the capacity of the location's POS devices, with how many are online."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import grpc

from onecard.devicehub.v1 import devicehub_pb2 as pb
from tests.devicehub.support import eventually, refused
from tests.devicehub.tx_support import (
    add_member,
    campus,
    device,
    online,
    pay,
    payment_record,
    roundtrip,
)


async def index(devicehub, tenant_id: str, window_s: int = 0) -> dict[str, tuple[int, int, float, int]]:  # noqa: ANN001
    answer = await devicehub.stub.GetDiningIndex(pb.GetDiningIndexRequest(tenant_id=tenant_id, window_s=window_s))
    assert answer.window_s == (window_s or 900) and answer.HasField("as_of")
    return {loc.location: (loc.served, loc.capacity, round(loc.load, 4), loc.devices_online)
            for loc in answer.locations}


async def test_served_per_canteen_against_capacity(identity, codegen, ledger, policy, devicehub, device_stub,
                                                   tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", codegen=codegen, card_uid="DA000001")
    north_1 = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id, capacity=100)
    north_2 = await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id, capacity=50)
    await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id, location="south-canteen", capacity=80)
    await device(devicehub, device_stub, tenant_id, merchant_id=c.merchant_id, location="campus-store",
                 scene_tags=("store",), capacity=30)
    await device(devicehub, device_stub, tenant_id, kind=pb.DEVICE_KIND_GATE, location="dorm-3", scene_tags=())
    assert await index(devicehub, tenant_id) == {"north-canteen": (0, 150, 0.0, 0), "south-canteen": (0, 80, 0.0, 0)}

    conn_1 = await online(device_stub, north_1)
    conn_2 = await online(device_stub, north_2)
    try:
        # An offline record, then (a few seconds later, since settlement believes no record dated
        # before the card was bound or the device's hello) three payments online and two offline.
        old = payment_record(north_2, sequence=1, member=member, amount_fen=300, by_card=True)
        await asyncio.sleep(4)
        for _ in range(3):
            assert (await pay(conn_1, amount_fen=200, code=member.code())).approved
        records = [old, *(payment_record(north_2, sequence=i, member=member, amount_fen=300, by_card=True)
                          for i in (2, 3))]
        upload_id = str(uuid.uuid4())
        result = await roundtrip(conn_2, upload_id, "upload_result",
                                 pb.ConnectRequest(upload=pb.Upload(upload_id=upload_id, records=records)))
        assert {(r.outcome, r.reason) for r in result.results} == {(pb.RECORD_OUTCOME_BOOKED, "")}

        async def counted() -> dict:
            found = await index(devicehub, tenant_id, window_s=7200)
            return found if found["north-canteen"][3] == 2 and found["north-canteen"][0] == 6 else {}

        # By event time: a window that starts after the old record counts the five others.
        assert (await eventually(counted))["south-canteen"] == (0, 80, 0.0, 0)
        window_s = int((datetime.now(UTC) - old.event_time.ToDatetime(tzinfo=UTC)).total_seconds()) - 1
        found = await index(devicehub, tenant_id, window_s=window_s)
        assert found == {"north-canteen": (5, 150, round(5 / 150, 4), 2), "south-canteen": (0, 80, 0.0, 0)}
        # A re-upload counts nothing twice.
        await roundtrip(conn_2, "again", "upload_result",
                        pb.ConnectRequest(upload=pb.Upload(upload_id="again", records=records)))
        assert (await index(devicehub, tenant_id, window_s=7200))["north-canteen"][0] == 6
    finally:
        await conn_1.close()
        await conn_2.close()
    assert await refused(devicehub.stub.GetDiningIndex(pb.GetDiningIndexRequest(
        tenant_id=tenant_id, window_s=90_000))) == (grpc.StatusCode.INVALID_ARGUMENT, "WINDOW_INVALID")

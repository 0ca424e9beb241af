"""The device hub through the gateway (scopes devices:admin and data:read), against the real identity,
codegen, ledger, policy and device hub: the registry (register, list, read, update, decommission,
enrolment tokens shown once), alarms (list, acknowledge, clear), access rules and records,
rollouts (idempotent by key), and the dining index (JSON and CSV)."""
from __future__ import annotations

import asyncio
import csv
import json
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import nacl.signing
import pytest

from devstack.servers import free_port
from gateway.auth import DATA_READ, DEVICES_ADMIN
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem, gateway_settings, running_gateway

MERCHANT = str(uuid.uuid4())
POS = {"kind": "pos", "model": "HX-P300", "name": "North Canteen POS 1", "location": "north-canteen",
       "scene_tags": ["canteen"], "merchant_account_id": MERCHANT, "firmware_version": "2.4.1", "capacity": 120,
       "config": {"offline": {"max_records": 5000}}}
GATE = {"kind": "gate", "model": "G-7", "name": "Dorm 3 gate", "location": "dorm-3"}
ACCESS_RULES = {"time_zone": "Asia/Shanghai", "rules": [
    {"name": "dorm-3-residents", "places": ["dorm-3"], "purposes": ["access"], "groups": {"dorm": ["3"]},
     "from": "06:00", "to": "23:30"},
    {"name": "library-day", "places": ["library"], "purposes": ["access"], "weekdays": [1, 2, 3, 4, 5],
     "from": "08:00", "to": "22:00", "offline": True}]}


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def _enrol_stub(gateway: Gateway) -> devicehub_pb2_grpc.DeviceServiceStub:
    return devicehub_pb2_grpc.DeviceServiceStub(gateway.devicehub.device_channel)  # type: ignore[attr-defined]


async def _register(gateway: Gateway, access: TenantAccess, body: dict[str, Any]) -> dict[str, Any]:
    response = await gateway.http.post(f"/v1/tenants/{access.tenant_id}/devices", headers=access.headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def _enrol(gateway: Gateway, token: str) -> pb.EnrolResponse:
    key = nacl.signing.SigningKey.generate()
    return await _enrol_stub(gateway).Enrol(pb.EnrolRequest(enrolment_token=token, public_key=bytes(key.verify_key),
                                                            firmware_version="2.4.1"))


async def test_a_device_is_registered_listed_read_updated_and_decommissioned(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    base = f"/v1/tenants/{admin.tenant_id}/devices"

    response = await gateway.http.post(base, headers=admin.headers, json=POS)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    registered = response.json()
    device = registered["device"]
    device_id = device["device_id"]
    assert response.headers["location"] == f"{base}/{device_id}"
    assert uuid.UUID(device_id)
    assert registered["enrolment_token"] and registered["enrolment_token_expires_at"]
    assert device["tenant_id"] == admin.tenant_id
    assert device["kind"] == "pos" and device["status"] == "pending" and device["online"] is False
    assert device["model"] == "HX-P300" and device["name"] == "North Canteen POS 1"
    assert device["location"] == "north-canteen" and device["scene_tags"] == ["canteen"]
    assert device["merchant_account_id"] == MERCHANT and device["parent_device_id"] is None
    assert device["capacity"] == 120 and device["config"] == {"offline": {"max_records": 5000}}
    assert device["key_fingerprint"] is None and device["last_seen_at"] is None
    assert device["flagged"] is False and device["flagged_at"] is None
    first_config_version = device["config_version"]

    gate = (await _register(gateway, admin, GATE))["device"]
    cabinet = (await _register(gateway, admin, {"kind": "cabinet", "model": "VC-2", "name": "Drinks cabinet",
                                                "location": "north-canteen", "parent_device_id": device_id.upper(),
                                                "merchant_account_id": MERCHANT}))["device"]
    assert cabinet["parent_device_id"] == device_id and cabinet["config"] == {}
    assert_problem(await gateway.http.post(base, headers=admin.headers, json={**GATE, "parent_device_id": device_id}),
                   400, reason="PARENT_NOT_ALLOWED")

    # The list: filters and cursor paging.
    listed = await gateway.http.get(base, headers=admin.headers)
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["devices"]) == 3 and listed.json()["next_page_token"] is None
    assert {d["kind"] for d in listed.json()["devices"]} == {"pos", "gate", "cabinet"}
    assert registered["enrolment_token"] not in listed.text
    gates = (await gateway.http.get(base, headers=admin.headers, params={"kind": "gate"})).json()["devices"]
    assert [d["device_id"] for d in gates] == [gate["device_id"]]
    at_canteen = (await gateway.http.get(base, headers=admin.headers,
                                         params={"location": "north-canteen"})).json()["devices"]
    assert {d["device_id"] for d in at_canteen} == {device_id, cabinet["device_id"]}
    pending = await gateway.http.get(base, headers=admin.headers, params={"status": "pending", "online": "false"})
    assert len(pending.json()["devices"]) == 3
    online = await gateway.http.get(base, headers=admin.headers, params={"online": "true"})
    assert online.json()["devices"] == []
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await gateway.http.get(base, headers=admin.headers, params={"page_size": 2, "page_token": token})
        assert page.status_code == 200, page.text
        seen += [d["device_id"] for d in page.json()["devices"]]
        token = page.json()["next_page_token"] or ""
        if not token:
            break
    assert len(seen) == 3 and len(set(seen)) == 3
    assert_problem(await gateway.http.get(base, headers=admin.headers, params={"kind": "toaster"}), 422)
    assert_problem(await gateway.http.get(base, headers=admin.headers, params={"page_size": 10_000}), 422)

    # Read: never the token.
    got = await gateway.http.get(f"{base}/{device_id}", headers=admin.headers)
    assert got.status_code == 200, got.text
    assert got.json() == device
    assert registered["enrolment_token"] not in got.text

    # Update: fields left out keep their value; a new config bumps its version.
    patched = await gateway.http.patch(f"{base}/{device_id}", headers=admin.headers, json={
        "location": "south-canteen", "capacity": 80, "scene_tags": ["canteen", "vending"],
        "config": {"offline": {"max_records": 8000}}})
    assert patched.status_code == 200, patched.text
    after = patched.json()
    assert after["location"] == "south-canteen" and after["capacity"] == 80
    assert after["scene_tags"] == ["canteen", "vending"] and after["config"] == {"offline": {"max_records": 8000}}
    assert after["config_version"] > first_config_version
    assert after["name"] == device["name"] and after["merchant_account_id"] == MERCHANT
    renamed = await gateway.http.patch(f"{base}/{device_id}", headers=admin.headers, json={"name": "POS 1 (south)"})
    assert renamed.json()["name"] == "POS 1 (south)" and renamed.json()["location"] == "south-canteen"
    assert renamed.json()["config_version"] == after["config_version"]
    assert_problem(await gateway.http.patch(f"{base}/{device_id}", headers=admin.headers, json={"colour": "red"}),
                   422)

    # Decommission: for good; a new enrolment token is refused.
    gone = await gateway.http.post(f"{base}/{device_id}/decommission", headers=admin.headers)
    assert gone.status_code == 200, gone.text
    assert gone.json()["status"] == "decommissioned"
    again = await gateway.http.post(f"{base}/{device_id}/decommission", headers=admin.headers)
    assert again.status_code == 200 and again.json()["status"] == "decommissioned"
    assert (await gateway.http.get(f"{base}/{device_id}", headers=admin.headers)).json()["status"] == "decommissioned"
    refused = await gateway.http.post(f"{base}/{device_id}/enrolment-tokens", headers=admin.headers)
    assert_problem(refused, 409, reason="DEVICE_DECOMMISSIONED")
    assert_problem(await gateway.http.patch(f"{base}/{device_id}", headers=admin.headers, json={"name": "back"}),
                   409, reason="DEVICE_DECOMMISSIONED")
    decommissioned = await gateway.http.get(base, headers=admin.headers, params={"status": "decommissioned"})
    assert [d["device_id"] for d in decommissioned.json()["devices"]] == [device_id]


async def test_an_enrolment_token_is_shown_once_and_enrols_once(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    base = f"/v1/tenants/{admin.tenant_id}/devices"
    registered = await _register(gateway, admin, GATE)
    device_id = registered["device"]["device_id"]
    first_token = registered["enrolment_token"]

    # A new token: the first stops working.
    response = await gateway.http.post(f"{base}/{device_id}/enrolment-tokens", headers=admin.headers,
                                       json={"ttl_s": 3600})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    second_token = response.json()["enrolment_token"]
    assert second_token and second_token != first_token and response.json()["expires_at"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _enrol(gateway, first_token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    enrolled = await _enrol(gateway, second_token)
    assert enrolled.device.device_id == device_id
    device = (await gateway.http.get(f"{base}/{device_id}", headers=admin.headers)).json()
    assert device["status"] == "active" and device["key_fingerprint"] and len(device["key_fingerprint"]) == 16
    assert device["firmware_version"] == "2.4.1"
    # One use.
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await _enrol(gateway, second_token)
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Neither the token nor anything like it is shown again.
    listed = await gateway.http.get(base, headers=admin.headers)
    assert first_token not in listed.text and second_token not in listed.text
    # A bad ttl is refused before the hub is asked.
    assert_problem(await gateway.http.post(f"{base}/{device_id}/enrolment-tokens", headers=admin.headers,
                                           json={"ttl_s": -1}), 422)


async def test_device_ids_are_uuids_and_another_tenants_device_is_not_found(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    other = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    base = f"/v1/tenants/{admin.tenant_id}/devices"
    theirs = (await _register(gateway, other, POS))["device"]["device_id"]

    for method, path, body in [("GET", "{}", None), ("PATCH", "{}", {"name": "x"}), ("POST", "{}/decommission", None),
                               ("POST", "{}/enrolment-tokens", None)]:
        response = await gateway.http.request(method, f"{base}/" + path.format(theirs), headers=admin.headers,
                                              json=body)
        assert_problem(response, 404, reason="DEVICE_NOT_FOUND")
        response = await gateway.http.request(method, f"{base}/" + path.format("not-a-uuid"), headers=admin.headers,
                                              json=body)
        body422 = assert_problem(response, 422, reason="VALIDATION_FAILED")
        assert "device_id" in body422["detail"]
    # Theirs is untouched.
    still = await gateway.http.get(f"/v1/tenants/{other.tenant_id}/devices/{theirs}", headers=other.headers)
    assert still.json()["status"] == "pending" and still.json()["name"] == POS["name"]

    # Bodies: bounds and shapes are the gateway's to refuse (422), values the hub's (400).
    for bad in [{**POS, "kind": "toaster"}, {**POS, "merchant_account_id": "canteen-north"},
                {**POS, "name": ""}, {**POS, "name": "x" * 201}, {**POS, "scene_tags": ["t"] * 33},
                {**POS, "capacity": -1}, {**POS, "enrolment_token_ttl_s": 31 * 24 * 3600}, {**POS, "colour": "red"},
                {**POS, "config": [1, 2]}]:
        assert_problem(await gateway.http.post(base, headers=admin.headers, json=bad), 422)
    assert_problem(await gateway.http.post(base, headers=admin.headers, json={**POS, "model": " "}), 400,
                   reason="MODEL_INVALID")
    listed = await gateway.http.get(base, headers=admin.headers)
    assert listed.json()["devices"] == []


async def test_alarms_are_listed_acknowledged_and_cleared(devices_gateway: Gateway) -> None:
    from services.devicehub.alarms import Alarms

    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    other = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    base = f"/v1/tenants/{admin.tenant_id}/alarms"
    pos = (await _register(gateway, admin, POS))["device"]["device_id"]
    gate = (await _register(gateway, admin, GATE))["device"]["device_id"]
    alarms = Alarms(gateway.devicehub.app.pool)  # type: ignore[attr-defined]
    for _ in range(2):
        await alarms.raise_alarm(tenant_id=admin.tenant_id, device_id=pos, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                                 severity=pb.ALARM_SEVERITY_WARNING, detail="sequences 17-19 never arrived")
    await alarms.raise_alarm(tenant_id=admin.tenant_id, device_id=gate, kind=pb.ALARM_KIND_CLOCK_DRIFT,
                             severity=pb.ALARM_SEVERITY_INFO, detail="clock 45 s ahead")

    listed = await gateway.http.get(base, headers=admin.headers)
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["alarms"]) == 2 and listed.json()["next_page_token"] is None
    gap = (await gateway.http.get(base, headers=admin.headers, params={"kind": "sequence_gap"})).json()["alarms"]
    assert len(gap) == 1
    alarm = gap[0]
    assert alarm["device_id"] == pos and alarm["kind"] == "sequence_gap" and alarm["severity"] == "warning"
    assert alarm["state"] == "open" and alarm["count"] == 2 and alarm["detail"] == "sequences 17-19 never arrived"
    assert alarm["opened_at"] and alarm["last_raised_at"] and alarm["acknowledged_at"] is None
    by_device = (await gateway.http.get(base, headers=admin.headers, params={"device": gate})).json()["alarms"]
    assert [a["kind"] for a in by_device] == ["clock_drift"]
    first = await gateway.http.get(base, headers=admin.headers, params={"page_size": 1})
    assert len(first.json()["alarms"]) == 1 and first.json()["next_page_token"]
    second = await gateway.http.get(base, headers=admin.headers,
                                    params={"page_size": 1, "page_token": first.json()["next_page_token"]})
    assert {a["alarm_id"] for a in first.json()["alarms"] + second.json()["alarms"]} == {
        a["alarm_id"] for a in listed.json()["alarms"]}

    # Acknowledge, then clear; the caller is who did it.
    acked = await gateway.http.post(f"{base}/{alarm['alarm_id']}/acknowledge", headers=admin.headers)
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "acknowledged" and acked.json()["acknowledged_by"] == admin.credentials.client_id
    assert acked.json()["acknowledged_at"]
    still_listed = (await gateway.http.get(base, headers=admin.headers, params={"kind": "sequence_gap"})).json()
    assert [a["state"] for a in still_listed["alarms"]] == ["acknowledged"]
    acknowledged = (await gateway.http.get(base, headers=admin.headers, params={"state": "acknowledged"})).json()
    assert [a["alarm_id"] for a in acknowledged["alarms"]] == [alarm["alarm_id"]]

    # Another tenant cannot touch it; bad ids are 422.
    foreign = f"/v1/tenants/{other.tenant_id}/alarms/{alarm['alarm_id']}"
    assert_problem(await gateway.http.post(f"{foreign}/clear", headers=other.headers), 404, reason="ALARM_NOT_FOUND")
    assert_problem(await gateway.http.post(f"{foreign}/acknowledge", headers=other.headers), 404,
                   reason="ALARM_NOT_FOUND")
    assert (await gateway.http.get(f"/v1/tenants/{other.tenant_id}/alarms", headers=other.headers)).json()[
        "alarms"] == []
    assert_problem(await gateway.http.post(f"{base}/{uuid.uuid4()}/clear", headers=admin.headers), 404,
                   reason="ALARM_NOT_FOUND")
    assert_problem(await gateway.http.post(f"{base}/42/clear", headers=admin.headers), 422)
    assert_problem(await gateway.http.get(base, headers=admin.headers, params={"device": "pos-3"}), 422)
    assert_problem(await gateway.http.get(base, headers=admin.headers, params={"state": "closed"}), 422)

    cleared = await gateway.http.post(f"{base}/{alarm['alarm_id']}/clear", headers=admin.headers)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["state"] == "cleared" and cleared.json()["cleared_by"] == admin.credentials.client_id
    assert cleared.json()["acknowledged_by"] == admin.credentials.client_id
    open_now = (await gateway.http.get(base, headers=admin.headers)).json()["alarms"]
    assert [a["kind"] for a in open_now] == ["clock_drift"]
    history = (await gateway.http.get(base, headers=admin.headers, params={"state": "cleared"})).json()["alarms"]
    assert [a["alarm_id"] for a in history] == [alarm["alarm_id"]]
    # A cleared alarm is not acknowledged again; the next occurrence opens a new one.
    assert_problem(await gateway.http.post(f"{base}/{alarm['alarm_id']}/acknowledge", headers=admin.headers), 409,
                   reason="ALARM_CLEARED")
    await alarms.raise_alarm(tenant_id=admin.tenant_id, device_id=pos, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                             severity=pb.ALARM_SEVERITY_WARNING, detail="sequence 30 never arrived")
    reopened = (await gateway.http.get(base, headers=admin.headers, params={"kind": "sequence_gap"})).json()["alarms"]
    assert len(reopened) == 1 and reopened[0]["alarm_id"] != alarm["alarm_id"] and reopened[0]["count"] == 1


async def test_access_rules_are_set_and_read_and_a_refused_rule_is_named(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    url = f"/v1/tenants/{admin.tenant_id}/access-rules"

    none = await gateway.http.get(url, headers=admin.headers)
    assert none.status_code == 200, none.text
    assert none.json() == {"version": 0, "sha256": None, "rules": None}

    stored = await gateway.http.put(url, headers=admin.headers, json=ACCESS_RULES)
    assert stored.status_code == 200, stored.text
    assert stored.json()["version"] >= 1 and len(stored.json()["sha256"]) == 64
    got = (await gateway.http.get(url, headers=admin.headers)).json()
    assert got["version"] == stored.json()["version"] and got["sha256"] == stored.json()["sha256"]
    assert got["rules"] == ACCESS_RULES

    invalid = {**ACCESS_RULES, "rules": [*ACCESS_RULES["rules"], {
        "name": "broken-window", "places": ["gym"], "purposes": ["access"], "from": "25:00", "to": "26:00"}]}
    refused = await gateway.http.put(url, headers=admin.headers, json=invalid)
    body = assert_problem(refused, 400, reason="ACCESS_RULES_INVALID")
    assert body["rule"] == "broken-window" and body["detail"]
    assert (await gateway.http.get(url, headers=admin.headers)).json() == got
    # Not a JSON object: the gateway's 422.
    assert_problem(await gateway.http.put(url, headers=admin.headers, json=[1, 2]), 422)
    assert_problem(await gateway.http.put(url, headers={**admin.headers, "Content-Type": "application/json"},
                                          content=b"{"), 422)

    # Another tenant sees none of it.
    other = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    theirs = await gateway.http.get(f"/v1/tenants/{other.tenant_id}/access-rules", headers=other.headers)
    assert theirs.json()["version"] == 0


async def test_access_records_are_listed_with_filters(devices_gateway: Gateway) -> None:
    from services.devicehub.tx_store import AccessRow, TxStore

    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    url = f"/v1/tenants/{admin.tenant_id}/access-records"
    gate = (await _register(gateway, admin, GATE))["device"]["device_id"]
    reader = (await _register(gateway, admin, {**GATE, "kind": "shuttle", "name": "Bus east", "location": "bus-east"}
                              ))["device"]["device_id"]
    member, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    day = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
    store = TxStore(gateway.devicehub.app.pool)  # type: ignore[attr-defined]
    tenant = uuid.UUID(admin.tenant_id)
    for i, (device, location, who, method, passed, reason, rule, offline, hours) in enumerate([
            (gate, "dorm-3", member, "card", True, "PASS", "dorm-3-residents", False, 0),
            (gate, "dorm-3", stranger, "code", False, "GROUP_NOT_ALLOWED", "", False, 1),
            (gate, "dorm-3", member, "face", False, "OUTSIDE_WINDOW", "", True, 20),
            (reader, "bus-east", member, "code", True, "PASS", "shuttle-east", False, 2),
            (gate, "dorm-3", "", "card", False, "UNKNOWN_CARD", "", False, 3)]):
        await store.record_access(AccessRow(
            tenant_id=tenant, device_id=uuid.UUID(device), nonce=f"n-{i}", member_id=who, location=location,
            method=method, purpose="ride" if location == "bus-east" else "access", passed=passed, reason=reason,
            rule=rule, offline=offline, event_time=day + timedelta(hours=hours)), now=datetime.now(UTC))

    everything = await gateway.http.get(url, headers=admin.headers)
    assert everything.status_code == 200, everything.text
    records = everything.json()["records"]
    assert len(records) == 5 and everything.json()["next_page_token"] is None
    first = next(r for r in records if r["nonce"] == "n-0")
    assert first == {"tenant_id": admin.tenant_id, "device_id": gate, "member_id": member, "location": "dorm-3",
                     "method": "card", "passed": True, "reason": "PASS", "nonce": "n-0",
                     "event_time": "2026-11-26T06:00:00Z", "offline": False, "rule": "dorm-3-residents"}
    unknown = next(r for r in records if r["nonce"] == "n-4")
    assert unknown["member_id"] is None and unknown["rule"] is None and unknown["reason"] == "UNKNOWN_CARD"
    assert next(r for r in records if r["nonce"] == "n-2")["offline"] is True

    async def nonces(**params: Any) -> set[str]:
        response = await gateway.http.get(url, headers=admin.headers, params=params)
        assert response.status_code == 200, response.text
        return {r["nonce"] for r in response.json()["records"]}

    assert await nonces(device=reader) == {"n-3"}
    assert await nonces(member=member) == {"n-0", "n-2", "n-3"}
    assert await nonces(location="dorm-3", member=member) == {"n-0", "n-2"}
    # Attendance at dorm 3 on the morning of the 26th (Shanghai time): since inclusive, until exclusive.
    assert await nonces(location="dorm-3", since="2026-11-26T14:00:00+08:00",
                        until="2026-11-26T17:00:00+08:00") == {"n-0", "n-1"}
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await gateway.http.get(url, headers=admin.headers, params={"page_size": 2, "page_token": token})
        seen += [r["nonce"] for r in page.json()["records"]]
        token = page.json()["next_page_token"] or ""
        if not token:
            break
    assert sorted(seen) == [f"n-{i}" for i in range(5)]

    assert_problem(await gateway.http.get(url, headers=admin.headers, params={"since": "2026-11-26T00:00:00"}), 422)
    assert_problem(await gateway.http.get(url, headers=admin.headers, params={"member": "S001"}), 422)
    assert_problem(await gateway.http.get(url, headers=admin.headers, params={"page_size": 0}), 422)
    other = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    theirs = await gateway.http.get(f"/v1/tenants/{other.tenant_id}/access-records", headers=other.headers,
                                    params={"device": gate})
    assert theirs.status_code == 200 and theirs.json()["records"] == []


async def test_a_rollout_is_created_once_per_key_and_read(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    base = f"/v1/tenants/{admin.tenant_id}/rollouts"
    pos_ids = []
    for i in range(2):
        registered = await _register(gateway, admin, {**POS, "name": f"POS {i}"})
        await _enrol(gateway, registered["enrolment_token"])
        pos_ids.append(registered["device"]["device_id"])
    await _register(gateway, admin, GATE)  # pending: in no group
    body = {"target": "firmware", "version": "2.5.0", "kind": "pos", "model": "HX-P300", "stage_sizes": [1, 5],
            "success_threshold": 1.0, "error_threshold": 1}
    key = _key()

    created = await gateway.http.post(base, headers={**admin.headers, **key}, json=body)
    assert created.status_code == 201, created.text
    rollout = created.json()["rollout"]
    assert created.json()["created"] is True
    assert created.headers["location"] == f"{base}/{rollout['rollout_id']}"
    assert rollout["target"] == "firmware" and rollout["version"] == "2.5.0" and rollout["kind"] == "pos"
    assert rollout["model"] == "HX-P300" and rollout["stage_sizes"] == [1, 5] and rollout["error_threshold"] == 1
    assert rollout["state"] in ("running", "succeeded", "stopped") and rollout["config"] is None
    assert rollout["state"] == "running" and rollout["current_stage"] == 0
    # Stage 0 (one device) is told; stage 1 waits for it.
    assert sorted((d["stage"], d["step"]) for d in rollout["devices"]) == [(0, "pending"), (1, "waiting")]
    assert {d["device_id"] for d in rollout["devices"]} == set(pos_ids)

    again = await gateway.http.post(base, headers={**admin.headers, **key}, json=body)
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False and again.json()["rollout"]["rollout_id"] == rollout["rollout_id"]
    reused = await gateway.http.post(base, headers={**admin.headers, **key}, json={**body, "version": "9.9.9"})
    assert_problem(reused, 409, reason="IDEMPOTENCY_KEY_REUSED")
    empty = await gateway.http.post(base, headers={**admin.headers, **_key()}, json={**body, "kind": "gate"})
    assert_problem(empty, 409, reason="ROLLOUT_GROUP_EMPTY")
    assert_problem(await gateway.http.post(base, headers=admin.headers, json=body), 400,
                   reason="IDEMPOTENCY_KEY_REQUIRED")
    for bad in [{**body, "stage_sizes": []}, {**body, "success_threshold": 0}, {**body, "error_threshold": 0},
                {**body, "target": "bios"}, {**body, "kind": "toaster"}]:
        assert_problem(await gateway.http.post(base, headers={**admin.headers, **_key()}, json=bad), 422)

    config_rollout = await gateway.http.post(base, headers={**admin.headers, **_key()}, json={
        "target": "config", "config": {"display": {"brightness": 70}}, "kind": "pos", "stage_sizes": [2],
        "success_threshold": 0.5, "error_threshold": 1})
    assert config_rollout.status_code == 201, config_rollout.text
    assert config_rollout.json()["rollout"]["config"] == {"display": {"brightness": 70}}
    assert config_rollout.json()["rollout"]["target"] == "config"
    assert config_rollout.json()["rollout"]["version"] is None
    assert_problem(await gateway.http.post(base, headers={**admin.headers, **_key()}, json={**body, "version": ""}),
                   400, reason="VERSION_INVALID")

    got = await gateway.http.get(f"{base}/{rollout['rollout_id']}", headers=admin.headers)
    assert got.status_code == 200, got.text
    assert got.json() == rollout
    listed = await gateway.http.get(base, headers=admin.headers, params={"page_size": 1})
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["rollouts"]) == 1 and listed.json()["next_page_token"]
    rest = await gateway.http.get(base, headers=admin.headers,
                                  params={"page_size": 1, "page_token": listed.json()["next_page_token"]})
    # Newest first, without their devices.
    assert [r["rollout_id"] for r in listed.json()["rollouts"] + rest.json()["rollouts"]] == [
        config_rollout.json()["rollout"]["rollout_id"], rollout["rollout_id"]]
    assert rest.json()["rollouts"][0]["devices"] == [] and rest.json()["next_page_token"] is None
    assert_problem(await gateway.http.get(base, headers=admin.headers, params={"page_size": 101}), 422)

    other = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    assert_problem(await gateway.http.get(f"/v1/tenants/{other.tenant_id}/rollouts/{rollout['rollout_id']}",
                                          headers=other.headers), 404, reason="ROLLOUT_NOT_FOUND")
    assert_problem(await gateway.http.get(f"{base}/rollout-1", headers=admin.headers), 422)


async def test_a_location_an_admin_typed_as_a_formula_comes_back_inert_in_the_dining_csv(
        devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    data = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=(DATA_READ,))
    hostile = "=cmd|'/C calc'!A0"
    registered = await _register(gateway, admin, {**POS, "location": hostile, "capacity": 10})
    await _enrol(gateway, registered["enrolment_token"])

    as_csv = await gateway.http.get(f"/v1/tenants/{admin.tenant_id}/dining-index", headers=data.headers,
                                    params={"format": "csv"})
    assert as_csv.status_code == 200, as_csv.text
    (row,) = list(csv.reader(io.StringIO(as_csv.text)))[1:]
    assert row[2] == "'" + hostile
    # Counts and the load are numbers: unquoted in the file.
    assert as_csv.text.splitlines()[1].endswith(",0,10,0.0000,0")


async def test_the_dining_index_per_canteen_as_json_and_csv(devices_gateway: Gateway) -> None:
    from services.devicehub.tx_store import ServedRow, TxStore

    gateway = devices_gateway
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN,))
    data = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=(DATA_READ,))
    url = f"/v1/tenants/{admin.tenant_id}/dining-index"
    # Two enrolled canteen POS at the north canteen, one at the south without a capacity, one not
    # enrolled yet (not counted), a gym POS and a gate (not canteens).
    devices: dict[str, str] = {}
    for name, body, enrol in [("N1", {"location": "north-canteen", "capacity": 120}, True),
                              ("N2", {"location": "north-canteen", "capacity": 80}, True),
                              ("S1", {"location": "south-canteen", "capacity": 0}, True),
                              ("S2", {"location": "south-canteen", "capacity": 50}, False),
                              ("G1", {"location": "gym", "scene_tags": ["gym"]}, True)]:
        registered = await _register(gateway, admin, {**POS, "name": name, **body})
        devices[name] = registered["device"]["device_id"]
        if enrol:
            await _enrol(gateway, registered["enrolment_token"])
    await _enrol(gateway, (await _register(gateway, admin, GATE))["enrolment_token"])
    # Payments served: three at the north canteen now, one there two hours ago, one at the south.
    now = datetime.now(UTC)
    tenant = uuid.UUID(admin.tenant_id)
    served = [(devices["N1"], "north-canteen", now - timedelta(minutes=1)),
              (devices["N2"], "north-canteen", now - timedelta(minutes=5)),
              (devices["N1"], "north-canteen", now - timedelta(minutes=14)),
              (devices["N1"], "north-canteen", now - timedelta(hours=2)),
              (devices["S1"], "south-canteen", now - timedelta(minutes=3))]
    await TxStore(gateway.devicehub.app.pool).insert_served([  # type: ignore[attr-defined]
        ServedRow(tenant_id=tenant, transfer_id=str(uuid.uuid4()), location=location, device_id=uuid.UUID(device),
                  event_time=at) for device, location, at in served])

    # The gateway is ready with the hub behind it.
    deadline = asyncio.get_running_loop().time() + 10
    while (ready := await gateway.http.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, ready.text
        await asyncio.sleep(0.05)

    # data:read, not devices:admin.
    assert_problem(await gateway.http.get(url, headers=admin.headers), 403, reason="INSUFFICIENT_SCOPE")
    response = await gateway.http.get(url, headers=data.headers)
    assert response.status_code == 200, response.text
    index = response.json()
    assert index["window_s"] == 900 and index["as_of"]
    assert index["locations"] == [
        {"location": "north-canteen", "served": 3, "capacity": 200, "load": 0.015, "devices_online": 0},
        {"location": "south-canteen", "served": 1, "capacity": 0, "load": 0.0, "devices_online": 0},
    ]
    three_hours = (await gateway.http.get(url, headers=data.headers, params={"window_s": 3 * 3600})).json()
    assert three_hours["window_s"] == 3 * 3600 and three_hours["locations"][0]["served"] == 4

    as_csv = await gateway.http.get(url, headers=data.headers, params={"format": "csv"})
    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert rows[0] == ["as_of", "window_s", "location", "served", "capacity", "load", "devices_online"]
    assert [row[1:] for row in rows[1:]] == [["900", "north-canteen", "3", "200", "0.0150", "0"],
                                             ["900", "south-canteen", "1", "0", "0.0000", "0"]]
    assert rows[1][0].endswith("Z")
    for bad in [{"window_s": 0}, {"window_s": 86_401}, {"format": "xml"}]:
        assert_problem(await gateway.http.get(url, headers=data.headers, params=bad), 422)

    # Another tenant's index knows nothing of these canteens.
    other = await gateway.tenant_access(scopes=(DATA_READ,))
    theirs = await gateway.http.get(f"/v1/tenants/{other.tenant_id}/dining-index", headers=other.headers)
    assert theirs.json()["locations"] == []


async def test_device_routes_without_a_device_hub_answer_503(gateway: Gateway) -> None:
    admin = await gateway.tenant_access(scopes=(DEVICES_ADMIN, DATA_READ))
    for path in ("devices", "alarms", "access-rules", "rollouts", "dining-index"):
        response = await gateway.http.get(f"/v1/tenants/{admin.tenant_id}/{path}", headers=admin.headers)
        assert_problem(response, 503, reason="DEVICEHUB_NOT_CONFIGURED")


async def test_readiness_names_the_device_hub_when_it_is_down(identity: Any, codegen_service: Any) -> None:
    down = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                            devicehub_target=f"127.0.0.1:{free_port()}", ready_timeout_s=0.5)
    async with running_gateway(down) as (_app, http):
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            body = assert_problem(await http.get("/readyz"), 503, reason="NOT_READY")
            if body["not_ready"] == ["devicehub"]:
                break
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)


def test_the_access_rules_example_in_the_api_docs_is_a_valid_document() -> None:
    from onecard_device.access import parse_access_rules

    from gateway.routes.devices import _ACCESS_RULES_EXAMPLE

    rules = parse_access_rules(json.dumps(_ACCESS_RULES_EXAMPLE))
    assert [rule.name for rule in rules.rules] == ["dorm-7-students"]


def test_a_flagged_device_says_so_and_since_when() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from gateway.routes.devices import _device

    since = Timestamp(seconds=1_796_000_000)
    shown = _device(pb.Device(tenant_id="t", device_id="d", kind=pb.DEVICE_KIND_POS, status=pb.DEVICE_STATUS_ACTIVE,
                              flagged=True, flagged_at=since)).model_dump(mode="json")
    assert shown["flagged"] is True and shown["flagged_at"] == "2026-11-30T00:53:20Z"


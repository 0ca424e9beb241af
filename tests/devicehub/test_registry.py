"""The registry: register (PENDING + one-time token), enrol with the device's own key, read, list,
update, decommission, new tokens; typed refusals; tenant scoping."""

from __future__ import annotations

import hashlib
import json
import uuid

import grpc
import nacl.signing

from onecard.devicehub.v1 import devicehub_pb2 as pb
from tests.devicehub.support import enrol_device, make_tenant, refused, register_device


async def test_register_is_pending_with_a_one_time_token_stored_as_hash(devicehub, device_stub, tenant_id,
                                                                         devicehub_db):
    registered = await register_device(devicehub.stub, tenant_id, name="North Canteen POS 3", location="north",
                                       scene_tags=["canteen", "canteen"], config_json='{"b": 1, "a": 2}',
                                       capacity=120, firmware_version="0.9")
    device = registered.device
    assert device.status == pb.DEVICE_STATUS_PENDING
    assert device.kind == pb.DEVICE_KIND_POS
    assert list(device.scene_tags) == ["canteen"]
    assert json.loads(device.config_json) == {"a": 2, "b": 1}
    assert device.config_version == 1
    assert device.key_fingerprint == ""
    assert registered.enrolment_token and registered.enrolment_token_expires_at.seconds > 0

    rows = await devicehub_db.fetch("SELECT * FROM enrolment_tokens")
    assert len(rows) == 1
    assert bytes(rows[0]["token_sha256"]) == hashlib.sha256(registered.enrolment_token.encode()).digest()
    dump = "".join(str(dict(r)) for r in await devicehub_db.fetch("SELECT * FROM enrolment_tokens"))
    dump += "".join(str(dict(r)) for r in await devicehub_db.fetch("SELECT payload FROM outbox"))
    assert registered.enrolment_token not in dump

    key = nacl.signing.SigningKey.generate()
    enrolled = (await device_stub.Enrol(pb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                        public_key=bytes(key.verify_key),
                                                        firmware_version="1.2.3"))).device
    assert enrolled.status == pb.DEVICE_STATUS_ACTIVE
    assert enrolled.firmware_version == "1.2.3"
    assert enrolled.key_fingerprint == hashlib.sha256(bytes(key.verify_key)).digest()[:8].hex()

    # One use only.
    again = device_stub.Enrol(pb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                              public_key=bytes(nacl.signing.SigningKey.generate().verify_key)))
    assert await refused(again) == (grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_TOKEN_INVALID")
    got = (await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id,
                                                              device_id=device.device_id))).device
    assert got.key_fingerprint == enrolled.key_fingerprint


async def test_enrol_refusals(devicehub, device_stub, tenant_id):
    registered = await register_device(devicehub.stub, tenant_id)
    assert await refused(device_stub.Enrol(pb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                           public_key=b"short"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PUBLIC_KEY_INVALID")
    assert await refused(device_stub.Enrol(pb.EnrolRequest(enrolment_token="oce_nonsense",
                                                           public_key=bytes(32)))) == (
        grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_TOKEN_INVALID")
    assert await refused(device_stub.Enrol(pb.EnrolRequest(public_key=bytes(32)))) == (
        grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_TOKEN_INVALID")
    # A new token replaces the old one.
    fresh = await devicehub.stub.CreateEnrolmentToken(pb.CreateEnrolmentTokenRequest(
        tenant_id=tenant_id, device_id=registered.device.device_id, ttl_s=60))
    assert await refused(device_stub.Enrol(pb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                           public_key=bytes(32)))) == (
        grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_TOKEN_INVALID")
    # Decommissioned: refused even with a token made before.
    await devicehub.stub.DecommissionDevice(pb.DecommissionDeviceRequest(
        tenant_id=tenant_id, device_id=registered.device.device_id))
    assert await refused(device_stub.Enrol(pb.EnrolRequest(enrolment_token=fresh.enrolment_token,
                                                           public_key=bytes(32)))) == (
        grpc.StatusCode.PERMISSION_DENIED, "DEVICE_DECOMMISSIONED")
    assert await refused(devicehub.stub.CreateEnrolmentToken(pb.CreateEnrolmentTokenRequest(
        tenant_id=tenant_id, device_id=registered.device.device_id))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_DECOMMISSIONED")


async def test_an_active_device_re_enrols_with_a_new_key(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    token = await devicehub.stub.CreateEnrolmentToken(pb.CreateEnrolmentTokenRequest(
        tenant_id=tenant_id, device_id=device.device_id))
    new_key = nacl.signing.SigningKey.generate()
    again = (await device_stub.Enrol(pb.EnrolRequest(enrolment_token=token.enrolment_token,
                                                     public_key=bytes(new_key.verify_key)))).device
    assert again.device_id == device.device_id
    assert again.key_fingerprint != device.device.key_fingerprint


async def test_register_refusals(devicehub, tenant_id):
    stub = devicehub.stub

    async def reason(**fields):
        values = {"tenant_id": tenant_id, "kind": pb.DEVICE_KIND_POS, "model": "M", "name": "N"}
        values.update(fields)
        return await refused(stub.RegisterDevice(pb.RegisterDeviceRequest(**values)))

    assert await reason(tenant_id="nope") == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_ID_INVALID")
    assert await reason(kind=pb.DEVICE_KIND_UNSPECIFIED) == (grpc.StatusCode.INVALID_ARGUMENT, "KIND_INVALID")
    assert await reason(model="") == (grpc.StatusCode.INVALID_ARGUMENT, "MODEL_INVALID")
    assert await reason(name=" ") == (grpc.StatusCode.INVALID_ARGUMENT, "NAME_INVALID")
    assert await reason(config_json="[1]") == (grpc.StatusCode.INVALID_ARGUMENT, "CONFIG_INVALID")
    assert await reason(config_json="{") == (grpc.StatusCode.INVALID_ARGUMENT, "CONFIG_INVALID")
    assert await reason(capacity=-1) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPACITY_INVALID")
    assert await reason(enrolment_token_ttl_s=31 * 24 * 3600) == (grpc.StatusCode.INVALID_ARGUMENT, "TTL_INVALID")
    assert await reason(merchant_account_id="x") == (grpc.StatusCode.INVALID_ARGUMENT, "MERCHANT_ACCOUNT_INVALID")
    assert await reason(parent_device_id=str(uuid.uuid4())) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                "PARENT_NOT_ALLOWED")
    assert await reason(kind=pb.DEVICE_KIND_CABINET, parent_device_id=str(uuid.uuid4())) == (
        grpc.StatusCode.NOT_FOUND, "PARENT_DEVICE_NOT_FOUND")
    gate = await register_device(stub, tenant_id, kind=pb.DEVICE_KIND_GATE)
    assert await reason(kind=pb.DEVICE_KIND_CABINET, parent_device_id=gate.device.device_id) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PARENT_NOT_A_POS")
    pos = await register_device(stub, tenant_id)
    cabinet = await register_device(stub, tenant_id, kind=pb.DEVICE_KIND_CABINET,
                                    parent_device_id=pos.device.device_id)
    assert cabinet.device.parent_device_id == pos.device.device_id
    # Nothing was written by the refused calls.
    listed = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id))
    assert len(listed.devices) == 3


async def test_list_filters_and_pages(devicehub, device_stub, tenant_id):
    stub = devicehub.stub
    ids = []
    for i in range(5):
        ids.append((await register_device(stub, tenant_id, location="north" if i % 2 else "south")).device.device_id)
    gate = await enrol_device(stub, device_stub, tenant_id, kind=pb.DEVICE_KIND_GATE, location="east")
    seen = []
    token = ""
    while True:
        page = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, page_size=2, page_token=token))
        seen += [d.device_id for d in page.devices]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids + [gate.device_id]
    north = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, location="north"))
    assert [d.device_id for d in north.devices] == [ids[1], ids[3]]
    gates = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, kind=pb.DEVICE_KIND_GATE))
    assert [d.device_id for d in gates.devices] == [gate.device_id]
    active = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, status=pb.DEVICE_STATUS_ACTIVE))
    assert [d.device_id for d in active.devices] == [gate.device_id]
    offline = await stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, online=2))
    assert len(offline.devices) == 6
    assert await refused(stub.ListDevices(pb.ListDevicesRequest(tenant_id=tenant_id, page_token="zz"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_another_tenants_device_is_not_found(devicehub, identity, device_stub, tenant_id):
    other = await make_tenant(identity.stub, name="Peking")
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    stub = devicehub.stub
    not_found = (grpc.StatusCode.NOT_FOUND, "DEVICE_NOT_FOUND")
    assert await refused(stub.GetDevice(pb.GetDeviceRequest(tenant_id=other, device_id=device.device_id))) == not_found
    assert await refused(stub.UpdateDevice(pb.UpdateDeviceRequest(tenant_id=other, device_id=device.device_id,
                                                                  name="mine"))) == not_found
    assert await refused(stub.DecommissionDevice(pb.DecommissionDeviceRequest(
        tenant_id=other, device_id=device.device_id))) == not_found
    assert await refused(stub.CreateEnrolmentToken(pb.CreateEnrolmentTokenRequest(
        tenant_id=other, device_id=device.device_id))) == not_found
    assert not (await stub.ListDevices(pb.ListDevicesRequest(tenant_id=other))).devices
    # The real owner still sees it unchanged.
    got = (await stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device.device_id))).device
    assert got.status == pb.DEVICE_STATUS_ACTIVE and got.name == device.device.name


async def test_update_replaces_named_fields_and_bumps_config(devicehub, tenant_id):
    stub = devicehub.stub
    device = (await register_device(stub, tenant_id, location="north", scene_tags=["canteen"])).device
    assert device.config_version == 0
    updated = (await stub.UpdateDevice(pb.UpdateDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id, name="Renamed", capacity=40,
        config_json='{"display": "large"}'))).device
    assert updated.name == "Renamed" and updated.capacity == 40
    assert updated.location == "north" and list(updated.scene_tags) == ["canteen"]
    assert updated.config_version == 1
    same = (await stub.UpdateDevice(pb.UpdateDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id, config_json='{ "display":"large" }'))).device
    assert same.config_version == 1
    cleared = (await stub.UpdateDevice(pb.UpdateDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id, replace_scene_tags=True, location=""))).device
    assert list(cleared.scene_tags) == [] and cleared.location == ""
    assert await refused(stub.UpdateDevice(pb.UpdateDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id, config_json="nope"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "CONFIG_INVALID")
    decommissioned = (await stub.DecommissionDevice(pb.DecommissionDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id))).device
    assert decommissioned.status == pb.DEVICE_STATUS_DECOMMISSIONED
    again = (await stub.DecommissionDevice(pb.DecommissionDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id))).device
    assert again.status == pb.DEVICE_STATUS_DECOMMISSIONED
    assert await refused(stub.UpdateDevice(pb.UpdateDeviceRequest(
        tenant_id=tenant_id, device_id=device.device_id, name="x"))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_DECOMMISSIONED")


async def test_an_expired_token_does_not_enrol(devicehub, device_stub, tenant_id):
    import asyncio

    registered = await register_device(devicehub.stub, tenant_id, enrolment_token_ttl_s=1)
    await asyncio.sleep(1.2)
    assert await refused(device_stub.Enrol(pb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                           public_key=bytes(32)))) == (
        grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_TOKEN_INVALID")
    still = (await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id,
                                                                device_id=registered.device.device_id))).device
    assert still.status == pb.DEVICE_STATUS_PENDING

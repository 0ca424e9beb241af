"""The device port: TLS only, the terminals' methods only. The mesh port does not serve the device
stream, the device port does not serve the administration, and a terminal trusts only the hub its
CA bundle vouches for."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard_device.client import DeviceClient
from runtime.pki import CertificateAuthority
from tests.conftest import RunningService
from tests.devicehub.support import make_tenant
from tests.mesh import channel_as, terminal_channel

CALL_TIMEOUT_S = 5.0


async def _code(call: grpc.aio.UnaryUnaryCall) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code()


async def test_the_device_port_refuses_plaintext_and_serves_only_the_device_stream(
        identity: RunningService, devicehub: RunningService) -> None:
    async with grpc.aio.insecure_channel(devicehub.device_target) as plaintext:
        enrol = devicehub_pb2_grpc.DeviceServiceStub(plaintext).Enrol(pb.EnrolRequest(), timeout=CALL_TIMEOUT_S)
        assert await _code(enrol) == grpc.StatusCode.UNAVAILABLE

    # As a terminal has it (server TLS): the device stream answers, the administration is not there.
    terminal = devicehub.device_channel
    enrol = devicehub_pb2_grpc.DeviceServiceStub(terminal).Enrol(pb.EnrolRequest(enrolment_token="nope"),
                                                                 timeout=CALL_TIMEOUT_S)
    assert await _code(enrol) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
    tenant_id = await make_tenant(identity.stub)
    listing = devicehub_pb2_grpc.DeviceAdminServiceStub(terminal).ListDevices(
        pb.ListDevicesRequest(tenant_id=tenant_id), timeout=CALL_TIMEOUT_S)
    assert await _code(listing) == grpc.StatusCode.UNIMPLEMENTED

    # And the mesh port does not carry the device stream, even for an operator.
    async with channel_as("ops", devicehub.target, server_name="devicehub") as ops:
        enrol = devicehub_pb2_grpc.DeviceServiceStub(ops).Enrol(pb.EnrolRequest(enrolment_token="nope"),
                                                                timeout=CALL_TIMEOUT_S)
        assert await _code(enrol) == grpc.StatusCode.UNIMPLEMENTED


async def test_a_terminal_trusts_only_the_hub_its_ca_bundle_vouches_for(
        identity: RunningService, devicehub: RunningService, tmp_path: Path) -> None:
    tenant_id = await make_tenant(identity.stub)
    registered = await devicehub.stub.RegisterDevice(pb.RegisterDeviceRequest(
        tenant_id=tenant_id, kind=pb.DEVICE_KIND_POS, model="m", name="POS 1", location="north"))
    assert registered.hub_ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert registered.hub_ca_pem.encode() == devicehub.device_ca_pem

    # Another CA's bundle: the terminal does not talk to this hub at all (the token stays unused).
    stranger = CertificateAuthority.create(common_name="not the campus CA").pem
    wary = DeviceClient(target=devicehub.device_target, data_dir=tmp_path / "wary", ca_pem=stranger,
                        durable=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await wary.enrol(registered.enrolment_token, timeout_s=CALL_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await wary.close()

    # The bundle that came with the token: enrolled, and the bundle is kept for the next start.
    client = DeviceClient(target=devicehub.device_target, data_dir=tmp_path / "pos", ca_pem=registered.hub_ca_pem,
                          durable=False)
    try:
        assert await client.enrol(registered.enrolment_token) == registered.device.device_id
    finally:
        await client.close()
    assert (tmp_path / "pos" / "hub-ca.pem").read_bytes() == devicehub.device_ca_pem
    async with terminal_channel(devicehub.device_target, devicehub.device_ca_pem) as channel:
        await channel.channel_ready()


async def test_the_device_port_may_show_a_public_certificate_with_no_mesh_identity(
        start_devicehub, tmp_path: Path) -> None:  # noqa: ANN001
    """Terminals dial a public name: its certificate (from a device CA, or ACME) needs no
    spiffe://onecard/ identity, and the hub hands out that CA's bundle."""
    device_ca = CertificateAuthority.create(common_name="campus devices CA")
    device_ca.write_identity(tmp_path / "device-tls", "devices.campus.example", spiffe=False)
    hub = await start_devicehub(device_tls_dir=tmp_path / "device-tls")
    assert hub.device_ca_pem == device_ca.pem
    async with terminal_channel(hub.device_target, device_ca.pem) as channel:
        enrol = devicehub_pb2_grpc.DeviceServiceStub(channel).Enrol(pb.EnrolRequest(enrolment_token="nope"),
                                                                    timeout=CALL_TIMEOUT_S)
        assert await _code(enrol) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)

"""The per-method allow-list, over every RPC of every service, against the real services.

For each method: with no certificate (plaintext, on the health port) the call is UNAUTHENTICATED;
each mesh identity the allow-list does not name gets PERMISSION_DENIED (reason CALLER_NOT_ALLOWED);
each identity it names reaches the handler (whatever the handler then answers an empty request,
it is not the interceptor's refusal). A meta-test fails when an RPC has no entry.
"""
from __future__ import annotations


import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from onecard.codegen.v1 import codegen_pb2
from onecard.devicehub.v1 import devicehub_pb2
from onecard.identity.v1 import identity_pb2
from onecard.ledger.v1 import ledger_pb2
from onecard.mesh.v1 import access_pb2
from onecard.ops.v1 import ops_pb2
from onecard.policy.v1 import policy_pb2
from onecard.webhooks.v1 import webhooks_pb2
from devstack.security_doc import onecard_services
from runtime.access import known_callers, method_rules
from runtime.grpc_client import error_info
from tests.conftest import RunningService
from tests.mesh import channel_as

# Every service of the mesh, by the server that hosts it; each server carries OpsService too (runtime.ops).
OPS_SERVICE = ops_pb2.DESCRIPTOR.services_by_name["OpsService"]
SERVICES: dict[str, list[ServiceDescriptor]] = {
    "identity": [identity_pb2.DESCRIPTOR.services_by_name["IdentityService"], OPS_SERVICE],
    "codegen": [codegen_pb2.DESCRIPTOR.services_by_name["CodegenService"], OPS_SERVICE],
    "ledger": [ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"], OPS_SERVICE],
    "policy": [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"], OPS_SERVICE],
    "devicehub": [devicehub_pb2.DESCRIPTOR.services_by_name["DeviceAdminService"], OPS_SERVICE],
    "webhooks": [webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"], OPS_SERVICE],
}
TERMINAL_SERVICES = [devicehub_pb2.DESCRIPTOR.services_by_name["DeviceService"]]
INTERCEPTOR_REFUSALS = {(grpc.StatusCode.UNAUTHENTICATED, "NO_CALLER_IDENTITY"),
                        (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")}
CALL_TIMEOUT_S = 10.0


def test_every_rpc_of_every_service_has_an_allow_list_entry() -> None:
    served = {s.full_name for services in SERVICES.values() for s in services} | {
        s.full_name for s in TERMINAL_SERVICES}
    known = set(known_callers())
    for service in onecard_services():
        assert service.full_name in served, f"{service.full_name} is served by no server in this matrix"
        for method in service.methods:
            options = method.GetOptions()
            assert options.HasExtension(access_pb2.access), f"{method.full_name} has no (onecard.mesh.v1.access)"
            access = options.Extensions[access_pb2.access]
            callers = [access_pb2.Caller.Name(c) for c in access.callers]
            assert bool(callers) != access.terminals, (
                f"{method.full_name}: name callers or mark it terminals, not both or neither")
            assert "CALLER_UNSPECIFIED" not in callers, method.full_name
            assert len(set(callers)) == len(callers), f"{method.full_name} lists a caller twice"
    # Each terminals method is served only on the device port; nothing else is.
    for service in TERMINAL_SERVICES:
        assert all(rule.terminals for rule in method_rules([service]).values())
    for services in SERVICES.values():
        assert not any(rule.terminals for rule in method_rules(services).values())
    assert known >= {"gateway", "identity", "codegen", "ledger", "policy", "devicehub", "webhooks", "ops"}


def _call(channel: grpc.aio.Channel, method: MethodDescriptor) -> grpc.aio.UnaryUnaryCall:
    # An empty request: the bytes of a message with no fields set.
    path = f"/{method.containing_service.full_name}/{method.name}"
    return channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT_S)


async def _outcome(channel: grpc.aio.Channel, method: MethodDescriptor) -> tuple[grpc.StatusCode, str | None]:
    try:
        await _call(channel, method)
    except grpc.aio.AioRpcError as exc:
        reason, _ = error_info(exc)
        return exc.code(), reason
    return grpc.StatusCode.OK, None


async def test_each_rpc_admits_exactly_the_callers_its_allow_list_names(mesh: dict[str, RunningService]) -> None:
    callers = known_callers()
    checked = 0
    for server_name, services in SERVICES.items():
        service = mesh[server_name]
        channels = {caller: channel_as(caller, service.target, server_name=server_name) for caller in callers}
        plaintext = grpc.aio.insecure_channel(f"127.0.0.1:{service.app.health_port}")
        try:
            for method_path, rule in method_rules(services).items():
                method = descriptor_pool.Default().FindMethodByName(method_path.strip("/").replace("/", "."))
                assert await _outcome(plaintext, method) == (grpc.StatusCode.UNAUTHENTICATED, "NO_CALLER_IDENTITY"), \
                    f"{method_path} answered a caller with no certificate"
                for caller in callers:
                    outcome = await _outcome(channels[caller], method)
                    if caller in rule.callers:
                        assert outcome not in INTERCEPTOR_REFUSALS, f"{caller} was refused {method_path}: {outcome}"
                    else:
                        assert outcome == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"), \
                            f"{caller} reached {method_path}: {outcome}"
                    checked += 1
        finally:
            await plaintext.close()
            for channel in channels.values():
                await channel.close()
    assert checked == len(callers) * sum(len(s.methods) for services in SERVICES.values() for s in services)


async def test_health_is_open_and_reflection_is_for_the_operator_only(mesh: dict[str, RunningService]) -> None:
    ledger = mesh["ledger"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger.app.health_port}") as plaintext:
        answer = await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    for caller in known_callers():
        async with channel_as(caller, ledger.target, server_name="ledger") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            if caller == "ops":
                answers = [answer async for answer in listing]
                names = {s.name for s in answers[0].list_services_response.service}
                assert "onecard.ledger.v1.LedgerService" in names
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in listing:
                        pass
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller
                assert error_info(refused.value)[0] == "CALLER_NOT_ALLOWED"


def test_every_onecard_proto_is_a_mesh_service_or_marked_public() -> None:
    """A service outside the mesh's allow-list must say so: the file carries
    ``option (onecard.mesh.v1.public_api) = true`` (the partner API the gateway serves to access
    tokens) and its methods no (access) option; every other onecard proto is in the matrix above."""
    import importlib
    from pathlib import Path

    mesh_files = {service.file.name for service in onecard_services()}
    protos = Path(__file__).resolve().parents[2] / "protos"
    public = set()
    for path in sorted(protos.glob("onecard/**/*.proto")):
        name = path.relative_to(protos).as_posix()
        module = importlib.import_module(name.removesuffix(".proto").replace("/", ".") + "_pb2")
        if not module.DESCRIPTOR.services_by_name:
            continue
        options = module.DESCRIPTOR.GetOptions()
        if options.HasExtension(access_pb2.public_api) and options.Extensions[access_pb2.public_api]:
            assert name not in mesh_files, f"{name} is marked public_api but served on the mesh"
            for service in module.DESCRIPTOR.services_by_name.values():
                assert not any(m.GetOptions().HasExtension(access_pb2.access) for m in service.methods), name
            public.add(name)
        else:
            assert name in mesh_files, f"{name}: a mesh service missing from devstack.security_doc, or mark it public_api"
    assert public == {"onecard/partner/v1/partner.proto"}

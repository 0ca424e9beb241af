"""A service's address in a setting: one, a list of its replicas, or a resolver's name; and a channel
over a list that spreads calls and outlives a replica that stops (real servers, real mutual TLS)."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from runtime.grpc_client import open_channel
from runtime.targets import channel_target
from services.policy.settings import PolicySettings
from tests.mesh import pki, service_values


@pytest.mark.parametrize(("value", "target"), [
    ("127.0.0.1:50053", "127.0.0.1:50053"),
    ("ledger:50053", "ledger:50053"),
    ("127.0.0.1:50053,127.0.0.1:60053", "ipv4:127.0.0.1:50053,127.0.0.1:60053"),
    (" 10.0.0.5:50053 , 10.0.0.6:50053 ", "ipv4:10.0.0.5:50053,10.0.0.6:50053"),
    ("[::1]:50053,[::1]:60053", "ipv6:[::1]:50053,[::1]:60053"),
    ("dns:///ledger.onecard.svc:50053", "dns:///ledger.onecard.svc:50053"),
    ("ipv4:10.0.0.5:50053,10.0.0.6:50053", "ipv4:10.0.0.5:50053,10.0.0.6:50053"),
])
def test_a_target_is_one_address_a_list_of_replicas_or_a_resolvers_name(value: str, target: str) -> None:
    assert channel_target(value) == target


@pytest.mark.parametrize("value", ["ledger-a:50053,ledger-b:50053", "127.0.0.1,127.0.0.2:50053",
                                   "127.0.0.1:50053,[::1]:50053", "127.0.0.1:99999,127.0.0.1:50053"])
def test_a_list_that_grpc_cannot_dial_stops_the_service_at_start(value: str) -> None:
    with pytest.raises(ValueError):
        channel_target(value)
    with pytest.raises(ValueError, match="policy_target|ledger_target|IP addresses|host:port|IPv4"):
        PolicySettings(nats_url="nats://x", policy_master_key="ab" * 32, ledger_target=value,
                       **service_values("policy", "postgresql://x@127.0.0.1/x"))


class _Counting(HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def Check(self, request, context):  # noqa: ANN001, ANN201, N802
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_a_channel_to_two_replicas_uses_both_and_outlives_one() -> None:
    servers, servicers, ports = [], [], []
    for _ in range(2):
        server, servicer = grpc.aio.server(), _Counting()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_secure_port("127.0.0.1:0", pki().tls("ledger").server_credentials()))
        await server.start()
        servers.append(server)
        servicers.append(servicer)
    # The replicas' certificate names the service, not an address: each is checked as "ledger".
    channel = open_channel(",".join(f"127.0.0.1:{p}" for p in ports), tls=pki().tls("policy"), server_name="ledger")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(10):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert all(s.calls > 0 for s in servicers) and sum(s.calls for s in servicers) == 10
        await servers[0].stop(None)
        for _ in range(10):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert servicers[1].calls == 20 - servicers[0].calls
    finally:
        await channel.close()
        await servers[1].stop(None)


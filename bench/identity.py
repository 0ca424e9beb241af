"""Identity through the gateway, against the floor of the same web stack.

Identity runs on the bench's shared PostgreSQL (fsync off): nothing here books money.
"""
from __future__ import annotations

import uuid

import httpx

from bench.harness import BenchContext, BenchService, Figures, benchmark
from bench.load import LoadResult, closed_loop_get
from bench.serve import BARE_PATH, BENCH_HOST
from devstack.servers import free_port
from devstack.supervisor import http_ready_probe
from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc

BENCH_TOKEN_SECRET = "bench-token-secret-" + "x" * 32
# The gateway limits each client to 50 requests/s by default; the benchmark is one client measuring
# the request path, so the limit is raised far out of the way (the limiter still runs per request).
BENCH_RATE_LIMIT_PER_S = "1000000"
BENCH_RATE_LIMIT_BURST = "1000000"
CALL_TIMEOUT_S = 10.0
# The tenant, member and API client are made as the gateway makes them (an admin's requests).
CALLER = "gateway"


async def _seed_member(context: BenchContext, identity: BenchService) -> tuple[str, str, str, str]:
    """A tenant, one member and an API client that may read it. Answers the ids and the secret."""
    async with context.channel(identity, as_=CALLER) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        tenant = (await stub.CreateTenant(
            pb.CreateTenantRequest(name="Bench University", kind=pb.TENANT_KIND_UNIVERSITY,
                                   time_zone="Asia/Shanghai", currency="CNY", tenant_id=str(uuid.uuid4())),
            timeout=CALL_TIMEOUT_S,
        )).tenant
        member = (await stub.CreateMember(
            pb.CreateMemberRequest(tenant_id=tenant.tenant_id, external_number="2025010001", name="Li Hua",
                                   groups={"department": "physics", "grade": "2025"}),
            timeout=CALL_TIMEOUT_S,
        )).member
        created = await stub.CreateApiClient(
            pb.CreateApiClientRequest(
                name="Bench Bank", scopes=["members:read"],
                grants=[pb.TenantGrant(tenant_id=tenant.tenant_id, scopes=["members:read"])],
            ),
            timeout=CALL_TIMEOUT_S,
        )
    return tenant.tenant_id, member.member_id, created.client.client_id, created.client_secret


async def _measure(context: BenchContext, *, url: str, headers: dict[str, str]) -> LoadResult:
    load = context.load
    # Warm-up: code paths, caches and the server's connection handling hot before the clock counts.
    await closed_loop_get(url=url, headers=headers, duration_s=load.warmup_s, concurrency=load.concurrency,
                          client=load.client)
    result = await closed_loop_get(url=url, headers=headers, duration_s=load.duration_s,
                                   concurrency=load.concurrency, client=load.client)
    if result.errors:
        raise RuntimeError(f"{url}: {result.errors} of {result.requests} requests failed during the measurement")
    return result


@benchmark(
    "identity.get_member",
    description="GET /v1/tenants/{t}/members/{id} through the gateway vs a bare FastAPI constant route",
)
async def get_member(context: BenchContext) -> Figures:
    identity = await context.start_grpc_service(name="identity", module="services.identity")
    gateway_port, bare_port = free_port(), free_port()
    await context.start_process(
        name="gateway",
        module_args=["bench.serve", "gateway", "--port", str(gateway_port)],
        env={
            # The gateway proves itself to identity with its certificate, as in production.
            **context.process_env("gateway"),
            "ONECARD_IDENTITY_TARGET": identity.target,
            # Not measured here; the codes routes are not called.
            "ONECARD_CODEGEN_TARGET": f"{BENCH_HOST}:{free_port()}",
            "ONECARD_TOKEN_SECRET": BENCH_TOKEN_SECRET,
            "ONECARD_RATE_LIMIT_PER_S": BENCH_RATE_LIMIT_PER_S,
            "ONECARD_RATE_LIMIT_BURST": BENCH_RATE_LIMIT_BURST,
        },
        # /healthz, not /readyz: readiness also asks codegen and the ledger, which this bench does
        # not start (identity, the one dependency measured, is serving already).
        probe=http_ready_probe(f"http://{BENCH_HOST}:{gateway_port}/healthz"),
    )
    await context.start_process(
        name="bare",
        module_args=["bench.serve", "bare", "--port", str(bare_port)],
        env={},
        probe=http_ready_probe(f"http://{BENCH_HOST}:{bare_port}{BARE_PATH}"),
    )
    tenant_id, member_id, client_id, client_secret = await _seed_member(context, identity)

    gateway_url = f"http://{BENCH_HOST}:{gateway_port}"
    async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as client:
        answer = await client.post(f"{gateway_url}/v1/oauth/token", data={
            "grant_type": "client_credentials", "client_id": client_id,
            "client_secret": client_secret, "tenant_id": tenant_id,
        })
        answer.raise_for_status()
        auth = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        member_url = f"{gateway_url}/v1/tenants/{tenant_id}/members/{member_id}"
        check = await client.get(member_url, headers=auth)
        if check.status_code != 200 or check.json().get("member_id") != member_id:
            raise RuntimeError(f"the gateway does not answer the member: {check.status_code} {check.text[:200]}")
    # One at a time, with the same client, concurrency and duration; the idle side costs ~nothing.
    bare = await _measure(context, url=f"http://{BENCH_HOST}:{bare_port}{BARE_PATH}", headers={})
    gateway = await _measure(context, url=member_url, headers=auth)

    return {
        "identity.get_member_vs_bare_ratio": gateway.rps / bare.rps,
        "identity.get_member_rps": gateway.rps,
        "identity.bare_fastapi_rps": bare.rps,
        "identity.get_member_p50_ms": gateway.median_ms,
        "identity.get_member_p99_ms": gateway.percentile_ms(0.99),
        "identity.bare_fastapi_p50_ms": bare.median_ms,
        # Near 1.0 the load client, not the server, set the pace: the figures above are then a floor.
        "identity.bare_fastapi_client_cpu_ratio": bare.client_cpu_ratio,
        "identity.get_member_client_cpu_ratio": gateway.client_cpu_ratio,
    }

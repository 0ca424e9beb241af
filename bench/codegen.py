"""The codegen service: how long a 24 h rotating-token batch takes to issue through it.

Identity and codegen run on the bench's shared PostgreSQL (fsync off): nothing here books money.
"""
from __future__ import annotations

import statistics
import time
import uuid

from bench.harness import BenchContext, Figures, benchmark
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc

# A fixed bench master key: the bench database is thrown away after the run.
BENCH_MASTER_KEY = "42" * 32
# Token batches are issued through the gateway (a member's app asks it); so is the setup.
CALLER = "gateway"
CALL_TIMEOUT_S = 60.0
BATCH_RUNS = 5
BATCH_HOURS = 24
SLOT_LENGTH_S = 60


@benchmark("codes.batch_24h", description="IssueTokenBatch of 24 h in 60 s slots (1440 signed tokens) via gRPC")
async def batch_24h(context: BenchContext) -> Figures:
    identity_service = await context.start_grpc_service(name="identity-codes", module="services.identity")
    codegen_service = await context.start_grpc_service(name="codegen", module="services.codegen", env={
        "ONECARD_IDENTITY_TARGET": identity_service.target,
        "ONECARD_CODEGEN_MASTER_KEY": BENCH_MASTER_KEY,
    })
    async with context.channel(identity_service, as_=CALLER) as identity_channel, \
            context.channel(codegen_service, as_=CALLER) as codegen_channel:
        identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)
        codegen = codegen_pb2_grpc.CodegenServiceStub(codegen_channel)
        tenant = (await identity.CreateTenant(pb.CreateTenantRequest(
            name="Bench Codes University", kind=pb.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai",
            currency="CNY", tenant_id=str(uuid.uuid4())), timeout=CALL_TIMEOUT_S)).tenant
        member = (await identity.CreateMember(pb.CreateMemberRequest(
            tenant_id=tenant.tenant_id, external_number="2025020001", name="Wang Fang"),
            timeout=CALL_TIMEOUT_S)).member
        request = cpb.IssueTokenBatchRequest(tenant_id=tenant.tenant_id, member_id=member.member_id,
                                             purposes=[cpb.PURPOSE_PAY], slot_length_s=SLOT_LENGTH_S,
                                             hours=BATCH_HOURS)
        # Warm-up: the tenant's first issuer key is made on the first issue; not part of the figure.
        await codegen.IssueTokenBatch(request, timeout=CALL_TIMEOUT_S)
        times_ms = []
        tokens = 0
        for _ in range(BATCH_RUNS):
            started = time.perf_counter()
            answer = await codegen.IssueTokenBatch(request, timeout=CALL_TIMEOUT_S)
            times_ms.append((time.perf_counter() - started) * 1000)
            tokens = len(answer.tokens)
    if tokens != BATCH_HOURS * 3600 // SLOT_LENGTH_S:
        raise RuntimeError(f"a 24 h batch had {tokens} tokens")
    return {
        "codes.batch_24h_ms": statistics.median(times_ms),
        "codes.batch_24h_tokens": float(tokens),
    }

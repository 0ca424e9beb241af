"""What the app holds for its lifetime: settings, the identity, codegen, ledger, policy and device hub
channels and stubs, the rate limiters.

Created and closed by the lifespan in ``gateway.app``; routes reach it through ``gateway_state``.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from typing import Annotated

from fastapi import Depends, Request
from grpc_health.v1 import health_pb2_grpc

from gateway.grants import GrantCache
from gateway.problems import ProblemError
from gateway.ratelimit import SignInThrottle, TokenBucketLimiter
from gateway.settings import GatewaySettings
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from onecard.webhooks.v1 import webhooks_pb2_grpc


@dataclass
class GatewayState:
    settings: GatewaySettings
    client_limiter: TokenBucketLimiter
    # The token endpoint: every request per caller address; failed sign-ins per (client, address).
    token_limiter: TokenBucketLimiter
    sign_ins: SignInThrottle
    # What identity last said of the grants behind the tokens this replica sees.
    grants: GrantCache
    channel: grpc.aio.Channel | None = None
    identity_stub: identity_pb2_grpc.IdentityServiceStub | None = None
    # gRPC health of the identity server, for /readyz.
    health_stub: health_pb2_grpc.HealthStub | None = None
    codegen_channel: grpc.aio.Channel | None = None
    codegen_stub: codegen_pb2_grpc.CodegenServiceStub | None = None
    # gRPC health of the codegen server, for /readyz.
    codegen_health_stub: health_pb2_grpc.HealthStub | None = None
    # None when the gateway has no ledger_target.
    ledger_channel: grpc.aio.Channel | None = None
    ledger_stub: ledger_pb2_grpc.LedgerServiceStub | None = None
    # gRPC health of the ledger server, for /readyz.
    ledger_health_stub: health_pb2_grpc.HealthStub | None = None
    # None when the gateway has no policy_target.
    policy_channel: grpc.aio.Channel | None = None
    policy_stub: policy_pb2_grpc.PolicyServiceStub | None = None
    # gRPC health of the policy server, for /readyz.
    policy_health_stub: health_pb2_grpc.HealthStub | None = None
    # None when the gateway has no devicehub_target.
    devicehub_channel: grpc.aio.Channel | None = None
    devicehub_stub: devicehub_pb2_grpc.DeviceAdminServiceStub | None = None
    # gRPC health of the device hub, for /readyz.
    devicehub_health_stub: health_pb2_grpc.HealthStub | None = None
    # None when the gateway has no webhooks_target.
    webhooks_channel: grpc.aio.Channel | None = None
    webhooks_stub: webhooks_pb2_grpc.WebhookServiceStub | None = None
    webhooks_health_stub: health_pb2_grpc.HealthStub | None = None
    # The port the partner gRPC API listens on (gateway.partner_grpc); None when it does not.
    partner_grpc_port: int | None = None

    @property
    def identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        if self.identity_stub is None:
            raise RuntimeError("the gateway's lifespan has not opened the identity channel")
        return self.identity_stub

    @property
    def codegen(self) -> codegen_pb2_grpc.CodegenServiceStub:
        if self.codegen_stub is None:
            raise RuntimeError("the gateway's lifespan has not opened the codegen channel")
        return self.codegen_stub

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerServiceStub:
        if self.ledger_stub is None:
            if not self.settings.ledger_target:
                raise ProblemError(status=503, reason="LEDGER_NOT_CONFIGURED",
                                   detail="this gateway has no ledger behind it (ONECARD_LEDGER_TARGET)")
            raise RuntimeError("the gateway's lifespan has not opened the ledger channel")
        return self.ledger_stub

    @property
    def policy(self) -> policy_pb2_grpc.PolicyServiceStub:
        if self.policy_stub is None:
            if not self.settings.policy_target:
                raise ProblemError(status=503, reason="POLICY_NOT_CONFIGURED",
                                   detail="this gateway has no policy service behind it (ONECARD_POLICY_TARGET)")
            raise RuntimeError("the gateway's lifespan has not opened the policy channel")
        return self.policy_stub

    @property
    def devicehub(self) -> devicehub_pb2_grpc.DeviceAdminServiceStub:
        if self.devicehub_stub is None:
            if not self.settings.devicehub_target:
                raise ProblemError(status=503, reason="DEVICEHUB_NOT_CONFIGURED",
                                   detail="this gateway has no device hub behind it (ONECARD_DEVICEHUB_TARGET)")
            raise RuntimeError("the gateway's lifespan has not opened the device hub channel")
        return self.devicehub_stub

    @property
    def webhooks(self) -> webhooks_pb2_grpc.WebhookServiceStub:
        if self.webhooks_stub is None:
            if not self.settings.webhooks_target:
                raise ProblemError(status=503, reason="WEBHOOKS_NOT_CONFIGURED",
                                   detail="this gateway has no webhooks service behind it (ONECARD_WEBHOOKS_TARGET)")
            raise RuntimeError("the gateway's lifespan has not opened the webhooks channel")
        return self.webhooks_stub

    @property
    def timeout_s(self) -> float:
        return self.settings.identity_timeout_s


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def state_dependency(request: Request) -> GatewayState:
    """``gateway_state`` for ``Depends``: FastAPI runs a plain ``def`` dependency in a thread pool,
    a thread hop on every request that this async form avoids."""
    return gateway_state(request)


# What a route declares to get the gateway's state, e.g. ``state: State``.
State = Annotated[GatewayState, Depends(state_dependency)]

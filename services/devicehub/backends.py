"""What the hub's parts reach outside the process: the store and the alarms (PostgreSQL), the stubs
of identity, codegen and policy, the transactions part (tx's: payments, uploads, cabinets and
access) and the CA bundle terminals check the device port against.

None of it exists before PostgreSQL and NATS are up. The parts are made at build time and given
this holder; the hub (services.devicehub.hub) connects it once the process is ready, and a part
that asks sooner is answered UNAVAILABLE STARTING. It imports none of the parts that use it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.identity.v1 import identity_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from runtime.errors import Unavailable
from services.devicehub.alarms import Alarms
from services.devicehub.store import DevicehubStore

_T = TypeVar("_T")


def _started(backend: _T | None) -> _T:
    if backend is None:
        raise Unavailable("devicehub is starting", reason="STARTING")
    return backend


class Backends:
    def __init__(self) -> None:
        self._store: DevicehubStore | None = None
        self._alarms: Alarms | None = None
        self._identity: identity_pb2_grpc.IdentityServiceStub | None = None
        self._codegen: codegen_pb2_grpc.CodegenServiceStub | None = None
        self._policy: policy_pb2_grpc.PolicyServiceStub | None = None
        # tx's Transactions; None until the hub starts it, and in a build without its module.
        self.tx: Any | None = None
        # The CA bundle terminals check the device port against: '' in insecure development mode.
        self.device_ca_pem = ""

    def connect(self, *, store: DevicehubStore, alarms: Alarms, identity: identity_pb2_grpc.IdentityServiceStub,
                codegen: codegen_pb2_grpc.CodegenServiceStub, policy: policy_pb2_grpc.PolicyServiceStub,
                device_ca_pem: str) -> None:
        self._store = store
        self._alarms = alarms
        self._identity = identity
        self._codegen = codegen
        self._policy = policy
        self.device_ca_pem = device_ca_pem

    @property
    def store(self) -> DevicehubStore:
        return _started(self._store)

    @property
    def alarms(self) -> Alarms:
        return _started(self._alarms)

    @property
    def identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        return _started(self._identity)

    @property
    def codegen(self) -> codegen_pb2_grpc.CodegenServiceStub:
        return _started(self._codegen)

    @property
    def policy(self) -> policy_pb2_grpc.PolicyServiceStub:
        return _started(self._policy)

    def transactions(self) -> Any:
        if self.tx is None:
            raise Unavailable("payments, uploads and access are not available in this build",
                              reason="TRANSACTIONS_UNAVAILABLE")
        return self.tx

"""Every process's NATS account in one table: what each service declares next to its stream and
consumers (``NATS_ACCESS`` in its app module), and two declared here: the gateway's, which follows
identity's stream and publishes nothing, and the operator's, which reads stream and consumer state
and follows any stream but publishes nothing. The local stack, the tests and the Kubernetes
NATS configuration are all made from this table (runtime.nats_access renders it)."""
from __future__ import annotations

from runtime.nats_access import NatsAccess
from services.codegen.app import NATS_ACCESS as CODEGEN
from services.devicehub.app import NATS_ACCESS as DEVICEHUB
from services.identity.app import NATS_ACCESS as IDENTITY
from services.ledger.app import NATS_ACCESS as LEDGER
from services.policy.app import NATS_ACCESS as POLICY
from services.webhooks.app import NATS_ACCESS as WEBHOOKS

# The gateway follows identity's grant events (gateway.identity_events), so that a revoked grant's
# tokens stop at once; it publishes nothing.
GATEWAY = NatsAccess(follows=("IDENTITY",))
OPS = NatsAccess(follows=("IDENTITY", "CODEGEN", "LEDGER", "POLICY", "DEVICEHUB", "WEBHOOKS"), inspects=True)

NATS_ACCOUNTS: dict[str, NatsAccess] = {
    "identity": IDENTITY,
    "codegen": CODEGEN,
    "ledger": LEDGER,
    "policy": POLICY,
    "devicehub": DEVICEHUB,
    "webhooks": WEBHOOKS,
    "gateway": GATEWAY,
    "ops": OPS,
}

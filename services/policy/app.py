"""Assembles the policy service: settings (the master key and the ledger's address among them),
schema and migrations, its stream, and the background work it starts once PostgreSQL and NATS are
up: the outbox relay, the ledger channel, and the follower of the ledger's events that keeps the
member-state cache honest."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from onecard.policy.v1 import policy_pb2, policy_pb2_grpc
from runtime.events import EventFollower, OutboxRelay, StreamSpec
from runtime.nats_access import NatsAccess
from runtime.grpc_server import ServiceApp
from runtime.sealing import parse_master_key
from runtime.settings import ServiceSettings
from services.policy.domain import DEFAULT_PUBLISHED_CACHE_S, DEFAULT_RULE_SET_CACHE, PublishedCache, RuleSetCache
from services.policy.ledger_client import LedgerClient
from services.policy.servicer import PolicyServicer
from services.policy.state_cache import DEFAULT_MEMBER_STATE_CACHE_S, DEFAULT_MEMBER_STATE_CACHE_SIZE, MemberStateCache

SCHEMA = "policy"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("POLICY", ["policy.>"])
# The ledger's events, followed by each replica to drop the member states it holds.
LEDGER_STREAM = "LEDGER"
LEDGER_SUBJECTS = "ledger.>"
# Member states are dropped from the cache as the ledger's events pass (an ordered consumer).
NATS_ACCESS = NatsAccess(owns=(STREAM,), follows=(LEDGER_STREAM,))
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

DEFAULT_LEDGER_TIMEOUT_S = 5.0


class PolicySettings(ServiceSettings):
    # ONECARD_POLICY_MASTER_KEY: 32 bytes as 64 hex digits or base64; seals bundle signing keys at rest.
    policy_master_key: SecretStr
    # ONECARD_LEDGER_TARGET: host:port of the ledger, asked for a member's purses and usage counters.
    ledger_target: str = Field(min_length=1)
    ledger_timeout_s: float = Field(default=DEFAULT_LEDGER_TIMEOUT_S, gt=0)
    # Parsed rule sets kept in memory, by tenant and version (versions never change).
    rule_set_cache: int = Field(default=DEFAULT_RULE_SET_CACHE, ge=1, le=100_000)
    # How long a replica trusts what it read of a tenant's published version before reading it
    # again: a publication reaches the replica that made it at once, the others within this.
    # 0 reads PostgreSQL on every Evaluate.
    published_cache_s: float = Field(default=DEFAULT_PUBLISHED_CACHE_S, ge=0, le=60)
    # ONECARD_MEMBER_STATE_CACHE_S: how long a replica may answer Evaluate and DryRun from the
    # member's purses and counters it read before (each replica follows the ledger's events and
    # drops a member's state as soon as it changes). 0 turns the cache off: every Evaluate reads
    # the ledger. Pay always reads the ledger.
    member_state_cache_s: float = Field(default=DEFAULT_MEMBER_STATE_CACHE_S, ge=0, le=60)
    # ONECARD_MEMBER_STATE_CACHE_SIZE: members remembered per replica (least recently used dropped).
    member_state_cache_size: int = Field(default=DEFAULT_MEMBER_STATE_CACHE_SIZE, ge=1, le=10_000_000)

    @field_validator("policy_master_key")
    @classmethod
    def _master_key_decodes(cls, value: SecretStr) -> SecretStr:
        parse_master_key(value.get_secret_value())
        return value

    @property
    def master_key(self) -> bytes:
        return parse_master_key(self.policy_master_key.get_secret_value())


def build_app(settings: PolicySettings) -> ServiceApp:
    master_key = settings.master_key
    ledger = LedgerClient(target=settings.ledger_target, timeout_s=settings.ledger_timeout_s)
    cache = RuleSetCache(settings.rule_set_cache)
    published = PublishedCache(settings.published_cache_s)
    states = MemberStateCache(max_age_s=settings.member_state_cache_s, size=settings.member_state_cache_size)

    async def on_ready(app: ServiceApp) -> None:
        app.spawn(ledger.hold(tls=app.tls), name="ledger-channel")
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        if states.enabled:
            follower = EventFollower(nc=app.nc, stream=LEDGER_STREAM, filter_subject=LEDGER_SUBJECTS,
                                     handler=states.on_ledger_event)
            states.feed = lambda: follower.subscriptions if follower.live else 0
            app.spawn(follower.run(), name="ledger-events")

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(app=app, ledger=ledger, master_key=master_key, cache=cache, published=published,
                           states=states),
            server)

    return ServiceApp(
        name="policy",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
    )

"""Assembles the policy service from its settings (services.policy.settings, the master key and
the ledger's address among them): schema and migrations, its stream, and the background work it
starts once PostgreSQL and NATS are up: the outbox relay, the ledger channel, and the follower of
the ledger's events that keeps the member-state cache honest."""

from __future__ import annotations

from pathlib import Path

from onecard.policy.v1 import policy_pb2, policy_pb2_grpc
from runtime.events import EventFollower, OutboxRelay, StreamSpec
from runtime.nats_access import NatsAccess
from runtime.grpc_server import ServiceApp
from services.policy.domain import PublishedCache, RuleSetCache
from services.policy.ledger_client import LedgerClient
from services.policy.servicer import PolicyServicer
from services.policy.settings import PolicySettings
from services.policy.state_cache import MemberStateCache

SCHEMA = "policy"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("POLICY", ["policy.>"])
# The ledger's events, followed by each replica to drop the member states it holds.
LEDGER_STREAM = "LEDGER"
LEDGER_SUBJECTS = "ledger.>"
# Member states are dropped from the cache as the ledger's events pass (an ordered consumer).
NATS_ACCESS = NatsAccess(owns=(STREAM,), follows=(LEDGER_STREAM,))
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


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

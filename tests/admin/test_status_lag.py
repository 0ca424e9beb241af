"""`onecard-admin status` while NATS is away: the test's own nats-server (one per test,
tests/conftest.py) is paused with SIGSTOP, events are made meanwhile, and status shows the backlog
grow in the writer's outbox; with SIGCONT it is published and consumed, and status shows the
outbox and the consumer's lag back at 0. Polled with a deadline, never a fixed wait."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from devstack.servers import Nats
from onecard.identity.v1 import identity_pb2 as pb
from onecard_admin.settings import AdminSettings
from services.ledger.app import build_app as build_ledger
from services.ledger.consumer import IDENTITY_DURABLE
from tests.admin.cli import admin_json, admin_settings
from tests.conftest import Launch, RunningService
from tests.ledger.conftest import ledger_settings

PATIENCE_S = 60.0
POLL_S = 0.1
MEMBERS = 5


@contextmanager
def paused(server: Nats) -> Iterator[None]:
    """The nats-server process stopped (it keeps its sockets, answers nothing) until the block ends."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def status_until(settings: AdminSettings, done: Callable[[dict[str, Any]], bool]) -> tuple[int, dict[str, Any]]:
    """Run status until ``done`` holds of its JSON, or fail at the deadline with the last one seen."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        code, doc = await admin_json(settings, "status")
        if done(doc):
            return code, doc
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(POLL_S)


def service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in doc["services"] if row["service"] == name)


def consumer_lag(doc: dict[str, Any]) -> int | None:
    lags = [row["lag"] for row in doc["consumers"] if row["stream"] == "IDENTITY"
            and row["consumer"].startswith(IDENTITY_DURABLE)]
    return sum(lags) if lags else None


def stream_messages(doc: dict[str, Any]) -> int:
    return next(row["messages"] for row in doc["streams"] if row["stream"] == "IDENTITY")


async def test_status_shows_the_outbox_grow_while_nats_is_paused_and_drain_when_it_is_back(
        identity: RunningService, launch: Launch, database_url: str, nats_url: str, nats_server: Nats) -> None:
    ledger = await launch(build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url)))
    # A short timeout: with NATS paused the JetStream read waits it out, once per status.
    settings = admin_settings(nats_url, identity=identity.target, ledger=ledger.target).model_copy(
        update={"admin_timeout_s": 1.0})
    tenant = (await identity.stub.CreateTenant(pb.CreateTenantRequest(
        name="Lag", kind=pb.TENANT_KIND_ENTERPRISE, time_zone="Asia/Shanghai", currency="CNY"))).tenant

    code, before = await status_until(settings, lambda d: d["nats"] == "ok" and consumer_lag(d) == 0
                                      and service(d, "identity")["outbox_unpublished"] == 0)
    assert code == 0, before
    published_before = stream_messages(before)

    with paused(nats_server):
        for n in range(MEMBERS):
            await identity.stub.CreateMember(pb.CreateMemberRequest(
                tenant_id=tenant.tenant_id, external_number=f"L{n}", name=f"Member {n}"))
        # The events wait in identity's outbox; JetStream cannot even be asked.
        code, during = await status_until(settings, lambda d: service(d, "identity")["outbox_unpublished"] >= MEMBERS)
        assert code == 1 and during["nats"] != "ok" and during["consumers"] == [], during
        assert any(problem.startswith("nats:") for problem in during["problems"])
        assert service(during, "identity")["outbox_oldest_age_s"] > 0

    code, after = await status_until(settings, lambda d: d["nats"] == "ok" and consumer_lag(d) == 0
                                     and service(d, "identity")["outbox_unpublished"] == 0
                                     and stream_messages(d) >= published_before + MEMBERS)
    assert code == 0, after
    assert service(after, "identity")["outbox_oldest_age_s"] == 0


async def test_status_names_a_pending_migration_and_one_from_a_newer_release(
        identity: RunningService, database_url: str, nats_url: str) -> None:
    import asyncpg

    settings = admin_settings(nats_url, identity=identity.target)
    conn = await asyncpg.connect(database_url)
    try:
        # As if the process shipped a file the schema lacks, and the schema had one the process does not ship.
        await conn.execute("DELETE FROM identity.schema_migrations WHERE component = 'identity' AND version = 5")
        await conn.execute("INSERT INTO identity.schema_migrations (component, version, name, checksum)"
                           " VALUES ('identity', 999, 'from_the_future', 'x')")
    finally:
        await conn.close()
    code, doc = await admin_json(settings, "status")
    row = service(doc, "identity")
    assert code == 1 and row["migrations_pending"] == ["identity/0005_miniprogram"], row
    assert row["migrations_applied"] == row["migrations_known"] - 1
    assert "identity/0999_from_the_future" in row["detail"]
    assert doc["problems"] == ["identity: migrations pending: identity/0005_miniprogram"]

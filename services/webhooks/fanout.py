"""The mesh's events, as webhooks consumes them: each durable consumer's handler turns an event
into a partner-facing message (services.webhooks.domain) and writes one pending delivery per
subscribed endpoint, in the transaction that records the event as processed
(runtime.events.IdempotentConsumer), so a redelivered event fans out once.

Ledger events name accounts, not members: the member of a transfer is the owner of its member
account, asked of the ledger (GetBalances by account ids) once per account and remembered in
``account_owners`` (an account's owner never changes). The ledger is asked only when some endpoint
of the tenant subscribes to the event's type.

identity's grant events keep each endpoint's scopes current: a changed grant replaces them (a
delivery whose type they no longer read is dropped), a revoked one disables the client's endpoints.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import datetime

import asyncpg
import grpc

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.errors import Unavailable
from runtime.events import Event
from runtime.grpc_client import open_channel
from runtime.logs import get_logger
from runtime.mesh import MeshTLS
from services.webhooks import domain
from services.webhooks.domain import Message, Owner
from services.webhooks.store import WebhookStore

log = get_logger(__name__)

IDENTITY_STREAM = "IDENTITY"
IDENTITY_DURABLE = "webhooks-identity"
IDENTITY_FILTER = "identity.>"
LEDGER_STREAM = "LEDGER"
LEDGER_DURABLE = "webhooks-ledger"
LEDGER_FILTER = "ledger.>"
DEVICEHUB_STREAM = "DEVICEHUB"
DEVICEHUB_DURABLE = "webhooks-devicehub"
DEVICEHUB_FILTER = "devicehub.alarm.raised"
MAX_ACCOUNTS_PER_CALL = 100

Clock = Callable[[], datetime]


def _enum_name(enum: object, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()  # type: ignore[attr-defined]


class LedgerOwners:
    """Asks the ledger who owns accounts. The channel is opened and closed in ``hold``."""

    def __init__(self, *, target: str, timeout_s: float):
        self._target = target
        self._timeout_s = timeout_s
        self._stub: ledger_pb2_grpc.LedgerServiceStub | None = None

    async def hold(self, *, tls: MeshTLS | None) -> None:
        channel = open_channel(self._target, tls=tls, server_name="ledger")
        self._stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        try:
            await asyncio.Event().wait()
        finally:
            self._stub = None
            await channel.close()

    async def owners(self, *, tenant_id: str, account_ids: list[str]) -> dict[str, Owner]:
        if self._stub is None:
            raise Unavailable("webhooks is starting: ledger not connected yet", reason="STARTING")
        found: dict[str, Owner] = {}
        for start in range(0, len(account_ids), MAX_ACCOUNTS_PER_CALL):
            chunk = account_ids[start:start + MAX_ACCOUNTS_PER_CALL]
            try:
                answer = await self._stub.GetBalances(
                    ledger_pb2.GetBalancesRequest(tenant_id=tenant_id, account_ids=chunk), timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    continue
                raise
            for entry in answer.accounts:
                account = entry.account
                found[account.account_id] = Owner(
                    owner_kind=_enum_name(ledger_pb2.OwnerKind, account.owner_kind, "OWNER_KIND_"),
                    owner_id=account.owner_id,
                    purse_kind=_enum_name(ledger_pb2.PurseKind, account.purse_kind, "PURSE_KIND_"))
        return found


class FanOut:
    """The handlers of the three durable consumers."""

    def __init__(self, *, ledger: LedgerOwners, clock: Clock):
        self._ledger = ledger
        self._clock = clock

    async def _deliver(self, conn: asyncpg.Connection, event: Event, message: Message | None) -> None:
        if message is None:
            return
        made = await WebhookStore.fan_out(conn, message=message, event_id=event.event_id,
                                          occurred_at=event.occurred_at, now=self._clock())
        if made:
            log.info("event fanned out", event_type=message.event_type, deliveries=made)

    @staticmethod
    async def _wanted(conn: asyncpg.Connection, *, tenant_id: str, event_type: str) -> bool:
        return bool(await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM endpoints WHERE tenant_id = $1 AND state = 'enabled'"
            " AND $2 = ANY(event_types))", uuid.UUID(tenant_id), event_type))

    async def on_identity_event(self, conn: asyncpg.Connection, event: Event) -> None:
        data, subject = event.data, event.subject or event.type
        tenant_id = str(data.get("tenant_id") or event.tenant_id or "")
        if not tenant_id:
            return
        if subject == "identity.api_client.granted":
            await WebhookStore.grant_changed(conn, tenant_id=uuid.UUID(tenant_id), client_id=str(data["client_id"]),
                                             scopes=[str(s) for s in data.get("scopes", [])], now=self._clock())
            return
        if subject == "identity.api_client.revoked":
            await WebhookStore.grant_revoked(conn, tenant_id=uuid.UUID(tenant_id), client_id=str(data["client_id"]),
                                             now=self._clock())
            return
        await self._deliver(conn, event, domain.identity_message(subject=subject, tenant_id=tenant_id, data=data))

    async def on_ledger_event(self, conn: asyncpg.Connection, event: Event) -> None:
        data, subject = event.data, event.subject or event.type
        tenant_id = str(data.get("tenant_id") or event.tenant_id or "")
        if not tenant_id:
            return
        if subject == "ledger.transfer.posted":
            event_type = domain.transfer_kind_type(str(data.get("kind", "")))
            if event_type is None or not await self._wanted(conn, tenant_id=tenant_id, event_type=event_type):
                return
            owners = await self._owners(conn, tenant_id=tenant_id,
                                        account_ids=[str(p["account_id"]) for p in data.get("postings", [])])
            message = domain.transfer_message(event_type=event_type, tenant_id=tenant_id, data=data, owners=owners)
        elif subject == "ledger.offline.shortfall":
            message = domain.shortfall_message(tenant_id=tenant_id, data=data)
        elif subject == "ledger.grant_batch.finished":
            message = domain.grant_batch_message(tenant_id=tenant_id, data=data)
        elif subject == "ledger.balance.low":
            message = domain.balance_low_message(tenant_id=tenant_id, data=data)
        else:
            return
        await self._deliver(conn, event, message)

    async def on_devicehub_event(self, conn: asyncpg.Connection, event: Event) -> None:
        tenant_id = str(event.data.get("tenant_id") or event.tenant_id or "")
        if tenant_id and (event.subject or event.type) == "devicehub.alarm.raised":
            await self._deliver(conn, event, domain.alarm_message(tenant_id=tenant_id, data=event.data))

    async def _owners(self, conn: asyncpg.Connection, *, tenant_id: str, account_ids: list[str]) -> dict[str, Owner]:
        tenant = uuid.UUID(tenant_id)
        known = await WebhookStore.owners(conn, tenant_id=tenant, account_ids=account_ids)
        missing = [a for a in dict.fromkeys(account_ids) if a not in known]
        if missing:
            told = await self._ledger.owners(tenant_id=tenant_id, account_ids=missing)
            await WebhookStore.remember_owners(conn, tenant_id=tenant, owners=told)
            known.update(told)
        return known

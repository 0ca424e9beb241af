"""Domain events: the transactional outbox, its relay to JetStream, and idempotent consumers.

A service writes an event with ``emit(conn, ...)`` inside the transaction that makes the change,
so the event exists exactly when the change does. The relay publishes unpublished rows to
JetStream with ``Nats-Msg-Id`` set to the event id, so a row published twice (relay killed after
publishing, before marking) is dropped by the stream's duplicate window. A consumer records each
event id in ``processed_events`` in the same transaction as its effect, so a redelivery does
nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from runtime.logs import bind_request_id, get_logger

log = get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
TYPE_HEADER = "Onecard-Event-Type"
DEFAULT_DUPLICATE_WINDOW_S = 15 * 60
DEFAULT_RELAY_BATCH = 200
DEFAULT_RELAY_POLL_S = 0.5
# How long the relay waits for the stream to acknowledge a batch it sent.
DEFAULT_RELAY_ACK_TIMEOUT_S = 5.0
DEFAULT_CONSUMER_BATCH = 64
DEFAULT_FETCH_TIMEOUT_S = 1.0
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_MAX_DELIVER = 20


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream that one service owns: its name and the subjects it captures."""

    name: str
    subjects: list[str]
    duplicate_window_s: int = DEFAULT_DUPLICATE_WINDOW_S


@dataclass(frozen=True)
class Event:
    event_id: str
    type: str
    tenant_id: str | None
    occurred_at: str
    data: dict[str, Any]
    subject: str = ""

    @classmethod
    def from_bytes(cls, raw: bytes, *, subject: str = "") -> Event:
        body = json.loads(raw)
        return cls(
            event_id=body["event_id"],
            type=body["type"],
            tenant_id=body.get("tenant_id"),
            occurred_at=body["occurred_at"],
            data=body.get("data", {}),
            subject=subject,
        )


def outbox_channel(schema: str) -> str:
    # _notify_relay builds the same name in SQL; keep the two alike.
    return f"{schema}_outbox"


def _outbox_row(
    *, subject: str, event_type: str, data: dict[str, Any], tenant_id: str | None, event_id: str | None
) -> tuple[uuid.UUID, str, bytes, dict[str, str]]:
    event_id = event_id or str(uuid.uuid4())
    body = {
        "event_id": event_id,
        "type": event_type,
        "tenant_id": tenant_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "data": data,
    }
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return uuid.UUID(event_id), subject, payload, {TYPE_HEADER: event_type}


_INSERT_OUTBOX = "INSERT INTO outbox (event_id, subject, payload, headers) VALUES ($1, $2, $3, $4)"


# Wakes the schema's relay at commit; the channel is outbox_channel(current schema), named in SQL,
# so a bulk write can fold it into its own statement.
NOTIFY_RELAY_SQL = "pg_notify(current_schema() || '_outbox', '')"


async def _notify_relay(conn: asyncpg.Connection) -> None:
    await conn.execute(f"SELECT {NOTIFY_RELAY_SQL}")


async def emit(
    conn: asyncpg.Connection,
    *,
    subject: str,
    event_type: str,
    data: dict[str, Any],
    tenant_id: str | None = None,
    event_id: str | None = None,
) -> str:
    """Write an event to this schema's outbox, in the caller's transaction. Answers the event id."""
    if not conn.is_in_transaction():
        raise RuntimeError("emit() must run inside the transaction that makes the change")
    row = _outbox_row(subject=subject, event_type=event_type, data=data, tenant_id=tenant_id, event_id=event_id)
    await conn.execute(_INSERT_OUTBOX, *row)
    await _notify_relay(conn)
    return str(row[0])


def outbox_rows(events: list[PendingEvent]) -> list[tuple[uuid.UUID, str, bytes, dict[str, str]]]:
    """The outbox rows (event_id, subject, payload, headers) of events, for a store that writes
    them in its own bulk statement (then it must also run ``NOTIFY_RELAY_SQL``)."""
    return [_outbox_row(subject=e.subject, event_type=e.event_type, data=e.data, tenant_id=e.tenant_id,
                        event_id=e.event_id) for e in events]


@dataclass(frozen=True)
class PendingEvent:
    """One event for ``emit_many``; the fields mean what ``emit``'s arguments mean."""

    subject: str
    event_type: str
    data: dict[str, Any]
    tenant_id: str | None = None
    event_id: str | None = None


# A backlog is counted up to this many rows (the answer says "at least" by being this number), so a
# huge one cannot make the count slow.
MAX_OUTBOX_COUNTED = 100_000
# Both walk the outbox's partial index of unpublished rows (by id, so the first is the oldest).
_OUTBOX_BACKLOG_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT $1) AS waiting)"
    " AS unpublished,"
    " coalesce((SELECT (extract(epoch FROM clock_timestamp() - created_at) * 1000)::bigint FROM outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT 1), 0) AS oldest_ms")


async def outbox_backlog(conn: asyncpg.Connection, *, limit: int) -> tuple[int, int]:
    """Events written and not yet relayed to JetStream (counted up to ``limit``), and how long the
    oldest has waited, in ms (0 when none)."""
    row = await conn.fetchrow(_OUTBOX_BACKLOG_SQL, limit)
    return row["unpublished"], max(0, row["oldest_ms"])


async def emit_many(conn: asyncpg.Connection, *, events: list[PendingEvent]) -> list[str]:
    """``emit`` for a batch: one pipelined insert and one wake-up of the relay instead of three
    round trips per event, for bulk changes (imports) that make thousands of events at once."""
    if not conn.is_in_transaction():
        raise RuntimeError("emit_many() must run inside the transaction that makes the change")
    if not events:
        return []
    rows = outbox_rows(events)
    await conn.executemany(_INSERT_OUTBOX, rows)
    await _notify_relay(conn)
    return [str(row[0]) for row in rows]


async def ensure_streams(js: JetStreamContext, streams: list[StreamSpec], *, replicas: int = 1) -> None:
    """Create or update each stream: file storage, so an acknowledged publish survives a restart.

    Durability of each write (fsync before the ack) is the server's ``sync_interval: always``,
    which devstack and the Kubernetes manifests set. In a NATS cluster, ``replicas`` (3) keeps a
    stream through the loss of a node.
    """
    for spec in streams:
        config = StreamConfig(
            name=spec.name,
            subjects=spec.subjects,
            storage=StorageType.FILE,
            duplicate_window=float(spec.duplicate_window_s),
            num_replicas=replicas,
        )
        try:
            await js.stream_info(spec.name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation a library swallowed. nats-py's publish awaits the stream's ack with
    asyncio.wait_for, which on 3.11 returns the ack and drops a cancellation that lands at the same
    moment; without this the relay would outlive its shutdown."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class OutboxRelay:
    """Publishes a schema's unpublished outbox rows, oldest first, then marks them published."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        schema: str,
        batch_size: int = DEFAULT_RELAY_BATCH,
        poll_interval_s: float = DEFAULT_RELAY_POLL_S,
        ack_timeout_s: float = DEFAULT_RELAY_ACK_TIMEOUT_S,
    ):
        self._pool = pool
        self._js = js
        self._schema = schema
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._ack_timeout_s = ack_timeout_s
        self._wake = asyncio.Event()

    async def publish_pending(self) -> int:
        """One batch: publish and mark in one transaction. Answers how many were published."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, event_id, subject, payload, headers FROM outbox"
                " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch_size,
            )
            # Sent one after the other on the one connection (the stream stores them in this
            # order), without waiting for each ack before the next: then every ack, or none of
            # the batch counts as published and it is sent again (the event id is the stream's
            # Msg-Id, so a second sending within the duplicate window is dropped by the server).
            acks = []
            try:
                for row in rows:
                    headers = {**row["headers"], MSG_ID_HEADER: str(row["event_id"])}
                    acks.append(await self._js.publish_async(row["subject"], row["payload"], headers=headers))
                if acks:
                    async with asyncio.timeout(self._ack_timeout_s):
                        await asyncio.gather(*acks)
            except BaseException:
                for ack in acks:
                    ack.cancel()
                raise
            if rows:
                await conn.execute(
                    "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                    [r["id"] for r in rows],
                )
            return len(rows)

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Relay until cancelled; wakes on NOTIFY from ``emit`` and polls as a fallback."""
        listener: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if listener is None or listener.is_closed():
                        listener = await self._pool.acquire()
                        await listener.add_listener(outbox_channel(self._schema), self._on_notify)
                    while await self.publish_pending() == self._batch_size:
                        _raise_if_cancelled()
                    _raise_if_cancelled()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the relay retries whatever failed
                    log.warning("outbox relay retrying", error=type(exc).__name__, detail=str(exc)[:200])
                    if listener is not None:
                        await self._drop_listener(listener)
                        listener = None
                self._wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation that
                # races the timeout into a TimeoutError, which would keep the relay alive forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()
        finally:
            if listener is not None:
                await self._drop_listener(listener)

    async def _drop_listener(self, listener: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            await listener.remove_listener(outbox_channel(self._schema), self._on_notify)
        with contextlib.suppress(Exception):
            await self._pool.release(listener)


Handler = Callable[[asyncpg.Connection, Event], Awaitable[None]]


@dataclass
class IdempotentConsumer:
    """A durable pull consumer whose handler runs once per event id, in a database transaction.

    The handler gets the connection of the transaction that also records the event id; the
    message is acknowledged only after that transaction commits. A handler error rolls both back
    and the message is redelivered later.
    """

    pool: asyncpg.Pool
    js: JetStreamContext
    stream: str
    durable: str
    filter_subject: str
    handler: Handler
    batch_size: int = DEFAULT_CONSUMER_BATCH
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    ack_wait_s: float = DEFAULT_ACK_WAIT_S
    max_deliver: int = DEFAULT_MAX_DELIVER
    # In stream order even when a handler fails: the failed message and the rest of its batch go
    # back together, and the next fetch waits until they are due again, so they come first.
    in_order: bool = False
    retry_delay_s: float = 1.0
    _sub: Any = field(default=None, init=False)
    _waiting_for_stream: bool = field(default=False, init=False)

    async def _subscribe(self) -> Any:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            filter_subject=self.filter_subject,
        )
        return await self.js.pull_subscribe(self.filter_subject, durable=self.durable, stream=self.stream, config=config)

    async def handle(self, msg: Any) -> bool:
        """Apply one message; answers False when it had been processed before."""
        event = Event.from_bytes(msg.data, subject=msg.subject)
        bind_request_id(event.event_id)
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.durable,
                event.event_id,
            )
            if fresh:
                await self.handler(conn, event)
        return bool(fresh)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()

    async def _run(self) -> None:
        while True:
            try:
                if self._sub is None:
                    self._sub = await self._subscribe()
                try:
                    msgs = await self._sub.fetch(self.batch_size, timeout=self.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    _raise_if_cancelled()
                    continue
                _raise_if_cancelled()
                for index, msg in enumerate(msgs):
                    try:
                        await self.handle(msg)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - redelivered after a delay
                        log.warning("event handler failed", consumer=self.durable, error=type(exc).__name__)
                        if not self.in_order:
                            with contextlib.suppress(Exception):
                                await msg.nak(delay=self.retry_delay_s)
                            continue
                        for later in msgs[index:]:
                            with contextlib.suppress(Exception):
                                await later.nak(delay=self.retry_delay_s)
                        await asyncio.sleep(self.retry_delay_s * 1.5)
                        break
                    await msg.ack()
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                # The stream's owner has not created it yet (it starts later, or not at all in a
                # test of this service alone): wait quietly, say so once.
                if not self._waiting_for_stream:
                    log.info("waiting for the stream", consumer=self.durable, stream=self.stream)
                    self._waiting_for_stream = True
                self._sub = None
                await asyncio.sleep(1.0)
            except Exception as exc:  # noqa: BLE001 - NATS or PostgreSQL away: wait and retry
                log.warning("consumer retrying", consumer=self.durable, error=type(exc).__name__)
                self._sub = None
                await asyncio.sleep(1.0)


EventCallback = Callable[[Event], None]


@dataclass
class EventFollower:
    """Every event of ``filter_subject`` on ``stream`` from the moment it subscribes on, in stream
    order, handed to ``handler`` (synchronous, quick: it runs on the event loop), with no
    acknowledgements and no ``processed_events`` bookkeeping: for a replica's in-memory state (a
    cache that drops entries), where each replica needs every event and a repeat is harmless.

    An ordered ephemeral push consumer (memory storage, one replica, deleted when the process
    goes): nats-py re-creates it from the next stream sequence after a missed heartbeat or a
    sequence gap, so events arrive late rather than never. ``live`` says whether the subscription
    stands and NATS is connected; ``subscriptions`` counts the subscriptions made, so a cache can
    tell that it may have missed events in between (each new one starts at "now").
    """

    nc: Any  # nats.aio.client.Client
    stream: str
    filter_subject: str
    handler: EventCallback
    idle_heartbeat_s: float = 2.0
    subscriptions: int = field(default=0, init=False)
    _subscribed: bool = field(default=False, init=False)
    _waiting_for_stream: bool = field(default=False, init=False)

    @property
    def live(self) -> bool:
        return self._subscribed and self.nc.is_connected

    async def run(self) -> None:
        while True:
            sub = None
            try:
                sub = await self.nc.jetstream().subscribe(
                    self.filter_subject, stream=self.stream, ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW, idle_heartbeat=self.idle_heartbeat_s)
                self.subscriptions += 1
                self._subscribed = True
                self._waiting_for_stream = False
                async for msg in sub.messages:
                    try:
                        self.handler(Event.from_bytes(msg.data, subject=msg.subject))
                    except Exception as exc:  # noqa: BLE001 - one bad event must not stop the others
                        log.warning("event follower handler failed", subject=msg.subject, error=type(exc).__name__)
                # The subscription ended (NATS closed it): subscribe again.
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                if not self._waiting_for_stream:
                    log.info("waiting for the stream", follower=self.filter_subject, stream=self.stream)
                    self._waiting_for_stream = True
                await asyncio.sleep(1.0)
            except Exception as exc:  # noqa: BLE001 - NATS away: wait and retry
                log.warning("event follower retrying", follower=self.filter_subject, error=type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                self._subscribed = False
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

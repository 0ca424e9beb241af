"""The dispatcher: claims due deliveries (``FOR UPDATE SKIP LOCKED`` and a lease, so replicas
share the work and never send one twice at once), sends each, logs the attempt, and schedules the
next one with back-off or gives up after the retry window.

Deliveries of one (endpoint, member) go strictly one after another: the claim takes a delivery
only when no earlier one of the same order key is pending, so the next waits until the previous
is delivered or given up; other members flow in parallel (up to ``concurrency`` sends at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta

from runtime.logs import get_logger
from services.webhooks import domain
from services.webhooks.domain import DeliveryStatus, EndpointState, RetryPolicy
from services.webhooks.sender import Sender
from services.webhooks.store import DeliveryRow, WebhookStore

log = get_logger(__name__)

DEFAULT_POLL_S = 0.5
DEFAULT_BATCH = 50
DEFAULT_CONCURRENCY = 16

Clock = Callable[[], datetime]
WallClock = Callable[[], datetime]


class Dispatcher:
    def __init__(self, *, store: WebhookStore, sender: Sender, clock: Clock, wall_clock: WallClock,
                 retry: RetryPolicy, disable_after_s: float, poll_s: float = DEFAULT_POLL_S,
                 batch: int = DEFAULT_BATCH, concurrency: int = DEFAULT_CONCURRENCY):
        self._store = store
        self._sender = sender
        self._clock = clock
        # The signature's timestamp is the real time of the send: receivers check it against theirs.
        self._wall_clock = wall_clock
        self._retry = retry
        self._disable_after_s = disable_after_s
        self._poll_s = poll_s
        self._batch = batch
        self._sending = asyncio.Semaphore(concurrency)
        # Deliveries this dispatcher is sending: never claimed twice here, even past a lease.
        self._in_flight: set[object] = set()
        self.wake = asyncio.Event()

    async def run(self) -> None:
        await self._sender.open()
        try:
            while True:
                try:
                    while await self.dispatch_once() >= self._batch:
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("dispatch round failed", error=type(exc).__name__)
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await self.wake.wait()
        finally:
            await self._sender.close()

    async def dispatch_once(self) -> int:
        """One round: claim what is due and send it all (members in parallel). Answers how many."""
        claimed = [d for d in await self._store.claim_due(now=self._clock(), limit=self._batch)
                   if d.delivery_id not in self._in_flight]
        if claimed:
            await asyncio.gather(*(self._send_guarded(d) for d in claimed))
        return len(claimed)

    async def _send_guarded(self, delivery: DeliveryRow) -> None:
        self._in_flight.add(delivery.delivery_id)
        async with self._sending:
            try:
                await self.send(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the lease runs out and it is tried again
                log.warning("delivery failed to run", delivery_id=str(delivery.delivery_id), error=type(exc).__name__)
            finally:
                self._in_flight.discard(delivery.delivery_id)

    async def send(self, delivery: DeliveryRow) -> str:
        endpoint = await self._store.endpoint_for_delivery(delivery)
        now = self._clock()
        if endpoint.state != EndpointState.ENABLED:
            return DeliveryStatus.PENDING
        if not domain.readable(delivery.event_type, endpoint.scopes):
            await self._store.drop(delivery, now=now)
            log.info("delivery dropped: the client's scopes no longer read it", event_type=delivery.event_type)
            return DeliveryStatus.DROPPED
        secrets = await self._store.signing_secrets(tenant_id=delivery.tenant_id, endpoint_id=delivery.endpoint_id,
                                                    now=now)
        sent_at = self._wall_clock()
        headers = {
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": domain.signature_header(secrets=secrets, message_id=delivery.message_id,
                                                         timestamp=sent_at, body=delivery.payload),
        }
        result = await self._sender.send(url=endpoint.url, allow_private=endpoint.allow_private_targets,
                                         headers=headers, body=delivery.payload, started_at=now)
        finished = self._clock()
        next_at: datetime | None = None
        if not result.delivered and not self._retry.gives_up(retry_from=delivery.retry_from, now=finished):
            next_at = finished + timedelta(seconds=self._retry.delay_s(delivery.attempts + 1))
        status = await self._store.record_attempt(
            delivery=delivery, started_at=result.started_at, latency_ms=result.latency_ms,
            response_status=result.response_status, error_kind=result.error_kind,
            response_body=result.response_body, delivered=result.delivered, next_attempt_at=next_at,
            disable_after_s=self._disable_after_s, now=finished)
        log.info("delivery attempt", delivery_id=str(delivery.delivery_id), attempt=delivery.attempts + 1,
                 status=result.response_status, error_kind=result.error_kind or None, latency_ms=result.latency_ms,
                 outcome=status)
        return status

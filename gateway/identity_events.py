"""The gateway's one NATS connection: it follows identity's grant events so that a revoked grant's
tokens stop at once (gateway.grants says what happens without it: they stop within the re-check).

The gateway signs in to NATS as ``gateway`` (its nkey, TLS with its certificate) and may do only
what its account in services.nats_accounts allows: follow the IDENTITY stream with an ordered
consumer. It publishes nothing and keeps no durable state there. A NATS that is away is waited for, in the background;
the gateway serves meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib

import nats

from gateway.grants import GRANT_EVENTS, GrantCache
from runtime.events import EventFollower
from runtime.logs import get_logger
from runtime.mesh import MeshTLS
from runtime.nats_access import connect_options

log = get_logger(__name__)

NAME = "gateway"
IDENTITY_STREAM = "IDENTITY"
CONNECT_RETRY_S = 1.0
CONNECT_TIMEOUT_S = 2


async def _disconnected() -> None:
    log.warning("nats disconnected: revoked grants now stop at the next re-check with identity")


async def _reconnected() -> None:
    log.info("nats reconnected")


async def _error(exc: Exception) -> None:
    log.warning("nats error", error=type(exc).__name__, detail=str(exc)[:200])


async def follow_grant_events(*, url: str, seed: str | None, tls: MeshTLS | None, tls_name: str,
                              grants: GrantCache) -> None:
    """Run until cancelled: connect (retrying), then feed identity's api_client events to ``grants``."""
    while True:
        try:
            nc = await nats.connect(url, name="onecard-gateway", connect_timeout=CONNECT_TIMEOUT_S,
                                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_error,
                                    disconnected_cb=_disconnected, reconnected_cb=_reconnected,
                                    **connect_options(name=NAME, seed=seed, tls=tls, tls_name=tls_name))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - NATS away: the gateway serves on, and retries
            log.info("waiting for nats", error=type(exc).__name__)
            await asyncio.sleep(CONNECT_RETRY_S)
            continue
        try:
            follower = EventFollower(nc=nc, stream=IDENTITY_STREAM, filter_subject=GRANT_EVENTS,
                                     handler=grants.on_identity_event)
            grants.feed = lambda: follower.subscriptions if follower.live else 0
            log.info("following identity's grant events")
            await follower.run()
        finally:
            grants.feed = lambda: 0
            with contextlib.suppress(Exception):
                await nc.close()

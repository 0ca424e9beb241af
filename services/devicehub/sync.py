"""What devices know, kept current: seven kinds, each versioned, sent as the change since the
version the device holds (``full`` when it holds nothing, or when the source cannot answer a
change since it).

Sources: TRUST_LIST and REVOCATIONS from codegen, CARD_BLACKLIST and MEMBER_BLOCKS from identity
(the directory feed: version = feed sequence), POLICY_BUNDLE from policy (version = rule set
version, the whole signed bundle), ACCESS_RULES from the transactions part (whole document),
CONFIG from the device's own row.

Pushes: the SyncListener hears the events of identity, codegen, policy and devicehub on plain
NATS subscriptions (every replica hears every event and pushes to the streams it holds), and sends
every connected device of the tenant what changed within a debounce window. A device not
connected gets it on its next Hello (``catch_up``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from onecard.codegen.v1 import codegen_pb2
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2
from onecard.policy.v1 import policy_pb2
from runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from runtime.events import Event
from runtime.logs import get_logger
from services.codegen.client import revocations_since
from services.devicehub.backends import Backends
from services.devicehub.registry import (
    SUBJECT_DEVICE_CONFIG_CHANGED,
    SUBJECT_DEVICE_DECOMMISSIONED,
    SUBJECT_DEVICE_ENROLLED,
    SUBJECT_DEVICE_UPDATED,
    key_fingerprint,
)
from services.devicehub.sessions import Session, Sessions
from services.devicehub.settings import DevicehubSettings
from services.devicehub.wire import device_context

log = get_logger(__name__)

KINDS = (
    pb.SYNC_KIND_TRUST_LIST,
    pb.SYNC_KIND_REVOCATIONS,
    pb.SYNC_KIND_CARD_BLACKLIST,
    pb.SYNC_KIND_MEMBER_BLOCKS,
    pb.SYNC_KIND_POLICY_BUNDLE,
    pb.SYNC_KIND_ACCESS_RULES,
    pb.SYNC_KIND_CONFIG,
)
KIND_NAMES = {kind: pb.SyncKind.Name(kind).removeprefix("SYNC_KIND_") for kind in KINDS}
# Kinds whose content is the tenant's, the same for every device (computed once per push round).
TENANT_KINDS = frozenset(KINDS) - {pb.SYNC_KIND_CONFIG}

REVOCATIONS_PAGE = 10_000
BLACKLIST_PAGE = 10_000
FEED_PAGE = 1000
MAX_PAGES = 10_000
# How often kinds whose source failed are tried again for the streams that lack them.
RETRY_STALE_S = 5.0
_FEED_CURSOR_PREFIX = "dc1:"  # identity's directory feed cursor (services/identity/servicer.py)

_KEY_STATUS = {
    codegen_pb2.ISSUER_KEY_STATUS_SIGNING: "signing",
    codegen_pb2.ISSUER_KEY_STATUS_VERIFYING: "verifying",
    codegen_pb2.ISSUER_KEY_STATUS_RETIRED: "retired",
}
_MEMBER_STATUS = {
    identity_pb2.MEMBER_STATUS_ACTIVE: "active",
    identity_pb2.MEMBER_STATUS_FROZEN: "frozen",
    identity_pb2.MEMBER_STATUS_LEFT: "left",
}
_STATUS_KINDS = frozenset({
    identity_pb2.CHANGE_KIND_MEMBER_FROZEN,
    identity_pb2.CHANGE_KIND_MEMBER_UNFROZEN,
    identity_pb2.CHANGE_KIND_MEMBER_LEFT,
})
# A source that has nothing for the tenant yet answers one of these: nothing to sync.
_NOTHING_YET = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})


def feed_cursor(sequence: int) -> str:
    if sequence <= 0:
        return ""
    return base64.urlsafe_b64encode(f"{_FEED_CURSOR_PREFIX}{sequence}".encode()).decode().rstrip("=")


def kinds_for_subject(subject: str) -> frozenset[int]:
    """The tenant-wide sync kinds an event of this subject may change."""
    if subject.startswith("identity.member."):
        return frozenset({pb.SYNC_KIND_MEMBER_BLOCKS})
    if subject == "identity.card.lost":
        return frozenset({pb.SYNC_KIND_CARD_BLACKLIST})
    if subject == "codegen.credential.revoked":
        return frozenset({pb.SYNC_KIND_REVOCATIONS})
    if subject == "codegen.trust_list.changed":
        return frozenset({pb.SYNC_KIND_TRUST_LIST})
    if subject == "policy.ruleset.published":
        return frozenset({pb.SYNC_KIND_POLICY_BUNDLE})
    if subject.startswith("devicehub.access_rules"):
        return frozenset({pb.SYNC_KIND_ACCESS_RULES})
    return frozenset()


class Sync:
    def __init__(self, *, settings: DevicehubSettings, backends: Backends, sessions: Sessions):
        self._timeout = settings.downstream_timeout_s
        self._backends = backends
        self._sessions = sessions

    # --- one kind's update ------------------------------------------------------------------------

    async def update(self, kind: int, *, tenant_id: uuid.UUID, device_id: uuid.UUID, since: int
                     ) -> pb.SyncUpdate | None:
        """The change of ``kind`` since ``since``, or None when the device is current."""
        tenant = str(tenant_id)
        try:
            if kind == pb.SYNC_KIND_TRUST_LIST:
                return await self._trust_list(tenant, since)
            if kind == pb.SYNC_KIND_REVOCATIONS:
                return await self._revocations(tenant, since)
            if kind == pb.SYNC_KIND_CARD_BLACKLIST:
                return await self._blacklist(tenant, since)
            if kind == pb.SYNC_KIND_MEMBER_BLOCKS:
                return await self._member_blocks(tenant, since)
            if kind == pb.SYNC_KIND_POLICY_BUNDLE:
                return await self._policy_bundle(tenant, since)
            if kind == pb.SYNC_KIND_ACCESS_RULES:
                return await self._access_rules(tenant, since)
            if kind == pb.SYNC_KIND_CONFIG:
                return await self._config(tenant_id, device_id, since)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NOTHING_YET:
                return None
            raise
        raise InvalidArgument("unknown sync kind", reason="SYNC_KIND_INVALID")

    async def _trust_list(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        answer = await self._backends.codegen.GetTrustList(
            codegen_pb2.GetTrustListRequest(tenant_id=tenant, since_version=since), timeout=self._timeout)
        if answer.version < since:
            # The device holds a version the source never made (restored database): start over.
            return await self._trust_list(tenant, 0) if since else None
        if answer.version == since:
            return None
        return pb.SyncUpdate(
            kind=pb.SYNC_KIND_TRUST_LIST, from_version=since, version=answer.version, full=since == 0,
            trust_keys=[pb.TrustKey(key_id=k.key_id, public_key=k.public_key, status=_KEY_STATUS.get(k.status, ""),
                                    not_before=k.not_before if k.HasField("not_before") else None,
                                    retire_after=k.retire_after if k.HasField("retire_after") else None)
                        for k in answer.keys],
        )

    async def _revocations(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        found, version = await revocations_since(self._backends.codegen, tenant_id=tenant, since=since,
                                                 timeout_s=self._timeout, page_size=REVOCATIONS_PAGE)
        if version < since:
            # The device holds a version the source never made (restored database): start over.
            return await self._revocations(tenant, 0) if since else None
        if version == since:
            return None
        entries = [pb.Revocation(credential_id=e.credential_id, member_id=e.member_id,
                                 not_after=e.not_after if e.HasField("not_after") else None) for e in found]
        return pb.SyncUpdate(kind=pb.SYNC_KIND_REVOCATIONS, from_version=since, version=version, full=since == 0,
                             revocations=entries)

    async def _blacklist(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        cards: list[pb.BlacklistedCard] = []
        version = since
        for _ in range(MAX_PAGES):
            answer = await self._backends.identity.ListCardBlacklist(
                identity_pb2.ListCardBlacklistRequest(tenant_id=tenant, since_version=version,
                                                      page_size=BLACKLIST_PAGE),
                timeout=self._timeout)
            if not answer.cards:
                break
            cards += [pb.BlacklistedCard(card_uid=c.card_uid, member_id=c.member_id) for c in answer.cards]
            if answer.version <= version:
                break
            version = answer.version
            if len(answer.cards) < BLACKLIST_PAGE:
                break
        if version == since:
            return None
        return pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, from_version=since, version=version, full=since == 0,
                             cards=cards)

    async def _member_blocks(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        latest: dict[str, str] = {}
        version = since
        cursor = feed_cursor(since)
        for _ in range(MAX_PAGES):
            answer = await self._backends.identity.ListDirectoryChanges(
                identity_pb2.ListDirectoryChangesRequest(tenant_id=tenant, cursor=cursor, page_size=FEED_PAGE),
                timeout=self._timeout)
            for change in answer.changes:
                version = max(version, change.sequence)
                status = _MEMBER_STATUS.get(change.member.status)
                if status is None:
                    continue
                if since == 0 or change.kind in _STATUS_KINDS or status != "active" \
                        or change.member_id in latest:
                    latest[change.member_id] = status
            if not answer.changes or answer.next_cursor == cursor:
                break
            cursor = answer.next_cursor
        if version == since:
            return None
        full = since == 0
        blocks = [pb.MemberBlock(member_id=member_id, status=status) for member_id, status in latest.items()
                  if not (full and status == "active")]
        return pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=since, version=version, full=full,
                             member_blocks=blocks)

    async def _policy_bundle(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        answer = await self._backends.policy.GetBundle(policy_pb2.GetBundleRequest(tenant_id=tenant),
                                                       timeout=self._timeout)
        if answer.version == since or answer.version == 0:
            return None
        return pb.SyncUpdate(kind=pb.SYNC_KIND_POLICY_BUNDLE, from_version=since, version=answer.version, full=True,
                             document=answer.bundle)

    async def _access_rules(self, tenant: str, since: int) -> pb.SyncUpdate | None:
        tx = self._backends.tx
        if tx is None:
            return None
        version, rules_json = await tx.current_access_rules(tenant)
        if version == 0 or version == since:
            return None
        return pb.SyncUpdate(kind=pb.SYNC_KIND_ACCESS_RULES, from_version=since, version=version, full=True,
                             document=rules_json.encode())

    async def _config(self, tenant_id: uuid.UUID, device_id: uuid.UUID, since: int) -> pb.SyncUpdate | None:
        device = await self._backends.store.device(tenant_id=tenant_id, device_id=device_id)
        if device is None or device.config_version == 0 or device.config_version == since:
            return None
        return pb.SyncUpdate(kind=pb.SYNC_KIND_CONFIG, from_version=since, version=device.config_version, full=True,
                             document=device.config_json.encode())

    # --- sending to streams -----------------------------------------------------------------------

    async def push(self, session: Session, kinds: tuple[int, ...] | frozenset[int],
                   shared: dict[tuple[int, int], pb.SyncUpdate | None] | None = None) -> None:
        """Send the session what it lacks of each kind. ``shared`` caches tenant-wide updates by
        (kind, since) across the sessions of one round."""
        async with session.sync_lock:
            for kind in KINDS:
                if kind not in kinds or session.ended:
                    continue
                since = session.versions.get(kind, 0)
                try:
                    if shared is not None and kind in TENANT_KINDS and (kind, since) in shared:
                        update = shared[(kind, since)]
                    else:
                        update = await self.update(kind, tenant_id=session.tenant_id, device_id=session.device_id,
                                                   since=since)
                        if shared is not None and kind in TENANT_KINDS:
                            shared[(kind, since)] = update
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the listener tries again soon
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                    log.warning("sync source unavailable", kind=KIND_NAMES.get(kind), error=code)
                    session.stale.add(kind)
                    continue
                session.stale.discard(kind)
                if update is None:
                    continue
                session.versions[kind] = update.version
                if not update.full and _empty(update):
                    # Nothing the device needs (a directory change that blocks no one): not worth a
                    # message to every device; its next hello asks from its own version anyway.
                    continue
                session.send(pb.ConnectResponse(sync=update))
                if kind == pb.SYNC_KIND_POLICY_BUNDLE:
                    # Offline settlement accepts the rules the hub last gave the device.
                    await self._backends.store.record_bundle_sent(
                        tenant_id=session.tenant_id, device_id=session.device_id, version=update.version)

    async def catch_up(self, session: Session) -> None:
        await self.push(session, frozenset(KINDS), {})

    async def push_tenant(self, tenant_id: uuid.UUID, kinds: frozenset[int]) -> None:
        shared: dict[tuple[int, int], pb.SyncUpdate | None] = {}
        sessions = self._sessions.of_tenant(tenant_id)
        # Sessions with the same versions share one source call; the first of each group asks.
        for session in sessions:
            await self.push(session, kinds, shared)

    async def push_config(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID) -> None:
        session = self._sessions.get(device_id)
        if session is not None and session.tenant_id == tenant_id:
            await self.push(session, frozenset({pb.SYNC_KIND_CONFIG}))

    async def refresh_context(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID) -> None:
        """A changed device (location, merchant, scene tags, parent): its stream acts with the new
        values from now on."""
        session = self._sessions.get(device_id)
        if session is None or session.tenant_id != tenant_id:
            return
        device = await self._backends.store.device(tenant_id=tenant_id, device_id=device_id)
        if device is not None and device.public_key is not None:
            session.context = device_context(device)

    async def acknowledged(self, session: Session, ack: pb.SyncAck) -> None:
        name = KIND_NAMES.get(ack.kind)
        if name is None:
            raise InvalidArgument("unknown sync kind", reason="SYNC_KIND_INVALID")
        if ack.version < 0:
            raise InvalidArgument("version must not be negative", reason="SYNC_VERSION_INVALID")
        await self._backends.store.record_sync_ack(tenant_id=session.tenant_id, device_id=session.device_id,
                                                   kind=name, version=ack.version)


class SyncListener:
    """Hears every event that changes what devices know and pushes it to this replica's streams."""

    SUBJECTS = ("identity.>", "codegen.>", "policy.>", "devicehub.>")

    def __init__(self, *, settings: DevicehubSettings, nc: Any, sessions: Sessions, sync: Sync,
                 on_rollout_event: Callable[[Event, uuid.UUID], Awaitable[None]]):
        self._settings = settings
        self._nc = nc  # nats.aio.client.Client
        self._sessions = sessions
        self._sync = sync
        self._on_rollout_event = on_rollout_event
        self._pending: dict[uuid.UUID, set[int]] = defaultdict(set)
        self._wake = asyncio.Event()

    async def _on_message(self, msg: Any) -> None:
        try:
            event = Event.from_bytes(msg.data, subject=msg.subject)
        except (ValueError, KeyError, TypeError):
            return
        if not event.tenant_id:
            return
        try:
            tenant_id = uuid.UUID(event.tenant_id)
        except ValueError:
            return
        await self.handle(event, tenant_id)

    async def handle(self, event: Event, tenant_id: uuid.UUID) -> None:
        subject = event.subject
        kinds = kinds_for_subject(subject)
        if kinds:
            if self._sessions.of_tenant(tenant_id):
                self._pending[tenant_id] |= kinds
                self._wake.set()
            return
        if subject.startswith("devicehub.rollout."):
            # A stage started on whichever replica took the report: this one tells its own devices.
            await self._on_rollout_event(event, tenant_id)
            return
        device_id = _device_id(event)
        if device_id is None:
            return
        if subject == SUBJECT_DEVICE_UPDATED:
            await self._sync.refresh_context(tenant_id=tenant_id, device_id=device_id)
        elif subject == SUBJECT_DEVICE_CONFIG_CHANGED:
            await self._sync.push_config(tenant_id=tenant_id, device_id=device_id)
        elif subject == SUBJECT_DEVICE_DECOMMISSIONED:
            self._sessions.close(device_id, PermissionDenied("the device is decommissioned",
                                                             reason="DEVICE_DECOMMISSIONED"))
        elif subject == SUBJECT_DEVICE_ENROLLED:
            session = self._sessions.get(device_id)
            fingerprint = event.data.get("key_fingerprint", "")
            if session is not None and session.tenant_id == tenant_id and fingerprint:
                if key_fingerprint(session.context.public_key) != fingerprint:
                    session.end(Unauthenticated("the device enrolled a new key", reason="DEVICE_KEY_REPLACED"))

    async def _flush_forever(self) -> None:
        debounce = self._settings.sync_debounce_s
        while True:
            try:
                async with asyncio.timeout(RETRY_STALE_S):
                    await self._wake.wait()
            except TimeoutError:
                await self._retry_stale()
                continue
            if debounce:
                await asyncio.sleep(debounce)
            self._wake.clear()
            pending, self._pending = self._pending, defaultdict(set)
            await asyncio.gather(*(self._push(tenant_id, frozenset(kinds)) for tenant_id, kinds in pending.items()))

    async def _resync_forever(self) -> None:
        """A safety net for events missed while NATS was away: every connected tenant's kinds are
        compared again now and then (one source call per kind and tenant, thanks to the shared
        round cache; devices that are current get nothing)."""
        interval = self._settings.sync_resync_interval_s
        while True:
            await asyncio.sleep(interval)
            tenants = {session.tenant_id for session in self._sessions.all()}
            for tenant_id in tenants:
                await self._push(tenant_id, TENANT_KINDS)

    async def _retry_stale(self) -> None:
        for session in self._sessions.all():
            if session.stale:
                try:
                    await self._sync.push(session, frozenset(session.stale))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - tried again next round
                    log.warning("sync retry failed", error=type(exc).__name__)

    async def _push(self, tenant_id: uuid.UUID, kinds: frozenset[int]) -> None:
        try:
            await self._sync.push_tenant(tenant_id, kinds)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the devices get it on their next event or hello
            log.warning("sync push failed", tenant_id=str(tenant_id), error=type(exc).__name__)

    async def run(self) -> None:
        subscriptions = []
        flusher = asyncio.ensure_future(self._flush_forever())
        resync = asyncio.ensure_future(self._resync_forever())
        try:
            for subject in self.SUBJECTS:
                subscriptions.append(await self._nc.subscribe(subject, cb=self._on_message))
            await asyncio.Event().wait()
        finally:
            flusher.cancel()
            resync.cancel()
            for sub in subscriptions:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _empty(update: pb.SyncUpdate) -> bool:
    return not (update.trust_keys or update.revocations or update.cards or update.member_blocks or update.document)


def _device_id(event: Event) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(event.data.get("device_id", "")))
    except ValueError:
        return None

"""Who a device was shown: members by id (from a code), by card UID or by face reference, from
identity, cached briefly; and, for offline settlement, who they were at a record's time
(``states_at``: identity's GetMemberStatesAt, asked once per upload, never cached). A cached
member is dropped when identity says anything about it (identity.member.*, identity.card.*,
identity.face.* events), so a freeze or a lost card is seen at once; the time-to-live bounds what
a missed event could leave behind.

Business refusals (an unknown or lost card, an unknown face) are ``Refused`` with the device-facing
reason; a malformed card UID is the caller's InvalidArgument; identity away is Unavailable.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from onecard.identity.v1 import identity_pb2 as ipb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.errors import InvalidArgument, Unavailable
from runtime.grpc_client import error_info
from runtime.wire import timestamp_pb

DEFAULT_TTL_S = 30.0
MAX_STATES_PER_CALL = 1000
# identity's card UID form (services.identity.domain), checked here to spare a call for garbage.
_CARD_UID = re.compile(r"^[0-9A-F]{8,20}$")
DEFAULT_MAX_ENTRIES = 200_000

ACTIVE = "active"
FROZEN = "frozen"
LEFT = "left"
_STATUS = {ipb.MEMBER_STATUS_ACTIVE: ACTIVE, ipb.MEMBER_STATUS_FROZEN: FROZEN, ipb.MEMBER_STATUS_LEFT: LEFT}

# identity's reasons -> what a device is told.
_REFUSALS = {
    "CARD_UNKNOWN": "UNKNOWN_CARD",
    "FACE_UNKNOWN": "UNKNOWN_FACE",
    "CARD_LOST": "CARD_LOST",
    "FACE_AMBIGUOUS": "FACE_AMBIGUOUS",
    "MEMBER_NOT_FOUND": "MEMBER_UNKNOWN",
}


class Refused(Exception):
    """A business refusal: the device is answered approved = false with ``reason``."""

    def __init__(self, reason: str, *, member_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.member_id = member_id


@dataclass(frozen=True, slots=True)
class MemberInfo:
    tenant_id: str
    member_id: str
    # "active", "frozen" or "left".
    status: str
    groups: dict[str, str]

    def refusal(self) -> str:
        """'' for a member who may pay or pass; MEMBER_FROZEN / MEMBER_LEFT otherwise."""
        if self.status == ACTIVE:
            return ""
        return "MEMBER_LEFT" if self.status == LEFT else "MEMBER_FROZEN"


@dataclass(frozen=True, slots=True)
class MemberThen:
    """What the directory said at an instant of a member (or of a card: its holder then)."""

    found: bool
    member_id: str = ""
    # "active", "frozen" or "left" ('' when not found).
    status: str = ""
    card_lost: bool = False


def member_info(member: ipb.Member) -> MemberInfo:
    return MemberInfo(tenant_id=member.tenant_id, member_id=member.member_id,
                      status=_STATUS.get(member.status, FROZEN), groups=dict(member.groups))


class _Cache:
    """A bounded LRU of (key -> (value, expires_at)), with the keys of each member indexed, so all
    of a member's entries go when identity says something about it."""

    def __init__(self, *, ttl_s: float, max_entries: int):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, ...], tuple[MemberInfo, float]] = OrderedDict()
        self._by_member: dict[tuple[str, str], set[tuple[str, ...]]] = {}

    def get(self, key: tuple[str, ...], now: float) -> MemberInfo | None:
        found = self._entries.get(key)
        if found is None:
            return None
        value, expires_at = found
        if expires_at <= now:
            self._drop(key)
            return None
        return value

    def put(self, key: tuple[str, ...], value: MemberInfo, now: float) -> None:
        self._drop(key)
        self._entries[key] = (value, now + self.ttl_s)
        self._by_member.setdefault((value.tenant_id, value.member_id), set()).add(key)
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: tuple[str, ...]) -> None:
        found = self._entries.pop(key, None)
        if found is None:
            return
        member_key = (found[0].tenant_id, found[0].member_id)
        keys = self._by_member.get(member_key)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_member[member_key]

    def forget_member(self, tenant_id: str, member_id: str) -> None:
        for key in list(self._by_member.get((tenant_id, member_id), ())):
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self._by_member.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Members:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float, ttl_s: float = DEFAULT_TTL_S,
                 max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._timeout_s = timeout_s
        self._cache = _Cache(ttl_s=ttl_s, max_entries=max_entries)
        self._clock = clock
        self._inflight: dict[tuple[str, ...], asyncio.Future[MemberInfo]] = {}
        # Bumped on every event: a lookup that started before an event is not cached after it.
        self._generation = 0
        self.calls = 0

    def forget(self, tenant_id: str, member_id: str) -> None:
        """Identity said something about the member: drop what is cached, and let no read that
        was out before this be kept or joined."""
        self._generation += 1
        self._inflight.clear()
        self._cache.forget_member(tenant_id, member_id)

    def forget_all(self) -> None:
        self._generation += 1
        self._inflight.clear()
        self._cache.clear()

    async def by_id(self, tenant_id: str, member_id: str) -> MemberInfo:
        return await self._cached(("id", tenant_id, member_id), lambda: self._stub.GetMember(
            ipb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id), timeout=self._timeout_s))

    async def by_card(self, tenant_id: str, card_uid: str) -> MemberInfo:
        uid = card_uid.strip().upper()
        if not _CARD_UID.fullmatch(uid):
            raise InvalidArgument("card_uid must be 8 to 20 hex digits", reason="CARD_UID_INVALID")
        return await self._cached(("card", tenant_id, uid), lambda: self._stub.LookupMember(
            ipb.LookupMemberRequest(tenant_id=tenant_id, card_uid=uid), timeout=self._timeout_s))

    async def by_face(self, tenant_id: str, face_enrolment_ref: str) -> MemberInfo:
        ref = face_enrolment_ref.strip()
        return await self._cached(("face", tenant_id, ref), lambda: self._stub.LookupMember(
            ipb.LookupMemberRequest(tenant_id=tenant_id, face_enrolment_ref=ref), timeout=self._timeout_s))

    async def states_at(self, tenant_id: str, queries: list[tuple[str, str, datetime]]) -> list[MemberThen]:
        """Each (member id, card UID, instant) -- one of the two ids set -- as the directory had it
        then, in order: one identity call per 1000."""
        answers: list[MemberThen] = []
        for start in range(0, len(queries), MAX_STATES_PER_CALL):
            chunk = queries[start:start + MAX_STATES_PER_CALL]
            request = ipb.GetMemberStatesAtRequest(tenant_id=tenant_id, queries=[
                ipb.MemberStateQuery(member_id=member_id or None, card_uid=card_uid or None, at=timestamp_pb(at))
                for member_id, card_uid, at in chunk])
            self.calls += 1
            try:
                answer = await self._stub.GetMemberStatesAt(request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    reason, _ = error_info(exc)
                    raise InvalidArgument(exc.details() or "identity refused the lookup",
                                          reason=reason or "INVALID_ARGUMENT") from None
                raise Unavailable("identity did not answer; retry later", reason="IDENTITY_UNAVAILABLE") from None
            answers += [MemberThen(found=True, member_id=a.member_id, status=_STATUS.get(a.status, FROZEN),
                                   card_lost=a.card_lost) if a.found else MemberThen(found=False)
                        for a in answer.states]
        return answers

    async def _cached(self, key: tuple[str, ...], call: Callable[[], Awaitable[Any]]) -> MemberInfo:
        hit = self._cache.get(key, self._clock())
        if hit is not None:
            return hit
        # One identity call per key at a time, shared by every asker and not cancelled with any one
        # of them (a device stream that closes does not fail another device's lookup).
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch(key, call, generation=self._generation))
            self._inflight[key] = fetch
            fetch.add_done_callback(lambda f: self._done(key, f))
        return await asyncio.shield(fetch)

    def _done(self, key: tuple[str, ...], fetch: asyncio.Future[MemberInfo]) -> None:
        if self._inflight.get(key) is fetch:
            del self._inflight[key]
        if not fetch.cancelled():
            fetch.exception()  # retrieved: every asker may have gone

    async def _fetch(self, key: tuple[str, ...], call: Callable[[], Awaitable[Any]], *,
                     generation: int) -> MemberInfo:
        self.calls += 1
        try:
            answer = await call()
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        info = member_info(answer.member)
        if generation == self._generation:
            self._cache.put(key, info, self._clock())
        return info


def _refusal(exc: grpc.aio.AioRpcError) -> Exception:
    reason, metadata = error_info(exc)
    code = exc.code()
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and reason in _REFUSALS:
        return Refused(_REFUSALS[reason], member_id=metadata.get("member_id", ""))
    if code == grpc.StatusCode.NOT_FOUND:
        return Refused("MEMBER_UNKNOWN")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(exc.details() or "identity refused the lookup", reason=reason or "INVALID_ARGUMENT")
    return Unavailable("identity did not answer; retry later", reason="IDENTITY_UNAVAILABLE")

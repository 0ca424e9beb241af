"""The identity rules: plain data and decisions, no I/O and no protobuf.

Every member operation takes a member as it is and answers the changes it makes, each with the
member right after it. An empty answer means nothing changes: no new version, no feed entry, no
event. The store writes changes; the servicer turns them into messages.

Choices made here where the issue left them open:

- Freezing a frozen member, unfreezing an active one, marking a member who left as left again,
  binding the card a member already holds and reporting a lost card lost again are no-ops, so a
  retried call is harmless.
- ``left`` is final. A member who left cannot be frozen, unfrozen, edited, or given a card or a
  face enrolment (MEMBER_LEFT). Reporting a card lost and clearing the face enrolment stay
  allowed: both only take a capability away.
- A member holds at most one active card. Binding another while one is active is refused
  (CARD_ALREADY_BOUND); the old card must be reported lost first, which blacklists it. Replacing
  it silently would leave the old card honoured by offline devices, which only know the
  blacklist. This service never sets ``CardStatus.REPLACED``.
- A lost card is blacklisted in its tenant for good: nobody there can bind it again
  (CARD_BLACKLISTED). Other tenants never learn of it.
- A freeze remembers who made it (``FreezeOrigin``). A member's own freeze (self-service through a
  partner, reason ``self_service``) can be lifted by the member with the PIN, or by the tenant; a
  tenant's freeze only by the tenant (FROZEN_BY_TENANT). The tenant freezing a member who froze
  themselves makes it the tenant's freeze. A member freezing an already frozen member changes
  nothing. An import row saying ``active`` does not lift a member's own freeze: a nightly roster
  sync must not unlock the card of someone whose phone was stolen; the admin can (UnfreezeMember).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import uuid
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtime.idempotency import check_idempotency_key  # the servicers' key check

SUPPORTED_CURRENCY = "CNY"
MAX_TENANT_NAME_CHARS = 100
MAX_MEMBER_NAME_CHARS = 100
MAX_EXTERNAL_NUMBER_CHARS = 64
GROUP_KEYS = ("department", "grade", "class", "role")
MAX_GROUP_VALUE_CHARS = 64
MAX_FACE_REF_CHARS = 256
MAX_FREEZE_REASON_CHARS = 200
MAX_SEARCH_QUERY_CHARS = 100
MAX_CLIENT_NAME_CHARS = 100
MAX_SCOPES = 32
MAX_SCOPE_CHARS = 64

DEFAULT_TENANT_PAGE_SIZE = 100
MAX_TENANT_PAGE_SIZE = 1000
DEFAULT_SEARCH_PAGE_SIZE = 50
MAX_SEARCH_PAGE_SIZE = 200
DEFAULT_FEED_PAGE_SIZE = 100
MAX_FEED_PAGE_SIZE = 1000
DEFAULT_BLACKLIST_PAGE_SIZE = 1000
MAX_BLACKLIST_PAGE_SIZE = 10_000
# GetMemberStatesAt: one offline upload's records are at most 1000.
MAX_STATE_QUERIES = 1000

_EXTERNAL_NUMBER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CARD_UID = re.compile(r"^[0-9A-F]{8,20}$")
# Lower-case words joined by ':', a word's parts by '-' (``members:self-service``).
_SCOPE = re.compile(r"^[a-z]+(-[a-z]+)*(:[a-z]+(-[a-z]+)*)*$")
# Control characters have no place in names or references, and NUL cannot be stored at all.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TenantKind(StrEnum):
    ENTERPRISE = "enterprise"
    UNIVERSITY = "university"
    K12 = "k12"


class MemberStatus(StrEnum):
    ACTIVE = "active"
    FROZEN = "frozen"
    LEFT = "left"


class FreezeOrigin(StrEnum):
    TENANT = "tenant"
    MEMBER = "member"


# The reason a member's own freeze carries.
SELF_SERVICE_FREEZE_REASON = "self_service"


class CardStatus(StrEnum):
    ACTIVE = "active"
    LOST = "lost"
    REPLACED = "replaced"


class ChangeKind(StrEnum):
    MEMBER_CREATED = "member.created"
    MEMBER_UPDATED = "member.updated"
    MEMBER_FROZEN = "member.frozen"
    MEMBER_UNFROZEN = "member.unfrozen"
    MEMBER_LEFT = "member.left"
    CARD_BOUND = "card.bound"
    CARD_LOST = "card.lost"
    FACE_ENROLLED = "face.enrolled"


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    tenant_id: uuid.UUID
    name: str
    kind: TenantKind
    time_zone: str
    currency: str
    created_at: datetime

    def same_request(self, other: Tenant) -> bool:
        """Whether ``other`` asks for this tenant: everything but the creation time matches."""
        return (self.tenant_id, self.name, self.kind, self.time_zone, self.currency) == (
            other.tenant_id,
            other.name,
            other.kind,
            other.time_zone,
            other.currency,
        )


@dataclass(frozen=True)
class Card:
    card_uid: str
    status: CardStatus
    bound_at: datetime
    lost_at: datetime | None = None


@dataclass(frozen=True)
class Member:
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    external_number: str
    name: str
    groups: Mapping[str, str]
    status: MemberStatus
    cards: tuple[Card, ...]
    face_enrolment_ref: str
    frozen_reason: str
    created_at: datetime
    updated_at: datetime
    version: int
    # Who froze a frozen member; None when the member is not frozen.
    frozen_by: FreezeOrigin | None = None

    @property
    def active_card(self) -> Card | None:
        return next((c for c in self.cards if c.status is CardStatus.ACTIVE), None)

    def card(self, card_uid: str) -> Card | None:
        return next((c for c in self.cards if c.card_uid == card_uid), None)


@dataclass(frozen=True)
class SelfServiceActor:
    """A member acting through a partner: the partner's client and its attestation id (its record
    that the member's own session asked). Kept with the change in the feed and its event."""

    client_id: str
    attestation_id: str


@dataclass(frozen=True)
class MemberChange:
    kind: ChangeKind
    member: Member
    # The card a CARD_BOUND or CARD_LOST change is about.
    card_uid: str = ""
    # Set when the member made the change themselves through a partner.
    actor: SelfServiceActor | None = None


@dataclass(frozen=True)
class CardFacts:
    """What the tenant's other rows say about one card UID, looked up before binding it."""

    blacklisted: bool = False
    active_holder: uuid.UUID | None = None


@dataclass(frozen=True)
class ApiClient:
    client_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    # tenant_id -> granted scopes; only the grants the caller may see.
    grants: Mapping[uuid.UUID, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantGrant:
    """A client's grant in one tenant as it stands: the scopes the client holds, those the tenant
    granted, and the grant's version (new each time it is made or its scopes change)."""

    client_scopes: tuple[str, ...]
    granted: tuple[str, ...]
    grant_version: int


class ImportState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class ImportRowError:
    # 1-based line of the CSV file where the row starts; the header is line 1.
    line: int
    external_number: str
    reason: str


@dataclass(frozen=True)
class MemberImport:
    import_id: uuid.UUID
    tenant_id: uuid.UUID
    state: ImportState
    rows_total: int
    rows_done: int
    rows_created: int
    rows_updated: int
    rows_unchanged: int
    rows_failed: int
    errors: tuple[ImportRowError, ...]
    created_at: datetime
    finished_at: datetime | None
    failure: str


# --- validation -----------------------------------------------------------------------------


def parse_uuid(value: str, *, what: str, reason: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"{what} must be a UUID, got {value[:64]!r}", reason=reason) from None


def parse_tenant_id(value: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument("tenant_id is required", reason="TENANT_ID_INVALID")
    return parse_uuid(value, what="tenant_id", reason="TENANT_ID_INVALID")


def parse_member_id(value: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument("member_id is required", reason="MEMBER_ID_INVALID")
    return parse_uuid(value, what="member_id", reason="MEMBER_ID_INVALID")


def _clean_text(value: str, *, what: str, max_chars: int, reason: str, required: bool = True) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument(f"{what} is required", reason=reason)
    if len(text) > max_chars:
        raise InvalidArgument(f"{what} is longer than {max_chars} characters", reason=reason)
    if _CONTROL.search(text):
        raise InvalidArgument(f"{what} contains control characters", reason=reason)
    return text


@cache
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(value: str) -> str:
    if value not in _iana_zones():
        raise InvalidArgument(f"time_zone {value[:64]!r} is not an IANA time zone", reason="TIME_ZONE_INVALID")
    return value


def new_tenant(
    *, tenant_id: uuid.UUID | None, name: str, kind: TenantKind | None, time_zone: str, currency: str, now: datetime
) -> Tenant:
    """A valid tenant; an empty currency means CNY, the only one supported."""
    clean_name = _clean_text(name, what="tenant name", max_chars=MAX_TENANT_NAME_CHARS, reason="TENANT_NAME_INVALID")
    if kind is None:
        raise InvalidArgument("kind must be enterprise, university or k12", reason="TENANT_KIND_INVALID")
    currency = currency or SUPPORTED_CURRENCY
    if currency != SUPPORTED_CURRENCY:
        raise InvalidArgument(f"currency {currency[:8]!r} is not supported; only CNY is", reason="CURRENCY_UNSUPPORTED")
    return Tenant(
        tenant_id=tenant_id or uuid.uuid4(),
        name=clean_name,
        kind=kind,
        time_zone=check_time_zone(time_zone),
        currency=currency,
        created_at=now,
    )


def check_tenant_replay(*, stored: Tenant, wanted: Tenant) -> Tenant:
    """A repeated CreateTenant with a caller-chosen id answers the tenant it made, if it asks for the same."""
    if not stored.same_request(wanted):
        raise AlreadyExists(f"tenant {stored.tenant_id} already exists with other settings", reason="TENANT_EXISTS")
    return stored


def check_external_number(value: str) -> str:
    if not isinstance(value, str) or not _EXTERNAL_NUMBER.fullmatch(value):
        raise InvalidArgument(
            f"external_number {str(value)[:80]!r} must be 1 to {MAX_EXTERNAL_NUMBER_CHARS} letters, digits, '-' or '_'",
            reason="MEMBER_NUMBER_INVALID",
        )
    return value


def check_member_name(value: str) -> str:
    return _clean_text(value, what="member name", max_chars=MAX_MEMBER_NAME_CHARS, reason="MEMBER_NAME_INVALID")


def check_group_key(key: str) -> str:
    if key not in GROUP_KEYS:
        raise InvalidArgument(f"group {key[:64]!r} is not one of {', '.join(GROUP_KEYS)}", reason="GROUP_KEY_INVALID")
    return key


def check_group_value(key: str, value: str) -> str:
    return _clean_text(value, what=f"group {key}", max_chars=MAX_GROUP_VALUE_CHARS, reason="GROUP_VALUE_INVALID")


def check_groups(groups: Mapping[str, str]) -> dict[str, str]:
    return {check_group_key(k): check_group_value(k, v) for k, v in sorted(groups.items())}


def check_member_status(value: str) -> MemberStatus:
    try:
        return MemberStatus(value)
    except ValueError:
        raise InvalidArgument(
            f"status {value[:16]!r} must be active, frozen or left", reason="MEMBER_STATUS_INVALID"
        ) from None


def normalise_card_uid(value: str) -> str:
    """Readers print UIDs in either case; the directory keeps upper case so each card has one key."""
    uid = value.strip().upper()
    if not _CARD_UID.fullmatch(uid):
        raise InvalidArgument(f"card_uid {value[:32]!r} must be 8 to 20 hex digits", reason="CARD_UID_INVALID")
    return uid


def check_page_size(value: int, *, default: int, maximum: int) -> int:
    """0 means the default; above the cap is refused rather than quietly cut, so callers learn the limit."""
    if value < 0:
        raise InvalidArgument("page_size must not be negative", reason="PAGE_SIZE_INVALID")
    if value > maximum:
        raise InvalidArgument(f"page_size {value} is above the maximum of {maximum}", reason="PAGE_SIZE_TOO_LARGE")
    return value or default


def check_search_query(value: str) -> str:
    return _clean_text(value, what="query", max_chars=MAX_SEARCH_QUERY_CHARS, reason="QUERY_INVALID", required=False)


def check_scopes(scopes: Iterable[str], *, what: str = "scopes") -> tuple[str, ...]:
    unique = sorted(set(scopes))
    if not unique:
        raise InvalidArgument(f"{what} must not be empty", reason="SCOPES_INVALID")
    if len(unique) > MAX_SCOPES:
        raise InvalidArgument(f"{what} has more than {MAX_SCOPES} entries", reason="SCOPES_INVALID")
    for scope in unique:
        if len(scope) > MAX_SCOPE_CHARS or not _SCOPE.fullmatch(scope):
            raise InvalidArgument(
                f"scope {scope[:72]!r} must be lower-case words joined by ':', e.g. 'members:read'",
                reason="SCOPES_INVALID",
            )
    return tuple(unique)


def check_grant_scopes(*, client_scopes: Iterable[str], granted: Iterable[str]) -> tuple[str, ...]:
    """A tenant can grant only scopes the client holds."""
    scopes = check_scopes(granted, what="granted scopes")
    missing = sorted(set(scopes) - set(client_scopes))
    if missing:
        raise InvalidArgument(
            f"the client does not hold {', '.join(missing)}; a grant can only narrow the client's scopes",
            reason="SCOPE_NOT_HELD",
        )
    return scopes


def check_client_name(value: str) -> str:
    return _clean_text(value, what="client name", max_chars=MAX_CLIENT_NAME_CHARS, reason="CLIENT_NAME_INVALID")


def scopes_in_tenant(*, client_scopes: Iterable[str], granted: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(client_scopes) & set(granted)))


# --- member changes -------------------------------------------------------------------------


def _next(member: Member, *, now: datetime, **fields: Any) -> Member:
    return dataclasses.replace(member, **fields, version=member.version + 1, updated_at=now)


def _refuse_if_left(member: Member, *, action: str) -> None:
    if member.status is MemberStatus.LEFT:
        raise FailedPrecondition(f"member {member.external_number} has left; cannot {action}", reason="MEMBER_LEFT")


def new_member(
    *,
    tenant_id: uuid.UUID,
    external_number: str,
    name: str,
    groups: Mapping[str, str],
    now: datetime,
    status: MemberStatus = MemberStatus.ACTIVE,
    existing: Member | None = None,
) -> MemberChange:
    """A new member; ``existing`` is whoever already holds the number in the tenant."""
    number = check_external_number(external_number)
    member = Member(
        tenant_id=tenant_id,
        member_id=uuid.uuid4(),
        external_number=number,
        name=check_member_name(name),
        groups=check_groups(groups),
        status=status,
        cards=(),
        face_enrolment_ref="",
        frozen_reason="",
        created_at=now,
        updated_at=now,
        version=1,
        frozen_by=FreezeOrigin.TENANT if status is MemberStatus.FROZEN else None,
    )
    if existing is not None:
        raise AlreadyExists(f"a member with number {number} already exists", reason="MEMBER_NUMBER_TAKEN")
    return MemberChange(ChangeKind.MEMBER_CREATED, member)


def update_member(
    member: Member, *, name: str | None, groups: Mapping[str, str] | None, now: datetime
) -> list[MemberChange]:
    """Change the name and/or replace the groups; ``None`` keeps a field."""
    new_name = member.name if name is None else check_member_name(name)
    new_groups = dict(member.groups) if groups is None else check_groups(groups)
    if new_name == member.name and new_groups == dict(member.groups):
        return []
    _refuse_if_left(member, action="change name or groups")
    return [MemberChange(ChangeKind.MEMBER_UPDATED, _next(member, now=now, name=new_name, groups=new_groups))]


def freeze(member: Member, *, reason: str, now: datetime) -> list[MemberChange]:
    """The tenant freezes the member; a member's own freeze becomes the tenant's."""
    clean_reason = _clean_text(
        reason, what="reason", max_chars=MAX_FREEZE_REASON_CHARS, reason="FREEZE_REASON_INVALID", required=False
    )
    _refuse_if_left(member, action="freeze")
    if member.status is MemberStatus.FROZEN and member.frozen_by is not FreezeOrigin.MEMBER:
        return []
    frozen = _next(member, now=now, status=MemberStatus.FROZEN, frozen_reason=clean_reason,
                   frozen_by=FreezeOrigin.TENANT)
    return [MemberChange(ChangeKind.MEMBER_FROZEN, frozen)]


def unfreeze(member: Member, *, now: datetime) -> list[MemberChange]:
    """The tenant lifts any freeze."""
    _refuse_if_left(member, action="unfreeze")
    if member.status is MemberStatus.ACTIVE:
        return []
    active = _next(member, now=now, status=MemberStatus.ACTIVE, frozen_reason="", frozen_by=None)
    return [MemberChange(ChangeKind.MEMBER_UNFROZEN, active)]


def self_service_freeze(member: Member, *, actor: SelfServiceActor, now: datetime) -> list[MemberChange]:
    """The member locks their own card and codes; no PIN, so it is always easy. Any freeze already
    in place stays as it is."""
    _refuse_if_left(member, action="freeze")
    if member.status is MemberStatus.FROZEN:
        return []
    frozen = _next(member, now=now, status=MemberStatus.FROZEN, frozen_reason=SELF_SERVICE_FREEZE_REASON,
                   frozen_by=FreezeOrigin.MEMBER)
    return [MemberChange(ChangeKind.MEMBER_FROZEN, frozen, actor=actor)]


def check_self_service_unfreeze(member: Member) -> bool:
    """Whether a self-service unfreeze has anything to do (False: the member is active), before
    the PIN is asked for: a freeze the tenant made is refused without spending a PIN attempt."""
    _refuse_if_left(member, action="unfreeze")
    if member.status is MemberStatus.ACTIVE:
        return False
    if member.frozen_by is not FreezeOrigin.MEMBER:
        raise FailedPrecondition(
            "the school froze this member; only the school can lift it", reason="FROZEN_BY_TENANT"
        )
    return True


def self_service_unfreeze(member: Member, *, actor: SelfServiceActor, now: datetime) -> list[MemberChange]:
    """The member lifts their own freeze (the caller has checked the PIN)."""
    if not check_self_service_unfreeze(member):
        return []
    active = _next(member, now=now, status=MemberStatus.ACTIVE, frozen_reason="", frozen_by=None)
    return [MemberChange(ChangeKind.MEMBER_UNFROZEN, active, actor=actor)]


def self_service_report_card_lost(
    member: Member, *, card_uid: str, actor: SelfServiceActor, now: datetime
) -> list[MemberChange]:
    """The member reports a card lost: the one named, or with "" the active one."""
    if not card_uid:
        active = member.active_card
        if active is None:
            raise FailedPrecondition("the member holds no active card", reason="NO_ACTIVE_CARD")
        card_uid = active.card_uid
    changes = report_card_lost(member, card_uid=card_uid, now=now)
    return [dataclasses.replace(c, actor=actor) for c in changes]


def mark_left(member: Member, *, now: datetime) -> list[MemberChange]:
    if member.status is MemberStatus.LEFT:
        return []
    return [MemberChange(ChangeKind.MEMBER_LEFT, _next(member, now=now, status=MemberStatus.LEFT))]


def change_status(member: Member, *, status: MemberStatus, reason: str, now: datetime) -> list[MemberChange]:
    """Move a member to ``status`` by the one rule that leads there (freeze, unfreeze, leave)."""
    if status is member.status:
        return []
    if status is MemberStatus.FROZEN:
        return freeze(member, reason=reason, now=now)
    if status is MemberStatus.ACTIVE:
        if member.frozen_by is FreezeOrigin.MEMBER:
            return []
        return unfreeze(member, now=now)
    return mark_left(member, now=now)


def bind_card(member: Member, *, card_uid: str, facts: CardFacts, now: datetime) -> list[MemberChange]:
    uid = normalise_card_uid(card_uid)
    current = member.active_card
    if current is not None and current.card_uid == uid:
        return []
    if facts.blacklisted:
        raise FailedPrecondition(
            f"card {uid} was reported lost and can never be bound again", reason="CARD_BLACKLISTED"
        )
    _refuse_if_left(member, action="bind a card")
    if facts.active_holder is not None:
        raise AlreadyExists(f"card {uid} is bound to another member", reason="CARD_UID_IN_USE")
    if current is not None:
        raise FailedPrecondition(
            f"member {member.external_number} already holds active card {current.card_uid}; report it lost first",
            reason="CARD_ALREADY_BOUND",
        )
    card = Card(card_uid=uid, status=CardStatus.ACTIVE, bound_at=now)
    return [MemberChange(ChangeKind.CARD_BOUND, _next(member, now=now, cards=(*member.cards, card)), card_uid=uid)]


def report_card_lost(member: Member, *, card_uid: str, now: datetime) -> list[MemberChange]:
    uid = normalise_card_uid(card_uid)
    card = member.card(uid)
    if card is None:
        raise NotFound(f"member {member.external_number} has no card {uid}", reason="CARD_NOT_FOUND")
    if card.status is CardStatus.LOST:
        return []
    lost = dataclasses.replace(card, status=CardStatus.LOST, lost_at=now)
    cards = tuple(lost if c.card_uid == uid else c for c in member.cards)
    return [MemberChange(ChangeKind.CARD_LOST, _next(member, now=now, cards=cards), card_uid=uid)]


def set_face_enrolment(member: Member, *, face_enrolment_ref: str, now: datetime) -> list[MemberChange]:
    """Set, replace or (with "") clear the face enrolment reference."""
    ref = _clean_text(
        face_enrolment_ref,
        what="face_enrolment_ref",
        max_chars=MAX_FACE_REF_CHARS,
        reason="FACE_REF_INVALID",
        required=False,
    )
    if ref == member.face_enrolment_ref:
        return []
    if ref:
        _refuse_if_left(member, action="enrol a face")
    return [MemberChange(ChangeKind.FACE_ENROLLED, _next(member, now=now, face_enrolment_ref=ref))]


# --- lookups by what a device was shown -----------------------------------------------------


def check_face_ref(value: str) -> str:
    """A face enrolment reference to look up: what SetFaceEnrolment would store for it."""
    return _clean_text(value, what="face_enrolment_ref", max_chars=MAX_FACE_REF_CHARS, reason="FACE_REF_INVALID")


def member_by_card(*, card_uid: str, holder: Member | None, lost: bool) -> Member:
    """The member a card UID names: its active holder; a lost card is refused with its holder."""
    if holder is None:
        raise NotFound(f"no member holds card {card_uid}", reason="CARD_UNKNOWN")
    if lost:
        raise FailedPrecondition(
            f"card {card_uid} was reported lost", reason="CARD_LOST", metadata={"member_id": str(holder.member_id)}
        )
    return holder


@dataclass(frozen=True)
class StateQuery:
    """What the directory said at ``at`` of a member, or of a card (its holder then)."""

    at: datetime
    member_id: uuid.UUID | None = None
    card_uid: str = ""


@dataclass(frozen=True)
class StateAt:
    """The answer to a StateQuery: no member (``member_id`` None) when none existed or held the card."""

    member_id: uuid.UUID | None
    status: MemberStatus | None
    card_lost: bool = False

    @property
    def found(self) -> bool:
        return self.member_id is not None and self.status is not None


def check_state_query_count(count: int) -> None:
    if not 1 <= count <= MAX_STATE_QUERIES:
        raise InvalidArgument(f"give 1..{MAX_STATE_QUERIES} queries", reason="QUERY_COUNT_INVALID")


def member_by_face(candidates: Iterable[Member]) -> Member:
    """The one member a face reference names. A member who left no longer counts when another
    holds the same reference; two current members with one reference cannot be told apart."""
    found = list(candidates)
    if not found:
        raise NotFound("no member has this face enrolment", reason="FACE_UNKNOWN")
    current = [m for m in found if m.status is not MemberStatus.LEFT] or found
    if len(current) > 1:
        raise FailedPrecondition("more than one member has this face enrolment", reason="FACE_AMBIGUOUS")
    return current[0]


# --- events ---------------------------------------------------------------------------------

SUBJECT_PREFIX = "identity"


def change_subject(change: MemberChange) -> str:
    if change.kind is ChangeKind.FACE_ENROLLED and not change.member.face_enrolment_ref:
        return f"{SUBJECT_PREFIX}.face.cleared"
    return f"{SUBJECT_PREFIX}.{change.kind.value}"


def change_event_data(change: MemberChange, *, sequence: int) -> dict[str, Any]:
    """What consumers learn of a change: ids and state, never names, groups or secrets; a
    consumer that needs more asks GetMember."""
    member = change.member
    data: dict[str, Any] = {
        "tenant_id": str(member.tenant_id),
        "member_id": str(member.member_id),
        "external_number": member.external_number,
        "status": member.status.value,
        "version": member.version,
        "sequence": sequence,
    }
    if change.card_uid:
        data["card_uid"] = change.card_uid
    if change.kind is ChangeKind.MEMBER_FROZEN:
        data["reason"] = member.frozen_reason
        data["frozen_by"] = (member.frozen_by or FreezeOrigin.TENANT).value
    if change.actor is not None:
        data["by"] = "member"
        data["client_id"] = change.actor.client_id
        data["attestation_id"] = change.actor.attestation_id
    if change.kind is ChangeKind.FACE_ENROLLED:
        data["face_enrolled"] = bool(member.face_enrolment_ref)
    return data


def tenant_event_data(tenant: Tenant) -> dict[str, Any]:
    return {
        "tenant_id": str(tenant.tenant_id),
        "name": tenant.name,
        "kind": tenant.kind.value,
        "time_zone": tenant.time_zone,
        "currency": tenant.currency,
    }


# --- partner client credentials -------------------------------------------------------------

CLIENT_ID_PREFIX = "oc_"
CLIENT_SECRET_PREFIX = "ocs_"
CLIENT_ID_RANDOM_BYTES = 12
CLIENT_SECRET_RANDOM_BYTES = 32
# OWASP's argon2id floor. The secrets are 256 random bits, so the hash guards a leaked table,
# not a guessable password; heavier settings would only slow every AuthenticateClient.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)


def new_client_id() -> str:
    return CLIENT_ID_PREFIX + secrets.token_hex(CLIENT_ID_RANDOM_BYTES)




def api_client_fingerprint(*, name: str, scopes: Iterable[str], grants: Mapping[uuid.UUID, Iterable[str]]) -> bytes:
    """What a CreateApiClient idempotency key names: the name, the scopes, the grants (order aside)."""
    canonical = json.dumps({"name": name, "scopes": sorted(scopes),
                            "grants": sorted([str(t), sorted(s)] for t, s in grants.items())},
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def new_client_secret() -> str:
    return CLIENT_SECRET_PREFIX + secrets.token_urlsafe(CLIENT_SECRET_RANDOM_BYTES)


def hash_client_secret(secret: str) -> str:
    return _HASHER.hash(secret)


@cache
def _decoy_hash() -> str:
    return _HASHER.hash(new_client_secret())


def client_secret_matches(secret: str, secret_hash: str | None) -> bool:
    """Checks ``secret``; with no hash (unknown client) it checks a decoy, so an unknown client id
    takes as long to refuse as a wrong secret and timing does not reveal which ids exist."""
    try:
        return _HASHER.verify(secret_hash or _decoy_hash(), secret) and secret_hash is not None
    except (VerificationError, InvalidHashError):
        return False

"""Policy's values and the checks on its requests. Plain computation; no I/O.

Every rule of a rule set lives in the ``onecard_policy`` package: this module only turns a
request's text into a document ``onecard_policy.parse_rule_set`` accepts (or its refusal into a
typed error), keeps parsed rule sets in memory by their version, and converts between the
ledger's view of a member's purses and the package's.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from onecard_policy.evaluate import PurseState
from onecard_policy.rules import RuleSet, RuleSetError, canonical_json, parse_rule_set

from runtime import paging
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime.idempotency import check_idempotency_key  # the servicers' key check

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_NOTE_CHARS = 500
MAX_PUBLISHED_BY_CHARS = 200
# A rule set with a K-12 school's member caps is large; the gRPC limit bounds it anyway.
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
# Parsed rule sets kept in memory (versions are immutable, so a parsed one never goes stale).
DEFAULT_RULE_SET_CACHE = 256
# How long a replica trusts what it read of a tenant's published version.
DEFAULT_PUBLISHED_CACHE_S = 1.0
# GetRulesInForce: the window a settlement may ask about (the hub keeps offline records a week),
# and the documents one call may carry.
MAX_IN_FORCE_WINDOW = timedelta(days=31)
MAX_IN_FORCE_VERSIONS = 100


class RuleSetStatus(enum.Enum):
    DRAFT = "draft"
    PUBLISHED = "published"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class StoredVersion:
    tenant_id: uuid.UUID
    version: int
    status: RuleSetStatus
    document: str  # canonical JSON; "" in lists
    sha256: bytes
    note: str
    created_at: datetime
    published_at: datetime | None
    published_by: str


@dataclass(frozen=True)
class Publication:
    version: StoredVersion
    previous_version: int
    changed: bool


@dataclass(frozen=True)
class BundleKey:
    key_id: str
    public_key: bytes
    created_at: datetime
    # The one key of the tenant that signs bundles now; the others only verify.
    signing: bool = False


@dataclass(frozen=True)
class Rotation:
    """A rotation of a tenant's bundle signing key, as first made under its idempotency key."""

    tenant_id: uuid.UUID
    signing_key: BundleKey
    previous_key: BundleKey | None
    replayed: bool


@dataclass(frozen=True)
class ValidDocument:
    """A document parse_rule_set accepted: the parsed rule set, its canonical JSON and SHA-256."""

    rule_set: RuleSet
    document: dict[str, Any]
    canonical: str
    sha256: bytes


@dataclass(frozen=True)
class MemberPurse:
    """One ledger account of a member, as the ledger answers it."""

    kind: str  # "cash", "subsidy", "voucher", or another ledger purse kind's name
    ref: str
    account_id: str
    available_fen: int
    usable: bool  # open (not frozen, not closed)


# --- ids, pages, text -----------------------------------------------------------------------------

def parse_tenant_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument("tenant_id must be a UUID", reason="TENANT_ID_INVALID") from None


def check_version(value: int) -> int:
    if value < 1:
        raise InvalidArgument("version must be 1 or more", reason="VERSION_INVALID")
    return value


@dataclass(frozen=True)
class InForce:
    """A version in force from one publication (``since``) to the next (``until``; None: still)."""

    version: int
    since: datetime
    until: datetime | None


def check_in_force_query(*, since: datetime | None, until: datetime | None, versions: list[int]) -> list[int]:
    """The window must be given, ordered and at most 31 days; versions 1 or more, at most 100."""
    if since is None or until is None or until < since or until - since > MAX_IN_FORCE_WINDOW:
        raise InvalidArgument("give since <= until, at most 31 days apart", reason="WINDOW_INVALID")
    if len(versions) > MAX_IN_FORCE_VERSIONS:
        raise InvalidArgument(f"ask for at most {MAX_IN_FORCE_VERSIONS} versions", reason="VERSIONS_INVALID")
    return sorted({check_version(v) for v in versions})


def page_size(requested: int) -> int:
    return paging.page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


# Page tokens are the runtime's: a position, opaque to callers.
parse_page_token = paging.parse_page_token
page_token = paging.page_token


def check_note(note: str) -> str:
    if len(note) > MAX_NOTE_CHARS:
        raise InvalidArgument(f"note is at most {MAX_NOTE_CHARS} characters", reason="NOTE_TOO_LONG")
    return note


def check_published_by(value: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument("published_by is required: who publishes", reason="PUBLISHED_BY_REQUIRED")
    if len(value) > MAX_PUBLISHED_BY_CHARS:
        raise InvalidArgument(f"published_by is at most {MAX_PUBLISHED_BY_CHARS} characters",
                              reason="PUBLISHED_BY_INVALID")
    return value


# --- documents ------------------------------------------------------------------------------------

def rule_set_refused(error: RuleSetError) -> InvalidArgument:
    return InvalidArgument(f"rule set refused: {error.rule}: {error.message}" if error.rule
                           else f"rule set refused: {error.message}",
                           reason=error.reason, metadata={"rule": error.rule or ""})


def validate_document(text: str) -> ValidDocument:
    """The document parsed and checked by onecard_policy, or INVALID_ARGUMENT with its reason and rule."""
    if not text.strip():
        raise InvalidArgument("document is required: the rule set as a JSON object", reason="DOCUMENT_REQUIRED",
                              metadata={"rule": ""})
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument("the document is too large", reason="DOCUMENT_TOO_LARGE", metadata={"rule": ""})
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument("document is not valid JSON", reason="DOCUMENT_NOT_JSON", metadata={"rule": ""}) from None
    if not isinstance(document, dict):
        raise InvalidArgument("document must be a JSON object", reason="DOCUMENT_NOT_OBJECT", metadata={"rule": ""})
    try:
        rule_set = parse_rule_set(document)
        canonical = canonical_json(document)
    except RuleSetError as error:
        raise rule_set_refused(error) from None
    except (ValueError, TypeError, RecursionError):
        # NaN or the like that canonical JSON refuses: not a document the format allows.
        raise InvalidArgument("document is not a valid rule set", reason="DOCUMENT_INVALID",
                              metadata={"rule": ""}) from None
    return ValidDocument(rule_set=rule_set, document=document, canonical=canonical.decode(),
                         sha256=hashlib.sha256(canonical).digest())


def stored_rule_set(canonical: str) -> RuleSet:
    """A stored version's rule set. It parsed when it was stored; failing now is a broken
    invariant (another evaluator version), reported as such instead of as the caller's fault."""
    try:
        return parse_rule_set(json.loads(canonical))
    except RuleSetError as error:
        raise FailedPrecondition(f"the stored rule set no longer parses: {error}",
                                 reason="RULE_SET_UNREADABLE") from None


class RuleSetCache:
    """Parsed rule sets by (tenant, version, sha256), least recently used dropped first."""

    def __init__(self, size: int = DEFAULT_RULE_SET_CACHE):
        self._size = size
        self._items: OrderedDict[tuple[uuid.UUID, int, bytes], RuleSet] = OrderedDict()

    def get(self, key: tuple[uuid.UUID, int, bytes]) -> RuleSet | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: tuple[uuid.UUID, int, bytes], rule_set: RuleSet) -> None:
        self._items[key] = rule_set
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class PublishedCache:
    """Which version each tenant has published, remembered for ``ttl_s`` so that Evaluate does
    not read PostgreSQL on every call. This replica's own publications replace the entry at once;
    another replica's are seen within ``ttl_s`` (0: always read)."""

    def __init__(self, ttl_s: float, *, size: int = 100_000):
        self._ttl_s = ttl_s
        self._size = size
        self._items: OrderedDict[uuid.UUID, tuple[float, tuple[int, bytes] | None]] = OrderedDict()

    def get(self, tenant_id: uuid.UUID, *, now: float) -> tuple[bool, tuple[int, bytes] | None]:
        """(known, the published version and sha256 or None)."""
        found = self._items.get(tenant_id)
        if found is None or now - found[0] >= self._ttl_s:
            return False, None
        return True, found[1]

    def put(self, tenant_id: uuid.UUID, published: tuple[int, bytes] | None, *, now: float) -> None:
        if self._ttl_s <= 0:
            return
        self._items[tenant_id] = (now, published)
        self._items.move_to_end(tenant_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def no_published_rule_set() -> FailedPrecondition:
    return FailedPrecondition("the tenant has no published rule set", reason="NO_PUBLISHED_RULE_SET")


def version_not_found(version: int) -> NotFound:
    return NotFound(f"no rule set version {version} in this tenant", reason="RULE_SET_VERSION_NOT_FOUND")


def published_event_data(*, version: StoredVersion, previous_version: int) -> dict[str, Any]:
    return {
        "tenant_id": str(version.tenant_id),
        "version": version.version,
        "sha256": version.sha256.hex(),
        "previous_version": previous_version,
        "published_by": version.published_by,
        "published_at": version.published_at.isoformat() if version.published_at else None,
    }


# --- evaluation inputs and outputs ----------------------------------------------------------------

CHANNELS = ("online", "offline")
# The purse kinds a rule set funds payments from (onecard_policy.rules.PURSE_KINDS).
FUNDING_PURSE_KINDS = ("cash", "subsidy", "voucher")


def check_member_id(value: str) -> str:
    if not value:
        raise InvalidArgument("member_id is required", reason="MEMBER_ID_REQUIRED")
    return value


def check_channel(value: str) -> str:
    channel = value or "online"
    if channel not in CHANNELS:
        raise InvalidArgument(f"channel must be one of {', '.join(CHANNELS)}", reason="CHANNEL_INVALID")
    return channel


def purse_states(purses: list[MemberPurse]) -> tuple[PurseState, ...]:
    """The member's purses a plan may draw on, as onecard_policy reads them: open cash, subsidy
    and voucher purses with what each may spend now (a frozen or closed purse pays nothing)."""
    return tuple(PurseState(kind=p.kind, ref=p.ref, available_fen=max(p.available_fen, 0))
                 for p in purses if p.usable and p.kind in FUNDING_PURSE_KINDS)


def account_of(purses: list[MemberPurse], *, kind: str, ref: str) -> str:
    """The member's ledger account of a purse a plan's leg names."""
    for purse in purses:
        if purse.kind == kind and purse.ref == ref:
            return purse.account_id
    # The evaluator funds legs only from the purses it was given, which all came from here.
    raise FailedPrecondition(f"the plan names a {kind} purse {ref!r} the member does not hold",
                             reason="PURSE_NOT_FOUND")


# --- paying a plan ----------------------------------------------------------------------------

# Why a payment whose plan needs the member's PIN or face was not paid.
PIN_REQUIRED = "PIN_REQUIRED"
MAX_EXTERNAL_REF_CHARS = 128




def payment_fingerprint(*, member_id: str, merchant_id: str, amount_fen: int, device_id: str, scene: str,
                        channel: str, code: tuple[str, int] | None, external_ref: str) -> bytes:
    """What a payment's idempotency key names: the member, the merchant, the price, the device,
    the scene, the channel, the code that paid and the caller's reference. Not the time (a hub
    stamps its own on a retry), not the member's groups (identity's, and they may change), not the
    plan (the rules may plan otherwise on a retry; the first payment stands)."""
    canonical = json.dumps({
        "member": member_id, "merchant": merchant_id, "amount_fen": amount_fen, "device": device_id,
        "scene": scene, "channel": channel or "online", "code": list(code) if code else None,
        "external_ref": external_ref,
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def check_external_ref(value: str) -> str:
    if len(value) > MAX_EXTERNAL_REF_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise InvalidArgument(f"external_ref must be at most {MAX_EXTERNAL_REF_CHARS} characters, without control "
                              "characters", reason="INVALID_EXTERNAL_REF")
    return value

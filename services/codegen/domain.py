"""The codegen rules: plain data and decisions, no I/O and no protobuf.

Choices made here where the issue left them open:

- A credential lives at most 72 h and at least ``min_validity_s`` (a setting, 60 s by default);
  the default is 24 h. A token batch covers 1 to 24 whole hours in slots of 15 s to 1 h.
- Issuing refuses a frozen member (MEMBER_FROZEN), a member who left (MEMBER_LEFT), a revoked
  holder key (HOLDER_KEY_REVOKED) and a holder key registered to someone else (HOLDER_KEY_TAKEN).
  A holder key not seen before is registered by IssueCredential itself, saving the phone a round
  trip.
- Unfreezing a member does not bring revoked credentials back: the phone asks for a new one.
- Revoking is idempotent: revoking a revoked credential answers its first revocation.
- A key that stops signing keeps verifying until the last credential it signed expires
  (``retire_after``), then retires, which is a change of the trust list like any other.
- A tenant's code settings (offline caps, default validity, default purposes) apply to what is
  issued after they change; credentials already signed keep their caps until they expire. A
  request that names no purposes gets the tenant's default purposes; with none set, it is
  refused (PURPOSES_REQUIRED), as before settings existed.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from onecard_codes.keys import is_valid_public_key

from runtime.errors import FailedPrecondition, InvalidArgument
from runtime.idempotency import check_idempotency_key  # the servicers' key check

HOLDER_PUBLIC_KEY_BYTES = 32
MAX_CREDENTIAL_VALIDITY_S = 72 * 3600
DEFAULT_CREDENTIAL_VALIDITY_S = 24 * 3600
DEFAULT_MIN_VALIDITY_S = 60
MAX_BATCH_HOURS = 24
DEFAULT_BATCH_HOURS = 24
DEFAULT_SLOT_LENGTH_S = 60
MIN_SLOT_LENGTH_S = 15
MAX_SLOT_LENGTH_S = 3600
MAX_REASON_CHARS = 200
# The code format's fields bound the caps: amounts are u32 fen, the daily count a u8.
MAX_CAP_FEN = 2**32 - 1
MAX_CAP_COUNT = 255
DEFAULT_PER_TRANSACTION_CAP_FEN = 5000
DEFAULT_PER_DAY_CAP_FEN = 20000
DEFAULT_PER_DAY_COUNT = 20
MAX_DEFAULT_VALIDITY_HOURS = MAX_CREDENTIAL_VALIDITY_S // 3600
DEFAULT_VALIDITY_HOURS = DEFAULT_CREDENTIAL_VALIDITY_S // 3600
DEFAULT_REVOCATION_PAGE_SIZE = 1000
MAX_REVOCATION_PAGE_SIZE = 10_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Purpose(StrEnum):
    PAY = "pay"
    ACCESS = "access"
    RIDE = "ride"
    CHECK_IN = "check_in"


class MemberStatus(StrEnum):
    ACTIVE = "active"
    FROZEN = "frozen"
    LEFT = "left"


class KeyStatus(StrEnum):
    SIGNING = "signing"
    VERIFYING = "verifying"
    RETIRED = "retired"


class HolderKeyStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class CredentialKind(StrEnum):
    HOLDER = "holder"
    TOKEN_BATCH = "token_batch"


class RevocationReason(StrEnum):
    """Why a credential was revoked, as the revocation list says it (free text is not published)."""

    REQUESTED = "requested"
    MEMBER_REVOKED = "member_revoked"
    MEMBER_FROZEN = "member_frozen"
    MEMBER_LEFT = "member_left"
    HOLDER_KEY_REVOKED = "holder_key_revoked"


@dataclass(frozen=True)
class OfflineCaps:
    per_transaction_fen: int
    per_day_fen: int
    per_day_count: int


@dataclass(frozen=True)
class TenantCodeSettings:
    """What a tenant chose for its codes; ``updated_at`` is None while it has the defaults."""

    caps: OfflineCaps
    default_validity_hours: int
    default_purposes: tuple[Purpose, ...]
    updated_at: datetime | None = None


DEFAULT_TENANT_CODE_SETTINGS = TenantCodeSettings(
    caps=OfflineCaps(per_transaction_fen=DEFAULT_PER_TRANSACTION_CAP_FEN, per_day_fen=DEFAULT_PER_DAY_CAP_FEN,
                     per_day_count=DEFAULT_PER_DAY_COUNT),
    default_validity_hours=DEFAULT_VALIDITY_HOURS,
    default_purposes=(),
)


@dataclass(frozen=True)
class IssuerKey:
    tenant_id: uuid.UUID
    key_id: bytes
    public_key: bytes
    status: KeyStatus
    not_before: datetime
    retire_after: datetime | None
    version: int


@dataclass(frozen=True)
class HolderKey:
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    public_key: bytes
    status: HolderKeyStatus
    registered_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Credential:
    tenant_id: uuid.UUID
    credential_id: uuid.UUID
    member_id: uuid.UUID
    kind: CredentialKind
    holder_public_key: bytes | None
    key_id: bytes
    issuer_public_key: bytes
    purposes: tuple[Purpose, ...]
    caps: OfflineCaps
    not_before: datetime
    not_after: datetime
    issued_at: datetime


@dataclass(frozen=True)
class Revocation:
    credential_id: uuid.UUID
    member_id: uuid.UUID
    revoked_at: datetime
    not_after: datetime
    reason: str
    version: int


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class BatchPlan:
    """A token batch's window: slots of ``slot_length_s`` back to back from ``not_before``."""

    slot_length_s: int
    not_before: datetime
    not_after: datetime


# --- checks of input ------------------------------------------------------------------------


def parse_tenant_id(value: str) -> uuid.UUID:
    return _parse_uuid(value, what="tenant_id", reason="TENANT_ID_INVALID")


def parse_member_id(value: str) -> uuid.UUID:
    return _parse_uuid(value, what="member_id", reason="MEMBER_ID_INVALID")


def _parse_uuid(value: str, *, what: str, reason: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(f"{what} must be a UUID", reason=reason) from None


def parse_credential_id(value: str) -> uuid.UUID:
    return _parse_uuid(value, what="credential_id", reason="CREDENTIAL_ID_INVALID")


def check_holder_public_key(value: bytes) -> bytes:
    """32 bytes that verifiers will use: a canonical Ed25519 point of prime order (format doc §4.4).

    A small-order or mixed-order key would give a credential whose codes every verifier refuses
    (or, for the small-order points, that anyone could forge), so it is refused before it is stored.
    """
    if len(value) != HOLDER_PUBLIC_KEY_BYTES:
        raise InvalidArgument(f"a holder public key is {HOLDER_PUBLIC_KEY_BYTES} bytes (Ed25519), got {len(value)}",
                              reason="HOLDER_KEY_INVALID")
    if not is_valid_public_key(bytes(value)):
        raise InvalidArgument("the holder public key is not a valid Ed25519 public key (a canonical point of "
                              "prime order)", reason="HOLDER_KEY_INVALID")
    return bytes(value)


def check_purposes(purposes: list[Purpose | None]) -> tuple[Purpose, ...]:
    """At least one known purpose, none twice; answered in a fixed order."""
    if not purposes:
        raise InvalidArgument("name at least one purpose", reason="PURPOSES_REQUIRED")
    return _known_unique_purposes(purposes)


def _known_unique_purposes(purposes: list[Purpose | None]) -> tuple[Purpose, ...]:
    if any(p is None for p in purposes):
        raise InvalidArgument("unknown purpose", reason="PURPOSE_INVALID")
    known = [p for p in purposes if p is not None]
    if len(set(known)) != len(known):
        raise InvalidArgument("a purpose is named twice", reason="PURPOSE_REPEATED")
    order = list(Purpose)
    return tuple(sorted(known, key=order.index))


def check_reason(value: str) -> str:
    if len(value) > MAX_REASON_CHARS or _CONTROL.search(value):
        raise InvalidArgument(f"reason is at most {MAX_REASON_CHARS} printable characters", reason="REASON_INVALID")
    return value


def check_since_version(value: int) -> int:
    if value < 0:
        raise InvalidArgument("since_version must not be negative", reason="VERSION_INVALID")
    return value


def check_page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_REVOCATION_PAGE_SIZE
    if not 1 <= value <= MAX_REVOCATION_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_REVOCATION_PAGE_SIZE}",
                              reason="PAGE_SIZE_INVALID")
    return value


def requested_or_default_purposes(*, requested: list[Purpose | None], settings: TenantCodeSettings
                                  ) -> tuple[Purpose, ...]:
    """The purposes a request named, or the tenant's defaults when it named none."""
    if not requested and settings.default_purposes:
        return settings.default_purposes
    return check_purposes(requested)


def check_tenant_code_settings(*, per_transaction_fen: int, per_day_fen: int, per_day_count: int,
                               default_validity_hours: int, default_purposes: list[Purpose | None]
                               ) -> TenantCodeSettings:
    """Settings a tenant may choose: what the code format can carry, and caps that agree."""
    if not 0 <= per_transaction_fen <= MAX_CAP_FEN:
        raise InvalidArgument(f"caps.per_transaction_fen must be between 0 and {MAX_CAP_FEN}",
                              reason="CAP_PER_TRANSACTION_INVALID")
    if not 0 <= per_day_fen <= MAX_CAP_FEN:
        raise InvalidArgument(f"caps.per_day_fen must be between 0 and {MAX_CAP_FEN}", reason="CAP_PER_DAY_INVALID")
    if not 0 <= per_day_count <= MAX_CAP_COUNT:
        # The code format carries the count in one byte.
        raise InvalidArgument(f"caps.per_day_count must be between 0 and {MAX_CAP_COUNT}",
                              reason="CAP_COUNT_INVALID")
    if per_transaction_fen > per_day_fen:
        # A device would approve one payment it must then count as over the day's cap.
        raise InvalidArgument("caps.per_transaction_fen must not exceed caps.per_day_fen",
                              reason="CAPS_INCONSISTENT")
    if not 1 <= default_validity_hours <= MAX_DEFAULT_VALIDITY_HOURS:
        raise InvalidArgument(
            f"default_credential_validity_hours must be between 1 and {MAX_DEFAULT_VALIDITY_HOURS}",
            reason="DEFAULT_VALIDITY_INVALID",
        )
    return TenantCodeSettings(
        caps=OfflineCaps(per_transaction_fen=per_transaction_fen, per_day_fen=per_day_fen,
                         per_day_count=per_day_count),
        default_validity_hours=default_validity_hours,
        default_purposes=_known_unique_purposes(default_purposes),
    )


def credential_validity(*, validity_s: int, now: datetime, min_validity_s: int,
                        default_validity_s: int = DEFAULT_CREDENTIAL_VALIDITY_S) -> Validity:
    if validity_s == 0:
        validity_s = default_validity_s
    if not min_validity_s <= validity_s <= MAX_CREDENTIAL_VALIDITY_S:
        raise InvalidArgument(
            f"validity_s must be between {min_validity_s} and {MAX_CREDENTIAL_VALIDITY_S} (72 h)",
            reason="VALIDITY_INVALID",
        )
    # Whole seconds: the code format carries times in seconds.
    start = now.replace(microsecond=0)
    return Validity(not_before=start, not_after=start + timedelta(seconds=validity_s))


def plan_batch(*, hours: int, slot_length_s: int, now: datetime) -> BatchPlan:
    """``hours`` from the start of the current slot.

    Slots are aligned to multiples of their length since the epoch, so every batch of a length
    agrees where a slot starts, and the token for "now" is the batch's first.
    """
    hours = hours or DEFAULT_BATCH_HOURS
    slot_length_s = slot_length_s or DEFAULT_SLOT_LENGTH_S
    if not 1 <= hours <= MAX_BATCH_HOURS:
        raise InvalidArgument(f"hours must be between 1 and {MAX_BATCH_HOURS}", reason="BATCH_HOURS_INVALID")
    if not MIN_SLOT_LENGTH_S <= slot_length_s <= MAX_SLOT_LENGTH_S:
        raise InvalidArgument(f"slot_length_s must be between {MIN_SLOT_LENGTH_S} and {MAX_SLOT_LENGTH_S}",
                              reason="SLOT_LENGTH_INVALID")
    epoch_s = int(now.timestamp())
    start = datetime.fromtimestamp(epoch_s - epoch_s % slot_length_s, tz=now.tzinfo)
    return BatchPlan(slot_length_s=slot_length_s, not_before=start, not_after=start + timedelta(hours=hours))


# --- decisions ------------------------------------------------------------------------------


def check_member_may_hold_codes(status: MemberStatus) -> None:
    if status is MemberStatus.FROZEN:
        raise FailedPrecondition("the member is frozen and cannot be issued codes", reason="MEMBER_FROZEN")
    if status is MemberStatus.LEFT:
        raise FailedPrecondition("the member has left and cannot be issued codes", reason="MEMBER_LEFT")


def effective_member_status(
    *, reported: MemberStatus, reported_version: int, known: tuple[MemberStatus, int] | None
) -> MemberStatus:
    """The newer of identity's answer and what its events told us (by member version)."""
    if known is not None and known[1] > reported_version:
        return known[0]
    return reported


def check_holder_key_usable(*, key: HolderKey | None, member_id: uuid.UUID) -> None:
    if key is None:
        return
    if key.member_id != member_id:
        raise FailedPrecondition("this holder key is registered to another member", reason="HOLDER_KEY_TAKEN")
    if key.status is HolderKeyStatus.REVOKED:
        raise FailedPrecondition("this holder key was revoked; make a new key pair", reason="HOLDER_KEY_REVOKED")


def check_repeat_not_revoked(*, revoked: bool) -> None:
    """A repeated issue that lands on the same (deterministic) credential must not hand out a
    revoked one; a second later the request makes a new credential."""
    if revoked:
        raise FailedPrecondition("an identical credential issued this second was revoked; ask again in a second",
                                 reason="CREDENTIAL_REVOKED")


def retire_after(*, last_not_after: datetime | None, now: datetime) -> datetime:
    """When a key that stops signing now may leave the trust list: after its last credential."""
    if last_not_after is None or last_not_after < now:
        return now
    return last_not_after

"""The rules of mini-program bindings and member self-service: plain data and decisions, no I/O.

Choices made here where the issue left them open (docs/miniprograms.md says the same for partners):

- An external user id is 1..128 visible ASCII characters (``!`` to ``~``: no spaces, no control
  characters), compared exactly. It means something only at the partner that bound it, so every
  binding belongs to (tenant, client).
- Per client, an external user id names one member and a member has one external user id.
  Binding a member who has another id at the client replaces that binding (the member moved to a
  new account); binding an id another member holds is refused (EXTERNAL_USER_BOUND): silently
  moving it would hand one person's mini-program to another member's card. Repeating a binding
  changes nothing. A member who left cannot be bound (MEMBER_LEFT).
- A member's first PIN needs no old one, and is set through any partner the member is bound to,
  unless the tenant chose to set first PINs only at its office (``first_pin_by_admin``), where
  the admin has seen the member. The admin can also clear a forgotten PIN or set a new one.
- A PIN is six digits. Six equal digits and straight runs (123456, 987654) are refused
  (PIN_TOO_SIMPLE): they are the first guesses. It is hashed with scrypt (N=2^14, r=8, p=1, 16
  random bytes of salt), the parameters stored with the hash, so they can be raised later without
  breaking stored PINs.
- Guessing is throttled per member, whoever asks: ``max_failures`` wrong PINs in a row lock the
  PIN for ``lockout_s``; while locked nothing is checked, not even a right PIN. When the lock ends
  the count starts again; a right PIN resets it. With the defaults (5 tries, 15 minutes) a
  guesser gets 480 tries a day: a year of trying finds a given PIN with about a 17% chance,
  where an unthrottled guesser would try all 10^6 in hours.
- Checking the old PIN when changing it counts like any other check, so changing the PIN is no
  way around the throttle.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import math
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.identity.domain import MemberStatus, SelfServiceActor

MAX_EXTERNAL_USER_ID_CHARS = 128
MAX_ATTESTATION_ID_CHARS = 128
PIN_DIGITS = 6
DEFAULT_PIN_MAX_FAILURES = 5
DEFAULT_PIN_LOCKOUT_S = 15 * 60

# scrypt: 16 MiB and some tens of milliseconds per check on a server core.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
# Room for parameters up to N=2^16, r=8 (64 MiB) if they are ever raised.
SCRYPT_MAX_MEM_BYTES = 80 * 1024 * 1024
_HASH_SCHEME = "scrypt"

_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]{1,128}$")
_PIN = re.compile(r"^[0-9]{6}$")


class UnbindReason(StrEnum):
    UNBOUND = "unbound"
    REPLACED = "replaced"


@dataclass(frozen=True)
class Binding:
    binding_id: uuid.UUID
    tenant_id: uuid.UUID
    client_id: str
    external_user_id: str
    member_id: uuid.UUID
    bound_at: datetime
    unbound_at: datetime | None = None
    unbound_reason: UnbindReason | None = None


@dataclass(frozen=True)
class BindDecision:
    """What binding asks for: nothing (``new`` None, a repeat), or a new binding and the member's
    binding it replaces, if any."""

    current: Binding | None
    new: Binding | None
    replaced: Binding | None = None


# --- validation -----------------------------------------------------------------------------


def check_external_user_id(value: str) -> str:
    if not _VISIBLE_ASCII.fullmatch(value):
        raise InvalidArgument(
            f"external_user_id must be 1 to {MAX_EXTERNAL_USER_ID_CHARS} visible ASCII characters",
            reason="EXTERNAL_USER_ID_INVALID",
        )
    return value


def check_attestation_id(value: str) -> str:
    if not _VISIBLE_ASCII.fullmatch(value):
        raise InvalidArgument(
            f"attestation_id must be 1 to {MAX_ATTESTATION_ID_CHARS} visible ASCII characters: the partner's id of "
            "the member's session that asked",
            reason="ATTESTATION_ID_INVALID",
        )
    return value


def check_actor(*, client_id: str, attestation_id: str) -> SelfServiceActor:
    return SelfServiceActor(client_id=client_id, attestation_id=check_attestation_id(attestation_id))


def _too_simple(pin: str) -> bool:
    steps = {int(b) - int(a) for a, b in zip(pin, pin[1:], strict=False)}
    return steps in ({0}, {1}, {-1})


def check_new_pin(pin: str) -> str:
    """A PIN to store. The messages never repeat the PIN."""
    if not _PIN.fullmatch(pin):
        raise InvalidArgument(f"a PIN is {PIN_DIGITS} digits", reason="PIN_INVALID")
    if _too_simple(pin):
        raise InvalidArgument("a PIN of equal digits or a straight run is too easy to guess", reason="PIN_TOO_SIMPLE")
    return pin


def check_pin_format(pin: str, *, what: str = "pin") -> str:
    """A PIN the member typed, to check: malformed input is refused without spending an attempt."""
    if not _PIN.fullmatch(pin):
        raise InvalidArgument(f"{what} must be {PIN_DIGITS} digits", reason="PIN_INVALID")
    return pin


# --- bindings -------------------------------------------------------------------------------


def decide_bind(
    *,
    tenant_id: uuid.UUID,
    client_id: str,
    external_user_id: str,
    member_id: uuid.UUID,
    by_user: Binding | None,
    by_member: Binding | None,
    now: datetime,
) -> BindDecision:
    """Bind ``external_user_id`` to the member, given the standing bindings of the id and of the
    member at this client. The member's own state (left, missing) is checked by the caller."""
    if by_user is not None:
        if by_user.member_id == member_id:
            return BindDecision(current=by_user, new=None)
        raise FailedPrecondition(
            "this external user id is bound to another member; unbind it first", reason="EXTERNAL_USER_BOUND"
        )
    new = Binding(binding_id=uuid.uuid4(), tenant_id=tenant_id, client_id=client_id,
                  external_user_id=external_user_id, member_id=member_id, bound_at=now)
    replaced = None
    if by_member is not None:
        replaced = dataclasses.replace(by_member, unbound_at=now, unbound_reason=UnbindReason.REPLACED)
    return BindDecision(current=None, new=new, replaced=replaced)


def refuse_binding(member_id: uuid.UUID, status: MemberStatus | None) -> None:
    """Only a member of the tenant who has not left can be bound (or set a PIN)."""
    if status is None:
        raise NotFound(f"member {member_id} not found", reason="MEMBER_NOT_FOUND")
    if status is MemberStatus.LEFT:
        raise FailedPrecondition("the member has left", reason="MEMBER_LEFT")


def binding_event_data(binding: Binding) -> dict[str, object]:
    """Ids only: the external user id is the partner's identifier of a person, so it stays out."""
    data: dict[str, object] = {
        "tenant_id": str(binding.tenant_id),
        "client_id": binding.client_id,
        "member_id": str(binding.member_id),
        "binding_id": str(binding.binding_id),
    }
    if binding.unbound_reason is not None:
        data["reason"] = binding.unbound_reason.value
    return data


@dataclass(frozen=True)
class SelfServiceSettings:
    """A tenant's self-service settings; the defaults until the tenant first sets them."""

    # Only the tenant's admin sets a member's first PIN (at the school's office, having seen them).
    first_pin_by_admin: bool = False
    updated_at: datetime | None = None


def refuse_first_pin_by_partner(settings: SelfServiceSettings) -> None:
    if settings.first_pin_by_admin:
        raise FailedPrecondition("this school sets a member's first PIN at its office", reason="FIRST_PIN_BY_ADMIN")


# --- PIN hashing ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_pin(pin: str) -> str:
    """``scrypt$N$r$p$salt$key`` (base64); slow on purpose, run it off the event loop."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = hashlib.scrypt(pin.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_KEY_BYTES,
                         maxmem=SCRYPT_MAX_MEM_BYTES)
    return f"{_HASH_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def pin_matches(pin: str, stored: str) -> bool:
    """Whether ``pin`` is the one ``stored`` was made from, by the parameters stored with it."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != _HASH_SCHEME:
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(pin.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=SCRYPT_MAX_MEM_BYTES)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# --- throttling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PinLimits:
    max_failures: int = DEFAULT_PIN_MAX_FAILURES
    lockout_s: int = DEFAULT_PIN_LOCKOUT_S


@dataclass(frozen=True)
class PinRecord:
    pin_hash: str
    set_at: datetime
    failed_attempts: int = 0
    locked_until: datetime | None = None


class PinOutcome(StrEnum):
    VERIFIED = "verified"
    FAILED = "failed"
    LOCKED = "locked"


@dataclass(frozen=True)
class PinCheck:
    """One check's result and the record to store after it."""

    outcome: PinOutcome
    record: PinRecord
    attempts_left: int = 0


def _retry_after_s(locked_until: datetime, now: datetime) -> int:
    return max(1, math.ceil((locked_until - now).total_seconds()))


def pin_locked(locked_until: datetime, now: datetime) -> ResourceExhausted:
    retry_after_s = _retry_after_s(locked_until, now)
    return ResourceExhausted(
        f"too many wrong PINs; try again in {retry_after_s} s", reason="PIN_LOCKED",
        metadata={"retry_after_s": str(retry_after_s)},
    )


def unlocked(record: PinRecord, *, now: datetime) -> PinRecord:
    """The record as it stands at ``now``: refused while locked; an ended lock starts the count again."""
    if record.locked_until is None:
        return record
    if record.locked_until > now:
        raise pin_locked(record.locked_until, now)
    return dataclasses.replace(record, failed_attempts=0, locked_until=None)


def after_check(record: PinRecord, *, matched: bool, now: datetime, limits: PinLimits) -> PinCheck:
    """Count a check of an unlocked record (``unlocked`` first)."""
    if matched:
        return PinCheck(PinOutcome.VERIFIED, dataclasses.replace(record, failed_attempts=0, locked_until=None))
    failures = record.failed_attempts + 1
    if failures >= limits.max_failures:
        locked = dataclasses.replace(record, failed_attempts=failures,
                                     locked_until=now + timedelta(seconds=limits.lockout_s))
        return PinCheck(PinOutcome.LOCKED, locked)
    return PinCheck(PinOutcome.FAILED, dataclasses.replace(record, failed_attempts=failures),
                    attempts_left=limits.max_failures - failures)


def refuse_unless_verified(check: PinCheck, *, now: datetime) -> None:
    """The error a failed check answers, raised once the attempt is stored."""
    if check.outcome is PinOutcome.FAILED:
        raise PermissionDenied(
            f"the PIN is wrong; {check.attempts_left} attempts left before it locks", reason="PIN_INCORRECT",
            metadata={"attempts_left": str(check.attempts_left)},
        )
    if check.outcome is PinOutcome.LOCKED:
        assert check.record.locked_until is not None
        raise pin_locked(check.record.locked_until, now)


def require_pin(record: PinRecord | None) -> PinRecord:
    if record is None:
        raise FailedPrecondition("the member has no PIN yet; set one first", reason="PIN_NOT_SET")
    return record

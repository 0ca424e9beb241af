"""What ``Verifier.verify`` answers: ``Verified`` with the fields, or ``Rejected`` with a reason.

Both are NamedTuples: building one is the cheapest immutable object in CPython, and the warm
verify path builds one per scan.
"""
from __future__ import annotations

import enum
import uuid
from typing import NamedTuple


class Reason(str, enum.Enum):
    """Why a code was refused. The values are the names used in the format doc and the vectors."""

    MALFORMED = "MALFORMED"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    REVOKED = "REVOKED"
    REPLAYED = "REPLAYED"
    WRONG_TENANT = "WRONG_TENANT"
    WRONG_PURPOSE = "WRONG_PURPOSE"
    STALE_TRUST_LIST = "STALE_TRUST_LIST"


class CodeKind(str, enum.Enum):
    HOLDER = "holder"
    TOKEN = "token"


class Purpose(enum.IntFlag):
    """What a code may be used for; a credential allows a set, a scan asks for exactly one."""

    PAY = 0x01
    ACCESS = 0x02
    RIDE = 0x04
    CHECK_IN = 0x08


ALL_PURPOSES = Purpose.PAY | Purpose.ACCESS | Purpose.RIDE | Purpose.CHECK_IN


class OfflineCaps(NamedTuple):
    """Limits a device enforces while offline, carried in the signed credential."""

    per_transaction_fen: int
    per_day_fen: int
    count_per_day: int


class Verified(NamedTuple):
    """A code that passed every check; the replay cache has recorded it.

    ``time_s`` is the holder proof's time (holder codes) or the slot start (tokens); ``counter``
    is the holder's counter or the token's sequence number.
    """

    kind: CodeKind
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    credential_id: uuid.UUID
    purpose: Purpose
    caps: OfflineCaps
    time_s: int
    counter: int
    not_after_s: int
    key_id: bytes

    ok = True


class Rejected(NamedTuple):
    """A refused code: ``reason`` is one of the ten published reasons, ``detail`` is for logs."""

    reason: Reason
    detail: str

    ok = False


VerifyResult = Verified | Rejected

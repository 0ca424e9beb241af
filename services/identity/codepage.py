"""One-time links to the member code page: the rules, no I/O.

A partner (bank app, mini-program backend) asks the gateway for a link for one member; the
gateway makes a random secret, puts it in the link's fragment and sends identity only its
SHA-256. The member's browser redeems the link once for a member-bound access token. So a link
is short-lived (MAX_LINK_TTL_S), single use, and worthless to whoever reads the table.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.identity.domain import MemberStatus

SECRET_HASH_BYTES = 32
MAX_LINK_TTL_S = 900


@dataclass(frozen=True)
class CodePageLink:
    link_id: uuid.UUID
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    client_id: str
    secret_hash: bytes
    created_at: datetime
    expires_at: datetime
    redeemed_at: datetime | None


def check_secret_hash(value: bytes) -> bytes:
    if len(value) != SECRET_HASH_BYTES:
        raise InvalidArgument(f"secret_hash must be {SECRET_HASH_BYTES} bytes (SHA-256)", reason="LINK_HASH_INVALID")
    return value


def check_ttl_s(value: int) -> int:
    if not 1 <= value <= MAX_LINK_TTL_S:
        raise InvalidArgument(f"ttl_s must be 1..{MAX_LINK_TTL_S}", reason="LINK_TTL_INVALID")
    return value


def same_request(link: CodePageLink, *, tenant_id: uuid.UUID, member_id: uuid.UUID, secret_hash: bytes) -> bool:
    """Whether a repeat under a link's idempotency key asks for that very link."""
    return (link.tenant_id, link.member_id, link.secret_hash) == (tenant_id, member_id, secret_hash)


def refuse_creation(status: MemberStatus | None, *, member_id: uuid.UUID) -> None:
    if status is None:
        raise NotFound(f"member {member_id} not found", reason="MEMBER_NOT_FOUND")
    if status is MemberStatus.LEFT:
        raise FailedPrecondition("the member has left; no code page for them", reason="MEMBER_LEFT")


def refuse_redemption(link: CodePageLink | None, status: MemberStatus | None, now: datetime) -> None:
    """Why ``link`` (whose member has ``status``) may not be redeemed at ``now``, raised; nothing
    when it may. A link is refused as a whole: nothing of it is used up by a refusal."""
    if link is None:
        raise NotFound("no such code page link", reason="LINK_NOT_FOUND")
    if link.redeemed_at is not None:
        raise FailedPrecondition("this code page link was used already; ask the app for a new one",
                                 reason="LINK_USED")
    if now >= link.expires_at:
        raise FailedPrecondition("this code page link has expired; ask the app for a new one", reason="LINK_EXPIRED")
    if status is MemberStatus.LEFT or status is None:
        raise FailedPrecondition("the member has left; no code page for them", reason="MEMBER_LEFT")

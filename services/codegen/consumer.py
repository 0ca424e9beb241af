"""identity's member events, as codegen applies them: a freeze or a departure revokes the
member's credentials; every status change is remembered, so an issue racing the event is caught.

``identity.card.lost`` is not consumed: a lost card says nothing about the phone, whose
credentials stay valid.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from runtime.events import Event, Handler
from services.codegen.domain import MemberStatus, RevocationReason
from services.codegen.store import TenantTx

IDENTITY_STREAM = "IDENTITY"
IDENTITY_DURABLE = "codegen-member-status"
IDENTITY_FILTER = "identity.member.>"
_REVOKING = {
    "identity.member.frozen": RevocationReason.MEMBER_FROZEN,
    "identity.member.left": RevocationReason.MEMBER_LEFT,
}


def member_event_handler(*, master_key: bytes, key_id_for: Callable[[bytes], bytes]) -> Handler:
    async def handle(conn: asyncpg.Connection, event: Event) -> None:
        data = event.data
        if "status" not in data or "member_id" not in data:
            return
        tenant_id, member_id = uuid.UUID(data["tenant_id"]), uuid.UUID(data["member_id"])
        tx = TenantTx(conn, tenant_id=tenant_id, master_key=master_key, key_id_for=key_id_for)
        await tx.lock_member(member_id)
        await tx.record_member_status(member_id=member_id, status=MemberStatus(data["status"]),
                                      version=int(data["version"]))
        reason = _REVOKING.get(event.type)
        if reason is not None:
            await tx.revoke_member(member_id=member_id, reason=reason.value, now=datetime.now(UTC))

    return handle

"""identity's member events, as the ledger applies them: a member's cash purse opens with the
member, so a bank can top it up and a history starts from the first day. Subsidy and voucher
purses open with their first grant; a member's receivable with a first offline shortfall.

Freezes and departures are not applied to purses here: a frozen member cannot present a code or
a card (codegen revokes, identity blacklists), and the money stays the member's, to be refunded
or clawed back by a person, never moved by an event.
"""

from __future__ import annotations

import uuid

import asyncpg

from runtime.events import Event
from services.ledger.domain import OwnerKind, PurseKind, account_layout
from services.ledger.store import TenantTx

IDENTITY_STREAM = "IDENTITY"
IDENTITY_DURABLE = "ledger-member-purses"
IDENTITY_FILTER = "identity.member.created"


async def open_member_purses(conn: asyncpg.Connection, event: Event) -> None:
    data = event.data
    if "member_id" not in data or "tenant_id" not in data:
        return
    tx = TenantTx(conn, tenant_id=uuid.UUID(data["tenant_id"]))
    # Idempotent by (tenant, owner, purse, ref): a replayed event opens nothing twice.
    await tx.open_account(owner_kind=OwnerKind.MEMBER, owner_id=str(data["member_id"]), purse_kind=PurseKind.CASH,
                          ref="", layout=account_layout(purse_kind=PurseKind.CASH, no_overdraft=True))

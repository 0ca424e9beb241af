"""The SQL of code page links. Rows in, domain values out; the rules are in codepage.py."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import asyncpg

from services.identity.codepage import CodePageLink
from services.identity.domain import MemberStatus

_COLUMNS = "link_id, tenant_id, member_id, client_id, secret_hash, created_at, expires_at, redeemed_at"


def _link(row: asyncpg.Record) -> CodePageLink:
    return CodePageLink(link_id=row["link_id"], tenant_id=row["tenant_id"], member_id=row["member_id"],
                        client_id=row["client_id"], secret_hash=bytes(row["secret_hash"]),
                        created_at=row["created_at"], expires_at=row["expires_at"], redeemed_at=row["redeemed_at"])


class CodePageStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def member_status(self, *, tenant_id: uuid.UUID, member_id: uuid.UUID) -> MemberStatus | None:
        status = await self._pool.fetchval("SELECT status FROM members WHERE tenant_id = $1 AND member_id = $2",
                                           tenant_id, member_id)
        return MemberStatus(status) if status else None

    async def by_key(self, *, tenant_id: uuid.UUID, idempotency_key: str) -> CodePageLink | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM code_page_links WHERE tenant_id = $1 AND idempotency_key = $2",
            tenant_id, idempotency_key)
        return _link(row) if row else None

    async def create(self, link: CodePageLink, *, idempotency_key: str) -> bool:
        """Store the link; False (nothing stored) when a concurrent call stored one under the key."""
        inserted = await self._pool.fetchval(
            """INSERT INTO code_page_links (link_id, tenant_id, member_id, client_id, secret_hash, idempotency_key,
                                            created_at, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING true""",
            link.link_id, link.tenant_id, link.member_id, link.client_id, link.secret_hash, idempotency_key,
            link.created_at, link.expires_at,
        )
        return bool(inserted)

    async def redeem(self, *, tenant_id: uuid.UUID, secret_hash: bytes, now: datetime,
                     refuse: Callable[[CodePageLink | None, MemberStatus | None, datetime], None]) -> CodePageLink:
        """Mark the link redeemed, once, unless ``refuse`` raises for it and its member's status (the
        row is locked meanwhile, so two redemptions at once cannot both pass)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM code_page_links WHERE tenant_id = $1 AND secret_hash = $2 FOR UPDATE",
                tenant_id, secret_hash)
            link = _link(row) if row else None
            status = None
            if link is not None:
                status = await conn.fetchval("SELECT status FROM members WHERE tenant_id = $1 AND member_id = $2",
                                             link.tenant_id, link.member_id)
            refuse(link, MemberStatus(status) if status else None, now)
            assert link is not None
            await conn.execute("UPDATE code_page_links SET redeemed_at = $3 WHERE tenant_id = $1 AND link_id = $2",
                               link.tenant_id, link.link_id, now)
        return link

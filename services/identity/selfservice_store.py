"""The SQL of mini-program bindings and member PINs. Rows in, domain values out; no rules here.

Binding writes lock the member's row (FOR SHARE, so a member cannot be marked as left halfway)
and the standing bindings they touch; the unique indexes on standing bindings catch what two
concurrent binds of the same id or member would otherwise both write. A PIN's row is locked for
the whole check, so two guesses at once are counted one after the other.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg

from runtime.errors import Conflict
from runtime.events import emit
from services.identity.domain import MemberStatus, SelfServiceActor
from services.identity.selfservice import (
    BindDecision,
    Binding,
    PinRecord,
    SelfServiceSettings,
    UnbindReason,
    binding_event_data,
)

_BINDING_COLUMNS = """binding_id, tenant_id, client_id, external_user_id, member_id, bound_at, unbound_at,
                      unbound_reason"""


def _binding(row: asyncpg.Record) -> Binding:
    return Binding(
        binding_id=row["binding_id"],
        tenant_id=row["tenant_id"],
        client_id=row["client_id"],
        external_user_id=row["external_user_id"],
        member_id=row["member_id"],
        bound_at=row["bound_at"],
        unbound_at=row["unbound_at"],
        unbound_reason=UnbindReason(row["unbound_reason"]) if row["unbound_reason"] else None,
    )


async def _emit_binding(conn: asyncpg.Connection, *, subject: str, binding: Binding) -> None:
    await emit(conn, subject=subject, event_type=subject, data=binding_event_data(binding),
               tenant_id=str(binding.tenant_id))


class BindingTx:
    """One transaction's view of a client's bindings around one member."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, client_id: str):
        self._conn = conn
        self.tenant_id = tenant_id
        self.client_id = client_id

    async def member_status(self, member_id: uuid.UUID) -> MemberStatus | None:
        """The member's status, its row held until the transaction ends; None when not in the tenant."""
        status = await self._conn.fetchval(
            "SELECT status FROM members WHERE tenant_id = $1 AND member_id = $2 FOR SHARE", self.tenant_id, member_id
        )
        return MemberStatus(status) if status else None

    async def standing(self, *, external_user_id: str | None = None,
                       member_id: uuid.UUID | None = None) -> Binding | None:
        """The client's standing binding of the external user id, or of the member, locked."""
        row = await self._conn.fetchrow(
            f"""SELECT {_BINDING_COLUMNS} FROM external_user_bindings
                WHERE tenant_id = $1 AND client_id = $2 AND unbound_at IS NULL
                  AND ($3::text IS NULL OR external_user_id = $3) AND ($4::uuid IS NULL OR member_id = $4)
                FOR UPDATE""",
            self.tenant_id, self.client_id, external_user_id, member_id,
        )
        return _binding(row) if row else None

    async def end(self, binding: Binding) -> None:
        """Write ``binding``'s end (unbound_at, reason) and its event."""
        assert binding.unbound_at is not None and binding.unbound_reason is not None
        await self._conn.execute(
            "UPDATE external_user_bindings SET unbound_at = $2, unbound_reason = $3"
            " WHERE binding_id = $1 AND unbound_at IS NULL",
            binding.binding_id, binding.unbound_at, binding.unbound_reason.value,
        )
        await _emit_binding(self._conn, subject="identity.external_user.unbound", binding=binding)

    async def apply(self, decision: BindDecision) -> None:
        if decision.replaced is not None:
            await self.end(decision.replaced)
        new = decision.new
        if new is None:
            return
        await self._conn.execute(
            """INSERT INTO external_user_bindings (binding_id, tenant_id, client_id, external_user_id, member_id,
                                                   bound_at) VALUES ($1, $2, $3, $4, $5, $6)""",
            new.binding_id, new.tenant_id, new.client_id, new.external_user_id, new.member_id, new.bound_at,
        )
        await _emit_binding(self._conn, subject="identity.external_user.bound", binding=new)


class PinTx:
    """One transaction holding a member's PIN row (if any) locked."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, member_id: uuid.UUID,
                 record: PinRecord | None):
        self._conn = conn
        self.tenant_id = tenant_id
        self.member_id = member_id
        self.record = record

    async def insert_first(self, record: PinRecord) -> bool:
        """Store a first PIN; False when one appeared meanwhile."""
        done = await self._conn.fetchval(
            """INSERT INTO member_pins (tenant_id, member_id, pin_hash, set_at) VALUES ($1, $2, $3, $4)
               ON CONFLICT (tenant_id, member_id) DO NOTHING RETURNING true""",
            self.tenant_id, self.member_id, record.pin_hash, record.set_at,
        )
        return bool(done)

    async def save(self, record: PinRecord) -> None:
        await self._conn.execute(
            """UPDATE member_pins SET pin_hash = $3, set_at = $4, failed_attempts = $5, locked_until = $6
               WHERE tenant_id = $1 AND member_id = $2""",
            self.tenant_id, self.member_id, record.pin_hash, record.set_at, record.failed_attempts,
            record.locked_until,
        )

    async def replace(self, record: PinRecord) -> None:
        """Store ``record`` as the member's PIN, whether or not one was set; the lockout ends."""
        await self._conn.execute(
            """INSERT INTO member_pins (tenant_id, member_id, pin_hash, set_at) VALUES ($1, $2, $3, $4)
               ON CONFLICT (tenant_id, member_id) DO UPDATE
               SET pin_hash = EXCLUDED.pin_hash, set_at = EXCLUDED.set_at, failed_attempts = 0, locked_until = NULL""",
            self.tenant_id, self.member_id, record.pin_hash, record.set_at,
        )

    async def delete(self) -> None:
        await self._conn.execute("DELETE FROM member_pins WHERE tenant_id = $1 AND member_id = $2",
                                 self.tenant_id, self.member_id)

    async def log(self, *, kind: str, client_id: str, attestation_id: str, at: datetime) -> None:
        await self._conn.execute(
            """INSERT INTO member_pin_events (tenant_id, member_id, kind, client_id, attestation_id, at)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            self.tenant_id, self.member_id, kind, client_id, attestation_id, at,
        )

    async def emit(self, *, subject: str, data: dict[str, object]) -> None:
        await emit(self._conn, subject=subject, event_type=subject,
                   data={"tenant_id": str(self.tenant_id), "member_id": str(self.member_id), **data},
                   tenant_id=str(self.tenant_id))


class SelfServiceStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @asynccontextmanager
    async def bindings(self, *, tenant_id: uuid.UUID, client_id: str) -> AsyncIterator[BindingTx]:
        """A transaction over the client's bindings; it commits when the block ends cleanly. Two
        concurrent writes of one binding: the loser is ABORTED BINDING_CONFLICT, retry it."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield BindingTx(conn, tenant_id=tenant_id, client_id=client_id)
        except asyncpg.UniqueViolationError:
            raise Conflict("another change of this binding ran at the same time; retry",
                           reason="BINDING_CONFLICT") from None

    async def standing_binding(self, *, tenant_id: uuid.UUID, client_id: str,
                               external_user_id: str) -> Binding | None:
        row = await self._pool.fetchrow(
            f"""SELECT {_BINDING_COLUMNS} FROM external_user_bindings
                WHERE tenant_id = $1 AND client_id = $2 AND external_user_id = $3 AND unbound_at IS NULL""",
            tenant_id, client_id, external_user_id,
        )
        return _binding(row) if row else None

    async def binding_history(self, *, tenant_id: uuid.UUID, member_id: uuid.UUID) -> list[Binding]:
        """Every binding the member ever had, at every client, oldest first (for audits and tests)."""
        rows = await self._pool.fetch(
            f"""SELECT {_BINDING_COLUMNS} FROM external_user_bindings WHERE tenant_id = $1 AND member_id = $2
                ORDER BY bound_at, binding_id""",
            tenant_id, member_id,
        )
        return [_binding(row) for row in rows]

    async def settings(self, *, tenant_id: uuid.UUID) -> SelfServiceSettings:
        row = await self._pool.fetchrow(
            "SELECT first_pin_by_admin, updated_at FROM self_service_settings WHERE tenant_id = $1", tenant_id)
        if row is None:
            return SelfServiceSettings()
        return SelfServiceSettings(first_pin_by_admin=row["first_pin_by_admin"], updated_at=row["updated_at"])

    async def update_settings(self, *, tenant_id: uuid.UUID, settings: SelfServiceSettings,
                              client_id: str) -> SelfServiceSettings:
        """Store the settings, with an event when they changed; answers them as stored."""
        async with self._pool.acquire() as conn, conn.transaction():
            changed = await conn.fetchval(
                """INSERT INTO self_service_settings (tenant_id, first_pin_by_admin, updated_at, updated_by)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (tenant_id) DO UPDATE SET first_pin_by_admin = EXCLUDED.first_pin_by_admin,
                       updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by
                   WHERE self_service_settings.first_pin_by_admin IS DISTINCT FROM EXCLUDED.first_pin_by_admin
                   RETURNING true""",
                tenant_id, settings.first_pin_by_admin, settings.updated_at, client_id,
            )
            if changed:
                subject = "identity.self_service.settings_changed"
                await emit(conn, subject=subject, event_type=subject, tenant_id=str(tenant_id),
                           data={"tenant_id": str(tenant_id), "first_pin_by_admin": settings.first_pin_by_admin,
                                 "client_id": client_id})
        return await self.settings(tenant_id=tenant_id)

    @asynccontextmanager
    async def pin(self, *, tenant_id: uuid.UUID, member_id: uuid.UUID) -> AsyncIterator[PinTx]:
        """A transaction holding the member's PIN row locked; it commits when the block ends cleanly."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT pin_hash, set_at, failed_attempts, locked_until FROM member_pins
                   WHERE tenant_id = $1 AND member_id = $2 FOR UPDATE""",
                tenant_id, member_id,
            )
            record = None
            if row is not None:
                record = PinRecord(pin_hash=row["pin_hash"], set_at=row["set_at"],
                                   failed_attempts=row["failed_attempts"], locked_until=row["locked_until"])
            yield PinTx(conn, tenant_id=tenant_id, member_id=member_id, record=record)


def actor_fields(actor: SelfServiceActor) -> dict[str, str]:
    return {"client_id": actor.client_id, "attestation_id": actor.attestation_id}

"""All of codegen's SQL. Rows in, domain values out; no rules and no protobuf here.

Writes run in a ``TenantTx``: one transaction in one tenant. Changes to the trust list and the
revocation list lock the tenant's ``tenant_state`` row, so versions are handed out in commit
order and a device that has seen version n has seen every change up to n. Issuing holds the
signing key's row FOR SHARE, so a rotation waits for issues in flight and the old key's
``retire_after`` covers every credential it signed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import nacl.signing

from runtime.events import PendingEvent, emit, emit_many
from services.codegen import keys
from services.codegen.domain import (
    DEFAULT_TENANT_CODE_SETTINGS,
    Credential,
    HolderKey,
    HolderKeyStatus,
    IssuerKey,
    KeyStatus,
    MemberStatus,
    OfflineCaps,
    Purpose,
    Revocation,
    TenantCodeSettings,
)

SUBJECT_CREDENTIAL_ISSUED = "codegen.credential.issued"
SUBJECT_CREDENTIAL_REVOKED = "codegen.credential.revoked"
SUBJECT_TRUST_LIST_CHANGED = "codegen.trust_list.changed"
SUBJECT_SETTINGS_CHANGED = "codegen.settings.changed"

_ISSUER_COLUMNS = "tenant_id, key_id, public_key, status, not_before, retire_after, version"


def _issuer_key(row: asyncpg.Record) -> IssuerKey:
    return IssuerKey(
        tenant_id=row["tenant_id"],
        key_id=bytes(row["key_id"]),
        public_key=bytes(row["public_key"]),
        status=KeyStatus(row["status"]),
        not_before=row["not_before"],
        retire_after=row["retire_after"],
        version=row["version"],
    )


def _holder_key(row: asyncpg.Record) -> HolderKey:
    return HolderKey(
        tenant_id=row["tenant_id"],
        member_id=row["member_id"],
        public_key=bytes(row["public_key"]),
        status=HolderKeyStatus(row["status"]),
        registered_at=row["registered_at"],
        revoked_at=row["revoked_at"],
    )


def _code_settings(row: asyncpg.Record) -> TenantCodeSettings:
    return TenantCodeSettings(
        caps=OfflineCaps(per_transaction_fen=row["per_transaction_cap_fen"], per_day_fen=row["per_day_cap_fen"],
                         per_day_count=row["per_day_count"]),
        default_validity_hours=row["default_validity_hours"],
        default_purposes=tuple(Purpose(p) for p in row["default_purposes"]),
        updated_at=row["settings_updated_at"],
    )


def settings_event_data(*, tenant_id: uuid.UUID, settings: TenantCodeSettings) -> dict[str, Any]:
    return {
        "tenant_id": str(tenant_id),
        "per_transaction_cap_fen": settings.caps.per_transaction_fen,
        "per_day_cap_fen": settings.caps.per_day_fen,
        "per_day_count": settings.caps.per_day_count,
        "default_validity_hours": settings.default_validity_hours,
        "default_purposes": [p.value for p in settings.default_purposes],
    }


def _revocation(row: asyncpg.Record) -> Revocation:
    return Revocation(
        credential_id=row["credential_id"],
        member_id=row["member_id"],
        revoked_at=row["revoked_at"],
        not_after=row["not_after"],
        reason=row["reason"],
        version=row["version"],
    )


@dataclass(frozen=True)
class SigningKey:
    """The tenant's signing key, opened, for the length of one transaction."""

    key: IssuerKey
    signing_key: nacl.signing.SigningKey


def trust_event_data(*, tenant_id: uuid.UUID, version: int, changed: list[IssuerKey]) -> dict[str, Any]:
    return {
        "tenant_id": str(tenant_id),
        "version": version,
        "keys": [{"key_id": k.key_id.hex(), "status": k.status.value} for k in changed],
    }


def revocation_event(*, tenant_id: uuid.UUID, entry: Revocation) -> PendingEvent:
    return PendingEvent(
        subject=SUBJECT_CREDENTIAL_REVOKED,
        event_type=SUBJECT_CREDENTIAL_REVOKED,
        tenant_id=str(tenant_id),
        data={
            "tenant_id": str(tenant_id),
            "credential_id": str(entry.credential_id),
            "member_id": str(entry.member_id),
            "reason": entry.reason,
            "version": entry.version,
            "not_after": entry.not_after.isoformat(),
        },
    )


class TenantTx:
    """One transaction's view of one tenant's codegen data."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, master_key: bytes,
                 key_id_for: Callable[[bytes], bytes]):
        self.conn = conn
        self.tenant_id = tenant_id
        self._master_key = master_key
        self._key_id_for = key_id_for

    # --- tenant -------------------------------------------------------------------------------

    async def ensure_tenant(self) -> None:
        await self.conn.execute("INSERT INTO tenant_state (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
                                self.tenant_id)

    async def code_settings(self) -> TenantCodeSettings:
        """The tenant's settings; the service's defaults for a tenant codegen has not seen."""
        row = await self.conn.fetchrow(
            "SELECT per_transaction_cap_fen, per_day_cap_fen, per_day_count, default_validity_hours,"
            " default_purposes, settings_updated_at FROM tenant_state WHERE tenant_id = $1",
            self.tenant_id,
        )
        return DEFAULT_TENANT_CODE_SETTINGS if row is None else _code_settings(row)

    async def update_code_settings(self, *, settings: TenantCodeSettings, now: datetime) -> TenantCodeSettings:
        await self.ensure_tenant()
        row = await self.conn.fetchrow(
            "UPDATE tenant_state SET per_transaction_cap_fen = $2, per_day_cap_fen = $3, per_day_count = $4,"
            " default_validity_hours = $5, default_purposes = $6, settings_updated_at = $7 WHERE tenant_id = $1"
            " RETURNING per_transaction_cap_fen, per_day_cap_fen, per_day_count, default_validity_hours,"
            " default_purposes, settings_updated_at",
            self.tenant_id, settings.caps.per_transaction_fen, settings.caps.per_day_fen,
            settings.caps.per_day_count, settings.default_validity_hours,
            [p.value for p in settings.default_purposes], now,
        )
        changed = _code_settings(row)
        await emit(self.conn, subject=SUBJECT_SETTINGS_CHANGED, event_type=SUBJECT_SETTINGS_CHANGED,
                   tenant_id=str(self.tenant_id), data=settings_event_data(tenant_id=self.tenant_id, settings=changed))
        return changed

    async def _lock_tenant(self) -> asyncpg.Record:
        await self.ensure_tenant()
        return await self.conn.fetchrow(
            "SELECT trust_version, revocation_version FROM tenant_state WHERE tenant_id = $1 FOR UPDATE",
            self.tenant_id,
        )

    async def _next_trust_version(self) -> int:
        await self._lock_tenant()
        return await self.conn.fetchval(
            "UPDATE tenant_state SET trust_version = trust_version + 1 WHERE tenant_id = $1 RETURNING trust_version",
            self.tenant_id,
        )

    # --- issuer keys --------------------------------------------------------------------------

    async def _insert_new_key(self, *, now: datetime, version: int) -> IssuerKey:
        signing_key = nacl.signing.SigningKey.generate()
        public_key = bytes(signing_key.verify_key)
        key_id = self._key_id_for(public_key)
        sealed = keys.seal_seed(master_key=self._master_key, tenant_id=self.tenant_id, key_id=key_id,
                                public_key=public_key, seed=bytes(signing_key))
        row = await self.conn.fetchrow(
            f"INSERT INTO issuer_keys (tenant_id, public_key, key_id, sealed_private, status, not_before, version,"
            f" created_at) VALUES ($1, $2, $3, $4, 'signing', $5, $6, $5) RETURNING {_ISSUER_COLUMNS}",
            self.tenant_id, public_key, key_id, sealed, now, version,
        )
        return _issuer_key(row)

    async def _signing_row(self, *, lock: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow(
            f"SELECT {_ISSUER_COLUMNS}, sealed_private FROM issuer_keys"
            f" WHERE tenant_id = $1 AND status = 'signing' {lock}",
            self.tenant_id,
        )

    def _open(self, row: asyncpg.Record) -> SigningKey:
        key = _issuer_key(row)
        signing_key = keys.open_signing_key(master_key=self._master_key, tenant_id=self.tenant_id,
                                            key_id=key.key_id, public_key=key.public_key,
                                            sealed=bytes(row["sealed_private"]))
        return SigningKey(key=key, signing_key=signing_key)

    async def signing_key(self, *, now: datetime) -> SigningKey:
        """The tenant's signing key, held FOR SHARE to commit; made on the tenant's first issue."""
        row = await self._signing_row(lock="FOR SHARE")
        if row is None:
            await self._lock_tenant()
            row = await self._signing_row(lock="FOR SHARE")
            if row is None:
                version = await self._next_trust_version()
                key = await self._insert_new_key(now=now, version=version)
                await emit(self.conn, subject=SUBJECT_TRUST_LIST_CHANGED, event_type=SUBJECT_TRUST_LIST_CHANGED,
                           tenant_id=str(self.tenant_id),
                           data=trust_event_data(tenant_id=self.tenant_id, version=version, changed=[key]))
                row = await self._signing_row(lock="FOR SHARE")
        assert row is not None
        return self._open(row)

    async def rotation(self, *, idempotency_key: str) -> tuple[IssuerKey, IssuerKey | None, int] | None:
        """The rotation made under the key (its keys as they are now, and its trust list version),
        or None. Locks the tenant first, so a concurrent repeat of the key waits for this one."""
        await self._lock_tenant()
        done = await self.conn.fetchrow(
            "SELECT public_key, previous_public_key, trust_list_version FROM issuer_key_rotations"
            " WHERE tenant_id = $1 AND idempotency_key = $2", self.tenant_id, idempotency_key)
        if done is None:
            return None
        rows = {bytes(r["public_key"]): _issuer_key(r) for r in await self.conn.fetch(
            f"SELECT {_ISSUER_COLUMNS} FROM issuer_keys WHERE tenant_id = $1 AND public_key = ANY($2::bytea[])",
            self.tenant_id, [k for k in (done["public_key"], done["previous_public_key"]) if k is not None])}
        previous = done["previous_public_key"]
        return (rows[bytes(done["public_key"])], rows[bytes(previous)] if previous is not None else None,
                done["trust_list_version"])

    async def record_rotation(self, *, idempotency_key: str, new: IssuerKey, previous: IssuerKey | None,
                              version: int, now: datetime) -> None:
        await self.conn.execute(
            "INSERT INTO issuer_key_rotations (tenant_id, idempotency_key, public_key, previous_public_key,"
            " trust_list_version, rotated_at) VALUES ($1, $2, $3, $4, $5, $6)",
            self.tenant_id, idempotency_key, new.public_key, previous.public_key if previous else None, version, now)

    async def rotate(self, *, now: datetime, retire_after_for: Callable[[datetime | None], datetime]
                     ) -> tuple[IssuerKey, IssuerKey | None, int]:
        """A new signing key; the old one verifies until its last credential ends."""
        version = await self._next_trust_version()
        old_row = await self._signing_row(lock="FOR UPDATE")
        previous: IssuerKey | None = None
        if old_row is not None:
            last = await self.conn.fetchval(
                "SELECT max(not_after) FROM credentials WHERE tenant_id = $1 AND issuer_public_key = $2",
                self.tenant_id, old_row["public_key"],
            )
            row = await self.conn.fetchrow(
                f"UPDATE issuer_keys SET status = 'verifying', retire_after = $3, version = $4"
                f" WHERE tenant_id = $1 AND public_key = $2 RETURNING {_ISSUER_COLUMNS}",
                self.tenant_id, old_row["public_key"], retire_after_for(last), version,
            )
            previous = _issuer_key(row)
        new = await self._insert_new_key(now=now, version=version)
        changed = [new] if previous is None else [new, previous]
        await emit(self.conn, subject=SUBJECT_TRUST_LIST_CHANGED, event_type=SUBJECT_TRUST_LIST_CHANGED,
                   tenant_id=str(self.tenant_id),
                   data=trust_event_data(tenant_id=self.tenant_id, version=version, changed=changed))
        return new, previous, version

    async def retire_due_keys(self, *, now: datetime) -> list[IssuerKey]:
        """Retire verifying keys whose last credential has ended: one trust list change.

        A reader's call finds nothing due without taking a lock; when something is due, the tenant
        is locked and it looks again, so of two sweeps at once (the periodic one and a reader's) the
        second sees the first's retirement and changes nothing, not even the version."""
        count_due = ("SELECT count(*) FROM issuer_keys WHERE tenant_id = $1 AND status = 'verifying'"
                     " AND retire_after <= $2")
        if not await self.conn.fetchval(count_due, self.tenant_id, now):
            return []
        await self._lock_tenant()
        if not await self.conn.fetchval(count_due, self.tenant_id, now):
            return []
        version = await self._next_trust_version()
        rows = await self.conn.fetch(
            f"UPDATE issuer_keys SET status = 'retired', version = $3"
            f" WHERE tenant_id = $1 AND status = 'verifying' AND retire_after <= $2 RETURNING {_ISSUER_COLUMNS}",
            self.tenant_id, now, version,
        )
        retired = [_issuer_key(r) for r in rows]
        await emit(self.conn, subject=SUBJECT_TRUST_LIST_CHANGED, event_type=SUBJECT_TRUST_LIST_CHANGED,
                   tenant_id=str(self.tenant_id),
                   data=trust_event_data(tenant_id=self.tenant_id, version=version, changed=retired))
        return retired

    # --- members and holder keys --------------------------------------------------------------

    async def lock_member(self, member_id: uuid.UUID) -> None:
        """Serialises issuing and revoking for one member, so neither misses the other."""
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                f"codegen.member.{self.tenant_id}.{member_id}")

    async def known_member_status(self, member_id: uuid.UUID) -> tuple[MemberStatus, int] | None:
        row = await self.conn.fetchrow(
            "SELECT status, version FROM member_status WHERE tenant_id = $1 AND member_id = $2",
            self.tenant_id, member_id,
        )
        return (MemberStatus(row["status"]), row["version"]) if row else None

    async def record_member_status(self, *, member_id: uuid.UUID, status: MemberStatus, version: int) -> None:
        await self.conn.execute(
            "INSERT INTO member_status (tenant_id, member_id, status, version) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (tenant_id, member_id) DO UPDATE SET status = excluded.status, version = excluded.version"
            " WHERE member_status.version < excluded.version",
            self.tenant_id, member_id, status.value, version,
        )

    async def holder_key(self, public_key: bytes) -> HolderKey | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM holder_keys WHERE tenant_id = $1 AND public_key = $2 FOR UPDATE",
            self.tenant_id, public_key,
        )
        return _holder_key(row) if row else None

    async def register_holder_key(self, *, member_id: uuid.UUID, public_key: bytes, now: datetime) -> HolderKey:
        """Insert the key, or answer the row already there (for whichever member)."""
        await self.conn.execute(
            "INSERT INTO holder_keys (tenant_id, public_key, member_id, status, registered_at)"
            " VALUES ($1, $2, $3, 'active', $4) ON CONFLICT DO NOTHING",
            self.tenant_id, public_key, member_id, now,
        )
        key = await self.holder_key(public_key)
        assert key is not None
        return key

    async def revoke_holder_key(self, *, public_key: bytes, now: datetime) -> HolderKey:
        row = await self.conn.fetchrow(
            "UPDATE holder_keys SET status = 'revoked', revoked_at = coalesce(revoked_at, $3)"
            " WHERE tenant_id = $1 AND public_key = $2 RETURNING *",
            self.tenant_id, public_key, now,
        )
        return _holder_key(row)

    # --- credentials and revocations ----------------------------------------------------------

    async def insert_credential(self, credential: Credential) -> bool:
        """Record and announce the credential; False if the same credential is already recorded.

        A holder credential's id is derived from its signed bytes, and Ed25519 signs
        deterministically, so the same request twice within one second makes the same credential.
        """
        c = credential
        inserted = await self.conn.fetchval(
            "INSERT INTO credentials (tenant_id, credential_id, member_id, kind, holder_public_key,"
            " issuer_public_key, key_id, purposes, per_transaction_cap_fen, per_day_cap_fen, per_day_count,"
            " not_before, not_after, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            " ON CONFLICT (tenant_id, credential_id) DO NOTHING RETURNING true",
            c.tenant_id, c.credential_id, c.member_id, c.kind.value, c.holder_public_key, c.issuer_public_key,
            c.key_id, [p.value for p in c.purposes], c.caps.per_transaction_fen, c.caps.per_day_fen,
            c.caps.per_day_count, c.not_before, c.not_after, c.issued_at,
        )
        if not inserted:
            return False
        await emit(
            self.conn, subject=SUBJECT_CREDENTIAL_ISSUED, event_type=SUBJECT_CREDENTIAL_ISSUED,
            tenant_id=str(c.tenant_id),
            data={
                "tenant_id": str(c.tenant_id),
                "credential_id": str(c.credential_id),
                "member_id": str(c.member_id),
                "kind": c.kind.value,
                "key_id": c.key_id.hex(),
                "purposes": [p.value for p in c.purposes],
                "not_before": c.not_before.isoformat(),
                "not_after": c.not_after.isoformat(),
            },
        )
        return True

    async def credential_member(self, credential_id: uuid.UUID) -> uuid.UUID | None:
        return await self.conn.fetchval(
            "SELECT member_id FROM credentials WHERE tenant_id = $1 AND credential_id = $2",
            self.tenant_id, credential_id,
        )

    async def revocation_of(self, credential_id: uuid.UUID) -> Revocation | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM revocations WHERE tenant_id = $1 AND credential_id = $2", self.tenant_id, credential_id
        )
        return _revocation(row) if row else None

    async def revoke(self, *, where: str, args: list[Any], reason: str, now: datetime) -> list[Revocation]:
        """Revoke the tenant's unrevoked credentials matching ``where`` (on alias c); one entry and
        one event each."""
        await self._lock_tenant()
        rows = await self.conn.fetch(
            f"SELECT c.credential_id, c.member_id, c.not_after FROM credentials c"
            f" WHERE c.tenant_id = $1 AND c.revoked_at IS NULL AND {where}"
            f" ORDER BY c.issued_at, c.credential_id FOR UPDATE",
            self.tenant_id, *args,
        )
        if not rows:
            return []
        head = await self.conn.fetchval(
            "UPDATE tenant_state SET revocation_version = revocation_version + $2 WHERE tenant_id = $1"
            " RETURNING revocation_version",
            self.tenant_id, len(rows),
        )
        first = head - len(rows) + 1
        entries = [
            Revocation(credential_id=r["credential_id"], member_id=r["member_id"], revoked_at=now,
                       not_after=r["not_after"], reason=reason, version=first + i)
            for i, r in enumerate(rows)
        ]
        await self.conn.executemany(
            "INSERT INTO revocations (tenant_id, version, credential_id, member_id, revoked_at, not_after, reason)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(self.tenant_id, e.version, e.credential_id, e.member_id, e.revoked_at, e.not_after, e.reason)
             for e in entries],
        )
        await self.conn.execute(
            "UPDATE credentials SET revoked_at = $3 WHERE tenant_id = $1 AND credential_id = ANY($2::uuid[])",
            self.tenant_id, [e.credential_id for e in entries], now,
        )
        await emit_many(self.conn, events=[revocation_event(tenant_id=self.tenant_id, entry=e) for e in entries])
        return entries

    async def revoke_credential(self, *, credential_id: uuid.UUID, reason: str, now: datetime) -> list[Revocation]:
        return await self.revoke(where="c.credential_id = $2", args=[credential_id], reason=reason, now=now)

    async def revoke_member(self, *, member_id: uuid.UUID, reason: str, now: datetime) -> list[Revocation]:
        return await self.revoke(where="c.member_id = $2", args=[member_id], reason=reason, now=now)

    async def revoke_holder_key_credentials(self, *, public_key: bytes, reason: str, now: datetime
                                            ) -> list[Revocation]:
        return await self.revoke(where="c.holder_public_key = $2", args=[public_key], reason=reason, now=now)


class CodegenStore:
    def __init__(self, pool: asyncpg.Pool, *, master_key: bytes, key_id_for: Callable[[bytes], bytes]):
        self._pool = pool
        self._master_key = master_key
        self._key_id_for = key_id_for

    @asynccontextmanager
    async def tenant_tx(self, tenant_id: uuid.UUID) -> AsyncIterator[TenantTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield TenantTx(conn, tenant_id=tenant_id, master_key=self._master_key, key_id_for=self._key_id_for)

    async def trust_list(self, *, tenant_id: uuid.UUID, since_version: int) -> tuple[int, list[IssuerKey]]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            version = await conn.fetchval("SELECT trust_version FROM tenant_state WHERE tenant_id = $1", tenant_id)
            if since_version == 0:
                rows = await conn.fetch(
                    f"SELECT {_ISSUER_COLUMNS} FROM issuer_keys WHERE tenant_id = $1 AND status <> 'retired'"
                    " ORDER BY version, public_key", tenant_id,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {_ISSUER_COLUMNS} FROM issuer_keys WHERE tenant_id = $1 AND version > $2"
                    " ORDER BY version, public_key", tenant_id, since_version,
                )
        return version or 0, [_issuer_key(r) for r in rows]

    async def revocations(self, *, tenant_id: uuid.UUID, since_version: int, limit: int) -> list[Revocation]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM revocations WHERE tenant_id = $1 AND version > $2 ORDER BY version LIMIT $3",
                tenant_id, since_version, limit,
            )
        return [_revocation(r) for r in rows]

    async def tenants_with_keys_due(self, *, now: datetime) -> list[uuid.UUID]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT tenant_id FROM issuer_keys WHERE status = 'verifying' AND retire_after <= $1", now
            )
        return [r["tenant_id"] for r in rows]


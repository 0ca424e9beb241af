"""All of policy's SQL. Rows in, domain values out; no rules and no protobuf here.

Writes run in a ``TenantTx``: one transaction in one tenant. Creating a version and publishing
lock the tenant's ``tenant_state`` row, so version numbers are handed out in commit order and two
concurrent publications of one tenant apply one after the other (the last one wins, each with its
own event). Making the tenant's first bundle key locks it too, so there is one signing key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
import nacl.signing

from runtime.events import emit
from services.policy import keys
from services.policy.domain import (
    BundleKey,
    InForce,
    Publication,
    Rotation,
    RuleSetStatus,
    StoredVersion,
    published_event_data,
)

SUBJECT_RULESET_PUBLISHED = "policy.ruleset.published"

# The version with its status and its newest publication (if any), in one statement.
_VERSION_SELECT = """
    SELECT v.tenant_id, v.version, v.document, v.sha256, v.note, v.created_at,
           (s.published_version = v.version) AS is_published,
           p.published_at, p.published_by
    FROM rule_set_versions v
    JOIN tenant_state s ON s.tenant_id = v.tenant_id
    LEFT JOIN LATERAL (
        SELECT published_at, published_by FROM publications
        WHERE tenant_id = v.tenant_id AND version = v.version ORDER BY seq DESC LIMIT 1
    ) p ON true
"""


def _version(row: asyncpg.Record, *, with_document: bool = True) -> StoredVersion:
    if row["is_published"]:
        status = RuleSetStatus.PUBLISHED
    elif row["published_at"] is not None:
        status = RuleSetStatus.SUPERSEDED
    else:
        status = RuleSetStatus.DRAFT
    return StoredVersion(
        tenant_id=row["tenant_id"],
        version=row["version"],
        status=status,
        document=row["document"] if with_document else "",
        sha256=bytes(row["sha256"]),
        note=row["note"],
        created_at=row["created_at"],
        published_at=row["published_at"],
        published_by=row["published_by"] or "",
    )


def _bundle_key(row: asyncpg.Record) -> BundleKey:
    return BundleKey(key_id=row["key_id"], public_key=bytes(row["public_key"]), created_at=row["created_at"],
                     signing=bool(row.get("signing", False)))


SUBJECT_BUNDLE_KEY_ROTATED = "policy.bundle_key.rotated"
_KEY_COLUMNS = "key_id, public_key, created_at, signing"


class TenantTx:
    """One transaction's view of one tenant's policy data."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, master_key: bytes):
        self.conn = conn
        self.tenant_id = tenant_id
        self._master_key = master_key

    async def _lock_tenant(self) -> asyncpg.Record:
        await self.conn.execute("INSERT INTO tenant_state (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
                                self.tenant_id)
        return await self.conn.fetchrow(
            "SELECT last_version, published_version FROM tenant_state WHERE tenant_id = $1 FOR UPDATE",
            self.tenant_id,
        )

    # --- versions -----------------------------------------------------------------------------

    async def create_version(self, *, document: str, sha256: bytes, note: str, now: datetime) -> StoredVersion:
        await self._lock_tenant()
        version = await self.conn.fetchval(
            "UPDATE tenant_state SET last_version = last_version + 1 WHERE tenant_id = $1 RETURNING last_version",
            self.tenant_id,
        )
        await self.conn.execute(
            "INSERT INTO rule_set_versions (tenant_id, version, document, sha256, note, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            self.tenant_id, version, document, sha256, note, now,
        )
        found = await self.version(version)
        assert found is not None
        return found

    async def version(self, version: int) -> StoredVersion | None:
        row = await self.conn.fetchrow(f"{_VERSION_SELECT} WHERE v.tenant_id = $1 AND v.version = $2",
                                       self.tenant_id, version)
        return None if row is None else _version(row)

    async def publish(self, *, version: int, published_by: str, now: datetime) -> Publication | None:
        """Make ``version`` the published one; None if the tenant has no such version (nothing
        changes then). Publishing the version already published changes nothing."""
        state = await self._lock_tenant()
        stored = await self.version(version)
        if stored is None:
            return None
        previous = state["published_version"] or 0
        if previous == version:
            return Publication(version=stored, previous_version=previous, changed=False)
        await self.conn.execute("UPDATE tenant_state SET published_version = $2 WHERE tenant_id = $1",
                                self.tenant_id, version)
        await self.conn.execute(
            "INSERT INTO publications (tenant_id, version, published_by, published_at) VALUES ($1, $2, $3, $4)",
            self.tenant_id, version, published_by, now,
        )
        published = await self.version(version)
        assert published is not None
        await emit(self.conn, subject=SUBJECT_RULESET_PUBLISHED, event_type=SUBJECT_RULESET_PUBLISHED,
                   tenant_id=str(self.tenant_id),
                   data=published_event_data(version=published, previous_version=previous))
        return Publication(version=published, previous_version=previous, changed=True)

    # --- bundle keys and bundles ----------------------------------------------------------------

    async def _insert_signing_key(self, *, now: datetime) -> asyncpg.Record:
        new = nacl.signing.SigningKey.generate()
        public_key = bytes(new.verify_key)
        key_id = keys.key_id_for(public_key)
        sealed = keys.seal_seed(master_key=self._master_key, tenant_id=self.tenant_id, key_id=key_id,
                                public_key=public_key, seed=bytes(new))
        return await self.conn.fetchrow(
            "INSERT INTO bundle_keys (tenant_id, key_id, public_key, sealed_private, signing, created_at)"
            " VALUES ($1, $2, $3, $4, true, $5) RETURNING key_id, public_key, sealed_private, created_at, signing",
            self.tenant_id, key_id, public_key, sealed, now,
        )

    async def _key(self, key_id: str | None) -> BundleKey | None:
        if key_id is None:
            return None
        row = await self.conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM bundle_keys WHERE tenant_id = $1 AND key_id = $2",
                                       self.tenant_id, key_id)
        return None if row is None else _bundle_key(row)

    async def rotate_signing_key(self, *, idempotency_key: str, now: datetime) -> Rotation:
        """A new signing key, the old one kept to verify what it signed; or, for a key already
        used in this tenant, that first rotation (replayed).
        Under the tenant's lock, so two rotations of one tenant apply one after the other."""
        await self._lock_tenant()
        done = await self.conn.fetchrow(
            "SELECT key_id, previous_key_id FROM bundle_key_rotations WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key)
        if done is not None:
            signing = await self._key(done["key_id"])
            assert signing is not None
            return Rotation(tenant_id=self.tenant_id, signing_key=signing,
                            previous_key=await self._key(done["previous_key_id"]), replayed=True)
        old = await self.conn.fetchrow(
            f"UPDATE bundle_keys SET signing = false WHERE tenant_id = $1 AND signing RETURNING {_KEY_COLUMNS}",
            self.tenant_id)
        signing = _bundle_key(await self._insert_signing_key(now=now))
        previous = None if old is None else _bundle_key(old)
        # The tenant's lock, held since the look-up above, keeps a concurrent repeat of the key out.
        await self.conn.execute(
            "INSERT INTO bundle_key_rotations (tenant_id, idempotency_key, key_id, previous_key_id, rotated_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            self.tenant_id, idempotency_key, signing.key_id, previous.key_id if previous else None, now)
        await emit(self.conn, subject=SUBJECT_BUNDLE_KEY_ROTATED, event_type=SUBJECT_BUNDLE_KEY_ROTATED,
                   tenant_id=str(self.tenant_id),
                   data={"tenant_id": str(self.tenant_id), "key_id": signing.key_id,
                         "previous_key_id": previous.key_id if previous else "",
                         "rotated_at": now.isoformat()})
        return Rotation(tenant_id=self.tenant_id, signing_key=signing, previous_key=previous, replayed=False)

    async def signing_key(self, *, now: datetime) -> tuple[BundleKey, nacl.signing.SigningKey]:
        """The tenant's bundle signing key, made (and sealed) on first need."""
        row = await self.conn.fetchrow(
            "SELECT key_id, public_key, sealed_private, created_at FROM bundle_keys"
            " WHERE tenant_id = $1 AND signing", self.tenant_id,
        )
        if row is None:
            await self._lock_tenant()
            row = await self.conn.fetchrow(
                "SELECT key_id, public_key, sealed_private, created_at FROM bundle_keys"
                " WHERE tenant_id = $1 AND signing", self.tenant_id,
            )
        if row is None:
            row = await self._insert_signing_key(now=now)
        key = _bundle_key(row)
        opened = keys.open_signing_key(master_key=self._master_key, tenant_id=self.tenant_id, key_id=key.key_id,
                                       public_key=key.public_key, sealed=bytes(row["sealed_private"]))
        return key, opened

    async def bundle(self, *, version: int, key_id: str) -> bytes | None:
        value = await self.conn.fetchval(
            "SELECT bundle FROM bundles WHERE tenant_id = $1 AND version = $2 AND key_id = $3",
            self.tenant_id, version, key_id,
        )
        return None if value is None else bytes(value)

    async def save_bundle(self, *, version: int, key_id: str, bundle: bytes, now: datetime) -> bytes:
        """Keep the bundle; answers the one kept (a concurrent caller's, if it came first)."""
        await self.conn.execute(
            "INSERT INTO bundles (tenant_id, version, key_id, bundle, created_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT DO NOTHING", self.tenant_id, version, key_id, bundle, now,
        )
        kept = await self.bundle(version=version, key_id=key_id)
        assert kept is not None
        return kept


class PolicyStore:
    def __init__(self, pool: asyncpg.Pool, *, master_key: bytes):
        self._pool = pool
        self._master_key = master_key

    @asynccontextmanager
    async def tenant_tx(self, tenant_id: uuid.UUID) -> AsyncIterator[TenantTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield TenantTx(conn, tenant_id=tenant_id, master_key=self._master_key)

    async def version(self, *, tenant_id: uuid.UUID, version: int) -> StoredVersion | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(f"{_VERSION_SELECT} WHERE v.tenant_id = $1 AND v.version = $2",
                                      tenant_id, version)
        return None if row is None else _version(row)

    async def published(self, *, tenant_id: uuid.UUID) -> tuple[int, bytes] | None:
        """The published version and its SHA-256, or None: the one read on Evaluate's path."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT v.version, v.sha256 FROM tenant_state s JOIN rule_set_versions v"
                " ON v.tenant_id = s.tenant_id AND v.version = s.published_version WHERE s.tenant_id = $1",
                tenant_id,
            )
        return None if row is None else (row["version"], bytes(row["sha256"]))

    async def document(self, *, tenant_id: uuid.UUID, version: int) -> tuple[str, bytes] | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT document, sha256 FROM rule_set_versions WHERE tenant_id = $1 AND version = $2",
                tenant_id, version,
            )
        return None if row is None else (row["document"], bytes(row["sha256"]))

    async def versions(self, *, tenant_id: uuid.UUID, below: int | None, limit: int
                       ) -> tuple[list[StoredVersion], int]:
        """A page of versions newest first (below ``below`` when given), and the published version (0: none)."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                f"{_VERSION_SELECT} WHERE v.tenant_id = $1 AND ($2::bigint IS NULL OR v.version < $2)"
                " ORDER BY v.version DESC LIMIT $3", tenant_id, below, limit,
            )
            published = await conn.fetchval("SELECT published_version FROM tenant_state WHERE tenant_id = $1",
                                            tenant_id)
        return [_version(r, with_document=False) for r in rows], published or 0

    async def in_force(self, *, tenant_id: uuid.UUID, since: datetime, until: datetime, versions: list[int]
                       ) -> tuple[list[InForce], list[tuple[int, str]]]:
        """The publications in force at some instant of [since, until] (each until the next one), and
        the documents of ``versions`` that were ever published, in one snapshot."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                """SELECT version, published_at, next_at FROM (
                       SELECT version, published_at, lead(published_at) OVER (ORDER BY seq) AS next_at
                       FROM publications WHERE tenant_id = $1) p
                   WHERE published_at <= $3 AND (next_at IS NULL OR next_at > $2)
                   ORDER BY published_at""",
                tenant_id, since, until,
            )
            documents = await conn.fetch(
                """SELECT v.version, v.document FROM rule_set_versions v
                   WHERE v.tenant_id = $1 AND v.version = ANY($2::bigint[])
                     AND EXISTS (SELECT 1 FROM publications p WHERE p.tenant_id = v.tenant_id AND p.version = v.version)
                   ORDER BY v.version""",
                tenant_id, versions,
            )
        spans = [InForce(version=r["version"], since=r["published_at"], until=r["next_at"]) for r in rows]
        return spans, [(r["version"], r["document"]) for r in documents]

    async def bundle_keys(self, *, tenant_id: uuid.UUID) -> list[BundleKey]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM bundle_keys WHERE tenant_id = $1"
                " ORDER BY created_at, key_id", tenant_id,
            )
        return [_bundle_key(r) for r in rows]

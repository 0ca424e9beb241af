"""All of identity's SQL. Rows in, domain values out; no rules and no protobuf here.

Directory writes (members, cards, the feed, the blacklist) go through a ``DirectoryWriter``: it
holds the tenant's ``directory_heads`` row locked for the whole transaction, so the tenant's
writes are serial and every feed sequence and blacklist version is handed out in commit order.
A change, its feed entry and its event are written in that one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from runtime.errors import FailedPrecondition, NotFound
from runtime.events import PendingEvent, emit, emit_many
from services.identity.domain import (
    ApiClient,
    Card,
    CardFacts,
    FreezeOrigin,
    CardStatus,
    ChangeKind,
    ImportRowError,
    ImportState,
    Member,
    MemberChange,
    MemberImport,
    MemberStatus,
    StateAt,
    StateQuery,
    Tenant,
    TenantGrant,
    TenantKind,
    change_event_data,
    change_subject,
    tenant_event_data,
)

# The most row errors one GetMemberImport answer carries; rows_failed still counts them all.
MAX_IMPORT_ERRORS_SHOWN = 1000

_MEMBER_COLUMNS = """
    m.tenant_id, m.member_id, m.external_number, m.name, m.groups, m.status, m.frozen_reason,
    m.face_enrolment_ref, m.created_at, m.updated_at, m.version, m.frozen_by,
    ARRAY(SELECT ROW(c.card_uid, c.status, c.bound_at, c.lost_at) FROM cards c
          WHERE c.tenant_id = m.tenant_id AND c.member_id = m.member_id
          ORDER BY c.bound_at, c.card_uid) AS cards
"""


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        tenant_id=row["tenant_id"],
        name=row["name"],
        kind=TenantKind(row["kind"]),
        time_zone=row["time_zone"],
        currency=row["currency"],
        created_at=row["created_at"],
    )


def _member(row: asyncpg.Record) -> Member:
    return Member(
        tenant_id=row["tenant_id"],
        member_id=row["member_id"],
        external_number=row["external_number"],
        name=row["name"],
        groups=row["groups"],
        status=MemberStatus(row["status"]),
        cards=tuple(
            Card(card_uid=uid, status=CardStatus(status), bound_at=bound_at, lost_at=lost_at)
            for uid, status, bound_at, lost_at in row["cards"]
        ),
        face_enrolment_ref=row["face_enrolment_ref"],
        frozen_reason=row["frozen_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
        frozen_by=FreezeOrigin(row["frozen_by"]) if row["frozen_by"] else None,
    )


def member_snapshot(member: Member) -> dict[str, Any]:
    """The member as the feed keeps it (JSON)."""
    return {
        "tenant_id": str(member.tenant_id),
        "member_id": str(member.member_id),
        "external_number": member.external_number,
        "name": member.name,
        "groups": dict(member.groups),
        "status": member.status.value,
        "cards": [
            {
                "card_uid": c.card_uid,
                "status": c.status.value,
                "bound_at": c.bound_at.isoformat(),
                "lost_at": c.lost_at.isoformat() if c.lost_at else None,
            }
            for c in member.cards
        ],
        "face_enrolment_ref": member.face_enrolment_ref,
        "frozen_reason": member.frozen_reason,
        "created_at": member.created_at.isoformat(),
        "updated_at": member.updated_at.isoformat(),
        "version": member.version,
        "frozen_by": member.frozen_by.value if member.frozen_by else "",
    }


def member_from_snapshot(snapshot: dict[str, Any]) -> Member:
    return Member(
        tenant_id=uuid.UUID(snapshot["tenant_id"]),
        member_id=uuid.UUID(snapshot["member_id"]),
        external_number=snapshot["external_number"],
        name=snapshot["name"],
        groups=snapshot["groups"],
        status=MemberStatus(snapshot["status"]),
        cards=tuple(
            Card(
                card_uid=c["card_uid"],
                status=CardStatus(c["status"]),
                bound_at=datetime.fromisoformat(c["bound_at"]),
                lost_at=datetime.fromisoformat(c["lost_at"]) if c["lost_at"] else None,
            )
            for c in snapshot["cards"]
        ),
        face_enrolment_ref=snapshot["face_enrolment_ref"],
        frozen_reason=snapshot["frozen_reason"],
        created_at=datetime.fromisoformat(snapshot["created_at"]),
        updated_at=datetime.fromisoformat(snapshot["updated_at"]),
        version=snapshot["version"],
        # Entries from before freezes had an origin name none.
        frozen_by=FreezeOrigin(snapshot["frozen_by"]) if snapshot.get("frozen_by") else None,
    )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class DirectoryChange:
    sequence: int
    kind: ChangeKind
    member: Member
    changed_at: datetime


@dataclass(frozen=True)
class BlacklistEntry:
    card_uid: str
    member_id: uuid.UUID
    lost_at: datetime
    version: int


@dataclass(frozen=True)
class ImportCounts:
    """How many rows one chunk of an import created, updated, left alone or refused."""

    done: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0


class DirectoryWriter:
    """One transaction's view of a tenant's directory, holding the tenant's write lock."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, feed_sequence: int, blacklist_version: int):
        self._conn = conn
        self.tenant_id = tenant_id
        self._feed_sequence = feed_sequence
        self._blacklist_version = blacklist_version

    @classmethod
    async def lock(cls, conn: asyncpg.Connection, *, tenant_id: uuid.UUID) -> DirectoryWriter | None:
        """Lock the tenant's directory until the transaction ends; None when there is no such tenant."""
        row = await conn.fetchrow(
            "SELECT feed_sequence, blacklist_version FROM directory_heads WHERE tenant_id = $1 FOR UPDATE",
            tenant_id,
        )
        if row is None:
            return None
        return cls(
            conn, tenant_id=tenant_id, feed_sequence=row["feed_sequence"], blacklist_version=row["blacklist_version"]
        )

    async def member(self, member_id: uuid.UUID) -> Member | None:
        row = await self._conn.fetchrow(
            f"SELECT {_MEMBER_COLUMNS} FROM members m WHERE m.tenant_id = $1 AND m.member_id = $2",
            self.tenant_id,
            member_id,
        )
        return _member(row) if row else None

    async def _fetch_planned_for_args(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Fetch with a plan made for these very arguments. A statement's cached generic plan may
        date from when the tables were empty (a first import into a new tenant) and scan the
        whole table for each chunk of a bulk import."""
        await self._conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        try:
            return await self._conn.fetch(query, *args)
        finally:
            await self._conn.execute("SET LOCAL plan_cache_mode = auto")

    async def members_by_number(self, numbers: Sequence[str]) -> dict[str, Member]:
        rows = await self._fetch_planned_for_args(
            f"SELECT {_MEMBER_COLUMNS} FROM members m WHERE m.tenant_id = $1 AND m.external_number = ANY($2::text[])",
            self.tenant_id,
            list(numbers),
        )
        return {row["external_number"]: _member(row) for row in rows}

    async def card_facts(self, card_uids: Sequence[str]) -> dict[str, CardFacts]:
        """For each UID: whether it is blacklisted here and who holds it as an active card."""
        uids = sorted(set(card_uids))
        rows = await self._fetch_planned_for_args(
            """SELECT card_uid, NULL::uuid AS holder FROM card_blacklist
               WHERE tenant_id = $1 AND card_uid = ANY($2::text[])
               UNION ALL
               SELECT card_uid, member_id FROM cards
               WHERE tenant_id = $1 AND card_uid = ANY($2::text[]) AND status = 'active'""",
            self.tenant_id,
            uids,
        )
        blacklisted = {r["card_uid"] for r in rows if r["holder"] is None}
        holders = {r["card_uid"]: r["holder"] for r in rows if r["holder"] is not None}
        return {uid: CardFacts(blacklisted=uid in blacklisted, active_holder=holders.get(uid)) for uid in uids}

    async def record(self, changes: Sequence[MemberChange]) -> list[int]:
        """Write changes in order, each with its feed entry and its event. Answers their sequences."""
        if not changes:
            return []
        tenant_id = self.tenant_id
        created: dict[uuid.UUID, Member] = {}
        updated: dict[uuid.UUID, Member] = {}
        card_rows: list[tuple[Any, ...]] = []
        lost_rows: list[tuple[Any, ...]] = []
        blacklist_rows: list[tuple[Any, ...]] = []
        feed_rows: list[tuple[Any, ...]] = []
        events: list[PendingEvent] = []
        sequences: list[int] = []
        for change in changes:
            member = change.member
            assert member.tenant_id == tenant_id, "a change of another tenant reached this tenant's writer"
            # A member created in this batch is inserted in its final state, not inserted then updated.
            if change.kind is ChangeKind.MEMBER_CREATED or member.member_id in created:
                created[member.member_id] = member
            else:
                updated[member.member_id] = member
            if change.kind is ChangeKind.CARD_BOUND:
                card = member.card(change.card_uid)
                assert card is not None
                card_rows.append((member.member_id, card.card_uid, card.status.value, card.bound_at))
            elif change.kind is ChangeKind.CARD_LOST:
                card = member.card(change.card_uid)
                assert card is not None and card.lost_at is not None
                self._blacklist_version += 1
                lost_rows.append((member.member_id, card.card_uid, card.lost_at))
                blacklist_rows.append((card.card_uid, member.member_id, card.lost_at, self._blacklist_version))
            self._feed_sequence += 1
            sequences.append(self._feed_sequence)
            actor = change.actor
            feed_rows.append(
                (self._feed_sequence, change.kind.value, member.member_id, member_snapshot(member), member.updated_at,
                 actor.client_id if actor else "", actor.attestation_id if actor else "")
            )
            subject = change_subject(change)
            events.append(
                PendingEvent(
                    subject=subject,
                    event_type=subject,
                    data=change_event_data(change, sequence=self._feed_sequence),
                    tenant_id=str(tenant_id),
                )
            )
        conn = self._conn
        if created:
            await conn.execute(
                """INSERT INTO members (tenant_id, member_id, external_number, name, groups, status, frozen_reason,
                                        face_enrolment_ref, version, created_at, updated_at, frozen_by)
                   SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[],
                                            $8::text[], $9::bigint[], $10::timestamptz[], $11::timestamptz[],
                                            $12::text[])""",
                tenant_id,
                *_columns([_member_row(m) for m in created.values()], width=11),
            )
        if updated:
            await conn.execute(
                """UPDATE members m
                   SET external_number = u.external_number, name = u.name, groups = u.groups, status = u.status,
                       frozen_reason = u.frozen_reason, face_enrolment_ref = u.face_enrolment_ref,
                       version = u.version, created_at = u.created_at, updated_at = u.updated_at,
                       frozen_by = u.frozen_by
                   FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[], $8::text[],
                               $9::bigint[], $10::timestamptz[], $11::timestamptz[], $12::text[])
                        AS u(member_id, external_number, name, groups, status, frozen_reason, face_enrolment_ref,
                             version, created_at, updated_at, frozen_by)
                   WHERE m.tenant_id = $1 AND m.member_id = u.member_id""",
                tenant_id,
                *_columns([_member_row(m) for m in updated.values()], width=11),
            )
        if card_rows:
            await conn.execute(
                """INSERT INTO cards (tenant_id, member_id, card_uid, status, bound_at)
                   SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::timestamptz[])""",
                tenant_id,
                *_columns(card_rows, width=4),
            )
        if lost_rows:
            await conn.execute(
                """UPDATE cards c SET status = 'lost', lost_at = u.lost_at
                   FROM unnest($2::uuid[], $3::text[], $4::timestamptz[]) AS u(member_id, card_uid, lost_at)
                   WHERE c.tenant_id = $1 AND c.member_id = u.member_id AND c.card_uid = u.card_uid""",
                tenant_id,
                *_columns(lost_rows, width=3),
            )
            await conn.execute(
                """INSERT INTO card_blacklist (tenant_id, card_uid, member_id, lost_at, version)
                   SELECT $1, * FROM unnest($2::text[], $3::uuid[], $4::timestamptz[], $5::bigint[])""",
                tenant_id,
                *_columns(blacklist_rows, width=4),
            )
        await conn.execute(
            """INSERT INTO directory_changes (tenant_id, sequence, kind, member_id, member, changed_at, client_id,
                                              attestation_id)
               SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::uuid[], $5::jsonb[], $6::timestamptz[],
                                        $7::text[], $8::text[])""",
            tenant_id,
            *_columns(feed_rows, width=7),
        )
        await emit_many(conn, events=events)
        await conn.execute(
            "UPDATE directory_heads SET feed_sequence = $2, blacklist_version = $3 WHERE tenant_id = $1",
            tenant_id,
            self._feed_sequence,
            self._blacklist_version,
        )
        return sequences


class ImportChunk:
    """The transaction applying one chunk of a running import; ``rows_done`` is where it starts."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        *,
        import_id: uuid.UUID,
        rows_done: int,
        rows_total: int,
        directory: DirectoryWriter,
    ):
        self._conn = conn
        self.import_id = import_id
        self.rows_done = rows_done
        self.rows_total = rows_total
        self.directory = directory

    async def save(
        self, *, counts: ImportCounts, errors: Sequence[ImportRowError], finished_at: datetime | None
    ) -> None:
        """Count the chunk's rows in the transaction that applied them; the last chunk ends the import."""
        if errors:
            await self._conn.executemany(
                "INSERT INTO member_import_errors (import_id, line, external_number, reason) VALUES ($1, $2, $3, $4)",
                [(self.import_id, e.line, e.external_number, e.reason) for e in errors],
            )
        await self._conn.execute(
            """UPDATE member_imports
               SET rows_done = rows_done + $2, rows_created = rows_created + $3, rows_updated = rows_updated + $4,
                   rows_unchanged = rows_unchanged + $5, rows_failed = rows_failed + $6,
                   state = CASE WHEN $7::timestamptz IS NULL THEN state ELSE 'done' END,
                   finished_at = $7,
                   csv = CASE WHEN $7::timestamptz IS NULL THEN csv END
               WHERE import_id = $1""",
            self.import_id,
            counts.done,
            counts.created,
            counts.updated,
            counts.unchanged,
            counts.failed,
            finished_at,
        )


def _columns(rows: Sequence[tuple[Any, ...]], *, width: int) -> list[list[Any]]:
    """Rows to columns, for one ``unnest`` insert per table instead of a statement per row."""
    assert all(len(row) == width for row in rows)
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _member_row(member: Member) -> tuple[Any, ...]:
    return (
        member.member_id,
        member.external_number,
        member.name,
        dict(member.groups),
        member.status.value,
        member.frozen_reason,
        member.face_enrolment_ref,
        member.version,
        member.created_at,
        member.updated_at,
        member.frozen_by.value if member.frozen_by else "",
    )


def _member_import(row: asyncpg.Record, errors: Sequence[asyncpg.Record]) -> MemberImport:
    return MemberImport(
        import_id=row["import_id"],
        tenant_id=row["tenant_id"],
        state=ImportState(row["state"]),
        rows_total=row["rows_total"],
        rows_done=row["rows_done"],
        rows_created=row["rows_created"],
        rows_updated=row["rows_updated"],
        rows_unchanged=row["rows_unchanged"],
        rows_failed=row["rows_failed"],
        errors=tuple(
            ImportRowError(line=e["line"], external_number=e["external_number"], reason=e["reason"]) for e in errors
        ),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        failure=row["failure"],
    )


_IMPORT_COLUMNS = """import_id, tenant_id, state, rows_total, rows_done, rows_created, rows_updated, rows_unchanged,
                     rows_failed, created_at, finished_at, failure"""


class IdentityStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    # --- tenants ---------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> tuple[Tenant, bool]:
        """Insert the tenant unless its id exists; answers the stored tenant and whether it is new."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO tenants (tenant_id, name, kind, time_zone, currency, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id) DO NOTHING RETURNING *""",
                tenant.tenant_id,
                tenant.name,
                tenant.kind.value,
                tenant.time_zone,
                tenant.currency,
                tenant.created_at,
            )
            if row is None:
                existing = await conn.fetchrow("SELECT * FROM tenants WHERE tenant_id = $1", tenant.tenant_id)
                return _tenant(existing), False
            await conn.execute("INSERT INTO directory_heads (tenant_id) VALUES ($1)", tenant.tenant_id)
            await emit(
                conn,
                subject="identity.tenant.created",
                event_type="identity.tenant.created",
                data=tenant_event_data(tenant),
                tenant_id=str(tenant.tenant_id),
            )
            return _tenant(row), True

    async def get_tenant(self, tenant_id: uuid.UUID) -> Tenant | None:
        row = await self._pool.fetchrow("SELECT * FROM tenants WHERE tenant_id = $1", tenant_id)
        return _tenant(row) if row else None

    async def list_tenants(self, *, after: uuid.UUID | None, limit: int) -> list[Tenant]:
        """Up to ``limit`` tenants in id order, those after ``after`` (None: from the first)."""
        rows = await self._pool.fetch(
            "SELECT * FROM tenants WHERE $1::uuid IS NULL OR tenant_id > $1 ORDER BY tenant_id LIMIT $2",
            after, limit)
        return [_tenant(row) for row in rows]

    async def require_tenant(self, tenant_id: uuid.UUID) -> None:
        if not await self._pool.fetchval("SELECT true FROM tenants WHERE tenant_id = $1", tenant_id):
            raise NotFound(f"tenant {tenant_id} not found", reason="TENANT_NOT_FOUND")

    # --- members ---------------------------------------------------------------------------

    @asynccontextmanager
    async def directory_writer(self, *, tenant_id: uuid.UUID) -> AsyncIterator[DirectoryWriter]:
        """A transaction holding the tenant's directory lock; it commits when the block ends cleanly."""
        async with self._pool.acquire() as conn, conn.transaction():
            writer = await DirectoryWriter.lock(conn, tenant_id=tenant_id)
            if writer is None:
                raise NotFound(f"tenant {tenant_id} not found", reason="TENANT_NOT_FOUND")
            yield writer

    async def get_member(self, *, tenant_id: uuid.UUID, member_id: uuid.UUID) -> Member | None:
        row = await self._pool.fetchrow(
            f"SELECT {_MEMBER_COLUMNS} FROM members m WHERE m.tenant_id = $1 AND m.member_id = $2",
            tenant_id,
            member_id,
        )
        return _member(row) if row else None

    async def member_by_card(self, *, tenant_id: uuid.UUID, card_uid: str) -> tuple[Member | None, bool]:
        """The member holding ``card_uid`` as an active card (False), or the one who reported it
        lost (True); (None, False) when nobody in the tenant has it. One indexed read."""
        row = await self._pool.fetchrow(
            f"""SELECT {_MEMBER_COLUMNS}, false AS lost FROM cards k
                    JOIN members m ON m.tenant_id = k.tenant_id AND m.member_id = k.member_id
                WHERE k.tenant_id = $1 AND k.card_uid = $2 AND k.status = 'active'
                UNION ALL
                SELECT {_MEMBER_COLUMNS}, true AS lost FROM card_blacklist b
                    JOIN members m ON m.tenant_id = b.tenant_id AND m.member_id = b.member_id
                WHERE b.tenant_id = $1 AND b.card_uid = $2
                LIMIT 1""",
            tenant_id,
            card_uid,
        )
        return (_member(row), row["lost"]) if row else (None, False)

    async def states_at(self, *, tenant_id: uuid.UUID, queries: Sequence[StateQuery]) -> list[StateAt]:
        """What the directory said at each query's instant, in one statement: a card's holder is the
        member it was last bound to at or before the instant; a member's status is that of its
        newest feed entry at or before it (none: the member did not exist yet)."""
        rows = await self._pool.fetch(
            """SELECT q.i, COALESCE(q.member_id, c.member_id) AS member_id, c.lost_at <= q.at AS card_lost,
                      d.status
               FROM unnest($2::uuid[], $3::text[], $4::timestamptz[]) WITH ORDINALITY AS q(member_id, card_uid, at, i)
               LEFT JOIN LATERAL (
                   SELECT k.member_id, k.lost_at FROM cards k
                   WHERE q.card_uid <> '' AND k.tenant_id = $1 AND k.card_uid = q.card_uid AND k.bound_at <= q.at
                   ORDER BY k.bound_at DESC LIMIT 1) c ON true
               LEFT JOIN LATERAL (
                   SELECT f.member->>'status' AS status FROM directory_changes f
                   WHERE f.tenant_id = $1 AND f.member_id = COALESCE(q.member_id, c.member_id) AND f.changed_at <= q.at
                   ORDER BY f.changed_at DESC, f.sequence DESC LIMIT 1) d ON true
               ORDER BY q.i""",
            tenant_id,
            [q.member_id for q in queries],
            [q.card_uid for q in queries],
            [q.at for q in queries],
        )
        return [
            StateAt(
                member_id=row["member_id"] if row["status"] is not None else None,
                status=MemberStatus(row["status"]) if row["status"] is not None else None,
                card_lost=bool(row["card_lost"]),
            )
            for row in rows
        ]

    async def members_by_face(self, *, tenant_id: uuid.UUID, face_enrolment_ref: str, limit: int = 10) -> list[Member]:
        """Members enrolled with this face reference (normally one), by the partial index."""
        rows = await self._pool.fetch(
            f"""SELECT {_MEMBER_COLUMNS} FROM members m
                WHERE m.tenant_id = $1 AND m.face_enrolment_ref = $2 AND m.face_enrolment_ref <> ''
                ORDER BY m.updated_at DESC LIMIT $3""",
            tenant_id,
            face_enrolment_ref,
            limit,
        )
        return [_member(row) for row in rows]

    async def search_members(
        self,
        *,
        tenant_id: uuid.UUID,
        query: str,
        status: MemberStatus | None,
        groups: dict[str, str],
        after_number: str | None,
        limit: int,
    ) -> list[Member]:
        """Members whose number is ``query`` or whose name starts with it (any case), in number order."""
        rows = await self._pool.fetch(
            f"""SELECT {_MEMBER_COLUMNS} FROM members m
                WHERE m.tenant_id = $1
                  AND ($2 = '' OR m.external_number = $2 OR lower(m.name) LIKE lower($3))
                  AND ($4::text IS NULL OR m.status = $4)
                  AND m.groups @> $5::jsonb
                  AND ($6::text IS NULL OR m.external_number > $6)
                ORDER BY m.external_number
                LIMIT $7""",
            tenant_id,
            query,
            _escape_like(query) + "%",
            status.value if status else None,
            groups,
            after_number,
            limit,
        )
        return [_member(row) for row in rows]

    async def list_changes(self, *, tenant_id: uuid.UUID, after_sequence: int, limit: int) -> list[DirectoryChange]:
        rows = await self._pool.fetch(
            """SELECT sequence, kind, member, changed_at FROM directory_changes
               WHERE tenant_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3""",
            tenant_id,
            after_sequence,
            limit,
        )
        return [
            DirectoryChange(
                sequence=row["sequence"],
                kind=ChangeKind(row["kind"]),
                member=member_from_snapshot(row["member"]),
                changed_at=row["changed_at"],
            )
            for row in rows
        ]

    async def list_blacklist(self, *, tenant_id: uuid.UUID, after_version: int, limit: int) -> list[BlacklistEntry]:
        rows = await self._pool.fetch(
            """SELECT card_uid, member_id, lost_at, version FROM card_blacklist
               WHERE tenant_id = $1 AND version > $2 ORDER BY version LIMIT $3""",
            tenant_id,
            after_version,
            limit,
        )
        return [BlacklistEntry(r["card_uid"], r["member_id"], r["lost_at"], r["version"]) for r in rows]

    # --- imports ---------------------------------------------------------------------------

    async def create_import(
        self,
        *,
        import_id: uuid.UUID,
        tenant_id: uuid.UUID,
        csv: bytes | None,
        rows_total: int,
        failure: str,
        now: datetime,
    ) -> MemberImport:
        """Record a new import: running with its CSV, or failed at once when ``failure`` is set."""
        state = ImportState.FAILED if failure else ImportState.RUNNING
        row = await self._pool.fetchrow(
            f"""INSERT INTO member_imports
                    (import_id, tenant_id, state, csv, rows_total, failure, created_at, finished_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_IMPORT_COLUMNS}""",
            import_id,
            tenant_id,
            state.value,
            None if failure else csv,
            rows_total,
            failure,
            now,
            now if failure else None,
        )
        return _member_import(row, [])

    async def get_import(self, *, tenant_id: uuid.UUID, import_id: uuid.UUID) -> MemberImport | None:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(
                f"SELECT {_IMPORT_COLUMNS} FROM member_imports WHERE tenant_id = $1 AND import_id = $2",
                tenant_id,
                import_id,
            )
            if row is None:
                return None
            errors = await conn.fetch(
                "SELECT line, external_number, reason FROM member_import_errors WHERE import_id = $1"
                " ORDER BY line LIMIT $2",
                import_id,
                MAX_IMPORT_ERRORS_SHOWN,
            )
        return _member_import(row, errors)

    async def running_imports(self) -> list[uuid.UUID]:
        rows = await self._pool.fetch(
            "SELECT import_id FROM member_imports WHERE state = 'running' ORDER BY created_at"
        )
        return [r["import_id"] for r in rows]

    async def import_csv(self, import_id: uuid.UUID) -> bytes | None:
        return await self._pool.fetchval(
            "SELECT csv FROM member_imports WHERE import_id = $1 AND state = 'running'", import_id
        )

    @asynccontextmanager
    async def import_chunk(self, import_id: uuid.UUID) -> AsyncIterator[ImportChunk | None]:
        """One chunk's transaction: the import row locked, so two runners (say, two replicas that
        both resumed it) never apply the same rows, then the tenant's directory. Yields None once
        the import is no longer running."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT tenant_id, rows_done, rows_total FROM member_imports"
                " WHERE import_id = $1 AND state = 'running' FOR UPDATE",
                import_id,
            )
            if row is None:
                yield None
                return
            writer = await DirectoryWriter.lock(conn, tenant_id=row["tenant_id"])
            assert writer is not None, "an import's tenant has no directory head"
            yield ImportChunk(
                conn,
                import_id=import_id,
                rows_done=row["rows_done"],
                rows_total=row["rows_total"],
                directory=writer,
            )

    async def fail_import(self, *, import_id: uuid.UUID, failure: str, now: datetime) -> None:
        await self._pool.execute(
            "UPDATE member_imports SET state = 'failed', failure = $2, finished_at = $3, csv = NULL"
            " WHERE import_id = $1 AND state = 'running'",
            import_id,
            failure,
            now,
        )

    # --- partner API clients ---------------------------------------------------------------

    async def api_client_by_key(self, *, idempotency_key: str) -> tuple[str, datetime, bytes] | None:
        """(client id, created at, request fingerprint) of the client made under the key, if any."""
        row = await self._pool.fetchrow(
            "SELECT client_id, created_at, request_fingerprint FROM api_clients WHERE idempotency_key = $1",
            idempotency_key)
        return None if row is None else (row["client_id"], row["created_at"], bytes(row["request_fingerprint"]))

    async def create_api_client(
        self, *, client: ApiClient, secret_hash: str, grants: dict[uuid.UUID, tuple[str, ...]],
        idempotency_key: str | None = None, fingerprint: bytes | None = None,
    ) -> bool:
        """Make the client; False (nothing made) when a concurrent call made one under the same key."""
        try:
            await self._create_api_client(client=client, secret_hash=secret_hash, grants=grants,
                                          idempotency_key=idempotency_key, fingerprint=fingerprint)
        except asyncpg.UniqueViolationError as exc:
            if idempotency_key is None or exc.constraint_name != "api_clients_idempotency_key_key":
                raise
            return False
        return True

    async def _create_api_client(
        self, *, client: ApiClient, secret_hash: str, grants: dict[uuid.UUID, tuple[str, ...]],
        idempotency_key: str | None, fingerprint: bytes | None,
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            known = {
                r["tenant_id"]
                for r in await conn.fetch(
                    "SELECT tenant_id FROM tenants WHERE tenant_id = ANY($1::uuid[])", list(grants)
                )
            }
            for tenant_id in grants:
                if tenant_id not in known:
                    raise NotFound(f"tenant {tenant_id} not found", reason="TENANT_NOT_FOUND")
            await conn.execute(
                "INSERT INTO api_clients (client_id, name, scopes, secret_hash, created_at, idempotency_key,"
                " request_fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                client.client_id,
                client.name,
                list(client.scopes),
                secret_hash,
                client.created_at,
                idempotency_key,
                fingerprint,
            )
            for tenant_id, scopes in grants.items():
                await _write_grant(
                    conn, tenant_id=tenant_id, client_id=client.client_id, scopes=scopes, now=client.created_at
                )

    async def get_api_client(self, *, client_id: str, tenant_id: uuid.UUID) -> ApiClient | None:
        """The client with only ``tenant_id``'s grant, if any: a tenant never sees other tenants' grants."""
        row = await self._pool.fetchrow(
            """SELECT c.client_id, c.name, c.scopes, c.created_at, g.scopes AS granted
               FROM api_clients c LEFT JOIN tenant_grants g ON g.client_id = c.client_id AND g.tenant_id = $2
               WHERE c.client_id = $1""",
            client_id,
            tenant_id,
        )
        return _api_client(row, tenant_id) if row else None

    async def grant(self, *, tenant_id: uuid.UUID, client_id: str, scopes: tuple[str, ...], now: datetime) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # The client's row, locked: a revocation running at the same time ends before or after.
            revoked_at = await conn.fetchval("SELECT revoked_at FROM api_clients WHERE client_id = $1 FOR UPDATE",
                                             client_id)
            if revoked_at is not None:
                raise FailedPrecondition("the client was revoked; it cannot be granted again",
                                         reason="CLIENT_REVOKED")
            await _write_grant(conn, tenant_id=tenant_id, client_id=client_id, scopes=scopes, now=now)

    async def revoke_client(self, *, client_id: str, now: datetime) -> bool:
        """Revoke the client everywhere: every grant goes, each with its identity.api_client.revoked
        event. False when there is no such client; revoking again changes nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE api_clients SET revoked_at = COALESCE(revoked_at, $2) WHERE client_id = $1 RETURNING true",
                client_id, now,
            )
            if not found:
                return False
            tenants = await conn.fetch("DELETE FROM tenant_grants WHERE client_id = $1 RETURNING tenant_id", client_id)
            for row in sorted(tenants, key=lambda r: r["tenant_id"]):
                await _emit_revoked(conn, tenant_id=row["tenant_id"], client_id=client_id, client_revoked=True)
            return True

    async def tenant_grant(self, *, tenant_id: uuid.UUID, client_id: str) -> TenantGrant | None:
        """The client's grant in the tenant as it stands, or None (no grant, or the client revoked)."""
        row = await self._pool.fetchrow(
            """SELECT c.scopes, g.scopes AS granted, g.grant_version
               FROM tenant_grants g JOIN api_clients c ON c.client_id = g.client_id
               WHERE g.tenant_id = $1 AND g.client_id = $2 AND c.revoked_at IS NULL""",
            tenant_id,
            client_id,
        )
        if row is None:
            return None
        return TenantGrant(client_scopes=tuple(row["scopes"]), granted=tuple(row["granted"]),
                           grant_version=row["grant_version"])

    async def revoke(self, *, tenant_id: uuid.UUID, client_id: str) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            gone = await conn.fetchval(
                "DELETE FROM tenant_grants WHERE tenant_id = $1 AND client_id = $2 RETURNING true", tenant_id, client_id
            )
            if gone:
                await _emit_revoked(conn, tenant_id=tenant_id, client_id=client_id, client_revoked=False)
            return bool(gone)

    async def list_api_clients(self, *, tenant_id: uuid.UUID) -> list[ApiClient]:
        rows = await self._pool.fetch(
            """SELECT c.client_id, c.name, c.scopes, c.created_at, g.scopes AS granted
               FROM tenant_grants g JOIN api_clients c ON c.client_id = g.client_id
               WHERE g.tenant_id = $1 ORDER BY c.created_at, c.client_id""",
            tenant_id,
        )
        return [_api_client(row, tenant_id) for row in rows]

    async def client_credentials(
        self, *, client_id: str, tenant_id: uuid.UUID | None
    ) -> tuple[str | None, TenantGrant | None]:
        """(secret hash, ``tenant_id``'s grant); None parts where missing. A revoked client has neither."""
        row = await self._pool.fetchrow(
            """SELECT c.secret_hash, c.scopes, g.scopes AS granted, g.grant_version
               FROM api_clients c LEFT JOIN tenant_grants g ON g.client_id = c.client_id AND g.tenant_id = $2
               WHERE c.client_id = $1 AND c.revoked_at IS NULL""",
            client_id,
            tenant_id,
        )
        if row is None:
            return None, None
        if row["granted"] is None:
            return row["secret_hash"], None
        return row["secret_hash"], TenantGrant(client_scopes=tuple(row["scopes"]), granted=tuple(row["granted"]),
                                               grant_version=row["grant_version"])


async def _write_grant(
    conn: asyncpg.Connection, *, tenant_id: uuid.UUID, client_id: str, scopes: tuple[str, ...], now: datetime
) -> None:
    """Grant or re-grant; a new grant version and an event only when the grant is new or its scopes
    changed (the tokens issued under the old version end)."""
    version = await conn.fetchval(
        """INSERT INTO tenant_grants (tenant_id, client_id, scopes, granted_at) VALUES ($1, $2, $3, $4)
           ON CONFLICT (tenant_id, client_id) DO UPDATE SET scopes = EXCLUDED.scopes, granted_at = EXCLUDED.granted_at,
               grant_version = nextval('grant_versions')
           WHERE tenant_grants.scopes IS DISTINCT FROM EXCLUDED.scopes
           RETURNING grant_version""",
        tenant_id,
        client_id,
        list(scopes),
        now,
    )
    if version is not None:
        await emit(
            conn,
            subject="identity.api_client.granted",
            event_type="identity.api_client.granted",
            data={"tenant_id": str(tenant_id), "client_id": client_id, "scopes": list(scopes),
                  "grant_version": version},
            tenant_id=str(tenant_id),
        )


async def _emit_revoked(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, client_id: str,
                        client_revoked: bool) -> None:
    await emit(
        conn,
        subject="identity.api_client.revoked",
        event_type="identity.api_client.revoked",
        data={"tenant_id": str(tenant_id), "client_id": client_id, "client_revoked": client_revoked},
        tenant_id=str(tenant_id),
    )


def _api_client(row: asyncpg.Record, tenant_id: uuid.UUID) -> ApiClient:
    grants = {tenant_id: tuple(row["granted"])} if row["granted"] is not None else {}
    return ApiClient(
        client_id=row["client_id"],
        name=row["name"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        grants=grants,
    )

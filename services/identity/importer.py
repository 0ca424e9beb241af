"""Member import from CSV: reading the file, deciding each row, and applying it in chunks.

Reading and deciding are pure. Applying runs in the background: the file is cut into chunks,
and each chunk is one transaction that locks the import and the tenant's directory, looks up
the members and cards its rows touch in two queries, decides every row against that state, and
writes all the chunk's changes, feed entries, events and progress counters at once. A row that
is refused contributes nothing, so no row is ever half-written; a row that is accepted is
written whole with its chunk. Because progress commits with the rows it counts, an import cut
short by a restart resumes exactly where it stopped.

Rows are matched to members by external number, so importing the same file again changes
nothing: every row comes back ``unchanged``, with no new version, feed entry or event.

Columns: ``external_number`` and ``name`` are required; ``department``, ``grade``, ``class``,
``role``, ``status`` and ``card_uid`` are optional. For an existing member, a column that is
absent keeps the member's value; a present but empty group cell removes that group; an empty
``status`` or ``card_uid`` keeps what the member has (an import never unbinds a card).
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from runtime.errors import DomainError, InvalidArgument
from runtime.logs import get_logger
from services.identity.domain import (
    GROUP_KEYS,
    CardFacts,
    ChangeKind,
    ImportRowError,
    Member,
    MemberChange,
    MemberStatus,
    bind_card,
    change_status,
    check_external_number,
    check_member_status,
    new_member,
    normalise_card_uid,
    update_member,
)
from services.identity.store import IdentityStore, ImportCounts

log = get_logger(__name__)

REQUIRED_COLUMNS = ("external_number", "name")
OPTIONAL_COLUMNS = (*GROUP_KEYS, "status", "card_uid")
IMPORT_FREEZE_REASON = "import"
DEFAULT_CHUNK_ROWS = 500


class ImportFileError(ValueError):
    """The file as a whole cannot be imported; the message is the import's ``failure``."""


@dataclass(frozen=True)
class ImportRow:
    line: int
    external_number: str
    name: str
    # Only the group columns the file has; "" removes the group.
    groups: dict[str, str] = field(default_factory=dict)
    status: str = ""
    card_uid: str = ""
    # Why the row could not even be read (for example, a missing field); "" when it could.
    malformed: str = ""


def parse_csv(data: bytes, *, max_rows: int) -> list[ImportRow]:
    """The data rows of a UTF-8 CSV (a byte-order mark is allowed), each with the line it starts on."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"the file is not UTF-8 (bad byte at offset {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ImportFileError("the file is empty; expected a header row")
        columns = _check_header(header)
        rows: list[ImportRow] = []
        next_line = reader.line_num + 1
        for fields in reader:
            line, next_line = next_line, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(rows) == max_rows:
                raise ImportFileError(f"the file has more than {max_rows} rows; split it into smaller files")
            rows.append(_row(line, columns, fields))
    except csv.Error as exc:
        raise ImportFileError(f"the file is not valid CSV at line {reader.line_num}: {exc}") from None
    return rows


def _check_header(header: list[str]) -> list[str]:
    columns = [name.strip().lower() for name in header]
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise ImportFileError(
            f"unknown column {unknown[0]!r} in the header; columns are {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        )
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ImportFileError(f"column {duplicated[0]!r} appears twice in the header")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ImportFileError(f"the header lacks the required column {missing[0]!r}")
    return columns


def _row(line: int, columns: list[str], fields: list[str]) -> ImportRow:
    if len(fields) != len(columns):
        number = (
            fields[columns.index("external_number")].strip() if len(fields) > columns.index("external_number") else ""
        )
        return ImportRow(
            line=line,
            external_number=number,
            name="",
            malformed=f"expected {len(columns)} fields as in the header, found {len(fields)}",
        )
    cells = {c: f.strip() for c, f in zip(columns, fields, strict=True)}
    return ImportRow(
        line=line,
        external_number=cells["external_number"],
        name=cells["name"],
        groups={k: cells[k] for k in GROUP_KEYS if k in cells},
        status=cells.get("status", ""),
        card_uid=cells.get("card_uid", ""),
    )


def first_lines(rows: Sequence[ImportRow]) -> dict[str, int]:
    """The line where each external number first appears, to refuse later rows with it."""
    first: dict[str, int] = {}
    for row in rows:
        first.setdefault(row.external_number, row.line)
    return first


def plan_row(
    row: ImportRow,
    *,
    tenant_id: uuid.UUID,
    existing: Member | None,
    card_facts: dict[str, CardFacts],
    first_line: int,
    now: datetime,
) -> list[MemberChange]:
    """The changes one row makes; raises a DomainError when the row is refused as a whole."""
    if row.malformed:
        raise InvalidArgument(row.malformed, reason="ROW_MALFORMED")
    check_external_number(row.external_number)
    if first_line != row.line:
        raise InvalidArgument(
            f"external_number {row.external_number} already appears at line {first_line}", reason="DUPLICATE_ROW"
        )
    status = check_member_status(row.status) if row.status else None
    card_uid = normalise_card_uid(row.card_uid) if row.card_uid else None
    changes: list[MemberChange] = []
    if existing is None:
        created = new_member(
            tenant_id=tenant_id,
            external_number=row.external_number,
            name=row.name,
            groups={k: v for k, v in row.groups.items() if v},
            status=status or MemberStatus.ACTIVE,
            now=now,
        )
        changes.append(created)
        member = created.member
    else:
        groups = {**existing.groups, **row.groups}
        changes += update_member(existing, name=row.name, groups={k: v for k, v in groups.items() if v}, now=now)
        member = changes[-1].member if changes else existing
    if card_uid:
        changes += bind_card(member, card_uid=card_uid, facts=card_facts.get(card_uid, CardFacts()), now=now)
        member = changes[-1].member if changes else member
    if status and existing is not None:
        changes += change_status(member, status=status, reason=IMPORT_FREEZE_REASON, now=now)
    return changes


def _row_error(row: ImportRow, error: DomainError) -> ImportRowError:
    return ImportRowError(
        line=row.line, external_number=row.external_number[:64], reason=f"{error.reason}: {error.message}"
    )


async def apply_chunk(
    *,
    store: IdentityStore,
    import_id: uuid.UUID,
    rows: Sequence[ImportRow],
    first_line_by_number: dict[str, int],
    chunk_rows: int,
    now: datetime,
) -> bool:
    """Apply the next chunk; answers whether the import has more to do."""
    async with store.import_chunk(import_id) as chunk:
        if chunk is None:
            return False
        if chunk.rows_total != len(rows):
            raise RuntimeError(f"the stored file has {len(rows)} rows, the import expected {chunk.rows_total}")
        batch = rows[chunk.rows_done : chunk.rows_done + chunk_rows]
        directory = chunk.directory
        members = await directory.members_by_number([r.external_number for r in batch])
        card_facts = await directory.card_facts([uid for r in batch if (uid := _uid_or_none(r.card_uid))])
        changes: list[MemberChange] = []
        errors: list[ImportRowError] = []
        created = updated = unchanged = 0
        for row in batch:
            try:
                row_changes = plan_row(
                    row,
                    tenant_id=directory.tenant_id,
                    existing=members.get(row.external_number),
                    card_facts=card_facts,
                    first_line=first_line_by_number[row.external_number],
                    now=now,
                )
            except DomainError as error:
                errors.append(_row_error(row, error))
                continue
            if not row_changes:
                unchanged += 1
                continue
            if row_changes[0].kind is ChangeKind.MEMBER_CREATED:
                created += 1
            else:
                updated += 1
            changes += row_changes
            final = row_changes[-1].member
            members[final.external_number] = final
            if final.active_card is not None:
                card_facts[final.active_card.card_uid] = CardFacts(active_holder=final.member_id)
        await directory.record(changes)
        done = chunk.rows_done + len(batch)
        counts = ImportCounts(
            done=len(batch), created=created, updated=updated, unchanged=unchanged, failed=len(errors)
        )
        await chunk.save(counts=counts, errors=errors, finished_at=now if done >= chunk.rows_total else None)
        return done < chunk.rows_total


def _uid_or_none(raw: str) -> str | None:
    try:
        return normalise_card_uid(raw) if raw else None
    except InvalidArgument:
        return None


async def run_import(
    *,
    store: IdentityStore,
    import_id: uuid.UUID,
    rows: Sequence[ImportRow],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Apply an import to the end. Cancelled (shutdown), it stays running and resumes at the next start."""
    first_line_by_number = first_lines(rows)
    try:
        while await apply_chunk(
            store=store,
            import_id=import_id,
            rows=rows,
            first_line_by_number=first_line_by_number,
            chunk_rows=chunk_rows,
            now=clock(),
        ):
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded on the import, which then stops
        log.error("member import failed", import_id=str(import_id), exc_info=exc)
        await store.fail_import(
            import_id=import_id, failure="internal error; rows applied so far are kept", now=clock()
        )


async def resume_imports(*, store: IdentityStore, spawn: Callable[..., object], max_rows: int, chunk_rows: int) -> int:
    """Restart, in the background, every import a previous process left running. Answers how many."""
    resumed = 0
    for import_id in await store.running_imports():
        data = await store.import_csv(import_id)
        try:
            rows = parse_csv(data or b"", max_rows=max_rows)
        except ImportFileError as exc:
            await store.fail_import(import_id=import_id, failure=str(exc), now=datetime.now(UTC))
            continue
        spawn(
            run_import(store=store, import_id=import_id, rows=rows, chunk_rows=chunk_rows), name=f"import-{import_id}"
        )
        resumed += 1
    return resumed

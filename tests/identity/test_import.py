"""Member import from CSV: row errors, idempotent re-import, atomic rows, progress, limits."""

import time
import uuid

import asyncpg
import grpc
import pytest

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import (
    create_member,
    create_tenant,
    csv_file,
    feed,
    finished_import,
    get_import,
    refused,
    run_import,
    start_import,
)

HEADER = "external_number,name,department,grade,class,role,status,card_uid"


async def members_by_number(stub, tenant_id: str) -> dict[str, pb.Member]:  # noqa: ANN001
    found: dict[str, pb.Member] = {}
    token = ""
    while True:
        page = await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, page_size=200, page_token=token))
        found.update({m.external_number: m for m in page.members})
        token = page.next_page_token
        if not token:
            return found


async def test_bad_rows_are_reported_by_line_and_reason_and_good_rows_are_kept(identity, tenant_id: str) -> None:
    data = csv_file(
        HEADER,  # line 1
        "S1,Li Lei,physics,2025,1,student,,",  # 2: good
        "bad number!,Han Meimei,,,,,,",  # 3: bad number
        'S4,"two',  # 4-5: a name with a line break
        'lines",,,,,,',
        "S2,Wang Fang,chemistry,2025,2,student,frozen,04a1b2c3",  # 6: good, frozen, with a card
        "S5,Too Few Fields",  # 7: malformed
        "S1,Li Lei Again,,,,,,",  # 8: number repeated
        "S6,Zhao,,,,,gone,",  # 9: bad status
        "S7,Qian,,,,,,NOTHEX",  # 10: bad card
        ",,,,,,,",  # 11: blank, skipped
        "S3,Sun,,,,staff,,",  # 12: good
    )
    record = await run_import(identity.stub, tenant_id, data)
    assert record.state == pb.IMPORT_STATE_DONE and record.failure == ""
    assert (record.rows_total, record.rows_done, record.rows_created, record.rows_failed) == (9, 9, 3, 6)
    assert [(e.line, e.external_number, e.reason.split(":")[0]) for e in record.errors] == [
        (3, "bad number!", "MEMBER_NUMBER_INVALID"),
        (4, "S4", "MEMBER_NAME_INVALID"),
        (7, "S5", "ROW_MALFORMED"),
        (8, "S1", "DUPLICATE_ROW"),
        (9, "S6", "MEMBER_STATUS_INVALID"),
        (10, "S7", "CARD_UID_INVALID"),
    ]
    assert "line 2" in record.errors[3].reason
    members = await members_by_number(identity.stub, tenant_id)
    assert sorted(members) == ["S1", "S2", "S3"]
    s2 = members["S2"]
    assert (s2.name, s2.status, dict(s2.groups)) == (
        "Wang Fang",
        pb.MEMBER_STATUS_FROZEN,
        {"department": "chemistry", "grade": "2025", "class": "2", "role": "student"},
    )
    assert [(c.card_uid, c.status) for c in s2.cards] == [("04A1B2C3", pb.CARD_STATUS_ACTIVE)]
    assert dict(members["S3"].groups) == {"role": "staff"}


async def test_importing_the_same_file_again_changes_nothing(identity, tenant_id: str, db: asyncpg.Connection) -> None:
    data = csv_file(
        HEADER,
        *[f"N{i},Name {i},dept,2025,{i % 4},student,{'frozen' if i % 3 == 0 else 'active'},{i:08X}" for i in range(50)],
    )
    first = await run_import(identity.stub, tenant_id, data)
    assert (first.rows_created, first.rows_failed) == (50, 0)
    versions = {n: m.version for n, m in (await members_by_number(identity.stub, tenant_id)).items()}
    feed_before = await feed(identity.stub, tenant_id)
    events_before = await db.fetchval("SELECT count(*) FROM outbox")
    again = await run_import(identity.stub, tenant_id, data)
    assert (again.rows_total, again.rows_unchanged, again.rows_created, again.rows_updated, again.rows_failed) == (
        50,
        50,
        0,
        0,
        0,
    )
    assert {n: m.version for n, m in (await members_by_number(identity.stub, tenant_id)).items()} == versions
    assert await feed(identity.stub, tenant_id) == feed_before
    assert await db.fetchval("SELECT count(*) FROM outbox") == events_before


async def test_import_updates_members_it_finds_by_number(identity, tenant_id: str) -> None:
    existing = await create_member(
        identity.stub, tenant_id, "S1", name="Old Name", groups={"grade": "2024", "role": "student"}
    )
    data = csv_file("external_number,name,grade,status", "S1,New Name,,frozen", "S2,Brand New,2025,")
    record = await run_import(identity.stub, tenant_id, data)
    assert (record.rows_created, record.rows_updated, record.rows_unchanged) == (1, 1, 0)
    s1 = (await members_by_number(identity.stub, tenant_id))["S1"]
    assert s1.member_id == existing.member_id
    assert (s1.name, dict(s1.groups), s1.status, s1.version) == (
        "New Name",
        {"role": "student"},
        pb.MEMBER_STATUS_FROZEN,
        3,
    )
    kinds = [c.kind for c in await feed(identity.stub, tenant_id) if c.member_id == existing.member_id]
    assert kinds == [pb.CHANGE_KIND_MEMBER_CREATED, pb.CHANGE_KIND_MEMBER_UPDATED, pb.CHANGE_KIND_MEMBER_FROZEN]


async def test_a_refused_row_writes_neither_its_member_nor_its_card(
    identity, tenant_id: str, db: asyncpg.Connection
) -> None:
    stub = identity.stub
    owner = await create_member(stub, tenant_id, "OWNER")
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=owner.member_id, card_uid="BAD0CAFE"))
    await stub.ReportCardLost(
        pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=owner.member_id, card_uid="BAD0CAFE")
    )
    holder = await create_member(stub, tenant_id, "HOLDER")
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=holder.member_id, card_uid="0000BEEF"))
    feed_before = len(await feed(stub, tenant_id))
    data = csv_file(
        "external_number,name,card_uid",
        "NEW1,Uses A Lost Card,bad0cafe",
        "NEW2,Uses A Held Card,0000BEEF",
        "HOLDER,Renamed Holder,ABCDEF01",
        "NEW3,Fine,12345678",
    )
    record = await run_import(stub, tenant_id, data)
    assert [(e.line, e.reason.split(":")[0]) for e in record.errors] == [
        (2, "CARD_BLACKLISTED"),
        (3, "CARD_UID_IN_USE"),
        (4, "CARD_ALREADY_BOUND"),
    ]
    members = await members_by_number(stub, tenant_id)
    assert sorted(members) == ["HOLDER", "NEW3", "OWNER"]
    assert members["HOLDER"].name == "Member HOLDER"
    assert [(c.card_uid, c.status) for c in members["HOLDER"].cards] == [("0000BEEF", pb.CARD_STATUS_ACTIVE)]
    assert await db.fetchval("SELECT count(*) FROM cards WHERE card_uid IN ('BAD0CAFE', 'ABCDEF01')") == 1
    assert len(await feed(stub, tenant_id)) == feed_before + 2


async def test_unusable_file_fails_the_import_with_a_reason_and_writes_nothing(identity, tenant_id: str, db) -> None:
    cases = [
        (b"", "empty"),
        (csv_file("external_number,nme"), "unknown column 'nme'"),
        (csv_file("external_number,grade", "S1,2025"), "required column 'name'"),
        (csv_file("external_number,name,name", "S1,a,b"), "appears twice"),
        ("external_number,name\r\nS1,Caf\xe9\r\n".encode("latin-1"), "not UTF-8"),
        (b'external_number,name\r\nS1,"unterminated\r\n', "not valid CSV"),
    ]
    for data, failure in cases:
        record = await start_import(identity.stub, tenant_id, data)
        assert record.state == pb.IMPORT_STATE_FAILED and failure in record.failure, (data, record.failure)
        assert (await get_import(identity.stub, tenant_id, record.import_id)).state == pb.IMPORT_STATE_FAILED
    assert await db.fetchval("SELECT count(*) FROM members") == 0


async def test_file_over_8_mib_is_refused_and_not_recorded(identity, tenant_id: str, db: asyncpg.Connection) -> None:
    data = HEADER.encode() + b"\n" + b"x" * (8 * 1024 * 1024)
    assert await refused(start_import(identity.stub, tenant_id, data)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMPORT_TOO_LARGE",
    )
    assert await db.fetchval("SELECT count(*) FROM member_imports") == 0


async def test_file_with_more_rows_than_the_cap_fails(start_identity) -> None:
    service = await start_identity(import_max_rows=3)
    tenant_id = await create_tenant(service.stub)
    record = await start_import(
        service.stub, tenant_id, csv_file("external_number,name", *[f"S{i},N" for i in range(4)])
    )
    assert record.state == pb.IMPORT_STATE_FAILED and "more than 3 rows" in record.failure
    fits = await run_import(service.stub, tenant_id, csv_file("external_number,name", *[f"S{i},N" for i in range(3)]))
    assert (fits.state, fits.rows_created) == (pb.IMPORT_STATE_DONE, 3)


async def test_progress_is_visible_while_the_import_runs(start_identity) -> None:
    service = await start_identity(import_chunk_rows=20)
    tenant_id = await create_tenant(service.stub)
    started = await start_import(
        service.stub, tenant_id, csv_file("external_number,name", *[f"S{i:04d},N" for i in range(1000)])
    )
    assert (started.state, started.rows_total, started.rows_done) == (pb.IMPORT_STATE_RUNNING, 1000, 0)
    seen: list[int] = []
    while True:
        record = await get_import(service.stub, tenant_id, started.import_id)
        if record.state != pb.IMPORT_STATE_RUNNING:
            break
        seen.append(record.rows_done)
    assert any(0 < done < 1000 for done in seen), seen
    assert seen == sorted(seen)
    assert (record.state, record.rows_done, record.rows_created) == (pb.IMPORT_STATE_DONE, 1000, 1000)
    assert record.finished_at.ToDatetime() >= record.created_at.ToDatetime()


@pytest.mark.alone
async def test_five_thousand_rows_import_in_a_few_seconds(identity, tenant_id: str) -> None:
    data = csv_file(HEADER, *[f"N{i:05d},Student {i},dept{i % 20},2025,{i % 30},student,,{i:08X}" for i in range(5000)])
    started_s = time.monotonic()
    record = await run_import(identity.stub, tenant_id, data)
    elapsed_s = time.monotonic() - started_s
    assert (record.rows_created, record.rows_failed) == (5000, 0)
    assert elapsed_s < 10, f"5000 rows took {elapsed_s:.1f}s"


async def test_import_left_running_by_a_stopped_process_resumes_at_the_next_start(
    start_identity, database_url: str
) -> None:
    first = await start_identity()
    tenant_id = await create_tenant(first.stub)
    import_id = uuid.uuid4()
    data = csv_file("external_number,name", *[f"S{i},N" for i in range(30)])
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "identity"})
    try:
        await conn.execute(
            "INSERT INTO member_imports (import_id, tenant_id, state, csv, rows_total, created_at)"
            " VALUES ($1, $2, 'running', $3, 30, now())",
            import_id,
            uuid.UUID(tenant_id),
            data,
        )
    finally:
        await conn.close()
    second = await start_identity()
    record = await finished_import(second.stub, tenant_id, str(import_id))
    assert (record.state, record.rows_created) == (pb.IMPORT_STATE_DONE, 30)


async def test_another_tenants_import_is_not_found(identity, tenant_id: str) -> None:
    record = await run_import(identity.stub, tenant_id, csv_file("external_number,name", "S1,N"))
    other = await create_tenant(identity.stub, name="Other")
    assert await refused(get_import(identity.stub, other, record.import_id)) == (
        grpc.StatusCode.NOT_FOUND,
        "IMPORT_NOT_FOUND",
    )
    assert await refused(get_import(identity.stub, tenant_id, "nope")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMPORT_ID_INVALID",
    )

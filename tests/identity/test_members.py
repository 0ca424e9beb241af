"""Members: create, get, update, and the validation of every field."""

import uuid

import asyncpg
import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, feed, get_member, refused


async def test_created_member_is_active_at_version_1_and_found(identity, tenant_id: str) -> None:
    groups = {"department": "physics", "grade": "2025", "class": "3", "role": "student"}
    created = await create_member(identity.stub, tenant_id, "2025-PHY_001", name="李雷", groups=groups)
    assert (created.tenant_id, created.external_number, created.name) == (tenant_id, "2025-PHY_001", "李雷")
    assert dict(created.groups) == groups
    assert (created.status, created.version, list(created.cards), created.face_enrolment_ref) == (
        pb.MEMBER_STATUS_ACTIVE,
        1,
        [],
        "",
    )
    assert await get_member(identity.stub, tenant_id, created.member_id) == created


async def test_bad_member_input_is_refused_with_a_reason_and_writes_nothing(identity, tenant_id: str, db) -> None:
    cases = [
        ({"external_number": ""}, "MEMBER_NUMBER_INVALID"),
        ({"external_number": "has space"}, "MEMBER_NUMBER_INVALID"),
        ({"external_number": "学号1"}, "MEMBER_NUMBER_INVALID"),
        ({"external_number": "n" * 65}, "MEMBER_NUMBER_INVALID"),
        ({"name": ""}, "MEMBER_NAME_INVALID"),
        ({"name": "名" * 101}, "MEMBER_NAME_INVALID"),
        ({"name": "tab\tname"}, "MEMBER_NAME_INVALID"),
        ({"groups": {"dorm": "7"}}, "GROUP_KEY_INVALID"),
        ({"groups": {"grade": "g" * 65}}, "GROUP_VALUE_INVALID"),
        ({"groups": {"grade": ""}}, "GROUP_VALUE_INVALID"),
    ]
    for fields, expected_reason in cases:
        request = pb.CreateMemberRequest(
            tenant_id=tenant_id,
            external_number=fields.get("external_number", "S1"),
            name=fields.get("name", "Han Meimei"),
            groups=fields.get("groups", {}),
        )
        assert await refused(identity.stub.CreateMember(request)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            expected_reason,
        ), fields
    assert await db.fetchval("SELECT count(*) FROM members") == 0
    assert await feed(identity.stub, tenant_id) == []


async def test_longest_valid_number_and_name_are_accepted(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "N" * 64, name="名" * 100, groups={"class": "c" * 64})
    assert (len(member.external_number), len(member.name)) == (64, 100)


async def test_external_number_is_unique_within_the_tenant(identity, tenant_id: str) -> None:
    await create_member(identity.stub, tenant_id, "S1")
    assert await refused(create_member(identity.stub, tenant_id, "S1", name="Someone else")) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "MEMBER_NUMBER_TAKEN",
    )


async def test_update_changes_name_and_replaces_groups_and_bumps_version(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1", groups={"grade": "2024", "class": "1"})
    renamed = (
        await identity.stub.UpdateMember(
            pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=member.member_id, name="New Name")
        )
    ).member
    assert (renamed.name, dict(renamed.groups), renamed.version) == ("New Name", {"grade": "2024", "class": "1"}, 2)
    regrouped = (
        await identity.stub.UpdateMember(
            pb.UpdateMemberRequest(
                tenant_id=tenant_id, member_id=member.member_id, replace_groups=True, groups={"role": "staff"}
            )
        )
    ).member
    assert (regrouped.name, dict(regrouped.groups), regrouped.version) == ("New Name", {"role": "staff"}, 3)
    assert renamed.updated_at.ToDatetime() <= regrouped.updated_at.ToDatetime()


async def test_update_that_changes_nothing_keeps_the_version(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1", name="Same", groups={"grade": "1"})
    same = (
        await identity.stub.UpdateMember(
            pb.UpdateMemberRequest(
                tenant_id=tenant_id, member_id=member.member_id, name="Same", replace_groups=True, groups={"grade": "1"}
            )
        )
    ).member
    assert same == member
    assert len(await feed(identity.stub, tenant_id)) == 1


async def test_groups_without_replace_groups_are_refused(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    request = pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=member.member_id, groups={"grade": "2"})
    assert await refused(identity.stub.UpdateMember(request)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "GROUPS_WITHOUT_REPLACE",
    )
    assert await get_member(identity.stub, tenant_id, member.member_id) == member


async def test_ids_that_are_not_uuids_are_invalid_and_unknown_ones_not_found(identity, tenant_id: str) -> None:
    stub = identity.stub
    assert await refused(stub.GetMember(pb.GetMemberRequest(tenant_id=tenant_id, member_id="1 OR 1=1"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MEMBER_ID_INVALID",
    )
    assert await refused(stub.GetMember(pb.GetMemberRequest(tenant_id="", member_id=str(uuid.uuid4())))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TENANT_ID_INVALID",
    )
    assert await refused(stub.GetMember(pb.GetMemberRequest(tenant_id=tenant_id, member_id=str(uuid.uuid4())))) == (
        grpc.StatusCode.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    assert await refused(stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id="x"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MEMBER_ID_INVALID",
    )
    unknown_tenant = str(uuid.uuid4())
    assert await refused(create_member(stub, unknown_tenant, "S1")) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")


async def test_member_rows_carry_their_tenant(identity, tenant_id: str, db: asyncpg.Connection) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    row = await db.fetchrow("SELECT tenant_id, version FROM members WHERE member_id = $1", uuid.UUID(member.member_id))
    assert (str(row["tenant_id"]), row["version"]) == (tenant_id, 1)


async def test_a_trailing_newline_does_not_make_a_number_valid(identity, tenant_id: str) -> None:
    assert await refused(create_member(identity.stub, tenant_id, "S1\n")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MEMBER_NUMBER_INVALID",
    )

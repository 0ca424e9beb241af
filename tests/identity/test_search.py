"""SearchMembers: exact number or name prefix, filters, and stable cursor pages."""

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, refused


async def search(stub, tenant_id: str, **fields) -> pb.SearchMembersResponse:  # noqa: ANN001
    return await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, **fields))


def numbers(response: pb.SearchMembersResponse) -> list[str]:
    return [m.external_number for m in response.members]


async def test_query_matches_the_exact_number_or_a_name_prefix_in_any_case(identity, tenant_id: str) -> None:
    stub = identity.stub
    await create_member(stub, tenant_id, "S100", name="Wang Fang")
    await create_member(stub, tenant_id, "S1001", name="Li Wang")
    await create_member(stub, tenant_id, "S2", name="wangli")
    await create_member(stub, tenant_id, "S3", name="王芳")
    assert numbers(await search(stub, tenant_id, query="S100")) == ["S100"]
    assert numbers(await search(stub, tenant_id, query="wang")) == ["S100", "S2"]
    assert numbers(await search(stub, tenant_id, query="王")) == ["S3"]
    assert numbers(await search(stub, tenant_id, query="")) == ["S100", "S1001", "S2", "S3"]


async def test_like_wildcards_in_the_query_are_taken_literally(identity, tenant_id: str) -> None:
    await create_member(identity.stub, tenant_id, "S1", name="50% off")
    await create_member(identity.stub, tenant_id, "S2", name="500 people")
    assert numbers(await search(identity.stub, tenant_id, query="50%")) == ["S1"]
    assert numbers(await search(identity.stub, tenant_id, query="_")) == []


async def test_status_and_group_filters_narrow_the_result(identity, tenant_id: str) -> None:
    stub = identity.stub
    a = await create_member(stub, tenant_id, "A", groups={"grade": "2025", "class": "1"})
    await create_member(stub, tenant_id, "B", groups={"grade": "2025", "class": "2"})
    await create_member(stub, tenant_id, "C", groups={"grade": "2024"})
    await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=a.member_id))
    assert numbers(await search(stub, tenant_id, groups={"grade": "2025"})) == ["A", "B"]
    assert numbers(await search(stub, tenant_id, groups={"grade": "2025", "class": "2"})) == ["B"]
    assert numbers(await search(stub, tenant_id, status=pb.MEMBER_STATUS_FROZEN)) == ["A"]
    assert numbers(await search(stub, tenant_id, status=pb.MEMBER_STATUS_ACTIVE, groups={"grade": "2025"})) == ["B"]
    assert await refused(search(stub, tenant_id, groups={"dorm": "1"})) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "GROUP_KEY_INVALID",
    )
    assert await refused(search(stub, tenant_id, status=9)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MEMBER_STATUS_INVALID",
    )


async def test_page_size_zero_means_50_and_above_200_is_refused(identity, tenant_id: str) -> None:
    stub = identity.stub
    for i in range(51):
        await create_member(stub, tenant_id, f"S{i:03d}")
    first = await search(stub, tenant_id)
    assert len(first.members) == 50 and first.next_page_token
    rest = await search(stub, tenant_id, page_token=first.next_page_token)
    assert numbers(rest) == ["S050"] and rest.next_page_token == ""
    assert len((await search(stub, tenant_id, page_size=200)).members) == 51
    assert await refused(search(stub, tenant_id, page_size=201)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_SIZE_TOO_LARGE",
    )
    assert await refused(search(stub, tenant_id, page_size=-1)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_SIZE_INVALID",
    )


async def test_pages_neither_repeat_nor_skip_members_when_others_are_added_between_pages(
    identity, tenant_id: str
) -> None:
    stub = identity.stub
    for number in ["B", "D", "F", "H", "J", "L", "N"]:
        await create_member(stub, tenant_id, number)
    seen: list[str] = []
    token = ""
    added = iter(["A", "C", "E", "Z"])
    while True:
        page = await search(stub, tenant_id, page_size=3, page_token=token)
        seen += numbers(page)
        token = page.next_page_token
        if not token:
            break
        await create_member(stub, tenant_id, next(added))
    assert len(seen) == len(set(seen))
    assert {"B", "D", "F", "H", "J", "L", "N"} <= set(seen)
    assert seen == sorted(seen)


async def test_page_token_of_another_search_or_garbage_is_refused(identity, tenant_id: str) -> None:
    stub = identity.stub
    for number in ["A", "B", "C"]:
        await create_member(stub, tenant_id, number)
    token = (await search(stub, tenant_id, page_size=1)).next_page_token
    assert await refused(search(stub, tenant_id, page_size=1, query="A", page_token=token)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
    for garbage in ["x", "eyJ2IjoxfQ", "!!!", token[:-2]]:
        assert await refused(search(stub, tenant_id, page_token=garbage)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_TOKEN_INVALID",
        ), garbage

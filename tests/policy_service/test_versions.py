"""Rule sets as versioned data: create, validate, get, list, publish; refusals name the rule; the
published version is never disturbed by a bad request; publishing sends its event."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid

import asyncpg
import grpc
import pytest
from onecard_policy.rules import canonical_json

from onecard.policy.v1 import policy_pb2 as pb
from runtime.events import MSG_ID_HEADER
from tests.policy_service.support import document, refused, university
from tests.streams import read_exactly


def _tenant() -> str:
    return str(uuid.uuid4())


async def _create(stub, tenant_id: str, doc: dict, note: str = "") -> pb.RuleSetVersion:  # noqa: ANN001
    answer = await stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=document(doc), note=note))
    return answer.version


async def _publish(stub, tenant_id: str, version: int,  # noqa: ANN001
                   by: str = "admin@test") -> pb.PublishRuleSetVersionResponse:
    return await stub.PublishRuleSetVersion(pb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=version, published_by=by))


async def test_create_stores_a_draft_with_its_canonical_json_and_sha256(policy):
    tenant_id = _tenant()
    doc = university()
    # Key order and spacing of the caller's text do not matter: the canonical JSON is stored.
    text = json.dumps(doc, indent=4, sort_keys=False)
    answer = await policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=text, note="autumn term"))
    v = answer.version
    canonical = canonical_json(doc)
    assert (v.tenant_id, v.version, v.status, v.note) == (tenant_id, 1, pb.RULE_SET_STATUS_DRAFT, "autumn term")
    assert v.document == canonical.decode()
    assert v.sha256 == hashlib.sha256(canonical).hexdigest()
    assert not v.HasField("published_at") and v.published_by == ""
    got = (await policy.stub.GetRuleSetVersion(pb.GetRuleSetVersionRequest(tenant_id=tenant_id, version=1))).version
    assert got == v
    # Versions are numbered per tenant, 1, 2, 3...
    assert (await _create(policy.stub, tenant_id, doc)).version == 2
    assert (await _create(policy.stub, _tenant(), doc)).version == 1


async def test_validate_checks_like_create_and_stores_nothing(policy):
    tenant_id = _tenant()
    answer = await policy.stub.ValidateRuleSet(pb.ValidateRuleSetRequest(tenant_id=tenant_id,
                                                                         document=document(university())))
    assert answer.sha256 == hashlib.sha256(canonical_json(university())).hexdigest()
    assert answer.canonical_document == canonical_json(university()).decode()
    bad = university()
    bad["vouchers"][0]["where"]["meal_periods"] = ["supper"]
    code, reason, metadata = await refused(policy.stub.ValidateRuleSet(pb.ValidateRuleSetRequest(
        tenant_id=tenant_id, document=document(bad))))
    assert (code, reason, metadata) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_MEAL_PERIOD",
                                        {"rule": "vouchers[dinner-voucher].where.meal_periods"})
    listed = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(tenant_id=tenant_id))
    assert list(listed.versions) == [] and listed.published_version == 0


@pytest.mark.parametrize(("mutate", "reason", "rule"), [
    (lambda d: d["vouchers"][0]["where"].update(meal_periods=["supper"]), "UNKNOWN_MEAL_PERIOD",
     "vouchers[dinner-voucher].where.meal_periods"),
    (lambda d: d["limits"][1].update(max=-5), "INVALID_AMOUNT", "limits[daily-canteen].max"),
    (lambda d: d.update(funding_order=["cash", "gold"]), "UNKNOWN_PURSE", "funding_order"),
    (lambda d: d.update(time_zone="Mars/Olympus"), "INVALID_TIME_ZONE", "time_zone"),
])
async def test_an_invalid_rule_set_is_refused_with_its_reason_and_rule_and_the_published_one_stands(
        policy, mutate, reason, rule):
    tenant_id = _tenant()
    good = await _create(policy.stub, tenant_id, university())
    await _publish(policy.stub, tenant_id, good.version)
    bad = copy.deepcopy(university())
    mutate(bad)
    code, got_reason, metadata = await refused(policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=document(bad))))
    assert (code, got_reason, metadata) == (grpc.StatusCode.INVALID_ARGUMENT, reason, {"rule": rule})
    listed = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(tenant_id=tenant_id))
    assert [v.version for v in listed.versions] == [1]
    assert listed.published_version == 1
    # It never got a number: it can't be published.
    code, got_reason, _ = await refused(_publish(policy.stub, tenant_id, 2))
    assert (code, got_reason) == (grpc.StatusCode.NOT_FOUND, "RULE_SET_VERSION_NOT_FOUND")


async def test_documents_that_are_not_json_objects_are_refused(policy):
    tenant_id = _tenant()
    for text, reason in (("", "DOCUMENT_REQUIRED"), ("{not json", "DOCUMENT_NOT_JSON"),
                         ("[1, 2]", "DOCUMENT_NOT_OBJECT"), ("{}", "MISSING_FIELD")):
        code, got, _ = await refused(policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
            tenant_id=tenant_id, document=text)))
        assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason), text
    code, got, _ = await refused(policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id="not-a-uuid", document=document(university()))))
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_ID_INVALID")


async def test_publish_makes_one_version_published_and_keeps_the_one_before(policy):
    tenant_id = _tenant()
    first = await _create(policy.stub, tenant_id, university(), note="v1")
    changed = university()
    changed["limits"][1]["max"] = 8000
    second = await _create(policy.stub, tenant_id, changed, note="v2")
    one = await _publish(policy.stub, tenant_id, first.version, by="alice")
    assert (one.changed, one.previous_version, one.version.status) == (True, 0, pb.RULE_SET_STATUS_PUBLISHED)
    assert one.version.published_by == "alice" and one.version.HasField("published_at")
    two = await _publish(policy.stub, tenant_id, second.version, by="bob")
    assert (two.changed, two.previous_version, two.version.version) == (True, 1, 2)
    again = await _publish(policy.stub, tenant_id, second.version, by="carol")
    assert (again.changed, again.version.published_by) == (False, "bob")
    listed = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(tenant_id=tenant_id))
    assert listed.published_version == 2
    assert [(v.version, v.status, v.document) for v in listed.versions] == [
        (2, pb.RULE_SET_STATUS_PUBLISHED, ""), (1, pb.RULE_SET_STATUS_SUPERSEDED, "")]
    old = (await policy.stub.GetRuleSetVersion(pb.GetRuleSetVersionRequest(tenant_id=tenant_id, version=1))).version
    assert old.document == canonical_json(university()).decode() and old.published_by == "alice"
    # Unknown version: NOT_FOUND, and version 2 stays published.
    code, reason, _ = await refused(_publish(policy.stub, tenant_id, 99))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RULE_SET_VERSION_NOT_FOUND")
    code, reason, _ = await refused(_publish(policy.stub, tenant_id, 1, by=" "))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PUBLISHED_BY_REQUIRED")
    listed = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(tenant_id=tenant_id))
    assert listed.published_version == 2
    # Rolling back is publishing the older version again.
    back = await _publish(policy.stub, tenant_id, 1, by="dave")
    assert (back.changed, back.previous_version, back.version.published_by) == (True, 2, "dave")


async def test_list_pages_newest_first(policy):
    tenant_id = _tenant()
    for n in range(5):
        await _create(policy.stub, tenant_id, university(), note=f"n{n}")
    seen, token = [], ""
    while True:
        page = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(
            tenant_id=tenant_id, page_size=2, page_token=token))
        seen.append([v.version for v in page.versions])
        token = page.next_page_token
        if not token:
            break
    assert seen == [[5, 4], [3, 2], [1]]
    code, reason, _ = await refused(policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(
        tenant_id=tenant_id, page_token="zz")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_versions_are_immutable_in_the_database(policy, database_url):
    tenant_id = _tenant()
    await _create(policy.stub, tenant_id, university())
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "policy"})
    try:
        with pytest.raises(asyncpg.RaiseError):
            await conn.execute("UPDATE rule_set_versions SET note = 'changed'")
        with pytest.raises(asyncpg.RaiseError):
            await conn.execute("DELETE FROM rule_set_versions")
    finally:
        await conn.close()


async def test_publishing_sends_one_event_with_tenant_version_and_sha256(policy, nats_url):
    tenant_id = _tenant()
    first = await _create(policy.stub, tenant_id, university())
    await _publish(policy.stub, tenant_id, first.version, by="alice")
    await _publish(policy.stub, tenant_id, first.version, by="alice")  # no change, no event
    messages = await read_exactly(nats_url, stream="POLICY", subjects="policy.>", count=1)
    msg = messages[0]
    body = json.loads(msg.data)
    assert msg.subject == "policy.ruleset.published"
    assert msg.headers[MSG_ID_HEADER] == body["event_id"]
    assert body["type"] == "policy.ruleset.published" and body["tenant_id"] == tenant_id
    data = body["data"]
    assert (data["tenant_id"], data["version"], data["sha256"], data["previous_version"], data["published_by"]) == (
        tenant_id, 1, first.sha256, 0, "alice")
    assert data["published_at"]


async def test_tenants_see_only_their_own_versions(policy):
    a, b = _tenant(), _tenant()
    await _create(policy.stub, a, university())
    await _publish(policy.stub, a, 1)
    code, reason, _ = await refused(policy.stub.GetRuleSetVersion(pb.GetRuleSetVersionRequest(tenant_id=b, version=1)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RULE_SET_VERSION_NOT_FOUND")
    code, reason, _ = await refused(_publish(policy.stub, b, 1))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RULE_SET_VERSION_NOT_FOUND")
    listed = await policy.stub.ListRuleSetVersions(pb.ListRuleSetVersionsRequest(tenant_id=b))
    assert list(listed.versions) == [] and listed.published_version == 0


async def test_rules_in_force_are_the_publications_of_a_window_with_the_documents_asked_for(policy):
    tenant_id = _tenant()
    doc = university()
    v1, v2, v3 = [(await _create(policy.stub, tenant_id, {**doc, "name": f"v{i}"})).version for i in (1, 2, 3)]
    first = (await _publish(policy.stub, tenant_id, v1)).version.published_at
    second = (await _publish(policy.stub, tenant_id, v2)).version.published_at
    again = (await _publish(policy.stub, tenant_id, v1, by="rollback")).version.published_at

    async def in_force(since, until, *versions: int) -> pb.GetRulesInForceResponse:  # noqa: ANN001
        return await policy.stub.GetRulesInForce(pb.GetRulesInForceRequest(
            tenant_id=tenant_id, since=since, until=until, versions=list(versions)))

    def spans(answer: pb.GetRulesInForceResponse) -> list[tuple]:
        return [(s.version, s.in_force_from, s.in_force_until if s.HasField("in_force_until") else None)
                for s in answer.spans]

    everything = await in_force(first, again, v1, v2, v3)
    # Each publication until the next; the last one still in force; a rollback is a span of its own.
    assert spans(everything) == [(v1, first, second), (v2, second, again), (v1, again, None)]
    # The draft never reached a device: no document for it.
    assert [(d.version, json.loads(d.document)["name"]) for d in everything.documents] == [(v1, "v1"), (v2, "v2")]
    # A window inside v2's span: v2 alone; an instant is a window too.
    assert spans(await in_force(second, second)) == [(v2, second, again)]
    assert [s.version for s in (await in_force(first, first)).spans] == [v1]
    assert (await in_force(first, first)).documents == []
    # Before the first publication: nothing was in force.
    before = copy.deepcopy(first)
    before.seconds -= 3600
    assert (await in_force(before, before, v1)).spans == []
    # Another tenant's publications are not this one's.
    assert (await policy.stub.GetRulesInForce(pb.GetRulesInForceRequest(
        tenant_id=_tenant(), since=first, until=again, versions=[v1]))) == pb.GetRulesInForceResponse()


async def test_rules_in_force_refuse_a_window_they_cannot_answer(policy):
    tenant_id = _tenant()
    now = (await _publish(policy.stub, tenant_id, (await _create(policy.stub, tenant_id, university())).version)
           ).version.published_at
    later = copy.deepcopy(now)
    later.seconds += 32 * 24 * 3600

    async def ask(**fields) -> tuple:  # noqa: ANN003
        request = pb.GetRulesInForceRequest(tenant_id=tenant_id, **fields)
        code, reason, _ = await refused(policy.stub.GetRulesInForce(request))
        return code, reason

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await ask(since=now) == (invalid, "WINDOW_INVALID")
    assert await ask(since=later, until=now) == (invalid, "WINDOW_INVALID")
    assert await ask(since=now, until=later) == (invalid, "WINDOW_INVALID")
    assert await ask(since=now, until=now, versions=[0]) == (invalid, "VERSION_INVALID")
    assert await ask(since=now, until=now, versions=list(range(1, 102))) == (invalid, "VERSIONS_INVALID")

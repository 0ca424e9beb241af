"""Mini-program bindings and member self-service, over identity's gRPC API (docs/miniprograms.md).

identity runs here with a clock the test turns (``Clock``), so a PIN lockout's end is reached
without sleeping.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.grpc_client import error_info
from services.identity.app import IdentitySettings, build_app
from tests.identity.support import create_member, create_tenant, csv_file, feed, get_member, refused, run_import
from tests.mesh import service_values
from tests.streams import read_exactly

PIN = "402913"
OTHER_PIN = "771205"
WRONG_PIN = "111112"


class Clock:
    """identity's clock in these tests: starts now, moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Mini:
    stub: identity_pb2_grpc.IdentityServiceStub
    clock: Clock
    tenant_id: str
    # Two partners' clients, both granted the tenant.
    client_a: str
    client_b: str


async def _client(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, name: str) -> str:
    scopes = ["members:bind", "members:self-service"]
    answer = await stub.CreateApiClient(pb.CreateApiClientRequest(
        name=name, scopes=scopes, grants=[pb.TenantGrant(tenant_id=tenant_id, scopes=scopes)]))
    return answer.client.client_id


@pytest.fixture
async def mini(launch, database_url: str, nats_url: str) -> Mini:
    clock = Clock()
    settings = IdentitySettings(nats_url=nats_url, health_interval_s=0.2, **service_values("identity", database_url))
    service = await launch(build_app(settings, clock=clock), stub_cls=identity_pb2_grpc.IdentityServiceStub)
    stub = service.stub
    tenant_id = await create_tenant(stub)
    return Mini(stub=stub, clock=clock, tenant_id=tenant_id, client_a=await _client(stub, tenant_id, "wechat app"),
                client_b=await _client(stub, tenant_id, "alipay app"))


async def bind(mini: Mini, member_id: str, external_user_id: str, *, client_id: str | None = None,
               tenant_id: str | None = None) -> pb.BindExternalUserResponse:
    return await mini.stub.BindExternalUser(pb.BindExternalUserRequest(
        tenant_id=tenant_id or mini.tenant_id, client_id=client_id or mini.client_a,
        external_user_id=external_user_id, member_id=member_id))


def lookup(mini: Mini, external_user_id: str, *, client_id: str | None = None,  # noqa: ANN201
           tenant_id: str | None = None):
    return mini.stub.LookupMemberByExternalUser(pb.LookupMemberByExternalUserRequest(
        tenant_id=tenant_id or mini.tenant_id, client_id=client_id or mini.client_a,
        external_user_id=external_user_id))


def caller(mini: Mini, external_user_id: str, *, client_id: str | None = None,
           attestation_id: str = "sess-1") -> pb.SelfServiceCaller:
    return pb.SelfServiceCaller(client_id=client_id or mini.client_a, external_user_id=external_user_id,
                                attestation_id=attestation_id)


def set_pin(mini: Mini, external_user_id: str, new_pin: str, old_pin: str = ""):  # noqa: ANN201
    return mini.stub.SetMemberPin(pb.SetMemberPinRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, external_user_id), new_pin=new_pin, old_pin=old_pin))


def unfreeze(mini: Mini, external_user_id: str, pin: str):  # noqa: ANN201
    return mini.stub.SelfServiceUnfreeze(pb.SelfServiceUnfreezeRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, external_user_id), pin=pin))


def freeze(mini: Mini, external_user_id: str, *, attestation_id: str = "sess-1"):  # noqa: ANN201
    return mini.stub.SelfServiceFreeze(pb.SelfServiceFreezeRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, external_user_id, attestation_id=attestation_id)))


async def refused_with(call) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:  # noqa: ANN001
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, metadata = error_info(info.value)
    return info.value.code(), reason, metadata


async def bound_member(mini: Mini, number: str, external_user_id: str) -> pb.Member:
    member = await create_member(mini.stub, mini.tenant_id, number)
    await bind(mini, member.member_id, external_user_id)
    return member


# --- bindings --------------------------------------------------------------------------------


async def test_a_binding_is_seen_only_by_the_client_that_made_it(mini: Mini) -> None:
    li = await create_member(mini.stub, mini.tenant_id, "S1", name="Li Lei")
    han = await create_member(mini.stub, mini.tenant_id, "S2", name="Han Meimei")
    bound = await bind(mini, li.member_id, "oUpF8-openid-1")
    assert (bound.binding.member_id, bound.binding.client_id, bound.binding.external_user_id) == (
        li.member_id, mini.client_a, "oUpF8-openid-1")
    assert not bound.HasField("replaced") and not bound.binding.HasField("unbound_at")

    found = await lookup(mini, "oUpF8-openid-1")
    assert (found.member.member_id, found.member.name) == (li.member_id, "Li Lei")
    # Another partner's app does not know this openid, and may use the same string for its own user.
    assert await refused(lookup(mini, "oUpF8-openid-1", client_id=mini.client_b)) == (
        grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")
    await bind(mini, han.member_id, "oUpF8-openid-1", client_id=mini.client_b)
    assert (await lookup(mini, "oUpF8-openid-1", client_id=mini.client_b)).member.member_id == han.member_id
    assert (await lookup(mini, "oUpF8-openid-1")).member.member_id == li.member_id
    # Nor does another tenant, even for the same client.
    other_tenant = await create_tenant(mini.stub, name="Other School")
    assert await refused(lookup(mini, "oUpF8-openid-1", tenant_id=other_tenant)) == (
        grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")
    # A member of another tenant cannot be bound here.
    stranger = await create_member(mini.stub, other_tenant, "S1")
    assert await refused(bind(mini, stranger.member_id, "oUpF8-openid-9")) == (
        grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


async def test_rebinding_replaces_the_members_binding_and_keeps_its_history(mini: Mini, db) -> None:
    li = await create_member(mini.stub, mini.tenant_id, "S1")
    han = await create_member(mini.stub, mini.tenant_id, "S2")
    first = await bind(mini, li.member_id, "openid-old")
    mini.clock.advance(60)
    # The same binding again changes nothing.
    again = await bind(mini, li.member_id, "openid-old")
    assert again.binding == first.binding and not again.HasField("replaced")
    # The member moved to a new account: the new id replaces the old one.
    moved = await bind(mini, li.member_id, "openid-new")
    assert moved.replaced.external_user_id == "openid-old" and moved.replaced.HasField("unbound_at")
    assert await refused(lookup(mini, "openid-old")) == (grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")
    assert (await lookup(mini, "openid-new")).member.member_id == li.member_id
    # An id another member holds is not taken from them.
    assert await refused(bind(mini, han.member_id, "openid-new")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "EXTERNAL_USER_BOUND")
    # The old id is free again.
    await bind(mini, han.member_id, "openid-old")
    mini.clock.advance(60)
    unbound = await mini.stub.UnbindExternalUser(pb.UnbindExternalUserRequest(
        tenant_id=mini.tenant_id, client_id=mini.client_a, member_id=li.member_id))
    assert unbound.binding.external_user_id == "openid-new" and unbound.binding.HasField("unbound_at")
    assert await refused(mini.stub.UnbindExternalUser(pb.UnbindExternalUserRequest(
        tenant_id=mini.tenant_id, client_id=mini.client_a, member_id=li.member_id))) == (
        grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")
    assert await refused(lookup(mini, "openid-new")) == (grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")

    rows = await db.fetch("""SELECT external_user_id, member_id::text, bound_at, unbound_at, unbound_reason
                             FROM external_user_bindings ORDER BY bound_at, external_user_id""")
    history = [(r["external_user_id"], r["member_id"], r["unbound_reason"]) for r in rows]
    assert history == [("openid-old", li.member_id, "replaced"), ("openid-new", li.member_id, "unbound"),
                       ("openid-old", han.member_id, "")]
    assert rows[0]["unbound_at"] == rows[1]["bound_at"] == rows[0]["bound_at"] + timedelta(seconds=60)
    assert rows[1]["unbound_at"] == rows[1]["bound_at"] + timedelta(seconds=60)


async def test_binding_refuses_a_member_who_left_and_bad_ids(mini: Mini) -> None:
    gone = await create_member(mini.stub, mini.tenant_id, "S9")
    await mini.stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=mini.tenant_id, member_id=gone.member_id))
    assert await refused(bind(mini, gone.member_id, "openid-9")) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                      "MEMBER_LEFT")
    member = await create_member(mini.stub, mini.tenant_id, "S1")
    for bad in ["", "with space", "tab\there", "x" * 129, "中文"]:
        assert await refused(bind(mini, member.member_id, bad)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "EXTERNAL_USER_ID_INVALID"), bad
    assert await refused(bind(mini, str(uuid.uuid4()), "openid-1")) == (grpc.StatusCode.NOT_FOUND,
                                                                         "MEMBER_NOT_FOUND")
    assert await refused(bind(mini, member.member_id, "openid-1", client_id="no such/client")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "CLIENT_ID_INVALID")
    # The longest id and every visible ASCII character are fine.
    await bind(mini, member.member_id, "".join(chr(c) for c in range(0x21, 0x7F)) + "x" * 34)


async def test_bindings_publish_ids_only(mini: Mini, nats_url: str) -> None:
    li = await create_member(mini.stub, mini.tenant_id, "S1")
    await bind(mini, li.member_id, "openid-secret-1")
    await bind(mini, li.member_id, "openid-secret-1")
    await bind(mini, li.member_id, "openid-secret-2")
    await mini.stub.UnbindExternalUser(pb.UnbindExternalUserRequest(
        tenant_id=mini.tenant_id, client_id=mini.client_a, member_id=li.member_id))
    received = await read_exactly(nats_url, stream="IDENTITY", subjects="identity.external_user.>", count=4)
    assert [m.subject for m in received] == ["identity.external_user.bound", "identity.external_user.unbound",
                                             "identity.external_user.bound", "identity.external_user.unbound"]
    bodies = [json.loads(m.data) for m in received]
    assert "openid-secret" not in json.dumps(bodies)
    assert [b["data"].get("reason") for b in bodies] == [None, "replaced", None, "unbound"]
    for body in bodies:
        assert body["data"]["member_id"] == li.member_id and body["data"]["client_id"] == mini.client_a
        assert body["tenant_id"] == mini.tenant_id


# --- PIN -------------------------------------------------------------------------------------


async def test_a_first_pin_needs_no_old_one_and_changing_needs_it(mini: Mini, db) -> None:
    await bound_member(mini, "S1", "openid-1")
    assert await refused(set_pin(mini, "openid-1", PIN, old_pin=OTHER_PIN)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PIN_NOT_SET")
    for bad, reason in [("12345", "PIN_INVALID"), ("1234567", "PIN_INVALID"), ("12a456", "PIN_INVALID"),
                        ("000000", "PIN_TOO_SIMPLE"), ("123456", "PIN_TOO_SIMPLE"), ("987654", "PIN_TOO_SIMPLE")]:
        assert await refused(set_pin(mini, "openid-1", bad)) == (grpc.StatusCode.INVALID_ARGUMENT, reason), bad
    assert (await set_pin(mini, "openid-1", PIN)).first is True
    # A second "first" PIN would let anyone holding the partner's token replace it.
    assert await refused(set_pin(mini, "openid-1", OTHER_PIN)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                    "OLD_PIN_REQUIRED")
    code, reason, metadata = await refused_with(set_pin(mini, "openid-1", OTHER_PIN, old_pin=WRONG_PIN))
    assert (code, reason, metadata["attempts_left"]) == (grpc.StatusCode.PERMISSION_DENIED, "PIN_INCORRECT", "4")
    assert (await set_pin(mini, "openid-1", OTHER_PIN, old_pin=PIN)).first is False
    assert await refused(set_pin(mini, "openid-1", PIN, old_pin=PIN)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                           "PIN_INCORRECT")

    stored = await db.fetchrow("SELECT pin_hash, failed_attempts FROM member_pins")
    scheme, n, r, p, salt, key = stored["pin_hash"].split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1") and salt and key
    assert PIN not in stored["pin_hash"] and OTHER_PIN not in stored["pin_hash"]
    # The wrong old PIN counted; the right one reset the count; the last wrong one counts again.
    assert stored["failed_attempts"] == 1
    rows = await db.fetch("SELECT kind, client_id, attestation_id FROM member_pin_events ORDER BY event_id")
    events = [(r["kind"], r["client_id"], r["attestation_id"]) for r in rows]
    assert events == [("set", mini.client_a, "sess-1"), ("failed", mini.client_a, "sess-1"),
                      ("verified", mini.client_a, "sess-1"), ("changed", mini.client_a, "sess-1"),
                      ("failed", mini.client_a, "sess-1")]


async def test_two_members_with_one_pin_have_different_hashes(mini: Mini, db) -> None:
    await bound_member(mini, "S1", "openid-1")
    await bound_member(mini, "S2", "openid-2")
    await set_pin(mini, "openid-1", PIN)
    await set_pin(mini, "openid-2", PIN)
    hashes = [r["pin_hash"] for r in await db.fetch("SELECT pin_hash FROM member_pins")]
    assert len(set(hashes)) == 2


# --- self-service ----------------------------------------------------------------------------


async def test_a_member_freezes_without_a_pin_and_unfreezes_only_with_it(mini: Mini, db, nats_url: str) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    await set_pin(mini, "openid-1", PIN)
    frozen = (await freeze(mini, "openid-1", attestation_id="wx-sess-77")).member
    assert (frozen.status, frozen.frozen_by) == (pb.MEMBER_STATUS_FROZEN, pb.FREEZE_ORIGIN_MEMBER)
    # A repeat changes nothing.
    assert (await freeze(mini, "openid-1")).member.version == frozen.version
    assert await refused(unfreeze(mini, "openid-1", WRONG_PIN)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                     "PIN_INCORRECT")
    assert await refused(unfreeze(mini, "openid-1", "")) == (grpc.StatusCode.INVALID_ARGUMENT, "PIN_INVALID")
    assert (await get_member(mini.stub, mini.tenant_id, li.member_id)).status == pb.MEMBER_STATUS_FROZEN
    active = (await unfreeze(mini, "openid-1", PIN)).member
    assert (active.status, active.frozen_by) == (pb.MEMBER_STATUS_ACTIVE, pb.FREEZE_ORIGIN_UNSPECIFIED)
    # A repeat changes nothing and asks no PIN.
    assert (await unfreeze(mini, "openid-1", WRONG_PIN)).member.version == active.version

    # The feed and the events say the member did it, through which partner, attested how.
    rows = await db.fetch("SELECT kind, client_id, attestation_id FROM directory_changes WHERE member_id = $1"
                          " ORDER BY sequence", uuid.UUID(li.member_id))
    assert [(r["kind"], r["client_id"], r["attestation_id"]) for r in rows] == [
        ("member.created", "", ""), ("member.frozen", mini.client_a, "wx-sess-77"),
        ("member.unfrozen", mini.client_a, "sess-1")]
    received = await read_exactly(nats_url, stream="IDENTITY", subjects="identity.member.>", count=3)
    frozen_event = json.loads(received[1].data)
    assert received[1].subject == "identity.member.frozen"
    assert {k: frozen_event["data"][k] for k in ("reason", "frozen_by", "by", "client_id", "attestation_id")} == {
        "reason": "self_service", "frozen_by": "member", "by": "member", "client_id": mini.client_a,
        "attestation_id": "wx-sess-77"}
    assert json.loads(received[2].data)["data"]["by"] == "member"
    assert "openid-1" not in json.dumps([json.loads(m.data) for m in received])


async def test_unfreezing_needs_a_pin_set(mini: Mini) -> None:
    await bound_member(mini, "S1", "openid-1")
    await freeze(mini, "openid-1")
    assert await refused(unfreeze(mini, "openid-1", PIN)) == (grpc.StatusCode.FAILED_PRECONDITION, "PIN_NOT_SET")


async def test_self_service_never_lifts_a_freeze_the_school_made(mini: Mini, db) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    await set_pin(mini, "openid-1", PIN)
    await mini.stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=mini.tenant_id, member_id=li.member_id,
                                                        reason="unpaid fees"))
    assert await refused(unfreeze(mini, "openid-1", PIN)) == (grpc.StatusCode.FAILED_PRECONDITION, "FROZEN_BY_TENANT")
    # Refused before the PIN was checked: no attempt spent.
    assert await db.fetchval("SELECT count(*) FROM member_pin_events WHERE kind <> 'set'") == 0
    # The member freezing on top of it changes nothing: it stays the school's.
    assert (await freeze(mini, "openid-1")).member.frozen_by == pb.FREEZE_ORIGIN_TENANT
    await mini.stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=mini.tenant_id, member_id=li.member_id))

    # The school freezing a member who froze themselves makes it the school's freeze.
    await freeze(mini, "openid-1")
    taken = (await mini.stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=mini.tenant_id, member_id=li.member_id,
                                                                 reason="investigation"))).member
    assert taken.frozen_by == pb.FREEZE_ORIGIN_TENANT
    assert await refused(unfreeze(mini, "openid-1", PIN)) == (grpc.StatusCode.FAILED_PRECONDITION, "FROZEN_BY_TENANT")
    # The school may lift a member's own freeze.
    await mini.stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=mini.tenant_id, member_id=li.member_id))
    await freeze(mini, "openid-1")
    lifted = (await mini.stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=mini.tenant_id,
                                                                      member_id=li.member_id))).member
    assert lifted.status == pb.MEMBER_STATUS_ACTIVE


async def test_a_roster_import_saying_active_does_not_lift_a_members_own_freeze(mini: Mini) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    await freeze(mini, "openid-1")
    result = await run_import(mini.stub, mini.tenant_id, csv_file("external_number,name,status", "S1,Li,active"))
    assert result.rows_failed == 0
    member = await get_member(mini.stub, mini.tenant_id, li.member_id)
    assert (member.status, member.frozen_by) == (pb.MEMBER_STATUS_FROZEN, pb.FREEZE_ORIGIN_MEMBER)


async def test_wrong_pins_lock_the_member_for_fifteen_minutes(mini: Mini, db, nats_url: str) -> None:
    await bound_member(mini, "S1", "openid-1")
    await set_pin(mini, "openid-1", PIN)
    await freeze(mini, "openid-1")
    for attempts_left in (4, 3, 2, 1):
        code, reason, metadata = await refused_with(unfreeze(mini, "openid-1", WRONG_PIN))
        assert (code, reason, metadata) == (grpc.StatusCode.PERMISSION_DENIED, "PIN_INCORRECT",
                                            {"attempts_left": str(attempts_left)})
    code, reason, metadata = await refused_with(unfreeze(mini, "openid-1", WRONG_PIN))
    assert (code, reason, metadata) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PIN_LOCKED", {"retry_after_s": "900"})
    # While locked even the right PIN is refused, unchecked; changing the PIN is no way around it.
    mini.clock.advance(899)
    code, reason, metadata = await refused_with(unfreeze(mini, "openid-1", PIN))
    assert (code, reason, metadata) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PIN_LOCKED", {"retry_after_s": "1"})
    assert await refused(set_pin(mini, "openid-1", OTHER_PIN, old_pin=PIN)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "PIN_LOCKED")
    # Another partner's app cannot reach the member at all (its openid namespace is its own).
    assert await refused(mini.stub.SelfServiceUnfreeze(pb.SelfServiceUnfreezeRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, "openid-1", client_id=mini.client_b), pin=PIN))) == (
        grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")
    mini.clock.advance(1)
    # The lock is over: a fresh count of five, and the right PIN works.
    code, reason, metadata = await refused_with(unfreeze(mini, "openid-1", WRONG_PIN))
    assert (reason, metadata) == ("PIN_INCORRECT", {"attempts_left": "4"})
    assert (await unfreeze(mini, "openid-1", PIN)).member.status == pb.MEMBER_STATUS_ACTIVE
    assert await db.fetchval("SELECT failed_attempts FROM member_pins") == 0

    kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM member_pin_events ORDER BY event_id")]
    assert kinds == ["set", "failed", "failed", "failed", "failed", "locked", "failed", "verified"]
    (locked,) = await read_exactly(nats_url, stream="IDENTITY", subjects="identity.pin.locked", count=1)
    data = json.loads(locked.data)["data"]
    assert data["client_id"] == mini.client_a and "locked_until" in data
    assert PIN not in locked.data.decode() and WRONG_PIN not in locked.data.decode()


async def test_the_admin_resets_a_forgotten_pin(mini: Mini) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    await set_pin(mini, "openid-1", PIN)
    await freeze(mini, "openid-1")
    for _ in range(5):
        await refused(unfreeze(mini, "openid-1", WRONG_PIN))
    reset = await mini.stub.ResetMemberPin(pb.ResetMemberPinRequest(tenant_id=mini.tenant_id, member_id=li.member_id,
                                                                    client_id=mini.client_b))
    assert reset.cleared is True
    assert (await mini.stub.ResetMemberPin(pb.ResetMemberPinRequest(
        tenant_id=mini.tenant_id, member_id=li.member_id, client_id=mini.client_b))).cleared is False
    assert (await set_pin(mini, "openid-1", OTHER_PIN)).first is True
    assert (await unfreeze(mini, "openid-1", OTHER_PIN)).member.status == pb.MEMBER_STATUS_ACTIVE
    other_tenant = await create_tenant(mini.stub, name="Other School")
    assert await refused(mini.stub.ResetMemberPin(pb.ResetMemberPinRequest(
        tenant_id=other_tenant, member_id=li.member_id, client_id=mini.client_b))) == (
        grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


async def test_a_member_reports_their_card_lost_and_it_is_blacklisted(mini: Mini, db) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    assert await refused(mini.stub.SelfServiceReportCardLost(pb.SelfServiceReportCardLostRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, "openid-1")))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                          "NO_ACTIVE_CARD")
    await mini.stub.BindCard(pb.BindCardRequest(tenant_id=mini.tenant_id, member_id=li.member_id, card_uid="0a0b0c0d"))
    lost = (await mini.stub.SelfServiceReportCardLost(pb.SelfServiceReportCardLostRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, "openid-1", attestation_id="sess-9")))).member
    assert [(c.card_uid, c.status) for c in lost.cards] == [("0A0B0C0D", pb.CARD_STATUS_LOST)]
    blacklist = await mini.stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=mini.tenant_id))
    assert [c.card_uid for c in blacklist.cards] == ["0A0B0C0D"]
    assert (await db.fetchval("SELECT attestation_id FROM directory_changes WHERE kind = 'card.lost'")) == "sess-9"
    # Naming the card works too, and a repeat changes nothing.
    again = (await mini.stub.SelfServiceReportCardLost(pb.SelfServiceReportCardLostRequest(
        tenant_id=mini.tenant_id, caller=caller(mini, "openid-1"), card_uid="0A0B0C0D"))).member
    assert again.version == lost.version
    assert len([c for c in await feed(mini.stub, mini.tenant_id) if c.kind == pb.CHANGE_KIND_CARD_LOST]) == 1


async def test_self_service_needs_an_attestation_and_a_binding(mini: Mini) -> None:
    await bound_member(mini, "S1", "openid-1")
    for attestation in ["", "has space", "x" * 129]:
        assert await refused(freeze(mini, "openid-1", attestation_id=attestation)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "ATTESTATION_ID_INVALID"), attestation
    assert await refused(freeze(mini, "openid-unknown")) == (grpc.StatusCode.NOT_FOUND, "BINDING_NOT_FOUND")


async def test_a_school_may_set_first_pins_at_its_office_only(mini: Mini, db, nats_url: str) -> None:
    li = await bound_member(mini, "S1", "openid-1")
    default = await mini.stub.GetSelfServiceSettings(pb.GetSelfServiceSettingsRequest(tenant_id=mini.tenant_id))
    assert default.settings.first_pin_by_admin is False and not default.settings.HasField("updated_at")
    updated = await mini.stub.UpdateSelfServiceSettings(pb.UpdateSelfServiceSettingsRequest(
        tenant_id=mini.tenant_id, client_id=mini.client_b, settings=pb.SelfServiceSettings(first_pin_by_admin=True)))
    assert updated.settings.first_pin_by_admin is True and updated.settings.HasField("updated_at")
    # The same again changes nothing (one event).
    await mini.stub.UpdateSelfServiceSettings(pb.UpdateSelfServiceSettingsRequest(
        tenant_id=mini.tenant_id, client_id=mini.client_b, settings=pb.SelfServiceSettings(first_pin_by_admin=True)))

    assert await refused(set_pin(mini, "openid-1", PIN)) == (grpc.StatusCode.FAILED_PRECONDITION, "FIRST_PIN_BY_ADMIN")
    assert await db.fetchval("SELECT count(*) FROM member_pins") == 0
    # At the office: the admin sets it, no old PIN needed.
    admin_set = await mini.stub.ResetMemberPin(pb.ResetMemberPinRequest(
        tenant_id=mini.tenant_id, member_id=li.member_id, client_id=mini.client_b, new_pin=PIN))
    assert admin_set.cleared is False
    # Then the member changes it through the partner, with the old one.
    assert (await set_pin(mini, "openid-1", OTHER_PIN, old_pin=PIN)).first is False
    assert await refused(mini.stub.ResetMemberPin(pb.ResetMemberPinRequest(
        tenant_id=mini.tenant_id, member_id=li.member_id, client_id=mini.client_b, new_pin="111111"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PIN_TOO_SIMPLE")
    kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM member_pin_events ORDER BY event_id")]
    assert kinds == ["admin_set", "verified", "changed"]
    (changed,) = await read_exactly(nats_url, stream="IDENTITY", subjects="identity.self_service.>", count=1)
    assert json.loads(changed.data)["data"] == {"tenant_id": mini.tenant_id, "first_pin_by_admin": True,
                                                "client_id": mini.client_b}
    assert await refused(mini.stub.GetSelfServiceSettings(pb.GetSelfServiceSettingsRequest(
        tenant_id=str(uuid.uuid4())))) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")

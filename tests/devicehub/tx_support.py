"""Helpers of the transactions tests (pay, offline, access, cabinet, dining): a campus across the
mesh (members in identity with purses in the ledger, the university rule set published, codes
from codegen), POS and gate devices, authorisations and signed offline records that carry their
evidence (the code text, or the card UID), as the reference engine makes them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import nacl.signing
import onecard_codes as codes
from google.protobuf.timestamp_pb2 import Timestamp
from onecard_device.identity import record_message
from onecard_policy.examples import university_rule_set

from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as ppb
from tests.conftest import RunningService
from tests.ledger.support import allow_credit
from tests.devicehub.support import DeviceConnection, EnrolledDevice, connect, enrol_device

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-26, a Thursday in Shanghai.
LUNCH = datetime(2026, 11, 26, 12, 0, tzinfo=SHANGHAI)
DINNER = datetime(2026, 11, 26, 18, 0, tzinfo=SHANGHAI)


def stamp(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


@dataclass
class Member:
    member_id: str
    cash_id: str
    groups: dict[str, str]
    card_uid: str = ""
    face_ref: str = ""
    holder_key: nacl.signing.SigningKey | None = None
    credential: bytes = b""
    counter: int = 0
    credential_id: str = ""

    def code(self, *, purpose: codes.Purpose = codes.Purpose.PAY, now_s: int | None = None) -> str:
        """A fresh holder code (the next counter)."""
        assert self.holder_key is not None and self.credential, "issue a credential first"
        self.counter += 1
        return codes.make_holder_code(credential_bytes=self.credential, holder_signing_key=self.holder_key,
                                      now_s=int(time.time()) if now_s is None else now_s, counter=self.counter,
                                      purpose=purpose)


@dataclass
class Campus:
    tenant_id: str
    bank_id: str
    merchant_id: str
    # The Milk Cabinet's merchant (scene vending).
    vending_id: str = ""
    members: list[Member] = field(default_factory=list)


async def open_account(ledger: RunningService, tenant_id: str, *, owner_kind: int, owner_id: str, purse_kind: int,
                       ref: str = "") -> str:
    answer = await ledger.stub.OpenAccount(lpb.OpenAccountRequest(
        tenant_id=tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind, ref=ref))
    return answer.account.account.account_id


async def top_up(ledger: RunningService, tenant_id: str, *, from_id: str, to_id: str, amount_fen: int) -> None:
    await ledger.stub.TopUp(lpb.TopUpRequest(tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()),
                                             from_account_id=from_id, to_account_id=to_id, amount_fen=amount_fen))


async def balance(ledger: RunningService, tenant_id: str, account_id: str) -> int:
    answer = await ledger.stub.GetBalances(lpb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[account_id]))
    return answer.accounts[0].balance.available_fen


def open_all_day(doc: dict[str, Any]) -> dict[str, Any]:
    """The university rule set with the canteen open at any hour and no per-meal-period count:
    offline records are dated by the real clock (settlement checks their time), so tests that
    upload them must not depend on the hour they run at."""
    doc = json.loads(json.dumps(doc))
    doc["scenes"] = [{"name": "canteen", "closed_outside_meal_periods": False} if s == "canteen"
                     or (isinstance(s, dict) and s.get("name") == "canteen") else s for s in doc["scenes"]]
    doc["limits"] = [lim for lim in doc["limits"] if lim["name"] != "meals-per-period"]
    return doc


async def campus(*, identity: RunningService, ledger: RunningService, policy: RunningService,
                 tenant_id: str, any_hour: bool = False) -> Campus:
    """The tenant's bank clearing and North Canteen accounts, and the university rule set (with
    the North Canteen named by its ledger account) published as version 1; ``any_hour``: the
    canteen open at any hour (``open_all_day``)."""
    bank_id = await open_account(ledger, tenant_id, owner_kind=lpb.OWNER_KIND_TENANT, owner_id="bank",
                                 purse_kind=lpb.PURSE_KIND_BANK_CLEARING)
    await allow_credit(ledger.stub, tenant_id, bank_id)
    merchant_id = await open_account(ledger, tenant_id, owner_kind=lpb.OWNER_KIND_MERCHANT,
                                     owner_id="canteen-north", purse_kind=lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
    vending_id = await open_account(ledger, tenant_id, owner_kind=lpb.OWNER_KIND_MERCHANT, owner_id="milk-cabinet",
                                    purse_kind=lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
    text = json.dumps(university_rule_set()).replace('"canteen-north"', json.dumps(merchant_id))
    doc = json.loads(text.replace('"milk-cabinet"', json.dumps(vending_id)))
    if any_hour:
        doc = open_all_day(doc)
    created = await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=json.dumps(doc)))
    await policy.stub.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=created.version.version, published_by="admin@test"))
    return Campus(tenant_id=tenant_id, bank_id=bank_id, merchant_id=merchant_id, vending_id=vending_id)


async def add_member(c: Campus, *, identity: RunningService, ledger: RunningService, number: str,
                     cash_fen: int = 100_000, groups: dict[str, str] | None = None, card_uid: str = "",
                     face_ref: str = "", codegen: RunningService | None = None) -> Member:
    groups = {"role": "student"} if groups is None else groups
    created = await identity.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=c.tenant_id, external_number=number, name=f"Member {number}", groups=groups))
    member_id = created.member.member_id
    cash_id = await open_account(ledger, c.tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member_id,
                                 purse_kind=lpb.PURSE_KIND_CASH)
    if cash_fen:
        await top_up(ledger, c.tenant_id, from_id=c.bank_id, to_id=cash_id, amount_fen=cash_fen)
    member = Member(member_id=member_id, cash_id=cash_id, groups=groups)
    if card_uid:
        await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=c.tenant_id, member_id=member_id,
                                                         card_uid=card_uid))
        member.card_uid = card_uid
    if face_ref:
        await identity.stub.SetFaceEnrolment(ipb.SetFaceEnrolmentRequest(
            tenant_id=c.tenant_id, member_id=member_id, face_enrolment_ref=face_ref))
        member.face_ref = face_ref
    if codegen is not None:
        await issue_credential(codegen, c.tenant_id, member)
    c.members.append(member)
    return member


async def issue_credential(codegen: RunningService, tenant_id: str, member: Member,
                           purposes: tuple[int, ...] = (cpb.PURPOSE_PAY, cpb.PURPOSE_ACCESS, cpb.PURPOSE_RIDE)
                           ) -> None:
    key = nacl.signing.SigningKey.generate()
    answer = await codegen.stub.IssueCredential(cpb.IssueCredentialRequest(
        tenant_id=tenant_id, member_id=member.member_id, holder_public_key=bytes(key.verify_key),
        purposes=list(purposes)))
    member.holder_key, member.credential, member.counter = key, answer.credential_bytes, 0
    member.credential_id = answer.credential.credential_id


async def device(devicehub: RunningService, device_stub: Any, tenant_id: str, *, kind: int = pb.DEVICE_KIND_POS,
                 location: str = "north-canteen", scene_tags: tuple[str, ...] = ("canteen",), merchant_id: str = "",
                 capacity: int = 0, parent_device_id: str = "") -> EnrolledDevice:
    return await enrol_device(devicehub.stub, device_stub, tenant_id, kind=kind, location=location,
                              scene_tags=list(scene_tags), merchant_account_id=merchant_id, capacity=capacity,
                              parent_device_id=parent_device_id)


async def online(device_stub: Any, enrolled: EnrolledDevice, *, last_sequence: int = 0) -> DeviceConnection:
    return await connect(device_stub, enrolled, last_sequence=last_sequence)


class CampusClock:
    """The hub's clock in these tests (its ``now``, tests/devicehub/conftest.py): the real time,
    unless a test said what hour it is on campus, from which it runs on. The hub decides online by
    its own clock, so "pay at dinner" means "it is dinner time at the hub" — and ``ask`` makes it so
    (the test's devices agree with the hub; the one test of a device clock that disagrees sends its
    ``device_time`` with ``hub_time`` apart)."""

    def __init__(self) -> None:
        self._at: datetime | None = None
        self._set_at = 0.0

    def set(self, at: datetime) -> None:
        self._at, self._set_at = at, time.monotonic()

    def reset(self) -> None:
        self._at = None

    def now(self) -> datetime:
        if self._at is None:
            return datetime.now(UTC)
        return self._at + timedelta(seconds=time.monotonic() - self._set_at)


CAMPUS_CLOCK = CampusClock()


async def ask(conn: DeviceConnection, *, timeout: float = 10.0, hub_time: datetime | None = None,
              **fields: Any) -> pb.AuthorizeResult:
    """Send an authorize and answer its result. The hub's clock reads ``hub_time``, or else the
    device's ``device_time`` when one is sent."""
    request_id = fields.setdefault("request_id", str(uuid.uuid4()))
    if hub_time is not None:
        CAMPUS_CLOCK.set(hub_time)
    elif "device_time" in fields:
        CAMPUS_CLOCK.set(fields["device_time"].ToDatetime(tzinfo=UTC))
    await conn.send(authorize=pb.Authorize(**fields))
    answer = await conn.recv_until(
        lambda m: (m.WhichOneof("body") == "authorize_result" and m.authorize_result.request_id == request_id)
        or (m.WhichOneof("body") == "error" and m.error.ref == request_id), timeout=timeout)
    if answer.WhichOneof("body") == "error":
        raise AssertionError(f"stream error: {answer.error}")
    return answer.authorize_result


async def pay(conn: DeviceConnection, *, amount_fen: int, at: datetime = LUNCH, key: str | None = None,
              **presentation: str) -> pb.AuthorizeResult:
    return await ask(conn, presentation=pb.Presentation(**presentation), purpose=pb.PURPOSE_PAY,
                     amount_fen=amount_fen, idempotency_key=key or str(uuid.uuid4()), device_time=stamp(at))


async def roundtrip(conn: DeviceConnection, ref: str, body: str, message: pb.ConnectRequest, *,
                    timeout: float = 30.0) -> Any:
    """Send a message and answer the hub's reply of kind ``body`` (or its StreamError) for ``ref``."""
    await conn.send(message)

    def matches(m: pb.ConnectResponse) -> bool:
        kind = m.WhichOneof("body")
        if kind == "error":
            return m.error.ref == ref
        if kind != body:
            return False
        reply = getattr(m, body)
        return getattr(reply, "upload_id", None) == ref or getattr(reply, "order_id", None) == ref

    answer = await conn.recv_until(matches, timeout=timeout)
    return answer.error if answer.WhichOneof("body") == "error" else getattr(answer, body)


def signed(enrolled: EnrolledDevice, record: pb.OfflineRecord) -> pb.OfflineRecord:
    record.ClearField("signature")
    message = record_message(tenant_id=enrolled.tenant_id, device_id=enrolled.device_id, record=record)
    record.signature = enrolled.signing_key.sign(message).signature
    return record


def payment_record(enrolled: EnrolledDevice, *, sequence: int, member: Member, amount_fen: int,
                   at: datetime | None = None, by_card: bool = False, code: str | None = None,
                   bundle_version: int = 1, legs: list[pb.PlanLeg] | None = None, **fields: Any) -> pb.OfflineRecord:
    """A signed payment record as an honest device makes it: by the member's card (``by_card``), or
    by a code (a fresh one at ``at``, or the ``code`` given), drawn from the cash purse; ``fields``
    override any field before signing."""
    at = at or datetime.now(UTC)
    legs = legs if legs is not None else [pb.PlanLeg(purse_kind="cash", amount_fen=amount_fen)]
    record = pb.OfflineRecord(
        sequence=sequence, event_time=stamp(at), purpose=pb.PURPOSE_PAY, member_id=member.member_id,
        amount_fen=amount_fen, legs=legs, bundle_version=bundle_version)
    if by_card:
        record.method, record.card_uid = pb.METHOD_CARD, member.card_uid
    else:
        if code is None:
            code = member.code(now_s=int(at.timestamp()))
        record.method, record.code = pb.METHOD_CODE, code
        record.credential_id, record.counter = member.credential_id, codes.decode_code(code).counter
    for name, value in fields.items():
        if isinstance(value, list):
            record.ClearField(name)
            getattr(record, name).extend(value)
        elif isinstance(value, Timestamp):
            getattr(record, name).CopyFrom(value)
        else:
            setattr(record, name, value)
    return signed(enrolled, record)

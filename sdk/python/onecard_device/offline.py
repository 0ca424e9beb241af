"""The offline engine: a terminal deciding a payment or a pass alone, and keeping a signed record.

Pure of the network (no grpc): the synced ``DeviceState``, the ``DeviceStore`` on disk, the
device key and a clock. A payment, in this order (the first refusal is the answer):

1. readiness: no policy bundle yet -> ``OFFLINE_NOT_READY`` (the device cannot know the rules);
2. the member: a code through ``onecard_codes.Verifier`` (trust list, revocations, the replay
   cache; a refusal is ``CODE_<reason>``), a card against the blacklist (``CARD_LOST``), a face
   cannot be matched offline (``UNKNOWN_FACE``); then the member blocks (``MEMBER_FROZEN`` /
   ``MEMBER_LEFT``);
3. the plan: ``onecard_policy.evaluate`` on channel ``offline`` with the device's local counters,
   on the inputs ``onecard_device.planning`` defines (no member groups; one purse, cash of
   **unknown** balance, so the ledger's offline settlement charges whatever the purse lacks to
   the member's receivable with a SHORTFALL alarm; subsidies and vouchers are spent online
   only). The caps bound what can go unpaid; the rule set's offline caps
   (``OFFLINE_LIMIT_EXCEEDED:credential|device.<cap>``) come from the evaluator;
4. the credential's own caps, carried in the signed code (``.caps``), on what the member pays,
   counted on the same per-member local counters: ``OFFLINE_LIMIT_EXCEEDED:code.<cap>``
   (per transaction: above refuses, equal passes; per day: used + charge above refuses; count:
   used + 1 above refuses);
5. ``PIN_REQUIRED`` when the plan asks for a PIN the terminal did not check;
6. the record: the next device sequence, signed, stored with the counters it raised and the code
   it accepted in one transaction (``DeviceStore.commit_record``). A code payment's record carries
   the code text itself, a card payment's the UID: the evidence settlement checks again, with the
   same planning (``onecard_device.planning``), before it books anything.

A card whose member the device never saw online is still taken (the card is the credential, as on
any campus POS) with an empty member id: the hub resolves it when the record settles, and its caps
count on the card (``card:<UID>``). Gates and shuttle readers decide with ``onecard_device.access``
(``offline=True``: member groups unknown) and record pass and deny alike, with a nonce.
"""
from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import onecard_codes as codes
from google.protobuf.timestamp_pb2 import Timestamp
from onecard_policy import counter_keys, evaluate

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device import access as access_rules
from onecard_device import planning
from onecard_device.identity import DeviceIdentity
from onecard_device.state import DeviceState, normalise_card_uid
from onecard_device.store import DeviceStore

MAX_AMOUNT_FEN = 100_000_000
APPROVED = "APPROVED"
PASS = "PASS"
OFFLINE_NOT_READY = "OFFLINE_NOT_READY"
CODE_PURPOSES = {pb.PURPOSE_PAY: codes.Purpose.PAY, pb.PURPOSE_ACCESS: codes.Purpose.ACCESS,
                 pb.PURPOSE_RIDE: codes.Purpose.RIDE}
ACCESS_PURPOSES = {pb.PURPOSE_ACCESS: "access", pb.PURPOSE_RIDE: "ride"}
COUNTER_KEEP_DAYS = 3
REPLAY_MARGIN_S = 60
MAX_TOKEN_SLOT_S = 3600


@dataclass(frozen=True, slots=True)
class OfflineDecision:
    """What the engine decided; ``record`` is the stored, signed record (None when nothing was kept)."""

    approved: bool
    reason: str
    member_id: str = ""
    amount_fen: int = 0
    charged_fen: int = 0
    discount_fen: int = 0
    benefit: str = ""
    legs: tuple[pb.PlanLeg, ...] = ()
    rule: str = ""
    nonce: str = ""
    record: pb.OfflineRecord | None = field(default=None, repr=False)
    detail: str = ""

    @property
    def sequence(self) -> int:
        return self.record.sequence if self.record is not None else 0


@dataclass(frozen=True, slots=True)
class _Member:
    method: int
    member_id: str  # '' when unknown (a card never seen online)
    counter_member: str  # whose local counters: the member, or card:<UID>
    credential_id: str = ""
    counter: int = 0
    card_uid: str = ""
    code: str = ""  # the scanned text: a payment's record carries it
    caps: codes.OfflineCaps | None = None
    code_key: tuple[bytes, int, int] | None = None  # (credential id bytes, counter, replay expiry)


def _to_timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class OfflineEngine:
    """Decides offline for one device; not thread-safe (one per terminal, on its event loop)."""

    def __init__(self, *, identity: DeviceIdentity, state: DeviceState, store: DeviceStore,
                 clock: Callable[[], float] = time.time, replay_cache: codes.ReplayCache | None = None) -> None:
        self.identity = identity
        self.state = state
        self.store = store
        self.clock = clock
        self.replay_cache = replay_cache if replay_cache is not None else codes.ReplayCache()
        self.verifier = codes.Verifier(trust_list=state.trust_list, revocations=state.revocations,
                                       replay_cache=self.replay_cache)
        now_s = int(clock())
        # Codes this device accepted before a restart stay refused for as long as they could replay.
        for credential, counter, expires_at_s in store.live_accepted_codes(now_s=now_s):
            self.replay_cache.check_and_record((credential, counter), expires_at_s=expires_at_s, now_s=now_s)
        store.prune_counters(before_day=(dt.datetime.fromtimestamp(now_s, dt.UTC).date()
                                         - dt.timedelta(days=COUNTER_KEEP_DAYS)).isoformat())

    # ---- the member ----

    def _sync_verifier(self) -> None:
        trust_list = self.state.trust_list
        if self.verifier.trust_list is not trust_list:
            self.verifier.replace_trust_list(trust_list)
        self.verifier.revocations = self.state.revocations

    def _identify(self, presentation: pb.Presentation, purpose: int, now_s: int) -> _Member | str:
        which = presentation.WhichOneof("credential")
        if which == "code":
            self._sync_verifier()
            result = self.verifier.verify(presentation.code, now_s=now_s,
                                          expected_tenant_id=uuid.UUID(self.state.tenant_id),
                                          purpose=CODE_PURPOSES[purpose])
            if not result.ok:
                return f"CODE_{result.reason.value}"
            member_id = str(result.member_id)
            # As long as the verifier itself remembers it: past the clock window (a token: past its
            # slot, at most an hour long) and a margin.
            keep_s = -self.verifier.clock_window_s[0] + REPLAY_MARGIN_S
            if result.kind == codes.CodeKind.TOKEN:
                keep_s += MAX_TOKEN_SLOT_S
            return _Member(method=pb.METHOD_CODE, member_id=member_id, counter_member=member_id,
                           credential_id=str(result.credential_id), counter=result.counter, code=presentation.code,
                           caps=result.caps,
                           code_key=(result.credential_id.bytes, result.counter,
                                     max(result.time_s, now_s) + keep_s))
        if which == "card_uid":
            uid = normalise_card_uid(presentation.card_uid)
            if not uid:
                return "UNKNOWN_CARD"
            if uid in self.state.card_blacklist:
                return "CARD_LOST"
            member_id = self.state.card_member(uid)
            return _Member(method=pb.METHOD_CARD, member_id=member_id,
                           counter_member=planning.counter_member(member_id=member_id, card_uid=uid), card_uid=uid)
        if which == "face_enrolment_ref":
            return "UNKNOWN_FACE"
        return "NO_PRESENTATION"

    def _blocked(self, member: _Member) -> str | None:
        status = self.state.member_block(member.member_id)
        if status is None:
            return None
        return "MEMBER_LEFT" if status == "left" else "MEMBER_FROZEN"

    # ---- payments ----

    def pay(self, presentation: pb.Presentation, amount_fen: int, *, pin_verified: bool = False,
            now_s: float | None = None) -> OfflineDecision:
        now = self.clock() if now_s is None else now_s
        now_i = int(now)
        if type(amount_fen) is not int or not 1 <= amount_fen <= MAX_AMOUNT_FEN:
            return OfflineDecision(False, "INVALID_AMOUNT", amount_fen=amount_fen if type(amount_fen) is int else 0)
        rule_set = self.state.rule_set
        if rule_set is None:
            return OfflineDecision(False, OFFLINE_NOT_READY, amount_fen=amount_fen,
                                   detail="no policy bundle has been synced")
        member = self._identify(presentation, pb.PURPOSE_PAY, now_i)
        if isinstance(member, str):
            return OfflineDecision(False, member, amount_fen=amount_fen)
        blocked = self._blocked(member)
        if blocked:
            return OfflineDecision(False, blocked, member_id=member.member_id, amount_fen=amount_fen)
        device = self.state.device
        event_time = _to_timestamp(now)
        # The record's own time, to the microsecond: what settlement plans with again.
        request = planning.offline_request(
            tenant_id=self.state.tenant_id, counter_member=member.counter_member, scene=device.scene,
            merchant_id=device.merchant_account_id, device_id=self.identity.device_id, amount_fen=amount_fen,
            at=event_time.ToDatetime(tzinfo=dt.UTC))
        counters = self.store.counters(counter_keys(rule_set, request))
        plan = evaluate(rule_set, request, counters)
        if not plan.approved:
            return OfflineDecision(False, plan.reason, member_id=member.member_id, amount_fen=amount_fen,
                                   detail=plan.detail)
        charged = plan.charged_fen
        assert plan.service_date is not None
        day_keys = planning.day_keys(counter_member=member.counter_member, device_id=self.identity.device_id,
                                     service_date=plan.service_date)
        if member.caps is not None:
            refusal = planning.code_cap_check(member.caps, plan, day_keys, counters)
            if refusal:
                return OfflineDecision(False, refusal, member_id=member.member_id, amount_fen=amount_fen)
        if plan.pin_required and not pin_verified:
            return OfflineDecision(False, "PIN_REQUIRED", member_id=member.member_id, amount_fen=amount_fen)
        legs = tuple(pb.PlanLeg(purse_kind=leg.purse_kind, ref=leg.ref, amount_fen=leg.amount_fen)
                     for leg in plan.legs)
        record = pb.OfflineRecord(
            event_time=event_time, purpose=pb.PURPOSE_PAY, method=member.method, member_id=member.member_id,
            credential_id=member.credential_id, counter=member.counter, card_uid=member.card_uid,
            amount_fen=amount_fen, legs=legs, bundle_version=self.state.bundle_version, code=member.code)
        record = self._commit(record, now=now, increments=planning.increments(plan, day_keys),
                              code_key=member.code_key)
        return OfflineDecision(True, APPROVED, member_id=member.member_id, amount_fen=amount_fen,
                               charged_fen=charged, discount_fen=plan.discount_fen, benefit=plan.benefit or "",
                               legs=legs, record=record)

    # ---- gates and shuttle readers ----

    def access(self, presentation: pb.Presentation, *, purpose: int = pb.PURPOSE_ACCESS,
               nonce: str | None = None, now_s: float | None = None) -> OfflineDecision:
        """Decide a pass offline and record it (pass or deny) with a nonce."""
        if purpose not in ACCESS_PURPOSES:
            raise ValueError("purpose must be PURPOSE_ACCESS or PURPOSE_RIDE")
        now = self.clock() if now_s is None else now_s
        nonce = nonce or uuid.uuid4().hex
        member = self._identify(presentation, purpose, int(now))
        rule = ""
        code_key = None
        if isinstance(member, str):
            reason, passed = member, False
            method = {"code": pb.METHOD_CODE, "card_uid": pb.METHOD_CARD,
                      "face_enrolment_ref": pb.METHOD_FACE}.get(presentation.WhichOneof("credential") or "", 0)
            record = pb.OfflineRecord(purpose=purpose, method=method,
                                      card_uid=normalise_card_uid(presentation.card_uid))
        else:
            code_key = member.code_key
            reason = self._blocked(member) or ""
            passed = False
            if not reason:
                rules = self.state.access_rules
                if rules is None:
                    reason = access_rules.NO_RULE
                else:
                    decision = access_rules.decide_access(
                        rules, location=self.state.device.location, purpose=ACCESS_PURPOSES[purpose],
                        member_groups=None, when=dt.datetime.fromtimestamp(now, dt.UTC), offline=True)
                    passed, reason, rule = decision.passed, decision.reason, decision.rule
            record = pb.OfflineRecord(purpose=purpose, method=member.method, member_id=member.member_id,
                                      credential_id=member.credential_id, counter=member.counter,
                                      card_uid=member.card_uid)
        record.event_time.CopyFrom(_to_timestamp(now))
        record.passed = passed
        record.reason = reason
        record.nonce = nonce
        record = self._commit(record, now=now, increments={}, code_key=code_key if passed else None)
        return OfflineDecision(passed, reason, member_id=record.member_id, rule=rule, nonce=nonce, record=record)

    # ---- the record ----

    def _commit(self, record: pb.OfflineRecord, *, now: float, increments: dict[str, int],
                code_key: tuple[bytes, int, int] | None) -> pb.OfflineRecord:
        signed: list[pb.OfflineRecord] = []

        def build(sequence: int) -> bytes:
            record.sequence = sequence
            self.identity.sign_record(record)
            signed.append(record)
            return record.SerializeToString(deterministic=True)

        self.store.commit_record(build=build, event_time_s=now, purpose=record.purpose,
                                 counter_increments=increments, accepted_code=code_key)
        return signed[0]


FINAL_OUTCOMES = frozenset({pb.RECORD_OUTCOME_BOOKED, pb.RECORD_OUTCOME_SHORTFALL, pb.RECORD_OUTCOME_DUPLICATE,
                            pb.RECORD_OUTCOME_CODE_REUSED, pb.RECORD_OUTCOME_REJECTED})


def final_sequences(result: pb.UploadResult) -> list[int]:
    """The records an upload result settled for good (the device drops them); any other answer
    (an outcome this device does not know) keeps the record queued for the next upload."""
    return [r.sequence for r in result.results if r.outcome in FINAL_OUTCOMES]

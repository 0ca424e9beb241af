"""Settlement's second look at the offline payments of an upload: what the hub knows about each
record, gathered in a few calls for the whole upload, and the checks of services.devicehub.evidence
on it. The order of the checks (the first refusal is the record's reason) is docs/devicehub.md §5:

1. the time window, from the device's hello marks (PostgreSQL, in the upload's transaction);
2. the evidence: the code verified at the record's time (codegen's trust list and revocations,
   read once for the upload; no replay cache), its credential, counter and member those the record
   names; or the card's UID;
3. the directory at the record's time (identity GetMemberStatesAt, one call): the code's member,
   or the card's holder then, active then, the card not yet reported lost;
4. the bundle version the record names, one the device could have held then (policy
   GetRulesInForce, one call; parsed rule sets are kept);
5. the plan the device's inputs make (``onecard_device.planning``) on the device's settled counters
   (PostgreSQL), in sequence order, each believed payment counting against the next; the record's
   legs must be the plan's; then the credential's own caps signed into the code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import onecard_codes as codes
from onecard_device import planning
from onecard_policy import Request, RuleSet, counter_keys

from onecard.devicehub.v1 import devicehub_pb2 as pb
from services.devicehub import evidence
from services.devicehub.context import DeviceContext
from services.devicehub.evidence import Believed, Refused, Verdict
from services.devicehub.members import Members
from services.devicehub.rules import Rules
from services.devicehub.tx_store import UploadTx
from services.devicehub.verifier import CodeVerifiers


@dataclass(frozen=True)
class OfflineLimits:
    """The hub's settings for believing offline records."""

    # How far a device's clock may be from the hub's (either way).
    clock_skew: timedelta
    # The oldest record settled; the hub keeps each device's counters this long (and two days).
    max_record_age: timedelta


@dataclass
class _Claim:
    """One record on its way through the checks."""

    index: int
    record: pb.OfflineRecord
    at: datetime
    window: evidence.Window | None = None
    member_id: str = ""
    counter_member: str = ""
    code: codes.Verified | None = None
    request: Request | None = None


_Refuse = Callable[[_Claim, str], None]


class Recheck:
    def __init__(self, *, verifiers: CodeVerifiers, members: Members, rules: Rules, limits: OfflineLimits):
        self._verifiers = verifiers
        self._members = members
        self._rules = rules
        self._limits = limits

    async def payments(self, device: DeviceContext, records: Sequence[tuple[pb.OfflineRecord, datetime]], *,
                       tx: UploadTx, now: datetime) -> list[Verdict]:
        """A verdict per (record, event time), in order; the records are well-formed payments
        (services.devicehub.settlement checked their shape and signature)."""
        verdicts: list[Verdict | None] = [None] * len(records)
        claims = [_Claim(index=i, record=record, at=at) for i, (record, at) in enumerate(records)]

        def refuse(claim: _Claim, reason: str) -> None:
            verdicts[claim.index] = Refused(reason)

        def live() -> list[_Claim]:
            return [c for c in claims if verdicts[c.index] is None]

        marks = [evidence.Mark(*m) for m in await tx.marks()]
        for c in claims:
            c.window = evidence.window(marks, sequence=c.record.sequence, upload_at=now,
                                      skew=self._limits.clock_skew, max_age=self._limits.max_record_age)
            problem = evidence.time_problem(c.at, c.window)
            if problem:
                refuse(c, problem)

        await self._codes_of(device, [c for c in live() if c.record.method == pb.METHOD_CODE], refuse)
        await self._directory(device, live(), refuse)
        if not live():
            return [v for v in verdicts if v is not None]
        history = await self._rules.history(
            device.tenant_id, since=min(c.window.earliest for c in live() if c.window is not None),
            until=max(c.at for c in live()), versions={c.record.bundle_version for c in live()})
        for c in live():
            assert c.window is not None
            rule_set = history.rule_sets.get(c.record.bundle_version)
            if rule_set is None or not evidence.bundle_held(c.record.bundle_version, found=c.window, event_time=c.at,
                                                            spans=history.spans):
                refuse(c, evidence.BUNDLE_VERSION_NOT_IN_FORCE)
                continue
            c.request = planning.offline_request(
                tenant_id=device.tenant_id, counter_member=c.counter_member,
                scene=device.scene_tags[0] if device.scene_tags else None, merchant_id=device.merchant_account_id,
                device_id=device.device_id, amount_fen=c.record.amount_fen, at=c.at)

        planned = sorted(live(), key=lambda c: c.record.sequence)
        keys = {key for c in planned for key in counter_keys(history.rule_sets[c.record.bundle_version],
                                                             _request(c))}
        counters = await tx.counters(sorted(keys))
        for c in planned:
            verdict = self._plan(device, c, history.rule_sets[c.record.bundle_version], counters)
            verdicts[c.index] = verdict
            if isinstance(verdict, Believed):
                for key, increment in verdict.increments.items():
                    counters[key] = counters.get(key, 0) + increment
        return [v for v in verdicts if v is not None]

    async def _codes_of(self, device: DeviceContext, claims: list[_Claim], refuse: _Refuse) -> None:
        """Each code verified as of its record's time; its credential, counter and member must be
        the ones the record names."""
        if not claims:
            return
        results = await self._verifiers.verify_as_of(tenant_id=device.tenant_id, presented=[
            (c.record.code, codes.Purpose.PAY, c.record.event_time.seconds) for c in claims])
        for c, result in zip(claims, results, strict=True):
            if type(result) is codes.Rejected:
                refuse(c, f"CODE_{result.reason.value}")
            elif (c.record.credential_id, c.record.counter) != (str(result.credential_id), result.counter):
                refuse(c, "CODE_MISMATCH")
            elif c.record.member_id != str(result.member_id):
                refuse(c, "MEMBER_MISMATCH")
            else:
                c.code = result
                c.member_id = str(result.member_id)

    async def _directory(self, device: DeviceContext, claims: list[_Claim], refuse: _Refuse) -> None:
        """The code's member, or the card's holder, as the directory had them at the record's time."""
        if not claims:
            return
        states = await self._members.states_at(device.tenant_id, [
            (c.member_id, "", c.at) if c.code is not None else ("", c.record.card_uid, c.at) for c in claims])
        for c, then in zip(claims, states, strict=True):
            by_card = c.code is None
            problem = evidence.directory_problem(found=then.found, member_id=then.member_id, status=then.status,
                                                 card_lost=then.card_lost, by_card=by_card,
                                                 named_member=c.record.member_id)
            if problem:
                refuse(c, problem)
                continue
            c.member_id = then.member_id
            # Whose counters the device raised: a card it never saw online counts on the card.
            c.counter_member = c.member_id if not by_card else planning.counter_member(
                member_id=c.record.member_id, card_uid=c.record.card_uid)

    def _plan(self, device: DeviceContext, c: _Claim, rule_set: RuleSet, counters: dict[str, int]) -> Verdict:
        recorded = [(evidence.normalise_purse_kind(leg.purse_kind), leg.ref, leg.amount_fen)
                    for leg in c.record.legs]
        plan = evidence.matching_plan(rule_set, _request(c), counters, recorded)
        if isinstance(plan, Refused):
            return plan
        assert plan.service_date is not None
        day = planning.day_keys(counter_member=c.counter_member, device_id=device.device_id,
                                service_date=plan.service_date)
        if c.code is not None:
            refusal = planning.code_cap_check(c.code.caps, plan, day, counters)
            if refusal:
                return Refused(refusal)
        return Believed(member_id=c.member_id, legs=evidence.plan_legs(plan),
                        increments=planning.increments(plan, day), service_date=plan.service_date,
                        code=(str(c.code.credential_id), c.code.counter) if c.code is not None else None)


def _request(c: _Claim) -> Request:
    assert c.request is not None
    return c.request

"""Whether an uploaded offline payment is believed: the checks settlement makes on a record before
it books anything, as plain computation on what the hub knows. No I/O (services.devicehub.recheck
gathers the knowledge; services.devicehub.settlement books what passes).

A device's signature proves only that the device made the record. What it claims is believed only
as far as the hub can check it again:

- **when**: a record numbered s was made after the device's last hello that reported a highest
  sequence below s (the hub's clock at that hello, minus the clock skew allowed) and before the
  next hello (or the upload), plus the skew; and no older than the hub keeps counters for;
- **who**: the member of the code the record carries (verified as of the record's time), or the
  holder of its card then; never the device's word (services.devicehub.recheck);
- **which rules**: the bundle version the record names must be one the device could have held
  then: one in force at some instant between the window's start and the record's time, or the one
  the hub had last sent the device before that hello (a stream may end before the next arrives);
- **what**: the plan the device's own inputs make with those rules (``onecard_device.planning``),
  on the counters of what the hub settled from this device; the record's legs must be that plan's.

Why the hub's counters never fail an honest device: they count only records of this device that
settlement booked, which the device counted too, so each counter is at most what the device had
when it decided, and every cap and limit only refuses above a count. The device's plan may still
differ in one way: it may have used a benefit or a coupon on a record the hub has not seen (lost,
or uploaded later), and planned this one without it. So when the plan does not match, the plans
with some of the still-usable benefits and coupons left unused are tried too. A rogue device gains
nothing by it: it may only charge the member more, within every cap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from onecard_policy import Plan, Request, RuleSet, evaluate

EVENT_TIME_TOO_EARLY = "EVENT_TIME_TOO_EARLY"
EVENT_TIME_TOO_LATE = "EVENT_TIME_TOO_LATE"
BUNDLE_VERSION_NOT_IN_FORCE = "BUNDLE_VERSION_NOT_IN_FORCE"
PURSE_NOT_ALLOWED = "PURSE_NOT_ALLOWED"
PLAN_MISMATCH = "PLAN_MISMATCH"
# A count no benefit or coupon allows (theirs are at most 1,000,000): the offer is used up.
_USED_UP = 10**9


@dataclass(frozen=True, slots=True)
class Mark:
    """A hello of the device: the hub's clock then, the highest sequence the device had issued, and
    the POLICY_BUNDLE version the hub had last sent it (0: none)."""

    marked_at: datetime
    last_sequence: int
    bundle_version: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """When a record may have been made, and the bundle version the device held at its start."""

    earliest: datetime
    latest: datetime
    bundle_version: int


@dataclass(frozen=True, slots=True)
class InForce:
    """A rule set version published from ``since`` until the next publication (None: still)."""

    version: int
    since: datetime
    until: datetime | None


@dataclass(frozen=True, slots=True)
class Believed:
    """A payment whose evidence holds: who pays, the code it spent, the plan to book, and what it
    adds to the device's counters (all on ``service_date``)."""

    member_id: str
    legs: tuple[tuple[str, str, int], ...]  # (purse kind, ref, fen), in funding order
    increments: Mapping[str, int]
    service_date: str
    code: tuple[str, int] | None = None  # (credential id, counter)


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


Verdict = Believed | Refused


def window(marks: Sequence[Mark], *, sequence: int, upload_at: datetime, skew: timedelta,
           max_age: timedelta) -> Window | None:
    """The window of record ``sequence``, from the device's marks (oldest first); None when no
    hello came before the device issued it (nothing it could have made then is believed)."""
    governing = None
    for i, mark in enumerate(marks):
        if mark.last_sequence < sequence:
            governing = i
    if governing is None:
        return None
    mark = marks[governing]
    # Every later hello reported this sequence issued already (or it would govern instead).
    end = marks[governing + 1].marked_at if governing + 1 < len(marks) else upload_at
    return Window(earliest=max(mark.marked_at - skew, upload_at - max_age), latest=min(end, upload_at) + skew,
                  bundle_version=mark.bundle_version)


def time_problem(event_time: datetime, found: Window | None) -> str:
    if found is None or event_time < found.earliest:
        return EVENT_TIME_TOO_EARLY
    if event_time > found.latest:
        return EVENT_TIME_TOO_LATE
    return ""


def directory_problem(*, found: bool, member_id: str, status: str, card_lost: bool, by_card: bool,
                      named_member: str) -> str:
    """What the directory said at the record's time refuses: nobody (an unknown member, a card no
    one held), a card already reported lost, another member than the record names, a member not
    active then."""
    if not found:
        return "UNKNOWN_CARD" if by_card else "MEMBER_UNKNOWN"
    if card_lost:
        return "CARD_LOST"
    if named_member and named_member != member_id:
        return "MEMBER_MISMATCH"
    if status == "left":
        return "MEMBER_LEFT"
    if status != "active":
        return "MEMBER_FROZEN"
    return ""


def bundle_held(version: int, *, found: Window, event_time: datetime, spans: Sequence[InForce]) -> bool:
    """Whether the device could have planned with ``version`` at ``event_time``: the one the hub had
    sent it before the window, or one in force at some instant of [window start, event time]."""
    if version <= 0:
        return False
    if version == found.bundle_version:
        return True
    return any(span.version == version and span.since <= event_time
               and (span.until is None or span.until > found.earliest) for span in spans)


def normalise_purse_kind(value: str) -> str:
    """A leg's purse kind as the rules name it ("cash", "subsidy", "voucher"), from either spelling."""
    return value.strip().lower().removeprefix("purse_kind_")


def plan_legs(plan: Plan) -> tuple[tuple[str, str, int], ...]:
    return tuple((leg.purse_kind, leg.ref, leg.amount_fen) for leg in plan.legs)


def leg_problem(*, planned: Sequence[tuple[str, str, int]], recorded: Sequence[tuple[str, str, int]]) -> str:
    """Why the record's legs are not the plan's: a purse the plan does not draw, or other amounts."""
    if {(kind, ref) for kind, ref, _ in recorded} - {(kind, ref) for kind, ref, _ in planned}:
        return PURSE_NOT_ALLOWED
    return PLAN_MISMATCH


def _offers(rule_set: RuleSet, keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """The counter keys of the benefits and of the coupons the request may use (rule names are
    unique across kinds; the name is a key's second part)."""
    benefits = {b.name for b in rule_set.benefits}
    coupons = {c.name for c in rule_set.coupons}
    named = [(key, key.split(":")[1]) for key in keys if key.startswith("cnt:")]
    return [k for k, name in named if name in benefits], [k for k, name in named if name in coupons]


def matching_plan(rule_set: RuleSet, request: Request, counters: Mapping[str, int],
                  recorded: Sequence[tuple[str, str, int]]) -> Plan | Refused:
    """The plan the rules make for the device's request on the hub's counters, when the record's
    legs are that plan's, or the plan with some still-usable benefits and coupons left unused (see
    the module docstring); else the refusal: the plan's decline, or the legs' problem."""
    first = evaluate(rule_set, request, counters)
    recorded = tuple(recorded)
    if first.approved and plan_legs(first) == recorded:
        return first
    benefits, coupons = _offers(rule_set, first.counter_keys_read)
    for benefit in (None, *benefits):
        for coupon in (None, *coupons):
            trial = dict(counters)
            for key in (*benefits, *coupons):
                if key not in (benefit, coupon):
                    trial[key] = _USED_UP
            plan = evaluate(rule_set, request, trial)
            if plan.approved and plan_legs(plan) == recorded:
                return plan
    if not first.approved:
        return Refused(first.reason)
    return Refused(leg_problem(planned=plan_legs(first), recorded=recorded))

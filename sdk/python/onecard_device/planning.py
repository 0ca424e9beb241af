"""How an offline payment is planned and counted: the one definition the offline engine and the
hub's settlement share, so the hub, re-running it on an uploaded record with what the device had,
decides as an honest device did (docs/devicehub.md §5).

Pure: no clock, no disk, no network. What a device knows offline, and so all the plan may use:

- the rule set of its policy bundle, evaluated on channel ``offline``;
- who pays: the member of the code, or of a card whose holder it learned online; a card it never
  saw counts as ``card:<UID>`` (its caps count on the card);
- no member groups (``{}``: rules for a group do not apply offline);
- one purse, cash (ref ``""``) of **unknown** balance: the evaluator draws the whole charge from it,
  and what the purse lacks at settlement goes to the member's receivable. Subsidies and vouchers
  are spent online only: a device that guessed a purse the member does not hold would make a
  record the ledger must reject;
- its own scene (first scene tag), merchant and device id, the price and the time;
- its own day counters (``off:cred…`` per member or card, ``off:dev…`` per device), which count
  every approved payment even with no cap set, so a cap set later still sees the day spent.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from onecard_codes import OfflineCaps
from onecard_policy import Plan, PurseState, Request

OFFLINE_CHANNEL = "offline"
OFFLINE_PURSES = (PurseState(kind="cash", ref="", available_fen=None),)
MAX_COUNTER_MEMBER_CHARS = 64


def counter_member(*, member_id: str, card_uid: str) -> str:
    """Whose counters an offline payment raises: the member, or ``card:<UID>`` for an unknown card."""
    return member_id or f"card:{card_uid}"[:MAX_COUNTER_MEMBER_CHARS]


def offline_request(*, tenant_id: str, counter_member: str, scene: str | None, merchant_id: str | None,
                    device_id: str | None, amount_fen: int, at: dt.datetime) -> Request:
    """The evaluator's request for an offline payment (see the module docstring for what it holds)."""
    return Request(tenant_id=tenant_id, member_id=counter_member, member_groups={}, scene=scene,
                   merchant_id=merchant_id or None, device_id=device_id or None, amount_fen=amount_fen, at=at,
                   channel=OFFLINE_CHANNEL, purses=OFFLINE_PURSES)


@dataclass(frozen=True, slots=True)
class DayKeys:
    """The offline day counters of one payment: the member's (or card's) and the device's."""

    amount: str
    count: str
    device_amount: str
    device_count: str


def day_keys(*, counter_member: str, device_id: str, service_date: str) -> DayKeys:
    """The keys the rule set's offline caps use too (docs/policy.md §4), for the plan's service date."""
    day = f"d:{service_date}"
    return DayKeys(amount=f"off:cred:m:{counter_member}:{day}", count=f"off:cred-n:m:{counter_member}:{day}",
                   device_amount=f"off:dev:{device_id}:{day}", device_count=f"off:dev-n:{device_id}:{day}")


def code_cap_refusal(caps: OfflineCaps, *, charged_fen: int, used_fen: int, used_count: int) -> str | None:
    """The credential's own caps, signed into the code, on what the member pays: per transaction
    (above refuses, equal passes), per day (used + charge above refuses), count (used + 1 above)."""
    if charged_fen > caps.per_transaction_fen:
        return "OFFLINE_LIMIT_EXCEEDED:code.per_transaction_fen"
    if used_fen + charged_fen > caps.per_day_fen:
        return "OFFLINE_LIMIT_EXCEEDED:code.per_day_fen"
    if used_count + 1 > caps.count_per_day:
        return "OFFLINE_LIMIT_EXCEEDED:code.count_per_day"
    return None


def code_cap_check(caps: OfflineCaps, plan: Plan, keys: DayKeys, counters: Mapping[str, int]) -> str | None:
    """``code_cap_refusal`` of an approved plan, on the day counters in ``counters``."""
    return code_cap_refusal(caps, charged_fen=plan.charged_fen, used_fen=counters.get(keys.amount, 0),
                            used_count=counters.get(keys.count, 0))


def increments(plan: Plan, keys: DayKeys) -> dict[str, int]:
    """What an approved offline payment adds to the counters: the plan's guards (benefits, coupons,
    limits) and the day counters, which always count (the plan's own offline-cap guards are those
    same day counters, counted once)."""
    raised: dict[str, int] = {}
    for guard in plan.guards:
        if not guard.counter_key.startswith("off:"):
            raised[guard.counter_key] = raised.get(guard.counter_key, 0) + guard.increment
    for key, increment in ((keys.amount, plan.charged_fen), (keys.count, 1),
                           (keys.device_amount, plan.charged_fen), (keys.device_count, 1)):
        if increment:
            raised[key] = raised.get(key, 0) + increment
    return raised

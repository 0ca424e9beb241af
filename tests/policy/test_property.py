"""Generated rule sets and requests against a plain reference model (11,000 requests in all).

Each Hypothesis example draws one rule set of a fixed shape (one canteen with two meal periods,
either of which may cross midnight; a time zone with odd offsets or daylight saving; a benefit, a
coupon, a voucher, a subsidy; per-payment, daily and per-meal-period limits; a PIN threshold and
offline caps) and a batch of requests, often at the exact local minute a period starts or ends,
at local midnight, and with counters at exactly cap - increment, cap - increment + 1. The
reference model below re-states docs/policy.md plainly for this shape; it shares no code with
``onecard_policy.evaluate``.
"""
from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onecard_policy import Guard, Leg, PurseState, Request, counter_keys, evaluate, parse_rule_set

REQUESTS_PER_EXAMPLE = 5
ONLINE_EXAMPLES = 1200
OFFLINE_EXAMPLES = 1000
# Minutes of pure CPU each: on a machine shared with other suites (or under xdist, two workers per
# core) they may need more than the session's 180 s hang guard.
CPU_BOUND_TIMEOUT = pytest.mark.timeout(600)
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ZONES = ["Asia/Shanghai", "UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham", "Pacific/Kiritimati",
         "America/St_Johns", "Europe/London"]
MEMBER = "m-0001"
DEVICE = "pos-1"
BASE_DAY = dt.date(2026, 11, 26)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@st.composite
def params(draw) -> dict[str, Any]:
    start1 = draw(st.integers(0, 1439))
    len1 = draw(st.integers(1, 700))
    gap = draw(st.integers(0, 1440 - len1 - 1))
    len2 = draw(st.integers(1, 1440 - len1 - gap))
    start2 = (start1 + len1 + gap) % 1440
    return {
        "zone": draw(st.sampled_from(ZONES)),
        "periods": [("early", start1, (start1 + len1) % 1440), ("late", start2, (start2 + len2) % 1440)],
        "closed": draw(st.sampled_from([False, False, True])),
        "per_payment": draw(st.one_of(st.integers(6000, 20000), st.integers(500, 20000))),
        "daily": draw(st.one_of(st.integers(8000, 30000), st.integers(1, 30000))),
        "meals": draw(st.integers(1, 3)),
        "benefit_cover": draw(st.one_of(st.none(), st.integers(1, 3000))),
        "coupon_min": draw(st.integers(2, 5000)),
        "coupon_off_ratio": draw(st.floats(0.01, 0.99)),
        "voucher_cover": draw(st.integers(1, 3000)),
        "subsidy_expires": BASE_DAY + dt.timedelta(days=draw(st.integers(-2, 2))),
        "order": draw(st.permutations(["voucher", "subsidy", "cash"])),
        "pin": draw(st.integers(0, 20000)),
        "off_tx": draw(st.integers(1, 20000)),
        "off_day": draw(st.integers(20000, 40000)),
        "off_count": draw(st.integers(1, 5)),
    }


def _doc(p: dict[str, Any]) -> dict[str, Any]:
    # the ends may be equal when the two periods are adjacent and together fill the day
    return {
        "format": 1, "time_zone": p["zone"],
        "scenes": [{"name": "canteen", "closed_outside_meal_periods": p["closed"]}],
        "merchants": [{"id": "canteen-1", "scenes": ["canteen"]}],
        "meal_periods": [{"name": n, "scene": "canteen", "start": _hhmm(s), "end": _hhmm(e)}
                         for n, s, e in p["periods"]],
        "benefits": [{"name": "free", "window": "meal_period", "max_uses": 1,
                      **({"cover_fen": p["benefit_cover"]} if p["benefit_cover"] is not None else {}),
                      "where": {"meal_periods": ["early"], "groups": {"role": "employee"}}}],
        "coupons": [{"name": "off", "min_spend_fen": p["coupon_min"],
                     "off_fen": max(1, int(p["coupon_min"] * p["coupon_off_ratio"])), "per_day": 1}],
        "vouchers": [{"name": "v", "purse_ref": "v-ref", "cover_fen": p["voucher_cover"], "per_day": 1,
                      "where": {"meal_periods": ["late"]}}],
        "subsidies": [{"name": "s", "purse_ref": "s-ref", "expires_on": p["subsidy_expires"].isoformat(),
                       "where": {"groups": {"role": ["student"]}}}],
        "limits": [
            {"name": "per-payment", "level": "tenant", "window": "transaction", "max": p["per_payment"]},
            {"name": "daily", "level": "tenant", "window": "day", "max": p["daily"]},
            {"name": "meals", "level": "group", "groups": {"role": ["student", "employee"]}, "window": "meal_period",
             "measure": "count", "max": p["meals"]},
        ],
        "funding_order": list(p["order"]),
        "pin": {"threshold_fen": p["pin"]},
        "offline": {"credential": {"per_transaction_fen": p["off_tx"], "per_day_fen": p["off_day"],
                                   "count_per_day": p["off_count"]}},
    }


# --- the reference model ------------------------------------------------------------------------

def _where_am_i(p, at: dt.datetime):
    """(meal period or None, the service date) by plain wall-clock arithmetic."""
    wall = at.astimezone(zoneinfo.ZoneInfo(p["zone"]))
    minute = wall.hour * 60 + wall.minute
    for name, start, end in p["periods"]:
        if start < end and start <= minute < end:
            return name, wall.date()
        if end <= start and minute >= start:
            return name, wall.date()
        if end <= start and minute < end:
            return name, wall.date() - dt.timedelta(days=1)
    return None, wall.date()


def reference(p, role: str, amount: int, at: dt.datetime, channel: str, purses: list[tuple[str, int | None]],
              counters: dict[str, int]) -> dict[str, Any]:
    period, day = _where_am_i(p, at)
    wall_date = at.astimezone(zoneinfo.ZoneInfo(p["zone"])).date()
    out: dict[str, Any] = {"approved": False, "legs": [], "guards": set(), "benefit": None, "coupon": None,
                           "discount": 0, "benefit_fen": 0, "charged": 0, "pin": False, "period": period}
    if period is None and p["closed"]:
        out["reason"] = "OUTSIDE_MEAL_PERIOD"
        return out
    guards = set()
    left = amount
    free_key = f"cnt:free:m:{MEMBER}:p:early:{day}"
    if role == "employee" and period == "early" and counters.get(free_key, 0) < 1:
        out["benefit"] = "free"
        out["benefit_fen"] = amount if p["benefit_cover"] is None else min(amount, p["benefit_cover"])
        left -= out["benefit_fen"]
        guards.add((free_key, 1, 1))
    coupon_key = f"cnt:off:m:{MEMBER}:d:{day}"
    off = max(1, int(p["coupon_min"] * p["coupon_off_ratio"]))
    if left > 0 and left >= p["coupon_min"] and counters.get(coupon_key, 0) < 1:
        out["coupon"], out["discount"] = "off", off
        left -= off
        guards.add((coupon_key, 1, 1))
    charged = left
    out["charged"] = charged
    if charged > p["per_payment"]:
        out["reason"] = "LIMIT_EXCEEDED:per-payment"
        return out
    daily_key = f"lim:daily:m:{MEMBER}:d:{day}"
    if charged > 0:
        if counters.get(daily_key, 0) + charged > p["daily"]:
            out["reason"] = "LIMIT_EXCEEDED:daily"
            return out
        guards.add((daily_key, charged, p["daily"]))
    if period is not None and role in ("student", "employee"):
        meals_key = f"lim:meals:m:{MEMBER}:p:{period}:{day}"
        if counters.get(meals_key, 0) + 1 > p["meals"]:
            out["reason"] = "LIMIT_EXCEEDED:meals"
            return out
        guards.add((meals_key, 1, p["meals"]))
    if channel == "offline":
        if charged > p["off_tx"]:
            out["reason"] = "OFFLINE_LIMIT_EXCEEDED:credential.per_transaction_fen"
            return out
        spent_key, count_key = f"off:cred:m:{MEMBER}:d:{day}", f"off:cred-n:m:{MEMBER}:d:{day}"
        if charged > 0:
            if counters.get(spent_key, 0) + charged > p["off_day"]:
                out["reason"] = "OFFLINE_LIMIT_EXCEEDED:credential.per_day_fen"
                return out
            guards.add((spent_key, charged, p["off_day"]))
        if counters.get(count_key, 0) + 1 > p["off_count"]:
            out["reason"] = "OFFLINE_LIMIT_EXCEEDED:credential.count_per_day"
            return out
        guards.add((count_key, 1, p["off_count"]))
    legs = []
    blocked = False
    for kind in p["order"]:
        for purse_kind, available in purses:
            if purse_kind != kind or left == 0 or available == 0:
                continue
            if kind == "voucher":
                voucher_key = f"cnt:v:m:{MEMBER}:d:{day}"
                if period != "late":
                    blocked = True
                    continue
                if counters.get(voucher_key, 0) >= 1 or any(leg[0] == "voucher" for leg in legs):
                    continue
                take = min(left, p["voucher_cover"], available if available is not None else left)
                guards.add((voucher_key, 1, 1))
            elif kind == "subsidy":
                if role != "student" or wall_date > p["subsidy_expires"]:
                    blocked = True
                    continue
                take = min(left, available) if available is not None else left
            else:
                take = min(left, available) if available is not None else left
            legs.append((kind, take))
            left -= take
    if left > 0:
        out["reason"] = "NOT_ALLOWED_HERE" if not legs and blocked else "INSUFFICIENT_FUNDS"
        return out
    out.update(approved=True, reason="APPROVED", legs=legs, guards=guards, pin=charged > p["pin"])
    return out


# --- the generated requests ---------------------------------------------------------------------

@st.composite
def instants(draw, p) -> dt.datetime:
    """Mostly a local wall-clock minute at an edge (a period's start or end, one minute either side,
    local midnight, 23:59), sometimes any UTC instant of the week."""
    zone = zoneinfo.ZoneInfo(p["zone"])
    day = BASE_DAY + dt.timedelta(days=draw(st.integers(-3, 3)))
    if draw(st.integers(0, 3)) == 0:
        seconds = draw(st.integers(0, 7 * 86400 - 1))
        return dt.datetime.combine(day, dt.time(), dt.timezone.utc) + dt.timedelta(seconds=seconds)
    edges = [0, 1439]
    for _, start, end in p["periods"]:
        edges += [start, end, (start - 1) % 1440, (end - 1) % 1440, (start + 1) % 1440]
    minute = draw(st.sampled_from(edges))
    second = draw(st.sampled_from([0, 59]))
    local = dt.datetime.combine(day, dt.time(minute // 60, minute % 60, second), zone)
    return local.astimezone(dt.timezone.utc)


def _purse_state(kind: str, available: int | None) -> PurseState:
    return PurseState(kind, {"voucher": "v-ref", "subsidy": "s-ref", "cash": "main"}[kind], available)


def _check_batch(data, channel: str) -> None:
    p = data.draw(params())
    rule_set = parse_rule_set(_doc(p))
    for _ in range(REQUESTS_PER_EXAMPLE):
        role = data.draw(st.sampled_from(["employee", "student", "visitor"]))
        amount = data.draw(st.one_of(st.integers(1, 6000), st.sampled_from(
            [p["per_payment"], p["per_payment"] + 1, p["coupon_min"], p["coupon_min"] - 1 or 1, p["off_tx"],
             p["off_tx"] + 1, p["daily"] or 1])))
        at = data.draw(instants(p))
        balance = (st.none() if channel == "offline"
                   else st.one_of(st.just(0), st.integers(1, 3000), st.integers(3000, 10000)))
        kinds = data.draw(st.lists(st.sampled_from(["voucher", "subsidy", "cash"]), min_size=1, max_size=3,
                                   unique=True))
        purses = [(kind, data.draw(balance)) for kind in kinds]
        req = Request(tenant_id="t-1", member_id=MEMBER, member_groups={"role": role}, scene=None,
                      merchant_id="canteen-1", device_id=None if channel == "online" else DEVICE,
                      amount_fen=amount, at=at, channel=channel,
                      purses=tuple(_purse_state(kind, available) for kind, available in purses))
        keys = counter_keys(rule_set, req)
        counters = {}
        for key in keys:
            # the offers' counts first (0 or used), then the amounts around their exact boundaries
            if key.startswith("cnt:"):
                counters[key] = data.draw(st.sampled_from([0, 0, 1]))
        charged = reference(p, role, amount, at, channel, purses, counters)["charged"]
        for key in keys:
            if key.startswith("cnt:"):
                continue
            cap = (p["daily"] if key.startswith("lim:daily") else p["meals"] if key.startswith("lim:meals")
                   else p["off_day"] if key.startswith("off:cred:") else p["off_count"])
            increment = 1 if key.startswith(("lim:meals", "off:cred-n")) else charged
            counters[key] = max(0, data.draw(st.sampled_from(
                [0, 0, 0, 0, 0, cap - increment, cap - increment + 1, cap - increment - 1, cap])))
        plan = evaluate(rule_set, req, counters)
        expected = reference(p, role, amount, at, channel, purses, counters)
        got = {"approved": plan.approved, "reason": plan.reason, "legs": [(leg.purse_kind, leg.amount_fen)
                                                                          for leg in plan.legs],
               "guards": {(g.counter_key, g.increment, g.limit) for g in plan.guards}, "benefit": plan.benefit,
               "coupon": plan.coupon, "discount": plan.discount_fen, "benefit_fen": plan.benefit_funding_fen,
               "charged": plan.charged_fen if plan.approved else expected["charged"], "pin": plan.pin_required,
               "period": plan.meal_period}
        if not plan.approved:
            for field in ("benefit", "coupon", "discount", "benefit_fen"):
                got[field] = expected[field]
        assert got == expected, (p, req, counters)
        if plan.approved:
            assert sum(leg.amount_fen for leg in plan.legs) == plan.charged_fen
            assert plan.charged_fen + plan.discount_fen + plan.benefit_funding_fen == amount
            assert all(isinstance(g, Guard) and g.increment >= 1 for g in plan.guards)
            assert all(isinstance(leg, Leg) and leg.amount_fen >= 1 for leg in plan.legs)
            assert {g.counter_key for g in plan.guards} <= set(keys)
            if channel == "online":
                assert len(plan.guards) <= 8


@CPU_BOUND_TIMEOUT
@settings(max_examples=ONLINE_EXAMPLES, **SETTINGS)
@given(st.data())
def test_online_plans_agree_with_the_reference_model(data) -> None:
    _check_batch(data, "online")


@CPU_BOUND_TIMEOUT
@settings(max_examples=OFFLINE_EXAMPLES, **SETTINGS)
@given(st.data())
def test_offline_plans_agree_with_the_reference_model(data) -> None:
    _check_batch(data, "offline")

"""The article's cases, meal periods across midnight, time-zone edges and exact limit boundaries,
on the university rule set (``onecard_policy.examples``)."""
from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from onecard_policy import Guard, Leg, PurseState, counter_keys, evaluate, parse_rule_set
from onecard_policy.examples import CAPPED_MEMBER_ID, university_rule_set
from tests.policy.conftest import EMPLOYEE, STUDENT, cash, local, request

UTC = dt.timezone.utc
EMPLOYEE_GROUPS = {"role": "employee"}


def _keys_and_plan(rule_set, req, counters=None):
    keys = counter_keys(rule_set, req)
    plan = evaluate(rule_set, req, counters or {})
    assert list(plan.counter_keys_read) == keys
    assert set(counters or {}) <= set(keys), "a test counter the evaluator would not read"
    return plan


# --- the article's cases -------------------------------------------------------------------------

def test_free_breakfast_for_an_employee_costs_nothing_and_the_tenant_pays(university) -> None:
    req = request(member_id=EMPLOYEE, groups=EMPLOYEE_GROUPS, amount_fen=650, at=local(7, 45))
    plan = _keys_and_plan(university, req)
    assert plan.approved and plan.reason == "APPROVED"
    assert plan.benefit == "free-breakfast" and plan.benefit_funding_fen == 650
    assert plan.charged_fen == 0 and plan.legs == ()
    key = f"cnt:free-breakfast:m:{EMPLOYEE}:p:breakfast:2026-11-26"
    assert Guard(key, 1, 1) in plan.guards
    assert plan.meal_period == "breakfast"


def test_free_breakfast_is_once_per_breakfast_the_second_is_paid_from_cash(university) -> None:
    key = f"cnt:free-breakfast:m:{EMPLOYEE}:p:breakfast:2026-11-26"
    req = request(member_id=EMPLOYEE, groups=EMPLOYEE_GROUPS, amount_fen=650, at=local(8, 10))
    plan = _keys_and_plan(university, req, {key: 1})
    assert plan.approved and plan.benefit is None and plan.benefit_funding_fen == 0
    assert plan.legs == (Leg("cash", "main", 650),) and plan.charged_fen == 650
    assert all(g.counter_key != key for g in plan.guards)
    # the next morning is a new breakfast
    next_day = _keys_and_plan(university, request(member_id=EMPLOYEE, groups=EMPLOYEE_GROUPS, amount_fen=650,
                                                  at=local(7, 0, day=dt.date(2026, 11, 27))), {})
    assert next_day.benefit == "free-breakfast"


def test_free_breakfast_is_for_employees_only(university) -> None:
    plan = _keys_and_plan(university, request(amount_fen=650, at=local(7, 45)))
    assert plan.approved and plan.benefit is None and plan.legs == (Leg("cash", "main", 650),)


def test_lunch_is_paid_from_cash(university) -> None:
    plan = _keys_and_plan(university, request(member_id=EMPLOYEE, groups=EMPLOYEE_GROUPS, amount_fen=1800,
                                              at=local(12, 5)))
    assert plan.approved and plan.meal_period == "lunch"
    assert plan.legs == (Leg("cash", "main", 1800),) and plan.charged_fen == 1800
    assert plan.benefit is None and plan.discount_fen == 0
    assert Guard(f"lim:daily-canteen:m:{EMPLOYEE}:d:2026-11-26", 1800, 10000) in plan.guards
    assert Guard(f"lim:meals-per-period:m:{EMPLOYEE}:p:lunch:2026-11-26", 1, 3) in plan.guards


def test_dinner_voucher_covers_part_and_cash_the_rest(university) -> None:
    purses = (PurseState("voucher", "dinner-voucher", 5000), cash())
    plan = _keys_and_plan(university, request(amount_fen=2300, at=local(18, 30), purses=purses))
    assert plan.approved
    assert plan.legs == (Leg("voucher", "dinner-voucher", 1500), Leg("cash", "main", 800))
    assert plan.charged_fen == 2300
    assert Guard(f"cnt:dinner-voucher:m:{STUDENT}:d:2026-11-26", 1, 1) in plan.guards


def test_dinner_voucher_is_once_a_day_and_only_at_dinner(university) -> None:
    purses = (PurseState("voucher", "dinner-voucher", 5000), cash())
    used = {f"cnt:dinner-voucher:m:{STUDENT}:d:2026-11-26": 1}
    second = _keys_and_plan(university, request(amount_fen=2300, at=local(19, 0), purses=purses), used)
    assert second.legs == (Leg("cash", "main", 2300),)
    lunch = _keys_and_plan(university, request(amount_fen=2300, at=local(12, 0), purses=purses))
    assert lunch.legs == (Leg("cash", "main", 2300),)


def test_gym_only_subsidy_pays_in_the_gym(university) -> None:
    purses = (PurseState("subsidy", "sports-2026", 10000),)
    plan = _keys_and_plan(university, request(merchant_id="gym-main", amount_fen=3000, at=local(19, 0),
                                              purses=purses))
    assert plan.approved and plan.scene == "gym" and plan.legs == (Leg("subsidy", "sports-2026", 3000),)


def test_gym_only_subsidy_is_refused_in_the_canteen(university) -> None:
    purses = (PurseState("subsidy", "sports-2026", 10000),)
    plan = _keys_and_plan(university, request(amount_fen=1200, at=local(12, 0), purses=purses))
    assert not plan.approved and plan.reason == "NOT_ALLOWED_HERE"
    assert plan.legs == () and plan.guards == ()
    # with cash too, the canteen takes the cash and leaves the sports money alone
    plan = _keys_and_plan(university, request(amount_fen=1200, at=local(12, 0), purses=purses + (cash(),)))
    assert plan.approved and plan.legs == (Leg("cash", "main", 1200),)


def test_milk_from_the_cabinet_on_the_nutrition_subsidy(university) -> None:
    purses = (cash(), PurseState("subsidy", "nutrition-2026", 6000))
    plan = _keys_and_plan(university, request(merchant_id="milk-cabinet", device_id="cabinet-1", amount_fen=350,
                                              at=local(15, 20), purses=purses))
    assert plan.approved and plan.scene == "vending"
    assert plan.legs == (Leg("subsidy", "nutrition-2026", 350),)
    store = _keys_and_plan(university, request(merchant_id="campus-store", amount_fen=350, at=local(15, 20),
                                               purses=purses))
    assert store.legs == (Leg("cash", "main", 350),)


def test_spend_20_get_3_off_coupon_in_the_store(university) -> None:
    plan = _keys_and_plan(university, request(merchant_id="campus-store", amount_fen=2500, at=local(16, 0)))
    assert plan.approved and plan.coupon == "store-20-off-3"
    assert plan.discount_fen == 300 and plan.charged_fen == 2200
    assert plan.legs == (Leg("cash", "main", 2200),)
    assert Guard(f"cnt:store-20-off-3:m:{STUDENT}:d:2026-11-26", 1, 1) in plan.guards


@pytest.mark.parametrize(("amount_fen", "used", "discount_fen"),
                         [(2000, 0, 300), (1999, 0, 0), (2500, 1, 0)])
def test_the_coupon_needs_the_minimum_spend_and_is_once_a_day(university, amount_fen, used, discount_fen) -> None:
    counters = {f"cnt:store-20-off-3:m:{STUDENT}:d:2026-11-26": used}
    plan = _keys_and_plan(university, request(merchant_id="campus-store", amount_fen=amount_fen, at=local(16, 0)),
                          counters)
    assert plan.discount_fen == discount_fen and plan.charged_fen == amount_fen - discount_fen


def test_funding_order_takes_the_subsidy_nearest_expiry_first() -> None:
    doc = university_rule_set()
    doc["subsidies"].append({"name": "canteen-late", "purse_ref": "canteen-dec", "expires_on": "2026-12-31",
                             "where": {"scenes": ["canteen"]}})
    doc["subsidies"].append({"name": "canteen-early", "purse_ref": "canteen-nov", "expires_on": "2026-11-30",
                             "where": {"scenes": ["canteen"]}})
    rule_set = parse_rule_set(doc)
    purses = (cash(), PurseState("subsidy", "canteen-dec", 5000), PurseState("subsidy", "canteen-nov", 700))
    plan = evaluate(rule_set, request(amount_fen=1000, purses=purses), {})
    assert plan.legs == (Leg("subsidy", "canteen-nov", 700), Leg("subsidy", "canteen-dec", 300))
    # an expired program is not spent: the day after its expiry the cash pays
    later = evaluate(rule_set, request(amount_fen=1000, purses=purses, at=local(12, 0, day=dt.date(2027, 1, 1))), {})
    assert later.legs == (Leg("cash", "main", 1000),)


def test_insufficient_funds_is_declined(university) -> None:
    plan = evaluate(university, request(amount_fen=1200, purses=(cash(1199),)), {})
    assert not plan.approved and plan.reason == "INSUFFICIENT_FUNDS" and plan.legs == ()


def test_pin_is_required_above_the_threshold_only(university) -> None:
    at_threshold = evaluate(university, request(merchant_id="campus-store", amount_fen=5000, at=local(16, 0),
                                                purses=(cash(),)), {f"cnt:store-20-off-3:m:{STUDENT}:d:2026-11-26": 1})
    above = evaluate(university, request(merchant_id="campus-store", amount_fen=5001, at=local(16, 0)),
                     {f"cnt:store-20-off-3:m:{STUDENT}:d:2026-11-26": 1})
    assert at_threshold.approved and not at_threshold.pin_required
    assert above.approved and above.pin_required


# --- meal periods across midnight and time-zone edges ---------------------------------------------

def test_night_snack_after_midnight_counts_on_the_day_it_started(university) -> None:
    plan = evaluate(university, request(amount_fen=900, at=local(0, 30, day=dt.date(2026, 11, 27))), {})
    assert plan.approved and plan.meal_period == "night-snack" and plan.service_date == "2026-11-26"
    keys = {g.counter_key for g in plan.guards}
    assert f"lim:meals-per-period:m:{STUDENT}:p:night-snack:2026-11-26" in keys
    assert f"lim:daily-canteen:m:{STUDENT}:d:2026-11-26" in keys


@pytest.mark.parametrize(("day", "hour", "minute", "period", "service_date"), [
    (dt.date(2026, 11, 26), 20, 59, None, None),
    (dt.date(2026, 11, 26), 21, 0, "night-snack", "2026-11-26"),
    (dt.date(2026, 11, 26), 23, 59, "night-snack", "2026-11-26"),
    (dt.date(2026, 11, 27), 0, 0, "night-snack", "2026-11-26"),
    (dt.date(2026, 11, 27), 0, 59, "night-snack", "2026-11-26"),
    (dt.date(2026, 11, 27), 1, 0, None, None),
    (dt.date(2026, 11, 27), 6, 30, "breakfast", "2026-11-27"),
    (dt.date(2026, 11, 27), 9, 29, "breakfast", "2026-11-27"),
    (dt.date(2026, 11, 27), 9, 30, None, None),
])
def test_meal_period_edges_are_start_inclusive_end_exclusive(university, day, hour, minute, period,
                                                             service_date) -> None:
    plan = evaluate(university, request(amount_fen=900, at=local(hour, minute, day=day)), {})
    assert plan.meal_period == period
    if period is None:
        assert plan.reason == "OUTSIDE_MEAL_PERIOD"  # the canteen sells only in its meal periods
    else:
        assert plan.approved and plan.service_date == service_date


def test_a_utc_instant_on_another_day_is_judged_in_the_tenants_time_zone(university) -> None:
    # 2026-11-25 23:10 UTC is 2026-11-26 07:10 in Shanghai: breakfast, on the 26th
    at = dt.datetime(2026, 11, 25, 23, 10, tzinfo=UTC)
    plan = evaluate(university, request(member_id=EMPLOYEE, groups=EMPLOYEE_GROUPS, amount_fen=500, at=at), {})
    assert plan.meal_period == "breakfast" and plan.service_date == "2026-11-26"
    assert plan.benefit == "free-breakfast"
    # 15:59 UTC is 23:59 local, 16:00 UTC is 00:00 local the next day: the same night snack
    before = evaluate(university, request(amount_fen=500, at=dt.datetime(2026, 11, 26, 15, 59, tzinfo=UTC)), {})
    after = evaluate(university, request(amount_fen=500, at=dt.datetime(2026, 11, 26, 16, 0, tzinfo=UTC)), {})
    assert before.service_date == after.service_date == "2026-11-26"
    assert before.guards == after.guards


def test_gym_daily_windows_roll_at_local_midnight(university) -> None:
    purses = (cash(),)
    before = evaluate(university, request(merchant_id="gym-main", amount_fen=500, purses=purses,
                                          at=dt.datetime(2026, 11, 26, 15, 59, tzinfo=UTC)), {})
    after = evaluate(university, request(merchant_id="gym-main", amount_fen=500, purses=purses,
                                         at=dt.datetime(2026, 11, 26, 16, 0, tzinfo=UTC)), {})
    assert before.guards == (Guard(f"lim:student-daily:m:{STUDENT}:d:2026-11-26", 500, 20000),)
    assert after.guards == (Guard(f"lim:student-daily:m:{STUDENT}:d:2026-11-27", 500, 20000),)


def test_a_time_zone_with_daylight_saving_uses_the_wall_clock() -> None:
    doc = university_rule_set()
    doc["time_zone"] = "America/New_York"
    rule_set = parse_rule_set(doc)
    new_york = zoneinfo.ZoneInfo("America/New_York")
    # 2026-11-01: clocks go back at 02:00; 11:59 UTC is 06:59 EST (no breakfast), 12:00 UTC 07:00 EST
    summer = evaluate(rule_set, request(amount_fen=500, at=dt.datetime(2026, 10, 31, 10, 30, tzinfo=UTC)), {})
    assert summer.meal_period == "breakfast"  # 06:30 EDT
    winter = evaluate(rule_set, request(amount_fen=500, at=dt.datetime(2026, 11, 2, 11, 30, tzinfo=UTC)), {})
    assert winter.meal_period == "breakfast"  # 06:30 EST
    early = evaluate(rule_set, request(amount_fen=500, at=dt.datetime(2026, 11, 2, 11, 29, tzinfo=UTC)), {})
    assert early.reason == "OUTSIDE_MEAL_PERIOD"
    assert evaluate(rule_set, request(amount_fen=500, at=dt.datetime(2026, 11, 2, 6, 30, tzinfo=new_york)), {}
                    ).meal_period == "breakfast"


def test_a_naive_time_is_a_programming_error(university) -> None:
    with pytest.raises(ValueError):
        evaluate(university, request(at=dt.datetime(2026, 11, 26, 12, 0)), {})


# --- exact limit boundaries ------------------------------------------------------------------------

@pytest.mark.parametrize(("spent_fen", "approved"), [(8800, True), (8801, False), (0, True)])
def test_daily_limit_equal_to_the_cap_passes_one_fen_over_declines(university, spent_fen, approved) -> None:
    key = f"lim:daily-canteen:m:{STUDENT}:d:2026-11-26"
    plan = evaluate(university, request(amount_fen=1200), {key: spent_fen})
    assert plan.approved is approved
    if approved:
        assert Guard(key, 1200, 10000) in plan.guards
    else:
        assert plan.reason == "LIMIT_EXCEEDED:daily-canteen" and plan.guards == ()


@pytest.mark.parametrize(("amount_fen", "approved"), [(10000, True), (10001, False)])
def test_per_payment_limit_boundary(university, amount_fen, approved) -> None:
    plan = evaluate(university, request(amount_fen=amount_fen), {})
    assert plan.approved is approved
    if not approved:
        assert plan.reason == "LIMIT_EXCEEDED:canteen-per-payment"


@pytest.mark.parametrize(("meals", "approved"), [(2, True), (3, False)])
def test_count_per_meal_period_boundary(university, meals, approved) -> None:
    key = f"lim:meals-per-period:m:{STUDENT}:p:lunch:2026-11-26"
    plan = evaluate(university, request(amount_fen=100), {key: meals})
    assert plan.approved is approved
    assert approved or plan.reason == "LIMIT_EXCEEDED:meals-per-period"


@pytest.mark.parametrize(("spent_fen", "approved"), [(1800, True), (1801, False)])
def test_a_guardians_daily_cap_on_one_child(university, spent_fen, approved) -> None:
    key = f"lim:guardian-daily-cap:m:{CAPPED_MEMBER_ID}:d:2026-11-26"
    req = request(member_id=CAPPED_MEMBER_ID, amount_fen=1200)
    assert key in counter_keys(university, req)
    plan = evaluate(university, req, {key: spent_fen})
    assert plan.approved is approved
    assert approved or plan.reason == "LIMIT_EXCEEDED:guardian-daily-cap"
    other = evaluate(university, request(amount_fen=1200), {})
    assert all("guardian" not in g.counter_key for g in other.guards)


def test_every_guard_fits_the_ledger(university) -> None:
    purses = (PurseState("voucher", "dinner-voucher", 5000), cash())
    plan = evaluate(university, request(amount_fen=2300, at=local(18, 30), purses=purses,
                                        member_id=CAPPED_MEMBER_ID), {})
    assert plan.approved and 1 <= len(plan.guards) <= 8
    for guard in plan.guards:
        assert 1 <= len(guard.counter_key) <= 200 and guard.counter_key.isprintable() and " " not in guard.counter_key
        assert guard.increment >= 1 and guard.limit >= 0
    assert len({g.counter_key for g in plan.guards}) == len(plan.guards)


# --- scenes, offline ---------------------------------------------------------------------------------

def test_scene_comes_from_the_device_or_merchant_and_must_match(university) -> None:
    assert evaluate(university, request(merchant_id=None, device_id="gym-gate-1", amount_fen=100), {}).scene == "gym"
    mismatch = evaluate(university, request(scene="gym", merchant_id="canteen-north"), {})
    assert mismatch.reason == "SCENE_MISMATCH"
    assert evaluate(university, request(scene="pool", merchant_id=None), {}).reason == "UNKNOWN_SCENE"
    assert evaluate(university, request(merchant_id="unknown-shop"), {}).reason == "UNKNOWN_SCENE"
    assert evaluate(university, request(amount_fen=0), {}).reason == "INVALID_AMOUNT"


def test_offline_with_unknown_balances_follows_the_funding_order_and_the_offline_caps(university) -> None:
    purses = (PurseState("voucher", "dinner-voucher", None), PurseState("cash", "main", None))
    req = request(amount_fen=2300, at=local(18, 30), purses=purses, channel="offline", device_id="pos-north-1")
    keys = counter_keys(university, req)
    plan = evaluate(university, req, {})
    assert plan.approved and plan.legs == (Leg("voucher", "dinner-voucher", 1500), Leg("cash", "main", 800))
    assert f"off:cred:m:{STUDENT}:d:2026-11-26" in keys
    assert Guard(f"off:cred:m:{STUDENT}:d:2026-11-26", 2300, 20000) in plan.guards
    assert Guard(f"off:cred-n:m:{STUDENT}:d:2026-11-26", 1, 20) in plan.guards
    assert Guard("off:dev:pos-north-1:d:2026-11-26", 2300, 2000000) in plan.guards
    over = evaluate(university, request(amount_fen=3001, at=local(18, 30), purses=purses, channel="offline",
                                        device_id="pos-north-1"), {})
    assert over.reason == "OFFLINE_LIMIT_EXCEEDED:credential.per_transaction_fen"
    full_day = evaluate(university, req, {f"off:cred:m:{STUDENT}:d:2026-11-26": 17701})
    assert full_day.reason == "OFFLINE_LIMIT_EXCEEDED:credential.per_day_fen"
    online = evaluate(university, request(amount_fen=3001, at=local(18, 30), purses=(cash(),)), {})
    assert online.approved

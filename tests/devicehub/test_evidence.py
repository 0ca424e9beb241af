"""The checks of services.devicehub.evidence alone (no I/O): a record's window from the device's
hellos, the bundle versions it may name, and the plan its legs must be, with the one tolerance an
honest device needs (offers it used on records the hub has not seen)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from onecard_device import planning
from onecard_policy import counter_keys, evaluate, parse_rule_set

from services.devicehub import evidence
from services.devicehub.evidence import InForce, Mark, Refused

T0 = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
SKEW = timedelta(seconds=30)
AGE = timedelta(days=7)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_record_lies_between_the_hello_before_its_sequence_and_the_next() -> None:
    marks = [Mark(at(0), 0, 1), Mark(at(10), 5, 1), Mark(at(20), 5, 2), Mark(at(30), 9, 2)]
    upload = at(40)

    def window(sequence: int) -> tuple:
        found = evidence.window(marks, sequence=sequence, upload_at=upload, skew=SKEW, max_age=AGE)
        return None if found is None else (found.earliest, found.latest, found.bundle_version)

    # Issued after the first hello, reported by the second.
    assert window(3) == (at(0) - SKEW, at(10) + SKEW, 1)
    # Issued after the third hello (the second and third reported 5), reported by the fourth.
    assert window(6) == (at(20) - SKEW, at(30) + SKEW, 2)
    # Issued after the last hello: until the upload.
    assert window(10) == (at(30) - SKEW, upload + SKEW, 2)
    # A device that said "none issued" at its first hello issued nothing before it.
    assert evidence.window([Mark(at(0), 4)], sequence=3, upload_at=upload, skew=SKEW, max_age=AGE) is None
    assert evidence.time_problem(at(5), None) == "EVENT_TIME_TOO_EARLY"
    found = evidence.window(marks, sequence=3, upload_at=upload, skew=SKEW, max_age=AGE)
    assert [evidence.time_problem(t, found) for t in (at(-1), at(0) - SKEW, at(10) + SKEW, at(11))] == [
        "EVENT_TIME_TOO_EARLY", "", "", "EVENT_TIME_TOO_LATE"]
    # Never older than the hub keeps counters for, whatever the hellos say.
    old = evidence.window([Mark(at(0) - timedelta(days=30), 0)], sequence=1, upload_at=upload, skew=SKEW,
                          max_age=AGE)
    assert old is not None and old.earliest == upload - AGE


def test_a_bundle_version_must_be_one_the_device_could_have_held() -> None:
    spans = [InForce(1, at(-60), at(15)), InForce(2, at(15), at(50)), InForce(3, at(50), None)]
    window = evidence.Window(earliest=at(10), latest=at(60), bundle_version=1)

    def held(version: int, minutes: float) -> bool:
        return evidence.bundle_held(version, found=window, event_time=at(minutes), spans=spans)

    assert held(1, 40) and held(2, 40)  # in force at the window's start / since then
    assert not held(3, 40)  # published after the record
    assert held(3, 55)
    assert not held(7, 55) and not held(0, 55)
    # The version the hub last sent the device before the window: held even if replaced by then.
    late = evidence.Window(earliest=at(20), latest=at(60), bundle_version=1)
    assert evidence.bundle_held(1, found=late, event_time=at(30), spans=spans)
    assert not evidence.bundle_held(1, found=evidence.Window(at(20), at(60), 2), event_time=at(30), spans=spans)


STORE = parse_rule_set({
    "format": 1, "time_zone": "Asia/Shanghai", "scenes": ["store"], "funding_order": ["cash"],
    "coupons": [{"name": "big-off", "min_spend_fen": 2000, "off_fen": 500},
                {"name": "small-off", "min_spend_fen": 1000, "off_fen": 100}],
    "benefits": [{"name": "free-drink", "window": "day", "max_uses": 1, "cover_fen": 300}],
    "offline": {"credential": {"per_day_fen": 10_000}}})


def request(amount_fen: int):  # noqa: ANN201
    return planning.offline_request(tenant_id="t", counter_member="m-1", scene="store", merchant_id=None,
                                    device_id="pos-1", amount_fen=amount_fen, at=at(30))


def legs(plan) -> list[tuple[str, str, int]]:  # noqa: ANN001
    return list(evidence.plan_legs(plan))


def test_the_record_must_be_the_plan_or_one_with_offers_the_device_had_used_elsewhere() -> None:
    fresh = evaluate(STORE, request(3000), {})
    assert (fresh.benefit, fresh.coupon, legs(fresh)) == ("free-drink", "big-off", [("cash", "", 2200)])
    assert evidence.matching_plan(STORE, request(3000), {}, legs(fresh)) == fresh
    # The device may have used the drink or a coupon today on records the hub has not seen: each
    # plan it could then have made is believed, with the offers it did use counted.
    for charged, benefit, coupon in ((2600, "free-drink", "small-off"), (2700, "free-drink", None),
                                     (2500, None, "big-off"), (2900, None, "small-off"), (3000, None, None)):
        plan = evidence.matching_plan(STORE, request(3000), {}, [("cash", "", charged)])
        assert (plan.benefit, plan.coupon, plan.charged_fen) == (benefit, coupon, charged)
        assert sorted(g.counter_key.split(":")[1] for g in plan.guards if g.counter_key.startswith("cnt:")) == sorted(
            name for name in (benefit, coupon) if name)
    # What no plan makes: a discount the rules never give, another purse, an offer already used up.
    assert evidence.matching_plan(STORE, request(3000), {}, [("cash", "", 1000)]) == Refused("PLAN_MISMATCH")
    assert evidence.matching_plan(STORE, request(3000), {}, [("subsidy", "meal", 2200)]) == Refused(
        "PURSE_NOT_ALLOWED")
    used = {k: 1 for k in counter_keys(STORE, request(3000)) if k.startswith("cnt:")}
    assert evidence.matching_plan(STORE, request(3000), used, legs(fresh)) == Refused("PLAN_MISMATCH")
    # A cap the hub's counters already reach refuses, as the device would have.
    day = planning.day_keys(counter_member="m-1", device_id="pos-1", service_date="2026-12-03")
    assert evidence.matching_plan(STORE, request(3000), {day.amount: 9_000}, legs(fresh)) == Refused(
        "OFFLINE_LIMIT_EXCEEDED:credential.per_day_fen")


def test_the_directory_refuses_in_order() -> None:
    def problem(**fields) -> str:  # noqa: ANN003
        values = {"found": True, "member_id": "m", "status": "active", "card_lost": False, "by_card": True,
                  "named_member": ""} | fields
        return evidence.directory_problem(**values)

    assert problem() == "" and problem(named_member="m") == ""
    assert problem(found=False) == "UNKNOWN_CARD" and problem(found=False, by_card=False) == "MEMBER_UNKNOWN"
    assert problem(card_lost=True, status="frozen") == "CARD_LOST"
    assert problem(named_member="other", status="left") == "MEMBER_MISMATCH"
    assert problem(status="left") == "MEMBER_LEFT" and problem(status="frozen") == "MEMBER_FROZEN"

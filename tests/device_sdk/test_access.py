"""Access rules: the parser refuses what it cannot mean (naming the rule), and the decision is the
same as a brute-force reference over every minute of the week."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onecard_device.access import (
    GROUP_NOT_ALLOWED,
    NO_RULE,
    OUTSIDE_WINDOW,
    PASS,
    AccessRulesError,
    decide_access,
    empty_rules,
    parse_access_rules,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def doc(*rules: dict, time_zone: str = "Asia/Shanghai") -> str:
    return json.dumps({"time_zone": time_zone, "rules": list(rules)})


def rule(name: str = "r", **fields) -> dict:  # noqa: ANN003
    base = {"name": name, "places": ["gate-1"], "purposes": ["access"], "from": "06:00", "to": "23:30"}
    base.update(fields)
    return base


def at(text: str, zone: ZoneInfo = SHANGHAI) -> datetime:
    """A local wall-clock time in ``zone``, as the aware UTC instant a device would send."""
    return datetime.fromisoformat(text).replace(tzinfo=zone).astimezone(UTC)


def decide(rules, when: str, *, location: str = "gate-1", purpose: str = "access", groups=None,  # noqa: ANN001
           offline: bool = False):
    return decide_access(rules, location=location, purpose=purpose, member_groups=groups, when=at(when),
                         offline=offline)


# --- deciding ------------------------------------------------------------------------------------


def test_window_bounds_are_inclusive_then_exclusive() -> None:
    rules = parse_access_rules(doc(rule()))
    assert decide(rules, "2026-11-26 05:59:59") == (False, OUTSIDE_WINDOW, "")
    assert decide(rules, "2026-11-26 06:00:00") == (True, PASS, "r")
    assert decide(rules, "2026-11-26 23:29:59").passed
    assert decide(rules, "2026-11-26 23:30:00").reason == OUTSIDE_WINDOW


def test_no_rule_for_another_place_or_purpose_and_none_without_rules() -> None:
    rules = parse_access_rules(doc(rule()))
    assert decide(rules, "2026-11-26 12:00", location="gate-2").reason == NO_RULE
    assert decide(rules, "2026-11-26 12:00", purpose="ride").reason == NO_RULE
    assert decide(empty_rules(), "2026-11-26 12:00").reason == NO_RULE


def test_window_crossing_midnight_belongs_to_the_weekday_it_starts_on() -> None:
    # Friday 22:00 to Saturday 02:00 only (2026-11-27 is a Friday).
    rules = parse_access_rules(doc(rule("late", weekdays=[5], **{"from": "22:00", "to": "02:00"})))
    assert decide(rules, "2026-11-27 21:59").reason == OUTSIDE_WINDOW
    assert decide(rules, "2026-11-27 22:00").passed
    assert decide(rules, "2026-11-27 23:59:59").passed
    assert decide(rules, "2026-11-28 00:00").passed
    assert decide(rules, "2026-11-28 01:59").passed
    assert not decide(rules, "2026-11-28 02:00").passed
    assert not decide(rules, "2026-11-28 22:30").passed  # Saturday night: not listed
    assert not decide(rules, "2026-11-27 01:00").passed  # Friday early: Thursday's window


def test_whole_day_and_to_midnight() -> None:
    rules = parse_access_rules(doc(rule("all", **{"from": "00:00", "to": "24:00"})))
    for hour in range(24):
        assert decide(rules, f"2026-11-26 {hour:02d}:17").passed
    evening = parse_access_rules(doc(rule("eve", **{"from": "18:00", "to": "24:00"})))
    assert decide(evening, "2026-11-26 23:59:59").passed
    assert not decide(evening, "2026-11-27 00:00").passed


def test_the_document_zone_not_utc_decides() -> None:
    rules = parse_access_rules(doc(rule()))
    # 22:00 UTC is 06:00 the next day in Shanghai.
    assert decide_access(rules, location="gate-1", purpose="access", member_groups=None,
                         when=datetime(2026, 11, 26, 22, 0, tzinfo=UTC), offline=False).passed
    assert not decide_access(rules, location="gate-1", purpose="access", member_groups=None,
                             when=datetime(2026, 11, 26, 21, 59, tzinfo=UTC), offline=False).passed
    with pytest.raises(ValueError):
        decide_access(rules, location="gate-1", purpose="access", member_groups=None,
                      when=datetime(2026, 11, 26, 12, 0), offline=False)


def test_daylight_saving_zone_uses_the_wall_clock() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    rules = parse_access_rules(doc(rule(**{"from": "08:00", "to": "09:00"}), time_zone="Europe/Berlin"))
    for day in ("2026-03-28", "2026-03-29", "2026-10-25", "2026-10-26"):  # around both changes
        when = at(f"{day} 08:30", berlin)
        assert decide_access(rules, location="gate-1", purpose="access", member_groups=None, when=when,
                             offline=False).passed, day
        early = at(f"{day} 07:59", berlin)
        assert not decide_access(rules, location="gate-1", purpose="access", member_groups=None, when=early,
                                 offline=False).passed, day


def test_groups_must_all_match_one_of_their_values() -> None:
    rules = parse_access_rules(doc(rule("lab", groups={"role": ["student", "staff"], "department": ["physics"]})))
    assert decide(rules, "2026-11-26 12:00", groups={"role": "staff", "department": "physics"}) == (True, PASS, "lab")
    assert decide(rules, "2026-11-26 12:00", groups={"role": "student", "department": "math"}).reason \
        == GROUP_NOT_ALLOWED
    assert decide(rules, "2026-11-26 12:00", groups={"role": "student"}).reason == GROUP_NOT_ALLOWED
    assert decide(rules, "2026-11-26 12:00", groups=None).reason == GROUP_NOT_ALLOWED
    # The right group at the wrong time is a window refusal.
    assert decide(rules, "2026-11-26 03:00", groups={"role": "staff", "department": "physics"}).reason \
        == OUTSIDE_WINDOW


def test_offline_group_rules_match_only_when_they_say_so() -> None:
    strict = parse_access_rules(doc(rule("strict", groups={"role": ["student"]})))
    assert decide(strict, "2026-11-26 12:00", groups={"role": "student"}).passed
    assert decide(strict, "2026-11-26 12:00", offline=True).reason == GROUP_NOT_ALLOWED
    lenient = parse_access_rules(doc(rule("lenient", groups={"role": ["student"]}, offline=True)))
    assert decide(lenient, "2026-11-26 12:00", offline=True) == (True, PASS, "lenient")
    assert decide(lenient, "2026-11-26 03:00", offline=True).reason == OUTSIDE_WINDOW
    open_rule = parse_access_rules(doc(rule("open")))
    assert decide(open_rule, "2026-11-26 12:00", offline=True).passed


def test_first_passing_rule_in_document_order_is_named() -> None:
    rules = parse_access_rules(doc(
        rule("staff-any", groups={"role": ["staff"]}, **{"from": "00:00", "to": "24:00"}),
        rule("day", **{"from": "08:00", "to": "18:00"}),
        rule("also-day", **{"from": "07:00", "to": "19:00"}),
    ))
    assert decide(rules, "2026-11-26 12:00", groups={"role": "student"}).rule == "day"
    assert decide(rules, "2026-11-26 12:00", groups={"role": "staff"}).rule == "staff-any"
    assert decide(rules, "2026-11-26 07:30", groups={"role": "student"}).rule == "also-day"
    assert decide(rules, "2026-11-26 20:00", groups={"role": "student"}).reason == OUTSIDE_WINDOW


def test_ride_purpose_and_several_places() -> None:
    rules = parse_access_rules(doc(rule("bus", places=["line-1", "line-2"], purposes=["ride"])))
    assert decide(rules, "2026-11-26 12:00", location="line-2", purpose="ride").passed
    assert decide(rules, "2026-11-26 12:00", location="line-2", purpose="RIDE").passed
    assert decide(rules, "2026-11-26 12:00", location="line-2", purpose="access").reason == NO_RULE


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "named"), [
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "6:00", "to": "23:30"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "24:01"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "24:00", "to": "02:00"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "06:00"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00"}, "x"),
    ({"name": "x", "places": [], "purposes": ["access"], "from": "06:00", "to": "07:00"}, "x"),
    ({"name": "x", "purposes": ["access"], "from": "06:00", "to": "07:00"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["fly"], "from": "06:00", "to": "07:00"}, "x"),
    ({"name": "x", "places": ["g"], "from": "06:00", "to": "07:00"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00", "weekdays": [0]}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00", "weekdays": [1, 1]},
     "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00", "weekdays": [True]},
     "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00", "groups": ["role"]},
     "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00",
      "groups": {"role": []}}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00", "offline": "yes"}, "x"),
    ({"name": "x", "places": ["g"], "purposes": ["access"], "form": "06:00", "to": "07:00"}, "x"),
    ({"name": "", "places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00"}, ""),
    ({"places": ["g"], "purposes": ["access"], "from": "06:00", "to": "07:00"}, ""),
    ("not an object", ""),
])
def test_invalid_rules_are_refused_with_the_rule_named(bad, named: str) -> None:  # noqa: ANN001
    with pytest.raises(AccessRulesError) as info:
        parse_access_rules(doc(bad))
    assert info.value.reason == "ACCESS_RULES_INVALID"
    assert info.value.rule == named


@pytest.mark.parametrize("text", [
    "", "[]", "{", '{"rules": {}}', '{"time_zone": "Mars/Olympus", "rules": []}', '{"time_zone": 8, "rules": []}',
    '{"rules": [], "extra": 1}', "x" * 1_000_001, b"\xff",
])
def test_invalid_documents_are_refused_naming_no_rule(text) -> None:  # noqa: ANN001
    with pytest.raises(AccessRulesError) as info:
        parse_access_rules(text)
    assert info.value.rule == ""


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(AccessRulesError) as info:
        parse_access_rules(doc(rule("a"), rule("a")))
    assert info.value.rule == "a"


def test_defaults_and_canonical_json() -> None:
    rules = parse_access_rules('{"rules": [{"name": "r", "places": "gate-1", "purposes": ["access"],'
                               ' "groups": {"role": "student"}, "from": "06:00", "to": "07:00"}]}')
    assert rules.time_zone == "Asia/Shanghai"
    only = rules.rules[0]
    assert only.places == {"gate-1"} and only.groups == {"role": {"student"}} and not only.offline
    assert not only.weekdays
    again = parse_access_rules(rules.canonical_json())
    assert again.canonical_json() == rules.canonical_json()
    assert rules.canonical_json().startswith('{"rules":[{')


# --- against a brute-force reference -------------------------------------------------------------


def reference_allowed_minutes(spec: dict) -> set[tuple[int, int]]:
    """Every (ISO weekday, minute of day) the rule's window covers, by walking it minute by minute."""
    start = int(spec["from"][:2]) * 60 + int(spec["from"][3:])
    end = int(spec["to"][:2]) * 60 + int(spec["to"][3:])
    if end <= start:
        end += 24 * 60
    covered = set()
    for day in spec.get("weekdays") or range(1, 8):
        for minute in range(start, end):
            covered.add(((day - 1 + minute // 1440) % 7 + 1, minute % 1440))
    return covered


def reference(specs: list[dict], *, location: str, groups: dict | None, offline: bool, local: datetime) -> tuple:
    mine = [s for s in specs if location in s["places"]]
    if not mine:
        return (False, NO_RULE, "")
    key = (local.isoweekday(), local.hour * 60 + local.minute)
    admitted = False
    for spec in mine:
        wanted = spec.get("groups") or {}
        if wanted:
            if offline and not spec.get("offline", False):
                continue
            if not offline and not all((groups or {}).get(k) in v for k, v in wanted.items()):
                continue
        admitted = True
        if key in reference_allowed_minutes(spec):
            return (True, PASS, spec["name"])
    return (False, OUTSIDE_WINDOW if admitted else GROUP_NOT_ALLOWED, "")


times = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 1, 15, 29, 30, 59]))
specs = st.builds(
    lambda places, weekdays, groups, start, end, offline: {
        "places": places, "purposes": ["access"], "weekdays": weekdays, "groups": groups,
        "from": start, "to": end, "offline": offline},
    places=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True),
    weekdays=st.lists(st.integers(1, 7), max_size=3, unique=True),
    groups=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["role", "grade"]),
                                                   st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2,
                                                            unique=True), min_size=1, max_size=2)),
    start=times, end=times, offline=st.booleans(),
).filter(lambda s: s["from"] != s["to"])


@settings(max_examples=300, deadline=None)
@given(rule_specs=st.lists(specs, min_size=0, max_size=4),
       location=st.sampled_from(["a", "b", "c"]),
       groups=st.one_of(st.none(), st.fixed_dictionaries({"role": st.sampled_from(["x", "y", "z"])},
                                                          optional={"grade": st.sampled_from(["x", "y"])})),
       offline=st.booleans(),
       minute_of_week=st.integers(0, 7 * 24 * 60 - 1), second=st.integers(0, 59))
def test_decision_matches_the_reference(rule_specs, location, groups, offline, minute_of_week,  # noqa: ANN001
                                       second) -> None:
    named = [{**s, "name": f"r{i}"} for i, s in enumerate(rule_specs)]
    rules = parse_access_rules(doc(*named))
    monday = datetime(2026, 11, 23, tzinfo=SHANGHAI)  # a Monday
    local = monday + timedelta(minutes=minute_of_week, seconds=second)
    got = decide_access(rules, location=location, purpose="access", member_groups=groups,
                        when=local.astimezone(UTC), offline=offline)
    assert tuple(got) == reference(
        named, location=location, groups=groups, offline=offline, local=local)

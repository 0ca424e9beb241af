"""Rule sets are validated on parse: each inconsistent one is refused with its reason and the rule
it names; the valid one parses and its canonical form is stable."""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from onecard_policy import RuleSetError, canonical_json, parse_rule_set
from onecard_policy.examples import CAPPED_MEMBER_ID, university_rule_set

Doc = dict[str, Any]


def _by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item.get("name") == name)


def _set(path: Callable[[Doc], dict[str, Any]], key: str, value: Any) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        path(doc)[key] = value
    return change


def _append(section: str, item: Any) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        doc.setdefault(section, []).append(item)
    return change


def _many_limits(doc: Doc) -> None:
    for i in range(3):
        doc["limits"].append({"name": f"extra-{i}", "level": "tenant", "window": "day", "max": 100})


def _drop(key: str) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        del doc[key]
    return change


_voucher = lambda doc: _by_name(doc["vouchers"], "dinner-voucher")  # noqa: E731
_subsidy = lambda doc: _by_name(doc["subsidies"], "sports-subsidy")  # noqa: E731
_period = lambda doc: _by_name(doc["meal_periods"], "lunch")  # noqa: E731
_limit = lambda doc: _by_name(doc["limits"], "daily-canteen")  # noqa: E731
_coupon = lambda doc: _by_name(doc["coupons"], "store-20-off-3")  # noqa: E731

INVALID = [
    ("unknown meal period in a voucher", _set(_voucher, "where", {"meal_periods": ["supper"]}),
     "UNKNOWN_MEAL_PERIOD", "vouchers[dinner-voucher].where.meal_periods"),
    ("unknown scene in a subsidy", _set(_subsidy, "where", {"scenes": ["pool"]}),
     "UNKNOWN_SCENE", "subsidies[sports-subsidy].where.scenes"),
    ("unknown scene of a meal period", _set(_period, "scene", "cafe"),
     "UNKNOWN_SCENE", "meal_periods[lunch].scene"),
    ("overlapping meal periods in one scene", _set(_period, "end", "17:30"),
     "OVERLAPPING_MEAL_PERIODS", "meal_periods[dinner]"),
    ("a period across midnight overlapping the morning",
     _append("meal_periods", {"name": "early-bird", "scene": "canteen", "start": "00:30", "end": "02:00"}),
     "OVERLAPPING_MEAL_PERIODS", "meal_periods[early-bird]"),
    ("a duplicate rule name across kinds",
     _append("coupons", {"name": "dinner-voucher", "min_spend_fen": 1000, "off_fen": 100}),
     "DUPLICATE_NAME", "coupons[dinner-voucher]"),
    ("a duplicate meal period", _append("meal_periods", {"name": "lunch", "scene": "gym", "start": "11:00",
                                                          "end": "12:00"}),
     "DUPLICATE_NAME", "meal_periods[lunch]"),
    ("a negative amount", _set(_voucher, "cover_fen", -100), "INVALID_AMOUNT", "vouchers[dinner-voucher].cover_fen"),
    ("a float amount", _set(_limit, "max", 50.5), "INVALID_AMOUNT", "limits[daily-canteen].max"),
    ("a coupon discount not below its minimum", _set(_coupon, "off_fen", 2000),
     "INVALID_AMOUNT", "coupons[store-20-off-3].off_fen"),
    ("a time out of range", _set(_period, "start", "24:00"), "INVALID_TIME", "meal_periods[lunch].start"),
    ("a time without a leading zero", _set(_period, "start", "9:00"), "INVALID_TIME", "meal_periods[lunch].start"),
    ("a period of zero length", _set(_period, "end", "11:00"), "INVALID_TIME", "meal_periods[lunch].end"),
    ("an unknown time zone", _set(lambda d: d, "time_zone", "Mars/Olympus_Mons"), "INVALID_TIME_ZONE", "time_zone"),
    ("a path as a time zone", _set(lambda d: d, "time_zone", "../../etc/passwd"), "INVALID_TIME_ZONE", "time_zone"),
    ("an unknown purse kind in the funding order", _set(lambda d: d, "funding_order", ["voucher", "points", "cash"]),
     "UNKNOWN_PURSE", "funding_order"),
    ("a purse kind twice", _set(lambda d: d, "funding_order", ["cash", "subsidy", "voucher", "cash"]),
     "TOO_MANY_RULES", "funding_order"),
    ("a repeated purse kind", _set(lambda d: d, "funding_order", ["cash", "cash"]),
     "INVALID_FUNDING_ORDER", "funding_order"),
    ("subsidies that can never be spent", _set(lambda d: d, "funding_order", ["voucher", "cash"]),
     "INVALID_FUNDING_ORDER", "subsidies[sports-subsidy]"),
    ("an empty funding order", _set(lambda d: d, "funding_order", []), "INVALID_FUNDING_ORDER", "funding_order"),
    ("a subsidy purse twice", _append("subsidies", {"name": "sports-2", "purse_ref": "sports-2026"}),
     "DUPLICATE_PURSE", "subsidies[sports-2].purse_ref"),
    ("a meal period of another scene than the rule's",
     _set(_subsidy, "where", {"scenes": ["gym"], "meal_periods": ["lunch"]}),
     "INCONSISTENT_WHERE", "subsidies[sports-subsidy].where.meal_periods"),
    ("a merchant outside the rule's scenes",
     _set(_subsidy, "where", {"scenes": ["gym"], "merchants": ["milk-cabinet"]}),
     "INCONSISTENT_WHERE", "subsidies[sports-subsidy].where.merchants"),
    ("an unknown merchant", _set(_subsidy, "where", {"merchants": ["bakery"]}),
     "UNKNOWN_MERCHANT", "subsidies[sports-subsidy].where.merchants"),
    ("a device of an unknown merchant", _append("devices", {"id": "pos-x", "merchant": "bakery"}),
     "UNKNOWN_MERCHANT", "devices[pos-x].merchant"),
    ("an unknown field (a typo)", _set(_voucher, "cover", 1500), "UNKNOWN_FIELD", "vouchers[0].cover"),
    ("a missing field", _drop("time_zone"), "MISSING_FIELD", "time_zone"),
    ("an invalid name", _set(_voucher, "name", "Dinner Voucher"), "INVALID_NAME", "vouchers[0].name"),
    ("a per-transaction count", lambda doc: _limit(doc).update(window="transaction", measure="count"),
     "INVALID_WINDOW", "limits[daily-canteen].window"),
    ("a group limit without groups", _append("limits", {"name": "g", "level": "group", "window": "day", "max": 1}),
     "MISSING_FIELD", "limits[g].groups"),
    ("a member limit without a member", _append("limits", {"name": "k", "level": "member", "window": "day",
                                                             "max": 1}),
     "MISSING_FIELD", "limits[k].member_id"),
    ("an unknown level", _set(_limit, "level", "planet"), "INVALID_LEVEL", "limits[daily-canteen].level"),
    ("more counted limits in one scene than the ledger's guards", _many_limits, "TOO_MANY_LIMITS", "scenes[canteen]"),
    ("a benefit per meal period without meal periods",
     _append("benefits", {"name": "free-coffee", "window": "meal_period"}),
     "INVALID_WINDOW", "benefits[free-coffee].where.meal_periods"),
    ("a bad expiry date", _set(_subsidy, "expires_on", "2026-02-30"),
     "INVALID_DATE", "subsidies[sports-subsidy].expires_on"),
    ("a bad grant schedule", _set(_subsidy, "grant", {"amount_fen": 10000, "every": "fortnight"}),
     "INVALID_SCHEDULE", "subsidies[sports-subsidy].grant.every"),
    ("an offline per-transaction cap above the daily cap",
     _set(lambda d: d["offline"], "credential", {"per_transaction_fen": 30000, "per_day_fen": 20000}),
     "INVALID_AMOUNT", "offline.credential.per_transaction_fen"),
    ("a closed scene without meal periods", _set(lambda d: d, "scenes", [{"name": "canteen"}, {"name": "gym",
     "closed_outside_meal_periods": True}, "shuttle", "store", "vending", "gate"]),
     "INCONSISTENT_SCENES", "scenes[gym].closed_outside_meal_periods"),
    ("another format", _set(lambda d: d, "format", 2), "UNSUPPORTED_FORMAT", "format"),
]


@pytest.mark.parametrize(("change", "reason", "rule"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_an_invalid_rule_set_is_refused_with_its_reason_and_rule(change, reason, rule) -> None:
    doc = university_rule_set()
    change(doc)
    with pytest.raises(RuleSetError) as caught:
        parse_rule_set(doc)
    assert (caught.value.reason, caught.value.rule) == (reason, rule), str(caught.value)
    assert caught.value.message


def test_the_error_text_names_the_rule() -> None:
    doc = university_rule_set()
    _voucher(doc)["where"] = {"meal_periods": ["supper"]}
    expected = r"vouchers\[dinner-voucher\]\.where\.meal_periods: unknown meal period 'supper'"
    with pytest.raises(RuleSetError, match=expected):
        parse_rule_set(doc)


def test_the_university_rule_set_parses() -> None:
    rule_set = parse_rule_set(university_rule_set())
    assert rule_set.funding_order == ("voucher", "subsidy", "cash")
    assert rule_set.meal_periods["night-snack"].crosses_midnight
    assert [lim.name for lim in rule_set.member_limits[CAPPED_MEMBER_ID]] == ["guardian-daily-cap"]


def test_canonical_json_is_sorted_compact_and_independent_of_key_order() -> None:
    doc = university_rule_set()
    shuffled = dict(reversed(list(copy.deepcopy(doc).items())))
    assert canonical_json(doc) == canonical_json(shuffled)
    assert canonical_json({"b": 1, "a": [1, {"d": "x", "c": None}]}) == b'{"a":[1,{"c":null,"d":"x"}],"b":1}'
    assert parse_rule_set(doc).digest == parse_rule_set(shuffled).digest


def test_parsing_does_not_change_the_document() -> None:
    doc = university_rule_set()
    before = copy.deepcopy(doc)
    parse_rule_set(doc)
    assert doc == before


def test_the_documented_example_is_the_university_rule_set() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S)
    assert block is not None
    assert json.loads(block.group(1)) == university_rule_set()

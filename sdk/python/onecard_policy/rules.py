"""The rule-set document (a JSON-able dict) and its validation into frozen ``RuleSet`` objects.

The format is specified in ``docs/policy.md`` of the onecard repository. ``parse_rule_set``
refuses an inconsistent document with a ``RuleSetError`` whose ``rule`` names the offending rule
and field, e.g. ``vouchers[dinner-voucher].where.meal_periods``. Amounts are integer fen; times
are ``HH:MM`` wall-clock in the rule set's IANA ``time_zone``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
# A terminal's clock may be at most this far from the hub's in any tenant's setting.
MAX_DEVICE_SKEW_S = 3600
MAX_AMOUNT_FEN = 100_000_000  # one payment moves at most 1,000,000 yuan (the ledger's bound)
MAX_COUNT = 1_000_000
MAX_NAMED_RULES = 1_000  # scenes, merchants, devices, meal periods, subsidies, tenant/group limits
MAX_MEMBER_LIMITS = 200_000  # K-12 parents' caps, one per child and window
MAX_OFFERS = 20  # vouchers, coupons and benefits each: every one may add a counter to read
MAX_LEDGER_GUARDS = 8  # the ledger takes at most 8 guards per payment
# A plan's guards: the windowed limits that may apply plus one benefit, one coupon and one voucher.
MAX_WINDOWED_LIMITS_PER_SCENE = MAX_LEDGER_GUARDS - 3
MAX_ID_CHARS = 64

PURSE_KINDS = ("voucher", "subsidy", "cash")
WINDOWS = ("transaction", "day", "meal_period")
MEASURES = ("amount", "count")
LEVELS = ("tenant", "group", "member")
COUNTERS = ("member", "shared")
GRANT_EVERY = ("once", "day", "week", "month", "term", "year")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


class RuleSetError(ValueError):
    """A rule set refused: ``reason`` (e.g. ``UNKNOWN_MEAL_PERIOD``), ``rule`` (the path of the
    offending rule and field) and a ``message`` for a person."""

    def __init__(self, reason: str, rule: str, message: str) -> None:
        super().__init__(f"{reason}: {rule}: {message}")
        self.reason = reason
        self.rule = rule
        self.message = message


@dataclass(frozen=True, slots=True)
class Scene:
    name: str
    closed_outside_meal_periods: bool


@dataclass(frozen=True, slots=True)
class Merchant:
    id: str
    scenes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    merchant: str | None
    scenes: tuple[str, ...]  # its own tags, else its merchant's


@dataclass(frozen=True, slots=True)
class MealPeriod:
    name: str
    scene: str
    start_min: int  # minutes after local midnight
    end_min: int  # end <= start: the period crosses midnight and belongs to the day it started

    @property
    def crosses_midnight(self) -> bool:
        return self.end_min <= self.start_min


@dataclass(frozen=True, slots=True)
class Where:
    """Where a rule applies; every field given must hold (a missing field means any)."""

    scenes: frozenset[str] | None = None
    merchants: frozenset[str] | None = None
    meal_periods: frozenset[str] | None = None
    groups: tuple[tuple[str, frozenset[str]], ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    amount_fen: int
    every: str


@dataclass(frozen=True, slots=True)
class Subsidy:
    name: str
    purse_ref: str
    grant: Grant | None
    expires_on: dt.date | None
    where: Where


@dataclass(frozen=True, slots=True)
class Voucher:
    name: str
    purse_ref: str
    cover_fen: int
    per_day: int
    where: Where


@dataclass(frozen=True, slots=True)
class Coupon:
    name: str
    min_spend_fen: int
    off_fen: int
    per_day: int
    where: Where


@dataclass(frozen=True, slots=True)
class Benefit:
    name: str
    cover_fen: int | None  # None: the whole amount
    window: str  # "meal_period" or "day"
    max_uses: int
    where: Where


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    level: str
    member_id: str | None
    window: str
    measure: str
    max: int
    counter: str
    where: Where  # groups only for level "group"


@dataclass(frozen=True, slots=True)
class Caps:
    per_transaction_fen: int | None
    per_day_fen: int | None
    count_per_day: int | None


@dataclass(frozen=True, slots=True)
class RuleSet:
    time_zone: str
    scenes: Mapping[str, Scene]
    merchants: Mapping[str, Merchant]
    devices: Mapping[str, Device]
    meal_periods: Mapping[str, MealPeriod]
    periods_by_scene: Mapping[str, tuple[MealPeriod, ...]]
    subsidies: tuple[Subsidy, ...]
    subsidies_by_ref: Mapping[str, Subsidy]
    vouchers: tuple[Voucher, ...]
    vouchers_by_ref: Mapping[str, Voucher]
    coupons: tuple[Coupon, ...]
    benefits: tuple[Benefit, ...]
    limits: tuple[Limit, ...]  # tenant and group level, in document order
    member_limits: Mapping[str, tuple[Limit, ...]]  # member level, by member id
    funding_order: tuple[str, ...]
    pin_threshold_fen: int | None
    offline_credential: Caps
    offline_device: Caps
    # How far a terminal's clock may be from the hub's before the hub raises CLOCK_DRIFT; None:
    # the hub's own default. The hub's clock decides either way (the device's time is evidence).
    max_device_skew_s: int | None
    digest: str  # sha256 hex of the canonical document
    zone: zoneinfo.ZoneInfo

    def __hash__(self) -> int:  # mappings inside are not hashable; identity is the document
        return hash(self.digest)


def canonical_json(doc: Any) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


class _Checker:
    """Reads one document, raising ``RuleSetError`` at the first problem, with its path."""

    def obj(self, value: Any, path: str, *, required: set[str], optional: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise RuleSetError("INVALID_TYPE", path, "must be an object")
        for key in value:
            if key not in required and key not in optional:
                raise RuleSetError("UNKNOWN_FIELD", f"{path}.{key}" if path else str(key),
                                   f"unknown field {key!r}")
        for key in sorted(required):
            if key not in value:
                raise RuleSetError("MISSING_FIELD", f"{path}.{key}" if path else key, f"{key!r} is required")
        return value

    def array(self, value: Any, path: str, *, max_items: int) -> list[Any]:
        if not isinstance(value, list):
            raise RuleSetError("INVALID_TYPE", path, "must be an array")
        if len(value) > max_items:
            raise RuleSetError("TOO_MANY_RULES", path, f"at most {max_items} entries")
        return value

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise RuleSetError("INVALID_NAME", path,
                               f"{value!r} is not a name: 1..40 of a-z 0-9 _ -, starting with a letter or digit")
        return value

    def ident(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _ID.match(value):
            raise RuleSetError("INVALID_ID", path,
                               f"{value!r} is not an id: 1..{MAX_ID_CHARS} printable ASCII, no spaces")
        return value

    def integer(self, value: Any, path: str, *, low: int, high: int, reason: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise RuleSetError(reason, path, f"{value!r} is not an integer in {low}..{high}")
        return value

    def amount(self, value: Any, path: str, *, low: int = 1) -> int:
        return self.integer(value, path, low=low, high=MAX_AMOUNT_FEN, reason="INVALID_AMOUNT")

    def count(self, value: Any, path: str) -> int:
        return self.integer(value, path, low=1, high=MAX_COUNT, reason="INVALID_COUNT")

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise RuleSetError("INVALID_TYPE", path, "must be true or false")
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...], reason: str) -> str:
        if value not in choices:
            raise RuleSetError(reason, path, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def time_min(self, value: Any, path: str) -> int:
        match = _TIME.match(value) if isinstance(value, str) else None
        if match is None:
            raise RuleSetError("INVALID_TIME", path, f"{value!r} is not a time HH:MM (00:00..23:59)")
        return int(match.group(1)) * 60 + int(match.group(2))

    def date(self, value: Any, path: str) -> dt.date:
        try:
            if not isinstance(value, str) or not _DATE.match(value):
                raise ValueError
            return dt.date.fromisoformat(value)
        except ValueError:
            raise RuleSetError("INVALID_DATE", path, f"{value!r} is not a date YYYY-MM-DD") from None


def _zone(value: Any) -> zoneinfo.ZoneInfo:
    if not isinstance(value, str) or not value or len(value) > 64 or ".." in value or value.startswith("/"):
        raise RuleSetError("INVALID_TIME_ZONE", "time_zone", f"{value!r} is not an IANA time zone name")
    try:
        return zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise RuleSetError("INVALID_TIME_ZONE", "time_zone", f"{value!r} is not an IANA time zone name") from None


def _intervals(period: MealPeriod) -> list[tuple[int, int]]:
    if period.crosses_midnight:
        return [(period.start_min, 24 * 60), (0, period.end_min)]
    return [(period.start_min, period.end_min)]


_WHERE_FIELDS = {"scenes", "merchants", "meal_periods", "groups"}


def parse_rule_set(doc: Mapping[str, Any]) -> RuleSet:
    """Validate a rule-set document; the ``RuleSet`` it answers is what ``evaluate`` reads."""
    c = _Checker()
    c.obj(doc, "", required={"format", "time_zone", "scenes", "funding_order"},
          optional={"name", "merchants", "devices", "meal_periods", "subsidies", "vouchers", "coupons",
                    "benefits", "limits", "pin", "offline", "clock"})
    if doc["format"] != FORMAT_VERSION or isinstance(doc["format"], bool):
        raise RuleSetError("UNSUPPORTED_FORMAT", "format",
                           f"format {doc['format']!r}; this evaluator reads {FORMAT_VERSION}")
    if "name" in doc and (not isinstance(doc["name"], str) or len(doc["name"]) > 200):
        raise RuleSetError("INVALID_TYPE", "name", "must be a string of at most 200 characters")
    zone = _zone(doc["time_zone"])
    names: dict[str, str] = {}  # every rule name (subsidies, vouchers, coupons, benefits, limits) -> its path

    def claim(name: str, path: str) -> None:
        if name in names:
            raise RuleSetError("DUPLICATE_NAME", path, f"{name!r} is already the name of {names[name]}")
        names[name] = path

    scenes: dict[str, Scene] = {}
    for i, raw in enumerate(c.array(doc["scenes"], "scenes", max_items=MAX_NAMED_RULES)):
        path = f"scenes[{i}]"
        if isinstance(raw, str):
            raw = {"name": raw}
        c.obj(raw, path, required={"name"}, optional={"closed_outside_meal_periods"})
        name = c.name(raw["name"], f"{path}.name")
        if name in scenes:
            raise RuleSetError("DUPLICATE_NAME", f"scenes[{name}]", f"scene {name!r} is declared twice")
        scenes[name] = Scene(name, c.boolean(raw.get("closed_outside_meal_periods", False),
                                             f"scenes[{name}].closed_outside_meal_periods"))

    def scene_list(value: Any, path: str, *, allow_empty: bool) -> tuple[str, ...]:
        items = c.array(value, path, max_items=MAX_NAMED_RULES)
        if not items and not allow_empty:
            raise RuleSetError("EMPTY_LIST", path, "must name at least one scene")
        for item in items:
            if item not in scenes:
                raise RuleSetError("UNKNOWN_SCENE", path, f"unknown scene {item!r}")
        if len(set(items)) != len(items):
            raise RuleSetError("DUPLICATE_NAME", path, "a scene is listed twice")
        return tuple(items)

    merchants: dict[str, Merchant] = {}
    for i, raw in enumerate(c.array(doc.get("merchants", []), "merchants", max_items=MAX_NAMED_RULES)):
        c.obj(raw, f"merchants[{i}]", required={"id", "scenes"}, optional={"name"})
        mid = c.ident(raw["id"], f"merchants[{i}].id")
        path = f"merchants[{mid}]"
        if mid in merchants:
            raise RuleSetError("DUPLICATE_NAME", path, f"merchant {mid!r} is declared twice")
        merchants[mid] = Merchant(mid, scene_list(raw["scenes"], f"{path}.scenes", allow_empty=False))

    devices: dict[str, Device] = {}
    for i, raw in enumerate(c.array(doc.get("devices", []), "devices", max_items=MAX_NAMED_RULES)):
        c.obj(raw, f"devices[{i}]", required={"id"}, optional={"merchant", "scenes", "name"})
        did = c.ident(raw["id"], f"devices[{i}].id")
        path = f"devices[{did}]"
        if did in devices:
            raise RuleSetError("DUPLICATE_NAME", path, f"device {did!r} is declared twice")
        merchant = raw.get("merchant")
        if merchant is not None and merchant not in merchants:
            raise RuleSetError("UNKNOWN_MERCHANT", f"{path}.merchant", f"unknown merchant {merchant!r}")
        if "scenes" in raw:
            tags = scene_list(raw["scenes"], f"{path}.scenes", allow_empty=False)
            if merchant is not None and not set(tags) <= set(merchants[merchant].scenes):
                raise RuleSetError("INCONSISTENT_SCENES", f"{path}.scenes",
                                   f"the device's scenes must be among its merchant {merchant!r}'s")
        elif merchant is not None:
            tags = merchants[merchant].scenes
        else:
            raise RuleSetError("MISSING_FIELD", f"{path}.scenes", "a device without a merchant needs scenes")
        devices[did] = Device(did, merchant, tags)

    periods: dict[str, MealPeriod] = {}
    by_scene: dict[str, list[MealPeriod]] = {}
    for i, raw in enumerate(c.array(doc.get("meal_periods", []), "meal_periods", max_items=MAX_NAMED_RULES)):
        c.obj(raw, f"meal_periods[{i}]", required={"name", "scene", "start", "end"}, optional=set())
        name = c.name(raw["name"], f"meal_periods[{i}].name")
        path = f"meal_periods[{name}]"
        if name in periods:
            raise RuleSetError("DUPLICATE_NAME", path, f"meal period {name!r} is declared twice")
        if raw["scene"] not in scenes:
            raise RuleSetError("UNKNOWN_SCENE", f"{path}.scene", f"unknown scene {raw['scene']!r}")
        start = c.time_min(raw["start"], f"{path}.start")
        end = c.time_min(raw["end"], f"{path}.end")
        if start == end:
            raise RuleSetError("INVALID_TIME", f"{path}.end", "a meal period cannot start and end at the same time")
        period = MealPeriod(name, raw["scene"], start, end)
        for other in by_scene.get(period.scene, []):
            if any(a < d and c_ < b for a, b in _intervals(period) for c_, d in _intervals(other)):
                raise RuleSetError("OVERLAPPING_MEAL_PERIODS", path,
                                   f"overlaps {other.name!r} in scene {period.scene!r}")
        periods[name] = period
        by_scene.setdefault(period.scene, []).append(period)
    for name, scene in scenes.items():
        if scene.closed_outside_meal_periods and not by_scene.get(name):
            raise RuleSetError("INCONSISTENT_SCENES", f"scenes[{name}].closed_outside_meal_periods",
                               "a scene closed outside meal periods needs meal periods")

    def where(value: Any, path: str, *, allow_groups: bool = True, allow_place: bool = True) -> Where:
        allowed = set(_WHERE_FIELDS)
        if not allow_groups:
            allowed.discard("groups")
        if not allow_place:
            allowed -= {"scenes", "merchants", "meal_periods"}
        c.obj(value, path, required=set(), optional=allowed)
        w_scenes = w_merchants = w_periods = None
        if "scenes" in value:
            w_scenes = frozenset(scene_list(value["scenes"], f"{path}.scenes", allow_empty=False))
        if "merchants" in value:
            items = c.array(value["merchants"], f"{path}.merchants", max_items=MAX_NAMED_RULES)
            if not items:
                raise RuleSetError("EMPTY_LIST", f"{path}.merchants", "must name at least one merchant")
            for item in items:
                if item not in merchants:
                    raise RuleSetError("UNKNOWN_MERCHANT", f"{path}.merchants", f"unknown merchant {item!r}")
                if w_scenes is not None and not w_scenes & set(merchants[item].scenes):
                    raise RuleSetError("INCONSISTENT_WHERE", f"{path}.merchants",
                                       f"merchant {item!r} is in none of the scenes listed")
            w_merchants = frozenset(items)
        if "meal_periods" in value:
            items = c.array(value["meal_periods"], f"{path}.meal_periods", max_items=MAX_NAMED_RULES)
            if not items:
                raise RuleSetError("EMPTY_LIST", f"{path}.meal_periods", "must name at least one meal period")
            for item in items:
                if item not in periods:
                    raise RuleSetError("UNKNOWN_MEAL_PERIOD", f"{path}.meal_periods", f"unknown meal period {item!r}")
                if w_scenes is not None and periods[item].scene not in w_scenes:
                    raise RuleSetError("INCONSISTENT_WHERE", f"{path}.meal_periods",
                                       f"meal period {item!r} belongs to scene {periods[item].scene!r}, not listed")
            w_periods = frozenset(items)
        groups: list[tuple[str, frozenset[str]]] = []
        if "groups" in value:
            raw_groups = value["groups"]
            if not isinstance(raw_groups, dict) or not raw_groups:
                raise RuleSetError("INVALID_TYPE", f"{path}.groups",
                                   "must be a non-empty object of attribute -> value or [values]")
            for attr in sorted(raw_groups):
                values = raw_groups[attr]
                if isinstance(values, str):
                    values = [values]
                if (not isinstance(attr, str) or not attr or not isinstance(values, list) or not values
                        or not all(isinstance(v, str) for v in values)):
                    raise RuleSetError("INVALID_TYPE", f"{path}.groups.{attr}",
                                       "must be a value or a non-empty list of values")
                groups.append((attr, frozenset(values)))
        return Where(w_scenes, w_merchants, w_periods, tuple(groups))

    subsidies: list[Subsidy] = []
    subsidies_by_ref: dict[str, Subsidy] = {}
    for i, raw in enumerate(c.array(doc.get("subsidies", []), "subsidies", max_items=MAX_NAMED_RULES)):
        c.obj(raw, f"subsidies[{i}]", required={"name", "purse_ref"}, optional={"grant", "expires_on", "where"})
        name = c.name(raw["name"], f"subsidies[{i}].name")
        path = f"subsidies[{name}]"
        claim(name, path)
        ref = c.ident(raw["purse_ref"], f"{path}.purse_ref")
        if ref in subsidies_by_ref:
            raise RuleSetError("DUPLICATE_PURSE", f"{path}.purse_ref",
                               f"purse {ref!r} already belongs to subsidies[{subsidies_by_ref[ref].name}]")
        grant = None
        if raw.get("grant") is not None:
            g = c.obj(raw["grant"], f"{path}.grant", required={"amount_fen", "every"}, optional=set())
            grant = Grant(c.amount(g["amount_fen"], f"{path}.grant.amount_fen"),
                          c.choice(g["every"], f"{path}.grant.every", GRANT_EVERY, "INVALID_SCHEDULE"))
        expires = c.date(raw["expires_on"], f"{path}.expires_on") if raw.get("expires_on") is not None else None
        subsidy = Subsidy(name, ref, grant, expires, where(raw.get("where", {}), f"{path}.where"))
        subsidies.append(subsidy)
        subsidies_by_ref[ref] = subsidy

    vouchers: list[Voucher] = []
    vouchers_by_ref: dict[str, Voucher] = {}
    for i, raw in enumerate(c.array(doc.get("vouchers", []), "vouchers", max_items=MAX_OFFERS)):
        c.obj(raw, f"vouchers[{i}]", required={"name", "purse_ref", "cover_fen"}, optional={"per_day", "where"})
        name = c.name(raw["name"], f"vouchers[{i}].name")
        path = f"vouchers[{name}]"
        claim(name, path)
        ref = c.ident(raw["purse_ref"], f"{path}.purse_ref")
        if ref in vouchers_by_ref:
            raise RuleSetError("DUPLICATE_PURSE", f"{path}.purse_ref",
                               f"purse {ref!r} already belongs to vouchers[{vouchers_by_ref[ref].name}]")
        voucher = Voucher(name, ref, c.amount(raw["cover_fen"], f"{path}.cover_fen"),
                          c.count(raw.get("per_day", 1), f"{path}.per_day"),
                          where(raw.get("where", {}), f"{path}.where"))
        vouchers.append(voucher)
        vouchers_by_ref[ref] = voucher

    coupons: list[Coupon] = []
    for i, raw in enumerate(c.array(doc.get("coupons", []), "coupons", max_items=MAX_OFFERS)):
        c.obj(raw, f"coupons[{i}]", required={"name", "min_spend_fen", "off_fen"}, optional={"per_day", "where"})
        name = c.name(raw["name"], f"coupons[{i}].name")
        path = f"coupons[{name}]"
        claim(name, path)
        min_spend = c.amount(raw["min_spend_fen"], f"{path}.min_spend_fen")
        off = c.amount(raw["off_fen"], f"{path}.off_fen")
        if off >= min_spend:
            raise RuleSetError("INVALID_AMOUNT", f"{path}.off_fen", "the discount must be less than the minimum spend")
        coupons.append(Coupon(name, min_spend, off, c.count(raw.get("per_day", 1), f"{path}.per_day"),
                              where(raw.get("where", {}), f"{path}.where")))

    benefits: list[Benefit] = []
    for i, raw in enumerate(c.array(doc.get("benefits", []), "benefits", max_items=MAX_OFFERS)):
        c.obj(raw, f"benefits[{i}]", required={"name", "window"}, optional={"cover_fen", "max_uses", "where"})
        name = c.name(raw["name"], f"benefits[{i}].name")
        path = f"benefits[{name}]"
        claim(name, path)
        window = c.choice(raw["window"], f"{path}.window", ("meal_period", "day"), "INVALID_WINDOW")
        cover = c.amount(raw["cover_fen"], f"{path}.cover_fen") if raw.get("cover_fen") is not None else None
        benefit_where = where(raw.get("where", {}), f"{path}.where")
        if window == "meal_period" and benefit_where.meal_periods is None:
            raise RuleSetError("INVALID_WINDOW", f"{path}.where.meal_periods",
                               "a benefit counted per meal period must name its meal periods")
        benefits.append(Benefit(name, cover, window, c.count(raw.get("max_uses", 1), f"{path}.max_uses"),
                                benefit_where))

    limits: list[Limit] = []
    member_limits: dict[str, list[Limit]] = {}
    raw_limits = c.array(doc.get("limits", []), "limits", max_items=MAX_MEMBER_LIMITS)
    for i, raw in enumerate(raw_limits):
        c.obj(raw, f"limits[{i}]", required={"name", "level", "window", "max"},
              optional={"measure", "groups", "member_id", "counter", "where"})
        name = c.name(raw["name"], f"limits[{i}].name")
        path = f"limits[{name}]"
        claim(name, path)
        level = c.choice(raw["level"], f"{path}.level", LEVELS, "INVALID_LEVEL")
        window = c.choice(raw["window"], f"{path}.window", WINDOWS, "INVALID_WINDOW")
        measure = c.choice(raw.get("measure", "amount"), f"{path}.measure", MEASURES, "INVALID_MEASURE")
        counter = c.choice(raw.get("counter", "member"), f"{path}.counter", COUNTERS, "INVALID_COUNTER")
        if window == "transaction" and (measure == "count" or "counter" in raw):
            raise RuleSetError("INVALID_WINDOW", f"{path}.window",
                               "a per-transaction limit caps the amount and keeps no counter")
        maximum = (c.amount(raw["max"], f"{path}.max", low=0) if measure == "amount"
                   else c.integer(raw["max"], f"{path}.max", low=0, high=MAX_COUNT, reason="INVALID_COUNT"))
        place = where(raw.get("where", {}), f"{path}.where", allow_groups=False)
        if window == "meal_period" and place.meal_periods is None and place.scenes is not None \
                and not any(by_scene.get(s) for s in place.scenes):
            raise RuleSetError("INVALID_WINDOW", f"{path}.window", "none of its scenes has meal periods")
        member_id = None
        groups: tuple[tuple[str, frozenset[str]], ...] = ()
        if level == "group":
            if "groups" not in raw:
                raise RuleSetError("MISSING_FIELD", f"{path}.groups", "a group limit names its groups")
            groups = where({"groups": raw["groups"]}, path, allow_place=False).groups
        elif "groups" in raw:
            raise RuleSetError("INVALID_LEVEL", f"{path}.groups", f"a {level} limit has no groups")
        if level == "member":
            if "member_id" not in raw:
                raise RuleSetError("MISSING_FIELD", f"{path}.member_id", "a member limit names its member")
            member_id = c.ident(raw["member_id"], f"{path}.member_id")
        elif "member_id" in raw:
            raise RuleSetError("INVALID_LEVEL", f"{path}.member_id", f"a {level} limit has no member_id")
        limit = Limit(name, level, member_id, window, measure, maximum, counter,
                      Where(place.scenes, place.merchants, place.meal_periods, groups))
        if member_id is None:
            if len(limits) >= MAX_NAMED_RULES:
                raise RuleSetError("TOO_MANY_RULES", path, f"at most {MAX_NAMED_RULES} tenant and group limits")
            limits.append(limit)
        else:
            member_limits.setdefault(member_id, []).append(limit)

    # Every counter a plan may guard must fit in one ledger payment (8 guards): per scene, the
    # windowed limits that could apply to one member (all groups matched, the member's own caps
    # included), plus one benefit, one coupon and one voucher.
    def windowed_for(scene: str, items: list[Limit]) -> int:
        return sum(1 for lim in items if lim.window != "transaction"
                   and (lim.where.scenes is None or scene in lim.where.scenes))
    for scene in scenes:
        most_member = max((windowed_for(scene, items) for items in member_limits.values()), default=0)
        if windowed_for(scene, limits) + most_member > MAX_WINDOWED_LIMITS_PER_SCENE:
            raise RuleSetError("TOO_MANY_LIMITS", f"scenes[{scene}]",
                               f"at most {MAX_WINDOWED_LIMITS_PER_SCENE} counted limits may apply to one member in "
                               f"one scene (the ledger takes {MAX_LEDGER_GUARDS} guards per payment)")

    order_raw = c.array(doc["funding_order"], "funding_order", max_items=len(PURSE_KINDS))
    for item in order_raw:
        if item not in PURSE_KINDS:
            raise RuleSetError("UNKNOWN_PURSE", "funding_order", f"unknown purse kind {item!r}")
    if not order_raw or len(set(order_raw)) != len(order_raw):
        raise RuleSetError("INVALID_FUNDING_ORDER", "funding_order", "each purse kind at most once, at least one")
    for kind, items, label in (("subsidy", subsidies, "subsidies"), ("voucher", vouchers, "vouchers")):
        if items and kind not in order_raw:
            raise RuleSetError("INVALID_FUNDING_ORDER", f"{label}[{items[0].name}]",
                               f"can never be spent: funding_order has no {kind!r}")

    pin_threshold = None
    if "pin" in doc:
        pin = c.obj(doc["pin"], "pin", required={"threshold_fen"}, optional=set())
        pin_threshold = c.amount(pin["threshold_fen"], "pin.threshold_fen", low=0)

    def caps(value: Any, path: str) -> Caps:
        c.obj(value, path, required=set(), optional={"per_transaction_fen", "per_day_fen", "count_per_day"})
        per_tx = c.amount(value["per_transaction_fen"], f"{path}.per_transaction_fen") \
            if value.get("per_transaction_fen") is not None else None
        per_day = c.amount(value["per_day_fen"], f"{path}.per_day_fen") \
            if value.get("per_day_fen") is not None else None
        if per_tx is not None and per_day is not None and per_tx > per_day:
            raise RuleSetError("INVALID_AMOUNT", f"{path}.per_transaction_fen", "more than the daily cap")
        count = c.count(value["count_per_day"], f"{path}.count_per_day") \
            if value.get("count_per_day") is not None else None
        return Caps(per_tx, per_day, count)

    clock = c.obj(doc.get("clock", {}), "clock", required=set(), optional={"max_device_skew_s"})
    max_skew = c.integer(clock["max_device_skew_s"], "clock.max_device_skew_s", low=1, high=MAX_DEVICE_SKEW_S,
                         reason="INVALID_DURATION") if clock.get("max_device_skew_s") is not None else None
    offline = c.obj(doc.get("offline", {}), "offline", required=set(), optional={"credential", "device"})
    cred_caps = caps(offline.get("credential", {}), "offline.credential")
    device_caps = caps(offline.get("device", {}), "offline.device")

    return RuleSet(
        time_zone=doc["time_zone"], scenes=scenes, merchants=merchants, devices=devices, meal_periods=periods,
        periods_by_scene={k: tuple(sorted(v, key=lambda p: p.start_min)) for k, v in by_scene.items()},
        subsidies=tuple(subsidies), subsidies_by_ref=subsidies_by_ref,
        vouchers=tuple(vouchers), vouchers_by_ref=vouchers_by_ref, coupons=tuple(coupons),
        benefits=tuple(benefits), limits=tuple(limits),
        member_limits={k: tuple(v) for k, v in member_limits.items()},
        funding_order=tuple(order_raw), pin_threshold_fen=pin_threshold,
        offline_credential=cred_caps, offline_device=device_caps, max_device_skew_s=max_skew,
        digest=hashlib.sha256(canonical_json(doc)).hexdigest(), zone=zone,
    )

"""Access rules of gates and shuttle readers: who may pass where and when. Pure, stdlib only.

The hub decides online with these functions and devices decide offline with the very same ones,
so a rule means one thing everywhere. The document (JSON, synced to devices as ACCESS_RULES)::

    {"time_zone": "Asia/Shanghai",
     "rules": [{"name": "dorm-night",
                "places": ["dorm-3"],            # device locations the rule covers
                "purposes": ["access"],          # "access" (gates) and/or "ride" (shuttles)
                "groups": {"role": ["student"]}, # optional; every key must match one of its values
                "weekdays": [1, 2, 3, 4, 5],     # optional, ISO (1 = Monday); absent or [] = every day
                "from": "06:00", "to": "23:30",  # local wall clock; to > from, or crossing midnight
                "offline": false}]}              # optional; see below

A window is [from, to) in the document's time zone; ``to`` may be "24:00". When ``to`` is not
after ``from`` the window crosses midnight (22:00-02:00 is 22:00 of a listed weekday to 02:00 the
next day: the weekday is the one the window starts on). ``from`` equal to ``to`` is refused.

A device offline knows no member groups. A rule with group conditions does not match offline,
unless it says ``"offline": true``: then it matches offline on place and time alone. A rule with no
group conditions matches everyone, online and offline.

``decide_access`` answers the first rule (in document order) that lets the member pass, or why
not: NO_RULE (no rule names this place and purpose), GROUP_NOT_ALLOWED (no rule of the place
admits the member's groups), OUTSIDE_WINDOW (one does, at other times).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REASON_INVALID = "ACCESS_RULES_INVALID"
PASS = "PASS"
NO_RULE = "NO_RULE"
OUTSIDE_WINDOW = "OUTSIDE_WINDOW"
GROUP_NOT_ALLOWED = "GROUP_NOT_ALLOWED"

PURPOSES = ("access", "ride")
DEFAULT_TIME_ZONE = "Asia/Shanghai"
MAX_DOCUMENT_CHARS = 1_000_000
MAX_RULES = 2_000
MAX_NAME_CHARS = 64
MAX_PLACE_CHARS = 128
MAX_PLACES = 500
MAX_GROUP_KEYS = 16
MAX_GROUP_VALUES = 200
MAX_GROUP_CHARS = 64
MINUTES_PER_DAY = 24 * 60

_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_DOCUMENT_KEYS = frozenset({"time_zone", "rules"})
_RULE_KEYS = frozenset({"name", "places", "purposes", "groups", "weekdays", "from", "to", "offline"})


class AccessRulesError(ValueError):
    """The document is not a valid rule set. ``rule``: the rule at fault ('' for the document)."""

    def __init__(self, message: str, *, reason: str = REASON_INVALID, rule: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.rule = rule


@dataclass(frozen=True, slots=True)
class AccessRule:
    name: str
    places: frozenset[str]
    purposes: frozenset[str]
    # Group key -> the values admitted; empty: everyone.
    groups: Mapping[str, frozenset[str]]
    # ISO weekdays the window starts on; empty: every day.
    weekdays: frozenset[int]
    # Minutes after local midnight; end may be <= start (crossing midnight) or 1440 ("24:00").
    start_minute: int
    end_minute: int
    offline: bool

    @property
    def crosses_midnight(self) -> bool:
        return self.end_minute <= self.start_minute

    def admits_groups(self, member_groups: Mapping[str, str] | None, *, offline: bool) -> bool:
        if not self.groups:
            return True
        if offline:
            return self.offline
        known = member_groups or {}
        return all(known.get(key) in values for key, values in self.groups.items())

    def in_window(self, local: datetime) -> bool:
        """Whether the local wall-clock time ``local`` falls in the rule's window."""
        minute = local.hour * 60 + local.minute
        weekday = local.isoweekday()
        days = self.weekdays
        if not self.crosses_midnight:
            return self.start_minute <= minute < self.end_minute and (not days or weekday in days)
        if minute >= self.start_minute:
            return not days or weekday in days
        if minute < self.end_minute:
            return not days or (weekday - 2) % 7 + 1 in days  # the window began yesterday
        return False


@dataclass(frozen=True, slots=True)
class AccessRules:
    time_zone: str
    rules: tuple[AccessRule, ...]
    # The document as parsed (for canonical_json).
    document: Mapping[str, Any] = field(repr=False, compare=False)
    _zone: ZoneInfo = field(repr=False, compare=False)
    _by_place: Mapping[tuple[str, str], tuple[AccessRule, ...]] = field(repr=False, compare=False)

    def rules_for(self, *, location: str, purpose: str) -> tuple[AccessRule, ...]:
        return self._by_place.get((location, purpose), ())

    def local_time(self, when: datetime) -> datetime:
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("when must be an aware datetime")
        return when.astimezone(self._zone)

    def canonical_json(self) -> str:
        """The document with sorted keys and no spaces: what the hub stores, hashes and syncs."""
        return canonical_json(self.document)


class AccessDecision(NamedTuple):
    passed: bool
    # PASS, NO_RULE, OUTSIDE_WINDOW or GROUP_NOT_ALLOWED.
    reason: str
    # The rule that let the member pass; '' for a deny.
    rule: str = ""


def canonical_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def empty_rules(time_zone: str = DEFAULT_TIME_ZONE) -> AccessRules:
    """No rules: every access is NO_RULE (a tenant that never set any)."""
    return parse_access_rules({"time_zone": time_zone, "rules": []})


# --- parsing -------------------------------------------------------------------------------------


def _fail(message: str, rule: str = "") -> AccessRulesError:
    return AccessRulesError(message, rule=rule)


def _text(value: Any, *, what: str, max_chars: int, rule: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"{what} must be a non-empty string", rule)
    if len(value) > max_chars or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _fail(f"{what} must be at most {max_chars} printable characters", rule)
    return value


def _text_list(value: Any, *, what: str, max_items: int, max_chars: int, rule: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(f"{what} must be a non-empty list of strings", rule)
    if len(value) > max_items:
        raise _fail(f"{what} has more than {max_items} entries", rule)
    items = [_text(v, what=what, max_chars=max_chars, rule=rule) for v in value]
    if len(set(items)) != len(items):
        raise _fail(f"{what} names an entry twice", rule)
    return items


def _minute(value: Any, *, what: str, rule: str, allow_end_of_day: bool) -> int:
    if allow_end_of_day and value == "24:00":
        return MINUTES_PER_DAY
    match = _TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise _fail(f"{what} must be a time HH:MM (00:00-23:59{', or 24:00' if allow_end_of_day else ''})", rule)
    return int(match.group(1)) * 60 + int(match.group(2))


def _rule(raw: Any, index: int) -> AccessRule:
    if not isinstance(raw, dict):
        raise _fail(f"rule {index + 1} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or any(
            ord(c) < 32 or ord(c) == 127 for c in name):
        raise _fail(f"rule {index + 1} needs a name of 1..{MAX_NAME_CHARS} printable characters",
                    name if isinstance(name, str) else "")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise _fail(f"rule {name!r} has unknown fields {unknown}", name)
    if "places" not in raw:
        raise _fail(f"rule {name!r} names no places", name)
    places = _text_list(raw["places"], what="places", max_items=MAX_PLACES, max_chars=MAX_PLACE_CHARS, rule=name)
    if "purposes" not in raw:
        raise _fail(f"rule {name!r} names no purposes", name)
    purposes = _text_list(raw["purposes"], what="purposes", max_items=len(PURPOSES), max_chars=16, rule=name)
    for purpose in purposes:
        if purpose not in PURPOSES:
            raise _fail(f"rule {name!r}: purpose {purpose!r} is not one of {list(PURPOSES)}", name)
    groups_raw = raw.get("groups", {})
    if groups_raw is None:
        groups_raw = {}
    if not isinstance(groups_raw, dict) or len(groups_raw) > MAX_GROUP_KEYS:
        raise _fail(f"rule {name!r}: groups must be an object of at most {MAX_GROUP_KEYS} keys", name)
    groups: dict[str, frozenset[str]] = {}
    for key, values in groups_raw.items():
        _text(key, what="a group key", max_chars=MAX_GROUP_CHARS, rule=name)
        groups[key] = frozenset(_text_list(values, what=f"groups.{key}", max_items=MAX_GROUP_VALUES,
                                           max_chars=MAX_GROUP_CHARS, rule=name))
    weekdays_raw = raw.get("weekdays", [])
    if weekdays_raw is None:
        weekdays_raw = []
    if not isinstance(weekdays_raw, list) or any(
            type(d) is not int or not 1 <= d <= 7 for d in weekdays_raw) or len(set(weekdays_raw)) != len(weekdays_raw):
        raise _fail(f"rule {name!r}: weekdays must be distinct ISO weekdays 1 (Monday) .. 7 (Sunday)", name)
    if "from" not in raw or "to" not in raw:
        raise _fail(f"rule {name!r} needs a window: from and to", name)
    start = _minute(raw["from"], what="from", rule=name, allow_end_of_day=False)
    end = _minute(raw["to"], what="to", rule=name, allow_end_of_day=True)
    if start == end:
        raise _fail(f"rule {name!r}: an empty window (from equals to); use 00:00-24:00 for the whole day", name)
    offline = raw.get("offline", False)
    if type(offline) is not bool:
        raise _fail(f"rule {name!r}: offline must be true or false", name)
    return AccessRule(name=name, places=frozenset(places), purposes=frozenset(purposes), groups=groups,
                      weekdays=frozenset(weekdays_raw), start_minute=start, end_minute=end, offline=offline)


def parse_access_rules(text: str | bytes | Mapping[str, Any]) -> AccessRules:
    """Parse and check a rule document; raises AccessRulesError (the rule at fault named)."""
    if isinstance(text, Mapping):
        document: Any = dict(text)
    else:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("the document is not UTF-8") from None
        if not isinstance(text, str):
            raise _fail("the document must be JSON text")
        if len(text) > MAX_DOCUMENT_CHARS:
            raise _fail(f"the document is longer than {MAX_DOCUMENT_CHARS} characters")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise _fail(f"the document is not JSON: {str(exc)[:100]}") from None
    if not isinstance(document, dict):
        raise _fail("the document must be a JSON object")
    unknown = sorted(set(document) - _DOCUMENT_KEYS)
    if unknown:
        raise _fail(f"the document has unknown fields {unknown}")
    time_zone = document.get("time_zone", DEFAULT_TIME_ZONE)
    if not isinstance(time_zone, str) or not time_zone or len(time_zone) > 64:
        raise _fail("time_zone must be an IANA time zone name")
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _fail(f"time_zone {time_zone[:64]!r} is not an IANA time zone") from None
    raw_rules = document.get("rules")
    if not isinstance(raw_rules, list):
        raise _fail("rules must be a list")
    if len(raw_rules) > MAX_RULES:
        raise _fail(f"more than {MAX_RULES} rules")
    rules: list[AccessRule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules):
        rule = _rule(raw, index)
        if rule.name in seen:
            raise _fail(f"two rules are named {rule.name!r}", rule.name)
        seen.add(rule.name)
        rules.append(rule)
    by_place: dict[tuple[str, str], list[AccessRule]] = {}
    for rule in rules:
        for place in rule.places:
            for purpose in rule.purposes:
                by_place.setdefault((place, purpose), []).append(rule)
    return AccessRules(time_zone=time_zone, rules=tuple(rules), document={**document, "time_zone": time_zone},
                       _zone=zone, _by_place={k: tuple(v) for k, v in by_place.items()})


# --- deciding ------------------------------------------------------------------------------------


def decide_access(rules: AccessRules, *, location: str, purpose: str, member_groups: Mapping[str, str] | None,
                  when: datetime, offline: bool) -> AccessDecision:
    """Whether a member may pass at ``location`` for ``purpose`` ("access" or "ride") at ``when``
    (an aware datetime), and by which rule. ``member_groups``: what identity knows (None offline)."""
    candidates = rules.rules_for(location=location, purpose=purpose.lower())
    if not candidates:
        return AccessDecision(False, NO_RULE)
    local = rules.local_time(when)
    group_admitted = False
    for rule in candidates:
        if not rule.admits_groups(member_groups, offline=offline):
            continue
        group_admitted = True
        if rule.in_window(local):
            return AccessDecision(True, PASS, rule.name)
    return AccessDecision(False, OUTSIDE_WINDOW if group_admitted else GROUP_NOT_ALLOWED)


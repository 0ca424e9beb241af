"""The university rule set and request builders for the policy tests; all pure, no services."""
from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from onecard_policy import PurseState, Request, RuleSet, parse_rule_set
from onecard_policy.examples import UNIVERSITY_TENANT_ID, university_rule_set

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
EMPLOYEE = "aaaaaaaa-0000-4000-8000-00000000000e"
STUDENT = "bbbbbbbb-0000-4000-8000-00000000000s"
DAY = dt.date(2026, 11, 26)


def local(hour: int, minute: int = 0, *, day: dt.date = DAY, zone: dt.tzinfo = SHANGHAI) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)


def cash(available_fen: int | None = 100_000) -> PurseState:
    return PurseState("cash", "main", available_fen)


def request(*, member_id: str = STUDENT, groups: dict[str, str] | None = None, scene: str | None = None,
            merchant_id: str | None = "canteen-north", device_id: str | None = None, amount_fen: int = 1200,
            at: dt.datetime | None = None, channel: str = "online",
            purses: tuple[PurseState, ...] | None = None) -> Request:
    return Request(tenant_id=UNIVERSITY_TENANT_ID, member_id=member_id,
                   member_groups={"role": "student"} if groups is None else groups, scene=scene,
                   merchant_id=merchant_id, device_id=device_id, amount_fen=amount_fen,
                   at=local(12, 0) if at is None else at, channel=channel,
                   purses=(cash(),) if purses is None else purses)


@pytest.fixture(scope="session")
def university() -> RuleSet:
    return parse_rule_set(university_rule_set())

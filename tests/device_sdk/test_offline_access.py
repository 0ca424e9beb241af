"""Gates and shuttle readers offline: decided by the access rules without member groups, and
recorded, pass or deny, with a nonce."""
from __future__ import annotations

import json
from pathlib import Path

from onecard_codes import Purpose

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device import verify_record

from tests.device_sdk.conftest import DEVICE, TENANT, build_kit

RULES = json.dumps({"time_zone": "Asia/Shanghai", "rules": [
    {"name": "library-day", "places": ["library"], "purposes": ["access"], "from": "08:00", "to": "22:00",
     "groups": {"role": ["student"]}, "offline": True},
    {"name": "dorm-residents", "places": ["dorm-3"], "purposes": ["access"], "groups": {"dorm": ["3"]},
     "from": "06:00", "to": "23:30"},
    {"name": "night-bus", "places": ["bus-east"], "purposes": ["ride"], "from": "20:00", "to": "23:00"},
]})


def test_an_offline_rule_passes_and_is_recorded_with_a_nonce(tmp_path: Path) -> None:
    kit = build_kit(tmp_path, location="library", access_rules=RULES)
    phone = kit.phone()
    decision = kit.engine.access(phone.present(purpose=Purpose.ACCESS), purpose=pb.PURPOSE_ACCESS)
    assert decision.approved and decision.reason == "PASS" and decision.rule == "library-day"
    record = decision.record
    assert record.purpose == pb.PURPOSE_ACCESS and record.passed and record.nonce == decision.nonce
    assert record.member_id == phone.member_id and record.sequence == 1
    assert verify_record(public_key=kit.identity.public_key, tenant_id=TENANT, device_id=DEVICE, record=record)


def test_a_group_rule_does_not_match_offline(tmp_path: Path) -> None:
    kit = build_kit(tmp_path, location="dorm-3", access_rules=RULES)
    decision = kit.engine.access(pb.Presentation(card_uid="11223344"), nonce="n-1")
    assert not decision.approved and decision.reason == "GROUP_NOT_ALLOWED"
    assert decision.record.nonce == "n-1" and not decision.record.passed and decision.record.card_uid == "11223344"


def test_a_ride_outside_its_window_is_denied_and_recorded(tmp_path: Path) -> None:
    kit = build_kit(tmp_path, location="bus-east", access_rules=RULES)
    decision = kit.engine.access(pb.Presentation(card_uid="11223344"), purpose=pb.PURPOSE_RIDE)
    assert decision.reason == "OUTSIDE_WINDOW" and decision.record.purpose == pb.PURPOSE_RIDE


def test_a_refused_code_and_a_lost_card_are_recorded_as_denials(tmp_path: Path) -> None:
    kit = build_kit(tmp_path, location="library", access_rules=RULES)
    pay_code = kit.phone().present()  # made for paying, not for a gate
    refused = kit.engine.access(pay_code)
    assert refused.reason == "CODE_WRONG_PURPOSE" and refused.record.method == pb.METHOD_CODE
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, version=1, full=True,
                                  cards=[pb.BlacklistedCard(card_uid="55667788", member_id="m1")]))
    lost = kit.engine.access(pb.Presentation(card_uid="55667788"))
    assert lost.reason == "CARD_LOST" and not lost.record.passed
    assert [q.sequence for q in kit.store.pending(limit=10)] == [1, 2]


def test_without_rules_every_access_is_no_rule(tmp_path: Path) -> None:
    kit = build_kit(tmp_path, location="library")
    assert kit.engine.access(pb.Presentation(card_uid="11223344")).reason == "NO_RULE"


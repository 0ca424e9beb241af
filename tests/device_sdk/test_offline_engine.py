"""The offline engine decides alone: caps at their exact edges, refusals, signed records, and a
queue and sequence that survive a restart."""
from __future__ import annotations

import subprocess
import sys

import nacl.signing

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device import verify_record
from onecard_device.identity import RECORD_CONTEXT
from onecard_device.offline import final_sequences

from tests.device_sdk.conftest import DEVICE, DEVICE_DAY_CAP_FEN, MERCHANT, NOW_S, TENANT, Kit, build_kit


def _card(uid: str) -> pb.Presentation:
    return pb.Presentation(card_uid=uid)


def test_a_code_pays_offline_with_a_cash_leg_of_unknown_balance_and_a_signed_record(kit: Kit) -> None:
    phone = kit.phone()
    shown = phone.present()
    decision = kit.engine.pay(shown, 1200)
    assert decision.approved and decision.reason == "APPROVED"
    record = decision.record
    assert record.sequence == 1 and record.purpose == pb.PURPOSE_PAY and record.method == pb.METHOD_CODE
    assert record.member_id == phone.member_id
    assert record.credential_id == str(phone.credential.credential_id) and record.counter == 1
    # The evidence: the code text itself, under the record's signature.
    assert record.code == shown.code and len(record.code) <= 320 and record.card_uid == ""
    assert record.amount_fen == 1200 and record.bundle_version == 1
    assert [(leg.purse_kind, leg.ref, leg.amount_fen) for leg in record.legs] == [("cash", "", 1200)]
    assert record.event_time.seconds == NOW_S


def test_caps_of_the_code_refuse_above_the_per_transaction_cap_and_pass_at_it(kit: Kit) -> None:
    phone = kit.phone()
    refused = kit.engine.pay(phone.present(), 3001, pin_verified=True)
    assert not refused.approved and refused.reason == "OFFLINE_LIMIT_EXCEEDED:code.per_transaction_fen"
    assert refused.record is None
    assert kit.engine.pay(phone.present(), 3000, pin_verified=True).approved


def test_caps_of_the_code_refuse_past_the_day_amount_and_pass_at_it(kit: Kit) -> None:
    phone = kit.phone()
    assert kit.engine.pay(phone.present(), 3000, pin_verified=True).approved
    refused = kit.engine.pay(phone.present(), 2001)
    assert refused.reason == "OFFLINE_LIMIT_EXCEEDED:code.per_day_fen"
    assert kit.engine.pay(phone.present(), 2000).approved
    assert kit.engine.pay(phone.present(), 1).reason == "OFFLINE_LIMIT_EXCEEDED:code.per_day_fen"


def test_caps_of_the_code_refuse_the_payment_after_the_day_count(kit: Kit) -> None:
    phone = kit.phone()
    for _ in range(3):
        assert kit.engine.pay(phone.present(), 100).approved
    assert kit.engine.pay(phone.present(), 100).reason == "OFFLINE_LIMIT_EXCEEDED:code.count_per_day"


def test_the_day_count_starts_again_the_next_day(kit: Kit) -> None:
    phone = kit.phone()
    for _ in range(3):
        assert kit.engine.pay(phone.present(), 100).approved
    tomorrow_s = NOW_S + 13 * 3600  # 01:00 the next day in Shanghai
    kit.clock[0] = tomorrow_s
    kit.state.mark_fresh(tomorrow_s)
    assert kit.engine.pay(phone.present(now_s=tomorrow_s), 100).approved


def test_the_rule_sets_device_cap_refuses_past_the_devices_day(kit: Kit) -> None:
    paid = 0
    while paid + 3000 <= DEVICE_DAY_CAP_FEN:
        assert kit.engine.pay(kit.phone().present(), 3000, pin_verified=True).approved
        paid += 3000
    last = DEVICE_DAY_CAP_FEN - paid
    refused = kit.engine.pay(kit.phone().present(), last + 1)
    assert refused.reason == "OFFLINE_LIMIT_EXCEEDED:device.per_day_fen"
    assert kit.engine.pay(kit.phone().present(), last).approved
    assert kit.engine.pay(kit.phone().present(), 1).reason == "OFFLINE_LIMIT_EXCEEDED:device.per_day_fen"


def test_a_pin_is_required_above_the_rule_sets_threshold(kit: Kit) -> None:
    phone = kit.phone()
    assert kit.engine.pay(phone.present(), 2501).reason == "PIN_REQUIRED"
    assert kit.engine.pay(phone.present(), 2501, pin_verified=True).approved


def test_a_replayed_code_is_refused_and_stays_refused_after_a_restart(kit: Kit) -> None:
    phone = kit.phone()
    code = phone.present()
    assert kit.engine.pay(code, 100).approved
    assert kit.engine.pay(code, 100).reason == "CODE_REPLAYED"
    restarted = kit.restart()
    assert restarted.engine.pay(code, 100).reason == "CODE_REPLAYED"
    assert restarted.engine.pay(phone.present(), 100).approved


def test_a_revoked_credential_is_refused(kit: Kit) -> None:
    phone = kit.phone()
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_REVOCATIONS, from_version=0, version=3, revocations=[
        pb.Revocation(credential_id=str(phone.credential.credential_id), member_id=phone.member_id)]))
    assert kit.engine.pay(phone.present(), 100).reason == "CODE_REVOKED"
    assert kit.engine.pay(kit.phone().present(), 100).approved


def test_a_blacklisted_card_is_refused(kit: Kit) -> None:
    assert kit.engine.pay(_card("a1b2c3d4"), 100).approved
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, version=1, full=True,
                                  cards=[pb.BlacklistedCard(card_uid="A1B2C3D4", member_id="m-1")]))
    refused = kit.engine.pay(_card("a1b2c3d4"), 100)
    assert not refused.approved and refused.reason == "CARD_LOST" and refused.record is None


def test_an_unknown_card_is_taken_with_an_empty_member_and_a_known_one_with_its_member(kit: Kit) -> None:
    unknown = kit.engine.pay(_card("0badcafe"), 100)
    assert unknown.approved and unknown.record.member_id == "" and unknown.record.card_uid == "0BADCAFE"
    assert unknown.record.method == pb.METHOD_CARD and unknown.record.code == ""
    member_id = kit.phone().member_id
    kit.state.learn_card("DEADBEEF", member_id)
    known = kit.engine.pay(_card("deadbeef"), 100)
    assert known.approved and known.record.member_id == member_id


def test_a_blocked_member_is_refused_by_code_and_by_known_card_until_unblocked(kit: Kit) -> None:
    phone = kit.phone()
    kit.state.learn_card("CAFEF00D", phone.member_id)
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=0, version=7, member_blocks=[
        pb.MemberBlock(member_id=phone.member_id, status="frozen")]))
    assert kit.engine.pay(phone.present(), 100).reason == "MEMBER_FROZEN"
    assert kit.engine.pay(_card("cafef00d"), 100).reason == "MEMBER_FROZEN"
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=7, version=8, member_blocks=[
        pb.MemberBlock(member_id=phone.member_id, status="active")]))
    assert kit.engine.pay(phone.present(), 100).approved
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=8, version=9, member_blocks=[
        pb.MemberBlock(member_id=phone.member_id, status="left")]))
    assert kit.engine.pay(phone.present(), 100).reason == "MEMBER_LEFT"


def test_a_face_cannot_pay_offline_and_nothing_is_recorded(kit: Kit) -> None:
    decision = kit.engine.pay(pb.Presentation(face_enrolment_ref="face-1"), 100)
    assert decision.reason == "UNKNOWN_FACE" and kit.store.queue_depth() == 0


def test_without_a_policy_bundle_the_device_does_not_approve(tmp_path) -> None:
    kit = build_kit(tmp_path)
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_POLICY_BUNDLE, version=2, full=True, document=b""))
    assert kit.engine.pay(kit.phone().present(), 100).reason == "OFFLINE_NOT_READY"


def test_the_plan_of_the_bundle_applies_offline(kit: Kit) -> None:
    # The device is a store POS; a canteen device of the same tenant is closed outside its meals.
    kit.state.device.scene_tags = ("canteen",)
    assert kit.engine.pay(kit.phone().present(), 100).reason == "SCENE_MISMATCH"
    kit.state.device.merchant_account_id = ""
    assert kit.engine.pay(kit.phone().present(), 100).reason == "OUTSIDE_MEAL_PERIOD"


def test_records_are_signed_by_the_device_key_over_the_documented_message(kit: Kit) -> None:
    record = kit.engine.pay(kit.phone().present(), 500).record
    assert verify_record(public_key=kit.identity.public_key, tenant_id=TENANT, device_id=DEVICE, record=record)
    body = pb.OfflineRecord()
    body.CopyFrom(record)
    body.signature = b""
    message = (RECORD_CONTEXT + TENANT.encode() + b"\x00" + DEVICE.encode() + b"\x00"
               + body.SerializeToString(deterministic=True))
    nacl.signing.VerifyKey(kit.identity.public_key).verify(message, record.signature)
    tampered = pb.OfflineRecord()
    tampered.CopyFrom(record)
    tampered.amount_fen = 1
    assert not verify_record(public_key=kit.identity.public_key, tenant_id=TENANT, device_id=DEVICE, record=tampered)
    # The code it carries is signed too: another code cannot be put in its place.
    swapped = pb.OfflineRecord()
    swapped.CopyFrom(record)
    swapped.code = kit.phone().present().code
    assert not verify_record(public_key=kit.identity.public_key, tenant_id=TENANT, device_id=DEVICE, record=swapped)
    other = nacl.signing.SigningKey.generate()
    assert not verify_record(public_key=bytes(other.verify_key), tenant_id=TENANT, device_id=DEVICE, record=record)


def test_the_queue_and_the_sequence_survive_a_restart(kit: Kit) -> None:
    for amount in (100, 200, 300):
        assert kit.engine.pay(kit.phone().present(), amount).approved
    restarted = kit.restart()
    queued = restarted.store.pending(limit=1000)
    assert [q.sequence for q in queued] == [1, 2, 3]
    assert pb.OfflineRecord.FromString(queued[1].body).amount_fen == 200
    assert restarted.engine.pay(restarted.phone().present(), 100).record.sequence == 4


def test_a_sequence_is_never_reused_even_after_its_record_left_the_queue(kit: Kit) -> None:
    first = kit.engine.pay(kit.phone().present(), 100).record
    kit.store.drop([first.sequence])
    restarted = kit.restart()
    assert restarted.engine.pay(restarted.phone().present(), 100).record.sequence == 2
    assert restarted.store.raise_sequence_floor(10) == 10
    assert restarted.engine.pay(restarted.phone().present(), 100).record.sequence == 10


def test_only_final_outcomes_leave_the_queue(kit: Kit) -> None:
    for _ in range(6):
        kit.engine.pay(kit.phone().present(), 100)
    result = pb.UploadResult(upload_id="u1", results=[
        pb.RecordResult(sequence=1, outcome=pb.RECORD_OUTCOME_BOOKED),
        pb.RecordResult(sequence=2, outcome=pb.RECORD_OUTCOME_SHORTFALL, shortfall_fen=50),
        pb.RecordResult(sequence=3, outcome=pb.RECORD_OUTCOME_DUPLICATE),
        pb.RecordResult(sequence=4, outcome=pb.RECORD_OUTCOME_CODE_REUSED),
        pb.RecordResult(sequence=5, outcome=pb.RECORD_OUTCOME_UNSPECIFIED),
    ])
    assert final_sequences(result) == [1, 2, 3, 4]
    kit.store.drop(final_sequences(result))
    assert [q.sequence for q in kit.store.pending(limit=10)] == [5, 6]
    kit.store.drop(final_sequences(pb.UploadResult(results=[
        pb.RecordResult(sequence=5, outcome=pb.RECORD_OUTCOME_REJECTED, reason="BAD_SIGNATURE")])))
    assert [q.sequence for q in kit.store.pending(limit=10)] == [6]
    assert kit.store.queue_depth() == 1 and kit.store.oldest_queued_s() == NOW_S


def test_a_refused_payment_leaves_no_record_and_no_counter(kit: Kit) -> None:
    phone = kit.phone()
    assert kit.engine.pay(phone.present(), 3001, pin_verified=True).record is None
    assert kit.store.queue_depth() == 0
    assert kit.engine.pay(phone.present(), 3000, pin_verified=True).approved  # the refusal counted nothing


def test_merchant_and_device_come_from_the_welcome(kit: Kit) -> None:
    assert kit.state.device.merchant_account_id == MERCHANT and kit.state.device.scene == "store"


def test_the_offline_engine_needs_no_grpc() -> None:
    script = ("import sys, onecard_device, onecard_device.offline, onecard_device.state, onecard_device.access;"
              "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'runtime', 'services', 'devstack'));"
              "assert not bad, bad")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr

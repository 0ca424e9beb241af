"""Sync updates, full and delta, as a device applies them; and the state across a restart."""
from __future__ import annotations

import json

import nacl.signing
import onecard_codes as codes
import pytest

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device import DeviceState, SyncError, SyncGap

from tests.device_sdk.conftest import NOW_S, TENANT, Kit, rule_set_doc


def _key(status: str = "signing") -> tuple[codes.IssuerKey, pb.TrustKey]:
    issuer = codes.IssuerKey.generate(tenant_id=TENANT)
    return issuer, pb.TrustKey(key_id=issuer.key_id.hex(), public_key=issuer.public_key, status=status)


def test_hello_lists_the_versions_held(kit: Kit) -> None:
    versions = {v.kind: v.version for v in kit.state.sync_versions()}
    assert versions == {pb.SYNC_KIND_TRUST_LIST: 1, pb.SYNC_KIND_POLICY_BUNDLE: 1}


def test_a_trust_list_delta_adds_a_key_and_retires_one(kit: Kit) -> None:
    old_phone = kit.phone()
    rotated, rotated_key = _key()
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_TRUST_LIST, from_version=1, version=2, trust_keys=[rotated_key]))
    assert len(kit.state.trust_list.keys) == 2
    assert kit.engine.pay(old_phone.present(), 100).approved
    retired = pb.TrustKey(key_id=kit.issuer.key_id.hex(), public_key=kit.issuer.public_key, status="retired")
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_TRUST_LIST, from_version=2, version=3, trust_keys=[retired]))
    assert [k.public_key for k in kit.state.trust_list.keys] == [rotated.public_key]
    assert kit.engine.pay(old_phone.present(), 100).reason == "CODE_UNKNOWN_KEY"


def test_a_full_update_replaces_what_the_device_held(kit: Kit) -> None:
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, version=4, full=True,
                                  cards=[pb.BlacklistedCard(card_uid="AAAA0001", member_id="m1")]))
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, from_version=4, version=5,
                                  cards=[pb.BlacklistedCard(card_uid="aaaa0002", member_id="m2")]))
    assert set(kit.state.card_blacklist) == {"AAAA0001", "AAAA0002"}
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, version=9, full=True,
                                  cards=[pb.BlacklistedCard(card_uid="AAAA0003", member_id="m3")]))
    assert set(kit.state.card_blacklist) == {"AAAA0003"} and kit.state.version(pb.SYNC_KIND_CARD_BLACKLIST) == 9
    phone = kit.phone()
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_REVOCATIONS, version=2, full=True, revocations=[
        pb.Revocation(credential_id=str(phone.credential.credential_id))]))
    assert kit.engine.pay(phone.present(), 100).reason == "CODE_REVOKED"
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_REVOCATIONS, version=3, full=True))
    assert kit.engine.pay(phone.present(), 100).approved


def test_a_stale_delta_changes_nothing_and_acknowledges_the_held_version(kit: Kit) -> None:
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=0, version=10, member_blocks=[
        pb.MemberBlock(member_id="m1", status="frozen")]))
    held = kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=3, version=8, member_blocks=[
        pb.MemberBlock(member_id="m1", status="active")]))
    assert held == 10 and kit.state.member_blocks == {"m1": "frozen"}


def test_a_delta_past_the_held_version_is_a_gap(kit: Kit) -> None:
    with pytest.raises(SyncGap):
        kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, from_version=5, version=6, member_blocks=[
            pb.MemberBlock(member_id="m1", status="frozen")]))
    assert kit.state.member_blocks == {} and kit.state.version(pb.SYNC_KIND_MEMBER_BLOCKS) == 0


def test_a_bundle_that_does_not_verify_is_refused_and_the_old_rules_stay(kit: Kit) -> None:
    forged = kit.bundle(version=2, key=nacl.signing.SigningKey.generate())
    with pytest.raises(SyncError) as refused:
        kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_POLICY_BUNDLE, version=2, full=True, document=forged))
    assert refused.value.reason == "BUNDLE_BAD_SIGNATURE"
    assert kit.state.bundle_version == 1 and kit.state.version(pb.SYNC_KIND_POLICY_BUNDLE) == 1
    doc = rule_set_doc()
    doc["offline"]["device"]["per_day_fen"] = 500
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_POLICY_BUNDLE, version=2, full=True,
                                  document=kit.bundle(doc, version=2)))
    assert kit.state.bundle_version == 2
    assert kit.engine.pay(kit.phone().present(), 501).reason == "OFFLINE_LIMIT_EXCEEDED:device.per_day_fen"
    assert kit.engine.pay(kit.phone().present(), 500).record.bundle_version == 2


def test_config_and_access_rules_are_whole_documents(kit: Kit) -> None:
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CONFIG, version=3, full=True, document=b'{"display": "big"}'))
    assert kit.state.config == {"display": "big"}
    with pytest.raises(SyncError):
        kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CONFIG, version=4, full=True, document=b"[1]"))
    with pytest.raises(SyncError) as refused:
        kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_ACCESS_RULES, version=1, full=True, document=b'{"rules": 1}'))
    assert refused.value.reason == "ACCESS_RULES_INVALID"
    assert kit.state.config == {"display": "big"} and kit.state.version(pb.SYNC_KIND_CONFIG) == 3


def test_the_state_survives_a_restart(kit: Kit) -> None:
    phone = kit.phone()
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_MEMBER_BLOCKS, version=2, full=True, member_blocks=[
        pb.MemberBlock(member_id=phone.member_id, status="frozen")]))
    kit.state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_CARD_BLACKLIST, version=2, full=True,
                                  cards=[pb.BlacklistedCard(card_uid="AB12CD34", member_id="m1")]))
    kit.state.learn_card("99887766", "m9")
    kit.store.save_state(kit.state.to_json())
    restarted = kit.restart()
    assert restarted.state.versions == kit.state.versions
    assert restarted.state.bundle_version == 1 and restarted.state.rule_set is not None
    assert restarted.state.card_member("99887766") == "m9"
    assert restarted.engine.pay(phone.present(), 100).reason == "MEMBER_FROZEN"
    assert restarted.engine.pay(pb.Presentation(card_uid="ab12cd34"), 100).reason == "CARD_LOST"
    assert restarted.engine.pay(kit.phone().present(), 100).approved
    assert json.loads(json.dumps(restarted.state.to_json())) == restarted.state.to_json()


def test_new_bundle_keys_in_a_welcome_drop_a_bundle_they_cannot_open(kit: Kit) -> None:
    welcome = pb.Welcome(device=pb.Device(tenant_id=TENANT, device_id=kit.identity.device_id),
                         bundle_keys=[pb.BundleKey(key_id="other", public_key=bytes(32))])
    kit.state.apply_welcome(welcome, now_s=NOW_S)
    assert kit.state.rule_set is None and kit.state.version(pb.SYNC_KIND_POLICY_BUNDLE) == 0
    assert DeviceState.from_json(kit.state.to_json()).rule_set is None

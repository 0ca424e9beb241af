"""Signed bundles: a roundtrip gives the same plans as online; any change to any byte is refused."""
from __future__ import annotations

import datetime as dt
import json

import nacl.signing
import pytest

from onecard_policy import BundleError, PurseState, counter_keys, evaluate, make_bundle, open_bundle, parse_rule_set
from onecard_policy.bundle import MAGIC
from onecard_policy.examples import UNIVERSITY_TENANT_ID, university_rule_set
from tests.policy.conftest import EMPLOYEE, cash, local, request

SIGNING_KEY = nacl.signing.SigningKey(b"\x07" * 32)
OTHER_KEY = nacl.signing.SigningKey(b"\x08" * 32)
TRUSTED = {"policy-2026-1": SIGNING_KEY.verify_key}


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return make_bundle(university_rule_set(), tenant_id=UNIVERSITY_TENANT_ID, version=7, signing_key=SIGNING_KEY,
                       key_id="policy-2026-1")


def _requests():
    purses = (PurseState("voucher", "dinner-voucher", None), PurseState("subsidy", "nutrition-2026", None),
              PurseState("cash", "main", None))
    for channel in ("online", "offline"):
        yield request(member_id=EMPLOYEE, groups={"role": "employee"}, amount_fen=650, at=local(7, 45), channel=channel)
        yield request(amount_fen=2300, at=local(18, 30), purses=purses, channel=channel, device_id="pos-north-1")
        yield request(amount_fen=900, at=local(0, 30, day=dt.date(2026, 11, 27)), channel=channel)
        yield request(merchant_id="milk-cabinet", amount_fen=350, at=local(15, 0), purses=purses, channel=channel)
        yield request(merchant_id="campus-store", amount_fen=2500, at=local(16, 0), channel=channel)
        yield request(merchant_id="gym-main", amount_fen=30000, at=local(10, 0), purses=(cash(),), channel=channel)


def test_a_bundle_opens_to_the_same_rule_set_and_version(bundle) -> None:
    rule_set, version = open_bundle(bundle, trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
    assert version == 7
    assert rule_set.digest == parse_rule_set(university_rule_set()).digest
    assert bundle.startswith(MAGIC)


def test_offline_from_the_bundle_gives_the_same_plan_as_online(bundle) -> None:
    online = parse_rule_set(university_rule_set())
    offline, _ = open_bundle(bundle, trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
    for req in _requests():
        keys = counter_keys(online, req)
        assert keys == counter_keys(offline, req)
        for counters in ({}, {key: 1 for key in keys}, {key: 9_999 for key in keys}):
            assert evaluate(online, req, counters) == evaluate(offline, req, counters)


def test_every_single_byte_flip_is_refused(bundle) -> None:
    reasons = set()
    for index in range(len(bundle)):
        for flip in (0x01, 0x80):
            tampered = bytearray(bundle)
            tampered[index] ^= flip
            with pytest.raises(BundleError) as caught:
                open_bundle(bytes(tampered), trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
            reasons.add(caught.value.reason)
    assert reasons <= {"BAD_SIGNATURE", "UNKNOWN_KEY", "MALFORMED"}
    assert "BAD_SIGNATURE" in reasons


def test_truncated_or_extended_bundles_are_refused(bundle) -> None:
    for data in (bundle[:-1], bundle + b"\x00", b"", bundle[:4], bundle[:20]):
        with pytest.raises(BundleError) as caught:
            open_bundle(data, trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
        assert caught.value.reason == "MALFORMED"


def test_another_tenants_bundle_is_refused(bundle) -> None:
    with pytest.raises(BundleError) as caught:
        open_bundle(bundle, trusted_keys=TRUSTED, tenant_id="22222222-0000-4000-8000-000000000002")
    assert caught.value.reason == "WRONG_TENANT"


def test_an_untrusted_key_is_refused(bundle) -> None:
    with pytest.raises(BundleError) as caught:
        open_bundle(bundle, trusted_keys={"other": SIGNING_KEY.verify_key}, tenant_id=UNIVERSITY_TENANT_ID)
    assert caught.value.reason == "UNKNOWN_KEY"
    with pytest.raises(BundleError) as caught:
        open_bundle(bundle, trusted_keys={"policy-2026-1": OTHER_KEY.verify_key}, tenant_id=UNIVERSITY_TENANT_ID)
    assert caught.value.reason == "BAD_SIGNATURE"


def test_a_bundle_re_signed_by_another_key_under_the_trusted_id_is_refused(bundle) -> None:
    forged = bundle[:-64] + OTHER_KEY.sign(bundle[:-64]).signature
    with pytest.raises(BundleError) as caught:
        open_bundle(forged, trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
    assert caught.value.reason == "BAD_SIGNATURE"


def test_a_changed_rule_with_fixed_lengths_is_refused(bundle) -> None:
    # the same length, a larger voucher: only the signature catches it
    tampered = bundle.replace(b'"cover_fen":1500', b'"cover_fen":9500')
    assert tampered != bundle and len(tampered) == len(bundle)
    with pytest.raises(BundleError) as caught:
        open_bundle(tampered, trusted_keys=TRUSTED, tenant_id=UNIVERSITY_TENANT_ID)
    assert caught.value.reason == "BAD_SIGNATURE"


def test_an_invalid_rule_set_is_never_bundled() -> None:
    doc = university_rule_set()
    doc["time_zone"] = "Nowhere/Land"
    with pytest.raises(ValueError):
        make_bundle(doc, tenant_id=UNIVERSITY_TENANT_ID, version=1, signing_key=SIGNING_KEY, key_id="k")


def test_a_signed_but_invalid_payload_is_malformed() -> None:
    payload = json.dumps({"format": 1, "tenant_id": UNIVERSITY_TENANT_ID, "version": 1,
                          "rule_set": {"format": 1}}).encode()
    head = MAGIC + bytes([1]) + b"k" + len(payload).to_bytes(4, "big") + payload
    data = head + SIGNING_KEY.sign(head).signature
    with pytest.raises(BundleError) as caught:
        open_bundle(data, trusted_keys={"k": SIGNING_KEY.verify_key}, tenant_id=UNIVERSITY_TENANT_ID)
    assert caught.value.reason == "MALFORMED"

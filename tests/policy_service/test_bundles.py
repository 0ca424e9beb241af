"""Bundles for devices: the published version signed with the tenant's bundle key, which opens
with the keys GetBundleKeys answers, evaluates offline to the same plan as Evaluate online, and is
refused when tampered with or presented as another tenant's."""

from __future__ import annotations

import dataclasses
import uuid

import asyncpg
import grpc
import nacl.signing
import pytest
from onecard_policy.bundle import BundleError, open_bundle
from onecard_policy.evaluate import PurseState, Request, counter_keys, evaluate

from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from services.policy import keys as policy_keys
from tests.policy_service.conftest import TEST_MASTER_KEY
from tests.policy_service.support import DINNER, LUNCH, add_voucher, campus, payment, publish, refused, university

_KINDS = {lpb.PURSE_KIND_CASH: "cash", lpb.PURSE_KIND_SUBSIDY: "subsidy", lpb.PURSE_KIND_VOUCHER: "voucher"}


async def _trusted(stub, tenant_id: str) -> dict[str, nacl.signing.VerifyKey]:  # noqa: ANN001
    answer = await stub.GetBundleKeys(pb.GetBundleKeysRequest(tenant_id=tenant_id))
    return {k.key_id: nacl.signing.VerifyKey(k.public_key) for k in answer.keys}


async def test_the_bundle_opens_with_the_tenants_keys_and_carries_the_published_version(policy):
    tenant_id = str(uuid.uuid4())
    code, reason, _ = await refused(policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PUBLISHED_RULE_SET")
    await publish(policy.stub, tenant_id, university())
    answer = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))
    keys = await _trusted(policy.stub, tenant_id)
    assert list(keys) == [answer.key_id] and len(bytes(keys[answer.key_id])) == 32
    rule_set, version = open_bundle(answer.bundle, trusted_keys=keys, tenant_id=tenant_id)
    assert (version, answer.version, rule_set.digest, answer.sha256) == (1, 1, answer.sha256, rule_set.digest)
    # The same bytes again (kept, not re-signed); a new publication makes a new bundle.
    assert (await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))).bundle == answer.bundle
    changed = university()
    changed["limits"][1]["max"] = 8000
    await publish(policy.stub, tenant_id, changed)
    newer = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))
    assert newer.version == 2 and newer.key_id == answer.key_id
    assert open_bundle(newer.bundle, trusted_keys=keys, tenant_id=tenant_id)[1] == 2


async def test_a_tampered_bundle_or_another_tenants_is_refused(policy):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await publish(policy.stub, a, university())
    await publish(policy.stub, b, university())
    bundle = (await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=a))).bundle
    keys_a, keys_b = await _trusted(policy.stub, a), await _trusted(policy.stub, b)
    assert set(keys_a).isdisjoint(keys_b)
    at = bundle.index(b'"daily-canteen"') + 40
    tampered = bundle[:at] + bytes([bundle[at] ^ 0x01]) + bundle[at + 1:]
    with pytest.raises(BundleError) as info:
        open_bundle(tampered, trusted_keys=keys_a, tenant_id=a)
    assert info.value.reason in ("BAD_SIGNATURE", "MALFORMED")
    with pytest.raises(BundleError) as info:
        open_bundle(bundle[:-1] + bytes([bundle[-1] ^ 0x80]), trusted_keys=keys_a, tenant_id=a)
    assert info.value.reason == "BAD_SIGNATURE"
    # Tenant B's devices trust only B's keys: A's bundle is from an unknown key there.
    with pytest.raises(BundleError) as info:
        open_bundle(bundle, trusted_keys=keys_b, tenant_id=b)
    assert info.value.reason == "UNKNOWN_KEY"
    with pytest.raises(BundleError) as info:
        open_bundle(bundle, trusted_keys={**keys_a, **keys_b}, tenant_id=b)
    assert info.value.reason == "WRONG_TENANT"


@pytest.mark.parametrize(("at", "amount_fen", "groups"), [
    (LUNCH, 1200, {"role": "student"}),
    (DINNER, 2000, {"role": "student"}),
    (LUNCH, 60_000, {"role": "student"}),
])
async def test_evaluating_the_bundle_offline_gives_the_online_plan(policy, ledger, at, amount_fen, groups):
    c = await campus(ledger.stub, cash_fen=50_000)
    await add_voucher(ledger.stub, c, 3000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    request = payment(c, amount_fen=amount_fen, at=at, groups=groups)
    online = (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=request))).plan

    # Offline: the device has the bundle, the member's purses and the counters it knows.
    answer = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=c.tenant_id))
    rule_set, version = open_bundle(answer.bundle, trusted_keys=await _trusted(policy.stub, c.tenant_id),
                                    tenant_id=c.tenant_id)
    balances = await ledger.stub.GetBalances(lpb.GetBalancesRequest(
        tenant_id=c.tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=c.member_id))
    purses = tuple(PurseState(kind=_KINDS[a.account.purse_kind], ref=a.account.ref,
                              available_fen=a.balance.available_fen) for a in balances.accounts)
    offline_request = Request(tenant_id=c.tenant_id, member_id=c.member_id, member_groups=groups, scene="canteen",
                              merchant_id=c.merchant_id, device_id="pos-north-1", amount_fen=amount_fen, at=at,
                              purses=purses)
    keys = counter_keys(rule_set, offline_request)
    counters = await ledger.stub.GetUsageCounters(lpb.GetUsageCountersRequest(tenant_id=c.tenant_id,
                                                                              counter_keys=keys))
    offline = evaluate(rule_set, offline_request, {u.counter_key: u.value for u in counters.counters})
    assert version == online.rule_set_version
    assert (offline.approved, offline.reason, offline.charged_fen, offline.discount_fen, offline.pin_required) == (
        online.approved, online.reason, online.charged_fen, online.discount_fen, online.pin_required)
    assert [(leg.purse_kind, leg.ref, leg.amount_fen) for leg in offline.legs] == [
        (_KINDS[leg.purse_kind], leg.ref, leg.amount_fen) for leg in online.legs]
    assert [dataclasses.astuple(g) for g in offline.guards] == [
        (g.counter_key, g.increment, g.limit) for g in online.guards]
    assert (offline.meal_period or "", offline.service_date or "") == (online.meal_period, online.service_date)


async def test_bundle_keys_are_sealed_at_rest_with_the_master_key(policy, database_url):
    tenant_id = str(uuid.uuid4())
    await publish(policy.stub, tenant_id, university())
    answer = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "policy"})
    try:
        row = await conn.fetchrow("SELECT key_id, public_key, sealed_private FROM bundle_keys WHERE tenant_id = $1",
                                  uuid.UUID(tenant_id))
    finally:
        await conn.close()
    from runtime.sealing import parse_master_key
    master = parse_master_key(TEST_MASTER_KEY)
    opened = policy_keys.open_signing_key(master_key=master, tenant_id=uuid.UUID(tenant_id), key_id=row["key_id"],
                                          public_key=bytes(row["public_key"]), sealed=bytes(row["sealed_private"]))
    assert bytes(opened.verify_key) == bytes(row["public_key"]) and row["key_id"] == answer.key_id
    assert bytes(opened) not in bytes(row["sealed_private"])
    with pytest.raises(policy_keys.MasterKeyMismatch):
        policy_keys.open_signing_key(master_key=bytes(32), tenant_id=uuid.UUID(tenant_id), key_id=row["key_id"],
                                     public_key=bytes(row["public_key"]), sealed=bytes(row["sealed_private"]))
    with pytest.raises(policy_keys.MasterKeyMismatch):
        policy_keys.open_signing_key(master_key=master, tenant_id=uuid.uuid4(), key_id=row["key_id"],
                                     public_key=bytes(row["public_key"]), sealed=bytes(row["sealed_private"]))


async def test_rotating_the_bundle_key_signs_new_bundles_with_it_and_keeps_the_old_one_verifying(policy):
    tenant_id = str(uuid.uuid4())
    await publish(policy.stub, tenant_id, university())
    old = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))

    rotated = await policy.stub.RotateBundleKey(pb.RotateBundleKeyRequest(tenant_id=tenant_id, idempotency_key="r-1"))
    assert not rotated.replayed and rotated.signing_key.signing and not rotated.previous_key.signing
    assert rotated.previous_key.key_id == old.key_id != rotated.signing_key.key_id
    listed = (await policy.stub.GetBundleKeys(pb.GetBundleKeysRequest(tenant_id=tenant_id))).keys
    assert {(k.key_id, k.signing) for k in listed} == {(old.key_id, False), (rotated.signing_key.key_id, True)}

    # The bundle of the same version is signed again, with the new key; both open with the listed keys.
    new = await policy.stub.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id))
    assert (new.version, new.key_id) == (old.version, rotated.signing_key.key_id)
    keys = await _trusted(policy.stub, tenant_id)
    assert open_bundle(old.bundle, trusted_keys=keys, tenant_id=tenant_id)[1] == 1
    assert open_bundle(new.bundle, trusted_keys=keys, tenant_id=tenant_id)[1] == 1


async def test_a_repeated_rotation_key_rotates_once_in_its_tenant(policy):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = await policy.stub.RotateBundleKey(pb.RotateBundleKeyRequest(tenant_id=a, idempotency_key="once"))
    # A tenant with no key yet gets its first: nothing was replaced.
    assert first.signing_key.key_id and not first.HasField("previous_key") and not first.replayed
    again = await policy.stub.RotateBundleKey(pb.RotateBundleKeyRequest(tenant_id=a, idempotency_key="once"))
    assert again.replayed and again.signing_key == first.signing_key
    assert len((await policy.stub.GetBundleKeys(pb.GetBundleKeysRequest(tenant_id=a))).keys) == 1

    code, reason, _ = await refused(policy.stub.RotateBundleKey(pb.RotateBundleKeyRequest(tenant_id=b)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY")
    # Keys are the tenant's: the same text in tenant B is B's own first rotation (the refusal
    # before made it no key), not a replay of A's.
    own = await policy.stub.RotateBundleKey(pb.RotateBundleKeyRequest(tenant_id=b, idempotency_key="once"))
    assert not own.replayed and not own.HasField("previous_key")
    assert own.signing_key.key_id != first.signing_key.key_id

"""Issuer keys: sealed at rest under the master key, rotated with overlap, retired on time."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import nacl.signing
import pytest

import onecard_codes as sdk
from onecard.codegen.v1 import codegen_pb2 as pb
from onecard_codes.verify import Verifier
from services.codegen import keys
from services.codegen.app import CodegenSettings
from services.codegen.client import fetch_verifier_inputs
from tests.mesh import service_values
from tests.codegen.conftest import TEST_MASTER_KEY
from tests.codegen.support import holder_key, issue, refused


def code_at(answer: pb.IssueCredentialResponse, key: nacl.signing.SigningKey, *, now_s: int, counter: int) -> str:
    return sdk.make_holder_code(credential_bytes=answer.credential_bytes, holder_signing_key=key, now_s=now_s,
                                counter=counter, purpose=sdk.Purpose.PAY)


async def test_rotation_keeps_old_codes_verifying_until_they_expire_then_retires_the_key(
        codegen, tenant_id, member_id):
    stub = codegen.stub
    key = holder_key()
    old = await issue(stub, tenant_id, member_id, key=key, validity_s=6)
    rotated = await stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id))
    assert rotated.previous_key.key_id == old.credential.key_id
    assert rotated.previous_key.status == pb.ISSUER_KEY_STATUS_VERIFYING
    assert rotated.previous_key.retire_after == old.credential.not_after
    new = await issue(stub, tenant_id, member_id, key=key, validity_s=3600)
    assert new.credential.key_id == rotated.signing_key.key_id != old.credential.key_id

    during_s = old.credential.not_before.seconds + 1
    trust_list, revocations = await fetch_verifier_inputs(stub, tenant_id=tenant_id)
    assert {k.key_id.hex() for k in trust_list.keys} == {old.credential.key_id, new.credential.key_id}
    check = Verifier(trust_list=trust_list, revocations=revocations)
    assert check.verify(code_at(old, key, now_s=during_s, counter=1), now_s=during_s,
                        expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.PAY).ok
    version_before = (await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))).version

    await asyncio.sleep(max(0.0, old.credential.not_after.seconds - time.time()) + 0.5)
    changes = await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id, since_version=version_before))
    assert [(k.key_id, k.status) for k in changes.keys] == [(old.credential.key_id, pb.ISSUER_KEY_STATUS_RETIRED)]
    assert changes.version == version_before + 1
    trust_list, revocations = await fetch_verifier_inputs(stub, tenant_id=tenant_id)
    assert {k.key_id.hex() for k in trust_list.keys} == {new.credential.key_id}
    # Even at a time the old credential was valid, a device with the new list refuses it.
    result = Verifier(trust_list=trust_list, revocations=revocations).verify(
        code_at(old, key, now_s=during_s, counter=2), now_s=during_s, expected_tenant_id=uuid.UUID(tenant_id),
        purpose=sdk.Purpose.PAY)
    assert not result.ok and result.reason is sdk.Reason.UNKNOWN_KEY
    now_s = int(time.time())
    assert Verifier(trust_list=trust_list, revocations=revocations).verify(
        code_at(new, key, now_s=now_s, counter=3), now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
        purpose=sdk.Purpose.PAY).ok


async def test_the_background_sweep_retires_a_key_nobody_asks_about(codegen, tenant_id, member_id, codegen_db):
    await issue(codegen.stub, tenant_id, member_id, validity_s=1)
    await codegen.stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id))
    deadline = time.monotonic() + 10
    while await codegen_db.fetchval("SELECT count(*) FROM issuer_keys WHERE status = 'retired'") == 0:
        assert time.monotonic() < deadline, "the sweep did not retire the old key"
        await asyncio.sleep(0.1)


async def test_the_database_holds_no_plaintext_private_key_and_another_master_key_cannot_open_it(
        codegen, tenant_id, member_id, codegen_db):
    await issue(codegen.stub, tenant_id, member_id)
    row = await codegen_db.fetchrow("SELECT tenant_id, key_id, public_key, sealed_private FROM issuer_keys")
    sealed, public_key, key_id = bytes(row["sealed_private"]), bytes(row["public_key"]), bytes(row["key_id"])
    master = keys.parse_master_key(TEST_MASTER_KEY)
    opened = keys.open_signing_key(master_key=master, tenant_id=row["tenant_id"], key_id=key_id,
                                   public_key=public_key, sealed=sealed)
    seed = bytes(opened)
    dump = b"".join(bytes(v) if isinstance(v, bytes | bytearray | memoryview) else str(v).encode()
                    for r in await codegen_db.fetch("SELECT * FROM issuer_keys") for v in r.values())
    assert seed not in dump and seed.hex().encode() not in dump
    with pytest.raises(keys.MasterKeyMismatch):
        keys.open_signing_key(master_key=bytes(32), tenant_id=row["tenant_id"], key_id=key_id,
                              public_key=public_key, sealed=sealed)
    # Bound to its row: the same blob under another tenant does not open either.
    with pytest.raises(keys.MasterKeyMismatch):
        keys.open_signing_key(master_key=master, tenant_id=uuid.uuid4(), key_id=key_id, public_key=public_key,
                              sealed=sealed)


async def test_a_service_with_the_wrong_master_key_cannot_sign(start_codegen, codegen, tenant_id, member_id):
    await issue(codegen.stub, tenant_id, member_id)
    other = await start_codegen(codegen_master_key="00" * 32)
    code, _reason = await refused(issue(other.stub, tenant_id, member_id))
    assert code == grpc.StatusCode.INTERNAL


def test_the_master_key_setting_is_required_and_must_be_32_bytes() -> None:
    base = {"database_url": "postgresql://x", "nats_url": "nats://x", "identity_target": "127.0.0.1:1",
            **service_values("codegen")}
    from runtime.settings import MissingSettingError, load_settings
    with pytest.raises(MissingSettingError, match="ONECARD_CODEGEN_MASTER_KEY"):
        load_settings(CodegenSettings, **base)
    with pytest.raises(MissingSettingError, match="ONECARD_CODEGEN_MASTER_KEY"):
        load_settings(CodegenSettings, **base, codegen_master_key="too-short")
    import base64
    raw = bytes(range(32))
    for text in (raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        assert load_settings(CodegenSettings, **base, codegen_master_key=text).master_key == raw


async def test_readers_racing_to_retire_a_due_key_change_the_trust_list_once(start_codegen, tenant_id, member_id):
    """Every GetTrustList retires what is due before answering (as the periodic sweep does, kept
    out of the way here); many at once make one change, one version — not a version per racer."""
    stub = (await start_codegen(retire_interval_s=3600)).stub
    old = await issue(stub, tenant_id, member_id, key=holder_key(), validity_s=3)
    await stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id))
    version_before = (await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))).version
    await asyncio.sleep(max(0.0, old.credential.not_after.seconds - time.time()) + 0.5)
    answers = await asyncio.gather(*(stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))
                                     for _ in range(8)))
    assert {a.version for a in answers} == {version_before + 1}
    changes = await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id, since_version=version_before))
    assert [(k.key_id, k.status) for k in changes.keys] == [(old.credential.key_id, pb.ISSUER_KEY_STATUS_RETIRED)]


async def test_a_rotation_under_an_idempotency_key_is_made_once(codegen, tenant_id, member_id):
    stub = codegen.stub
    await issue(stub, tenant_id, member_id)
    answers = await asyncio.gather(*(stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(
        tenant_id=tenant_id, idempotency_key="rotate-1")) for _ in range(3)))
    assert len({a.signing_key.key_id for a in answers}) == 1 and len({a.trust_list_version for a in answers}) == 1
    assert sorted(a.replayed for a in answers) == [False, True, True]
    trust_list = await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))
    # The first key and the one rotation's: no key per retry (the first may have retired already).
    assert answers[0].signing_key.key_id in {k.key_id for k in trust_list.keys}
    assert {k.key_id for k in trust_list.keys} <= {answers[0].previous_key.key_id, answers[0].signing_key.key_id}
    # Without a key every call rotates, as before; a bad key is refused and rotates nothing.
    plain = await stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id))
    assert not plain.replayed and plain.previous_key.key_id == answers[0].signing_key.key_id
    code, reason = await refused(stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id,
                                                                                 idempotency_key="with space")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY")
    listed = (await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))).keys
    # (the first key may have retired meanwhile: its credentials were short)
    assert plain.signing_key.key_id in {k.key_id for k in listed}
    assert {k.key_id for k in listed} <= {k.key_id for k in trust_list.keys} | {plain.signing_key.key_id}

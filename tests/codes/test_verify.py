"""The verifier refuses each kind of bad code with the right reason, and accepts good ones."""
from __future__ import annotations

import hashlib
import uuid

import nacl.bindings
import nacl.signing
import pytest

from onecard_codes import (
    CodeKind,
    Purpose,
    Reason,
    Revocations,
    TrustedKey,
    TrustList,
    issue_token_batch,
    make_holder_code,
)
from onecard_codes.format import (
    CREDENTIAL_BODY,
    HOLDER_TEXT_CHARS,
    PROOF_FIELDS,
    PROOF_TAG,
    binary_to_text,
    text_to_binary,
)
from onecard_codes.vectors import (
    IDENTITY_NONCANONICAL,
    IDENTITY_POINT,
    ORDER_8_POINT,
    forged_for_small_order_key,
    mixed_order_key,
    raw_holder_code,
    signed_by_mixed_order_key,
)
from onecard_codes.verify import ReplayCache, Verifier
from tests.codes.conftest import CAPS, MEMBER, NOT_BEFORE_S, NOW_S, OTHER_TENANT, TENANT, World


def _verify(verifier: Verifier, code: str, *, now_s: int = NOW_S, purpose: Purpose = Purpose.PAY,
            tenant: uuid.UUID = TENANT):
    return verifier.verify(code, now_s=now_s, expected_tenant_id=tenant, purpose=purpose)


def _reason(result) -> Reason | None:  # noqa: ANN001
    return None if result.ok else result.reason


def test_valid_holder_code_gives_its_fields(world: World) -> None:
    result = _verify(world.verifier(), world.code(time_s=NOW_S - 3, counter=42))
    assert result.ok
    assert result.kind is CodeKind.HOLDER
    assert (result.tenant_id, result.member_id, result.credential_id) == (TENANT, MEMBER,
                                                                          world.credential.credential_id)
    assert (result.purpose, result.caps, result.time_s, result.counter) == (Purpose.PAY, CAPS, NOW_S - 3, 42)
    assert result.not_after_s == NOT_BEFORE_S + 72 * 3600


def test_holder_code_text_is_at_most_320_characters(world: World) -> None:
    code = world.code(time_s=0xFFFFFFFF, counter=0xFFFFFFFF)
    assert len(code) == HOLDER_TEXT_CHARS <= 320
    assert code.startswith("OC1:")


def test_every_single_bit_flip_of_a_holder_code_is_refused(world: World) -> None:
    code = world.code()
    data = text_to_binary(code)
    verifier = world.verifier()
    reasons = set()
    for index in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[index] ^= 1 << bit
            result = _verify(verifier, binary_to_text(bytes(flipped)))
            assert not result.ok, f"byte {index} bit {bit} accepted"
            reasons.add(result.reason)
    # The unflipped code still verifies after all that, so nothing above was refused by accident.
    assert _verify(verifier, code).ok
    assert reasons <= {Reason.MALFORMED, Reason.UNKNOWN_KEY, Reason.BAD_SIGNATURE, Reason.WRONG_PURPOSE}


def test_every_single_bit_flip_of_a_token_is_refused(world: World) -> None:
    batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                              not_after_s=NOT_BEFORE_S + 7200, caps=CAPS, purposes=Purpose.PAY)
    token = batch.token_at(now_s=NOW_S)
    data = text_to_binary(token.text)
    verifier = world.verifier()
    for index in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[index] ^= 1 << bit
            assert not _verify(verifier, binary_to_text(bytes(flipped))).ok, f"byte {index} bit {bit} accepted"
    assert _verify(verifier, token.text).ok


def test_proof_signed_by_another_holder_key_is_a_bad_signature(world: World) -> None:
    forged = raw_holder_code(
        credential_body=world.credential.credential_bytes[:70], issuer=world.issuer,
        holder=nacl.signing.SigningKey(b"\x09" * 32), time_s=NOW_S, counter=1,
        purpose_byte=int(Purpose.PAY))
    assert _reason(_verify(world.verifier(), forged)) is Reason.BAD_SIGNATURE


def test_credential_signed_by_an_unknown_key_is_refused(world: World) -> None:
    foreign = world.issue(issuer=world.other_issuer)
    assert _reason(_verify(world.verifier(), world.code(credential=foreign))) is Reason.UNKNOWN_KEY


def test_another_tenants_key_is_the_wrong_tenant(world: World) -> None:
    foreign = world.issue(issuer=world.other_issuer)
    verifier = world.verifier(include_other=True)
    assert _reason(_verify(verifier, world.code(credential=foreign))) is Reason.WRONG_TENANT
    assert _verify(verifier, world.code(credential=foreign, counter=2), tenant=OTHER_TENANT).ok


def test_issuer_key_with_colliding_id_of_another_tenant_cannot_claim_the_tenant(world: World) -> None:
    # The same public key listed for two tenants: only the tenant it really signed for verifies,
    # because the tenant id is inside the signed message.
    listed_twice = TrustList(keys=(world.issuer.trusted(),
                                   type(world.issuer.trusted())(tenant_id=OTHER_TENANT,
                                                                public_key=world.issuer.public_key)),
                             fetched_at_s=NOW_S)
    verifier = Verifier(trust_list=listed_twice)
    result = _verify(verifier, world.code(), tenant=OTHER_TENANT)
    assert _reason(result) is Reason.WRONG_TENANT


def test_expired_credential_is_refused(world: World) -> None:
    expired = world.issue(not_before_s=NOW_S - 7200, not_after_s=NOW_S)
    assert _reason(_verify(world.verifier(), world.code(credential=expired))) is Reason.EXPIRED


def test_credential_not_yet_valid_is_refused(world: World) -> None:
    later = world.issue(not_before_s=NOW_S + 1, not_after_s=NOW_S + 7200)
    assert _reason(_verify(world.verifier(), world.code(credential=later))) is Reason.NOT_YET_VALID


@pytest.mark.parametrize(("offset_s", "reason"), [(-91, Reason.EXPIRED), (-90, None), (30, None),
                                                  (31, Reason.NOT_YET_VALID), (-3600, Reason.EXPIRED),
                                                  (3600, Reason.NOT_YET_VALID)])
def test_clock_window_is_minus_90_to_plus_30_seconds(world: World, offset_s: int, reason: Reason | None) -> None:
    assert _reason(_verify(world.verifier(), world.code(time_s=NOW_S + offset_s))) is reason


def test_custom_clock_window(world: World) -> None:
    verifier = Verifier(trust_list=world.trust_list(), clock_window_s=(-10, 5))
    assert _reason(_verify(verifier, world.code(time_s=NOW_S - 11))) is Reason.EXPIRED
    assert _reason(_verify(verifier, world.code(time_s=NOW_S + 6))) is Reason.NOT_YET_VALID


def test_revoked_by_credential_id(world: World) -> None:
    verifier = world.verifier(revocations=Revocations(credential_ids=[world.credential.credential_id]))
    assert _reason(_verify(verifier, world.code())) is Reason.REVOKED


def test_revoked_by_member_covers_credentials_issued_before(world: World) -> None:
    revocations = Revocations()
    verifier = world.verifier(revocations=revocations)
    assert _verify(verifier, world.code(counter=1)).ok
    revocations.revoke_member(member_id=MEMBER, revoked_at_s=NOW_S)
    # The credential is cached now; revocation still applies on the warm path.
    assert _reason(_verify(verifier, world.code(counter=2))) is Reason.REVOKED
    reissued = world.issue(not_before_s=NOW_S + 1, not_after_s=NOW_S + 7200)
    assert _verify(verifier, world.code(credential=reissued, time_s=NOW_S + 2, counter=3), now_s=NOW_S + 2).ok


def test_replayed_counter_at_the_same_verifier_is_refused(world: World) -> None:
    verifier = world.verifier()
    code = world.code(counter=5)
    assert _verify(verifier, code).ok
    assert _reason(_verify(verifier, code, now_s=NOW_S + 1)) is Reason.REPLAYED
    # A new proof with the same counter is a replay too.
    assert _reason(_verify(verifier, world.code(counter=5, time_s=NOW_S + 1), now_s=NOW_S + 1)) is Reason.REPLAYED


def test_out_of_order_counters_are_accepted_once_each(world: World) -> None:
    verifier = world.verifier()
    assert _verify(verifier, world.code(counter=9)).ok
    assert _verify(verifier, world.code(counter=4)).ok
    assert _reason(_verify(verifier, world.code(counter=4))) is Reason.REPLAYED


def test_the_same_code_at_another_verifier_is_accepted(world: World) -> None:
    # Verifiers do not share a replay cache; settlement dedupes (credential, counter) across devices.
    code = world.code(counter=5)
    assert _verify(world.verifier(), code).ok
    assert _verify(world.verifier(), code).ok


def test_reused_token_slot_is_refused(world: World) -> None:
    batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                              not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS, purposes=Purpose.PAY)
    verifier = world.verifier()
    token = batch.token_at(now_s=NOW_S)
    result = _verify(verifier, token.text)
    assert result.ok and result.kind is CodeKind.TOKEN and result.counter == token.sequence
    assert result.credential_id == batch.credential_id
    assert _reason(_verify(verifier, token.text, now_s=NOW_S + 20)) is Reason.REPLAYED


def test_token_batch_of_24_hours_is_1440_tokens_one_per_minute(world: World) -> None:
    batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                              not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS, purposes=Purpose.PAY)
    assert len(batch.tokens) == 1440
    assert [t.sequence for t in batch.tokens] == list(range(1440))
    assert all(b.slot_start_s == a.slot_end_s for a, b in zip(batch.tokens, batch.tokens[1:]))
    assert batch.token_at(now_s=NOT_BEFORE_S + 24 * 3600) is None


def test_token_slots_outside_the_window_are_refused(world: World) -> None:
    batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                              not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS, purposes=Purpose.PAY)
    verifier = world.verifier()
    assert _reason(_verify(verifier, batch.token_at(now_s=NOW_S + 120).text)) is Reason.NOT_YET_VALID
    assert _reason(_verify(verifier, batch.token_at(now_s=NOW_S - 200).text)) is Reason.EXPIRED


def test_revoked_token_batch_is_refused(world: World) -> None:
    batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                              not_after_s=NOT_BEFORE_S + 7200, caps=CAPS, purposes=Purpose.PAY)
    verifier = world.verifier(revocations=Revocations(credential_ids=[batch.credential_id]))
    assert _reason(_verify(verifier, batch.token_at(now_s=NOW_S).text)) is Reason.REVOKED


def test_code_for_one_purpose_is_refused_for_another(world: World) -> None:
    verifier = world.verifier()
    assert _reason(_verify(verifier, world.code(purpose=Purpose.PAY), purpose=Purpose.RIDE)) is Reason.WRONG_PURPOSE
    assert _reason(_verify(verifier, world.code(purpose=Purpose.RIDE, counter=2),
                           purpose=Purpose.ACCESS)) is Reason.WRONG_PURPOSE
    assert _verify(verifier, world.code(purpose=Purpose.RIDE, counter=3), purpose=Purpose.RIDE).ok


def test_stale_trust_list_refuses_everything(world: World) -> None:
    verifier = Verifier(trust_list=world.trust_list(fetched_at_s=NOW_S - 3601), max_trust_list_age_s=3600)
    assert _reason(_verify(verifier, world.code())) is Reason.STALE_TRUST_LIST


def test_replacing_the_trust_list_drops_cached_credentials(world: World) -> None:
    verifier = world.verifier()
    assert _verify(verifier, world.code(counter=1)).ok
    verifier.replace_trust_list(TrustList(keys=(world.other_issuer.trusted(),), fetched_at_s=NOW_S))
    assert _reason(_verify(verifier, world.code(counter=2))) is Reason.UNKNOWN_KEY


def test_bytes_input_and_garbage_give_typed_results(world: World) -> None:
    verifier = world.verifier()
    assert _verify(verifier, world.code(counter=77).encode("ascii")).ok
    for garbage in ["", "OC1:", "OC1", "oc1:" + world.code()[4:], "\x00" * 400, "OC1:" + "A" * 10_000, "é",
                    b"\xff\xfe", bytearray(b"OC1:00"), None, 17, ["OC1:"]]:
        result = verifier.verify(garbage, now_s=NOW_S, expected_tenant_id=TENANT, purpose=Purpose.PAY)  # type: ignore[arg-type]
        assert _reason(result) is Reason.MALFORMED, garbage
        assert not result.detail.startswith("internal error")


def test_replay_cache_is_bounded_and_forgets_expired_entries(world: World) -> None:
    cache = ReplayCache(max_entries=3)
    verifier = world.verifier(replay_cache=cache)
    for counter in range(5):
        assert _verify(verifier, world.code(counter=counter)).ok
    assert len(cache) == 3 and cache.evicted_live == 2
    # Three minutes later every entry is past the window and its margin; the next insert sweeps them.
    later_s = NOW_S + 200
    assert _verify(verifier, world.code(counter=99, time_s=later_s), now_s=later_s).ok
    assert len(cache) == 1


def test_credential_cache_is_bounded(world: World) -> None:
    verifier = Verifier(trust_list=world.trust_list(), credential_cache_entries=2)
    for hours in range(4):
        credential = world.issue(not_before_s=NOT_BEFORE_S + hours, not_after_s=NOT_BEFORE_S + 72 * 3600)
        assert _verify(verifier, world.code(credential=credential)).ok
    assert len(verifier._credentials) == 2


def test_holder_code_cannot_be_made_with_the_wrong_key_or_purpose(world: World) -> None:
    from onecard_codes import IssueError

    with pytest.raises(IssueError, match="not the key"):
        make_holder_code(credential_bytes=world.credential.credential_bytes,
                         holder_signing_key=nacl.signing.SigningKey(b"\x08" * 32), now_s=NOW_S, counter=1,
                         purpose=Purpose.PAY)
    with pytest.raises(IssueError, match="does not allow"):
        world.code(purpose=Purpose.ACCESS)
    with pytest.raises(IssueError, match="exactly one"):
        world.code(purpose=Purpose.PAY | Purpose.RIDE)


def test_tenant_id_may_be_given_as_a_string_but_not_as_nonsense(world: World) -> None:
    verifier = world.verifier()
    assert verifier.verify(world.code(counter=31), now_s=NOW_S, expected_tenant_id=str(TENANT), purpose=Purpose.PAY).ok
    with pytest.raises(TypeError, match="expected_tenant_id"):
        verifier.verify(world.code(counter=32), now_s=NOW_S, expected_tenant_id="tenant-a", purpose=Purpose.PAY)


def test_rotated_key_verifies_until_retired_from_the_trust_list(world: World) -> None:
    from onecard_codes import IssuerKey

    new_issuer = IssuerKey.from_seed(tenant_id=TENANT, seed=b"\x04" * 32)
    old_credential = world.credential
    new_credential = world.issue(issuer=new_issuer)
    overlap = Verifier(trust_list=TrustList(keys=(world.issuer.trusted(), new_issuer.trusted()), fetched_at_s=NOW_S))
    assert _verify(overlap, world.code(credential=old_credential, counter=1)).ok
    assert _verify(overlap, world.code(credential=new_credential, counter=1)).ok
    overlap.replace_trust_list(TrustList(keys=(new_issuer.trusted(),), fetched_at_s=NOW_S))
    assert _reason(_verify(overlap, world.code(credential=old_credential, counter=2))) is Reason.UNKNOWN_KEY
    assert _verify(overlap, world.code(credential=new_credential, counter=2)).ok


@pytest.mark.parametrize(("public_key", "order"), [(IDENTITY_POINT, 1), (IDENTITY_NONCANONICAL, 1), (ORDER_8_POINT, 8)],
                         ids=["identity", "identity-non-canonical", "order-8"])
def test_trusted_key_of_small_order_verifies_nothing(world: World, public_key: bytes, order: int) -> None:
    # Anyone can "sign" for a small-order key: R = [s]B, S = s. Listed in a trust list, it is
    # refused as a bad signature, never a tenant's key.
    trusted = TrustedKey(tenant_id=TENANT, public_key=public_key)
    assert not trusted.usable
    body = CREDENTIAL_BODY.pack(trusted.key_id, MEMBER.bytes, bytes(world.holder.verify_key), NOT_BEFORE_S,
                                NOT_BEFORE_S + 7200, *CAPS, int(Purpose.PAY))
    forged = raw_holder_code(credential_body=body, tenant_id=TENANT, holder=world.holder, time_s=NOW_S, counter=1,
                             purpose_byte=int(Purpose.PAY),
                             issuer_sign=forged_for_small_order_key(public_key, order=order))
    verifier = Verifier(trust_list=TrustList(keys=(trusted,), fetched_at_s=NOW_S))
    result = _verify(verifier, forged)
    assert _reason(result) is Reason.BAD_SIGNATURE
    assert "not a valid Ed25519 key" in result.detail


def test_holder_key_with_a_small_order_component_is_a_bad_signature(world: World) -> None:
    # libsodium alone accepts this proof (8 divides its challenge); the prime-order rule refuses
    # the key, so every verifier answers alike.
    holder_seed = b"\x05" * 32
    holder_key = mixed_order_key(holder_seed)
    body = CREDENTIAL_BODY.pack(world.issuer.key_id, MEMBER.bytes, holder_key, NOT_BEFORE_S, NOT_BEFORE_S + 7200,
                                *CAPS, int(Purpose.PAY))
    code = raw_holder_code(credential_body=body, issuer=world.issuer, time_s=NOW_S, counter=1,
                           purpose_byte=int(Purpose.PAY), holder_sign=signed_by_mixed_order_key(holder_seed))
    proof = text_to_binary(code)[-PROOF_FIELDS.size - 64:]
    message = PROOF_TAG + hashlib.sha256(text_to_binary(code)[2:136]).digest() + proof[:PROOF_FIELDS.size]
    assert nacl.bindings.crypto_sign_open(proof[PROOF_FIELDS.size:] + message, holder_key) == message
    result = _verify(world.verifier(), code)
    assert _reason(result) is Reason.BAD_SIGNATURE
    assert "holder public key" in result.detail


def test_replay_entry_is_live_through_its_last_second(world: World) -> None:
    # With no margin an entry lasts exactly as long as the clock window accepts the code: at
    # now = time + 90 the code is still inside the window, so the entry must still refuse it.
    verifier = Verifier(trust_list=world.trust_list(), replay_margin_s=0)
    code = world.code(time_s=NOW_S, counter=61)
    assert _verify(verifier, code).ok
    assert _reason(_verify(verifier, code, now_s=NOW_S + 90)) is Reason.REPLAYED
    assert _reason(_verify(verifier, code, now_s=NOW_S + 91)) is Reason.EXPIRED


def test_replay_cache_keeps_an_entry_at_its_expiry_second_and_drops_it_after() -> None:
    cache = ReplayCache()
    assert cache.check_and_record((b"c", 1), expires_at_s=100, now_s=10)
    assert not cache.check_and_record((b"c", 1), expires_at_s=200, now_s=100)
    assert cache.check_and_record((b"c", 2), expires_at_s=300, now_s=101)
    assert len(cache) == 1  # the sweep dropped (c, 1) once its last second had passed
    assert cache.check_and_record((b"c", 1), expires_at_s=300, now_s=101)

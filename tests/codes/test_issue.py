"""Issuing refuses what the format forbids before signing anything."""
from __future__ import annotations

import uuid

import nacl.bindings
import pytest

from onecard_codes import (
    IssueError,
    IssuerKey,
    OfflineCaps,
    Purpose,
    decode_code,
    issue_credential,
    is_valid_public_key,
    issue_token_batch,
    key_id_for,
)
from onecard_codes.vectors import IDENTITY_NONCANONICAL, IDENTITY_POINT, ORDER_8_POINT
from tests.codes.conftest import CAPS, MEMBER, NOT_BEFORE_S, NOW_S, TENANT, World


def test_not_after_more_than_72_hours_after_not_before_is_refused(world: World) -> None:
    with pytest.raises(IssueError, match="at most 259200 s"):
        world.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600 + 1)


def test_exactly_72_hours_is_allowed(world: World) -> None:
    issued = world.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600)
    assert issued.not_after_s - issued.not_before_s == 72 * 3600


def test_not_after_before_not_before_is_refused(world: World) -> None:
    with pytest.raises(IssueError, match="must be after"):
        world.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S)


def test_token_batch_longer_than_24_hours_is_refused(world: World) -> None:
    with pytest.raises(IssueError, match="at most 86400 s"):
        issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                          not_after_s=NOT_BEFORE_S + 24 * 3600 + 1, caps=CAPS, purposes=Purpose.PAY)


@pytest.mark.parametrize("caps", [OfflineCaps(-1, 0, 0), OfflineCaps(0, 2**32, 0), OfflineCaps(0, 0, 256),
                                  OfflineCaps(1.5, 0, 0)])
def test_caps_out_of_range_are_refused(world: World, caps: OfflineCaps) -> None:
    with pytest.raises(IssueError, match="caps"):
        issue_credential(issuer_key=world.issuer, member_id=MEMBER, holder_public_key=bytes(world.holder.verify_key),
                         not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 60, caps=caps, purposes=Purpose.PAY)


def test_empty_purposes_and_short_holder_key_are_refused(world: World) -> None:
    with pytest.raises(IssueError, match="purposes"):
        world.issue(purposes=Purpose(0))
    with pytest.raises(IssueError, match="holder_public_key"):
        issue_credential(issuer_key=world.issuer, member_id=MEMBER, holder_public_key=b"\x00" * 31,
                         not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 60, caps=CAPS, purposes=Purpose.PAY)
    with pytest.raises(IssueError, match="member_id"):
        issue_credential(issuer_key=world.issuer, member_id=str(MEMBER),  # type: ignore[arg-type]
                         holder_public_key=bytes(world.holder.verify_key), not_before_s=NOT_BEFORE_S,
                         not_after_s=NOT_BEFORE_S + 60, caps=CAPS, purposes=Purpose.PAY)


@pytest.mark.parametrize("bad_key", [IDENTITY_POINT, IDENTITY_NONCANONICAL, ORDER_8_POINT, b"\xff" * 32],
                         ids=["identity", "identity-non-canonical", "order-8", "not-a-point"])
def test_holder_key_that_is_not_a_point_of_prime_order_is_refused(world: World, bad_key: bytes) -> None:
    with pytest.raises(IssueError, match="not a valid Ed25519 public key"):
        issue_credential(issuer_key=world.issuer, member_id=MEMBER, holder_public_key=bad_key,
                         not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 60, caps=CAPS, purposes=Purpose.PAY)


def test_holder_key_with_a_small_order_component_is_refused(world: World) -> None:
    mixed = nacl.bindings.crypto_core_ed25519_add(bytes(world.holder.verify_key), ORDER_8_POINT)
    assert not is_valid_public_key(mixed) and is_valid_public_key(bytes(world.holder.verify_key))
    with pytest.raises(IssueError, match="not a valid Ed25519 public key"):
        issue_credential(issuer_key=world.issuer, member_id=MEMBER, holder_public_key=mixed,
                         not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 60, caps=CAPS, purposes=Purpose.PAY)


def test_credential_id_is_derived_from_the_signed_content(world: World) -> None:
    again = world.issue()
    assert again.credential_id == world.credential.credential_id
    assert again.credential_bytes == world.credential.credential_bytes  # Ed25519 is deterministic
    other = world.issue(not_before_s=NOT_BEFORE_S + 1)
    assert other.credential_id != world.credential.credential_id


def test_key_id_is_the_first_4_bytes_of_sha256_of_the_public_key(world: World) -> None:
    import hashlib

    assert world.issuer.key_id == hashlib.sha256(world.issuer.public_key).digest()[:4]
    assert key_id_for(world.issuer.public_key) == world.issuer.key_id
    assert world.issuer.trusted().key_id == world.issuer.key_id


def test_issuer_key_round_trips_through_its_seed() -> None:
    key = IssuerKey.generate(tenant_id=TENANT)
    again = IssuerKey.from_seed(tenant_id=TENANT, seed=key.seed)
    assert again.public_key == key.public_key


def test_decoded_holder_code_has_the_issued_fields(world: World) -> None:
    decoded = decode_code(world.code(time_s=NOW_S, counter=12, purpose=Purpose.RIDE))
    assert decoded.credential.member_id == MEMBER.bytes
    assert decoded.credential.caps == CAPS
    assert decoded.credential.purposes == Purpose.PAY | Purpose.RIDE
    assert (decoded.time_s, decoded.counter, decoded.purpose) == (NOW_S, 12, Purpose.RIDE)
    assert decoded.credential.raw == world.credential.credential_bytes


def test_token_batch_ids_are_random_unless_given(world: World) -> None:
    def batch(credential_id: uuid.UUID | None = None):
        return issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                                 not_after_s=NOT_BEFORE_S + 600, caps=CAPS, purposes=Purpose.PAY,
                                 credential_id=credential_id)

    assert batch().credential_id != batch().credential_id
    fixed = uuid.UUID(int=5)
    assert batch(fixed).credential_id == fixed
    assert len(batch().tokens) == 10

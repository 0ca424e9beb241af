"""The format doc is enough, and the vectors tell its readings apart.

``doc_verifier`` is a verifier written from docs/code-format.md alone (no onecard_codes). It
passes every vector, with and without a credential cache, and finds in each rejected vector
exactly the checks the vector says it fails. Each plausible misreading of the doc — an inclusive
end, a 32-bit time sum, a lax Ed25519, a cache that skips a check, another order of checks —
fails at least one vector, and the one meant to catch it.

One rule no vector can pin: refusing text over 320 characters *before* decoding it. Every such
text is malformed anyway, so the rule is about cost, and only the answer (MALFORMED) is pinned.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import nacl.bindings
import pytest

from tests.codes import doc_verifier as dv
from tests.codes.doc_verifier import Ed25519Reading, Reading

VECTORS_PATH = Path(__file__).resolve().parents[2] / "docs" / "code-vectors.json"
VECTORS = json.loads(VECTORS_PATH.read_text())["vectors"]
BY_NAME = {vector["name"]: vector for vector in VECTORS}


def _wrong_answers(reading: Reading) -> set[str]:
    return {vector["name"] for vector in VECTORS if dv.run(vector, reading) != vector["expected"]}


def test_the_doc_verifier_imports_nothing_of_the_sdk() -> None:
    source = Path(dv.__file__).read_text()
    assert "onecard_codes" not in source.replace("imports nothing of ``onecard_codes``", "")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_a_verifier_written_from_the_doc_gives_every_expected_result(vector: dict) -> None:
    assert dv.run(vector) == vector["expected"]
    if vector["expected"]["result"] == "VERIFIED":
        assert dv.decoded_fields(vector["code"]) == vector["decoded"]


def test_with_a_credential_cache_keyed_by_the_whole_credential_it_answers_alike() -> None:
    assert _wrong_answers(Reading(cache_key="head")) == set()


@pytest.mark.parametrize("vector", [v for v in VECTORS if "fails_checks" in v],
                         ids=[v["name"] for v in VECTORS if "fails_checks" in v])
def test_each_rejected_vector_fails_exactly_the_checks_it_lists(vector: dict) -> None:
    assert dv.failing_checks(vector) == vector["fails_checks"]


def test_the_doc_ed25519_rules_are_libsodium_verify_plus_the_prime_order_key_check(monkeypatch) -> None:  # noqa: ANN001
    # §4.4 says what to call in libsodium; check it on every signature the vectors contain.
    seen: list[tuple[bytes, bytes, bytes]] = []
    strict = dv.ed25519_verify

    def recording(public_key: bytes, message: bytes, signature: bytes, reading: Ed25519Reading) -> bool:
        seen.append((public_key, message, signature))
        return strict(public_key, message, signature, reading)

    monkeypatch.setattr(dv, "ed25519_verify", recording)
    for vector in VECTORS:
        dv.run(vector)
    assert len(seen) > 150
    for public_key, message, signature in seen:
        try:
            nacl.bindings.crypto_sign_open(signature + message, public_key)
            libsodium = nacl.bindings.crypto_core_ed25519_is_valid_point(public_key)
        except Exception:  # noqa: BLE001 - any refusal by libsodium
            libsodium = False
        assert strict(public_key, message, signature, Ed25519Reading()) == libsodium


MISREADINGS: dict[str, tuple[Reading, str]] = {
    "validity end inclusive": (Reading(not_after_inclusive=True), "expired_now_is_not_after"),
    "validity start exclusive": (Reading(not_before_exclusive=True), "holder_valid_now_is_not_before"),
    "purposes 0 allowed": (Reading(purposes_zero_allowed=True), "malformed_credential_purposes_zero"),
    "reserved purpose bits allowed": (Reading(purposes_reserved_bits_allowed=True),
                                      "malformed_credential_purposes_reserved_bit"),
    "proof purpose of several bits": (Reading(proof_purpose_any_bits=True), "malformed_proof_purpose"),
    "kind taken from the length": (Reading(kind_from_length=True), "malformed_token_with_holder_kind"),
    "unsigned version byte unchecked": (Reading(version_unchecked=True), "malformed_token_version"),
    "trailing bytes ignored": (Reading(trailing_bytes_ignored=True), "malformed_holder_one_byte_long"),
    "token sequence and alignment checked": (Reading(token_sequence_checked=True),
                                             "token_valid_unaligned_slot_any_sequence"),
    "issuers' 10 s minimum slot enforced": (Reading(min_slot_length_10=True), "token_valid_one_second_slot"),
    "only the first key with the id tried": (Reading(first_key_only=True), "holder_valid_key_id_shared_by_two_entries"),
    "stale at exactly the maximum age": (Reading(stale_at_max_age=True), "holder_valid_trust_list_at_max_age"),
    "proof time held to the validity": (Reading(proof_time_within_validity=True),
                                        "holder_valid_proof_time_before_not_before"),
    "member revocation only after not-before": (Reading(revocation_strict=True), "revoked_member_at_not_before"),
    "holder window ends excluded": (Reading(window_ends_excluded=True), "holder_valid_window_edge_past"),
    "token slot ending at now + low still usable": (Reading(token_slot_end_in_window=True), "expired_token_slot"),
    "replay entry end exclusive": (Reading(replay_end_exclusive=True),
                                   "replayed_same_code_at_window_edge_without_margin"),
    "uint32 validity span": (Reading(wrap32=frozenset({"validity_span"})),
                             "not_yet_valid_credential_at_end_of_uint32_time"),
    "uint32 slot end": (Reading(wrap32=frozenset({"slot_end"})), "malformed_token_slot_end_beyond_uint32"),
    "uint32 trust list age": (Reading(wrap32=frozenset({"age"})), "holder_valid_trust_list_fetched_after_now"),
    "uint32 clock window, high end": (Reading(wrap32=frozenset({"window"})), "holder_valid_at_end_of_uint32_time"),
    "uint32 clock window, low end": (Reading(wrap32=frozenset({"window"})), "holder_valid_near_time_zero"),
    "uint32 replay expiry": (Reading(wrap32=frozenset({"replay_expiry"})), "replayed_at_end_of_uint32_time"),
    "Ed25519: S reduced mod L": (Reading(ed25519=Ed25519Reading(s_reduced_mod_l=True)),
                                 "bad_issuer_signature_s_plus_l"),
    "Ed25519: any key": (Reading(ed25519=Ed25519Reading(any_key=True)), "bad_issuer_key_identity"),
    "Ed25519: small-order keys by their canonical encodings": (
        Reading(ed25519=Ed25519Reading(small_order_keys_by_list=True, lenient_decoding=True)),
        "bad_issuer_key_identity_non_canonical"),
    "Ed25519: libsodium's verify alone": (Reading(ed25519=Ed25519Reading(libsodium_keys=True)),
                                          "bad_holder_key_mixed_order"),
    "Ed25519: small-order R": (Reading(ed25519=Ed25519Reading(small_order_r=True)), "bad_issuer_signature_r_identity"),
    "Ed25519: lenient R compared as a point": (
        Reading(ed25519=Ed25519Reading(small_order_r=True, lenient_decoding=True, compare_points=True)),
        "bad_issuer_signature_r_negative_zero"),
    "Ed25519: cofactored equation": (Reading(ed25519=Ed25519Reading(cofactored=True)),
                                     "bad_holder_signature_r_mixed_order"),
    "cache by credential body": (Reading(cache_key="body"), "cached_credential_issuer_signature_s_plus_l_old_proof"),
    "cache by credential body, hash recomputed": (Reading(cache_key="body_rehash"),
                                                  "cached_credential_issuer_signature_s_plus_l"),
    **{f"cached credential skips check {step}": (Reading(cache_key="head", cached_skips=frozenset({step})), catcher)
       for step, catcher in [(2, "cached_credential_stale_trust_list"), (5, "cached_credential_wrong_tenant"),
                             (6, "cached_credential_expired_at_not_after"),
                             (7, "cached_credential_revoked_after_first_scan"), (8, "cached_credential_forged_proof"),
                             (9, "cached_credential_wrong_purpose"), (10, "cached_credential_proof_outside_window"),
                             (11, "replayed_holder_counter")]},
}


@pytest.mark.parametrize(("reading", "catcher"), MISREADINGS.values(), ids=MISREADINGS.keys())
def test_a_misreading_of_the_doc_fails_the_vector_meant_to_catch_it(reading: Reading, catcher: str) -> None:
    assert catcher in _wrong_answers(reading)


def _swapped(order: tuple[int, ...], a: int, b: int) -> tuple[int, ...]:
    return tuple(b if step == a else a if step == b else step for step in order)


NEIGHBOURS = [("holder", a, a + 1) for a in range(1, 11)] + [
    ("token", a, b) for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 9), (9, 10), (10, 11)]]


@pytest.mark.parametrize(("kind", "first", "second"), NEIGHBOURS, ids=[f"{k}-{a}-{b}" for k, a, b in NEIGHBOURS])
def test_checking_two_neighbours_the_other_way_round_fails_a_vector_of_that_kind(kind: str, first: int,
                                                                                second: int) -> None:
    wrong = _wrong_answers(Reading(order=_swapped(dv.DOC_ORDER, first, second)))
    assert any({first, second} <= set(BY_NAME[name].get("fails_checks", ())) and _kind(BY_NAME[name]) == kind
               for name in wrong), wrong


def test_any_other_order_of_the_checks_fails_some_vector() -> None:
    shuffle = random.Random(20260101).shuffle
    for _ in range(40):
        order = list(dv.DOC_ORDER)
        shuffle(order)
        if tuple(order) != dv.DOC_ORDER:
            assert _wrong_answers(replace(Reading(), order=tuple(order))), order


def _kind(vector: dict) -> str | None:
    binary = vector["binary_hex"]
    return {"01": "holder", "02": "token"}.get(binary[2:4]) if binary and len(binary) >= 4 else None

"""The decode SDK against raw libsodium, in the same process on the same machine.

``codes.verify_warm_ratio``: holder codes whose credential the verifier has cached (one Ed25519
check each, plus decoding, the revocation lookup and the replay-cache insert), per second,
divided by raw ``nacl.signing.VerifyKey.verify`` per second. Goal ≥ 0.8.
``codes.verify_cold_ratio``: the same with every code's credential new to the verifier (two
Ed25519 checks each). Goal ≥ 0.4.
``codes.holder_code_chars``: the text length of a holder code (limit 320).

Both sides run the same number of operations in alternating rounds; each figure is the best
round, because on a shared two-core machine disturbances only ever slow a round down.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import nacl.signing

from bench.harness import BenchContext, Figures, benchmark, format_table
from onecard_codes import (
    IssuerKey,
    OfflineCaps,
    Purpose,
    TrustList,
    issue_credential,
    issue_token_batch,
    make_holder_code,
)
from onecard_codes.format import PROOF_FIELDS, PROOF_TAG
from onecard_codes.verify import ReplayCache, Verifier

TENANT = uuid.UUID("b0b0b0b0-0000-4000-8000-000000000001")
MEMBER = uuid.UUID("b0b0b0b0-0000-4000-8000-000000000002")
NOT_BEFORE_S = 1_767_225_600
NOW_S = NOT_BEFORE_S + 3600
CAPS = OfflineCaps(per_transaction_fen=3000, per_day_fen=20000, count_per_day=20)
ROUNDS = 5
WARM_PER_ROUND = 3000
COLD_PER_ROUND = 1500
# The raw baseline signs a message as long as a holder proof's, so both sides hash alike.
PROOF_MESSAGE_BYTES = len(PROOF_TAG) + 32 + PROOF_FIELDS.size


def _rate(operation: Callable[[object], object], items: list, *, expect_verified: bool) -> float:
    """Operations per second. With ``expect_verified`` every answer must be a ``Verified``, so a
    code refused early (and cheaply) cannot flatter the figure; raw verify raises on failure."""
    answers = []
    append = answers.append
    started = time.perf_counter()
    for item in items:
        append(operation(item))
    elapsed_s = time.perf_counter() - started
    refused = [a for a in answers if not a.ok] if expect_verified else []
    if refused:
        raise RuntimeError(f"{len(refused)} benchmark operations failed, e.g. {refused[0]}")
    return len(items) / elapsed_s


def measure_verify() -> Figures:
    issuer = IssuerKey.from_seed(tenant_id=TENANT, seed=b"\x11" * 32)
    holder = nacl.signing.SigningKey(b"\x22" * 32)
    trust_list = TrustList(keys=(issuer.trusted(),), fetched_at_s=NOW_S)

    def credential(offset_s: int) -> bytes:
        return issue_credential(issuer_key=issuer, member_id=MEMBER, holder_public_key=bytes(holder.verify_key),
                                not_before_s=NOT_BEFORE_S - offset_s, not_after_s=NOT_BEFORE_S + 48 * 3600,
                                caps=CAPS, purposes=Purpose.PAY).credential_bytes

    def code(credential_bytes: bytes, counter: int) -> str:
        return make_holder_code(credential_bytes=credential_bytes, holder_signing_key=holder, now_s=NOW_S - 2,
                                counter=counter, purpose=Purpose.PAY)

    cached = credential(0)
    warm_codes = [[code(cached, r * WARM_PER_ROUND + i) for i in range(WARM_PER_ROUND)] for r in range(ROUNDS)]
    cold_codes = [[code(credential(1 + r * COLD_PER_ROUND + i), 0) for i in range(COLD_PER_ROUND)]
                  for r in range(ROUNDS)]

    raw_key = nacl.signing.VerifyKey(bytes(holder.verify_key))
    raw_signed = [holder.sign(i.to_bytes(4, "big") * (PROOF_MESSAGE_BYTES // 4) + b"\x01") for i in range(WARM_PER_ROUND)]

    def fresh_verifier() -> Verifier:
        # Sized so nothing is evicted during a round: eviction is not what is measured.
        return Verifier(trust_list=trust_list, replay_cache=ReplayCache(max_entries=4 * WARM_PER_ROUND),
                        credential_cache_entries=2 * COLD_PER_ROUND)

    raw_rps, warm_rps, cold_rps = [], [], []
    for round_index in range(ROUNDS):
        raw_rps.append(_rate(raw_key.verify, raw_signed, expect_verified=False))
        warm = fresh_verifier()
        warm.verify(code(cached, 10**9), now_s=NOW_S, expected_tenant_id=TENANT, purpose=Purpose.PAY)
        warm_rps.append(_rate(lambda c: warm.verify(c, now_s=NOW_S, expected_tenant_id=TENANT, purpose=Purpose.PAY),
                              warm_codes[round_index], expect_verified=True))
        cold = fresh_verifier()
        cold_rps.append(_rate(lambda c: cold.verify(c, now_s=NOW_S, expected_tenant_id=TENANT, purpose=Purpose.PAY),
                              cold_codes[round_index], expect_verified=True))
    best_raw = max(raw_rps)
    return {
        "codes.raw_verify_rps": best_raw,
        "codes.verify_warm_rps": max(warm_rps),
        "codes.verify_cold_rps": max(cold_rps),
        "codes.verify_warm_ratio": max(warm_rps) / best_raw,
        "codes.verify_cold_ratio": max(cold_rps) / best_raw,
        "codes.holder_code_chars": float(len(code(cached, 0xFFFFFFFF))),
    }


def measure_token_batch() -> Figures:
    issuer = IssuerKey.from_seed(tenant_id=TENANT, seed=b"\x11" * 32)
    timings_ms = []
    for _ in range(3):
        started = time.perf_counter()
        batch = issue_token_batch(issuer_key=issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                                  not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS, purposes=Purpose.PAY)
        timings_ms.append((time.perf_counter() - started) * 1000)
    assert len(batch.tokens) == 1440
    return {"codes.sdk_token_batch_24h_ms": min(timings_ms)}


@benchmark("codes.verify", description="SDK verify of holder codes (warm and cold cache) vs raw libsodium verify")
async def verify(context: BenchContext) -> Figures:
    return measure_verify()


@benchmark("codes.sdk_token_batch", description="sign a 24 h batch of 60 s rotating tokens in the SDK (no service)")
async def sdk_token_batch(context: BenchContext) -> Figures:
    return measure_token_batch()


if __name__ == "__main__":
    # ``python -m bench.codes``: these figures alone, without starting the harness's servers.
    print(format_table({**measure_verify(), **measure_token_batch()}))

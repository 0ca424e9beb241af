"""Fuzzing the decoder: any input gives a typed result, never an exception (110k inputs in all).

Two targets: arbitrary text (often behind an ``OC1:`` prefix, often in the Base45 alphabet, so
the fuzzer gets past the first checks), and valid codes' binaries with bytes flipped, set,
inserted, deleted or truncated, re-encoded as text. Each Hypothesis example carries a batch of
inputs, because Hypothesis's own cost per example is about a millisecond while a verification is
tens of microseconds: 3 000 x 20 texts + 2 500 x 20 mutants = 110 000 inputs.
Longer runs: ``ONECARD_FUZZ_SCALE=20 pytest tests/codes/test_fuzz.py`` (2.2 million inputs).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onecard_codes import Purpose, Reason, Rejected, Verified
from onecard_codes.format import BASE45_ALPHABET, binary_to_text, text_to_binary
from tests.codes.conftest import NOW_S, TENANT, World

SCALE = float(os.environ.get("ONECARD_FUZZ_SCALE", "1"))
INPUTS_PER_EXAMPLE = 20
TEXT_EXAMPLES = int(3000 * SCALE)
MUTANT_EXAMPLES = int(2500 * SCALE)
FUZZ_SETTINGS = dict(deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                            HealthCheck.data_too_large])

_texts = st.one_of(
    st.text(max_size=400),
    st.builds(lambda body: "OC1:" + body, st.text(alphabet=BASE45_ALPHABET, max_size=400)),
    st.builds(lambda prefix, body: prefix + body, st.sampled_from(["OC1:", "OC2:", "oc1:", "OC1", ""]),
              st.text(alphabet=BASE45_ALPHABET + "abc\x00é", min_size=190, max_size=330)),
    st.binary(max_size=400),
)


def _assert_typed(result: object) -> None:
    assert isinstance(result, (Verified, Rejected))
    if isinstance(result, Rejected):
        assert isinstance(result.reason, Reason)
        assert not result.detail.startswith("internal error"), result.detail


@settings(max_examples=TEXT_EXAMPLES, **FUZZ_SETTINGS)
@given(texts=st.lists(_texts, min_size=INPUTS_PER_EXAMPLE, max_size=INPUTS_PER_EXAMPLE))
def test_any_text_gives_a_typed_result(world: World, texts: list[str | bytes]) -> None:
    verifier = _verifier(world)
    for text in texts:
        _assert_typed(verifier.verify(text, now_s=NOW_S, expected_tenant_id=TENANT, purpose=Purpose.PAY))


_mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                      st.integers(min_value=0, max_value=260), st.integers(min_value=0, max_value=255))


_mutant = st.tuples(st.sampled_from(["holder", "token"]), st.lists(_mutation, min_size=1, max_size=4))


@settings(max_examples=MUTANT_EXAMPLES, **FUZZ_SETTINGS)
@given(mutants=st.lists(_mutant, min_size=INPUTS_PER_EXAMPLE, max_size=INPUTS_PER_EXAMPLE))
def test_mutated_valid_binaries_give_a_typed_result_and_are_refused(
        world: World, mutants: list[tuple[str, list[tuple[str, int, int]]]]) -> None:
    for kind, mutations in mutants:
        _check_mutant(world, kind, mutations)


def _check_mutant(world: World, kind: str, mutations: list[tuple[str, int, int]]) -> None:
    original = text_to_binary(_valid_codes(world)[kind])
    data = bytearray(original)
    for operation, position, value in mutations:
        index = position % (len(data) + 1)
        if operation == "flip" and index < len(data):
            data[index] ^= 1 << (value % 8)
        elif operation == "set" and index < len(data):
            data[index] = value
        elif operation == "insert":
            data.insert(index, value)
        elif operation == "delete" and index < len(data):
            del data[index]
        elif operation == "truncate":
            del data[index:]
    result = _verifier(world).verify(binary_to_text(bytes(data)), now_s=NOW_S, expected_tenant_id=TENANT,
                                     purpose=Purpose.PAY)
    _assert_typed(result)
    if bytes(data) != original:
        assert not result.ok


# One verifier per test function would rebuild caches 50 000 times; a shared one also exercises
# the warm path and the replay cache under garbage. It never sees the valid codes themselves.
_shared: dict[str, object] = {}


def _verifier(world: World):  # noqa: ANN202
    if "verifier" not in _shared:
        _shared["verifier"] = world.verifier()
    return _shared["verifier"]


def _valid_codes(world: World) -> dict[str, str]:
    if "codes" not in _shared:
        from onecard_codes import issue_token_batch

        from tests.codes.conftest import CAPS, MEMBER, NOT_BEFORE_S

        batch = issue_token_batch(issuer_key=world.issuer, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
                                  not_after_s=NOT_BEFORE_S + 7200, caps=CAPS, purposes=Purpose.PAY)
        _shared["codes"] = {"holder": world.code(counter=123_456), "token": batch.token_at(now_s=NOW_S).text}
    return _shared["codes"]  # type: ignore[return-value]

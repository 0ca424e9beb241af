"""Every published vector gives its expected result, and the file is what the generator makes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from onecard_codes.result import Reason
from onecard_codes.vectors import CHECK_REASONS, decoded_to_json, render, run_vector, verified_to_json

VECTORS_PATH = Path(__file__).resolve().parents[2] / "docs" / "code-vectors.json"
DOCUMENT = json.loads(VECTORS_PATH.read_text())
VECTORS = DOCUMENT["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_gives_its_expected_result(vector: dict) -> None:
    result = run_vector(vector)
    expected = vector["expected"]
    if expected["result"] == "VERIFIED":
        assert result.ok, result
        assert verified_to_json(result) == expected["fields"]
        assert decoded_to_json(vector["code"]) == vector["decoded"]
    else:
        assert not result.ok, result
        assert result.reason.value == expected["reason"]


def test_every_rejection_reason_has_a_vector() -> None:
    covered = {v["expected"]["reason"] for v in VECTORS if v["expected"]["result"] == "REJECTED"}
    assert covered == {reason.value for reason in Reason}


def test_both_kinds_have_valid_vectors() -> None:
    kinds = {v["expected"]["fields"]["kind"] for v in VECTORS if v["expected"]["result"] == "VERIFIED"}
    assert kinds == {"holder", "token"}


def test_published_file_matches_the_generator() -> None:
    assert VECTORS_PATH.read_text() == render(), "regenerate: python -m onecard_codes.vectors > docs/code-vectors.json"


def test_every_rejected_vector_names_the_checks_it_fails_and_the_first_gives_its_reason() -> None:
    for vector in VECTORS:
        if vector["expected"]["result"] == "VERIFIED":
            assert "fails_checks" not in vector, vector["name"]
            continue
        fails = vector["fails_checks"]
        assert fails == sorted(set(fails)) and set(fails) <= set(CHECK_REASONS), vector["name"]
        assert vector["expected"]["reason"] in CHECK_REASONS[fails[0]], vector["name"]


HOLDER_STEPS = list(range(1, 12))
TOKEN_STEPS = [step for step in HOLDER_STEPS if step != 8]  # tokens have no holder signature


@pytest.mark.parametrize(("kind", "steps"), [("holder", HOLDER_STEPS), ("token", TOKEN_STEPS)])
def test_every_pair_of_neighbouring_checks_fails_together_in_some_vector(kind: str, steps: list[int]) -> None:
    # Any order other than the documented one swaps some neighbours, and then answers one of these
    # vectors with the later check's reason (format doc §12.2).
    pairs = set()
    for vector in VECTORS:
        if "fails_checks" in vector and _kind_of(vector) == kind:
            pairs |= {(a, b) for a, b in zip(steps, steps[1:]) if {a, b} <= set(vector["fails_checks"])}
    assert pairs == set(zip(steps, steps[1:]))


def _kind_of(vector: dict) -> str | None:
    binary = vector["binary_hex"]
    if binary is None or len(binary) < 4:
        return None
    return {"01": "holder", "02": "token"}.get(binary[2:4])

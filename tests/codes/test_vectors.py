"""Every published vector gives its expected result, and the file is what the generator makes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from onecard_codes.result import Reason
from onecard_codes.vectors import decoded_to_json, render, run_vector, verified_to_json

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

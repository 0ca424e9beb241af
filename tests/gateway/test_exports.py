"""The one CSV writer of the gateway (OWASP CSV injection): text never becomes a formula, numbers
stay numbers."""
from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest

from gateway.exports import FORMULA_TRIGGERS, csv_text, inert_text


@pytest.mark.parametrize("trigger", FORMULA_TRIGGERS)
def test_text_beginning_with_a_formula_trigger_gets_an_apostrophe(trigger: str) -> None:
    assert inert_text(f"{trigger}HYPERLINK(\"https://evil.example\")") == f"'{trigger}HYPERLINK(\"https://evil.example\")"


def test_plain_text_and_text_with_a_trigger_inside_are_left_as_they_are() -> None:
    for text in ["cold soup", "pos-3:0001", "a=b", "", "'quoted", "2026-11-26T04:31:07Z"]:
        assert inert_text(text) == text


def test_numbers_the_code_writes_stay_numbers_and_text_that_looks_like_one_does_not() -> None:
    out = csv_text([[-500, Decimal("0.0150"), "-500", 0]])
    assert out == "-500,0.0150,\"'-500\",0\n"


def test_every_text_cell_is_quoted_so_a_separator_cannot_open_a_cell() -> None:
    # A spreadsheet that splits on ';' still sees one cell, beginning with x.
    out = csv_text([["x;=1+1", "say \"hi\"", None]], header=["a", "b", "c"])
    assert out == "a,b,c\n\"x;=1+1\",\"say \"\"hi\"\"\",\"\"\n"
    assert list(csv.reader(io.StringIO(out)))[1] == ["x;=1+1", "say \"hi\"", ""]


def test_a_bool_is_refused_rather_than_written_as_a_number() -> None:
    with pytest.raises(TypeError):
        csv_text([[True]])

"""Codes render as QR symbols in alphanumeric mode, and as text for a terminal."""
from __future__ import annotations

import pytest

from onecard_codes import qr
from tests.codes.conftest import World


def test_holder_code_is_an_alphanumeric_qr_at_level_m(world: World) -> None:
    symbol = qr.make_qr(world.code())
    assert symbol.mode == "alphanumeric"
    assert symbol.error == "M"
    assert symbol.version == 11


def test_png_svg_and_terminal_renderings(world: World, tmp_path) -> None:  # noqa: ANN001
    code = world.code()
    assert qr.render_png(code).startswith(b"\x89PNG")
    assert qr.render_svg(code).lstrip().startswith("<svg")
    text = qr.render_terminal(code, border=2)
    lines = text.splitlines()
    # 61 modules plus two of border each side, two modules a line.
    assert len(lines[0]) == 65 and len(lines) == 33
    qr.save(code, tmp_path / "code.svg")
    assert (tmp_path / "code.svg").read_text().count("<svg") == 1


def test_text_outside_the_alphanumeric_alphabet_is_refused() -> None:
    with pytest.raises(ValueError, match="alphanumeric"):
        qr.make_qr("oc1:lowercase")

"""Render a code as a QR symbol (needs the ``qr`` extra: segno).

OC1 text uses only the QR alphanumeric alphabet, so segno encodes it in alphanumeric mode
(5.5 bits a character): a 318-character holder code fits a version 11 symbol (61×61 modules) at level M.
"""
from __future__ import annotations

import io
from pathlib import Path

from onecard_codes.format import BASE45_ALPHABET

# M survives a scuffed phone screen and still keeps the symbol small enough for cheap scanners.
DEFAULT_ERROR_LEVEL = "m"


def make_qr(code_text: str, *, error_level: str = DEFAULT_ERROR_LEVEL):  # noqa: ANN201 - segno.QRCode
    """The segno QR symbol for ``code_text``, in alphanumeric mode."""
    import segno

    if any(ch not in BASE45_ALPHABET for ch in code_text):
        raise ValueError("an OC1 code uses only the QR alphanumeric alphabet")
    return segno.make_qr(code_text, mode="alphanumeric", error=error_level, boost_error=False)


def render_png(code_text: str, *, scale: int = 4, border: int = 4) -> bytes:
    out = io.BytesIO()
    make_qr(code_text).save(out, kind="png", scale=scale, border=border)
    return out.getvalue()


def render_svg(code_text: str, *, scale: int = 4, border: int = 4) -> str:
    out = io.BytesIO()
    make_qr(code_text).save(out, kind="svg", scale=scale, border=border, xmldecl=False)
    return out.getvalue().decode("utf-8")


def save(code_text: str, path: Path | str, *, scale: int = 4, border: int = 4) -> None:
    """Write a PNG or SVG (by the file's suffix)."""
    make_qr(code_text).save(str(path), scale=scale, border=border)


def render_terminal(code_text: str, *, border: int = 2) -> str:
    """The symbol as text for a terminal: two modules a line with half-block characters.

    Drawn light-on-dark-agnostic: dark modules are spaces on a full-block background, so it scans
    on dark and light terminal themes alike.
    """
    matrix = [list(row) for row in make_qr(code_text).matrix_iter(border=border)]
    if len(matrix) % 2:
        matrix.append([0] * len(matrix[0]))
    glyphs = {(0, 0): "█", (1, 1): " ", (1, 0): "▄", (0, 1): "▀"}
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        lines.append("".join(glyphs[(bool(t), bool(b))] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines)

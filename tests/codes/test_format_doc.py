"""The published format document stays true: its worked example and its SDK snippet."""
from __future__ import annotations

import json
import re
from pathlib import Path

from onecard_codes import decode_code
from onecard_codes.format import HOLDER_CODE_BYTES, HOLDER_TEXT_CHARS, TOKEN_CODE_BYTES, TOKEN_TEXT_CHARS

DOCS = Path(__file__).resolve().parents[2] / "docs"
FORMAT_DOC = (DOCS / "code-format.md").read_text()
VECTORS = {v["name"]: v for v in json.loads((DOCS / "code-vectors.json").read_text())["vectors"]}


def test_worked_example_is_the_published_vector() -> None:
    vector = VECTORS["holder_valid_pay"]
    assert vector["code"] in FORMAT_DOC
    assert vector["expected"]["fields"]["credential_id"] in FORMAT_DOC
    assert vector["decoded"]["credential_sha256"] in FORMAT_DOC
    assert vector["decoded"]["issuer_signature"][:64] in FORMAT_DOC


def test_documented_sizes_are_the_real_ones() -> None:
    assert f"{HOLDER_CODE_BYTES} bytes → {HOLDER_TEXT_CHARS}" in FORMAT_DOC
    assert f"{TOKEN_CODE_BYTES} bytes → {TOKEN_TEXT_CHARS}" in FORMAT_DOC
    assert len(decode_code(VECTORS["token_valid"]["code"]).raw) == TOKEN_CODE_BYTES


def test_sdk_snippet_runs() -> None:
    snippet = re.search(r"```python\n(.*?)```", FORMAT_DOC, re.S).group(1)
    exec(compile(snippet, "code-format.md", "exec"), {"now_s": 1_767_225_600})  # noqa: S102

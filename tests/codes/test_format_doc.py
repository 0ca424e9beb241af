"""The published format document stays true: its worked example and its SDK snippet."""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from onecard_codes import decode_code
from onecard_codes.format import HOLDER_CODE_BYTES, HOLDER_TEXT_CHARS, TOKEN_CODE_BYTES, TOKEN_TEXT_CHARS
from onecard_codes.vectors import CHECK_REASONS

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


VECTOR_PREFIXES = ("holder_", "token_", "malformed_", "stale_", "unknown_", "wrong_", "bad_", "expired_",
                   "not_yet_", "revoked_", "replayed_", "cached_", "order_", "*")


def test_every_vector_the_doc_names_exists() -> None:
    fields = {field for vector in VECTORS.values() for field in vector.get("decoded", {})}
    named = {name for name in re.findall(r"`([a-z0-9_*]+)`", FORMAT_DOC)
             if "_" in name and name.startswith(VECTOR_PREFIXES) and name not in fields and not name.endswith("_s")}
    assert len(named) > 40
    missing = sorted(name for name in named if not fnmatch.filter(VECTORS, name))
    assert not missing, f"the format doc names vectors that do not exist: {missing}"


def test_the_checks_table_gives_the_reasons_the_vectors_use() -> None:
    section = FORMAT_DOC.split("## 6. Verification", 1)[1].split("**Clock window.**", 1)[0]
    rows = {int(number): set(re.findall(r"`([A-Z_]+)`", rest))
            for number, rest in re.findall(r"^\| (\d+) \| (.*)$", section, re.M)}
    assert rows == {step: set(reasons) for step, reasons in CHECK_REASONS.items()}

"""The code page's JavaScript holder-code encoder (gateway/member_page/holdercode.js) makes every
valid holder code of docs/code-vectors.json byte for byte, in Node with its WebCrypto."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("holdercode_vectors.js")
NODE_WAIT_S = 60


def test_the_page_encoder_makes_every_valid_holder_vector_exactly() -> None:
    assert shutil.which("node"), "Node.js is needed (make test needs it for the manifest tests too)"
    vectors = json.loads((ROOT / "docs" / "code-vectors.json").read_text())
    holder_key = vectors["keys"]["holder"]["public_key"]
    expected = sum(1 for v in vectors["vectors"] if v["expected"]["result"] == "VERIFIED"
                   and v.get("binary_hex", "").startswith("0101") and len(v["binary_hex"]) == 2 * 209
                   and v["binary_hex"][44:108] == holder_key)
    assert expected > 10
    done = subprocess.run(["node", str(SCRIPT)], capture_output=True, text=True, timeout=NODE_WAIT_S, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"checked {expected}"

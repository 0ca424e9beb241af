"""The policy package stands alone: a POS installs it beside the decode SDK, without the repo."""
from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk" / "python"
PACKAGE_DIR = SDK_DIR / "onecard_policy"
ALLOWED_TOP_LEVEL = {"onecard_policy", "nacl", "__future__"}


def test_policy_imports_only_the_standard_library_and_pynacl() -> None:
    stdlib = set(sys.stdlib_module_names)
    files = list(PACKAGE_DIR.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "rules.py", "evaluate.py", "bundle.py", "examples.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in ALLOWED_TOP_LEVEL, f"{path.name} imports {name}"


def test_policy_works_with_only_itself_and_site_packages_on_the_path() -> None:
    script = (
        "import sys, datetime as dt; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import nacl.signing, onecard_policy as p;"
        "from onecard_policy.examples import university_rule_set;"
        "assert not any(m.split('.')[0] in ('runtime', 'services', 'gateway', 'devstack', 'onecard', 'tests') "
        "for m in sys.modules), sorted(sys.modules);"
        "key = nacl.signing.SigningKey(bytes(32));"
        "data = p.make_bundle(university_rule_set(), tenant_id='t', version=1, signing_key=key, key_id='k');"
        "rs, version = p.open_bundle(data, trusted_keys={'k': key.verify_key}, tenant_id='t');"
        "req = p.Request(tenant_id='t', member_id='m', member_groups={'role': 'employee'}, scene=None,"
        " merchant_id='canteen-north', device_id=None, amount_fen=500,"
        " at=dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.timezone.utc), purses=());"
        "print(p.evaluate(rs, req, {}).benefit, version)"
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(SDK_DIR), sysconfig.get_paths()["purelib"]],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["free-breakfast", "1"]


def test_the_sdk_distribution_ships_the_policy_package() -> None:
    tool = tomllib.loads((SDK_DIR / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "onecard_policy" in tool["packages"]

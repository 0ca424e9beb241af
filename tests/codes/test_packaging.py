"""The SDK stands alone: a POS maker installs it without the rest of the repo."""
from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk" / "python"
PACKAGE_DIR = SDK_DIR / "onecard_codes"
ALLOWED_TOP_LEVEL = {"onecard_codes", "nacl", "segno", "__future__"}


def test_sdk_imports_only_the_standard_library_pynacl_and_segno() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in PACKAGE_DIR.glob("*.py"):
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


def test_sdk_works_with_only_itself_and_site_packages_on_the_path() -> None:
    # -I: no PYTHONPATH, no current directory, no user site; -S: no site module, so the dev venv's
    # .pth file that puts the repo root on the path is not read. The path is then the standard
    # library plus the SDK and site-packages (for PyNaCl and segno) only.
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import onecard_codes, onecard_codes.verify, onecard_codes.vectors, onecard_codes.qr;"
        "assert not any(m.split('.')[0] in ('runtime', 'services', 'gateway', 'devstack', 'onecard') "
        "for m in sys.modules), sorted(sys.modules);"
        "from onecard_codes.vectors import build_vectors, run_vector;"
        "vs = build_vectors()['vectors'];"
        "print(sum(1 for v in vs if (run_vector(v).ok) == (v['expected']['result'] == 'VERIFIED')), len(vs))"
    )
    site_packages = sysconfig.get_paths()["purelib"]
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(SDK_DIR), site_packages],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    passed, total = completed.stdout.split()
    assert passed == total


def test_pyproject_declares_only_pynacl_and_the_qr_extra() -> None:
    project = tomllib.loads((SDK_DIR / "pyproject.toml").read_text())["project"]
    assert project["name"] == "onecard-codes"
    assert [d.split(">")[0] for d in project["dependencies"]] == ["pynacl"]
    assert [d.split(">")[0] for d in project["optional-dependencies"]["qr"]] == ["segno"]

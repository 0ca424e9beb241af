"""onecard-admin's pieces that need no mesh: its local defaults, its tables, and the kubectl plugin
(with a recording `kubectl` first on the PATH: there is no cluster here)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from devstack.config import DEFAULT_NATS_PORT, SERVICES
from onecard_admin.output import table
from onecard_admin.settings import DEFAULT_NATS_PORT as ADMIN_NATS_PORT
from onecard_admin.settings import DEFAULT_PORTS, SERVICE_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN = REPO_ROOT / "deploy" / "kubectl-plugin" / "kubectl-onecard"


def test_local_defaults_are_the_local_stacks() -> None:
    grpc_services = {spec.name: spec.default_port for spec in SERVICES if spec.protocol == "grpc"}
    assert DEFAULT_PORTS == grpc_services
    assert set(SERVICE_NAMES) == set(grpc_services)
    assert ADMIN_NATS_PORT == DEFAULT_NATS_PORT


def test_table_aligns_columns_and_marks_empty_cells() -> None:
    text = table([{"a": "x", "b": 10}, {"a": "long", "b": None}], ("a", "b"))
    assert text.splitlines() == ["A     B", "x     10", "long  -"]


def fake_kubectl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    record = tmp_path / "argv.jsonl"
    script = tmp_path / "bin" / "kubectl"
    script.parent.mkdir()
    script.write_text(f"""#!/usr/bin/env python3
import json, sys
with open({str(record)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["get", "deployment"]:
    print("registry.example/onecard:1.2.3", end="")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{script.parent}:{os.environ['PATH']}", "ONECARD_NAMESPACE": "campus"}
    return env, record


def test_kubectl_onecard_runs_the_cli_in_a_pod_with_the_ops_identity(tmp_path: Path) -> None:
    env, record = fake_kubectl(tmp_path)
    subprocess.run([str(PLUGIN), "status", "--json"], env=env, check=True, timeout=30)
    get, run = [json.loads(line) for line in record.read_text().splitlines()]
    assert get[:5] == ["get", "deployment", "gateway", "-n", "campus"]
    assert run[0] == "run" and run[2:4] == ["-n", "campus"]
    assert "--rm" in run and "--image=registry.example/onecard:1.2.3" in run
    assert "--labels=app.kubernetes.io/name=ops" in run
    assert run[run.index("--") + 1:] == ["status", "--json"]
    overrides = json.loads(next(arg for arg in run if arg.startswith("--overrides=")).removeprefix("--overrides="))
    container = overrides["spec"]["containers"][0]
    assert container["command"] == ["onecard-admin"]
    assert overrides["spec"]["volumes"] == [{"name": "tls", "secret": {"secretName": "ops-tls"}}]
    env_values = {e["name"]: e for e in container["env"]}
    assert env_values["ONECARD_TLS_DIR"]["value"] == "/var/run/onecard/tls"
    assert env_values["ONECARD_NATS_SEED"]["valueFrom"]["secretKeyRef"] == {"name": "onecard-nats-seeds", "key": "ops"}


def test_bin_onecard_admin_runs_the_module(tmp_path: Path) -> None:
    answer = subprocess.run([str(REPO_ROOT / "bin" / "onecard-admin"), "status"], capture_output=True, text=True,
                            env={**os.environ, "ONECARD_DATA_DIR": str(tmp_path)}, timeout=60)
    assert answer.returncode == 2
    assert "ONECARD_TLS_DIR" in answer.stderr and "Traceback" not in answer.stderr

"""onecard-admin's pieces that need no mesh: its local defaults, its tables, and the kubectl plugin
(with a recording `kubectl` first on the PATH: there is no cluster here)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import yaml

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
    script.parent.mkdir(parents=True, exist_ok=True)
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


def plugin(tmp_path: Path, *argv: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run the plugin with the recording kubectl; answers its outcome and each kubectl argv."""
    environ, record = fake_kubectl(tmp_path)
    record.unlink(missing_ok=True)
    answer = subprocess.run([str(PLUGIN), *argv], env={**environ, **env}, capture_output=True, text=True, timeout=30)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return answer, calls


def pod_spec(run: list[str]) -> dict[str, Any]:
    return json.loads(next(arg for arg in run if arg.startswith("--overrides=")).removeprefix("--overrides="))["spec"]


def test_kubectl_onecard_runs_the_cli_in_a_pod_with_the_ops_identity(tmp_path: Path) -> None:
    answer, (get, run) = plugin(tmp_path, "status", "--json")
    assert answer.returncode == 0, answer.stderr
    assert get[:5] == ["get", "deployment", "gateway", "-n", "campus"]
    assert run[0] == "run" and run[2:4] == ["-n", "campus"]
    assert "--rm" in run and "-i" in run and "--image=registry.example/onecard:1.2.3" in run
    assert "--labels=app.kubernetes.io/name=ops" in run and "--override-type=merge" in run
    # A merge patch replaces the generated container: the command and arguments are in the spec.
    assert "--" not in run
    spec = pod_spec(run)
    assert (spec["serviceAccountName"], spec["automountServiceAccountToken"]) == ("onecard-admin", False)
    container = spec["containers"][0]
    assert container["image"] == "registry.example/onecard:1.2.3"
    assert (container["command"], container["args"]) == (["onecard-admin"], ["status", "--json"])
    assert spec["volumes"] == [{"name": "tls", "secret": {"secretName": "ops-tls"}}]
    env_values = {e["name"]: e for e in container["env"]}
    assert env_values["ONECARD_TLS_DIR"]["value"] == "/var/run/onecard/tls"
    assert env_values["ONECARD_NATS_SEED"]["valueFrom"]["secretKeyRef"] == {"name": "onecard-nats-seeds", "key": "ops"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubectl_onecard_takes_the_namespace_from_n_anywhere_and_an_image_when_given(tmp_path: Path) -> None:
    answer, calls = plugin(tmp_path, "status", "-n", "north")
    assert answer.returncode == 0 and calls[0][3:5] == ["-n", "north"] and calls[1][2:4] == ["-n", "north"]
    assert pod_spec(calls[1])["containers"][0]["args"] == ["status"]
    answer, calls = plugin(tmp_path / "2", "--namespace=south", "--image", "reg/onecard:9", "tenants", "list")
    # With an image given, the Deployment is not asked.
    assert answer.returncode == 0 and len(calls) == 1 and calls[0][2:4] == ["-n", "south"]
    assert "--image=reg/onecard:9" in calls[0]
    assert pod_spec(calls[0])["containers"][0]["args"] == ["tenants", "list"]


def test_kubectl_onecard_passes_every_argument_through_as_one_json_string(tmp_path: Path) -> None:
    name = """O'Brien "North" $(touch pwned) `id` ; \\ \\" 北 Campus"""
    answer, calls = plugin(tmp_path, "tenants", "create", "--name", name, "--", "-n", "literal")
    assert answer.returncode == 0, answer.stderr
    # After `--` the plugin reads no option of its own: -n goes through as an argument.
    assert calls[1][2:4] == ["-n", "campus"]
    assert pod_spec(calls[1])["containers"][0]["args"] == ["tenants", "create", "--name", name, "-n", "literal"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_kubectl_onecard_refuses_what_it_cannot_pass_safely(tmp_path: Path) -> None:
    for argv, said in ((["tenants", "create", "--name", "a\nb"], "control character"),
                       (["status", "-n", "-x"], "bad namespace"), (["status", "-n", "a;b"], "bad namespace"),
                       (["migrate"], "migration Job")):
        answer, calls = plugin(tmp_path, *argv)
        assert answer.returncode == 2 and said in answer.stderr, (argv, answer.stderr)
        assert not any(call[0] == "run" for call in calls), argv


def test_kubectl_onecard_help_needs_no_cluster(tmp_path: Path) -> None:
    for flag in ("--help", "-h"):
        answer, calls = plugin(tmp_path, flag)
        assert answer.returncode == 0 and answer.stdout.startswith("kubectl onecard:") and calls == []
        assert "-n, --namespace" in answer.stdout
    answer, calls = plugin(tmp_path)
    assert answer.returncode == 2 and "Usage:" in answer.stderr and calls == []
    # After a command, --help is the command's own: it goes to onecard-admin in the pod.
    answer, calls = plugin(tmp_path, "status", "--help")
    assert pod_spec(calls[-1])["containers"][0]["args"] == ["status", "--help"]


def test_the_plugins_service_account_gets_no_token_and_the_operator_role_no_secrets() -> None:
    documents = list(yaml.safe_load_all((PLUGIN.parent / "rbac.yaml").read_text()))
    account = next(d for d in documents if d["kind"] == "ServiceAccount")
    assert (account["metadata"]["name"], account["automountServiceAccountToken"]) == ("onecard-admin", False)
    role = next(d for d in documents if d["kind"] == "Role")
    assert not any("secrets" in rule["resources"] for rule in role["rules"])


def test_bin_onecard_admin_runs_the_module(tmp_path: Path) -> None:
    answer = subprocess.run([str(REPO_ROOT / "bin" / "onecard-admin"), "status"], capture_output=True, text=True,
                            env={**os.environ, "ONECARD_DATA_DIR": str(tmp_path)}, timeout=60)
    assert answer.returncode == 2
    assert "ONECARD_TLS_DIR" in answer.stderr and "Traceback" not in answer.stderr


def test_the_version_services_report_is_the_projects() -> None:
    import tomllib

    from runtime import VERSION

    assert tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"] == VERSION

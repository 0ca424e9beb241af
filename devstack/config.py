"""What the local stack runs and on which ports: the service list and the settings read from the environment.

Every setting has a default that works on a fresh clone; each can be changed by one environment
variable, and the variable's name is what the error messages tell a user to set.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA_DIR = REPO_ROOT / ".data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PG_PORT = 55432
DEFAULT_NATS_PORT = 54222
DEFAULT_DEMO_MEMBERS = 3000
# Python services start in one to three seconds; a cold first start (bytecode compile, initdb)
# on a loaded two-core machine can take many times that.
DEFAULT_READY_TIMEOUT_S = 90.0
# A service gets SIGTERM, then this long to drain calls in flight before SIGKILL. Longer than the
# services' own shutdown grace (runtime.settings.DEFAULT_SHUTDOWN_GRACE_S) so they finish on their own.
DEFAULT_STOP_GRACE_S = 10.0
MAX_DEMO_MEMBERS = 50_000
# ONECARD_REPLICAS: processes of each gRPC service (the gateway stays one), each later replica on
# the ports of the first plus this step times its number (identity 50051, 50151, ...); every
# caller gets all of a service's addresses as one target (runtime.targets).
DEFAULT_REPLICAS = 1
MAX_REPLICAS = 4
REPLICA_PORT_STEP = 100

Protocol = Literal["grpc", "http"]


@dataclass(frozen=True)
class ServiceSpec:
    """One process of the mesh as the local stack starts it.

    gRPC services get the database, NATS and their gRPC and metrics ports; every process started
    after a gRPC service learns its address from ``ONECARD_<NAME>_TARGET``, so the gateway (and any
    service calling another) is wired without naming its peers here.
    """

    name: str
    module: str
    protocol: Protocol
    default_port: int
    default_metrics_port: int | None = None
    # Apply ``python -m <module> migrate`` before the service starts.
    migrates: bool = False
    # Child environment variable -> key in .data/secrets.json (generated once, never printed).
    secret_env: Mapping[str, str] = field(default_factory=dict)
    # A second listener and its default port (the device hub's device port), told to the child as
    # ``ONECARD_<LISTENER>_PORT`` and moved with ``ONECARD_<NAME>_<LISTENER>_PORT``.
    extra_listener: str | None = None
    default_extra_port: int | None = None

    @property
    def env_name(self) -> str:
        return self.name.upper().replace("-", "_")

    @property
    def port_setting(self) -> str:
        return f"ONECARD_{self.env_name}_PORT"

    @property
    def metrics_port_setting(self) -> str:
        return f"ONECARD_{self.env_name}_METRICS_PORT"

    @property
    def target_env(self) -> str:
        return f"ONECARD_{self.env_name}_TARGET"

    @property
    def extra_port_setting(self) -> str:
        return f"ONECARD_{self.env_name}_{(self.extra_listener or '').upper()}_PORT"


# The mesh in start order: a service comes after those it calls. A new service is one line here.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="identity", module="services.identity", protocol="grpc",
        default_port=50051, default_metrics_port=9101, migrates=True,
    ),
    # The master key sealing issuer keys is made once and kept in .data/secrets.json: a new one on
    # each start would leave every stored issuer key unreadable.
    ServiceSpec(
        name="codegen", module="services.codegen", protocol="grpc",
        default_port=50052, default_metrics_port=9102, migrates=True,
        secret_env={"ONECARD_CODEGEN_MASTER_KEY": "codegen_master_key"},
    ),
    ServiceSpec(
        name="ledger", module="services.ledger", protocol="grpc",
        default_port=50053, default_metrics_port=9103, migrates=True,
    ),
    # Policy reads the ledger at ONECARD_LEDGER_TARGET (set like every target of an earlier
    # service); its master key seals the tenants' bundle signing keys, kept like codegen's.
    ServiceSpec(
        name="policy", module="services.policy", protocol="grpc",
        default_port=50054, default_metrics_port=9104, migrates=True,
        secret_env={"ONECARD_POLICY_MASTER_KEY": "policy_master_key"},
    ),
    # The device hub calls identity, codegen, policy and the ledger, each at its
    # ONECARD_<NAME>_TARGET (all started before it), holds the devices' streams, and
    # owns the DEVICEHUB stream. No secret: device keys are public keys, enrolment tokens are stored hashed.
    # Terminals reach it on its device port (server TLS, the device stream only); the rest of the
    # mesh on 50055 with mutual TLS.
    ServiceSpec(
        name="devicehub", module="services.devicehub", protocol="grpc",
        default_port=50055, default_metrics_port=9105, migrates=True,
        extra_listener="device", default_extra_port=50056,
    ),
    # Webhooks asks the ledger who owns a transfer's accounts (ONECARD_LEDGER_TARGET), consumes the
    # identity, ledger and device hub streams, and sends to partners' endpoints; its master key seals
    # their secrets, kept like codegen's.
    ServiceSpec(
        name="webhooks", module="services.webhooks", protocol="grpc",
        default_port=50057, default_metrics_port=9106, migrates=True,
        secret_env={"ONECARD_WEBHOOKS_MASTER_KEY": "webhooks_master_key"},
    ),
    # The gateway reaches each at ONECARD_<NAME>_TARGET. Each later service is one entry here,
    # before the gateway that calls it, on the next ports: 50058/9107.
    ServiceSpec(
        name="gateway", module="gateway", protocol="http",
        default_port=8080, secret_env={"ONECARD_TOKEN_SECRET": "token_secret"},
        # The partner gRPC API (onecard.partner.v1) beside the REST port.
        extra_listener="partner_grpc", default_extra_port=8443,
    ),
)


class ConfigError(ValueError):
    """A setting the user gave cannot be used; the message names the variable."""


@dataclass(frozen=True)
class ServicePorts:
    spec: ServiceSpec
    host: str
    port: int
    metrics_port: int | None
    extra_port: int | None = None
    # 0 for the first process of the service, 1 for the second (ONECARD_REPLICAS), ...
    replica: int = 0

    @property
    def process_name(self) -> str:
        """How the stack names this process: the service's name, and for a later replica its number."""
        return self.spec.name if self.replica == 0 else f"{self.spec.name}-{self.replica + 1}"

    @property
    def extra_target(self) -> str:
        return f"{self.host}:{self.extra_port}" if self.extra_port else ""

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class PortClaim:
    """A port the stack will listen on, who takes it, and the variable that moves it."""

    port: int
    owner: str
    setting: str


@dataclass(frozen=True)
class DevstackConfig:
    data_dir: Path
    host: str
    pg_port: int
    nats_port: int
    # Existing servers to use instead of the embedded ones (DATABASE_URL, NATS_URL).
    external_database_url: str | None
    external_nats_url: str | None
    services: tuple[ServicePorts, ...]
    demo_members: int
    ready_timeout_s: float
    stop_grace_s: float
    replicas: int = DEFAULT_REPLICAS

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def secrets_path(self) -> Path:
        return self.data_dir / "secrets.json"

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / "demo-credentials.json"

    @property
    def pki_dir(self) -> Path:
        """The mesh's CA and every process's certificate (runtime.pki), made by make run."""
        return self.data_dir / "pki"

    def identity_dir(self, name: str) -> Path:
        """The TLS folder (ca.crt, tls.crt, tls.key) of the process or tool ``name``."""
        return self.pki_dir / name

    def has_service(self, name: str) -> bool:
        return any(svc.spec.name == name for svc in self.services)

    def service(self, name: str) -> ServicePorts:
        """The first process of the service ``name``."""
        for svc in self.services:
            if svc.spec.name == name:
                return svc
        raise KeyError(name)

    def replicas_of(self, name: str) -> list[ServicePorts]:
        return [svc for svc in self.services if svc.spec.name == name]

    def target_of(self, name: str) -> str:
        """What a caller of ``name`` is told (ONECARD_<NAME>_TARGET): every replica's address."""
        return ",".join(svc.target for svc in self.replicas_of(name))

    def extra_target_of(self, name: str) -> str:
        """Every replica's second listener (the hubs' device ports), comma separated."""
        return ",".join(svc.extra_target for svc in self.replicas_of(name) if svc.extra_port)

    def port_claims(self) -> list[PortClaim]:
        claims = []
        if self.external_database_url is None:
            claims.append(PortClaim(self.pg_port, "PostgreSQL", "ONECARD_PG_PORT"))
        if self.external_nats_url is None:
            claims.append(PortClaim(self.nats_port, "NATS", "ONECARD_NATS_PORT"))
        for svc in self.services:
            claims.append(PortClaim(svc.port, f"{svc.process_name} {svc.spec.protocol}", svc.spec.port_setting))
            if svc.metrics_port is not None:
                claims.append(PortClaim(svc.metrics_port, f"{svc.process_name} metrics", svc.spec.metrics_port_setting))
            if svc.extra_port is not None:
                claims.append(PortClaim(svc.extra_port, f"{svc.process_name} {svc.spec.extra_listener}",
                                        svc.spec.extra_port_setting))
        return claims

    @classmethod
    def from_env(cls, *, environ: Mapping[str, str] | None = None,
                 services: tuple[ServiceSpec, ...] = SERVICES) -> DevstackConfig:
        env = os.environ if environ is None else environ
        host = env.get("ONECARD_HOST", DEFAULT_HOST)
        replicas = _int(env, "ONECARD_REPLICAS", DEFAULT_REPLICAS, low=1, high=MAX_REPLICAS)
        first = tuple(
            ServicePorts(
                spec=spec,
                host=host,
                port=_port(env, spec.port_setting, spec.default_port),
                metrics_port=(
                    None if spec.default_metrics_port is None
                    else _port(env, spec.metrics_port_setting, spec.default_metrics_port)
                ),
                extra_port=(
                    None if spec.default_extra_port is None
                    else _port(env, spec.extra_port_setting, spec.default_extra_port)
                ),
            )
            for spec in services
        )
        resolved = tuple(_replica(svc, replica) for svc in first
                         for replica in range(replicas if svc.spec.protocol == "grpc" else 1))
        config = cls(
            data_dir=Path(env["ONECARD_DATA_DIR"]).resolve() if env.get("ONECARD_DATA_DIR") else DEFAULT_DATA_DIR,
            host=host,
            pg_port=_port(env, "ONECARD_PG_PORT", DEFAULT_PG_PORT),
            nats_port=_port(env, "ONECARD_NATS_PORT", DEFAULT_NATS_PORT),
            external_database_url=env.get("DATABASE_URL") or None,
            external_nats_url=env.get("NATS_URL") or None,
            services=resolved,
            demo_members=_int(env, "ONECARD_DEMO_MEMBERS", DEFAULT_DEMO_MEMBERS, low=0, high=MAX_DEMO_MEMBERS),
            ready_timeout_s=float(_int(env, "ONECARD_READY_TIMEOUT_S", int(DEFAULT_READY_TIMEOUT_S), low=1, high=3600)),
            stop_grace_s=float(_int(env, "ONECARD_STOP_GRACE_S", int(DEFAULT_STOP_GRACE_S), low=1, high=600)),
            replicas=replicas,
        )
        config._check_distinct_ports()
        return config

    def _check_distinct_ports(self) -> None:
        seen: dict[int, PortClaim] = {}
        for claim in self.port_claims():
            if claim.port in seen:
                other = seen[claim.port]
                raise ConfigError(
                    f"{claim.owner} and {other.owner} are both set to port {claim.port}: "
                    f"change {claim.setting} or {other.setting}"
                )
            seen[claim.port] = claim


def _replica(first: ServicePorts, replica: int) -> ServicePorts:
    """The ``replica``-th process of a service (0: ``first`` itself), on ports a step above."""
    if replica == 0:
        return first
    step = replica * REPLICA_PORT_STEP

    def moved(port: int | None) -> int | None:
        if port is None:
            return None
        if port + step > 65535:
            raise ConfigError(f"{first.spec.port_setting}: replica {replica + 1} would need port {port + step}")
        return port + step

    return ServicePorts(spec=first.spec, host=first.host, port=moved(first.port) or 0,
                        metrics_port=moved(first.metrics_port), extra_port=moved(first.extra_port), replica=replica)


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    return _int(env, name, default, low=1, high=65535)

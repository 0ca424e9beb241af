"""The mesh as processes, with N replicas of each service behind one multi-address target.

Each replica is a real ``python -m services.<name>`` child (devstack.supervisor.ManagedProcess: its
own process group, killed with the test's process), on its own ports, with the settings a cluster
would give it: its certificate (tests.mesh), its NATS account and its database role, and every
service it calls as ``ONECARD_<NAME>_TARGET=127.0.0.1:p1,127.0.0.1:p2`` (runtime.targets). The
test talks to each service through one channel to that same list (round robin), as each caller
its allow-list names (tests.mesh.AllowedCallerChannel), and terminals dial the hubs' device ports.

Migrations run once, in the test process, before any replica starts (as the cluster's migration
Job does); every replica of a service shares its schema, its durable consumers and its streams.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from devstack.servers import Nats, Postgres, free_port, start_on_free_port
from devstack.supervisor import ManagedProcess, grpc_health_probe, tail_of
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from runtime.db import migrate
from runtime.dbroles import bootstrap_statements, role_dsn, role_name
from runtime.pki import IdentityFiles
from tests.codegen.conftest import TEST_MASTER_KEY as CODEGEN_MASTER_KEY
from tests.mesh import AllowedCallerChannel, authorizer_for, nats_seed, nats_users, pg_password, pki, service_roles
from tests.policy_service.conftest import TEST_MASTER_KEY as POLICY_MASTER_KEY

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
# In start order; each calls only those before it (the hub calls all four).
SERVICES = ("identity", "codegen", "ledger", "policy", "devicehub")
CALLS = {"codegen": ("identity",), "policy": ("ledger",), "devicehub": ("identity", "codegen", "ledger", "policy")}
GRPC_SERVICES = {
    "identity": ("onecard.identity.v1.IdentityService", identity_pb2_grpc.IdentityServiceStub),
    "codegen": ("onecard.codegen.v1.CodegenService", codegen_pb2_grpc.CodegenServiceStub),
    "ledger": ("onecard.ledger.v1.LedgerService", ledger_pb2_grpc.LedgerServiceStub),
    "policy": ("onecard.policy.v1.PolicyService", policy_pb2_grpc.PolicyServiceStub),
    "devicehub": ("onecard.devicehub.v1.DeviceAdminService", devicehub_pb2_grpc.DeviceAdminServiceStub),
}
# Settings of the test's replicas beside the addresses and credentials: quick health, a policy
# replica that reads a publication at once (the hub asks any replica for the bundle), quiet logs.
EXTRA_ENV = {
    "all": {"ONECARD_HEALTH_INTERVAL_S": "0.2", "ONECARD_LOG_LEVEL": "warning", "ONECARD_METRICS_PORT": "0"},
    "codegen": {"ONECARD_CODEGEN_MASTER_KEY": CODEGEN_MASTER_KEY},
    "policy": {"ONECARD_POLICY_MASTER_KEY": POLICY_MASTER_KEY, "ONECARD_PUBLISHED_CACHE_S": "0",
               "ONECARD_LEDGER_TIMEOUT_S": "30"},
    # Generous deadlines: on a loaded two-core machine a payment may queue for seconds, and a
    # timeout would change an outcome the rush compares.
    "devicehub": {"ONECARD_SYNC_DEBOUNCE_S": "0.02", "ONECARD_HANDSHAKE_TIMEOUT_S": "10",
                  "ONECARD_DOWNSTREAM_TIMEOUT_S": "20"},
}


@dataclass
class Replica:
    service: str
    index: int
    port: int
    process: ManagedProcess
    # The hub's device port (terminals), 0 for the other services.
    device_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def device_address(self) -> str:
        return f"127.0.0.1:{self.device_port}"

    def signal(self, sig: signal.Signals) -> None:
        assert self.process.process is not None
        self.process.process.send_signal(sig)


@dataclass
class ReplicaStack:
    """``replicas`` processes of each service on their own database and NATS."""

    # The services a stack runs, in start order (a subclass may add some).
    services: ClassVar[tuple[str, ...]] = SERVICES

    replicas: int
    root: Path
    postgres: Postgres
    database_url: str = ""
    nats: Nats | None = None
    running: dict[str, list[Replica]] = field(default_factory=dict)
    _channels: list[AllowedCallerChannel] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return self.nats.url

    def target(self, service: str) -> str:
        """The one setting every caller of ``service`` gets: all its replicas' addresses."""
        return ",".join(replica.address for replica in self.running[service])

    def device_targets(self) -> list[str]:
        return [replica.device_address for replica in self.running["devicehub"]]

    def client(self, service: str) -> Any:
        """``.stub`` of ``service`` over one round-robin channel to all its replicas."""
        full_name, stub_cls = GRPC_SERVICES[service]
        channel = AllowedCallerChannel(self.target(service), server_name=service,
                                       authorizer=authorizer_for(full_name))
        self._channels.append(channel)
        return SimpleNamespace(stub=stub_cls(channel), target=self.target(service))

    async def start(self, *, database: str) -> None:
        await self.prepare(database=database)
        await self.launch()

    async def prepare(self, *, database: str) -> None:
        """The database with the services' roles, NATS, every schema migrated, and each replica's
        process made, not started (a caller may put something between them first)."""
        self.database_url = self.postgres.create_database(database)
        self.postgres.run_sql(bootstrap_statements(database=database, roles=service_roles()), database=database)
        tls, users = IdentityFiles(pki().tls_dir("nats")), nats_users()
        self.nats = await asyncio.to_thread(
            start_on_free_port, lambda port: Nats(self.root / "nats", port, tls=tls, users=users))
        for service in self.services:
            module = __import__(f"services.{service}.app", fromlist=["SCHEMA", "MIGRATIONS_DIR"])
            await migrate(self._dsn(service), schema=module.SCHEMA, migrations_dir=module.MIGRATIONS_DIR)
        for service in self.services:
            self.running[service] = [
                Replica(service=service, index=index, port=free_port(),
                        device_port=free_port() if service == "devicehub" else 0,
                        process=ManagedProcess(name=f"{service}-{index}", argv=[sys.executable, "-m",
                                                                                 f"services.{service}"],
                                               env={}, log_path=self.root / "logs" / f"{service}-{index}.log"))
                for index in range(self.replicas)]

    async def launch(self) -> None:
        """Start every replica prepared, with its settings, and wait until each serves."""
        for service in self.services:
            for replica in self.running[service]:
                replica.process.env = self._env(replica)
                replica.process.start()
        await asyncio.gather(*(self.wait_serving(replica) for replicas in self.running.values()
                               for replica in replicas))

    def _dsn(self, service: str) -> str:
        return role_dsn(self.database_url, role=role_name(service), password=pg_password(service))

    def _env(self, replica: Replica) -> dict[str, str]:
        service = replica.service
        env = {key: value for key, value in os.environ.items() if not key.startswith("ONECARD_")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "ONECARD_TLS_DIR": str(pki().tls_dir(service)),
            "ONECARD_NATS_SEED": nats_seed(service),
            "ONECARD_NATS_URL": self.nats_url,
            "ONECARD_DATABASE_URL": self._dsn(service),
            "ONECARD_GRPC_HOST": "127.0.0.1",
            "ONECARD_GRPC_PORT": str(replica.port),
            **EXTRA_ENV["all"],
            **EXTRA_ENV.get(service, {}),
        })
        for callee in CALLS.get(service, ()):
            env[f"ONECARD_{callee.upper()}_TARGET"] = self.target(callee)
        if replica.device_port:
            env["ONECARD_DEVICE_PORT"] = str(replica.device_port)
        return env

    async def wait_serving(self, replica: Replica, *, timeout_s: float = READY_TIMEOUT_S) -> None:
        probe = grpc_health_probe(replica.address, tls=pki().tls("ops"), server_name=replica.service)
        deadline = time.monotonic() + timeout_s
        while not await probe():
            code = replica.process.returncode()
            if code is not None:
                raise AssertionError(f"{replica.process.name} exited with {code}:\n{tail_of(replica.process.log_path)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{replica.process.name} not serving in {timeout_s} s:\n"
                                     f"{tail_of(replica.process.log_path)}")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        for service in reversed(SERVICES):
            await asyncio.gather(*(replica.process.stop(grace_s=STOP_GRACE_S)
                                   for replica in self.running.get(service, [])))
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)


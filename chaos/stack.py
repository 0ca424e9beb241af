"""The mesh as processes for the chaos run: PostgreSQL and NATS of its own (so both can be
restarted), one process of each service (tests.replicas.stack.ReplicaStack: certificates from the
test CA, NATS accounts, database roles), the webhooks service too, and the TCP proxy between the
hub and policy (chaos.proxy). Each fault it can inflict is a method here.

The mesh identity (its CA, nkeys, role passwords) is the test suite's (tests.mesh): a chaos run is
a throwaway stack in a scratch folder, as a test's is, and shares its helpers rather than a copy.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from devstack.servers import Postgres, start_on_free_port
from devstack.supervisor import grpc_health_probe
from chaos.proxy import TcpProxy
from chaos.schedule import SERVICES
from onecard.webhooks.v1 import webhooks_pb2_grpc
from tests.mesh import pki
from tests.replicas import stack as replicas
from tests.replicas.stack import GRPC_SERVICES, Replica, ReplicaStack

WEBHOOKS_MASTER_KEY = "cd" * 32
GRPC_SERVICES.setdefault("webhooks", ("onecard.webhooks.v1.WebhookService", webhooks_pb2_grpc.WebhookServiceStub))
CHAOS_ENV = {
    # A payment must meet the faults: the hub gives up on policy after a few seconds (a till
    # waits longer), so a delayed or paused hop makes answers that never come and unknown outcomes.
    "devicehub": {"ONECARD_DOWNSTREAM_TIMEOUT_S": "4", "ONECARD_SYNC_DEBOUNCE_S": "0.02",
                  "ONECARD_HANDSHAKE_TIMEOUT_S": "10"},
    "policy": {"ONECARD_LEDGER_TIMEOUT_S": "6"},
    "webhooks": {"ONECARD_WEBHOOKS_MASTER_KEY": WEBHOOKS_MASTER_KEY, "ONECARD_WEBHOOKS_ALLOW_LOOPBACK_HTTP": "1",
                 "ONECARD_WEBHOOKS_BACKOFF_BASE_S": "0.5", "ONECARD_WEBHOOKS_BACKOFF_CAP_S": "2",
                 "ONECARD_WEBHOOKS_POLL_S": "0.1", "ONECARD_LEDGER_TIMEOUT_S": "5"},
}
CALLS = {**replicas.CALLS, "webhooks": ("ledger",)}
DATABASE = "chaos"


@dataclass
class Kill:
    """What one kill found: the process was running when SIGKILL reached it."""
    service: str
    pid: int
    was_running: bool
    exit_code: int | None


@dataclass
class ChaosStack(ReplicaStack):
    """One process of each service on a PostgreSQL and a NATS this run owns."""

    services: ClassVar[tuple[str, ...]] = SERVICES
    proxy: TcpProxy | None = None
    kills: list[Kill] = field(default_factory=list)
    pauses: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)

    @classmethod
    async def create(cls, root: Path) -> ChaosStack:
        password = secrets.token_urlsafe(24)
        # fsync on: a PostgreSQL restart must keep every commit it acknowledged.
        postgres = await asyncio.to_thread(
            start_on_free_port, lambda port: Postgres(root / "postgres", port, fsync=True, password=password))
        return cls(replicas=1, root=root, postgres=postgres)

    async def start(self, *, database: str = DATABASE) -> None:
        await self.prepare(database=database)
        # The hub reaches policy through the proxy the schedule delays and drops.
        policy = self.running["policy"][0]
        self.proxy = TcpProxy(upstream_host="127.0.0.1", upstream_port=policy.port)
        await self.proxy.start()
        await self.launch()

    def _env(self, replica: Replica) -> dict[str, str]:
        env = super()._env(replica)
        env.update(CHAOS_ENV.get(replica.service, {}))
        for callee in CALLS.get(replica.service, ()):
            env[f"ONECARD_{callee.upper()}_TARGET"] = self.target(callee)
        if replica.service == "devicehub":
            assert self.proxy is not None
            env["ONECARD_POLICY_TARGET"] = self.proxy.address
        return env

    def replica(self, service: str) -> Replica:
        return self.running[service][0]

    # ---- faults ----

    async def kill(self, service: str) -> Kill:
        """SIGKILL the service's process (it must be running), and wait until it is gone."""
        process = self.replica(service).process
        assert process.process is not None
        pid = process.process.pid
        was_running = process.returncode() is None
        with contextlib.suppress(ProcessLookupError):
            process.process.send_signal(signal.SIGCONT)  # a paused process dies as well
            process.process.kill()
        code = await process.wait_exit(timeout_s=30)
        kill = Kill(service=service, pid=pid, was_running=was_running, exit_code=code)
        self.kills.append(kill)
        return kill

    async def restart(self, service: str) -> None:
        """Start the service again on its own port, with its own settings, and wait until it serves."""
        replica = self.replica(service)
        replica.process.start()
        self.restarts.append(service)
        await self.wait_serving(replica, timeout_s=120)

    def pause(self, service: str) -> None:
        self.replica(service).signal(signal.SIGSTOP)
        self.pauses.append(service)

    def resume(self, service: str) -> None:
        replica = self.replica(service)
        if replica.process.returncode() is None:
            replica.signal(signal.SIGCONT)

    async def restart_nats(self, down_s: float) -> None:
        assert self.nats is not None
        await asyncio.to_thread(self.nats.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.nats.start)  # the same port, the same JetStream store

    async def restart_postgres(self, down_s: float) -> None:
        await asyncio.to_thread(self.postgres.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.postgres.start)  # the same data folder and port

    async def all_serving(self, *, timeout_s: float = 120.0) -> None:
        """Every service running and SERVING (a dead one is started again)."""
        for service in SERVICES:
            replica = self.replica(service)
            self.resume(service)
            if replica.process.returncode() is not None:
                await self.restart(service)
        await asyncio.gather(*(self.wait_serving(self.replica(s), timeout_s=timeout_s) for s in SERVICES))

    async def serving(self, service: str) -> bool:
        replica = self.replica(service)
        probe = grpc_health_probe(replica.address, tls=pki().tls("ops"), server_name=service)
        return await probe()

    async def stop(self) -> None:
        for service in SERVICES:
            self.resume(service)
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        for service in reversed(SERVICES):
            for replica in self.running.get(service, []):
                await replica.process.stop(grace_s=replicas.STOP_GRACE_S)
        if self.proxy is not None:
            await self.proxy.stop()
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
        await asyncio.to_thread(self.postgres.stop)



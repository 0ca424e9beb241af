"""`make run`: PostgreSQL and NATS, migrations, every service and the gateway, the demo campus.

Order of start: the mesh's CA and every process's certificate (made on the first run, renewed
when close to expiry, and checked again every hour while the stack runs), the two servers
(embedded, unless DATABASE_URL / NATS_URL name existing ones), then each service in ``SERVICES``
order (migrate, start, wait until healthy), then the seed.

While it runs, a service or the gateway that dies is started again on the same ports with the same
certificate and credentials, after a back-off (devstack.supervisor.Backoff), with a line saying so;
one that fails to come back several times in a row stops the platform. PostgreSQL and NATS are not
restarted: every service's data path runs through them, so their death stops the platform with a
message that says so (run ``make run`` again; the data folder is kept).

Order of stop, on Ctrl-C, SIGTERM or a service given up on: the services in reverse (SIGTERM and a
grace period, then SIGKILL), then NATS, then PostgreSQL. The data folder stays for the next run.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

import asyncpg

from devstack.config import ConfigError, DevstackConfig, ServicePorts
from devstack.private import load_or_create_secrets, write_private_text
from devstack.seed import DEMO_TENANT_NAME, SeedError, SeedResult, seed_demo
from devstack.seed_rules import RulesSeed, seed_rules
from devstack.servers import Nats, Postgres
from devstack.supervisor import (
    Backoff,
    ManagedProcess,
    ProcessFailed,
    Probe,
    grpc_health_probe,
    http_ready_probe,
    restart_until_healthy,
    run_to_completion,
    tail_of,
    wait_healthy,
)
from devstack.walkthrough import walkthrough
from runtime.dbroles import ServiceRole, bootstrap, role_dsn, role_name
from runtime.mesh import MeshTLS
from runtime.nats_access import new_seed, public_key
from runtime.pki import IdentityFiles, ensure_identity
from services.nats_accounts import NATS_ACCOUNTS

READY_MARKER = "onecard is ready"
MIGRATION_TIMEOUT_S = 120.0
WATCH_INTERVAL_S = 0.5
SERVER_STOP_TIMEOUT_S = 30.0
# Progress lines written to a pipe or file (CI logs), which cannot be rewritten in place.
PIPED_PROGRESS_EVERY_S = 2.0
# How far above a busy port to look for a free one to suggest.
PORT_SUGGESTION_SPAN = 100
# The small fleet `make run` starts so the platform is visibly alive (ONECARD_SIMULATOR=0: none).
SIMULATOR_ARGS = ["--pos", "3", "--gates", "2", "--members", "30", "--rate", "1", "--offline-share", "0.25",
                  "--report-every-s", "30", "--drain-s", "5"]
SIMULATOR_POLL_S = 1.0
# Tools of the local stack that call the mesh, each with a certificate of its own: the operator
# (grpcurl, the ops CLI), devstack itself (health probes, the seed, the e-code helper) and the
# simulated fleet.
TOOL_IDENTITIES = ("ops", "devstack", "simulator")
# The embedded nats-server's own certificate.
NATS_IDENTITY = "nats"
PKI_CHECK_INTERVAL_S = 3600.0
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")

T = TypeVar("T")


class StackError(RuntimeError):
    """The stack cannot start; the message tells the user what to do."""


POSTGRES_PASSWORD_KEY = "postgres_password"


def pg_password_key(name: str) -> str:
    """The key of the service ``name``'s database role password in .data/secrets.json."""
    return f"pg_password_{name}"


def nats_seed_key(name: str) -> str:
    """The key of ``name``'s NATS nkey seed in .data/secrets.json."""
    return f"nats_seed_{name}"


def redact_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1***\3", url)


def shown_path(path: Path) -> str:
    """Paths relative to where the user stands when that is shorter to read."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


@dataclass
class Console:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    _progress_open: bool = False
    _last_progress_s: float = 0.0

    @property
    def interactive(self) -> bool:
        return self.out.isatty()

    def line(self, text: str = "") -> None:
        self._end_progress()
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        # A closed terminal (SIGHUP) or a closed pipe must not stop the orderly shutdown halfway.
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text)
            self.out.flush()

    def status(self, name: str, state: str, detail: str = "") -> None:
        self.line(f"  {name:<10} {state:<9} {detail}".rstrip())

    def progress(self, text: str, *, final: bool) -> None:
        """One line rewritten in place on a terminal; into a file or pipe, a line every few seconds."""
        if final:
            self.status("seed", "", text)
        elif self.interactive:
            self._write(f"\r  {'seed':<10} {'':<9} {text}\033[K")
            self._progress_open = True
        elif time.monotonic() - self._last_progress_s >= PIPED_PROGRESS_EVERY_S:
            self._last_progress_s = time.monotonic()
            self.status("seed", "", text)

    def _end_progress(self) -> None:
        if self._progress_open:
            self._write("\r\033[K")
            self._progress_open = False


def port_in_use(*, host: str, port: int) -> bool:
    with socket.socket() as sock:
        # The servers set SO_REUSEADDR too, so a port in TIME_WAIT from the last run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _free_port_near(*, host: str, port: int, taken: set[int]) -> int | None:
    for candidate in range(port + 1, min(port + PORT_SUGGESTION_SPAN, 65535)):
        if candidate not in taken and not port_in_use(host=host, port=candidate):
            return candidate
    return None


def leftover_servers(data_dir: Path) -> list[tuple[int, str]]:
    """Processes still running on this data folder: the servers of a run that was killed, not stopped.

    A run ended by SIGKILL cannot stop PostgreSQL and nats-server (the services die with it, by
    their parent-death signal); they keep the ports, and the next run must say so, not just "busy".
    """
    marker = str(data_dir)
    found: list[tuple[int, str]] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = [arg.decode(errors="replace") for arg in (entry / "cmdline").read_bytes().split(b"\0") if arg]
            if argv and any(marker in arg for arg in argv[1:]):
                found.append((int(entry.name), Path(argv[0]).name))
    return sorted(found)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        return f"{' '.join(map(str, exc.cmd[:1]))} exited with {exc.returncode}\n{output.strip()}"
    return str(exc)


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking ``fn`` in a thread; if cancelled meanwhile, still wait for it to finish.

    So a Ctrl-C while PostgreSQL is starting lets it finish starting before it is stopped, instead
    of racing a start and a stop on one process.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


@dataclass
class Stack:
    config: DevstackConfig
    console: Console
    postgres: Postgres | None = None
    nats: Nats | None = None
    database_url: str = ""
    nats_url: str = ""
    processes: list[tuple[ServicePorts, ManagedProcess]] = field(default_factory=list)
    # Per service name: its readiness check (the same at start and at restart), when it last
    # became healthy (monotonic) and its restart back-off.
    probes: dict[str, Probe] = field(default_factory=dict)
    healthy_since: dict[str, float] = field(default_factory=dict)
    backoffs: dict[str, Backoff] = field(default_factory=dict)
    # Not watched: if the simulator ends, the platform goes on without it.
    simulator: ManagedProcess | None = None
    _simulator_shown: int = 0
    _tls: MeshTLS | None = None
    nats_seeds: dict[str, str] = field(default_factory=dict)
    pg_passwords: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_services(self) -> list[ServicePorts]:
        return [svc for svc in self.config.services if svc.spec.protocol == "grpc"]

    @property
    def database_name(self) -> str:
        return urlsplit(self.database_url).path.lstrip("/") or "postgres"

    def ensure_certificates(self) -> int:
        """Every process's certificate under the data folder, issued or renewed as needed; answers
        how many were (re)issued. Running servers pick a renewed certificate up by themselves."""
        names = list(dict.fromkeys(svc.spec.name for svc in self.config.services)) + list(TOOL_IDENTITIES) \
            + [NATS_IDENTITY]
        return sum(ensure_identity(self.config.pki_dir, name)[1] for name in names)

    @property
    def tls(self) -> MeshTLS:
        """devstack's own certificate, for its probes and the seed."""
        if self._tls is None:
            self._tls = MeshTLS.load(self.config.identity_dir("devstack"))
        return self._tls

    def check_ports(self) -> None:
        claims = self.config.port_claims()
        busy = [c for c in claims if port_in_use(host=self.config.host, port=c.port)]
        if not busy:
            return
        taken = {c.port for c in claims}
        lines = [f"port {claim.port} ({claim.owner}) is already in use on {self.config.host}" for claim in busy]
        leftovers = leftover_servers(self.config.data_dir)
        if leftovers:
            listed = ", ".join(f"{name} pid {pid}" for pid, name in leftovers)
            pids = " ".join(str(pid) for pid, _name in leftovers)
            raise StackError(
                "\n".join(lines)
                + f"\nAn earlier run on {shown_path(self.config.data_dir)} did not stop cleanly and its servers "
                f"still run ({listed}).\nStop them, then run again:\n    kill {pids}"
            )
        moves = []
        for claim in busy:
            suggestion = _free_port_near(host=self.config.host, port=claim.port, taken=taken)
            if suggestion is not None:
                taken.add(suggestion)
                moves.append(f"{claim.setting}={suggestion}")
        hint = f"\nStop what holds them, or choose other ports, e.g.:\n    {' '.join(moves)} make run" if moves else ""
        raise StackError("\n".join(lines) + hint)

    async def start(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.check_ports()
        secret_names = {key for svc in config.services for key in svc.spec.secret_env.values()}
        secrets = load_or_create_secrets(config.secrets_path, names=sorted(secret_names))
        self.nats_seeds = load_or_create_secrets(config.secrets_path, names=[nats_seed_key(n) for n in NATS_ACCOUNTS],
                                                 make=new_seed)
        self.pg_passwords = load_or_create_secrets(
            config.secrets_path, names=[POSTGRES_PASSWORD_KEY, *(pg_password_key(s.spec.name) for s in self.grpc_services)])
        issued = await asyncio.to_thread(self.ensure_certificates)
        self.console.status("pki", "ready", f"CA and certificates in {shown_path(config.pki_dir)}"
                            + (f"  ({issued} issued)" if issued else ""))
        await self._start_servers()
        for svc in config.services:
            await self._start_service(svc, secrets=secrets)

    async def _start_servers(self) -> None:
        config = self.config
        if config.external_database_url:
            self.database_url = config.external_database_url
            self.console.status("postgres", "external", redact_url(self.database_url))
        else:
            self.postgres = Postgres(config.data_dir / "postgres", config.pg_port, host=config.host,
                                     password=self.pg_passwords[POSTGRES_PASSWORD_KEY])
            started = time.monotonic()
            try:
                await _in_thread(self.postgres.start)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                raise StackError(f"PostgreSQL did not start: {_describe(exc)}") from exc
            self.database_url = self.postgres.dsn()
            self.console.status(
                "postgres", "started",
                f"{config.host}:{config.pg_port}  pid {self.postgres.process.pid if self.postgres.process else '?'}"
                f"  {time.monotonic() - started:.1f}s  log {shown_path(self.postgres.log_path)}",
            )
        # One role per service, whatever its replicas (ONECARD_REPLICAS) share.
        names = dict.fromkeys(svc.spec.name for svc in self.grpc_services)
        roles = [ServiceRole(schema=name, password=self.pg_passwords[pg_password_key(name)]) for name in names]
        try:
            await bootstrap(self.database_url, database=self.database_name, roles=roles)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StackError(f"could not give the services their PostgreSQL roles: {exc}") from exc
        self.console.status("postgres", "roles", ", ".join(role.role for role in roles))
        if config.external_nats_url:
            self.nats_url = config.external_nats_url
            self.console.status("nats", "external", redact_url(self.nats_url))
        else:
            # TLS only, and only the accounts of services.nats_accounts (public keys in its config).
            users = {name: (public_key(self.nats_seeds[nats_seed_key(name)]), access)
                     for name, access in NATS_ACCOUNTS.items()}
            self.nats = Nats(config.data_dir / "nats", config.nats_port, host=config.host,
                             tls=IdentityFiles(config.identity_dir(NATS_IDENTITY)), users=users)
            started = time.monotonic()
            try:
                await _in_thread(self.nats.start)
            except (RuntimeError, OSError) as exc:
                raise StackError(f"nats-server did not start: {_describe(exc)}") from exc
            self.nats_url = self.nats.url
            self.console.status(
                "nats", "started",
                f"{config.host}:{config.nats_port}  pid {self.nats.process.pid if self.nats.process else '?'}"
                f"  {time.monotonic() - started:.1f}s  log {shown_path(self.nats.log_path)}",
            )

    def service_env(self, svc: ServicePorts, *, secrets: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        # Unbuffered, so a crash leaves its last words in the log the user is pointed to.
        env["PYTHONUNBUFFERED"] = "1"
        env["ONECARD_TLS_DIR"] = str(self.config.identity_dir(svc.spec.name))
        for earlier, _process in self.processes:
            if earlier.spec.protocol == "grpc":
                # Every replica of it (ONECARD_REPLICAS): calls go round robin (runtime.targets).
                env[earlier.spec.target_env] = self.config.target_of(earlier.spec.name)
        if svc.spec.protocol == "grpc":
            env.update({
                "ONECARD_DATABASE_URL": role_dsn(self.database_url, role=role_name(svc.spec.name),
                                                 password=self.pg_passwords[pg_password_key(svc.spec.name)]),
                "ONECARD_NATS_URL": self.nats_url,
                "ONECARD_NATS_SEED": self.nats_seeds[nats_seed_key(svc.spec.name)],
                "ONECARD_GRPC_HOST": svc.host,
                "ONECARD_GRPC_PORT": str(svc.port),
                "ONECARD_METRICS_PORT": str(svc.metrics_port or 0),
            })
            if svc.extra_port is not None and svc.spec.extra_listener:
                env[f"ONECARD_{svc.spec.extra_listener.upper()}_PORT"] = str(svc.extra_port)
        else:
            # The gateway follows identity's grant events with its own NATS account.
            env.update({"ONECARD_HTTP_HOST": svc.host, "ONECARD_HTTP_PORT": str(svc.port),
                        "ONECARD_NATS_URL": self.nats_url,
                        "ONECARD_NATS_SEED": self.nats_seeds[nats_seed_key(svc.spec.name)]})
            if svc.extra_port is not None and svc.spec.extra_listener:
                env[f"ONECARD_{svc.spec.extra_listener.upper()}_PORT"] = str(svc.extra_port)
        for env_name, secret_key in svc.spec.secret_env.items():
            env[env_name] = secrets[secret_key]
        return env

    async def _start_service(self, svc: ServicePorts, *, secrets: dict[str, str]) -> None:
        config = self.config
        spec = svc.spec
        env = self.service_env(svc, secrets=secrets)
        name = svc.process_name
        if spec.migrates and svc.replica == 0:
            migration = ManagedProcess(
                name=f"{spec.name} migrate",
                argv=[sys.executable, "-m", spec.module, "migrate"],
                env=env,
                log_path=config.logs_dir / f"{spec.name}-migrate.log",
            )
            started = time.monotonic()
            await run_to_completion(migration, timeout_s=MIGRATION_TIMEOUT_S, grace_s=config.stop_grace_s)
            self.console.status(spec.name, "migrated", f"{time.monotonic() - started:.1f}s")
        process = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", spec.module],
            env=env,
            log_path=config.logs_dir / f"{name}.log",
        )
        process.start()
        self.processes.append((svc, process))
        if spec.protocol == "grpc":
            probe = grpc_health_probe(svc.target, tls=self.tls, server_name=spec.name)
            where = f"grpc {svc.target}" + (f"  {spec.extra_listener} :{svc.extra_port}" if svc.extra_port else "") \
                + (f"  metrics :{svc.metrics_port}" if svc.metrics_port else "")
        else:
            probe = http_ready_probe(f"{svc.base_url}/readyz")
            where = svc.base_url
        self.probes[name] = probe
        took_s = await wait_healthy(process, probe=probe, timeout_s=config.ready_timeout_s)
        self.healthy_since[name] = time.monotonic()
        self.console.status(
            name, "serving", f"{where}  pid {process.pid}  {took_s:.1f}s  log {shown_path(process.log_path)}"
        )

    async def watch(self) -> None:
        """Return never: start again a service that dies; raise when one cannot be brought back or
        when PostgreSQL or NATS dies, so the rest are stopped instead of limping on. Meanwhile renew
        certificates that come close to expiry."""
        next_pki_check = time.monotonic() + PKI_CHECK_INTERVAL_S
        while True:
            if time.monotonic() >= next_pki_check:
                next_pki_check = time.monotonic() + PKI_CHECK_INTERVAL_S
                if await asyncio.to_thread(self.ensure_certificates):
                    self.console.status("pki", "renewed", f"certificates in {shown_path(self.config.pki_dir)}")
            self.check_servers()
            for svc, process in self.processes:
                if process.returncode() is not None:
                    await self.restart(svc, process)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def check_servers(self) -> None:
        for name, server in (("PostgreSQL", self.postgres), ("nats-server", self.nats)):
            if server is not None and server.process is not None and server.process.poll() is not None:
                raise ProcessFailed(
                    name=name, what=f"exited with code {server.process.returncode}; devstack restarts services "
                                    f"but not {name}, which they all depend on, so the platform stops "
                                    "(make run starts it again on the same data)",
                    log_path=server.log_path, tail=tail_of(server.log_path),
                )

    async def restart(self, svc: ServicePorts, process: ManagedProcess) -> None:
        """Bring a dead service back on its ports, with its certificate and credentials (its argv
        and environment are kept), once its back-off has passed. Those who call it reconnect on
        their own: gRPC channels retry, durable NATS consumers resume where they were."""
        name = svc.process_name
        backoff = self.backoffs.setdefault(name, Backoff())
        self.healthy_since[name] = await restart_until_healthy(
            process, probe=self.probes[name], backoff=backoff, healthy_since=self.healthy_since.get(name, 0.0),
            ready_timeout_s=self.config.ready_timeout_s, grace_s=self.config.stop_grace_s,
            report=lambda state, detail: self.console.status(name, state, detail), precheck=self.check_servers,
        )

    def start_simulator(self) -> ManagedProcess | None:
        """The device simulator as a child process (its own CPU, its own crash), when the mesh has
        a device hub and ONECARD_SIMULATOR is not 0. Its lines go to .data/logs/simulator.log."""
        names = {svc.spec.name for svc in self.config.services}
        if os.environ.get("ONECARD_SIMULATOR", "1") == "0" or "devicehub" not in names:
            return None
        self.simulator = ManagedProcess(
            name="simulator",
            argv=[sys.executable, "-m", "devstack.simulate", *SIMULATOR_ARGS],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            log_path=self.config.logs_dir / "simulator.log",
        )
        self.simulator.start()
        self.console.status("simulator", "started",
                            f"3 POS, 2 gates, a cabinet  pid {self.simulator.pid}  log "
                            f"{shown_path(self.simulator.log_path)}")
        return self.simulator

    async def echo_simulator(self) -> None:
        """Show the simulator's lines (one every 30 s, and its summary) as they come."""
        simulator = self.simulator
        if simulator is None:
            return
        while True:
            await asyncio.sleep(SIMULATOR_POLL_S)
            self._show_simulator_lines()
            if simulator.returncode() is not None:
                self.console.status("simulator", "ended", f"exit code {simulator.returncode()}  log "
                                    f"{shown_path(simulator.log_path)}")
                return

    def _show_simulator_lines(self) -> None:
        if self.simulator is None:
            return
        with contextlib.suppress(OSError):
            with self.simulator.log_path.open("rb") as log:
                log.seek(self._simulator_shown)
                chunk = log.read()
            complete = chunk.rfind(b"\n") + 1
            self._simulator_shown += complete
            for line in chunk[:complete].decode(errors="replace").splitlines():
                if line.strip():
                    self.console.status("fleet", "", line.strip())

    async def stop(self) -> None:
        simulator = self.simulator
        if simulator is not None and simulator.returncode() is None:
            code = await simulator.stop(grace_s=self.config.stop_grace_s)
            self._show_simulator_lines()
            self.console.status("simulator", "stopped", "cleanly" if code in (0, -signal.SIGTERM) else f"exit code {code}")
        for svc, process in reversed(self.processes):
            if process.returncode() is not None:
                continue
            started = time.monotonic()
            code = await process.stop(grace_s=self.config.stop_grace_s)
            # uvicorn re-raises the SIGTERM it handled once it has shut down, so dying of our own
            # SIGTERM is as clean an end as exit code 0.
            how = "cleanly" if code in (0, -signal.SIGTERM) else f"exit code {code}"
            self.console.status(svc.process_name, "stopped", f"{how}  {time.monotonic() - started:.1f}s")
        if self.nats is not None and self.nats.process is not None and self.nats.process.poll() is None:
            await asyncio.to_thread(self.nats.stop, SERVER_STOP_TIMEOUT_S)
            self.console.status("nats", "stopped")
        if self.postgres is not None and self.postgres.process is not None and self.postgres.process.poll() is None:
            await asyncio.to_thread(self.postgres.stop, SERVER_STOP_TIMEOUT_S)
            self.console.status("postgres", "stopped")


def print_ready(console: Console, stack: Stack, seed: SeedResult, *, rules: RulesSeed | None = None) -> None:
    config = stack.config
    gateway = next((s for s in config.services if s.spec.protocol == "http"), None)
    grpc_services = [s for s in config.services if s.spec.protocol == "grpc"]
    console.line()
    console.line(f"{READY_MARKER}.")
    console.line()
    if gateway is not None:
        console.line(f"  Gateway      {gateway.base_url}")
        console.line(f"  API docs     {gateway.base_url}/docs")
        console.line(f"  Console      {gateway.base_url}/console  (sign in with the admin client below)")
        if gateway.extra_port:
            ca = shown_path(config.identity_dir(gateway.spec.name))
            console.line(f"  Partner gRPC {gateway.extra_target}   (TLS; a token in 'authorization: Bearer …'; "
                         "docs/partners.md)")
            console.line(f"  grpcurl      as a partner: grpcurl -cacert {ca}/ca.crt -authority localhost "
                         f"{gateway.extra_target} list")
    for svc in grpc_services:
        console.line(f"  gRPC         {svc.process_name:<10} {svc.target}   (mutual TLS)"
                     + (f"   {svc.spec.extra_listener} port {svc.extra_target} (TLS)" if svc.extra_port else ""))
    if grpc_services:
        ops = shown_path(config.identity_dir("ops"))
        first = grpc_services[0]
        console.line(f"  grpcurl      as the operator: grpcurl -cacert {ops}/ca.crt -cert {ops}/tls.crt"
                     f" -key {ops}/tls.key -authority {first.spec.name} {first.target} list")
    for svc in config.services:
        if svc.metrics_port:
            console.line(f"  Metrics      {svc.process_name:<10} http://{svc.host}:{svc.metrics_port}/metrics")
        elif svc.spec.protocol == "http":
            # HTTP services serve their metrics beside their API.
            console.line(f"  Metrics      {svc.spec.name:<10} {svc.base_url}/metrics")
    console.line(f"  PostgreSQL   {redact_url(stack.database_url)}")
    console.line(f"  NATS         {stack.nats_url}")
    console.line(f"  Logs         {shown_path(config.logs_dir)}/")
    console.line()
    console.line(f"  {DEMO_TENANT_NAME}  tenant {seed.tenant_id}  ({seed.member_count} members)")
    for client in seed.clients.values():
        console.line(f"    {client.name:<22} client_id     {client.client_id}")
        console.line(f"    {'':<22} client_secret {client.client_secret}")
        console.line(f"    {'':<22} scopes        {' '.join(client.scopes)}")
    console.line(f"    (kept in {shown_path(config.credentials_path)}; identity shows a secret only once)")
    if gateway is not None and "bank" in seed.clients:
        tour = walkthrough(base_url=gateway.base_url, tenant_id=seed.tenant_id, client=seed.clients["bank"],
                           canteen_account_id=rules.canteen_account_id if rules else "",
                           admin=seed.clients.get("admin") if config.has_service("devicehub") else None,
                           partner_grpc=gateway.extra_target,
                           partner_ca=f"{shown_path(config.identity_dir(gateway.spec.name))}/ca.crt")
        script_path = config.data_dir / "walkthrough.sh"
        write_private_text(script_path, "#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(tour) + "\n")
        console.line()
        console.line(f"Try it (copy and paste into a shell, or: bash {shown_path(script_path)}):")
        console.line()
        for line in tour:
            console.line(f"  {line}" if line else "")
    console.line()
    console.line(f"Ctrl-C stops everything; the data stays in {shown_path(config.data_dir)}/ for the next run.")


async def run_stack(config: DevstackConfig, *, console: Console) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    state: dict[str, Any] = {"signal": None, "stopping": False}

    def on_signal(sig: signal.Signals) -> None:
        if state["stopping"] or state["signal"] is not None:
            return
        state["signal"] = sig
        console.line(f"\n{sig.name}: stopping")
        main_task.cancel()

    # SIGHUP too: closing the terminal must stop the servers, which run in their own sessions and
    # would not get the hangup themselves.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)

    stack = Stack(config=config, console=console)
    console.line(f"onecard local stack  (data in {shown_path(config.data_dir)})")
    exit_code = 0
    try:
        await stack.start()
        identity = config.service("identity")
        seed = await seed_demo(
            identity_target=identity.target,
            tls=stack.tls,
            credentials_path=config.credentials_path,
            member_count=config.demo_members,
            progress=console.progress,
        )
        rules = None
        names = {svc.spec.name for svc in config.services}
        if {"ledger", "policy"} <= names:
            rules = await seed_rules(ledger_target=config.service("ledger").target,
                                     policy_target=config.service("policy").target, tls=stack.tls,
                                     bank_client_ids=tuple(c.client_id for c in seed.clients.values()
                                                           if "wallets:topup" in c.scopes))
        console.status(
            "seed", "done",
            f"{DEMO_TENANT_NAME} {'created' if seed.tenant_created else 'reused'}, {seed.member_count} members, "
            f"API clients {'created' if seed.clients_created else 'reused'}"
            + (f", rules v{rules.version} {'published' if rules.published else 'in force'}"
               f" ({len(rules.merchants)} merchants)" if rules else ""),
        )
        print_ready(console, stack, seed, rules=rules)
        if stack.start_simulator() is not None:
            echo = asyncio.create_task(stack.echo_simulator(), name="simulator-echo")
            try:
                await stack.watch()
            finally:
                echo.cancel()
        else:
            await stack.watch()
    except asyncio.CancelledError:
        if state["signal"] is None:
            raise
        # Uncancel, so the awaits of the orderly stop below are not cancelled in turn.
        main_task.uncancel()
    except (ProcessFailed, StackError, SeedError, ConfigError) as exc:
        console.line()
        console.line(f"error: {exc}")
        exit_code = 1
    finally:
        state["stopping"] = True
        await stack.stop()
    return exit_code


def run(argv: list[str] | None = None) -> int:
    console = Console()
    try:
        config = DevstackConfig.from_env()
    except ConfigError as exc:
        console.line(f"error: {exc}")
        return 2
    try:
        return asyncio.run(run_stack(config, console=console))
    except KeyboardInterrupt:
        # Only before the signal handlers are in place, when nothing has been started yet.
        return 130

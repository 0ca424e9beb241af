"""The benchmark harness: a registry of named benchmarks, the infrastructure they share, the summary.

The bench runs the mesh as production runs it (docs/security.md): its own CA in its scratch
folder and a certificate per process, a nats-server speaking only TLS that knows each service's
account (services.nats_accounts) by its nkey, PostgreSQL asking for passwords with a login role per
service (runtime.dbroles), and every service started with its TLS folder, its NATS seed and its
role's URL, by ``BenchContext.service_env`` alone. The bench drives a service as the part of the
mesh it stands in for: each call presents the certificate of a caller the method's allow-list
names (``BenchContext.channel(service, as_=...)``): ``policy`` for LedgerService.Pay, ``devicehub``
for PolicyService.Evaluate and the ledger's SettleOffline, ``gateway`` for the admin calls that
set a benchmark up (tenants, members, accounts, top-ups, rule sets, devices), ``ops`` for health
probes. Terminals reach the device hub on its device port, checking it against the CA bundle that
came with their registration, as a POS does.

What TLS costs is measured in the same run: a benchmark may start a service with
``plaintext=True``, in insecure development mode (``ONECARD_INSECURE_DEVELOPMENT=1``: plaintext
gRPC, no caller checks), on a second nats-server without TLS (the same accounts and nkeys); its
PostgreSQL is the same server, with the same roles (the embedded server has no TLS either way),
in a database of its own. So a figure against its plaintext twin, both running and paid in
alternating slices (``measure_tls_and_plaintext``), prices TLS on every gRPC hop and on NATS, and
the caller checks, and nothing else.

A benchmark is an async function taking a ``BenchContext`` and answering named figures, e.g.
``{"identity.get_member_rps": 812.0}``. Names carry their unit (``_rps``, ``_ms``, ``_ratio``).
Every figure that matters is a ratio against a baseline measured in the same run on the same
machine (DESIGN.md section 6), because absolute numbers on a shared two-core machine are noise.

Money is measured durably or not at all. The shared server runs with fsync off (it serves the
benchmarks of request paths that write no money); a second server (``durable_postgres``) runs with
fsync and synchronous_commit on, as production does, and every benchmark that books money (Pay,
TopUp, SettleOffline in its measured part) runs its services there. The harness holds them to it:
``start_grpc_service`` refuses to start a service that books money (``MONEY_MODULES``) on a server
without fsync and synchronous_commit on (``NotDurable``), so a benchmark cannot flatter the cost of
a payment by skipping the flush to disk.

Cost is a first-class figure beside the rates: CPU milliseconds per operation summed over every
process that does the work, PostgreSQL included (``postgres_cpu_s``: the postmaster, every backend
and helper, walwriter and checkpointer among them) and nats-server when the path publishes to it;
the load client's CPU is reported beside it and not counted (it stands in for terminals).
``cpu_ms_per_operation`` does that arithmetic.

To add one: write ``@benchmark("area.what", description=...)`` on an async function in a module
listed in ``SUITES``.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from bench.load import CLIENT_KINDS, ClientKind, LoadResult
from bench.serve import BENCH_HOST
from devstack.servers import DATABASE_NAME, Nats, Postgres, free_port
from devstack.supervisor import ManagedProcess, Probe, grpc_health_probe, wait_healthy
from runtime.dbroles import ServiceRole, bootstrap_statements, role_dsn, role_name
from runtime.grpc_client import open_channel
from runtime.mesh import INSECURE_SETTING, TLS_DIR_SETTING, MeshTLS
from runtime.nats_access import DEFAULT_NATS_TLS_NAME, new_seed, public_key
from runtime.pki import IdentityFiles, ensure_identity
from services.nats_accounts import NATS_ACCOUNTS

# Modules whose import registers benchmarks.
SUITES = ("bench.identity", "bench.codegen", "bench.codes", "bench.ledger", "bench.policy", "bench.devicehub")
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SUMMARY_PATH = BENCH_DIR / "out" / "summary.json"
DEFAULT_DURATION_S = 5.0
DEFAULT_WARMUP_S = 1.0
DEFAULT_CONCURRENCY = 16
MAX_DURATION_S = 60.0
MAX_CONCURRENCY = 256
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
# The services with a schema and a database role of their own (the operator, ops, has a NATS
# account and a certificate but no database).
SERVICE_SCHEMAS = ("identity", "codegen", "ledger", "policy", "devicehub")
# Who probes health: the operator (health is open to any caller; the probe still shows a certificate).
PROBE_CALLER = "ops"
SECRET_BYTES = 24
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Before a measurement the processes measured are let go quiet: together under this much CPU over a
# step (no measurement waits longer than MAX_SETTLE_S).
SETTLE_CPU_RATIO = 0.1
SETTLE_STEP_S = 0.5
MAX_SETTLE_S = 15.0
# PostgreSQL publishes an idle backend's pending statistics within 10 s (PGSTAT_IDLE_INTERVAL):
# a commit count read after this long of quiet has them all.
STATS_FLUSH_S = 11.0
# A TLS/plaintext comparison alternates this many slices of each side.
TLS_PRICE_SLICES = 6
# The services that book money: the harness starts them only on a durable server.
MONEY_MODULES = frozenset({"services.ledger"})
# What a durable server must run with, and what is shown of its settings beside the figures.
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on"}
SHOWN_SETTINGS = ("fsync", "full_page_writes", "shared_buffers", "synchronous_commit", "wal_sync_method")

Figures = dict[str, float]
BenchmarkFn = Callable[["BenchContext"], Awaitable[Figures]]


class NotDurable(RuntimeError):
    """Money was to be measured on a PostgreSQL that does not flush each commit to disk."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    fn: BenchmarkFn


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, description: str) -> Callable[[BenchmarkFn], BenchmarkFn]:
    def register(fn: BenchmarkFn) -> BenchmarkFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        REGISTRY[name] = Benchmark(name=name, description=description, fn=fn)
        return fn

    return register


def load_suites() -> dict[str, Benchmark]:
    for module in SUITES:
        importlib.import_module(module)
    return REGISTRY


@dataclass(frozen=True)
class LoadSettings:
    """The same for every measurement of a run, so two figures compared were taken alike."""

    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    concurrency: int = DEFAULT_CONCURRENCY
    client: ClientKind = "raw"

    def __post_init__(self) -> None:
        if self.client not in CLIENT_KINDS:
            raise ValueError(f"client must be one of {', '.join(CLIENT_KINDS)}, got {self.client!r}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}], got {self.duration_s}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {self.concurrency}")


@dataclass(frozen=True)
class BenchService:
    """A service process the bench started: its mesh name (its certificate's, the name a client
    checks the server against), where it listens, its pid, and whether it runs in plaintext."""

    name: str
    target: str
    pid: int
    plaintext: bool = False


@dataclass
class BenchContext:
    """What benchmarks share in one run: a scratch folder, the mesh CA, PostgreSQL and NATS, child
    processes.

    Everything is started on first use, on loopback and free ports, and stopped when the run ends,
    children first, then NATS, then PostgreSQL.
    """

    load: LoadSettings
    work_dir: Path
    _postgres: Postgres | None = field(default=None, init=False)
    _nats: Nats | None = field(default=None, init=False)
    _plaintext_nats: Nats | None = field(default=None, init=False)
    _durable_postgres: Postgres | None = field(default=None, init=False)
    _processes: list[ManagedProcess] = field(default_factory=list, init=False)
    _tls: dict[str, MeshTLS] = field(default_factory=dict, init=False)
    # Made once per run, like a stack's secrets; they live in the children's environment only.
    _postgres_password: str = field(default_factory=lambda: secrets.token_urlsafe(SECRET_BYTES), init=False)
    _role_passwords: dict[str, str] = field(
        default_factory=lambda: {name: secrets.token_urlsafe(SECRET_BYTES) for name in SERVICE_SCHEMAS}, init=False)
    _nats_seeds: dict[str, str] = field(default_factory=lambda: {name: new_seed() for name in NATS_ACCOUNTS},
                                        init=False)

    # --- the mesh's identities -----------------------------------------------------------------

    @property
    def pki_dir(self) -> Path:
        return self.work_dir / "pki"

    def tls_dir(self, name: str) -> Path:
        """The folder with ``name``'s certificate, key and the CA (the run's CA, made on first use)."""
        files, _issued = ensure_identity(self.pki_dir, name)
        return files.directory

    def tls(self, name: str) -> MeshTLS:
        """``name``'s TLS material, for the channels the bench opens as that caller."""
        if name not in self._tls:
            self._tls[name] = MeshTLS.load(self.tls_dir(name))
        return self._tls[name]

    def channel(self, service: BenchService, *, as_: str) -> grpc.aio.Channel:
        """A long-lived channel to ``service`` presenting the certificate of the caller ``as_``
        (one its allow-list names for the methods sent on it); plaintext to a plaintext service."""
        return open_channel(service.target, tls=None if service.plaintext else self.tls(as_),
                            server_name=service.name)

    def process_env(self, name: str, *, plaintext: bool = False) -> dict[str, str]:
        """How the mesh process ``name`` proves itself: its TLS folder, or the insecure switch."""
        if plaintext:
            return {INSECURE_SETTING: "1"}
        return {TLS_DIR_SETTING: str(self.tls_dir(name))}

    def service_env(self, name: str, *, database_url: str | None = None, plaintext: bool = False
                    ) -> dict[str, str]:
        """Everything the service ``name`` needs to run as production runs it, besides its ports
        and its own settings: its TLS folder (or the insecure switch), its NATS account's nkey and
        the server that knows it, and its own database role on ``database_url`` (the superuser's
        URL of a database the roles were given: the shared one by default)."""
        return {
            **self.process_env(name, plaintext=plaintext),
            "ONECARD_DATABASE_URL": role_dsn(database_url or self.database_url(), role=role_name(name),
                                             password=self._role_passwords[name]),
            "ONECARD_NATS_URL": self.nats_url(plaintext=plaintext),
            "ONECARD_NATS_SEED": self._nats_seeds[name],
        }

    # --- PostgreSQL and NATS -------------------------------------------------------------------

    def _start_postgres(self, folder: str, *, fsync: bool) -> Postgres:
        """A server asking every connection for a password, its database given the services' roles."""
        postgres = Postgres(self.work_dir / folder, free_port(), fsync=fsync, password=self._postgres_password)
        postgres.start()
        self._give_roles(postgres, DATABASE_NAME)
        return postgres

    def _give_roles(self, postgres: Postgres, database: str) -> None:
        roles = [ServiceRole(schema=name, password=password) for name, password in self._role_passwords.items()]
        postgres.run_sql(bootstrap_statements(database=database, roles=roles), database=database)

    def database_url(self) -> str:
        """The shared server's database, as its superuser's URL (services get their role's)."""
        if self._postgres is None:
            # fsync off as in the tests: the benchmarks measure request paths, and both sides of
            # each ratio run against the same server.
            self._postgres = self._start_postgres("postgres", fsync=False)
        return self._postgres.dsn()

    def fresh_database(self, name: str, *, durable: bool = False) -> str:
        """A new, empty database on the shared server (or the durable one), for a benchmark that
        must not find what the ones before it wrote (tables, dead rows, outbox backlogs); the
        services' roles in it."""
        if durable:
            postgres = self.durable_postgres()
        else:
            self.database_url()
            assert self._postgres is not None
            postgres = self._postgres
        url = postgres.create_database(name)
        self._give_roles(postgres, name)
        return url

    @property
    def children(self) -> int:
        """How many child processes were started so far: a mark for ``stop_children_since``."""
        return len(self._processes)

    async def stop_children_since(self, mark: int) -> None:
        """Stop the children started after ``mark``, newest first, so a benchmark's services do not
        go on working (relays, consumers) while the next benchmark measures."""
        started = self._processes[mark:]
        del self._processes[mark:]
        for process in reversed(started):
            await process.stop(grace_s=STOP_GRACE_S)

    async def stop_service(self, service: BenchService) -> None:
        """Stop one service, e.g. before its twin in the other mode takes its place."""
        for process in list(self._processes):
            if process.pid == service.pid:
                self._processes.remove(process)
                await process.stop(grace_s=STOP_GRACE_S)

    def durable_postgres(self) -> Postgres:
        """A second PostgreSQL with fsync on and synchronous_commit at its default (on), for every
        benchmark that books money and for pgbench, its baseline."""
        if self._durable_postgres is None:
            self._durable_postgres = self._start_postgres("postgres-durable", fsync=True)
        return self._durable_postgres

    def server_of(self, database_url: str) -> Postgres:
        """The server (shared or durable) a database URL of this run points at."""
        port = urlsplit(database_url).port
        for postgres in (self._postgres, self._durable_postgres):
            if postgres is not None and postgres.port == port:
                return postgres
        raise ValueError(f"{database_url.split('@')[-1]} is on no PostgreSQL this bench started")

    def require_durable(self, database_url: str) -> str:
        """The server's settings, shown as ``name=value ...``; ``NotDurable`` unless it flushes
        every commit (fsync and synchronous_commit on)."""
        return require_durable(self.server_of(database_url))

    def nats_url(self, *, plaintext: bool = False) -> str:
        """The nats-server knowing every account of services.nats_accounts by its public nkey:
        TLS only, each client showing a certificate from the run's CA; or, for plaintext services,
        a second one without TLS."""
        return self.nats_server(plaintext=plaintext).url

    def nats_server(self, *, plaintext: bool = False) -> Nats:
        """The nats-server of ``nats_url`` (started on first use), e.g. to count its CPU."""
        users = {name: (public_key(seed), NATS_ACCOUNTS[name]) for name, seed in self._nats_seeds.items()}
        if plaintext:
            if self._plaintext_nats is None:
                self._plaintext_nats = Nats(self.work_dir / "nats-plaintext", free_port(), users=users)
                self._plaintext_nats.start()
            return self._plaintext_nats
        if self._nats is None:
            self._nats = Nats(self.work_dir / "nats", free_port(), users=users,
                              tls=IdentityFiles(self.tls_dir(DEFAULT_NATS_TLS_NAME)))
            self._nats.start()
        return self._nats

    # --- child processes -----------------------------------------------------------------------

    async def start_process(self, *, name: str, module_args: list[str], env: Mapping[str, str],
                            probe: Probe) -> ManagedProcess:
        """``python -m <module_args>`` with ``env`` added, once ``probe`` passes."""
        process = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", *module_args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            log_path=self.work_dir / "logs" / f"{name}.log",
        )
        process.start()
        self._processes.append(process)
        await wait_healthy(process, probe=probe, timeout_s=READY_TIMEOUT_S)
        return process

    def health_probe(self, target: str, *, server_name: str, plaintext: bool = False) -> Probe:
        return grpc_health_probe(target, tls=None if plaintext else self.tls(PROBE_CALLER), server_name=server_name)

    async def start_grpc_service(self, *, name: str, module: str, env: Mapping[str, str] | None = None,
                                 database_url: str | None = None, plaintext: bool = False) -> BenchService:
        """A onecard gRPC service (``python -m services.<x>``, whose mesh name is ``<x>``) on its
        own port, quiet logs, with ``service_env`` (on the shared database or ``database_url``),
        once healthy. ``name`` names its log."""
        if module in MONEY_MODULES:
            self.require_durable(database_url or self.database_url())
        mesh_name = module.rsplit(".", 1)[-1]
        port, metrics_port = free_port(), free_port()
        target = f"{BENCH_HOST}:{port}"
        process = await self.start_process(
            name=name,
            module_args=[module],
            env={
                **self.service_env(mesh_name, database_url=database_url, plaintext=plaintext),
                "ONECARD_GRPC_HOST": BENCH_HOST,
                "ONECARD_GRPC_PORT": str(port),
                "ONECARD_METRICS_PORT": str(metrics_port),
                "ONECARD_LOG_LEVEL": "warning",
                **(env or {}),
            },
            probe=self.health_probe(target, server_name=mesh_name, plaintext=plaintext),
        )
        assert process.pid is not None
        return BenchService(name=mesh_name, target=target, pid=process.pid, plaintext=plaintext)

    async def close(self) -> None:
        for process in reversed(self._processes):
            await process.stop(grace_s=STOP_GRACE_S)
        for nats_server in (self._nats, self._plaintext_nats):
            if nats_server is not None:
                nats_server.stop()
        if self._postgres is not None:
            self._postgres.stop()
        if self._durable_postgres is not None:
            self._durable_postgres.stop()


def process_cpu_s(pid: int, *, with_children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (and of its reaped children), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the name: state is fields[0], so utime/stime/cutime/cstime (stat fields 14-17) are 11-14.
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def processes_cpu_s(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: process_cpu_s(pid) for name, pid in pids.items()}


def postgres_cpu_s(postgres: Postgres) -> float:
    """CPU seconds of a whole PostgreSQL server: the postmaster, every live backend and helper
    (walwriter, checkpointer, background writer, autovacuum) and the children it has reaped (the
    backends of connections closed meanwhile)."""
    assert postgres.process is not None
    root = postgres.process.pid
    total = process_cpu_s(root, with_children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root:
            total += process_cpu_s(int(entry))
    return total


def nats_cpu_s(nats_server: Nats) -> float:
    assert nats_server.process is not None
    return process_cpu_s(nats_server.process.pid)


def cpu_ms_per_operation(cpu_s: Mapping[str, float], operations: int, *, not_counted: Collection[str] = ()
                         ) -> tuple[float, dict[str, float]]:
    """CPU milliseconds per operation over the processes of ``cpu_s`` but ``not_counted`` (a load
    client standing in for terminals), and each process's share, all of them (the ones not counted
    too, so one can see them beside the rest)."""
    if operations <= 0:
        raise ValueError(f"no operations to share {sum(cpu_s.values()):.2f} CPU seconds among")
    unknown = set(not_counted) - set(cpu_s)
    if unknown:
        raise ValueError(f"not_counted names processes that were not measured: {sorted(unknown)}")
    per_process = {who: seconds * 1000 / operations for who, seconds in cpu_s.items()}
    return sum(ms for who, ms in per_process.items() if who not in not_counted), per_process


def durability_problem(settings: Mapping[str, str]) -> str | None:
    """Why a server with these settings does not flush each commit to disk, or None if it does."""
    wrong = [f"{name}={settings.get(name, '?')}" for name, wanted in DURABLE_SETTINGS.items()
             if settings.get(name) != wanted]
    if not wrong:
        return None
    return (f"money is measured only on a durable PostgreSQL (fsync=on synchronous_commit=on), this one runs "
            f"with {' '.join(wrong)}")


def server_settings(postgres: Postgres) -> dict[str, str]:
    names = sorted({*DURABLE_SETTINGS, *SHOWN_SETTINGS})
    rows = postgres._psql("SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings"
                          f" WHERE name IN ({', '.join(repr(n) for n in names)})")
    return dict(pair.split("=", 1) for pair in rows.split())


def require_durable(postgres: Postgres) -> str:
    """``postgres``'s settings as ``name=value ...``; ``NotDurable`` unless it flushes every commit."""
    settings = server_settings(postgres)
    problem = durability_problem(settings)
    if problem is not None:
        raise NotDurable(problem)
    return " ".join(f"{name}={settings[name]}" for name in SHOWN_SETTINGS if name in settings)


def database_commits(postgres: Postgres, database: str) -> int:
    """pg_stat_database.xact_commit of ``database``: every transaction committed there, read-only
    ones included. PostgreSQL publishes a backend's counts lazily (at most once a second while it
    is busy, and within ``STATS_FLUSH_S`` once it is idle), so a reading is exact only once the
    backends of interest have been idle that long or have exited."""
    return int(postgres._psql(f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'"))


async def settle(pids: Mapping[str, int]) -> None:
    """Wait until the processes have done what came before (relays publishing what the last load
    booked, terminals' first sync after they connect: a second or two on this machine), so that it
    falls in no measurement, nor in one side of a comparison more than in the other."""
    deadline = time.perf_counter() + MAX_SETTLE_S
    before = processes_cpu_s(pids)
    while time.perf_counter() < deadline:
        await asyncio.sleep(SETTLE_STEP_S)
        after = processes_cpu_s(pids)
        if sum(after[who] - before[who] for who in pids) / SETTLE_STEP_S < SETTLE_CPU_RATIO:
            return
        before = after


@dataclass(frozen=True)
class Measurement:
    """One measured load, the CPU seconds the processes of interest spent meanwhile, and whatever
    else was counted over it (``counts``, e.g. commits)."""

    result: LoadResult
    cpu_s: Mapping[str, float]
    counts: Mapping[str, float] = field(default_factory=dict)

    def cpu_ratio(self, who: str) -> float:
        """CPU seconds of ``who`` per second of load (the machine has two cores)."""
        return self.cpu_s[who] / self.result.elapsed_s if self.result.elapsed_s else 0.0

    @staticmethod
    def combined(parts: list[Measurement]) -> Measurement:
        return Measurement(result=LoadResult.combined([p.result for p in parts]),
                           cpu_s={who: sum(p.cpu_s[who] for p in parts) for who in parts[0].cpu_s},
                           counts={what: sum(p.counts[what] for p in parts) for what in parts[0].counts})


# Sends the load for the seconds given (warmed up already) and measures it.
Run = Callable[[float], Awaitable[Measurement]]


async def measure_tls_and_plaintext(*, duration_s: float, tls: Run, plaintext: Run, slices: int = TLS_PRICE_SLICES
                                    ) -> tuple[Measurement, Measurement]:
    """The same load against the processes over TLS and against their plaintext twins, both running
    (each on a database of its own seeded alike), in alternating slices (TLS, plaintext, plaintext,
    TLS, TLS, ...), each side ``duration_s`` in all. Whatever the machine does meanwhile (another
    session's build, a checkpoint) falls on both sides alike, which consecutive runs of a few
    seconds each on a shared machine did not achieve (their ratio swung by a third)."""
    parts: dict[bool, list[Measurement]] = {True: [], False: []}
    for index in range(slices):
        order = (True, False) if index % 2 == 0 else (False, True)
        for over_tls in order:
            parts[over_tls].append(await (tls if over_tls else plaintext)(duration_s / slices))
    for over_tls, label in ((True, "over TLS"), (False, "in plaintext")):
        rates = ", ".join(f"{part.result.rps:.0f}" for part in parts[over_tls])
        print(f"  calls/s {label}, slice by slice: {rates}", flush=True)
    return Measurement.combined(parts[True]), Measurement.combined(parts[False])


def tls_price_figures(prefix: str, *, tls: Measurement, plaintext: Measurement) -> Figures:
    """``<prefix>_tls_vs_plaintext_ratio`` (calls/s over TLS / in plaintext) and the plaintext twins
    of the TLS figures: rate, p99, the client's and each process's CPU per second of load."""
    figures = {
        f"{prefix}_tls_vs_plaintext_ratio": tls.result.rps / plaintext.result.rps if plaintext.result.rps else 0.0,
        f"{prefix}_plaintext_per_s": plaintext.result.rps,
        f"{prefix}_plaintext_p99_ms": plaintext.result.percentile_ms(0.99),
        f"{prefix}_plaintext_client_cpu_ratio": plaintext.result.client_cpu_ratio,
    }
    for who in plaintext.cpu_s:
        figures[f"{prefix}_plaintext_{who}_cpu_ratio"] = plaintext.cpu_ratio(who)
    return figures


@contextlib.asynccontextmanager
async def bench_context(*, load: LoadSettings, keep_dir: bool = False) -> AsyncIterator[BenchContext]:
    work_dir = Path(tempfile.mkdtemp(prefix="onecard-bench-"))
    context = BenchContext(load=load, work_dir=work_dir)
    try:
        yield context
    finally:
        await context.close()
        if not keep_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


# The figures printed first, in a group of their own: what one payment costs in CPU, all processes.
COST_GROUP_TITLE = ("cost: CPU ms per payment (or record) over all processes, PostgreSQL and NATS included; the load "
                    "client's shown apart, not counted")


def is_cost_figure(name: str) -> bool:
    return "_cpu_ms_" in name or name.endswith("_cpu_vs_pgbench_tpcb_ratio")


def _table_lines(figures: Mapping[str, float], width: int) -> list[str]:
    lines = [f"{'figure':<{width}}  {'value':>12}", f"{'-' * width}  {'-' * 12}"]
    for name, value in figures.items():
        lines.append(f"{name:<{width}}  {value:>12.3f}" if abs(value) < 100 else f"{name:<{width}}  {value:>12.1f}")
    return lines


def format_table(figures: Mapping[str, float]) -> str:
    """Every figure, the cost-per-payment ones first in a group of their own."""
    width = max([len("figure"), *(len(name) for name in figures)])
    cost = {name: value for name, value in figures.items() if is_cost_figure(name)}
    rest = {name: value for name, value in figures.items() if not is_cost_figure(name)}
    lines: list[str] = []
    if cost:
        lines += [COST_GROUP_TITLE, *_table_lines(cost, width), "", "everything else"]
    lines += _table_lines(rest, width)
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """A figure's goal: at least (``">="``) or at most (``"<="``) ``target``."""

    figure: str
    comparison: str
    target: float
    why: str

    def met(self, value: float) -> bool:
        return value >= self.target if self.comparison == ">=" else value <= self.target


# Issue 16's goals, each a ratio measured in one run.
GOALS = (
    Goal("devicehub.online_pay_vs_ledger_pay_ratio", ">=", 0.7, "the hub and policy add little to a booking"),
    Goal("ledger.pay_vs_pgbench_ratio", ">=", 0.5, "a payment near a plain durable TPC-B transaction"),
    Goal("devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio", "<=", 4.0,
         "CPU per online payment, all processes, vs one TPC-B transaction's"),
    Goal("policy.evaluate_vs_echo_ratio", ">=", 0.6, "a plan costs little on top of gRPC"),
    Goal("codes.verify_warm_ratio", ">=", 0.8, "a cached credential's code near raw Ed25519"),
    Goal("codes.verify_cold_ratio", ">=", 0.4, "a new credential's code (two checks) near half raw Ed25519"),
)


def format_goals(figures: Mapping[str, float], goals: tuple[Goal, ...] = GOALS) -> str:
    """One line a goal: its figure, the value of this run and met / NOT MET / not measured."""
    width = max(len(goal.figure) for goal in goals)
    lines = ["goals (issue 16)"]
    for goal in goals:
        value = figures.get(goal.figure)
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            verdict, shown = ("met" if goal.met(value) else "NOT MET"), f"{value:.3f}"
        lines.append(f"  {goal.figure:<{width}}  {goal.comparison} {goal.target:<4}  {shown:>8}  {verdict:<12}  "
                     f"{goal.why}")
    return "\n".join(lines)


def write_summary(path: Path, figures: Mapping[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(figures), indent=2, sort_keys=True) + "\n")


async def run_benchmarks(*, names: list[str], load: LoadSettings, summary_path: Path,
                         keep_dir: bool = False) -> Figures:
    registry = load_suites()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(registry))}")
    selected = [registry[n] for n in (names or sorted(registry))]
    figures: Figures = {}
    async with bench_context(load=load, keep_dir=keep_dir) as context:
        for bench in selected:
            started = time.monotonic()
            print(f"running {bench.name}: {bench.description}", flush=True)
            produced = await bench.fn(context)
            clashes = set(produced) & set(figures)
            if clashes:
                raise ValueError(f"{bench.name} reports figures already reported: {sorted(clashes)}")
            figures.update(produced)
            print(f"  done in {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(format_table(figures))
    print()
    print(format_goals(figures))
    write_summary(summary_path, figures)
    print(f"\nwrote {summary_path}")
    return figures

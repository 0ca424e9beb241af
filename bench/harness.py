"""The benchmark harness: a registry of named benchmarks, the infrastructure they share, the summary.

A benchmark is an async function taking a ``BenchContext`` and answering named figures, e.g.
``{"identity.get_member_rps": 812.0}``. Names carry their unit (``_rps``, ``_ms``, ``_ratio``).
Every figure that matters is a ratio against a baseline measured in the same run on the same
machine (DESIGN.md section 6), because absolute numbers on a shared two-core machine are noise.

To add one: write ``@benchmark("area.what", description=...)`` on an async function in a module
listed in ``SUITES``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import CLIENT_KINDS, ClientKind
from bench.serve import BENCH_HOST
from devstack.servers import Nats, Postgres, free_port
from devstack.supervisor import ManagedProcess, Probe, grpc_health_probe, wait_healthy

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

Figures = dict[str, float]
BenchmarkFn = Callable[["BenchContext"], Awaitable[Figures]]


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


@dataclass
class BenchContext:
    """What benchmarks share in one run: a scratch folder, PostgreSQL and NATS, child processes.

    Everything is started on first use, on loopback and free ports, and stopped when the run ends,
    children first, then NATS, then PostgreSQL.
    """

    load: LoadSettings
    work_dir: Path
    _postgres: Postgres | None = field(default=None, init=False)
    _nats: Nats | None = field(default=None, init=False)
    _durable_postgres: Postgres | None = field(default=None, init=False)
    _processes: list[ManagedProcess] = field(default_factory=list, init=False)

    def database_url(self) -> str:
        if self._postgres is None:
            # fsync off as in the tests: the benchmarks measure request paths, and both sides of
            # each ratio run against the same server.
            self._postgres = Postgres(self.work_dir / "postgres", free_port(), fsync=False)
            self._postgres.start()
        return self._postgres.dsn()

    def fresh_database(self, name: str) -> str:
        """A new, empty database on the shared server, for a benchmark that must not find what the
        ones before it wrote (tables, dead rows, outbox backlogs)."""
        self.database_url()
        assert self._postgres is not None
        return self._postgres.create_database(name)

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

    def durable_postgres(self) -> Postgres:
        """A second PostgreSQL with fsync on and synchronous_commit at its default (on), for the
        figures whose meaning includes each commit's flush to disk (the ledger against pgbench)."""
        if self._durable_postgres is None:
            self._durable_postgres = Postgres(self.work_dir / "postgres-durable", free_port(), fsync=True)
            self._durable_postgres.start()
        return self._durable_postgres

    def nats_url(self) -> str:
        if self._nats is None:
            self._nats = Nats(self.work_dir / "nats", free_port())
            self._nats.start()
        return self._nats.url

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

    async def start_grpc_service(self, *, name: str, module: str, env: Mapping[str, str] | None = None,
                                 database_url: str | None = None) -> tuple[str, int]:
        """A onecard gRPC service (``python -m services.<x>``) on its own port, quiet logs, on the
        shared PostgreSQL (or ``database_url``) and NATS, once healthy: (target, pid)."""
        port, metrics_port = free_port(), free_port()
        target = f"{BENCH_HOST}:{port}"
        process = await self.start_process(
            name=name,
            module_args=[module],
            env={
                "ONECARD_DATABASE_URL": database_url or self.database_url(),
                "ONECARD_NATS_URL": self.nats_url(),
                "ONECARD_GRPC_HOST": BENCH_HOST,
                "ONECARD_GRPC_PORT": str(port),
                "ONECARD_METRICS_PORT": str(metrics_port),
                "ONECARD_LOG_LEVEL": "warning",
                **(env or {}),
            },
            probe=grpc_health_probe(target),
        )
        assert process.pid is not None
        return target, process.pid

    async def close(self) -> None:
        for process in reversed(self._processes):
            await process.stop(grace_s=STOP_GRACE_S)
        if self._nats is not None:
            self._nats.stop()
        if self._postgres is not None:
            self._postgres.stop()
        if self._durable_postgres is not None:
            self._durable_postgres.stop()


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


def format_table(figures: Mapping[str, float]) -> str:
    width = max([len("figure"), *(len(name) for name in figures)])
    lines = [f"{'figure':<{width}}  {'value':>12}", f"{'-' * width}  {'-' * 12}"]
    for name, value in figures.items():
        lines.append(f"{name:<{width}}  {value:>12.3f}" if abs(value) < 100 else f"{name:<{width}}  {value:>12.1f}")
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
    write_summary(summary_path, figures)
    print(f"\nwrote {summary_path}")
    return figures

"""Child processes of the local stack: each with its own environment and log file, waited on until
healthy, stopped with SIGTERM and a grace period, and reported with the tail of its log when it fails.

A service that dies after it was healthy is started again (``restart_until_healthy``) with the
same argv and environment, so on the same ports with the same certificate and credentials, after
an exponential back-off (``Backoff``): 0.5 s doubling to 30 s, back to 0.5 s once it had stayed
healthy for a minute. One that fails ``MAX_START_FAILURES`` times in a row without becoming
healthy again is given up on: that raises ``ProcessFailed``, which stops the platform.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.config import REPO_ROOT
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS

LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 16_384
POLL_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 1.0
# Logs of the previous run are kept once (``<name>.log.1``), so a crash that ended it can still be read.
KEPT_LOG_GENERATIONS = 1
# Restart back-off: the first delay, its ceiling, and how long a service must have been healthy
# before a death counts as a new incident (back to the first delay) rather than a crash loop.
RESTART_FIRST_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0
RESTART_STABLE_AFTER_S = 60.0
# Starts in a row that end before the service is healthy (exited, or not healthy in time).
MAX_START_FAILURES = 5
_PR_SET_PDEATHSIG = 1
# Resolved once in the parent: a forked child of a threaded process (gRPC runs threads) must not
# dlopen, it may only call what is already loaded.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class ProcessFailed(RuntimeError):
    """A child exited, or did not become healthy in time. The message carries its log tail."""

    def __init__(self, *, name: str, what: str, log_path: Path, tail: str):
        super().__init__(f"{name} {what}\n--- last lines of {log_path} ---\n{tail}".rstrip())
        self.name = name
        self.what = what
        self.log_path = log_path


def _die_with_parent() -> None:
    """Runs in the child before exec: have Linux send it SIGTERM if the stack process dies.

    Without it, a stack killed with SIGKILL would leave services holding their ports. The child
    gets its own session (so a Ctrl-C in the terminal reaches only the stack, which stops
    everything in order), which is why the terminal cannot clean up for us.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tail_of(path: Path, *, max_lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log written)"
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - LOG_TAIL_BYTES))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-max_lines:]) or "(log is empty)"


def _rotate(log_path: Path) -> None:
    for generation in range(KEPT_LOG_GENERATIONS, 0, -1):
        older = log_path.with_name(f"{log_path.name}.{generation}")
        newer = log_path if generation == 1 else log_path.with_name(f"{log_path.name}.{generation - 1}")
        if newer.exists():
            newer.replace(older)


@dataclass
class ManagedProcess:
    """One child process: started with ``argv`` and ``env``, stdout and stderr into ``log_path``."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Spawn the child. Call from the main thread: the parent-death signal fires when the
        *thread* that forked exits, so a worker thread's child would be killed with the thread."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _rotate(self.log_path)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                list(self.argv),
                env=dict(self.env),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, no locks taken
            )
        self.started_at = time.monotonic()

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def failure(self, what: str) -> ProcessFailed:
        return ProcessFailed(name=self.name, what=what, log_path=self.log_path, tail=tail_of(self.log_path))

    def check_alive(self) -> None:
        code = self.returncode()
        if code is not None:
            raise self.failure(f"exited with code {code}")

    async def wait_exit(self, *, timeout_s: float) -> int | None:
        """The exit code, or None if the child still runs after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.returncode()
            if code is not None:
                return code
            await asyncio.sleep(POLL_INTERVAL_S)
        return self.returncode()

    async def stop(self, *, grace_s: float) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``grace_s``. Answers the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.returncode()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        code = await self.wait_exit(timeout_s=grace_s)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            code = self.process.wait()
        return code


async def run_to_completion(process: ManagedProcess, *, timeout_s: float, grace_s: float) -> None:
    """Run a one-shot command (a migration) and fail with its log tail unless it exits 0."""
    process.start()
    try:
        code = await process.wait_exit(timeout_s=timeout_s)
    except asyncio.CancelledError:
        await process.stop(grace_s=grace_s)
        raise
    if code is None:
        await process.stop(grace_s=grace_s)
        raise process.failure(f"did not finish within {timeout_s:.0f}s")
    if code != 0:
        raise process.failure(f"failed with exit code {code}")


Probe = Callable[[], Awaitable[bool]]


def grpc_health_probe(target: str, *, tls: MeshTLS | None, server_name: str) -> Probe:
    """True once the server at ``target`` answers the standard health check with SERVING, asked
    over mutual TLS as ``tls`` names (devstack's certificate)."""

    async def probe() -> bool:
        async with open_channel(target, tls=tls, server_name=server_name) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def http_ready_probe(url: str) -> Probe:
    """True once ``url`` answers 200."""

    async def probe() -> bool:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            try:
                response = await client.get(url)
            except httpx.HTTPError:
                return False
        return response.status_code == 200

    return probe


async def wait_healthy(process: ManagedProcess, *, probe: Probe, timeout_s: float) -> float:
    """Poll ``probe`` until it passes; fail fast if the process dies. Answers seconds since start."""
    deadline = time.monotonic() + timeout_s
    while True:
        process.check_alive()
        if await probe():
            return time.monotonic() - process.started_at
        if time.monotonic() >= deadline:
            raise process.failure(f"was not healthy within {timeout_s:.0f}s")
        await asyncio.sleep(POLL_INTERVAL_S)


def describe_exit(code: int | None) -> str:
    """``exit 3``, or ``exit -9 (SIGKILL)`` for a child ended by a signal."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit {code} ({signal.Signals(-code).name})"
    return f"exit {code}"


@dataclass
class Backoff:
    """How long to wait before starting a dead service again, and when to give up on it.

    Plain arithmetic, no clock of its own: the caller says how long the service had been healthy.
    """

    first_delay_s: float = RESTART_FIRST_DELAY_S
    max_delay_s: float = RESTART_MAX_DELAY_S
    stable_after_s: float = RESTART_STABLE_AFTER_S
    max_start_failures: int = MAX_START_FAILURES
    restarts: int = 0
    start_failures: int = 0
    _next_delay_s: float | None = None

    def _take_delay(self) -> float:
        delay = self.first_delay_s if self._next_delay_s is None else self._next_delay_s
        self._next_delay_s = min(delay * 2, self.max_delay_s)
        return delay

    def after_death(self, *, healthy_for_s: float) -> float:
        """The delay before restarting a service that died after ``healthy_for_s`` of health."""
        if healthy_for_s >= self.stable_after_s:
            self._next_delay_s = None
        self.restarts += 1
        return self._take_delay()

    def after_failed_start(self) -> float | None:
        """The delay before the next try after a start that never got healthy; None: give up."""
        self.start_failures += 1
        if self.start_failures >= self.max_start_failures:
            return None
        self.restarts += 1
        return self._take_delay()

    def after_healthy(self) -> None:
        self.start_failures = 0


Report = Callable[[str, str], None]


async def restart_until_healthy(
    process: ManagedProcess, *, probe: Probe, backoff: Backoff, healthy_since: float, ready_timeout_s: float,
    grace_s: float, report: Report, precheck: Callable[[], None] | None = None,
) -> float:
    """Start ``process`` (which has just died) again until ``probe`` passes; answers the monotonic
    time it became healthy. ``report(state, detail)`` gets a line per death, failure and recovery.

    Raises ``ProcessFailed`` (naming the service and its log) after ``backoff.max_start_failures``
    starts in a row that did not become healthy. ``precheck`` runs before every start and may
    raise instead (what the service needs is gone, so trying again is pointless). Cancelling it
    (Ctrl-C) leaves at most a started process behind, which the caller stops with the rest.
    """
    code = process.returncode()
    lived_s = time.monotonic() - process.started_at
    delay_s = backoff.after_death(healthy_for_s=time.monotonic() - healthy_since)
    report("died", f"{describe_exit(code)} after {lived_s:.1f}s; restarting in {delay_s:.1f}s "
                   f"(restart {backoff.restarts})")
    while True:
        await asyncio.sleep(delay_s)
        if precheck is not None:
            precheck()
        process.start()
        try:
            took_s = await wait_healthy(process, probe=probe, timeout_s=ready_timeout_s)
        except ProcessFailed as failed:
            if process.returncode() is None:
                await process.stop(grace_s=grace_s)
            next_delay_s = backoff.after_failed_start()
            if next_delay_s is None:
                raise process.failure(
                    f"failed {backoff.start_failures} times in a row to start again ({failed.what}); giving up"
                ) from None
            delay_s = next_delay_s
            report("failed", f"{failed.what}; restarting in {delay_s:.1f}s (restart {backoff.restarts})")
            continue
        backoff.after_healthy()
        report("serving", f"pid {process.pid}  {took_s:.1f}s  restarted")
        return time.monotonic()

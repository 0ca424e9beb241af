"""The device hub under load: simulated POS terminals paying by holder code through the whole mesh,
and a fleet's offline records uploaded and settled.

``devicehub.online_pay_per_s`` / ``devicehub.online_pay_p99_ms``: POS terminals (one enrolled,
authenticated stream each) send ``authorize`` with a fresh holder code per payment; the hub
verifies the code, asks policy for the plan and has the ledger post it; the answer comes back on
the stream. Closed loop: each of ``concurrency`` workers sends its next payment when the last one
is answered. 60 s unless ``--duration-s`` says otherwise. Goal (issue 6): ≥ 1000/s, p99 ≤ 50 ms.
``devicehub.online_pay_vs_ledger_pay_ratio``: the same rate divided by LedgerService.Pay called
directly by the same client in the same run (what the hub, policy and code checks cost on top of
the payment itself). Goal >= 0.7 (issue 16).

Both benchmarks run their five services on the bench's durable PostgreSQL (fsync and
synchronous_commit on, as in production: ``BenchContext.durable_postgres``), each mesh in a
database of its own; the harness refuses to start the ledger on a server that does not flush its
commits, so a payment here pays for its flush to disk as a real one does.

Cost of an online payment, first-class: ``devicehub.online_pay_cpu_ms_per_payment`` is the CPU
milliseconds per payment, over the TLS run, of every process that does the work: identity,
codegen, ledger, policy and devicehub, the whole PostgreSQL server they use (the postmaster and
every backend and helper, walwriter and checkpointer among them: bench.harness.postgres_cpu_s),
and nats-server (the services publish their events to it and consume each other's: the ledger's
``ledger.transfer.posted`` reaches policy's member-state cache). ``devicehub.online_pay_cpu_ms_<who>``
is each one's share; ``devicehub.online_pay_client_cpu_ms_per_payment`` is the load client's,
reported and not counted (it stands in for the terminals). The baseline, in the same run on the
same server once the meshes are stopped: ``devicehub.pgbench_tpcb_cpu_ms_per_txn``, PostgreSQL's
and pgbench's CPU per plain TPC-B transaction (bench.pgbench), the same number of clients;
``devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio`` is the one over the other. Goal <= 4 (issue 16).
``devicehub.ledger_pay_cpu_ms_per_payment``: the same sum for the direct LedgerService.Pay run.
The ``*_cpu_ratio`` figures (CPU seconds per second of load) say how busy each process was.
``devicehub.online_pay_tls_vs_plaintext_ratio``: what TLS costs that payment. The terminals dial
the hub's device port over TLS, checking it against the CA bundle their registration brought,
and every hop behind it (hub to identity, codegen, policy, ledger; each to NATS) is mutual TLS;
the same load goes to a twin mesh, the five services in insecure development mode (plaintext
everywhere, no caller checks) on a database of their own, seeded alike, with terminals of their
own, in slices that alternate with the TLS ones (bench.harness.measure_tls_and_plaintext), after
each side's warm-up once its services are quiet (bench.harness.settle).
``devicehub.online_pay_plaintext_*`` are the twins of the TLS figures. The bench registers devices and seeds the campus as the gateway, and books the
direct payments as policy, each a caller the method's allow-list names.

``devicehub.offline_settle_per_s``: 100,000 device-signed offline records (10 devices, uploads of
1,000, every record a payment by code carrying the code's text) settled through the devices'
streams: records per second from the first upload to the last answer, every record's evidence
checked again by the hub (the code verified at the record's time, the member's state then, the
rules' plan on the device's counters) before the ledger books it; every record is checked BOOKED
once and the merchant's total after. 25 payments per member per device: the tenant's codes and
rule set allow 50 offline payments a member a day and 50,000 yuan a device (the example's 20 and
20,000 would refuse the rest). ``devicehub.offline_settle_cpu_ms_per_record``: the CPU of all
the processes (as for the online payment) per record settled.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import nacl.signing
from google.protobuf.timestamp_pb2 import Timestamp
import onecard_codes as codes
from onecard_codes import Purpose
from onecard_codes.issue import make_holder_code
from onecard_device.identity import challenge_message, record_message
from onecard_policy.examples import university_rule_set

from bench import pgbench
from bench.harness import (
    DEFAULT_DURATION_S,
    BenchContext,
    BenchService,
    Figures,
    Measurement,
    benchmark,
    cpu_ms_per_operation,
    measure_tls_and_plaintext,
    nats_cpu_s,
    postgres_cpu_s,
    processes_cpu_s,
    settle,
    tls_price_figures,
)
from bench.load import closed_loop_calls
from bench.serve import BENCH_HOST
from devstack.servers import free_port
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2 as dpb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.identity.v1 import identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2 as ppb
from onecard.policy.v1 import policy_pb2_grpc

# The callers the bench stands in for, each one the method's allow-list names: the gateway seeds
# the campus and registers the devices, policy books the direct payments (LedgerService.Pay).
ADMIN = "gateway"
PAYER = "policy"
BENCH_CODEGEN_KEY = "44" * 32
BENCH_POLICY_KEY = "45" * 32
CALL_TIMEOUT_S = 60.0
# What the bench's bank may owe (its clearing account's credit limit): more than its members hold.
BANK_CREDIT_LIMIT_FEN = 10**12
ONLINE_DURATION_S = 60.0
MEMBERS = 400
POS_DEVICES = 32
SETUP_CONCURRENCY = 16
CASH_FEN = 10_000_000
PRICE_FEN = 500
STORE = "campus-store"
OFFLINE_DEVICES = 10
OFFLINE_RECORDS = 100_000
UPLOAD_SIZE = 1000
UPLOADS_IN_FLIGHT_PER_DEVICE = 2
# An upload the hub answers "retry later" (the ledger did not answer in time) is sent again, as a
# terminal would, up to this many times; the summary counts the retries.
UPLOAD_ATTEMPTS = 5
RETRY_LATER_SUFFIX = "_UNAVAILABLE"
OFFLINE_COUNT_PER_DAY = 50
# 10,000 records of 5 yuan on each device in one day.
OFFLINE_DEVICE_PER_DAY_FEN = 5_000_000


@dataclass(frozen=True)
class Terminal:
    """A registered, enrolled POS: what it keeps across the hub's restarts."""

    device_id: str
    key: nacl.signing.SigningKey
    # The CA bundle that came with its registration: what it checks the hub's device port against.
    hub_ca_pem: str


def _terminal_channel(target: str, *, hub_ca_pem: str, plaintext: bool) -> grpc.aio.Channel:
    """A terminal's channel to the device port: server TLS checked against ``hub_ca_pem``, no
    client certificate (the terminal proves itself by its key); plaintext only to a hub in
    insecure development mode."""
    if plaintext:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=hub_ca_pem.encode()))


class BenchDevice:
    """One enrolled POS on its own connection and authenticated stream; answers are matched by
    request id."""

    def __init__(self, channel: grpc.aio.Channel, tenant_id: str, terminal: Terminal):
        self.channel = channel
        self.stub = devicehub_pb2_grpc.DeviceServiceStub(channel)
        self.tenant_id, self.terminal = tenant_id, terminal
        self.device_id, self.key = terminal.device_id, terminal.key
        self._call = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        # grpc.aio allows one write in flight per call.
        self._write_lock = asyncio.Lock()

    async def connect(self) -> None:
        call = self.stub.Connect()
        # No record issued yet (last_sequence 0): every record it uploads was made after this hello.
        await call.write(dpb.ConnectRequest(hello=dpb.Hello(tenant_id=self.tenant_id, device_id=self.device_id,
                                                            firmware_version="bench-1", last_sequence=0)))
        challenge = await call.read()
        nonce = challenge.challenge.nonce
        message = challenge_message(tenant_id=self.tenant_id, device_id=self.device_id, nonce=nonce)
        await call.write(dpb.ConnectRequest(challenge_response=dpb.ChallengeResponse(
            signature=self.key.sign(message).signature)))
        while True:
            answer = await call.read()
            if answer.WhichOneof("body") == "welcome":
                break
        self._call = call
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._call is not None
        # read(), not ``async for``: grpc.aio refuses to mix the two on one call.
        while True:
            answer = await self._call.read()
            if answer is grpc.aio.EOF:
                return
            body = answer.WhichOneof("body")
            if body == "authorize_result":
                ref = answer.authorize_result.request_id
            elif body == "upload_result":
                ref = answer.upload_result.upload_id
            elif body == "error":
                ref = answer.error.ref
            else:
                continue
            waiter = self._waiting.pop(ref, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)

    async def ask(self, ref: str, message: dpb.ConnectRequest) -> dpb.ConnectResponse:
        assert self._call is not None
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ref] = waiter
        async with self._write_lock:
            await self._call.write(message)
        return await asyncio.wait_for(waiter, CALL_TIMEOUT_S)

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._call.done_writing()
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close()


class Mesh:
    """The five services on one database, over TLS or all in plaintext, and the bench's channels
    to them as the gateway (and to the ledger as policy)."""

    def __init__(self, context: BenchContext, mark: int, services: dict[str, BenchService], device_target: str,
                 database_url: str):
        self.context, self.mark = context, mark
        self.services, self.device_target = services, device_target
        self.plaintext = services["devicehub"].plaintext
        self.pids = {name: service.pid for name, service in services.items()}
        # The servers the services use, whose CPU is the payments' too.
        self.postgres = context.server_of(database_url)
        self.nats = context.nats_server(plaintext=self.plaintext)
        self.channels = [context.channel(service, as_=ADMIN) for service in services.values()]
        admin = dict(zip(services, self.channels, strict=True))
        self.identity = identity_pb2_grpc.IdentityServiceStub(admin["identity"])
        self.codegen = codegen_pb2_grpc.CodegenServiceStub(admin["codegen"])
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(admin["ledger"])
        self.policy = policy_pb2_grpc.PolicyServiceStub(admin["policy"])
        self.admin = devicehub_pb2_grpc.DeviceAdminServiceStub(admin["devicehub"])
        payer_channel = context.channel(services["ledger"], as_=PAYER)
        self.channels.append(payer_channel)
        self.ledger_payer = ledger_pb2_grpc.LedgerServiceStub(payer_channel)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the five services, of the whole PostgreSQL server and of nats-server."""
        return {**processes_cpu_s(self.pids), "postgres": postgres_cpu_s(self.postgres), "nats": nats_cpu_s(self.nats)}

    def terminal_channel(self, terminal: Terminal) -> grpc.aio.Channel:
        return _terminal_channel(self.device_target, hub_ca_pem=terminal.hub_ca_pem, plaintext=self.plaintext)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        # Its relays and consumers must not go on working while the next benchmark measures.
        await self.context.stop_children_since(self.mark)


async def _start_mesh(context: BenchContext, database_url: str, *, plaintext: bool = False) -> Mesh:
    """The five services on ``database_url``, the device hub's device port included."""
    services: dict[str, BenchService] = {}
    mark = context.children
    device_port = free_port()
    suffix = "-plaintext" if plaintext else ""
    for name, module, env in (
        ("identity", "services.identity", {}),
        ("codegen", "services.codegen", {"ONECARD_CODEGEN_MASTER_KEY": BENCH_CODEGEN_KEY}),
        ("ledger", "services.ledger", {}),
        ("policy", "services.policy", {"ONECARD_POLICY_MASTER_KEY": BENCH_POLICY_KEY}),
        ("devicehub", "services.devicehub", {"ONECARD_DEVICE_PORT": str(device_port)}),
    ):
        wired = {f"ONECARD_{peer.upper()}_TARGET": service.target for peer, service in services.items()}
        services[name] = await context.start_grpc_service(
            name=f"{name}-dh{suffix}", module=module, env={**wired, **env}, database_url=database_url,
            plaintext=plaintext)
    return Mesh(context, mark, services, device_target=f"{BENCH_HOST}:{device_port}", database_url=database_url)


async def _gather_limited(coros: list, limit: int = SETUP_CONCURRENCY) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro):  # noqa: ANN001, ANN202
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


class Campus:
    """A tenant with MEMBERS funded members holding a phone credential each, a store merchant and
    the example rule set published (the store is open all day: no meal period gets in the way)."""

    def __init__(self) -> None:
        self.tenant_id = ""
        self.merchant = ""
        self.members: list[str] = []
        self.cash: dict[str, str] = {}
        self.credentials: dict[str, tuple[bytes, nacl.signing.SigningKey, str]] = {}
        self.counters = {}

    async def seed(self, mesh: Mesh) -> None:
        self.tenant_id = (await mesh.identity.CreateTenant(ipb.CreateTenantRequest(
            tenant_id=str(uuid.uuid4()), name="Bench Device University", kind=ipb.TENANT_KIND_UNIVERSITY,
            time_zone="Asia/Shanghai", currency="CNY"), timeout=CALL_TIMEOUT_S)).tenant.tenant_id
        bank = await self._open(mesh, lpb.OWNER_KIND_TENANT, "bank", lpb.PURSE_KIND_BANK_CLEARING)
        # A new clearing account may owe nothing (prefunded only): let the bench's bank top up.
        await mesh.ledger.SetCreditLimit(lpb.SetCreditLimitRequest(
            tenant_id=self.tenant_id, account_id=bank, credit_limit_fen=BANK_CREDIT_LIMIT_FEN), timeout=CALL_TIMEOUT_S)
        self.merchant = await self._open(mesh, lpb.OWNER_KIND_MERCHANT, STORE, lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
        doc = json.loads(json.dumps(university_rule_set()).replace(f'"{STORE}"', json.dumps(self.merchant)))
        doc["offline"]["credential"]["count_per_day"] = OFFLINE_COUNT_PER_DAY
        doc["offline"]["device"]["per_day_fen"] = OFFLINE_DEVICE_PER_DAY_FEN
        await mesh.codegen.UpdateTenantCodeSettings(cpb.UpdateTenantCodeSettingsRequest(
            tenant_id=self.tenant_id, caps=cpb.OfflineCaps(per_transaction_fen=5000, per_day_fen=20_000,
                                                           per_day_count=OFFLINE_COUNT_PER_DAY),
            default_credential_validity_hours=24), timeout=CALL_TIMEOUT_S)
        created = await mesh.policy.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
            tenant_id=self.tenant_id, document=json.dumps(doc), note="bench"), timeout=CALL_TIMEOUT_S)
        await mesh.policy.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
            tenant_id=self.tenant_id, version=created.version.version, published_by="bench"), timeout=CALL_TIMEOUT_S)

        async def member(index: int) -> None:
            member_id = (await mesh.identity.CreateMember(ipb.CreateMemberRequest(
                tenant_id=self.tenant_id, external_number=f"B{index:07d}", name=f"Bench {index}"),
                timeout=CALL_TIMEOUT_S)).member.member_id
            cash = await self._open(mesh, lpb.OWNER_KIND_MEMBER, member_id, lpb.PURSE_KIND_CASH)
            await mesh.ledger.TopUp(lpb.TopUpRequest(tenant_id=self.tenant_id, idempotency_key=f"fund-{member_id}",
                                                     from_account_id=bank, to_account_id=cash, amount_fen=CASH_FEN),
                                    timeout=CALL_TIMEOUT_S)
            holder = nacl.signing.SigningKey.generate()
            issued = await mesh.codegen.IssueCredential(cpb.IssueCredentialRequest(
                tenant_id=self.tenant_id, member_id=member_id, holder_public_key=bytes(holder.verify_key),
                purposes=[cpb.PURPOSE_PAY]), timeout=CALL_TIMEOUT_S)
            self.members.append(member_id)
            self.cash[member_id] = cash
            self.credentials[member_id] = (issued.credential_bytes, holder, issued.credential.credential_id)
            self.counters[member_id] = itertools.count(1)

        await _gather_limited([member(i) for i in range(MEMBERS)])

    async def _open(self, mesh: Mesh, owner_kind: int, owner_id: str, purse_kind: int) -> str:
        answer = await mesh.ledger.OpenAccount(lpb.OpenAccountRequest(
            tenant_id=self.tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind),
            timeout=CALL_TIMEOUT_S)
        return answer.account.account.account_id

    def code(self, member_id: str) -> tuple[str, str, int]:
        credential_bytes, holder, credential_id = self.credentials[member_id]
        counter = next(self.counters[member_id])
        text = make_holder_code(credential_bytes=credential_bytes, holder_signing_key=holder, now_s=int(time.time()),
                                counter=counter, purpose=Purpose.PAY)
        return text, credential_id, counter

    async def devices(self, mesh: Mesh, count: int, prefix: str) -> list[BenchDevice]:
        """``count`` POS registered (as the gateway), enrolled on the device port and connected."""
        async def one(index: int) -> BenchDevice:
            registered = await mesh.admin.RegisterDevice(dpb.RegisterDeviceRequest(
                tenant_id=self.tenant_id, kind=dpb.DEVICE_KIND_POS, model="bench-pos", name=f"{prefix} {index}",
                location=STORE, scene_tags=["store"], merchant_account_id=self.merchant,
                firmware_version="bench-1"), timeout=CALL_TIMEOUT_S)
            key = nacl.signing.SigningKey.generate()
            terminal = Terminal(device_id=registered.device.device_id, key=key, hub_ca_pem=registered.hub_ca_pem)
            device = BenchDevice(mesh.terminal_channel(terminal), self.tenant_id, terminal)
            await device.stub.Enrol(dpb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                     public_key=bytes(key.verify_key), firmware_version="bench-1"),
                                    timeout=CALL_TIMEOUT_S)
            await device.connect()
            return device

        return list(await _gather_limited([one(i) for i in range(count)]))


class HubLoad:
    """One mesh with a seeded campus and POS_DEVICES terminals on their streams, paying by a fresh
    holder code each time (``concurrency`` in flight); a payment declined or failed stops the run."""

    def __init__(self, context: BenchContext, mesh: Mesh, campus: Campus, devices: list[BenchDevice]):
        self.context, self.mesh, self.campus, self.devices = context, mesh, campus, devices
        self._picks = itertools.count()
        self._ledger_picks = itertools.count()
        self.declined: dict[str, int] = {}

    @classmethod
    async def start(cls, context: BenchContext, *, database_url: str, plaintext: bool = False) -> HubLoad:
        mesh = await _start_mesh(context, database_url, plaintext=plaintext)
        campus = Campus()
        try:
            await campus.seed(mesh)
            devices = await campus.devices(mesh, POS_DEVICES, "Bench POS")
        except BaseException:
            await mesh.close()
            raise
        hub_load = cls(context, mesh, campus, devices)
        # The first payment checked before measuring: approved and booked.
        if not await hub_load.pay(0):
            await hub_load.close()
            raise RuntimeError(f"a bench payment was declined: {hub_load.declined}")
        return hub_load

    async def pay(self, worker: int) -> bool:
        campus = self.campus
        member_id = campus.members[next(self._picks) % len(campus.members)]
        text, _, _ = campus.code(member_id)
        request_id = uuid.uuid4().hex
        device = self.devices[worker % len(self.devices)]
        answer = await device.ask(request_id, dpb.ConnectRequest(authorize=dpb.Authorize(
            request_id=request_id, presentation=dpb.Presentation(code=text), purpose=dpb.PURPOSE_PAY,
            amount_fen=PRICE_FEN, idempotency_key=f"bench-{request_id}")))
        result = answer.authorize_result
        if not result.approved:
            reason = result.reason or answer.error.reason
            self.declined[reason] = self.declined.get(reason, 0) + 1
        return result.approved

    async def _ledger_pay(self, _worker: int) -> bool:
        campus = self.campus
        member_id = campus.members[next(self._ledger_picks) % len(campus.members)]
        answer = await self.mesh.ledger_payer.Pay(lpb.PayRequest(
            tenant_id=campus.tenant_id, idempotency_key=f"direct-{uuid.uuid4().hex}",
            merchant_account_id=campus.merchant, legs=[lpb.PayLeg(account_id=campus.cash[member_id],
                                                                  amount_fen=PRICE_FEN)]),
            timeout=CALL_TIMEOUT_S)
        return bool(answer.transfer.transfer_id)

    async def _measure(self, call: Callable[[int], Awaitable[bool]], duration_s: float) -> Measurement:
        before = self.mesh.cpu_s()
        result = await closed_loop_calls(call=call, duration_s=duration_s, concurrency=self.context.load.concurrency)
        after = self.mesh.cpu_s()
        if self.declined:
            raise RuntimeError(f"bench payments were declined: {self.declined}")
        if result.errors:
            raise RuntimeError(f"{result.errors} of {result.requests} calls failed")
        return Measurement(result=result, cpu_s={who: after[who] - before[who] for who in after})

    async def measure_ledger_pay(self, duration_s: float) -> Measurement:
        """LedgerService.Pay called directly, as policy, after a warm-up."""
        await settle(self.mesh.pids)
        await closed_loop_calls(call=self._ledger_pay, duration_s=self.context.load.warmup_s,
                                concurrency=self.context.load.concurrency)
        return await self._measure(self._ledger_pay, duration_s)

    async def warm_up(self) -> None:
        # What came before (the terminals' first sync, the relays publishing the seed) falls in no
        # measurement.
        await settle(self.mesh.pids)
        await closed_loop_calls(call=self.pay, duration_s=self.context.load.warmup_s,
                                concurrency=self.context.load.concurrency)

    async def run(self, duration_s: float) -> Measurement:
        return await self._measure(self.pay, duration_s)

    async def close(self) -> None:
        for device in self.devices:
            await device.close()
        await self.mesh.close()


@benchmark("devicehub.online_pay",
           description="POS terminals paying by holder code on their streams through hub, policy and ledger")
async def online_pay(context: BenchContext) -> Figures:
    load = context.load
    duration_s = ONLINE_DURATION_S if load.duration_s == DEFAULT_DURATION_S else load.duration_s
    loads: list[HubLoad] = []
    try:
        over_tls = await HubLoad.start(context, database_url=context.fresh_database("devicehub_online", durable=True))
        loads.append(over_tls)
        # The plaintext twin: the five services in insecure development mode on a database of
        # their own, seeded alike, their own terminals connected; both are paid in alternating slices.
        plain = await HubLoad.start(context, database_url=context.fresh_database("devicehub_online_plaintext",
                                                                                 durable=True), plaintext=True)
        loads.append(plain)
        ledger = await over_tls.measure_ledger_pay(load.duration_s)
        for hub_load in loads:
            await hub_load.warm_up()
        hub, plaintext = await measure_tls_and_plaintext(duration_s=duration_s, tls=over_tls.run,
                                                         plaintext=plain.run)
    finally:
        for hub_load in reversed(loads):
            await hub_load.close()
    # The baseline of the cost: plain TPC-B on the same server, the meshes gone quiet.
    postgres = context.durable_postgres()
    clients = load.concurrency
    scale = await pgbench.prepare(postgres, clients=clients)
    await pgbench.warm_up(postgres, clients=clients, duration_s=load.warmup_s, scale=scale)
    tpcb = await pgbench.run(postgres, clients=clients, duration_s=load.duration_s, scale=scale)
    cpu_ms, cpu_ms_of = cpu_ms_per_operation(hub.cpu_s, hub.result.requests)
    figures: Figures = {
        "devicehub.online_pay_cpu_ms_per_payment": cpu_ms,
        **{f"devicehub.online_pay_cpu_ms_{who}": ms for who, ms in cpu_ms_of.items()},
        "devicehub.online_pay_client_cpu_ms_per_payment": hub.result.client_cpu_s * 1000 / hub.result.requests,
        "devicehub.pgbench_tpcb_cpu_ms_per_txn": tpcb.cpu_ms_per_transaction,
        "devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio": cpu_ms / tpcb.cpu_ms_per_transaction,
        "devicehub.ledger_pay_cpu_ms_per_payment": cpu_ms_per_operation(ledger.cpu_s, ledger.result.requests)[0],
        "devicehub.pgbench_tpcb_tps": tpcb.tps,
        "devicehub.online_pay_per_s": hub.result.rps,
        "devicehub.online_pay_p50_ms": hub.result.percentile_ms(0.50),
        "devicehub.online_pay_p99_ms": hub.result.percentile_ms(0.99),
        "devicehub.ledger_pay_per_s": ledger.result.rps,
        "devicehub.online_pay_vs_ledger_pay_ratio": hub.result.rps / ledger.result.rps if ledger.result.rps else 0.0,
        "devicehub.online_pay_client_cpu_ratio": hub.result.client_cpu_ratio,
    }
    for who in hub.cpu_s:
        figures[f"devicehub.online_pay_{who}_cpu_ratio"] = hub.cpu_ratio(who)
    figures.update(tls_price_figures("devicehub.online_pay", tls=hub, plaintext=plaintext))
    return figures


def _signed_record(device: BenchDevice, record: dpb.OfflineRecord) -> dpb.OfflineRecord:
    message = record_message(tenant_id=device.tenant_id, device_id=device.device_id, record=record)
    record.signature = device.key.sign(message).signature
    return record


@benchmark("devicehub.offline_settle",
           description="100,000 device-signed offline records uploaded on 10 streams and settled by the ledger")
async def offline_settle(context: BenchContext) -> Figures:
    mesh = await _start_mesh(context, context.fresh_database("devicehub_offline", durable=True))
    campus = Campus()
    devices: list[BenchDevice] = []
    try:
        await campus.seed(mesh)
        devices = await campus.devices(mesh, OFFLINE_DEVICES, "Offline POS")
        # A code's time is a whole second, and settlement asks the directory about the member at
        # that instant: a code made in the second its member was created would name a member who
        # did not exist yet (MEMBER_UNKNOWN). Terminals meet members long after; so does the bench.
        await asyncio.sleep(1.1)
        per_device = OFFLINE_RECORDS // len(devices)
        uploads: list[tuple[BenchDevice, dpb.Upload]] = []
        members = campus.members
        picks = itertools.count()
        for device in devices:
            records = []
            for sequence in range(1, per_device + 1):
                member_id = members[next(picks) % len(members)]
                text, credential_id, counter = campus.code(member_id)
                # The record's time is the code's: the hub verifies the code at it.
                event_time = Timestamp(seconds=codes.decode_code(text).time_s)
                records.append(_signed_record(device, dpb.OfflineRecord(
                    sequence=sequence, event_time=event_time, purpose=dpb.PURPOSE_PAY, method=dpb.METHOD_CODE,
                    member_id=member_id, credential_id=credential_id, counter=counter, code=text,
                    amount_fen=PRICE_FEN, legs=[dpb.PlanLeg(purse_kind="cash", amount_fen=PRICE_FEN)],
                    bundle_version=1)))
            for start in range(0, len(records), UPLOAD_SIZE):
                uploads.append((device, dpb.Upload(upload_id=uuid.uuid4().hex,
                                                   records=records[start:start + UPLOAD_SIZE])))
        outcomes: dict[int, int] = {}
        refusals: dict[str, int] = {}
        queues = {device.device_id: [u for d, u in uploads if d is device] for device in devices}
        retried = 0

        async def drain(device: BenchDevice) -> None:
            nonlocal retried
            queue = queues[device.device_id]
            while queue:
                upload = queue.pop(0)
                for attempt in range(UPLOAD_ATTEMPTS):
                    answer = await device.ask(upload.upload_id, dpb.ConnectRequest(upload=upload))
                    # A busy ledger answers "retry later"; a terminal sends the same upload again,
                    # and its records' keys make the second sending book nothing twice.
                    if (answer.WhichOneof("body") == "error" and answer.error.reason.endswith(RETRY_LATER_SUFFIX)
                            and attempt + 1 < UPLOAD_ATTEMPTS):
                        retried += 1
                        await asyncio.sleep(0.5 * (attempt + 1))
                        continue
                    break
                if answer.WhichOneof("body") != "upload_result":
                    raise RuntimeError(f"upload refused: {answer}")
                for result in answer.upload_result.results:
                    outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
                    if result.outcome != dpb.RECORD_OUTCOME_BOOKED:
                        refusals[result.reason] = refusals.get(result.reason, 0) + 1

        before = mesh.cpu_s()
        started = time.perf_counter()
        await asyncio.gather(*(drain(device) for device in devices for _ in range(UPLOADS_IN_FLIGHT_PER_DEVICE)))
        elapsed = time.perf_counter() - started
        after = mesh.cpu_s()
        booked = outcomes.get(dpb.RECORD_OUTCOME_BOOKED, 0)
        if booked != per_device * len(devices):
            named = {dpb.RecordOutcome.Name(k): v for k, v in outcomes.items()}
            raise RuntimeError(f"offline outcomes: {named}; reasons of those not booked: {refusals}")
        statement = await mesh.ledger.GetBalances(lpb.GetBalancesRequest(
            tenant_id=campus.tenant_id, account_ids=[campus.merchant]), timeout=CALL_TIMEOUT_S)
        merchant_fen = statement.accounts[0].balance.posted_fen
        if merchant_fen != booked * PRICE_FEN:
            raise RuntimeError(f"the merchant holds {merchant_fen} fen for {booked} records")
    finally:
        for device in devices:
            await device.close()
        await mesh.close()
    spent_s = {who: after[who] - before[who] for who in after}
    figures: Figures = {"devicehub.offline_settle_per_s": booked / elapsed,
                        "devicehub.offline_settle_uploads_retried": retried,
                        "devicehub.offline_settle_cpu_ms_per_record": cpu_ms_per_operation(spent_s, booked)[0]}
    for who, seconds in spent_s.items():
        figures[f"devicehub.offline_settle_{who}_cpu_ratio"] = seconds / elapsed
    return figures

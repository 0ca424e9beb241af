"""The device hub under load: simulated POS terminals paying by holder code through the whole mesh,
and a fleet's offline records uploaded and settled.

``devicehub.online_pay_per_s`` / ``devicehub.online_pay_p99_ms``: POS terminals (one enrolled,
authenticated stream each) send ``authorize`` with a fresh holder code per payment; the hub
verifies the code, asks policy for the plan and has the ledger post it; the answer comes back on
the stream. Closed loop: each of ``concurrency`` workers sends its next payment when the last one
is answered. 60 s unless ``--duration-s`` says otherwise. Goal (issue 6): ≥ 1000/s, p99 ≤ 50 ms.
``devicehub.online_pay_vs_ledger_pay_ratio``: the same rate divided by LedgerService.Pay called
directly by the same client in the same run (what the hub, policy and code checks cost on top of
the payment itself). The ``*_cpu_ratio`` figures say where the time went.

``devicehub.offline_settle_per_s``: 100,000 device-signed offline records (10 devices, uploads of
1,000, every record a payment by code carrying the code's text) settled through the devices'
streams: records per second from the first upload to the last answer, every record's evidence
checked again by the hub (the code verified at the record's time, the member's state then, the
rules' plan on the device's counters) before the ledger books it; every record is checked BOOKED
once and the merchant's total after. 25 payments per member per device: the tenant's codes and
rule set allow 50 offline payments a member a day and 50,000 yuan a device (the example's 20 and
20,000 would refuse the rest).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

import grpc
import nacl.signing
from google.protobuf.timestamp_pb2 import Timestamp
import onecard_codes as codes
from onecard_codes import Purpose
from onecard_codes.issue import make_holder_code
from onecard_device.identity import challenge_message, record_message
from onecard_policy.examples import university_rule_set

from bench.harness import DEFAULT_DURATION_S, BenchContext, Figures, benchmark
from bench.ledger import _proc_cpu_s
from bench.load import closed_loop_calls
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
from runtime.grpc_client import open_channel

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
OFFLINE_COUNT_PER_DAY = 50
# 10,000 records of 5 yuan on each device in one day.
OFFLINE_DEVICE_PER_DAY_FEN = 5_000_000


class BenchDevice:
    """One enrolled POS on its own authenticated stream; answers are matched by request id."""

    def __init__(self, stub: devicehub_pb2_grpc.DeviceServiceStub, tenant_id: str, device_id: str,
                 key: nacl.signing.SigningKey):
        self.stub, self.tenant_id, self.device_id, self.key = stub, tenant_id, device_id, key
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
            await self._call.done_writing()
        if self._reader is not None:
            self._reader.cancel()


class Mesh:
    def __init__(self, context: BenchContext, mark: int, targets: dict[str, str], pids: dict[str, int]):
        self.context, self.mark = context, mark
        self.targets, self.pids = targets, pids
        self.channels = {name: open_channel(target) for name, target in targets.items()}
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channels["identity"])
        self.codegen = codegen_pb2_grpc.CodegenServiceStub(self.channels["codegen"])
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self.channels["ledger"])
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channels["policy"])
        self.admin = devicehub_pb2_grpc.DeviceAdminServiceStub(self.channels["devicehub"])
        self.devices = devicehub_pb2_grpc.DeviceServiceStub(self.channels["devicehub"])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        # Its relays and consumers must not go on working while the next benchmark measures.
        await self.context.stop_children_since(self.mark)


async def _start_mesh(context: BenchContext, name: str) -> Mesh:
    """The five services on a database of their own (not what earlier benchmarks left behind)."""
    targets: dict[str, str] = {}
    pids: dict[str, int] = {}
    mark = context.children
    database_url = context.fresh_database(name)
    for name, module, env in (
        ("identity", "services.identity", {}),
        ("codegen", "services.codegen", {"ONECARD_CODEGEN_MASTER_KEY": BENCH_CODEGEN_KEY}),
        ("ledger", "services.ledger", {}),
        ("policy", "services.policy", {"ONECARD_POLICY_MASTER_KEY": BENCH_POLICY_KEY}),
        ("devicehub", "services.devicehub", {}),
    ):
        wired = {f"ONECARD_{peer.upper()}_TARGET": target for peer, target in targets.items()}
        targets[name], pids[name] = await context.start_grpc_service(
            name=f"{name}-dh", module=module, env={**wired, **env}, database_url=database_url)
    return Mesh(context, mark, targets, pids)


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
        async def one(index: int) -> BenchDevice:
            registered = await mesh.admin.RegisterDevice(dpb.RegisterDeviceRequest(
                tenant_id=self.tenant_id, kind=dpb.DEVICE_KIND_POS, model="bench-pos", name=f"{prefix} {index}",
                location=STORE, scene_tags=["store"], merchant_account_id=self.merchant,
                firmware_version="bench-1"), timeout=CALL_TIMEOUT_S)
            key = nacl.signing.SigningKey.generate()
            await mesh.devices.Enrol(dpb.EnrolRequest(enrolment_token=registered.enrolment_token,
                                                      public_key=bytes(key.verify_key), firmware_version="bench-1"),
                                     timeout=CALL_TIMEOUT_S)
            device = BenchDevice(mesh.devices, self.tenant_id, registered.device.device_id, key)
            await device.connect()
            return device

        return list(await _gather_limited([one(i) for i in range(count)]))


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: _proc_cpu_s(pid) for name, pid in pids.items()}


@benchmark("devicehub.online_pay",
           description="POS terminals paying by holder code on their streams through hub, policy and ledger")
async def online_pay(context: BenchContext) -> Figures:
    load = context.load
    duration_s = ONLINE_DURATION_S if load.duration_s == DEFAULT_DURATION_S else load.duration_s
    mesh = await _start_mesh(context, "devicehub_online")
    campus = Campus()
    devices: list[BenchDevice] = []
    try:
        await campus.seed(mesh)
        devices = await campus.devices(mesh, POS_DEVICES, "Bench POS")
        members = campus.members
        picks = itertools.count()
        declined: dict[str, int] = {}

        async def pay(worker: int) -> bool:
            member_id = members[next(picks) % len(members)]
            text, _, _ = campus.code(member_id)
            request_id = uuid.uuid4().hex
            device = devices[worker % len(devices)]
            answer = await device.ask(request_id, dpb.ConnectRequest(authorize=dpb.Authorize(
                request_id=request_id, presentation=dpb.Presentation(code=text), purpose=dpb.PURPOSE_PAY,
                amount_fen=PRICE_FEN, idempotency_key=f"bench-{request_id}")))
            result = answer.authorize_result
            if not result.approved:
                declined[result.reason or answer.error.reason] = declined.get(result.reason or answer.error.reason, 0) + 1
            return result.approved

        ledger_picks = itertools.count()

        async def ledger_pay(_worker: int) -> bool:
            member_id = members[next(ledger_picks) % len(members)]
            answer = await mesh.ledger.Pay(lpb.PayRequest(
                tenant_id=campus.tenant_id, idempotency_key=f"direct-{uuid.uuid4().hex}",
                merchant_account_id=campus.merchant, legs=[lpb.PayLeg(account_id=campus.cash[member_id],
                                                                      amount_fen=PRICE_FEN)]),
                timeout=CALL_TIMEOUT_S)
            return bool(answer.transfer.transfer_id)

        # The first payment checked before measuring: approved and booked.
        if not await pay(0):
            raise RuntimeError(f"a bench payment was declined: {declined}")
        results = {}
        cpu: dict[str, dict[str, float]] = {}
        for name, call, measured_s in (("ledger", ledger_pay, load.duration_s), ("hub", pay, duration_s)):
            await closed_loop_calls(call=call, duration_s=load.warmup_s, concurrency=load.concurrency)
            before = _cpu(mesh.pids)
            results[name] = await closed_loop_calls(call=call, duration_s=measured_s, concurrency=load.concurrency)
            after = _cpu(mesh.pids)
            cpu[name] = {who: (after[who] - before[who]) / results[name].elapsed_s for who in mesh.pids}
        if declined:
            raise RuntimeError(f"bench payments were declined: {declined}")
        for name, result in results.items():
            if result.errors:
                raise RuntimeError(f"{name}: {result.errors} of {result.requests} calls failed")
    finally:
        for device in devices:
            await device.close()
        await mesh.close()
    hub, ledger = results["hub"], results["ledger"]
    figures: Figures = {
        "devicehub.online_pay_per_s": hub.rps,
        "devicehub.online_pay_p50_ms": hub.percentile_ms(0.50),
        "devicehub.online_pay_p99_ms": hub.percentile_ms(0.99),
        "devicehub.ledger_pay_per_s": ledger.rps,
        "devicehub.online_pay_vs_ledger_pay_ratio": hub.rps / ledger.rps if ledger.rps else 0.0,
        "devicehub.online_pay_client_cpu_ratio": hub.client_cpu_ratio,
    }
    for who, value in cpu["hub"].items():
        figures[f"devicehub.online_pay_{who}_cpu_ratio"] = value
    return figures


def _signed_record(device: BenchDevice, record: dpb.OfflineRecord) -> dpb.OfflineRecord:
    message = record_message(tenant_id=device.tenant_id, device_id=device.device_id, record=record)
    record.signature = device.key.sign(message).signature
    return record


@benchmark("devicehub.offline_settle",
           description="100,000 device-signed offline records uploaded on 10 streams and settled by the ledger")
async def offline_settle(context: BenchContext) -> Figures:
    mesh = await _start_mesh(context, "devicehub_offline")
    campus = Campus()
    devices: list[BenchDevice] = []
    try:
        await campus.seed(mesh)
        devices = await campus.devices(mesh, OFFLINE_DEVICES, "Offline POS")
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
        queues = {device.device_id: [u for d, u in uploads if d is device] for device in devices}

        async def drain(device: BenchDevice) -> None:
            queue = queues[device.device_id]
            while queue:
                upload = queue.pop(0)
                answer = await device.ask(upload.upload_id, dpb.ConnectRequest(upload=upload))
                if answer.WhichOneof("body") != "upload_result":
                    raise RuntimeError(f"upload refused: {answer}")
                for result in answer.upload_result.results:
                    outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1

        before = _cpu(mesh.pids)
        started = time.perf_counter()
        await asyncio.gather(*(drain(device) for device in devices for _ in range(UPLOADS_IN_FLIGHT_PER_DEVICE)))
        elapsed = time.perf_counter() - started
        after = _cpu(mesh.pids)
        booked = outcomes.get(dpb.RECORD_OUTCOME_BOOKED, 0)
        if booked != per_device * len(devices):
            raise RuntimeError(f"offline outcomes: {outcomes}")
        statement = await mesh.ledger.GetBalances(lpb.GetBalancesRequest(
            tenant_id=campus.tenant_id, account_ids=[campus.merchant]), timeout=CALL_TIMEOUT_S)
        merchant_fen = statement.accounts[0].balance.posted_fen
        if merchant_fen != booked * PRICE_FEN:
            raise RuntimeError(f"the merchant holds {merchant_fen} fen for {booked} records")
    finally:
        for device in devices:
            await device.close()
        await mesh.close()
    figures: Figures = {"devicehub.offline_settle_per_s": booked / elapsed}
    for who in mesh.pids:
        figures[f"devicehub.offline_settle_{who}_cpu_ratio"] = (after[who] - before[who]) / elapsed
    return figures

"""The lunch rush the chaos run drives (chaos.schedule.workload says what, and when), and the
faults it inflicts at the same time (chaos.schedule.fault_schedule).

Every terminal is a real ``onecard_device.DeviceClient`` on the hub's device port: canteen tills
(four online, one that drops offline now and then, two offline the whole rush and uploading at the
end), two gates, and a milk cabinet with its till. Each device works through its own operations one
after the other, as a till does, each no earlier than its planned offset. The driver keeps what every
till was told (``Sale``): the audit compares that with the books.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import onecard_codes as codes
from onecard_device.client import NO_ANSWER_REVERSED, DeviceClient, Outcome

from chaos import schedule as plan
from chaos.receiver import WebhookReceiver
from chaos.stack import ChaosStack
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.webhooks.v1 import webhooks_pb2 as wpb
from tests.devicehub.tx_support import Campus, Member, add_member, campus

AUTHORIZE_TIMEOUT_S = 8.0
ADMIN_RETRY_S = 90.0
DRAIN_TIMEOUT_S = 180.0
WEBHOOK_EVENT_TYPES = ["payment.booked", "refund.booked", "topup.booked"]
WEBHOOK_CLIENT = "chaos-partner"
WEBHOOK_SCOPES = ["wallets:read", "members:read", "ledger:admin", "devices:admin", "webhooks:manage"]


@dataclass
class Sale:
    """One payment a till attempted, and what it showed."""
    device: str
    key: str
    member: int
    amount_fen: int
    started_s: float
    answered_s: float = 0.0
    outcome: Outcome | None = None
    error: str = ""
    # How many faults began while it waited for its answer.
    faults_during: int = 0


@dataclass
class Device:
    name: str
    kind: int
    client: DeviceClient
    offline_all_rush: bool = False


@dataclass
class FaultLog:
    at_s: float
    kind: str
    target: str
    landed: bool
    detail: str
    in_flight: int
    # When the fault began and when it was healed (restarted, resumed), from the rush's start.
    began_s: float = 0.0
    healed_s: float = 0.0


class ChaosRush:
    def __init__(self, *, stack: ChaosStack, root: Path, seed: int, duration_s: float, short: bool,
                 say=print) -> None:  # noqa: ANN001
        self.stack, self.root, self.seed = stack, root, seed
        self.schedule = plan.fault_schedule(seed, duration_s=duration_s, short=short)
        self.workload = plan.workload(seed, duration_s=duration_s, short=short)
        self.say = say
        self.tenant_id = ""
        self.campus: Campus | None = None
        self.members: list[Member] = []
        self.devices: dict[str, Device] = {}
        self.sales: list[Sale] = []
        self.passes: Counter = Counter()
        self.cabinet: Counter = Counter()
        self.admin_done: Counter = Counter()
        self.frozen: set[int] = set()
        self.faults: list[FaultLog] = []
        self.receiver = WebhookReceiver()
        self.endpoint_id = ""
        self._in_flight: set[int] = set()
        self._t0 = 0.0

    # ---- setup ----

    async def setup(self) -> None:
        stack = self.stack
        self.identity, self.codegen = stack.client("identity"), stack.client("codegen")
        self.ledger, self.policy, self.admin = stack.client("ledger"), stack.client("policy"), stack.client("devicehub")
        self.webhooks = stack.client("webhooks")
        created = await self.identity.stub.CreateTenant(ipb.CreateTenantRequest(
            name="Chaos University", kind=ipb.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai", currency="CNY"))
        self.tenant_id = created.tenant.tenant_id
        self.campus = await campus(identity=self.identity, ledger=self.ledger, policy=self.policy,
                                   tenant_id=self.tenant_id, any_hour=True)
        await self.receiver.start()
        endpoint = await self.webhooks.stub.CreateEndpoint(wpb.CreateEndpointRequest(
            tenant_id=self.tenant_id, client_id=WEBHOOK_CLIENT, caller_scopes=WEBHOOK_SCOPES, url=self.receiver.url,
            event_types=WEBHOOK_EVENT_TYPES, idempotency_key=f"chaos-endpoint-{self.seed}",
            key_scope=f"client:{WEBHOOK_CLIENT}"))
        self.endpoint_id = endpoint.endpoint.endpoint_id
        limit = asyncio.Semaphore(6)

        async def member(index: int) -> Member:
            async with limit:
                assert self.campus is not None
                return await add_member(self.campus, identity=self.identity, ledger=self.ledger,
                                        number=f"C{index:03d}", cash_fen=plan.CASH_FEN, codegen=self.codegen,
                                        card_uid=f"0C{index:06d}")

        self.members = list(await asyncio.gather(*(member(i) for i in range(self.workload.members))))
        for name, offline in plan.pos_names():
            await self._device(name, pb.DEVICE_KIND_POS, location="north-canteen", scene="canteen",
                               merchant=self.campus.merchant_id, offline=offline)
        for gate in range(plan.GATES):
            await self._device(f"gate-{gate}", pb.DEVICE_KIND_GATE, location="library", scene="gate")
        till = await self._device("cabinet-pos", pb.DEVICE_KIND_POS, location="milk-cabinet", scene="vending",
                                  merchant=self.campus.vending_id)
        await self._device("cabinet", pb.DEVICE_KIND_CABINET, location="milk-cabinet", scene="vending",
                           merchant=self.campus.vending_id, parent=till.client.device_id)
        for device in self.devices.values():
            await device.client.start()
        await self.until(lambda: all(d.client.connected and d.client.state.rule_set is not None
                                     and d.client.state.trust_list.keys for d in self.devices.values()),
                         what="every terminal connected with its rules and trust list", timeout_s=120)
        for device in self.devices.values():
            if device.offline_all_rush:
                device.client.go_offline()

    async def _device(self, name: str, kind: int, *, location: str, scene: str, merchant: str = "",
                      parent: str = "", offline: bool = False) -> Device:
        registered = await self.admin.stub.RegisterDevice(pb.RegisterDeviceRequest(
            tenant_id=self.tenant_id, kind=kind, model="chaos", name=name, location=location, scene_tags=[scene],
            merchant_account_id=merchant, parent_device_id=parent))
        client = DeviceClient(target=self.stack.device_targets(), data_dir=self.root / "terminals" / name,
                              ca_pem=registered.hub_ca_pem, heartbeat_interval_s=1.0, reconnect_min_s=0.1,
                              reconnect_max_s=1.0, authorize_timeout_s=AUTHORIZE_TIMEOUT_S, durable=False)
        await client.enrol(registered.enrolment_token)
        device = Device(name=name, kind=kind, client=client, offline_all_rush=offline)
        self.devices[name] = device
        return device

    async def until(self, predicate, *, what: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    def now_s(self) -> float:
        return time.monotonic() - self._t0

    # ---- the rush ----

    async def run(self) -> None:
        self._t0 = time.monotonic()
        by_device: dict[str, list[plan.Op]] = {}
        admin_ops = []
        for op in self.workload.ops:
            if op.device:
                by_device.setdefault(op.device, []).append(op)
            else:
                admin_ops.append(op)
        work = [self._device_ops(name, ops) for name, ops in by_device.items()]
        work += [self._admin_op(op) for op in admin_ops]
        work += [self._fault(fault) for fault in self.schedule.faults]
        results = await asyncio.gather(*work, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _at(self, at_s: float) -> None:
        wait = at_s - self.now_s()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _device_ops(self, name: str, ops: list[plan.Op]) -> None:
        device = self.devices[name]
        for op in ops:
            await self._at(op.at_s)
            if op.kind == plan.GO_OFFLINE:
                device.client.go_offline()
            elif op.kind == plan.GO_ONLINE:
                device.client.go_online()
            elif op.kind == plan.PAY:
                await self._pay(device, op)
            elif op.kind == plan.PASS:
                await self._pass(device, op)
            elif op.kind == plan.CABINET:
                await self._cabinet(device, op)

    async def _pay(self, device: Device, op: plan.Op) -> None:
        member = self.members[op.member]
        presentation = (pb.Presentation(card_uid=member.card_uid) if op.by_card
                        else pb.Presentation(code=member.code()))
        sale = Sale(device=device.name, key=f"chaos-{uuid.uuid4().hex}", member=op.member, amount_fen=op.amount_fen,
                    started_s=self.now_s())
        self.sales.append(sale)
        index = len(self.sales) - 1
        self._in_flight.add(index)
        try:
            sale.outcome = await device.client.pay(presentation, op.amount_fen, idempotency_key=sale.key)
        except Exception as exc:  # noqa: BLE001 - what the till showed is "error"; the audit decides
            sale.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            sale.answered_s = self.now_s()
            self._in_flight.discard(index)

    async def _pass(self, device: Device, op: plan.Op) -> None:
        member = self.members[op.member]
        presentation = (pb.Presentation(card_uid=member.card_uid) if op.by_card
                        else pb.Presentation(code=member.code(purpose=codes.Purpose.ACCESS)))
        try:
            outcome = await device.client.access(presentation)
            self.passes[("online " if outcome.online else "offline ") + ("pass" if outcome.approved else "deny")] += 1
        except Exception as exc:  # noqa: BLE001
            self.passes[f"error {type(exc).__name__}"] += 1

    async def _cabinet(self, device: Device, op: plan.Op) -> None:
        if not device.client.connected:
            self.cabinet["till offline"] += 1
            return
        member = self.members[op.member]
        cabinet_id = self.devices["cabinet"].client.device_id
        try:
            held = await device.client.cabinet_order(
                cabinet_device_id=cabinet_id, presentation=pb.Presentation(code=member.code()),
                amount_fen=op.amount_fen, item="milk")
        except Exception as exc:  # noqa: BLE001
            self.cabinet[f"order {type(exc).__name__}"] += 1
            return
        if held.stage != pb.CABINET_STAGE_HELD:
            self.cabinet[f"declined {held.reason}"] += 1
            return
        deadline = time.monotonic() + ADMIN_RETRY_S
        while True:  # the cabinet reports until the hub answers
            try:
                settled = await device.client.cabinet_dispensed(held.order_id, op.dispensed)
                self.cabinet[pb.CabinetStage.Name(settled.stage).removeprefix("CABINET_STAGE_").lower()] += 1
                return
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() > deadline:
                    self.cabinet[f"report {type(exc).__name__}"] += 1
                    return
                await asyncio.sleep(0.5)

    async def _admin_op(self, op: plan.Op) -> None:
        await self._at(op.at_s)
        member = self.members[op.member]
        deadline = time.monotonic() + ADMIN_RETRY_S
        key = f"chaos-top-up-{op.at_s}-{op.member}"
        while True:
            try:
                if op.kind == plan.FREEZE:
                    await self.identity.stub.FreezeMember(ipb.FreezeMemberRequest(
                        tenant_id=self.tenant_id, member_id=member.member_id, reason="lost phone at lunch"),
                        timeout=10)
                    self.frozen.add(op.member)
                else:
                    assert self.campus is not None
                    await self.ledger.stub.TopUp(lpb.TopUpRequest(
                        tenant_id=self.tenant_id, idempotency_key=key, from_account_id=self.campus.bank_id,
                        to_account_id=member.cash_id, amount_fen=op.amount_fen), timeout=10)
                self.admin_done[op.kind] += 1
                return
            except grpc.aio.AioRpcError as exc:
                if op.kind == plan.FREEZE and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self.frozen.add(op.member)  # frozen already (a retry after a lost answer)
                    self.admin_done[op.kind] += 1
                    return
                if time.monotonic() > deadline:
                    raise
                self.admin_done[f"{op.kind} retried"] += 1
                await asyncio.sleep(0.5)

    # ---- faults ----

    async def _fault(self, fault: plan.Fault) -> None:
        await self._at(fault.at_s)
        began_s = self.now_s()
        in_flight = set(self._in_flight)
        for index in in_flight:
            self.sales[index].faults_during += 1
        stack = self.stack
        landed, detail = True, ""
        if fault.kind == plan.KILL:
            kill = await stack.kill(fault.target)
            landed, detail = kill.was_running, f"pid {kill.pid} exit {kill.exit_code}"
            await asyncio.sleep(fault.duration_s)
            await stack.restart(fault.target)
        elif fault.kind == plan.PAUSE:
            process = stack.replica(fault.target).process
            landed = process.returncode() is None
            if landed:
                stack.pause(fault.target)
                await asyncio.sleep(fault.duration_s)
                stack.resume(fault.target)
            detail = f"pid {process.pid}"
        elif fault.kind == plan.NATS_RESTART:
            await stack.restart_nats(fault.duration_s)
        elif fault.kind == plan.POSTGRES_RESTART:
            await stack.restart_postgres(fault.duration_s)
        else:
            proxy = stack.proxy
            assert proxy is not None
            before = proxy.stats.dropped + proxy.stats.refused + proxy.stats.delayed_chunks
            if fault.kind == plan.PROXY_DELAY:
                proxy.delay(fault.delay_s)
            else:
                proxy.drop()
            await asyncio.sleep(fault.duration_s)
            proxy.heal()
            done = proxy.stats.dropped + proxy.stats.refused + proxy.stats.delayed_chunks - before
            landed, detail = done > 0, f"{done} connections cut/refused or chunks delayed"
        self.faults.append(FaultLog(at_s=fault.at_s, kind=fault.kind, target=fault.target, landed=landed,
                                    detail=detail, in_flight=len(in_flight), began_s=began_s,
                                    healed_s=self.now_s()))
        self.say(f"  {self.now_s():6.1f} s  {fault.kind} {fault.target} done ({detail or 'ok'};"
                 f" {len(in_flight)} payments in flight)")

    # ---- the end ----

    async def heal_and_drain(self) -> None:
        """Every fault healed, every service serving, every terminal online and drained."""
        assert self.stack.proxy is not None
        self.stack.proxy.heal()
        await self.stack.all_serving()
        for device in self.devices.values():
            device.client.go_online()
        await self.until(lambda: all(d.client.connected and d.client.queue_depth() == 0
                                     and d.client.pending_reversals() == 0 for d in self.devices.values()),
                         what="every terminal's records and reversals settled")

    async def close(self) -> None:
        for device in self.devices.values():
            with contextlib.suppress(Exception):
                await device.client.close()
        await self.receiver.stop()

    # ---- what the tills saw ----

    def unanswered(self) -> list[Sale]:
        """Sales whose answer never came or whose outcome the hub could not know (reversed or refused
        for an unreachable service)."""
        return [s for s in self.sales if s.error or (s.outcome is not None and (
            s.outcome.reason == NO_ANSWER_REVERSED or s.outcome.reason.endswith("_UNAVAILABLE")))]

    def hit_by_faults(self) -> list[Sale]:
        """Online sales that waited for their answer while a fault was on (begun, not yet healed)."""
        return [s for s in self.sales if s.outcome is None or s.outcome.online
                if any(s.started_s < f.healed_s and s.answered_s > f.began_s for f in self.faults)]

    def tally(self) -> Counter:
        counts: Counter = Counter()
        for sale in self.sales:
            o = sale.outcome
            if o is None:
                counts["error"] += 1
            elif o.approved:
                counts["approved online" if o.online else "approved offline"] += 1
            else:
                counts[f"declined {o.reason}"] += 1
        return counts

"""A fleet of simulated terminals on the demo campus, against the stack `make run` started.

Every terminal is a real ``onecard_device.DeviceClient`` (the same protocol, its own key, its own
offline queue on disk): POS terminals at the demo merchants, gates, and a vending cabinet with its
POS. Members carry phones (a holder key with a codegen credential; codes made with
``onecard_codes.make_holder_code``) and some carry cards. The fleet pays by code and by card, passes
gates, orders from the cabinet, and drops offline now and then, coming back to upload its records.
A line every few seconds says what happened; a summary at the end.

The devices are kept in ``<data dir>/simulator/`` (keys, queues, which device is which), so the
next run reuses them instead of registering new ones.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nacl.signing
import onecard_codes as sdk
from onecard_policy.examples import university_rule_set

from devstack.config import DevstackConfig
from devstack.seed import DEMO_TENANT_ID
from devstack.seed_rules import SIMULATOR_CLEARING_REF
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.identity.v1 import identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard_device.client import NO_ANSWER_REVERSED, DeviceClient, Outcome
from runtime.grpc_client import error_info, open_channel
from runtime.mesh import MeshTLS, TLSMaterialError

CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 20.0
MODEL = "onecard-sim"
FIRMWARE = "sim-1.0.0"
FUND_FEN = 50_000  # what each simulated member gets in cash once a day
MAX_IN_FLIGHT = 32
# POS terminals go round these merchants (the example rule set's), with the scene each sells in.
POS_PLACES = (("campus-store", "store", (300, 3000)), ("canteen-north", "canteen", (500, 1800)),
              ("canteen-south", "canteen", (500, 1800)), ("gym-main", "gym", (1000, 2500)))
CABINET_MERCHANT = ("milk-cabinet", "vending", (300, 800))
GATE_PLACES = ("library", "gym-entrance", "dorm-3")
CANTEEN_CAPACITY = 300
DEMO_ACCESS_RULES = {
    "time_zone": "Asia/Shanghai",
    "rules": [
        {"name": "library-day", "places": ["library"], "purposes": ["access"], "from": "07:00", "to": "23:00",
         "offline": True},
        {"name": "gym-open", "places": ["gym-entrance"], "purposes": ["access"], "from": "06:00", "to": "22:00",
         "groups": {"role": ["student", "staff"]}, "offline": True},
        {"name": "dorm-3-students", "places": ["dorm-3"], "purposes": ["access"], "from": "06:00", "to": "23:30",
         "groups": {"role": ["student"]}},
    ],
}
log = logging.getLogger("devstack.simulator")


class SimulatorError(RuntimeError):
    """The stack is not there or refused the setup; the message says what to do."""


@dataclass(frozen=True)
class SimulatorOptions:
    pos: int = 4
    gates: int = 2
    cabinet: bool = True
    members: int = 40
    # None: until the stop event (Ctrl-C).
    duration_s: float | None = None
    # Payments per second across the fleet; gates pass at half this rate.
    rate: float = 2.0
    # The share of terminals offline at any moment (each drops for 10-30 s now and then).
    offline_share: float = 0.2
    report_every_s: float = 5.0
    # At the end: how long the terminals get, back online, to upload what they hold.
    drain_s: float = DRAIN_TIMEOUT_S
    seed: int | None = None
    data_dir: Path | None = None


@dataclass(frozen=True)
class Targets:
    """Where the simulator reaches the mesh (as ``tls`` names it: the simulator's certificate) and
    where its terminals dial the hub's device port."""

    identity: str
    codegen: str
    ledger: str
    devicehub: str
    devices: str
    tls: MeshTLS | None

    @classmethod
    def from_config(cls, config: DevstackConfig) -> Targets:
        hub = config.service("devicehub")
        try:
            tls = MeshTLS.load(config.identity_dir("simulator"))
        except TLSMaterialError:
            raise SimulatorError("no simulator certificate under the data folder; start the stack with `make run`"
                                 ) from None
        # With ONECARD_REPLICAS each names every replica; the terminals fail over between the hubs.
        return cls(identity=config.target_of("identity"), codegen=config.target_of("codegen"),
                   ledger=config.target_of("ledger"), devicehub=config.target_of(hub.spec.name),
                   devices=config.extra_target_of(hub.spec.name), tls=tls)


@dataclass
class Phone:
    """A member's phone: a holder key, a credential, the counter of the codes it showed."""

    member_id: str
    credential_bytes: bytes
    holder: nacl.signing.SigningKey
    counter: int = 0

    def code(self, purpose: sdk.Purpose) -> str:
        self.counter += 1
        return sdk.make_holder_code(credential_bytes=self.credential_bytes, holder_signing_key=self.holder,
                                    now_s=int(time.time()), counter=self.counter, purpose=purpose)


@dataclass
class SimMember:
    member_id: str
    name: str
    frozen: bool
    cards: tuple[str, ...]
    phone: Phone | None = None


@dataclass
class SimDevice:
    name: str
    kind: int
    location: str
    client: DeviceClient
    amounts: tuple[int, int] = (300, 3000)
    cabinet_id: str = ""  # a cabinet's POS: the cabinet it orders for


@dataclass
class Tally:
    online_paid: int = 0
    offline_paid: int = 0
    paid_fen: int = 0
    declined: Counter = field(default_factory=Counter)
    # Online payments whose answer did not come: final at the till as not paid, and reversed.
    unanswered: int = 0
    passed: int = 0
    denied: Counter = field(default_factory=Counter)
    offline_passes: int = 0
    cabinet: Counter = field(default_factory=Counter)
    drops: int = 0
    alarms_open: int = 0
    alarm_kinds: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


@dataclass
class SimulatorSummary:
    duration_s: float
    devices: int
    tally: Tally
    settled: Counter
    queued: int
    reversals: Counter = field(default_factory=Counter)


def _top(counter: Counter, n: int = 3) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counter.most_common(n))


class Simulator:
    def __init__(self, *, targets: Targets, options: SimulatorOptions, data_dir: Path,
                 out: Callable[[str], None] = print) -> None:
        self.targets = targets
        self.options = options
        self.data_dir = data_dir
        self.out = out
        self.rng = random.Random(options.seed)
        self.tally = Tally()
        self.members: list[SimMember] = []
        self.devices: list[SimDevice] = []
        self.merchants: dict[str, str] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task] = set()

    # ---- setup ----

    def _channel(self, target: str, server_name: str) -> grpc.aio.Channel:
        channel = open_channel(target, tls=self.targets.tls, server_name=server_name)
        self._channels.append(channel)
        return channel

    async def setup(self) -> None:
        self.identity = identity_pb2_grpc.IdentityServiceStub(self._channel(self.targets.identity, "identity"))
        self.codegen = codegen_pb2_grpc.CodegenServiceStub(self._channel(self.targets.codegen, "codegen"))
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channel(self.targets.ledger, "ledger"))
        self.admin = devicehub_pb2_grpc.DeviceAdminServiceStub(self._channel(self.targets.devicehub, "devicehub"))
        try:
            await self.identity.GetTenant(ipb.GetTenantRequest(tenant_id=DEMO_TENANT_ID), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc, "the demo tenant") from None
        try:
            await self._merchants()
            await self._members()
            await self._access_rules()
            await self._fleet()
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc, "the simulator's setup") from None

    async def _merchants(self) -> None:
        for merchant in university_rule_set()["merchants"]:
            opened = await self.ledger.OpenAccount(lpb.OpenAccountRequest(
                tenant_id=DEMO_TENANT_ID, owner_kind=lpb.OWNER_KIND_MERCHANT, owner_id=merchant["id"],
                purse_kind=lpb.PURSE_KIND_MERCHANT_SETTLEMENT), timeout=CALL_TIMEOUT_S)
            self.merchants[merchant["id"]] = opened.account.account.account_id

    async def _members(self) -> None:
        wanted = max(1, self.options.members)
        found: list[ipb.Member] = []
        frozen: list[ipb.Member] = []
        token = ""
        for _ in range(50):
            page = await self.identity.SearchMembers(ipb.SearchMembersRequest(
                tenant_id=DEMO_TENANT_ID, page_size=200, page_token=token), timeout=CALL_TIMEOUT_S)
            for member in page.members:
                if member.status == ipb.MEMBER_STATUS_ACTIVE:
                    found.append(member)
                elif member.status == ipb.MEMBER_STATUS_FROZEN and member.cards:
                    frozen.append(member)
            token = page.next_page_token
            if not token or len(found) >= wanted * 3:
                break
        if not found:
            raise SimulatorError("the demo tenant has no active members; is the demo seeded (`make run`)?")
        chosen = self.rng.sample(found, min(wanted, len(found)))
        opened = await self.ledger.OpenAccount(lpb.OpenAccountRequest(
            tenant_id=DEMO_TENANT_ID, owner_kind=lpb.OWNER_KIND_TENANT, owner_id=DEMO_TENANT_ID,
            purse_kind=lpb.PURSE_KIND_BANK_CLEARING, ref=SIMULATOR_CLEARING_REF), timeout=CALL_TIMEOUT_S)
        clearing = opened.account.account.account_id
        today = dt.date.today().isoformat()

        async def phone_for(member: ipb.Member) -> SimMember:
            cash = (await self.ledger.OpenAccount(lpb.OpenAccountRequest(
                tenant_id=DEMO_TENANT_ID, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member.member_id,
                purse_kind=lpb.PURSE_KIND_CASH, no_overdraft=True), timeout=CALL_TIMEOUT_S)).account.account.account_id
            await self.ledger.TopUp(lpb.TopUpRequest(
                tenant_id=DEMO_TENANT_ID, idempotency_key=f"simulator-fund:{member.member_id}:{today}",
                from_account_id=clearing, to_account_id=cash, amount_fen=FUND_FEN,
                external_ref="device simulator"), timeout=CALL_TIMEOUT_S)
            holder = sdk.generate_holder_key()
            issued = await self.codegen.IssueCredential(cpb.IssueCredentialRequest(
                tenant_id=DEMO_TENANT_ID, member_id=member.member_id, holder_public_key=sdk.holder_public_key(holder),
                purposes=[cpb.PURPOSE_PAY, cpb.PURPOSE_ACCESS, cpb.PURPOSE_RIDE]), timeout=CALL_TIMEOUT_S)
            return SimMember(member.member_id, member.name, False, _active_cards(member),
                             Phone(member.member_id, issued.credential_bytes, holder))

        semaphore = asyncio.Semaphore(8)

        async def limited(member: ipb.Member) -> SimMember:
            async with semaphore:
                return await phone_for(member)

        self.members = list(await asyncio.gather(*(limited(m) for m in chosen)))
        # A few frozen members with cards: terminals must refuse them, online and offline.
        self.members += [SimMember(m.member_id, m.name, True, _active_cards(m)) for m in frozen[:2]]

    async def _access_rules(self) -> None:
        current = await self.admin.GetAccessRules(pb.GetAccessRulesRequest(tenant_id=DEMO_TENANT_ID),
                                                  timeout=CALL_TIMEOUT_S)
        if current.version == 0:
            await self.admin.SetAccessRules(pb.SetAccessRulesRequest(
                tenant_id=DEMO_TENANT_ID, rules_json=json.dumps(DEMO_ACCESS_RULES)), timeout=CALL_TIMEOUT_S)

    def _registry_path(self) -> Path:
        return self.data_dir / "devices.json"

    def _load_registry(self) -> dict[str, str]:
        path = self._registry_path()
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        return dict(data.get("devices", {})) if data.get("tenant_id") == DEMO_TENANT_ID else {}

    def _save_registry(self, registry: dict[str, str]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._registry_path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"tenant_id": DEMO_TENANT_ID, "devices": registry}, indent=1, sort_keys=True))
        tmp.replace(self._registry_path())

    async def _device(self, registry: dict[str, str], *, name: str, kind: int, location: str,
                      scene_tags: list[str], merchant: str = "", parent_device_id: str = "",
                      capacity: int = 0) -> DeviceClient:
        """The named terminal: reused from an earlier run when it is still enrolled, else registered
        and enrolled anew (in a fresh folder: a new key)."""
        device_id = registry.get(name, "")
        if device_id:
            folder = self.data_dir / device_id
            try:
                got = await self.admin.GetDevice(pb.GetDeviceRequest(tenant_id=DEMO_TENANT_ID, device_id=device_id),
                                                 timeout=CALL_TIMEOUT_S)
                usable = got.device.status == pb.DEVICE_STATUS_ACTIVE and (folder / "identity.json").exists()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                usable = False
            if usable:
                return self._client(folder)
        registered = await self.admin.RegisterDevice(pb.RegisterDeviceRequest(
            tenant_id=DEMO_TENANT_ID, kind=kind, model=MODEL, name=name, location=location, scene_tags=scene_tags,
            merchant_account_id=self.merchants.get(merchant, ""), parent_device_id=parent_device_id,
            firmware_version=FIRMWARE, capacity=capacity), timeout=CALL_TIMEOUT_S)
        device_id = registered.device.device_id
        client = self._client(self.data_dir / device_id, ca_pem=registered.hub_ca_pem)
        await client.enrol(registered.enrolment_token)
        registry[name] = device_id
        self._save_registry(registry)
        return client

    def _client(self, folder: Path, *, ca_pem: str | None = None) -> DeviceClient:
        """A terminal in ``folder``: it checks the hub against ``ca_pem`` (from its registration) or,
        once enrolled, the bundle it kept; plaintext only against a hub in insecure development mode."""
        return DeviceClient(target=self.targets.devices, data_dir=folder, firmware_version=FIRMWARE,
                            ca_pem=ca_pem or None, insecure=self.targets.tls is None,
                            heartbeat_interval_s=5.0, reconnect_max_s=10.0,
                            health=lambda: {"reader": "ok", "printer": "ok"})

    async def _fleet(self) -> None:
        registry = self._load_registry()
        options = self.options
        for index in range(options.pos):
            merchant, scene, amounts = POS_PLACES[index % len(POS_PLACES)]
            client = await self._device(
                registry, name=f"Sim POS {index + 1} ({merchant})", kind=pb.DEVICE_KIND_POS, location=merchant,
                scene_tags=[scene], merchant=merchant, capacity=CANTEEN_CAPACITY if scene == "canteen" else 0)
            self.devices.append(SimDevice(f"POS {index + 1}", pb.DEVICE_KIND_POS, merchant, client, amounts))
        for index in range(options.gates):
            place = GATE_PLACES[index % len(GATE_PLACES)]
            client = await self._device(registry, name=f"Sim gate {index + 1} ({place})", kind=pb.DEVICE_KIND_GATE,
                                        location=place, scene_tags=["gate"])
            self.devices.append(SimDevice(f"gate {index + 1}", pb.DEVICE_KIND_GATE, place, client))
        if options.cabinet:
            merchant, scene, amounts = CABINET_MERCHANT
            pos = await self._device(registry, name="Sim POS (milk cabinet)", kind=pb.DEVICE_KIND_POS,
                                     location=merchant, scene_tags=[scene], merchant=merchant)
            cabinet = await self._device(registry, name="Sim milk cabinet", kind=pb.DEVICE_KIND_CABINET,
                                         location=merchant, scene_tags=[scene], merchant=merchant,
                                         parent_device_id=pos.device_id)
            self.devices.append(SimDevice("cabinet POS", pb.DEVICE_KIND_POS, merchant, pos, amounts,
                                          cabinet_id=cabinet.device_id))
            self.devices.append(SimDevice("cabinet", pb.DEVICE_KIND_CABINET, merchant, cabinet))

    # ---- running ----

    def _spawn(self, coroutine) -> None:  # noqa: ANN001
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _limited(self, coroutine) -> None:  # noqa: ANN001
        async with self._in_flight:
            try:
                await coroutine
            except Exception as exc:  # one failed step is counted, the fleet goes on
                self.tally.errors[type(exc).__name__] += 1
                log.debug("simulated step failed", exc_info=True)

    def _presentation(self, member: SimMember, purpose: sdk.Purpose) -> pb.Presentation:
        use_card = member.cards and (member.phone is None or self.rng.random() < 0.3)
        if use_card:
            return pb.Presentation(card_uid=self.rng.choice(member.cards))
        assert member.phone is not None
        return pb.Presentation(code=member.phone.code(purpose))

    def _member(self) -> SimMember:
        frozen = [m for m in self.members if m.frozen]
        if frozen and self.rng.random() < 0.02:
            return self.rng.choice(frozen)
        return self.rng.choice([m for m in self.members if not m.frozen] or self.members)

    async def _pay_once(self) -> None:
        tills = [d for d in self.devices if d.kind == pb.DEVICE_KIND_POS and d.client.refused is None]
        if not tills:
            return
        device = self.rng.choice(tills)
        member = self._member()
        if not member.cards and member.phone is None:
            return
        presentation = self._presentation(member, sdk.Purpose.PAY)
        amount = self.rng.randint(*device.amounts)
        outcome = await device.client.pay(presentation, amount)
        self._count_payment(outcome)
        if presentation.WhichOneof("credential") == "code" and self.rng.random() < 0.03:
            # A screenshot shown again at another till: refused there (online or offline).
            other = self.rng.choice(tills)
            self._count_payment(await other.client.pay(presentation, amount))

    def _count_payment(self, outcome: Outcome) -> None:
        if outcome.approved:
            if outcome.online:
                self.tally.online_paid += 1
            else:
                self.tally.offline_paid += 1
            self.tally.paid_fen += outcome.charged_fen
        elif outcome.reason == NO_ANSWER_REVERSED:
            self.tally.unanswered += 1
        else:
            self.tally.declined[outcome.reason or "DECLINED"] += 1

    async def _pass_once(self) -> None:
        gates = [d for d in self.devices if d.kind == pb.DEVICE_KIND_GATE and d.client.refused is None]
        if not gates:
            return
        device = self.rng.choice(gates)
        member = self._member()
        if not member.cards and member.phone is None:
            return
        outcome = await device.client.access(self._presentation(member, sdk.Purpose.ACCESS))
        if outcome.approved:
            self.tally.passed += 1
        else:
            self.tally.denied[outcome.reason or "DENIED"] += 1
        if not outcome.online:
            self.tally.offline_passes += 1

    async def _cabinet_order(self, device: SimDevice) -> None:
        if not device.client.connected:
            self.tally.cabinet["POS_OFFLINE"] += 1
            return
        member = self._member()
        if member.phone is None:
            return
        held = await device.client.cabinet_order(
            cabinet_device_id=device.cabinet_id, presentation=pb.Presentation(code=member.phone.code(sdk.Purpose.PAY)),
            amount_fen=self.rng.randint(*device.amounts), item=f"slot-{self.rng.randint(1, 12)}")
        if held.stage != pb.CABINET_STAGE_HELD:
            self.tally.cabinet[f"DECLINED {held.reason}".strip()] += 1
            return
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))  # the motor turns
        dispensed = self.rng.random() < 0.85
        settled = await device.client.cabinet_dispensed(held.order_id, dispensed)
        self.tally.cabinet[pb.CabinetStage.Name(settled.stage).removeprefix("CABINET_STAGE_")] += 1

    async def _payments(self) -> None:
        rate = max(self.options.rate, 0.01)
        while True:
            await asyncio.sleep(self.rng.expovariate(rate))
            self._spawn(self._limited(self._pay_once()))

    async def _gates(self) -> None:
        rate = max(self.options.rate / 2, 0.01)
        while True:
            await asyncio.sleep(self.rng.expovariate(rate))
            self._spawn(self._limited(self._pass_once()))

    async def _cabinets(self) -> None:
        pos = [d for d in self.devices if d.cabinet_id]
        while pos:
            await asyncio.sleep(self.rng.uniform(8.0, 20.0))
            self._spawn(self._limited(self._cabinet_order(self.rng.choice(pos))))

    async def _flaky(self, device: SimDevice) -> None:
        """Each terminal drops offline now and then, so about ``offline_share`` of them are at once."""
        share = min(max(self.options.offline_share, 0.0), 0.95)
        if share == 0:
            return
        first = True
        while True:
            offline_s = self.rng.uniform(10.0, 30.0)
            online_s = offline_s * (1 - share) / share
            # The first drop comes anywhere in a first online period, so the fleet does not drop together.
            await asyncio.sleep(self.rng.uniform(0, online_s) if first else self.rng.expovariate(1 / online_s))
            first = False
            device.client.go_offline()
            self.tally.drops += 1
            await asyncio.sleep(offline_s)
            device.client.go_online()

    async def _alarms(self) -> None:
        try:
            listed = await self.admin.ListAlarms(pb.ListAlarmsRequest(tenant_id=DEMO_TENANT_ID, page_size=200),
                                                 timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return
        self.tally.alarms_open = len(listed.alarms)
        self.tally.alarm_kinds = Counter(pb.AlarmKind.Name(a.kind).removeprefix("ALARM_KIND_") for a in listed.alarms)

    def reversals(self) -> Counter:
        """The hub's answers to the fleet's timeout reversals (REVERSED: a booked payment refunded;
        PREVENTED: nothing had been booked), and the ones still waiting for an answer (PENDING)."""
        total: Counter = Counter()
        for device in self.devices:
            total.update({k.removeprefix("REVERSAL_OUTCOME_"): v for k, v in device.client.stats.reversals.items()})
            if device.client.refused is None and (pending := device.client.pending_reversals()):
                total["PENDING"] += pending
        return total

    def settled(self) -> Counter:
        total: Counter = Counter()
        for device in self.devices:
            total.update({k.removeprefix("RECORD_OUTCOME_"): v for k, v in device.client.stats.settled.items()})
        return total

    def line(self, elapsed_s: float) -> str:
        t = self.tally
        online = sum(1 for d in self.devices if d.client.connected)
        queued = sum(d.client.queue_depth() for d in self.devices)
        settled = self.settled()
        parts = [
            f"[{elapsed_s:6.0f}s] paid {t.online_paid} online / {t.offline_paid} offline"
            f" ({t.paid_fen / 100:.2f} CNY)",
            f"settled {sum(settled.values())}" + (f" ({_top(settled)})" if settled else ""),
            f"declined {sum(t.declined.values())}" + (f" ({_top(t.declined)})" if t.declined else ""),
            f"gates {t.passed} pass / {sum(t.denied.values())} deny" + (f" ({_top(t.denied, 2)})" if t.denied else ""),
        ]
        if t.cabinet:
            parts.append("cabinet " + _top(t.cabinet, 4))
        parts.append(f"devices {online}/{len(self.devices)} online, {queued} queued")
        parts.append(f"alarms {t.alarms_open}" + (f" ({_top(t.alarm_kinds)})" if t.alarm_kinds else ""))
        reversals = self.reversals()
        if t.unanswered or reversals:
            parts.append(f"reversed {t.unanswered}" + (f" ({_top(reversals)})" if reversals else ""))
        if t.errors:
            parts.append(f"errors {_top(t.errors)}")
        return " | ".join(parts)

    async def run(self, stop: asyncio.Event) -> SimulatorSummary:
        started = time.monotonic()
        for device in self.devices:
            await device.client.start()
        await asyncio.gather(*(d.client.wait_connected(CONNECT_TIMEOUT_S) for d in self.devices))
        connected = sum(1 for d in self.devices if d.client.connected)
        self.out(f"simulator: {len(self.devices)} terminals ({connected} connected), {len(self.members)} members, "
                 f"{self.options.rate:g} payments/s, {self.options.offline_share:.0%} offline at a time")
        workers = [asyncio.create_task(self._payments()), asyncio.create_task(self._gates()),
                   asyncio.create_task(self._cabinets())]
        workers += [asyncio.create_task(self._flaky(d)) for d in self.devices if d.kind != pb.DEVICE_KIND_CABINET]
        deadline = None if self.options.duration_s is None else started + self.options.duration_s
        try:
            while not stop.is_set():
                wait_s = self.options.report_every_s
                if deadline is not None:
                    wait_s = min(wait_s, max(deadline - time.monotonic(), 0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait_s)
                await self._alarms()
                self.out(self.line(time.monotonic() - started))
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=10.0)
            await self._drain()
            await self._alarms()
        return SimulatorSummary(time.monotonic() - started, len(self.devices), self.tally, self.settled(),
                                sum(d.client.queue_depth() for d in self.devices), self.reversals())

    async def _drain(self) -> None:
        """Everyone back online, and a little time for the offline records to settle."""
        for device in self.devices:
            device.client.go_online()
        deadline = time.monotonic() + self.options.drain_s
        while time.monotonic() < deadline:
            live = [d for d in self.devices if d.client.refused is None]
            if all(d.client.queue_depth() == 0 and d.client.pending_reversals() == 0 for d in live):
                break
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        for device in self.devices:
            with contextlib.suppress(Exception):
                await device.client.close()
        for channel in self._channels:
            await channel.close()


def _active_cards(member: ipb.Member) -> tuple[str, ...]:
    return tuple(c.card_uid for c in member.cards if c.status == ipb.CARD_STATUS_ACTIVE)


def _refusal(exc: grpc.aio.AioRpcError, what: str) -> SimulatorError:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return SimulatorError(f"{what}: the local stack does not answer; start it with `make run` in another terminal")
    reason, _ = error_info(exc)
    return SimulatorError(f"{what}: {exc.code().name} {reason or ''}: {exc.details()}")


def summary_text(summary: SimulatorSummary) -> list[str]:
    t = summary.tally
    lines = [
        f"simulator summary ({summary.duration_s:.0f}s, {summary.devices} terminals)",
        f"  payments   {t.online_paid} online, {t.offline_paid} offline, {t.paid_fen / 100:.2f} CNY charged",
        f"  declined   {sum(t.declined.values())}" + (f": {_top(t.declined, 6)}" if t.declined else ""),
        f"  settled    {sum(summary.settled.values())} offline records"
        + (f": {_top(summary.settled, 5)}" if summary.settled else "") + f"; {summary.queued} still queued",
        f"  gates      {t.passed} passed, {sum(t.denied.values())} denied"
        + (f": {_top(t.denied, 5)}" if t.denied else "") + f" ({t.offline_passes} decided offline)",
        f"  cabinet    {_top(t.cabinet, 5) or 'no orders'}",
        f"  offline    {t.drops} drops",
        f"  reversed   {t.unanswered} online payments left unanswered at the till"
        + (f"; the hub answered: {_top(summary.reversals, 3)}" if summary.reversals else ""),
        f"  alarms     {t.alarms_open} open" + (f": {_top(t.alarm_kinds, 8)}" if t.alarm_kinds else ""),
    ]
    if t.errors:
        lines.append(f"  errors     {_top(t.errors, 5)}")
    return lines


async def run_simulator(config: DevstackConfig, stop: asyncio.Event, *, options: SimulatorOptions = SimulatorOptions(),
                        out: Callable[[str], None] = print) -> SimulatorSummary:
    """Run the fleet until ``stop`` is set (or ``options.duration_s`` passed); answers the summary.
    Raises SimulatorError when the stack is not there."""
    data_dir = options.data_dir or config.data_dir / "simulator"
    simulator = Simulator(targets=Targets.from_config(config), options=options, data_dir=data_dir, out=out)
    try:
        await simulator.setup()
        return await simulator.run(stop)
    finally:
        await simulator.close()


__all__ = ["SimulatorError", "SimulatorOptions", "SimulatorSummary", "Targets", "run_simulator", "summary_text"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: python -m devstack.simulate")

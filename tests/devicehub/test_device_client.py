"""The reference device client (sdk/python/onecard_device) against the real hub and mesh: it
enrols, connects, pays online, goes offline, pays offline, reconnects, and its records settle
exactly once."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import nacl.signing
from onecard_codes import Purpose, make_holder_code

from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as ppb
from onecard_device.client import NO_ANSWER_REVERSED, DeviceClient
from tests.mesh import pki
from tests.conftest import RunningService
from tests.ledger.support import allow_credit

FUNDED_FEN = 10_000


def _rule_set(merchant: str) -> dict:
    return {"format": 1, "time_zone": "Asia/Shanghai", "scenes": ["store"],
            "merchants": [{"id": merchant, "scenes": ["store"]}], "funding_order": ["cash"],
            "offline": {"credential": {"per_transaction_fen": 3000}, "device": {"per_day_fen": 100_000}}}


async def _open(ledger: RunningService, tenant_id: str, owner_kind: int, owner_id: str, purse_kind: int) -> str:
    answer = await ledger.stub.OpenAccount(lpb.OpenAccountRequest(
        tenant_id=tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind))
    return answer.account.account.account_id


async def _cash_fen(ledger: RunningService, tenant_id: str, member_id: str) -> int:
    state = await ledger.stub.GetMemberState(lpb.GetMemberStateRequest(tenant_id=tenant_id, member_id=member_id))
    return sum(a.balance.posted_fen for a in state.accounts if a.account.purse_kind == lpb.PURSE_KIND_CASH)


async def _eventually(predicate, *, timeout_s: float = 20.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class _Campus:
    """A tenant with a store merchant, a published rule set, a funded member with a phone, and a
    registered POS at the store."""

    def __init__(self) -> None:
        self.counter = 0

    async def seed(self, *, identity: RunningService, codegen: RunningService, ledger: RunningService,
                   policy: RunningService, devicehub: RunningService, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        bank = await _open(ledger, tenant_id, lpb.OWNER_KIND_TENANT, "bank", lpb.PURSE_KIND_BANK_CLEARING)
        await allow_credit(ledger.stub, tenant_id, bank)
        self.merchant = await _open(ledger, tenant_id, lpb.OWNER_KIND_MERCHANT, "store",
                                    lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
        created = await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
            tenant_id=tenant_id, document=json.dumps(_rule_set(self.merchant)), note="device client test"))
        await policy.stub.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
            tenant_id=tenant_id, version=created.version.version, published_by="test"))
        self.member_id = (await identity.stub.CreateMember(ipb.CreateMemberRequest(
            tenant_id=tenant_id, external_number="S0001", name="Li Lei"))).member.member_id
        cash = await _open(ledger, tenant_id, lpb.OWNER_KIND_MEMBER, self.member_id, lpb.PURSE_KIND_CASH)
        await ledger.stub.TopUp(lpb.TopUpRequest(tenant_id=tenant_id, idempotency_key="fund", from_account_id=bank,
                                                 to_account_id=cash, amount_fen=FUNDED_FEN))
        self.holder = nacl.signing.SigningKey.generate()
        self.issued = await codegen.stub.IssueCredential(cpb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=self.member_id, holder_public_key=bytes(self.holder.verify_key),
            purposes=[cpb.PURPOSE_PAY]))
        self.registered = await devicehub.stub.RegisterDevice(pb.RegisterDeviceRequest(
            tenant_id=tenant_id, kind=pb.DEVICE_KIND_POS, model="sdk", name="Store till", location="store",
            scene_tags=["store"], merchant_account_id=self.merchant))

    def code(self) -> pb.Presentation:
        self.counter += 1
        return pb.Presentation(code=make_holder_code(
            credential_bytes=self.issued.credential_bytes, holder_signing_key=self.holder, now_s=int(time.time()),
            counter=self.counter, purpose=Purpose.PAY))

    async def connected_client(self, devicehub: RunningService, data_dir: Path, **options: Any) -> DeviceClient:
        settings: dict[str, Any] = {"heartbeat_interval_s": 0.5, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
                                    "durable": False}
        client = DeviceClient(target=devicehub.device_target, data_dir=data_dir, ca_pem=self.registered.hub_ca_pem,
                              **{**settings, **options})
        device_id = await client.enrol(self.registered.enrolment_token)
        assert device_id == self.registered.device.device_id
        await client.start()
        assert await client.wait_connected(10)
        await _eventually(lambda: client.state.rule_set is not None and client.state.trust_list.keys,
                          what="the trust list and the policy bundle")
        return client


async def test_a_device_pays_online_then_offline_and_its_records_settle_once(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=devicehub,
                      tenant_id=tenant_id)
    member_id = campus.member_id
    client = await campus.connected_client(devicehub, tmp_path)
    device_id = client.device_id
    try:
        online = await client.pay(campus.code(), 1000)
        assert online.approved and online.online and online.member_id == member_id, online
        assert online.charged_fen == 1000

        client.go_offline()
        await _eventually(lambda: not client.connected, what="the stream to drop")
        offline = [await client.pay(campus.code(), amount) for amount in (500, 700)]
        assert all(p.approved and not p.online for p in offline), offline
        assert [p.sequence for p in offline] == [1, 2]
        kept = [(q.sequence, q.event_time_s, q.purpose, q.body) for q in client.store.pending(limit=10)]

        client.go_online()
        await _eventually(lambda: client.queue_depth() == 0, what="the offline records to settle")
        assert client.stats.settled["RECORD_OUTCOME_BOOKED"] == 2
        assert await _cash_fen(ledger, tenant_id, member_id) == FUNDED_FEN - 1000 - 500 - 700

        # The same records uploaded again (a device that lost the answer) change nothing.
        with sqlite3.connect(client.store.path) as db:
            db.executemany("INSERT INTO records (sequence, event_time_s, purpose, body) VALUES (?, ?, ?, ?)", kept)
        client.go_offline()
        client.go_online()
        await _eventually(lambda: client.queue_depth() == 0, what="the re-upload")
        assert client.stats.settled["RECORD_OUTCOME_DUPLICATE"] == 2
        assert await _cash_fen(ledger, tenant_id, member_id) == FUNDED_FEN - 1000 - 500 - 700
        got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
        assert got.device.last_settled_sequence == 2
    finally:
        await client.close()


async def test_a_frozen_member_reaches_the_connected_device_and_is_refused_online_and_offline(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=devicehub,
                      tenant_id=tenant_id)
    client = await campus.connected_client(devicehub, tmp_path)
    try:
        assert (await client.pay(campus.code(), 100)).approved
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=campus.member_id,
                                                                 reason="lost phone"))
        frozen_at = time.monotonic()
        await _eventually(lambda: client.state.member_block(campus.member_id) == "frozen"
                          or str(campus.issued.credential.credential_id) in client.state.revoked_credentials,
                          timeout_s=10, what="the freeze to reach the device")
        assert time.monotonic() - frozen_at < 10
        online = await client.pay(campus.code(), 100)
        assert not online.approved and online.online
        assert online.reason in ("MEMBER_FROZEN", "CODE_REVOKED"), online
        offline = await client.pay(campus.code(), 100, offline=True)
        assert not offline.approved and offline.reason in ("MEMBER_FROZEN", "CODE_REVOKED"), offline
        assert client.queue_depth() == 0
    finally:
        await client.close()


async def test_the_simulator_runs_a_small_fleet_on_the_demo_campus(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tmp_path: Path) -> None:
    from devstack.seed import seed_demo
    from devstack.seed_rules import seed_rules
    from devstack.simulator import Simulator, SimulatorOptions, Targets, summary_text

    await seed_demo(identity_target=identity.target, tls=pki().tls("devstack"),
                    credentials_path=tmp_path / "credentials.json", member_count=30,
                    progress=lambda text, *, final: None)
    await seed_rules(ledger_target=ledger.target, policy_target=policy.target, tls=pki().tls("devstack"))
    lines: list[str] = []
    options = SimulatorOptions(pos=2, gates=1, members=8, duration_s=8, rate=4, offline_share=0.3,
                               report_every_s=2, seed=7)
    simulator = Simulator(targets=Targets(identity=identity.target, codegen=codegen.target, ledger=ledger.target,
                                          devicehub=devicehub.target, devices=devicehub.device_target,
                                          tls=pki().tls("simulator")),
                          options=options, data_dir=tmp_path / "simulator", out=lines.append)
    try:
        await simulator.setup()
        summary = await simulator.run(asyncio.Event())
    finally:
        await simulator.close()
    text = "\n".join(lines + summary_text(summary))
    assert summary.devices == 5, text  # 2 POS, 1 gate, the cabinet and its POS
    tally = summary.tally
    assert tally.online_paid + tally.offline_paid + sum(tally.declined.values()) > 0, text
    assert tally.passed + sum(tally.denied.values()) > 0, text
    assert not tally.errors, text
    assert summary.queued == 0, text
    assert len(lines) >= 3 and lines[0].startswith("simulator:"), text
    # A second run reuses the terminals it enrolled.
    again = Simulator(targets=simulator.targets, options=SimulatorOptions(pos=2, gates=1, members=4, duration_s=1,
                                                                          offline_share=0),
                      data_dir=tmp_path / "simulator", out=lines.append)
    try:
        await again.setup()
        assert {d.client.device_id for d in again.devices} == {d.client.device_id for d in simulator.devices}
    finally:
        await again.close()


async def test_a_gate_passes_online_and_offline_and_its_offline_passes_are_stored_once(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=devicehub,
                      tenant_id=tenant_id)
    await devicehub.stub.SetAccessRules(pb.SetAccessRulesRequest(tenant_id=tenant_id, rules_json=json.dumps({
        "time_zone": "Asia/Shanghai", "rules": [{"name": "library-all-day", "places": ["library"],
                                                 "purposes": ["access"], "from": "00:00", "to": "24:00",
                                                 "offline": True}]})))
    registered = await devicehub.stub.RegisterDevice(pb.RegisterDeviceRequest(
        tenant_id=tenant_id, kind=pb.DEVICE_KIND_GATE, model="sdk", name="Library gate", location="library"))
    client = DeviceClient(target=devicehub.device_target, data_dir=tmp_path, ca_pem=registered.hub_ca_pem,
                          heartbeat_interval_s=0.5,
                          reconnect_min_s=0.05, reconnect_max_s=0.5, durable=False)
    try:
        device_id = await client.enrol(registered.enrolment_token)
        await client.start()
        assert await client.wait_connected(10)
        await _eventually(lambda: client.state.access_rules is not None and client.state.trust_list.keys,
                          what="the access rules and the trust list")
        card = pb.Presentation(card_uid="A1B2C3D4")
        online = await client.access(card, nonce="online-1")
        assert online.online and not online.approved and online.reason == "UNKNOWN_CARD", online

        client.go_offline()
        await _eventually(lambda: not client.connected, what="the stream to drop")
        passes = [await client.access(card, nonce=f"offline-{i}") for i in range(2)]
        assert all(p.approved and not p.online and p.rule == "library-all-day" for p in passes), passes
        client.go_online()
        await _eventually(lambda: client.queue_depth() == 0, what="the passes to upload")
        listed = await devicehub.stub.ListAccessRecords(pb.ListAccessRecordsRequest(
            tenant_id=tenant_id, device_id=device_id))
        by_nonce = {r.nonce: r for r in listed.records}
        assert set(by_nonce) == {"online-1", "offline-0", "offline-1"}, listed
        assert by_nonce["offline-0"].offline and by_nonce["offline-0"].passed
        assert not by_nonce["online-1"].offline and by_nonce["online-1"].reason == "UNKNOWN_CARD"
        alarms = await devicehub.stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device_id))
        assert [pb.AlarmKind.Name(a.kind) for a in alarms.alarms] == [], alarms
    finally:
        await client.close()


async def test_a_decommissioned_device_stops_for_good(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=devicehub,
                      tenant_id=tenant_id)
    client = await campus.connected_client(devicehub, tmp_path)
    try:
        await devicehub.stub.DecommissionDevice(pb.DecommissionDeviceRequest(
            tenant_id=tenant_id, device_id=client.device_id))
        await _eventually(lambda: client.refused is not None, what="the refusal")
        assert client.refused.reason == "DEVICE_DECOMMISSIONED" and not client.connected
    finally:
        await client.close()


# ---- the device client's side of the protocol, each against the real hub ----

async def _seeded(identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
                  devicehub: RunningService, tenant_id: str) -> _Campus:
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=devicehub,
                      tenant_id=tenant_id)
    return campus


def _held_versions(client: DeviceClient) -> dict[str, int]:
    """What the device holds, named as the hub records acknowledgements."""
    assert client.state is not None
    return {pb.SyncKind.Name(kind).removeprefix("SYNC_KIND_"): version
            for kind, version in client.state.versions.items() if version > 0}


async def _acked_versions(devicehub_db, device_id: str) -> dict[str, int]:  # noqa: ANN001
    raw = await devicehub_db.fetchval("SELECT synced_versions FROM devices WHERE device_id = $1::uuid", device_id)
    return json.loads(raw) if isinstance(raw, str) else dict(raw or {})


async def _until(check, *, timeout_s: float = 10.0, what: str = ""):  # noqa: ANN001, ANN202
    """``check()`` (a coroutine) until it answers something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await check()
        if answer:
            return answer
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_device_enrols_connects_syncs_and_the_hub_records_its_acknowledgements(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, devicehub_db, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    from services.devicehub.registry import key_fingerprint

    campus = await _seeded(identity, codegen, ledger, policy, devicehub, tenant_id)
    client = await campus.connected_client(devicehub, tmp_path, heartbeat_interval_s=0.1)
    device_id = client.device_id
    try:
        # The hub holds the key the client made and kept.
        assert client.identity is not None
        got = (await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))).device
        assert got.key_fingerprint == key_fingerprint(client.identity.public_key)
        assert got.status == pb.DEVICE_STATUS_ACTIVE
        assert client.state.device.merchant_account_id == campus.merchant
        held = _held_versions(client)
        assert {"TRUST_LIST", "POLICY_BUNDLE", "MEMBER_BLOCKS"} <= set(held), held
        # Every sync applied is acknowledged, and the hub records the versions the device holds.
        await _until(lambda: _acked_with(devicehub_db, device_id, held), what="the hub to record the acks")

        async def heartbeat_seen() -> pb.Device | None:
            answer = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
            device = answer.device
            return device if device.online and device.HasField("last_seen_at") else None

        beat = await _until(heartbeat_seen, what="a heartbeat")
        assert beat.firmware_version == "1.0.0" and beat.queue_depth == 0
    finally:
        await client.close()

    # A restarted device says what it holds, and the hub sends nothing again.
    again = DeviceClient(target=devicehub.device_target, data_dir=tmp_path, heartbeat_interval_s=0.1,
                         reconnect_min_s=0.05, reconnect_max_s=0.5, durable=False)
    try:
        assert again.device_id == device_id and _held_versions(again) == held
        await again.start()
        assert await again.wait_connected(10)
        await asyncio.sleep(0.5)
        assert again.stats.sessions == 1 and again.stats.syncs_applied == 0, again.stats
        assert _held_versions(again) == held
        assert await _acked_versions(devicehub_db, device_id) == held
    finally:
        await again.close()


async def _acked_with(devicehub_db, device_id: str, held: dict[str, int]) -> bool:  # noqa: ANN001
    return await _acked_versions(devicehub_db, device_id) == held


async def test_a_forced_offline_payment_is_uploaded_while_connected(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    campus = await _seeded(identity, codegen, ledger, policy, devicehub, tenant_id)
    client = await campus.connected_client(devicehub, tmp_path)
    try:
        decided = await client.pay(campus.code(), 300, offline=True)
        assert decided.approved and not decided.online and decided.sequence == 1, decided
        # Connected all along: the record goes up at once, not at the next reconnect.
        assert client.connected
        await _eventually(lambda: client.queue_depth() == 0, what="the upload")
        assert client.stats.settled == {"RECORD_OUTCOME_BOOKED": 1} and client.stats.sessions == 1
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 300
        got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=client.device_id))
        assert got.device.last_settled_sequence == 1
        # Reconnecting uploads nothing more.
        uploads = client.stats.uploads
        client.go_offline()
        await _eventually(lambda: not client.connected, what="the stream to drop")
        client.go_online()
        assert await client.wait_connected(10)
        await asyncio.sleep(0.3)
        assert client.stats.uploads == uploads and client.stats.sessions == 2
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 300
    finally:
        await client.close()


async def _ledger_payments(ledger: RunningService, tenant_id: str, member_id: str) -> tuple[int, int]:
    """(payments, refunds) on the member's cash purse."""
    state = await ledger.stub.GetMemberState(lpb.GetMemberStateRequest(tenant_id=tenant_id, member_id=member_id))
    (cash,) = [a.account.account_id for a in state.accounts if a.account.purse_kind == lpb.PURSE_KIND_CASH]
    page = await ledger.stub.ListTransfers(lpb.ListTransfersRequest(tenant_id=tenant_id, account_id=cash,
                                                                    page_size=100))
    kinds = [t.kind for t in page.transfers]
    return kinds.count(lpb.TRANSFER_KIND_PAYMENT), kinds.count(lpb.TRANSFER_KIND_REFUND)


async def test_an_unanswered_online_payment_is_reversed_and_never_taken_again_offline(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        start_devicehub, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    from tests.devicehub.faults import HangingProxy

    # The hub reaches policy through a link that can swallow Pay calls (the fault), never a stand-in.
    link = await HangingProxy(policy.target).start()
    client: DeviceClient | None = None
    try:
        hub = await start_devicehub(policy_target=link.target)
        campus = await _seeded(identity, codegen, ledger, policy, hub, tenant_id)
        client = await campus.connected_client(hub, tmp_path, authorize_timeout_s=0.3)
        link.held.add("PayMany")
        unanswered = await client.pay(campus.code(), 500, "sale-1")
        # Final at the till: not approved, and whatever the hub did with it is undone.
        assert not unanswered.approved and unanswered.reason == NO_ANSWER_REVERSED, unanswered
        await _eventually(lambda: link.swallowed["PayMany"] == 1, what="the hub's PayMany call")
        await _eventually(lambda: client.stats.reversals["REVERSAL_OUTCOME_PREVENTED"] == 1,
                          what="the reversal's answer")
        assert client.pending_reversals() == 0
        # The same sale may not become an offline record too.
        again = await client.pay(campus.code(), 500, "sale-1", offline=True)
        assert not again.approved and again.reason == NO_ANSWER_REVERSED and not again.online, again
        assert client.queue_depth() == 0 and client.connected
        # Sold again, under a new key, once the link carries answers: paid once.
        link.held.clear()
        client.authorize_timeout_s = 10.0
        resold = await client.pay(campus.code(), 500, "sale-1-again")
        assert resold.approved and resold.online and resold.transfer_id, resold
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 500
        assert await _ledger_payments(ledger, tenant_id, campus.member_id) == (1, 0)
    finally:
        if client is not None:
            await client.close()
        await link.stop()


async def test_a_payment_that_arrives_after_the_till_gave_up_is_prevented_by_its_reversal(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        start_devicehub, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    from tests.devicehub.faults import HangingProxy

    link = await HangingProxy(policy.target).start()
    client: DeviceClient | None = None
    try:
        hub = await start_devicehub(policy_target=link.target)
        campus = await _seeded(identity, codegen, ledger, policy, hub, tenant_id)
        client = await campus.connected_client(hub, tmp_path, authorize_timeout_s=0.3)
        link.delay_s["PayMany"] = 2.0  # passed on long after the till gave up
        late = await client.pay(campus.code(), 700, "late-sale")
        assert not late.approved and late.reason == NO_ANSWER_REVERSED, late
        await _eventually(lambda: sum(client.stats.reversals.values()) == 1, what="the reversal's answer")
        await link.settled()  # the late Pay reached policy and the ledger, and was refused
        assert client.stats.reversals["REVERSAL_OUTCOME_PREVENTED"] == 1, client.stats.reversals
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN
        assert await _ledger_payments(ledger, tenant_id, campus.member_id) == (0, 0)
    finally:
        if client is not None:
            await client.close()
        await link.stop()


async def test_a_payment_booked_while_the_hub_gave_up_on_policy_is_reversed_by_the_till(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        start_devicehub, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Found by `make chaos` (issue 16): the hub's call to policy times out after the ledger booked
    the payment; the hub answers POLICY_UNAVAILABLE, which the till once showed as declined and
    left booked. The outcome is unknown, so the till reverses it like an answer that never came."""
    from tests.devicehub.faults import HangingProxy

    link = await HangingProxy(policy.target).start()
    client: DeviceClient | None = None
    try:
        hub = await start_devicehub(policy_target=link.target, downstream_timeout_s=1.0)
        campus = await _seeded(identity, codegen, ledger, policy, hub, tenant_id)
        client = await campus.connected_client(hub, tmp_path, authorize_timeout_s=10.0)
        link.answer_delay_s["PayMany"] = 2.5  # booked at once; the answer later than the hub waits
        sale = await client.pay(campus.code(), 600, "policy-too-slow")
        assert not sale.approved and sale.reason == NO_ANSWER_REVERSED and sale.online, sale
        await _eventually(lambda: client.stats.reversals["REVERSAL_OUTCOME_REVERSED"] == 1,
                          what="the reversal of the booked payment")
        assert client.pending_reversals() == 0
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN
        assert await _ledger_payments(ledger, tenant_id, campus.member_id) == (1, 1)
    finally:
        if client is not None:
            await client.close()
        await link.stop()


async def test_a_payment_booked_by_a_hub_that_died_before_answering_is_refunded_once(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        start_devicehub, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    """The hub is stopped between the booking and the answer: the device reconnects to the hub that
    comes back, sends its reversal, and the ledger refunds the payment exactly once. Every payment
    the ledger then holds unrefunded was confirmed to its device."""
    from tests.devicehub.faults import HangingProxy

    link = await HangingProxy(policy.target).start()
    client: DeviceClient | None = None
    try:
        first = await start_devicehub(policy_target=link.target)
        campus = await _seeded(identity, codegen, ledger, policy, first, tenant_id)
        client = await campus.connected_client(first, tmp_path, authorize_timeout_s=10.0)
        confirmed = await client.pay(campus.code(), 300, "before")
        assert confirmed.approved, confirmed
        link.answer_delay_s["PayMany"] = 3.0  # booked at once; the answer held back
        sale = asyncio.ensure_future(client.pay(campus.code(), 800, "doomed-sale"))
        await _eventually(lambda: link.calls["PayMany"] == 2 and not link._carried, what="the booking")
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 300 - 800
        device_port = int(first.device_target.rsplit(":", 1)[1])
        await first.app.stop()  # gone before its answer
        lost = await sale
        assert not lost.approved and lost.reason == NO_ANSWER_REVERSED, lost
        link.answer_delay_s.clear()
        await start_devicehub(policy_target=link.target, device_port=device_port)
        await _eventually(lambda: client.stats.reversals["REVERSAL_OUTCOME_REVERSED"] == 1, timeout_s=30,
                          what="the reversal through the hub that came back")
        assert client.pending_reversals() == 0
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 300
        assert await _ledger_payments(ledger, tenant_id, campus.member_id) == (2, 1)
    finally:
        if client is not None:
            await client.close()
        await link.stop()


async def _rollout_steps(devicehub_db, rollout_id: str) -> list[str]:  # noqa: ANN001
    rows = await devicehub_db.fetch(
        "SELECT payload FROM outbox WHERE subject = 'devicehub.rollout.device_reported' ORDER BY id")
    return [event["data"]["step"] for event in (json.loads(bytes(r["payload"])) for r in rows)
            if event["data"]["rollout_id"] == rollout_id]


async def test_update_commands_are_reported_step_by_step_and_a_failed_install_keeps_the_old_version(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, devicehub_db, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    campus = await _seeded(identity, codegen, ledger, policy, devicehub, tenant_id)
    client = await campus.connected_client(devicehub, tmp_path, update_step_s=0.01)
    device_id = client.device_id

    async def rollout(version: str, state: int) -> pb.Rollout:
        created = await devicehub.stub.CreateRollout(pb.CreateRolloutRequest(
            tenant_id=tenant_id, idempotency_key=f"firmware-{version}", target=pb.ROLLOUT_TARGET_FIRMWARE,
            version=version, kind=pb.DEVICE_KIND_POS, model="sdk", stage_sizes=[1], success_threshold=1.0,
            error_threshold=1))
        assert [d.device_id for d in created.rollout.devices] == [device_id]

        async def ended() -> pb.Rollout | None:
            got = (await devicehub.stub.GetRollout(pb.GetRolloutRequest(
                tenant_id=tenant_id, rollout_id=created.rollout.rollout_id))).rollout
            return got if got.state == state else None

        return await _until(ended, what=f"the rollout of {version} to end {pb.RolloutState.Name(state)}")

    try:
        done = await rollout("2.0.0", pb.ROLLOUT_STATE_SUCCEEDED)
        assert [(d.step, d.reported_version) for d in done.devices] == [(pb.UPDATE_STEP_SUCCEEDED, "2.0.0")]
        assert await _rollout_steps(devicehub_db, done.rollout_id) == ["downloading", "installing", "succeeded"]
        assert client.firmware_version == "2.0.0" and client.stats.updates == {"SUCCEEDED": 1}
        got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
        assert got.device.firmware_version == "2.0.0"

        client.fail_updates = True
        failed = await rollout("3.0.0", pb.ROLLOUT_STATE_STOPPED)
        assert [(d.step, d.reported_version) for d in failed.devices] == [(pb.UPDATE_STEP_FAILED, "2.0.0")]
        assert await _rollout_steps(devicehub_db, failed.rollout_id) == ["downloading", "installing", "failed"]
        assert client.firmware_version == "2.0.0" and client.stats.updates["FAILED"] == 1
        got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
        assert got.device.firmware_version == "2.0.0"
    finally:
        await client.close()


async def test_a_sync_pushed_while_connected_is_applied_and_acknowledged(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, devicehub_db, tenant_id: str, tmp_path: Path) -> None:  # noqa: ANN001
    campus = await _seeded(identity, codegen, ledger, policy, devicehub, tenant_id)
    client = await campus.connected_client(devicehub, tmp_path, heartbeat_interval_s=0.1)
    device_id = client.device_id
    try:
        assert client.state.version(pb.SYNC_KIND_CONFIG) == 0
        await devicehub.stub.UpdateDevice(pb.UpdateDeviceRequest(
            tenant_id=tenant_id, device_id=device_id, config_json='{"beep": false}'))
        await _eventually(lambda: client.state.version(pb.SYNC_KIND_CONFIG) == 1, what="the config")
        assert client.state.config == {"beep": False} and client.stats.sessions == 1
        assert (await _until(lambda: _acked_config(devicehub_db, device_id), what="the ack")) == 1

        async def reported() -> bool:
            got = await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
            return got.device.reported_config_version == 1

        await _until(reported, what="the heartbeat to report the config version")

        # A change the device cannot follow (it holds less than the hub sent it from) makes it
        # reconnect and say what it holds; the hub then sends from there.
        held = client.state.version(pb.SYNC_KIND_MEMBER_BLOCKS)
        assert held > 0
        client.state.versions[pb.SYNC_KIND_MEMBER_BLOCKS] = held - 1
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=campus.member_id,
                                                                 reason="lost phone"))
        await _eventually(lambda: client.state.member_block(campus.member_id) == "frozen", what="the freeze")
        assert client.stats.sessions == 2 and client.connected
        assert client.state.version(pb.SYNC_KIND_MEMBER_BLOCKS) > held
    finally:
        await client.close()


async def _acked_config(devicehub_db, device_id: str) -> int:  # noqa: ANN001
    return (await _acked_versions(devicehub_db, device_id)).get("CONFIG", 0)


async def test_a_bundle_signed_by_a_rotated_key_reaches_a_device_connected_before_the_rotation(
        identity: RunningService, codegen: RunningService, ledger: RunningService, policy: RunningService,
        devicehub: RunningService, tenant_id: str, tmp_path: Path) -> None:
    """The device learns the tenant's bundle keys in the hub's welcome. A bundle signed by a key
    rotated in after it connected does not open with what it holds: it reconnects once, the new
    welcome brings the new key, and the hub's bundle opens; the old rules hold meanwhile."""
    campus = await _seeded(identity, codegen, ledger, policy, devicehub, tenant_id)
    client = await campus.connected_client(devicehub, tmp_path)
    try:
        before = client.state.bundle_version
        await policy.stub.RotateBundleKey(ppb.RotateBundleKeyRequest(tenant_id=tenant_id, idempotency_key="rotate-1"))
        created = await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
            tenant_id=tenant_id, document=json.dumps(_rule_set(campus.merchant)), note="after the rotation"))
        await policy.stub.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
            tenant_id=tenant_id, version=created.version.version, published_by="test"))
        await _eventually(lambda: client.state.bundle_version == created.version.version,
                          what="the bundle signed by the new key")
        assert created.version.version > before
        assert len(client.state.bundle_keys) == 2 and client.connected
        assert client.stats.sessions == 2, "one reconnect to learn the key, no more"
    finally:
        await client.close()

"""A seeded lunch rush against a ReplicaStack, and its money outcome.

The plan (``plan(seed)``) is fixed before anything runs: 24 members, each paying 5 times (300 to
1,500 fen, inside every cap of the university rule set, so no limit and no balance decides an
outcome by the order payments happen to arrive in), spread over 6 canteen POS terminals; 4 pay
online (by code or card), 2 are offline through the whole rush (codes only: an offline terminal
knows no card it has not seen online) and upload at the end. One member is frozen at a fixed point
of the sequence: every payment of phase 1 is answered (and its code's second is over) before the
freeze, and phase 2 starts once
every online terminal holds the freeze (the member blocked, the credential revoked), so whichever
replica answers, the same payments are refused for the same reason. Top-ups arrive during phase 2.

Within a phase the terminals pay at once (each terminal one payment after the other, as a till
does), so the replicas see concurrent traffic; nothing in the outcome depends on that order.

The outcome (``Rush.outcome``) is what must not depend on how many replicas served it: per member
(by number, not id: each run has its own database) the cash balance; the count and net sum of
booked payments; every offline record's outcome and reason (by terminal and sequence); what each
till showed; the trial balance. ``Rush.once_each`` checks that no event had an effect twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from onecard_device.client import DeviceClient, Outcome

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.devicehub.tx_support import Campus, Member, add_member, campus
from tests.mesh import connect_nats
from tests.replicas.stack import ReplicaStack

MEMBERS = 24
PAYMENTS_EACH = 5
TERMINALS = 6
OFFLINE_TERMINALS = frozenset({4, 5})
CASH_FEN = 20_000
TOP_UPS = 6
TOP_UP_FEN = 5_000
SETTLE_TIMEOUT_S = 90.0
# The durable consumers the replicas share (each event must be handled by exactly one of them).
SHARED_DURABLES = (("IDENTITY", "ledger-member-purses", "identity.member.created"),
                   ("IDENTITY", "codegen-member-status", "identity.member.>"))


@dataclass(frozen=True)
class Step:
    index: int
    phase: int
    member: int
    terminal: int
    by_card: bool
    amount_fen: int


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    frozen_member: int
    top_ups: tuple[int, ...]  # members topped up in phase 2


def plan(seed: int) -> Plan:
    rng = random.Random(seed)
    wanted = [(member, rng.randrange(300, 1501)) for member in range(MEMBERS) for _ in range(PAYMENTS_EACH)]
    rng.shuffle(wanted)
    steps = []
    for index, (member, amount) in enumerate(wanted):
        terminal = rng.randrange(TERMINALS)
        by_card = terminal not in OFFLINE_TERMINALS and rng.random() < 0.3
        steps.append(Step(index=index, phase=1 if index < len(wanted) // 2 else 2, member=member,
                          terminal=terminal, by_card=by_card, amount_fen=amount))
    frozen = rng.randrange(MEMBERS)
    # After the freeze the frozen member tries online too, once by card and once by code.
    steps += [Step(index=len(steps), phase=2, member=frozen, terminal=0, by_card=True, amount_fen=800),
              Step(index=len(steps) + 1, phase=2, member=frozen, terminal=1, by_card=False, amount_fen=600)]
    return Plan(steps=tuple(steps), frozen_member=frozen,
                top_ups=tuple(rng.randrange(MEMBERS) for _ in range(TOP_UPS)))


@dataclass
class Terminal:
    name: str
    client: DeviceClient
    offline: bool


@dataclass
class Rush:
    stack: ReplicaStack
    root: Path
    plan: Plan
    tenant_id: str = ""
    campus: Campus | None = None
    members: list[Member] = field(default_factory=list)
    terminals: list[Terminal] = field(default_factory=list)
    shown: dict[int, Outcome] = field(default_factory=dict)

    async def setup(self) -> None:
        stack = self.stack
        self.identity, self.codegen = stack.client("identity"), stack.client("codegen")
        self.ledger, self.policy, self.admin = stack.client("ledger"), stack.client("policy"), stack.client("devicehub")
        created = await self.identity.stub.CreateTenant(ipb.CreateTenantRequest(
            name="Replica University", kind=ipb.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai", currency="CNY"))
        self.tenant_id = created.tenant.tenant_id
        self.campus = await campus(identity=self.identity, ledger=self.ledger, policy=self.policy,
                                   tenant_id=self.tenant_id, any_hour=True)
        limit = asyncio.Semaphore(6)

        async def member(index: int) -> Member:
            async with limit:
                assert self.campus is not None
                return await add_member(self.campus, identity=self.identity, ledger=self.ledger,
                                        number=f"R{index:02d}", cash_fen=CASH_FEN, codegen=self.codegen,
                                        card_uid=f"0B{index:06d}")

        self.members = list(await asyncio.gather(*(member(i) for i in range(MEMBERS))))
        hubs = stack.device_targets()
        for index in range(TERMINALS):
            registered = await self.admin.stub.RegisterDevice(pb.RegisterDeviceRequest(
                tenant_id=self.tenant_id, kind=pb.DEVICE_KIND_POS, model="rush", name=f"POS {index}",
                location="north-canteen", scene_tags=["canteen"], merchant_account_id=self.campus.merchant_id))
            # Half the tills list the hubs one way round, half the other: both hubs hold tills.
            order = hubs[index % len(hubs):] + hubs[:index % len(hubs)]
            client = DeviceClient(target=order, data_dir=self.root / f"pos-{index}", ca_pem=registered.hub_ca_pem,
                                  heartbeat_interval_s=1.0, reconnect_min_s=0.1, reconnect_max_s=1.0,
                                  authorize_timeout_s=45.0, durable=False)
            await client.enrol(registered.enrolment_token)
            self.terminals.append(Terminal(name=f"POS {index}", client=client, offline=index in OFFLINE_TERMINALS))
        for terminal in self.terminals:
            await terminal.client.start()
        await self.until(lambda: all(t.client.connected and t.client.state.rule_set is not None
                                     and t.client.state.trust_list.keys for t in self.terminals),
                         what="every till connected with its rules and trust list")
        for terminal in self.terminals:
            if terminal.offline:
                terminal.client.go_offline()
        await self.until(lambda: not any(t.client.connected for t in self.terminals if t.offline),
                         what="the offline tills off")

    async def until(self, predicate: Callable[[], bool], *, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    # ---- the rush ----

    async def _pay(self, step: Step) -> None:
        member = self.members[step.member]
        presentation = pb.Presentation(card_uid=member.card_uid) if step.by_card else pb.Presentation(code=member.code())
        client = self.terminals[step.terminal].client
        self.shown[step.index] = await client.pay(presentation, step.amount_fen,
                                                  idempotency_key=f"rush-{step.index}")

    async def _phase(self, phase: int, *, after_step: Callable[[int], Awaitable[None]] | None) -> None:
        done = 0

        async def till(terminal: int) -> None:
            nonlocal done
            for step in self.plan.steps:
                if step.phase == phase and step.terminal == terminal:
                    await self._pay(step)
                    done += 1
                    if after_step is not None:
                        await after_step(done)

        await asyncio.gather(*(till(t) for t in range(TERMINALS)))

    async def _freeze(self) -> None:
        # Codes carry whole seconds and a revocation covers the codes of its own second: the freeze
        # waits for the next second, so every code of phase 1 is older than it, however fast the
        # phase went.
        await asyncio.sleep(1.0 - time.time() % 1.0 + 0.05)
        frozen = self.members[self.plan.frozen_member]
        await self.identity.stub.FreezeMember(ipb.FreezeMemberRequest(
            tenant_id=self.tenant_id, member_id=frozen.member_id, reason="lost phone, reported at lunch"))

        def everywhere() -> bool:
            return all(t.client.state.member_block(frozen.member_id) == "frozen"
                       and (frozen.credential_id in t.client.state.revoked_credentials
                            or frozen.member_id in t.client.state.revoked_members)
                       for t in self.terminals if not t.offline and t.client.connected)

        await self.until(everywhere, what="the freeze on every online till")

    async def _top_ups(self) -> None:
        assert self.campus is not None
        for number, member in enumerate(self.plan.top_ups):
            await self.ledger.stub.TopUp(lpb.TopUpRequest(
                tenant_id=self.tenant_id, idempotency_key=f"rush-top-up-{number}", from_account_id=self.campus.bank_id,
                to_account_id=self.members[member].cash_id, amount_fen=TOP_UP_FEN))

    async def run(self, *, during_phase_2: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Phase 1, the freeze, phase 2 with the top-ups beside it (``during_phase_2`` is called
        after each of its payments with how many are done), then every till online until its
        queue and its reversals are settled."""
        await self.until(lambda: all(t.client.connected for t in self.terminals if not t.offline),
                         what="the online tills connected")
        await self._phase(1, after_step=None)
        await self._freeze()
        await asyncio.gather(self._phase(2, after_step=during_phase_2), self._top_ups())
        for terminal in self.terminals:
            terminal.client.go_online()
        await self.until(lambda: all(t.client.connected and t.client.queue_depth() == 0
                                     and t.client.pending_reversals() == 0 for t in self.terminals),
                         what="every till's records and reversals settled")

    async def close(self) -> None:
        for terminal in self.terminals:
            await terminal.client.close()

    # ---- what came of it ----

    async def outcome(self) -> dict[str, Any]:
        assert self.campus is not None
        balances = await self.ledger.stub.GetBalances(lpb.GetBalancesRequest(
            tenant_id=self.tenant_id, account_ids=[m.cash_id for m in self.members]))
        by_account = {a.account.account_id: a.balance.posted_fen for a in balances.accounts}
        trial = await self.ledger.stub.TrialBalance(lpb.TrialBalanceRequest(tenant_id=self.tenant_id))
        device_names = {t.client.device_id: t.name for t in self.terminals}
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            paid = await conn.fetchrow(
                "SELECT count(*) AS n, COALESCE(sum(p.paid_fen - p.refunded_fen), 0) AS net_fen,"
                " COALESCE(sum(p.paid_fen), 0) AS paid_fen FROM ledger.payments p WHERE p.tenant_id = $1",
                uuid.UUID(self.tenant_id))
            records = await conn.fetch(
                "SELECT device_id, sequence, outcome, reason FROM devicehub.offline_records WHERE tenant_id = $1",
                uuid.UUID(self.tenant_id))
        finally:
            await conn.close()
        merchant = (await self.ledger.stub.GetBalances(lpb.GetBalancesRequest(
            tenant_id=self.tenant_id, account_ids=[self.campus.merchant_id]))).accounts[0].balance.posted_fen
        return {
            "balances_fen": {f"R{i:02d}": by_account[m.cash_id] for i, m in enumerate(self.members)},
            "merchant_fen": merchant,
            "payments": {"count": paid["n"], "paid_fen": paid["paid_fen"], "net_fen": paid["net_fen"]},
            "offline_records": sorted((device_names[str(r["device_id"])], r["sequence"], r["outcome"], r["reason"])
                                      for r in records),
            "tills": {index: (o.approved, o.online, o.reason, o.charged_fen) for index, o in sorted(self.shown.items())},
            "trial_balance": (trial.balanced, trial.postings_sum_fen, trial.balances_sum_fen),
        }

    async def once_each(self) -> dict[str, Any]:
        """No event had an effect twice: each shared durable's events handled once (its
        ``processed_events`` rows are exactly the stream's events of its filter, none redelivered
        after a success), and each transfer's event published once though every ledger replica
        runs an outbox relay."""
        nc = await connect_nats(self.stack.nats_url)
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            js = nc.jetstream()
            found: dict[str, Any] = {}
            for stream, durable, subjects in SHARED_DURABLES:
                async def drained(stream: str = stream, durable: str = durable) -> bool:
                    info = await js.consumer_info(stream, durable)
                    return info.num_pending == 0 and info.num_ack_pending == 0

                deadline = time.monotonic() + SETTLE_TIMEOUT_S
                while not await drained():
                    assert time.monotonic() < deadline, f"{durable} never caught up"
                    await asyncio.sleep(0.1)
                in_stream = sum((await js.stream_info(stream, subjects_filter=subjects)).state.subjects.values())
                schema = durable.split("-")[0]
                handled = await conn.fetchval(f"SELECT count(*) FROM {schema}.processed_events WHERE consumer = $1",
                                              durable)
                info = await js.consumer_info(stream, durable)
                found[durable] = {"in_stream": in_stream, "handled": handled,
                                  "redelivered": info.num_redelivered}
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while await conn.fetchval("SELECT count(*) FROM ledger.outbox WHERE published_at IS NULL"):
                assert time.monotonic() < deadline, "the ledger's outbox never emptied"
                await asyncio.sleep(0.1)
            posted = (await js.stream_info("LEDGER", subjects_filter="ledger.transfer.posted")).state.subjects
            transfers = await conn.fetchval("SELECT count(*) FROM ledger.transfers")
            found["ledger.transfer.posted"] = {"in_stream": sum(posted.values()), "transfers": transfers}
            return found
        finally:
            await conn.close()
            with contextlib.suppress(Exception):
                await nc.close()


def dump(outcome: dict[str, Any]) -> str:
    return json.dumps(outcome, indent=1, sort_keys=True, default=str)


def differences(left: dict[str, Any], right: dict[str, Any]) -> list[str]:
    """Where two outcomes differ, one line each (for a failing comparison's message)."""
    lines = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key), right.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += [f"{key}[{k}]: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b), key=str)
                      if a.get(k) != b.get(k)]
        elif isinstance(a, list) and isinstance(b, list):
            lines += [f"{key}: only in the first {x}" for x in a if x not in b]
            lines += [f"{key}: only in the second {x}" for x in b if x not in a]
        else:
            lines.append(f"{key}: {a} != {b}")
    return lines



"""The fault schedule and the workload plan: pure functions of the seed.

Both are computed before anything starts, from ``random.Random(seed)`` alone, so one seed always
names the same faults at the same offsets against the same targets, and the same payments by the
same members at the same tills. What the real system does with them (which payment a kill
catches in flight, how long a restart takes on a loaded machine) is timing, and may differ
between two runs of one seed: the schedule is reproducible, the interleaving is not.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# The services the chaos run starts, in start order; each is killed (SIGKILL) and restarted once.
SERVICES = ("identity", "codegen", "ledger", "policy", "devicehub", "webhooks")
# Services paused (SIGSTOP, then SIGCONT): the ones a payment waits on.
PAUSABLE = ("ledger", "policy", "devicehub", "identity")

KILL, PAUSE, NATS_RESTART, POSTGRES_RESTART, PROXY_DELAY, PROXY_DROP = (
    "kill", "pause", "nats-restart", "postgres-restart", "proxy-delay", "proxy-drop")
FAULT_KINDS = (KILL, PAUSE, NATS_RESTART, POSTGRES_RESTART, PROXY_DELAY, PROXY_DROP)
PROXY_TARGET = "hub->policy"

# Nothing is scheduled in the first and last seconds of the rush: the tills connect first, and
# the last fault has healed before the rush ends.
LEAD_IN_S = 3.0
TAIL_S = 4.0
DEFAULT_DURATION_S = 150.0
SHORT_DURATION_S = 36.0


@dataclass(frozen=True)
class Fault:
    at_s: float        # offset from the start of the rush
    kind: str
    target: str
    duration_s: float  # down (kill: before the restart), paused, or the proxy's window
    delay_s: float = 0.0  # proxy-delay: added to each chunk forwarded


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration_s: float
    faults: tuple[Fault, ...]


def fault_schedule(seed: int, *, duration_s: float = DEFAULT_DURATION_S, short: bool = False) -> Schedule:
    """Every kind of fault at least once: each service killed once, pauses, a NATS restart, a
    PostgreSQL restart, proxy delays and drops; the long form repeats pauses and proxy windows.
    The run is cut into one slot per fault, in a seeded order, each fault at a seeded offset in
    its slot (a fault may outlast its slot: faults overlap now and then, as in life)."""
    rng = random.Random(f"faults:{seed}")
    wanted: list[tuple[str, str]] = [(KILL, service) for service in SERVICES]
    pauses = 1 if short else 3
    wanted += [(PAUSE, rng.choice(PAUSABLE)) for _ in range(pauses)]
    wanted += [(NATS_RESTART, "nats"), (POSTGRES_RESTART, "postgres")]
    windows = 1 if short else 3
    wanted += [(PROXY_DELAY, PROXY_TARGET)] * windows + [(PROXY_DROP, PROXY_TARGET)] * windows
    rng.shuffle(wanted)
    span = max(duration_s - LEAD_IN_S - TAIL_S, 1.0)
    slot = span / len(wanted)
    faults = []
    for index, (kind, target) in enumerate(wanted):
        at_s = LEAD_IN_S + index * slot + rng.uniform(0.0, slot * 0.5)
        delay_s = 0.0
        if kind == KILL:
            length = rng.uniform(0.3, 2.0)
        elif kind == PAUSE:
            length = rng.uniform(2.0, 6.0)
        elif kind in (NATS_RESTART, POSTGRES_RESTART):
            length = rng.uniform(0.5, 2.0)
        elif kind == PROXY_DELAY:
            length, delay_s = rng.uniform(3.0, 6.0), rng.uniform(0.5, 4.0)
        else:
            length = rng.uniform(1.5, 4.0)
        faults.append(Fault(at_s=round(at_s, 2), kind=kind, target=target, duration_s=round(length, 2),
                            delay_s=round(delay_s, 2)))
    return Schedule(seed=seed, duration_s=duration_s, faults=tuple(faults))


# ---- the workload -------------------------------------------------------------------------------

MEMBERS = 30
SHORT_MEMBERS = 10
CASH_FEN = 50_000
ONLINE_POS = 4
OFFLINE_POS = 2  # offline the whole rush, codes only, uploading at the end
FLAKY_POS = 1    # online, dropping offline now and then (then paying offline, uploading on return)
GATES = 2
TOP_UP_FEN = 3_000
PAY, PASS, CABINET, FREEZE, TOP_UP, GO_OFFLINE, GO_ONLINE = (
    "pay", "pass", "cabinet", "freeze", "top-up", "go-offline", "go-online")


@dataclass(frozen=True)
class Op:
    at_s: float
    kind: str
    device: str = ""      # "pos-3", "gate-1", "cabinet-pos"; "" for admin work (freeze, top-up)
    member: int = -1
    by_card: bool = False
    amount_fen: int = 0
    dispensed: bool = True


@dataclass(frozen=True)
class Workload:
    seed: int
    members: int
    ops: tuple[Op, ...]

    def devices(self) -> tuple[str, ...]:
        return tuple(sorted({op.device for op in self.ops if op.device}))


def pos_names() -> tuple[tuple[str, bool], ...]:
    """(name, offline all rush) of every canteen till."""
    tills = [(f"pos-{i}", False) for i in range(ONLINE_POS + FLAKY_POS)]
    return tuple(tills + [(f"pos-{ONLINE_POS + FLAKY_POS + i}", True) for i in range(OFFLINE_POS)])


def workload(seed: int, *, duration_s: float = DEFAULT_DURATION_S, short: bool = False) -> Workload:
    """Payments at every till (online ones by code or card, offline ones by code), gate passes, a
    cabinet order now and then, a flaky till dropping offline and back, freezes and top-ups, all at
    seeded offsets. Amounts stay far inside every purse (no outcome turns on arrival order)."""
    rng = random.Random(f"workload:{seed}")
    members = SHORT_MEMBERS if short else MEMBERS
    end_s = duration_s - TAIL_S
    ops: list[Op] = []
    rate_per_till_s = 1.2 if short else 1.6  # mean seconds between a till's sales
    for name, offline in pos_names():
        t = rng.uniform(0.5, 1.5)
        while t < end_s:
            ops.append(Op(at_s=round(t, 3), kind=PAY, device=name, member=rng.randrange(members),
                          by_card=(not offline) and rng.random() < 0.3, amount_fen=rng.randrange(300, 1501)))
            t += rng.expovariate(1.0 / rate_per_till_s)
    flaky = f"pos-{ONLINE_POS}"
    t = rng.uniform(4.0, 10.0)
    while t < end_s - 6.0:
        ops.append(Op(at_s=round(t, 3), kind=GO_OFFLINE, device=flaky))
        back = t + rng.uniform(3.0, 8.0)
        ops.append(Op(at_s=round(back, 3), kind=GO_ONLINE, device=flaky))
        t = back + rng.uniform(8.0, 20.0)
    for gate in range(GATES):
        t = rng.uniform(0.5, 2.0)
        while t < end_s:
            ops.append(Op(at_s=round(t, 3), kind=PASS, device=f"gate-{gate}", member=rng.randrange(members),
                          by_card=rng.random() < 0.5))
            t += rng.expovariate(1.0 / 2.5)
    t = rng.uniform(2.0, 6.0)
    while t < end_s:
        ops.append(Op(at_s=round(t, 3), kind=CABINET, device="cabinet-pos", member=rng.randrange(members),
                      amount_fen=rng.randrange(300, 801), dispensed=rng.random() < 0.85))
        t += rng.uniform(4.0, 10.0)
    for _ in range(1 if short else 3):
        ops.append(Op(at_s=round(rng.uniform(0.2, 0.8) * end_s, 3), kind=FREEZE, member=rng.randrange(members)))
    for _ in range(4 if short else 10):
        ops.append(Op(at_s=round(rng.uniform(0.0, end_s), 3), kind=TOP_UP, member=rng.randrange(members),
                      amount_fen=TOP_UP_FEN))
    ops.sort(key=lambda op: (op.at_s, op.kind, op.device, op.member))
    return Workload(seed=seed, members=members, ops=tuple(ops))


def schedule_table(schedule: Schedule) -> str:
    lines = [f"{'at (s)':>8}  {'fault':<17} {'target':<12} {'duration (s)':>12}  detail"]
    for fault in schedule.faults:
        detail = f"+{fault.delay_s:.2f} s per chunk" if fault.kind == PROXY_DELAY else ""
        lines.append(f"{fault.at_s:>8.2f}  {fault.kind:<17} {fault.target:<12} {fault.duration_s:>12.2f}  {detail}")
    return "\n".join(lines)

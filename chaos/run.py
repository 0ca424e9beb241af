"""One chaos run: start the stack, set the campus up, print the schedule, run the rush under its
faults, heal, drain, audit, stop everything. ``run_chaos`` answers what happened (``ChaosResult``)
for the command line and the short test alike."""
from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chaos import schedule as plan
from chaos.audit import Check, audit, table
from chaos.rush import ChaosRush, FaultLog
from chaos.stack import ChaosStack, Kill


@dataclass
class ChaosResult:
    seed: int
    checks: list[Check]
    faults: list[FaultLog]
    kills: list[Kill]
    sales: Counter
    in_flight_hit: int        # payments that were waiting for their answer when a fault began
    unanswered: int           # sales answered NO_ANSWER_REVERSED, *_UNAVAILABLE or an error
    proxy: dict[str, int] = field(default_factory=dict)
    passes: Counter = field(default_factory=Counter)
    cabinet: Counter = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


async def run_chaos(seed: int, *, duration_s: float, short: bool, root: Path | None = None,
                    say=print) -> ChaosResult:  # noqa: ANN001
    started = time.monotonic()
    plain_say = say

    def say(line: str) -> None:  # noqa: F811 - every line stamped with the run's wall time
        plain_say(f"[{time.monotonic() - started:6.1f} s] {line}")

    keep = root is not None
    root = root or Path(tempfile.mkdtemp(prefix=f"onecard-chaos-{seed}-"))
    stack = await ChaosStack.create(root)
    rush: ChaosRush | None = None
    try:
        say("starting PostgreSQL, NATS and the six services ...")
        await stack.start()
        rush = ChaosRush(stack=stack, root=root, seed=seed, duration_s=duration_s, short=short, say=say)
        say(f"fault schedule (seed {seed}, rush {duration_s:.0f} s):")
        say(plan.schedule_table(rush.schedule))
        ops = Counter(op.kind for op in rush.workload.ops)
        say("workload: " + ", ".join(f"{n} {kind}" for kind, n in sorted(ops.items())))
        await rush.setup()
        say(f"campus ready: {len(rush.members)} members, {len(rush.devices)} terminals; the rush begins")
        await rush.run()
        say("rush over: healing every fault, reconnecting and draining the terminals ...")
        await rush.heal_and_drain()
        checks = await audit(rush)
        proxy = stack.proxy
        assert proxy is not None
        return ChaosResult(
            seed=seed, checks=checks, faults=list(rush.faults), kills=list(stack.kills), sales=rush.tally(),
            in_flight_hit=len(rush.hit_by_faults()), unanswered=len(rush.unanswered()),
            proxy={"connections": proxy.stats.connections, "dropped": proxy.stats.dropped,
                   "refused": proxy.stats.refused, "delayed_chunks": proxy.stats.delayed_chunks},
            passes=rush.passes, cabinet=rush.cabinet, wall_s=time.monotonic() - started)
    finally:
        if rush is not None:
            await rush.close()
        await stack.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def report(result: ChaosResult) -> str:
    lines = ["", "faults as they landed:"]
    for f in sorted(result.faults, key=lambda f: f.at_s):
        lines.append(f"  {f.at_s:7.2f} s  {f.kind:<17} {f.target:<12} {'landed' if f.landed else 'MISSED':<7}"
                     f" {f.in_flight:>3} payments in flight  {f.detail}")
    lines.append("sales: " + ", ".join(f"{n} {k}" for k, n in sorted(result.sales.items())))
    lines.append(f"payments in flight when a fault began: {result.in_flight_hit};"
                 f" unanswered or outcome unknown (reversed/refused): {result.unanswered}")
    lines.append("proxy hub->policy: " + ", ".join(f"{k} {v}" for k, v in result.proxy.items()))
    lines.append("gates: " + ", ".join(f"{n} {k}" for k, n in sorted(result.passes.items())))
    lines.append("cabinet: " + ", ".join(f"{n} {k}" for k, n in sorted(result.cabinet.items())))
    lines += ["", "audit:", table(result.checks), "",
              f"{'PASS' if result.passed else 'FAIL'}: seed {result.seed}, {result.wall_s:.0f} s wall"]
    return "\n".join(lines)

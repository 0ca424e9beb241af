"""``python -m chaos --seed N [--duration-s S] [--short]``: the seeded lunch rush under faults
(docs/chaos.md). Prints the seed first; exits 0 only when every audit check passes, else prints
the line that reruns the seed."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys

# Off before gRPC is imported anywhere: the run starts (and restarts) its children while its own
# channels are open, as devstack and the test session do (each child execs at once).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from chaos.run import report, run_chaos  # noqa: E402
from chaos.schedule import DEFAULT_DURATION_S, SHORT_DURATION_S  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="the seed (random when not given)")
    parser.add_argument("--duration-s", type=float, default=None, help="length of the rush in seconds")
    parser.add_argument("--short", action="store_true", help="the short form (one of each fault)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    duration_s = args.duration_s or (SHORT_DURATION_S if args.short else DEFAULT_DURATION_S)
    print(f"chaos seed: {seed}", flush=True)
    # The terminals' warnings (a refused upload, a reversal unanswered) are what the faults are
    # for: the summary counts them, the log need not repeat each.
    logging.getLogger("onecard_device").setLevel(logging.ERROR)
    try:
        result = asyncio.run(run_chaos(seed, duration_s=duration_s, short=args.short,
                                       say=lambda line: print(line, flush=True)))
    except Exception as exc:  # a run that could not finish fails like a failed check
        print(f"FAIL: the run did not finish: {type(exc).__name__}: {exc}", flush=True)
        print(f"rerun: make chaos SEED={seed}", flush=True)
        return 1
    print(report(result), flush=True)
    if not result.passed:
        print(f"rerun: make chaos SEED={seed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

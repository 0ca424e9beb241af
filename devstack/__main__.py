"""``python -m devstack run``: the whole mesh on one machine (what `make run` does).
``python -m devstack simulate [options]``: simulated terminals against it (``python -m devstack.simulate``)."""
from __future__ import annotations

import argparse
import os
import sys

# The supervisor starts (and restarts) service processes while its own gRPC channels are open. A
# child execs at once, so gRPC's fork handlers have nothing to protect, and with them on, a fork
# can hang for good in their pre-fork wait (seen: `make run` stuck before starting webhooks). Set
# before grpc is imported, which reads it once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from devstack.run import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] == ["simulate"]:
        from devstack.simulate import main as simulate

        return simulate(args_given[1:])
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description="Run onecard locally: PostgreSQL, NATS, every service and the gateway, with a demo campus.",
        epilog="Settings (environment): ONECARD_DATA_DIR (.data), ONECARD_PG_PORT (55432), ONECARD_NATS_PORT "
        "(54222), ONECARD_<SERVICE>_PORT and ONECARD_<SERVICE>_METRICS_PORT (identity 50051/9101, "
        "codegen 50052/9102, ledger 50053/9103, policy 50054/9104, gateway 8080), "
        "ONECARD_HOST (127.0.0.1), ONECARD_DEMO_MEMBERS (3000), DATABASE_URL and NATS_URL to use existing "
        "servers instead of the embedded ones.",
    )
    parser.add_argument("command", choices=["run", "simulate"],
                        help="run: start everything, seed the demo, serve until Ctrl-C; "
                        "simulate: POS terminals, gates and a cabinet against it (see simulate --help)")
    parser.parse_args(args_given)
    return run()


if __name__ == "__main__":
    sys.exit(main())

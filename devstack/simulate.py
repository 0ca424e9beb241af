"""``python -m devstack.simulate``: simulated POS terminals, gates and a vending cabinet on the demo
campus, against the stack `make run` started (devicehub on ONECARD_DEVICEHUB_PORT, 50055).

Runs until Ctrl-C (or ``--duration-s``), printing a line every few seconds and a summary at the end.
The same settings as `make run` (ONECARD_HOST, ONECARD_<SERVICE>_PORT, ONECARD_DATA_DIR) say where
the stack is; the terminals' keys and offline queues live in <data dir>/simulator/.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from devstack.config import ConfigError, DevstackConfig
from devstack.simulator import SimulatorError, SimulatorOptions, run_simulator, summary_text


def _positive(kind):  # noqa: ANN001, ANN202
    def parse(text: str):  # noqa: ANN202
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
        return value
    return parse


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimulatorOptions:
    parser = argparse.ArgumentParser(prog="python -m devstack.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pos", type=_positive(int), default=4, help="POS terminals (default 4)")
    parser.add_argument("--gates", type=_positive(int), default=2, help="gates (default 2)")
    parser.add_argument("--no-cabinet", action="store_true", help="no vending cabinet (and its POS)")
    parser.add_argument("--members", type=_positive(int), default=40, help="members with a phone (default 40)")
    parser.add_argument("--duration-s", type=_positive(float), default=None,
                        help="stop after this many seconds (default: until Ctrl-C)")
    parser.add_argument("--rate", type=_positive(float), default=2.0,
                        help="payments per second across the fleet (default 2; gates pass at half of it)")
    parser.add_argument("--offline-share", type=_share, default=0.2,
                        help="share of terminals offline at any moment (default 0.2)")
    parser.add_argument("--report-every-s", type=_positive(float), default=5.0, help="seconds between live lines")
    parser.add_argument("--drain-s", type=_positive(float), default=20.0,
                        help="at the end, seconds for the terminals to upload what they hold (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)
    return SimulatorOptions(pos=args.pos, gates=args.gates, cabinet=not args.no_cabinet, members=max(args.members, 1),
                            duration_s=args.duration_s, rate=args.rate, offline_share=args.offline_share,
                            report_every_s=max(args.report_every_s, 0.5), drain_s=args.drain_s,
                            seed=args.seed)


async def _main(options: SimulatorOptions, config: DevstackConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    summary = await run_simulator(config, stop, options=options, out=lambda text: print(text, flush=True))
    for line in summary_text(summary):
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        config = DevstackConfig.from_env()
        return asyncio.run(_main(options, config))
    except (SimulatorError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

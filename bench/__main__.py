"""``python -m bench [NAME ...]``: run the benchmarks (all by default), print a table, write the summary."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from bench.harness import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_SUMMARY_PATH,
    DEFAULT_WARMUP_S,
    LoadSettings,
    load_suites,
    run_benchmarks,
)
from bench.load import CLIENT_KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--duration-s", type=float,
                        default=float(os.environ.get("ONECARD_BENCH_DURATION_S", DEFAULT_DURATION_S)),
                        help="measured time of each load (env ONECARD_BENCH_DURATION_S)")
    parser.add_argument("--warmup-s", type=float, default=DEFAULT_WARMUP_S)
    parser.add_argument("--concurrency", type=int,
                        default=int(os.environ.get("ONECARD_BENCH_CONCURRENCY", DEFAULT_CONCURRENCY)),
                        help="requests in flight (env ONECARD_BENCH_CONCURRENCY)")
    parser.add_argument("--client", choices=CLIENT_KINDS, default=os.environ.get("ONECARD_BENCH_CLIENT", "raw"),
                        help="load client: raw (keep-alive HTTP/1.1, cheap) or httpx (client-bound on two cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_SUMMARY_PATH, help="where the JSON summary goes")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs) for a look afterwards")
    args = parser.parse_args(argv)
    if args.list:
        for name, bench in sorted(load_suites().items()):
            print(f"{name}  {bench.description}")
        return 0
    try:
        load = LoadSettings(duration_s=args.duration_s, warmup_s=args.warmup_s, concurrency=args.concurrency,
                            client=args.client)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(run_benchmarks(names=args.names, load=load, summary_path=args.out, keep_dir=args.keep))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

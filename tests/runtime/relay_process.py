"""Runs the outbox relay alone, so a test can SIGKILL it mid-batch: python -m tests.runtime.relay_process DSN NATS_URL"""
from __future__ import annotations

import asyncio
import sys

import nats

from runtime.db import create_pool
from runtime.events import OutboxRelay, ensure_streams
from tests.runtime.support import SCHEMA, STREAM


async def main(dsn: str, nats_url: str) -> None:
    pool = await create_pool(dsn, schema=SCHEMA)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, [STREAM])
    print("relay started", flush=True)
    # Small batches so a kill lands between a publish and the mark that follows it.
    await OutboxRelay(pool=pool, js=js, schema=SCHEMA, batch_size=10, poll_interval_s=0.05).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""Runs the outbox relay alone, so a test can SIGKILL it mid-batch:
``python -m tests.runtime.relay_process DSN NATS_URL``, signed in to NATS as the widgets service
with the nkey and TLS folder the test passes in ONECARD_NATS_SEED and ONECARD_TLS_DIR."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import nats

from runtime.db import create_pool
from runtime.events import OutboxRelay, ensure_streams
from runtime.mesh import MeshTLS
from runtime.nats_access import connect_options
from tests.runtime.support import SCHEMA, STREAM


async def main(dsn: str, nats_url: str) -> None:
    pool = await create_pool(dsn, schema=SCHEMA)
    tls = MeshTLS.load(Path(os.environ["ONECARD_TLS_DIR"]))
    nc = await nats.connect(nats_url, **connect_options(name="widgets", seed=os.environ["ONECARD_NATS_SEED"], tls=tls))
    js = nc.jetstream()
    await ensure_streams(js, [STREAM])
    print("relay started", flush=True)
    # Small batches so a kill lands between a publish and the mark that follows it.
    await OutboxRelay(pool=pool, js=js, schema=SCHEMA, batch_size=10, poll_interval_s=0.05).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

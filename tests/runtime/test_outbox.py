"""The outbox delivers every event exactly once: across a relay killed mid-batch, a NATS
restart, and a redelivered message."""
import asyncio
import os
import signal
import subprocess
import sys
import uuid

import asyncpg
import pytest

from devstack.servers import Nats
from runtime.db import create_pool, migrate
from runtime.events import MSG_ID_HEADER, IdempotentConsumer, OutboxRelay, ensure_streams
from tests.mesh import connect_nats, service_values
from tests.runtime.support import MIGRATIONS, SCHEMA, STREAM, make_widgets, wait_until, widget_app

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def record_effect(conn: asyncpg.Connection, event) -> None:  # noqa: ANN001
    # Deliberately no unique constraint: a second effect would show up as a second row.
    await conn.execute("INSERT INTO effects (event_id) VALUES ($1)", event.event_id)


async def effect_counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM effects")
    return row["n"], row["d"]


async def stream_messages(js) -> int:  # noqa: ANN001
    return (await js.stream_info(STREAM.name)).state.messages


@pytest.mark.slow
async def test_relay_killed_mid_batch_still_delivers_each_event_once(database_url: str, nats_url: str) -> None:
    await migrate(database_url, schema=SCHEMA, migrations_dir=MIGRATIONS)
    pool = await create_pool(database_url, schema=SCHEMA)
    nc = await connect_nats(nats_url, as_="widgets")
    js = nc.jetstream()
    await ensure_streams(js, [STREAM])
    total = 400
    widgets = service_values("widgets")
    event_ids = set(await make_widgets(pool, count=total))
    consumer_task = None
    try:
        caught_between_publish_and_mark = False
        for _attempt in range(5):
            relay = subprocess.Popen(
                [sys.executable, "-m", "tests.runtime.relay_process", database_url, nats_url],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={**os.environ, "ONECARD_TLS_DIR": str(widgets["tls_dir"]), "ONECARD_NATS_SEED": widgets["nats_seed"]},
            )
            try:
                assert relay.stdout is not None
                await asyncio.to_thread(relay.stdout.readline)
                start = await stream_messages(js)
                await wait_until(lambda: _more_than(js, start + 15), timeout_s=20, interval_s=0.005)
            finally:
                relay.send_signal(signal.SIGKILL)
                relay.wait()
            # Give PostgreSQL a moment to notice the dead connection and roll its batch back.
            await wait_until(lambda: _no_relay_backend(pool), timeout_s=10)
            marked = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            if await stream_messages(js) > marked:
                caught_between_publish_and_mark = True
                break
        assert caught_between_publish_and_mark, "the kill never landed between a publish and its mark"
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") > 0

        # A fresh relay republishes the unmarked rows; the stream drops the duplicates by Nats-Msg-Id.
        relay_task = asyncio.create_task(OutboxRelay(pool=pool, js=js, schema=SCHEMA).run())
        consumer = IdempotentConsumer(pool=pool, js=js, stream=STREAM.name, durable="effects",
                                      filter_subject="widgets.>", handler=record_effect)
        consumer_task = asyncio.create_task(consumer.run())
        await wait_until(lambda: _all_applied(pool, total), timeout_s=60)
        relay_task.cancel()

        assert await effect_counts(pool) == (total, total)
        assert {r["event_id"] for r in await pool.fetch("SELECT event_id FROM effects")} == event_ids
        assert await stream_messages(js) == total
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        if consumer_task:
            consumer_task.cancel()
        await nc.close()
        await pool.close()


async def _more_than(js, n: int) -> bool:  # noqa: ANN001
    return await stream_messages(js) > n


async def _no_relay_backend(pool: asyncpg.Pool) -> bool:
    busy = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")
    return busy == 0


async def _all_applied(pool: asyncpg.Pool, total: int) -> bool:
    return (await effect_counts(pool))[0] >= total


@pytest.mark.slow
async def test_events_written_while_nats_is_down_arrive_once_after_restart(database_url: str, nats_server: Nats) -> None:
    app = widget_app(database_url=database_url, nats_url=nats_server.url, with_relay=True)
    await app.start()
    await app.wait_ready(30)
    consumer = IdempotentConsumer(pool=app.pool, js=app.js, stream=STREAM.name, durable="effects",
                                  filter_subject="widgets.>", handler=record_effect, fetch_timeout_s=0.3, ack_wait_s=2.0)
    app.spawn(consumer.run(), name="consumer")
    try:
        await make_widgets(app.pool, count=50)
        await wait_until(lambda: _all_applied(app.pool, 50))

        nats_server.stop()
        await make_widgets(app.pool, count=50, first=50)
        assert await app.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") > 0
        nats_server.start()

        await wait_until(lambda: _all_applied(app.pool, 100), timeout_s=60)
        await asyncio.sleep(0.5)  # room for any stray duplicate to show up
        assert await effect_counts(app.pool) == (100, 100)
    finally:
        await app.stop()


async def test_a_redelivered_event_has_no_second_effect(database_url: str, nats_url: str) -> None:
    app = widget_app(database_url=database_url, nats_url=nats_url, with_relay=True)
    await app.start()
    await app.wait_ready(30)
    consumer = IdempotentConsumer(pool=app.pool, js=app.js, stream=STREAM.name, durable="effects",
                                  filter_subject="widgets.>", handler=record_effect, fetch_timeout_s=0.3, ack_wait_s=2.0)
    app.spawn(consumer.run(), name="consumer")
    try:
        [event_id] = await make_widgets(app.pool, count=1)
        await wait_until(lambda: _all_applied(app.pool, 1))
        payload = await app.pool.fetchval("SELECT payload FROM outbox WHERE event_id = $1", uuid.UUID(event_id))
        # The same event again under another message id, so the stream's dedupe cannot catch it:
        # only the consumer's record of processed ids stands between it and a second effect.
        await app.js.publish("widgets.created", payload, headers={MSG_ID_HEADER: str(uuid.uuid4())})
        await wait_until(lambda: _consumer_caught_up(app.js))
        assert await effect_counts(app.pool) == (1, 1)
        assert await app.pool.fetchval("SELECT count(*) FROM processed_events WHERE event_id = $1", event_id) == 1
    finally:
        await app.stop()


async def _consumer_caught_up(js) -> bool:  # noqa: ANN001
    info = await js.consumer_info(STREAM.name, "effects")
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= 2

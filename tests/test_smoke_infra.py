import asyncpg

from tests.mesh import connect_nats


async def test_real_postgres_and_nats_answer(database_url: str, nats_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()
    nc = await connect_nats(nats_url)
    try:
        info = await nc.jetstream().account_info()
        assert info.streams == 0
    finally:
        await nc.close()

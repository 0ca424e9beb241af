"""Reading a service's JetStream stream from a test, as any outside consumer would."""
from __future__ import annotations

import nats
import pytest

from tests.mesh import connect_nats


async def read_exactly(nats_url: str, *, stream: str, subjects: str, count: int) -> list[nats.aio.msg.Msg]:
    """Exactly ``count`` messages from ``stream``, oldest first; fails on fewer or more."""
    nc = await connect_nats(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subjects, stream=stream, ordered_consumer=True)
        received = [await sub.next_msg(timeout=10) for _ in range(count)]
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
        return received
    finally:
        await nc.close()

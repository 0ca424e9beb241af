"""A TCP proxy between the device hub and policy that delays and drops, on command.

It forwards bytes as they come (TLS passes through untouched: the hub still checks policy's
certificate, and policy the hub's). ``delay(s)``: each chunk waits ``s`` seconds before it is
forwarded, both ways. ``drop()``: every open connection is cut at once and new ones are accepted
and closed, until ``heal()``. The counters say what it did, so a test can assert the fault landed.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK_BYTES = 65_536


@dataclass
class ProxyStats:
    connections: int = 0
    dropped: int = 0           # open connections cut by a drop
    refused: int = 0           # connections accepted and closed during a drop
    delayed_chunks: int = 0


@dataclass
class TcpProxy:
    upstream_host: str
    upstream_port: int
    host: str = "127.0.0.1"
    port: int = 0
    delay_s: float = 0.0
    dropping: bool = False
    stats: ProxyStats = field(default_factory=ProxyStats)
    _server: asyncio.base_events.Server | None = None
    _open: set[asyncio.Task] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def delay(self, seconds: float) -> None:
        self.delay_s = seconds

    def drop(self) -> None:
        self.dropping = True
        self.stats.dropped += self._cut_all()

    def heal(self) -> None:
        self.delay_s, self.dropping = 0.0, False

    def _cut_all(self) -> int:
        tasks = [task for task in self._open if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.dropping:
            self.stats.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        self.stats.connections += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._open.discard(task)
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            if self.delay_s > 0:
                self.stats.delayed_chunks += 1
                await asyncio.sleep(self.delay_s)
            writer.write(data)
            await writer.drain()

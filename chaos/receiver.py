"""A webhook receiver on 127.0.0.1: a partner's endpoint that answers 204 to every POST and keeps
what it was sent, so the audit can say which booked transfers reached the partner."""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 1_048_576


def _transfer_ids(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "transfer_id" and isinstance(item, str) and item:
                found.add(item)
            else:
                found |= _transfer_ids(item)
    elif isinstance(value, list):
        for item in value:
            found |= _transfer_ids(item)
    return found


@dataclass
class WebhookReceiver:
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def transfer_ids(self) -> list[str]:
        """Every transfer id delivered, once per delivery (a repeat shows twice)."""
        ids: list[str] = []
        for body in self.bodies:
            ids += sorted(_transfer_ids(body))
        return ids

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = min(int(headers.get("content-length", "0") or 0), MAX_BODY_BYTES)
                body = await reader.readexactly(length)
                with contextlib.suppress(ValueError):
                    self.bodies.append(json.loads(body))
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

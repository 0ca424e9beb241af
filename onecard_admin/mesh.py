"""The operator's channels: one per service, mutual TLS with the ops certificate, opened on first use."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from onecard_admin.settings import OPS_NAME, AdminSettings
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS, TLSMaterialError


class AdminSetupError(RuntimeError):
    """The operator's identity cannot be used; the message says why."""


class Mesh:
    def __init__(self, settings: AdminSettings):
        assert settings.tls_dir is not None
        self.settings = settings
        try:
            self.tls = MeshTLS.load(settings.tls_dir)
        except (OSError, TLSMaterialError) as exc:
            raise AdminSetupError(f"ONECARD_TLS_DIR: {exc}") from None
        # Calling as anyone else (say a pod's own gateway certificate) would borrow that service's
        # rights; the tool acts only as the operator.
        if self.tls.name != OPS_NAME:
            raise AdminSetupError(f"ONECARD_TLS_DIR holds the certificate of {self.tls.name!r}, not of "
                                  f"{OPS_NAME!r}; point it at the operator's (Secret ops-tls, .data/pki/ops)")
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self.settings.target(service), tls=self.tls, server_name=service)
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def paged(fetch: Callable[[str], Awaitable[Any]], field: str, *, limit: int) -> list[Any]:
    """The items of a listing RPC, page after page (``fetch(page_token)``), until its last page or
    at least ``limit`` items."""
    items: list[Any] = []
    token = ""
    while len(items) < limit:
        page = await fetch(token)
        items += getattr(page, field)
        token = page.next_page_token
        if not token:
            break
    return items

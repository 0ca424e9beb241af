"""The streams connected to this process, by device: one per device (a second replaces the
first), each with its outgoing queue, what the device holds of every sync kind, and the tasks
answering its requests."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import DomainError
from services.devicehub.context import DeviceContext


@dataclass
class _End:
    error: DomainError | None


@dataclass(eq=False)
class Session:
    # Replaced (never mutated) when the device's registry entry changes.
    context: DeviceContext
    tenant_id: uuid.UUID
    device_id: uuid.UUID
    # This stream, among every replica's: the device's row names the stream that last put it online.
    stream_id: uuid.UUID = field(default_factory=uuid.uuid4)
    # SyncKind value -> the version the device holds (from its Hello, then what was sent).
    versions: dict[int, int] = field(default_factory=dict)
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # One sync round at a time per device, so updates arrive in version order.
    sync_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Kinds whose source could not answer the last time: tried again by the sync listener.
    stale: set[int] = field(default_factory=set)
    ended: bool = False
    replaced: bool = False

    def send(self, message: Any) -> None:
        if not self.ended:
            self.out.put_nowait(message)

    def end(self, error: DomainError | None = None) -> None:
        """Close the stream after what is queued; with an error, the stream ends with its status."""
        if not self.ended:
            self.ended = True
            self.out.put_nowait(_End(error))

    def spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Sessions:
    def __init__(self) -> None:
        self._by_device: dict[uuid.UUID, Session] = {}
        # Every event names a tenant: finding its streams must not walk the whole fleet.
        self._by_tenant: dict[uuid.UUID, dict[uuid.UUID, Session]] = {}

    def add(self, session: Session, *, replaced_error: DomainError) -> None:
        previous = self._by_device.get(session.device_id)
        self._by_device[session.device_id] = session
        self._by_tenant.setdefault(session.tenant_id, {})[session.device_id] = session
        if previous is not None and previous is not session:
            previous.replaced = True
            previous.end(replaced_error)
            if previous.tenant_id != session.tenant_id:
                self._forget_in_tenant(previous)

    def _forget_in_tenant(self, session: Session) -> None:
        tenant = self._by_tenant.get(session.tenant_id)
        if tenant is not None and tenant.get(session.device_id) is session:
            del tenant[session.device_id]
            if not tenant:
                del self._by_tenant[session.tenant_id]

    def remove(self, session: Session) -> bool:
        """Forget the session; False when a newer stream of the device had replaced it."""
        if self._by_device.get(session.device_id) is session:
            del self._by_device[session.device_id]
            self._forget_in_tenant(session)
            return True
        return False

    def get(self, device_id: uuid.UUID) -> Session | None:
        return self._by_device.get(device_id)

    def of_tenant(self, tenant_id: uuid.UUID) -> list[Session]:
        return [s for s in self._by_tenant.get(tenant_id, {}).values() if not s.ended]

    def all(self) -> list[Session]:
        return [s for s in self._by_device.values() if not s.ended]

    def close(self, device_id: uuid.UUID, error: DomainError | None) -> None:
        session = self._by_device.get(device_id)
        if session is not None:
            session.end(error)

    async def drain_all(self, *, timeout_s: float, error: DomainError) -> None:
        """Let the requests in flight answer (within ``timeout_s``), then end every stream."""
        sessions = list(self._by_device.values())
        pending = [t for s in sessions for t in s.tasks if t.get_name().startswith("device-request:")]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for session in sessions:
            session.end(error)

    def close_all(self) -> None:
        for session in list(self._by_device.values()):
            session.end(None)

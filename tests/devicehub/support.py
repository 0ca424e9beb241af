"""Helpers shared by the devicehub tests: a tenant, a registered and enrolled device with its own
Ed25519 key, and a connected device stream (hello, signed challenge, welcome) to talk on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import nacl.signing
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from onecard_device.identity import challenge_message
from runtime.grpc_client import error_info

DEFAULT_TIMEOUT_S = 10.0


async def make_tenant(identity_stub: identity_pb2_grpc.IdentityServiceStub, name: str = "Tsinghua") -> str:
    """A tenant made in identity (the hub names tenants by identity's ids)."""
    response = await identity_stub.CreateTenant(identity_pb2.CreateTenantRequest(
        name=name, kind=identity_pb2.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai", currency="CNY"))
    return response.tenant.tenant_id


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, _ = error_info(info.value)
    return info.value.code(), reason


def now_pb(offset_s: float = 0.0) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + offset_s) * 1e9))
    return stamp


@dataclass
class EnrolledDevice:
    tenant_id: str
    device_id: str
    signing_key: nacl.signing.SigningKey
    device: pb.Device
    # The token it enrolled with (used: it never works again).
    enrolment_token: str = ""

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)


async def register_device(admin: devicehub_pb2_grpc.DeviceAdminServiceStub, tenant_id: str, *,
                          kind: int = pb.DEVICE_KIND_POS, model: str = "TX-100", name: str = "",
                          **fields: Any) -> pb.RegisterDeviceResponse:
    return await admin.RegisterDevice(pb.RegisterDeviceRequest(
        tenant_id=tenant_id, kind=kind, model=model, name=name or f"{pb.DeviceKind.Name(kind)} device", **fields))


async def enrol_device(admin: devicehub_pb2_grpc.DeviceAdminServiceStub,
                       device_stub: devicehub_pb2_grpc.DeviceServiceStub, tenant_id: str, *,
                       kind: int = pb.DEVICE_KIND_POS, firmware_version: str = "1.0.0", **fields: Any
                       ) -> EnrolledDevice:
    """Register a device and enrol it with a fresh Ed25519 key."""
    registered = await register_device(admin, tenant_id, kind=kind, **fields)
    key = nacl.signing.SigningKey.generate()
    enrolled = await device_stub.Enrol(pb.EnrolRequest(
        enrolment_token=registered.enrolment_token, public_key=bytes(key.verify_key),
        firmware_version=firmware_version))
    return EnrolledDevice(tenant_id=tenant_id, device_id=enrolled.device.device_id, signing_key=key,
                          device=enrolled.device, enrolment_token=registered.enrolment_token)


class StreamClosed(Exception):
    """The stream ended; ``error`` is the gRPC error it ended with (None: ended OK)."""

    def __init__(self, error: grpc.aio.AioRpcError | None):
        super().__init__(repr(error))
        self.error = error

    @property
    def code(self) -> grpc.StatusCode | None:
        return None if self.error is None else self.error.code()

    @property
    def reason(self) -> str | None:
        return None if self.error is None else error_info(self.error)[0]


_EOF = object()


@dataclass
class DeviceConnection:
    """A device's open stream. ``recv`` answers the next message the hub sent (or raises
    StreamClosed); ``history`` keeps everything received."""

    call: Any
    device: EnrolledDevice | None = None
    welcome: pb.Welcome | None = None
    history: list[pb.ConnectResponse] = field(default_factory=list)
    _queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _pump: asyncio.Task[Any] | None = None

    @classmethod
    def start(cls, device_stub: devicehub_pb2_grpc.DeviceServiceStub, device: EnrolledDevice | None = None
              ) -> DeviceConnection:
        connection = cls(call=device_stub.Connect(), device=device)
        connection._pump = asyncio.ensure_future(connection._read_all())
        return connection

    async def _read_all(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self._queue.put_nowait(_EOF)
                    return
                self.history.append(message)
                self._queue.put_nowait(message)
        except grpc.aio.AioRpcError as exc:
            self._queue.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._queue.put_nowait(exc)

    async def send(self, message: pb.ConnectRequest | None = None, **body: Any) -> None:
        """send(pb.ConnectRequest(...)) or send(heartbeat=pb.Heartbeat(...))."""
        await self.call.write(message if message is not None else pb.ConnectRequest(**body))

    async def recv(self, timeout: float = DEFAULT_TIMEOUT_S) -> pb.ConnectResponse:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _EOF:
            self._queue.put_nowait(_EOF)
            raise StreamClosed(None)
        if isinstance(item, grpc.aio.AioRpcError):
            self._queue.put_nowait(item)
            raise StreamClosed(item)
        if isinstance(item, Exception):
            raise item
        return item

    async def recv_until(self, predicate: Callable[[pb.ConnectResponse], bool],
                         timeout: float = DEFAULT_TIMEOUT_S) -> pb.ConnectResponse:
        """The first message (from now) that satisfies ``predicate``; others are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching message in time")
            message = await self.recv(remaining)
            if predicate(message):
                return message

    async def closed(self, timeout: float = DEFAULT_TIMEOUT_S) -> StreamClosed:
        """Wait for the stream's end, skipping messages; answers how it ended."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.recv(max(0.01, deadline - time.monotonic()))
            except StreamClosed as closed:
                return closed

    async def drain(self, quiet_s: float = 0.3) -> list[pb.ConnectResponse]:
        """Everything that arrives until the hub has been quiet for ``quiet_s``."""
        got: list[pb.ConnectResponse] = []
        while True:
            try:
                got.append(await self.recv(quiet_s))
            except (TimeoutError, asyncio.TimeoutError):
                return got

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        self.call.cancel()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump


def hello(device: EnrolledDevice, *, versions: dict[int, int] | None = None, firmware_version: str = "1.0.0",
          clock_offset_s: float = 0.0, last_sequence: int = 0) -> pb.ConnectRequest:
    return pb.ConnectRequest(hello=pb.Hello(
        tenant_id=device.tenant_id, device_id=device.device_id, firmware_version=firmware_version,
        versions=[pb.SyncVersion(kind=k, version=v) for k, v in (versions or {}).items()],
        device_time=now_pb(clock_offset_s), last_sequence=last_sequence))


async def connect(device_stub: devicehub_pb2_grpc.DeviceServiceStub, device: EnrolledDevice, *,
                  versions: dict[int, int] | None = None, firmware_version: str = "1.0.0",
                  clock_offset_s: float = 0.0, signing_key: nacl.signing.SigningKey | None = None,
                  last_sequence: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> DeviceConnection:
    """Open a stream and finish the handshake (hello with the highest record sequence the device
    issued, signed challenge, welcome)."""
    connection = DeviceConnection.start(device_stub, device)
    try:
        await connection.send(hello(device, versions=versions, firmware_version=firmware_version,
                                    clock_offset_s=clock_offset_s, last_sequence=last_sequence))
        challenge = await connection.recv(timeout)
        assert challenge.WhichOneof("body") == "challenge", challenge
        key = signing_key or device.signing_key
        signature = key.sign(challenge_message(tenant_id=device.tenant_id, device_id=device.device_id,
                                               nonce=challenge.challenge.nonce)).signature
        await connection.send(challenge_response=pb.ChallengeResponse(signature=signature))
        welcome = await connection.recv(timeout)
        assert welcome.WhichOneof("body") == "welcome", welcome
        connection.welcome = welcome.welcome
    except BaseException:
        await connection.close()
        raise
    return connection


def is_sync(kind: int) -> Callable[[pb.ConnectResponse], bool]:
    return lambda m: m.WhichOneof("body") == "sync" and m.sync.kind == kind


def body_is(name: str) -> Callable[[pb.ConnectResponse], bool]:
    return lambda m: m.WhichOneof("body") == name


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = DEFAULT_TIMEOUT_S,
                     interval: float = 0.05) -> Any:
    """Retry ``check`` until it answers something truthy (answered) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)

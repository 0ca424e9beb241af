"""One device's stream: hello, challenge and welcome, then heartbeats, sync, authorisations,
uploads, cabinet orders and update reports in both directions.

The handshake: the first message must be ``hello`` naming an ACTIVE device (unknown:
UNAUTHENTICATED DEVICE_UNKNOWN; decommissioned: PERMISSION_DENIED DEVICE_DECOMMISSIONED; pending:
FAILED_PRECONDITION DEVICE_NOT_ENROLLED); the hub answers a 32-byte challenge, which the device
signs with its enrolled key (a wrong signature: UNAUTHENTICATED CHALLENGE_FAILED). Only these end
the stream with an error; a malformed message afterwards gets a StreamError and the stream goes
on. Each authorisation runs in its own task, so answers may come out of order (keyed by
request_id). A second stream of the same device replaces this one (ABORTED STREAM_REPLACED).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import nacl.exceptions
import nacl.signing

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device.identity import challenge_message
from onecard.policy.v1 import policy_pb2
from runtime.errors import Conflict, DomainError, FailedPrecondition, PermissionDenied, Unauthenticated
from runtime.logs import get_logger
from runtime.wire import timestamp_pb
from services.devicehub.backends import Backends
from services.devicehub.fleet import Fleet
from services.devicehub.registry import Device, DeviceStatus
from services.devicehub.rollouts import Rollouts
from services.devicehub.sessions import Session, Sessions, _End
from services.devicehub.settings import DevicehubSettings
from services.devicehub.sync import Sync
from services.devicehub.wire import device_context, device_pb

log = get_logger(__name__)

NONCE_BYTES = 32
# Requests of one device answered at once; more wait for a slot (the stream's own flow control
# then slows the device down).
MAX_IN_FLIGHT = 64


def stream_error(reason: str, message: str, *, ref: str = "") -> pb.ConnectResponse:
    return pb.ConnectResponse(error=pb.StreamError(ref=ref, reason=reason, message=message))


def malformed(message: str, *, ref: str = "") -> pb.ConnectResponse:
    return stream_error("MALFORMED_MESSAGE", message, ref=ref)


class DeviceStream:
    """The streams of this process's devices: one ``run`` per stream, whose state lives in that call."""

    def __init__(self, *, settings: DevicehubSettings, backends: Backends, sessions: Sessions, fleet: Fleet,
                 sync: Sync, rollouts: Rollouts):
        self._settings = settings
        self._backends = backends
        self._sessions = sessions
        self._fleet = fleet
        self._sync = sync
        self._rollouts = rollouts

    async def _next(self, requests: AsyncIterator[pb.ConnectRequest]) -> pb.ConnectRequest | None:
        try:
            async with asyncio.timeout(self._settings.handshake_timeout_s):
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise Unauthenticated("the device did not finish its handshake in time",
                                  reason="HANDSHAKE_TIMEOUT") from None

    async def _authenticated_device(self, hello: pb.Hello) -> Device:
        try:
            tenant_id = uuid.UUID(hello.tenant_id)
            device_id = uuid.UUID(hello.device_id)
        except ValueError:
            raise Unauthenticated("unknown device", reason="DEVICE_UNKNOWN") from None
        device = await self._backends.store.device(tenant_id=tenant_id, device_id=device_id)
        if device is None:
            raise Unauthenticated("unknown device", reason="DEVICE_UNKNOWN")
        if device.status == DeviceStatus.DECOMMISSIONED:
            raise PermissionDenied("the device is decommissioned", reason="DEVICE_DECOMMISSIONED")
        if device.status == DeviceStatus.PENDING or device.public_key is None:
            raise FailedPrecondition("the device has not enrolled", reason="DEVICE_NOT_ENROLLED")
        return device

    async def run(self, requests: AsyncIterator[pb.ConnectRequest]) -> AsyncIterator[pb.ConnectResponse]:
        requests = aiter(requests)
        first = await self._next(requests)
        if first is None:
            return
        if first.WhichOneof("body") != "hello":
            raise Unauthenticated("the first message must be hello", reason="HELLO_REQUIRED")
        hello = first.hello
        device = await self._authenticated_device(hello)
        nonce = os.urandom(NONCE_BYTES)
        yield pb.ConnectResponse(challenge=pb.Challenge(nonce=nonce))
        second = await self._next(requests)
        if second is None:
            return
        if second.WhichOneof("body") != "challenge_response":
            raise Unauthenticated("the second message must be challenge_response", reason="CHALLENGE_FAILED")
        signed = challenge_message(tenant_id=str(device.tenant_id), device_id=str(device.device_id), nonce=nonce)
        assert device.public_key is not None
        try:
            nacl.signing.VerifyKey(device.public_key).verify(signed, bytes(second.challenge_response.signature))
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            log.info("challenge failed", tenant_id=str(device.tenant_id), device_id=str(device.device_id))
            raise Unauthenticated("the challenge signature does not verify", reason="CHALLENGE_FAILED") from None
        # The device may have been decommissioned or re-keyed while it signed.
        verified_key = device.public_key
        device = await self._authenticated_device(hello)
        if device.public_key != verified_key:
            raise Unauthenticated("the device key changed", reason="CHALLENGE_FAILED")

        session = Session(context=device_context(device), tenant_id=device.tenant_id, device_id=device.device_id)
        for version in hello.versions:
            if version.kind:
                session.versions[version.kind] = max(0, version.version)
        self._sessions.add(session, replaced_error=Conflict("a newer stream of the device replaced this one",
                                                            reason="STREAM_REPLACED"))
        reader: asyncio.Task[Any] | None = None
        try:
            now = datetime.now(UTC)
            await self._fleet.connected(session, device=device, hello=hello, now=now)
            yield pb.ConnectResponse(welcome=await self._welcome(device, now=now))
            session.spawn(self._sync.catch_up(session), name="sync-catch-up")
            session.spawn(self._rollouts.on_connect(session), name="rollout-resume")
            reader = asyncio.ensure_future(self._read(requests, session))
            while True:
                item = await session.out.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            session.ended = True
            if reader is not None:
                reader.cancel()
            for task in list(session.tasks):
                task.cancel()
            if self._sessions.remove(session):
                # Offline only when no newer stream of the device took over.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._fleet.disconnected(session))

    async def _welcome(self, device: Device, *, now: datetime) -> pb.Welcome:
        settled = 0
        tx = self._backends.tx
        if tx is not None:
            settled = int(await tx.last_settled_sequence(str(device.tenant_id), str(device.device_id)))
        keys: list[pb.BundleKey] = []
        try:
            answer = await self._backends.policy.GetBundleKeys(
                policy_pb2.GetBundleKeysRequest(tenant_id=str(device.tenant_id)),
                timeout=self._settings.downstream_timeout_s)
            keys = [pb.BundleKey(key_id=k.key_id, public_key=k.public_key) for k in answer.keys]
        except grpc.aio.AioRpcError as exc:
            log.warning("bundle keys unavailable", code=exc.code().name)
        return pb.Welcome(device=device_pb(device, last_settled_sequence=settled), hub_time=timestamp_pb(now),
                          last_settled_sequence=settled, bundle_keys=keys)

    # --- after the handshake ----------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[pb.ConnectRequest], session: Session) -> None:
        limit = asyncio.Semaphore(MAX_IN_FLIGHT)
        upload_lock = asyncio.Lock()
        try:
            async for message in requests:
                await self._dispatch(session, message, limit=limit, upload_lock=upload_lock)
            # The device closed its side: answer what it already asked, then end.
            pending = [t for t in session.tasks if t.get_name().startswith("device-request:")]
            if pending:
                await asyncio.wait(pending, timeout=self._settings.downstream_timeout_s * 2)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError:
            pass
        except Exception as exc:  # noqa: BLE001 - the stream ends; the device reconnects
            log.warning("device stream read failed", device_id=str(session.device_id), error=type(exc).__name__)
        session.end(None)

    async def _dispatch(self, session: Session, message: pb.ConnectRequest, *, limit: asyncio.Semaphore,
                        upload_lock: asyncio.Lock) -> None:
        transactions = self._backends.transactions
        body = message.WhichOneof("body")
        if body is None:
            session.send(malformed("empty message: no body set"))
            return
        if body in ("hello", "challenge_response"):
            session.send(malformed(f"{body} is only valid at the start of a stream"))
            return
        if body == "heartbeat":
            await self._guard(session, "", self._fleet.heartbeat(session, message.heartbeat))
            return
        if body == "sync_ack":
            await self._guard(session, "", self._sync.acknowledged(session, message.sync_ack))
            return
        if body == "update_report":
            report = message.update_report
            await self._guard(session, report.rollout_id, self._rollouts.on_report(session, report))
            return
        ctx = session.context
        if body == "authorize":
            req = message.authorize
            if not req.request_id:
                session.send(malformed("authorize needs a request_id"))
                return

            async def authorize() -> pb.AuthorizeResult:
                result = await transactions().authorize(ctx, req)
                if session.ended and result.approved and req.purpose == pb.PURPOSE_PAY and not result.repeated:
                    # The stream ended while the payment was made: nobody will read this answer, so
                    # the till shows the sale as failed. Undo it now rather than leave the member
                    # charged (the device sends its own reversal too; both are the same one).
                    await transactions().reverse(ctx, pb.Reversal(idempotency_key=req.idempotency_key,
                                                                  reason="ANSWER_NOT_DELIVERED"))
                return result

            await self._answer(session, req.request_id, limit, authorize,
                               lambda r: pb.ConnectResponse(authorize_result=r))
        elif body == "reversal":
            req_r = message.reversal
            await self._answer(session, req_r.idempotency_key, limit,
                               lambda: transactions().reverse(ctx, req_r),
                               lambda r: pb.ConnectResponse(reversal_result=r))
        elif body == "upload":
            req_u = message.upload

            async def upload() -> Any:
                async with upload_lock:
                    return await transactions().upload(ctx, req_u)

            await self._answer(session, req_u.upload_id, limit, upload,
                               lambda r: pb.ConnectResponse(upload_result=r))
        elif body == "cabinet_order":
            req_o = message.cabinet_order
            await self._answer(session, req_o.order_id, limit,
                               lambda: transactions().cabinet_order(ctx, req_o),
                               lambda r: pb.ConnectResponse(cabinet_result=r))
        elif body == "cabinet_dispensed":
            req_d = message.cabinet_dispensed
            await self._answer(session, req_d.order_id, limit,
                               lambda: transactions().cabinet_dispensed(ctx, req_d),
                               lambda r: pb.ConnectResponse(cabinet_result=r))
        else:  # pragma: no cover - a field added to the proto and not handled here
            session.send(malformed(f"unsupported message {body}"))

    async def _guard(self, session: Session, ref: str, work: Awaitable[Any]) -> None:
        """Run a quick handler inline; a refusal becomes a StreamError."""
        try:
            await work
        except DomainError as exc:
            session.send(stream_error(exc.reason, exc.message, ref=ref))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered, logged, the stream goes on
            log.error("device message failed", device_id=str(session.device_id), exc_info=exc)
            session.send(stream_error("INTERNAL", "the hub could not handle the message", ref=ref))

    async def _answer(self, session: Session, ref: str, limit: asyncio.Semaphore,
                      work: Callable[[], Awaitable[Any]], wrap: Callable[[Any], pb.ConnectResponse]) -> None:
        await limit.acquire()

        async def run() -> None:
            try:
                result = await work()
                session.send(wrap(result))
            except DomainError as exc:
                session.send(stream_error(exc.reason, exc.message, ref=ref))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("device request failed", device_id=str(session.device_id), exc_info=exc)
                session.send(stream_error("INTERNAL", "the hub could not handle the request", ref=ref))
            finally:
                limit.release()

        session.spawn(run(), name=f"device-request:{ref[:32]}")

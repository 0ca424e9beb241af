"""``DeviceClient``: a terminal's connection to the hub (docs/devicehub.md), with the offline
engine behind it.

    client = DeviceClient(target="127.0.0.1:50056", data_dir="/var/lib/pos", ca_pem=hub_ca_pem)
    await client.enrol(enrolment_token)          # once: makes and keeps the device key and CA bundle
    await client.start()                         # connects, and reconnects, in the background
    paid = await client.pay(pb.Presentation(code=scanned), 1200)
    ...
    await client.close()

The hub's device port speaks TLS: the client checks the hub's certificate against the CA bundle
that came with the enrolment token (``hub_ca_pem``), and from enrolment on against the bundle the
hub answered, kept beside the device key (``hub-ca.pem``). Plaintext is only for a hub in insecure
development mode, and only when asked for (``insecure=True``).

The connection: hello (with the sync versions held and the highest record sequence issued) ->
challenge -> signature -> welcome -> the hub's syncs (applied, acknowledged) -> heartbeats,
authorisations, uploads, update commands.
Replicas: ``target`` may name several hubs, ``["10.0.0.5:50056", "10.0.0.6:50056"]`` or
``"hub-a:50056,hub-b:50056"``. The client holds one stream, to one of them; when that stream breaks
(its hub stopped, the network to it went away) or cannot be opened, the next attempt goes to the
next hub in the list, after the same back-off. Whatever the device holds (queued records,
reversals, sync versions) goes with it: any hub settles it.
A broken stream is retried with exponential backoff and jitter; a refusal that cannot heal
(DEVICE_UNKNOWN, DEVICE_DECOMMISSIONED, DEVICE_NOT_ENROLLED, CHALLENGE_FAILED) stops the client
with ``refused`` set.

``pay`` and ``access`` go online when the stream is up and fall back to the offline engine when it
is down (or when asked to decide offline). An online payment that was sent but not answered (a
timeout, the stream dropping) is **reversed**, as card networks reverse a timed-out authorisation:
``pay`` answers ``NO_ANSWER_REVERSED`` (not approved: the sale did not happen at the till), the
reversal is kept on disk and sent until the hub answers it (on this stream or the next, after a
restart too), and the hub refunds the payment if it was booked or closes its key so it never
books. Every sale so ends final at the till; sell again under a new key. The reversed key itself
is refused offline (a second record of the same sale would be a second charge).

Offline records are uploaded oldest first in batches of at most 1000 whenever the stream is up;
a record leaves the disk only when an upload result gives it a final outcome.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard_device.identity import DeviceIdentity, IdentityError
from onecard_device.offline import OfflineDecision, OfflineEngine, final_sequences
from onecard_device.state import DeviceInfo, DeviceState, SyncError, SyncGap
from onecard_device.store import DeviceStore

log = logging.getLogger("onecard_device")

DEFAULT_FIRMWARE = "1.0.0"
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_AUTHORIZE_TIMEOUT_S = 5.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_CALL_TIMEOUT_S = 10.0
DEFAULT_UPLOAD_TIMEOUT_S = 60.0
MAX_UPLOAD_RECORDS = 1000
DEFAULT_RECONNECT_MIN_S = 0.5
DEFAULT_RECONNECT_MAX_S = 30.0
# A session that lasted this long resets the backoff.
HEALTHY_SESSION_S = 10.0
MAX_AMBIGUOUS_KEYS = 10_000
# While connected, how often the trust list's age is reset (a verifier refuses one older than a week).
TRUST_REFRESH_S = 3600
NO_ANSWER_REVERSED = "NO_ANSWER_REVERSED"
REVERSAL_REASON = "ANSWER_NOT_RECEIVED"
MAX_REVERSALS_PER_ROUND = 100
NOT_CONNECTED = "NOT_CONNECTED"
# A refusal whose reason ends so (POLICY_UNAVAILABLE, LEDGER_UNAVAILABLE...) says a service behind
# the hub did not answer in time: the payment's outcome is unknown, not "declined".
OUTCOME_UNKNOWN_SUFFIX = "_UNAVAILABLE"
# Refusals of the handshake that retrying cannot heal.
TERMINAL_REASONS = frozenset({"DEVICE_UNKNOWN", "DEVICE_DECOMMISSIONED", "DEVICE_NOT_ENROLLED", "CHALLENGE_FAILED"})
_STATUS_DETAILS_METADATA = "grpc-status-details-bin"
CA_FILE = "hub-ca.pem"
_METHODS = {"code": pb.METHOD_CODE, "card_uid": pb.METHOD_CARD, "face_enrolment_ref": pb.METHOD_FACE}


class NotConnected(Exception):
    """The stream is down; nothing was sent."""


class ConnectionLost(Exception):
    """The stream ended while a request waited for its answer: its outcome is unknown."""


class StreamRefused(Exception):
    """The hub answered a request with a StreamError."""

    def __init__(self, error: pb.StreamError) -> None:
        super().__init__(f"{error.reason}: {error.message}")
        self.reason = error.reason
        self.error = error


class DeviceRefused(Exception):
    """The hub refused the device itself (unknown, decommissioned, not enrolled, wrong key)."""

    def __init__(self, code: grpc.StatusCode, reason: str, details: str) -> None:
        super().__init__(f"{code.name} {reason}: {details}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    """What ``pay`` or ``access`` answered, online or offline."""

    approved: bool
    reason: str
    online: bool
    member_id: str = ""
    amount_fen: int = 0
    charged_fen: int = 0
    discount_fen: int = 0
    benefit: str = ""
    transfer_id: str = ""
    repeated: bool = False
    rule: str = ""
    nonce: str = ""
    balances: tuple[pb.PurseBalance, ...] = ()
    # Offline: the record kept for upload.
    sequence: int = 0
    idempotency_key: str = ""


@dataclass
class ClientStats:
    sessions: int = 0
    disconnects: int = 0
    syncs_applied: int = 0
    syncs_refused: int = 0
    uploads: int = 0
    settled: Counter = field(default_factory=Counter)  # RecordOutcome name -> records
    missing_sequences: set[int] = field(default_factory=set)
    stream_errors: Counter = field(default_factory=Counter)
    updates: Counter = field(default_factory=Counter)  # SUCCEEDED / FAILED
    reversals: Counter = field(default_factory=Counter)  # ReversalOutcome name -> reversals answered
    # Times the client turned to the next hub of its list after a broken or failed stream.
    failovers: int = 0


def _now_ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason a onecard service attached to a status, or ''."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # pragma: no cover - googleapis-common-protos comes with grpcio-status
        return ""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_METADATA and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def enrol(target: str, token: str, *, data_dir: Path | str, ca_pem: bytes | str | None = None,
                firmware_version: str = DEFAULT_FIRMWARE, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                server_name: str | None = None, insecure: bool = False) -> str:
    """Enrol a device with a one-time token and the hub's CA bundle that came with it: make its key,
    keep it (and the bundle) in ``data_dir``; answers the device id."""
    client = DeviceClient(target=target, data_dir=data_dir, firmware_version=firmware_version, ca_pem=ca_pem,
                          server_name=server_name, insecure=insecure)
    try:
        return await client.enrol(token, timeout_s=timeout_s)
    finally:
        await client.close()


def hub_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """The hubs to try, in order: a list, or one string with addresses separated by commas."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    targets = tuple(part.strip() for part in parts if part and part.strip())
    if not targets:
        raise ValueError("target: name at least one hub (host:port)")
    return targets


class DeviceClient:
    def __init__(self, *, target: str | Sequence[str], data_dir: Path | str, firmware_version: str | None = None,
                 heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                 authorize_timeout_s: float = DEFAULT_AUTHORIZE_TIMEOUT_S,
                 upload_batch_size: int = MAX_UPLOAD_RECORDS, upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
                 reconnect_min_s: float = DEFAULT_RECONNECT_MIN_S, reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 clock: Callable[[], float] = time.time, durable: bool = True,
                 health: Callable[[], dict[str, str]] | None = None,
                 install_update: Callable[[pb.UpdateCommand], Awaitable[bool]] | None = None,
                 update_step_s: float = 0.2, ca_pem: bytes | str | None = None, server_name: str | None = None,
                 insecure: bool = False) -> None:
        if not 1 <= upload_batch_size <= MAX_UPLOAD_RECORDS:
            raise ValueError(f"upload_batch_size must be 1..{MAX_UPLOAD_RECORDS}")
        self.targets = hub_targets(target)
        self._target_index = 0
        self.data_dir = Path(data_dir)
        # The hub's CA bundle: the one given, else the one kept at enrolment.
        kept = self.data_dir / CA_FILE
        self.ca_pem: bytes | None = (ca_pem.encode() if isinstance(ca_pem, str) else ca_pem) or (
            kept.read_bytes() if kept.exists() else None)
        # The name the hub's certificate must carry, when it differs from the host in ``target``.
        self.server_name = server_name
        self.insecure = insecure
        self.heartbeat_interval_s = heartbeat_interval_s
        self.authorize_timeout_s = authorize_timeout_s
        self.upload_batch_size = upload_batch_size
        self.upload_timeout_s = upload_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.handshake_timeout_s = handshake_timeout_s
        self.clock = clock
        self.health = health
        self.install_update = install_update
        self.update_step_s = update_step_s
        # Set True (or a predicate of the command) to make installs fail, e.g. in a simulator.
        self.fail_updates: bool | Callable[[pb.UpdateCommand], bool] = False
        self.store = DeviceStore(self.data_dir, durable=durable)
        self.firmware_version = self.store.get_meta("firmware_version") or firmware_version or DEFAULT_FIRMWARE
        self.identity: DeviceIdentity | None = DeviceIdentity.load(self.data_dir)
        self.state: DeviceState | None = None
        self.engine: OfflineEngine | None = None
        if self.identity is not None and self.identity.enrolled:
            self._load_state()
        self.stats = ClientStats()
        self.refused: DeviceRefused | None = None
        self.last_error = ""
        self.hub_time_offset_s = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future] = {}
        self._ambiguous: OrderedDict[str, None] = OrderedDict()
        self._connected = asyncio.Event()
        self._want_online = asyncio.Event()
        self._want_online.set()
        self._queued = asyncio.Event()
        self._reversal_queued = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._session_tasks: list[asyncio.Task] = []
        # The bundle version that last made the device reconnect to learn the tenant's bundle keys
        # (one reconnect per version, so a bundle that never opens cannot make it loop).
        self._keys_asked_for_bundle = 0
        self._closing = False
        self._closed = False

    # ---- identity and state ----

    def _load_state(self) -> None:
        assert self.identity is not None
        saved = self.store.load_state()
        state = DeviceState.from_json(saved) if saved else None
        if state is None or state.tenant_id != self.identity.tenant_id or (
                state.device_id and state.device_id != self.identity.device_id):
            state = DeviceState(tenant_id=self.identity.tenant_id, device_id=self.identity.device_id)
        state.device_id = self.identity.device_id
        self.state = state
        self.engine = OfflineEngine(identity=self.identity, state=state, store=self.store, clock=self.clock)

    def _save_state(self) -> None:
        if self.state is not None:
            self.store.save_state(self.state.to_json())

    @property
    def device_id(self) -> str:
        return self.identity.device_id if self.identity else ""

    @property
    def tenant_id(self) -> str:
        return self.identity.tenant_id if self.identity else ""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def target(self) -> str:
        """The hub this client dials now (the one its stream is on, while connected)."""
        return self.targets[self._target_index]

    async def _next_hub(self) -> None:
        """Dial the next hub of the list from now on (nothing to do with one)."""
        if len(self.targets) < 2:
            return
        self._target_index = (self._target_index + 1) % len(self.targets)
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        self.stats.failovers += 1

    def _stub(self) -> devicehub_pb2_grpc.DeviceServiceStub:
        if self._channel is None:
            self._channel = self._open_channel()
        return devicehub_pb2_grpc.DeviceServiceStub(self._channel)

    def _open_channel(self) -> grpc.aio.Channel:
        if self.ca_pem:
            options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
            return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(root_certificates=self.ca_pem),
                                           options=options)
        if self.insecure:
            return grpc.aio.insecure_channel(self.target)
        raise IdentityError("no CA bundle for the hub: pass ca_pem (it comes with the enrolment token)")

    async def enrol(self, token: str, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> str:
        """Enrol with a one-time token: a new device key (kept in the data folder) and the device id."""
        identity = DeviceIdentity.generate()
        answer = await self._stub().Enrol(
            pb.EnrolRequest(enrolment_token=token, public_key=identity.public_key,
                            firmware_version=self.firmware_version), timeout=timeout_s)
        identity.tenant_id = answer.device.tenant_id
        identity.device_id = answer.device.device_id
        identity.save(self.data_dir)
        if answer.hub_ca_pem:
            self._keep_ca(answer.hub_ca_pem.encode())
        self.identity = identity
        self._load_state()
        assert self.state is not None
        self.state.device = DeviceInfo.from_pb(answer.device)
        self._save_state()
        return identity.device_id

    def _keep_ca(self, ca_pem: bytes) -> None:
        path = self.data_dir / CA_FILE
        scratch = path.with_name(f".{CA_FILE}.tmp")
        scratch.write_bytes(ca_pem)
        scratch.replace(path)
        self.ca_pem = ca_pem

    # ---- lifecycle ----

    async def start(self) -> None:
        """Connect in the background (and keep reconnecting) until ``close``."""
        if self.identity is None or not self.identity.enrolled:
            raise IdentityError("the device is not enrolled: call enrol(token) first")
        if self._runner is None or self._runner.done():
            self._closing = False
            self._runner = asyncio.create_task(self._run(), name=f"device-{self.device_id[:8]}")

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def go_offline(self) -> None:
        """Drop the stream and stay offline (a pulled cable) until ``go_online``."""
        self._want_online.clear()
        if self._call is not None:
            self._call.cancel()

    def go_online(self) -> None:
        self._want_online.set()

    async def close(self) -> None:
        """Stop, keep the state, close the disk. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._want_online.set()
        if self._call is not None:
            self._call.cancel()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        await self._end_session()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._save_state()
        self.store.close()

    async def _run(self) -> None:
        backoff_s = self.reconnect_min_s
        while not self._closing:
            if not self._want_online.is_set():
                await self._want_online.wait()
                continue
            started = time.monotonic()
            try:
                await self._session()
            except DeviceRefused as exc:
                self.refused = exc
                self.last_error = str(exc)
                log.warning("device %s refused by the hub: %s", self.device_id, exc.reason)
                return
            except asyncio.CancelledError:
                # go_offline cancels the call, which ends the session; a cancel of this task ends it.
                task = asyncio.current_task()
                if self._closing or (task is not None and task.cancelling()):
                    raise
            except (grpc.aio.AioRpcError, ConnectionLost, TimeoutError, SyncGap, OSError) as exc:
                self.last_error = f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()}" \
                    if isinstance(exc, grpc.aio.AioRpcError) else f"{type(exc).__name__}: {exc}"
            finally:
                await self._end_session()
            if self._closing:
                return
            if not self._want_online.is_set():
                continue
            # The stream broke or never came up: the next try goes to the next hub.
            await self._next_hub()
            if time.monotonic() - started > HEALTHY_SESSION_S:
                backoff_s = self.reconnect_min_s
            delay_s = backoff_s * (0.5 + random.random())
            backoff_s = min(backoff_s * 2, self.reconnect_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_forever_unless_closing(), delay_s)

    async def _wait_forever_unless_closing(self) -> None:
        while not self._closing:
            await asyncio.sleep(3600)

    async def _end_session(self) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        tasks, self._session_tasks = self._session_tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("the stream ended"))
        if was_connected:
            self.stats.disconnects += 1
            self._save_state()

    # ---- the session ----

    async def _read(self, call, *, timeout_s: float | None = None) -> pb.ConnectResponse:
        message = await (asyncio.wait_for(call.read(), timeout_s) if timeout_s else call.read())
        if message is grpc.aio.EOF:
            raise ConnectionLost("the hub ended the stream")
        return message

    async def _session(self) -> None:
        assert self.identity is not None and self.state is not None
        call = self._stub().Connect()
        self._call = call
        try:
            # Every record made from now on has a higher sequence: the hub dates them after this hello.
            await call.write(pb.ConnectRequest(hello=pb.Hello(
                tenant_id=self.tenant_id, device_id=self.device_id, firmware_version=self.firmware_version,
                versions=self.state.sync_versions(), device_time=_now_ts(self.clock()),
                last_sequence=self.store.next_sequence() - 1)))
            challenge = await self._read(call, timeout_s=self.handshake_timeout_s)
            if challenge.WhichOneof("body") != "challenge":
                raise ConnectionLost(f"expected a challenge, got {challenge.WhichOneof('body')}")
            await call.write(pb.ConnectRequest(challenge_response=pb.ChallengeResponse(
                signature=self.identity.sign_challenge(challenge.challenge.nonce))))
            welcome = await self._read(call, timeout_s=self.handshake_timeout_s)
            if welcome.WhichOneof("body") != "welcome":
                raise ConnectionLost(f"expected a welcome, got {welcome.WhichOneof('body')}")
        except grpc.aio.AioRpcError as exc:
            reason = error_reason(exc)
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                              grpc.StatusCode.FAILED_PRECONDITION) and reason in TERMINAL_REASONS:
                raise DeviceRefused(exc.code(), reason, exc.details() or "") from None
            raise
        self._on_welcome(welcome.welcome)
        self.stats.sessions += 1
        self._connected.set()
        self._session_tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._uploads()),
                               asyncio.create_task(self._reversals())]
        self._queued.set()
        self._reversal_queued.set()
        while True:
            message = await self._read(call)
            self._dispatch(message)

    def _on_welcome(self, welcome: pb.Welcome) -> None:
        assert self.state is not None
        now_s = self.clock()
        if welcome.HasField("hub_time"):
            self.hub_time_offset_s = now_s - welcome.hub_time.ToNanoseconds() / 1e9
        self.state.apply_welcome(welcome, now_s=int(now_s))
        # A device whose disk forgot records the hub settled must not reuse their sequences.
        self.store.raise_sequence_floor(welcome.last_settled_sequence + 1)
        self._save_state()

    def _dispatch(self, message: pb.ConnectResponse) -> None:
        body = message.WhichOneof("body")
        if body == "sync":
            self._on_sync(message.sync)
        elif body == "authorize_result":
            self._resolve(f"a:{message.authorize_result.request_id}", message.authorize_result)
        elif body == "upload_result":
            self._resolve(f"u:{message.upload_result.upload_id}", message.upload_result)
        elif body == "cabinet_result":
            self._resolve(f"c:{message.cabinet_result.order_id}", message.cabinet_result)
        elif body == "reversal_result":
            self._resolve(f"r:{message.reversal_result.idempotency_key}", message.reversal_result)
        elif body == "update_command":
            self._spawn(self._on_update(message.update_command))
        elif body == "error":
            error = message.error
            self.stats.stream_errors[error.reason] += 1
            for prefix in ("a", "u", "c", "r"):
                future = self._pending.pop(f"{prefix}:{error.ref}", None) if error.ref else None
                if future is not None and not future.done():
                    future.set_exception(StreamRefused(error))
                    break
            else:
                log.warning("device %s: the hub refused a message: %s", self.device_id, error.reason)

    def _resolve(self, key: str, answer) -> None:  # noqa: ANN001
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _on_sync(self, update: pb.SyncUpdate) -> None:
        assert self.state is not None
        try:
            version = self.state.apply(update, now_s=int(self.clock()))
        except SyncGap:
            raise  # ends the session; the next hello says what the device holds
        except SyncError as exc:
            self.stats.syncs_refused += 1
            log.warning("device %s: sync refused: %s", self.device_id, exc)
            if (exc.kind == pb.SYNC_KIND_POLICY_BUNDLE and exc.reason == "BUNDLE_UNKNOWN_KEY"
                    and update.version > self._keys_asked_for_bundle):
                # Signed by a key rotated in since the welcome: reconnect, and the next welcome
                # lists it; the rules held stay in force until then.
                self._keys_asked_for_bundle = update.version
                raise SyncGap(exc.kind, exc.reason, "reconnecting to learn the tenant's bundle keys") from None
            return
        self.stats.syncs_applied += 1
        self._save_state()
        self._spawn(self._send_quietly(pb.ConnectRequest(sync_ack=pb.SyncAck(kind=update.kind, version=version))))

    def _spawn(self, coroutine) -> None:  # noqa: ANN001
        """A task of this session (cancelled when it ends); finished ones are let go."""
        self._session_tasks = [t for t in self._session_tasks if not t.done()]
        self._session_tasks.append(asyncio.create_task(coroutine))

    async def _send(self, message: pb.ConnectRequest) -> None:
        call = self._call
        if call is None or not self._connected.is_set():
            raise NotConnected()
        async with self._write_lock:
            await call.write(message)

    async def _send_quietly(self, message: pb.ConnectRequest) -> None:
        with contextlib.suppress(NotConnected, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._send(message)

    async def _request(self, key: str, message: pb.ConnectRequest, *, timeout_s: float):
        """Send and wait for the answer keyed ``key``. NotConnected: nothing was sent;
        ConnectionLost / TimeoutError: sent, outcome unknown."""
        if not self.connected:
            raise NotConnected()
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            try:
                await self._send(message)
            except NotConnected:
                raise
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                raise ConnectionLost(str(exc)) from None
            return await asyncio.wait_for(future, timeout_s)
        finally:
            if self._pending.get(key) is future:
                del self._pending[key]

    def _heartbeat(self) -> pb.ConnectRequest:
        assert self.state is not None
        oldest = self.store.oldest_queued_s()
        beat = pb.Heartbeat(device_time=_now_ts(self.clock()), firmware_version=self.firmware_version,
                            config_version=self.state.version(pb.SYNC_KIND_CONFIG),
                            queue_depth=self.store.queue_depth(), health=self.health() if self.health else {})
        if oldest is not None:
            beat.oldest_queued_at.CopyFrom(_now_ts(oldest))
        return pb.ConnectRequest(heartbeat=beat)

    async def _heartbeats(self) -> None:
        assert self.state is not None
        while True:
            now_s = int(self.clock())
            if now_s - self.state.trust_fetched_at_s >= TRUST_REFRESH_S:
                # Connected, the device gets every change as it happens: its trust list is current.
                self.state.mark_fresh(now_s)
            await self._send_quietly(self._heartbeat())
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _uploads(self) -> None:
        idle_s = 0.5
        while True:
            batch = self.store.pending(limit=self.upload_batch_size)
            if not batch:
                self._queued.clear()
                await self._queued.wait()
                continue
            upload_id = uuid.uuid4().hex
            records = [pb.OfflineRecord.FromString(q.body) for q in batch]
            try:
                result = await self._request(f"u:{upload_id}", pb.ConnectRequest(
                    upload=pb.Upload(upload_id=upload_id, records=records)), timeout_s=self.upload_timeout_s)
            except (StreamRefused, TimeoutError) as exc:
                log.warning("device %s: upload refused or unanswered: %s", self.device_id, exc)
                await asyncio.sleep(idle_s)
                idle_s = min(idle_s * 2, 30.0)
                continue
            except (NotConnected, ConnectionLost):
                return
            self.stats.uploads += 1
            for record_result in result.results:
                self.stats.settled[pb.RecordOutcome.Name(record_result.outcome)] += 1
            self.stats.missing_sequences = set(result.missing_sequences)
            dropped = self.store.drop(final_sequences(result))
            if dropped and not self.store.queue_depth():
                # The hub sees the backlog gone now, not at the next heartbeat.
                await self._send_quietly(self._heartbeat())
            if dropped == 0:
                await asyncio.sleep(idle_s)
                idle_s = min(idle_s * 2, 30.0)
            else:
                idle_s = 0.5

    async def _reversals(self) -> None:
        """Send the reversals kept on disk until the hub answers each (final either way)."""
        idle_s = 0.5
        while True:
            pending = self.store.pending_reversals(limit=MAX_REVERSALS_PER_ROUND)
            if not pending:
                self._reversal_queued.clear()
                await self._reversal_queued.wait()
                continue
            answered = 0
            for key, reason in pending:
                try:
                    result = await self._request(f"r:{key}", pb.ConnectRequest(reversal=pb.Reversal(
                        idempotency_key=key, reason=reason)), timeout_s=self.authorize_timeout_s)
                except (StreamRefused, TimeoutError) as exc:
                    log.warning("device %s: reversal refused or unanswered: %s", self.device_id, exc)
                    continue
                except (NotConnected, ConnectionLost):
                    return
                self.stats.reversals[pb.ReversalOutcome.Name(result.outcome)] += 1
                self.store.drop_reversal(key)
                answered += 1
            if answered == 0:
                await asyncio.sleep(idle_s)
                idle_s = min(idle_s * 2, 30.0)
            else:
                idle_s = 0.5

    def _reverse_later(self, key: str) -> None:
        """The answer to an online payment did not come: reverse it (kept on disk, sent when it can be)."""
        self.store.add_reversal(key, reason=REVERSAL_REASON, now_s=self.clock())
        self._reversal_queued.set()

    def pending_reversals(self) -> int:
        return len(self.store.pending_reversals(limit=MAX_AMBIGUOUS_KEYS))

    async def _on_update(self, command: pb.UpdateCommand) -> None:
        firmware = command.target == pb.ROLLOUT_TARGET_FIRMWARE
        old = self.firmware_version if firmware else str(self.state.version(pb.SYNC_KIND_CONFIG) if self.state else 0)

        async def report(step: int, running: str, detail: str = "") -> None:
            await self._send_quietly(pb.ConnectRequest(update_report=pb.UpdateReport(
                rollout_id=command.rollout_id, step=step, running_version=running, detail=detail)))

        await report(pb.UPDATE_STEP_DOWNLOADING, old)
        await asyncio.sleep(self.update_step_s)
        await report(pb.UPDATE_STEP_INSTALLING, old)
        await asyncio.sleep(self.update_step_s)
        fail = self.fail_updates(command) if callable(self.fail_updates) else self.fail_updates
        ok = not fail
        if ok and self.install_update is not None:
            try:
                ok = await self.install_update(command)
            except Exception as exc:  # an installer's failure is a failed step, reported
                log.warning("device %s: install failed: %s", self.device_id, type(exc).__name__)
                ok = False
        if not ok:
            self.stats.updates["FAILED"] += 1
            await report(pb.UPDATE_STEP_FAILED, old, "install failed; still running the old version")
            return
        new = command.version or old
        if firmware:
            self.firmware_version = new
            self.store.set_meta("firmware_version", new)
        elif command.config_json and self.state is not None:
            with contextlib.suppress(ValueError):
                config = json.loads(command.config_json)
                if isinstance(config, dict):
                    self.state.config = config
                    self._save_state()
        self.stats.updates["SUCCEEDED"] += 1
        await report(pb.UPDATE_STEP_SUCCEEDED, new)

    # ---- what a terminal does ----

    def _remember_ambiguous(self, key: str) -> None:
        self._ambiguous[key] = None
        self._ambiguous.move_to_end(key)
        while len(self._ambiguous) > MAX_AMBIGUOUS_KEYS:
            self._ambiguous.popitem(last=False)

    def _offline_outcome(self, decision: OfflineDecision, *, key: str = "") -> Outcome:
        if decision.record is not None:
            self._queued.set()
        return Outcome(approved=decision.approved, reason=decision.reason, online=False,
                       member_id=decision.member_id, amount_fen=decision.amount_fen, charged_fen=decision.charged_fen,
                       discount_fen=decision.discount_fen, benefit=decision.benefit, rule=decision.rule,
                       nonce=decision.nonce, sequence=decision.sequence, idempotency_key=key)

    async def _authorize(self, authorize: pb.Authorize) -> pb.AuthorizeResult:
        return await self._request(f"a:{authorize.request_id}", pb.ConnectRequest(authorize=authorize),
                                   timeout_s=self.authorize_timeout_s)

    def _online_outcome(self, result: pb.AuthorizeResult, presentation: pb.Presentation, *, amount_fen: int = 0,
                        key: str = "", nonce: str = "") -> Outcome:
        if self.state is not None and presentation.WhichOneof("credential") == "card_uid" and result.member_id:
            self.state.learn_card(presentation.card_uid, result.member_id)
        return Outcome(approved=result.approved, reason=result.reason or ("APPROVED" if result.approved else ""),
                       online=True, member_id=result.member_id, amount_fen=amount_fen, charged_fen=result.charged_fen,
                       discount_fen=result.discount_fen, benefit=result.benefit, transfer_id=result.transfer_id,
                       repeated=result.repeated, rule=result.rule, nonce=nonce, balances=tuple(result.balances),
                       idempotency_key=key)

    async def pay(self, presentation: pb.Presentation, amount_fen: int, idempotency_key: str | None = None, *,
                  pin_verified: bool = False, external_ref: str = "", offline: bool = False) -> Outcome:
        """A payment: online when the stream is up (unless ``offline``), else by the offline engine."""
        if self.engine is None:
            raise IdentityError("the device is not enrolled")
        key = idempotency_key or uuid.uuid4().hex
        if not offline and self.connected:
            authorize = pb.Authorize(request_id=uuid.uuid4().hex, presentation=presentation,
                                     purpose=pb.PURPOSE_PAY, amount_fen=amount_fen, idempotency_key=key,
                                     external_ref=external_ref, pin_verified=pin_verified,
                                     device_time=_now_ts(self.clock()))
            try:
                result = await self._authorize(authorize)
                self._ambiguous.pop(key, None)
                return self._online_outcome(result, presentation, amount_fen=amount_fen, key=key)
            except NotConnected:
                pass  # nothing was sent: decide offline
            except StreamRefused as exc:
                if not exc.reason.endswith(OUTCOME_UNKNOWN_SUFFIX):
                    return Outcome(False, exc.reason, online=True, amount_fen=amount_fen, idempotency_key=key)
                # The hub lost its answer from policy or the ledger (<SERVICE>_UNAVAILABLE): the
                # payment may have been booked all the same. Undone like an answer that never came.
                self._remember_ambiguous(key)
                self._reverse_later(key)
                return Outcome(False, NO_ANSWER_REVERSED, online=True, amount_fen=amount_fen, idempotency_key=key)
            except (ConnectionLost, TimeoutError):
                # Sent, never answered: whatever the hub did with it is undone.
                self._remember_ambiguous(key)
                self._reverse_later(key)
                return Outcome(False, NO_ANSWER_REVERSED, online=True, amount_fen=amount_fen, idempotency_key=key)
        if key in self._ambiguous or self.store.has_reversal(key):
            return Outcome(False, NO_ANSWER_REVERSED, online=False, amount_fen=amount_fen, idempotency_key=key)
        return self._offline_outcome(self.engine.pay(presentation, amount_fen, pin_verified=pin_verified), key=key)

    async def access(self, presentation: pb.Presentation, *, purpose: int = pb.PURPOSE_ACCESS,
                     nonce: str | None = None, offline: bool = False) -> Outcome:
        """A gate or shuttle reader: online when the stream is up, else decided and recorded offline.
        The nonce names the pass; an online attempt with an unknown outcome is recorded offline
        under the same nonce (the hub stores a nonce once)."""
        if self.engine is None:
            raise IdentityError("the device is not enrolled")
        nonce = nonce or uuid.uuid4().hex
        if not offline and self.connected:
            authorize = pb.Authorize(request_id=uuid.uuid4().hex, presentation=presentation, purpose=purpose,
                                     device_time=_now_ts(self.clock()), nonce=nonce)
            try:
                result = await self._authorize(authorize)
                return self._online_outcome(result, presentation, nonce=nonce)
            except StreamRefused as exc:
                return Outcome(False, exc.reason, online=True, nonce=nonce)
            except (NotConnected, ConnectionLost, TimeoutError):
                pass
        return self._offline_outcome(self.engine.access(presentation, purpose=purpose, nonce=nonce))

    async def cabinet_order(self, *, cabinet_device_id: str, presentation: pb.Presentation, amount_fen: int,
                            item: str = "", order_id: str | None = None,
                            timeout_s: float | None = None) -> pb.CabinetResult:
        """A POS orders for its cabinet: the hub holds the amount (HELD) or declines. Online only."""
        order_id = order_id or uuid.uuid4().hex
        return await self._request(f"c:{order_id}", pb.ConnectRequest(cabinet_order=pb.CabinetOrder(
            order_id=order_id, cabinet_device_id=cabinet_device_id, presentation=presentation,
            amount_fen=amount_fen, item=item)), timeout_s=timeout_s or self.authorize_timeout_s)

    async def cabinet_dispensed(self, order_id: str, dispensed: bool, *,
                                timeout_s: float | None = None) -> pb.CabinetResult:
        """The cabinet's report: dispensed -> CAPTURED, failed -> VOIDED."""
        return await self._request(f"c:{order_id}", pb.ConnectRequest(cabinet_dispensed=pb.CabinetDispensed(
            order_id=order_id, dispensed=dispensed)), timeout_s=timeout_s or self.authorize_timeout_s)

    def queue_depth(self) -> int:
        return self.store.queue_depth()

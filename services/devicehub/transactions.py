"""What devices do with money and doors: online authorisations (payments by code, card or face;
gate and shuttle passes), offline uploads, cabinet orders, and the admin reads of access rules,
access records and the dining index. Core's stream and servicer call this class (the interface is
in the team brief); its parts are members (identity, cached), verifier (codes, per tenant),
settlement (uploads), recheck (what an offline payment's evidence is checked against, with rules:
the rule sets in force), access (rules and records), cabinet (holds) and tx_store (SQL).

The online payment path makes no identity or codegen call for a code seen before (cached verifier
and members), one PolicyService.Pay (which evaluates and books with guards in the ledger), and no
database write of its own: the dining index rows are buffered and written in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import onecard_codes as codes

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2 as ppb
from onecard.policy.v1 import policy_pb2_grpc
from runtime.batching import CallBatcher, item_refusal
from runtime.idempotency import device_scope
from runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from runtime.events import Event
from runtime.grpc_server import ServiceApp
from runtime.logs import get_logger
from runtime.wire import timestamp_pb
from services.devicehub.access import Access, parse_tenant
from services.devicehub.cabinet import Cabinets
from services.devicehub.context import AlarmSink, DeviceContext
from services.devicehub.members import MemberInfo, Members, Refused
from services.devicehub.recheck import OfflineLimits, Recheck
from services.devicehub.rules import Rules
from services.devicehub.settlement import (
    MAX_AMOUNT_FEN,
    Settlement,
    ledger_refusal,
    now_utc,
    purse_name,
)
from services.devicehub.settings import DevicehubSettings
from services.devicehub.store import DevicehubStore
from services.devicehub.tx_store import SUBJECT_ACCESS_RULES_CHANGED, ServedRow, TxStore
from services.devicehub.verifier import PURPOSES, CodeVerifiers

if TYPE_CHECKING:
    import asyncpg

log = get_logger(__name__)

DEFAULT_DINING_WINDOW_S = 15 * 60
MAX_DINING_WINDOW_S = 24 * 3600
SERVED_FLUSH_S = 0.5
SERVED_FLUSH_ROWS = 2000
SERVED_KEEP = timedelta(hours=25)
PRUNE_EVERY_S = 600.0
MAX_KEY_CHARS = 128
# Codes this replica accepted, with the request that presented them: a retry of that request (same
# device, same idempotency key or nonce) is not a replay.
RECENT_CODES = 65_536


MAX_REVERSAL_REASON_CHARS = 64
_REVERSAL_OUTCOMES = {lpb.REVERSAL_OUTCOME_REVERSED: pb.REVERSAL_OUTCOME_REVERSED,
                      lpb.REVERSAL_OUTCOME_PREVENTED: pb.REVERSAL_OUTCOME_PREVENTED}


def _check_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise InvalidArgument("idempotency_key must be 1..128 printable ASCII characters",
                              reason="IDEMPOTENCY_KEY_INVALID")
    return value


class Transactions:
    def __init__(self, *, pool: asyncpg.Pool, settings: DevicehubSettings, alarms: AlarmSink,
                 identity: grpc.aio.Channel, codegen: grpc.aio.Channel, policy: grpc.aio.Channel,
                 ledger: grpc.aio.Channel, now: Callable[[], datetime] = now_utc):
        # The hub's clock: it decides online (the payment's time, meal periods, the day's limits,
        # access windows), never the device's.
        self._now = now
        timeout_s = float(getattr(settings, "downstream_timeout_s", 5.0))
        self._timeout_s = timeout_s
        self._store = TxStore(pool)
        self._alarms = alarms
        self.members = Members(identity, timeout_s=timeout_s,
                               ttl_s=float(getattr(settings, "member_cache_s", 30.0)))
        self.codes = CodeVerifiers(codegen, timeout_s=timeout_s)
        self._policy = policy_pb2_grpc.PolicyServiceStub(policy)
        # The terminals' payments that arrive together go to policy in one PayMany.
        self._payments: CallBatcher[ppb.PayRequest, ppb.PayResponse] = CallBatcher(self._pay_many)
        self._ledger = ledger_pb2_grpc.LedgerServiceStub(ledger)
        self.access = Access(store=self._store, now=now)
        limits = OfflineLimits(clock_skew=timedelta(seconds=settings.offline_clock_skew_s),
                               max_record_age=timedelta(seconds=settings.offline_max_record_age_s))
        self.rules = Rules(self._policy, timeout_s=timeout_s)
        recheck = Recheck(verifiers=self.codes, members=self.members, rules=self.rules, limits=limits)
        self.settlement = Settlement(
            store=self._store, ledger=self._ledger, alarms=alarms, member_by_card=self.members.by_card,
            recheck=recheck, max_record_age=limits.max_record_age,
            flag_after_rejected=settings.flag_after_rejected_records,
            timeout_s=timeout_s)
        self.cabinets = Cabinets(store=self._store, devices=DevicehubStore(pool), policy=self._policy,
                                 ledger=self._ledger, resolve=self._resolve, timeout_s=timeout_s, now=now)
        self._recent_codes: OrderedDict[bytes, tuple[str, str, codes.Verified]] = OrderedDict()
        self._served: list[ServedRow] = []
        self._served_wake = asyncio.Event()
        self._subscriptions: list[Any] = []

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, app: ServiceApp) -> None:
        """Listen for what makes caches stale (plain NATS subscriptions: every replica drops its own
        copies), and write the dining index rows in the background."""
        nc = app.nc
        self._subscriptions = [
            await nc.subscribe("identity.>", cb=self._on_identity),
            await nc.subscribe("codegen.>", cb=self._on_codegen),
            await nc.subscribe(SUBJECT_ACCESS_RULES_CHANGED, cb=self._on_access_rules),
        ]
        app.spawn(self._write_served_forever(), name="tx-served-writer")
        app.spawn(self._prune_forever(), name="tx-served-pruner")

    async def close(self) -> None:
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions = []
        self.codes.close()
        self._payments.close()
        with contextlib.suppress(Exception):
            await self._flush_served()

    @staticmethod
    def _event(msg: Any) -> Event | None:
        try:
            return Event.from_bytes(msg.data, subject=msg.subject)
        except Exception:  # noqa: BLE001 - not one of ours
            return None

    async def _on_identity(self, msg: Any) -> None:
        event = self._event(msg)
        if event is None:
            return
        tenant_id, member_id = event.data.get("tenant_id") or event.tenant_id, event.data.get("member_id")
        if tenant_id and member_id:
            self.members.forget(str(tenant_id), str(member_id))

    async def _on_codegen(self, msg: Any) -> None:
        event = self._event(msg)
        if event is None:
            return
        tenant_id = str(event.data.get("tenant_id") or event.tenant_id or "")
        if not tenant_id:
            return
        if event.type == "codegen.trust_list.changed":
            self.codes.trust_list_changed(tenant_id)
        elif event.type == "codegen.credential.revoked" and event.data.get("credential_id"):
            self.codes.credential_revoked(tenant_id, credential_id=str(event.data["credential_id"]),
                                          version=int(event.data.get("version", 0)))

    async def _on_access_rules(self, msg: Any) -> None:
        event = self._event(msg)
        if event is not None and (event.data.get("tenant_id") or event.tenant_id):
            self.access.forget(str(event.data.get("tenant_id") or event.tenant_id))

    # --- who was presented -----------------------------------------------------------------------

    async def _resolve(self, device: DeviceContext, presentation: pb.Presentation, purpose: int,
                       request_key: str) -> tuple[MemberInfo, int, lpb.CodeRef | None]:
        """The member a presentation names, the method and (for a code) its CodeRef; raises Refused."""
        which = presentation.WhichOneof("credential")
        if which == "code":
            verified = await self.codes.verify(tenant_id=device.tenant_id, code=presentation.code,
                                               purpose=PURPOSES[purpose])
            if type(verified) is codes.Rejected:
                verified = self._retry_of_accepted(device, presentation.code, verified, request_key)
            else:
                self._remember_code(device, presentation.code, verified, request_key)
            member = await self.members.by_id(device.tenant_id, str(verified.member_id))
            return member, pb.METHOD_CODE, lpb.CodeRef(credential_id=str(verified.credential_id),
                                                       counter=verified.counter)
        if which == "card_uid":
            return await self.members.by_card(device.tenant_id, presentation.card_uid), pb.METHOD_CARD, None
        if which == "face_enrolment_ref":
            if not presentation.face_enrolment_ref.strip():
                raise InvalidArgument("face_enrolment_ref is empty", reason="PRESENTATION_INVALID")
            return await self.members.by_face(device.tenant_id, presentation.face_enrolment_ref), pb.METHOD_FACE, None
        raise InvalidArgument("presentation needs a code, a card_uid or a face_enrolment_ref",
                              reason="PRESENTATION_REQUIRED")

    def _retry_of_accepted(self, device: DeviceContext, code: str, rejected: codes.Rejected,
                           request_key: str) -> codes.Verified:
        """A REPLAYED code that this device presented before under the same request key (a retry
        after a lost answer) goes on; anything else is refused CODE_<reason>."""
        if rejected.reason is codes.Reason.REPLAYED:
            seen = self._recent_codes.get(_code_key(device.tenant_id, code))
            if seen is not None and seen[0] == device.device_id and seen[1] == request_key:
                return seen[2]
        raise Refused(f"CODE_{rejected.reason.value}")

    def _remember_code(self, device: DeviceContext, code: str, verified: codes.Verified, request_key: str) -> None:
        key = _code_key(device.tenant_id, code)
        self._recent_codes[key] = (device.device_id, request_key, verified)
        self._recent_codes.move_to_end(key)
        while len(self._recent_codes) > RECENT_CODES:
            self._recent_codes.popitem(last=False)

    async def device_skew_limit_ms(self, tenant_id: str, *, default_ms: int) -> int:
        """How far a terminal's clock may be from the hub's: the tenant's rule set's
        ``clock.max_device_skew_s``, else ``default_ms`` (also when policy does not answer)."""
        try:
            rule_set = await self.rules.current(tenant_id, now=self._now())
        except Unavailable:
            return default_ms
        if rule_set is None or rule_set.max_device_skew_s is None:
            return default_ms
        return rule_set.max_device_skew_s * 1000

    # --- online authorisation --------------------------------------------------------------------

    async def authorize(self, device: DeviceContext, msg: pb.Authorize) -> pb.AuthorizeResult:
        if msg.purpose == pb.PURPOSE_PAY:
            return await self._pay(device, msg)
        if msg.purpose in (pb.PURPOSE_ACCESS, pb.PURPOSE_RIDE):
            return await self._pass(device, msg)
        raise InvalidArgument("purpose must be PAY, ACCESS or RIDE", reason="PURPOSE_INVALID")

    async def reverse(self, device: DeviceContext, msg: pb.Reversal) -> pb.ReversalResult:
        """A timeout reversal of one of this device's payments: refunded if booked, its key closed
        if not, exactly once either way (the ledger's ReversePayment under the device's scope)."""
        key = _check_key(msg.idempotency_key)
        reason = msg.reason or "ANSWER_NOT_RECEIVED"
        if len(reason) > MAX_REVERSAL_REASON_CHARS or not reason.isascii() or not reason.isprintable():
            raise InvalidArgument("reason: at most 64 printable ASCII characters", reason="REASON_INVALID")
        try:
            answer = await self._ledger.ReversePayment(lpb.ReversePaymentRequest(
                tenant_id=device.tenant_id, idempotency_key=key, key_scope=device_scope(device.device_id),
                reason=reason), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            refusal, error = ledger_refusal(exc, service="ledger")
            raise error or FailedPrecondition(exc.details() or "the ledger refused the reversal",
                                              reason=refusal) from None
        log.info("payment reversed", device_id=device.device_id,
                 outcome=lpb.ReversalOutcome.Name(answer.outcome), reason=reason)
        return pb.ReversalResult(idempotency_key=key, outcome=_REVERSAL_OUTCOMES[answer.outcome],
                                 refund_transfer_id=answer.refund.transfer_id if answer.HasField("refund") else "")

    async def _pay(self, device: DeviceContext, msg: pb.Authorize) -> pb.AuthorizeResult:
        if not 1 <= msg.amount_fen <= MAX_AMOUNT_FEN:
            raise InvalidArgument("amount_fen must be 1..100,000,000", reason="AMOUNT_INVALID")
        key = _check_key(msg.idempotency_key)
        if not device.merchant_account_id:
            raise FailedPrecondition("this device books to no merchant", reason="DEVICE_HAS_NO_MERCHANT")
        try:
            member, _method, code_ref = await self._resolve(device, msg.presentation, pb.PURPOSE_PAY, key)
        except Refused as refused:
            return pb.AuthorizeResult(request_id=msg.request_id, approved=False, reason=refused.reason,
                                      member_id=refused.member_id)
        if member.refusal():
            return pb.AuthorizeResult(request_id=msg.request_id, approved=False, reason=member.refusal(),
                                      member_id=member.member_id)
        request = ppb.PayRequest(
            tenant_id=device.tenant_id, idempotency_key=key, key_scope=device_scope(device.device_id),
            external_ref=msg.external_ref, code=code_ref,
            request=ppb.PaymentRequest(
                member_id=member.member_id, member_groups=member.groups,
                scene=device.scene_tags[0] if device.scene_tags else "", merchant_id=device.merchant_account_id,
                device_id=device.device_id, amount_fen=msg.amount_fen,
                # The hub's clock decides the meal period and which day's caps apply, never the
                # device's: a till set to yesterday's lunch must not pay under yesterday's limits.
                time=timestamp_pb(self._now()),
                channel="online", pin_verified=msg.pin_verified))
        try:
            answer = await self._payments.call(request)
        except grpc.aio.AioRpcError as exc:
            reason, error = ledger_refusal(exc, service="policy")
            if error is not None:
                raise error from None
            return pb.AuthorizeResult(request_id=msg.request_id, approved=False, reason=reason,
                                      member_id=member.member_id)
        plan = answer.plan
        result = pb.AuthorizeResult(
            request_id=msg.request_id, approved=answer.paid,
            reason=answer.reason or ("APPROVED" if answer.paid else ""),
            member_id=member.member_id, transfer_id=answer.transfer.transfer_id if answer.paid else "",
            repeated=answer.repeated)
        if answer.HasField("plan"):
            result.charged_fen = plan.charged_fen if answer.paid else 0
            result.discount_fen = plan.discount_fen if answer.paid else 0
            result.benefit = plan.benefit if answer.paid else ""
            legs = {leg.account_id: leg for leg in plan.legs}
            result.balances.extend(pb.PurseBalance(purse_kind=purse_name(legs[b.account_id].purse_kind),
                                                   ref=legs[b.account_id].ref, available_fen=b.available_fen)
                                   for b in answer.balances if b.account_id in legs)
        elif answer.paid:
            result.charged_fen = answer.transfer.amount_fen
        if answer.paid and not answer.repeated and device.location:
            self._served.append(ServedRow(tenant_id=uuid.UUID(device.tenant_id),
                                          transfer_id=answer.transfer.transfer_id, location=device.location,
                                          device_id=uuid.UUID(device.device_id), event_time=now_utc()))
            if len(self._served) >= SERVED_FLUSH_ROWS:
                self._served_wake.set()
        return result

    async def _pay_many(self, payments: list[ppb.PayRequest]) -> list[ppb.PayResponse | grpc.aio.AioRpcError]:
        answer = await self._policy.PayMany(ppb.PayManyRequest(payments=payments), timeout=self._timeout_s)
        return [item_refusal(r.error) if r.HasField("error") else r.paid for r in answer.results]

    async def _pass(self, device: DeviceContext, msg: pb.Authorize) -> pb.AuthorizeResult:
        nonce = msg.nonce or msg.request_id
        if not nonce:
            raise InvalidArgument("a pass needs a nonce", reason="NONCE_REQUIRED")
        method = {"code": pb.METHOD_CODE, "card_uid": pb.METHOD_CARD, "face_enrolment_ref": pb.METHOD_FACE}.get(
            msg.presentation.WhichOneof("credential") or "", pb.METHOD_UNSPECIFIED)
        member: MemberInfo | None = None
        refusal = ""
        try:
            member, method, _code = await self._resolve(device, msg.presentation, msg.purpose, nonce)
            refusal = member.refusal()
        except Refused as refused:
            refusal = refused.reason
            if refused.member_id:
                member = MemberInfo(tenant_id=device.tenant_id, member_id=refused.member_id, status="", groups={})
        return await self.access.decide(device, msg, member=member, refusal=refusal, method=method)

    # --- uploads, cabinets ---------------------------------------------------------------------

    async def upload(self, device: DeviceContext, msg: pb.Upload) -> pb.UploadResult:
        return await self.settlement.upload(device, msg)

    async def last_settled_sequence(self, tenant_id: str, device_id: str) -> int:
        return await self.settlement.last_settled_sequence(tenant_id, device_id)

    async def last_settled_sequences(self, tenant_id: str, device_ids: list[str]) -> dict[str, int]:
        return await self.settlement.last_settled_sequences(tenant_id, device_ids)

    async def cabinet_order(self, device: DeviceContext, msg: pb.CabinetOrder) -> pb.CabinetResult:
        return await self.cabinets.order(device, msg)

    async def cabinet_dispensed(self, device: DeviceContext, msg: pb.CabinetDispensed) -> pb.CabinetResult:
        return await self.cabinets.dispensed(device, msg)

    # --- admin ---------------------------------------------------------------------------------

    async def current_access_rules(self, tenant_id: str) -> tuple[int, str]:
        return await self.access.current_access_rules(tenant_id)

    async def set_access_rules(self, request: pb.SetAccessRulesRequest) -> pb.SetAccessRulesResponse:
        return await self.access.set_access_rules(request)

    async def get_access_rules(self, request: pb.GetAccessRulesRequest) -> pb.GetAccessRulesResponse:
        return await self.access.get_access_rules(request)

    async def list_access_records(self, request: pb.ListAccessRecordsRequest) -> pb.ListAccessRecordsResponse:
        return await self.access.list_access_records(request)

    async def get_dining_index(self, request: pb.GetDiningIndexRequest) -> pb.GetDiningIndexResponse:
        tenant_id = parse_tenant(request.tenant_id)
        if not 0 <= request.window_s <= MAX_DINING_WINDOW_S:
            raise InvalidArgument("window_s must be 0..86400", reason="WINDOW_INVALID")
        window_s = request.window_s or DEFAULT_DINING_WINDOW_S
        await self._flush_served()
        now = now_utc()
        rows = await self._store.dining(tenant_id=tenant_id, since=now - timedelta(seconds=window_s),
                                        until=now + timedelta(seconds=1))
        return pb.GetDiningIndexResponse(
            locations=[pb.DiningLocation(location=r.location, served=r.served, capacity=r.capacity,
                                         load=r.served / r.capacity if r.capacity else 0.0,
                                         devices_online=r.devices_online) for r in rows],
            as_of=timestamp_pb(now), window_s=window_s)

    # --- the dining index rows ------------------------------------------------------------------

    async def _flush_served(self) -> None:
        rows, self._served = self._served, []
        if rows:
            await self._store.insert_served(rows)

    async def _write_served_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SERVED_FLUSH_S):
                    await self._served_wake.wait()
            self._served_wake.clear()
            try:
                await self._flush_served()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an approximate index; the rows are dropped
                log.warning("dining index rows not written", error=type(exc).__name__)

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self._store.prune_served(before=now_utc() - SERVED_KEEP)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - tried again later
                log.warning("dining index prune failed", error=type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY_S)


def _code_key(tenant_id: str, code: str) -> bytes:
    return hashlib.blake2b(f"{tenant_id}\x00{code}".encode(), digest_size=16).digest()

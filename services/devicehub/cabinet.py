"""The vending cabinet: it orders through its POS, which holds the money, and the hold is captured
when the cabinet dispensed or voided when it could not (the member's balance is then what it was).

``cabinet_order`` (from the POS's stream): the cabinet must be the POS's (its parent), the member
is found as for a payment, policy plans it (Evaluate: scene "vending" or the cabinet's first scene
tag, merchant = the POS's), and each plan leg is held in the ledger (CreateHold, keyed by the
order). ``cabinet_dispensed``: CaptureHold or VoidHold each hold. Both are idempotent by order id
(per POS): a repeat answers the stage the order reached. The plan's guards and benefits are not
applied to holds (the ledger's holds take neither); a plan with a benefit is declined here.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import grpc

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2 as ppb
from onecard.policy.v1 import policy_pb2_grpc
from runtime.idempotency import device_scope
from runtime.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from runtime.wire import timestamp_pb
from services.devicehub.context import DeviceContext
from services.devicehub.members import MemberInfo, Refused
from services.devicehub.registry import DeviceKind, DeviceStatus
from services.devicehub.settlement import MAX_AMOUNT_FEN, ledger_refusal, now_utc, purse_name
from services.devicehub.store import DevicehubStore
from services.devicehub.tx_store import CabinetOrderRow, TxStore

DEFAULT_SCENE = "vending"
MAX_ORDER_ID_CHARS = 128
MAX_ITEM_CHARS = 128
_STAGES = {"held": pb.CABINET_STAGE_HELD, "captured": pb.CABINET_STAGE_CAPTURED, "voided": pb.CABINET_STAGE_VOIDED,
           "declined": pb.CABINET_STAGE_DECLINED}

# (device, presentation, purpose, request key) -> (member, method, code ref or None); raises Refused.
Resolve = Callable[[DeviceContext, pb.Presentation, int, str], Awaitable[tuple[MemberInfo, int, Any]]]


def _printable(value: str, *, what: str, max_chars: int, reason: str) -> str:
    if not 1 <= len(value) <= max_chars or not value.isascii() or not value.isprintable():
        raise InvalidArgument(f"{what} must be 1..{max_chars} printable ASCII characters", reason=reason)
    return value


def result_pb(order: CabinetOrderRow) -> pb.CabinetResult:
    return pb.CabinetResult(order_id=order.order_id, stage=_STAGES[order.stage], reason=order.reason,
                            member_id=order.member_id, amount_fen=order.charged_fen,
                            balances=[pb.PurseBalance(purse_kind=b["purse_kind"], ref=b["ref"],
                                                      available_fen=b["available_fen"]) for b in order.balances])


def _balances(holds: list[dict[str, Any]], balances: Any) -> list[dict[str, Any]]:
    """The held purses' balances as a ledger answer gives them."""
    by_account = {h["account_id"]: h for h in holds}
    return [{"purse_kind": by_account[b.account_id]["purse_kind"], "ref": by_account[b.account_id]["ref"],
             "available_fen": b.available_fen} for b in balances if b.account_id in by_account]


class Cabinets:
    def __init__(self, *, store: TxStore, devices: DevicehubStore, policy: policy_pb2_grpc.PolicyServiceStub,
                 ledger: ledger_pb2_grpc.LedgerServiceStub, resolve: Resolve, timeout_s: float,
                 now: Callable[[], datetime] = now_utc):
        self._now = now
        self._store = store
        self._devices = devices
        self._policy = policy
        self._ledger = ledger
        self._resolve = resolve
        self._timeout_s = timeout_s

    async def order(self, device: DeviceContext, msg: pb.CabinetOrder) -> pb.CabinetResult:
        order_id = _printable(msg.order_id, what="order_id", max_chars=MAX_ORDER_ID_CHARS, reason="ORDER_ID_INVALID")
        if not 1 <= msg.amount_fen <= MAX_AMOUNT_FEN:
            raise InvalidArgument("amount_fen must be 1..100,000,000", reason="AMOUNT_INVALID")
        if len(msg.item) > MAX_ITEM_CHARS:
            raise InvalidArgument(f"item is longer than {MAX_ITEM_CHARS} characters", reason="ITEM_INVALID")
        if device.kind != pb.DEVICE_KIND_POS:
            raise PermissionDenied("only a POS orders for a cabinet", reason="NOT_A_POS")
        if not device.merchant_account_id:
            raise FailedPrecondition("this POS books to no merchant", reason="DEVICE_HAS_NO_MERCHANT")
        tenant_id, pos_id = uuid.UUID(device.tenant_id), uuid.UUID(device.device_id)
        try:
            cabinet_id = uuid.UUID(msg.cabinet_device_id)
        except ValueError:
            raise InvalidArgument("cabinet_device_id must be a UUID", reason="CABINET_INVALID") from None
        request_sha256 = hashlib.sha256(msg.SerializeToString(deterministic=True)).digest()
        existing = await self._store.cabinet_order(tenant_id=tenant_id, pos_device_id=pos_id, order_id=order_id)
        if existing is not None:
            if existing.request_sha256 != request_sha256:
                raise Conflict("this order id was used for another order", reason="ORDER_ID_REUSED")
            return result_pb(existing)
        cabinet = await self._devices.device(tenant_id=tenant_id, device_id=cabinet_id)
        if cabinet is None or cabinet.kind is not DeviceKind.CABINET or cabinet.parent_device_id != pos_id:
            raise PermissionDenied("that cabinet is not this POS's", reason="NOT_CABINET_PARENT")
        if cabinet.status is not DeviceStatus.ACTIVE:
            raise PermissionDenied("that cabinet is not active", reason="CABINET_INACTIVE")

        def declined(reason: str, member_id: str = "") -> CabinetOrderRow:
            return CabinetOrderRow(tenant_id=tenant_id, pos_device_id=pos_id, order_id=order_id,
                                   cabinet_device_id=cabinet_id, request_sha256=request_sha256, member_id=member_id,
                                   amount_fen=msg.amount_fen, charged_fen=0, item=msg.item, stage="declined",
                                   reason=reason)

        try:
            member, _method, code = await self._resolve(device, msg.presentation, pb.PURPOSE_PAY,
                                                        f"cab:{order_id}")
        except Refused as refused:
            return result_pb(await self._store.insert_cabinet_order(declined(refused.reason, refused.member_id),
                                                                    now=now_utc()))
        if member.refusal():
            return result_pb(await self._store.insert_cabinet_order(declined(member.refusal(), member.member_id),
                                                                    now=now_utc()))
        plan = await self._plan(device, member, msg, scene=cabinet.scene_tags[0] if cabinet.scene_tags else
                                DEFAULT_SCENE)
        reason = plan.reason if not plan.approved else (
            "PIN_REQUIRED" if plan.pin_required else "BENEFIT_NOT_HELD" if plan.benefit_funding_fen else "")
        if reason:
            return result_pb(await self._store.insert_cabinet_order(declined(reason, member.member_id),
                                                                    now=now_utc()))
        holds, balances, refusal = await self._hold(device, order_id, plan, code)
        if refusal:
            return result_pb(await self._store.insert_cabinet_order(declined(refusal, member.member_id),
                                                                    now=now_utc()))
        return result_pb(await self._store.insert_cabinet_order(CabinetOrderRow(
            tenant_id=tenant_id, pos_device_id=pos_id, order_id=order_id, cabinet_device_id=cabinet_id,
            request_sha256=request_sha256, member_id=member.member_id, amount_fen=msg.amount_fen,
            charged_fen=plan.charged_fen, item=msg.item, stage="held", reason="HELD", holds=holds,
            balances=balances), now=now_utc()))

    async def _plan(self, device: DeviceContext, member: MemberInfo, msg: pb.CabinetOrder, *, scene: str) -> ppb.Plan:
        try:
            request = ppb.PaymentRequest(
                member_id=member.member_id, member_groups=member.groups, scene=scene,
                merchant_id=device.merchant_account_id, device_id=msg.cabinet_device_id, amount_fen=msg.amount_fen,
                time=timestamp_pb(self._now()), channel="online")
            answer = await self._policy.Evaluate(ppb.EvaluateRequest(tenant_id=device.tenant_id, request=request),
                                                 timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            reason, error = ledger_refusal(exc, service="policy")
            if error is not None:
                raise error from None
            return ppb.Plan(approved=False, reason=reason)
        return answer.plan

    async def _hold(self, device: DeviceContext, order_id: str, plan: ppb.Plan,
                    code: lpb.CodeRef | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        """Hold each leg; if one is refused, void those held and answer the refusal."""
        holds: list[dict[str, Any]] = []
        balances: list[dict[str, Any]] = []
        for i, leg in enumerate(plan.legs):
            try:
                answer = await self._ledger.CreateHold(lpb.CreateHoldRequest(
                    tenant_id=device.tenant_id, idempotency_key=f"cab:{device.device_id}:{order_id}:{i}",
                    key_scope=device_scope(device.device_id),
                    account_id=leg.account_id, merchant_account_id=device.merchant_account_id,
                    amount_fen=leg.amount_fen, device_id=device.device_id, external_ref=order_id,
                    code=code if i == 0 else None), timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                reason, error = ledger_refusal(exc, service="ledger")
                await self._settle(device, order_id, holds, capture=False)
                if error is not None:
                    raise error from None
                return [], [], reason
            holds.append({"hold_id": answer.hold.hold_id, "account_id": leg.account_id,
                          "purse_kind": purse_name(leg.purse_kind), "ref": leg.ref, "amount_fen": leg.amount_fen})
            balances = _merge(balances, _balances(holds, answer.balances))
        return holds, balances, ""

    async def _settle(self, device: DeviceContext, order_id: str, holds: list[dict[str, Any]], *,
                      capture: bool) -> tuple[list[dict[str, Any]], str]:
        """Capture or void every hold; answers the purses' balances and a reason if a hold had
        already been settled otherwise (expired)."""
        balances: list[dict[str, Any]] = []
        problem = ""
        for i, hold in enumerate(holds):
            key = f"cab:{device.device_id}:{order_id}:{i}:{'capture' if capture else 'void'}"
            try:
                if capture:
                    answer = await self._ledger.CaptureHold(lpb.CaptureHoldRequest(
                        tenant_id=device.tenant_id, idempotency_key=key, key_scope=device_scope(device.device_id),
                        hold_id=hold["hold_id"]), timeout=self._timeout_s)
                else:
                    answer = await self._ledger.VoidHold(lpb.VoidHoldRequest(
                        tenant_id=device.tenant_id, idempotency_key=key, key_scope=device_scope(device.device_id),
                        hold_id=hold["hold_id"]), timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                reason, error = ledger_refusal(exc, service="ledger")
                if error is not None:
                    raise error from None
                problem = problem or reason
                continue
            balances = _merge(balances, _balances(holds, answer.balances))
        return balances, problem

    async def dispensed(self, device: DeviceContext, msg: pb.CabinetDispensed) -> pb.CabinetResult:
        order_id = _printable(msg.order_id, what="order_id", max_chars=MAX_ORDER_ID_CHARS, reason="ORDER_ID_INVALID")
        tenant_id, pos_id = uuid.UUID(device.tenant_id), uuid.UUID(device.device_id)
        order = await self._store.cabinet_order(tenant_id=tenant_id, pos_device_id=pos_id, order_id=order_id)
        if order is None:
            raise NotFound(f"no order {order_id} of this POS", reason="UNKNOWN_ORDER")
        if order.stage != "held":
            return result_pb(order)
        balances, problem = await self._settle(device, order_id, order.holds, capture=msg.dispensed)
        if msg.dispensed and problem:
            # The hold expired before the cabinet reported: the money went back; nothing was paid.
            stage, reason = "voided", problem
        else:
            stage, reason = ("captured", "CAPTURED") if msg.dispensed else ("voided", "VOIDED")
        settled = await self._store.settle_cabinet_order(tenant_id=tenant_id, pos_device_id=pos_id,
                                                         order_id=order_id, stage=stage, reason=reason,
                                                         balances=balances or order.balances, now=now_utc())
        return result_pb(settled)


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Balances by purse, the later answer winning."""
    merged = {(b["purse_kind"], b["ref"]): b for b in old}
    merged.update({(b["purse_kind"], b["ref"]): b for b in new})
    return list(merged.values())

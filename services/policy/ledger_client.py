"""What policy asks the ledger: a member's purses and the usage counters a plan depends on, over
gRPC. The ledger's refusals become policy's."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.errors import InvalidArgument, Unavailable
from runtime.grpc_client import error_info, open_channel
from services.policy.domain import MemberPurse

_KIND_NAMES = {
    ledger_pb2.PURSE_KIND_CASH: "cash",
    ledger_pb2.PURSE_KIND_SUBSIDY: "subsidy",
    ledger_pb2.PURSE_KIND_VOUCHER: "voucher",
}
PURSE_KINDS = {name: kind for kind, name in _KIND_NAMES.items()}

# GetUsageCounters answers at most this many keys per call.
MAX_COUNTER_KEYS_PER_CALL = 100


class LedgerClient:
    """Holds the ledger channel for the life of the process (``hold`` runs as a background task)."""

    def __init__(self, *, target: str, timeout_s: float):
        self._target = target
        self._timeout_s = timeout_s
        self._stub: ledger_pb2_grpc.LedgerServiceStub | None = None

    async def hold(self) -> None:
        """Open the channel, keep it until cancelled, then close it: one place for both."""
        channel = open_channel(self._target)
        self._stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        try:
            await asyncio.Event().wait()
        finally:
            self._stub = None
            await channel.close()

    def _ready(self) -> ledger_pb2_grpc.LedgerServiceStub:
        if self._stub is None:
            raise Unavailable("policy is starting: ledger not connected yet", reason="STARTING")
        return self._stub

    @staticmethod
    def _refused(exc: grpc.aio.AioRpcError) -> Exception:
        reason, _ = error_info(exc)
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(exc.details() or "the ledger refused the request",
                                   reason=reason or "INVALID_ARGUMENT")
        return Unavailable("the ledger did not answer; retry later", reason="LEDGER_UNAVAILABLE")

    async def member_purses(self, *, tenant_id: uuid.UUID, member_id: str) -> list[MemberPurse]:
        """Every purse of the member (cash, subsidy, voucher, receivable) with what it may spend now."""
        stub = self._ready()
        try:
            answer = await stub.GetBalances(
                ledger_pb2.GetBalancesRequest(tenant_id=str(tenant_id), owner_kind=ledger_pb2.OWNER_KIND_MEMBER,
                                              owner_id=member_id),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise self._refused(exc) from None
        return [
            MemberPurse(
                kind=_KIND_NAMES.get(a.account.purse_kind, ledger_pb2.PurseKind.Name(a.account.purse_kind)),
                ref=a.account.ref,
                account_id=a.account.account_id,
                available_fen=a.balance.available_fen,
                usable=a.account.status == ledger_pb2.ACCOUNT_STATUS_OPEN,
            )
            for a in answer.accounts
        ]

    async def usage_counters(self, *, tenant_id: uuid.UUID, counter_keys: list[str]) -> dict[str, int]:
        """The counters' values now (0 for one never raised)."""
        if not counter_keys:
            return {}
        stub = self._ready()
        unique = list(dict.fromkeys(counter_keys))
        chunks = [unique[i:i + MAX_COUNTER_KEYS_PER_CALL] for i in range(0, len(unique), MAX_COUNTER_KEYS_PER_CALL)]
        try:
            answers = await asyncio.gather(*(
                stub.GetUsageCounters(ledger_pb2.GetUsageCountersRequest(tenant_id=str(tenant_id), counter_keys=chunk),
                                      timeout=self._timeout_s)
                for chunk in chunks
            ))
        except grpc.aio.AioRpcError as exc:
            raise self._refused(exc) from None
        return {c.counter_key: c.value for answer in answers for c in answer.counters}

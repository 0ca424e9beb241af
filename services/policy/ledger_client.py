"""What policy asks the ledger: a member's purses and the usage counters a plan depends on, over
gRPC. The ledger's refusals become policy's."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.batching import CallBatcher, item_refusal
from runtime.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from runtime.grpc_client import error_info, open_channel
from runtime.mesh import MeshTLS
from services.policy.domain import MemberPurse

_KIND_NAMES = {
    ledger_pb2.PURSE_KIND_CASH: "cash",
    ledger_pb2.PURSE_KIND_SUBSIDY: "subsidy",
    ledger_pb2.PURSE_KIND_VOUCHER: "voucher",
}
PURSE_KINDS = {name: kind for kind, name in _KIND_NAMES.items()}

# GetUsageCounters answers at most this many keys per call.
MAX_COUNTER_KEYS_PER_CALL = 100
# Member-state reads in flight to the ledger at once, and questions per read. One reader makes
# the biggest batches: measured, it serves more evaluations per second than two or four, because
# each outgoing gRPC call costs more than the questions it carries.
STATE_READERS = 1
MAX_STATES_PER_CALL = 200
# The ref of the tenant's subsidy funding account that pays identity-only benefits.
BENEFIT_FUNDING_REF = "benefits"


class LedgerClient:
    """Holds the ledger channel for the life of the process (``hold`` runs as a background task)."""

    def __init__(self, *, target: str, timeout_s: float):
        self._target = target
        self._timeout_s = timeout_s
        self._stub: ledger_pb2_grpc.LedgerServiceStub | None = None
        self._benefit_accounts: dict[uuid.UUID, str] = {}
        # Evaluations and payments that arrive together share one ledger call each
        # (runtime.batching): GetMemberStates for the reads, PayMany for the bookings.
        self._states: CallBatcher[ledger_pb2.GetMemberStateRequest, ledger_pb2.GetMemberStateResponse] = CallBatcher(
            self._member_states, max_items=MAX_STATES_PER_CALL, senders=STATE_READERS)
        self._payments: CallBatcher[ledger_pb2.PayRequest, ledger_pb2.PayResponse] = CallBatcher(self._pay_many)

    async def hold(self, *, tls: MeshTLS | None) -> None:
        """Open the channel, keep it until cancelled, then close it: one place for both."""
        channel = open_channel(self._target, tls=tls, server_name="ledger")
        self._stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        try:
            await asyncio.Event().wait()
        finally:
            self._stub = None
            self._states.close()
            self._payments.close()
            await channel.close()

    async def _member_states(self, batch: list[ledger_pb2.GetMemberStateRequest]
                             ) -> list[ledger_pb2.GetMemberStateResponse | grpc.aio.AioRpcError]:
        stub = self._ready()
        try:
            answer = await stub.GetMemberStates(ledger_pb2.GetMemberStatesRequest(requests=batch),
                                                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or len(batch) == 1:
                raise
            # One question is wrong: ask each alone, so only its asker hears of it.
            return list(await asyncio.gather(*(self._member_state_alone(stub, request) for request in batch)))
        return list(answer.responses)

    async def _member_state_alone(self, stub: ledger_pb2_grpc.LedgerServiceStub,
                                  request: ledger_pb2.GetMemberStateRequest
                                  ) -> ledger_pb2.GetMemberStateResponse | grpc.aio.AioRpcError:
        try:
            return await stub.GetMemberState(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc

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

    async def member_state(self, *, tenant_id: uuid.UUID, member_id: str, counter_keys: list[str],
                           idempotency_key: str = "", key_scope: str = ""
                           ) -> tuple[list[MemberPurse], dict[str, int], str]:
        """Every purse of the member (cash, subsidy, voucher, receivable) with what it may spend
        now, the counters' values (0 for one never raised), and the transfer already booked under
        ``idempotency_key`` in ``key_scope`` (empty if none): one ledger call, one read."""
        self._ready()
        unique = list(dict.fromkeys(counter_keys))
        first, rest = unique[:MAX_COUNTER_KEYS_PER_CALL], unique[MAX_COUNTER_KEYS_PER_CALL:]
        try:
            answer = await self._states.call(ledger_pb2.GetMemberStateRequest(
                tenant_id=str(tenant_id), member_id=member_id, counter_keys=first, idempotency_key=idempotency_key,
                key_scope=key_scope))
        except grpc.aio.AioRpcError as exc:
            raise self._refused(exc) from None
        purses = [
            MemberPurse(
                kind=_KIND_NAMES.get(a.account.purse_kind, ledger_pb2.PurseKind.Name(a.account.purse_kind)),
                ref=a.account.ref,
                account_id=a.account.account_id,
                available_fen=a.balance.available_fen,
                usable=a.account.status == ledger_pb2.ACCOUNT_STATUS_OPEN,
            )
            for a in answer.accounts
        ]
        counters = {c.counter_key: c.value for c in answer.counters}
        if rest:
            counters.update(await self.usage_counters(tenant_id=tenant_id, counter_keys=rest))
        return purses, counters, answer.existing_transfer_id

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

    async def benefit_account(self, *, tenant_id: uuid.UUID) -> str:
        """The tenant's account that pays identity-only benefits (a free breakfast): its subsidy
        funding account with ref "benefits", opened on first need (OpenAccount is idempotent)."""
        cached = self._benefit_accounts.get(tenant_id)
        if cached is not None:
            return cached
        stub = self._ready()
        try:
            answer = await stub.OpenAccount(ledger_pb2.OpenAccountRequest(
                tenant_id=str(tenant_id), owner_kind=ledger_pb2.OWNER_KIND_TENANT, owner_id=str(tenant_id),
                purse_kind=ledger_pb2.PURSE_KIND_SUBSIDY_FUNDING, ref=BENEFIT_FUNDING_REF), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._refused(exc) from None
        self._benefit_accounts[tenant_id] = answer.account.account.account_id
        return answer.account.account.account_id

    async def pay(self, request: ledger_pb2.PayRequest) -> ledger_pb2.PayResponse:
        """One payment, sent with the others waiting in one LedgerService.PayMany
        (runtime.batching); its refusals come back as the same typed errors (reason kept)."""
        self._ready()
        try:
            return await self._payments.call(request)
        except grpc.aio.AioRpcError as exc:
            raise _passed_on(exc) from None

    async def _pay_many(self, payments: list[ledger_pb2.PayRequest]
                        ) -> list[ledger_pb2.PayResponse | grpc.aio.AioRpcError]:
        answer = await self._ready().PayMany(ledger_pb2.PayManyRequest(payments=payments), timeout=self._timeout_s)
        return [item_refusal(r.error) if r.HasField("error") else r.paid for r in answer.results]

    async def lookup(self, *, tenant_id: uuid.UUID, idempotency_key: str, key_scope: str
                     ) -> ledger_pb2.LookupTransferResponse:
        """What the key booked in its scope (``found`` false: nothing), with the fingerprint it names."""
        stub = self._ready()
        try:
            return await stub.LookupTransfer(ledger_pb2.LookupTransferRequest(
                tenant_id=str(tenant_id), idempotency_key=idempotency_key, key_scope=key_scope),
                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._refused(exc) from None


# The ledger's refusals of a payment, passed on to policy's caller with their reason.
_PASSED_ON = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Conflict,
}


def _passed_on(exc: grpc.aio.AioRpcError) -> Exception:
    reason, metadata = error_info(exc)
    kind = _PASSED_ON.get(exc.code())
    if kind is None:
        return Unavailable("the ledger did not answer; retry later", reason="LEDGER_UNAVAILABLE")
    return kind(exc.details() or "the ledger refused the payment", reason=reason or exc.code().name,
                metadata=dict(metadata))

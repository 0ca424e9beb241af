"""The ledger's operations: each write in one transaction, in the store's lock order, with the
domain deciding and the store booking. No SQL and no protobuf here.

Every write runs under its idempotency key: the key is claimed first, so a concurrent repeat
waits for the first and then answers its result; the result (transfer id and the balances then)
is saved in the same transaction as the transfer.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, replace
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from runtime.errors import Conflict, DomainError, FailedPrecondition, InvalidArgument, NotFound
from runtime.events import PendingEvent, outbox_rows
from runtime.idempotency import split_key
from runtime.logs import get_logger
from services.ledger import domain
from services.ledger.domain import (
    MEMBER_PURSES,
    Account,
    AccountBalance,
    AccountStatus,
    CodeRef,
    Balance,
    GrantBatch,
    GrantBatchStatus,
    GrantRow,
    GrantRowResult,
    GrantRowStatus,
    Guard,
    Hold,
    HoldStatus,
    OwnerKind,
    NewTransfer,
    OfflineOutcome,
    OfflineRecord,
    OfflineResult,
    PayCommand,
    PayLeg,
    Posting,
    Program,
    ProgramStatus,
    PurseKind,
    ReconciliationLine,
    ReconciliationTotals,
    Reversal,
    ReversalOutcome,
    StatementTotals,
    Transfer,
    TransferKind,
    TrialBalance,
    WriteResult,
)
from services.ledger.store import CODE_INDEX, LedgerStore, PaymentReads, TenantTx, account_data, event_data

log = get_logger(__name__)
_T = TypeVar("_T")

SUBJECT_TRANSFER_POSTED = "ledger.transfer.posted"
SUBJECT_HOLD = {
    HoldStatus.PENDING: "ledger.hold.created",
    HoldStatus.CAPTURED: "ledger.hold.captured",
    HoldStatus.VOIDED: "ledger.hold.voided",
    HoldStatus.EXPIRED: "ledger.hold.expired",
}
SUBJECT_FROZEN = "ledger.account.frozen"
SUBJECT_UNFROZEN = "ledger.account.unfrozen"
SUBJECT_SHORTFALL = "ledger.offline.shortfall"
SUBJECT_REVERSED = "ledger.payment.reversed"
SUBJECT_BATCH_FINISHED = "ledger.grant_batch.finished"
SUBJECT_PROGRAM_ENDED = "ledger.program.ended"
SUBJECT_BALANCE_LOW = "ledger.balance.low"
_MERCHANT = frozenset({PurseKind.MERCHANT_SETTLEMENT})
_FUNDING = frozenset({PurseKind.SUBSIDY_FUNDING})
# A transaction PostgreSQL chose as a deadlock victim (or a serialization failure) is retried
# whole: everything it did rolled back, so running it again is safe.
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_RETRIES = 3


def _posted_event(transfer: Transfer, *, applied_guards: Sequence[tuple[Guard, int]] = (),
                  extra: dict[str, Any] | None = None) -> PendingEvent:
    # A guarded payment says which counters it raised and to what, so a consumer (reports,
    # policy) need not ask GetUsageCounters; other transfers keep their data as it was.
    extra = dict(extra or {})
    if applied_guards:
        extra["guards"] = [{"counter_key": g.counter_key, "increment": g.increment, "limit": g.limit,
                            "value_after": value_after} for g, value_after in applied_guards]
    return PendingEvent(subject=SUBJECT_TRANSFER_POSTED, event_type=SUBJECT_TRANSFER_POSTED,
                        tenant_id=str(transfer.tenant_id), data=event_data(transfer, **extra))


def _low_balance_events(crossings: Sequence[domain.LowBalance]) -> list[PendingEvent]:
    return [PendingEvent(subject=SUBJECT_BALANCE_LOW, event_type=SUBJECT_BALANCE_LOW,
                         tenant_id=str(c.account.tenant_id),
                         data={"tenant_id": str(c.account.tenant_id), "member_id": c.account.owner_id,
                               "account_id": str(c.account.account_id), "purse_kind": c.account.purse_kind.value,
                               "balance_fen": c.balance_fen, "threshold_fen": c.threshold_fen,
                               "transfer_id": str(c.transfer_id)})
            for c in crossings]


def _reversal_event(tenant_id: uuid.UUID, *, key: str, outcome: ReversalOutcome) -> PendingEvent:
    scope, client_key = split_key(key)
    return PendingEvent(subject=SUBJECT_REVERSED, event_type="payment.reversed", tenant_id=str(tenant_id),
                        data={"idempotency_key": client_key, "key_scope": scope, "outcome": outcome.value})


def _hold_event(transfer: Transfer, hold: Hold) -> PendingEvent:
    subject = SUBJECT_HOLD[hold.status]
    return PendingEvent(subject=subject, event_type=subject, tenant_id=str(transfer.tenant_id),
                        data=event_data(transfer, hold_id=str(hold.hold_id), hold_status=hold.status.value,
                                        account_id=str(hold.account_id), hold_amount_fen=hold.amount_fen,
                                        expires_at=hold.expires_at.isoformat()))


def _sharded(accounts: dict[uuid.UUID, AccountBalance]) -> set[uuid.UUID]:
    return {a for a, ab in accounts.items() if ab.account.sharded}


@dataclass(frozen=True)
class MemberStateQuestion:
    tenant_id: uuid.UUID
    member_id: str
    counter_keys: list[str]
    idempotency_key: str = ""


@dataclass(frozen=True)
class MemberState:
    accounts: list[AccountBalance]
    counters: list[tuple[str, int]]
    existing: uuid.UUID | None


@dataclass(frozen=True)
class PayOutcome:
    """A payment's answer: its result (the first one, for a repeat), and its transfer when this
    call booked it (a repeat's transfer is read again)."""

    result: WriteResult
    transfer: Transfer | None


class Ledger:
    def __init__(self, store: LedgerStore, *, batch_started: asyncio.Event | None = None):
        self._store = store
        # Set when a grant batch starts, so the background worker begins at once.
        self.batch_started = batch_started or asyncio.Event()

    async def _idempotent(self, *, tenant_id: uuid.UUID, idempotency_key: str, operation: str,
                          request: dict[str, Any], body: Callable[[TenantTx], Awaitable[WriteResult]]) -> WriteResult:
        key = domain.check_stored_key(idempotency_key)
        fingerprint = domain.fingerprint(operation=operation, request=request)
        async with self._store.tenant_tx(tenant_id) as tx:
            seen = await tx.claim_key(idempotency_key=key, operation=operation, fingerprint=fingerprint)
            if seen is not None:
                stored_operation, stored_fingerprint, result = seen
                domain.check_same_request(stored_operation=stored_operation, stored_fingerprint=stored_fingerprint,
                                          operation=operation, request_fingerprint=fingerprint)
                assert result is not None, "a claimed key's result is saved in the claiming transaction"
                return result
            result = await body(tx)
            await tx.save_result(idempotency_key=key, result=result)
            return result

    # --- accounts -----------------------------------------------------------------------------

    async def open_account(self, *, tenant_id: uuid.UUID, owner_kind: OwnerKind | None, owner_id: str,
                           purse_kind: PurseKind | None, ref: str, no_overdraft: bool) -> tuple[AccountBalance, bool]:
        owner, purse, flag = domain.check_new_account(owner_kind=owner_kind, owner_id=owner_id,
                                                      purse_kind=purse_kind, ref=ref, no_overdraft=no_overdraft)
        layout = domain.account_layout(purse_kind=purse, no_overdraft=flag)
        async with self._store.tenant_tx(tenant_id) as tx:
            account, created = await tx.open_account(owner_kind=owner, owner_id=owner_id, purse_kind=purse, ref=ref,
                                                     layout=layout)
            return await tx.account(account.account_id), created

    async def set_credit_limit(self, *, tenant_id: uuid.UUID, account_id: uuid.UUID,
                               credit_limit_fen: int) -> AccountBalance:
        """A clearing account's new floor, checked against what its bank owes on the locked row."""
        async with self._store.tenant_tx(tenant_id) as tx:
            before = await tx.account(account_id, lock=True)
            domain.check_credit_limit(before.account, balance=before.balance, credit_limit_fen=credit_limit_fen)
            await tx.set_credit_limit(account_id, credit_limit_fen=credit_limit_fen)
            return await tx.account(account_id)

    async def set_status(self, *, tenant_id: uuid.UUID, account_id: uuid.UUID,
                         status: AccountStatus) -> AccountBalance:
        """Freeze or unfreeze; an event only when the status really changed."""
        async with self._store.tenant_tx(tenant_id) as tx:
            before = await tx.account(account_id, lock=True)
            domain.check_status_change(before.account, status=status)
            if before.account.status is status:
                return before
            await tx.set_status(account_id, status=status)
            after = await tx.account(account_id)
            subject = SUBJECT_FROZEN if status is AccountStatus.FROZEN else SUBJECT_UNFROZEN
            await tx.emit([PendingEvent(subject=subject, event_type=subject, tenant_id=str(tenant_id),
                                        data=account_data(after.account))])
            return after

    async def balances(self, *, tenant_id: uuid.UUID, account_ids: list[uuid.UUID],
                       owner: tuple[OwnerKind, str] | None) -> list[AccountBalance]:
        async with self._store.tenant_read(tenant_id) as tx:
            if owner is not None:
                return await tx.owner_accounts(owner_kind=owner[0], owner_id=owner[1])
            found = await tx.accounts(account_ids)
            return [found[a] for a in account_ids]

    # --- money --------------------------------------------------------------------------------

    async def top_up(self, *, tenant_id: uuid.UUID, idempotency_key: str, from_account_id: uuid.UUID,
                     to_account_id: uuid.UUID, amount_fen: int, external_ref: str,
                     event_time: datetime | None) -> WriteResult:
        domain.check_amount(amount_fen)
        if from_account_id == to_account_id:
            raise InvalidArgument("a top-up moves money between two accounts", reason="SAME_ACCOUNT")
        request = {"from": str(from_account_id), "to": str(to_account_id), "amount_fen": amount_fen,
                   "external_ref": external_ref, "event_time": event_time}

        async def body(tx: TenantTx) -> WriteResult:
            accounts = await tx.accounts([from_account_id, to_account_id], lock_unsharded=True)
            source, target = accounts[from_account_id], accounts[to_account_id]
            kind = domain.funding_kind(source=source.account, target=target.account)
            domain.check_may_debit(source.account, balance=source.balance, amount_fen=amount_fen)
            domain.check_may_receive(target.account)
            transfer = await tx.post(
                kind=kind, idempotency_key=idempotency_key, amount_fen=amount_fen,
                postings=[Posting(from_account_id, -amount_fen), Posting(to_account_id, amount_fen)],
                sharded=_sharded(accounts), event_time=event_time, external_ref=external_ref,
            )
            await tx.emit([_posted_event(transfer)])
            return WriteResult(transfer_id=transfer.transfer_id,
                               balances=await tx.balances([from_account_id, to_account_id]))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="top_up",
                                      request=request, body=body)

    async def pay(self, *, tenant_id: uuid.UUID, idempotency_key: str, merchant_account_id: uuid.UUID,
                  legs: list[PayLeg], device_id: str, external_ref: str, event_time: datetime | None,
                  guards: tuple[Guard, ...] = (), code: CodeRef | None = None) -> WriteResult:
        """One payment (a batch of one; the service batches concurrent payments, see PayBatcher)."""
        command = domain.check_pay(idempotency_key=idempotency_key, merchant_account_id=merchant_account_id,
                                   legs=legs, device_id=device_id, external_ref=external_ref, event_time=event_time,
                                   guards=guards, code=code)
        [outcome] = await self.pay_batch(tenant_id=tenant_id, commands=[command])
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome.result

    async def pay_batch(self, *, tenant_id: uuid.UUID, commands: list[PayCommand],
                        shard: int | None = None) -> list[PayOutcome | DomainError]:
        """Book many payments of one tenant in one transaction, each decided alone: a payment
        refused (funds, a frozen purse, a guard, a used code) is its own DomainError and writes
        nothing; the others commit together, with one flush for all. The same rules, lock order
        and idempotency as a single payment: keys (claimed in one statement, in key order), then
        the member purses (locked in one statement, in id order), then the guard counters (in key
        order), and last the merchants' shards. Each payment is checked against the balances and
        counters the ones before it in the batch left, so the batch equals the payments one after
        another."""
        outcomes: list[PayOutcome | DomainError | None] = [None] * len(commands)
        fingerprints = [c.key_fingerprint() for c in commands]
        first_of: dict[str, int] = {}
        repeats: dict[int, int] = {}
        for i, command in enumerate(commands):
            if command.idempotency_key in first_of:
                repeats[i] = first_of[command.idempotency_key]
            else:
                first_of[command.idempotency_key] = i
        active = list(first_of.values())
        async with self._store.tenant_tx(tenant_id) as tx:
            reads = await tx.read_for_payments(
                claims=[(commands[i].idempotency_key, "pay", fingerprints[i]) for i in active],
                account_ids=[a for i in active for a in (*(leg.account_id for leg in commands[i].paying),
                                                         commands[i].merchant_account_id)],
                counter_keys=[g.counter_key for i in active for g in commands[i].guards],
                codes=[c for i in active if (c := commands[i].code) is not None],
            )
            for i in active:
                if commands[i].idempotency_key in reads.claimed:
                    continue
                operation, stored, result = reads.seen[commands[i].idempotency_key]
                try:
                    domain.check_same_request(stored_operation=operation, stored_fingerprint=stored, operation="pay",
                                              request_fingerprint=fingerprints[i])
                    assert result is not None, "a claimed key's result is saved in the claiming transaction"
                    outcomes[i] = PayOutcome(result=result, transfer=None)
                except DomainError as error:
                    outcomes[i] = error
            todo = [i for i in active if outcomes[i] is None]
            await self._book_payments(tx, reads=reads, commands=commands, todo=todo, outcomes=outcomes, shard=shard)
        for i, first in repeats.items():
            outcomes[i] = outcomes[first] if fingerprints[i] == fingerprints[first] else Conflict(
                "this idempotency key was used for a different request", reason="IDEMPOTENCY_KEY_REUSED")
        answered = [o for o in outcomes if o is not None]
        assert len(answered) == len(commands), "every payment of the batch is answered"
        return answered

    async def _book_payments(self, tx: TenantTx, *, reads: PaymentReads, commands: list[PayCommand],
                             todo: list[int], outcomes: list[PayOutcome | DomainError | None],
                             shard: int | None) -> None:
        """Decide the claimed payments in Python against what ``read_for_payments`` locked and
        read, filling ``outcomes``, then write everything in one statement (``commit_payments``)."""
        if not todo:
            if reads.created_counters:
                await tx.set_counters({}, unused=reads.created_counters)
            return
        accounts, counters, used_codes, now = reads.accounts, dict(reads.counters), set(reads.used_codes), reads.now
        created = reads.created_counters
        # The state each payment sees: what the payments before it in the batch left.
        posted = {a: ab.balance.posted_fen for a, ab in accounts.items()}
        pending = {a: ab.balance.pending_fen for a, ab in accounts.items()}
        booked: list[tuple[uuid.UUID, NewTransfer]] = []
        events: list[PendingEvent] = []
        results: dict[str, WriteResult] = {}
        guards: list[tuple[uuid.UUID, Guard, int]] = []
        refused: list[str] = []
        # Thresholds came with the locked purse rows: finding a crossing costs no round trip.
        watch = domain.LowBalanceWatch(accounts)
        for i in todo:
            command = commands[i]
            try:
                applied = self._decide_payment(command, accounts=accounts, posted=posted, pending=pending,
                                               counters=counters, used_codes=used_codes)
            except DomainError as error:
                outcomes[i] = error
                refused.append(command.idempotency_key)
                continue
            item = NewTransfer(
                kind=TransferKind.PAYMENT, idempotency_key=command.idempotency_key, amount_fen=command.total_fen,
                postings=(*(Posting(leg.account_id, -leg.amount_fen) for leg in command.paying),
                          Posting(command.merchant_account_id, command.total_fen)),
                event_time=command.event_time, merchant_account_id=command.merchant_account_id,
                device_id=command.device_id, external_ref=command.external_ref, code=command.code,
            )
            transfer_id = uuid.uuid4()
            transfer = Transfer(
                tenant_id=tx.tenant_id, transfer_id=transfer_id, kind=item.kind,
                idempotency_key=item.idempotency_key, amount_fen=item.amount_fen, postings=item.postings,
                event_time=item.event_time or now, booked_at=now, merchant_account_id=item.merchant_account_id,
                device_id=item.device_id, external_ref=item.external_ref, code=item.code,
            )
            touched = [*(leg.account_id for leg in command.paying), command.merchant_account_id]
            result = WriteResult(transfer_id=transfer_id,
                                 balances=tuple(Balance(a, posted[a], pending[a]) for a in touched))
            booked.append((transfer_id, item))
            events.append(_posted_event(transfer, applied_guards=applied))
            events.extend(_low_balance_events(watch.after(transfer)))
            results[command.idempotency_key] = result
            guards.extend((transfer_id, g, after) for g, after in applied)
            outcomes[i] = PayOutcome(result=result, transfer=transfer)
        raised = {g.counter_key: counters[g.counter_key] for _, g, _ in guards}
        await tx.commit_payments(payments=booked, outbox=outbox_rows(events), results=results,
                                 sharded={a for a, ab in accounts.items() if ab.account.sharded},
                                 counters=raised, unused_counters=created - set(raised), guards=guards,
                                 released_keys=refused, shard=shard)

    @staticmethod
    def _decide_payment(command: PayCommand, *, accounts: dict[uuid.UUID, AccountBalance],
                        posted: dict[uuid.UUID, int], pending: dict[uuid.UUID, int], counters: dict[str, int],
                        used_codes: set[CodeRef]) -> list[tuple[Guard, int]]:
        """Check one payment against the running state and, if it holds, apply it to that state:
        the guards applied, each with the counter's value after it."""
        for account_id in [*(leg.account_id for leg in command.paying), command.merchant_account_id]:
            if account_id not in accounts:
                raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND", metadata={"account_id": str(account_id)})
        if command.legs:
            domain.check_one_member([accounts[leg.account_id].account for leg in command.legs])
        if command.sponsor is not None:
            domain.check_purse(accounts[command.sponsor.account_id].account, kinds=_FUNDING, what="sponsor")
        merchant = accounts[command.merchant_account_id].account
        domain.check_purse(merchant, kinds=_MERCHANT, what="merchant_account")
        domain.check_may_receive(merchant)
        for leg in command.paying:
            account = accounts[leg.account_id].account
            domain.check_may_debit(account, balance=Balance(leg.account_id, posted[leg.account_id],
                                                            pending[leg.account_id]), amount_fen=leg.amount_fen)
        for guard in command.guards:
            if counters[guard.counter_key] + guard.increment > guard.limit:
                raise domain.guard_exceeded(guard)
        if command.code is not None and command.code in used_codes:
            raise domain.code_already_used(command.code)
        # Every check held: apply it.
        for leg in command.paying:
            posted[leg.account_id] -= leg.amount_fen
        posted[command.merchant_account_id] += command.total_fen
        applied = []
        for guard in command.guards:
            counters[guard.counter_key] += guard.increment
            applied.append((guard, counters[guard.counter_key]))
        if command.code is not None:
            used_codes.add(command.code)
        return applied

    async def reverse_payment(self, *, tenant_id: uuid.UUID, idempotency_key: str, reason: str) -> Reversal:
        """Undo the payment under the (scoped) key, or close the key if it booked nothing, exactly
        once either way (docs/ledger.md, Reversals)."""
        key = domain.check_stored_key(idempotency_key)
        reason = domain.check_text(reason, what="reason", max_chars=domain.MAX_REVERSAL_REASON_CHARS)
        fingerprint = domain.fingerprint(operation=domain.REVERSAL, request={})
        async with self._store.tenant_tx(tenant_id) as tx:
            seen = await tx.claim_key(idempotency_key=key, operation=domain.REVERSAL, fingerprint=fingerprint)
            if seen is None:
                await tx.emit([_reversal_event(tenant_id, key=key, outcome=ReversalOutcome.PREVENTED)])
                return Reversal(outcome=ReversalOutcome.PREVENTED)
        operation, _stored, result = seen
        if operation == domain.REVERSAL:
            return Reversal(outcome=ReversalOutcome.PREVENTED)
        if operation != "pay" or result is None:
            raise Conflict("this idempotency key names a write that is not a payment", reason="IDEMPOTENCY_KEY_REUSED")
        try:
            refunded = await self.refund(tenant_id=tenant_id, idempotency_key=domain.reversal_refund_key(key),
                                         payment_transfer_id=result.transfer_id, amount_fen=0,
                                         external_ref=f"reversal: {reason}"[:domain.MAX_REF_CHARS],
                                         give_back_guards=True)
        except FailedPrecondition as refused:
            if refused.reason != "ALREADY_REFUNDED":
                raise
            return Reversal(outcome=ReversalOutcome.REVERSED, payment_id=result.transfer_id)
        return Reversal(outcome=ReversalOutcome.REVERSED, payment_id=result.transfer_id,
                        refund_id=refunded.transfer_id)

    async def refund(self, *, tenant_id: uuid.UUID, idempotency_key: str, payment_transfer_id: uuid.UUID,
                     amount_fen: int, external_ref: str, give_back_guards: bool = False) -> WriteResult:
        if amount_fen < 0:
            raise InvalidArgument("amount_fen must not be negative", reason="INVALID_AMOUNT")
        request = {"payment": str(payment_transfer_id), "amount_fen": amount_fen, "external_ref": external_ref}

        async def body(tx: TenantTx) -> WriteResult:
            paid_fen, refunded_fen = await tx.lock_payment(payment_transfer_id)
            amount = domain.refund_amount(requested_fen=amount_fen, paid_fen=paid_fen, refunded_fen=refunded_fen)
            payment = await tx.transfer(payment_transfer_id)
            assert payment.merchant_account_id is not None, "every payment names its merchant"
            merchant_id = payment.merchant_account_id
            credits = domain.refund_allocation(
                legs=[p for p in payment.postings if p.amount_fen < 0],
                refunded_by_account=await tx.refunded_by_account(payment_transfer_id), amount_fen=amount,
            )
            ids = [c.account_id for c in credits]
            accounts = await tx.accounts([*ids, merchant_id], lock_unsharded=True)
            merchant = accounts[merchant_id]
            domain.check_covers(merchant.account, balance=merchant.balance, amount_fen=amount)
            transfer = await tx.post(
                kind=TransferKind.REFUND, idempotency_key=idempotency_key, amount_fen=amount,
                postings=[Posting(merchant_id, -amount), *credits], sharded=_sharded(accounts), event_time=None,
                merchant_account_id=merchant_id, device_id=payment.device_id, external_ref=external_ref,
                original_transfer_id=payment_transfer_id,
            )
            await tx.add_refunded(payment_transfer_id, amount_fen=amount)
            if give_back_guards:
                # A reversed payment never happened: what it counted against caps is given back.
                await tx.give_back_guards(payment_transfer_id)
            await tx.emit([_posted_event(transfer)])
            return WriteResult(transfer_id=transfer.transfer_id, balances=await tx.balances([*ids, merchant_id]))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="refund",
                                      request=request, body=body)

    # --- holds --------------------------------------------------------------------------------

    async def create_hold(self, *, tenant_id: uuid.UUID, idempotency_key: str, account_id: uuid.UUID,
                          merchant_account_id: uuid.UUID, amount_fen: int, timeout_s: int, device_id: str,
                          external_ref: str, code: CodeRef | None = None) -> WriteResult:
        domain.check_amount(amount_fen)
        code = domain.check_code(code)
        timeout_s = domain.check_hold_timeout(timeout_s)
        if account_id == merchant_account_id:
            raise InvalidArgument("a purse cannot pay itself", reason="SAME_ACCOUNT")
        request = {"account": str(account_id), "merchant": str(merchant_account_id), "amount_fen": amount_fen,
                   "timeout_s": timeout_s, "device_id": device_id, "external_ref": external_ref}
        domain.with_code(request, code)

        async def body(tx: TenantTx) -> WriteResult:
            accounts = await tx.accounts([account_id, merchant_account_id], lock_unsharded=True)
            payer, merchant = accounts[account_id], accounts[merchant_account_id]
            domain.check_purse(payer.account, kinds=MEMBER_PURSES, what="account")
            domain.check_purse(merchant.account, kinds=_MERCHANT, what="merchant_account")
            domain.check_may_receive(merchant.account)
            domain.check_may_debit(payer.account, balance=payer.balance, amount_fen=amount_fen)
            transfer = await tx.post(
                kind=TransferKind.HOLD, idempotency_key=idempotency_key, amount_fen=amount_fen,
                postings=[Posting(account_id, 0, amount_fen)], sharded=set(), event_time=None,
                merchant_account_id=merchant_account_id, device_id=device_id, external_ref=external_ref, code=code,
            )
            hold = await tx.create_hold(hold_id=transfer.transfer_id, account_id=account_id,
                                        merchant_account_id=merchant_account_id, amount_fen=amount_fen,
                                        timeout_s=timeout_s)
            await tx.emit([_hold_event(transfer, hold),
                           *_low_balance_events(domain.LowBalanceWatch(accounts).after(transfer))])
            return WriteResult(transfer_id=transfer.transfer_id, hold_id=hold.hold_id,
                               balances=await tx.balances([account_id]))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="create_hold",
                                      request=request, body=body)

    async def _settle(self, tx: TenantTx, *, hold: Hold, status: HoldStatus, idempotency_key: str,
                      amount_fen: int) -> WriteResult:
        """Book the capture (of ``amount_fen``), void or expiry of a pending hold, locked by the caller."""
        accounts = await tx.accounts([hold.account_id, hold.merchant_account_id], lock_unsharded=True)
        if status is HoldStatus.CAPTURED:
            kind = TransferKind.CAPTURE
            postings = [Posting(hold.account_id, -amount_fen, -hold.amount_fen),
                        Posting(hold.merchant_account_id, amount_fen)]
        else:
            kind = TransferKind.VOID if status is HoldStatus.VOIDED else TransferKind.EXPIRY
            amount_fen = hold.amount_fen
            postings = [Posting(hold.account_id, 0, -hold.amount_fen)]
        # The settling transfer names the hold's device too: a cabinet's statement shows its captures.
        device_id = (await tx.transfer(hold.hold_id)).device_id
        transfer = await tx.post(
            kind=kind, idempotency_key=idempotency_key, amount_fen=amount_fen, postings=postings,
            sharded=_sharded(accounts), event_time=None, merchant_account_id=hold.merchant_account_id,
            device_id=device_id, original_transfer_id=hold.hold_id,
        )
        settled = await tx.settle_hold(hold.hold_id, status=status, transfer_id=transfer.transfer_id)
        events = [_hold_event(transfer, settled)]
        touched = [hold.account_id]
        if kind is TransferKind.CAPTURE:
            # A captured hold is a payment like any other: it can be refunded.
            await tx.record_payment(transfer_id=transfer.transfer_id, paid_fen=amount_fen)
            events.append(_posted_event(transfer))
            touched.append(hold.merchant_account_id)
        await tx.emit(events)
        return WriteResult(transfer_id=transfer.transfer_id, hold_id=hold.hold_id, balances=await tx.balances(touched))

    async def capture_hold(self, *, tenant_id: uuid.UUID, idempotency_key: str, hold_id: uuid.UUID,
                           amount_fen: int) -> WriteResult:
        if amount_fen < 0:
            raise InvalidArgument("amount_fen must not be negative", reason="INVALID_AMOUNT")
        request = {"hold": str(hold_id), "amount_fen": amount_fen}

        async def body(tx: TenantTx) -> WriteResult:
            hold = await tx.lock_hold(hold_id)
            domain.check_hold_pending(hold, now=await tx.now())
            amount = domain.capture_amount(requested_fen=amount_fen, hold_fen=hold.amount_fen)
            return await self._settle(tx, hold=hold, status=HoldStatus.CAPTURED, idempotency_key=idempotency_key,
                                      amount_fen=amount)

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="capture_hold",
                                      request=request, body=body)

    async def void_hold(self, *, tenant_id: uuid.UUID, idempotency_key: str, hold_id: uuid.UUID) -> WriteResult:
        async def body(tx: TenantTx) -> WriteResult:
            hold = await tx.lock_hold(hold_id)
            domain.check_hold_pending(hold, now=await tx.now())
            return await self._settle(tx, hold=hold, status=HoldStatus.VOIDED, idempotency_key=idempotency_key,
                                      amount_fen=hold.amount_fen)

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="void_hold",
                                      request={"hold": str(hold_id)}, body=body)

    async def expire_hold(self, *, tenant_id: uuid.UUID, hold_id: uuid.UUID) -> bool:
        """Release a hold past its time; False when capture or void settled it first."""
        async with self._store.tenant_tx(tenant_id) as tx:
            hold = await tx.lock_hold(hold_id)
            if hold.status is not HoldStatus.PENDING or hold.expires_at > await tx.now():
                return False
            await self._settle(tx, hold=hold, status=HoldStatus.EXPIRED, idempotency_key="", amount_fen=0)
            return True

    async def expire_due_holds(self, *, limit: int) -> int:
        expired = 0
        for tenant_id, hold_id in await self._store.due_holds(limit=limit):
            expired += await self.expire_hold(tenant_id=tenant_id, hold_id=hold_id)
        return expired

    # --- reads --------------------------------------------------------------------------------

    async def transfer(self, *, tenant_id: uuid.UUID, transfer_id: uuid.UUID) -> Transfer:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.transfer(transfer_id)

    async def transfers(self, *, tenant_id: uuid.UUID, transfer_ids: list[uuid.UUID]) -> list[Transfer]:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.transfers(transfer_ids)

    async def hold(self, *, tenant_id: uuid.UUID, hold_id: uuid.UUID) -> Hold:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.hold(hold_id)

    async def lookup(self, *, tenant_id: uuid.UUID, idempotency_key: str) -> tuple[Transfer, bytes] | None:
        """The transfer booked under the (scoped) key and the fingerprint the key names, if any."""
        key = domain.check_stored_key(idempotency_key)
        async with self._store.tenant_read(tenant_id) as tx:
            transfer = await tx.transfer_by_key(key)
            if transfer is None:
                return None
            claim = await tx.key_claim(key)
            return transfer, claim[1] if claim is not None else b""

    async def history(self, *, tenant_id: uuid.UUID, account_id: uuid.UUID, page_size: int,
                      page_token: str) -> tuple[list[Transfer], str]:
        limit = domain.page_size(page_size)
        before_seq = domain.parse_page_token(page_token)
        async with self._store.tenant_read(tenant_id) as tx:
            await tx.account(account_id)
            page = await tx.history(account_id, before_seq=before_seq, limit=limit + 1)
            if len(page) <= limit:
                return page, ""
            page = page[:limit]
            return page, domain.page_token(await tx.transfer_seq(page[-1].transfer_id))

    async def usage_counters(self, *, tenant_id: uuid.UUID, counter_keys: list[str]) -> list[tuple[str, int]]:
        """(key, value) in the order asked; a counter never raised is 0."""
        keys = domain.check_counter_keys(counter_keys)
        async with self._store.tenant_read(tenant_id) as tx:
            found = await tx.counters(keys)
        return [(k, found.get(k, 0)) for k in keys]

    async def member_states(self, questions: list[MemberStateQuestion]) -> list[MemberState]:
        """For each question: the member's accounts, the counters' values (0 for one never raised)
        in the order asked, and the transfer booked under the idempotency key, if given and used.
        Every question is checked before anything is read."""
        if not 1 <= len(questions) <= domain.MAX_MEMBER_STATE_QUESTIONS:
            raise InvalidArgument(f"give 1..{domain.MAX_MEMBER_STATE_QUESTIONS} requests", reason="INVALID_QUERY")
        checked = []
        for q in questions:
            domain.check_text(q.member_id, what="member_id", max_chars=domain.MAX_ID_CHARS, required=True)
            keys = domain.check_counter_keys(q.counter_keys) if q.counter_keys else []
            if q.idempotency_key:
                domain.check_stored_key(q.idempotency_key)
            checked.append((q.tenant_id, q.member_id, keys, q.idempotency_key))
        answers = await self._store.member_states(checked)
        return [MemberState(accounts=accounts, counters=[(k, found.get(k, 0)) for k in keys], existing=existing)
                for (_, _, keys, _), (accounts, found, existing) in zip(checked, answers, strict=True)]

    async def trial_balance(self, *, tenant_id: uuid.UUID) -> TrialBalance:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.trial_balance()

    # --- subsidy programs -----------------------------------------------------------------------

    async def define_program(self, *, tenant_id: uuid.UUID, purse_kind: PurseKind | None, ref: str,
                             funding_account_id: uuid.UUID, ends_at: datetime | None) -> tuple[Program, bool]:
        kind = domain.check_program_purse(purse_kind)
        domain.check_program_ref(ref)
        async with self._store.tenant_tx(tenant_id) as tx:
            funding = await tx.account(funding_account_id)
            domain.check_purse(funding.account, kinds=_FUNDING, what="funding_account")
            created = await tx.insert_program(purse_kind=kind, ref=ref, funding_account_id=funding_account_id,
                                              ends_at=ends_at)
            if created is not None:
                return created, True
            existing = await tx.program(purse_kind=kind, ref=ref, lock="update")
            domain.check_redefinition(existing, funding_account_id=funding_account_id)
            if existing.ends_at == ends_at:
                return existing, False
            return await tx.update_program(purse_kind=kind, ref=ref, ends_at=ends_at, set_ends_at=True), False

    async def program(self, *, tenant_id: uuid.UUID, purse_kind: PurseKind | None, ref: str) -> Program:
        kind = domain.check_program_purse(purse_kind)
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.program(purse_kind=kind, ref=ref)

    async def expire_program_chunk(self, *, tenant_id: uuid.UUID, purse_kind: PurseKind, ref: str) -> bool:
        """Expire up to a chunk of the program's purses: each with money available gives it back
        to the funding account in one SUBSIDY_EXPIRY transfer, and each is closed. True while
        purses remain; the last call marks the program ended."""
        async with self._store.tenant_tx(tenant_id) as tx:
            # Held for the chunk: a grant (which takes it FOR SHARE) cannot slip in between.
            program = await tx.program(purse_kind=purse_kind, ref=ref, lock="update")
            now = await tx.now()
            if program.status is ProgramStatus.ENDED or program.ends_at is None or program.ends_at > now:
                return False
            candidates = await tx.open_program_purses(purse_kind=purse_kind, ref=ref,
                                                      limit=domain.EXPIRY_CHUNK_PURSES)
            if not candidates:
                ended = await tx.update_program(purse_kind=purse_kind, ref=ref, status=ProgramStatus.ENDED)
                await tx.emit([PendingEvent(subject=SUBJECT_PROGRAM_ENDED, event_type=SUBJECT_PROGRAM_ENDED,
                                            tenant_id=str(tenant_id), data=program_data(ended))])
                return False
            accounts = await tx.accounts([*candidates, program.funding_account_id], lock_unsharded=True)
            items = []
            for account_id in candidates:
                left = accounts[account_id].balance.available_fen
                if left > 0:
                    items.append(NewTransfer(
                        kind=TransferKind.SUBSIDY_EXPIRY, idempotency_key="", amount_fen=left,
                        postings=(Posting(account_id, -left), Posting(program.funding_account_id, left)),
                        external_ref=f"{purse_kind.value}:{ref}",
                    ))
            transfers = await tx.post_many(items, sharded=_sharded(accounts))
            await tx.close_accounts(candidates)
            await tx.update_program(purse_kind=purse_kind, ref=ref, status=ProgramStatus.ENDING,
                                    expired_purses=len(items), expired_fen=sum(t.amount_fen for t in items))
            await tx.emit([_posted_event(t) for t in transfers])
            return True

    async def expire_due_programs(self) -> int:
        """End every program past its end date; the number of purse chunks done."""
        chunks = 0
        for tenant_id, purse_kind, ref in await self._store.due_programs():
            while await self._retrying(lambda t=tenant_id, k=purse_kind, r=ref: self.expire_program_chunk(
                    tenant_id=t, purse_kind=k, ref=r)):
                chunks += 1
        return chunks

    async def clawback(self, *, tenant_id: uuid.UUID, idempotency_key: str, account_id: uuid.UUID,
                       amount_fen: int, external_ref: str) -> WriteResult:
        domain.check_text(external_ref, what="external_ref", max_chars=domain.MAX_REF_CHARS)
        request = {"account": str(account_id), "amount_fen": amount_fen, "external_ref": external_ref}

        async def body(tx: TenantTx) -> WriteResult:
            purse = await tx.account(account_id)
            domain.check_purse(purse.account, kinds=domain.PROGRAM_PURSES, what="account")
            if purse.account.owner_kind is not OwnerKind.MEMBER:
                raise InvalidArgument("a clawback takes from a member's purse", reason="WRONG_ACCOUNT_KIND")
            program = await tx.program(purse_kind=purse.account.purse_kind, ref=purse.account.ref)
            accounts = await tx.accounts([account_id, program.funding_account_id], lock_unsharded=True)
            amount = domain.clawback_amount(requested_fen=amount_fen,
                                            available_fen=accounts[account_id].balance.available_fen)
            transfer = await tx.post(
                kind=TransferKind.CLAWBACK, idempotency_key=idempotency_key, amount_fen=amount,
                postings=[Posting(account_id, -amount), Posting(program.funding_account_id, amount)],
                sharded=_sharded(accounts), event_time=None, external_ref=external_ref,
            )
            await tx.emit([_posted_event(transfer)])
            return WriteResult(transfer_id=transfer.transfer_id,
                               balances=await tx.balances([account_id, program.funding_account_id]))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="clawback",
                                      request=request, body=body)

    # --- grant batches ------------------------------------------------------------------------

    async def start_grant_batch(self, *, tenant_id: uuid.UUID, bill_number: str, purse_kind: PurseKind | None,
                                ref: str, rows: list[GrantRow]) -> tuple[GrantBatch, bool]:
        bill = domain.check_bill_number(bill_number)
        kind = domain.check_program_purse(purse_kind)
        domain.check_grant_rows(rows)
        fingerprint = domain.fingerprint(operation="grant_batch", request={
            "purse_kind": kind.value, "ref": ref, "rows": [[r.member_id, r.amount_fen] for r in rows]})
        async with self._store.tenant_tx(tenant_id) as tx:
            program = await tx.program(purse_kind=kind, ref=ref, lock="share")
            created = await tx.insert_batch(batch_id=uuid.uuid4(), bill_number=bill, fingerprint=fingerprint,
                                            purse_kind=kind, ref=ref, rows=rows)
            if created is None:
                found = await tx.batch(bill_number=bill)
                assert found is not None, "the bill number's batch was there for the insert to conflict"
                batch, stored = found
                if stored != fingerprint:
                    raise Conflict("this bill number was started with other rows", reason="BILL_NUMBER_REUSED",
                                   metadata={"batch_id": str(batch.batch_id)})
                return batch, False
            # After the repeat check: the same bill answers its batch even once the program ended.
            domain.check_program_active(program, now=await tx.now())
        self.batch_started.set()
        return created, True

    async def grant_batch(self, *, tenant_id: uuid.UUID, batch_id: uuid.UUID | None,
                          bill_number: str) -> GrantBatch:
        async with self._store.tenant_read(tenant_id) as tx:
            found = await tx.batch(batch_id=batch_id, bill_number=bill_number)
        if found is None:
            raise NotFound("no such grant batch", reason="BATCH_NOT_FOUND")
        return found[0]

    async def grant_batch_rows(self, *, tenant_id: uuid.UUID, batch_id: uuid.UUID, status: GrantRowStatus | None,
                               page_size: int, page_token: str) -> tuple[list[GrantRowResult], str]:
        limit = domain.rows_page_size(page_size)
        after_line = domain.parse_page_token(page_token) or 0
        async with self._store.tenant_read(tenant_id) as tx:
            if await tx.batch(batch_id=batch_id) is None:
                raise NotFound("no such grant batch", reason="BATCH_NOT_FOUND")
            rows = await tx.batch_rows(batch_id, status=status, after_line=after_line, limit=limit + 1)
        if len(rows) <= limit:
            return rows, ""
        return rows[:limit], domain.page_token(rows[limit - 1].line)

    async def run_grant_chunk(self, *, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> bool:
        """Settle the next chunk of a running batch in one transaction: its grants, its rows'
        results and the batch's counters commit together, so a crash repeats a chunk whole or not
        at all. True while rows remain (False also when another worker holds the batch)."""
        async with self._store.tenant_tx(tenant_id) as tx:
            found = await tx.batch(batch_id=batch_id, lock_running=True)
            if found is None:
                return False
            batch = found[0]
            program = await tx.program(purse_kind=batch.purse_kind, ref=batch.ref, lock="share")
            pending = await tx.pending_rows(batch_id, limit=domain.GRANT_CHUNK_ROWS)
            results = await self._grant_rows(tx, batch=batch, program=program, pending=pending)
            await tx.finish_rows(batch_id, results)
            granted = [r for r in results if r.status is GrantRowStatus.GRANTED]
            after = await tx.advance_batch(batch_id, granted=len(granted), failed=len(results) - len(granted),
                                           granted_fen=sum(r.amount_fen for r in granted))
            if after.status is GrantBatchStatus.DONE:
                await tx.emit([PendingEvent(subject=SUBJECT_BATCH_FINISHED, event_type=SUBJECT_BATCH_FINISHED,
                                            tenant_id=str(tenant_id), data=batch_data(after))])
                return False
            return True

    async def _grant_rows(self, tx: TenantTx, *, batch: GrantBatch, program: Program,
                          pending: list[tuple[int, GrantRow]]) -> list[GrantRowResult]:
        def failed(line: int, row: GrantRow, error: DomainError) -> GrantRowResult:
            return GrantRowResult(line=line, member_id=row.member_id, amount_fen=row.amount_fen,
                                  status=GrantRowStatus.FAILED, reason=error.reason, message=error.message)

        try:
            domain.check_program_active(program, now=await tx.now())
        except DomainError as error:
            return [failed(line, row, error) for line, row in pending]
        keys = {line: domain.grant_key(batch.bill_number, line) for line, _ in pending}
        fingerprints = {line: domain.fingerprint(operation="subsidy_grant", request={
            "batch": str(batch.batch_id), "line": line, "member": row.member_id, "amount_fen": row.amount_fen})
            for line, row in pending}
        claimed, _ = await tx.claim_keys([(keys[line], "subsidy_grant", fingerprints[line]) for line, _ in pending])
        purses = await tx.open_member_purses(owner_ids=[row.member_id for _, row in pending],
                                             purse_kind=program.purse_kind, ref=program.ref)
        funding_id = program.funding_account_id
        accounts = await tx.accounts([*purses.values(), funding_id], lock_unsharded=True)
        funding = accounts[funding_id]
        funding_left = funding.balance.available_fen
        results: dict[int, GrantRowResult] = {}
        items: list[tuple[int, NewTransfer]] = []
        for line, row in pending:
            purse = accounts[purses[row.member_id]]
            try:
                if keys[line] not in claimed:
                    raise Conflict("the row's idempotency key is taken by another write",
                                   reason="IDEMPOTENCY_KEY_REUSED")
                domain.check_may_receive(purse.account)
                domain.check_may_receive(funding.account)
                if funding.account.no_overdraft and funding_left < row.amount_fen:
                    raise FailedPrecondition("the funding account cannot cover this grant", reason="INSUFFICIENT_FUNDS")
            except DomainError as error:
                results[line] = failed(line, row, error)
                continue
            funding_left -= row.amount_fen
            items.append((line, NewTransfer(
                kind=TransferKind.SUBSIDY_GRANT, idempotency_key=keys[line], amount_fen=row.amount_fen,
                postings=(Posting(funding_id, -row.amount_fen), Posting(purse.account.account_id, row.amount_fen)),
                external_ref=batch.bill_number,
            )))
        await tx.release_keys([keys[line] for line in results if keys[line] in claimed])
        transfers = await tx.post_many([item for _, item in items], sharded=_sharded(accounts))
        for (line, item), transfer in zip(items, transfers, strict=True):
            purse_id = item.postings[1].account_id
            results[line] = GrantRowResult(line=line, member_id=dict(pending)[line].member_id,
                                           amount_fen=item.amount_fen, status=GrantRowStatus.GRANTED,
                                           transfer_id=transfer.transfer_id, account_id=purse_id)
        await tx.save_results({item.idempotency_key: WriteResult(transfer_id=t.transfer_id, balances=())
                               for (_, item), t in zip(items, transfers, strict=True)})
        await tx.emit([_posted_event(t) for t in transfers])
        return [results[line] for line, _ in pending]

    async def run_grant_batches(self) -> int:
        """Work every running batch to its end; the number of chunks done."""
        chunks = 0
        for tenant_id, batch_id in await self._store.running_batches():
            while await self._retrying(lambda t=tenant_id, b=batch_id: self.run_grant_chunk(tenant_id=t, batch_id=b)):
                chunks += 1
        return chunks

    # --- offline settlement -------------------------------------------------------------------

    async def settle_offline(self, *, tenant_id: uuid.UUID, records: list[OfflineRecord]) -> list[OfflineResult]:
        """Book each record once (see the proto). Records are checked alone first; the valid ones
        are booked together in one transaction in the order of their device time."""
        if not 1 <= len(records) <= domain.MAX_OFFLINE_RECORDS:
            raise InvalidArgument(f"give 1..{domain.MAX_OFFLINE_RECORDS} records", reason="INVALID_RECORD_COUNT")
        results: list[OfflineResult | None] = [None] * len(records)
        first: dict[str, int] = {}
        for i, record in enumerate(records):
            try:
                domain.check_offline_record(record)
            except DomainError as error:
                results[i] = OfflineResult(idempotency_key=record.idempotency_key, outcome=OfflineOutcome.REJECTED,
                                           reason=error.reason, message=error.message)
                continue
            first.setdefault(record.idempotency_key, i)
        booked = await self._retrying(lambda: self._settle_offline_tx(
            tenant_id=tenant_id, records={i: records[i] for i in first.values()}))
        for i, record in enumerate(records):
            if results[i] is not None:
                continue
            j = first[record.idempotency_key]
            if i == j:
                results[i] = booked[i]
            elif record.request() == records[j].request() and booked[j].transfer_id is not None:
                results[i] = OfflineResult(idempotency_key=record.idempotency_key, outcome=OfflineOutcome.DUPLICATE,
                                           transfer_id=booked[j].transfer_id, shortfall_fen=booked[j].shortfall_fen)
            else:
                results[i] = OfflineResult(idempotency_key=record.idempotency_key, outcome=OfflineOutcome.REJECTED,
                                           reason="IDEMPOTENCY_KEY_REUSED",
                                           message="this idempotency key was used for a different record")
        return [r for r in results if r is not None]

    async def _settle_offline_tx(self, *, tenant_id: uuid.UUID,
                                 records: dict[int, OfflineRecord]) -> dict[int, OfflineResult]:
        out: dict[int, OfflineResult] = {}
        later_of: dict[int, int] = {}  # a record replaying a code booked earlier in this call -> that record
        if not records:
            return out
        fingerprints = {i: domain.fingerprint(operation="settle_offline", request=r.request())
                        for i, r in records.items()}
        async with self._store.tenant_tx(tenant_id) as tx:
            claimed, seen = await tx.claim_keys([(r.idempotency_key, "settle_offline", fingerprints[i])
                                                 for i, r in records.items()])
            repeats = {i: seen[r.idempotency_key] for i, r in records.items() if r.idempotency_key not in claimed}
            earlier = await tx.shortfall_by_transfer([s[2].transfer_id for s in repeats.values() if s[2] is not None])
            for i, (operation, stored, result) in repeats.items():
                if operation == "settle_offline" and stored == fingerprints[i] and result is not None:
                    out[i] = OfflineResult(idempotency_key=records[i].idempotency_key,
                                           outcome=OfflineOutcome.DUPLICATE, transfer_id=result.transfer_id,
                                           shortfall_fen=earlier.get(result.transfer_id, 0))
                else:
                    out[i] = OfflineResult(idempotency_key=records[i].idempotency_key,
                                           outcome=OfflineOutcome.REJECTED, reason="IDEMPOTENCY_KEY_REUSED",
                                           message="this idempotency key was used for a different request")
            todo = sorted((i for i in records if i not in out),
                          key=lambda i: (records[i].event_time, records[i].idempotency_key))
            # A code books once: one booked before (by any device) or earlier in this call wins;
            # the unique index settles a race with a concurrent call (which is then retried).
            booked_codes = await tx.transfers_by_code([c for i in todo if (c := records[i].code) is not None])
            code_first: dict[CodeRef, int] = {}
            for i in list(todo):
                code = records[i].code
                if code is None:
                    continue
                if code in booked_codes or code in code_first:
                    out[i] = OfflineResult(idempotency_key=records[i].idempotency_key,
                                           outcome=OfflineOutcome.CODE_REUSED, transfer_id=booked_codes.get(code),
                                           reason="CODE_ALREADY_USED",
                                           message="this e-code (credential and counter) was booked by another record")
                    if code in code_first:
                        out[i] = replace(out[i], transfer_id=None)
                        later_of[i] = code_first[code]
                    todo.remove(i)
                else:
                    code_first[code] = i
            ids = {leg.account_id for i in todo for leg in records[i].legs} | {records[i].merchant_account_id
                                                                                  for i in todo}
            accounts = await tx.accounts(sorted(ids), lock_unsharded=True, missing_ok=True)
            available = {a: ab.balance.available_fen for a, ab in accounts.items() if not ab.account.sharded}
            receivables: dict[str, AccountBalance] = {}
            items: list[tuple[int, NewTransfer, str, int]] = []
            for i in todo:
                record = records[i]
                try:
                    payers = self._offline_accounts(record, accounts)
                except DomainError as error:
                    out[i] = OfflineResult(idempotency_key=record.idempotency_key, outcome=OfflineOutcome.REJECTED,
                                           reason=error.reason, message=error.message)
                    continue
                member_id = payers[0].owner_id
                postings, shortfall = domain.offline_cover(legs=record.legs, available=available)
                if shortfall:
                    if member_id not in receivables:
                        receivables[member_id] = await tx.open_receivable(member_id)
                    postings.append(Posting(receivables[member_id].account.account_id, -shortfall))
                total = sum(leg.amount_fen for leg in record.legs)
                postings.append(Posting(record.merchant_account_id, total))
                items.append((i, NewTransfer(
                    kind=TransferKind.OFFLINE_SETTLEMENT, idempotency_key=record.idempotency_key, amount_fen=total,
                    postings=tuple(postings), event_time=record.event_time,
                    merchant_account_id=record.merchant_account_id, device_id=record.device_id,
                    external_ref=record.external_ref, code=record.code), member_id, shortfall))
            # Refused records and replayed codes give their keys back: nothing was booked for them.
            await tx.release_keys([records[i].idempotency_key for i, r in out.items()
                                   if r.outcome in (OfflineOutcome.REJECTED, OfflineOutcome.CODE_REUSED)
                                   and records[i].idempotency_key in claimed])
            sharded = _sharded(accounts) | {ab.account.account_id for ab in receivables.values()}
            transfers = await tx.post_many([item for _, item, _, _ in items], sharded=sharded)
            await tx.record_payments([(t.transfer_id, t.amount_fen) for t in transfers])
            shortfalls = [(t.transfer_id, member_id, receivables[member_id].account.account_id, shortfall)
                          for (_, _, member_id, shortfall), t in zip(items, transfers, strict=True) if shortfall]
            await tx.record_shortfalls(shortfalls)
            await tx.save_results({t.idempotency_key: WriteResult(transfer_id=t.transfer_id, balances=())
                                   for t in transfers})
            events = [_posted_event(t) for t in transfers]
            watch = domain.LowBalanceWatch(accounts)
            events.extend(e for t in transfers for e in _low_balance_events(watch.after(t)))
            short_by_transfer = {s[0]: s for s in shortfalls}
            for t in transfers:
                if t.transfer_id in short_by_transfer:
                    _, member_id, receivable_id, fen = short_by_transfer[t.transfer_id]
                    events.append(PendingEvent(
                        subject=SUBJECT_SHORTFALL, event_type=SUBJECT_SHORTFALL, tenant_id=str(tenant_id),
                        data=event_data(t, member_id=member_id, receivable_account_id=str(receivable_id),
                                        shortfall_fen=fen)))
            await tx.emit(events)
            for (i, _, _, shortfall), t in zip(items, transfers, strict=True):
                out[i] = OfflineResult(idempotency_key=t.idempotency_key,
                                       outcome=OfflineOutcome.SHORTFALL if shortfall else OfflineOutcome.BOOKED,
                                       transfer_id=t.transfer_id, shortfall_fen=shortfall)
            for i, first in later_of.items():
                out[i] = replace(out[i], transfer_id=out[first].transfer_id)
        return out

    @staticmethod
    def _offline_accounts(record: OfflineRecord, accounts: dict[uuid.UUID, AccountBalance]) -> list[Account]:
        """The record's paying purses, after the checks a payment makes except funds and status."""
        for account_id in [record.merchant_account_id, *(leg.account_id for leg in record.legs)]:
            if account_id not in accounts:
                raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND",
                               metadata={"account_id": str(account_id)})
        domain.check_purse(accounts[record.merchant_account_id].account, kinds=_MERCHANT, what="merchant_account")
        payers = [accounts[leg.account_id].account for leg in record.legs]
        domain.check_one_member(payers)
        if payers[0].owner_kind is not OwnerKind.MEMBER:
            raise InvalidArgument("offline payments come from members' purses", reason="WRONG_ACCOUNT_KIND")
        return payers

    # --- prefunding, reversals, refunds to the bank, reconciliation ------------------------------

    async def fund_clearing_account(self, *, tenant_id: uuid.UUID, idempotency_key: str,
                                    clearing_account_id: uuid.UUID, amount_fen: int, bank_reference: str,
                                    value_date: str) -> WriteResult:
        """Record a bank's transfer to the school: the tenant's bank receipts account (opened on
        first use) pays the partner's clearing account, which may then top up that much more."""
        funding = domain.check_funding(clearing_account_id=clearing_account_id, amount_fen=amount_fen,
                                       bank_reference=bank_reference, value_date=value_date)

        async def body(tx: TenantTx) -> WriteResult:
            receipts, _ = await tx.open_account(
                owner_kind=OwnerKind.TENANT, owner_id=str(tenant_id), purse_kind=PurseKind.BANK_RECEIPTS, ref="",
                layout=domain.account_layout(purse_kind=PurseKind.BANK_RECEIPTS, no_overdraft=False))
            ids = [receipts.account_id, clearing_account_id]
            accounts = await tx.accounts(ids, lock_unsharded=True)
            domain.check_clearing_account(accounts[clearing_account_id].account)
            if await tx.funding_by_reference(account_id=clearing_account_id,
                                             bank_reference=funding.bank_reference) is not None:
                raise domain.bank_reference_used(funding.bank_reference)
            transfer = await tx.post(
                kind=TransferKind.CLEARING_FUNDING, idempotency_key=idempotency_key, amount_fen=amount_fen,
                postings=[Posting(receipts.account_id, -amount_fen), Posting(clearing_account_id, amount_fen)],
                sharded=_sharded(accounts), event_time=None, external_ref=funding.bank_reference,
            )
            await tx.record_funding(transfer_id=transfer.transfer_id, account_id=clearing_account_id,
                                    bank_reference=funding.bank_reference, value_date=funding.value_date)
            await tx.emit([_posted_event(transfer, extra={"bank_reference": funding.bank_reference,
                                                          "value_date": funding.value_date.isoformat()})])
            return WriteResult(transfer_id=transfer.transfer_id, balances=await tx.balances(ids))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                      operation="fund_clearing", request=funding.request(), body=body)

    async def reverse_top_up(self, *, tenant_id: uuid.UUID, idempotency_key: str, clearing_account_id: uuid.UUID,
                             top_up_transfer_id: uuid.UUID | None, top_up_key: str, reason: str) -> WriteResult:
        """Undo a top-up from this clearing account (named by its transfer id, or by the scoped
        key it was booked under): its whole amount from the cash purse back to the clearing
        account, once, and only while the purse still holds it."""
        if (top_up_transfer_id is None) == (not top_up_key):
            raise InvalidArgument("name the top-up by one of its transfer id and its idempotency key",
                                  reason="INVALID_QUERY")
        if top_up_key:
            domain.check_stored_key(top_up_key)
        reason = domain.check_text(reason, what="reason", max_chars=domain.MAX_REF_CHARS)
        request = {"clearing": str(clearing_account_id), "top_up": str(top_up_transfer_id or ""),
                   "top_up_key": top_up_key, "reason": reason}

        async def body(tx: TenantTx) -> WriteResult:
            top_up = await tx.transfer(top_up_transfer_id) if top_up_transfer_id is not None \
                else await tx.transfer_by_key(top_up_key)
            if top_up is None:
                raise NotFound("no top-up was booked under this key", reason="TRANSFER_NOT_FOUND")
            purse_id, amount = domain.check_top_up_to_reverse(top_up, clearing_account_id=clearing_account_id)
            await tx.lock_top_up(top_up.transfer_id)
            if (reversal_id := await tx.reversal_of(top_up.transfer_id)) is not None:
                raise domain.already_reversed(reversal_id)
            ids = [purse_id, clearing_account_id]
            accounts = await tx.accounts(ids, lock_unsharded=True)
            domain.check_purse_still_holds(accounts[purse_id], amount_fen=amount)
            watch = domain.LowBalanceWatch(accounts)
            transfer = await tx.post(
                kind=TransferKind.TOP_UP_REVERSAL, idempotency_key=idempotency_key, amount_fen=amount,
                postings=[Posting(purse_id, -amount), Posting(clearing_account_id, amount)],
                sharded=_sharded(accounts), event_time=None, external_ref=reason,
                original_transfer_id=top_up.transfer_id,
            )
            await tx.emit([_posted_event(transfer), *_low_balance_events(watch.after(transfer))])
            return WriteResult(transfer_id=transfer.transfer_id, balances=await tx.balances(ids))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                      operation="reverse_top_up", request=request, body=body)

    async def refund_to_bank(self, *, tenant_id: uuid.UUID, idempotency_key: str, account_id: uuid.UUID,
                             clearing_account_id: uuid.UUID, amount_fen: int, external_ref: str) -> WriteResult:
        """Pay a member's cash back out through a partner's clearing account (a leaver's money
        refunded by the bank): the purse is debited, the clearing account credited."""
        domain.check_amount(amount_fen)
        domain.check_text(external_ref, what="external_ref", max_chars=domain.MAX_REF_CHARS)
        if account_id == clearing_account_id:
            raise InvalidArgument("a refund moves money between two accounts", reason="SAME_ACCOUNT")
        request = {"account": str(account_id), "clearing": str(clearing_account_id), "amount_fen": amount_fen,
                   "external_ref": external_ref}

        async def body(tx: TenantTx) -> WriteResult:
            ids = [account_id, clearing_account_id]
            accounts = await tx.accounts(ids, lock_unsharded=True)
            domain.check_bank_refund(purse=accounts[account_id], clearing=accounts[clearing_account_id].account,
                                     amount_fen=amount_fen)
            watch = domain.LowBalanceWatch(accounts)
            transfer = await tx.post(
                kind=TransferKind.BANK_REFUND, idempotency_key=idempotency_key, amount_fen=amount_fen,
                postings=[Posting(account_id, -amount_fen), Posting(clearing_account_id, amount_fen)],
                sharded=_sharded(accounts), event_time=None, external_ref=external_ref,
            )
            await tx.emit([_posted_event(transfer), *_low_balance_events(watch.after(transfer))])
            return WriteResult(transfer_id=transfer.transfer_id, balances=await tx.balances(ids))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                      operation="bank_refund", request=request, body=body)

    async def set_low_balance_threshold(self, *, tenant_id: uuid.UUID, account_id: uuid.UUID,
                                        threshold_fen: int | None) -> AccountBalance:
        async with self._store.tenant_tx(tenant_id) as tx:
            before = await tx.account(account_id, lock=True)
            domain.check_low_balance_threshold(before.account, threshold_fen)
            await tx.set_low_balance_threshold(account_id, threshold_fen=threshold_fen)
            return await tx.account(account_id)

    async def reconciliation(self, *, tenant_id: uuid.UUID, clearing_account_id: uuid.UUID, day: str,
                             time_zone: str, page_size: int, page_token: str,
                             ) -> tuple[AccountBalance, ReconciliationTotals, list[ReconciliationLine], str,
                                        datetime, datetime]:
        """A clearing account's day in ``time_zone``, from its postings: the totals (on every
        page), a page of lines in booking order, the next page's token, and the day's bounds."""
        start, end = domain.statement_day(day, time_zone)
        limit = domain.reconciliation_page_size(page_size)
        after_seq = domain.parse_page_token(page_token)
        async with self._store.tenant_read(tenant_id) as tx:
            clearing = await tx.account(clearing_account_id)
            domain.check_clearing_account(clearing.account)
            by_kind, later_fen = await tx.reconciliation_sums(account_id=clearing_account_id, start=start, end=end)
            lines = await tx.reconciliation_lines(account_id=clearing_account_id, start=start, end=end,
                                                  after_seq=after_seq, limit=limit + 1)
        # A clearing account is never sharded and never holds: its posted balance is exact.
        closing = clearing.balance.posted_fen - later_fen
        day_fen = sum(fen for _, fen in by_kind.values())
        totals = domain.reconciliation_totals(by_kind=by_kind, opening_fen=closing - day_fen, closing_fen=closing)
        token = ""
        if len(lines) > limit:
            lines = lines[:limit]
            token = domain.page_token(lines[-1][1])
        return clearing, totals, [line for line, _ in lines], token, start, end

    # --- statements ---------------------------------------------------------------------------

    async def statement(self, *, tenant_id: uuid.UUID, merchant_account_id: uuid.UUID | None, device_id: str,
                        day: str, time_zone: str, page_size: int, page_token: str,
                        ) -> tuple[StatementTotals, list[tuple[Transfer, int]], str, datetime, datetime]:
        if (merchant_account_id is None) == (not device_id):
            raise InvalidArgument("give one of merchant_account_id and device_id", reason="INVALID_QUERY")
        start, end = domain.statement_day(day, time_zone)
        limit = domain.statement_page_size(page_size)
        after_seq = domain.parse_page_token(page_token)
        async with self._store.tenant_read(tenant_id) as tx:
            if merchant_account_id is not None:
                merchant = await tx.account(merchant_account_id)
                domain.check_purse(merchant.account, kinds=_MERCHANT, what="merchant_account")
            totals = await tx.statement_totals(merchant_account_id=merchant_account_id, device_id=device_id,
                                               start=start, end=end)
            lines = await tx.statement_lines(merchant_account_id=merchant_account_id, device_id=device_id,
                                             start=start, end=end, after_seq=after_seq, limit=limit + 1)
        token = ""
        if len(lines) > limit:
            lines = lines[:limit]
            token = domain.page_token(lines[-1][2])
        return totals, [(t, fen) for t, fen, _ in lines], token, start, end

    # --- retries ------------------------------------------------------------------------------

    @staticmethod
    async def _retrying(work: Callable[[], Awaitable[_T]]) -> _T:
        for attempt in range(_RETRIES):
            try:
                return await work()
            except (*_RETRYABLE, asyncpg.UniqueViolationError) as error:
                if isinstance(error, asyncpg.UniqueViolationError) and error.constraint_name != CODE_INDEX:
                    raise
                if attempt == _RETRIES - 1:
                    raise
                log.info("ledger transaction retried after a deadlock or serialization failure", attempt=attempt + 1)
        raise AssertionError("unreachable")


def program_data(program: Program) -> dict[str, Any]:
    return {"tenant_id": str(program.tenant_id), "purse_kind": program.purse_kind.value, "ref": program.ref,
            "funding_account_id": str(program.funding_account_id), "status": program.status.value,
            "ends_at": program.ends_at.isoformat() if program.ends_at else None,
            "expired_purses": program.expired_purses, "expired_fen": program.expired_fen}


def batch_data(batch: GrantBatch) -> dict[str, Any]:
    return {"tenant_id": str(batch.tenant_id), "batch_id": str(batch.batch_id), "bill_number": batch.bill_number,
            "purse_kind": batch.purse_kind.value, "ref": batch.ref, "status": batch.status.value,
            "total_rows": batch.total_rows, "granted_rows": batch.granted_rows, "failed_rows": batch.failed_rows,
            "granted_fen": batch.granted_fen}


class PayBatcher:
    """Payments arriving together are booked together: a few workers each take the waiting
    payments of one tenant (up to ``max_batch``) and book them in one transaction
    (``Ledger.pay_batch``), so a busy canteen's payments share commits instead of queueing for
    one flush each. Nothing waits on purpose: a batch is whatever arrived while the workers were
    busy, so a lone payment goes at once. A batch that fails as a whole (a deadlock, a lost race
    on a code) is retried, and then each payment alone, so one payment's trouble is only its own."""

    def __init__(self, *, workers: int, max_batch: int):
        self._workers = workers
        self._max_batch = max_batch
        self._waiting: list[tuple[uuid.UUID, PayCommand, asyncio.Future[PayOutcome]]] = []
        self._arrived = asyncio.Event()

    async def pay(self, tenant_id: uuid.UUID, command: PayCommand) -> PayOutcome:
        future: asyncio.Future[PayOutcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((tenant_id, command, future))
        self._arrived.set()
        return await future

    async def run(self, ledger: Ledger) -> None:
        """The workers, booking through ``ledger`` (payments submitted earlier wait for this)."""
        await asyncio.gather(*(self._work(ledger, shard=n) for n in range(self._workers)))

    def _take(self) -> tuple[uuid.UUID, list[tuple[PayCommand, asyncio.Future[PayOutcome]]]]:
        tenant_id = self._waiting[0][0]
        batch, rest = [], []
        for item in self._waiting:
            if item[0] == tenant_id and len(batch) < self._max_batch:
                batch.append((item[1], item[2]))
            else:
                rest.append(item)
        self._waiting = rest
        return tenant_id, batch

    async def _work(self, ledger: Ledger, *, shard: int) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            tenant_id, batch = self._take()
            try:
                outcomes = await self._book(ledger, tenant_id, [command for command, _ in batch], shard=shard)
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    @staticmethod
    async def _book(ledger: Ledger, tenant_id: uuid.UUID, commands: list[PayCommand], *, shard: int
                    ) -> list[PayOutcome | BaseException]:
        try:
            return list(await ledger._retrying(lambda: ledger.pay_batch(tenant_id=tenant_id, commands=commands,
                                                                        shard=shard)))
        except Exception as error:  # noqa: BLE001 - each payment is tried alone below
            if len(commands) == 1:
                return [_code_race(error, commands[0])]
        outcomes: list[PayOutcome | BaseException] = []
        for command in commands:
            try:
                [outcome] = await ledger._retrying(lambda c=command: ledger.pay_batch(
                    tenant_id=tenant_id, commands=[c], shard=shard))
                outcomes.append(outcome)
            except Exception as error:  # noqa: BLE001 - this payment's own failure, answered to it
                outcomes.append(_code_race(error, command))
        return outcomes


def _code_race(error: Exception, command: PayCommand) -> BaseException:
    """A payment whose code another booked between our check and our insert: CODE_ALREADY_USED."""
    if isinstance(error, asyncpg.UniqueViolationError) and error.constraint_name == CODE_INDEX \
            and command.code is not None:
        return domain.code_already_used(command.code)
    return error

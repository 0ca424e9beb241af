"""The ledger's operations: each write in one transaction, in the store's lock order, with the
domain deciding and the store booking. No SQL and no protobuf here.

Every write runs under its idempotency key: the key is claimed first, so a concurrent repeat
waits for the first and then answers its result; the result (transfer id and the balances then)
is saved in the same transaction as the transfer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from runtime.errors import InvalidArgument
from runtime.events import PendingEvent
from services.ledger import domain
from services.ledger.domain import (
    MEMBER_PURSES,
    AccountBalance,
    AccountStatus,
    Guard,
    Hold,
    HoldStatus,
    OwnerKind,
    PayLeg,
    Posting,
    PurseKind,
    Transfer,
    TransferKind,
    TrialBalance,
    WriteResult,
)
from services.ledger.store import LedgerStore, TenantTx, event_data

SUBJECT_TRANSFER_POSTED = "ledger.transfer.posted"
SUBJECT_HOLD = {
    HoldStatus.PENDING: "ledger.hold.created",
    HoldStatus.CAPTURED: "ledger.hold.captured",
    HoldStatus.VOIDED: "ledger.hold.voided",
    HoldStatus.EXPIRED: "ledger.hold.expired",
}
_MERCHANT = frozenset({PurseKind.MERCHANT_SETTLEMENT})


def _posted_event(transfer: Transfer, *, applied_guards: Sequence[tuple[Guard, int]] = ()) -> PendingEvent:
    # A guarded payment says which counters it raised and to what, so a consumer (reports,
    # policy) need not ask GetUsageCounters; other transfers keep their data as it was.
    extra: dict[str, Any] = {}
    if applied_guards:
        extra["guards"] = [{"counter_key": g.counter_key, "increment": g.increment, "limit": g.limit,
                            "value_after": value_after} for g, value_after in applied_guards]
    return PendingEvent(subject=SUBJECT_TRANSFER_POSTED, event_type=SUBJECT_TRANSFER_POSTED,
                        tenant_id=str(transfer.tenant_id), data=event_data(transfer, **extra))


def _hold_event(transfer: Transfer, hold: Hold) -> PendingEvent:
    subject = SUBJECT_HOLD[hold.status]
    return PendingEvent(subject=subject, event_type=subject, tenant_id=str(transfer.tenant_id),
                        data=event_data(transfer, hold_id=str(hold.hold_id), hold_status=hold.status.value,
                                        account_id=str(hold.account_id), hold_amount_fen=hold.amount_fen,
                                        expires_at=hold.expires_at.isoformat()))


def _sharded(accounts: dict[uuid.UUID, AccountBalance]) -> set[uuid.UUID]:
    return {a for a, ab in accounts.items() if ab.account.sharded}


class Ledger:
    def __init__(self, store: LedgerStore):
        self._store = store

    async def _idempotent(self, *, tenant_id: uuid.UUID, idempotency_key: str, operation: str,
                          request: dict[str, Any], body: Callable[[TenantTx], Awaitable[WriteResult]]) -> WriteResult:
        key = domain.check_idempotency_key(idempotency_key)
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
        async with self._store.tenant_tx(tenant_id) as tx:
            account, created = await tx.open_account(owner_kind=owner, owner_id=owner_id, purse_kind=purse, ref=ref,
                                                     no_overdraft=flag)
            return await tx.account(account.account_id), created

    async def set_status(self, *, tenant_id: uuid.UUID, account_id: uuid.UUID,
                         status: AccountStatus) -> AccountBalance:
        async with self._store.tenant_tx(tenant_id) as tx:
            await tx.set_status(account_id, status=status)
            return await tx.account(account_id)

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
                  guards: tuple[Guard, ...] = ()) -> WriteResult:
        domain.check_pay_legs(legs)
        checked_guards = domain.check_guards(list(guards))
        if any(leg.account_id == merchant_account_id for leg in legs):
            raise InvalidArgument("a purse cannot pay itself", reason="SAME_ACCOUNT")
        total_fen = sum(leg.amount_fen for leg in legs)
        request = {"merchant": str(merchant_account_id), "legs": [[str(l.account_id), l.amount_fen] for l in legs],
                   "device_id": device_id, "external_ref": external_ref, "event_time": event_time}
        if checked_guards:
            # Only when present, so the fingerprints of unguarded payments stay what they were.
            # Sorted by key: the same caps in another order are the same request.
            request["guards"] = [[g.counter_key, g.increment, g.limit] for g in checked_guards]

        async def body(tx: TenantTx) -> WriteResult:
            ids = [leg.account_id for leg in legs]
            accounts = await tx.accounts([*ids, merchant_account_id], lock_unsharded=True)
            domain.check_one_member([accounts[a].account for a in ids])
            merchant = accounts[merchant_account_id]
            domain.check_purse(merchant.account, kinds=_MERCHANT, what="merchant_account")
            domain.check_may_receive(merchant.account)
            for leg in legs:
                payer = accounts[leg.account_id]
                domain.check_may_debit(payer.account, balance=payer.balance, amount_fen=leg.amount_fen)
            # After the purses (lock order step 4), before post() touches the merchant's shard:
            # a refused guard raises and the whole transaction, key claim included, rolls back.
            applied = await self._raise_counters(tx, guards=checked_guards)
            transfer = await tx.post(
                kind=TransferKind.PAYMENT, idempotency_key=idempotency_key, amount_fen=total_fen,
                postings=[*(Posting(leg.account_id, -leg.amount_fen) for leg in legs),
                          Posting(merchant_account_id, total_fen)],
                sharded=_sharded(accounts), event_time=event_time, merchant_account_id=merchant_account_id,
                device_id=device_id, external_ref=external_ref,
            )
            await tx.record_payment(transfer_id=transfer.transfer_id, paid_fen=total_fen)
            await tx.record_guards(transfer.transfer_id, applied=applied)
            await tx.emit([_posted_event(transfer, applied_guards=applied)])
            balances = await tx.balances([*ids, merchant_account_id])
            return WriteResult(transfer_id=transfer.transfer_id, balances=balances)

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="pay",
                                      request=request, body=body)

    @staticmethod
    async def _raise_counters(tx: TenantTx, *, guards: list[Guard]) -> list[tuple[Guard, int]]:
        """Raise each guard's counter, in key order; GUARD_EXCEEDED at the first that would pass
        its limit (the caller's transaction then rolls back the ones already raised)."""
        applied = []
        for guard in guards:
            value = await tx.raise_counter(guard)
            if value is None:
                raise domain.guard_exceeded(guard)
            applied.append((guard, value))
        return applied

    async def refund(self, *, tenant_id: uuid.UUID, idempotency_key: str, payment_transfer_id: uuid.UUID,
                     amount_fen: int, external_ref: str) -> WriteResult:
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
            await tx.emit([_posted_event(transfer)])
            return WriteResult(transfer_id=transfer.transfer_id, balances=await tx.balances([*ids, merchant_id]))

        return await self._idempotent(tenant_id=tenant_id, idempotency_key=idempotency_key, operation="refund",
                                      request=request, body=body)

    # --- holds --------------------------------------------------------------------------------

    async def create_hold(self, *, tenant_id: uuid.UUID, idempotency_key: str, account_id: uuid.UUID,
                          merchant_account_id: uuid.UUID, amount_fen: int, timeout_s: int, device_id: str,
                          external_ref: str) -> WriteResult:
        domain.check_amount(amount_fen)
        timeout_s = domain.check_hold_timeout(timeout_s)
        if account_id == merchant_account_id:
            raise InvalidArgument("a purse cannot pay itself", reason="SAME_ACCOUNT")
        request = {"account": str(account_id), "merchant": str(merchant_account_id), "amount_fen": amount_fen,
                   "timeout_s": timeout_s, "device_id": device_id, "external_ref": external_ref}

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
                merchant_account_id=merchant_account_id, device_id=device_id, external_ref=external_ref,
            )
            hold = await tx.create_hold(hold_id=transfer.transfer_id, account_id=account_id,
                                        merchant_account_id=merchant_account_id, amount_fen=amount_fen,
                                        timeout_s=timeout_s)
            await tx.emit([_hold_event(transfer, hold)])
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
        transfer = await tx.post(
            kind=kind, idempotency_key=idempotency_key, amount_fen=amount_fen, postings=postings,
            sharded=_sharded(accounts), event_time=None, merchant_account_id=hold.merchant_account_id,
            original_transfer_id=hold.hold_id,
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

    async def hold(self, *, tenant_id: uuid.UUID, hold_id: uuid.UUID) -> Hold:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.hold(hold_id)

    async def lookup(self, *, tenant_id: uuid.UUID, idempotency_key: str) -> Transfer | None:
        key = domain.check_idempotency_key(idempotency_key)
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.transfer_by_key(key)

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

    async def trial_balance(self, *, tenant_id: uuid.UUID) -> TrialBalance:
        async with self._store.tenant_read(tenant_id) as tx:
            return await tx.trial_balance()

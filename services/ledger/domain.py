"""The ledger's rules: plain data and decisions, no I/O and no protobuf.

Choices made here where the issue left them open:

- Member purses (cash, subsidy, voucher) are always no-overdraft; other accounts take the flag
  they are opened with. An account that may go below zero is sharded (docs/ledger.md).
- A frozen account takes no new payment, top-up or hold; a refund, and the capture, void or
  expiry of a hold made before the freeze, still reach it (money owed must not get stuck).
- A refund returns money to the payment's purses in reverse order of the legs (the purse drawn
  last, typically cash, first), never more to a purse than its leg paid.
- Idempotency keys are per tenant and shared by every kind of write; a write that fails leaves
  its key unused, so a retry after a top-up can succeed.
- A partner's bank clearing account has a credit limit: the floor its balance may not go below
  (0 when opened: the bank tops up what it prefunded, nothing more). It is checked on the locked
  row in the top-up's own transaction (and by a CHECK on the row), so clearing accounts are never
  sharded. The tenant may lower the limit to what the bank already owes, not below (to stop a bank
  at once, freeze its clearing account).
- A funding (the bank's transfer to the school) credits the clearing account and debits the
  tenant's one bank receipts account, so what a partner may top up is its balance plus its credit
  limit. A bank reference funds a clearing account once. Fundings, top-up reversals and refunds to
  the bank reach a frozen clearing account: money already moved at the bank must be booked.
- A top-up reversal takes back exactly the top-up's amount from the cash purse it credited, once,
  and only while the purse still holds it (a frozen purse too: the money never arrived).
- A low-balance threshold watches a cash purse's available balance; a crossing from at or above it
  to below it is an event, found on the rows the write already locked (docs/reconciliation.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from runtime import paging
from runtime import idempotency
from runtime.idempotency import split_key
from runtime.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound

CURRENCY = "CNY"
# One transfer moves at most 1,000,000 yuan: far above any campus payment, far below int64.
MAX_AMOUNT_FEN = 100_000_000
MAX_PAY_LEGS = 8
MAX_ID_CHARS = 64
MAX_REF_CHARS = 128
DEFAULT_HOLD_TIMEOUT_S = 300
MAX_HOLD_TIMEOUT_S = 7 * 24 * 3600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_BALANCE_ACCOUNTS = 100
SHARD_COUNT = 8
MAX_GUARDS = 8
MAX_COUNTER_KEY_CHARS = 200
# A guard's increment is one payment's worth (its amount in fen, or a count); its limit leaves
# room so value + increment never nears BIGINT's end.
MAX_GUARD_INCREMENT = MAX_AMOUNT_FEN
MAX_GUARD_LIMIT = 10**15
MAX_COUNTER_READ_KEYS = 100
MAX_MEMBER_STATE_QUESTIONS = 200
# A clearing account's credit limit: what the tenant lets a bank owe it. Far above any campus, far
# below where posted - pending could overflow.
MAX_CREDIT_LIMIT_FEN = 10**15
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class OwnerKind(StrEnum):
    MEMBER = "member"
    MERCHANT = "merchant"
    TENANT = "tenant"
    SYSTEM = "system"


class PurseKind(StrEnum):
    CASH = "cash"
    SUBSIDY = "subsidy"
    VOUCHER = "voucher"
    MERCHANT_SETTLEMENT = "merchant_settlement"
    BANK_CLEARING = "bank_clearing"
    SUBSIDY_FUNDING = "subsidy_funding"
    RECEIVABLE = "receivable"
    # The school's bank receipts: what partners paid in to fund their clearing accounts.
    BANK_RECEIPTS = "bank_receipts"


MEMBER_PURSES = frozenset({PurseKind.CASH, PurseKind.SUBSIDY, PurseKind.VOUCHER})
# Which owners may hold which purses.
_PURSES_BY_OWNER = {
    # A member's receivable holds what an offline payment could not take from the purses.
    OwnerKind.MEMBER: MEMBER_PURSES | {PurseKind.RECEIVABLE},
    OwnerKind.MERCHANT: frozenset({PurseKind.MERCHANT_SETTLEMENT, PurseKind.RECEIVABLE}),
    OwnerKind.TENANT: frozenset({PurseKind.BANK_CLEARING, PurseKind.SUBSIDY_FUNDING, PurseKind.RECEIVABLE,
                                 PurseKind.BANK_RECEIPTS}),
    OwnerKind.SYSTEM: frozenset({PurseKind.BANK_CLEARING, PurseKind.SUBSIDY_FUNDING, PurseKind.RECEIVABLE}),
}
# Subsidies are per program and vouchers per campaign: those purses need a ref.
_NEEDS_REF = frozenset({PurseKind.SUBSIDY, PurseKind.VOUCHER})
# Money into a member purse: the source account's kind decides which purses it may fund, and the
# kind of transfer it books.
FUNDING_ROUTES = {
    PurseKind.BANK_CLEARING: (frozenset({PurseKind.CASH}), "top_up"),
    PurseKind.SUBSIDY_FUNDING: (frozenset({PurseKind.SUBSIDY, PurseKind.VOUCHER}), "subsidy_grant"),
}


class AccountStatus(StrEnum):
    OPEN = "open"
    FROZEN = "frozen"
    # A purse of an ended program: nothing new reaches it or leaves it.
    CLOSED = "closed"


class TransferKind(StrEnum):
    TOP_UP = "top_up"
    PAYMENT = "payment"
    REFUND = "refund"
    HOLD = "hold"
    CAPTURE = "capture"
    VOID = "void"
    EXPIRY = "expiry"
    SUBSIDY_GRANT = "subsidy_grant"
    SUBSIDY_EXPIRY = "subsidy_expiry"
    CLAWBACK = "clawback"
    OFFLINE_SETTLEMENT = "offline_settlement"
    # The bank's transfer to the school, credited to its clearing account.
    CLEARING_FUNDING = "clearing_funding"
    # A top-up undone (the bank's own transfer failed): the money back to the clearing account.
    TOP_UP_REVERSAL = "top_up_reversal"
    # A member's cash paid back out through a partner's clearing account (a leaver's refund).
    BANK_REFUND = "bank_refund"


class HoldStatus(StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Account:
    tenant_id: uuid.UUID
    account_id: uuid.UUID
    owner_kind: OwnerKind
    owner_id: str
    purse_kind: PurseKind
    ref: str
    no_overdraft: bool
    sharded: bool
    status: AccountStatus
    # Bank clearing accounts only: how far below zero the balance may go. None: no such floor.
    credit_limit_fen: int | None = None
    # Cash purses only: crossing below it emits ledger.balance.low. None: not watched.
    low_balance_threshold_fen: int | None = None


@dataclass(frozen=True)
class Balance:
    account_id: uuid.UUID
    posted_fen: int
    pending_fen: int

    @property
    def available_fen(self) -> int:
        return self.posted_fen - self.pending_fen

    def to_json(self) -> dict[str, Any]:
        return {"account_id": str(self.account_id), "posted_fen": self.posted_fen, "pending_fen": self.pending_fen}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Balance:
        return cls(account_id=uuid.UUID(data["account_id"]), posted_fen=data["posted_fen"],
                   pending_fen=data["pending_fen"])


@dataclass(frozen=True)
class AccountBalance:
    account: Account
    balance: Balance


@dataclass(frozen=True)
class Posting:
    account_id: uuid.UUID
    amount_fen: int
    pending_fen: int = 0


@dataclass(frozen=True)
class CodeRef:
    """One use of an e-code: its credential and counter (or a rotating token's sequence)."""

    credential_id: str
    counter: int


@dataclass(frozen=True)
class Transfer:
    tenant_id: uuid.UUID
    transfer_id: uuid.UUID
    kind: TransferKind
    idempotency_key: str
    amount_fen: int
    postings: tuple[Posting, ...]
    event_time: datetime
    booked_at: datetime
    merchant_account_id: uuid.UUID | None = None
    device_id: str = ""
    external_ref: str = ""
    original_transfer_id: uuid.UUID | None = None
    code: CodeRef | None = None


@dataclass(frozen=True)
class Hold:
    hold_id: uuid.UUID
    account_id: uuid.UUID
    merchant_account_id: uuid.UUID
    amount_fen: int
    status: HoldStatus
    expires_at: datetime
    settled_by_transfer_id: uuid.UUID | None


@dataclass(frozen=True)
class WriteResult:
    """What a write answers, and what a repeat of it answers: the transfer and the balances then."""

    transfer_id: uuid.UUID
    balances: tuple[Balance, ...]
    hold_id: uuid.UUID | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "transfer_id": str(self.transfer_id),
            "hold_id": str(self.hold_id) if self.hold_id else None,
            "balances": [b.to_json() for b in self.balances],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WriteResult:
        return cls(
            transfer_id=uuid.UUID(data["transfer_id"]),
            hold_id=uuid.UUID(data["hold_id"]) if data.get("hold_id") else None,
            balances=tuple(Balance.from_json(b) for b in data["balances"]),
        )


@dataclass(frozen=True)
class PayLeg:
    account_id: uuid.UUID
    amount_fen: int


@dataclass(frozen=True)
class Guard:
    """A cap on a usage counter: this payment adds ``increment``; the counter stays <= ``limit``."""

    counter_key: str
    increment: int
    limit: int


@dataclass(frozen=True)
class PurseKindTotal:
    purse_kind: PurseKind
    posted_fen: int
    pending_fen: int
    accounts: int


@dataclass(frozen=True)
class TrialBalance:
    postings_sum_fen: int
    balances_sum_fen: int
    totals: tuple[PurseKindTotal, ...] = field(default_factory=tuple)

    @property
    def balanced(self) -> bool:
        return self.postings_sum_fen == 0 and self.balances_sum_fen == 0


# --- parsing ----------------------------------------------------------------------------------


def parse_uuid(value: str, *, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"{what} must be a UUID", reason=f"INVALID_{what.upper()}") from None


def parse_account_ref(value: str, *, what: str = "account_id") -> uuid.UUID:
    """An account id from a caller; one that is not even a UUID is simply not found."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(f"no such {what.replace('_id', '')}", reason="ACCOUNT_NOT_FOUND") from None


def check_idempotency_key(value: str) -> str:
    if not value:
        raise InvalidArgument("idempotency_key is required on every write", reason="IDEMPOTENCY_KEY_REQUIRED")
    return idempotency.check_idempotency_key(value)


def check_stored_key(value: str) -> str:
    """A key as the ledger files it: the caller's key, checked as ``check_idempotency_key`` does,
    under its scope (``<scope>/<key>``, runtime.idempotency)."""
    _scope, key = split_key(value)
    check_idempotency_key(key)
    return value


class ReversalOutcome(StrEnum):
    REVERSED = "reversed"
    PREVENTED = "prevented"


@dataclass(frozen=True)
class Reversal:
    outcome: ReversalOutcome
    payment_id: uuid.UUID | None = None
    refund_id: uuid.UUID | None = None


MAX_REVERSAL_REASON_CHARS = 64


def reversal_refund_key(payment_key: str) -> str:
    """The key a reversal's refund books under: the payment's key in a scope of its own, which no
    caller can name (runtime.idempotency), so the refund happens once and nobody can take its key."""
    scope, key = split_key(payment_key)
    return f"{REVERSAL}.{scope or 'unscoped'}/{key}"


def check_request_fingerprint(value: bytes) -> bytes | None:
    """A caller's fingerprint of the request a write carries out: a SHA-256, or none."""
    if not value:
        return None
    if len(value) != 32:
        raise InvalidArgument("request_fingerprint is a SHA-256 (32 bytes)", reason="INVALID_REQUEST_FINGERPRINT")
    return value


def check_amount(amount_fen: int, *, what: str = "amount_fen") -> int:
    if amount_fen <= 0:
        raise InvalidArgument(f"{what} must be above zero", reason="INVALID_AMOUNT")
    if amount_fen > MAX_AMOUNT_FEN:
        raise InvalidArgument(f"{what} must be at most {MAX_AMOUNT_FEN} fen", reason="AMOUNT_TOO_LARGE")
    return amount_fen


def check_text(value: str, *, what: str, max_chars: int, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument(f"{what} is required", reason=f"INVALID_{what.upper()}")
    if len(value) > max_chars or _CONTROL.search(value):
        raise InvalidArgument(f"{what} must be at most {max_chars} characters, without control characters",
                              reason=f"INVALID_{what.upper()}")
    return value


def check_new_account(*, owner_kind: OwnerKind | None, owner_id: str, purse_kind: PurseKind | None, ref: str,
                      no_overdraft: bool) -> tuple[OwnerKind, PurseKind, bool]:
    """The owner and purse of an account to open, and its effective no-overdraft flag."""
    if owner_kind is None:
        raise InvalidArgument("owner_kind is required", reason="INVALID_OWNER_KIND")
    if purse_kind is None:
        raise InvalidArgument("purse_kind is required", reason="INVALID_PURSE_KIND")
    check_text(owner_id, what="owner_id", max_chars=MAX_ID_CHARS, required=True)
    check_text(ref, what="ref", max_chars=MAX_ID_CHARS)
    if purse_kind not in _PURSES_BY_OWNER[owner_kind]:
        raise InvalidArgument(f"a {owner_kind.value} cannot hold a {purse_kind.value} purse",
                              reason="PURSE_KIND_NOT_ALLOWED")
    if purse_kind in _NEEDS_REF and not ref:
        raise InvalidArgument(f"a {purse_kind.value} purse needs its program or campaign as ref",
                              reason="REF_REQUIRED")
    return owner_kind, purse_kind, no_overdraft or purse_kind in MEMBER_PURSES


@dataclass(frozen=True)
class AccountLayout:
    """How a new account is kept: its no-overdraft flag, whether its balance is sharded, and its
    credit limit."""

    no_overdraft: bool
    sharded: bool
    credit_limit_fen: int | None


def account_layout(*, purse_kind: PurseKind, no_overdraft: bool) -> AccountLayout:
    """A clearing account starts with a credit limit of 0 (prefunded only) and one row (its floor
    is checked on the whole balance); any other account that may go below zero is sharded."""
    if purse_kind is PurseKind.BANK_CLEARING:
        return AccountLayout(no_overdraft=False, sharded=False, credit_limit_fen=0)
    return AccountLayout(no_overdraft=no_overdraft, sharded=not no_overdraft, credit_limit_fen=None)


def credit_used_fen(balance: Balance) -> int:
    """What a clearing account's bank owes: how far its available balance is below zero."""
    return max(0, -balance.available_fen)


def check_credit_limit(account: Account, *, balance: Balance, credit_limit_fen: int) -> int:
    """A new credit limit for a clearing account: 0..MAX_CREDIT_LIMIT_FEN, and not below what the
    bank already owes (lower it to that to stop further top-ups; freeze the account to stop them
    at once)."""
    check_purse(account, kinds=frozenset({PurseKind.BANK_CLEARING}), what="a credit limit's account")
    if not 0 <= credit_limit_fen <= MAX_CREDIT_LIMIT_FEN:
        raise InvalidArgument(f"credit_limit_fen must be 0..{MAX_CREDIT_LIMIT_FEN}", reason="INVALID_CREDIT_LIMIT")
    used = credit_used_fen(balance)
    if credit_limit_fen < used:
        raise FailedPrecondition(f"the bank already owes {used} fen; the credit limit cannot go below that",
                                 reason="CREDIT_LIMIT_BELOW_USE",
                                 metadata={"account_id": str(account.account_id), "credit_used_fen": str(used)})
    return credit_limit_fen


def check_hold_timeout(timeout_s: int) -> int:
    if timeout_s == 0:
        return DEFAULT_HOLD_TIMEOUT_S
    if not 1 <= timeout_s <= MAX_HOLD_TIMEOUT_S:
        raise InvalidArgument(f"timeout_s must be 1..{MAX_HOLD_TIMEOUT_S}", reason="INVALID_TIMEOUT")
    return timeout_s


def page_size(requested: int) -> int:
    return paging.page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


# Page tokens are the runtime's: a position, opaque to callers.
parse_page_token = paging.parse_page_token
page_token = paging.page_token


# --- idempotency ------------------------------------------------------------------------------


def fingerprint(*, operation: str, request: dict[str, Any]) -> bytes:
    """A hash of the canonical request: the same request under a key hashes the same."""
    canonical = json.dumps({"operation": operation, "request": request}, sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).digest()


REVERSAL = "reversal"


def check_same_request(*, stored_operation: str, stored_fingerprint: bytes, operation: str,
                       request_fingerprint: bytes) -> None:
    if stored_operation == REVERSAL and operation != REVERSAL:
        # The caller gave up on this write and reversed it before it arrived: it never happens.
        raise FailedPrecondition("this payment was reversed before it reached the ledger", reason="PAYMENT_REVERSED")
    if stored_operation != operation or stored_fingerprint != request_fingerprint:
        raise Conflict("this idempotency key was used for a different request", reason="IDEMPOTENCY_KEY_REUSED")


# --- account checks ---------------------------------------------------------------------------


def _check_takes_new(account: Account) -> None:
    if account.status is AccountStatus.FROZEN:
        raise FailedPrecondition("the account is frozen", reason="ACCOUNT_FROZEN",
                                 metadata={"account_id": str(account.account_id)})
    if account.status is AccountStatus.CLOSED:
        raise FailedPrecondition("the account is closed (its program ended)", reason="ACCOUNT_CLOSED",
                                 metadata={"account_id": str(account.account_id)})


def check_may_debit(account: Account, *, balance: Balance, amount_fen: int) -> None:
    """A member purse paying ``amount_fen`` now (or holding it), or a clearing account topping up."""
    _check_takes_new(account)
    if account.no_overdraft and balance.available_fen < amount_fen:
        raise FailedPrecondition("insufficient funds", reason="INSUFFICIENT_FUNDS",
                                 metadata={"account_id": str(account.account_id)})
    if account.credit_limit_fen is not None and balance.available_fen - amount_fen < -account.credit_limit_fen:
        headroom = max(0, balance.available_fen + account.credit_limit_fen)
        raise FailedPrecondition(
            f"this would take the clearing account past its credit limit of {account.credit_limit_fen} fen "
            f"({headroom} fen left)", reason="CREDIT_LIMIT_EXCEEDED",
            metadata={"account_id": str(account.account_id), "credit_limit_fen": str(account.credit_limit_fen),
                      "available_credit_fen": str(headroom)})


def check_may_receive(account: Account) -> None:
    _check_takes_new(account)


def check_purse(account: Account, *, kinds: frozenset[PurseKind], what: str) -> None:
    if account.purse_kind not in kinds:
        raise InvalidArgument(f"{what} must be a {' or '.join(sorted(k.value for k in kinds))} account",
                              reason="WRONG_ACCOUNT_KIND", metadata={"account_id": str(account.account_id)})


def funding_kind(*, source: Account, target: Account) -> TransferKind:
    """The transfer a top-up books: bank clearing to cash, or subsidy funding to a subsidy or
    voucher purse (one grant)."""
    route = FUNDING_ROUTES.get(source.purse_kind)
    if route is None:
        raise InvalidArgument("from_account must be a bank_clearing or subsidy_funding account",
                              reason="WRONG_ACCOUNT_KIND", metadata={"account_id": str(source.account_id)})
    targets, kind = route
    check_purse(target, kinds=targets, what="to_account")
    return TransferKind(kind)


def check_pay_legs(legs: list[PayLeg]) -> list[PayLeg]:
    if not legs:
        raise InvalidArgument("a payment needs at least one leg", reason="NO_LEGS")
    if len(legs) > MAX_PAY_LEGS:
        raise InvalidArgument(f"a payment has at most {MAX_PAY_LEGS} legs", reason="TOO_MANY_LEGS")
    if len({leg.account_id for leg in legs}) != len(legs):
        raise InvalidArgument("each purse appears once in a payment", reason="DUPLICATE_LEG")
    for leg in legs:
        check_amount(leg.amount_fen)
    check_amount(sum(leg.amount_fen for leg in legs), what="the payment's total")
    return legs


def check_counter_key(value: str) -> str:
    if not value or len(value) > MAX_COUNTER_KEY_CHARS or not _PRINTABLE.match(value):
        raise InvalidArgument(f"counter_key must be 1..{MAX_COUNTER_KEY_CHARS} printable ASCII characters, no spaces",
                              reason="INVALID_COUNTER_KEY")
    return value


def check_guards(guards: list[Guard]) -> list[Guard]:
    """The guards of a payment, sorted by counter key: the order their rows are locked in, the
    same for every payment, so two payments sharing counters never wait on each other in a cycle."""
    if len(guards) > MAX_GUARDS:
        raise InvalidArgument(f"a payment has at most {MAX_GUARDS} guards", reason="TOO_MANY_GUARDS")
    for guard in guards:
        check_counter_key(guard.counter_key)
        if not 0 < guard.increment <= MAX_GUARD_INCREMENT:
            raise InvalidArgument(f"a guard's increment must be 1..{MAX_GUARD_INCREMENT}",
                                  reason="INVALID_GUARD_INCREMENT", metadata={"counter_key": guard.counter_key})
        if not 0 <= guard.limit <= MAX_GUARD_LIMIT:
            raise InvalidArgument(f"a guard's limit must be 0..{MAX_GUARD_LIMIT}", reason="INVALID_GUARD_LIMIT",
                                  metadata={"counter_key": guard.counter_key})
    if len({g.counter_key for g in guards}) != len(guards):
        # Two caps on one counter in one payment would be one cap stated twice, or a mistake.
        raise InvalidArgument("each counter appears once in a payment's guards", reason="DUPLICATE_GUARD")
    return sorted(guards, key=lambda g: g.counter_key)


def guard_exceeded(guard: Guard) -> FailedPrecondition:
    return FailedPrecondition(f"the guard on {guard.counter_key} would pass its limit of {guard.limit}",
                              reason="GUARD_EXCEEDED", metadata={"counter_key": guard.counter_key})


def check_counter_keys(keys: list[str]) -> list[str]:
    if not 1 <= len(keys) <= MAX_COUNTER_READ_KEYS:
        raise InvalidArgument(f"give 1..{MAX_COUNTER_READ_KEYS} counter_keys", reason="INVALID_QUERY")
    return [check_counter_key(k) for k in keys]


def check_one_member(accounts: list[Account]) -> None:
    """Every leg of a payment is a purse of the same member."""
    check_purse(accounts[0], kinds=MEMBER_PURSES, what="a paying purse")
    for account in accounts:
        check_purse(account, kinds=MEMBER_PURSES, what="a paying purse")
        if (account.owner_kind, account.owner_id) != (accounts[0].owner_kind, accounts[0].owner_id):
            raise InvalidArgument("every leg of a payment is a purse of the same member", reason="LEGS_OF_MANY_OWNERS")


def refund_allocation(*, legs: list[Posting], refunded_by_account: dict[uuid.UUID, int],
                      amount_fen: int) -> list[Posting]:
    """How a refund of ``amount_fen`` returns to the payment's purses: in reverse order of the
    legs, each at most what its leg paid less what earlier refunds gave it back."""
    remaining = amount_fen
    credits: list[Posting] = []
    for leg in reversed(legs):
        paid = -leg.amount_fen
        room = paid - refunded_by_account.get(leg.account_id, 0)
        take = min(room, remaining)
        if take > 0:
            credits.append(Posting(account_id=leg.account_id, amount_fen=take))
            remaining -= take
        if remaining == 0:
            break
    if remaining:
        raise FailedPrecondition("a refund cannot exceed what the payment paid", reason="REFUND_EXCEEDS_PAYMENT")
    return credits


def refund_amount(*, requested_fen: int, paid_fen: int, refunded_fen: int) -> int:
    """0 refunds the rest; more than the rest is refused."""
    rest = paid_fen - refunded_fen
    if requested_fen < 0:
        raise InvalidArgument("amount_fen must not be negative", reason="INVALID_AMOUNT")
    if rest <= 0:
        raise FailedPrecondition("the payment is fully refunded", reason="ALREADY_REFUNDED")
    amount = requested_fen or rest
    check_amount(amount)
    if amount > rest:
        raise FailedPrecondition(f"a refund cannot exceed what is left of the payment ({rest} fen)",
                                 reason="REFUND_EXCEEDS_PAYMENT", metadata={"refundable_fen": str(rest)})
    return amount


def capture_amount(*, requested_fen: int, hold_fen: int) -> int:
    if requested_fen < 0:
        raise InvalidArgument("amount_fen must not be negative", reason="INVALID_AMOUNT")
    amount = requested_fen or hold_fen
    if amount > hold_fen:
        raise FailedPrecondition("a capture cannot exceed its hold", reason="CAPTURE_EXCEEDS_HOLD")
    return amount


def check_hold_pending(hold: Hold, *, now: datetime) -> None:
    if hold.status is not HoldStatus.PENDING:
        raise FailedPrecondition(f"the hold is {hold.status.value}", reason="HOLD_NOT_PENDING",
                                 metadata={"status": hold.status.value})
    if hold.expires_at <= now:
        raise FailedPrecondition("the hold has expired", reason="HOLD_NOT_PENDING", metadata={"status": "expired"})


def check_covers(account: Account, *, balance: Balance, amount_fen: int) -> None:
    """A debit that a frozen account still takes (a refund out of a merchant) but no overdraft."""
    if account.no_overdraft and balance.available_fen < amount_fen:
        raise FailedPrecondition("insufficient funds", reason="INSUFFICIENT_FUNDS",
                                 metadata={"account_id": str(account.account_id)})


def check_status_change(account: Account, *, status: AccountStatus) -> None:
    """Freeze and unfreeze: a closed purse stays closed."""
    if account.status is AccountStatus.CLOSED:
        raise FailedPrecondition("the account is closed (its program ended)", reason="ACCOUNT_CLOSED",
                                 metadata={"account_id": str(account.account_id)})


# --- programs and grant batches -------------------------------------------------------------

PROGRAM_PURSES = frozenset({PurseKind.SUBSIDY, PurseKind.VOUCHER})
MAX_GRANT_ROWS = 50_000
MAX_BILL_CHARS = 64
GRANT_CHUNK_ROWS = 500
EXPIRY_CHUNK_PURSES = 500
DEFAULT_ROWS_PAGE = 100
MAX_ROWS_PAGE = 1000


class ProgramStatus(StrEnum):
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"


class GrantBatchStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"


class GrantRowStatus(StrEnum):
    PENDING = "pending"
    GRANTED = "granted"
    FAILED = "failed"


@dataclass(frozen=True)
class Program:
    tenant_id: uuid.UUID
    purse_kind: PurseKind
    ref: str
    funding_account_id: uuid.UUID
    ends_at: datetime | None
    status: ProgramStatus
    expired_purses: int = 0
    expired_fen: int = 0


@dataclass(frozen=True)
class GrantRow:
    member_id: str
    amount_fen: int


@dataclass(frozen=True)
class GrantBatch:
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    bill_number: str
    purse_kind: PurseKind
    ref: str
    status: GrantBatchStatus
    total_rows: int
    done_rows: int
    granted_rows: int
    failed_rows: int
    granted_fen: int
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class GrantRowResult:
    line: int
    member_id: str
    amount_fen: int
    status: GrantRowStatus
    transfer_id: uuid.UUID | None = None
    account_id: uuid.UUID | None = None
    reason: str = ""
    message: str = ""


def check_program_purse(purse_kind: PurseKind | None) -> PurseKind:
    if purse_kind not in PROGRAM_PURSES:
        raise InvalidArgument("a program's purse_kind is subsidy or voucher", reason="INVALID_PURSE_KIND")
    assert purse_kind is not None
    return purse_kind


def check_program_ref(ref: str) -> str:
    return check_text(ref, what="ref", max_chars=MAX_ID_CHARS, required=True)


def check_redefinition(existing: Program, *, funding_account_id: uuid.UUID) -> None:
    if existing.funding_account_id != funding_account_id:
        raise Conflict("the program is defined with another funding account", reason="PROGRAM_FUNDING_FIXED")
    if existing.status is not ProgramStatus.ACTIVE:
        raise FailedPrecondition("the program has ended", reason="PROGRAM_ENDED")


def check_program_active(program: Program, *, now: datetime) -> None:
    if program.status is not ProgramStatus.ACTIVE or (program.ends_at is not None and program.ends_at <= now):
        raise FailedPrecondition("the program has ended", reason="PROGRAM_ENDED")


def check_bill_number(value: str) -> str:
    if not value or len(value) > MAX_BILL_CHARS or not _PRINTABLE.match(value):
        raise InvalidArgument(f"bill_number must be 1..{MAX_BILL_CHARS} printable ASCII characters",
                              reason="INVALID_BILL_NUMBER")
    return value


def check_grant_rows(rows: list[GrantRow]) -> list[GrantRow]:
    """A batch's rows: 1..MAX_GRANT_ROWS, each member once, each amount valid. A bad row refuses
    the whole batch (it is the tenant's file that is wrong) and names the line."""
    if not 1 <= len(rows) <= MAX_GRANT_ROWS:
        raise InvalidArgument(f"a grant batch has 1..{MAX_GRANT_ROWS} rows", reason="INVALID_ROW_COUNT")
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        meta = {"line": str(line)}
        if not row.member_id or len(row.member_id) > MAX_ID_CHARS or _CONTROL.search(row.member_id):
            raise InvalidArgument(f"line {line}: member_id must be 1..{MAX_ID_CHARS} characters",
                                  reason="INVALID_MEMBER_ID", metadata=meta)
        if not 0 < row.amount_fen <= MAX_AMOUNT_FEN:
            raise InvalidArgument(f"line {line}: amount_fen must be 1..{MAX_AMOUNT_FEN}", reason="INVALID_AMOUNT",
                                  metadata=meta)
        if row.member_id in seen:
            raise InvalidArgument(f"line {line}: member {row.member_id} is already on line {seen[row.member_id]}",
                                  reason="DUPLICATE_MEMBER", metadata=meta)
        seen[row.member_id] = line
    return rows


def grant_key(bill_number: str, line: int) -> str:
    """The idempotency key of a batch row's transfer: a grant is booked once however often its
    chunk is retried."""
    return f"grant:{bill_number}:{line}"


def rows_page_size(requested: int) -> int:
    return paging.page_size(requested, default=DEFAULT_ROWS_PAGE, maximum=MAX_ROWS_PAGE)


def clawback_amount(*, requested_fen: int, available_fen: int) -> int:
    if requested_fen < 0:
        raise InvalidArgument("amount_fen must not be negative", reason="INVALID_AMOUNT")
    amount = requested_fen or available_fen
    if amount <= 0:
        raise FailedPrecondition("the purse holds nothing to take back", reason="INSUFFICIENT_FUNDS")
    check_amount(amount)
    if amount > available_fen:
        raise FailedPrecondition("a clawback cannot take more than the purse has available",
                                 reason="INSUFFICIENT_FUNDS")
    return amount


# --- offline settlement ---------------------------------------------------------------------

MAX_OFFLINE_RECORDS = 1000


class OfflineOutcome(StrEnum):
    BOOKED = "booked"
    SHORTFALL = "shortfall"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    CODE_REUSED = "code_reused"


@dataclass(frozen=True)
class OfflineRecord:
    idempotency_key: str
    merchant_account_id: uuid.UUID
    legs: tuple[PayLeg, ...]
    device_id: str
    external_ref: str
    event_time: datetime | None
    code: CodeRef | None = None

    def request(self) -> dict[str, Any]:
        request = {"merchant": str(self.merchant_account_id),
                   "legs": [[str(l.account_id), l.amount_fen] for l in self.legs],
                   "device_id": self.device_id, "external_ref": self.external_ref, "event_time": self.event_time}
        return with_code(request, self.code)


@dataclass(frozen=True)
class OfflineResult:
    idempotency_key: str
    outcome: OfflineOutcome
    transfer_id: uuid.UUID | None = None
    shortfall_fen: int = 0
    reason: str = ""
    message: str = ""


def check_offline_record(record: OfflineRecord) -> None:
    """What can be refused about a record without the database: the same rules as a payment, and
    the device's time is required."""
    check_stored_key(record.idempotency_key)
    check_pay_legs(list(record.legs))
    if any(leg.account_id == record.merchant_account_id for leg in record.legs):
        raise InvalidArgument("a purse cannot pay itself", reason="SAME_ACCOUNT")
    check_text(record.device_id, what="device_id", max_chars=MAX_ID_CHARS, required=True)
    check_text(record.external_ref, what="external_ref", max_chars=MAX_REF_CHARS)
    if record.event_time is None:
        raise InvalidArgument("an offline record needs the device's event_time", reason="EVENT_TIME_REQUIRED")
    check_code(record.code)


def offline_cover(*, legs: tuple[PayLeg, ...], available: dict[uuid.UUID, int]) -> tuple[list[Posting], int]:
    """What each purse gives to an offline payment: its leg, or what it has left if that is less
    (never below zero), and the total it could not give (the shortfall). ``available`` is updated.
    Frozen and closed purses give what they have too: the money was handed over already."""
    postings: list[Posting] = []
    shortfall = 0
    for leg in legs:
        has = max(available.get(leg.account_id, 0), 0)
        take = min(has, leg.amount_fen)
        if take:
            postings.append(Posting(leg.account_id, -take))
            available[leg.account_id] = has - take
        shortfall += leg.amount_fen - take
    return postings, shortfall


# --- statements -----------------------------------------------------------------------------

DEFAULT_TIME_ZONE = "Asia/Shanghai"
DEFAULT_STATEMENT_PAGE = 500
MAX_STATEMENT_PAGE = 5000
# The kinds that move a merchant's money: they are a statement's lines.
STATEMENT_KINDS = (TransferKind.PAYMENT, TransferKind.REFUND, TransferKind.CAPTURE, TransferKind.OFFLINE_SETTLEMENT)


@dataclass(frozen=True)
class StatementTotals:
    payments: int = 0
    payments_fen: int = 0
    refunds: int = 0
    refunds_fen: int = 0
    offline_settlements: int = 0
    captures: int = 0

    @property
    def net_fen(self) -> int:
        return self.payments_fen - self.refunds_fen


def statement_day(day_text: str, time_zone: str) -> tuple[datetime, datetime]:
    """The day's bounds [start, end) as aware datetimes, in the named zone (DST-safe: the next
    day's midnight, not start + 24 h)."""
    name = time_zone or DEFAULT_TIME_ZONE
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"unknown time zone {name!r}", reason="INVALID_TIME_ZONE") from None
    try:
        day = date.fromisoformat(day_text)
    except (ValueError, TypeError):
        raise InvalidArgument("date must be YYYY-MM-DD", reason="INVALID_DATE") from None
    if len(day_text) != 10:
        raise InvalidArgument("date must be YYYY-MM-DD", reason="INVALID_DATE")
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    following = day + timedelta(days=1)
    end = datetime(following.year, following.month, following.day, tzinfo=zone)
    return start, end


def statement_page_size(requested: int) -> int:
    return paging.page_size(requested, default=DEFAULT_STATEMENT_PAGE, maximum=MAX_STATEMENT_PAGE)


@dataclass(frozen=True)
class NewTransfer:
    """A transfer to book in a batch with others (grants, expiries, offline records)."""

    kind: TransferKind
    idempotency_key: str
    amount_fen: int
    postings: tuple[Posting, ...]
    event_time: datetime | None = None
    merchant_account_id: uuid.UUID | None = None
    device_id: str = ""
    external_ref: str = ""
    code: CodeRef | None = None


# --- e-code references ----------------------------------------------------------------------

MAX_CODE_COUNTER = 2**63 - 1


def check_code(code: CodeRef | None) -> CodeRef | None:
    """A code reference: None, or a credential id (a UUID) with a counter that fits BIGINT."""
    if code is None:
        return None
    try:
        credential = str(uuid.UUID(code.credential_id))
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument("code.credential_id must be a UUID", reason="INVALID_CODE_REF") from None
    if not 0 <= code.counter <= MAX_CODE_COUNTER:
        raise InvalidArgument("code.counter does not fit", reason="INVALID_CODE_REF")
    return CodeRef(credential_id=credential, counter=code.counter)


def with_code(request: dict[str, Any], code: CodeRef | None) -> dict[str, Any]:
    """A request's fingerprint input, with its code only when it has one (so the fingerprints of
    requests without a code stay what they were)."""
    if code is not None:
        request["code"] = [code.credential_id, code.counter]
    return request


def code_already_used(code: CodeRef) -> FailedPrecondition:
    return FailedPrecondition("this e-code (credential and counter) has paid already", reason="CODE_ALREADY_USED",
                              metadata={"credential_id": code.credential_id, "counter": str(code.counter)})


# --- payments -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayCommand:
    """One checked payment request: purses of one member to a merchant, with its guards (sorted
    by counter key) and the e-code that paid, if any."""

    idempotency_key: str
    merchant_account_id: uuid.UUID
    legs: tuple[PayLeg, ...]
    device_id: str = ""
    external_ref: str = ""
    event_time: datetime | None = None
    guards: tuple[Guard, ...] = ()
    code: CodeRef | None = None
    # A tenant's subsidy funding account paying part or all of it (an identity-only benefit).
    sponsor: PayLeg | None = None
    # The caller's fingerprint of the request this payment carries out: when set, what the key names.
    request_fingerprint: bytes | None = None

    def key_fingerprint(self) -> bytes:
        """What the idempotency key names: the caller's fingerprint when it gave one, else this request's."""
        return self.request_fingerprint or fingerprint(operation="pay", request=self.request())

    @property
    def total_fen(self) -> int:
        return sum(leg.amount_fen for leg in self.legs) + (self.sponsor.amount_fen if self.sponsor else 0)

    @property
    def paying(self) -> tuple[PayLeg, ...]:
        """Every leg that pays, the sponsor's last (a refund returns to it first)."""
        return (*self.legs, self.sponsor) if self.sponsor else self.legs

    def request(self) -> dict[str, Any]:
        """What the idempotency key names (the fingerprint's input)."""
        request: dict[str, Any] = {
            "merchant": str(self.merchant_account_id), "legs": [[str(l.account_id), l.amount_fen] for l in self.legs],
            "device_id": self.device_id, "external_ref": self.external_ref, "event_time": self.event_time,
        }
        if self.guards:
            # Only when present, so the fingerprints of unguarded payments stay what they were.
            request["guards"] = [[g.counter_key, g.increment, g.limit] for g in self.guards]
        if self.sponsor:
            request["sponsor"] = [str(self.sponsor.account_id), self.sponsor.amount_fen]
        return with_code(request, self.code)


def check_pay(*, idempotency_key: str, merchant_account_id: uuid.UUID, legs: list[PayLeg], device_id: str = "",
              external_ref: str = "", event_time: datetime | None = None, guards: tuple[Guard, ...] = (),
              code: CodeRef | None = None, sponsor: PayLeg | None = None,
              request_fingerprint: bytes | None = None) -> PayCommand:
    """A payment request checked as far as it can be without the database."""
    if legs or sponsor is None:
        check_pay_legs(legs)
    if sponsor is not None:
        check_amount(sponsor.amount_fen, what="the sponsor's amount_fen")
        if any(leg.account_id == sponsor.account_id for leg in legs):
            raise InvalidArgument("the sponsor is not one of the member's purses", reason="DUPLICATE_LEG")
        check_amount(sum(leg.amount_fen for leg in legs) + sponsor.amount_fen, what="the payment's total")
    checked_guards = check_guards(list(guards))
    paying = [*legs, *([sponsor] if sponsor else [])]
    if any(leg.account_id == merchant_account_id for leg in paying):
        raise InvalidArgument("a purse cannot pay itself", reason="SAME_ACCOUNT")
    checked_code = check_code(code)
    check_stored_key(idempotency_key)
    return PayCommand(idempotency_key=idempotency_key, merchant_account_id=merchant_account_id, legs=tuple(legs),
                      device_id=device_id, external_ref=external_ref, event_time=event_time,
                      guards=tuple(checked_guards), code=checked_code, sponsor=sponsor,
                      request_fingerprint=check_request_fingerprint(request_fingerprint or b""))


# --- prefunding, reversals, refunds to the bank, reconciliation -------------------------------

# The kinds of transfer that touch a partner's clearing account: the reconciliation file's lines,
# in the order its totals list them.
CLEARING_KINDS = (TransferKind.CLEARING_FUNDING, TransferKind.TOP_UP, TransferKind.TOP_UP_REVERSAL,
                  TransferKind.BANK_REFUND)
MAX_BANK_REFERENCE_CHARS = 128
DEFAULT_RECONCILIATION_PAGE = 1000
MAX_RECONCILIATION_PAGE = 5000
# A low-balance threshold: at most what one transfer may move.
MAX_LOW_BALANCE_THRESHOLD_FEN = MAX_AMOUNT_FEN
_CLEARING = frozenset({PurseKind.BANK_CLEARING})


@dataclass(frozen=True)
class Funding:
    """A bank's transfer to the school, as the tenant records it against a clearing account."""

    clearing_account_id: uuid.UUID
    amount_fen: int
    bank_reference: str
    value_date: date

    def request(self) -> dict[str, Any]:
        return {"clearing": str(self.clearing_account_id), "amount_fen": self.amount_fen,
                "bank_reference": self.bank_reference, "value_date": self.value_date.isoformat()}


def check_funding(*, clearing_account_id: uuid.UUID, amount_fen: int, bank_reference: str,
                  value_date: str) -> Funding:
    check_amount(amount_fen)
    if not bank_reference or len(bank_reference) > MAX_BANK_REFERENCE_CHARS or _CONTROL.search(bank_reference):
        raise InvalidArgument(f"bank_reference must be 1..{MAX_BANK_REFERENCE_CHARS} characters, without control "
                              "characters", reason="INVALID_BANK_REFERENCE")
    try:
        day = date.fromisoformat(value_date)
    except (ValueError, TypeError):
        raise InvalidArgument("value_date must be YYYY-MM-DD", reason="INVALID_VALUE_DATE") from None
    if len(value_date) != 10:
        raise InvalidArgument("value_date must be YYYY-MM-DD", reason="INVALID_VALUE_DATE")
    return Funding(clearing_account_id=clearing_account_id, amount_fen=amount_fen, bank_reference=bank_reference,
                   value_date=day)


def check_clearing_account(account: Account) -> None:
    check_purse(account, kinds=_CLEARING, what="clearing_account")


def bank_reference_used(bank_reference: str) -> Conflict:
    return Conflict("this bank reference has funded the clearing account already", reason="BANK_REFERENCE_USED",
                    metadata={"bank_reference": bank_reference})


def check_top_up_to_reverse(top_up: Transfer, *, clearing_account_id: uuid.UUID) -> tuple[uuid.UUID, int]:
    """The cash purse a top-up credited and its amount; a transfer that is not a top-up from this
    clearing account is not found (a partner learns nothing of another's transfers)."""
    debits = [p for p in top_up.postings if p.amount_fen < 0]
    credits = [p for p in top_up.postings if p.amount_fen > 0]
    if top_up.kind is not TransferKind.TOP_UP or [p.account_id for p in debits] != [clearing_account_id] \
            or len(credits) != 1:
        raise NotFound("no such top-up from this clearing account", reason="TRANSFER_NOT_FOUND")
    return credits[0].account_id, top_up.amount_fen


def already_reversed(reversal_id: uuid.UUID) -> FailedPrecondition:
    return FailedPrecondition("this top-up was reversed already", reason="TOP_UP_ALREADY_REVERSED",
                              metadata={"reversal_transfer_id": str(reversal_id)})


def check_purse_still_holds(purse: AccountBalance, *, amount_fen: int) -> None:
    """A reversal takes back exactly what the top-up gave, or nothing: the member spent it."""
    if purse.balance.available_fen < amount_fen:
        raise FailedPrecondition(
            f"the member's purse no longer holds the {amount_fen} fen of this top-up "
            f"({purse.balance.available_fen} fen available)", reason="TOP_UP_ALREADY_SPENT",
            metadata={"account_id": str(purse.account.account_id),
                      "available_fen": str(purse.balance.available_fen)})


def check_bank_refund(*, purse: AccountBalance, clearing: Account, amount_fen: int) -> None:
    check_purse(purse.account, kinds=frozenset({PurseKind.CASH}), what="a bank refund's purse")
    check_clearing_account(clearing)
    check_covers(purse.account, balance=purse.balance, amount_fen=amount_fen)


def check_low_balance_threshold(account: Account, threshold_fen: int | None) -> int | None:
    check_purse(account, kinds=frozenset({PurseKind.CASH}), what="a low-balance threshold's account")
    if threshold_fen is not None and not 0 <= threshold_fen <= MAX_LOW_BALANCE_THRESHOLD_FEN:
        raise InvalidArgument(f"threshold_fen must be 0..{MAX_LOW_BALANCE_THRESHOLD_FEN}",
                              reason="INVALID_THRESHOLD")
    return threshold_fen


@dataclass(frozen=True)
class LowBalance:
    """A purse that went from at or above its threshold to below it, by ``transfer_id``."""

    account: Account
    balance_fen: int
    threshold_fen: int
    transfer_id: uuid.UUID


class LowBalanceWatch:
    """Follows the available balance of the watched purses (those with a threshold) through the
    transfers of one transaction, in booking order, and names each crossing below a threshold:
    one per crossing, none for a payment made while already below."""

    def __init__(self, accounts: dict[uuid.UUID, AccountBalance]):
        self._watched = {a: ab.account for a, ab in accounts.items()
                         if ab.account.low_balance_threshold_fen is not None}
        self._available = {a: accounts[a].balance.available_fen for a in self._watched}

    def after(self, transfer: Transfer) -> list[LowBalance]:
        crossings: list[LowBalance] = []
        for posting in transfer.postings:
            account = self._watched.get(posting.account_id)
            if account is None:
                continue
            before = self._available[posting.account_id]
            after = before + posting.amount_fen - posting.pending_fen
            self._available[posting.account_id] = after
            threshold = account.low_balance_threshold_fen
            assert threshold is not None
            if before >= threshold > after:
                crossings.append(LowBalance(account=account, balance_fen=after, threshold_fen=threshold,
                                            transfer_id=transfer.transfer_id))
        return crossings


@dataclass(frozen=True)
class KindTotal:
    kind: TransferKind
    count: int
    clearing_fen: int


@dataclass(frozen=True)
class ReconciliationTotals:
    """A clearing account's day: the totals per kind (every kind of CLEARING_KINDS, zeros too),
    and its balance when the day opened and closed."""

    by_kind: tuple[KindTotal, ...]
    opening_fen: int
    closing_fen: int

    @property
    def count(self) -> int:
        return sum(t.count for t in self.by_kind)

    @property
    def net_fen(self) -> int:
        return sum(t.clearing_fen for t in self.by_kind)


def reconciliation_totals(*, by_kind: dict[TransferKind, tuple[int, int]], opening_fen: int,
                          closing_fen: int) -> ReconciliationTotals:
    return ReconciliationTotals(
        by_kind=tuple(KindTotal(kind=k, count=by_kind.get(k, (0, 0))[0], clearing_fen=by_kind.get(k, (0, 0))[1])
                      for k in CLEARING_KINDS),
        opening_fen=opening_fen, closing_fen=closing_fen)


@dataclass(frozen=True)
class ReconciliationLine:
    transfer: Transfer
    # The transfer's effect on the clearing account: fundings, reversals and bank refunds +, top-ups -.
    clearing_fen: int
    member_id: str
    value_date: date | None


def reconciliation_page_size(requested: int) -> int:
    return paging.page_size(requested, default=DEFAULT_RECONCILIATION_PAGE, maximum=MAX_RECONCILIATION_PAGE)

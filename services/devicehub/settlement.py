"""Offline records uploaded by a device: each becomes exactly one ledger transfer (payments) or one
access record (gates, shuttle readers), and every record gets a final outcome.

A record is believed only as far as its evidence goes (docs/devicehub.md §5): before anything is
booked, its signature and shape are checked here, then each new payment is checked again by
services.devicehub.recheck (its time against the device's hellos, the code or card it carries as
of its time, the rules the device could have held, the plan those rules make on the counters of
what this device settled). A payment that fails is REJECTED with the first reason, books nothing
and raises RECORD_REJECTED on the device; a device with many rejected records since its last
review is flagged (a DEVICE_FLAGGED alarm, critical).

One upload, one transaction holding the device's sequence row: the records already settled are
read, the new payments are checked, those believed go to LedgerService.SettleOffline in one call
(the plan's legs mapped to the members' accounts with one GetMemberStates read per 200 members),
the device's counters are raised by what was booked, the access records are inserted, every
record's outcome is stored per (device, sequence) and the device's sequence gaps are updated.
Alarms are raised after the commit. A re-upload answers DUPLICATE (its reason: what the first
upload of the record came to) and changes nothing. The ledger books under the key
``dev:<device_id>:<sequence>`` in the device's key scope (``device:<device_id>``: no partner's key
can take it), so a record that reached the ledger before a crash of the hub is
not booked twice either.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import grpc

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device.identity import record_message
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from runtime.idempotency import device_scope
from runtime.errors import DomainError, FailedPrecondition, InvalidArgument, Unavailable
from runtime.grpc_client import error_info
from runtime.logs import get_logger
from services.devicehub.context import AlarmSink, DeviceContext
from services.devicehub.evidence import Believed, normalise_purse_kind
from services.devicehub.members import MemberInfo, Refused
from services.devicehub.recheck import Recheck
from services.devicehub.tx_store import AccessRow, NewRecord, ServedRow, StoredRecord, TxStore, UploadTx
from services.devicehub.verifier import record_signature_ok

log = get_logger(__name__)

MAX_RECORDS = 1000
MAX_AMOUNT_FEN = 100_000_000
MAX_SEQUENCE = 2**63 - 1
# Sequences listed as missing at most (the lowest); a device skipping more is broken anyway.
MAX_MISSING = 10_000
MAX_STATES_PER_CALL = 200
MAX_NONCE_CHARS = 128
# The text form of a code (docs/code-format.md).
MAX_CODE_CHARS = 320
_CARD_UID = re.compile(r"^[0-9A-F]{8,20}$")
# A device's counters are kept this long past the oldest record settled (a service date may be the
# day before the local date, and time zones run from -12 to +14 h).
COUNTER_MARGIN = timedelta(days=2)

# AlarmKind / AlarmSeverity values (devicehub.proto).
ALARM_SEQUENCE_GAP = pb.ALARM_KIND_SEQUENCE_GAP
ALARM_CODE_REPLAY = pb.ALARM_KIND_CODE_REPLAY
ALARM_SHORTFALL = pb.ALARM_KIND_SHORTFALL
ALARM_RECORD_REJECTED = pb.ALARM_KIND_RECORD_REJECTED
ALARM_DEVICE_FLAGGED = pb.ALARM_KIND_DEVICE_FLAGGED

PURSE_NAMES = {lpb.PURSE_KIND_CASH: "cash", lpb.PURSE_KIND_SUBSIDY: "subsidy", lpb.PURSE_KIND_VOUCHER: "voucher"}
PURSE_KINDS = {name: kind for kind, name in PURSE_NAMES.items()}
METHOD_NAMES = {pb.METHOD_CODE: "code", pb.METHOD_CARD: "card", pb.METHOD_FACE: "face"}
METHOD_VALUES = {name: value for value, name in METHOD_NAMES.items()}
PURPOSE_NAMES = {pb.PURPOSE_PAY: "pay", pb.PURPOSE_ACCESS: "access", pb.PURPOSE_RIDE: "ride"}

_OUTCOME_NAMES = {
    pb.RECORD_OUTCOME_BOOKED: "booked", pb.RECORD_OUTCOME_SHORTFALL: "shortfall",
    pb.RECORD_OUTCOME_DUPLICATE: "duplicate", pb.RECORD_OUTCOME_CODE_REUSED: "code_reused",
    pb.RECORD_OUTCOME_REJECTED: "rejected",
}
_OUTCOME_VALUES = {name: value for value, name in _OUTCOME_NAMES.items()}
_LEDGER_OUTCOMES = {
    lpb.OFFLINE_OUTCOME_BOOKED: "booked", lpb.OFFLINE_OUTCOME_SHORTFALL: "shortfall",
    # Booked under this key before this record reached the hub's table (the hub stopped between
    # the two): it is this record's booking.
    lpb.OFFLINE_OUTCOME_DUPLICATE: "booked",
    lpb.OFFLINE_OUTCOME_CODE_REUSED: "code_reused", lpb.OFFLINE_OUTCOME_REJECTED: "rejected",
}


# --- what the transactions part shares about the ledger ---------------------------------------------


def purse_name(kind: int) -> str:
    return PURSE_NAMES.get(kind, lpb.PurseKind.Name(kind).removeprefix("PURSE_KIND_").lower()
                           if kind in lpb.PurseKind.values() else str(kind))


def ledger_refusal(exc: grpc.aio.AioRpcError, *, service: str) -> tuple[str, DomainError | None]:
    """A downstream refusal as (reason to answer the device with, error to raise instead)."""
    reason, _ = error_info(exc)
    code = exc.code()
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED):
        return reason or code.name, None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "", InvalidArgument(exc.details() or f"{service} refused the request",
                                   reason=reason or "INVALID_ARGUMENT")
    return "", Unavailable(f"{service} did not answer ({code.name}); retry later",
                           reason=f"{service.upper()}_UNAVAILABLE")


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- uploads ------------------------------------------------------------------------------------


@dataclass
class _Work:
    """One record of an upload on its way to its outcome."""

    index: int
    record: pb.OfflineRecord
    sha256: bytes
    event_time: datetime | None
    reason: str = ""  # a refusal found before the ledger
    member_id: str = ""
    outcome: str = ""
    transfer_id: str = ""
    shortfall_fen: int = 0
    believed: Believed | None = None  # a payment whose evidence holds: what to book


MemberByCard = Callable[[str, str], Awaitable[MemberInfo]]


class Settlement:
    def __init__(self, *, store: TxStore, ledger: ledger_pb2_grpc.LedgerServiceStub, alarms: AlarmSink,
                 member_by_card: MemberByCard, recheck: Recheck, max_record_age: timedelta,
                 flag_after_rejected: int, timeout_s: float):
        self._store = store
        self._ledger = ledger
        self._alarms = alarms
        self._member_by_card = member_by_card
        self._recheck = recheck
        self._counters_kept = max_record_age + COUNTER_MARGIN
        self._flag_after_rejected = flag_after_rejected
        self._timeout_s = timeout_s

    async def last_settled_sequence(self, tenant_id: str, device_id: str) -> int:
        highest, missing = await self._store.sequences(tenant_id=uuid.UUID(tenant_id), device_id=uuid.UUID(device_id))
        return watermark(highest, missing)

    async def last_settled_sequences(self, tenant_id: str, device_ids: list[str]) -> dict[str, int]:
        """``last_settled_sequence`` of many devices of a tenant, in one query (0 for a device with none)."""
        found = await self._store.sequences_of(tenant_id=uuid.UUID(tenant_id),
                                               device_ids=[uuid.UUID(d) for d in device_ids])
        return {d: watermark(*found[uuid.UUID(d)]) if uuid.UUID(d) in found else 0 for d in device_ids}

    async def upload(self, device: DeviceContext, msg: pb.Upload) -> pb.UploadResult:
        count = len(msg.records)
        if count == 0:
            raise InvalidArgument("an upload holds 1..1000 records", reason="UPLOAD_EMPTY")
        if count > MAX_RECORDS:
            raise InvalidArgument(f"an upload holds at most {MAX_RECORDS} records", reason="UPLOAD_TOO_LARGE")
        if not device.merchant_account_id and any(r.purpose == pb.PURPOSE_PAY for r in msg.records):
            # The device's configuration, not its records, is wrong: refuse the upload (the device
            # keeps them) rather than reject payments for good.
            raise FailedPrecondition("this device books to no merchant; its payments cannot be settled",
                                     reason="DEVICE_HAS_NO_MERCHANT")
        tenant_id, device_id = uuid.UUID(device.tenant_id), uuid.UUID(device.device_id)
        works = [self._check(device, i, record) for i, record in enumerate(msg.records)]
        await self._resolve_cards(device, [w for w in works if not w.reason and w.record.purpose != pb.PURPOSE_PAY])
        results: list[pb.RecordResult | None] = [None] * count
        now = now_utc()
        async with self._store.upload(tenant_id=tenant_id, device_id=device_id, now=now) as tx:
            old_highest, old_missing = tx.highest, list(tx.missing)
            valid = [w for w in works if 1 <= w.record.sequence <= MAX_SEQUENCE]
            for w in works:
                if not 1 <= w.record.sequence <= MAX_SEQUENCE:
                    results[w.index] = pb.RecordResult(sequence=w.record.sequence,
                                                       outcome=pb.RECORD_OUTCOME_REJECTED, reason="SEQUENCE_INVALID")
            existing = await tx.existing(sorted({w.record.sequence for w in valid}))
            first: dict[int, _Work] = {}
            fresh: list[_Work] = []
            repeats: list[_Work] = []
            for w in valid:
                sequence = w.record.sequence
                stored = existing.get(sequence)
                if stored is not None:
                    results[w.index] = _repeat_result(sequence, stored, w.sha256)
                elif sequence in first:
                    repeats.append(w)
                else:
                    first[sequence] = w
                    fresh.append(w)
            for w in fresh:
                if w.reason:
                    w.outcome = "rejected"
            payments = [w for w in fresh if not w.reason and w.record.purpose == pb.PURPOSE_PAY]
            passes = [w for w in fresh if not w.reason and w.record.purpose != pb.PURPOSE_PAY]
            await self._recheck_payments(device, payments, tx=tx, now=now)
            payments = [w for w in payments if w.believed is not None]
            await self._settle_payments(device, payments)
            await tx.add_counters([(key, date.fromisoformat(w.believed.service_date), increment)
                                   for w in payments if w.believed is not None and w.outcome in ("booked", "shortfall")
                                   for key, increment in w.believed.increments.items()],
                                  prune_before=(now - self._counters_kept).date())
            by_nonce: dict[str, _Work] = {}
            for w in passes:
                by_nonce.setdefault(_nonce(w.record), w)
            new_nonces = await tx.insert_access([_access_row(device, w) for w in by_nonce.values()], now=now)
            for w in passes:
                nonce = _nonce(w.record)
                if by_nonce[nonce] is w and nonce in new_nonces:
                    w.outcome = "booked"
                else:
                    w.outcome, w.reason = "duplicate", "NONCE_SEEN"
            await tx.insert_records([NewRecord(
                sequence=w.record.sequence, purpose=PURPOSE_NAMES.get(w.record.purpose, "unknown"),
                outcome=w.outcome, reason=w.reason, transfer_id=w.transfer_id, shortfall_fen=w.shortfall_fen,
                record_sha256=w.sha256, event_time=w.event_time) for w in fresh], now=now)
            await tx.insert_served([
                ServedRow(tenant_id=tenant_id, transfer_id=w.transfer_id, location=device.location,
                          device_id=device_id, event_time=w.event_time or now)
                for w in payments if w.outcome in ("booked", "shortfall") and w.transfer_id and device.location])
            highest, missing = next_sequences(old_highest, old_missing, set(first))
            await tx.save_sequences(highest=highest, missing=missing, now=now)
            rejected_since_review = (await tx.rejected_since_review()
                                     if any(w.outcome == "rejected" for w in fresh) else 0)
        for w in fresh:
            results[w.index] = pb.RecordResult(sequence=w.record.sequence, outcome=_OUTCOME_VALUES[w.outcome],
                                               reason=w.reason, transfer_id=w.transfer_id,
                                               shortfall_fen=w.shortfall_fen)
        for w in repeats:
            stored = first[w.record.sequence]
            results[w.index] = _repeat_result(w.record.sequence, StoredRecord(
                stored.record.sequence, stored.outcome, stored.reason, stored.transfer_id, stored.shortfall_fen,
                stored.sha256), w.sha256)
        final = [r for r in results if r is not None]
        await self._raise_alarms(device, fresh=fresh, results=final,
                                 new_missing=sorted(set(missing) - set(old_missing)),
                                 rejected_since_review=rejected_since_review)
        if old_missing and not missing:
            await self._gap_filled(device)
        return pb.UploadResult(upload_id=msg.upload_id, results=final,
                               last_settled_sequence=watermark(highest, missing), missing_sequences=missing)

    # --- before the transaction ----------------------------------------------------------------

    def _check(self, device: DeviceContext, index: int, record: pb.OfflineRecord) -> _Work:
        event_time = record.event_time.ToDatetime(tzinfo=UTC) if record.HasField("event_time") else None
        message = record_message(tenant_id=device.tenant_id, device_id=device.device_id, record=record)
        work = _Work(index=index, record=record, sha256=hashlib.sha256(message + record.signature).digest(),
                     event_time=event_time, member_id=record.member_id)
        if not record_signature_ok(public_key=device.public_key, signature=record.signature, message=message):
            work.reason = "SIGNATURE_INVALID"
        elif event_time is None:
            work.reason = "EVENT_TIME_MISSING"
        elif record.purpose not in PURPOSE_NAMES:
            work.reason = "PURPOSE_INVALID"
        elif record.member_id and not _is_uuid(record.member_id):
            work.reason = "MEMBER_INVALID"
        elif record.purpose == pb.PURPOSE_PAY:
            work.reason = _payment_problem(record)
        elif len(record.nonce) > MAX_NONCE_CHARS:
            work.reason = "NONCE_INVALID"
        return work

    async def _resolve_cards(self, device: DeviceContext, works: Sequence[_Work]) -> None:
        """Pass records of a card tap that name no member: the card's holder now (payments find
        theirs as of their time in the recheck)."""
        wanted = {w.record.card_uid for w in works if not w.member_id and w.record.card_uid}
        if not wanted:
            return

        async def holder(uid: str) -> tuple[str, str]:
            try:
                return uid, (await self._member_by_card(device.tenant_id, uid)).member_id
            except Refused as refused:
                return uid, refused.member_id
            except InvalidArgument:
                return uid, ""

        holders = dict(await asyncio.gather(*(holder(uid) for uid in wanted)))
        for w in works:
            if not w.member_id and w.record.card_uid:
                w.member_id = holders.get(w.record.card_uid, "")

    # --- payments ------------------------------------------------------------------------------

    async def _recheck_payments(self, device: DeviceContext, works: list[_Work], *, tx: UploadTx,
                                now: datetime) -> None:
        """The evidence of each new payment, checked again; a refusal rejects the record."""
        if not works:
            return
        claims = []
        for w in works:
            assert w.event_time is not None  # _check refused a payment without one
            claims.append((w.record, w.event_time))
        verdicts = await self._recheck.payments(device, claims, tx=tx, now=now)
        for w, verdict in zip(works, verdicts, strict=True):
            if isinstance(verdict, Believed):
                w.believed, w.member_id = verdict, verdict.member_id
            else:
                w.outcome, w.reason = "rejected", verdict.reason

    async def _settle_payments(self, device: DeviceContext, works: list[_Work]) -> None:
        """Book the believed payments: the plan's legs (the record's, checked equal), never a purse
        the rules did not draw, with the code the record carried."""
        if not works:
            return
        purses = await self._member_purses(device.tenant_id, sorted({w.member_id for w in works}))
        booking: list[tuple[_Work, lpb.OfflineRecord]] = []
        for w in works:
            believed = w.believed
            assert believed is not None
            accounts = purses.get(w.member_id, {})
            legs = []
            for kind, ref, amount_fen in believed.legs:
                account_id = accounts.get((kind, ref))
                if account_id is None:
                    break
                legs.append(lpb.PayLeg(account_id=account_id, amount_fen=amount_fen))
            else:
                code = None
                if believed.code is not None:
                    code = lpb.CodeRef(credential_id=believed.code[0], counter=believed.code[1])
                booking.append((w, lpb.OfflineRecord(
                    idempotency_key=f"dev:{device.device_id}:{w.record.sequence}",
                    merchant_account_id=device.merchant_account_id, legs=legs, device_id=device.device_id,
                    external_ref=f"offline:{w.record.sequence}", event_time=w.record.event_time, code=code)))
                continue
            w.outcome, w.reason = "rejected", "PURSE_UNKNOWN"
        if not booking:
            return
        try:
            answer = await self._ledger.SettleOffline(
                lpb.SettleOfflineRequest(tenant_id=device.tenant_id, key_scope=device_scope(device.device_id),
                                         records=[r for _, r in booking]),
                timeout=max(self._timeout_s, 30.0))
        except grpc.aio.AioRpcError as exc:
            _, error = ledger_refusal(exc, service="ledger")
            raise error or Unavailable("the ledger refused the upload; retry later", reason="LEDGER_UNAVAILABLE") \
                from None
        if len(answer.results) != len(booking):
            raise Unavailable("the ledger answered a different number of records", reason="LEDGER_UNAVAILABLE")
        for (w, _), result in zip(booking, answer.results, strict=True):
            w.outcome = _LEDGER_OUTCOMES.get(result.outcome, "rejected")
            w.transfer_id = result.transfer.transfer_id if result.HasField("transfer") else ""
            w.shortfall_fen = result.shortfall_fen
            if w.outcome == "rejected":
                w.reason = result.reason or "LEDGER_REJECTED"
            elif w.outcome == "code_reused":
                w.reason = "CODE_REUSED"

    async def _member_purses(self, tenant_id: str, member_ids: list[str]) -> dict[str, dict[tuple[str, str], str]]:
        """Each member's purses by (kind, ref) -> account id: one ledger read per 200 members."""
        chunks = [member_ids[i:i + MAX_STATES_PER_CALL] for i in range(0, len(member_ids), MAX_STATES_PER_CALL)]

        async def read(chunk: list[str]) -> list[tuple[str, lpb.GetMemberStateResponse]]:
            try:
                answer = await self._ledger.GetMemberStates(lpb.GetMemberStatesRequest(requests=[
                    lpb.GetMemberStateRequest(tenant_id=tenant_id, member_id=m) for m in chunk]),
                    timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                _, error = ledger_refusal(exc, service="ledger")
                raise error or Unavailable("the ledger refused a read", reason="LEDGER_UNAVAILABLE") from None
            return list(zip(chunk, answer.responses, strict=True))

        purses: dict[str, dict[tuple[str, str], str]] = {}
        for pairs in await asyncio.gather(*(read(c) for c in chunks)):
            for member_id, state in pairs:
                purses[member_id] = {(purse_name(a.account.purse_kind), a.account.ref): a.account.account_id
                                     for a in state.accounts}
        return purses

    # --- after the commit ----------------------------------------------------------------------

    async def _gap_filled(self, device: DeviceContext) -> None:
        """Every sequence is in: the device's SEQUENCE_GAP alarm, if open, is cleared."""
        try:
            await self._alarms.condition_ended(tenant_id=device.tenant_id, device_id=device.device_id,
                                               kind=ALARM_SEQUENCE_GAP)
        except Exception as exc:  # noqa: BLE001 - the upload is settled; the alarm is best effort
            log.warning("alarm not cleared", kind=ALARM_SEQUENCE_GAP, error=type(exc).__name__)

    async def _raise_alarms(self, device: DeviceContext, *, fresh: list[_Work], results: list[pb.RecordResult],
                            new_missing: list[int], rejected_since_review: int) -> None:
        raised: list[tuple[int, int, str]] = []
        shortfalls = [w for w in fresh if w.outcome == "shortfall"]
        if shortfalls:
            raised.append((ALARM_SHORTFALL, pb.ALARM_SEVERITY_WARNING,
                           f"{len(shortfalls)} offline payment(s) short by {sum(w.shortfall_fen for w in shortfalls)}"
                           f" fen in total, now on the members' receivables (sequences {_ranges(shortfalls)})"))
        replays = [w for w in fresh if w.outcome == "code_reused"]
        if replays:
            raised.append((ALARM_CODE_REPLAY, pb.ALARM_SEVERITY_CRITICAL,
                           f"{len(replays)} offline payment(s) presented a code another record had booked"
                           f" (sequences {_ranges(replays)})"))
        rejected = [r for r in results if r.outcome == pb.RECORD_OUTCOME_REJECTED]
        if rejected:
            reasons = sorted({r.reason for r in rejected})
            raised.append((ALARM_RECORD_REJECTED, pb.ALARM_SEVERITY_WARNING,
                           f"{len(rejected)} uploaded record(s) refused: {', '.join(reasons)[:300]}"))
        if new_missing:
            raised.append((ALARM_SEQUENCE_GAP, pb.ALARM_SEVERITY_WARNING,
                           f"{len(new_missing)} record sequence(s) never received: {_number_ranges(new_missing)}"))
        if rejected_since_review >= self._flag_after_rejected:
            raised.append((ALARM_DEVICE_FLAGGED, pb.ALARM_SEVERITY_CRITICAL,
                           f"{rejected_since_review} uploaded record(s) rejected since the device was last reviewed"
                           f" (threshold {self._flag_after_rejected}): check the terminal before it takes more"))
        for kind, severity, detail in raised:
            try:
                await self._alarms.raise_alarm(tenant_id=device.tenant_id, device_id=device.device_id, kind=kind,
                                               severity=severity, detail=detail)
            except Exception as exc:  # noqa: BLE001 - the upload is settled; the alarm is best effort
                log.warning("alarm not raised", kind=kind, error=type(exc).__name__)


# --- plain helpers ----------------------------------------------------------------------------------


def watermark(highest: int, missing: Sequence[int]) -> int:
    """The highest sequence with every sequence up to it settled: a device may drop up to it."""
    return min(missing) - 1 if missing else highest


def next_sequences(highest: int, missing: Sequence[int], received: set[int]) -> tuple[int, list[int]]:
    """The device's highest sequence and the ones below it never received, after ``received``."""
    new_highest = max(highest, max(received, default=0))
    still = [s for s in missing if s not in received]
    gap = (s for s in range(highest + 1, new_highest) if s not in received)
    still.extend(itertools.islice(gap, max(0, MAX_MISSING - len(still))))
    return new_highest, sorted(still)[:MAX_MISSING]


def _repeat_result(sequence: int, stored: StoredRecord, sha256: bytes) -> pb.RecordResult:
    if stored.record_sha256 != sha256:
        return pb.RecordResult(sequence=sequence, outcome=pb.RECORD_OUTCOME_REJECTED, reason="SEQUENCE_REUSED",
                               transfer_id=stored.transfer_id)
    first = stored.outcome.upper()
    if stored.reason and stored.outcome not in ("code_reused",):
        first = f"{first}:{stored.reason}"
    return pb.RecordResult(sequence=sequence, outcome=pb.RECORD_OUTCOME_DUPLICATE, reason=first,
                           transfer_id=stored.transfer_id, shortfall_fen=stored.shortfall_fen)


def _payment_problem(record: pb.OfflineRecord) -> str:
    """A payment's shape, and the evidence it must carry: a code's text, or a card's UID (as the
    engine writes it, upper-case hex: one card, one set of counters)."""
    if not 1 <= record.amount_fen <= MAX_AMOUNT_FEN:
        return "AMOUNT_INVALID"
    if not record.legs:
        return "LEGS_MISSING"
    if any(leg.amount_fen <= 0 or normalise_purse_kind(leg.purse_kind) not in PURSE_KINDS for leg in record.legs):
        return "LEG_INVALID"
    if sum(leg.amount_fen for leg in record.legs) > record.amount_fen:
        return "LEGS_EXCEED_AMOUNT"
    if record.credential_id and not _is_uuid(record.credential_id):
        return "CREDENTIAL_INVALID"
    if record.method == pb.METHOD_CODE:
        if not record.code:
            return "CODE_MISSING"
        if len(record.code) > MAX_CODE_CHARS:
            return "CODE_MALFORMED"
        return ""
    if record.method == pb.METHOD_CARD:
        if not record.card_uid:
            return "CARD_MISSING"
        return "" if _CARD_UID.fullmatch(record.card_uid) else "CARD_UID_INVALID"
    # A face match (or no method) proves nothing the hub can check again.
    return "METHOD_NOT_ALLOWED_OFFLINE"


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _nonce(record: pb.OfflineRecord) -> str:
    return record.nonce or f"seq:{record.sequence}"


def _access_row(device: DeviceContext, w: _Work) -> AccessRow:
    record = w.record
    return AccessRow(
        tenant_id=uuid.UUID(device.tenant_id), device_id=uuid.UUID(device.device_id), nonce=_nonce(record),
        member_id=w.member_id, location=device.location, method=METHOD_NAMES.get(record.method, ""),
        purpose=PURPOSE_NAMES[record.purpose], passed=record.passed,
        reason=record.reason or ("PASS" if record.passed else "DENIED"), rule="", offline=True,
        event_time=w.event_time or now_utc())


def _ranges(works: Sequence[_Work]) -> str:
    return _number_ranges(sorted(w.record.sequence for w in works))


def _number_ranges(numbers: Sequence[int], *, limit: int = 20) -> str:
    """'3, 7-9, 12' for [3, 7, 8, 9, 12] (the first ``limit`` ranges)."""
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(numbers), key=lambda pair: pair[1] - pair[0]):
        run = [n for _, n in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    shown = ", ".join(ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")

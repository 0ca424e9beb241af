"""What a device keeps on its own disk: the offline record queue, its sequence, local counters,
accepted codes and the synced state. One SQLite file (``device.db`` in the data folder).

Each offline decision is one transaction: the record with the next sequence, the counters it
raised and the code it accepted are written together, or not at all, so a device that loses power
halfway never reuses a sequence, never forgets a record it approved and never lets a code it
already took pay again. Records leave the queue only when the hub answered a final outcome.

Timeout reversals wait here too: an online payment whose answer did not come is kept as a reversal
to send until the hub answers it, through restarts and reconnections.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_FILE = "device.db"
# Local counters of days before this many days ago are pruned on open.
COUNTER_KEEP_DAYS = 3
_DAY_IN_KEY = re.compile(r":d:(\d{4}-\d{2}-\d{2})$|:p:[^:]+:(\d{4}-\d{2}-\d{2})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    sequence INTEGER PRIMARY KEY,
    event_time_s REAL NOT NULL,
    purpose INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (k TEXT PRIMARY KEY, v INTEGER NOT NULL, day TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reversals (
    idempotency_key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted_codes (
    credential BLOB NOT NULL,
    counter INTEGER NOT NULL,
    expires_at_s INTEGER NOT NULL,
    PRIMARY KEY (credential, counter)
);
"""


@dataclass(frozen=True, slots=True)
class QueuedRecord:
    sequence: int
    event_time_s: float
    purpose: int
    body: bytes  # the signed OfflineRecord, serialised


def _day_of(key: str) -> str:
    match = _DAY_IN_KEY.search(key)
    if match is None:
        return ""
    return match.group(1) or match.group(2) or ""


class DeviceStore:
    """The device's SQLite file. Not shared between processes; calls are short and serialised."""

    def __init__(self, data_dir: Path | str, *, durable: bool = True) -> None:
        self.path = Path(data_dir) / DB_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an approved offline payment is money already handed over; it must survive a power cut.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- meta ----

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                         (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            return self._meta(key, default)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._set_meta(key, value)

    def next_sequence(self) -> int:
        """The sequence the next record will get (1 for a new device)."""
        with self._lock:
            return int(self._meta("next_sequence", "1"))

    def raise_sequence_floor(self, next_sequence: int) -> int:
        """Never hand out a sequence below ``next_sequence`` (e.g. the hub settled more than this
        disk remembers). Answers the next sequence."""
        with self._lock:
            current = int(self._meta("next_sequence", "1"))
            if next_sequence > current:
                self._set_meta("next_sequence", str(next_sequence))
                return next_sequence
            return current

    # ---- the queue ----

    def commit_record(self, *, build, event_time_s: float, purpose: int,
                      counter_increments: Mapping[str, int] | None = None,
                      accepted_code: tuple[bytes, int, int] | None = None) -> tuple[int, bytes]:
        """Take the next sequence, build the signed record with it (``build(sequence) -> bytes``)
        and store it with its counter increments and accepted code, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                sequence = int(self._meta("next_sequence", "1"))
                body = build(sequence)
                self._db.execute("INSERT INTO records (sequence, event_time_s, purpose, body) VALUES (?, ?, ?, ?)",
                                 (sequence, event_time_s, purpose, body))
                self._set_meta("next_sequence", str(sequence + 1))
                for key, increment in (counter_increments or {}).items():
                    self._db.execute(
                        "INSERT INTO counters (k, v, day) VALUES (?, ?, ?) "
                        "ON CONFLICT (k) DO UPDATE SET v = counters.v + excluded.v", (key, increment, _day_of(key)))
                if accepted_code is not None:
                    credential, counter, expires_at_s = accepted_code
                    self._db.execute(
                        "INSERT OR REPLACE INTO accepted_codes (credential, counter, expires_at_s) VALUES (?, ?, ?)",
                        (credential, counter, expires_at_s))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return sequence, body

    def pending(self, *, limit: int) -> list[QueuedRecord]:
        """The oldest queued records (by sequence), at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, event_time_s, purpose, body FROM records ORDER BY sequence LIMIT ?", (limit,)
            ).fetchall()
        return [QueuedRecord(int(s), float(t), int(p), bytes(b)) for s, t, p, b in rows]

    def drop(self, sequences: Iterable[int]) -> int:
        """Remove these records from the queue (the hub answered them finally). Answers how many."""
        seqs = [(int(s),) for s in sequences]
        if not seqs:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._db.executemany("DELETE FROM records WHERE sequence = ?", seqs)
            dropped = self._db.total_changes - before
            self._db.execute("COMMIT")
        return dropped

    def queue_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])

    def oldest_queued_s(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT min(event_time_s) FROM records").fetchone()
        return None if row[0] is None else float(row[0])

    # ---- timeout reversals ----

    def add_reversal(self, idempotency_key: str, *, reason: str, now_s: float) -> None:
        """Keep a reversal to send until the hub answers it (the same key twice is one reversal)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO reversals (idempotency_key, reason, created_s) VALUES (?, ?, ?)",
                             (idempotency_key, reason, now_s))

    def pending_reversals(self, *, limit: int) -> list[tuple[str, str]]:
        """(key, reason) of the reversals not answered yet, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT idempotency_key, reason FROM reversals ORDER BY created_s LIMIT ?",
                                    (limit,)).fetchall()
        return [(str(k), str(r)) for k, r in rows]

    def has_reversal(self, idempotency_key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM reversals WHERE idempotency_key = ?",
                                    (idempotency_key,)).fetchone() is not None

    def drop_reversal(self, idempotency_key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM reversals WHERE idempotency_key = ?", (idempotency_key,))

    # ---- local counters and accepted codes ----

    def counters(self, keys: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        with self._lock:
            found: dict[str, int] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                rows = self._db.execute(
                    f"SELECT k, v FROM counters WHERE k IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update({k: int(v) for k, v in rows})
        return found

    def prune_counters(self, *, before_day: str) -> int:
        """Drop counters of days before ``before_day`` (YYYY-MM-DD)."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM counters WHERE day != '' AND day < ?", (before_day,))
            return cursor.rowcount

    def live_accepted_codes(self, *, now_s: int) -> list[tuple[bytes, int, int]]:
        """Codes accepted and still inside their replay window (to refill the replay cache on start)."""
        with self._lock:
            self._db.execute("DELETE FROM accepted_codes WHERE expires_at_s <= ?", (now_s,))
            rows = self._db.execute(
                "SELECT credential, counter, expires_at_s FROM accepted_codes ORDER BY expires_at_s").fetchall()
        return [(bytes(c), int(n), int(e)) for c, n, e in rows]

    # ---- the synced state ----

    def save_state(self, state: Mapping[str, Any]) -> None:
        text = json.dumps(state, separators=(",", ":"))
        with self._lock:
            self._set_meta("state", text)

    def load_state(self) -> dict[str, Any] | None:
        with self._lock:
            text = self._meta("state")
        return None if text is None else json.loads(text)

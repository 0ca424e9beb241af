"""The ledger service's settings, read once at start (ONECARD_* environment variables)."""

from __future__ import annotations

from pydantic import Field

from runtime.settings import ServiceSettings

DEFAULT_EXPIRY_INTERVAL_S = 1.0
DEFAULT_EXPIRY_BATCH = 200
DEFAULT_PROGRAM_INTERVAL_S = 5.0
DEFAULT_PAY_WORKERS = 2
DEFAULT_PAY_MAX_BATCH = 64


class LedgerSettings(ServiceSettings):
    # How often pending holds past their time are released. Capture and void refuse an expired
    # hold at once; this only decides how soon its money is available again.
    hold_expiry_interval_s: float = Field(default=DEFAULT_EXPIRY_INTERVAL_S, gt=0)
    hold_expiry_batch: int = Field(default=DEFAULT_EXPIRY_BATCH, ge=1, le=10_000)
    # How often running grant batches and programs past their end are looked for (a new batch
    # also wakes the worker at once).
    program_interval_s: float = Field(default=DEFAULT_PROGRAM_INTERVAL_S, gt=0)
    # Concurrent payments are booked in batches (one transaction, one flush each): this many
    # batches at once, each of at most this many payments.
    pay_workers: int = Field(default=DEFAULT_PAY_WORKERS, ge=1, le=64)
    pay_max_batch: int = Field(default=DEFAULT_PAY_MAX_BATCH, ge=1, le=1000)

"""The webhooks service's settings, read once at start (ONECARD_* environment variables); the
master key that seals endpoint secrets at rest must decode, or the service does not start."""

from __future__ import annotations

from pydantic import Field

from runtime.sealing import MasterKey
from runtime.settings import ServiceSettings
from services.webhooks.domain import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_CAP_S,
    DEFAULT_DISABLE_AFTER_S,
    DEFAULT_RETRY_WINDOW_S,
    DEFAULT_SECRET_OVERLAP_S,
    MIN_RETRY_WINDOW_S,
)
from services.webhooks.dispatcher import DEFAULT_CONCURRENCY, DEFAULT_POLL_S
from services.webhooks.sender import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, DEFAULT_TOTAL_TIMEOUT_S

DEFAULT_LEDGER_TIMEOUT_S = 5.0


class WebhooksSettings(ServiceSettings):
    # ONECARD_WEBHOOKS_MASTER_KEY: 32 bytes as 64 hex digits or base64; seals endpoint secrets at rest.
    webhooks_master_key: MasterKey
    # ONECARD_LEDGER_TARGET: host:port of the ledger, asked who owns a transfer's accounts (or its
    # replicas, ip:port,ip:port or dns:///name:port: runtime.targets).
    ledger_target: str = Field(min_length=1)
    ledger_timeout_s: float = Field(default=DEFAULT_LEDGER_TIMEOUT_S, gt=0)
    # ONECARD_WEBHOOKS_ALLOW_LOOPBACK_HTTP: plain http (and any scheme) to loopback addresses, for a
    # development stack only; everything else must be https to a public address.
    webhooks_allow_loopback_http: bool = False
    # Retries: full-jitter back-off from the base up to the cap, for at least the window (24 h).
    webhooks_backoff_base_s: float = Field(default=DEFAULT_BACKOFF_BASE_S, gt=0, le=3600)
    webhooks_backoff_cap_s: float = Field(default=DEFAULT_BACKOFF_CAP_S, gt=0, le=6 * 3600)
    webhooks_retry_window_s: float = Field(default=DEFAULT_RETRY_WINDOW_S, ge=MIN_RETRY_WINDOW_S, le=7 * 24 * 3600)
    # An endpoint whose every attempt failed for this long is disabled (and an alarm sent).
    webhooks_disable_after_s: float = Field(default=DEFAULT_DISABLE_AFTER_S, gt=0)
    # How long the old secrets sign after a rotation (also the most a caller may ask).
    webhooks_secret_overlap_s: float = Field(default=DEFAULT_SECRET_OVERLAP_S, ge=0, le=7 * 24 * 3600)
    webhooks_connect_timeout_s: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=60)
    webhooks_read_timeout_s: float = Field(default=DEFAULT_READ_TIMEOUT_S, gt=0, le=60)
    webhooks_total_timeout_s: float = Field(default=DEFAULT_TOTAL_TIMEOUT_S, gt=0, le=120)
    webhooks_poll_s: float = Field(default=DEFAULT_POLL_S, gt=0, le=60)
    webhooks_concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=256)

    @property
    def master_key(self) -> bytes:
        return self.webhooks_master_key.get_secret_value()

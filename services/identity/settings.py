"""The identity service's settings, read once at start (ONECARD_* environment variables)."""

from __future__ import annotations

from runtime.settings import ServiceSettings
from services.identity.importer import DEFAULT_CHUNK_ROWS
from services.identity.selfservice import DEFAULT_PIN_LOCKOUT_S, DEFAULT_PIN_MAX_FAILURES

DEFAULT_IMPORT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_IMPORT_MAX_ROWS = 100_000


class IdentitySettings(ServiceSettings):
    import_max_bytes: int = DEFAULT_IMPORT_MAX_BYTES
    import_max_rows: int = DEFAULT_IMPORT_MAX_ROWS
    # Rows applied per transaction: larger is faster, smaller shows progress sooner and holds the
    # tenant's directory lock for less time.
    import_chunk_rows: int = DEFAULT_CHUNK_ROWS
    # Self-service PINs: this many wrong PINs in a row lock a member's PIN for pin_lockout_s.
    pin_max_failures: int = DEFAULT_PIN_MAX_FAILURES
    pin_lockout_s: int = DEFAULT_PIN_LOCKOUT_S

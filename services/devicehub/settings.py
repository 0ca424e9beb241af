"""The device hub's settings, read once at start (ONECARD_* environment variables): the device
port, the addresses of the services it asks, and the thresholds of the fleet and of sync."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from runtime.settings import ServiceSettings

DEFAULT_DOWNSTREAM_TIMEOUT_S = 5.0
DEFAULT_OFFLINE_AFTER_S = 30.0
DEFAULT_OFFLINE_ALARM_AFTER_S = 300.0
DEFAULT_CLOCK_DRIFT_ALARM_MS = 30_000
DEFAULT_BACKLOG_ALARM_AFTER_S = 3600.0
DEFAULT_FLEET_INTERVAL_S = 5.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_SYNC_DEBOUNCE_S = 0.05
DEFAULT_SYNC_RESYNC_S = 60.0
DEFAULT_OFFLINE_CLOCK_SKEW_S = 300.0
DEFAULT_OFFLINE_MAX_RECORD_AGE_S = 7 * 24 * 3600.0
DEFAULT_FLAG_AFTER_REJECTED_RECORDS = 10


class DevicehubSettings(ServiceSettings):
    # The device port: terminals' streams, server TLS (no client certificate), nothing else of the
    # hub's API. Its certificate is the one in ONECARD_DEVICE_TLS_DIR (the name terminals dial),
    # or the hub's mesh certificate when unset.
    device_port: int = Field(default=0, ge=0, le=65535)
    device_tls_dir: Path | None = None
    # ONECARD_IDENTITY_TARGET etc.: host:port of the services the hub asks for members, codes,
    # plans and bookings, and reads sync sources from; each may list a service's replicas
    # (ip:port,ip:port or dns:///name:port: runtime.targets), called round robin.
    identity_target: str = Field(min_length=1)
    codegen_target: str = Field(min_length=1)
    policy_target: str = Field(min_length=1)
    ledger_target: str = Field(min_length=1)
    # Deadline of each call the hub makes to those services.
    downstream_timeout_s: float = Field(default=DEFAULT_DOWNSTREAM_TIMEOUT_S, gt=0)
    # A device with no heartbeat (and no stream) for this long is offline.
    offline_after_s: float = Field(default=DEFAULT_OFFLINE_AFTER_S, gt=0)
    # Offline this long: alarm OFFLINE_TOO_LONG.
    offline_alarm_after_s: float = Field(default=DEFAULT_OFFLINE_ALARM_AFTER_S, gt=0)
    # |device clock - hub clock| above this in a heartbeat or hello: alarm CLOCK_DRIFT.
    clock_drift_alarm_ms: int = Field(default=DEFAULT_CLOCK_DRIFT_ALARM_MS, gt=0)
    # A heartbeat's oldest queued offline record older than this: alarm BACKLOG_TOO_OLD.
    backlog_alarm_after_s: float = Field(default=DEFAULT_BACKLOG_ALARM_AFTER_S, gt=0)
    # How often the fleet watcher looks for silent devices.
    heartbeat_check_interval_s: float = Field(default=DEFAULT_FLEET_INTERVAL_S, gt=0)
    # How long a new stream may take to say hello and answer its challenge.
    handshake_timeout_s: float = Field(default=DEFAULT_HANDSHAKE_TIMEOUT_S, gt=0)
    # Events arriving within this window are pushed to devices as one sync round.
    sync_debounce_s: float = Field(default=DEFAULT_SYNC_DEBOUNCE_S, ge=0, le=5)
    # Connected devices are compared with the sync sources this often even without an event (an
    # event missed while NATS was away reaches them within it).
    sync_resync_interval_s: float = Field(default=DEFAULT_SYNC_RESYNC_S, gt=0)
    # Offline settlement (docs/devicehub.md §5). How far a terminal's clock may be from the hub's:
    # a record may be dated this much before the hello that preceded it, or after the next hello
    # (or the upload). A property of the hardware fleet, not of a tenant's rules: one hub setting.
    offline_clock_skew_s: float = Field(default=DEFAULT_OFFLINE_CLOCK_SKEW_S, ge=0, le=3600)
    # The oldest record settled (older ones are EVENT_TIME_TOO_EARLY); each device's counters are
    # kept as long, and two days more.
    offline_max_record_age_s: float = Field(default=DEFAULT_OFFLINE_MAX_RECORD_AGE_S, gt=0, le=30 * 24 * 3600)
    # Rejected records since its last review that flag a device (alarm DEVICE_FLAGGED, critical).
    flag_after_rejected_records: int = Field(default=DEFAULT_FLAG_AFTER_REJECTED_RECORDS, ge=1)

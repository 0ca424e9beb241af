"""Typed settings read once from the environment; a missing required one stops the process."""
from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.mesh import INSECURE_SETTING, MeshSettings

DEFAULT_GRPC_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_GRACE_S = 5.0
DEFAULT_MAX_CONNECTION_AGE_S = 300.0
# The event loops a process may run on (runtime.cli.event_loop_factory).
EventLoop = Literal["uvloop", "asyncio"]


class ServiceSettings(MeshSettings):
    """What every service needs. Services subclass it and add their own fields."""

    model_config = SettingsConfigDict(env_prefix="ONECARD_", extra="ignore", frozen=True)

    database_url: str
    nats_url: str
    # The process's NATS user nkey seed (SU...): its account's permissions are what its NatsAccess
    # declares (runtime.nats_access). Required unless in insecure development mode.
    nats_seed: SecretStr | None = None
    # The name the NATS server's certificate must carry.
    nats_tls_name: str = "nats"
    grpc_host: str = DEFAULT_GRPC_HOST
    grpc_port: int = 0
    # A plaintext port that answers gRPC health and refuses everything else (no caller identity):
    # for an orchestrator's probes, which present no certificate. None: no such port.
    health_port: int | None = None
    metrics_port: int = 0
    log_level: str = "info"
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    # How often the health watcher checks PostgreSQL and NATS.
    health_interval_s: float = 1.0
    # JetStream replicas for the streams this service owns: 1 on one machine, 3 in a cluster.
    stream_replicas: int = 1
    # ONECARD_GRPC_MAX_CONNECTION_AGE_S: the mesh port asks a client to reconnect (GOAWAY) after a
    # connection has lived this long; calls in flight finish first. A client then resolves the
    # target again, so replicas an autoscaler added get their share of calls (a headless Service
    # answers every pod). Not applied to the device port, whose streams are meant to live long.
    grpc_max_connection_age_s: float = Field(default=DEFAULT_MAX_CONNECTION_AGE_S, ge=1, le=24 * 3600)
    # ONECARD_EVENT_LOOP: uvloop (libuv's loop: less CPU per call on every socket the service
    # holds, measured by `make bench`) or asyncio (the standard library's, for comparison).
    event_loop: EventLoop = "uvloop"

    @model_validator(mode="after")
    def _nats_account_unless_told(self) -> ServiceSettings:
        if self.nats_seed is None and not self.insecure_development:
            raise ValueError("missing required setting ONECARD_NATS_SEED (the service's NATS nkey seed); "
                             f"{INSECURE_SETTING}=1 runs without it, for development only")
        return self


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class MissingSettingError(SystemExit):
    pass


def load_settings(cls: type[SettingsT], **overrides: object) -> SettingsT:
    """Build ``cls`` from the environment or exit with a message naming each bad setting."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "") or ""
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            env_name = f"{prefix}{field}".upper()
            if not field:
                # A rule over several settings: its message names them.
                lines.append(str(err["msg"]).removeprefix("Value error, "))
            elif err["type"] == "missing":
                lines.append(f"missing required setting {env_name}")
            else:
                lines.append(f"bad setting {env_name}: {err['msg']}")
        # SystemExit prints its message to stderr once, with no traceback.
        raise MissingSettingError(f"{cls.__name__}: " + "; ".join(lines)) from None

"""Typed settings read once from the environment; a missing required one stops the process."""
from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.mesh import MeshSettings

DEFAULT_GRPC_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_GRACE_S = 5.0


class ServiceSettings(MeshSettings):
    """What every service needs. Services subclass it and add their own fields."""

    model_config = SettingsConfigDict(env_prefix="ONECARD_", extra="ignore", frozen=True)

    database_url: str
    nats_url: str
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

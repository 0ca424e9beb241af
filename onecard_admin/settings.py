"""Where the services are and who the operator is, read once from the environment.

Every setting has the local stack's default (``make run``: its ports, and the operator's
certificate and NATS seed under ``.data/``), so on a developer's machine ``onecard-admin status``
needs no setting; in a cluster the ConfigMap's ``ONECARD_<NAME>_TARGET`` and the mounted ops
Secret set them (deploy/kubectl-plugin/kubectl-onecard).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
# The local stack's defaults (devstack.config; tests/admin checks they agree).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"identity": 50051, "codegen": 50052, "ledger": 50053, "policy": 50054, "devicehub": 50055,
                 "webhooks": 50057}
DEFAULT_NATS_PORT = 54222
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 120.0
OPS_NAME = "ops"
# The mesh's gRPC services in the order the stack starts them.
SERVICE_NAMES = tuple(DEFAULT_PORTS)


def _data_dir() -> Path:
    return Path(os.environ.get("ONECARD_DATA_DIR") or REPO_ROOT / ".data")


def _local_tls_dir() -> Path | None:
    directory = _data_dir() / "pki" / OPS_NAME
    return directory if (directory / "tls.crt").is_file() else None


def _local_nats_seed() -> SecretStr | None:
    try:
        seed = json.loads((_data_dir() / "secrets.json").read_text()).get(f"nats_seed_{OPS_NAME}")
    except (OSError, ValueError):
        return None
    return SecretStr(seed) if seed else None


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONECARD_", extra="ignore", frozen=True)

    identity_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['identity']}"
    codegen_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['codegen']}"
    ledger_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['ledger']}"
    policy_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['policy']}"
    devicehub_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['devicehub']}"
    webhooks_target: str = f"{DEFAULT_HOST}:{DEFAULT_PORTS['webhooks']}"
    nats_url: str = f"nats://{DEFAULT_HOST}:{DEFAULT_NATS_PORT}"
    nats_tls_name: str = "nats"
    # The operator's TLS folder (ca.crt, tls.crt, tls.key naming spiffe://onecard/ops); default:
    # the local stack's .data/pki/ops.
    tls_dir: Path | None = None
    # The operator's NATS nkey seed; default: the local stack's, from .data/secrets.json.
    nats_seed: SecretStr | None = None
    admin_timeout_s: float = DEFAULT_TIMEOUT_S

    @model_validator(mode="after")
    def _local_defaults(self) -> AdminSettings:
        if self.tls_dir is None:
            object.__setattr__(self, "tls_dir", _local_tls_dir())
        if self.nats_seed is None:
            object.__setattr__(self, "nats_seed", _local_nats_seed())
        if self.tls_dir is None:
            raise ValueError("missing required setting ONECARD_TLS_DIR (the operator's folder with ca.crt, tls.crt "
                             "and tls.key); the local stack's .data/pki/ops was not found either")
        if not 0 < self.admin_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"ONECARD_ADMIN_TIMEOUT_S must be in (0, {MAX_TIMEOUT_S}]")
        return self

    def target(self, service: str) -> str:
        return getattr(self, f"{service}_target")

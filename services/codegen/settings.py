"""The codegen service's settings, read once at start (ONECARD_* environment variables); the
master key that seals issuer keys at rest must decode, or the service does not start."""

from __future__ import annotations

from pydantic import Field

from runtime.sealing import MasterKey
from runtime.settings import ServiceSettings
from services.codegen.domain import DEFAULT_MIN_VALIDITY_S

DEFAULT_IDENTITY_TIMEOUT_S = 5.0
DEFAULT_RETIRE_INTERVAL_S = 30.0


class CodegenSettings(ServiceSettings):
    # ONECARD_CODEGEN_MASTER_KEY: 32 bytes as 64 hex digits or base64; seals issuer keys at rest.
    codegen_master_key: MasterKey
    # ONECARD_IDENTITY_TARGET: host:port of identity, asked for a member's status before issuing
    # (or its replicas, ip:port,ip:port or dns:///name:port: runtime.targets).
    identity_target: str = Field(min_length=1)
    identity_timeout_s: float = Field(default=DEFAULT_IDENTITY_TIMEOUT_S, gt=0)
    # The shortest credential a caller may ask for. Tests lower it to see keys retire in seconds.
    min_validity_s: int = Field(default=DEFAULT_MIN_VALIDITY_S, ge=1)
    # How often verifying keys past their last credential are retired without a caller asking.
    retire_interval_s: float = Field(default=DEFAULT_RETIRE_INTERVAL_S, gt=0)

    @property
    def master_key(self) -> bytes:
        return self.codegen_master_key.get_secret_value()

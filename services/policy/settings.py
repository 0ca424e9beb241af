"""The policy service's settings, read once at start (ONECARD_* environment variables); the master
key that seals bundle signing keys at rest must decode, or the service does not start."""

from __future__ import annotations

from pydantic import Field

from runtime.sealing import MasterKey
from runtime.settings import ServiceSettings
from services.policy.domain import DEFAULT_PUBLISHED_CACHE_S, DEFAULT_RULE_SET_CACHE
from services.policy.state_cache import DEFAULT_MEMBER_STATE_CACHE_S, DEFAULT_MEMBER_STATE_CACHE_SIZE

DEFAULT_LEDGER_TIMEOUT_S = 5.0


class PolicySettings(ServiceSettings):
    # ONECARD_POLICY_MASTER_KEY: 32 bytes as 64 hex digits or base64; seals bundle signing keys at rest.
    policy_master_key: MasterKey
    # ONECARD_LEDGER_TARGET: host:port of the ledger, asked for a member's purses and usage counters
    # (or its replicas, ip:port,ip:port or dns:///name:port: runtime.targets).
    ledger_target: str = Field(min_length=1)
    ledger_timeout_s: float = Field(default=DEFAULT_LEDGER_TIMEOUT_S, gt=0)
    # Parsed rule sets kept in memory, by tenant and version (versions never change).
    rule_set_cache: int = Field(default=DEFAULT_RULE_SET_CACHE, ge=1, le=100_000)
    # How long a replica trusts what it read of a tenant's published version before reading it
    # again: a publication reaches the replica that made it at once, the others within this.
    # 0 reads PostgreSQL on every Evaluate.
    published_cache_s: float = Field(default=DEFAULT_PUBLISHED_CACHE_S, ge=0, le=60)
    # ONECARD_MEMBER_STATE_CACHE_S: how long a replica may answer Evaluate and DryRun from the
    # member's purses and counters it read before (each replica follows the ledger's events and
    # drops a member's state as soon as it changes). 0 turns the cache off: every Evaluate reads
    # the ledger. Pay always reads the ledger.
    member_state_cache_s: float = Field(default=DEFAULT_MEMBER_STATE_CACHE_S, ge=0, le=60)
    # ONECARD_MEMBER_STATE_CACHE_SIZE: members remembered per replica (least recently used dropped).
    member_state_cache_size: int = Field(default=DEFAULT_MEMBER_STATE_CACHE_SIZE, ge=1, le=10_000_000)

    @property
    def master_key(self) -> bytes:
        return self.policy_master_key.get_secret_value()

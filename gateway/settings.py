"""The gateway's settings, read once from ``ONECARD_*`` environment variables.

The gateway is not a gRPC service (no database, no NATS), so it has its own settings class rather
than a subclass of ``runtime.settings.ServiceSettings``; like every process of the mesh it proves
itself with its certificate (``ONECARD_TLS_DIR``, runtime.mesh) on each channel it opens.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.grants import DEFAULT_GRANT_RECHECK_S, MAX_GRANT_AGE_S
from gateway.ratelimit import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_CLIENT_FAILURE_BURST,
    DEFAULT_CLIENT_FAILURES_PER_S,
    DEFAULT_FREE_FAILURES,
    DEFAULT_KNOWN_ADDRESS_TTL_S,
)
from runtime.mesh import INSECURE_SETTING, MeshSettings

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
# The partner gRPC API (gateway.partner_grpc), beside the REST port.
DEFAULT_PARTNER_GRPC_PORT = 8443
DEFAULT_TOKEN_TTL_S = 900
MAX_TOKEN_TTL_S = 24 * 3600
MIN_TOKEN_SECRET_CHARS = 32
DEFAULT_RATE_LIMIT_PER_S = 50.0
DEFAULT_RATE_LIMIT_BURST = 100
# Token requests are rare for a well-behaved client (one per token lifetime), so a tight limit per
# caller address costs nothing and slows a flood from one place.
DEFAULT_TOKEN_RATE_LIMIT_PER_S = 1.0
DEFAULT_TOKEN_RATE_LIMIT_BURST = 10
DEFAULT_IDENTITY_TIMEOUT_S = 10.0
DEFAULT_READY_TIMEOUT_S = 2.0


class GatewaySettings(MeshSettings):
    model_config = SettingsConfigDict(env_prefix="ONECARD_", extra="ignore", frozen=True)

    # host:port of the identity gRPC service. Every *_target here may instead list a service's
    # replicas (ip:port,ip:port) or name a resolver (dns:///name:port): runtime.targets; calls go
    # round robin over the replicas that answer.
    identity_target: str = Field(min_length=1)
    # host:port of the codegen gRPC service (e-code credentials, trust and revocation lists).
    codegen_target: str = Field(min_length=1)
    # host:port of the ledger gRPC service (wallets, transfers, subsidies, statements). Empty: no
    # ledger behind this gateway; its routes answer 503 LEDGER_NOT_CONFIGURED and /readyz leaves it out.
    ledger_target: str = ""
    # host:port of the policy gRPC service (rule sets, plans, bundles, rule-checked payments). Empty:
    # no policy behind this gateway; its routes answer 503 POLICY_NOT_CONFIGURED and /readyz leaves it out.
    policy_target: str = ""
    # host:port of the device hub gRPC service (devices, alarms, access rules and records, rollouts,
    # the dining index). Empty: no device hub behind this gateway; its routes answer 503
    # DEVICEHUB_NOT_CONFIGURED and /readyz leaves it out.
    devicehub_target: str = ""
    # Where partners' one-time links send members: the code page's address as the member's phone
    # reaches it, e.g. https://card.example.edu/m/ (gateway.routes.codepage). Empty: this gateway's
    # own /m/, as the request that asked for the link named it.
    code_page_url: str = ""
    # host:port of the webhooks gRPC service (partners' endpoints and the delivery log). Empty: none;
    # its routes answer 503 WEBHOOKS_NOT_CONFIGURED and /readyz leaves it out.
    webhooks_target: str = ""
    # HS256 key for access tokens; every gateway replica must share it.
    token_secret: SecretStr
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65535)
    # The public gRPC API for partners (onecard.partner.v1): its port, 0 for none; the host it binds
    # (empty: http_host's).
    partner_grpc_port: int = Field(default=DEFAULT_PARTNER_GRPC_PORT, ge=0, le=65535)
    partner_grpc_host: str = ""
    # Its server certificate: a folder with tls.crt and tls.key (and ca.crt, the chain partners
    # trust), issued for the gateway's public name, e.g. by a public CA through cert-manager. Empty:
    # the gateway's own mesh certificate (tls_dir), which partners check with the mesh CA's ca.crt.
    partner_tls_dir: Path | None = None
    token_ttl_s: int = Field(default=DEFAULT_TOKEN_TTL_S, ge=1, le=MAX_TOKEN_TTL_S)
    # Per API client, over every route but the token endpoint.
    rate_limit_per_s: float = Field(default=DEFAULT_RATE_LIMIT_PER_S, gt=0)
    rate_limit_burst: int = Field(default=DEFAULT_RATE_LIMIT_BURST, ge=1)
    # The token endpoint, per caller address (every request, right or wrong).
    token_rate_limit_per_s: float = Field(default=DEFAULT_TOKEN_RATE_LIMIT_PER_S, gt=0)
    token_rate_limit_burst: int = Field(default=DEFAULT_TOKEN_RATE_LIMIT_BURST, ge=1)
    # Failed client authentications (gateway.ratelimit.SignInThrottle): per (client id, address),
    # this many free, then a back-off doubling from the base up to the maximum; per client over all
    # addresses a budget of failures (burst, refill rate) that never refuses an address where the
    # client signed in within the known-address time.
    token_free_failures: int = Field(default=DEFAULT_FREE_FAILURES, ge=0)
    token_backoff_base_s: float = Field(default=DEFAULT_BACKOFF_BASE_S, gt=0)
    token_backoff_max_s: float = Field(default=DEFAULT_BACKOFF_MAX_S, gt=0)
    token_client_failure_burst: int = Field(default=DEFAULT_CLIENT_FAILURE_BURST, ge=1)
    token_client_failures_per_s: float = Field(default=DEFAULT_CLIENT_FAILURES_PER_S, gt=0)
    token_known_address_ttl_s: float = Field(default=DEFAULT_KNOWN_ADDRESS_TTL_S, gt=0)
    # Addresses of the reverse proxies (an ingress) whose X-Forwarded-For names the caller, comma
    # separated; empty: none, the peer's address is the caller's. Behind a proxy this must be set, or
    # every caller shares the proxy's address in the token endpoint's limits.
    forwarded_allow_ips: str = ""
    # Deadline of each call to identity, codegen, the ledger, policy or the device hub; a slower answer
    # becomes 504.
    identity_timeout_s: float = Field(default=DEFAULT_IDENTITY_TIMEOUT_S, gt=0)
    # How long a replica believes what identity said of a token's grant before asking again: a
    # revoked grant's tokens stop within this even with NATS down (at most 60 s).
    grant_recheck_s: float = Field(default=DEFAULT_GRANT_RECHECK_S, gt=0, le=MAX_GRANT_AGE_S)
    # NATS, to follow identity's grant events (a revocation then stops its tokens at once). Empty:
    # no feed, the re-check alone. With a URL the gateway's nkey seed is required, as a service's is.
    nats_url: str = ""
    nats_seed: SecretStr | None = None
    nats_tls_name: str = "nats"
    ready_timeout_s: float = Field(default=DEFAULT_READY_TIMEOUT_S, gt=0)
    log_level: str = "info"

    @model_validator(mode="after")
    def _nats_account_unless_told(self) -> GatewaySettings:
        if self.nats_url and self.nats_seed is None and not self.insecure_development:
            raise ValueError("missing required setting ONECARD_NATS_SEED (the gateway's NATS nkey seed, needed with "
                             f"ONECARD_NATS_URL); {INSECURE_SETTING}=1 runs without it, for development only")
        return self

    @field_validator("token_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr) -> SecretStr:
        # A short HMAC key can be brute-forced offline from any one token.
        if len(value.get_secret_value()) < MIN_TOKEN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_TOKEN_SECRET_CHARS} characters")
        return value

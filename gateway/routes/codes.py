"""REST for the e-code: ``onecard.codegen.v1.CodegenService`` as partners and devices use it.

A bank app or a member app backend with ``codes:issue`` asks for a credential (bound to the
phone's holder key) or a batch of rotating tokens for a member of the token's tenant; a device or
device hub with ``devices:sync`` fetches the trust list and the revocation list as changes since
a version. Key rotation and revocation are operator calls on codegen's gRPC API for now.

Each handler only translates: path, query and body to a request message, the answer to JSON.
"""
from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from google.protobuf import timestamp_pb2
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import IssueCodes, SyncDevices
from gateway.models import MAX_ID_CHARS
from gateway.problems import ProblemError, problem_responses
from gateway.state import GatewayState, gateway_state
from onecard.codegen.v1 import codegen_pb2 as pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 503, 504))

State = Annotated[GatewayState, Depends(gateway_state)]
TenantId = Annotated[str, Path(max_length=MAX_ID_CHARS, description="The tenant; must be the token's tenant.")]
MemberId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]

PurposeName = Literal["pay", "access", "ride", "check_in"]
KeyStatusName = Literal["signing", "verifying", "retired"]
_PURPOSE = {"pay": pb.PURPOSE_PAY, "access": pb.PURPOSE_ACCESS, "ride": pb.PURPOSE_RIDE,
            "check_in": pb.PURPOSE_CHECK_IN}
_PURPOSE_NAME = {v: k for k, v in _PURPOSE.items()}
_KEY_STATUS_NAME = {pb.ISSUER_KEY_STATUS_SIGNING: "signing", pb.ISSUER_KEY_STATUS_VERIFYING: "verifying",
                    pb.ISSUER_KEY_STATUS_RETIRED: "retired"}
# Base64 of a 32-byte key is 44 characters; a little slack for whitespace-free variants.
MAX_KEY_B64_CHARS = 64
MAX_REVOCATION_PAGE_SIZE = 10_000
MAX_VALIDITY_S = 72 * 3600


def _time(value: timestamp_pb2.Timestamp) -> datetime | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


class Caps(BaseModel):
    per_transaction_fen: int
    per_day_fen: int
    per_day_count: int


class CredentialInfo(BaseModel):
    credential_id: str
    member_id: str
    key_id: str = Field(description="Hex of the issuer key id the code carries.")
    not_before: datetime
    not_after: datetime
    caps: Caps
    purposes: list[PurposeName]


def _credential(c: pb.Credential) -> CredentialInfo:
    return CredentialInfo(
        credential_id=c.credential_id, member_id=c.member_id, key_id=c.key_id,
        not_before=_time(c.not_before), not_after=_time(c.not_after),
        caps=Caps(per_transaction_fen=c.caps.per_transaction_fen, per_day_fen=c.caps.per_day_fen,
                  per_day_count=c.caps.per_day_count),
        purposes=[_PURPOSE_NAME[p] for p in c.purposes],
    )


class CredentialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"holder_public_key": "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=", "purposes": ["pay", "access"],
         "validity_s": 86400}]})

    holder_public_key: str = Field(max_length=MAX_KEY_B64_CHARS,
                                   description="The phone's Ed25519 public key (32 bytes), base64.")
    purposes: list[PurposeName] = Field(min_length=1, max_length=4)
    validity_s: int | None = Field(default=None, ge=1, le=MAX_VALIDITY_S,
                                   description="Default 24 h; at most 72 h.")


class IssuedCredential(BaseModel):
    credential: CredentialInfo
    credential_base64: str = Field(description="The issuer-signed credential; the phone appends its proofs.")


class TokenBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    purposes: list[PurposeName] = Field(min_length=1, max_length=4)
    slot_length_s: int | None = Field(default=None, ge=1, le=3600, description="Default 60 s.")
    hours: int | None = Field(default=None, ge=1, le=24, description="Default and most: 24.")


class TokenOut(BaseModel):
    sequence: int
    slot_start: datetime
    code: str = Field(description="OC1 text form; show it as a QR from slot_start for slot_length_s.")


class TokenBatchOut(BaseModel):
    credential: CredentialInfo
    slot_length_s: int
    tokens: list[TokenOut]


class TrustedKeyOut(BaseModel):
    key_id: str
    public_key: str = Field(description="Ed25519 public key, base64.")
    status: KeyStatusName
    not_before: datetime | None
    retire_after: datetime | None
    version: int


class TrustListOut(BaseModel):
    version: int = Field(description="Pass as since_version to get only later changes.")
    keys: list[TrustedKeyOut]


class RevocationOut(BaseModel):
    credential_id: str
    member_id: str
    revoked_at: datetime | None
    not_after: datetime | None
    reason: str
    version: int


class RevocationsOut(BaseModel):
    entries: list[RevocationOut]
    version: int = Field(description="Pass as since_version to continue.")
    more: bool


def _holder_key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProblemError(status=400, reason="HOLDER_KEY_INVALID",
                           detail="holder_public_key must be base64 of a 32-byte Ed25519 key") from None


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/credentials", response_model=IssuedCredential,
             status_code=201, tags=["codes"], summary="Issue an offline credential bound to the phone's holder key",
             responses=problem_responses(409))
async def issue_credential(tenant_id: TenantId, member_id: MemberId, body: CredentialRequest, state: State,
                           _principal: IssueCodes) -> IssuedCredential:
    answer = await state.codegen.IssueCredential(
        pb.IssueCredentialRequest(tenant_id=tenant_id, member_id=member_id,
                                  holder_public_key=_holder_key(body.holder_public_key),
                                  purposes=[_PURPOSE[p] for p in body.purposes], validity_s=body.validity_s or 0),
        timeout=state.timeout_s,
    )
    return IssuedCredential(credential=_credential(answer.credential), credential_base64=answer.credential_base64)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/token-batches", response_model=TokenBatchOut,
             status_code=201, tags=["codes"], summary="Issue a batch of rotating tokens (at most 24 h)",
             responses=problem_responses(409))
async def issue_token_batch(tenant_id: TenantId, member_id: MemberId, body: TokenBatchRequest, state: State,
                            _principal: IssueCodes) -> TokenBatchOut:
    answer = await state.codegen.IssueTokenBatch(
        pb.IssueTokenBatchRequest(tenant_id=tenant_id, member_id=member_id,
                                  purposes=[_PURPOSE[p] for p in body.purposes],
                                  slot_length_s=body.slot_length_s or 0, hours=body.hours or 0),
        timeout=state.timeout_s,
    )
    return TokenBatchOut(
        credential=_credential(answer.credential),
        slot_length_s=answer.slot_length_s,
        tokens=[TokenOut(sequence=t.sequence, slot_start=_time(t.slot_start), code=t.code) for t in answer.tokens],
    )


@router.get("/v1/tenants/{tenant_id}/trust-list", response_model=TrustListOut, tags=["codes"],
            summary="Issuer keys devices accept: all of them, or the changes after a version")
async def get_trust_list(
    tenant_id: TenantId,
    state: State,
    _principal: SyncDevices,
    since_version: Annotated[int, Query(ge=0, description="0 for the whole list; N for changes after N.")] = 0,
) -> TrustListOut:
    answer = await state.codegen.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id, since_version=since_version),
                                              timeout=state.timeout_s)
    return TrustListOut(version=answer.version, keys=[
        TrustedKeyOut(key_id=k.key_id, public_key=_b64(k.public_key), status=_KEY_STATUS_NAME[k.status],
                      not_before=_time(k.not_before), retire_after=_time(k.retire_after), version=k.version)
        for k in answer.keys
    ])


@router.get("/v1/tenants/{tenant_id}/revocations", response_model=RevocationsOut, tags=["codes"],
            summary="Revoked credentials after a version")
async def get_revocations(
    tenant_id: TenantId,
    state: State,
    _principal: SyncDevices,
    since_version: Annotated[int, Query(ge=0, description="Entries with a greater version; 0 for all.")] = 0,
    page_size: Annotated[int | None, Query(ge=1, le=MAX_REVOCATION_PAGE_SIZE)] = None,
) -> RevocationsOut:
    answer = await state.codegen.GetRevocations(
        pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=since_version, page_size=page_size or 0),
        timeout=state.timeout_s,
    )
    return RevocationsOut(
        entries=[RevocationOut(credential_id=e.credential_id, member_id=e.member_id, revoked_at=_time(e.revoked_at),
                               not_after=_time(e.not_after), reason=e.reason, version=e.version)
                 for e in answer.entries],
        version=answer.version,
        more=answer.more,
    )

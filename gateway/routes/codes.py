"""REST for the e-code: ``onecard.codegen.v1.CodegenService`` as partners and devices use it.

A bank app or a member app backend with ``codes:issue`` asks for a credential (bound to the
phone's holder key) or a batch of rotating tokens for a member of the token's tenant; a device or
device hub with ``devices:sync`` fetches the trust list and the revocation list as changes since
a version. A school's operator with ``codes:admin`` reads and changes the tenant's code settings
(offline caps, default validity and purposes), rotates its issuer key and revokes credentials.

Each handler only translates: path, query and body to a request message, the answer to JSON.
"""
from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from google.protobuf import timestamp_pb2
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import MEMBER_TOKEN_ROUTE, AdminCodes, IssueCodes, SyncDevices
from gateway.models import MemberId, TenantId, MAX_ID_CHARS
from gateway.problems import ProblemError, problem_responses
from gateway.state import State
from onecard.codegen.v1 import codegen_pb2 as pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 503, 504))

CredentialId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="A credential id (UUID).")]

PurposeName = Literal["pay", "access", "ride", "check_in"]
KeyStatusName = Literal["signing", "verifying", "retired"]
_PURPOSE = {"pay": pb.PURPOSE_PAY, "access": pb.PURPOSE_ACCESS, "ride": pb.PURPOSE_RIDE,
            "check_in": pb.PURPOSE_CHECK_IN}
_PURPOSE_NAME = {v: k for k, v in _PURPOSE.items()}
Purposes = Annotated[list[PurposeName], Field(min_length=1, max_length=4)]
_KEY_STATUS_NAME = {pb.ISSUER_KEY_STATUS_SIGNING: "signing", pb.ISSUER_KEY_STATUS_VERIFYING: "verifying",
                    pb.ISSUER_KEY_STATUS_RETIRED: "retired"}
# Base64 of a 32-byte key is 44 characters; a little slack for whitespace-free variants.
MAX_KEY_B64_CHARS = 64
MAX_REVOCATION_PAGE_SIZE = 10_000
MAX_VALIDITY_S = 72 * 3600
# The code format's bounds (docs/code-format.md): amounts are u32 fen, the daily count a u8.
MAX_CAP_FEN = 2**32 - 1
MAX_CAP_COUNT = 255
MAX_DEFAULT_VALIDITY_HOURS = 72
MAX_REASON_CHARS = 200


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
        {"holder_public_key": "Hg9P8ERluAE8L8SPF3SQgUOLcTd8KBY03KD+MjFCh4o=", "purposes": ["pay", "access"],
         "validity_s": 86400}]})

    holder_public_key: str = Field(max_length=MAX_KEY_B64_CHARS,
                                   description="The phone's Ed25519 public key (32 bytes), base64.")
    purposes: Purposes | None = Field(default=None, description="Default: the tenant's default purposes.")
    validity_s: int | None = Field(default=None, ge=1, le=MAX_VALIDITY_S,
                                   description="Default: the tenant's default validity (24 h unless set); "
                                   "at most 72 h.")


class IssuedCredential(BaseModel):
    credential: CredentialInfo
    credential_base64: str = Field(description="The issuer-signed credential; the phone appends its proofs.")


class TokenBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    purposes: Purposes | None = Field(default=None, description="Default: the tenant's default purposes.")
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


def _trusted_key(k: pb.TrustedKey) -> TrustedKeyOut:
    return TrustedKeyOut(key_id=k.key_id, public_key=_b64(k.public_key), status=_KEY_STATUS_NAME[k.status],
                         not_before=_time(k.not_before), retire_after=_time(k.retire_after), version=k.version)


def _revocation(e: pb.RevocationEntry) -> RevocationOut:
    return RevocationOut(credential_id=e.credential_id, member_id=e.member_id, revoked_at=_time(e.revoked_at),
                         not_after=_time(e.not_after), reason=e.reason, version=e.version)


# --- administration (codes:admin) ------------------------------------------------------------


class CapsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_transaction_fen: int = Field(ge=0, le=MAX_CAP_FEN, description="Most one offline payment may take, in fen; "
                                     "at most per_day_fen.")
    per_day_fen: int = Field(ge=0, le=MAX_CAP_FEN, description="Most a device approves offline in a day, in fen.")
    per_day_count: int = Field(ge=0, le=MAX_CAP_COUNT, description="Offline payments a day (the format's u8).")


_SETTINGS_EXAMPLE = {"caps": {"per_transaction_fen": 5000, "per_day_fen": 20000, "per_day_count": 20},
                     "default_credential_validity_hours": 24, "default_purposes": ["pay", "access"]}


class CodeSettingsIn(BaseModel):
    """Every field is replaced; what is issued from now on carries these caps."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_SETTINGS_EXAMPLE]})

    caps: CapsIn
    default_credential_validity_hours: int = Field(ge=1, le=MAX_DEFAULT_VALIDITY_HOURS,
                                                   description="Validity of a credential whose request names none.")
    default_purposes: list[PurposeName] = Field(default_factory=list, max_length=4,
                                                description="Purposes of a request that names none; may be empty.")


class CodeSettingsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{**_SETTINGS_EXAMPLE,
                                                               "updated_at": "2025-09-01T08:00:00Z"}]})

    caps: Caps
    default_credential_validity_hours: int
    default_purposes: list[PurposeName]
    updated_at: datetime | None = Field(description="null while the tenant has the service's defaults.")


class RotatedKeys(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "signing_key": {"key_id": "5be1a2c3", "public_key": "Hg9P8ERluAE8L8SPF3SQgUOLcTd8KBY03KD+MjFCh4o=",
                        "status": "signing", "not_before": "2025-09-01T08:00:00Z", "retire_after": None,
                        "version": 2},
        "previous_key": {"key_id": "0f9e8d7c", "public_key": "3q2+796tvu/erb7v3q2+796tvu/erb7v3q2+796tvu8=",
                         "status": "verifying", "not_before": "2025-08-01T08:00:00Z",
                         "retire_after": "2025-09-02T08:00:00Z", "version": 2},
        "trust_list_version": 2}]})

    signing_key: TrustedKeyOut
    previous_key: TrustedKeyOut | None = Field(description="The key it replaced, now verifying until retire_after; "
                                               "null on the tenant's first key.")
    trust_list_version: int


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "phone reported stolen"}]})

    reason: str = Field(default="", max_length=MAX_REASON_CHARS,
                        description="For the operator's records; the revocation list says only 'requested'.")


class MemberRevocationsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"revocations": [{
        "credential_id": "3f1e9a52-7c1b-4d1e-9a0f-5b2c6d7e8f90", "member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e",
        "revoked_at": "2025-09-01T08:00:00Z", "not_after": "2025-09-02T08:00:00Z", "reason": "member_revoked",
        "version": 12}]}]})

    revocations: list[RevocationOut] = Field(description="The credentials revoked now; empty if none was left.")


def _settings(s: pb.TenantCodeSettings) -> CodeSettingsOut:
    return CodeSettingsOut(
        caps=Caps(per_transaction_fen=s.caps.per_transaction_fen, per_day_fen=s.caps.per_day_fen,
                  per_day_count=s.caps.per_day_count),
        default_credential_validity_hours=s.default_credential_validity_hours,
        default_purposes=[_PURPOSE_NAME[p] for p in s.default_purposes],
        updated_at=_time(s.updated_at),
    )


def _holder_key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProblemError(status=400, reason="HOLDER_KEY_INVALID",
                           detail="holder_public_key must be base64 of a 32-byte Ed25519 key") from None


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/credentials", response_model=IssuedCredential,
             status_code=201, tags=["codes"], summary="Issue an offline credential bound to the phone's holder key",
             responses=problem_responses(409), openapi_extra=MEMBER_TOKEN_ROUTE)
async def issue_credential(tenant_id: TenantId, member_id: MemberId, body: CredentialRequest, state: State,
                           _principal: IssueCodes) -> IssuedCredential:
    answer = await state.codegen.IssueCredential(
        pb.IssueCredentialRequest(tenant_id=tenant_id, member_id=member_id,
                                  holder_public_key=_holder_key(body.holder_public_key),
                                  purposes=[_PURPOSE[p] for p in body.purposes or ()],
                                  validity_s=body.validity_s or 0),
        timeout=state.timeout_s,
    )
    return IssuedCredential(credential=_credential(answer.credential), credential_base64=answer.credential_base64)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/token-batches", response_model=TokenBatchOut,
             status_code=201, tags=["codes"], summary="Issue a batch of rotating tokens (at most 24 h)",
             responses=problem_responses(409), openapi_extra=MEMBER_TOKEN_ROUTE)
async def issue_token_batch(tenant_id: TenantId, member_id: MemberId, body: TokenBatchRequest, state: State,
                            _principal: IssueCodes) -> TokenBatchOut:
    answer = await state.codegen.IssueTokenBatch(
        pb.IssueTokenBatchRequest(tenant_id=tenant_id, member_id=member_id,
                                  purposes=[_PURPOSE[p] for p in body.purposes or ()],
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
    return TrustListOut(version=answer.version, keys=[_trusted_key(k) for k in answer.keys])


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
        entries=[_revocation(e) for e in answer.entries],
        version=answer.version,
        more=answer.more,
    )


@router.get("/v1/tenants/{tenant_id}/code-settings", response_model=CodeSettingsOut, tags=["codes"],
            summary="The tenant's e-code settings: offline caps, default validity and purposes")
async def get_code_settings(tenant_id: TenantId, state: State, _principal: AdminCodes) -> CodeSettingsOut:
    answer = await state.codegen.GetTenantCodeSettings(pb.GetTenantCodeSettingsRequest(tenant_id=tenant_id),
                                                       timeout=state.timeout_s)
    return _settings(answer.settings)


@router.put("/v1/tenants/{tenant_id}/code-settings", response_model=CodeSettingsOut, tags=["codes"],
            summary="Replace the tenant's e-code settings (applies to what is issued from now on)")
async def put_code_settings(tenant_id: TenantId, body: CodeSettingsIn, state: State,
                            _principal: AdminCodes) -> CodeSettingsOut:
    answer = await state.codegen.UpdateTenantCodeSettings(
        pb.UpdateTenantCodeSettingsRequest(
            tenant_id=tenant_id,
            caps=pb.OfflineCaps(per_transaction_fen=body.caps.per_transaction_fen, per_day_fen=body.caps.per_day_fen,
                                per_day_count=body.caps.per_day_count),
            default_credential_validity_hours=body.default_credential_validity_hours,
            default_purposes=[_PURPOSE[p] for p in body.default_purposes],
        ),
        timeout=state.timeout_s,
    )
    return _settings(answer.settings)


@router.post("/v1/tenants/{tenant_id}/issuer-keys/rotate", response_model=RotatedKeys, tags=["codes"],
             summary="Rotate the tenant's issuer key: a new key signs, the old one verifies until its "
             "credentials expire")
async def rotate_issuer_key(tenant_id: TenantId, state: State, _principal: AdminCodes) -> RotatedKeys:
    answer = await state.codegen.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id),
                                                 timeout=state.timeout_s)
    return RotatedKeys(
        signing_key=_trusted_key(answer.signing_key),
        previous_key=_trusted_key(answer.previous_key) if answer.HasField("previous_key") else None,
        trust_list_version=answer.trust_list_version,
    )


@router.post("/v1/tenants/{tenant_id}/credentials/{credential_id}/revoke", response_model=RevocationOut,
             tags=["codes"], summary="Revoke one credential (idempotent: a second call answers the first revocation)")
async def revoke_credential(
    tenant_id: TenantId,
    credential_id: CredentialId,
    state: State,
    _principal: AdminCodes,
    body: Annotated[RevokeRequest | None, Body()] = None,
) -> RevocationOut:
    answer = await state.codegen.RevokeCredential(
        pb.RevokeCredentialRequest(tenant_id=tenant_id, credential_id=credential_id,
                                   reason=body.reason if body else ""),
        timeout=state.timeout_s,
    )
    return _revocation(answer.revocation)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/credentials/revoke", response_model=MemberRevocationsOut,
             tags=["codes"], summary="Revoke every credential and token batch of a member")
async def revoke_member_credentials(
    tenant_id: TenantId,
    member_id: MemberId,
    state: State,
    _principal: AdminCodes,
    body: Annotated[RevokeRequest | None, Body()] = None,
) -> MemberRevocationsOut:
    answer = await state.codegen.RevokeMember(
        pb.RevokeMemberRequest(tenant_id=tenant_id, member_id=member_id, reason=body.reason if body else ""),
        timeout=state.timeout_s,
    )
    return MemberRevocationsOut(revocations=[_revocation(e) for e in answer.revocations])

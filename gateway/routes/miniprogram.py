"""REST for mini-program backends (docs/miniprograms.md): bindings of the calling client's external
user ids (members:bind) and self-service on behalf of a bound member (members:self-service), plus
the school's side: clearing or setting a member's PIN at its office and the tenant's self-service
settings (members:write; reading the settings members:read).

The partner is always the token's client: the client id sent to identity comes from the token,
never from the request. External user ids travel in bodies (and the lookup's query string),
never in paths, since an openid may hold characters a path cannot carry plainly. PINs are
``SecretStr``, so no repr or log of a request model shows one, and they are never answered.

Each handler only translates. This router is included before the identity router, so
``/members/by-external-user`` is matched before ``/members/{member_id}``.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from gateway.auth import BindMembers, Principal, ReadMembers, SelfService, WriteMembers
from gateway.models import Member, MemberId, TenantId, member_from_pb, timestamp
from gateway.problems import problem_responses
from gateway.state import State
from onecard.identity.v1 import identity_pb2 as pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 409, 422, 429, 503, 504))

# identity's limits (services/identity/selfservice.py); identity checks the characters.
MAX_EXTERNAL_USER_ID_CHARS = 128
MAX_ATTESTATION_ID_CHARS = 128
# A PIN is six digits; a little room so identity, not the schema, says what is wrong with it.
MAX_PIN_CHARS = 16

ExternalUserId = Annotated[str, Field(min_length=1, max_length=MAX_EXTERNAL_USER_ID_CHARS,
                                      description="The partner's id of its user (e.g. a mini-program openid): 1 to "
                                      "128 visible ASCII characters.", examples=["oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"])]
AttestationId = Annotated[str, Field(min_length=1, max_length=MAX_ATTESTATION_ID_CHARS,
                                     description="The partner's id of the member's session or request that asked: "
                                     "its attestation that the member did. Kept with the change.",
                                     examples=["sess-2f9c1e"])]
Pin = Annotated[SecretStr, Field(min_length=1, max_length=MAX_PIN_CHARS, description="Six digits, as typed.")]


class ExternalUserBind(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_user_id: ExternalUserId


class ExternalUserBinding(BaseModel):
    external_user_id: str
    member_id: str
    bound_at: datetime | None
    unbound_at: datetime | None = Field(default=None, description="Null while the binding stands.")


class ExternalUserBound(BaseModel):
    binding: ExternalUserBinding
    replaced: ExternalUserBinding | None = Field(
        default=None, description="The member's previous external user id at this client, which this binding ended.")


class ExternalUserMember(BaseModel):
    member: Member
    binding: ExternalUserBinding


class SelfServiceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_user_id: ExternalUserId
    attestation_id: AttestationId


class SelfServiceUnfreeze(SelfServiceBody):
    pin: Pin


class SelfServiceCardLost(SelfServiceBody):
    card_uid: str | None = Field(default=None, min_length=1, max_length=40,
                                 description="The card; absent for the member's active card.")


class PinUpdate(SelfServiceBody):
    new_pin: Pin
    old_pin: Pin | None = Field(default=None, description="Required when the member has a PIN; absent for the "
                                "first one.")


class AdminPinSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: Pin


class SelfServiceSettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_pin_by_admin: bool = Field(description="Only the school's admin sets a member's first PIN (at its office, "
                                     "having seen the member); partners can then only change it.")


class SelfServiceSettings(SelfServiceSettingsUpdate):
    model_config = ConfigDict(extra="ignore")
    updated_at: datetime | None = Field(description="Null while the defaults apply.")


class PinSet(BaseModel):
    first: bool = Field(description="True when this was the member's first PIN.")


def _binding(binding: pb.ExternalUserBinding) -> ExternalUserBinding:
    return ExternalUserBinding(external_user_id=binding.external_user_id, member_id=binding.member_id,
                               bound_at=timestamp(binding.bound_at), unbound_at=timestamp(binding.unbound_at))


def _caller(principal: Principal, body: SelfServiceBody) -> pb.SelfServiceCaller:
    return pb.SelfServiceCaller(client_id=principal.client_id, external_user_id=body.external_user_id,
                                attestation_id=body.attestation_id)


# --- Bindings --------------------------------------------------------------------------------


@router.put("/v1/tenants/{tenant_id}/members/{member_id}/external-user", response_model=ExternalUserBound,
            tags=["miniprograms"], summary="Bind one of the calling client's external user ids to the member")
async def bind_external_user(
    tenant_id: TenantId, member_id: MemberId, body: ExternalUserBind, state: State, principal: BindMembers
) -> ExternalUserBound:
    """The member has at most one external user id at a client: a new one replaces the old (answered
    as ``replaced``). An id bound to another member is 409 EXTERNAL_USER_BOUND; a member who left,
    409 MEMBER_LEFT. Repeating the call changes nothing."""
    answer = await state.identity.BindExternalUser(
        pb.BindExternalUserRequest(tenant_id=tenant_id, client_id=principal.client_id,
                                   external_user_id=body.external_user_id, member_id=member_id),
        timeout=state.timeout_s,
    )
    return ExternalUserBound(binding=_binding(answer.binding),
                             replaced=_binding(answer.replaced) if answer.HasField("replaced") else None)


@router.delete("/v1/tenants/{tenant_id}/members/{member_id}/external-user", status_code=204,
               tags=["miniprograms"], summary="Unbind the calling client's external user id of the member",
               response_class=Response)
async def unbind_external_user(
    tenant_id: TenantId, member_id: MemberId, state: State, principal: BindMembers
) -> Response:
    await state.identity.UnbindExternalUser(
        pb.UnbindExternalUserRequest(tenant_id=tenant_id, client_id=principal.client_id, member_id=member_id),
        timeout=state.timeout_s,
    )
    return Response(status_code=204)


@router.get("/v1/tenants/{tenant_id}/members/by-external-user", response_model=ExternalUserMember,
            tags=["miniprograms"], summary="The member one of the calling client's external user ids is bound to")
async def lookup_member_by_external_user(
    tenant_id: TenantId,
    state: State,
    principal: BindMembers,
    external_user_id: Annotated[str, Query(min_length=1, max_length=MAX_EXTERNAL_USER_ID_CHARS)],
) -> ExternalUserMember:
    """404 BINDING_NOT_FOUND when the id is not bound at this client, including ids another client bound."""
    answer = await state.identity.LookupMemberByExternalUser(
        pb.LookupMemberByExternalUserRequest(tenant_id=tenant_id, client_id=principal.client_id,
                                             external_user_id=external_user_id),
        timeout=state.timeout_s,
    )
    return ExternalUserMember(member=member_from_pb(answer.member), binding=_binding(answer.binding))


# --- Self-service ----------------------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/self-service/freeze", response_model=Member, tags=["miniprograms"],
             summary="The member freezes their own card and codes (no PIN)")
async def self_service_freeze(
    tenant_id: TenantId, body: SelfServiceBody, state: State, principal: SelfService
) -> Member:
    answer = await state.identity.SelfServiceFreeze(
        pb.SelfServiceFreezeRequest(tenant_id=tenant_id, caller=_caller(principal, body)), timeout=state.timeout_s)
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/self-service/unfreeze", response_model=Member, tags=["miniprograms"],
             summary="The member lifts their own freeze with their PIN")
async def self_service_unfreeze(
    tenant_id: TenantId, body: SelfServiceUnfreeze, state: State, principal: SelfService
) -> Member:
    """403 PIN_INCORRECT (``attempts_left``); 429 PIN_LOCKED with Retry-After (``retry_after_s``);
    409 FROZEN_BY_TENANT when the school froze the member; 409 PIN_NOT_SET."""
    answer = await state.identity.SelfServiceUnfreeze(
        pb.SelfServiceUnfreezeRequest(tenant_id=tenant_id, caller=_caller(principal, body),
                                      pin=body.pin.get_secret_value()),
        timeout=state.timeout_s,
    )
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/self-service/report-card-lost", response_model=Member,
             tags=["miniprograms"], summary="The member reports their card lost (no PIN); it is blacklisted for good")
async def self_service_report_card_lost(
    tenant_id: TenantId, body: SelfServiceCardLost, state: State, principal: SelfService
) -> Member:
    answer = await state.identity.SelfServiceReportCardLost(
        pb.SelfServiceReportCardLostRequest(tenant_id=tenant_id, caller=_caller(principal, body),
                                            card_uid=body.card_uid or ""),
        timeout=state.timeout_s,
    )
    return member_from_pb(answer.member)


@router.put("/v1/tenants/{tenant_id}/self-service/pin", response_model=PinSet, tags=["miniprograms"],
            summary="The member sets a first PIN, or changes it with the old one")
async def set_member_pin(
    tenant_id: TenantId, body: PinUpdate, state: State, principal: SelfService
) -> PinSet:
    """Checking the old PIN counts against the same lockout as unfreezing."""
    answer = await state.identity.SetMemberPin(
        pb.SetMemberPinRequest(tenant_id=tenant_id, caller=_caller(principal, body),
                               new_pin=body.new_pin.get_secret_value(),
                               old_pin=body.old_pin.get_secret_value() if body.old_pin else ""),
        timeout=state.timeout_s,
    )
    return PinSet(first=answer.first)


@router.delete("/v1/tenants/{tenant_id}/members/{member_id}/pin", status_code=204, tags=["miniprograms"],
               summary="Clear a member's PIN and its lockout (the school's admin, for a forgotten PIN)",
               response_class=Response)
async def reset_member_pin(
    tenant_id: TenantId, member_id: MemberId, state: State, principal: WriteMembers
) -> Response:
    await state.identity.ResetMemberPin(
        pb.ResetMemberPinRequest(tenant_id=tenant_id, member_id=member_id, client_id=principal.client_id),
        timeout=state.timeout_s,
    )
    return Response(status_code=204)


@router.put("/v1/tenants/{tenant_id}/members/{member_id}/pin", status_code=204, tags=["miniprograms"],
            summary="Set a member's PIN at the school's office (no old PIN; the lockout ends)",
            response_class=Response)
async def admin_set_member_pin(
    tenant_id: TenantId, member_id: MemberId, body: AdminPinSet, state: State, principal: WriteMembers
) -> Response:
    await state.identity.ResetMemberPin(
        pb.ResetMemberPinRequest(tenant_id=tenant_id, member_id=member_id, client_id=principal.client_id,
                                 new_pin=body.pin.get_secret_value()),
        timeout=state.timeout_s,
    )
    return Response(status_code=204)


def _settings(settings: pb.SelfServiceSettings) -> SelfServiceSettings:
    return SelfServiceSettings(first_pin_by_admin=settings.first_pin_by_admin,
                               updated_at=timestamp(settings.updated_at))


@router.get("/v1/tenants/{tenant_id}/self-service-settings", response_model=SelfServiceSettings,
            tags=["miniprograms"], summary="The tenant's self-service settings")
async def get_self_service_settings(tenant_id: TenantId, state: State, _principal: ReadMembers) -> SelfServiceSettings:
    answer = await state.identity.GetSelfServiceSettings(pb.GetSelfServiceSettingsRequest(tenant_id=tenant_id),
                                                         timeout=state.timeout_s)
    return _settings(answer.settings)


@router.put("/v1/tenants/{tenant_id}/self-service-settings", response_model=SelfServiceSettings,
            tags=["miniprograms"], summary="Change the tenant's self-service settings")
async def update_self_service_settings(
    tenant_id: TenantId, body: SelfServiceSettingsUpdate, state: State, principal: WriteMembers
) -> SelfServiceSettings:
    answer = await state.identity.UpdateSelfServiceSettings(
        pb.UpdateSelfServiceSettingsRequest(
            tenant_id=tenant_id, client_id=principal.client_id,
            settings=pb.SelfServiceSettings(first_pin_by_admin=body.first_pin_by_admin)),
        timeout=state.timeout_s,
    )
    return _settings(answer.settings)

"""The gRPC face of codegen: protobuf in, domain calls, protobuf out. No rules and no SQL here.

Every call parses its tenant id first and reaches rows only through that tenant; a member is
checked with identity under the same tenant, so another tenant's member is simply not found.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.codegen.v1 import codegen_pb2 as pb
from onecard.codegen.v1 import codegen_pb2_grpc
from runtime.errors import InvalidArgument, NotFound
from runtime.grpc_server import ServiceApp
from runtime.idempotency import key_scope, scoped_key
from runtime.mesh import peer_name
from runtime.wire import timestamp_pb
from services.codegen import domain, signing
from services.codegen.domain import (
    Credential,
    CredentialKind,
    HolderKey,
    HolderKeyStatus,
    IssuerKey,
    KeyStatus,
    Purpose,
    Revocation,
    RevocationReason,
    TenantCodeSettings,
)
from services.codegen.identity_client import IdentityClient
from services.codegen.settings import CodegenSettings
from services.codegen.store import CodegenStore, TenantTx

_PURPOSE = {
    Purpose.PAY: pb.PURPOSE_PAY,
    Purpose.ACCESS: pb.PURPOSE_ACCESS,
    Purpose.RIDE: pb.PURPOSE_RIDE,
    Purpose.CHECK_IN: pb.PURPOSE_CHECK_IN,
}
_PURPOSE_FROM_PB = {v: k for k, v in _PURPOSE.items()}
_KEY_STATUS = {
    KeyStatus.SIGNING: pb.ISSUER_KEY_STATUS_SIGNING,
    KeyStatus.VERIFYING: pb.ISSUER_KEY_STATUS_VERIFYING,
    KeyStatus.RETIRED: pb.ISSUER_KEY_STATUS_RETIRED,
}
_HOLDER_KEY_STATUS = {
    HolderKeyStatus.ACTIVE: pb.HOLDER_KEY_STATUS_ACTIVE,
    HolderKeyStatus.REVOKED: pb.HOLDER_KEY_STATUS_REVOKED,
}




def _now() -> datetime:
    return datetime.now(UTC)


def _purpose_list(values: list[int]) -> list[Purpose | None]:
    """Wire values as domain purposes; None for a value the domain will refuse as unknown."""
    return [_PURPOSE_FROM_PB.get(v) for v in values]


def _requested_purposes(values: list[int]) -> list[Purpose | None]:
    """The purposes a request named, checked before any I/O when there are some; an empty list is
    resolved later against the tenant's defaults, which only the store knows."""
    requested = _purpose_list(values)
    if requested:
        domain.check_purposes(requested)
    return requested


def settings_pb(*, tenant_id: uuid.UUID, settings: TenantCodeSettings) -> pb.TenantCodeSettings:
    return pb.TenantCodeSettings(
        tenant_id=str(tenant_id),
        caps=pb.OfflineCaps(per_transaction_fen=settings.caps.per_transaction_fen,
                            per_day_fen=settings.caps.per_day_fen, per_day_count=settings.caps.per_day_count),
        default_credential_validity_hours=settings.default_validity_hours,
        default_purposes=[_PURPOSE[p] for p in settings.default_purposes],
        updated_at=timestamp_pb(settings.updated_at),
    )


def credential_pb(credential: Credential) -> pb.Credential:
    c = credential
    return pb.Credential(
        tenant_id=str(c.tenant_id),
        credential_id=str(c.credential_id),
        member_id=str(c.member_id),
        key_id=c.key_id.hex(),
        not_before=timestamp_pb(c.not_before),
        not_after=timestamp_pb(c.not_after),
        caps=pb.OfflineCaps(per_transaction_fen=c.caps.per_transaction_fen, per_day_fen=c.caps.per_day_fen,
                            per_day_count=c.caps.per_day_count),
        purposes=[_PURPOSE[p] for p in c.purposes],
        holder_public_key=c.holder_public_key or b"",
    )


def trusted_key_pb(key: IssuerKey) -> pb.TrustedKey:
    return pb.TrustedKey(
        tenant_id=str(key.tenant_id),
        key_id=key.key_id.hex(),
        public_key=key.public_key,
        status=_KEY_STATUS[key.status],
        not_before=timestamp_pb(key.not_before),
        retire_after=timestamp_pb(key.retire_after),
        version=key.version,
    )


def holder_key_pb(key: HolderKey) -> pb.HolderKey:
    return pb.HolderKey(
        tenant_id=str(key.tenant_id),
        member_id=str(key.member_id),
        public_key=key.public_key,
        status=_HOLDER_KEY_STATUS[key.status],
        registered_at=timestamp_pb(key.registered_at),
        revoked_at=timestamp_pb(key.revoked_at),
    )


def revocation_pb(entry: Revocation) -> pb.RevocationEntry:
    return pb.RevocationEntry(
        credential_id=str(entry.credential_id),
        member_id=str(entry.member_id),
        revoked_at=timestamp_pb(entry.revoked_at),
        not_after=timestamp_pb(entry.not_after),
        reason=entry.reason,
        version=entry.version,
    )


class CodegenServicer(codegen_pb2_grpc.CodegenServiceServicer):
    def __init__(self, *, app: ServiceApp, settings: CodegenSettings, identity: IdentityClient, master_key: bytes):
        self._app = app
        self._settings = settings
        self._identity = identity
        self._master_key = master_key

    @property
    def _store(self) -> CodegenStore:
        return CodegenStore(self._app.pool, master_key=self._master_key, key_id_for=signing.key_id_for)

    async def _check_member(self, tx: TenantTx, *, member_id: uuid.UUID, reported: tuple[domain.MemberStatus, int]
                            ) -> None:
        """Under the member's lock: identity's answer, or what its events said since, must allow codes."""
        await tx.lock_member(member_id)
        status = domain.effective_member_status(
            reported=reported[0], reported_version=reported[1], known=await tx.known_member_status(member_id)
        )
        domain.check_member_may_hold_codes(status)

    # --- holder keys ------------------------------------------------------------------------

    async def RegisterHolderKey(
        self, request: pb.RegisterHolderKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterHolderKeyResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        public_key = domain.check_holder_public_key(request.public_key)
        reported = await self._identity.member_status(tenant_id=tenant_id, member_id=member_id)
        async with self._store.tenant_tx(tenant_id) as tx:
            await self._check_member(tx, member_id=member_id, reported=reported)
            # Registering answers the row already there, whoever registered it; the check decides.
            key = await tx.register_holder_key(member_id=member_id, public_key=public_key, now=_now())
            domain.check_holder_key_usable(key=key, member_id=member_id)
        return pb.RegisterHolderKeyResponse(holder_key=holder_key_pb(key))

    async def RevokeHolderKey(
        self, request: pb.RevokeHolderKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeHolderKeyResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        public_key = domain.check_holder_public_key(request.public_key)
        domain.check_reason(request.reason)
        now = _now()
        async with self._store.tenant_tx(tenant_id) as tx:
            await tx.lock_member(member_id)
            existing = await tx.holder_key(public_key)
            if existing is None or existing.member_id != member_id:
                raise NotFound("no such holder key for this member", reason="HOLDER_KEY_NOT_FOUND")
            key = await tx.revoke_holder_key(public_key=public_key, now=now)
            revoked = await tx.revoke_holder_key_credentials(
                public_key=public_key, reason=RevocationReason.HOLDER_KEY_REVOKED.value, now=now
            )
        return pb.RevokeHolderKeyResponse(holder_key=holder_key_pb(key), revoked_credentials=len(revoked))

    # --- issuing ----------------------------------------------------------------------------

    async def IssueCredential(
        self, request: pb.IssueCredentialRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueCredentialResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        holder_public_key = domain.check_holder_public_key(request.holder_public_key)
        requested = _requested_purposes(list(request.purposes))
        now = _now()
        if request.validity_s:
            # An explicit validity is checked before any I/O; 0 waits for the tenant's default.
            domain.credential_validity(validity_s=request.validity_s, now=now,
                                       min_validity_s=self._settings.min_validity_s)
        reported = await self._identity.member_status(tenant_id=tenant_id, member_id=member_id)
        async with self._store.tenant_tx(tenant_id) as tx:
            await self._check_member(tx, member_id=member_id, reported=reported)
            settings = await tx.code_settings()
            purposes = domain.requested_or_default_purposes(requested=requested, settings=settings)
            validity = domain.credential_validity(validity_s=request.validity_s, now=now,
                                                  min_validity_s=self._settings.min_validity_s,
                                                  default_validity_s=settings.default_validity_hours * 3600)
            caps = settings.caps
            # A key not seen before is registered here, saving the phone a round trip.
            holder = await tx.register_holder_key(member_id=member_id, public_key=holder_public_key, now=now)
            domain.check_holder_key_usable(key=holder, member_id=member_id)
            signer = await tx.signing_key(now=now)
            # The id of a holder credential is derived from its signed bytes (the format's rule),
            # so it is known only once the SDK has signed it.
            signed = signing.sign_credential(
                signing_key=signer.signing_key, tenant_id=tenant_id, member_id=member_id,
                holder_public_key=holder_public_key, validity=validity, caps=caps, purposes=purposes,
            )
            credential = Credential(
                tenant_id=tenant_id,
                credential_id=signed.credential_id,
                member_id=member_id,
                kind=CredentialKind.HOLDER,
                holder_public_key=holder_public_key,
                key_id=signer.key.key_id,
                issuer_public_key=signer.key.public_key,
                purposes=purposes,
                caps=caps,
                not_before=validity.not_before,
                not_after=validity.not_after,
                issued_at=now,
            )
            if not await tx.insert_credential(credential):
                # The same request again within the second: the same bytes, already recorded.
                # Answer them again, unless they were revoked meanwhile.
                domain.check_repeat_not_revoked(revoked=await tx.revocation_of(credential.credential_id) is not None)
        return pb.IssueCredentialResponse(
            credential=credential_pb(credential),
            credential_bytes=signed.credential_bytes,
            credential_base64=base64.b64encode(signed.credential_bytes).decode(),
        )

    async def IssueTokenBatch(
        self, request: pb.IssueTokenBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueTokenBatchResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        requested = _requested_purposes(list(request.purposes))
        now = _now()
        plan = domain.plan_batch(hours=request.hours, slot_length_s=request.slot_length_s, now=now)
        reported = await self._identity.member_status(tenant_id=tenant_id, member_id=member_id)
        async with self._store.tenant_tx(tenant_id) as tx:
            await self._check_member(tx, member_id=member_id, reported=reported)
            settings = await tx.code_settings()
            purposes = domain.requested_or_default_purposes(requested=requested, settings=settings)
            caps = settings.caps
            signer = await tx.signing_key(now=now)
            credential = Credential(
                tenant_id=tenant_id,
                credential_id=uuid.uuid4(),
                member_id=member_id,
                kind=CredentialKind.TOKEN_BATCH,
                holder_public_key=None,
                key_id=signer.key.key_id,
                issuer_public_key=signer.key.public_key,
                purposes=purposes,
                caps=caps,
                not_before=plan.not_before,
                not_after=plan.not_after,
                issued_at=now,
            )
            batch = signing.sign_token_batch(
                signing_key=signer.signing_key, tenant_id=tenant_id, member_id=member_id,
                credential_id=credential.credential_id, plan=plan, caps=caps, purposes=purposes,
            )
            await tx.insert_credential(credential)
        return pb.IssueTokenBatchResponse(
            credential=credential_pb(credential),
            slot_length_s=plan.slot_length_s,
            tokens=[
                pb.Token(slot_start=Timestamp(seconds=t.slot_start_s), sequence=t.sequence, code=t.text)
                for t in batch.tokens
            ],
        )

    # --- revoking ---------------------------------------------------------------------------

    async def RevokeCredential(
        self, request: pb.RevokeCredentialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeCredentialResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        credential_id = domain.parse_credential_id(request.credential_id)
        domain.check_reason(request.reason)
        async with self._store.tenant_tx(tenant_id) as tx:
            member_id = await tx.credential_member(credential_id)
            if member_id is None:
                raise NotFound(f"no credential {credential_id} in this tenant", reason="CREDENTIAL_NOT_FOUND")
            await tx.lock_member(member_id)
            await tx.revoke_credential(credential_id=credential_id, reason=RevocationReason.REQUESTED.value,
                                       now=_now())
            entry = await tx.revocation_of(credential_id)
        assert entry is not None
        return pb.RevokeCredentialResponse(revocation=revocation_pb(entry))

    async def RevokeMember(
        self, request: pb.RevokeMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeMemberResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        domain.check_reason(request.reason)
        # Asked of identity so that another tenant's member id is refused, not silently "revoked".
        await self._identity.member_status(tenant_id=tenant_id, member_id=member_id)
        async with self._store.tenant_tx(tenant_id) as tx:
            await tx.lock_member(member_id)
            entries = await tx.revoke_member(member_id=member_id, reason=RevocationReason.MEMBER_REVOKED.value,
                                             now=_now())
        return pb.RevokeMemberResponse(revocations=[revocation_pb(e) for e in entries])

    # --- keys and lists ---------------------------------------------------------------------

    async def RotateIssuerKey(
        self, request: pb.RotateIssuerKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateIssuerKeyResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        stored_key = None
        if request.idempotency_key or request.key_scope:
            key = domain.check_idempotency_key(request.idempotency_key)
            stored_key = scoped_key(key_scope(request.key_scope, caller=peer_name(context)), key)
        now = _now()
        async with self._store.tenant_tx(tenant_id) as tx:
            first = await tx.rotation(idempotency_key=stored_key) if stored_key else None
            if first is not None:
                new, previous, version = first
            else:
                new, previous, version = await tx.rotate(
                    now=now, retire_after_for=lambda last: domain.retire_after(last_not_after=last, now=now)
                )
                if stored_key:
                    await tx.record_rotation(idempotency_key=stored_key, new=new, previous=previous, version=version,
                                             now=now)
        return pb.RotateIssuerKeyResponse(
            signing_key=trusted_key_pb(new),
            previous_key=trusted_key_pb(previous) if previous else None,
            trust_list_version=version,
            replayed=first is not None,
        )

    async def GetTrustList(
        self, request: pb.GetTrustListRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTrustListResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        since = domain.check_since_version(request.since_version)
        # Retire what is due before answering, so a device never gets a key past its time even
        # if the background sweep has not come round yet.
        async with self._store.tenant_tx(tenant_id) as tx:
            await tx.retire_due_keys(now=_now())
        version, keys = await self._store.trust_list(tenant_id=tenant_id, since_version=since)
        return pb.GetTrustListResponse(version=version, keys=[trusted_key_pb(k) for k in keys])

    async def GetRevocations(
        self, request: pb.GetRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRevocationsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        since = domain.check_since_version(request.since_version)
        page_size = domain.check_page_size(request.page_size)
        entries = await self._store.revocations(tenant_id=tenant_id, since_version=since, limit=page_size + 1)
        page, more = entries[:page_size], len(entries) > page_size
        return pb.GetRevocationsResponse(
            entries=[revocation_pb(e) for e in page],
            version=page[-1].version if page else since,
            more=more,
        )

    # --- tenant settings --------------------------------------------------------------------

    async def GetTenantCodeSettings(
        self, request: pb.GetTenantCodeSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTenantCodeSettingsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        async with self._store.tenant_tx(tenant_id) as tx:
            settings = await tx.code_settings()
        return pb.GetTenantCodeSettingsResponse(settings=settings_pb(tenant_id=tenant_id, settings=settings))

    async def UpdateTenantCodeSettings(
        self, request: pb.UpdateTenantCodeSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateTenantCodeSettingsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        if not request.HasField("caps"):
            # Zero caps are a real choice (no offline payments), so an absent message is not read as one.
            raise InvalidArgument("caps is required", reason="CAPS_REQUIRED")
        chosen = domain.check_tenant_code_settings(
            per_transaction_fen=request.caps.per_transaction_fen, per_day_fen=request.caps.per_day_fen,
            per_day_count=request.caps.per_day_count,
            default_validity_hours=request.default_credential_validity_hours,
            default_purposes=_purpose_list(list(request.default_purposes)),
        )
        async with self._store.tenant_tx(tenant_id) as tx:
            settings = await tx.update_code_settings(settings=chosen, now=_now())
        return pb.UpdateTenantCodeSettingsResponse(settings=settings_pb(tenant_id=tenant_id, settings=settings))

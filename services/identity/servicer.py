"""The gRPC face of identity: protobuf in, domain calls, protobuf out. No rules and no SQL here.

Every member-level call parses its tenant id first and reaches rows only through that tenant, so
a member of another tenant is simply not found.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import inspect
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from runtime.grpc_server import ServiceApp
from runtime.idempotency import key_scope, scoped_key
from runtime.mesh import peer_name
from runtime.wire import timestamp_pb
from services.identity import codepage, domain, selfservice
from services.identity.codepage_store import CodePageStore
from services.identity.domain import (
    ApiClient,
    CardStatus,
    ChangeKind,
    FreezeOrigin,
    ImportState,
    Member,
    MemberChange,
    MemberImport,
    MemberStatus,
    Tenant,
    TenantKind,
)
from services.identity.importer import ImportFileError, parse_csv, run_import
from services.identity.selfservice import Binding, PinCheck, PinOutcome, PinRecord, UnbindReason
from services.identity.selfservice_store import PinTx, SelfServiceStore, actor_fields
from services.identity.settings import IdentitySettings
from services.identity.store import DirectoryWriter, IdentityStore

_TENANT_KIND = {
    TenantKind.ENTERPRISE: pb.TENANT_KIND_ENTERPRISE,
    TenantKind.UNIVERSITY: pb.TENANT_KIND_UNIVERSITY,
    TenantKind.K12: pb.TENANT_KIND_K12,
}
_TENANT_KIND_FROM_PB = {v: k for k, v in _TENANT_KIND.items()}
_MEMBER_STATUS = {
    MemberStatus.ACTIVE: pb.MEMBER_STATUS_ACTIVE,
    MemberStatus.FROZEN: pb.MEMBER_STATUS_FROZEN,
    MemberStatus.LEFT: pb.MEMBER_STATUS_LEFT,
}
_MEMBER_STATUS_FROM_PB = {v: k for k, v in _MEMBER_STATUS.items()}
_CARD_STATUS = {
    CardStatus.ACTIVE: pb.CARD_STATUS_ACTIVE,
    CardStatus.LOST: pb.CARD_STATUS_LOST,
    CardStatus.REPLACED: pb.CARD_STATUS_REPLACED,
}
_CHANGE_KIND = {
    ChangeKind.MEMBER_CREATED: pb.CHANGE_KIND_MEMBER_CREATED,
    ChangeKind.MEMBER_UPDATED: pb.CHANGE_KIND_MEMBER_UPDATED,
    ChangeKind.MEMBER_FROZEN: pb.CHANGE_KIND_MEMBER_FROZEN,
    ChangeKind.MEMBER_UNFROZEN: pb.CHANGE_KIND_MEMBER_UNFROZEN,
    ChangeKind.MEMBER_LEFT: pb.CHANGE_KIND_MEMBER_LEFT,
    ChangeKind.CARD_BOUND: pb.CHANGE_KIND_CARD_BOUND,
    ChangeKind.CARD_LOST: pb.CHANGE_KIND_CARD_LOST,
    ChangeKind.FACE_ENROLLED: pb.CHANGE_KIND_FACE_ENROLLED,
}
_FREEZE_ORIGIN = {FreezeOrigin.TENANT: pb.FREEZE_ORIGIN_TENANT, FreezeOrigin.MEMBER: pb.FREEZE_ORIGIN_MEMBER}
_IMPORT_STATE = {
    ImportState.RUNNING: pb.IMPORT_STATE_RUNNING,
    ImportState.DONE: pb.IMPORT_STATE_DONE,
    ImportState.FAILED: pb.IMPORT_STATE_FAILED,
}

# One answer for every failed authentication, so a caller cannot tell an unknown client from a
# wrong secret or a tenant that granted nothing.
AUTHENTICATION_FAILED = "client authentication failed"
MAX_CLIENT_SECRET_CHARS = 256
_PLAUSIBLE_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_SEQUENCE = 2**63 - 1
_SEARCH_TOKEN_VERSION = 1
_FEED_CURSOR_PREFIX = "dc1:"




def _now() -> datetime:
    return datetime.now(UTC)


def _state_query(query: pb.MemberStateQuery) -> domain.StateQuery:
    if not query.HasField("at"):
        raise InvalidArgument("every query needs its instant (at)", reason="AT_REQUIRED")
    at = query.at.ToDatetime(tzinfo=UTC)
    by = query.WhichOneof("by")
    if by == "member_id":
        return domain.StateQuery(at=at, member_id=domain.parse_member_id(query.member_id))
    if by == "card_uid":
        return domain.StateQuery(at=at, card_uid=domain.normalise_card_uid(query.card_uid))
    raise InvalidArgument("every query names a member_id or a card_uid", reason="LOOKUP_KEY_REQUIRED")


def tenant_pb(tenant: Tenant) -> pb.Tenant:
    return pb.Tenant(
        tenant_id=str(tenant.tenant_id),
        name=tenant.name,
        kind=_TENANT_KIND[tenant.kind],
        time_zone=tenant.time_zone,
        currency=tenant.currency,
        created_at=timestamp_pb(tenant.created_at),
    )


def member_pb(member: Member) -> pb.Member:
    return pb.Member(
        tenant_id=str(member.tenant_id),
        member_id=str(member.member_id),
        external_number=member.external_number,
        name=member.name,
        groups=dict(member.groups),
        status=_MEMBER_STATUS[member.status],
        cards=[
            pb.Card(
                card_uid=c.card_uid, status=_CARD_STATUS[c.status], bound_at=timestamp_pb(c.bound_at), lost_at=timestamp_pb(c.lost_at)
            )
            for c in member.cards
        ],
        face_enrolment_ref=member.face_enrolment_ref,
        created_at=timestamp_pb(member.created_at),
        updated_at=timestamp_pb(member.updated_at),
        version=member.version,
        frozen_by=_FREEZE_ORIGIN[member.frozen_by] if member.frozen_by else pb.FREEZE_ORIGIN_UNSPECIFIED,
    )


def settings_pb(settings: selfservice.SelfServiceSettings) -> pb.SelfServiceSettings:
    return pb.SelfServiceSettings(first_pin_by_admin=settings.first_pin_by_admin,
                                  updated_at=timestamp_pb(settings.updated_at))


def binding_pb(binding: Binding) -> pb.ExternalUserBinding:
    return pb.ExternalUserBinding(
        tenant_id=str(binding.tenant_id),
        client_id=binding.client_id,
        external_user_id=binding.external_user_id,
        member_id=str(binding.member_id),
        bound_at=timestamp_pb(binding.bound_at),
        unbound_at=timestamp_pb(binding.unbound_at),
    )


def import_pb(record: MemberImport) -> pb.MemberImport:
    return pb.MemberImport(
        import_id=str(record.import_id),
        tenant_id=str(record.tenant_id),
        state=_IMPORT_STATE[record.state],
        rows_total=record.rows_total,
        rows_done=record.rows_done,
        rows_created=record.rows_created,
        rows_updated=record.rows_updated,
        rows_unchanged=record.rows_unchanged,
        rows_failed=record.rows_failed,
        errors=[
            pb.ImportRowError(line=e.line, external_number=e.external_number, reason=e.reason) for e in record.errors
        ],
        created_at=timestamp_pb(record.created_at),
        finished_at=timestamp_pb(record.finished_at),
        failure=record.failure,
    )


def api_client_pb(client: ApiClient) -> pb.ApiClient:
    return pb.ApiClient(
        client_id=client.client_id,
        name=client.name,
        scopes=list(client.scopes),
        grants=[pb.TenantGrant(tenant_id=str(t), scopes=list(s)) for t, s in client.grants.items()],
        created_at=timestamp_pb(client.created_at),
    )


def _member_status_filter(value: int) -> MemberStatus | None:
    if value == pb.MEMBER_STATUS_UNSPECIFIED:
        return None
    if value not in _MEMBER_STATUS_FROM_PB:
        raise InvalidArgument(f"status {value} is not a member status", reason="MEMBER_STATUS_INVALID")
    return _MEMBER_STATUS_FROM_PB[value]


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def search_fingerprint(
    *, tenant_id: uuid.UUID, query: str, status: MemberStatus | None, groups: dict[str, str]
) -> str:
    """Ties a page token to its search, so a token reused with other filters is refused, not misread."""
    key = json.dumps([str(tenant_id), query, status.value if status else "", sorted(groups.items())])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_search_token(*, after_number: str, fingerprint: str) -> str:
    return _b64(json.dumps({"v": _SEARCH_TOKEN_VERSION, "after": after_number, "f": fingerprint}))


def decode_search_token(token: str, *, fingerprint: str) -> str | None:
    """The external number a page ends at; None for the first page."""
    if not token:
        return None
    try:
        body = json.loads(_unb64(token))
        after, version, given = body["after"], body["v"], body["f"]
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token is not one this service issued", reason="PAGE_TOKEN_INVALID") from None
    if version != _SEARCH_TOKEN_VERSION or given != fingerprint:
        raise InvalidArgument("page_token belongs to a different search", reason="PAGE_TOKEN_INVALID")
    try:
        return domain.check_external_number(after)
    except (InvalidArgument, TypeError):
        raise InvalidArgument("page_token is not one this service issued", reason="PAGE_TOKEN_INVALID") from None


def encode_feed_cursor(sequence: int) -> str:
    return _b64(f"{_FEED_CURSOR_PREFIX}{sequence}")


def decode_feed_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    try:
        text = _unb64(cursor)
        if not text.startswith(_FEED_CURSOR_PREFIX):
            raise ValueError(text)
        sequence = int(text.removeprefix(_FEED_CURSOR_PREFIX))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("cursor is not one this service issued", reason="CURSOR_INVALID") from None
    if not 0 <= sequence <= _MAX_SEQUENCE:
        raise InvalidArgument("cursor is not one this service issued", reason="CURSOR_INVALID")
    return sequence


# Given the tenant's writer and the member, the changes to make (or an awaitable of them).
MemberDecision = Callable[[DirectoryWriter, Member], list[MemberChange] | Awaitable[list[MemberChange]]]


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, *, app: ServiceApp, settings: IdentitySettings, clock: Callable[[], datetime] = _now):
        self._app = app
        self._settings = settings
        # What PIN lockouts and bindings are timed by; tests pass their own.
        self._clock = clock
        self._pin_limits = selfservice.PinLimits(max_failures=settings.pin_max_failures,
                                                 lockout_s=settings.pin_lockout_s)

    @property
    def _store(self) -> IdentityStore:
        return IdentityStore(self._app.pool)

    # --- tenants ---------------------------------------------------------------------------

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTenantResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id) if request.tenant_id else None
        wanted = domain.new_tenant(
            tenant_id=tenant_id,
            name=request.name,
            kind=_TENANT_KIND_FROM_PB.get(request.kind),
            time_zone=request.time_zone,
            currency=request.currency,
            now=_now(),
        )
        stored, created = await self._store.create_tenant(wanted)
        if not created:
            domain.check_tenant_replay(stored=stored, wanted=wanted)
        return pb.CreateTenantResponse(tenant=tenant_pb(stored))

    async def GetTenant(self, request: pb.GetTenantRequest, context: grpc.aio.ServicerContext) -> pb.GetTenantResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        tenant = await self._store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} not found", reason="TENANT_NOT_FOUND")
        return pb.GetTenantResponse(tenant=tenant_pb(tenant))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTenantsResponse:
        limit = domain.check_page_size(request.page_size, default=domain.DEFAULT_TENANT_PAGE_SIZE,
                                       maximum=domain.MAX_TENANT_PAGE_SIZE)
        after = None
        if request.page_token:
            try:
                after = uuid.UUID(request.page_token)
            except ValueError:
                raise InvalidArgument("bad page_token", reason="INVALID_PAGE_TOKEN") from None
        # One more than asked says whether a next page exists without a second query.
        tenants = await self._store.list_tenants(after=after, limit=limit + 1)
        page, more = tenants[:limit], len(tenants) > limit
        return pb.ListTenantsResponse(tenants=[tenant_pb(t) for t in page],
                                      next_page_token=str(page[-1].tenant_id) if more else "")

    # --- members ---------------------------------------------------------------------------

    async def CreateMember(
        self, request: pb.CreateMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateMemberResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        number = domain.check_external_number(request.external_number)
        async with self._store.directory_writer(tenant_id=tenant_id) as writer:
            existing = await writer.members_by_number([number])
            change = domain.new_member(
                tenant_id=tenant_id,
                external_number=request.external_number,
                name=request.name,
                groups=dict(request.groups),
                now=_now(),
                existing=existing.get(request.external_number),
            )
            await writer.record([change])
        return pb.CreateMemberResponse(member=member_pb(change.member))

    async def GetMember(self, request: pb.GetMemberRequest, context: grpc.aio.ServicerContext) -> pb.GetMemberResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        member = await self._store.get_member(tenant_id=tenant_id, member_id=member_id)
        if member is None:
            raise _member_not_found(member_id)
        return pb.GetMemberResponse(member=member_pb(member))

    async def _change_member(self, *, tenant_id: str, member_id: str, decide: MemberDecision) -> Member:
        """Load the member under the tenant's lock, let ``decide`` make the changes, write them."""
        tenant = domain.parse_tenant_id(tenant_id)
        member_uuid = domain.parse_member_id(member_id)
        async with self._store.directory_writer(tenant_id=tenant) as writer:
            member = await writer.member(member_uuid)
            if member is None:
                raise _member_not_found(member_uuid)
            decided = decide(writer, member)
            changes = await decided if inspect.isawaitable(decided) else decided
            await writer.record(changes)
        return changes[-1].member if changes else member

    async def UpdateMember(
        self, request: pb.UpdateMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateMemberResponse:
        if request.groups and not request.replace_groups:
            raise InvalidArgument(
                "groups were given without replace_groups; set it to replace the member's groups",
                reason="GROUPS_WITHOUT_REPLACE",
            )
        name = request.name if request.HasField("name") else None
        groups = dict(request.groups) if request.replace_groups else None
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.update_member(m, name=name, groups=groups, now=_now()),
        )
        return pb.UpdateMemberResponse(member=member_pb(member))

    async def SearchMembers(
        self, request: pb.SearchMembersRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchMembersResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        query = domain.check_search_query(request.query)
        status = _member_status_filter(request.status)
        groups = domain.check_groups(dict(request.groups))
        page_size = domain.check_page_size(
            request.page_size, default=domain.DEFAULT_SEARCH_PAGE_SIZE, maximum=domain.MAX_SEARCH_PAGE_SIZE
        )
        fingerprint = search_fingerprint(tenant_id=tenant_id, query=query, status=status, groups=groups)
        after = decode_search_token(request.page_token, fingerprint=fingerprint)
        await self._store.require_tenant(tenant_id)
        members = await self._store.search_members(
            tenant_id=tenant_id, query=query, status=status, groups=groups, after_number=after, limit=page_size + 1
        )
        page, more = members[:page_size], len(members) > page_size
        token = encode_search_token(after_number=page[-1].external_number, fingerprint=fingerprint) if more else ""
        return pb.SearchMembersResponse(members=[member_pb(m) for m in page], next_page_token=token)

    async def FreezeMember(
        self, request: pb.FreezeMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.FreezeMemberResponse:
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.freeze(m, reason=request.reason, now=_now()),
        )
        return pb.FreezeMemberResponse(member=member_pb(member))

    async def UnfreezeMember(
        self, request: pb.UnfreezeMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnfreezeMemberResponse:
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.unfreeze(m, now=_now()),
        )
        return pb.UnfreezeMemberResponse(member=member_pb(member))

    async def MarkMemberLeft(
        self, request: pb.MarkMemberLeftRequest, context: grpc.aio.ServicerContext
    ) -> pb.MarkMemberLeftResponse:
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.mark_left(m, now=_now()),
        )
        return pb.MarkMemberLeftResponse(member=member_pb(member))

    # --- media -----------------------------------------------------------------------------

    async def BindCard(self, request: pb.BindCardRequest, context: grpc.aio.ServicerContext) -> pb.BindCardResponse:
        card_uid = domain.normalise_card_uid(request.card_uid)

        async def decide(writer: DirectoryWriter, member: Member) -> list[MemberChange]:
            facts = await writer.card_facts([card_uid])
            return domain.bind_card(member, card_uid=card_uid, facts=facts[card_uid], now=_now())

        member = await self._change_member(tenant_id=request.tenant_id, member_id=request.member_id, decide=decide)
        return pb.BindCardResponse(member=member_pb(member))

    async def ReportCardLost(
        self, request: pb.ReportCardLostRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportCardLostResponse:
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.report_card_lost(m, card_uid=request.card_uid, now=_now()),
        )
        return pb.ReportCardLostResponse(member=member_pb(member))

    async def SetFaceEnrolment(
        self, request: pb.SetFaceEnrolmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetFaceEnrolmentResponse:
        member = await self._change_member(
            tenant_id=request.tenant_id,
            member_id=request.member_id,
            decide=lambda _w, m: domain.set_face_enrolment(
                m, face_enrolment_ref=request.face_enrolment_ref, now=_now()
            ),
        )
        return pb.SetFaceEnrolmentResponse(member=member_pb(member))

    async def ListCardBlacklist(
        self, request: pb.ListCardBlacklistRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCardBlacklistResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        if request.since_version < 0:
            raise InvalidArgument("since_version must not be negative", reason="VERSION_INVALID")
        page_size = domain.check_page_size(
            request.page_size, default=domain.DEFAULT_BLACKLIST_PAGE_SIZE, maximum=domain.MAX_BLACKLIST_PAGE_SIZE
        )
        await self._store.require_tenant(tenant_id)
        entries = await self._store.list_blacklist(
            tenant_id=tenant_id, after_version=request.since_version, limit=page_size
        )
        return pb.ListCardBlacklistResponse(
            cards=[
                pb.BlacklistedCard(
                    card_uid=e.card_uid, member_id=str(e.member_id), lost_at=timestamp_pb(e.lost_at), version=e.version
                )
                for e in entries
            ],
            version=entries[-1].version if entries else request.since_version,
        )

    async def LookupMember(
        self, request: pb.LookupMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupMemberResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        by = request.WhichOneof("by")
        store = self._store
        if by == "card_uid":
            card_uid = domain.normalise_card_uid(request.card_uid)
            holder, lost = await store.member_by_card(tenant_id=tenant_id, card_uid=card_uid)
            if holder is None:
                await store.require_tenant(tenant_id)
            member = domain.member_by_card(card_uid=card_uid, holder=holder, lost=lost)
        elif by == "face_enrolment_ref":
            ref = domain.check_face_ref(request.face_enrolment_ref)
            candidates = await store.members_by_face(tenant_id=tenant_id, face_enrolment_ref=ref)
            if not candidates:
                await store.require_tenant(tenant_id)
            member = domain.member_by_face(candidates)
        else:
            raise InvalidArgument("give card_uid or face_enrolment_ref", reason="LOOKUP_KEY_REQUIRED")
        return pb.LookupMemberResponse(member=member_pb(member))

    async def GetMemberStatesAt(
        self, request: pb.GetMemberStatesAtRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMemberStatesAtResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        domain.check_state_query_count(len(request.queries))
        queries = [_state_query(q) for q in request.queries]
        await self._store.require_tenant(tenant_id)
        states = await self._store.states_at(tenant_id=tenant_id, queries=queries)
        return pb.GetMemberStatesAtResponse(
            states=[
                pb.MemberStateAt(
                    found=True, member_id=str(s.member_id), status=_MEMBER_STATUS[s.status], card_lost=s.card_lost
                )
                if s.found
                else pb.MemberStateAt(found=False)
                for s in states
            ]
        )

    # --- bulk import -----------------------------------------------------------------------

    async def StartMemberImport(
        self, request: pb.StartMemberImportRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartMemberImportResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        max_bytes = self._settings.import_max_bytes
        if len(request.csv) > max_bytes:
            raise InvalidArgument(
                f"the file has {len(request.csv)} bytes; the limit is {max_bytes} ({max_bytes // (1024 * 1024)} MiB)",
                reason="IMPORT_TOO_LARGE",
            )
        store = self._store
        await store.require_tenant(tenant_id)
        try:
            rows = await asyncio.to_thread(parse_csv, request.csv, max_rows=self._settings.import_max_rows)
            failure = ""
        except ImportFileError as exc:
            rows, failure = [], str(exc)
        record = await store.create_import(
            import_id=uuid.uuid4(),
            tenant_id=tenant_id,
            csv=request.csv,
            rows_total=len(rows),
            failure=failure,
            now=_now(),
        )
        if not failure:
            self._app.spawn(
                run_import(
                    store=store, import_id=record.import_id, rows=rows, chunk_rows=self._settings.import_chunk_rows
                ),
                name=f"import-{record.import_id}",
            )
        return pb.StartMemberImportResponse(**{"import": import_pb(record)})

    async def GetMemberImport(
        self, request: pb.GetMemberImportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMemberImportResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        import_id = domain.parse_uuid(request.import_id, what="import_id", reason="IMPORT_ID_INVALID")
        record = await self._store.get_import(tenant_id=tenant_id, import_id=import_id)
        if record is None:
            raise NotFound(f"import {import_id} not found", reason="IMPORT_NOT_FOUND")
        return pb.GetMemberImportResponse(**{"import": import_pb(record)})

    # --- directory change feed -------------------------------------------------------------

    async def ListDirectoryChanges(
        self, request: pb.ListDirectoryChangesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDirectoryChangesResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        after = decode_feed_cursor(request.cursor)
        page_size = domain.check_page_size(
            request.page_size, default=domain.DEFAULT_FEED_PAGE_SIZE, maximum=domain.MAX_FEED_PAGE_SIZE
        )
        await self._store.require_tenant(tenant_id)
        changes = await self._store.list_changes(tenant_id=tenant_id, after_sequence=after, limit=page_size)
        return pb.ListDirectoryChangesResponse(
            changes=[
                pb.DirectoryChange(
                    sequence=c.sequence,
                    kind=_CHANGE_KIND[c.kind],
                    member_id=str(c.member.member_id),
                    member=member_pb(c.member),
                    changed_at=timestamp_pb(c.changed_at),
                )
                for c in changes
            ],
            next_cursor=encode_feed_cursor(changes[-1].sequence) if changes else request.cursor,
        )

    # --- partner API clients ---------------------------------------------------------------

    async def CreateApiClient(
        self, request: pb.CreateApiClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiClientResponse:
        name = domain.check_client_name(request.name)
        scopes = domain.check_scopes(request.scopes)
        grants: dict[uuid.UUID, tuple[str, ...]] = {}
        for grant in request.grants:
            tenant_id = domain.parse_tenant_id(grant.tenant_id)
            if tenant_id in grants:
                raise InvalidArgument(f"tenant {tenant_id} is granted twice", reason="GRANT_DUPLICATE")
            grants[tenant_id] = domain.check_grant_scopes(client_scopes=scopes, granted=grant.scopes)
        stored_key = fingerprint = None
        if request.idempotency_key or request.key_scope:
            key = domain.check_idempotency_key(request.idempotency_key)
            stored_key = scoped_key(key_scope(request.key_scope, caller=peer_name(context)), key)
            fingerprint = domain.api_client_fingerprint(name=name, scopes=scopes, grants=grants)
            made = await self._repeated_client(stored_key, fingerprint, name=name, scopes=scopes, grants=grants)
            if made is not None:
                return made
        secret = domain.new_client_secret()
        client = ApiClient(client_id=domain.new_client_id(), name=name, scopes=scopes, created_at=_now(), grants=grants)
        secret_hash = await asyncio.to_thread(domain.hash_client_secret, secret)
        if not await self._store.create_api_client(client=client, secret_hash=secret_hash, grants=grants,
                                                   idempotency_key=stored_key, fingerprint=fingerprint):
            # A concurrent call under the same key made it first: that one showed the secret.
            assert stored_key is not None and fingerprint is not None
            made = await self._repeated_client(stored_key, fingerprint, name=name, scopes=scopes, grants=grants)
            assert made is not None
            return made
        return pb.CreateApiClientResponse(client=api_client_pb(client), client_secret=secret)

    async def _repeated_client(self, stored_key: str, fingerprint: bytes, *, name: str, scopes: tuple[str, ...],
                               grants: dict[uuid.UUID, tuple[str, ...]]) -> pb.CreateApiClientResponse | None:
        """The answer to a key that made a client already: that client (as this very request made
        it), its secret not again; None when the key is new."""
        found = await self._store.api_client_by_key(idempotency_key=stored_key)
        if found is None:
            return None
        client_id, created_at, first_fingerprint = found
        if first_fingerprint != fingerprint:
            raise Conflict("this idempotency key was used for a different request", reason="IDEMPOTENCY_KEY_REUSED")
        client = ApiClient(client_id=client_id, name=name, scopes=scopes, created_at=created_at, grants=grants)
        return pb.CreateApiClientResponse(client=api_client_pb(client), secret_already_shown=True)

    async def GrantTenantAccess(
        self, request: pb.GrantTenantAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.GrantTenantAccessResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        store = self._store
        await store.require_tenant(tenant_id)
        client = await self._client_in_tenant(request.client_id, tenant_id)
        scopes = domain.check_grant_scopes(client_scopes=client.scopes, granted=request.scopes)
        await store.grant(tenant_id=tenant_id, client_id=client.client_id, scopes=scopes, now=_now())
        return pb.GrantTenantAccessResponse(
            client=api_client_pb(await self._client_in_tenant(client.client_id, tenant_id))
        )

    async def RevokeTenantAccess(
        self, request: pb.RevokeTenantAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeTenantAccessResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        store = self._store
        await store.require_tenant(tenant_id)
        plausible = _PLAUSIBLE_CLIENT_ID.fullmatch(request.client_id) is not None
        if not plausible or not await store.revoke(tenant_id=tenant_id, client_id=request.client_id):
            raise NotFound(
                f"tenant {tenant_id} has no grant for client {request.client_id[:64]!r}", reason="GRANT_NOT_FOUND"
            )
        return pb.RevokeTenantAccessResponse(
            client=api_client_pb(await self._client_in_tenant(request.client_id, tenant_id))
        )

    async def _client_in_tenant(self, client_id: str, tenant_id: uuid.UUID) -> ApiClient:
        client = None
        if _PLAUSIBLE_CLIENT_ID.fullmatch(client_id):
            client = await self._store.get_api_client(client_id=client_id, tenant_id=tenant_id)
        if client is None:
            raise NotFound(f"API client {client_id[:64]!r} not found", reason="CLIENT_NOT_FOUND")
        return client

    async def ListApiClients(
        self, request: pb.ListApiClientsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiClientsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        await self._store.require_tenant(tenant_id)
        clients = await self._store.list_api_clients(tenant_id=tenant_id)
        return pb.ListApiClientsResponse(clients=[api_client_pb(c) for c in clients])

    async def AuthenticateClient(
        self, request: pb.AuthenticateClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthenticateClientResponse:
        try:
            tenant_id = domain.parse_tenant_id(request.tenant_id)
        except InvalidArgument:
            tenant_id = None
        secret_hash, grant = None, None
        if _PLAUSIBLE_CLIENT_ID.fullmatch(request.client_id):
            secret_hash, grant = await self._store.client_credentials(client_id=request.client_id, tenant_id=tenant_id)
        secret = request.client_secret[: MAX_CLIENT_SECRET_CHARS + 1]
        matches = len(secret) <= MAX_CLIENT_SECRET_CHARS and await asyncio.to_thread(
            domain.client_secret_matches, secret, secret_hash
        )
        if not matches or grant is None or tenant_id is None:
            raise Unauthenticated(AUTHENTICATION_FAILED)
        return pb.AuthenticateClientResponse(
            client_id=request.client_id,
            tenant_id=str(tenant_id),
            scopes=list(domain.scopes_in_tenant(client_scopes=grant.client_scopes, granted=grant.granted)),
            grant_version=grant.grant_version,
        )

    async def GetTenantGrant(
        self, request: pb.GetTenantGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTenantGrantResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        grant = None
        if _PLAUSIBLE_CLIENT_ID.fullmatch(request.client_id):
            grant = await self._store.tenant_grant(tenant_id=tenant_id, client_id=request.client_id)
        if grant is None:
            raise NotFound(f"tenant {tenant_id} has no grant for client {request.client_id[:64]!r}",
                           reason="GRANT_NOT_FOUND")
        return pb.GetTenantGrantResponse(
            scopes=list(domain.scopes_in_tenant(client_scopes=grant.client_scopes, granted=grant.granted)),
            grant_version=grant.grant_version,
        )

    async def RevokeApiClient(
        self, request: pb.RevokeApiClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeApiClientResponse:
        plausible = _PLAUSIBLE_CLIENT_ID.fullmatch(request.client_id) is not None
        if not plausible or not await self._store.revoke_client(client_id=request.client_id, now=_now()):
            raise NotFound(f"API client {request.client_id[:64]!r} not found", reason="CLIENT_NOT_FOUND")
        return pb.RevokeApiClientResponse()


    # --- mini-program bindings and self-service (docs/miniprograms.md) -----------------------

    @property
    def _self_service(self) -> SelfServiceStore:
        return SelfServiceStore(self._app.pool)

    async def BindExternalUser(
        self, request: pb.BindExternalUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.BindExternalUserResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        client_id = _caller_client_id(request.client_id)
        external_user_id = selfservice.check_external_user_id(request.external_user_id)
        member_id = domain.parse_member_id(request.member_id)
        async with self._self_service.bindings(tenant_id=tenant_id, client_id=client_id) as tx:
            selfservice.refuse_binding(member_id, await tx.member_status(member_id))
            decision = selfservice.decide_bind(
                tenant_id=tenant_id, client_id=client_id, external_user_id=external_user_id, member_id=member_id,
                by_user=await tx.standing(external_user_id=external_user_id),
                by_member=await tx.standing(member_id=member_id), now=self._clock(),
            )
            await tx.apply(decision)
        binding = decision.new or decision.current
        assert binding is not None
        answer = pb.BindExternalUserResponse(binding=binding_pb(binding))
        if decision.replaced is not None:
            answer.replaced.CopyFrom(binding_pb(decision.replaced))
        return answer

    async def UnbindExternalUser(
        self, request: pb.UnbindExternalUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnbindExternalUserResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        client_id = _caller_client_id(request.client_id)
        member_id = domain.parse_member_id(request.member_id)
        async with self._self_service.bindings(tenant_id=tenant_id, client_id=client_id) as tx:
            current = await tx.standing(member_id=member_id)
            if current is None:
                raise NotFound("this client has no external user bound to the member", reason="BINDING_NOT_FOUND")
            ended = dataclasses.replace(current, unbound_at=self._clock(), unbound_reason=UnbindReason.UNBOUND)
            await tx.end(ended)
        return pb.UnbindExternalUserResponse(binding=binding_pb(ended))

    async def LookupMemberByExternalUser(
        self, request: pb.LookupMemberByExternalUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupMemberByExternalUserResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        binding = await self._binding(tenant_id=tenant_id, client_id=request.client_id,
                                      external_user_id=request.external_user_id)
        member = await self._store.get_member(tenant_id=tenant_id, member_id=binding.member_id)
        assert member is not None, "a binding names a member of its tenant"
        return pb.LookupMemberByExternalUserResponse(member=member_pb(member), binding=binding_pb(binding))

    async def _binding(self, *, tenant_id: uuid.UUID, client_id: str, external_user_id: str) -> Binding:
        binding = await self._self_service.standing_binding(
            tenant_id=tenant_id, client_id=_caller_client_id(client_id),
            external_user_id=selfservice.check_external_user_id(external_user_id),
        )
        if binding is None:
            raise NotFound("no member is bound to this external user id", reason="BINDING_NOT_FOUND")
        return binding

    async def _bound_member(
        self, *, tenant_id: str, caller: pb.SelfServiceCaller
    ) -> tuple[uuid.UUID, domain.SelfServiceActor, Member]:
        """The member a self-service caller's binding names, with who is acting."""
        tenant = domain.parse_tenant_id(tenant_id)
        actor = selfservice.check_actor(client_id=_caller_client_id(caller.client_id),
                                        attestation_id=caller.attestation_id)
        binding = await self._binding(tenant_id=tenant, client_id=caller.client_id,
                                      external_user_id=caller.external_user_id)
        member = await self._store.get_member(tenant_id=tenant, member_id=binding.member_id)
        assert member is not None, "a binding names a member of its tenant"
        return tenant, actor, member

    async def SelfServiceFreeze(
        self, request: pb.SelfServiceFreezeRequest, context: grpc.aio.ServicerContext
    ) -> pb.SelfServiceFreezeResponse:
        tenant_id, actor, member = await self._bound_member(tenant_id=request.tenant_id, caller=request.caller)
        member = await self._change_member(
            tenant_id=str(tenant_id), member_id=str(member.member_id),
            decide=lambda _w, m: domain.self_service_freeze(m, actor=actor, now=self._clock()),
        )
        return pb.SelfServiceFreezeResponse(member=member_pb(member))

    async def SelfServiceUnfreeze(
        self, request: pb.SelfServiceUnfreezeRequest, context: grpc.aio.ServicerContext
    ) -> pb.SelfServiceUnfreezeResponse:
        tenant_id, actor, member = await self._bound_member(tenant_id=request.tenant_id, caller=request.caller)
        pin = selfservice.check_pin_format(request.pin)
        # A no-op (already active) needs no PIN; a freeze the tenant made is refused before the PIN
        # is checked, so it spends no attempt.
        if not domain.check_self_service_unfreeze(member):
            return pb.SelfServiceUnfreezeResponse(member=member_pb(member))
        await self._verify_pin(tenant_id=tenant_id, member_id=member.member_id, pin=pin, actor=actor)
        member = await self._change_member(
            tenant_id=str(tenant_id), member_id=str(member.member_id),
            decide=lambda _w, m: domain.self_service_unfreeze(m, actor=actor, now=self._clock()),
        )
        return pb.SelfServiceUnfreezeResponse(member=member_pb(member))

    async def SelfServiceReportCardLost(
        self, request: pb.SelfServiceReportCardLostRequest, context: grpc.aio.ServicerContext
    ) -> pb.SelfServiceReportCardLostResponse:
        tenant_id, actor, member = await self._bound_member(tenant_id=request.tenant_id, caller=request.caller)
        member = await self._change_member(
            tenant_id=str(tenant_id), member_id=str(member.member_id),
            decide=lambda _w, m: domain.self_service_report_card_lost(m, card_uid=request.card_uid, actor=actor,
                                                                      now=self._clock()),
        )
        return pb.SelfServiceReportCardLostResponse(member=member_pb(member))

    async def SetMemberPin(
        self, request: pb.SetMemberPinRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetMemberPinResponse:
        tenant_id, actor, member = await self._bound_member(tenant_id=request.tenant_id, caller=request.caller)
        new_pin = selfservice.check_new_pin(request.new_pin)
        old_pin = selfservice.check_pin_format(request.old_pin, what="old_pin") if request.old_pin else ""
        selfservice.refuse_binding(member.member_id, member.status)
        settings = await self._self_service.settings(tenant_id=tenant_id)
        new_hash = await asyncio.to_thread(selfservice.hash_pin, new_pin)
        now = self._clock()
        check: PinCheck | None = None
        async with self._self_service.pin(tenant_id=tenant_id, member_id=member.member_id) as tx:
            first = tx.record is None
            if first:
                if old_pin:
                    raise FailedPrecondition("the member has no PIN to change; set a first one without old_pin",
                                             reason="PIN_NOT_SET")
                selfservice.refuse_first_pin_by_partner(settings)
                if not await tx.insert_first(PinRecord(pin_hash=new_hash, set_at=now)):
                    raise FailedPrecondition("a PIN was set meanwhile; give old_pin to change it",
                                             reason="OLD_PIN_REQUIRED")
            else:
                if not old_pin:
                    raise FailedPrecondition("the member has a PIN; give old_pin to change it",
                                             reason="OLD_PIN_REQUIRED")
                check = await self._check_pin(tx, pin=old_pin, actor=actor, now=now)
                if check.outcome is PinOutcome.VERIFIED:
                    await tx.save(PinRecord(pin_hash=new_hash, set_at=now))
            if check is None or check.outcome is PinOutcome.VERIFIED:
                await tx.log(kind="set" if first else "changed", at=now, **actor_fields(actor))
                await tx.emit(subject="identity.pin.set", data={"first": first, **actor_fields(actor)})
        if check is not None:
            selfservice.refuse_unless_verified(check, now=now)
        return pb.SetMemberPinResponse(first=first)

    async def _verify_pin(
        self, *, tenant_id: uuid.UUID, member_id: uuid.UUID, pin: str, actor: domain.SelfServiceActor
    ) -> None:
        """Check the member's PIN, store the attempt, then refuse a wrong one."""
        now = self._clock()
        async with self._self_service.pin(tenant_id=tenant_id, member_id=member_id) as tx:
            check = await self._check_pin(tx, pin=pin, actor=actor, now=now)
        selfservice.refuse_unless_verified(check, now=now)

    async def _check_pin(self, tx: PinTx, *, pin: str, actor: domain.SelfServiceActor, now: datetime) -> PinCheck:
        """One counted check inside the PIN's transaction: refused at once while locked (nothing to
        store), else the attempt and its outcome are stored and, on a lockout, announced."""
        record = selfservice.unlocked(selfservice.require_pin(tx.record), now=now)
        matched = await asyncio.to_thread(selfservice.pin_matches, pin, record.pin_hash)
        check = selfservice.after_check(record, matched=matched, now=now, limits=self._pin_limits)
        await tx.save(check.record)
        await tx.log(kind=check.outcome.value, at=now, **actor_fields(actor))
        if check.outcome is PinOutcome.LOCKED:
            assert check.record.locked_until is not None
            await tx.emit(subject="identity.pin.locked",
                          data={"locked_until": check.record.locked_until.isoformat(), **actor_fields(actor)})
        return check

    async def ResetMemberPin(
        self, request: pb.ResetMemberPinRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetMemberPinResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        client_id = _caller_client_id(request.client_id)
        new_pin = selfservice.check_new_pin(request.new_pin) if request.new_pin else ""
        member = await self._store.get_member(tenant_id=tenant_id, member_id=member_id)
        if member is None:
            raise _member_not_found(member_id)
        new_hash = ""
        if new_pin:
            selfservice.refuse_binding(member_id, member.status)
            new_hash = await asyncio.to_thread(selfservice.hash_pin, new_pin)
        now = self._clock()
        async with self._self_service.pin(tenant_id=tenant_id, member_id=member_id) as tx:
            had_pin = tx.record is not None
            if new_hash:
                await tx.replace(PinRecord(pin_hash=new_hash, set_at=now))
                await tx.log(kind="admin_set", client_id=client_id, attestation_id="", at=now)
                await tx.emit(subject="identity.pin.set", data={"first": not had_pin, "by": "tenant",
                                                                "client_id": client_id})
            elif had_pin:
                await tx.delete()
                await tx.log(kind="reset", client_id=client_id, attestation_id="", at=now)
                await tx.emit(subject="identity.pin.reset", data={"client_id": client_id})
        return pb.ResetMemberPinResponse(cleared=had_pin and not new_hash)

    async def GetSelfServiceSettings(
        self, request: pb.GetSelfServiceSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSelfServiceSettingsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        await self._store.require_tenant(tenant_id)
        settings = await self._self_service.settings(tenant_id=tenant_id)
        return pb.GetSelfServiceSettingsResponse(settings=settings_pb(settings))

    async def UpdateSelfServiceSettings(
        self, request: pb.UpdateSelfServiceSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSelfServiceSettingsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        client_id = _caller_client_id(request.client_id)
        await self._store.require_tenant(tenant_id)
        wanted = selfservice.SelfServiceSettings(first_pin_by_admin=request.settings.first_pin_by_admin,
                                                 updated_at=self._clock())
        settings = await self._self_service.update_settings(tenant_id=tenant_id, settings=wanted, client_id=client_id)
        return pb.UpdateSelfServiceSettingsResponse(settings=settings_pb(settings))


    # --- member code page links ------------------------------------------------------------------

    @property
    def _code_pages(self) -> CodePageStore:
        return CodePageStore(self._app.pool)

    async def CreateCodePageLink(
        self, request: pb.CreateCodePageLinkRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCodePageLinkResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        member_id = domain.parse_member_id(request.member_id)
        client_id = _caller_client_id(request.client_id)
        secret_hash = codepage.check_secret_hash(request.secret_hash)
        ttl_s = codepage.check_ttl_s(request.ttl_s)
        key = domain.check_idempotency_key(request.idempotency_key)
        stored_key = scoped_key(key_scope(request.key_scope, caller=peer_name(context)), key)
        store = self._code_pages
        repeated = await self._repeated_link(store, tenant_id=tenant_id, member_id=member_id,
                                             secret_hash=secret_hash, stored_key=stored_key)
        if repeated is not None:
            return repeated
        codepage.refuse_creation(await store.member_status(tenant_id=tenant_id, member_id=member_id),
                                 member_id=member_id)
        now = self._clock()
        link = codepage.CodePageLink(link_id=uuid.uuid4(), tenant_id=tenant_id, member_id=member_id,
                                     client_id=client_id, secret_hash=secret_hash, created_at=now,
                                     expires_at=now + timedelta(seconds=ttl_s), redeemed_at=None)
        if not await store.create(link, idempotency_key=stored_key):
            # A concurrent call under the same key stored its link first: answer that one.
            repeated = await self._repeated_link(store, tenant_id=tenant_id, member_id=member_id,
                                                 secret_hash=secret_hash, stored_key=stored_key)
            assert repeated is not None
            return repeated
        return pb.CreateCodePageLinkResponse(link_id=str(link.link_id), expires_at=timestamp_pb(link.expires_at),
                                             created=True)

    @staticmethod
    async def _repeated_link(store: CodePageStore, *, tenant_id: uuid.UUID, member_id: uuid.UUID,
                             secret_hash: bytes, stored_key: str) -> pb.CreateCodePageLinkResponse | None:
        """The answer to a key that made a link already (that link); None when the key is new."""
        first = await store.by_key(tenant_id=tenant_id, idempotency_key=stored_key)
        if first is None:
            return None
        if not codepage.same_request(first, tenant_id=tenant_id, member_id=member_id, secret_hash=secret_hash):
            raise Conflict("this idempotency key was used for a different request", reason="IDEMPOTENCY_KEY_REUSED")
        return pb.CreateCodePageLinkResponse(link_id=str(first.link_id), expires_at=timestamp_pb(first.expires_at),
                                             created=False)

    async def RedeemCodePageLink(
        self, request: pb.RedeemCodePageLinkRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeemCodePageLinkResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        secret_hash = codepage.check_secret_hash(request.secret_hash)
        link = await self._code_pages.redeem(tenant_id=tenant_id, secret_hash=secret_hash, now=self._clock(),
                                             refuse=codepage.refuse_redemption)
        return pb.RedeemCodePageLinkResponse(link_id=str(link.link_id), tenant_id=str(link.tenant_id),
                                             member_id=str(link.member_id), client_id=link.client_id)


def _caller_client_id(value: str) -> str:
    """The partner's client id the gateway took from its token."""
    if not _PLAUSIBLE_CLIENT_ID.fullmatch(value):
        raise InvalidArgument("client_id is required: the calling partner's", reason="CLIENT_ID_INVALID")
    return value


def _member_not_found(member_id: uuid.UUID) -> NotFound:
    return NotFound(f"member {member_id} not found", reason="MEMBER_NOT_FOUND")

"""REST for every rpc of ``onecard.identity.v1.IdentityService`` (but AuthenticateClient, which is
the token endpoint's). The tenant is in every path; each handler declares one principal type
(``ReadMembers``, ``WriteMembers``, ``AdminClients``, ``AdminPlatform``), whose dependency checks that
the path's tenant is the token's and that the token holds the scope before any call is made.

Each handler only translates: path, query and body to a request message, the answer to JSON.
Action routes use sub-paths (``/members/{id}/freeze``) rather than ``:freeze`` suffixes, so a path
parameter never has to exclude ``:`` and every generic HTTP tool routes them plainly.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response
from starlette.datastructures import UploadFile

from gateway.auth import MEMBER_TOKEN_ROUTE, AdminClients, AdminPlatform, Principal, ReadMembers, WriteMembers
from gateway.models import (
    MemberId,
    TenantId,
    MAX_BLACKLIST_PAGE_SIZE,
    MAX_FEED_PAGE_SIZE,
    MAX_ID_CHARS,
    MAX_PAGE_SIZE,
    ApiClient,
    ApiClientCreate,
    ApiClientCreated,
    ApiClientList,
    CardBind,
    CardBlacklist,
    DirectoryChanges,
    FaceEnrolment,
    FreezeRequest,
    GrantUpdate,
    Member,
    MemberCreate,
    MemberImport,
    MemberPage,
    MemberStatusName,
    MemberUpdate,
    Tenant,
    TenantCreate,
    api_client_from_pb,
    blacklist_from_pb,
    changes_from_pb,
    enum_value,
    import_from_pb,
    member_from_pb,
    tenant_from_pb,
)
from gateway.problems import ProblemError, problem_responses
from gateway.state import State
from onecard.identity.v1 import identity_pb2 as pb

# Every protected route can answer these; routes add their own (409, 413, 415).
router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 503, 504))

# Same limit as StartMemberImportRequest.csv in the proto.
MAX_CSV_BYTES = 8 * 1024 * 1024
CSV_MEDIA_TYPES = ("text/csv", "application/csv")
MAX_CURSOR_CHARS = 1024
DEFAULT_PAGE_SIZE = 50

CardUid = Annotated[str, Path(min_length=1, max_length=40, description="Card UID, hex.")]
ImportId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
ClientId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
GroupFilter = Annotated[str | None, Query(max_length=100)]


def _require_held(principal: Principal, *, scopes: list[str]) -> None:
    # A tenant admin hands out only what it holds itself, so clients:admin cannot mint a
    # stronger client than its holder.
    not_held = sorted(set(scopes) - principal.scopes)
    if not_held:
        raise ProblemError(
            status=403,
            reason="SCOPE_NOT_HELD",
            detail=f"you cannot grant scopes you do not hold: {' '.join(not_held)}",
            extra={"scope": " ".join(not_held)},
        )


# --- Tenants ---------------------------------------------------------------------------------


@router.post("/v1/tenants", response_model=Tenant, status_code=201, tags=["tenants"], summary="Create a tenant",
             responses=problem_responses(409))
async def create_tenant(
    body: TenantCreate, response: Response, state: State, _principal: AdminPlatform
) -> Tenant:
    answer = await state.identity.CreateTenant(body.to_pb(), timeout=state.timeout_s)
    response.headers["Location"] = f"/v1/tenants/{answer.tenant.tenant_id}"
    return tenant_from_pb(answer.tenant)


@router.get("/v1/tenants/{tenant_id}", response_model=Tenant, tags=["tenants"], summary="Get the token's tenant")
async def get_tenant(tenant_id: TenantId, state: State, _principal: ReadMembers) -> Tenant:
    answer = await state.identity.GetTenant(pb.GetTenantRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    return tenant_from_pb(answer.tenant)


# --- Members ---------------------------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/members", response_model=Member, status_code=201, tags=["members"],
             summary="Create a member", responses=problem_responses(409))
async def create_member(
    tenant_id: TenantId,
    body: MemberCreate,
    response: Response,
    state: State,
    _principal: WriteMembers,
) -> Member:
    answer = await state.identity.CreateMember(
        pb.CreateMemberRequest(tenant_id=tenant_id, external_number=body.external_number, name=body.name,
                               groups=body.groups),
        timeout=state.timeout_s,
    )
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/members/{answer.member.member_id}"
    return member_from_pb(answer.member)


@router.get("/v1/tenants/{tenant_id}/members", response_model=MemberPage, tags=["members"],
            summary="Search members by number or name, with filters")
async def search_members(
    tenant_id: TenantId,
    state: State,
    _principal: ReadMembers,
    q: Annotated[str, Query(max_length=200, description="External number (exact) or name prefix.")] = "",
    status: Annotated[MemberStatusName | None, Query()] = None,
    department: GroupFilter = None,
    grade: GroupFilter = None,
    class_: Annotated[str | None, Query(alias="class", max_length=100)] = None,
    role: GroupFilter = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "",
) -> MemberPage:
    filters = {"department": department, "grade": grade, "class": class_, "role": role}
    answer = await state.identity.SearchMembers(
        pb.SearchMembersRequest(
            tenant_id=tenant_id,
            query=q,
            status=enum_value(pb.MemberStatus, name=status) if status else 0,
            groups={key: value for key, value in filters.items() if value is not None},
            page_size=page_size,
            page_token=page_token,
        ),
        timeout=state.timeout_s,
    )
    return MemberPage(members=[member_from_pb(m) for m in answer.members],
                      next_page_token=answer.next_page_token or None)


@router.get("/v1/tenants/{tenant_id}/members/{member_id}", response_model=Member, tags=["members"],
            openapi_extra=MEMBER_TOKEN_ROUTE,
            summary="Get a member")
async def get_member(
    tenant_id: TenantId, member_id: MemberId, state: State, _principal: ReadMembers
) -> Member:
    answer = await state.identity.GetMember(pb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id),
                                            timeout=state.timeout_s)
    return member_from_pb(answer.member)


@router.patch("/v1/tenants/{tenant_id}/members/{member_id}", response_model=Member, tags=["members"],
              summary="Change a member's name or groups", responses=problem_responses(409))
async def update_member(
    tenant_id: TenantId,
    member_id: MemberId,
    body: MemberUpdate,
    state: State,
    _principal: WriteMembers,
) -> Member:
    request = pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=member_id,
                                     replace_groups=body.groups is not None, groups=body.groups or {})
    if body.name is not None:
        request.name = body.name
    answer = await state.identity.UpdateMember(request, timeout=state.timeout_s)
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/freeze", response_model=Member, tags=["members"],
             summary="Freeze a member: every medium stops working", responses=problem_responses(409))
async def freeze_member(
    tenant_id: TenantId,
    member_id: MemberId,
    state: State,
    _principal: WriteMembers,
    body: Annotated[FreezeRequest | None, Body()] = None,
) -> Member:
    answer = await state.identity.FreezeMember(
        pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id, reason=body.reason if body else ""),
        timeout=state.timeout_s,
    )
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/unfreeze", response_model=Member, tags=["members"],
             summary="Unfreeze a member", responses=problem_responses(409))
async def unfreeze_member(
    tenant_id: TenantId, member_id: MemberId, state: State, _principal: WriteMembers
) -> Member:
    answer = await state.identity.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=member_id),
                                                 timeout=state.timeout_s)
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/leave", response_model=Member, tags=["members"],
             summary="Mark a member as having left", responses=problem_responses(409))
async def mark_member_left(
    tenant_id: TenantId, member_id: MemberId, state: State, _principal: WriteMembers
) -> Member:
    answer = await state.identity.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=member_id),
                                                 timeout=state.timeout_s)
    return member_from_pb(answer.member)


# --- Media -----------------------------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/cards", response_model=Member, tags=["media"],
             summary="Bind a physical card to a member", responses=problem_responses(409))
async def bind_card(
    tenant_id: TenantId,
    member_id: MemberId,
    body: CardBind,
    state: State,
    _principal: WriteMembers,
) -> Member:
    answer = await state.identity.BindCard(
        pb.BindCardRequest(tenant_id=tenant_id, member_id=member_id, card_uid=body.card_uid), timeout=state.timeout_s
    )
    return member_from_pb(answer.member)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/cards/{card_uid}/report-lost", response_model=Member,
             tags=["media"], summary="Report a card lost: it goes on the blacklist",
             responses=problem_responses(409), openapi_extra=MEMBER_TOKEN_ROUTE)
async def report_card_lost(
    tenant_id: TenantId,
    member_id: MemberId,
    card_uid: CardUid,
    state: State,
    _principal: WriteMembers,
) -> Member:
    answer = await state.identity.ReportCardLost(
        pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member_id, card_uid=card_uid), timeout=state.timeout_s
    )
    return member_from_pb(answer.member)


@router.put("/v1/tenants/{tenant_id}/members/{member_id}/face", response_model=Member, tags=["media"],
            summary="Set the member's face enrolment", responses=problem_responses(409))
async def set_face_enrolment(
    tenant_id: TenantId,
    member_id: MemberId,
    body: FaceEnrolment,
    state: State,
    _principal: WriteMembers,
) -> Member:
    answer = await state.identity.SetFaceEnrolment(
        pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=member_id,
                                   face_enrolment_ref=body.face_enrolment_ref),
        timeout=state.timeout_s,
    )
    return member_from_pb(answer.member)


@router.delete("/v1/tenants/{tenant_id}/members/{member_id}/face", response_model=Member, tags=["media"],
               summary="Clear the member's face enrolment", responses=problem_responses(409))
async def clear_face_enrolment(
    tenant_id: TenantId, member_id: MemberId, state: State, _principal: WriteMembers
) -> Member:
    answer = await state.identity.SetFaceEnrolment(
        pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=member_id, face_enrolment_ref=""),
        timeout=state.timeout_s,
    )
    return member_from_pb(answer.member)


@router.get("/v1/tenants/{tenant_id}/card-blacklist", response_model=CardBlacklist, tags=["media"],
            summary="Cards reported lost, after a version")
async def list_card_blacklist(
    tenant_id: TenantId,
    state: State,
    _principal: ReadMembers,
    since_version: Annotated[int, Query(ge=0, description="Entries with a greater version; 0 for all.")] = 0,
    page_size: Annotated[int | None, Query(ge=1, le=MAX_BLACKLIST_PAGE_SIZE)] = None,
) -> CardBlacklist:
    answer = await state.identity.ListCardBlacklist(
        pb.ListCardBlacklistRequest(tenant_id=tenant_id, since_version=since_version, page_size=page_size or 0),
        timeout=state.timeout_s,
    )
    return blacklist_from_pb(answer)


# --- Imports ---------------------------------------------------------------------------------


async def _csv_body(request: Request) -> bytes:
    """The CSV file of an import request: the raw body (text/csv) or the multipart field "file"."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    too_large = ProblemError(status=413, reason="PAYLOAD_TOO_LARGE",
                             detail=f"the CSV file is larger than {MAX_CSV_BYTES} bytes")
    if media_type in CSV_MEDIA_TYPES:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_CSV_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)
    if media_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ProblemError(status=422, reason="VALIDATION_FAILED",
                                   detail="the multipart body needs the CSV file in a field named 'file'")
            data = await upload.read(MAX_CSV_BYTES + 1)
        if len(data) > MAX_CSV_BYTES:
            raise too_large
        return data
    raise ProblemError(status=415, reason="UNSUPPORTED_MEDIA_TYPE",
                       detail="send the CSV as text/csv or as multipart/form-data with a field 'file'")


_IMPORT_BODY = {
    "required": True,
    "description": "UTF-8 CSV with a header row. Columns: external_number, name, and optional department, grade, "
    "class, role, status (active|frozen|left), card_uid. At most 8 MiB.",
    "content": {
        "text/csv": {
            "schema": {"type": "string"},
            "example": "external_number,name,department,grade,class,role\n2025010203,Li Hua,physics,2025,3,student\n",
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


@router.post("/v1/tenants/{tenant_id}/member-imports", response_model=MemberImport, status_code=202,
             tags=["imports"], summary="Start a bulk member import from CSV",
             openapi_extra={"requestBody": _IMPORT_BODY}, responses=problem_responses(413, 415))
async def start_member_import(
    tenant_id: TenantId,
    request: Request,
    response: Response,
    state: State,
    _principal: WriteMembers,
) -> MemberImport:
    """Answers 202 with the import and its Location; poll that for progress and row errors. Bad rows
    do not stop the import. A file refused as a whole (not UTF-8, unusable header) answers 422 with
    reason IMPORT_FILE_INVALID."""
    csv = await _csv_body(request)
    answer = await state.identity.StartMemberImport(pb.StartMemberImportRequest(tenant_id=tenant_id, csv=csv),
                                                    timeout=state.timeout_s)
    started = getattr(answer, "import")  # "import" is a Python keyword, so no attribute syntax
    location = f"/v1/tenants/{tenant_id}/member-imports/{started.import_id}"
    if started.state == pb.IMPORT_STATE_FAILED:
        # identity refused the file as a whole while reading it (not UTF-8, unusable header): nothing
        # was accepted for processing, so this is the caller's error, not a 202.
        raise ProblemError(status=422, reason="IMPORT_FILE_INVALID", detail=started.failure,
                           headers={"Location": location}, extra={"import_id": started.import_id})
    response.headers["Location"] = location
    return import_from_pb(started)


@router.get("/v1/tenants/{tenant_id}/member-imports/{import_id}", response_model=MemberImport, tags=["imports"],
            summary="An import's progress and row errors")
async def get_member_import(
    tenant_id: TenantId, import_id: ImportId, state: State, _principal: ReadMembers
) -> MemberImport:
    answer = await state.identity.GetMemberImport(pb.GetMemberImportRequest(tenant_id=tenant_id, import_id=import_id),
                                                  timeout=state.timeout_s)
    return import_from_pb(getattr(answer, "import"))


# --- Directory feed --------------------------------------------------------------------------


@router.get("/v1/tenants/{tenant_id}/directory-changes", response_model=DirectoryChanges, tags=["directory"],
            summary="Member changes after a cursor")
async def list_directory_changes(
    tenant_id: TenantId,
    state: State,
    _principal: ReadMembers,
    cursor: Annotated[
        str, Query(max_length=MAX_CURSOR_CHARS, description="From a previous answer; empty for the start.")
    ] = "",
    page_size: Annotated[int | None, Query(ge=1, le=MAX_FEED_PAGE_SIZE)] = None,
) -> DirectoryChanges:
    answer = await state.identity.ListDirectoryChanges(
        pb.ListDirectoryChangesRequest(tenant_id=tenant_id, cursor=cursor, page_size=page_size or 0),
        timeout=state.timeout_s,
    )
    return changes_from_pb(answer)


# --- API clients -----------------------------------------------------------------------------


@router.get("/v1/tenants/{tenant_id}/api-clients", response_model=ApiClientList, tags=["api-clients"],
            summary="API clients this tenant granted access to")
async def list_api_clients(
    tenant_id: TenantId, state: State, _principal: AdminClients
) -> ApiClientList:
    answer = await state.identity.ListApiClients(pb.ListApiClientsRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    return ApiClientList(clients=[api_client_from_pb(c, tenant_id=tenant_id) for c in answer.clients])


@router.post("/v1/tenants/{tenant_id}/api-clients", response_model=ApiClientCreated, status_code=201,
             tags=["api-clients"], summary="Create an API client granted to this tenant only",
             responses=problem_responses(409))
async def create_api_client(
    tenant_id: TenantId,
    body: ApiClientCreate,
    state: State,
    principal: AdminClients,
) -> ApiClientCreated:
    scopes = sorted(set(body.scopes))
    _require_held(principal, scopes=scopes)
    answer = await state.identity.CreateApiClient(
        pb.CreateApiClientRequest(name=body.name, scopes=scopes,
                                  grants=[pb.TenantGrant(tenant_id=tenant_id, scopes=scopes)]),
        timeout=state.timeout_s,
    )
    return ApiClientCreated(client=api_client_from_pb(answer.client, tenant_id=tenant_id),
                            client_secret=answer.client_secret)


@router.put("/v1/tenants/{tenant_id}/api-clients/{client_id}/grant", response_model=ApiClient,
            tags=["api-clients"], summary="Grant an existing API client access to this tenant",
            responses=problem_responses(409))
async def grant_tenant_access(
    tenant_id: TenantId,
    client_id: ClientId,
    body: GrantUpdate,
    state: State,
    principal: AdminClients,
) -> ApiClient:
    scopes = sorted(set(body.scopes))
    _require_held(principal, scopes=scopes)
    answer = await state.identity.GrantTenantAccess(
        pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id=client_id, scopes=scopes), timeout=state.timeout_s
    )
    return api_client_from_pb(answer.client, tenant_id=tenant_id)


@router.delete("/v1/tenants/{tenant_id}/api-clients/{client_id}/grant", status_code=204, tags=["api-clients"],
               summary="Revoke an API client's access to this tenant", response_class=Response)
async def revoke_tenant_access(
    tenant_id: TenantId, client_id: ClientId, state: State, _principal: AdminClients
) -> Response:
    await state.identity.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id=client_id),
                                            timeout=state.timeout_s)
    return Response(status_code=204)

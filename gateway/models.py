"""The JSON shapes of the API and their translation from and to identity's protobuf messages.

Enums travel as lower-case names without the protobuf prefix ("university", "frozen"), timestamps
as RFC 3339 in UTC, unset strings and timestamps as null. Nothing here decides anything: a value
the service would refuse is the service's to refuse.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import Path
from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.auth import SCOPES
from onecard.identity.v1 import identity_pb2 as pb

TenantKindName = Literal["enterprise", "university", "k12"]
MemberStatusName = Literal["active", "frozen", "left"]
CardStatusName = Literal["active", "lost", "replaced"]
ImportStateName = Literal["running", "done", "failed"]
ChangeKindName = Literal[
    "member_created",
    "member_updated",
    "member_frozen",
    "member_unfrozen",
    "member_left",
    "card_bound",
    "card_lost",
    "face_enrolled",
]
ScopeName = Literal["members:read", "members:write", "clients:admin", "platform:admin", "codes:issue",
                    "devices:sync", "codes:admin", "wallets:read", "wallets:topup", "ledger:admin",
                    "statements:read", "policy:admin", "payments:create", "devices:admin", "data:read",
                    "members:bind", "members:self-service", "webhooks:manage", "members:code-page"]
assert set(get_args(ScopeName)) == set(SCOPES), "ScopeName must list exactly gateway.auth.SCOPES"

# Limits the gateway enforces before a request reaches a service; identity has its own too.
MAX_PAGE_SIZE = 200
MAX_FEED_PAGE_SIZE = 1000
# Devices sync the whole blacklist, so its pages may be long.
MAX_BLACKLIST_PAGE_SIZE = 10_000
MAX_NAME_CHARS = 200
MAX_ID_CHARS = 64
MAX_GROUPS = 32
MAX_GROUP_KEY_CHARS = 64
MAX_GROUP_VALUE_CHARS = 100
MAX_REF_CHARS = 256

def _enum_prefix(enum: EnumTypeWrapper) -> str:
    # TenantKind's values are TENANT_KIND_*: the prefix is the common part of every name.
    unspecified = next(v.name for v in enum.DESCRIPTOR.values if v.name.endswith("_UNSPECIFIED"))
    return unspecified[: -len("UNSPECIFIED")]


def enum_name(enum: EnumTypeWrapper, *, value: int) -> Any:
    """TENANT_KIND_UNIVERSITY (2) -> "university"."""
    return enum.Name(value)[len(_enum_prefix(enum)):].lower()


def enum_value(enum: EnumTypeWrapper, *, name: str) -> int:
    """"university" -> TENANT_KIND_UNIVERSITY (2)."""
    return enum.Value(_enum_prefix(enum) + name.upper())


def timestamp(value: timestamp_pb2.Timestamp) -> datetime | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def or_none(value: str) -> str | None:
    """An empty protobuf string as JSON null."""
    return value or None


GroupsMap = dict[str, str]
GroupsInput = dict[
    Annotated[str, StringConstraints(min_length=1, max_length=MAX_GROUP_KEY_CHARS)],
    Annotated[str, StringConstraints(max_length=MAX_GROUP_VALUE_CHARS)],
]
_GROUPS_FIELD = Field(
    default_factory=dict,
    max_length=MAX_GROUPS,
    description="Groups and tags, keyed department, grade, class or role.",
    examples=[{"department": "physics", "grade": "2025", "class": "3", "role": "student"}],
)


# --- Tenants ---------------------------------------------------------------------------------


class Tenant(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90",
                    "name": "Example University",
                    "kind": "university",
                    "time_zone": "Asia/Shanghai",
                    "currency": "CNY",
                    "created_at": "2025-09-01T08:00:00Z",
                }
            ]
        }
    )

    tenant_id: str
    name: str
    kind: TenantKindName
    time_zone: str = Field(description="IANA time zone.")
    currency: str = Field(description="ISO 4217; only CNY for now.")
    created_at: datetime | None


class TenantCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "Example University", "kind": "university", "time_zone": "Asia/Shanghai"}]
        },
    )

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    kind: TenantKindName
    time_zone: str = Field(default="Asia/Shanghai", min_length=1, max_length=64)
    currency: str = Field(default="CNY", min_length=3, max_length=3)
    tenant_id: str | None = Field(
        default=None,
        max_length=MAX_ID_CHARS,
        description="Optional caller-chosen UUID: repeating the call with the same id and fields returns "
        "the existing tenant instead of creating a second one.",
    )

    def to_pb(self) -> pb.CreateTenantRequest:
        return pb.CreateTenantRequest(
            name=self.name,
            kind=enum_value(pb.TenantKind, name=self.kind),
            time_zone=self.time_zone,
            currency=self.currency,
            tenant_id=self.tenant_id or "",
        )


def tenant_from_pb(tenant: pb.Tenant) -> Tenant:
    return Tenant(
        tenant_id=tenant.tenant_id,
        name=tenant.name,
        kind=enum_name(pb.TenantKind, value=tenant.kind),
        time_zone=tenant.time_zone,
        currency=tenant.currency,
        created_at=timestamp(tenant.created_at),
    )


# --- Members ---------------------------------------------------------------------------------


class Card(BaseModel):
    card_uid: str = Field(description="Physical card UID, hex.")
    status: CardStatusName
    bound_at: datetime | None
    lost_at: datetime | None


class Member(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90",
                    "member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e",
                    "external_number": "2025010203",
                    "name": "Li Hua",
                    "groups": {"department": "physics", "grade": "2025", "class": "3", "role": "student"},
                    "status": "active",
                    "cards": [
                        {"card_uid": "04A224B2C35E80", "status": "active",
                         "bound_at": "2025-09-01T08:05:00Z", "lost_at": None}
                    ],
                    "face_enrolment_ref": None,
                    "created_at": "2025-09-01T08:00:00Z",
                    "updated_at": "2025-09-01T08:05:00Z",
                    "version": 2,
                }
            ]
        }
    )

    tenant_id: str
    member_id: str
    external_number: str = Field(description="The tenant's own number for the person; unique in the tenant.")
    name: str
    groups: GroupsMap
    status: MemberStatusName
    cards: list[Card]
    face_enrolment_ref: str | None = Field(description="Opaque reference at the face vendor; null when none.")
    created_at: datetime | None
    updated_at: datetime | None
    version: int = Field(description="Increments on every change; the directory feed carries it.")
    frozen_by: Literal["tenant", "member"] | None = Field(
        default=None, description="Who froze a frozen member: the tenant (its admin) or the member (self-service, "
        "which the member may lift with the PIN); null when not frozen.")


def member_from_pb(member: pb.Member) -> Member:
    return Member(
        tenant_id=member.tenant_id,
        member_id=member.member_id,
        external_number=member.external_number,
        name=member.name,
        groups=dict(member.groups),
        status=enum_name(pb.MemberStatus, value=member.status),
        cards=[
            Card(
                card_uid=card.card_uid,
                status=enum_name(pb.CardStatus, value=card.status),
                bound_at=timestamp(card.bound_at),
                lost_at=timestamp(card.lost_at),
            )
            for card in member.cards
        ],
        face_enrolment_ref=or_none(member.face_enrolment_ref),
        created_at=timestamp(member.created_at),
        updated_at=timestamp(member.updated_at),
        version=member.version,
        frozen_by=enum_name(pb.FreezeOrigin, value=member.frozen_by) if member.frozen_by else None,
    )


class MemberCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"external_number": "2025010203", "name": "Li Hua",
                 "groups": {"department": "physics", "grade": "2025", "class": "3", "role": "student"}}
            ]
        },
    )

    external_number: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    groups: GroupsInput = _GROUPS_FIELD


class MemberUpdate(BaseModel):
    """Fields left out keep their value; ``groups``, when given, replaces all of the member's groups."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "Li Hua", "groups": {"department": "chemistry", "grade": "2025"}}]},
    )

    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    groups: GroupsInput | None = Field(default=None, max_length=MAX_GROUPS,
                                       description="When given, replaces all of the member's groups.")


class MemberPage(BaseModel):
    members: list[Member]
    next_page_token: str | None = Field(description="Pass as page_token for the next page; null on the last.")


class FreezeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "unpaid dormitory fee"}]})

    reason: str = Field(default="", max_length=MAX_NAME_CHARS)


class CardBind(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"card_uid": "04A224B2C35E80"}]})

    card_uid: str = Field(min_length=1, max_length=40,
                          description="Card UID as the reader prints it, hex, 8 to 20 characters.")


class FaceEnrolment(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"face_enrolment_ref": "fv-7d1f2a"}]})

    face_enrolment_ref: str = Field(min_length=1, max_length=MAX_REF_CHARS,
                                    description="Opaque reference of the enrolment at the face vendor.")


# --- Card blacklist --------------------------------------------------------------------------


class BlacklistedCard(BaseModel):
    card_uid: str
    member_id: str
    lost_at: datetime | None
    version: int


class CardBlacklist(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"cards": [{"card_uid": "04A224B2C35E80", "member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e",
                            "lost_at": "2025-10-02T12:00:00Z", "version": 17}],
                 "version": 17}
            ]
        }
    )

    cards: list[BlacklistedCard]
    version: int = Field(description="Pass as since_version to continue.")


def blacklist_from_pb(response: pb.ListCardBlacklistResponse) -> CardBlacklist:
    return CardBlacklist(
        cards=[
            BlacklistedCard(card_uid=c.card_uid, member_id=c.member_id, lost_at=timestamp(c.lost_at), version=c.version)
            for c in response.cards
        ],
        version=response.version,
    )


# --- Imports ---------------------------------------------------------------------------------


class ImportRowError(BaseModel):
    line: int = Field(description="1-based line in the CSV file; the header is line 1.")
    external_number: str | None
    reason: str


class MemberImport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "import_id": "a3f0b6a2-1c1d-4a8e-9f55-2b6c7d8e9f01",
                    "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90",
                    "state": "done",
                    "rows_total": 3,
                    "rows_done": 3,
                    "rows_created": 2,
                    "rows_updated": 0,
                    "rows_unchanged": 0,
                    "rows_failed": 1,
                    "errors": [{"line": 4, "external_number": "2025x", "reason": "INVALID_STATUS"}],
                    "created_at": "2025-09-01T08:00:00Z",
                    "finished_at": "2025-09-01T08:00:02Z",
                    "failure": None,
                }
            ]
        }
    )

    import_id: str
    tenant_id: str
    state: ImportStateName
    rows_total: int
    rows_done: int
    rows_created: int
    rows_updated: int
    rows_unchanged: int
    rows_failed: int
    errors: list[ImportRowError]
    created_at: datetime | None
    finished_at: datetime | None
    failure: str | None = Field(description="Why the whole import failed (e.g. an unusable header); null otherwise.")


def import_from_pb(value: pb.MemberImport) -> MemberImport:
    return MemberImport(
        import_id=value.import_id,
        tenant_id=value.tenant_id,
        state=enum_name(pb.ImportState, value=value.state),
        rows_total=value.rows_total,
        rows_done=value.rows_done,
        rows_created=value.rows_created,
        rows_updated=value.rows_updated,
        rows_unchanged=value.rows_unchanged,
        rows_failed=value.rows_failed,
        errors=[
            ImportRowError(line=e.line, external_number=or_none(e.external_number), reason=e.reason)
            for e in value.errors
        ],
        created_at=timestamp(value.created_at),
        finished_at=timestamp(value.finished_at),
        failure=or_none(value.failure),
    )


# --- Directory feed --------------------------------------------------------------------------


class DirectoryChange(BaseModel):
    sequence: int = Field(description="Position in the tenant's feed; strictly increasing.")
    kind: ChangeKindName
    member_id: str
    member: Member = Field(description="The member as it was right after the change.")
    changed_at: datetime | None


class DirectoryChanges(BaseModel):
    changes: list[DirectoryChange]
    next_cursor: str = Field(description="Pass as cursor to continue; equals the request's cursor when nothing is new.")


def changes_from_pb(response: pb.ListDirectoryChangesResponse) -> DirectoryChanges:
    return DirectoryChanges(
        changes=[
            DirectoryChange(
                sequence=c.sequence,
                kind=enum_name(pb.ChangeKind, value=c.kind),
                member_id=c.member_id,
                member=member_from_pb(c.member),
                changed_at=timestamp(c.changed_at),
            )
            for c in response.changes
        ],
        next_cursor=response.next_cursor,
    )


# --- API clients -----------------------------------------------------------------------------


class TenantGrant(BaseModel):
    tenant_id: str
    scopes: list[str]


class ApiClient(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "client_id": "c0ffee00-1234-4abc-8def-0123456789ab",
                    "name": "canteen app backend",
                    "scopes": ["members:read"],
                    "grants": [{"tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90", "scopes": ["members:read"]}],
                    "created_at": "2025-09-01T08:00:00Z",
                }
            ]
        }
    )

    client_id: str
    name: str
    scopes: list[str] = Field(description="The scopes the client may ever hold.")
    grants: list[TenantGrant] = Field(description="This tenant's grant only; grants of other tenants are not shown.")
    created_at: datetime | None


def api_client_from_pb(client: pb.ApiClient, *, tenant_id: str) -> ApiClient:
    """The client as one tenant may see it: a client granted by several tenants shows only this one's grant."""
    return ApiClient(
        client_id=client.client_id,
        name=client.name,
        scopes=list(client.scopes),
        grants=[
            TenantGrant(tenant_id=g.tenant_id, scopes=list(g.scopes)) for g in client.grants if g.tenant_id == tenant_id
        ],
        created_at=timestamp(client.created_at),
    )


class ApiClientList(BaseModel):
    clients: list[ApiClient]


class ApiClientCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "canteen app backend", "scopes": ["members:read"]}]},
    )

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    scopes: list[ScopeName] = Field(min_length=1, max_length=len(SCOPES),
                                    description="Granted in this tenant too; each must be a scope the caller holds.")


class ApiClientCreated(BaseModel):
    client: ApiClient
    client_secret: str = Field(description="Shown once, now; only a hash is kept. Store it in a secret store.")


class GrantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"scopes": ["members:read"]}]})

    scopes: list[ScopeName] = Field(min_length=1, max_length=len(SCOPES),
                                    description="Scopes this tenant grants; each must be a scope the caller holds.")


# --- OAuth -----------------------------------------------------------------------------------


class TokenResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"access_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6ImF0K2p3dCJ9…", "token_type": "Bearer",
                 "expires_in": 900, "scope": "members:read members:write"}
            ]
        }
    )

    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(description="Seconds the token stays valid.")
    scope: str = Field(description="Space-separated scopes the token carries.")


class Health(BaseModel):
    status: Literal["ok", "ready"]


# The path parameters every tenant route shares.
TenantId = Annotated[str, Path(max_length=MAX_ID_CHARS, description="The tenant; must be the token's tenant.")]
MemberId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="identity's member id (UUID).")]

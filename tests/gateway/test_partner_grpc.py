"""The public gRPC API for partners (onecard.partner.v1), against the real gateway in this process
with real identity, codegen, ledger, policy and device hub, over a real TLS channel to its port.

RPC_CALLS says how to call each rpc; a PartnerService rpc without a row fails
``test_every_partner_rpc_is_in_the_matrix``. From a row the tests make the same request on both
faces (the REST request is derived from the rpc's twin route: path, query, Idempotency-Key header,
JSON body) and hold the gRPC answer to the REST answer: the same message for the same request; the
same reason (and the matching code) for the same refusal, with a token of tenant A naming tenant
B's tenant or ids, with a token lacking the scope, with no token or a bad one.
"""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import BaseModel

from devstack.servers import free_port
from gateway.auth import LEDGER_ADMIN, SCOPES
from gateway.partner_grpc import (
    ANSWERS_FILE,
    ANSWERS_MODEL,
    SERVICE,
    SERVICE_NAME,
    BoundRpc,
    PartnerServer,
    bind_partner_rpcs,
    body_model,
    server_credentials,
    start_partner_server,
    without_nulls,
)
from gateway.problems import GRPC_TO_HTTP, HTTP_TO_GRPC
from gateway.state import GatewayState
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.partner.v1 import partner_pb2, partner_pb2_grpc
from runtime.grpc_client import error_info
from runtime.grpc_server import REQUEST_ID_METADATA, STATUS_DETAILS_METADATA
from runtime.mesh import load_tls
from tests.gateway.conftest import TENANT_SCOPES, Gateway, gateway_settings, running_gateway
from tests.gateway.test_isolation import (
    CARD_A,
    CARD_B,
    MATRIX_HOLDER_KEY,
    MATRIX_PIN,
    TenantFixture,
    _filled,
    leaked,
    populated_tenant,
    snapshot,
)

CALL_TIMEOUT_S = 20.0
# The name on the gateway's certificate (its mesh certificate, in the tests).
GATEWAY_TLS_NAME = "localhost"


@dataclass(frozen=True)
class RpcCall:
    # Request fields, with {placeholders} filled with a tenant's ids (as in test_isolation).
    fields: dict[str, Any]
    # How the parity test compares the faces: "same" (a read, or an idempotent write: REST first,
    # then both faces again), "readback" (the gRPC write against the REST read named in readback
    # of the same object), "shape" (a fresh issue each time: equal but for `differ`).
    # "each": before each face's call, the rpc named in `before` is made over REST (an unbind
    # after a bind), and the two faces' answers are compared.
    parity: str = "same"
    readback: str | None = None
    before: str | None = None
    differ: frozenset[str] = frozenset()
    # REST statuses allowed with the caller's own tenant but the other tenant's ids.
    foreign_statuses: frozenset[int] = frozenset({404})


# What the webhook dispatcher changes on its own while the test runs (the fixture's endpoint at a
# closed port fails on): the parity test compares the rest.
ENDPOINT_MOVES = frozenset({"state", "failing_since", "disabled_reason", "disabled_at", "updated_at"})
DELIVERY_MOVES = frozenset({"status", "attempts", "next_attempt_at", "finished_at", "attempt_log"})
SAME_PIN = {"tenant_id": "{tenant_id}", "external_user_id": "{external_user_id}", "attestation_id": "parity",
            "new_pin": MATRIX_PIN, "old_pin": MATRIX_PIN}
SELF_SERVICE = {"tenant_id": "{tenant_id}", "external_user_id": "{external_user_id}", "attestation_id": "parity"}

# Every rpc, in an order the parity test can run top to bottom on one tenant with the token of the
# tenant's partner client (its endpoint and delivery, its openid bound to the member): reads,
# webhooks (before any write makes a delivery), idempotent writes, issues, self-service, then the
# changes to the member's status.
RPC_CALLS: dict[str, RpcCall] = {
    "SearchMembers": RpcCall({"tenant_id": "{tenant_id}", "q": "{external_number}"},
                             foreign_statuses=frozenset({200})),
    "GetMember": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}"}),
    "GetMemberBalances": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}"}),
    "GetAccount": RpcCall({"tenant_id": "{tenant_id}", "account_id": "{account_id}"}),
    "ListAccountTransfers": RpcCall({"tenant_id": "{tenant_id}", "account_id": "{account_id}", "page_size": 10}),
    # Keys are the calling client's own: another client's key (the fixture's) answers found false.
    "LookupPayment": RpcCall({"tenant_id": "{tenant_id}", "idempotency_key": "{payment_key}"},
                             foreign_statuses=frozenset({200})),
    "CreateWebhookEndpoint": RpcCall({"tenant_id": "{tenant_id}", "idempotency_key": "partner-endpoint",
                                      "url": "http://127.0.0.1:9/partner", "event_types": ["payment.booked"],
                                      "description": "parity"}, parity="shape", differ=ENDPOINT_MOVES,
                                     # Names no id: in the caller's own tenant it registers the caller's.
                                     foreign_statuses=frozenset({201})),
    "ListWebhookEndpoints": RpcCall({"tenant_id": "{tenant_id}", "page_size": 10}, parity="shape",
                                    differ=ENDPOINT_MOVES, foreign_statuses=frozenset({200})),
    "GetWebhookEndpoint": RpcCall({"tenant_id": "{tenant_id}", "endpoint_id": "{endpoint_id}"}, parity="shape",
                                  differ=ENDPOINT_MOVES),
    "UpdateWebhookEndpoint": RpcCall({"tenant_id": "{tenant_id}", "endpoint_id": "{endpoint_id}",
                                      "description": "bank hooks", "event_types": ["topup.booked", "balance.low"]},
                                     parity="shape", differ=ENDPOINT_MOVES),
    "ListWebhookDeliveries": RpcCall({"tenant_id": "{tenant_id}", "endpoint_id": "{endpoint_id}", "page_size": 10},
                                     parity="shape", differ=DELIVERY_MOVES),
    "GetWebhookDelivery": RpcCall({"tenant_id": "{tenant_id}", "delivery_id": "{delivery_id}"}, parity="shape",
                                  differ=DELIVERY_MOVES),
    "RedeliverWebhook": RpcCall({"tenant_id": "{tenant_id}", "delivery_id": "{delivery_id}",
                                 "idempotency_key": "partner-redeliver"}, parity="shape", differ=DELIVERY_MOVES),
    "RotateWebhookSecret": RpcCall({"tenant_id": "{tenant_id}", "endpoint_id": "{endpoint_id}",
                                    "idempotency_key": "partner-rotate", "overlap_s": 3600},
                                   parity="shape", differ=ENDPOINT_MOVES),
    "DeleteWebhookEndpoint": RpcCall({"tenant_id": "{tenant_id}", "endpoint_id": "{endpoint_id}"}, parity="shape",
                                     differ=ENDPOINT_MOVES),
    "TopUp": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}", "idempotency_key": "partner-top-up",
                      "amount_fen": 500, "external_ref": "bank-1"}),
    "ReverseTopUp": RpcCall({"tenant_id": "{tenant_id}", "idempotency_key": "partner-reversal",
                             "top_up_idempotency_key": "partner-top-up", "reason": "R01 insufficient funds"}),
    "GetOwnClearingAccount": RpcCall({"tenant_id": "{tenant_id}"}, foreign_statuses=frozenset({200, 404})),
    # The calling client's own file: the calls above booked its top-up and reversal today.
    "GetReconciliationFile": RpcCall({"tenant_id": "{tenant_id}", "date": "{date}"}),
    "SetLowBalanceThreshold": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}",
                                       "threshold_fen": 2000}),
    "CreatePayment": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}",
                              "idempotency_key": "partner-payment", "merchant_account_id": "{merchant_account_id}",
                              "amount_fen": 100, "scene": "store"}),
    "IssueCredential": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}",
                                "holder_public_key": MATRIX_HOLDER_KEY, "purposes": ["pay"]},
                               parity="shape", differ=frozenset({"credential_id", "not_before", "not_after",
                                                                 "credential_base64"})),
    "IssueTokenBatch": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}", "purposes": ["pay"],
                                "hours": 1},
                               parity="shape", differ=frozenset({"credential_id", "not_before", "not_after",
                                                                 "slot_start", "code"})),
    "RevokeCredential": RpcCall({"tenant_id": "{tenant_id}", "credential_id": "{credential_id}",
                                 "reason": "phone lost"}),
    # Mini-programs: the fixture client's openid is bound to the member, whose PIN is MATRIX_PIN.
    "BindExternalUser": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}",
                                 "external_user_id": "{external_user_id}"}),
    "LookupMemberByExternalUser": RpcCall({"tenant_id": "{tenant_id}", "external_user_id": "{external_user_id}"}),
    "SetMemberPin": RpcCall(SAME_PIN),
    "SelfServiceFreeze": RpcCall(SELF_SERVICE),
    "SelfServiceUnfreeze": RpcCall({**SELF_SERVICE, "pin": MATRIX_PIN}),
    "SelfServiceReportCardLost": RpcCall({**SELF_SERVICE, "card_uid": "{card_uid}"}),
    "UnbindExternalUser": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}"}, parity="each",
                                  before="BindExternalUser"),
    "ReportCardLost": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}", "card_uid": "{card_uid}"},
                              parity="readback", readback="GetMember"),
    "FreezeMember": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}", "reason": "card lost"},
                            parity="readback", readback="GetMember"),
    "UnfreezeMember": RpcCall({"tenant_id": "{tenant_id}", "member_id": "{member_id}"},
                              parity="readback", readback="GetMember"),
}


# --- the two faces ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one face answered: the message (REST's JSON parsed into the same message) or the refusal."""

    ok: bool
    message: Message | None = None
    code: grpc.StatusCode | None = None
    status: int | None = None
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    text: str = ""


@dataclass
class Faces:
    gateway: Gateway
    bound: dict[str, BoundRpc]
    stub: partner_pb2_grpc.PartnerServiceStub
    channel: grpc.aio.Channel
    port: int

    async def grpc(self, name: str, fields: dict[str, Any], *, token: str | None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
        bound = self.bound[name]
        request = json_format.ParseDict(fields, bound.request_class())
        sent = tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token is not None else ())
        try:
            message = await getattr(self.stub, name)(request, metadata=sent, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            reason, info = error_info(exc)
            return Outcome(ok=False, code=exc.code(), reason=reason, metadata=info, text=exc.details() or "")
        return Outcome(ok=True, message=message, text=str(message))

    async def rest(self, name: str, fields: dict[str, Any], *, token: str) -> tuple[Outcome, httpx.Response]:
        """The twin route called with the same request: fields to path, query, header and body."""
        bound = self.bound[name]
        route = bound.route
        params = {alias: fields[wire] for wire, alias in bound.param_aliases.items() if wire in fields}
        path_names = {f.alias for f in route.dependant.path_params}
        header_names = {f.alias for f in route.dependant.header_params}
        path = route.path.format(**{k: v for k, v in params.items() if k in path_names})
        query = {k: v for k, v in params.items() if k not in path_names | header_names}
        headers = {"Authorization": f"Bearer {token}", **{k: v for k, v in params.items() if k in header_names}}
        body = {k: v for k, v in fields.items() if k in bound.body_members}
        method = next(iter(route.methods))
        response = await self.gateway.http.request(method, path, params=query, headers=headers,
                                                   json=body if route.dependant.body_params else None)
        if response.status_code < 300 and bound.answers == ANSWERS_FILE:
            message = bound.response_class(content=response.content,
                                           content_type=response.headers["content-type"])
            return Outcome(ok=True, message=message, text=response.text), response
        payload = response.json() if response.content else {}
        if response.status_code >= 300:
            return Outcome(ok=False, status=response.status_code, reason=payload.get("reason"),
                           text=response.text), response
        data = without_nulls(payload)
        if bound.rpc.wrap:
            data = {bound.rpc.wrap: data}
        return Outcome(ok=True, message=json_format.ParseDict(data, bound.response_class()),
                       text=response.text), response


def _channel(port: int, *, ca_pem: bytes) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"{GATEWAY_TLS_NAME}:{port}", grpc.ssl_channel_credentials(root_certificates=ca_pem))


async def _faces(gateway: Gateway) -> AsyncIterator[Faces]:
    state: GatewayState = gateway.app.state.gateway
    tls = load_tls(gateway.settings)
    assert tls is not None
    server: PartnerServer = await start_partner_server(
        gateway.app, state, host="127.0.0.1", port=0,
        credentials=server_credentials(partner_tls_dir=None, mesh_tls=tls))
    channel = _channel(server.port, ca_pem=tls.ca_pem)
    try:
        yield Faces(gateway=gateway, bound=bind_partner_rpcs(gateway.app),
                    stub=partner_pb2_grpc.PartnerServiceStub(channel), channel=channel, port=server.port)
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)


@pytest.fixture
async def faces(platform_gateway: Gateway) -> AsyncIterator[Faces]:
    """Both faces of a gateway with every service behind it."""
    async for built in _faces(platform_gateway):
        yield built


def _fields(name: str, ids: dict[str, str], own: dict[str, str] | None = None) -> dict[str, Any]:
    return _filled(RPC_CALLS[name].fields, ids, own or ids)


def _same_refusal(grpc_side: Outcome, rest_side: Outcome) -> bool:
    """The gRPC refusal is the REST one: the same reason, a code REST answers with that status."""
    if grpc_side.ok or rest_side.ok or grpc_side.reason != rest_side.reason:
        return False
    mapped = GRPC_TO_HTTP.get(grpc_side.code) if grpc_side.code is not None else None
    return (mapped is not None and mapped.status == rest_side.status) or HTTP_TO_GRPC.get(
        rest_side.status or 0) == grpc_side.code


# --- the table is complete ---------------------------------------------------------------------------


def test_every_partner_rpc_is_in_the_matrix() -> None:
    assert set(SERVICE.methods_by_name) == set(RPC_CALLS), "add the rpc to RPC_CALLS (and gateway.partner_api)"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation names (``Model``, ``Model | None``, ``list[Model]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]


def _fields_fit(model: type[BaseModel], descriptor: Descriptor, where: str) -> list[str]:
    """The REST model's fields that have no place (or the wrong kind of place) in the message."""
    problems = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        found = descriptor.fields_by_name.get(wire)
        if found is None:
            problems.append(f"{where}.{wire} is missing")
            continue
        nested = _models_in(info.annotation)
        if nested and found.message_type is None:
            problems.append(f"{where}.{wire} is not a message")
        elif nested:
            problems += _fields_fit(nested[0], found.message_type, f"{where}.{wire}")
    return problems


def test_each_response_message_holds_every_field_of_its_rest_answer() -> None:
    app = running_app()
    for name, bound in bind_partner_rpcs(app).items():
        model = bound.route.response_model
        if bound.answers != ANSWERS_MODEL:
            # No JSON: the binder holds the message to the empty one (204) or to the file's fields.
            continue
        descriptor = bound.method.output_type
        if bound.rpc.wrap:
            descriptor = descriptor.fields_by_name[bound.rpc.wrap].message_type
        assert _fields_fit(model, descriptor, name) == []


def test_request_fields_with_a_rest_default_say_when_they_are_absent() -> None:
    """A request field whose twin has a default other than the field's zero value must be
    ``optional`` (or repeated), or an unset field would override the default."""
    for name, bound in bind_partner_rpcs(running_app()).items():
        dependant = bound.dependant
        defaults = {wire: f.field_info.default for wire, alias in bound.param_aliases.items()
                    for f in [*dependant.path_params, *dependant.query_params, *dependant.header_params]
                    if f.alias == alias and not f.field_info.is_required()}
        model = body_model(bound.route)
        if model is not None:
            defaults |= {(i.alias or n): i.default for n, i in model.model_fields.items()
                         if not i.is_required() and (i.alias or n) in bound.body_members}
        for wire, default in defaults.items():
            descriptor = bound.method.input_type.fields_by_name[wire]
            if descriptor.is_repeated or descriptor.has_presence:
                continue
            assert default in (None, "", 0, False), f"{name}.{wire}: REST defaults to {default!r}; make it optional"
            if default is None:
                # REST's None and proto's zero must mean the same to the twin: "" / 0 / false is
                # what the endpoint treats as absent (e.g. an empty Idempotency-Key is no key).
                assert descriptor.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BOOL), (name, wire)


def test_each_http_status_maps_back_to_a_grpc_code_that_maps_to_it() -> None:
    """HTTP_TO_GRPC is GRPC_TO_HTTP's inverse: a refusal the gateway decides keeps its meaning on
    the gRPC face, and its code maps back to the status REST answers."""
    for code, mapping in GRPC_TO_HTTP.items():
        back = HTTP_TO_GRPC[mapping.status]
        assert GRPC_TO_HTTP[back].status == mapping.status, code
    for status, code in HTTP_TO_GRPC.items():
        if code in GRPC_TO_HTTP:
            assert GRPC_TO_HTTP[code].status == status or status in (413, 415, 422), status


def running_app() -> Any:
    from gateway.app import create_app
    return create_app(gateway_settings(identity_target="127.0.0.1:1"))


# --- parity ------------------------------------------------------------------------------------------


def _normalised(message: Message, differ: frozenset[str]) -> Any:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in differ}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(json_format.MessageToDict(message, preserving_proto_field_name=True))


async def test_every_rpc_answers_what_its_rest_twin_answers_for_the_same_request(faces: Faces) -> None:
    gateway = faces.gateway
    tenant = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    # The tenant's partner client: its webhook endpoint and delivery, its openid bound to the member.
    access = Access(token=await gateway.token(tenant_id=tenant.tenant_id, credentials=tenant.credentials))
    # The bank's clearing account may owe what the top-up takes.
    credit = await gateway.http.put(
        f"/v1/tenants/{tenant.tenant_id}/api-clients/{tenant.client_id}/clearing-account",
        json={"credit_limit_fen": 100_000}, headers=access.headers)
    assert credit.status_code == 200, credit.text
    ids = tenant.ids()

    for name, spec in RPC_CALLS.items():
        fields = _fields(name, ids)
        if spec.parity == "same":
            # An idempotent write happens once here; then both faces ask the same again.
            first, _ = await faces.rest(name, fields, token=access.token)
            assert first.ok, (name, first.text)
            rest_side, _ = await faces.rest(name, fields, token=access.token)
            grpc_side = await faces.grpc(name, fields, token=access.token)
            assert grpc_side.ok, (name, grpc_side.code, grpc_side.reason, grpc_side.text)
            assert grpc_side.message == rest_side.message, name
        elif spec.parity == "each":
            assert spec.before is not None
            sides = []
            for face in ("rest", "grpc"):
                prepared, _ = await faces.rest(spec.before, _fields(spec.before, ids), token=access.token)
                assert prepared.ok, (name, prepared.text)
                if face == "rest":
                    side, _ = await faces.rest(name, fields, token=access.token)
                else:
                    side = await faces.grpc(name, fields, token=access.token)
                assert side.ok, (name, face, side.code, side.reason, side.text)
                sides.append(side)
            assert sides[0].message == sides[1].message, name
        elif spec.parity == "shape":
            rest_side, _ = await faces.rest(name, fields, token=access.token)
            grpc_side = await faces.grpc(name, fields, token=access.token)
            assert rest_side.ok and grpc_side.ok, (name, rest_side.text, grpc_side.text)
            assert _normalised(grpc_side.message, spec.differ) == _normalised(rest_side.message, spec.differ), name
        else:
            assert spec.readback is not None
            grpc_side = await faces.grpc(name, fields, token=access.token)
            assert grpc_side.ok, (name, grpc_side.code, grpc_side.reason, grpc_side.text)
            read, _ = await faces.rest(spec.readback, _fields(spec.readback, ids), token=access.token)
            assert read.ok, read.text
            written = json_format.MessageToDict(grpc_side.message, preserving_proto_field_name=True)
            back = json_format.MessageToDict(read.message, preserving_proto_field_name=True)
            assert list(written.values()) == list(back.values()), name

    # What the writes did, as REST reads it: the top-up and the payment booked once each, under the
    # caller's keys; the card lost; the member active again.
    member = (await gateway.http.get(f"/v1/tenants/{tenant.tenant_id}/members/{tenant.member_id}",
                                     headers=access.headers)).json()
    assert member["status"] == "active" and member["cards"][0]["status"] == "lost"
    for key in ("partner-top-up", "partner-payment"):
        found = await faces.grpc("LookupPayment", {"tenant_id": tenant.tenant_id, "idempotency_key": key},
                                 token=access.token)
        assert found.ok and found.message.found and found.message.transfer.idempotency_key == key  # type: ignore[union-attr]


@dataclass(frozen=True)
class Access:
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def test_the_partner_fetches_its_reconciliation_file_over_grpc_and_checks_it(faces: Faces) -> None:
    """The recipe of docs/reconciliation.md on the gRPC face: the bytes are REST's, the trailer is
    the SHA-256 of every line before it; and an absent threshold clears it, as REST's null does."""
    gateway = faces.gateway
    tenant = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    access = await gateway.tenant_access(tenant_id=tenant.tenant_id)
    ids = {"tenant_id": tenant.tenant_id, "member_id": tenant.member_id}
    top_up = {**ids, "idempotency_key": "file-top-up", "amount_fen": 700, "external_ref": "bank-7"}
    credit = await gateway.http.put(
        f"/v1/tenants/{tenant.tenant_id}/api-clients/{access.credentials.client_id}/clearing-account",
        json={"credit_limit_fen": 100_000}, headers=access.headers)
    assert credit.status_code == 200, credit.text
    assert (await faces.grpc("TopUp", top_up, token=access.token)).ok

    day = tenant.ids()["date"]
    fetched = await faces.grpc("GetReconciliationFile", {"tenant_id": tenant.tenant_id, "date": day},
                               token=access.token)
    assert fetched.ok, fetched.text
    message = fetched.message
    assert message is not None and message.content_type == "text/csv; charset=utf-8"
    text = message.content.decode()
    body, trailer = text.rsplit("sha256,", 1)
    assert trailer == hashlib.sha256(body.encode()).hexdigest() + "\n"
    assert "\"bank-7\"" in body and "\"file-top-up\"" in body and ",-700," in body

    bad_day = await faces.grpc("GetReconciliationFile", {"tenant_id": tenant.tenant_id, "date": "03.12.2026"},
                               token=access.token)
    assert (bad_day.code, bad_day.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_FAILED")

    set_to = await faces.grpc("SetLowBalanceThreshold", {**ids, "threshold_fen": 300}, token=access.token)
    assert set_to.ok and set_to.message.account.low_balance_threshold_fen == 300  # type: ignore[union-attr]
    cleared = await faces.grpc("SetLowBalanceThreshold", ids, token=access.token)
    assert cleared.ok and not cleared.message.account.HasField("low_balance_threshold_fen")  # type: ignore[union-attr]
    balances = (await gateway.http.get(f"/v1/tenants/{tenant.tenant_id}/members/{tenant.member_id}/balances",
                                       headers=access.headers)).json()
    assert [p.get("low_balance_threshold_fen") for p in balances["purses"] if p["purse_kind"] == "cash"] == [None]


async def test_a_wrong_pin_says_how_many_attempts_are_left_on_both_faces(faces: Faces) -> None:
    gateway = faces.gateway
    tenant = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    token = await gateway.token(tenant_id=tenant.tenant_id, credentials=tenant.credentials)
    frozen = await faces.grpc("SelfServiceFreeze", _filled(SELF_SERVICE, tenant.ids(), tenant.ids()), token=token)
    assert frozen.ok and frozen.message.member.frozen_by == "member"  # type: ignore[union-attr]
    wrong = {**_filled(SELF_SERVICE, tenant.ids(), tenant.ids()), "pin": "111111"}
    rest_side, response = await faces.rest("SelfServiceUnfreeze", wrong, token=token)
    grpc_side = await faces.grpc("SelfServiceUnfreeze", wrong, token=token)
    assert (response.status_code, rest_side.reason) == (403, "PIN_INCORRECT")
    assert _same_refusal(grpc_side, rest_side)
    assert int(grpc_side.metadata["attempts_left"]) == response.json()["attempts_left"] - 1
    assert "111111" not in grpc_side.text


# --- isolation, scopes, tokens -----------------------------------------------------------------------


async def test_a_token_of_tenant_a_gets_from_every_rpc_what_rest_gives_it_for_tenant_b(faces: Faces) -> None:
    gateway = faces.gateway
    tenant_a = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    tenant_b = await populated_tenant(gateway, label="B", card_uid=CARD_B)
    token_a = (await gateway.tenant_access(tenant_id=tenant_a.tenant_id)).token
    before = await snapshot(gateway, tenant_b)
    failures: list[str] = []

    for name, spec in RPC_CALLS.items():
        # B's tenant and ids: refused as if B did not exist.
        outcome = await faces.grpc(name, _fields(name, tenant_b.ids()), token=token_a)
        if (outcome.ok or outcome.code != grpc.StatusCode.NOT_FOUND or outcome.reason != "TENANT_NOT_FOUND"
                or _leaked(outcome, tenant_b)):
            failures.append(f"{name} with B's tenant: {outcome}")
        # A's tenant, B's ids: whatever REST answers, and nothing of B.
        foreign = {**tenant_b.ids(), "tenant_id": tenant_a.tenant_id}
        fields = _fields(name, foreign, tenant_a.ids())
        rest_side, response = await faces.rest(name, fields, token=token_a)
        grpc_side = await faces.grpc(name, fields, token=token_a)
        status = response.status_code
        if status not in spec.foreign_statuses:
            failures.append(f"{name} with B's ids over REST: {status} {response.text[:200]}")
        if rest_side.ok:
            if not grpc_side.ok or grpc_side.message != rest_side.message:
                failures.append(f"{name} with B's ids: gRPC {grpc_side} but REST {response.text[:200]}")
        elif not _same_refusal(grpc_side, rest_side):
            failures.append(f"{name} with B's ids: gRPC {grpc_side.code} {grpc_side.reason}, REST {status} "
                            f"{rest_side.reason}")
        if _leaked(grpc_side, tenant_b) or leaked(response, tenant_b):
            failures.append(f"{name} with B's ids leaked: {grpc_side.text[:200]}")

    assert failures == []
    assert await snapshot(gateway, tenant_b) == before


def _leaked(outcome: Outcome, tenant: TenantFixture) -> bool:
    secrets = [tenant.member_name, tenant.external_number, f"Imported {tenant.label}", tenant.tenant_id]
    return any(secret in outcome.text for secret in secrets)


async def test_each_rpc_refuses_a_token_without_its_scope_and_calls_without_a_good_token(faces: Faces) -> None:
    gateway = faces.gateway
    tenant = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    token_without: dict[str, str] = {}
    for scope in SCOPES:
        others = [s for s in TENANT_SCOPES if s != scope]
        token_without[scope] = (await gateway.tenant_access(tenant_id=tenant.tenant_id, scopes=others)).token
    before = await snapshot(gateway, tenant)
    bad_token = token_without[LEDGER_ADMIN][:-4] + "AAAA"

    for name, bound in faces.bound.items():
        (scope,) = bound.scopes
        fields = _fields(name, tenant.ids())
        outcome = await faces.grpc(name, fields, token=token_without[scope])
        assert (outcome.code, outcome.reason) == (grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE"), name
        assert outcome.metadata["scope"] == scope and scope in outcome.text
        rest_side, _ = await faces.rest(name, fields, token=token_without[scope])
        assert _same_refusal(outcome, rest_side), name

        missing = await faces.grpc(name, fields, token=None)
        assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"), name
        bad = await faces.grpc(name, fields, token=bad_token)
        assert (bad.code, bad.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"), name

    assert await snapshot(gateway, tenant) == before


# --- errors ------------------------------------------------------------------------------------------


async def test_a_request_that_does_not_fit_is_refused_with_the_rest_reason_and_its_fields(faces: Faces) -> None:
    gateway = faces.gateway
    access = await gateway.tenant_access()
    member = await gateway.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=access.tenant_id, external_number="V1", name="Valid Person"))
    fields = {"tenant_id": access.tenant_id, "member_id": member.member.member_id, "idempotency_key": "k-1",
              "amount_fen": 0}
    rest_side, response = await faces.rest("TopUp", fields, token=access.token)
    assert (response.status_code, rest_side.reason) == (422, "VALIDATION_FAILED")

    call = faces.stub.TopUp(partner_pb2.TopUpRequest(**fields), metadata=(("authorization", f"Bearer {access.token}"),
                                                                          (REQUEST_ID_METADATA, "req-partner-1")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value)[0] == "VALIDATION_FAILED"
    trailers = dict(refused.value.trailing_metadata() or ())
    assert trailers[REQUEST_ID_METADATA] == "req-partner-1"
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_METADATA])
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert [v.field for v in bad_request.field_violations] == ["body.amount_fen"]
    assert "0" not in refused.value.details().replace("amount_fen", "")

    # No key: the twin's own refusal, word for word.
    no_key = await faces.grpc("TopUp", {**fields, "idempotency_key": "", "amount_fen": 100}, token=access.token)
    rest_side, _ = await faces.rest("TopUp", {k: v for k, v in fields.items() if k != "idempotency_key"} | {
        "amount_fen": 100}, token=access.token)
    assert (no_key.code, no_key.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REQUIRED")
    assert rest_side.reason == "IDEMPOTENCY_KEY_REQUIRED"
    # A service's refusal keeps the service's reason.
    unknown = await faces.grpc("GetMember", {"tenant_id": access.tenant_id, "member_id": "no-such-member"},
                               token=access.token)
    rest_side, _ = await faces.rest("GetMember", {"tenant_id": access.tenant_id, "member_id": "no-such-member"},
                                    token=access.token)
    assert unknown.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert _same_refusal(unknown, rest_side)


async def test_the_rate_limit_and_a_revoked_grant_hold_on_the_grpc_face(identity: Any) -> None:
    settings = gateway_settings(identity_target=identity.target, rate_limit_per_s=0.001, rate_limit_burst=3,
                                grant_recheck_s=0.001)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        async for faces in _faces(gateway):
            access = await gateway.tenant_access()
            fields = {"tenant_id": access.tenant_id, "q": ""}
            # The same bucket as REST: one REST call and two gRPC calls spend the burst of 3.
            assert (await gateway.http.get(f"/v1/tenants/{access.tenant_id}/members", headers=access.headers)
                    ).status_code == 200
            for _ in range(2):
                assert (await faces.grpc("SearchMembers", fields, token=access.token)).ok
            call = faces.stub.SearchMembers(partner_pb2.SearchMembersRequest(**fields),
                                            metadata=(("authorization", f"Bearer {access.token}"),))
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await call
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(limited.value)[0] == "RATE_LIMITED"
            assert int(dict(limited.value.trailing_metadata() or ())["retry-after"]) >= 1

            other = await gateway.tenant_access()
            assert (await faces.grpc("SearchMembers", {"tenant_id": other.tenant_id}, token=other.token)).ok
            await identity.stub.RevokeApiClient(ipb.RevokeApiClientRequest(client_id=other.credentials.client_id))
            revoked = await faces.grpc("SearchMembers", {"tenant_id": other.tenant_id}, token=other.token)
            assert (revoked.code, revoked.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")


# --- the port ----------------------------------------------------------------------------------------


async def test_the_port_speaks_only_tls_and_answers_health_and_reflection_without_a_token(identity: Any) -> None:
    port = free_port()
    settings = gateway_settings(identity_target=identity.target, partner_grpc_port=port)
    async with running_gateway(settings) as (app, _http):
        state: GatewayState = app.state.gateway
        assert state.partner_grpc_port == port
        tls = load_tls(settings)
        assert tls is not None

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async with _channel(port, ca_pem=tls.ca_pem) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            names: list[str] = []
            async for response in reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5):
                names = [s.name for s in response.list_services_response.service]
            assert SERVICE_NAME in names
            # The gate stands: no token, no answer.
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await partner_pb2_grpc.PartnerServiceStub(channel).SearchMembers(
                    partner_pb2.SearchMembersRequest(tenant_id="any"), timeout=5)
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert state.partner_grpc_port is None
    # Closed with the app.
    async with grpc.aio.secure_channel(f"{GATEWAY_TLS_NAME}:{port}",
                                       grpc.ssl_channel_credentials(root_certificates=tls.ca_pem)) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


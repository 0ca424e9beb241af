"""The public gRPC API for partners (``onecard.partner.v1.PartnerService``): each rpc and its REST twin.

One implementation behind both faces. An rpc is its twin route over gRPC: gateway.partner_grpc
reads the twin's FastAPI route (its scope, its path, query and header parameters, its body model)
and answers each call by validating the request as FastAPI would, authorising it with the same
gate (gateway.auth ``authenticate`` then ``admit``, the same rate limiter and grant cache), calling
the twin's endpoint function itself, and writing its answer into the response message. Nothing of
the operation is written twice, so the two faces cannot drift apart.

Adding an rpc (say, once a REST route for webhook endpoints has landed) takes three small steps:

1. ``protos/onecard/partner/v1/partner.proto``: the rpc, with its twin in its comment; a request
   message whose fields are the twin's path and query parameters, ``idempotency_key`` for an
   ``Idempotency-Key`` header, and the JSON body's members, by their REST names (``optional``
   where REST has a default); a response message that is the twin's JSON body, field for field, or
   holds it in one field (``wrap``). ``make gen``.
2. Here: one ``PartnerRpc("Name", twin_endpoint)`` entry in ``PARTNER_RPCS`` (``wrap="member"`` when
   the response holds the REST object in its field ``member``).
3. ``tests/gateway/test_partner_grpc.py``: one row in ``RPC_CALLS`` (the tenant and scope isolation
   matrix and the REST parity check take it from there).

A twin that answers no JSON fits too: one answering 204 No Content (``Response``) is an rpc whose
response message has no fields; one answering a file (a ``StreamingResponse``, e.g. the CSV of
the reconciliation file) is an rpc whose response carries ``content`` (the exact bytes REST sends)
and ``content_type`` (REST's Content-Type). A REST body member that is required but may be null
(``{"threshold_fen": null}``) is an ``optional`` request field whose absence is the null.

A missing step fails loudly: the gateway refuses to start when an rpc has no entry, an entry no
twin, or a request field matches nothing of the twin (``bind_partner_rpcs``); the meta-tests fail
when an rpc has no matrix row or a REST field has no place in the response message.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.routes import codes, identity, ledger, miniprogram, policy, reconciliation, webhooks


@dataclass(frozen=True)
class PartnerRpc:
    # The rpc's name in PartnerService.
    name: str
    # The REST twin: the endpoint function of a route of the gateway's app.
    twin: Callable[..., Any]
    # The response message's field that holds the twin's JSON body; None: the message is the body.
    wrap: str | None = None


PARTNER_RPCS: tuple[PartnerRpc, ...] = (
    PartnerRpc("SearchMembers", identity.search_members),
    PartnerRpc("GetMember", identity.get_member, wrap="member"),
    PartnerRpc("FreezeMember", identity.freeze_member, wrap="member"),
    PartnerRpc("UnfreezeMember", identity.unfreeze_member, wrap="member"),
    PartnerRpc("ReportCardLost", identity.report_card_lost, wrap="member"),
    PartnerRpc("IssueCredential", codes.issue_credential),
    PartnerRpc("IssueTokenBatch", codes.issue_token_batch),
    PartnerRpc("RevokeCredential", codes.revoke_credential, wrap="revocation"),
    PartnerRpc("GetMemberBalances", ledger.get_member_balances),
    PartnerRpc("GetAccount", ledger.get_account, wrap="account"),
    PartnerRpc("ListAccountTransfers", ledger.list_account_transfers),
    PartnerRpc("GetOwnClearingAccount", ledger.get_own_clearing_account, wrap="account"),
    PartnerRpc("LookupPayment", ledger.lookup_payment),
    PartnerRpc("TopUp", ledger.top_up),
    PartnerRpc("CreatePayment", policy.create_payment),
    PartnerRpc("GetReconciliationFile", reconciliation.get_own_reconciliation),
    PartnerRpc("ReverseTopUp", reconciliation.reverse_top_up),
    PartnerRpc("SetLowBalanceThreshold", reconciliation.set_low_balance_threshold, wrap="account"),
    PartnerRpc("CreateWebhookEndpoint", webhooks.create_endpoint, wrap="endpoint"),
    PartnerRpc("ListWebhookEndpoints", webhooks.list_endpoints),
    PartnerRpc("GetWebhookEndpoint", webhooks.get_endpoint, wrap="endpoint"),
    PartnerRpc("UpdateWebhookEndpoint", webhooks.update_endpoint, wrap="endpoint"),
    PartnerRpc("DeleteWebhookEndpoint", webhooks.delete_endpoint, wrap="endpoint"),
    PartnerRpc("RotateWebhookSecret", webhooks.rotate_secret, wrap="endpoint"),
    PartnerRpc("ListWebhookDeliveries", webhooks.list_deliveries),
    PartnerRpc("GetWebhookDelivery", webhooks.get_delivery, wrap="delivery"),
    PartnerRpc("RedeliverWebhook", webhooks.redeliver, wrap="delivery"),
    PartnerRpc("BindExternalUser", miniprogram.bind_external_user),
    PartnerRpc("UnbindExternalUser", miniprogram.unbind_external_user),
    PartnerRpc("LookupMemberByExternalUser", miniprogram.lookup_member_by_external_user),
    PartnerRpc("SelfServiceFreeze", miniprogram.self_service_freeze, wrap="member"),
    PartnerRpc("SelfServiceUnfreeze", miniprogram.self_service_unfreeze, wrap="member"),
    PartnerRpc("SelfServiceReportCardLost", miniprogram.self_service_report_card_lost, wrap="member"),
    PartnerRpc("SetMemberPin", miniprogram.set_member_pin),
)

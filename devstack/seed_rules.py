"""The demo university's money side for `make run`: a settlement account in the ledger for each
merchant of the example rule set, that rule set published in policy with its merchants named by
those accounts, and a credit limit on the clearing accounts the demo tops up from (the demo bank's,
and the simulator's): a new clearing account may owe nothing. Idempotent: a second run finds the
accounts, the published version and limits as high already."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from onecard_policy.examples import university_rule_set
from onecard_policy.rules import canonical_json

from devstack.seed import DEMO_TENANT_ID, SeedError
from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2, policy_pb2_grpc
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS

CALL_TIMEOUT_S = 10.0
PUBLISHED_BY = "make run (demo seed)"
CANTEEN = "canteen-north"
# The clearing account the device simulator funds its members from (its ref; the owner is the tenant).
SIMULATOR_CLEARING_REF = "simulator"
# What the demo's banks may owe the university: the walk-through's top-ups and a simulator funding
# its members every day, for years, never meet it.
DEMO_CREDIT_LIMIT_FEN = 10_000_000_000


@dataclass(frozen=True)
class RulesSeed:
    # The example rule set's merchant ids -> their ledger settlement accounts.
    merchants: dict[str, str]
    version: int
    published: bool

    @property
    def canteen_account_id(self) -> str:
        return self.merchants[CANTEEN]


def demo_rule_set(merchants: dict[str, str]) -> dict:
    """The example rule set with every mention of a merchant (its entry, its devices, the places a
    subsidy or voucher may be spent) naming its ledger account instead."""
    text = json.dumps(university_rule_set())
    for name, account_id in merchants.items():
        text = text.replace(json.dumps(name), json.dumps(account_id))
    return json.loads(text)


async def _allow_credit(ledger: ledger_pb2_grpc.LedgerServiceStub, *, clearing_ref: str) -> None:
    """The clearing account ``clearing_ref`` (a bank's client id), opened if new, may owe at least
    DEMO_CREDIT_LIMIT_FEN; a limit set higher (by the demo's admin, say) is left as it is."""
    opened = await ledger.OpenAccount(ledger_pb2.OpenAccountRequest(
        tenant_id=DEMO_TENANT_ID, owner_kind=ledger_pb2.OWNER_KIND_TENANT, owner_id=DEMO_TENANT_ID,
        purse_kind=ledger_pb2.PURSE_KIND_BANK_CLEARING, ref=clearing_ref), timeout=CALL_TIMEOUT_S)
    if opened.account.account.credit_limit_fen < DEMO_CREDIT_LIMIT_FEN:
        await ledger.SetCreditLimit(ledger_pb2.SetCreditLimitRequest(
            tenant_id=DEMO_TENANT_ID, account_id=opened.account.account.account_id,
            credit_limit_fen=DEMO_CREDIT_LIMIT_FEN), timeout=CALL_TIMEOUT_S)


async def seed_rules(*, ledger_target: str, policy_target: str, tls: MeshTLS | None,
                     bank_client_ids: tuple[str, ...] = ()) -> RulesSeed:
    """``bank_client_ids``: the demo clients that top up (their clearing accounts get a limit, as
    the simulator's does)."""
    try:
        async with open_channel(ledger_target, tls=tls, server_name="ledger") as ledger_channel, \
                open_channel(policy_target, tls=tls, server_name="policy") as policy_channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
            policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            for clearing_ref in (*bank_client_ids, SIMULATOR_CLEARING_REF):
                await _allow_credit(ledger, clearing_ref=clearing_ref)
            merchants = {}
            for merchant in university_rule_set()["merchants"]:
                opened = await ledger.OpenAccount(ledger_pb2.OpenAccountRequest(
                    tenant_id=DEMO_TENANT_ID, owner_kind=ledger_pb2.OWNER_KIND_MERCHANT, owner_id=merchant["id"],
                    purse_kind=ledger_pb2.PURSE_KIND_MERCHANT_SETTLEMENT), timeout=CALL_TIMEOUT_S)
                merchants[merchant["id"]] = opened.account.account.account_id
            doc = demo_rule_set(merchants)
            listed = await policy.ListRuleSetVersions(policy_pb2.ListRuleSetVersionsRequest(
                tenant_id=DEMO_TENANT_ID, page_size=1), timeout=CALL_TIMEOUT_S)
            if listed.published_version:
                current = await policy.GetRuleSetVersion(policy_pb2.GetRuleSetVersionRequest(
                    tenant_id=DEMO_TENANT_ID, version=listed.published_version), timeout=CALL_TIMEOUT_S)
                if current.version.document.encode() == canonical_json(doc):
                    return RulesSeed(merchants=merchants, version=listed.published_version, published=False)
            created = await policy.CreateRuleSetVersion(policy_pb2.CreateRuleSetVersionRequest(
                tenant_id=DEMO_TENANT_ID, document=json.dumps(doc), note="the demo university's rules"),
                timeout=CALL_TIMEOUT_S)
            await policy.PublishRuleSetVersion(policy_pb2.PublishRuleSetVersionRequest(
                tenant_id=DEMO_TENANT_ID, version=created.version.version, published_by=PUBLISHED_BY),
                timeout=CALL_TIMEOUT_S)
            return RulesSeed(merchants=merchants, version=created.version.version, published=True)
    except grpc.aio.AioRpcError as exc:
        raise SeedError(f"the ledger or policy refused a seed call: {exc.code().name}: {exc.details()}") from exc

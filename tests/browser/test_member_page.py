"""The member code page (/m/) in a real browser: Debian's Chromium driven by Playwright, against
the gateway served on a loopback port in front of the real identity, codegen and ledger.

Open the partner's one-time link; a code shows; with the network off a reload still shows one,
and the decode SDK verifies it against the tenant's trust list as a till would; the link does not
work a second time; the holder key cannot be exported; the page falls back to rotating tokens
where WebCrypto has no Ed25519. Screenshots at a phone's size go to the test's temporary folder,
or, with ONECARD_UPDATE_SCREENSHOTS=1, to docs/screenshots/ (the README shows those).
"""
from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import onecard_codes as sdk
import pytest
from onecard_codes.verify import Verifier

from gateway.app import create_app
from gateway.auth import DEVICES_SYNC, LEDGER_ADMIN, MEMBERS_CODE_PAGE, WALLETS_READ, WALLETS_TOPUP
from onecard.identity.v1 import identity_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.browser.support import PHONE_VIEWPORT, chromium, serving
from tests.gateway.conftest import Gateway, TenantAccess, gateway_settings
# The real codegen and ledger, as the gateway tests start them (fixtures of tests/gateway/conftest.py).
from tests.gateway.conftest import codegen_service, ledger_service  # noqa: F401


DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CARD_UID = "04A224B2C35E80"
# How long the page may take to show a code or its balances (a browser start, a few API calls).
PAGE_WAIT_MS = 20_000
CODE = "#code[data-code^='OC1:']"
# Reads the holder key back from the page's IndexedDB and tries to export its private half.
EXPORT_ATTEMPT = """async () => {
  const db = await new Promise((ok, no) => { const r = indexedDB.open("onecard-member-page");
                                             r.onsuccess = () => ok(r.result); r.onerror = () => no(r.error); });
  const pair = await new Promise((ok, no) => { const r = db.transaction("state").objectStore("state").get("holderKey");
                                               r.onsuccess = () => ok(r.result); r.onerror = () => no(r.error); });
  const out = {type: pair.privateKey.type, extractable: pair.privateKey.extractable,
               algorithm: pair.privateKey.algorithm.name};
  for (const format of ["pkcs8", "jwk", "raw"]) {
    try { await crypto.subtle.exportKey(format, pair.privateKey); out[format] = "exported"; }
    catch (error) { out[format] = error.name; }
  }
  return out;
}"""
# A browser whose WebCrypto has no Ed25519, as older Safari and Firefox builds.
NO_ED25519 = """(() => {
  const generateKey = crypto.subtle.generateKey.bind(crypto.subtle);
  crypto.subtle.generateKey = (algorithm, ...rest) =>
    (algorithm === "Ed25519" || (algorithm && algorithm.name === "Ed25519"))
      ? Promise.reject(new DOMException("Unrecognized name.", "NotSupportedError"))
      : generateKey(algorithm, ...rest);
})();"""


@dataclass
class Campus:
    gateway: Gateway
    base_url: str
    partner: TenantAccess
    device: TenantAccess
    member_id: str

    @property
    def tenant_id(self) -> str:
        return self.partner.tenant_id

    async def link(self) -> str:
        response = await self.gateway.http.post(
            f"/v1/tenants/{self.tenant_id}/members/{self.member_id}/code-page-links",
            headers={**self.partner.headers, "Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 201, response.text
        url = response.json()["url"]
        assert url.startswith(f"{self.base_url}/m/#{self.tenant_id}.")
        return url

    async def verifier(self) -> Verifier:
        """A till's verifier with the tenant's trust list, fetched as devices fetch it."""
        trust = await self.gateway.http.get(f"/v1/tenants/{self.tenant_id}/trust-list", headers=self.device.headers)
        assert trust.status_code == 200, trust.text
        keys = tuple(sdk.TrustedKey(tenant_id=uuid.UUID(self.tenant_id), public_key=base64.b64decode(k["public_key"]))
                     for k in trust.json()["keys"])
        return Verifier(trust_list=sdk.TrustList(keys=keys, fetched_at_s=int(time.time()),
                                                 version=trust.json()["version"]))

    def verify(self, verifier: Verifier, code: str) -> Any:
        return verifier.verify(code, now_s=int(time.time()), expected_tenant_id=uuid.UUID(self.tenant_id),
                               purpose=sdk.Purpose.PAY)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = DOCS_SCREENSHOTS if os.environ.get("ONECARD_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def campus(identity: Any, codegen_service: Any, ledger_service: Any) -> AsyncIterator[Campus]:
    """A tenant on a gateway served at http://127.0.0.1:<port>, with a member who holds a card,
    was topped up by a bank and paid once at a canteen."""
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=ledger_service.target)
    app = create_app(settings)
    async with serving(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        partner = await gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
        tenant_id = partner.tenant_id
        bank = await gateway.tenant_access(tenant_id=tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
        admin = await gateway.tenant_access(tenant_id=tenant_id, scopes=(LEDGER_ADMIN,))
        device = await gateway.tenant_access(tenant_id=tenant_id, scopes=(DEVICES_SYNC,))
        member = await identity.stub.CreateMember(pb.CreateMemberRequest(
            tenant_id=tenant_id, external_number="2025-0417", name="Lin Xiaoyu"))
        member_id = member.member.member_id
        await identity.stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member_id, card_uid=CARD_UID))
        credit = await http.put(f"/v1/tenants/{tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account",
                                headers=admin.headers, json={"credit_limit_fen": 1_000_000})
        assert credit.status_code == 200, credit.text
        top_up = await http.post(f"/v1/tenants/{tenant_id}/members/{member_id}/top-ups",
                                 headers={**bank.headers, "Idempotency-Key": str(uuid.uuid4())},
                                 json={"amount_fen": 20_000})
        assert top_up.status_code == 201, top_up.text
        canteen = await http.post(f"/v1/tenants/{tenant_id}/accounts", headers=admin.headers,
                                  json={"owner_kind": "merchant", "owner_id": "canteen-1",
                                        "purse_kind": "merchant_settlement"})
        assert canteen.status_code in (200, 201), canteen.text
        balances = await http.get(f"/v1/tenants/{tenant_id}/members/{member_id}/balances", headers=bank.headers)
        (cash_id,) = [p["account_id"] for p in balances.json()["purses"] if p["purse_kind"] == "cash"]
        await ledger_service.stub.Pay(lpb.PayRequest(
            tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()),
            merchant_account_id=canteen.json()["account"]["account_id"],
            legs=[lpb.PayLeg(account_id=cash_id, amount_fen=1_250)], device_id="pos-1"))
        yield Campus(gateway=gateway, base_url=base_url, partner=partner, device=device, member_id=member_id)


async def test_the_link_shows_a_code_that_survives_going_offline_and_works_once(campus: Campus,
                                                                                 screenshots: Path) -> None:
    url = await campus.link()
    async with chromium() as browser:
        context = await browser.new_context(viewport=PHONE_VIEWPORT, device_scale_factor=2,
                                            locale="en-GB", timezone_id="Asia/Shanghai")
        page = await context.new_page()
        await page.goto(url)
        await page.wait_for_selector(CODE, timeout=PAGE_WAIT_MS)
        # The secret left the address bar as soon as the page read it.
        assert page.url == campus.base_url + "/m/"
        assert await page.get_attribute("body", "data-mode") == "holder"
        await page.wait_for_selector("#balances li", timeout=PAGE_WAIT_MS)
        assert await page.locator("#balances li").first.inner_text() == "Cash\n¥187.50"
        await page.wait_for_selector("#history li", timeout=PAGE_WAIT_MS)
        assert "Payment" in await page.locator("#history li").first.inner_text()
        # The tenant's issuer key is made with its first credential: the trust list is read after.
        verifier = await campus.verifier()
        online_code = await page.get_attribute("#code", "data-code")
        assert online_code is not None and len(online_code) == sdk.HOLDER_TEXT_CHARS
        assert campus.verify(verifier, online_code).ok
        await page.screenshot(path=str(screenshots / "member-online.png"), full_page=True)

        # The private half of the holder key cannot be read out, not even by the page's own origin.
        key = await page.evaluate(EXPORT_ATTEMPT)
        assert key == {"type": "private", "extractable": False, "algorithm": "Ed25519",
                       "pkcs8": "InvalidAccessError", "jwk": "InvalidAccessError", "raw": "InvalidAccessError"}

        # Offline: the service worker serves the page, IndexedDB the credential; the key signs a
        # fresh proof, which a till verifies with the trust list alone.
        assert await page.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)")
        await context.set_offline(True)
        await page.reload()
        await page.wait_for_selector(CODE, timeout=PAGE_WAIT_MS)
        assert "Offline" in await page.inner_text("#network")
        assert "Last known" in await page.inner_text("#balance-note")
        offline_code = await page.get_attribute("#code", "data-code")
        assert offline_code is not None and offline_code != online_code
        result = campus.verify(verifier, offline_code)
        assert result.ok, result
        assert result.member_id == uuid.UUID(campus.member_id) and result.kind is sdk.CodeKind.HOLDER
        await page.screenshot(path=str(screenshots / "member-offline.png"), full_page=True)
        await context.close()

        # The same link a second time, in a browser that never saw it: refused, no code.
        stranger = await browser.new_context(viewport=PHONE_VIEWPORT)
        again = await stranger.new_page()
        await again.goto(url)
        await again.wait_for_selector("#message:not([hidden])", timeout=PAGE_WAIT_MS)
        assert "used already" in await again.inner_text("#message")
        assert await again.get_attribute("#code", "data-code") == ""
        await stranger.close()


async def test_the_member_reports_the_card_lost_with_the_keyboard(campus: Campus, screenshots: Path) -> None:
    url = await campus.link()
    async with chromium() as browser:
        context = await browser.new_context(viewport=PHONE_VIEWPORT, device_scale_factor=2, locale="en-GB")
        page = await context.new_page()
        await page.goto(url)
        await page.wait_for_selector(CODE, timeout=PAGE_WAIT_MS)
        button = page.get_by_role("button", name="Report card lost")
        await button.focus()
        await page.keyboard.press("Enter")
        await page.get_by_role("dialog", name="Report your card lost?").wait_for()
        await page.get_by_role("button", name="Report it lost").click()
        await page.wait_for_selector("#message.ok", timeout=PAGE_WAIT_MS)
        assert "reported lost" in await page.inner_text("#message")
        await page.screenshot(path=str(screenshots / "member-reported-lost.png"), full_page=True)
        await context.close()
    member = await campus.gateway.stub.GetMember(pb.GetMemberRequest(tenant_id=campus.tenant_id,
                                                                     member_id=campus.member_id))
    assert [(c.card_uid, c.status) for c in member.member.cards] == [(CARD_UID, pb.CARD_STATUS_LOST)]


async def test_without_ed25519_the_page_shows_rotating_tokens_that_a_till_accepts(campus: Campus) -> None:
    url = await campus.link()
    async with chromium() as browser:
        context = await browser.new_context(viewport=PHONE_VIEWPORT)
        await context.add_init_script(NO_ED25519)
        page = await context.new_page()
        await page.goto(url)
        await page.wait_for_selector(CODE, timeout=PAGE_WAIT_MS)
        assert await page.get_attribute("body", "data-mode") == "tokens"
        assert "no Ed25519" in await page.inner_text("#mode")
        await page.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)")
        await context.set_offline(True)
        await page.reload()
        await page.wait_for_selector(CODE, timeout=PAGE_WAIT_MS)
        code = await page.get_attribute("#code", "data-code")
        assert code is not None and len(code) == sdk.TOKEN_TEXT_CHARS
        result = campus.verify(await campus.verifier(), code)
        assert result.ok and result.kind is sdk.CodeKind.TOKEN, result
        await context.close()

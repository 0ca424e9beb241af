"""The operations console in a real browser (Debian's Chromium through Playwright) against the real
gateway and services: sign in with the keyboard, the dining chart moving while a terminal takes
payments, a subsidy batch uploaded as CSV with its progress bar running to the end and its failed
row shown with the reason, and a member frozen in the console then refused at the terminal.

Screenshots of the pages (desktop and phone) go to the ``screenshots`` fixture's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.async_api import expect

from onecard.devicehub.v1 import devicehub_pb2 as dpb
from services.devicehub.alarms import Alarms

from tests.browser.conftest import ServedGateway
from tests.browser.console_support import (CANTEEN, diner, open_canteen, operator, sign_in, tap)
from tests.devicehub.support import eventually

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
# Polling pages settle within a few refreshes; the bound is generous for a busy two-core machine.
LIVE_TIMEOUT_MS = 30_000


async def test_an_operator_signs_in_and_the_dining_chart_moves_while_the_terminal_takes_payments(
        served_gateway: ServedGateway, browser: Any, screenshots: Path) -> None:
    gateway, base_url = served_gateway.gateway, served_gateway.base_url
    who = await operator(gateway)
    canteen = await open_canteen(gateway, who.tenant_id)
    try:
        diners = [await diner(gateway, canteen, number=f"D{n}", card_uid=f"D1000{n:03d}") for n in range(3)]
        assert (await tap(canteen, diners[0])).approved

        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        await sign_in(page, base_url, who)
        await expect(page.get_by_role("heading", level=1)).to_contain_text("Dining index")
        chart = page.locator(f'#dining-chart g.canteen[data-location="{CANTEEN}"]')
        await expect(chart).to_have_attribute("data-served", "1")
        await expect(chart).to_have_attribute("data-capacity", "40")
        # A mark on this document: if the page reloaded or navigated, the mark would be gone.
        await page.evaluate("window.consoleMark = 'still here'")
        loaded_url = page.url

        for member in diners[1:]:
            assert (await tap(canteen, member)).approved
        await expect(chart).to_have_attribute("data-served", "3", timeout=LIVE_TIMEOUT_MS)
        await expect(page.locator(f'#dining-chart tr[data-location="{CANTEEN}"] td.served')).to_have_text("3")
        assert await page.evaluate("window.consoleMark") == "still here"
        assert page.url == loaded_url
        await page.screenshot(path=str(screenshots / "console-dining-desktop.png"), full_page=True)

        # On a phone: the same page, nothing wider than the screen.
        phone = await browser.new_context(viewport=PHONE, is_mobile=True)
        phone_page = await phone.new_page()
        await sign_in(phone_page, base_url, who)
        assert await phone_page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        await phone_page.screenshot(path=str(screenshots / "console-dining-phone.png"), full_page=True)

        # Terminals: the canteen POS online, with its last contact and queue, and its alarm.
        await Alarms(gateway.devicehub.app.pool).raise_alarm(  # type: ignore[attr-defined]
            tenant_id=who.tenant_id, device_id=canteen.enrolled.device_id, kind=dpb.ALARM_KIND_SEQUENCE_GAP,
            severity=dpb.ALARM_SEVERITY_WARNING, detail="sequences 17-19 never arrived")
        await page.get_by_role("link", name="Terminals").click()
        row = page.locator(f'#terminals tr[data-device-id="{canteen.enrolled.device_id}"]')
        await expect(row).to_contain_text("online")
        alarm = page.locator("#alarms tbody tr[data-alarm-id]")
        await expect(alarm).to_contain_text("sequences 17-19 never arrived")
        await expect(alarm).to_contain_text("open")
        await alarm.get_by_role("button", name="Acknowledge").focus()
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("status")).to_contain_text("acknowledged")
        await expect(alarm.locator("td").nth(3)).to_have_text("acknowledged")
        await page.screenshot(path=str(screenshots / "console-terminals-desktop.png"), full_page=True)
        await alarm.get_by_role("button", name="Clear").click()
        await expect(page.get_by_role("status")).to_contain_text("cleared")
        await expect(page.locator("#alarms tbody")).to_contain_text("No open alarms.")

        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("status")).to_contain_text("signed out")
        await page.goto(f"{base_url}/console/dining")
        assert page.url.endswith("/console/sign-in")
        await context.close()
        await phone.close()
    finally:
        await canteen.terminal.close()


async def test_a_batch_uploaded_as_csv_shows_its_progress_to_the_end_and_its_failed_row(
        served_gateway: ServedGateway, browser: Any, screenshots: Path, tmp_path: Path) -> None:
    gateway, base_url = served_gateway.gateway, served_gateway.base_url
    who = await operator(gateway)
    admin = await gateway.tenant_access(tenant_id=who.tenant_id, scopes=("ledger:admin",))
    accounts = f"/v1/tenants/{who.tenant_id}/accounts"

    async def open_account(**body: str) -> str:
        response = await gateway.http.post(accounts, headers=admin.headers, json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()["account"]["account_id"]

    funding = await open_account(owner_kind="tenant", owner_id="finance", purse_kind="subsidy_funding",
                                 ref="meal-2026")
    defined = await gateway.http.post(f"/v1/tenants/{who.tenant_id}/subsidy-programs", headers=admin.headers,
                                      json={"purse_kind": "subsidy", "ref": "meal-2026", "funding_account_id": funding})
    assert defined.status_code == 201, defined.text
    members = [(await gateway.stub.CreateMember(_member_request(who.tenant_id, f"B{n}"))).member.member_id
               for n in range(5)]
    # The fourth member's subsidy purse is frozen: that row fails, the others are granted.
    frozen = await open_account(owner_kind="member", owner_id=members[3], purse_kind="subsidy", ref="meal-2026")
    response = await gateway.http.post(f"{accounts}/{frozen}/freeze", headers=admin.headers)
    assert response.status_code == 200, response.text
    csv_file = tmp_path / "november.csv"
    csv_file.write_text("member_id,amount_fen\n" + "".join(f"{m},{1000 + i}\n" for i, m in enumerate(members)))

    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    await sign_in(page, base_url, who)
    await page.get_by_role("link", name="Subsidy batches").click()
    await page.get_by_label("Bill number").fill("SUB-2026-11")
    await page.get_by_label("Program").fill("meal-2026")
    await page.get_by_label("CSV file").set_input_files(str(csv_file))
    await page.get_by_role("button", name="Upload and start").click()
    await page.wait_for_url(f"{base_url}/console/subsidy-batches/*")

    progress = page.locator("#batch-progress")
    await expect(progress).to_have_attribute("data-status", "done", timeout=LIVE_TIMEOUT_MS)
    await expect(progress).to_have_attribute("data-percent", "100")
    bar = page.locator("progress#batch-bar")
    assert await bar.get_attribute("value") == "5" and await bar.get_attribute("max") == "5"
    await expect(progress.get_by_role("status")).to_contain_text("4 granted")
    await expect(progress.get_by_role("status")).to_contain_text("1 failed")
    failed = page.locator("#failed-rows tbody tr")
    await expect(failed).to_have_count(1)
    await expect(failed.first).to_have_attribute("data-line", "4")
    await expect(failed.first.locator("td.reason")).to_have_text("ACCOUNT_FROZEN")
    await expect(failed.first).to_contain_text(members[3])
    await page.screenshot(path=str(screenshots / "console-batch-desktop.png"), full_page=True)
    await context.close()


async def test_a_member_frozen_in_the_console_is_refused_at_the_terminal(
        served_gateway: ServedGateway, browser: Any, screenshots: Path) -> None:
    gateway, base_url = served_gateway.gateway, served_gateway.base_url
    who = await operator(gateway)
    canteen = await open_canteen(gateway, who.tenant_id)
    try:
        member = await diner(gateway, canteen, number="F2026001", card_uid="F1000001")
        assert (await tap(canteen, member)).approved

        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        await sign_in(page, base_url, who)
        await page.get_by_role("link", name="Members").click()
        await page.get_by_label("Number or name").fill("F2026001")
        await page.get_by_label("Number or name").press("Enter")
        row = page.locator(f'#members tr[data-member-id="{member.member_id}"]')
        await expect(row.locator("td.status")).to_have_text("active")
        await page.screenshot(path=str(screenshots / "console-members-desktop.png"), full_page=True)
        await row.get_by_role("button", name="Freeze").click()
        await expect(page.get_by_role("status")).to_contain_text("frozen")
        await expect(row.locator("td.status")).to_have_text("frozen")

        async def refused() -> str:
            answer = await tap(canteen, member, amount_fen=1)
            return "" if answer.approved else answer.reason

        assert await eventually(refused, timeout=10.0) == "MEMBER_FROZEN"
        await context.close()
    finally:
        await canteen.terminal.close()


def _member_request(tenant_id: str, number: str) -> Any:
    from onecard.identity.v1 import identity_pb2 as ipb

    return ipb.CreateMemberRequest(tenant_id=tenant_id, external_number=number, name=f"Batch Member {number}")

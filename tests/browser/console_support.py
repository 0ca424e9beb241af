"""What the console tests share: a tenant with an operator's API client, a campus whose canteen
terminals are connected and pay by card (tests/devicehub/tx_support, through the gateway test's
running services), and signing a browser page in with the keyboard alone."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from gateway.auth import DATA_READ, DEVICES_ADMIN, LEDGER_ADMIN, MEMBERS_READ, MEMBERS_WRITE, STATEMENTS_READ
from onecard.devicehub.v1 import devicehub_pb2 as dpb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from tests.devicehub.support import DeviceConnection
from tests.devicehub.tx_support import Campus, Member, add_member, campus, device, online, pay
from tests.gateway.conftest import ClientCredentials, Gateway

# What an operator's console client holds.
CONSOLE_SCOPES = (DATA_READ, DEVICES_ADMIN, LEDGER_ADMIN, MEMBERS_READ, MEMBERS_WRITE, STATEMENTS_READ)
CANTEEN = "north-canteen"
CANTEEN_CAPACITY = 40


@dataclass
class Operator:
    tenant_id: str
    credentials: ClientCredentials


async def operator(gateway: Gateway, *, tenant_id: str | None = None,
                   scopes: tuple[str, ...] = CONSOLE_SCOPES) -> Operator:
    tenant_id = tenant_id or await gateway.create_tenant()
    credentials = await gateway.create_client(tenant_id=tenant_id, scopes=scopes, name="console operator")
    return Operator(tenant_id=tenant_id, credentials=credentials)


@dataclass
class Canteen:
    campus: Campus
    terminal: DeviceConnection
    enrolled: Any


async def open_canteen(gateway: Gateway, tenant_id: str) -> Canteen:
    """The university rules (canteen open at any hour), a canteen POS with a capacity, connected."""
    services = _services(gateway)
    c = await campus(identity=services.identity, ledger=services.ledger, policy=services.policy, tenant_id=tenant_id,
                     any_hour=True)
    device_stub = devicehub_pb2_grpc.DeviceServiceStub(gateway.devicehub.device_channel)  # type: ignore[attr-defined]
    enrolled = await device(gateway.devicehub, device_stub, tenant_id,  # type: ignore[attr-defined]
                            merchant_id=c.merchant_id, location=CANTEEN, capacity=CANTEEN_CAPACITY)
    return Canteen(campus=c, terminal=await online(device_stub, enrolled), enrolled=enrolled)


async def diner(gateway: Gateway, canteen: Canteen, *, number: str, card_uid: str) -> Member:
    services = _services(gateway)
    return await add_member(canteen.campus, identity=services.identity, ledger=services.ledger, number=number,
                            card_uid=card_uid)


async def tap(canteen: Canteen, member: Member, *, amount_fen: int = 100) -> dpb.AuthorizeResult:
    """The member taps their card at the canteen terminal, online, now."""
    return await pay(canteen.terminal, amount_fen=amount_fen, at=datetime.now(UTC), card_uid=member.card_uid)


def _services(gateway: Gateway) -> SimpleNamespace:
    return SimpleNamespace(identity=SimpleNamespace(stub=gateway.stub),
                           ledger=SimpleNamespace(stub=gateway.ledger_stub),  # type: ignore[attr-defined]
                           policy=SimpleNamespace(stub=gateway.policy_stub))  # type: ignore[attr-defined]


async def sign_in(page: Any, base_url: str, who: Operator) -> None:
    """Signs in as a person with a keyboard would: Tab to each field, type, Enter."""
    await page.goto(f"{base_url}/console")
    assert page.url.endswith("/console/sign-in")
    await page.get_by_label("Tenant id").focus()
    await page.keyboard.type(who.tenant_id)
    await page.keyboard.press("Tab")
    await page.keyboard.type(who.credentials.client_id)
    await page.keyboard.press("Tab")
    await page.keyboard.type(who.credentials.client_secret)
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{base_url}/console/dining")

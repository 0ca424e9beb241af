"""The plain rules of webhooks: which addresses may be targets, the back-off and its window, the
messages made of each source event (``balance.low`` from the ledger's ``ledger.balance.low``
included, whose producer lands separately), and the signature header."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from runtime.errors import InvalidArgument
from services.webhooks import domain

TENANT = "7d3c5b1a-0000-4000-8000-000000000001"


@pytest.mark.parametrize(("address", "why"), [
    ("10.1.2.3", "private"), ("172.31.255.1", "private"), ("192.168.0.1", "private"), ("100.64.0.1", "private"),
    ("fd12::1", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local, multicast, reserved or unspecified"),
    ("fe80::1", "link-local, multicast, reserved or unspecified"),
    ("224.0.0.251", "link-local, multicast, reserved or unspecified"),
    ("0.0.0.0", "link-local, multicast, reserved or unspecified"),
    ("240.0.0.1", "link-local, multicast, reserved or unspecified"),
    ("::ffff:10.0.0.1", "private"), ("64:ff9b::a00:1", "private"), ("2002:a00:1::", "private"),
    ("::ffff:127.0.0.1", "loopback"),
])
def test_addresses_that_are_not_public_are_refused(address: str, why: str) -> None:
    assert domain.address_refusal(address, scheme="https", allow_private=False, allow_loopback_http=False) == why


def test_public_addresses_pass_and_private_ones_only_with_the_flag_never_link_local() -> None:
    for public in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert domain.address_refusal(public, scheme="https", allow_private=False, allow_loopback_http=False) is None
    assert domain.address_refusal("10.1.2.3", scheme="https", allow_private=True, allow_loopback_http=False) is None
    assert domain.address_refusal("169.254.169.254", scheme="https", allow_private=True,
                                  allow_loopback_http=False) is not None
    # http: only to loopback, and only on a development stack.
    assert domain.address_refusal("127.0.0.1", scheme="http", allow_private=False, allow_loopback_http=True) is None
    assert domain.address_refusal("93.184.216.34", scheme="http", allow_private=True,
                                  allow_loopback_http=True) is not None


@pytest.mark.parametrize("url", ["http://example.com/", "https://", "https://u:p@example.com/", "javascript:x",
                                 "https://example.com/#frag", "https://exa mple.com/", "https://example.com:99999/",
                                 "https://example.com/" + "a" * 3000])
def test_urls_of_the_wrong_form_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.parse_target(url, allow_loopback_http=False)
    assert info.value.reason == "TARGET_NOT_ALLOWED"


def test_a_target_connects_to_the_checked_address_and_names_the_host() -> None:
    target = domain.parse_target("https://Hooks.Bank.example:8443/in?x=1", allow_loopback_http=False)
    assert target.url_for("93.184.216.34") == "https://93.184.216.34:8443/in?x=1"
    assert target.url_for("2606:2800::1") == "https://[2606:2800::1]:8443/in?x=1"
    assert target.host_header == "hooks.bank.example:8443"
    assert domain.parse_target("https://hooks.bank.example/", allow_loopback_http=False).host_header == \
        "hooks.bank.example"


def test_back_off_is_full_jitter_capped_and_never_gives_up_inside_the_window() -> None:
    policy = domain.RetryPolicy(base_s=5, cap_s=3600, window_s=24 * 3600)
    rng = random.Random(7)
    for attempt in range(1, 40):
        ceiling = min(3600, 5 * 2 ** (attempt - 1))
        assert 1.0 <= policy.delay_s(attempt, rng=rng) <= max(1.0, ceiling)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert not policy.gives_up(retry_from=start, now=start + timedelta(hours=23, minutes=59))
    assert policy.gives_up(retry_from=start, now=start + timedelta(hours=24))


def test_each_source_event_makes_its_message_with_ids_and_amounts_only() -> None:
    low = domain.balance_low_message(tenant_id=TENANT, data={
        "tenant_id": TENANT, "member_id": "m-1", "account_id": "a-1", "purse_kind": "cash", "balance_fen": 300,
        "threshold_fen": 500})
    assert low is not None and low.event_type == "balance.low" and low.order_key == "member:m-1"
    assert low.data == {"tenant_id": TENANT, "member_id": "m-1", "account_id": "a-1", "purse_kind": "cash",
                        "balance_fen": 300, "threshold_fen": 500}
    lost = domain.identity_message(subject="identity.card.lost", tenant_id=TENANT,
                                   data={"member_id": "m-1", "card_uid": "0A0B0C0D", "external_number": "S1"})
    assert lost is not None and lost.data == {"tenant_id": TENANT, "member_id": "m-1"}
    frozen = domain.identity_message(subject="identity.member.frozen", tenant_id=TENANT,
                                     data={"member_id": "m-1", "status": "frozen", "version": 3, "reason": "x"})
    assert frozen is not None and "reason" not in frozen.data
    assert domain.identity_message(subject="identity.member.updated", tenant_id=TENANT, data={"member_id": "m"}) is None
    shortfall = domain.shortfall_message(tenant_id=TENANT, data={"member_id": "m-1", "shortfall_fen": 120,
                                                                 "receivable_account_id": "r-1"})
    assert shortfall is not None and shortfall.event_type == "offline.shortfall"
    batch = domain.grant_batch_message(tenant_id=TENANT, data={"batch_id": "b-1", "granted_fen": 9000})
    assert batch is not None and batch.order_key == "batch:b-1"
    alarm = domain.alarm_message(tenant_id=TENANT, data={"device_id": "d-1", "alarm_id": "al-1", "kind": "tamper",
                                                         "detail": "free text from a device"})
    assert alarm is not None and "detail" not in alarm.data and alarm.order_key == "device:d-1"
    owners = {"cash-1": domain.Owner("member", "m-1", "cash"), "shop": domain.Owner("merchant", "canteen",
                                                                                    "merchant_settlement")}
    paid = domain.transfer_message(event_type="payment.booked", tenant_id=TENANT, owners=owners, data={
        "transfer_id": "t-1", "amount_fen": 700, "postings": [{"account_id": "cash-1", "amount_fen": -700},
                                                              {"account_id": "shop", "amount_fen": 700}]})
    assert paid.order_key == "member:m-1"
    assert paid.data["member_postings"] == [{"account_id": "cash-1", "purse_kind": "cash", "amount_fen": -700}]
    assert domain.transfer_kind_type("hold") is None and domain.transfer_kind_type("top_up") == "topup.booked"


def test_the_signature_header_carries_one_signature_per_secret_each_verifiable() -> None:
    old, new = domain.new_secret(), domain.new_secret()
    now = datetime.now(UTC)
    body = domain.payload(event_type="topup.booked", occurred_at=now.isoformat(), data={"amount_fen": 1})
    header = domain.signature_header(secrets=[new, old], message_id="msg_1", timestamp=now, body=body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": header}
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "topup.booked"


def test_event_types_need_the_scope_that_reads_them() -> None:
    assert domain.check_event_types(["payment.booked", "payment.booked"], scopes=["wallets:read"]) == \
        ["payment.booked"]
    assert set(domain.EVENT_TYPES) == {"payment.booked", "refund.booked", "topup.booked", "member.frozen",
                                       "member.unfrozen", "member.left", "card.lost", "offline.shortfall",
                                       "grant_batch.finished", "balance.low", "device.alarm"}

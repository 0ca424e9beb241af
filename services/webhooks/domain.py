"""The rules of webhooks, plain Python with no I/O.

Choices, and why:

- **Partner-facing event types**, not the mesh's subjects: a partner subscribes to
  ``payment.booked``, never to ``ledger.transfer.posted`` with a kind, so the mesh's events may
  change without breaking a receiver. Each type is readable with one scope (``SCOPE_BY_TYPE``);
  an endpoint subscribes only to types its client may read in the tenant, and a delivery whose
  type the client's scopes no longer read is dropped, never sent.
- **Payloads carry ids and amounts** (``message_for``), never card UIDs, codes, names, free text
  or secrets. ``card.lost`` names the member only.
- **Standard Webhooks signing**: ``webhook-id`` is the message id (stable across retries and
  manual redeliveries, so a receiver deduplicates), ``webhook-timestamp`` the send time, and
  ``webhook-signature`` one ``v1,<base64 HMAC-SHA256>`` per secret still signing (after a
  rotation both, space separated, until the overlap ends).
- **Retries**: exponential back-off with full jitter (a random wait between 0 and
  ``min(cap, base * 2**n)``), for at least the retry window (24 h) counted from the delivery's
  creation: a delivery gives up only on a failed attempt made after the window, so jitter can
  never shorten it.
- **Targets** (SSRF): https only, http only to loopback on a development stack; an address that
  is not globally routable (private, loopback, link-local, CGNAT, ULA, multicast, reserved,
  unspecified, and their IPv4-mapped, 6to4 and NAT64 forms) is refused unless the tenant allowed
  private targets for the endpoint. Link-local (cloud metadata), multicast, unspecified and
  reserved addresses are refused even then.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import secrets as secrets_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from runtime.errors import InvalidArgument, PermissionDenied

# The scopes, as the gateway names them (gateway.auth); this service only compares strings.
WALLETS_READ = "wallets:read"
MEMBERS_READ = "members:read"
LEDGER_ADMIN = "ledger:admin"
DEVICES_ADMIN = "devices:admin"
# Setting allow_private_targets: the tenant's administrator.
CLIENTS_ADMIN = "clients:admin"

PAYMENT_BOOKED = "payment.booked"
REFUND_BOOKED = "refund.booked"
TOPUP_BOOKED = "topup.booked"
MEMBER_FROZEN = "member.frozen"
MEMBER_UNFROZEN = "member.unfrozen"
MEMBER_LEFT = "member.left"
CARD_LOST = "card.lost"
OFFLINE_SHORTFALL = "offline.shortfall"
GRANT_BATCH_FINISHED = "grant_batch.finished"
BALANCE_LOW = "balance.low"
DEVICE_ALARM = "device.alarm"

SCOPE_BY_TYPE: dict[str, str] = {
    PAYMENT_BOOKED: WALLETS_READ,
    REFUND_BOOKED: WALLETS_READ,
    TOPUP_BOOKED: WALLETS_READ,
    MEMBER_FROZEN: MEMBERS_READ,
    MEMBER_UNFROZEN: MEMBERS_READ,
    MEMBER_LEFT: MEMBERS_READ,
    CARD_LOST: MEMBERS_READ,
    OFFLINE_SHORTFALL: WALLETS_READ,
    GRANT_BATCH_FINISHED: LEDGER_ADMIN,
    BALANCE_LOW: WALLETS_READ,
    DEVICE_ALARM: DEVICES_ADMIN,
}
EVENT_TYPES = tuple(SCOPE_BY_TYPE)

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
MAX_ENDPOINTS_PER_CLIENT = 20
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# Standard Webhooks: bodies are JSON; a receiver refuses timestamps older than 5 minutes.
DEFAULT_BACKOFF_BASE_S = 5.0
DEFAULT_BACKOFF_CAP_S = 3600.0
DEFAULT_RETRY_WINDOW_S = 24 * 3600.0
MIN_RETRY_WINDOW_S = 24 * 3600.0
DEFAULT_DISABLE_AFTER_S = 3 * 24 * 3600.0
DEFAULT_SECRET_OVERLAP_S = 24 * 3600.0
MAX_RESPONSE_BODY_LOGGED_BYTES = 1024


class EndpointState:
    ENABLED = "enabled"
    DISABLED = "disabled"
    DISABLED_FAILING = "disabled_failing"
    DISABLED_GRANT_REVOKED = "disabled_grant_revoked"
    DELETED = "deleted"


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DROPPED = "dropped"


# --- event types and scopes ----------------------------------------------------------------------


def check_event_types(event_types: Iterable[str], *, scopes: Iterable[str]) -> list[str]:
    """The event types, deduplicated in a stable order, when each is known and readable with
    ``scopes``; else a typed refusal naming the first that is not."""
    wanted = list(dict.fromkeys(event_types))
    if not wanted:
        raise InvalidArgument("name at least one event type", reason="EVENT_TYPES_REQUIRED")
    held = set(scopes)
    for event_type in wanted:
        scope = SCOPE_BY_TYPE.get(event_type)
        if scope is None:
            raise InvalidArgument(f"unknown event type {event_type[:64]!r}", reason="UNKNOWN_EVENT_TYPE",
                                  metadata={"event_type": event_type[:64]})
        if scope not in held:
            raise PermissionDenied(f"{event_type} needs the scope {scope}", reason="EVENT_TYPE_NOT_ALLOWED",
                                   metadata={"event_type": event_type, "scope": scope})
    return wanted


def readable(event_type: str, scopes: Iterable[str]) -> bool:
    scope = SCOPE_BY_TYPE.get(event_type)
    return scope is not None and scope in set(scopes)


# --- messages from the mesh's events -------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One partner-facing message made of one mesh event, before it is fanned out to endpoints."""

    event_type: str
    tenant_id: str
    # member:<id>, or what the event is about when it names no member.
    order_key: str
    data: dict[str, Any]


_TRANSFER_TYPES = {"payment": PAYMENT_BOOKED, "refund": REFUND_BOOKED, "top_up": TOPUP_BOOKED}
_MEMBER_TYPES = {"identity.member.frozen": MEMBER_FROZEN, "identity.member.unfrozen": MEMBER_UNFROZEN,
                 "identity.member.left": MEMBER_LEFT}


def transfer_kind_type(kind: str) -> str | None:
    """The event type of a posted transfer of ``kind``; None for kinds no partner hears of."""
    return _TRANSFER_TYPES.get(kind)


def member_order_key(member_id: str) -> str:
    return f"member:{member_id}"


def transfer_message(*, event_type: str, tenant_id: str, data: Mapping[str, Any],
                     owners: Mapping[str, Owner]) -> Message:
    """``payment.booked``, ``refund.booked`` or ``topup.booked`` of a ``ledger.transfer.posted``.
    ``owners``: the owner of each posting's account the ledger told. The member is the owner of
    the first member account posted (a transfer moves one member's money)."""
    member_postings = []
    member_id = ""
    for posting in data.get("postings", []):
        owner = owners.get(str(posting.get("account_id")))
        if owner is None or owner.owner_kind != "member":
            continue
        if not member_id:
            member_id = owner.owner_id
        if owner.owner_id == member_id:
            member_postings.append({"account_id": str(posting["account_id"]), "purse_kind": owner.purse_kind,
                                    "amount_fen": int(posting.get("amount_fen", 0))})
    body: dict[str, Any] = {
        "tenant_id": tenant_id,
        "transfer_id": str(data.get("transfer_id", "")),
        "member_id": member_id or None,
        "amount_fen": int(data.get("amount_fen", 0)),
        "member_postings": member_postings,
        "merchant_account_id": data.get("merchant_account_id") or None,
        "device_id": data.get("device_id") or None,
        "external_ref": data.get("external_ref") or None,
        "event_time": data.get("event_time") or None,
        "booked_at": data.get("booked_at") or None,
    }
    if event_type == REFUND_BOOKED:
        body["original_transfer_id"] = data.get("original_transfer_id") or None
    order_key = member_order_key(member_id) if member_id else f"transfer:{body['transfer_id']}"
    return Message(event_type=event_type, tenant_id=tenant_id, order_key=order_key, data=body)


def identity_message(*, subject: str, tenant_id: str, data: Mapping[str, Any]) -> Message | None:
    """``member.frozen`` / ``.unfrozen`` / ``.left`` and ``card.lost`` (the member only, never the
    card's UID); None for identity's other events."""
    member_id = str(data.get("member_id", ""))
    if not member_id:
        return None
    if subject in _MEMBER_TYPES:
        return Message(event_type=_MEMBER_TYPES[subject], tenant_id=tenant_id, order_key=member_order_key(member_id),
                       data={"tenant_id": tenant_id, "member_id": member_id, "status": data.get("status"),
                             "version": data.get("version")})
    if subject == "identity.card.lost":
        return Message(event_type=CARD_LOST, tenant_id=tenant_id, order_key=member_order_key(member_id),
                       data={"tenant_id": tenant_id, "member_id": member_id})
    return None


def shortfall_message(*, tenant_id: str, data: Mapping[str, Any]) -> Message | None:
    member_id = str(data.get("member_id", ""))
    if not member_id:
        return None
    return Message(event_type=OFFLINE_SHORTFALL, tenant_id=tenant_id, order_key=member_order_key(member_id),
                   data={"tenant_id": tenant_id, "member_id": member_id,
                         "transfer_id": data.get("transfer_id") or None,
                         "receivable_account_id": data.get("receivable_account_id") or None,
                         "shortfall_fen": int(data.get("shortfall_fen", 0))})


def grant_batch_message(*, tenant_id: str, data: Mapping[str, Any]) -> Message | None:
    batch_id = str(data.get("batch_id", ""))
    if not batch_id:
        return None
    fields = ("bill_number", "purse_kind", "ref", "total_rows", "granted_rows", "failed_rows", "granted_fen")
    return Message(event_type=GRANT_BATCH_FINISHED, tenant_id=tenant_id, order_key=f"batch:{batch_id}",
                   data={"tenant_id": tenant_id, "batch_id": batch_id, **{f: data.get(f) for f in fields}})


def balance_low_message(*, tenant_id: str, data: Mapping[str, Any]) -> Message | None:
    """``balance.low`` of the ledger's ``ledger.balance.low`` (tenant_id, member_id, account_id,
    purse_kind, balance_fen, threshold_fen)."""
    member_id = str(data.get("member_id", ""))
    if not member_id:
        return None
    return Message(event_type=BALANCE_LOW, tenant_id=tenant_id, order_key=member_order_key(member_id),
                   data={"tenant_id": tenant_id, "member_id": member_id, "account_id": data.get("account_id"),
                         "purse_kind": data.get("purse_kind"), "balance_fen": data.get("balance_fen"),
                         "threshold_fen": data.get("threshold_fen")})


def alarm_message(*, tenant_id: str, data: Mapping[str, Any]) -> Message | None:
    """``device.alarm`` of ``devicehub.alarm.raised``, without the device's free-text detail."""
    device_id = str(data.get("device_id", ""))
    if not device_id:
        return None
    fields = ("alarm_id", "kind", "severity", "state", "count", "opened")
    return Message(event_type=DEVICE_ALARM, tenant_id=tenant_id, order_key=f"device:{device_id}",
                   data={"tenant_id": tenant_id, "device_id": device_id, **{f: data.get(f) for f in fields}})


@dataclass(frozen=True)
class Owner:
    owner_kind: str
    owner_id: str
    purse_kind: str


def payload(*, event_type: str, occurred_at: str, data: Mapping[str, Any]) -> bytes:
    """The body a receiver gets: ``{"type", "timestamp", "data"}`` (Standard Webhooks' shape)."""
    return json.dumps({"type": event_type, "timestamp": occurred_at, "data": dict(data)},
                      separators=(",", ":"), sort_keys=True).encode()


# --- secrets and signatures ----------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets_module.token_bytes(SECRET_BYTES)).decode()


def signature_header(*, secrets: Iterable[str], message_id: str, timestamp: datetime, body: bytes) -> str:
    """``webhook-signature``: ``v1,<sig>`` per secret, space separated."""
    text = body.decode()
    return " ".join(Webhook(secret).sign(msg_id=message_id, timestamp=timestamp, data=text) for secret in secrets)


# --- retries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = DEFAULT_BACKOFF_BASE_S
    cap_s: float = DEFAULT_BACKOFF_CAP_S
    window_s: float = DEFAULT_RETRY_WINDOW_S

    def delay_s(self, failed_attempts: int, *, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(n-1))] after the n-th failed attempt
        (at least a second, so a receiver is never hammered)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(max(failed_attempts - 1, 0), 30)))
        return max(1.0, (rng or random).uniform(0, ceiling))

    def gives_up(self, *, retry_from: datetime, now: datetime) -> bool:
        return now - retry_from >= timedelta(seconds=self.window_s)


# --- targets (SSRF) ------------------------------------------------------------------------------

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


@dataclass(frozen=True)
class Target:
    """A URL as registered, split: the name to resolve and to send as Host / SNI."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, address: str) -> str:
        """The URL with ``address`` in place of the host: the connection goes to the address the
        check passed, never to a second resolution of the name."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def parse_target(url: str, *, allow_loopback_http: bool) -> Target:
    """The URL's parts when its form is acceptable (the addresses are checked after resolving)."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgument(f"the URL is longer than {MAX_URL_CHARS} characters", reason="TARGET_NOT_ALLOWED")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidArgument("the URL does not parse", reason="TARGET_NOT_ALLOWED") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("https", "http") or not host:
        raise InvalidArgument("the URL must be https://host/...", reason="TARGET_NOT_ALLOWED")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("the URL must not carry credentials", reason="TARGET_NOT_ALLOWED")
    if parts.fragment:
        raise InvalidArgument("the URL must not carry a fragment", reason="TARGET_NOT_ALLOWED")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidArgument("the URL holds spaces or control characters", reason="TARGET_NOT_ALLOWED")
    if scheme == "http" and not allow_loopback_http:
        raise InvalidArgument("the URL must be https (http only to loopback on a development stack)",
                              reason="TARGET_NOT_ALLOWED")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return Target(url=url, scheme=scheme, host=host.lower(), port=port or (443 if scheme == "https" else 80),
                  path=path)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(ip.packed[-4:])
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def address_refusal(address: str, *, scheme: str, allow_private: bool, allow_loopback_http: bool) -> str | None:
    """Why a resolved address may not be a target (a short reason), or None when it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            return address_refusal(str(embedded), scheme=scheme, allow_private=allow_private,
                                   allow_loopback_http=allow_loopback_http)
    if ip.is_loopback:
        return None if allow_loopback_http else "loopback"
    if scheme == "http":
        return "plain http to an address that is not loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return "link-local, multicast, reserved or unspecified"
    if ip.is_global and ip not in _CGNAT:
        return None
    return None if allow_private else "private"


def check_addresses(addresses: Iterable[str], *, target: Target, allow_private: bool,
                    allow_loopback_http: bool) -> list[str]:
    """The addresses, when every one may be a target (a name with one bad address is refused
    whole: which one a client would get is not ours to choose)."""
    found = list(dict.fromkeys(addresses))
    if not found:
        raise InvalidArgument(f"{target.host} does not resolve", reason="TARGET_NOT_RESOLVED")
    for address in found:
        why = address_refusal(address, scheme=target.scheme, allow_private=allow_private,
                              allow_loopback_http=allow_loopback_http)
        if why is not None:
            raise InvalidArgument(f"{target.host} resolves to a {why} address", reason="TARGET_NOT_ALLOWED",
                                  metadata={"why": why})
    return found

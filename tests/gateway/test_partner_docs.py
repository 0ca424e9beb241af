"""docs/partners.md's code runs as printed: the webhook receiver accepts a delivery signed the
Standard Webhooks way and refuses an altered or stale one; the reconciliation check accepts a
file and refuses a cut one. The snippets are read from the page itself, so the page cannot drift."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

PAGE = Path(__file__).resolve().parents[2] / "docs" / "partners.md"


def snippet(section: str) -> str:
    """The first ```python block of the page's ``## section``."""
    text = PAGE.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(r"```python\n(.*?)```", text[start:end if end != -1 else None], re.S)
    assert found is not None, f"no python block under ## {section}"
    return found.group(1)


def _signed(secret: str, payload: dict[str, Any], *, msg_id: str, at: datetime) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload)
    signature = Webhook(secret).sign(msg_id, at, body)
    return body.encode(), {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
                           "webhook-signature": signature}


def test_the_webhook_receiver_of_the_page_verifies_deliveries() -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    handled: list[tuple[str, Any]] = []
    seen: set[str] = set()

    def already_seen(message_id: str) -> bool:
        if message_id in seen:
            return True
        seen.add(message_id)
        return False

    scope: dict[str, Any] = {"SECRET": secret, "already_seen": already_seen,
                             "handle": lambda kind, data: handled.append((kind, data))}
    exec(snippet("Webhooks"), scope)  # noqa: S102 - the page's own code
    receive = scope["receive"]
    event = {"type": "topup.booked", "timestamp": "2026-12-03T08:00:00+00:00", "data": {"amount_fen": 10_000}}
    now = datetime.now(UTC)

    body, headers = _signed(secret, event, msg_id="msg_1", at=now)
    assert receive(body, headers) == 204
    assert receive(body, headers) == 204  # a retry: the same webhook-id, handled once
    assert handled == [("topup.booked", {"amount_fen": 10_000})]
    assert receive(body.replace(b"10000", b"99999"), headers) == 400
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    assert receive(*_signed(other, event, msg_id="msg_2", at=now)) == 400
    assert receive(*_signed(secret, event, msg_id="msg_3", at=now - timedelta(minutes=10))) == 400
    assert len(handled) == 1


def test_the_reconciliation_check_of_the_page_accepts_a_whole_file_only() -> None:
    scope: dict[str, Any] = {}
    exec(snippet("Reconciliation"), scope)  # noqa: S102 - the page's own code
    checked = scope["checked"]
    lines = b'booked_at,transfer_id\n"2026-12-03T09:15:02+08:00","t-1"\n"date","2026-12-03","Asia/Shanghai"\n'
    data = lines + b"sha256," + hashlib.sha256(lines).hexdigest().encode() + b"\n"
    assert checked(data) == lines
    with pytest.raises(AssertionError):
        checked(data[: len(lines) - 20] + data[len(lines):])
    with pytest.raises(AssertionError):
        checked(lines)

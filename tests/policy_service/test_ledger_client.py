"""policy's LedgerClient against the real ledger: reads that arrive together share one
GetMemberStates call, and one bad question is refused to its asker alone."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from runtime.errors import InvalidArgument
from services.policy.ledger_client import LedgerClient
from tests.conftest import RunningService
from tests.mesh import pki
from tests.policy_service.support import campus


async def test_a_bad_question_in_a_shared_read_fails_only_its_asker(ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=5_000)
    client = LedgerClient(target=ledger.target, timeout_s=10)
    holder = asyncio.create_task(client.hold(tls=pki().tls("policy")))
    try:
        await asyncio.sleep(0)
        good, bad = await asyncio.gather(
            client.member_state(tenant_id=uuid.UUID(c.tenant_id), member_id=c.member_id, counter_keys=[]),
            # A key longer than any idempotency key: the ledger refuses the whole call it is in.
            client.member_state(tenant_id=uuid.UUID(c.tenant_id), member_id=c.member_id, counter_keys=[],
                                idempotency_key="k" * 300),
            return_exceptions=True)
        purses, _counters, _existing = good
        assert [p.account_id for p in purses] == [c.cash_id]
        assert isinstance(bad, InvalidArgument)
        with pytest.raises(InvalidArgument):
            await client.member_state(tenant_id=uuid.UUID(c.tenant_id), member_id=c.member_id, counter_keys=[],
                                      idempotency_key="k" * 300)
    finally:
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder

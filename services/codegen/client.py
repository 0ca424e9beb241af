"""What a device, a simulator or a tool does with codegen's answers: turn the trust list and the
revocation list into the decode SDK's ``TrustList`` and ``Revocations``. No SQL, no service state;
callers bring their own stub."""

from __future__ import annotations

import time
import uuid
from typing import Any

import onecard_codes as sdk

from onecard.codegen.v1 import codegen_pb2 as pb

_TRUSTED_STATUSES = (pb.ISSUER_KEY_STATUS_SIGNING, pb.ISSUER_KEY_STATUS_VERIFYING)
# Pages fetched at most in one sync, so a broken server cannot keep a client looping.
MAX_REVOCATION_PAGES = 1000


def trust_list_from(answer: pb.GetTrustListResponse, *, fetched_at_s: int | None = None) -> sdk.TrustList:
    """The SDK trust list of a full GetTrustList answer (since_version 0)."""
    keys = tuple(
        sdk.TrustedKey(tenant_id=uuid.UUID(k.tenant_id), public_key=k.public_key)
        for k in answer.keys
        if k.status in _TRUSTED_STATUSES
    )
    fetched = int(time.time()) if fetched_at_s is None else fetched_at_s
    return sdk.TrustList(keys=keys, fetched_at_s=fetched, version=answer.version)


async def revocations_since(stub: Any, *, tenant_id: str, since: int, timeout_s: float = 10.0,
                            page_size: int = 0) -> tuple[list[pb.RevocationEntry], int]:
    """Every revocation entry after version ``since``, page after page, and the version to ask from
    next time. A version below ``since`` means the list was started over (a restored database):
    the caller should read from 0 again."""
    entries: list[pb.RevocationEntry] = []
    version = since
    for _ in range(MAX_REVOCATION_PAGES):
        page = await stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=version,
                                                                  page_size=page_size), timeout=timeout_s)
        entries.extend(page.entries)
        if page.version < version:
            return entries, page.version
        version = page.version
        if not page.more:
            break
    return entries, version


async def fetch_verifier_inputs(
    stub: Any, *, tenant_id: str, timeout_s: float = 10.0
) -> tuple[sdk.TrustList, sdk.Revocations]:
    """The tenant's whole trust list and revocation list, as the SDK's verifier takes them."""
    trust = await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id), timeout=timeout_s)
    revocations = sdk.Revocations()
    entries, _version = await revocations_since(stub, tenant_id=tenant_id, since=0, timeout_s=timeout_s)
    for entry in entries:
        revocations.revoke_credential(credential_id=uuid.UUID(entry.credential_id))
    return trust_list_from(trust), revocations

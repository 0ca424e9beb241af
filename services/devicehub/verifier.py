"""Checking what devices send: scanned codes (one onecard_codes Verifier per tenant, fed from
codegen's trust list and revocations) and the device signatures of offline records.

A tenant's verifier is built on its first code and then kept: the trust list is fetched again when
codegen says it changed (codegen.trust_list.changed), when a code names a key the list does not
hold (at most once per ``unknown_key_refresh_s``), and every ``refresh_s``; revocations arrive in
codegen.credential.revoked events at once and are read again since the last version on every
refresh. The replay cache lives as long as the verifier, so a code accepted once is refused as
REPLAYED afterwards on this replica (the ledger books a code once whatever the replica).

Offline settlement verifies the code an uploaded record carries with a second verifier of the
tenant on the same trust list (``verify_as_of``): at the record's time, with the revocations as
codegen knows them at upload time (read again first, each with its time: a credential revoked
after the payment still paid) and no replay cache (the ledger books a credential's counter once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import nacl.bindings
import onecard_codes as codes

from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime.errors import Unavailable
from runtime.logs import get_logger
from services.codegen.client import revocations_since, trust_list_from

log = get_logger(__name__)

DEFAULT_REFRESH_S = 300.0
DEFAULT_UNKNOWN_KEY_REFRESH_S = 5.0
REVOCATION_PAGE_SIZE = 10_000

PURPOSES = {pb.PURPOSE_PAY: codes.Purpose.PAY, pb.PURPOSE_ACCESS: codes.Purpose.ACCESS,
            pb.PURPOSE_RIDE: codes.Purpose.RIDE}


def record_signature_ok(*, public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the device key's Ed25519 signature over ``message``
    (``onecard_device.identity.record_message`` of the record: the format devices implement)."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except Exception:  # noqa: BLE001 - any failure is a bad signature
        return False
    return True


class _RevokedAsOf(codes.Revocations):
    """Revoked credentials with the time of revocation, answering as of ``as_of_s`` (set before each
    verification): a credential revoked after that instant was still good then."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked_at_s: dict[bytes, int] = {}
        self.as_of_s = 0

    def revoke_at(self, *, credential_id: uuid.UUID, revoked_at_s: int) -> None:
        key = credential_id.bytes
        self.revoked_at_s[key] = min(revoked_at_s, self.revoked_at_s.get(key, revoked_at_s))

    def is_revoked(self, *, credential_id: bytes, member_id: bytes, not_before_s: int) -> bool:
        revoked_at_s = self.revoked_at_s.get(credential_id)
        return revoked_at_s is not None and revoked_at_s <= self.as_of_s


class _NoReplayCache(codes.ReplayCache):
    """Settlement's: every code is new to it (the ledger refuses a credential's counter twice)."""

    def check_and_record(self, key: tuple[bytes, int], *, expires_at_s: int, now_s: int) -> bool:
        return True


@dataclass
class _Tenant:
    verifier: codes.Verifier
    # Settlement's: the same trust list, revocations with their times, no replay cache.
    as_of: codes.Verifier
    revoked: _RevokedAsOf
    revocations_version: int
    fetched_at: float
    unknown_key_at: float = 0.0
    refreshing: asyncio.Task[None] | None = field(default=None, repr=False)


class CodeVerifiers:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float, refresh_s: float = DEFAULT_REFRESH_S,
                 unknown_key_refresh_s: float = DEFAULT_UNKNOWN_KEY_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic):
        self._stub = codegen_pb2_grpc.CodegenServiceStub(channel)
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self._unknown_key_refresh_s = unknown_key_refresh_s
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._building: dict[str, asyncio.Future[_Tenant]] = {}
        self.fetches = 0

    async def verify(self, *, tenant_id: str, code: str, purpose: codes.Purpose,
                     now_s: int | None = None) -> codes.Verified | codes.Rejected:
        tenant = await self._tenant(tenant_id)
        now = int(time.time()) if now_s is None else now_s
        result = tenant.verifier.verify(code, now_s=now, expected_tenant_id=uuid.UUID(tenant_id), purpose=purpose)
        if (type(result) is codes.Rejected and result.reason is codes.Reason.UNKNOWN_KEY
                and self._clock() - tenant.unknown_key_at >= self._unknown_key_refresh_s):
            # A key rotated since the list was fetched (and the event not seen yet): fetch, try again.
            tenant.unknown_key_at = self._clock()
            await self._refresh(tenant_id, tenant)
            result = tenant.verifier.verify(code, now_s=now, expected_tenant_id=uuid.UUID(tenant_id), purpose=purpose)
        elif self._clock() - tenant.fetched_at >= self._refresh_s and tenant.refreshing is None:
            tenant.refreshing = asyncio.ensure_future(self._refresh_in_background(tenant_id, tenant))
        return result

    async def verify_as_of(self, *, tenant_id: str, presented: list[tuple[str, codes.Purpose, int]]
                           ) -> list[codes.Verified | codes.Rejected]:
        """Offline settlement: each (code, purpose, record time) verified at the record's time, with
        the revocations codegen has now (read first) and no replay cache. One codegen read of the
        revocations, another of the trust list when a code names a key the list lacks."""
        tenant = await self._tenant(tenant_id)
        await self._read_new_revocations(tenant_id, tenant)
        expected = uuid.UUID(tenant_id)

        def verify(code: str, purpose: codes.Purpose, at_s: int) -> codes.Verified | codes.Rejected:
            tenant.revoked.as_of_s = at_s
            return tenant.as_of.verify(code, now_s=at_s, expected_tenant_id=expected, purpose=purpose)

        results = [verify(*item) for item in presented]
        unknown = [i for i, r in enumerate(results)
                   if type(r) is codes.Rejected and r.reason is codes.Reason.UNKNOWN_KEY]
        if unknown and self._clock() - tenant.unknown_key_at >= self._unknown_key_refresh_s:
            tenant.unknown_key_at = self._clock()
            await self._refresh(tenant_id, tenant)
            for i in unknown:
                results[i] = verify(*presented[i])
        return results

    # --- events --------------------------------------------------------------------------------

    def trust_list_changed(self, tenant_id: str) -> None:
        tenant = self._tenants.get(tenant_id)
        if tenant is not None and tenant.refreshing is None:
            tenant.refreshing = asyncio.ensure_future(self._refresh_in_background(tenant_id, tenant))

    def credential_revoked(self, tenant_id: str, *, credential_id: str, version: int) -> None:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            return
        with contextlib.suppress(ValueError):
            tenant.verifier.revocations.revoke_credential(credential_id=uuid.UUID(credential_id))
        # The version is not advanced: a refresh reads every entry after the last one it read.

    # --- fetching ------------------------------------------------------------------------------

    async def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is not None:
            return tenant
        building = self._building.get(tenant_id)
        if building is None:
            building = asyncio.ensure_future(self._build(tenant_id))
            self._building[tenant_id] = building
            building.add_done_callback(lambda _f: self._building.pop(tenant_id, None))
        return await asyncio.shield(building)

    async def _build(self, tenant_id: str) -> _Tenant:
        trust = await self._trust_list(tenant_id)
        revocations = codes.Revocations()
        revoked = _RevokedAsOf()
        version = await self._read_revocations(tenant_id, revocations, revoked, since=0)
        tenant = _Tenant(verifier=codes.Verifier(trust_list=trust, revocations=revocations),
                         as_of=codes.Verifier(trust_list=trust, revocations=revoked, replay_cache=_NoReplayCache()),
                         revoked=revoked, revocations_version=version, fetched_at=self._clock())
        self._tenants[tenant_id] = tenant
        return tenant

    async def _refresh_in_background(self, tenant_id: str, tenant: _Tenant) -> None:
        try:
            await self._refresh(tenant_id, tenant)
        except Exception as exc:  # noqa: BLE001 - the next code or event tries again
            log.warning("code verifier refresh failed", tenant_id=tenant_id, error=type(exc).__name__)
        finally:
            tenant.refreshing = None

    async def _refresh(self, tenant_id: str, tenant: _Tenant) -> None:
        trust = await self._trust_list(tenant_id)
        await self._read_new_revocations(tenant_id, tenant)
        tenant.verifier.replace_trust_list(trust)
        tenant.as_of.replace_trust_list(trust)
        tenant.fetched_at = self._clock()

    async def _read_new_revocations(self, tenant_id: str, tenant: _Tenant) -> None:
        tenant.revocations_version = await self._read_revocations(
            tenant_id, tenant.verifier.revocations, tenant.revoked, since=tenant.revocations_version)

    async def _trust_list(self, tenant_id: str) -> codes.TrustList:
        self.fetches += 1
        try:
            answer = await self._stub.GetTrustList(cpb.GetTrustListRequest(tenant_id=tenant_id),
                                                   timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"codegen did not answer ({exc.code().name}); retry later",
                              reason="CODEGEN_UNAVAILABLE") from None
        return trust_list_from(answer)

    async def _read_revocations(self, tenant_id: str, revocations: codes.Revocations, revoked: _RevokedAsOf, *,
                                since: int) -> int:
        try:
            entries, version = await revocations_since(self._stub, tenant_id=tenant_id, since=since,
                                                       timeout_s=self._timeout_s, page_size=REVOCATION_PAGE_SIZE)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"codegen did not answer ({exc.code().name}); retry later",
                              reason="CODEGEN_UNAVAILABLE") from None
        for entry in entries:
            with contextlib.suppress(ValueError):
                credential_id = uuid.UUID(entry.credential_id)
                revocations.revoke_credential(credential_id=credential_id)
                revoked.revoke_at(credential_id=credential_id, revoked_at_s=entry.revoked_at.seconds)
        # A list started over (a restored codegen) keeps what was revoked; ask from its version on.
        return version

    def close(self) -> None:
        for tenant in self._tenants.values():
            if tenant.refreshing is not None:
                tenant.refreshing.cancel()
        for building in self._building.values():
            building.cancel()

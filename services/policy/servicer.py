"""The gRPC face of policy: protobuf in, domain and onecard_policy calls, protobuf out. No rules
and no SQL here: validation is ``parse_rule_set``'s, plans are ``evaluate``'s, bundles are
``make_bundle``'s.

Every call parses its tenant id first and reaches rows only through that tenant; the ledger is
asked under the same tenant, so another tenant's member has no purses here.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import grpc
from onecard_policy.bundle import make_bundle
from onecard_policy.evaluate import Plan, Request, counter_keys, evaluate
from onecard_policy.rules import RuleSet

from onecard.ledger.v1 import ledger_pb2
from onecard.policy.v1 import policy_pb2 as pb
from onecard.policy.v1 import policy_pb2_grpc
from runtime.batching import answer_batch
from runtime.errors import Conflict
from runtime.grpc_server import ServiceApp
from runtime.idempotency import key_scope, scoped_key
from runtime.mesh import peer_name
from runtime.wire import timestamp_pb
from services.policy import domain
from services.policy.domain import (
    BundleKey,
    MemberPurse,
    PublishedCache,
    RuleSetCache,
    RuleSetStatus,
    StoredVersion,
)
from services.policy.ledger_client import MAX_COUNTER_KEYS_PER_CALL, PURSE_KINDS, LedgerClient
from services.policy.state_cache import HITS, MISS_KEYS, MemberStateCache
from services.policy.store import PolicyStore

_STATUS = {
    RuleSetStatus.DRAFT: pb.RULE_SET_STATUS_DRAFT,
    RuleSetStatus.PUBLISHED: pb.RULE_SET_STATUS_PUBLISHED,
    RuleSetStatus.SUPERSEDED: pb.RULE_SET_STATUS_SUPERSEDED,
}


def _now() -> datetime:
    return datetime.now(UTC)


def version_pb(v: StoredVersion) -> pb.RuleSetVersion:
    return pb.RuleSetVersion(
        tenant_id=str(v.tenant_id), version=v.version, status=_STATUS[v.status], document=v.document,
        sha256=v.sha256.hex(), note=v.note, created_at=timestamp_pb(v.created_at),
        published_at=timestamp_pb(v.published_at), published_by=v.published_by,
    )


def bundle_key_pb(key: BundleKey) -> pb.BundleKey:
    return pb.BundleKey(key_id=key.key_id, public_key=key.public_key, created_at=timestamp_pb(key.created_at),
                        signing=key.signing)


def plan_pb(plan: Plan, *, purses: Sequence[MemberPurse], version: int, sha256: bytes,
            counters: Mapping[str, int]) -> pb.Plan:
    return pb.Plan(
        approved=plan.approved,
        reason=plan.reason,
        amount_fen=plan.amount_fen,
        legs=[pb.Leg(purse_kind=PURSE_KINDS[leg.purse_kind], ref=leg.ref,
                     account_id=domain.account_of(purses, kind=leg.purse_kind, ref=leg.ref), amount_fen=leg.amount_fen)
              for leg in plan.legs],
        charged_fen=plan.charged_fen,
        discount_fen=plan.discount_fen,
        coupon=plan.coupon or "",
        benefit=plan.benefit or "",
        benefit_funding_fen=plan.benefit_funding_fen,
        guards=[ledger_pb2.Guard(counter_key=g.counter_key, increment=g.increment, limit=g.limit) for g in plan.guards],
        pin_required=plan.pin_required,
        scene=plan.scene or "",
        meal_period=plan.meal_period or "",
        service_date=plan.service_date or "",
        detail=plan.detail,
        rule_set_version=version,
        rule_set_sha256=sha256.hex(),
        counters=[ledger_pb2.UsageCounter(counter_key=k, value=counters.get(k, 0)) for k in plan.counter_keys_read],
    )


def policy_request(*, tenant_id: uuid.UUID, request: pb.PaymentRequest) -> Request:
    """The payment as onecard_policy reads it, without purses yet; checked before any I/O."""
    at = request.time.ToDatetime(tzinfo=UTC) if request.HasField("time") else _now()
    return Request(
        tenant_id=str(tenant_id),
        member_id=domain.check_member_id(request.member_id),
        member_groups=dict(request.member_groups),
        scene=request.scene or None,
        merchant_id=request.merchant_id or None,
        device_id=request.device_id or None,
        amount_fen=request.amount_fen,
        at=at,
        channel=domain.check_channel(request.channel),
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, *, app: ServiceApp, ledger: LedgerClient, master_key: bytes, cache: RuleSetCache,
                 published: PublishedCache, states: MemberStateCache | None = None):
        self._app = app
        self._ledger = ledger
        self._master_key = master_key
        self._cache = cache
        self._published = published
        self._states = states if states is not None else MemberStateCache(max_age_s=0)

    async def _published_version(self, tenant_id: uuid.UUID) -> tuple[int, bytes]:
        """The tenant's published version and its SHA-256, or NO_PUBLISHED_RULE_SET."""
        now = time.monotonic()
        known, published = self._published.get(tenant_id, now=now)
        if not known:
            published = await self._store.published(tenant_id=tenant_id)
            self._published.put(tenant_id, published, now=now)
        if published is None:
            raise domain.no_published_rule_set()
        return published

    @property
    def _store(self) -> PolicyStore:
        return PolicyStore(self._app.pool, master_key=self._master_key)

    # --- versions -------------------------------------------------------------------------------

    async def CreateRuleSetVersion(
        self, request: pb.CreateRuleSetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateRuleSetVersionResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        note = domain.check_note(request.note)
        valid = domain.validate_document(request.document)
        async with self._store.tenant_tx(tenant_id) as tx:
            stored = await tx.create_version(document=valid.canonical, sha256=valid.sha256, note=note, now=_now())
        self._cache.put((tenant_id, stored.version, stored.sha256), valid.rule_set)
        return pb.CreateRuleSetVersionResponse(version=version_pb(stored))

    async def ValidateRuleSet(
        self, request: pb.ValidateRuleSetRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateRuleSetResponse:
        domain.parse_tenant_id(request.tenant_id)
        valid = domain.validate_document(request.document)
        return pb.ValidateRuleSetResponse(canonical_document=valid.canonical, sha256=valid.sha256.hex())

    async def GetRuleSetVersion(
        self, request: pb.GetRuleSetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRuleSetVersionResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        version = domain.check_version(request.version)
        stored = await self._store.version(tenant_id=tenant_id, version=version)
        if stored is None:
            raise domain.version_not_found(version)
        return pb.GetRuleSetVersionResponse(version=version_pb(stored))

    async def ListRuleSetVersions(
        self, request: pb.ListRuleSetVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRuleSetVersionsResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        size = domain.page_size(request.page_size)
        below = domain.parse_page_token(request.page_token)
        versions, published = await self._store.versions(tenant_id=tenant_id, below=below, limit=size + 1)
        page, more = versions[:size], len(versions) > size
        return pb.ListRuleSetVersionsResponse(
            versions=[version_pb(v) for v in page],
            next_page_token=domain.page_token(page[-1].version) if more else "",
            published_version=published,
        )

    async def PublishRuleSetVersion(
        self, request: pb.PublishRuleSetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishRuleSetVersionResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        version = domain.check_version(request.version)
        published_by = domain.check_published_by(request.published_by)
        async with self._store.tenant_tx(tenant_id) as tx:
            publication = await tx.publish(version=version, published_by=published_by, now=_now())
        if publication is None:
            raise domain.version_not_found(version)
        # This replica evaluates with the new version from the next call on.
        self._published.put(tenant_id, (publication.version.version, publication.version.sha256),
                            now=time.monotonic())
        return pb.PublishRuleSetVersionResponse(version=version_pb(publication.version),
                                                previous_version=publication.previous_version,
                                                changed=publication.changed)

    # --- evaluation -----------------------------------------------------------------------------

    async def _rule_set(self, *, tenant_id: uuid.UUID, version: int, sha256: bytes | None) -> tuple[RuleSet, bytes]:
        if sha256 is not None:
            cached = self._cache.get((tenant_id, version, sha256))
            if cached is not None:
                return cached, sha256
        found = await self._store.document(tenant_id=tenant_id, version=version)
        if found is None:
            raise domain.version_not_found(version)
        document, digest = found
        cached = self._cache.get((tenant_id, version, digest))
        if cached is None:
            cached = domain.stored_rule_set(document)
            self._cache.put((tenant_id, version, digest), cached)
        return cached, digest

    async def _plan(self, *, tenant_id: uuid.UUID, version: int, sha256: bytes | None,
                    request: pb.PaymentRequest, idempotency_key: str = "", key_scope: str = "",
                    fresh: bool = True) -> tuple[pb.Plan, str]:
        """The plan, and the transfer already booked under ``idempotency_key`` in ``key_scope``
        (empty if none).
        ``fresh=False`` (Evaluate, DryRun) may answer from the member-state cache."""
        asked = policy_request(tenant_id=tenant_id, request=request)
        rule_set, digest = await self._rule_set(tenant_id=tenant_id, version=version, sha256=sha256)
        existing = ""
        if fresh or not self._states.enabled:
            purses, counters, existing = await self._read_state(
                tenant_id=tenant_id, rule_set=rule_set, asked=asked, idempotency_key=idempotency_key,
                key_scope=key_scope)
            full = dataclasses.replace(asked, purses=domain.purse_states(purses))
        else:
            purses, full, counters = await self._cached_state(tenant_id=tenant_id, rule_set=rule_set, asked=asked)
        plan = evaluate(rule_set, full, counters)
        return plan_pb(plan, purses=purses, version=version, sha256=digest, counters=counters), existing

    async def _read_state(self, *, tenant_id: uuid.UUID, rule_set: RuleSet, asked: Request, idempotency_key: str = "",
                          key_scope: str = "", also_keys: Sequence[str] = ()
                          ) -> tuple[list[MemberPurse], dict[str, int], str]:
        """The member's purses and every counter the evaluation reads, from the ledger."""
        # The counters a request reads may depend on the purses the member holds (a voucher), so
        # they are asked for together with the purses on the keys known without them, then any
        # the purses add are read before evaluating.
        first_keys = counter_keys(rule_set, asked)
        if also_keys:
            first_keys = list(dict.fromkeys([*first_keys, *also_keys]))
        purses, counters, existing = await self._ledger.member_state(
            tenant_id=tenant_id, member_id=asked.member_id, counter_keys=first_keys, idempotency_key=idempotency_key,
            key_scope=key_scope)
        full = dataclasses.replace(asked, purses=domain.purse_states(purses))
        missing = [k for k in counter_keys(rule_set, full) if k not in counters]
        if missing:
            counters.update(await self._ledger.usage_counters(tenant_id=tenant_id, counter_keys=missing))
        # A counter never raised has no row, so the ledger leaves it out: it is 0, and known to be.
        for k in (*first_keys, *missing):
            counters.setdefault(k, 0)
        return purses, counters, existing

    async def _cached_state(self, *, tenant_id: uuid.UUID, rule_set: RuleSet, asked: Request
                            ) -> tuple[Sequence[MemberPurse], Request, Mapping[str, int]]:
        """The member's purses (and the request with them) and counters, from the cache when it
        holds the member, young enough, with every counter this evaluation reads; otherwise read
        from the ledger (with the counters the entry held, so it keeps them) and kept unless an
        invalidation of the member arrived meanwhile."""
        states = self._states
        key = (tenant_id, asked.member_id)
        now = time.monotonic()
        entry = states.get(key, now=now)
        also: Sequence[str] = ()
        if entry is not None:
            full = dataclasses.replace(asked, purses=entry.states)
            counters = entry.counters
            if all(k in counters for k in counter_keys(rule_set, full)):
                HITS.inc()
                return entry.purses, full, counters
            MISS_KEYS.inc()
            # Read again with the counters it held, so the new entry keeps them (one call's worth).
            also = list(counters)[:MAX_COUNTER_KEYS_PER_CALL]
        ticket = states.begin(key, now=now)
        purses: list[MemberPurse] | None = None
        counters_read: dict[str, int] | None = None
        try:
            purses, counters_read, _ = await self._read_state(tenant_id=tenant_id, rule_set=rule_set, asked=asked,
                                                              also_keys=also)
        finally:
            states.finish(ticket, purses=purses, counters=counters_read)
        assert purses is not None and counters_read is not None
        return purses, dataclasses.replace(asked, purses=domain.purse_states(purses)), counters_read

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        version, sha256 = await self._published_version(tenant_id)
        plan, _ = await self._plan(tenant_id=tenant_id, version=version, sha256=sha256, request=request.request,
                                   fresh=False)
        return pb.EvaluateResponse(plan=plan)

    async def DryRun(self, request: pb.DryRunRequest, context: grpc.aio.ServicerContext) -> pb.DryRunResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        version = domain.check_version(request.version)
        plan, _ = await self._plan(tenant_id=tenant_id, version=version, sha256=None, request=request.request,
                                   fresh=False)
        return pb.DryRunResponse(plan=plan)

    async def Pay(self, request: pb.PayRequest, context: grpc.aio.ServicerContext) -> pb.PayResponse:
        return await self._pay(request, context)

    async def PayMany(self, request: pb.PayManyRequest, context: grpc.aio.ServicerContext) -> pb.PayManyResponse:
        return pb.PayManyResponse(results=await answer_batch(
            request.payments, lambda p: self._pay(p, context), method="PayMany", result=pb.PayManyResult,
            field="paid", what="payments"))

    async def _pay(self, request: pb.PayRequest, context: grpc.aio.ServicerContext) -> pb.PayResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        key = domain.check_idempotency_key(request.idempotency_key)
        external_ref = domain.check_external_ref(request.external_ref)
        # The key is the caller's (or the client's or terminal's it speaks for), and it names this
        # whole request: a repeat must be the same request, not only the same key.
        scope = key_scope(request.key_scope, caller=peer_name(context))
        asked = request.request
        fingerprint = domain.payment_fingerprint(
            member_id=asked.member_id, merchant_id=asked.merchant_id, amount_fen=asked.amount_fen,
            device_id=asked.device_id, scene=asked.scene, channel=asked.channel,
            code=(request.code.credential_id, request.code.counter) if request.HasField("code") else None,
            external_ref=request.external_ref)
        version, sha256 = await self._published_version(tenant_id)
        plan, existing = await self._plan(tenant_id=tenant_id, version=version, sha256=sha256,
                                          request=request.request, idempotency_key=key, key_scope=scope)
        if existing:
            # Paid before under this key: the first payment is the answer, whatever the rules
            # would plan now (the purse it drained, the counters it raised).
            return await self._repeat(tenant_id=tenant_id, key=key, scope=scope, fingerprint=fingerprint)
        if not plan.approved:
            return pb.PayResponse(paid=False, reason=plan.reason, plan=plan)
        if plan.pin_required and not request.request.pin_verified:
            return pb.PayResponse(paid=False, reason=domain.PIN_REQUIRED, plan=plan)
        sponsor = None
        if plan.benefit_funding_fen > 0:
            sponsor = ledger_pb2.PayLeg(account_id=await self._ledger.benefit_account(tenant_id=tenant_id),
                                        amount_fen=plan.benefit_funding_fen)
        asked = request.request
        payment = ledger_pb2.PayRequest(
            tenant_id=str(tenant_id), idempotency_key=key, merchant_account_id=asked.merchant_id,
            legs=[ledger_pb2.PayLeg(account_id=leg.account_id, amount_fen=leg.amount_fen) for leg in plan.legs],
            device_id=asked.device_id, external_ref=external_ref,
            event_time=asked.time if asked.HasField("time") else None, guards=list(plan.guards),
            code=request.code if request.HasField("code") else None, sponsor=sponsor,
            key_scope=scope, request_fingerprint=fingerprint,
        )
        try:
            paid = await self._ledger.pay(payment)
        except Conflict as conflict:
            # A concurrent call under the same key paid first, with another plan.
            if conflict.reason != "IDEMPOTENCY_KEY_REUSED":
                raise
            return await self._repeat(tenant_id=tenant_id, key=key, scope=scope, fingerprint=fingerprint)
        return pb.PayResponse(paid=True, reason="APPROVED", plan=plan, transfer=paid.transfer,
                              balances=list(paid.balances))

    async def _repeat(self, *, tenant_id: uuid.UUID, key: str, scope: str, fingerprint: bytes) -> pb.PayResponse:
        """The answer to a key that booked already: that payment, if it carried out this very
        request; otherwise the key names another write (ABORTED IDEMPOTENCY_KEY_REUSED)."""
        first = await self._ledger.lookup(tenant_id=tenant_id, idempotency_key=key, key_scope=scope)
        if (not first.found or first.transfer.kind != ledger_pb2.TRANSFER_KIND_PAYMENT
                or first.request_fingerprint != fingerprint):
            raise Conflict("this idempotency key was used for a different request", reason="IDEMPOTENCY_KEY_REUSED")
        return pb.PayResponse(paid=True, reason="APPROVED", transfer=first.transfer, repeated=True)

    # --- bundles --------------------------------------------------------------------------------

    async def GetBundle(self, request: pb.GetBundleRequest, context: grpc.aio.ServicerContext) -> pb.GetBundleResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        published = await self._store.published(tenant_id=tenant_id)
        if published is None:
            raise domain.no_published_rule_set()
        version, sha256 = published
        now = _now()
        async with self._store.tenant_tx(tenant_id) as tx:
            key, signing_key = await tx.signing_key(now=now)
            bundle = await tx.bundle(version=version, key_id=key.key_id)
            if bundle is None:
                stored = await tx.version(version)
                assert stored is not None
                signed = make_bundle(json.loads(stored.document), tenant_id=str(tenant_id), version=version,
                                     signing_key=signing_key, key_id=key.key_id)
                bundle = await tx.save_bundle(version=version, key_id=key.key_id, bundle=signed, now=now)
        return pb.GetBundleResponse(bundle=bundle, version=version, key_id=key.key_id, sha256=sha256.hex())

    async def GetRulesInForce(
        self, request: pb.GetRulesInForceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRulesInForceResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        until = request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None
        versions = domain.check_in_force_query(since=since, until=until, versions=list(request.versions))
        assert since is not None and until is not None
        spans, documents = await self._store.in_force(tenant_id=tenant_id, since=since, until=until, versions=versions)
        return pb.GetRulesInForceResponse(
            spans=[pb.RulesInForce(version=s.version, in_force_from=timestamp_pb(s.since),
                                   in_force_until=timestamp_pb(s.until)) for s in spans],
            documents=[pb.PublishedDocument(version=v, document=d) for v, d in documents])

    async def RotateBundleKey(
        self, request: pb.RotateBundleKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateBundleKeyResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        key = domain.check_idempotency_key(request.idempotency_key)
        # The operator's own keys (mesh:ops): no caller files keys for another here.
        scope = key_scope("", caller=peer_name(context))
        async with self._store.tenant_tx(tenant_id) as tx:
            rotation = await tx.rotate_signing_key(idempotency_key=scoped_key(scope, key), now=_now())
        return pb.RotateBundleKeyResponse(
            signing_key=bundle_key_pb(rotation.signing_key),
            previous_key=bundle_key_pb(rotation.previous_key) if rotation.previous_key else None,
            replayed=rotation.replayed)

    async def GetBundleKeys(
        self, request: pb.GetBundleKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBundleKeysResponse:
        tenant_id = domain.parse_tenant_id(request.tenant_id)
        # Made on first need, so a device may learn the key before the first bundle exists.
        async with self._store.tenant_tx(tenant_id) as tx:
            await tx.signing_key(now=_now())
        keys = await self._store.bundle_keys(tenant_id=tenant_id)
        return pb.GetBundleKeysResponse(keys=[bundle_key_pb(k) for k in keys])

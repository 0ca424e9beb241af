"""The rules a device could have planned with, for offline settlement: which versions of the
tenant's rule set were in force during a window (policy's GetRulesInForce, once per upload), and
the rule sets of the versions records name, parsed once and kept (versions never change); and the
rule set in force now, for the tenant's settings the hub applies itself (the device clock skew)."""

from __future__ import annotations

import json
from collections import OrderedDict
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from onecard_policy import RuleSet, RuleSetError, parse_rule_set

from onecard.policy.v1 import policy_pb2 as ppb
from onecard.policy.v1 import policy_pb2_grpc
from runtime.errors import Unavailable
from runtime.logs import get_logger
from runtime.wire import timestamp_pb
from services.devicehub.evidence import InForce

log = get_logger(__name__)

DEFAULT_CACHED_RULE_SETS = 256
# A tenant's current rule set is read again after this long (its clock setting, for the drift alarm).
DEFAULT_CURRENT_TTL_S = 60.0
# policy's bound on the documents one GetRulesInForce answers.
MAX_VERSIONS_PER_CALL = 100


@dataclass(frozen=True)
class RuleHistory:
    spans: tuple[InForce, ...]
    # The named versions that were ever published, parsed; a version absent here was never published.
    rule_sets: dict[int, RuleSet]


class Rules:
    def __init__(self, policy: policy_pb2_grpc.PolicyServiceStub, *, timeout_s: float,
                 cached: int = DEFAULT_CACHED_RULE_SETS, current_ttl_s: float = DEFAULT_CURRENT_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._policy = policy
        self._timeout_s = timeout_s
        self._cached = cached
        self._parsed: OrderedDict[tuple[str, int], RuleSet] = OrderedDict()
        self._current_ttl_s = current_ttl_s
        self._clock = clock
        # tenant -> (the rule set in force, or None before the first publication; when it was read)
        self._current: dict[str, tuple[RuleSet | None, float]] = {}

    async def current(self, tenant_id: str, *, now: datetime) -> RuleSet | None:
        """The rule set in force now (read again at most every ``current_ttl_s``)."""
        cached = self._current.get(tenant_id)
        if cached is not None and self._clock() - cached[1] < self._current_ttl_s:
            return cached[0]
        spans = (await self.history(tenant_id, since=now, until=now, versions=())).spans
        version = max((s.version for s in spans), default=0)
        rule_set = None
        if version:
            rule_set = (await self.history(tenant_id, since=now, until=now, versions=[version])).rule_sets.get(version)
        self._current[tenant_id] = (rule_set, self._clock())
        while len(self._current) > self._cached:
            self._current.pop(next(iter(self._current)))
        return rule_set

    async def history(self, tenant_id: str, *, since: datetime, until: datetime, versions: Iterable[int]
                      ) -> RuleHistory:
        """The versions in force at some instant of [since, until], and the rule sets of ``versions``."""
        wanted = sorted({v for v in versions if v > 0})
        missing = [v for v in wanted if (tenant_id, v) not in self._parsed][:MAX_VERSIONS_PER_CALL]
        try:
            answer = await self._policy.GetRulesInForce(ppb.GetRulesInForceRequest(
                tenant_id=tenant_id, since=timestamp_pb(since), until=timestamp_pb(until), versions=missing),
                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"policy did not answer ({exc.code().name}); retry later",
                              reason="POLICY_UNAVAILABLE") from None
        for document in answer.documents:
            try:
                self._keep((tenant_id, document.version), parse_rule_set(json.loads(document.document)))
            except (RuleSetError, ValueError) as exc:  # stored documents were valid when published
                log.error("a published rule set does not parse", tenant_id=tenant_id, version=document.version,
                          error=str(exc)[:200])
        spans = tuple(InForce(version=s.version, since=s.in_force_from.ToDatetime(tzinfo=UTC),
                              until=s.in_force_until.ToDatetime(tzinfo=UTC) if s.HasField("in_force_until") else None)
                      for s in answer.spans)
        found = {v: self._parsed[(tenant_id, v)] for v in wanted if (tenant_id, v) in self._parsed}
        for v in found:
            self._parsed.move_to_end((tenant_id, v))
        return RuleHistory(spans=spans, rule_sets=found)

    def _keep(self, key: tuple[str, int], rule_set: RuleSet) -> None:
        self._parsed[key] = rule_set
        while len(self._parsed) > self._cached:
            self._parsed.popitem(last=False)

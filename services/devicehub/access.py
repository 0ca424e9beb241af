"""Gates and shuttle readers: the tenant's access rules (versioned, checked by the same parser the
devices run), online pass/deny decisions, and the access records attendance is read from.

A tenant's parsed rules are cached for ``rules_cache_s``; a new version set on this replica is seen
at once, on the others when the devicehub.access_rules.changed event arrives (or the cache ends).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from onecard_device.access import AccessRules, AccessRulesError, decide_access, empty_rules, parse_access_rules

from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime import paging
from runtime.errors import InvalidArgument
from runtime.wire import timestamp_pb
from services.devicehub.context import DeviceContext
from services.devicehub.members import MemberInfo
from services.devicehub.settlement import METHOD_NAMES, METHOD_VALUES, now_utc
from services.devicehub.tx_store import AccessRow, TxStore

DEFAULT_RULES_CACHE_S = 2.0
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_NONCE_CHARS = 128
PURPOSE_NAMES = {pb.PURPOSE_ACCESS: "access", pb.PURPOSE_RIDE: "ride"}


def parse_tenant(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument("tenant_id must be a UUID", reason="TENANT_ID_INVALID") from None


def _optional_uuid(value: str, *, what: str) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{what} must be a UUID", reason=f"{what.upper()}_INVALID") from None


def access_record_pb(row: AccessRow) -> pb.AccessRecord:
    return pb.AccessRecord(
        tenant_id=str(row.tenant_id), device_id=str(row.device_id), member_id=row.member_id, location=row.location,
        method=METHOD_VALUES.get(row.method, pb.METHOD_UNSPECIFIED), passed=row.passed, reason=row.reason,
        nonce=row.nonce, event_time=timestamp_pb(row.event_time), offline=row.offline, rule=row.rule)


class Access:
    def __init__(self, *, store: TxStore, rules_cache_s: float = DEFAULT_RULES_CACHE_S,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], datetime] = now_utc):
        self._store = store
        # The hub's clock decides a pass online; the device's time is not believed.
        self._now = now
        self._rules_cache_s = rules_cache_s
        self._clock = clock
        # tenant -> (version, parsed rules, read at)
        self._rules: dict[str, tuple[int, AccessRules, float]] = {}

    def forget(self, tenant_id: str) -> None:
        self._rules.pop(tenant_id, None)

    # --- rules ---------------------------------------------------------------------------------

    async def set_access_rules(self, request: pb.SetAccessRulesRequest) -> pb.SetAccessRulesResponse:
        tenant_id = parse_tenant(request.tenant_id)
        try:
            rules = parse_access_rules(request.rules_json)
        except AccessRulesError as exc:
            raise InvalidArgument(exc.message, reason=exc.reason, metadata={"rule": exc.rule}) from None
        canonical = rules.canonical_json()
        sha256 = hashlib.sha256(canonical.encode()).hexdigest()
        version, _changed = await self._store.save_access_rules(tenant_id=tenant_id, rules_json=canonical,
                                                                 sha256=sha256, now=now_utc())
        self._rules[str(tenant_id)] = (version, rules, self._clock())
        return pb.SetAccessRulesResponse(version=version, sha256=sha256)

    async def get_access_rules(self, request: pb.GetAccessRulesRequest) -> pb.GetAccessRulesResponse:
        current = await self._store.current_access_rules(parse_tenant(request.tenant_id))
        if current is None:
            return pb.GetAccessRulesResponse(version=0)
        version, rules_json, sha256 = current
        return pb.GetAccessRulesResponse(version=version, rules_json=rules_json, sha256=sha256)

    async def current_access_rules(self, tenant_id: str) -> tuple[int, str]:
        current = await self._store.current_access_rules(parse_tenant(tenant_id))
        return (current[0], current[1]) if current else (0, "")

    async def rules(self, tenant_id: str) -> tuple[int, AccessRules]:
        cached = self._rules.get(tenant_id)
        if cached is not None and self._clock() - cached[2] < self._rules_cache_s:
            return cached[0], cached[1]
        current = await self._store.current_access_rules(parse_tenant(tenant_id))
        if current is None:
            version, rules = 0, empty_rules()
        elif cached is not None and cached[0] == current[0]:
            version, rules = cached[0], cached[1]
        else:
            version, rules = current[0], parse_access_rules(current[1])
        self._rules[tenant_id] = (version, rules, self._clock())
        return version, rules

    # --- decisions -----------------------------------------------------------------------------

    async def decide(self, device: DeviceContext, msg: pb.Authorize, *, member: MemberInfo | None, refusal: str,
                     method: int) -> pb.AuthorizeResult:
        """Decide (unless the member was already refused), record, answer. A retry of the same nonce
        answers the decision recorded the first time."""
        nonce = msg.nonce or msg.request_id
        if len(nonce) > MAX_NONCE_CHARS:
            raise InvalidArgument(f"nonce is longer than {MAX_NONCE_CHARS} characters", reason="NONCE_INVALID")
        when = self._now()
        purpose = PURPOSE_NAMES[msg.purpose]
        passed, reason, rule = False, refusal, ""
        if not refusal and member is not None:
            _, rules = await self.rules(device.tenant_id)
            decision = decide_access(rules, location=device.location, purpose=purpose, member_groups=member.groups,
                                     when=when, offline=False)
            passed, reason, rule = decision.passed, decision.reason, decision.rule
        row = await self._store.record_access(AccessRow(
            tenant_id=uuid.UUID(device.tenant_id), device_id=uuid.UUID(device.device_id), nonce=nonce,
            member_id=member.member_id if member is not None else "", location=device.location,
            method=METHOD_NAMES.get(method, ""), purpose=purpose, passed=passed, reason=reason, rule=rule,
            offline=False, event_time=when), now=now_utc())
        return pb.AuthorizeResult(request_id=msg.request_id, approved=row.passed, reason=row.reason,
                                  member_id=row.member_id, rule=row.rule)

    # --- records -------------------------------------------------------------------------------

    async def list_access_records(self, request: pb.ListAccessRecordsRequest) -> pb.ListAccessRecordsResponse:
        tenant_id = parse_tenant(request.tenant_id)
        limit = paging.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        before = paging.parse_page_token(request.page_token)
        since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        until = request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None
        rows = await self._store.list_access(
            tenant_id=tenant_id, device_id=_optional_uuid(request.device_id, what="device_id"),
            member_id=request.member_id, location=request.location, since=since, until=until, before_seq=before,
            limit=limit + 1)
        page, more = rows[:limit], len(rows) > limit
        return pb.ListAccessRecordsResponse(records=[access_record_pb(r) for r in page],
                                            next_page_token=paging.page_token(page[-1].seq) if more else "")


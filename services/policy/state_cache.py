"""What a replica remembers of members' ledger state for Evaluate and DryRun: the purses and the
usage counters it read, for at most ``max_age_s``, dropped as soon as the ledger says that they
changed. Plain computation and bookkeeping; no I/O (the servicer reads, the event follower feeds
``on_ledger_event``).

Pay never reads from here: it reads the ledger fresh, and the ledger's guards and no-overdraft
decide anyway, so a plan made on a stale entry can only be refused by the ledger, never overspend.

How an entry stays honest:

- it is served only while younger than ``max_age_s`` (its age counts from before the read was
  sent) and only while the ledger's event feed stands;
- every ``ledger.>`` event drops the entries of the members it touches: each posting's account, a
  hold's account, a frozen or unfrozen account (by its owner too), an offline shortfall's member,
  and every entry that holds a counter named in the event's ``guards``. The cache knows account →
  member from the states it holds. An event it cannot place (``ledger.program.ended``, an unknown
  type) drops the whole tenant;
- a read that was in flight when an invalidation for its member arrived is answered to its caller
  but not kept: a per-member generation counter, bumped by each invalidation of a member with a
  read in flight, says so when the member was known; and since a member read for the first time
  is not known yet (its accounts come with the answer), the invalidations that arrive while reads
  are in flight are also kept, briefly, and a finished read is checked against them by its
  accounts and counters;
- when the feed is re-made (NATS reconnected; each subscription starts at "now") everything held
  is dropped, and reads begun before are not kept.

A purse opened after the read (the ledger sends no event for opening an account; its first
top-up names only the new account id) is seen when the entry ages out.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from onecard_policy.evaluate import PurseState
from prometheus_client import Counter

from runtime.events import Event
from services.policy.domain import MemberPurse, purse_states

# How long a replica may answer Evaluate from what it read of a member (seconds; 0: no cache,
# every Evaluate reads the ledger).
DEFAULT_MEMBER_STATE_CACHE_S = 2.0
# Members remembered per replica, least recently used dropped first.
DEFAULT_MEMBER_STATE_CACHE_SIZE = 100_000

_LOOKUPS = Counter("onecard_policy_member_state_cache_lookups_total",
                   "Evaluate/DryRun member-state lookups: hit, or why not (absent, expired, keys: a "
                   "counter the evaluation needs is not held, off: the event feed is down)", ["result"])
HITS = _LOOKUPS.labels("hit")
MISS_ABSENT = _LOOKUPS.labels("absent")
MISS_EXPIRED = _LOOKUPS.labels("expired")
MISS_KEYS = _LOOKUPS.labels("keys")
MISS_OFF = _LOOKUPS.labels("off")
INVALIDATIONS = Counter("onecard_policy_member_state_cache_invalidations_total",
                        "Cached member states dropped because a ledger event touched them")
DISCARDED = Counter("onecard_policy_member_state_cache_discarded_reads_total",
                    "Member-state reads answered but not kept: an invalidation arrived while in flight")
EVENTS = Counter("onecard_policy_member_state_cache_events_total", "Ledger events seen by the cache")

Key = tuple[uuid.UUID, str]  # (tenant, member)


@dataclass(frozen=True)
class MemberState:
    """What one read of the ledger said of a member: every purse, the counters asked for."""

    purses: tuple[MemberPurse, ...]
    states: tuple[PurseState, ...]  # the purses as onecard_policy reads them
    counters: dict[str, int]  # never changed once stored
    read_at: float  # monotonic time the read was sent


@dataclass
class Ticket:
    """A read in flight: what ``finish`` checks before keeping its answer."""

    key: Key
    generation: int
    seq: int
    epoch: int
    started: float


@dataclass
class _Reading:
    count: int = 0
    generation: int = 0


@dataclass(frozen=True)
class _Invalidation:
    seq: int
    tenant_id: uuid.UUID
    accounts: frozenset[str]
    counters: frozenset[str]
    members: frozenset[str]
    whole_tenant: bool


@dataclass
class MemberStateCache:
    max_age_s: float = DEFAULT_MEMBER_STATE_CACHE_S
    size: int = DEFAULT_MEMBER_STATE_CACHE_SIZE
    # The ledger's event feed now: 0 while it is down (nothing is served or kept), else a number
    # that changes whenever it is subscribed anew (whatever was held is dropped then).
    feed: Callable[[], int] = lambda: 0
    _entries: OrderedDict[Key, MemberState] = field(default_factory=OrderedDict, init=False)
    _accounts: dict[tuple[uuid.UUID, str], Key] = field(default_factory=dict, init=False)
    _counters: dict[tuple[uuid.UUID, str], set[Key]] = field(default_factory=dict, init=False)
    _reading: dict[Key, _Reading] = field(default_factory=dict, init=False)
    _started_seqs: dict[int, int] = field(default_factory=dict, init=False)  # seq -> reads begun at it
    _recent: list[_Invalidation] = field(default_factory=list, init=False)
    _seq: int = field(default=0, init=False)
    _epoch: int = field(default=0, init=False)
    _feed_seen: int = field(default=0, init=False)

    @property
    def enabled(self) -> bool:
        return self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def _serving(self) -> bool:
        feed = self.feed()
        if feed != self._feed_seen:
            # Down, or up again after a gap whose events may be lost: start over either way.
            self._feed_seen = feed
            self.clear()
        return feed != 0

    def clear(self) -> None:
        """Forget every entry; reads in flight are not kept."""
        self._entries.clear()
        self._accounts.clear()
        self._counters.clear()
        self._epoch += 1

    # --- lookups and reads --------------------------------------------------------------------------

    def get(self, key: Key, *, now: float) -> MemberState | None:
        """The member's state if held and younger than the max age. A miss is counted here; the
        caller counts a hit, or a miss for a counter the entry lacks (it knows what it needs)."""
        if not self.enabled:
            return None
        if not self._serving():
            MISS_OFF.inc()
            return None
        entry = self._entries.get(key)
        if entry is None:
            MISS_ABSENT.inc()
            return None
        if now - entry.read_at >= self.max_age_s:
            self._drop(key)
            MISS_EXPIRED.inc()
            return None
        self._entries.move_to_end(key)
        return entry

    def begin(self, key: Key, *, now: float) -> Ticket:
        """A read of the member is about to be sent."""
        self._serving()  # a feed re-made since the last look starts a new epoch before this read
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = _Reading()
        reading.count += 1
        self._started_seqs[self._seq] = self._started_seqs.get(self._seq, 0) + 1
        return Ticket(key=key, generation=reading.generation, seq=self._seq, epoch=self._epoch, started=now)

    def finish(self, ticket: Ticket, *, purses: Iterable[MemberPurse] | None = None,
               counters: dict[str, int] | None = None) -> MemberState | None:
        """The read's answer (None: it failed). Kept, and answered, unless an invalidation of the
        member arrived while it was in flight or the feed is down; None when not kept."""
        key = ticket.key
        reading = self._reading[key]
        generation = reading.generation
        # _serving() first: a feed re-made meanwhile starts a new epoch.
        keep = (purses is not None and counters is not None and self.enabled and self._serving()
                and ticket.epoch == self._epoch)
        if keep:
            assert purses is not None and counters is not None
            purses = tuple(purses)
            keep = generation == ticket.generation and not self._touched_since(ticket, purses, counters)
            if not keep:
                DISCARDED.inc()
        # This read is no longer in flight (after the checks: they need what it may have missed).
        reading.count -= 1
        if reading.count == 0:
            del self._reading[key]
        left = self._started_seqs[ticket.seq] - 1
        if left:
            self._started_seqs[ticket.seq] = left
        else:
            del self._started_seqs[ticket.seq]
            self._trim_recent()
        if not keep:
            return None
        self._drop(key)
        state = MemberState(purses=purses, states=purse_states(list(purses)), counters=dict(counters),
                            read_at=ticket.started)
        self._entries[key] = state
        tenant_id = key[0]
        for purse in purses:
            self._accounts[(tenant_id, purse.account_id)] = key
        for counter_key in state.counters:
            self._counters.setdefault((tenant_id, counter_key), set()).add(key)
        while len(self._entries) > self.size:
            self._drop(next(iter(self._entries)))
        return state

    def _touched_since(self, ticket: Ticket, purses: tuple[MemberPurse, ...], counters: dict[str, int]) -> bool:
        tenant_id, member_id = ticket.key
        for inv in self._recent:
            if inv.seq <= ticket.seq or inv.tenant_id != tenant_id:
                continue
            if inv.whole_tenant or member_id in inv.members:
                return True
            if any(p.account_id in inv.accounts for p in purses) or any(k in inv.counters for k in counters):
                return True
        return False

    def _trim_recent(self) -> None:
        if not self._recent:
            return
        if not self._started_seqs:
            self._recent.clear()
            return
        oldest = min(self._started_seqs)
        if self._recent[0].seq <= oldest:
            self._recent = [inv for inv in self._recent if inv.seq > oldest]

    def _drop(self, key: Key) -> bool:
        state = self._entries.pop(key, None)
        if state is None:
            return False
        tenant_id = key[0]
        for purse in state.purses:
            if self._accounts.get((tenant_id, purse.account_id)) == key:
                del self._accounts[(tenant_id, purse.account_id)]
        for counter_key in state.counters:
            holders = self._counters.get((tenant_id, counter_key))
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._counters[(tenant_id, counter_key)]
        return True

    # --- invalidation -------------------------------------------------------------------------------

    def invalidate(self, *, tenant_id: uuid.UUID, accounts: Iterable[str] = (), counters: Iterable[str] = (),
                   members: Iterable[str] = (), whole_tenant: bool = False) -> int:
        """Drop the entries the change touches; reads in flight for them will not be kept.
        Answers how many entries were dropped."""
        accounts, counters, members = frozenset(accounts), frozenset(counters), frozenset(members)
        self._seq += 1
        if self._reading:
            self._recent.append(_Invalidation(seq=self._seq, tenant_id=tenant_id, accounts=accounts,
                                              counters=counters, members=members, whole_tenant=whole_tenant))
        touched: set[Key] = {(tenant_id, m) for m in members}
        if whole_tenant:
            touched.update(k for k in self._entries if k[0] == tenant_id)
            touched.update(k for k in self._reading if k[0] == tenant_id)
        for account_id in accounts:
            key = self._accounts.get((tenant_id, account_id))
            if key is not None:
                touched.add(key)
        for counter_key in counters:
            touched.update(self._counters.get((tenant_id, counter_key), ()))
        dropped = 0
        for key in touched:
            reading = self._reading.get(key)
            if reading is not None:
                reading.generation += 1
            if self._drop(key):
                dropped += 1
        if dropped:
            INVALIDATIONS.inc(dropped)
        return dropped

    def on_ledger_event(self, event: Event) -> int:
        """A ``ledger.>`` event from the LEDGER stream: drop what it touches."""
        EVENTS.inc()
        if not self.enabled:
            return 0
        data = event.data or {}
        raw_tenant = event.tenant_id or data.get("tenant_id")
        try:
            tenant_id = uuid.UUID(str(raw_tenant))
        except ValueError:
            return 0
        subject = event.subject or event.type
        accounts: set[str] = set()
        counters: set[str] = set()
        members: set[str] = set()
        if subject == "ledger.transfer.posted" or subject.startswith("ledger.hold."):
            accounts.update(str(p["account_id"]) for p in data.get("postings") or ())
            if data.get("account_id"):
                accounts.add(str(data["account_id"]))
            counters.update(str(g["counter_key"]) for g in data.get("guards") or ())
        elif subject in ("ledger.account.frozen", "ledger.account.unfrozen"):
            accounts.add(str(data.get("account_id")))
            if data.get("owner_kind") == "member" and data.get("owner_id"):
                members.add(str(data["owner_id"]))
        elif subject == "ledger.offline.shortfall":
            if data.get("member_id"):
                members.add(str(data["member_id"]))
            if data.get("receivable_account_id"):
                accounts.add(str(data["receivable_account_id"]))
        elif subject == "ledger.grant_batch.finished":
            # Each grant of the batch sent its own ledger.transfer.posted.
            return 0
        else:
            # ledger.program.ended (purses closed), or a kind this replica does not know.
            return self.invalidate(tenant_id=tenant_id, whole_tenant=True)
        return self.invalidate(tenant_id=tenant_id, accounts=accounts, counters=counters, members=members)

"""The evaluator: a pure, deterministic function of (rule set, request, usage counters) -> plan.

No clock, no I/O: the same inputs give the same ``Plan`` online in the mesh and offline on a
device. The caller asks ``counter_keys`` which counters to read (the ledger's
``GetUsageCounters``, or the device's local counters offline), then calls ``evaluate``; the
plan's ``guards`` make the ledger enforce every cap the plan relied on, atomically.
The order of evaluation is specified in ``docs/policy.md``.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from onecard_policy.rules import MAX_AMOUNT_FEN, Limit, MealPeriod, RuleSet, Where

APPROVED = "APPROVED"
CHANNELS = ("online", "offline")
_KEY_PART = re.compile(r"^[\x21-\x7e]{1,64}$")


@dataclass(frozen=True, slots=True)
class PurseState:
    """One of the member's purses. ``available_fen`` None: unknown (offline)."""

    kind: str  # "cash" | "subsidy" | "voucher"
    ref: str
    available_fen: int | None = None
    expires_at: dt.date | None = None


@dataclass(frozen=True, slots=True)
class Request:
    tenant_id: str
    member_id: str
    member_groups: Mapping[str, str]
    scene: str | None
    merchant_id: str | None
    device_id: str | None
    amount_fen: int
    at: dt.datetime  # aware
    channel: str = "online"
    purses: tuple[PurseState, ...] = ()


@dataclass(frozen=True, slots=True)
class Leg:
    purse_kind: str
    ref: str
    amount_fen: int


@dataclass(frozen=True, slots=True)
class Guard:
    """Raise ``counter_key`` by ``increment``; refuse the payment if it would pass ``limit``."""

    counter_key: str
    increment: int
    limit: int


@dataclass(frozen=True, slots=True)
class Plan:
    approved: bool
    reason: str  # APPROVED or a decline reason
    amount_fen: int  # the price asked
    legs: tuple[Leg, ...] = ()  # the member's purses, in funding order; they sum to charged_fen
    charged_fen: int = 0  # what the member pays: amount - discount - benefit_funding
    discount_fen: int = 0  # the coupon's discount (the merchant forgoes it)
    coupon: str | None = None
    benefit: str | None = None
    benefit_funding_fen: int = 0  # paid to the merchant by the tenant's funding account
    guards: tuple[Guard, ...] = ()
    pin_required: bool = False
    scene: str | None = None
    meal_period: str | None = None
    service_date: str | None = None  # the day every daily window counts in (YYYY-MM-DD)
    counter_keys_read: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Context:
    scene: str | None
    period: MealPeriod | None
    service_date: str
    local_date: dt.date
    decline: tuple[str, str] | None  # (reason, detail) found before any counter is read


def _matches(where: Where, ctx: _Context, request: Request) -> bool:
    if where.scenes is not None and ctx.scene not in where.scenes:
        return False
    if where.merchants is not None and request.merchant_id not in where.merchants:
        return False
    if where.meal_periods is not None and (ctx.period is None or ctx.period.name not in where.meal_periods):
        return False
    for attr, values in where.groups:
        if request.member_groups.get(attr) not in values:
            return False
    return True


def _context(rule_set: RuleSet, request: Request) -> _Context:
    if request.at.tzinfo is None or request.at.utcoffset() is None:
        raise ValueError("Request.at must be an aware datetime")
    if request.channel not in CHANNELS:
        raise ValueError(f"Request.channel must be one of {CHANNELS}")
    local = request.at.astimezone(rule_set.zone)
    local_date = local.date()
    decline = None
    scene = request.scene
    merchant = rule_set.merchants.get(request.merchant_id) if request.merchant_id is not None else None
    device = rule_set.devices.get(request.device_id) if request.device_id is not None else None
    if scene is None:
        tags = device.scenes if device is not None else merchant.scenes if merchant is not None else ()
        if len(tags) == 1:
            scene = tags[0]
        else:
            decline = ("UNKNOWN_SCENE" if not tags else "AMBIGUOUS_SCENE",
                       "no scene given and the device or merchant does not name exactly one")
    elif scene not in rule_set.scenes:
        decline = ("UNKNOWN_SCENE", f"scene {scene!r} is not in the rule set")
        scene = None
    elif (device is not None and scene not in device.scenes) or (merchant is not None and scene not in merchant.scenes):
        decline = ("SCENE_MISMATCH", f"scene {scene!r} is not a scene of this merchant or device")
    if not (_KEY_PART.match(request.member_id) and
            (request.device_id is None or _KEY_PART.match(request.device_id))):
        decline = ("INVALID_REQUEST", "member_id and device_id are 1..64 printable ASCII characters")
    if type(request.amount_fen) is not int or not 1 <= request.amount_fen <= MAX_AMOUNT_FEN:
        decline = ("INVALID_AMOUNT", f"amount_fen must be 1..{MAX_AMOUNT_FEN}")
    period = None
    service_date = local_date
    if scene is not None:
        minute = local.hour * 60 + local.minute
        for candidate in rule_set.periods_by_scene.get(scene, ()):
            if candidate.end_min > candidate.start_min:
                if candidate.start_min <= minute < candidate.end_min:
                    period = candidate
                    break
            elif minute >= candidate.start_min:
                period = candidate
                break
            elif minute < candidate.end_min:
                period = candidate
                service_date = local_date - dt.timedelta(days=1)  # the night it started
                break
        if period is None and decline is None and rule_set.scenes[scene].closed_outside_meal_periods:
            decline = ("OUTSIDE_MEAL_PERIOD", f"scene {scene!r} sells only in its meal periods")
    return _Context(scene, period, service_date.isoformat(), local_date, decline)


def _window(window: str, ctx: _Context) -> str | None:
    if window == "day":
        return f"d:{ctx.service_date}"
    if ctx.period is None:
        return None  # a meal-period window outside every meal period: the rule does not apply
    return f"p:{ctx.period.name}:{ctx.service_date}"


def _limit_key(limit: Limit, request: Request, ctx: _Context) -> str | None:
    window = _window(limit.window, ctx)
    if window is None:
        return None
    scope = "all" if limit.counter == "shared" else f"m:{request.member_id}"
    return f"lim:{limit.name}:{scope}:{window}"


def _applicable_limits(rule_set: RuleSet, request: Request, ctx: _Context) -> list[Limit]:
    found = [lim for lim in rule_set.limits if _matches(lim.where, ctx, request)]
    found += [lim for lim in rule_set.member_limits.get(request.member_id, ()) if _matches(lim.where, ctx, request)]
    return found


def _offers(rule_set: RuleSet, request: Request, ctx: _Context):
    """The benefit, coupon and voucher candidates with their counter keys, in rule order."""
    day = f"d:{ctx.service_date}"
    member = f"m:{request.member_id}"
    benefits = []
    for benefit in rule_set.benefits:
        if _matches(benefit.where, ctx, request):
            window = _window(benefit.window, ctx)
            if window is not None:
                benefits.append((benefit, f"cnt:{benefit.name}:{member}:{window}"))
    coupons = [(coupon, f"cnt:{coupon.name}:{member}:{day}") for coupon in rule_set.coupons
               if _matches(coupon.where, ctx, request)]
    vouchers = []
    if "voucher" in rule_set.funding_order:
        held = {p.ref for p in request.purses if p.kind == "voucher"}
        vouchers = [(voucher, f"cnt:{voucher.name}:{member}:{day}") for voucher in rule_set.vouchers
                    if voucher.purse_ref in held and _matches(voucher.where, ctx, request)]
    return benefits, coupons, vouchers


def _offline_keys(request: Request, ctx: _Context) -> tuple[str, str, str | None, str | None]:
    day = f"d:{ctx.service_date}"
    device = request.device_id
    return (f"off:cred:m:{request.member_id}:{day}", f"off:cred-n:m:{request.member_id}:{day}",
            f"off:dev:{device}:{day}" if device else None, f"off:dev-n:{device}:{day}" if device else None)


def _keys(rule_set: RuleSet, request: Request, ctx: _Context) -> list[str]:
    if ctx.decline is not None:
        return []
    benefits, coupons, vouchers = _offers(rule_set, request, ctx)
    keys = [key for _, key in benefits] + [key for _, key in coupons] + [key for _, key in vouchers]
    for limit in _applicable_limits(rule_set, request, ctx):
        if limit.window != "transaction":
            key = _limit_key(limit, request, ctx)
            if key is not None:
                keys.append(key)
    if request.channel == "offline":
        keys += [k for k in _offline_keys(request, ctx) if k is not None]
    return list(dict.fromkeys(keys))


def counter_keys(rule_set: RuleSet, request: Request) -> list[str]:
    """The usage counters ``evaluate`` reads for this request (at most 100: one GetUsageCounters)."""
    return _keys(rule_set, request, _context(rule_set, request))


def _subsidy_expiry(rule_set: RuleSet, purse) -> dt.date:
    program = rule_set.subsidies_by_ref[purse.ref]
    dates = [d for d in (purse.expires_at, program.expires_on) if d is not None]
    return min(dates) if dates else dt.date.max


def evaluate(rule_set: RuleSet, request: Request, counters: Mapping[str, int]) -> Plan:
    """Decide one payment. Pure: no clock (``request.at`` is the time), no I/O."""
    ctx = _context(rule_set, request)
    amount = request.amount_fen
    period_name = ctx.period.name if ctx.period is not None else None

    def decline(reason: str, detail: str, keys: tuple[str, ...] = ()) -> Plan:
        return Plan(approved=False, reason=reason, amount_fen=amount, scene=ctx.scene, meal_period=period_name,
                    service_date=ctx.service_date, counter_keys_read=keys, detail=detail)

    if ctx.decline is not None:
        return decline(*ctx.decline)
    keys = tuple(_keys(rule_set, request, ctx))
    benefits, coupons, vouchers = _offers(rule_set, request, ctx)
    guards: list[Guard] = []
    remaining = amount

    # 1. an identity-only benefit: the tenant pays (up to its cover), the member nothing
    benefit_name = None
    benefit_fen = 0
    for benefit, key in benefits:
        used = counters.get(key, 0)
        if used + 1 <= benefit.max_uses:
            benefit_name = benefit.name
            benefit_fen = amount if benefit.cover_fen is None else min(amount, benefit.cover_fen)
            guards.append(Guard(key, 1, benefit.max_uses))
            remaining -= benefit_fen
            break

    # 2. the best coupon on what is left (largest discount, then rule order)
    coupon_name = None
    discount = 0
    if remaining > 0:
        best = None
        for coupon, key in coupons:
            if remaining >= coupon.min_spend_fen and counters.get(key, 0) + 1 <= coupon.per_day:
                if best is None or coupon.off_fen > best[0].off_fen:
                    best = (coupon, key)
        if best is not None:
            coupon_name = best[0].name
            discount = best[0].off_fen
            remaining -= discount
            guards.append(Guard(best[1], 1, best[0].per_day))
    charged = remaining

    # 3. limits on what the member pays (amount) or on the number of payments (count)
    for limit in _applicable_limits(rule_set, request, ctx):
        if limit.window == "transaction":
            if charged > limit.max:
                return decline(f"LIMIT_EXCEEDED:{limit.name}", f"{charged} fen is over {limit.max} per payment", keys)
            continue
        key = _limit_key(limit, request, ctx)
        if key is None:
            continue
        increment = charged if limit.measure == "amount" else 1
        if increment == 0:
            continue  # nothing to count (the ledger's guards take increments of 1 or more)
        if counters.get(key, 0) + increment > limit.max:
            return decline(f"LIMIT_EXCEEDED:{limit.name}",
                           f"{key} is {counters.get(key, 0)}; +{increment} would pass {limit.max}", keys)
        guards.append(Guard(key, increment, limit.max))

    # 4. offline caps: the credential's and the device's, on the device's own counters
    if request.channel == "offline":
        cred_amount, cred_count, dev_amount, dev_count = _offline_keys(request, ctx)
        for caps, amount_key, count_key, who in (
                (rule_set.offline_credential, cred_amount, cred_count, "credential"),
                (rule_set.offline_device, dev_amount, dev_count, "device")):
            if caps.per_transaction_fen is not None and charged > caps.per_transaction_fen:
                return decline(f"OFFLINE_LIMIT_EXCEEDED:{who}.per_transaction_fen",
                               f"{charged} fen is over {caps.per_transaction_fen}", keys)
            if amount_key is None:
                continue
            if caps.per_day_fen is not None and charged > 0:
                if counters.get(amount_key, 0) + charged > caps.per_day_fen:
                    return decline(f"OFFLINE_LIMIT_EXCEEDED:{who}.per_day_fen",
                                   f"{amount_key} +{charged} would pass {caps.per_day_fen}", keys)
                guards.append(Guard(amount_key, charged, caps.per_day_fen))
            if caps.count_per_day is not None:
                if counters.get(count_key, 0) + 1 > caps.count_per_day:
                    return decline(f"OFFLINE_LIMIT_EXCEEDED:{who}.count_per_day",
                                   f"{count_key} would pass {caps.count_per_day}", keys)
                guards.append(Guard(count_key, 1, caps.count_per_day))

    # 5. funding: the purses in funding order, each as far as it is allowed and has money
    legs: list[Leg] = []
    restricted = False
    for kind in rule_set.funding_order:
        if remaining == 0:
            break
        if kind == "voucher":
            held = {}
            for purse in request.purses:
                if purse.kind == "voucher" and purse.ref not in held:
                    held[purse.ref] = purse
            for voucher, key in vouchers:
                purse = held[voucher.purse_ref]
                if purse.available_fen == 0 or counters.get(key, 0) + 1 > voucher.per_day:
                    continue
                take = min(remaining, voucher.cover_fen)
                if purse.available_fen is not None:
                    take = min(take, purse.available_fen)
                legs.append(Leg("voucher", purse.ref, take))
                guards.append(Guard(key, 1, voucher.per_day))
                remaining -= take
                break  # one voucher per payment
            allowed = {voucher.purse_ref for voucher, _ in vouchers}
            if any(p.kind == "voucher" and p.available_fen != 0 and p.ref not in allowed for p in request.purses):
                restricted = True
        elif kind == "subsidy":
            usable = []
            for purse in request.purses:
                if purse.kind != "subsidy" or purse.available_fen == 0:
                    continue
                program = rule_set.subsidies_by_ref.get(purse.ref)
                expiry = _subsidy_expiry(rule_set, purse) if program is not None else None
                if program is None or expiry < ctx.local_date or not _matches(program.where, ctx, request):
                    restricted = True
                    continue
                usable.append((expiry, purse.ref, purse))
            usable.sort(key=lambda item: (item[0], item[1]))
            for _, ref, purse in usable:
                if remaining == 0:
                    break
                take = remaining if purse.available_fen is None else min(remaining, purse.available_fen)
                legs.append(Leg("subsidy", ref, take))
                remaining -= take
        else:
            for purse in sorted((p for p in request.purses if p.kind == "cash"), key=lambda p: p.ref):
                if remaining == 0:
                    break
                if purse.available_fen == 0:
                    continue
                take = remaining if purse.available_fen is None else min(remaining, purse.available_fen)
                legs.append(Leg("cash", purse.ref, take))
                remaining -= take
    if remaining > 0:
        if not legs and restricted:
            return decline("NOT_ALLOWED_HERE", "no purse the member holds may be spent here", keys)
        return decline("INSUFFICIENT_FUNDS", f"{remaining} fen is not covered by the member's purses", keys)

    # 6. a PIN or face check above the threshold (on what the member pays)
    pin = rule_set.pin_threshold_fen is not None and charged > rule_set.pin_threshold_fen
    return Plan(approved=True, reason=APPROVED, amount_fen=amount, legs=tuple(legs), charged_fen=charged,
                discount_fen=discount, coupon=coupon_name, benefit=benefit_name, benefit_funding_fen=benefit_fen,
                guards=tuple(guards), pin_required=pin, scene=ctx.scene, meal_period=period_name,
                service_date=ctx.service_date, counter_keys_read=keys)

"""A realistic rule set, used by the docs, the tests and the benchmark."""
from __future__ import annotations

from typing import Any

UNIVERSITY_TENANT_ID = "0c0ffee0-0000-4000-8000-000000000001"
# A member whose guardian set a daily cap of 30 yuan (a member-level limit).
CAPPED_MEMBER_ID = "33333333-0000-4000-8000-000000000003"


def university_rule_set() -> dict[str, Any]:
    """Demo University: free breakfast for employees, lunch from cash, a dinner voucher, a night
    snack period across midnight, a gym-only sports subsidy, milk on the nutrition subsidy and a
    spend-20-get-3-off coupon in the store."""
    return {
        "format": 1,
        "name": "Demo University 2026 autumn",
        "time_zone": "Asia/Shanghai",
        "scenes": [
            {"name": "canteen", "closed_outside_meal_periods": True},
            "gym", "shuttle", "store", "vending", "gate",
        ],
        "merchants": [
            {"id": "canteen-north", "name": "North Canteen", "scenes": ["canteen"]},
            {"id": "canteen-south", "name": "South Canteen", "scenes": ["canteen"]},
            {"id": "gym-main", "name": "Sports Centre", "scenes": ["gym"]},
            {"id": "campus-store", "name": "Campus Store", "scenes": ["store"]},
            {"id": "milk-cabinet", "name": "Milk Cabinet", "scenes": ["vending"]},
            {"id": "shuttle-line", "name": "Campus Shuttle", "scenes": ["shuttle"]},
        ],
        "devices": [
            {"id": "pos-north-1", "merchant": "canteen-north"},
            {"id": "pos-north-2", "merchant": "canteen-north"},
            {"id": "pos-south-1", "merchant": "canteen-south"},
            {"id": "gym-gate-1", "merchant": "gym-main"},
            {"id": "store-till-1", "merchant": "campus-store"},
            {"id": "cabinet-1", "merchant": "milk-cabinet"},
            {"id": "bus-reader-1", "merchant": "shuttle-line"},
        ],
        "meal_periods": [
            {"name": "breakfast", "scene": "canteen", "start": "06:30", "end": "09:30"},
            {"name": "lunch", "scene": "canteen", "start": "11:00", "end": "13:30"},
            {"name": "dinner", "scene": "canteen", "start": "17:00", "end": "20:00"},
            {"name": "night-snack", "scene": "canteen", "start": "21:00", "end": "01:00"},
        ],
        "subsidies": [
            {"name": "sports-subsidy", "purse_ref": "sports-2026",
             "grant": {"amount_fen": 10000, "every": "year"}, "expires_on": "2026-12-31",
             "where": {"scenes": ["gym"], "groups": {"role": ["student"]}}},
            {"name": "nutrition-subsidy", "purse_ref": "nutrition-2026",
             "grant": {"amount_fen": 6000, "every": "month"}, "expires_on": "2027-01-31",
             "where": {"merchants": ["milk-cabinet"]}},
            {"name": "meal-subsidy", "purse_ref": "meal-2026-11",
             "grant": {"amount_fen": 20000, "every": "month"}, "expires_on": "2026-11-30",
             "where": {"scenes": ["canteen"], "meal_periods": ["lunch", "dinner"], "groups": {"aid": ["yes"]}}},
        ],
        "vouchers": [
            {"name": "dinner-voucher", "purse_ref": "dinner-voucher", "cover_fen": 1500, "per_day": 1,
             "where": {"meal_periods": ["dinner"]}},
        ],
        "coupons": [
            {"name": "store-20-off-3", "min_spend_fen": 2000, "off_fen": 300, "per_day": 1,
             "where": {"scenes": ["store"]}},
        ],
        "benefits": [
            {"name": "free-breakfast", "window": "meal_period", "max_uses": 1,
             "where": {"meal_periods": ["breakfast"], "groups": {"role": ["employee"]}}},
        ],
        "limits": [
            {"name": "canteen-per-payment", "level": "tenant", "window": "transaction", "max": 10000,
             "where": {"scenes": ["canteen"]}},
            {"name": "daily-canteen", "level": "tenant", "window": "day", "max": 10000,
             "where": {"scenes": ["canteen"]}},
            {"name": "student-daily", "level": "group", "groups": {"role": ["student"]}, "window": "day",
             "max": 20000},
            {"name": "meals-per-period", "level": "tenant", "window": "meal_period", "measure": "count",
             "max": 3, "where": {"scenes": ["canteen"]}},
            {"name": "guardian-daily-cap", "level": "member", "member_id": CAPPED_MEMBER_ID,
             "window": "day", "max": 3000},
        ],
        "funding_order": ["voucher", "subsidy", "cash"],
        "pin": {"threshold_fen": 5000},
        "offline": {
            "credential": {"per_transaction_fen": 3000, "per_day_fen": 20000, "count_per_day": 20},
            "device": {"per_day_fen": 2000000},
        },
    }

"""onecard policy: each tenant's spending rules as data, and one pure evaluator for them.

Rule sets: ``parse_rule_set`` (refuses an inconsistent document with a ``RuleSetError`` naming
the rule), ``canonical_json``. Deciding: ``counter_keys`` then ``evaluate`` -> ``Plan``.
Devices: ``make_bundle`` / ``open_bundle`` (Ed25519-signed rule-set versions).

The format and the order of evaluation are specified in ``docs/policy.md``.
"""
from __future__ import annotations

from onecard_policy.bundle import BundleError, make_bundle, open_bundle
from onecard_policy.evaluate import (
    APPROVED,
    Guard,
    Leg,
    Plan,
    PurseState,
    Request,
    counter_keys,
    evaluate,
)
from onecard_policy.rules import RuleSet, RuleSetError, canonical_json, parse_rule_set

__all__ = [
    "APPROVED", "BundleError", "Guard", "Leg", "Plan", "PurseState", "Request", "RuleSet", "RuleSetError",
    "canonical_json", "counter_keys", "evaluate", "make_bundle", "open_bundle", "parse_rule_set",
]

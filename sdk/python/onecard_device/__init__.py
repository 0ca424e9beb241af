"""onecard_device: what a terminal (POS, gate, shuttle reader, cabinet) runs to talk to onecard.

- ``identity``: the device's Ed25519 key, the challenge and record signatures;
- ``state``: what the hub synced (trust list, revocations, card blacklist, member blocks, the
  policy bundle, access rules, config), applied from SyncUpdate messages;
- ``store``: the device's disk (offline record queue and sequence, local counters, accepted codes);
- ``offline``: the offline engine, deciding payments and passes alone with signed records;
- ``planning``: how an offline payment is planned and counted (shared with the hub's settlement);
- ``access``: the access rules of gates and shuttle readers (shared with the hub);
- ``client``: ``DeviceClient``, the stream to the hub (enrol, connect, pay online or offline,
  upload, updates, cabinet orders). The only module that needs grpc; import it explicitly.

The protocol is docs/devicehub.md.
"""
from __future__ import annotations

from onecard_device.identity import DeviceIdentity, IdentityError, verify_record
from onecard_device.offline import OfflineDecision, OfflineEngine
from onecard_device.state import DeviceState, SyncError, SyncGap
from onecard_device.store import DeviceStore

__all__ = [
    "DeviceIdentity", "DeviceState", "DeviceStore", "IdentityError", "OfflineDecision", "OfflineEngine",
    "SyncError", "SyncGap", "verify_record",
]

# The access rules (tx's module, shared with the hub).
from onecard_device.access import (  # noqa: E402
    AccessDecision,
    AccessRules,
    AccessRulesError,
    decide_access,
    parse_access_rules,
)

__all__ += ["AccessDecision", "AccessRules", "AccessRulesError", "decide_access", "parse_access_rules"]

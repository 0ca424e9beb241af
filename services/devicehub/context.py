"""What the parts of devicehub agree on: the device a stream belongs to, and where alarms go.

The stream (services.devicehub.stream) authenticates a device and builds its DeviceContext; the
transactions (services.devicehub.transactions: authorisations, uploads, cabinets, access) act for
that device and raise alarms through an AlarmSink (services.devicehub.alarms.Alarms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeviceContext:
    tenant_id: str
    device_id: str
    # onecard.devicehub.v1.DeviceKind value.
    kind: int
    model: str
    location: str
    scene_tags: tuple[str, ...]
    # The ledger settlement account a POS books to ('' for a gate).
    merchant_account_id: str
    # A cabinet's POS ('' otherwise).
    parent_device_id: str
    # The enrolled Ed25519 public key (32 bytes).
    public_key: bytes


class AlarmSink(Protocol):
    async def raise_alarm(self, *, tenant_id: str, device_id: str, kind: int, severity: int, detail: str) -> None:
        """Open an alarm of this kind for the device, or count a repeat of the open one.
        kind / severity: onecard.devicehub.v1.AlarmKind / AlarmSeverity values. detail: for a
        person, no codes or keys."""
        ...

    async def condition_ended(self, *, tenant_id: str, device_id: str, kind: int) -> object:
        """The condition behind this kind went away: clear the device's open alarm of it, if any."""
        ...

"""A device with everything synced, built from fixed keys: no network, no database."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import pytest
from onecard_codes import (
    IssuedCredential,
    IssuerKey,
    OfflineCaps,
    Purpose,
    generate_holder_key,
    issue_credential,
    make_holder_code,
)
from onecard_policy import make_bundle

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard_device import DeviceIdentity, DeviceState, DeviceStore, OfflineEngine

TENANT = "11111111-0000-4000-8000-000000000001"
DEVICE = "44444444-0000-4000-8000-000000000004"
MERCHANT = "55555555-0000-4000-8000-000000000005"
# 2026-01-01 12:00 in Shanghai (04:00 UTC): a Thursday, lunch time.
NOW_S = 1_767_240_000
CODE_CAPS = OfflineCaps(per_transaction_fen=3000, per_day_fen=5000, count_per_day=3)
BUNDLE_KEY_ID = "policy-key-1"
DEVICE_DAY_CAP_FEN = 10_000


def rule_set_doc() -> dict:
    return {
        "format": 1,
        "time_zone": "Asia/Shanghai",
        "scenes": ["store", {"name": "canteen", "closed_outside_meal_periods": True}],
        "merchants": [{"id": MERCHANT, "scenes": ["store"]}],
        "meal_periods": [{"name": "dinner", "scene": "canteen", "start": "17:00", "end": "20:00"}],
        "funding_order": ["cash"],
        "pin": {"threshold_fen": 2500},
        "offline": {"credential": {"per_day_fen": 100_000}, "device": {"per_day_fen": DEVICE_DAY_CAP_FEN}},
    }


@dataclass
class Phone:
    member_id: str
    credential: IssuedCredential
    holder: nacl.signing.SigningKey
    counter: int = 0

    def code(self, *, now_s: int = NOW_S, purpose: Purpose = Purpose.PAY) -> str:
        self.counter += 1
        return make_holder_code(credential_bytes=self.credential.credential_bytes, holder_signing_key=self.holder,
                                now_s=now_s, counter=self.counter, purpose=purpose)

    def present(self, **kwargs) -> pb.Presentation:
        return pb.Presentation(code=self.code(**kwargs))


@dataclass
class Kit:
    data_dir: Path
    issuer: IssuerKey
    bundle_key: nacl.signing.SigningKey
    identity: DeviceIdentity
    state: DeviceState
    store: DeviceStore
    engine: OfflineEngine
    clock: list[float] = field(default_factory=lambda: [float(NOW_S)])

    def phone(self, member_id: str | None = None, *, caps: OfflineCaps = CODE_CAPS) -> Phone:
        holder = generate_holder_key()
        member = uuid.UUID(member_id) if member_id else uuid.uuid4()
        credential = issue_credential(issuer_key=self.issuer, member_id=member,
                                      holder_public_key=bytes(holder.verify_key), not_before_s=NOW_S - 3600,
                                      not_after_s=NOW_S + 86_400, caps=caps,
                                      purposes=Purpose.PAY | Purpose.ACCESS | Purpose.RIDE)
        return Phone(str(member), credential, holder)

    def bundle(self, doc: dict | None = None, *, version: int = 1, key: nacl.signing.SigningKey | None = None) -> bytes:
        return make_bundle(doc or rule_set_doc(), tenant_id=TENANT, version=version,
                           signing_key=key or self.bundle_key, key_id=BUNDLE_KEY_ID)

    def restart(self) -> Kit:
        """The same device after a power cycle: its disk, not its memory."""
        self.store.close()
        store = DeviceStore(self.data_dir)
        state = DeviceState.from_json(store.load_state())
        engine = OfflineEngine(identity=DeviceIdentity.load(self.data_dir), state=state, store=store,
                               clock=lambda: self.clock[0])
        return Kit(self.data_dir, self.issuer, self.bundle_key, engine.identity, state, store, engine, self.clock)


def welcome(kit_bundle_key: nacl.signing.SigningKey, *, location: str = "store-1",
            scene_tags: tuple[str, ...] = ("store",)) -> pb.Welcome:
    return pb.Welcome(
        device=pb.Device(tenant_id=TENANT, device_id=DEVICE, kind=pb.DEVICE_KIND_POS, location=location,
                         scene_tags=list(scene_tags), merchant_account_id=MERCHANT, status=pb.DEVICE_STATUS_ACTIVE),
        bundle_keys=[pb.BundleKey(key_id=BUNDLE_KEY_ID, public_key=bytes(kit_bundle_key.verify_key))])


def build_kit(tmp_path: Path, *, location: str = "store-1", access_rules: str = "") -> Kit:
    issuer = IssuerKey.generate(tenant_id=uuid.UUID(TENANT))
    bundle_key = nacl.signing.SigningKey.generate()
    identity = DeviceIdentity.generate()
    identity.tenant_id, identity.device_id = TENANT, DEVICE
    identity.save(tmp_path)
    store = DeviceStore(tmp_path)
    state = DeviceState(tenant_id=TENANT, device_id=DEVICE)
    state.apply_welcome(welcome(bundle_key, location=location), now_s=NOW_S)
    clock = [float(NOW_S)]
    kit = Kit(tmp_path, issuer, bundle_key, identity, state, store,
              OfflineEngine(identity=identity, state=state, store=store, clock=lambda: clock[0]), clock)
    state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_TRUST_LIST, version=1, full=True, trust_keys=[
        pb.TrustKey(key_id=issuer.key_id.hex(), public_key=issuer.public_key, status="signing")]), now_s=NOW_S)
    state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_POLICY_BUNDLE, version=1, full=True, document=kit.bundle()),
                now_s=NOW_S)
    if access_rules:
        state.apply(pb.SyncUpdate(kind=pb.SYNC_KIND_ACCESS_RULES, version=1, full=True,
                                  document=access_rules.encode()), now_s=NOW_S)
    store.save_state(state.to_json())
    return kit


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    built = build_kit(tmp_path)
    yield built
    built.store.close()

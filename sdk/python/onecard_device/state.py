"""What a device knows from the hub: trust list, revocations, card blacklist, member blocks, the
policy bundle, the access rules and its config, each with the version it holds.

``apply(update)`` takes one SyncUpdate (full: replace; delta: change from ``from_version``):

- a delta older than what is held (``version`` <= held) changes nothing and is acknowledged;
- a delta that starts past what is held (``from_version`` > held) means a change was missed: it is
  refused with ``SyncGap`` and the client reconnects, so the hub sends from the held version;
- a document that does not open (a bundle with a bad signature, rules that do not parse) is
  refused with ``SyncError`` and the old one stays in force.

The state is plain data and serialises to JSON, so a restarted device decides offline with what it
had (``to_json`` / ``from_json``). Also kept here: the card -> member directory learned from online
answers (bounded), so a known card's member blocks apply offline too.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import onecard_codes as codes
from onecard_policy import BundleError, RuleSet, open_bundle

from onecard.devicehub.v1 import devicehub_pb2 as pb

try:  # written by the transactions part; the state keeps the raw rules when it is missing
    from onecard_device import access as _access
except ImportError:  # pragma: no cover - only while access.py is being written
    _access = None

MAX_CARD_DIRECTORY = 100_000
SYNC_KINDS = (pb.SYNC_KIND_TRUST_LIST, pb.SYNC_KIND_REVOCATIONS, pb.SYNC_KIND_CARD_BLACKLIST,
              pb.SYNC_KIND_MEMBER_BLOCKS, pb.SYNC_KIND_POLICY_BUNDLE, pb.SYNC_KIND_ACCESS_RULES,
              pb.SYNC_KIND_CONFIG)
_TRUSTED_STATUSES = ("signing", "verifying")
BLOCKING_STATUSES = ("frozen", "left")


class SyncError(Exception):
    """An update the device cannot apply; what it held stays in force."""

    def __init__(self, kind: int, reason: str, message: str) -> None:
        super().__init__(f"{pb.SyncKind.Name(kind) if kind in SYNC_KINDS else kind}: {reason}: {message}")
        self.kind = kind
        self.reason = reason


class SyncGap(SyncError):
    """A delta that starts past the held version: the device missed a change and must resync."""


def normalise_card_uid(uid: str) -> str:
    return uid.strip().upper()


@dataclass
class DeviceInfo:
    """The hub's record of this device, as the last Welcome said (what an offline decision needs)."""

    tenant_id: str = ""
    device_id: str = ""
    kind: int = 0
    name: str = ""
    location: str = ""
    scene_tags: tuple[str, ...] = ()
    merchant_account_id: str = ""
    parent_device_id: str = ""
    firmware_version: str = ""

    @classmethod
    def from_pb(cls, device: pb.Device) -> DeviceInfo:
        return cls(tenant_id=device.tenant_id, device_id=device.device_id, kind=device.kind, name=device.name,
                   location=device.location, scene_tags=tuple(device.scene_tags),
                   merchant_account_id=device.merchant_account_id, parent_device_id=device.parent_device_id,
                   firmware_version=device.firmware_version)

    @property
    def scene(self) -> str | None:
        return self.scene_tags[0] if self.scene_tags else None


@dataclass
class DeviceState:
    tenant_id: str
    device_id: str = ""
    device: DeviceInfo = field(default_factory=DeviceInfo)
    versions: dict[int, int] = field(default_factory=dict)
    # key id hex -> (public key, status)
    trust_keys: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    trust_fetched_at_s: int = 0
    # credential id -> not_after unix s (0: unknown); members revoked wholesale -> revoked-at s
    revoked_credentials: dict[str, int] = field(default_factory=dict)
    revoked_members: dict[str, int] = field(default_factory=dict)
    card_blacklist: dict[str, str] = field(default_factory=dict)  # UID (upper) -> member id
    member_blocks: dict[str, str] = field(default_factory=dict)  # member id -> frozen | left
    bundle_keys: dict[str, bytes] = field(default_factory=dict)  # key id -> Ed25519 public key
    bundle: bytes = b""
    rule_set: RuleSet | None = None
    bundle_version: int = 0
    access_rules_json: str = ""
    access_rules: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    card_directory: OrderedDict[str, str] = field(default_factory=OrderedDict)  # UID -> member id
    _trust_list: codes.TrustList | None = field(default=None, repr=False)
    _revocations: codes.Revocations | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tenant_id = str(uuid.UUID(self.tenant_id))

    # ---- what the verifier and the engine read ----

    @property
    def trust_list(self) -> codes.TrustList:
        if self._trust_list is None:
            keys = tuple(codes.TrustedKey(tenant_id=uuid.UUID(self.tenant_id), public_key=public_key)
                         for public_key, status in self.trust_keys.values() if status in _TRUSTED_STATUSES)
            self._trust_list = codes.TrustList(keys=keys, fetched_at_s=self.trust_fetched_at_s,
                                               version=self.versions.get(pb.SYNC_KIND_TRUST_LIST, 0))
        return self._trust_list

    @property
    def revocations(self) -> codes.Revocations:
        if self._revocations is None:
            self._revocations = codes.Revocations(
                credential_ids=[uuid.UUID(c) for c in self.revoked_credentials],
                members={uuid.UUID(m): t for m, t in self.revoked_members.items()})
        return self._revocations

    def mark_fresh(self, now_s: int) -> None:
        """The hub has just brought every kind up to date (a Welcome and its syncs): the trust list
        is as fresh as now, whether or not it changed."""
        self.trust_fetched_at_s = int(now_s)
        self._trust_list = None

    def version(self, kind: int) -> int:
        return self.versions.get(kind, 0)

    def sync_versions(self) -> list[pb.SyncVersion]:
        """What Hello tells the hub the device holds."""
        return [pb.SyncVersion(kind=kind, version=self.versions[kind]) for kind in SYNC_KINDS
                if self.versions.get(kind, 0) > 0]

    def member_block(self, member_id: str) -> str | None:
        return self.member_blocks.get(member_id) if member_id else None

    def card_member(self, card_uid: str) -> str:
        uid = normalise_card_uid(card_uid)
        return self.card_blacklist.get(uid) or self.card_directory.get(uid, "")

    def learn_card(self, card_uid: str, member_id: str) -> None:
        """Remember which member an online answer said holds this card (bounded, oldest out)."""
        if not card_uid or not member_id:
            return
        uid = normalise_card_uid(card_uid)
        self.card_directory[uid] = member_id
        self.card_directory.move_to_end(uid)
        while len(self.card_directory) > MAX_CARD_DIRECTORY:
            self.card_directory.popitem(last=False)

    # ---- Welcome and SyncUpdate ----

    def apply_welcome(self, welcome: pb.Welcome, *, now_s: int) -> None:
        self.device = DeviceInfo.from_pb(welcome.device)
        if welcome.device.device_id:
            self.device_id = welcome.device.device_id
        keys = {k.key_id: bytes(k.public_key) for k in welcome.bundle_keys}
        if keys != self.bundle_keys:
            self.bundle_keys = keys
            if self.bundle:
                try:
                    self._open_bundle(self.bundle, self.version(pb.SYNC_KIND_POLICY_BUNDLE))
                except SyncError:
                    # The held bundle's key is gone: forget it, the hub sends the current one.
                    self._forget_bundle()
        self.mark_fresh(now_s)

    def apply(self, update: pb.SyncUpdate, *, now_s: int | None = None) -> int:
        """Apply one update; answers the version now held for its kind (what to acknowledge)."""
        kind = update.kind
        if kind not in SYNC_KINDS:
            raise SyncError(kind, "UNKNOWN_KIND", "a sync kind this device does not know")
        held = self.version(kind)
        if not update.full:
            if update.version <= held:
                return held
            if update.from_version > held:
                raise SyncGap(kind, "SYNC_GAP", f"delta from {update.from_version}, device holds {held}")
        now_s = int(time.time()) if now_s is None else int(now_s)
        handler = _HANDLERS[kind]
        handler(self, update, now_s)
        self.versions[kind] = update.version
        if kind == pb.SYNC_KIND_TRUST_LIST:
            self.trust_fetched_at_s = now_s
            self._trust_list = None
        return update.version

    def _apply_trust_list(self, update: pb.SyncUpdate, now_s: int) -> None:
        keys = {} if update.full else dict(self.trust_keys)
        for key in update.trust_keys:
            if len(key.public_key) != 32:
                raise SyncError(update.kind, "MALFORMED", "a trust key is not 32 bytes")
            key_id = key.key_id or codes.key_id_for(bytes(key.public_key)).hex()
            if key.status in _TRUSTED_STATUSES:
                keys[key_id] = (bytes(key.public_key), key.status)
            else:
                keys.pop(key_id, None)
        self.trust_keys = keys

    def _apply_revocations(self, update: pb.SyncUpdate, now_s: int) -> None:
        if update.full:
            self.revoked_credentials = {}
            self.revoked_members = {}
            self._revocations = codes.Revocations()
        revocations = self.revocations
        for entry in update.revocations:
            not_after_s = entry.not_after.seconds if entry.HasField("not_after") else 0
            if entry.credential_id:
                credential_id = str(uuid.UUID(entry.credential_id))
                self.revoked_credentials[credential_id] = not_after_s
                revocations.revoke_credential(credential_id=uuid.UUID(credential_id))
            elif entry.member_id:
                # A member revoked as a whole: every credential issued up to now.
                member_id = str(uuid.UUID(entry.member_id))
                self.revoked_members[member_id] = max(now_s, self.revoked_members.get(member_id, 0))
                revocations.revoke_member(member_id=uuid.UUID(member_id), revoked_at_s=now_s)

    def _apply_card_blacklist(self, update: pb.SyncUpdate, now_s: int) -> None:
        cards = {} if update.full else dict(self.card_blacklist)
        for card in update.cards:
            cards[normalise_card_uid(card.card_uid)] = card.member_id
        self.card_blacklist = cards

    def _apply_member_blocks(self, update: pb.SyncUpdate, now_s: int) -> None:
        blocks = {} if update.full else dict(self.member_blocks)
        for block in update.member_blocks:
            if block.status in BLOCKING_STATUSES:
                blocks[block.member_id] = block.status
            else:
                blocks.pop(block.member_id, None)
        self.member_blocks = blocks

    def _open_bundle(self, document: bytes, version: int) -> None:
        trusted = {kid: nacl.signing.VerifyKey(key) for kid, key in self.bundle_keys.items() if len(key) == 32}
        try:
            rule_set, bundle_version = open_bundle(document, trusted_keys=trusted, tenant_id=self.tenant_id)
        except BundleError as exc:
            raise SyncError(pb.SYNC_KIND_POLICY_BUNDLE, f"BUNDLE_{exc.reason}", exc.message) from None
        self.bundle = bytes(document)
        self.rule_set = rule_set
        self.bundle_version = bundle_version

    def _forget_bundle(self) -> None:
        self.bundle = b""
        self.rule_set = None
        self.bundle_version = 0
        self.versions.pop(pb.SYNC_KIND_POLICY_BUNDLE, None)

    def _apply_policy_bundle(self, update: pb.SyncUpdate, now_s: int) -> None:
        if not update.document:
            self._forget_bundle()
            return
        self._open_bundle(update.document, update.version)

    def _apply_access_rules(self, update: pb.SyncUpdate, now_s: int) -> None:
        text = update.document.decode("utf-8") if update.document else ""
        parsed = None
        if text and _access is not None:
            try:
                parsed = _access.parse_access_rules(text)
            except Exception as exc:  # the parser's own error type; the old rules stay
                raise SyncError(update.kind, "ACCESS_RULES_INVALID", str(exc)) from None
        self.access_rules_json = text
        self.access_rules = parsed

    def _apply_config(self, update: pb.SyncUpdate, now_s: int) -> None:
        try:
            config = json.loads(update.document.decode("utf-8")) if update.document else {}
        except (UnicodeDecodeError, ValueError):
            raise SyncError(update.kind, "CONFIG_INVALID", "the config is not JSON") from None
        if not isinstance(config, dict):
            raise SyncError(update.kind, "CONFIG_INVALID", "the config is not a JSON object")
        self.config = config

    # ---- persistence ----

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "tenant_id": self.tenant_id,
            "device_id": self.device_id,
            "device": {**self.device.__dict__, "scene_tags": list(self.device.scene_tags)},
            "versions": {str(k): v for k, v in self.versions.items()},
            "trust_keys": {kid: [key.hex(), status] for kid, (key, status) in self.trust_keys.items()},
            "trust_fetched_at_s": self.trust_fetched_at_s,
            "revoked_credentials": self.revoked_credentials,
            "revoked_members": self.revoked_members,
            "card_blacklist": self.card_blacklist,
            "member_blocks": self.member_blocks,
            "bundle_keys": {kid: key.hex() for kid, key in self.bundle_keys.items()},
            "bundle": base64.b64encode(self.bundle).decode(),
            "access_rules_json": self.access_rules_json,
            "config": self.config,
            "card_directory": [[uid, member] for uid, member in self.card_directory.items()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceState:
        device = dict(data.get("device") or {})
        device["scene_tags"] = tuple(device.get("scene_tags") or ())
        state = cls(
            tenant_id=data["tenant_id"], device_id=data.get("device_id", ""),
            device=DeviceInfo(**{k: v for k, v in device.items() if k in DeviceInfo.__dataclass_fields__}),
            versions={int(k): int(v) for k, v in (data.get("versions") or {}).items()},
            trust_keys={kid: (bytes.fromhex(v[0]), v[1]) for kid, v in (data.get("trust_keys") or {}).items()},
            trust_fetched_at_s=int(data.get("trust_fetched_at_s", 0)),
            revoked_credentials=dict(data.get("revoked_credentials") or {}),
            revoked_members=dict(data.get("revoked_members") or {}),
            card_blacklist=dict(data.get("card_blacklist") or {}),
            member_blocks=dict(data.get("member_blocks") or {}),
            bundle_keys={kid: bytes.fromhex(v) for kid, v in (data.get("bundle_keys") or {}).items()},
            config=dict(data.get("config") or {}),
            card_directory=OrderedDict((uid, m) for uid, m in data.get("card_directory") or ()),
        )
        bundle = base64.b64decode(data.get("bundle") or "")
        if bundle:
            try:
                state._open_bundle(bundle, state.version(pb.SYNC_KIND_POLICY_BUNDLE))
            except SyncError:
                state._forget_bundle()
        rules = data.get("access_rules_json") or ""
        if rules:
            try:
                state._apply_access_rules(pb.SyncUpdate(kind=pb.SYNC_KIND_ACCESS_RULES, full=True,
                                                        document=rules.encode()), 0)
            except SyncError:
                state.versions.pop(pb.SYNC_KIND_ACCESS_RULES, None)
        return state


_HANDLERS = {
    pb.SYNC_KIND_TRUST_LIST: DeviceState._apply_trust_list,
    pb.SYNC_KIND_REVOCATIONS: DeviceState._apply_revocations,
    pb.SYNC_KIND_CARD_BLACKLIST: DeviceState._apply_card_blacklist,
    pb.SYNC_KIND_MEMBER_BLOCKS: DeviceState._apply_member_blocks,
    pb.SYNC_KIND_POLICY_BUNDLE: DeviceState._apply_policy_bundle,
    pb.SYNC_KIND_ACCESS_RULES: DeviceState._apply_access_rules,
    pb.SYNC_KIND_CONFIG: DeviceState._apply_config,
}

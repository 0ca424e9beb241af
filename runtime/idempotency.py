"""Idempotency keys belong to their caller.

A client-chosen key is meaningful only to the one who chose it, so every write is filed under its
key *and* its scope: ``client:<api client id>`` for a partner (the gateway authenticated it),
``device:<device id>`` for a terminal (the device hub did), ``mesh:<service>`` for a service of the
mesh writing for itself (the default when no scope is named). Two callers may use the same key
text and never meet; no caller can occupy, look up or answer another's keys.

A service that receives a scope from another believes it only from the mesh caller that speaks
for that kind of owner (its certificate names it): the gateway for API clients, the device hub
for terminals, policy for either, passing on what its own caller named. Anything else is
PERMISSION_DENIED ``KEY_SCOPE_NOT_ALLOWED``.

Stored, a scoped key is ``<scope>/<key>``: a scope never holds ``/``, so the first one splits them.
Keys a service makes itself for its own work (a grant batch's rows) carry no ``/`` and so never
equal a caller's.
"""
from __future__ import annotations

import re

from runtime.errors import InvalidArgument, PermissionDenied

SEPARATOR = "/"
MESH = "mesh"
CLIENT = "client"
DEVICE = "device"
# Which owners' keys each mesh caller may file: it authenticated them itself (or was told by one that did).
# Policy passes on whatever scope its caller's key had, its caller's own (mesh:) included.
SCOPES_BY_CALLER: dict[str, frozenset[str]] = {
    "gateway": frozenset({CLIENT}),
    "devicehub": frozenset({DEVICE}),
    "policy": frozenset({CLIENT, DEVICE, MESH}),
}
# A caller's key: printable ASCII without spaces, as HTTP headers and gRPC metadata carry it.
MAX_KEY_CHARS = 128
_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
MAX_OWNER_CHARS = 100
_OWNER = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def check_idempotency_key(value: str) -> str:
    """A caller's idempotency key as given, or INVALID_ARGUMENT INVALID_IDEMPOTENCY_KEY."""
    if not _KEY.match(value):
        raise InvalidArgument(f"idempotency_key must be 1..{MAX_KEY_CHARS} printable ASCII characters",
                              reason="INVALID_IDEMPOTENCY_KEY")
    return value


def client_scope(client_id: str) -> str:
    return f"{CLIENT}:{client_id}"


def device_scope(device_id: str) -> str:
    return f"{DEVICE}:{device_id}"


def key_scope(requested: str, *, caller: str | None) -> str:
    """The scope a write's key is filed under: ``requested`` when ``caller`` may name it, else the
    caller's own (``requested`` empty). ``caller`` None: insecure development mode, believed."""
    if not requested:
        return f"{MESH}:{caller or 'unknown'}"
    kind, sep, owner = requested.partition(":")
    if not sep or kind not in (CLIENT, DEVICE, MESH) or not _OWNER.match(owner):
        raise InvalidArgument("key_scope is client:<id> or device:<id>", reason="INVALID_KEY_SCOPE")
    if caller is not None and kind not in SCOPES_BY_CALLER.get(caller, frozenset()):
        raise PermissionDenied(f"{caller} may not file keys for a {kind}", reason="KEY_SCOPE_NOT_ALLOWED",
                               metadata={"caller": caller, "key_scope": requested})
    return requested


def scoped_key(scope: str, key: str) -> str:
    return f"{scope}{SEPARATOR}{key}"


def split_key(stored: str) -> tuple[str, str]:
    """(scope, the caller's key) of a stored key; ('', key) for a key a service made itself."""
    scope, sep, key = stored.partition(SEPARATOR)
    if sep and ":" in scope:
        return scope, key
    return "", stored

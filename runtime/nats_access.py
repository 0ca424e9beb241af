"""NATS accounts per process: what each one may publish and subscribe, derived from what it declares.

A process signs in to NATS with its own nkey (``ONECARD_NATS_SEED``; the server knows only the
public key) over TLS, and its permissions come from its ``NatsAccess``: the streams it owns (it
publishes their subjects, creates and updates them), the durable consumers it runs on other
services' streams, the streams it follows with ordered consumers, the subjects it listens to with
plain subscriptions, and whether it inspects stream and consumer state (the operator). Nothing else
is allowed, so a forged ``identity.member.unfrozen`` from the ledger's credentials is refused by the
server, not just ignored by a reader.

Replies come back on the process's own inbox prefix (``_INBOX_<name>``), so no process can read
another's JetStream answers or pushed messages.
"""
from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nkeys

from runtime.events import StreamSpec
from runtime.mesh import MeshTLS

INBOX_PREFIX = "_INBOX_"
ACCOUNT = "ONECARD"
# The name the NATS server's certificate carries (its DNS SAN), as a service's does.
DEFAULT_NATS_TLS_NAME = "nats"
SEED_BYTES = 32
# The subject nats-py's ordered consumers answer flow control on.
_FLOW_CONTROL = "$JS.FC"


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer a process runs on another service's stream."""

    stream: str
    name: str


@dataclass(frozen=True)
class NatsAccess:
    owns: tuple[StreamSpec, ...] = ()
    consumes: tuple[Durable, ...] = ()
    follows: tuple[str, ...] = ()
    listens: tuple[str, ...] = ()
    inspects: bool = False


def inbox_prefix(name: str) -> str:
    return f"{INBOX_PREFIX}{name}"


def new_seed() -> str:
    """A new user nkey seed (``SU...``): the secret a process signs in with."""
    return nkeys.encode_seed(os.urandom(SEED_BYTES), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    """The public half (``U...``) the server's configuration names."""
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def client_ssl_context(tls: MeshTLS) -> ssl.SSLContext:
    """TLS to NATS: the server checked against the mesh CA, this process's certificate shown."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=tls.ca_pem.decode())
    context.load_cert_chain(tls.directory / "tls.crt", tls.directory / "tls.key")
    return context


def connect_options(*, name: str, seed: str | None, tls: MeshTLS | None,
                    tls_name: str = DEFAULT_NATS_TLS_NAME) -> dict[str, Any]:
    """The ``nats.connect`` arguments that sign ``name`` in: its nkey, its inbox prefix, TLS. With no
    seed and no TLS (insecure development mode) none."""
    options: dict[str, Any] = {}
    if seed is not None:
        options.update(nkeys_seed_str=seed, inbox_prefix=inbox_prefix(name))
    if tls is not None:
        options.update(tls=client_ssl_context(tls), tls_hostname=tls_name)
    return options


def permissions(name: str, access: NatsAccess) -> dict[str, dict[str, list[str]]]:
    """The nats-server ``permissions`` block of the process ``name``."""
    publish: list[str] = []
    subscribe: list[str] = [f"{inbox_prefix(name)}.>"]
    for stream in access.owns:
        publish += list(stream.subjects)
        publish += [f"$JS.API.STREAM.{op}.{stream.name}" for op in ("INFO", "CREATE", "UPDATE")]
    for durable in access.consumes:
        prefix = f"{durable.stream}.{durable.name}"
        publish += [f"$JS.API.CONSUMER.{op}.{prefix}" for op in ("CREATE", "DURABLE.CREATE", "INFO", "MSG.NEXT")]
        publish += [f"$JS.API.CONSUMER.CREATE.{prefix}.>", f"$JS.ACK.{prefix}.>"]
    for stream in access.follows:
        # Ordered consumers are ephemeral, named by the client; each lives as long as its subscription.
        publish += [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
                    f"$JS.API.CONSUMER.DELETE.{stream}.>", f"$JS.API.CONSUMER.INFO.{stream}.>",
                    f"{_FLOW_CONTROL}.{stream}.>"]
    if access.inspects:
        publish += ["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "$JS.API.STREAM.INFO.*",
                    "$JS.API.CONSUMER.NAMES.*", "$JS.API.CONSUMER.LIST.*", "$JS.API.CONSUMER.INFO.*.*"]
    subscribe += list(access.listens)
    return {"publish": {"allow": _unique(publish)}, "subscribe": {"allow": _unique(subscribe)}}


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def accounts_table(accounts: Mapping[str, NatsAccess]) -> str:
    """The NATS accounts as a Markdown table (docs/security.md carries it; a test keeps them alike)."""
    lines = ["| account | publishes (its stream) | durable consumers | follows | plain subscriptions |",
             "|---|---|---|---|---|"]
    for name, access in accounts.items():
        owns = ", ".join(f"`{s}` ({stream.name})" for stream in access.owns for s in stream.subjects) or "nothing"
        consumes = ", ".join(f"{d.stream}/{d.name}" for d in access.consumes) or "-"
        follows = ", ".join(access.follows) or "-"
        if access.inspects:
            follows += " (and reads stream and consumer state)"
        listens = ", ".join(f"`{s}`" for s in access.listens) or "-"
        lines.append(f"| {name} | {owns} | {consumes} | {follows} | {listens} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class NkeyVariable:
    """A public nkey the server reads from its environment when it loads the configuration
    (``nkey: $LEDGER_NKEY``): how a configuration that is the same in every deployment (Kubernetes'
    ConfigMap) names keys that differ in each."""

    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.name):
            raise ValueError(f"bad nats-server variable name {self.name!r}")


def accounts_config(users: Mapping[str, tuple[str | NkeyVariable, NatsAccess]]) -> str:
    """The ``accounts`` block of a nats-server configuration: one JetStream account whose users
    are ``name -> (public nkey, access)``. The values are JSON, which the server's format reads; a
    ``NkeyVariable`` is written as a bare ``$NAME`` reference (quoted, the server would take it
    for the key itself)."""
    entries = []
    for name, (key, access) in sorted(users.items()):
        nkey = f"${key.name}" if isinstance(key, NkeyVariable) else json.dumps(key)
        entry = f'{{"nkey": {nkey}, "permissions": {json.dumps(permissions(name, access))}}}'
        entries.append(f"      # {name}\n      " + entry)
    body = ",\n".join(entries)
    return (
        "accounts {\n"
        f"  {ACCOUNT}: {{\n"
        "    jetstream: enabled\n"
        "    users: [\n"
        f"{body}\n"
        "    ]\n"
        "  }\n"
        "}\n"
    )

"""The mesh's per-method allow-list, read from the protos, and the check the server runs per call.

Every rpc of a onecard service carries ``option (onecard.mesh.v1.access)`` (protos/onecard/mesh):
the callers that may reach it, or ``terminals: true`` for the device port's methods. This module
turns those options into one table per server and answers, per call, whether the caller the
certificate names may go on. The gRPC standard services are ruled here: health is open to
anyone (the probes of an orchestrator carry no certificate), reflection to the operator only.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor

from onecard.mesh.v1 import access_pb2
from runtime.errors import DomainError, PermissionDenied, Unauthenticated

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
OPS = "ops"
_CALLER_PREFIX = "CALLER_"


def caller_name(value: int) -> str:
    """``CALLER_LEDGER`` -> ``ledger``: the name in the certificate's spiffe://onecard/<name>."""
    return access_pb2.Caller.Name(value).removeprefix(_CALLER_PREFIX).lower()


def known_callers() -> list[str]:
    """Every name the allow-list can hold, in the enum's order."""
    return [caller_name(v) for v in access_pb2.Caller.values() if v != access_pb2.CALLER_UNSPECIFIED]


@dataclass(frozen=True)
class MethodRule:
    """Who may call one method: named mesh callers, anyone (health), or terminals on the device port."""

    # In the order the option lists them (the first is the usual caller).
    callers: tuple[str, ...]
    anyone: bool = False
    terminals: bool = False


OPEN = MethodRule(callers=(), anyone=True)
OPS_ONLY = MethodRule(callers=(OPS,))


def method_rules(services: Iterable[ServiceDescriptor]) -> dict[str, MethodRule]:
    """``/package.Service/Method`` -> its rule, for every method of ``services``. A method with no
    option gets an empty rule: nobody may call it."""
    rules: dict[str, MethodRule] = {}
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            access = options.Extensions[access_pb2.access] if options.HasExtension(access_pb2.access) else None
            callers = tuple(caller_name(c) for c in access.callers) if access is not None else ()
            rules[f"/{service.full_name}/{method.name}"] = MethodRule(
                callers=callers, terminals=bool(access is not None and access.terminals))
    return rules


def standard_rules() -> dict[str, MethodRule]:
    """The rules of the gRPC services every server adds, by service prefix."""
    rules = {f"/{HEALTH_SERVICE}/": OPEN}
    rules.update({f"/{name}/": OPS_ONLY for name in REFLECTION_SERVICES})
    return rules


def allow_list_table(services: Iterable[ServiceDescriptor]) -> str:
    """The allow-list of ``services`` as a Markdown table (docs/security.md carries it; a test
    keeps the two alike)."""
    lines = ["| method | who may call it |", "|---|---|"]
    for service in services:
        for path, rule in method_rules([service]).items():
            who = "terminals, on the device port" if rule.terminals else ", ".join(rule.callers) or "nobody"
            lines.append(f"| `{path.strip('/').replace('/', '.')}` | {who} |")
    return "\n".join(lines)


class Authorizer:
    """Answers, per call, the refusal for a caller on a method, or None to let the call through."""

    def __init__(self, rules: Mapping[str, MethodRule], *, enforce: bool = True, terminals_port: bool = False):
        self._rules = dict(rules)
        self._prefix_rules = standard_rules()
        self._enforce = enforce
        self._terminals_port = terminals_port

    def rule(self, method: str) -> MethodRule | None:
        rule = self._rules.get(method)
        if rule is not None:
            return rule
        for prefix, standard in self._prefix_rules.items():
            if method.startswith(prefix):
                return standard
        return None

    def refusal(self, method: str, caller: str | None) -> DomainError | None:
        if not self._enforce:
            return None
        rule = self.rule(method)
        if rule is not None and rule.anyone:
            return None
        if self._terminals_port:
            # The device port serves only the terminals' methods; a terminal proves itself in the call.
            if rule is not None and rule.terminals:
                return None
            return PermissionDenied(f"{method} is not served on the device port", reason="NOT_ON_DEVICE_PORT",
                                    metadata={"method": method})
        if caller is None:
            return Unauthenticated("a client certificate from the mesh CA is required", reason="NO_CALLER_IDENTITY",
                                   metadata={"method": method})
        if rule is None or caller not in rule.callers:
            return PermissionDenied(f"{caller} may not call {method}", reason="CALLER_NOT_ALLOWED",
                                    metadata={"caller": caller, "method": method})
        return None

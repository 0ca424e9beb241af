"""Where a process reaches another service: one address, the addresses of its replicas, or a
resolver's name (runtime.grpc_client opens the channel; settings check the value at start)."""
from __future__ import annotations

import ipaddress

_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def channel_target(target: str) -> str:
    """The gRPC target for a setting's value: ``host:port`` as it is; several addresses separated
    by commas (IP literals: gRPC resolves no list of host names) as one ``ipv4:``/``ipv6:`` target;
    a target that names its resolver (``dns:///...``, ``ipv4:...``) as it is. ValueError names what
    is wrong with a list."""
    value = target.strip()
    if value.startswith(_RESOLVER_SCHEMES) or "," not in value:
        return value
    addresses = [part.strip() for part in value.split(",") if part.strip()]
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} in {target!r}: each address must be host:port")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"{address!r} in {target!r}: a list of addresses takes IP addresses; for names use "
                             "one name that resolves to every replica (dns:///name:port)") from None
    if len(families) != 1:
        raise ValueError(f"{target!r}: IPv4 and IPv6 addresses cannot share one list")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(addresses)


def check_target(value: str) -> str:
    """A setting's validator: the value, or ValueError saying what is wrong with it."""
    channel_target(value)
    return value

"""The private-address guard shared by image fetches and completion callbacks:
which addresses an imgq process may connect to when IMGQ_ALLOW_PRIVATE_URLS is off."""

from __future__ import annotations

import ipaddress
import socket


class AddressRefused(ValueError):
    """A host resolves to a loopback, private or otherwise non-public address."""


class ResolveError(OSError):
    """A host name could not be resolved."""


def is_ip_literal(host: str) -> bool:
    """True when the host is an IPv4/IPv6 address, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> list[str]:
    """All addresses of a host (socket.getaddrinfo), in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveError(f"could not resolve host {host}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise ResolveError(f"host {host} has no addresses")
    return addresses


def public_addresses(host: str, port: int) -> list[str]:
    """The host's addresses; AddressRefused when any is not a public one."""
    literal = is_ip_literal(host)
    addresses = [host] if literal else resolve(host, port)
    for address in addresses:
        problem = address_problem(ipaddress.ip_address(address))
        if problem:
            where = host if literal else f"{host} (it resolves to {address})"
            raise AddressRefused(f"{where}: a {problem} address")
    return addresses


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be connected to ('loopback', 'private' ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return address_problem(embedded)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)

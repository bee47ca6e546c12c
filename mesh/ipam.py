"""IP address management, pure: choose subnets, allocate and release addresses.

Default pools follow Docker: 172.17.0.0/16 ... 172.31.0.0/16, then 192.168.0.0/20 blocks. A pool
subnet is skipped when it overlaps a route of the host namespace or another network.

    subnet = pick_subnet(taken=[...], routes=[...])
    pool = AddressPool(subnet, gateway=None, ip_range=None, after="172.18.0.7")
    ip = pool.allocate(); pool.reserve("172.18.0.9"); pool.release(ip)

Allocation is serial, as Swarm's: a pick is the first free address after the one picked last
(`after`, then `pool.last`; wrapping around at the end of the range), so an address that was just
released (a removed task's, a removed service's VIP that a client may still have cached) is the
last to be handed out again, not the first.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from mesh.errors import AllocationError

DEFAULT_POOLS: tuple[IPv4Network, ...] = tuple(
    [IPv4Network(f"172.{n}.0.0/16") for n in range(17, 32)]
    + [IPv4Network(f"192.168.{n}.0/20") for n in range(0, 256, 16)]
)


def _overlaps(net: IPv4Network, others: list[IPv4Network]) -> IPv4Network | None:
    return next((o for o in others if net.overlaps(o)), None)


def pick_subnet(taken: list[IPv4Network], routes: list[IPv4Network]) -> IPv4Network:
    """The first default pool subnet overlapping neither another network nor a host route."""
    for candidate in DEFAULT_POOLS:
        if not _overlaps(candidate, taken) and not _overlaps(candidate, routes):
            return candidate
    raise AllocationError(
        "no free default address pool: every subnet of 172.17-31.0.0/16 and 192.168.0.0/20 blocks "
        "overlaps a host route or another network; give the network an explicit ipam subnet")


def check_subnet(name: str, subnet: IPv4Network, taken: dict[str, IPv4Network],
                 routes: list[IPv4Network]) -> None:
    """Refuse a user-chosen subnet that overlaps another network or a host route."""
    for other, net in taken.items():
        if other != name and subnet.overlaps(net):
            raise AllocationError(f"networks.{name}: subnet {subnet} overlaps network '{other}' ({net})")
    clash = _overlaps(subnet, routes)
    if clash is not None:
        raise AllocationError(
            f"networks.{name}: subnet {subnet} overlaps the host route {clash}; choose another subnet")


class AddressPool:
    """Addresses of one subnet: the gateway is reserved; dynamic picks come from ip_range if set."""

    def __init__(self, name: str, subnet: IPv4Network, gateway: IPv4Address | None = None,
                 ip_range: IPv4Network | None = None, after: str | IPv4Address | None = None):
        self.name = name
        self.subnet = subnet
        self.gateway = gateway
        self.range = ip_range or subnet
        self.last = ip_address(after) if after else None      # the address picked last
        self.used: set[IPv4Address] = set()
        if gateway is not None:
            self.used.add(gateway)

    def _usable(self, ip: IPv4Address) -> bool:
        if self.subnet.prefixlen >= 31:
            return True
        return ip not in (self.subnet.network_address, self.subnet.broadcast_address)

    def is_free(self, address: str | IPv4Address) -> bool:
        """True when `address` could be reserved here: inside the subnet, usable, not in use."""
        ip = ip_address(address)
        return ip in self.subnet and self._usable(ip) and ip not in self.used

    def allocate(self) -> IPv4Address:
        first, size = int(self.range.network_address), self.range.num_addresses
        start = 0
        if self.last is not None and self.last in self.range:
            start = (int(self.last) - first + 1) % size
        for offset in range(size):
            ip = IPv4Address(first + (start + offset) % size)
            if ip not in self.used and self._usable(ip):
                self.used.add(ip)
                self.last = ip
                return ip
        where = f"ip_range {self.range}" if self.range != self.subnet else f"subnet {self.subnet}"
        raise AllocationError(f"networks.{self.name}: no free address left in {where} "
                              f"({len(self.used)} in use); use a larger subnet or fewer tasks")

    def reserve(self, address: str | IPv4Address, where: str = "") -> IPv4Address:
        ip = ip_address(address)
        label = f"{where}: " if where else ""
        if ip not in self.subnet:
            raise AllocationError(f"{label}address {ip} is outside subnet {self.subnet} of network '{self.name}'")
        if not self._usable(ip):
            raise AllocationError(f"{label}address {ip} is the network or broadcast address of {self.subnet}")
        if ip in self.used:
            what = "the gateway" if ip == self.gateway else "already in use"
            raise AllocationError(f"{label}address {ip} on network '{self.name}' is {what}")
        self.used.add(ip)
        return ip

    def release(self, address: str | IPv4Address) -> None:
        ip = ip_address(address)
        if ip != self.gateway:
            self.used.discard(ip)


def default_gateway(subnet: IPv4Network) -> IPv4Address:
    """Docker's choice: the first host address of the subnet."""
    return next(subnet.hosts()) if subnet.prefixlen < 31 else subnet.network_address


def parse_network(text: str) -> IPv4Network:
    return ip_network(text, strict=True)

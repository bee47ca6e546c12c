"""The netlink adapter (pyroute2): namespaces, bridges, veth and macvlan endpoints, VLANs, routes.

Every method takes the namespace it acts in by name (None = the namespace this process is in).
Sockets are opened with flags=0, so a mistyped namespace is an error, never a new namespace.

    nl = Netlink()
    nl.ensure_netns("mesh-h1"); nl.add_bridge("mesh-h1", "mhb…", "172.18.0.1", 16)
    nl.add_veth_endpoint("mesh-h1", "mhb…", "mhv…", "mesh-h1-web.1", "eth0", "172.18.0.2", 16, gw)
"""
from __future__ import annotations

import subprocess
from ipaddress import IPv4Network, ip_network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mesh import netns as ns
from mesh.errors import MeshError
from mesh.names import LINK_PREFIX
from mesh.nft import in_netns
from mesh.overlay import mac_for


def _ipr(netns: str | None) -> IPRoute:
    """A netlink socket bound to `netns` (made from this thread while it visits the namespace)."""
    if not netns:
        return IPRoute()
    with ns.entered(netns):
        return IPRoute()


NUD_PERMANENT = 0x80
NTF_SELF = 0x02                # an FDB entry of the device itself (the VXLAN's), not its master's
POLICY_PRIORITY = 1000               # ip rules of the routing mesh's return routes: before main (32766)
EEXIST, ENOENT, ENODEV, ESRCH = 17, 2, 19, 3


def _quiet(call, *args, **kwargs) -> None:
    """A netlink change that may already be in place (adding) or already gone (removing)."""
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in (EEXIST, ENOENT, ENODEV, ESRCH):
            raise


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


class Netlink:
    # -- namespaces ---------------------------------------------------------------------------
    def netns_exists(self, name: str) -> bool:
        return ns.exists(name)

    def ensure_netns(self, name: str) -> bool:
        """Create the namespace (loopback up) unless it exists; True when it was created."""
        if ns.exists(name):
            return False
        ns.create(name)
        with _ipr(name) as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
        return True

    def delete_netns(self, name: str) -> None:
        ns.delete(name)

    def list_netns(self, prefix: str) -> list[str]:
        return ns.listing(prefix)

    def sysctl(self, netns: str | None, key: str, value: str) -> None:
        proc = subprocess.run(in_netns(netns, ["sysctl", "-qw", f"{key}={value}"]),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise MeshError(f"sysctl {key}={value} in {netns or 'the root namespace'}: "
                            f"{proc.stderr.strip()}")

    # -- links --------------------------------------------------------------------------------
    def link_exists(self, netns: str | None, ifname: str) -> bool:
        with _ipr(netns) as ipr:
            return _index(ipr, ifname) is not None

    def list_links(self, netns: str | None, prefix: str = LINK_PREFIX) -> list[str]:
        with _ipr(netns) as ipr:
            names = [link.get("ifname") for link in ipr.get_links()]
        return sorted(n for n in names if n and n.startswith(prefix))

    def delete_link(self, netns: str | None, ifname: str) -> None:
        with _ipr(netns) as ipr:
            index = _index(ipr, ifname)
            if index is not None:
                ipr.link("del", index=index)

    def routes(self, netns: str | None) -> list[IPv4Network]:
        """Destinations of the namespace's IPv4 routes, except those through mesh's own links."""
        out = []
        with _ipr(netns) as ipr:
            ours = {link["index"] for link in ipr.get_links()
                    if (link.get("ifname") or "").startswith(LINK_PREFIX)}
            for route in ipr.get_routes(family=2, table=254):
                dst = route.get("dst")
                if dst and route.get("oif") not in ours:
                    out.append(ip_network(f"{dst}/{route['dst_len']}", strict=False))
        return out

    def add_bridge(self, netns: str | None, ifname: str, address: str | None, prefixlen: int) -> None:
        """A bridge, up, with `address` (None: no address, as the ingress network's bridges)."""
        with _ipr(netns) as ipr:
            if _index(ipr, ifname) is None:
                ipr.link("add", ifname=ifname, kind="bridge")
            index = _index(ipr, ifname)
            if address and not ipr.get_addr(index=index, address=address):
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
        self.sysctl(netns, f"net.ipv4.conf.{ifname}.route_localnet", "1")

    def ensure_vlan(self, netns: str | None, ifname: str, vlan: int) -> bool:
        """Create `base.vlan` on its base interface unless it exists; True when it was created."""
        base = ifname.rpartition(".")[0]
        with _ipr(netns) as ipr:
            if _index(ipr, ifname) is not None:
                return False
            base_index = _index(ipr, base)
            if base_index is None:
                raise MeshError(f"macvlan parent '{ifname}': its base interface '{base}' does not exist")
            ipr.link("set", index=base_index, state="up")    # a VLAN cannot come up on a down base
            try:
                ipr.link("add", ifname=ifname, kind="vlan", link=base_index, vlan_id=vlan)
                ipr.link("set", index=_index(ipr, ifname), state="up")
            except NetlinkError as exc:
                _quiet(ipr.link, "del", ifname=ifname)
                if exc.code == 95:      # EOPNOTSUPP
                    raise MeshError(f"macvlan parent '{ifname}': the VLAN sub-interface cannot be made: "
                                    f"this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q), or "
                                    f"'{base}' cannot carry VLANs") from exc
                raise MeshError(f"macvlan parent '{ifname}': cannot create it: {exc}") from exc
        return True

    # -- endpoints ----------------------------------------------------------------------------
    def add_veth_endpoint(self, host: str | None, bridge: str, host_if: str, sandbox: str,
                          ifname: str, address: str, prefixlen: int, gateway: str | None,
                          mtu: int | None = None) -> None:
        mac = mac_for(address)       # deterministic, so other nodes can program it (mesh.overlay)
        with _ipr(host) as ipr:
            if _index(ipr, host_if) is None:
                ipr.link("add", ifname=host_if, kind="veth",
                         peer={"ifname": ifname, "net_ns_fd": ns.path(sandbox), "address": mac})
            index = _index(ipr, host_if)
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, master=_index(ipr, bridge), state="up")
            ipr.brport("set", index=index, mode=1)   # IFLA_BRPORT_MODE: hairpin
        self._configure(sandbox, ifname, address, prefixlen, gateway, mtu)

    def pin_mac(self, netns: str | None, ifname: str) -> None:
        """Set a bridge's MAC to the one it has now: a bridge otherwise takes the lowest MAC of its
        ports, so a port leaving (a lab node dying) would change it under its neighbours' ARP."""
        with _ipr(netns) as ipr:
            index = _index(ipr, ifname)
            mac = ipr.get_links(index)[0].get("address")
            ipr.link("set", index=index, address=mac)

    def add_uplink(self, host: str | None, host_if: str, host_address: str, sandbox: str,
                   ifname: str, address: str, prefixlen: int) -> None:
        """A routed veth pair between `host` and `sandbox`, addressed on both ends; the sandbox's
        default route goes through the host's end."""
        with _ipr(host) as ipr:
            if _index(ipr, host_if) is None:
                ipr.link("add", ifname=host_if, kind="veth",
                         peer={"ifname": ifname, "net_ns_fd": ns.path(sandbox)})
            index = _index(ipr, host_if)
            if not ipr.get_addr(index=index, address=host_address):
                ipr.addr("add", index=index, address=host_address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
        self.sysctl(host, f"net.ipv4.conf.{host_if}.route_localnet", "1")
        self._configure(sandbox, ifname, address, prefixlen, host_address)

    def set_policy_routes(self, netns: str, ifname: str, routes: tuple[tuple[int, int, str], ...],
                          old: tuple[tuple[int, int, str], ...] = ()) -> None:
        """For each (fwmark, table, gateway): `ip rule fwmark M lookup T` (priority 1000, before
        main: the marks are distinct, so the rules' order among them does not matter) and, in T, a
        default route via `gateway` on `ifname`; entries of `old` not in `routes` are removed."""
        with _ipr(netns) as ipr:
            index = _index(ipr, ifname)
            for mark, table, gateway in set(old) - set(routes):
                _quiet(ipr.rule, "del", fwmark=mark, table=table, priority=POLICY_PRIORITY)
                _quiet(ipr.route, "del", dst="0.0.0.0/0", table=table)
            for mark, table, gateway in routes:
                if index is not None:
                    ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index, table=table)
                _quiet(ipr.rule, "add", fwmark=mark, table=table, priority=POLICY_PRIORITY)

    def add_macvlan_endpoint(self, host: str | None, parent: str, tmp_if: str, sandbox: str,
                             ifname: str, address: str, prefixlen: int, gateway: str | None) -> None:
        with _ipr(host) as ipr:
            parent_index = _index(ipr, parent)
            if parent_index is None:
                raise MeshError(f"macvlan parent interface '{parent}' does not exist")
            ipr.link("set", index=parent_index, state="up")
            if _index(ipr, tmp_if) is None:
                ipr.link("add", ifname=tmp_if, kind="macvlan", link=parent_index, macvlan_mode="bridge")
            ipr.link("set", index=_index(ipr, tmp_if), net_ns_fd=ns.path(sandbox))
        with _ipr(sandbox) as ipr:
            index = _index(ipr, tmp_if)
            if index is not None:
                ipr.link("set", index=index, ifname=ifname)
        self._configure(sandbox, ifname, address, prefixlen, gateway)

    def _configure(self, sandbox: str, ifname: str, address: str, prefixlen: int,
                   gateway: str | None, mtu: int | None = None) -> None:
        with _ipr(sandbox) as ipr:
            index = _index(ipr, ifname)
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            if not ipr.get_addr(index=index, address=address):
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            if gateway:
                try:
                    ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index)
                except NetlinkError as exc:
                    raise MeshError(f"default route via {gateway} in {sandbox}: {exc}") from exc

    # -- overlay ------------------------------------------------------------------------------
    def add_vxlan(self, netns: str | None, bridge: str, link: str, vni: int, local: str,
                  mtu: int, port: int = 4789) -> None:
        """A VXLAN device (learning off, ARP proxy on) as a port of `bridge`, both at `mtu`."""
        with _ipr(netns) as ipr:
            if _index(ipr, bridge) is None:
                ipr.link("add", ifname=bridge, kind="bridge")
            if _index(ipr, link) is None:
                ipr.link("add", ifname=link, kind="vxlan", vxlan_id=vni, vxlan_local=local,
                         vxlan_port=port, vxlan_learning=0, vxlan_proxy=1)
            br = _index(ipr, bridge)
            ipr.link("set", index=br, mtu=mtu, state="up")
            ipr.link("set", index=_index(ipr, link), master=br, mtu=mtu, state="up")

    def set_fdb(self, netns: str | None, link: str, mac: str, remote: str, present: bool) -> None:
        """Set (or remove) the static FDB entry `mac` -> VTEP `remote` on VXLAN device `link`:
        setting replaces the VTEP of an entry `mac` already has (one VTEP per task MAC)."""
        with _ipr(netns) as ipr:
            index = _index(ipr, link)
            if index is not None:
                _quiet(ipr.fdb, "replace" if present else "del", ifindex=index, lladdr=mac, dst=remote,
                       flags=NTF_SELF, state=NUD_PERMANENT)

    def set_neigh(self, netns: str | None, link: str, address: str, mac: str, present: bool) -> None:
        """Add (or remove) the permanent neighbour entry `address` -> `mac` on `link`."""
        with _ipr(netns) as ipr:
            index = _index(ipr, link)
            if index is not None:
                _quiet(ipr.neigh, "replace" if present else "del", dst=address, lladdr=mac,
                       ifindex=index, state=NUD_PERMANENT)

    def interface_of(self, netns: str | None, address: str) -> tuple[str, int] | None:
        """(ifname, prefix length) of the interface that holds `address`, or None."""
        with _ipr(netns) as ipr:
            for addr in ipr.get_addr(family=2, address=address):
                link = ipr.get_links(addr["index"])[0]
                return link.get("ifname"), addr["prefixlen"]
        return None

    def addresses(self, netns: str | None) -> dict[str, list[str]]:
        """ifname -> IPv4 addresses, for inspection and tests."""
        with _ipr(netns) as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            out: dict[str, list[str]] = {n: [] for n in names.values()}
            for addr in ipr.get_addr(family=2):
                out[names[addr["index"]]].append(addr.get("address"))
        return out

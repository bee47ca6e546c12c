"""The node agent: makes a host namespace match a DesiredState, level-triggered.

    agent = Agent(host_netns, Netlink(), NftCli(), Supervisor(...))
    await agent.apply(desired)    # diff against what it last applied, apply only the difference
    await agent.teardown()        # remove everything it made

The diff is computed against the state it applied last (kept in memory, never read back from the
kernel). When a step fails, the previous state is applied again, so a failed change leaves the
kernel as it was, and the error goes back to the caller.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import replace

from mesh.etcfiles import render_hosts, render_resolv_conf
from mesh.hostrules import render_delete_table, render_host_table
from mesh.netlink import Netlink
from mesh.nft import Nft
from mesh.overlay import OverlayPlan, build_overlay_plan, diff_entries, vxlan_link
from mesh.runtime import Supervisor
from mesh.state import DesiredState, EndpointState, NetworkState, TaskState

log = logging.getLogger("mesh.agent")
ETC_NETNS = "/etc/netns"


def _restart_key(t: TaskState) -> tuple:
    return (t.command, t.environment, t.hostname, t.restart, t.sandbox, t.netmode, t.workdir)


def host_resolv(host_netns: str | None) -> str:
    """The host namespace's resolv.conf text (/etc/netns/<host>/resolv.conf first, as ip netns exec)."""
    for path in ([os.path.join(ETC_NETNS, host_netns, "resolv.conf")] if host_netns else []) + \
            ["/etc/resolv.conf"]:
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    return ""


class Agent:
    def __init__(self, host_netns: str | None, netlink: Netlink, nft: Nft, supervisor: Supervisor,
                 dns=None, node: str = ""):
        self.host = host_netns
        self.node = node                 # in a cluster: this agent's node; it runs only its tasks
        self.overlay = OverlayPlan()
        self.nl = netlink
        self.nft = nft
        self.sup = supervisor
        self.dns = dns                   # a DnsAgent, or None for no embedded resolver
        self.dns_kick: asyncio.Task | None = None
        self.dns_dirty = False
        supervisor.on_change = self.kick_dns
        self.applied = DesiredState()
        self.created_host = False
        self.created_vlans: set[str] = set()
        self.lock = asyncio.Lock()

    async def apply(self, desired: DesiredState) -> None:
        async with self.lock:
            old = self.applied
            try:
                await self._apply(desired, old)
            except Exception:
                log.exception("apply failed; restoring the previous state")
                await self._apply(old, desired)
                raise
            self.applied = desired
        await self.sync_dns()

    def live_tasks(self) -> set[str]:
        """Tasks whose names resolve: all but those exited or waiting to restart (another node's
        tasks are not in this supervisor: they count as live)."""
        return {n for n in self.applied.tasks
                if self.sup.status(n)["state"] not in ("exited", "restarting")}

    async def sync_dns(self) -> None:
        if self.dns is not None:
            await self.dns.sync(self.applied, self.live_tasks())

    def kick_dns(self) -> None:
        """A task changed state: resync DNS soon; a burst of changes coalesces, none is lost."""
        self.dns_dirty = True
        if self.dns is not None and (self.dns_kick is None or self.dns_kick.done()):
            self.dns_kick = asyncio.get_running_loop().create_task(self._drain_dns())

    async def _drain_dns(self) -> None:
        while self.dns_dirty:
            self.dns_dirty = False
            try:
                await self.sync_dns()
            except Exception:
                log.exception("DNS resync failed")

    async def _apply(self, desired: DesiredState, old: DesiredState) -> None:
        mine, was_mine = desired.on_node(self.node), old.on_node(self.node)
        restart = [n for n, t in was_mine.items()
                   if n not in mine or _restart_key(t) != _restart_key(mine[n])]
        await asyncio.gather(*(self.sup.stop(n) for n in restart))
        await asyncio.to_thread(self._apply_kernel, desired, old)
        for name, task in mine.items():
            if name not in self.sup.runs:
                await self.sup.start(task)
            else:
                self.sup.runs[name].task = task

    def _apply_kernel(self, desired: DesiredState, old: DesiredState) -> None:
        if desired.networks and self.host:
            self.created_host |= self.nl.ensure_netns(self.host)
        if desired.networks and not old.networks:
            self.nl.sysctl(self.host, "net.ipv4.ip_forward", "1")
        for net in desired.networks.values():
            if old.networks.get(net.name) != net:
                self._remove_network(old.networks.get(net.name))
                self._add_network(net, desired.underlay.get(self.node))
        mine, was_mine = desired.on_node(self.node), old.on_node(self.node)
        for task in mine.values():
            self._sync_task(task, was_mine.get(task.name), desired)
        for name, task in was_mine.items():
            if name not in mine:
                self._remove_task(task)
        for name, net in old.networks.items():
            if name not in desired.networks:
                self._remove_network(net)
        self._sync_overlay(desired)
        new, before = self._local(desired), self._local(old)
        if (new.networks, new.publications) != (before.networks, before.publications):
            text = render_host_table(new) if new.networks else render_delete_table()
            if new.networks or before.networks:
                self.nft.apply(self.host, text)

    def _local(self, desired: DesiredState) -> DesiredState:
        """Published ports lead to this node's own tasks (host-mode publishing in a cluster)."""
        if not desired.underlay:
            return desired
        mine = {e.address for t in desired.on_node(self.node).values() for e in t.endpoints}
        pubs = tuple(replace(p, backends=tuple(b for b in p.backends if b in mine))
                     for p in desired.publications)
        return replace(desired, publications=pubs)

    def _sync_overlay(self, desired: DesiredState) -> None:
        """Static FDB and neighbour entries for every task of an overlay on another node."""
        vnis = {n.name: n.vni for n in desired.networks.values() if n.driver == "overlay"}
        endpoints = [(e.network, t.node, e.address) for t in desired.tasks.values() for e in t.endpoints]
        plan = build_overlay_plan(self.node, desired.underlay, vnis, endpoints) \
            if vnis and self.node in desired.underlay else OverlayPlan()
        gone_fdb, new_fdb = diff_entries(self.overlay.fdb, plan.fdb)
        gone_neigh, new_neigh = diff_entries(self.overlay.neigh, plan.neigh)
        for link, mac, remote in gone_fdb | new_fdb:
            self.nl.set_fdb(self.host, link, mac, remote, (link, mac, remote) in new_fdb)
        for link, address, mac in gone_neigh | new_neigh:
            self.nl.set_neigh(self.host, link, address, mac, (link, address, mac) in new_neigh)
        self.overlay = plan

    # -- networks -----------------------------------------------------------------------------
    def _add_network(self, net: NetworkState, underlay: str | None) -> None:
        if net.bridged:
            # an overlay's gateway address sits on every node's bridge: each node is the local
            # gateway of its own tasks (ARP for it is never sent over the VXLAN: no flooding)
            self.nl.add_bridge(self.host, net.link, net.gateway, net.prefixlen)
        if net.driver == "overlay" and underlay:
            self.nl.add_vxlan(self.host, net.link, vxlan_link(net.name, net.vni), net.vni, underlay,
                              net.mtu)
        elif net.vlan is not None and self.nl.ensure_vlan(self.host, net.parent, net.vlan):
            self.created_vlans.add(net.parent)

    def _remove_network(self, net: NetworkState | None) -> None:
        if net is None:
            return
        if net.link:
            self.nl.delete_link(self.host, net.link)
        if net.vni is not None:
            self.nl.delete_link(self.host, vxlan_link(net.name, net.vni))
        if net.parent in self.created_vlans:
            self.nl.delete_link(self.host, net.parent)
            self.created_vlans.discard(net.parent)

    # -- sandboxes and endpoints --------------------------------------------------------------
    def _sync_task(self, task: TaskState, old: TaskState | None, desired: DesiredState) -> None:
        if old and old.owns_sandbox and old.sandbox != task.sandbox:
            self._remove_task(old)
            old = None
        if not task.owns_sandbox or task.netmode == "host":
            return
        self.nl.ensure_netns(task.sandbox)
        old_eps = {e.network: e for e in old.endpoints} if old else {}
        new_eps = {e.network: e for e in task.endpoints}
        for net, ep in old_eps.items():
            if new_eps.get(net) != ep:
                self.nl.delete_link(task.sandbox, ep.ifname)
        for net, ep in new_eps.items():
            if old_eps.get(net) != ep:
                self._add_endpoint(task.sandbox, ep, desired.networks[net])
        self._write_etc(task)

    def _add_endpoint(self, sandbox: str, ep: EndpointState, net: NetworkState) -> None:
        if net.bridged:
            self.nl.add_veth_endpoint(self.host, net.link, ep.link, sandbox, ep.ifname, ep.address,
                                      ep.prefixlen, ep.default_gateway, net.mtu)
        else:
            self.nl.add_macvlan_endpoint(self.host, net.parent, ep.link, sandbox, ep.ifname,
                                         ep.address, ep.prefixlen, ep.default_gateway)

    def _write_etc(self, task: TaskState) -> None:
        folder = os.path.join(ETC_NETNS, task.sandbox)
        os.makedirs(folder, exist_ok=True)
        # written in place: running processes see the files through bind mounts of these inodes
        for name, text in (("hosts", render_hosts(task)),
                           ("resolv.conf", render_resolv_conf(host_resolv(self.host),
                                                              task.embedded_dns))):
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)

    def _remove_task(self, task: TaskState) -> None:
        if not task.owns_sandbox or not task.sandbox:
            return
        for ep in task.endpoints:
            self.nl.delete_link(self.host, ep.link)
        self.nl.delete_netns(task.sandbox)
        shutil.rmtree(os.path.join(ETC_NETNS, task.sandbox), ignore_errors=True)

    async def teardown(self) -> None:
        """Stop every process, remove every sandbox, link and table this agent made."""
        async with self.lock:
            if self.dns is not None:
                await self.dns.close()
            await self.sup.stop_all()
            await asyncio.to_thread(self._apply_kernel, DesiredState(), self.applied)
            self.applied, self.overlay = DesiredState(), OverlayPlan()
            if self.created_host and self.host:
                await asyncio.to_thread(self.nl.delete_netns, self.host)
                self.created_host = False

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

from mesh import readiness as rd
from mesh.coalesce import Coalescing
from mesh.etcfiles import render_hosts, render_resolv_conf
from mesh.hostrules import render_delete_table, render_host_table
from mesh.lb.conntrack import flush_udp_to, removed_udp_backends
from mesh.lb.dsr import NO_DSR, DsrError, DsrPlan, build_dsr, dsr_wanted, needs_plan, render_dsr
from mesh.lb.dsr import render_delete as render_dsr_delete
from mesh.lb.nftables import NftLb
from mesh.lb.plan import build_balancers, render_return_table, return_routes
from mesh.netlink import Netlink
from mesh.nft import Nft
from mesh.overlay import OverlayPlan, build_overlay_plan, diff_entries, vxlan_link
from mesh.runtime import Supervisor
from mesh.state import (INGRESS_LOCAL, INGRESS_NETWORK, INGRESS_UPLINK_NODE, INGRESS_UPLINK_PREFIX,
                        DesiredState, EndpointState, IngressState, NetworkState, TaskState)

log = logging.getLogger("mesh.agent")
ETC_NETNS = "/etc/netns"


def _udp_backends(publications) -> set[str]:
    return {b for p in publications if p.protocol == "udp" for b in p.backends}


def _dsr_udp(plan: DsrPlan | None) -> set[str]:
    return {b for p in plan.ports if p.protocol == "udp" and p.dsr for b in p.local} if plan else set()


def restart_key(t: TaskState) -> tuple:
    """What, when it changes, restarts a task's process."""
    return (t.command, t.environment, t.hostname, t.restart, t.sandbox, t.netmode, t.workdir,
            t.healthcheck)


def renewed(old: TaskState, new: TaskState, running: bool) -> bool:
    """The change starts the task anew under its name: moved to another node while it `running`
    on the old one, or restarted in place with a new definition."""
    if old.node != new.node:
        return running
    return restart_key(old) != restart_key(new)


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
                 dns=None, node: str = "", lb=None):
        self.host = host_netns
        self.lb = lb if lb is not None else NftLb(nft)   # a mesh.lb LoadBalancer
        self.lb_tables: dict = {}        # namespace -> the Table last given to self.lb
        self.host_text: str | None = None    # the host table last applied
        self.host_pubs: tuple = ()           # its publications
        self.dsr: DsrPlan | None = None      # mesh.lb.dsr's plan applied with it (None: unknown)
        self.returns: dict = {}          # task -> ReturnRoutes applied in its sandbox
        # () -> Readiness cluster-wide: in a cluster its NodeAgent gives it its own tasks' and the
        # other nodes' reports (mesh.nodeagent); alone, tasks of other nodes count as ready
        self.readiness = self.default_readiness
        self.node = node                 # in a cluster: this agent's node; it runs only its tasks
        self.overlay = OverlayPlan()
        # tasks this node's balancers and DNS send new connections to, as of its last data-plane
        # sync (ready, listening on every published TCP target, not draining); on_synced() is
        # called after each sync (a NodeAgent reports the set: `mesh up` waits for every node's)
        self.balanced: frozenset[str] = frozenset()
        self.on_synced = None
        self.nl = netlink
        self.nft = nft
        self.sup = supervisor
        self.dns = dns                   # a DnsAgent, or None for no embedded resolver
        self.resyncs = Coalescing(self.sync_dataplane, "data-plane resync")
        self.relisten: asyncio.TimerHandle | None = None
        self.poll_delay = 0.1
        supervisor.on_change = self.kick
        self.applied = DesiredState()
        self.created_host = False
        # a file that remembers, across a killed daemon, that this agent made its host namespace
        # (mesh.sweep then removes it too); None: nothing to remember (a lab's node agents)
        self.made_marker: str | None = None
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
        try:
            await self.sync_dataplane()
        except Exception:        # the change is made; DNS or a balancer lags: retried on the next kick
            log.exception("data-plane sync after a change failed")
            self.kick()

    # -- who takes traffic ----------------------------------------------------------------------
    def own_readiness(self) -> rd.Readiness:
        """This node's tasks: alive = the process runs; ready = alive and healthy if checked; the
        published TCP ports a ready task does not listen on yet (mesh.readiness)."""
        return rd.own_readiness(self.applied, self.node, self.sup)

    def default_readiness(self) -> rd.Readiness:
        others = {n for n, t in self.applied.tasks.items() if t.node != self.node}
        return self.own_readiness().merge(rd.Readiness(set(others), set(others)))

    async def sync_dataplane(self) -> None:
        """DNS, balancers and the host's published ports follow the tasks' readiness."""
        async with self.lock:
            readiness, applied = self.readiness(), self.applied
            if await asyncio.to_thread(self._sync_lb, applied, readiness):
                # under the lock: a later sync, with newer readiness, sets it after this one
                self.balanced = frozenset(n for n in applied.tasks if n in readiness.ready and
                                          n not in readiness.missing and n not in applied.draining)
        if self.dns is not None:     # names resolve for ready tasks that are not draining
            await self.dns.sync(applied, readiness.ready - applied.draining)
        if self.on_synced is not None:
            self.on_synced()
        # a task of this node not listening yet in this very snapshot: look again soon
        waiting = any(n in readiness.missing for n in applied.on_node(self.node))
        if waiting:
            self._poll_soon()
        else:
            self.poll_delay = 0.1

    def _poll_soon(self) -> None:
        """Some task runs but does not listen yet: look again soon (0.1 s, backing off to 1 s)."""
        if self.relisten is None:
            loop = asyncio.get_running_loop()
            self.relisten = loop.call_later(self.poll_delay, self._relisten)
            self.poll_delay = min(self.poll_delay * 1.5, 1.0)

    def _relisten(self) -> None:
        self.relisten = None
        self.sup.on_change()     # as a task state change: a resync (and, on a store, a report)

    def kick(self) -> None:
        """A task changed state: resync soon; a burst of changes coalesces, none is lost."""
        self.resyncs.kick()

    def resync_lb(self) -> None:
        """The periodic repair: every balancer rewritten whole from memory (worker thread)."""
        for netns in self.lb.namespaces():
            try:
                self.lb.resync(netns)
            except Exception:
                log.exception("load-balancer resync of %s failed", netns)

    def _sync_lb(self, desired: DesiredState, readiness: rd.Readiness) -> bool:
        """Every balancer of this node, then the host table; one namespace failing (logged, and
        repaired by the next sync or resync) does not hold the others back. True when every
        balancer took its table."""
        tables = build_balancers(desired, self.node, readiness)
        for netns in [n for n in self.lb_tables if n not in tables]:
            self._quietly(self._forget_balancer, netns)
        complete = True
        for netns, table in tables.items():
            old = self.lb_tables.get(netns, {})
            if self._quietly(self.lb.apply, netns, table):
                self.lb_tables[netns] = table
                gone = removed_udp_backends(old, table)
                if gone:
                    self._quietly(flush_udp_to, netns, gone)
            else:
                complete = False
        self._sync_host_table(desired, readiness)
        return complete

    @staticmethod
    def _quietly(call, *args) -> bool:
        try:
            call(*args)
            return True
        except Exception:
            log.exception("%s%s failed", getattr(call, "__name__", call), args[:1])
            return False

    def _sync_host_table(self, desired: DesiredState, readiness: rd.Readiness) -> None:
        view = self._local(desired, readiness)
        dsr = self._dsr_plan(desired, readiness) if view.networks else None
        if view.networks:
            text = render_host_table(view, dsr) + render_dsr(dsr, self.dsr)
        else:
            text = render_delete_table() + render_dsr_delete() if self.host_text is not None \
                else None
        if text is not None and text != self.host_text:
            self.nft.apply(self.host, text)
            gone = (_udp_backends(self.host_pubs) | _dsr_udp(self.dsr)) - (
                _udp_backends(view.publications) | _dsr_udp(dsr))
            if gone:         # flows DNAT'd to a backend that left go to one that is there
                self._quietly(flush_udp_to, self.host, gone)
        self.host_text = text if view.networks else None
        self.host_pubs = view.publications
        self.dsr = (dsr or NO_DSR) if view.networks else None

    def _dsr_plan(self, desired: DesiredState, readiness: rd.Readiness) -> DsrPlan | None:
        """How this cluster node treats packets of ingress-mode ports arriving on its underlay
        device (mesh.lb.dsr): hand DSR ones over, DNAT those handed to it, never loop."""
        if not needs_plan(desired, self.node):
            return None
        address = desired.underlay[self.node]
        where = self.nl.interface_of(self.host, address)     # looked up anew: devices change
        if where is None:
            if dsr_wanted(desired):
                raise DsrError(f"x-mesh ingress: dsr: node {self.node}'s address {address} is on "
                               "none of its interfaces")
            return None
        return build_dsr(desired, self.node, readiness, *where)

    async def _apply(self, desired: DesiredState, old: DesiredState) -> None:
        mine, was_mine = desired.on_node(self.node), old.on_node(self.node)
        restart = [n for n, t in was_mine.items()
                   if n not in mine or restart_key(t) != restart_key(mine[n])]
        await asyncio.gather(*(self.sup.stop(n) for n in restart))
        await asyncio.to_thread(self._apply_kernel, desired, old)
        for name, task in mine.items():
            if name not in self.sup.runs:
                await self.sup.start(task)
            else:
                self.sup.runs[name].task = task

    def _apply_kernel(self, desired: DesiredState, old: DesiredState) -> None:
        if self.host and not desired.networks and not self.nl.netns_exists(self.host):
            self._host_gone(old)
            return
        if desired.networks and self.host:
            if self.nl.ensure_netns(self.host):
                self.created_host = True
                self._remember_made_host(True)
        if desired.networks and not old.networks:
            self.nl.sysctl(self.host, "net.ipv4.ip_forward", "1")
        for net in desired.networks.values():
            if old.networks.get(net.name) != net:
                self._remove_network(old.networks.get(net.name))
                self._add_network(net, desired.underlay.get(self.node))
        new_ing, old_ing = desired.ingress.get(self.node), old.ingress.get(self.node)
        if old_ing is not None and old_ing != new_ing:
            self._remove_ingress(old_ing)
        if new_ing is not None and new_ing != old_ing:
            self._add_ingress(new_ing, desired.networks[INGRESS_NETWORK])
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
        self._sync_host_table(desired, self.readiness())

    def _host_gone(self, old: DesiredState) -> None:
        """Everything goes and the host namespace was removed under us (its links and tables went
        with it): only the sandboxes and the ingress namespace are left to remove."""
        log.warning("host namespace %s is gone: removing the namespaces left", self.host)
        ing = old.ingress.get(self.node)
        for netns in [t.sandbox for t in old.on_node(self.node).values()
                      if t.owns_sandbox and t.sandbox] + ([ing.sandbox] if ing else []):
            self._forget_balancer(netns)
            if self.nl.netns_exists(netns):
                self.nl.delete_netns(netns)
        self.host_text, self.dsr, self.overlay = None, None, OverlayPlan()

    def _local(self, desired: DesiredState, readiness: rd.Readiness) -> DesiredState:
        """The host table's view: published ports lead to tasks that take connections on them; in
        a cluster, host-mode ports to this node's own tasks and ingress-mode ports to this node's
        ingress namespace."""
        tasks = desired.on_node(self.node).values() if desired.underlay else desired.tasks.values()
        ingress = desired.ingress.get(self.node)
        pubs = []
        for p in desired.publications:
            if ingress is not None and p.mode == "ingress":
                pubs.append(replace(p, backends=(INGRESS_LOCAL,), target=p.published))
                continue
            taking = {e.address for t in tasks if t.service == p.service
                      and t.name not in desired.draining and readiness.takes(t.name, p.target)
                      for e in t.endpoints}
            pubs.append(replace(p, backends=tuple(b for b in p.backends if b in taking)))
        nets = {n: net for n, net in desired.networks.items() if not net.ingress}
        return replace(desired, publications=tuple(pubs), networks=nets)

    def _sync_overlay(self, desired: DesiredState) -> None:
        """Static FDB and neighbour entries for every task of an overlay on another node."""
        vnis = {n.name: n.vni for n in desired.networks.values() if n.driver == "overlay"}
        endpoints = [(e.network, t.node, e.address) for t in desired.tasks.values() for e in t.endpoints]
        endpoints += [(INGRESS_NETWORK, i.node, i.address) for i in desired.ingress.values()]
        plan = build_overlay_plan(self.node, desired.underlay, vnis, endpoints) \
            if vnis and self.node in desired.underlay else OverlayPlan()
        gone_fdb, new_fdb = diff_entries(self.overlay.fdb, plan.fdb)
        gone_neigh, new_neigh = diff_entries(self.overlay.neigh, plan.neigh)
        # written first, each in place of its key's entry: a task moved to another node (same
        # address, same MAC) is never without an entry, which would drop its frames
        for link, mac, remote in new_fdb:
            self.nl.set_fdb(self.host, link, mac, remote, True)
        for link, address, mac in new_neigh:
            self.nl.set_neigh(self.host, link, address, mac, True)
        for link, mac, remote in gone_fdb:
            self.nl.set_fdb(self.host, link, mac, remote, False)
        for link, address, mac in gone_neigh:
            self.nl.set_neigh(self.host, link, address, mac, False)
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

    # -- the ingress namespace ----------------------------------------------------------------
    def _add_ingress(self, ing: IngressState, net: NetworkState) -> None:
        """On the ingress overlay (eth0) and joined to the node by a routed veth pair (eth1)."""
        self.nl.ensure_netns(ing.sandbox)
        self.nl.add_veth_endpoint(self.host, net.link, ing.link, ing.sandbox, "eth0", ing.address,
                                  ing.prefixlen, None, net.mtu)
        self.nl.add_uplink(self.host, ing.uplink, INGRESS_UPLINK_NODE, ing.sandbox, "eth1",
                           INGRESS_LOCAL, INGRESS_UPLINK_PREFIX)
        self.nl.sysctl(ing.sandbox, "net.ipv4.ip_forward", "1")

    def _forget_balancer(self, netns: str) -> None:
        """Drop a namespace's balancer (its namespace goes, or it balances nothing any more), so
        a namespace made again under that name starts clean."""
        if self.lb_tables.pop(netns, None) is not None:
            self.lb.forget(netns)

    def _remove_ingress(self, ing: IngressState) -> None:
        self._forget_balancer(ing.sandbox)
        self.nl.delete_link(self.host, ing.uplink)
        self.nl.delete_link(self.host, ing.link)
        self.nl.delete_netns(ing.sandbox)

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
                if desired.networks.get(net) is None or desired.networks[net].ingress:
                    self.returns.pop(task.name, None)    # its routes went with the interface
        for net, ep in new_eps.items():
            if old_eps.get(net) != ep:
                self._add_endpoint(task.sandbox, ep, desired.networks[net])
        self._sync_return_routes(task, desired)
        self._write_etc(task)

    def _sync_return_routes(self, task: TaskState, desired: DesiredState) -> None:
        """Replies to clients of the routing mesh go back through the ingress namespace that sent
        the request (the client's address is kept; mesh.lb.plan.return_routes)."""
        new, old = return_routes(desired, task), self.returns.pop(task.name, None)
        if new == old and new is not None:
            self.returns[task.name] = new
            return
        if new is None and old is None:
            return
        if new is not None:      # replies come in on the ingress interface from anywhere
            self.nl.sysctl(task.sandbox, "net.ipv4.conf.all.rp_filter", "0")
            self.nl.sysctl(task.sandbox, f"net.ipv4.conf.{new.ifname}.rp_filter", "0")
        self.nft.apply(task.sandbox, render_return_table(new))
        ifname = (new or old).ifname
        self.nl.set_policy_routes(task.sandbox, ifname, new.routes if new else (),
                                  old.routes if old else ())
        if new is not None:
            self.returns[task.name] = new

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
        self.returns.pop(task.name, None)
        if not task.owns_sandbox or not task.sandbox:
            return
        self._forget_balancer(task.sandbox)
        for ep in task.endpoints:
            self.nl.delete_link(self.host, ep.link)
        self.nl.delete_netns(task.sandbox)
        shutil.rmtree(os.path.join(ETC_NETNS, task.sandbox), ignore_errors=True)

    def _teardown_kernel(self) -> None:
        for netns in list(self.lb_tables):
            self._forget_balancer(netns)
        self._apply_kernel(DesiredState(), self.applied)

    async def teardown(self) -> None:
        """Stop every process, remove every sandbox, link and table this agent made."""
        async with self.lock:
            if self.dns is not None:
                await self.dns.close()
            await self.sup.stop_all()
            await asyncio.to_thread(self._teardown_kernel)
            self.applied, self.overlay = DesiredState(), OverlayPlan()
            if self.created_host and self.host:
                await asyncio.to_thread(self.nl.delete_netns, self.host)
                self.created_host = False
                self._remember_made_host(False)

    def _remember_made_host(self, made: bool) -> None:
        if self.made_marker is None:
            return
        if made:
            os.makedirs(os.path.dirname(self.made_marker), exist_ok=True)
            open(self.made_marker, "w").close()
        elif os.path.exists(self.made_marker):
            os.unlink(self.made_marker)

"""The manager's allocation, pure: Stack + what was allocated before -> DesiredState.

    desired = build_desired(stack, previous, routes=[...], host_netns="mesh-h1", hostname_of_host="h")

Addresses, published ports and task ids stay as they were for tasks that already existed, so
re-applying a stack changes nothing that did not change. Every failure is an AllocationError naming
the network, service or address at fault; nothing is half-built because this code only computes.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, ip_address, ip_network

from mesh import names
from mesh.errors import AllocationError
from mesh.ipam import AddressPool, check_subnet, default_gateway, pick_subnet
from mesh.links import build_link_env, build_link_hosts
from mesh.model import DEFAULT_BRIDGE, Network, Service, Stack
from mesh.overlay import VXLAN_OVERHEAD
from mesh.state import (INGRESS_NETWORK, DesiredState, EndpointState, IngressState, NetworkState,
                        Publication, TaskState, publish_address)

PORT_RANGE = range(30000, 32768)
VNI_BASE = 4096
UNDERLAY_MTU = 1500


@dataclass(frozen=True)
class ClusterPlacement:
    """Where the scheduler put each task, for a cluster-wide allocation (None = a single host)."""
    node_netns: dict[str, str]                        # node -> its agent's host namespace
    underlay: dict[str, str]                          # node -> underlay address
    tasks: tuple[tuple[str, int, str, str], ...]      # (service, slot, task, node)
    pending: tuple[tuple[str, str, str], ...] = ()    # (service, task, reason)


def build_desired(stack: Stack, previous: DesiredState, routes: list[IPv4Network],
                  host_netns: str | None,
                  connections: tuple[tuple[str, str], ...] = (),
                  disconnections: tuple[tuple[str, str], ...] = (),
                  cluster: ClusterPlacement | None = None) -> DesiredState:
    if INGRESS_NETWORK in stack.networks:
        raise AllocationError(f"networks.{INGRESS_NETWORK}: the name '{INGRESS_NETWORK}' is reserved "
                              f"for the cluster's routing mesh (ports published in ingress mode)")
    if cluster is None:
        _check_host_ports_alone(stack)
    networks = _build_networks(stack, previous, routes, host_netns, cluster is not None)
    if cluster and _wants_ingress(stack):
        networks = _with_ingress_network(stack, networks, previous, routes, host_netns)
    pools = _pools(networks, previous)
    names_ = [(s, slot, t) for s, slot, t, _ in cluster.tasks] if cluster else _task_names(stack)
    node_of = {t: n for _, _, t, n in cluster.tasks} if cluster else {}
    host_of = (lambda task: cluster.node_netns[node_of[task]]) if cluster else (lambda task: host_netns)
    _check_runtime_changes(names_, networks, connections, disconnections)
    plans = {task: (stack.services[svc], slot,
                    _attachments(stack.services[svc], task, networks, connections, disconnections))
             for svc, slot, task in names_ if not _shares_sandbox(stack.services[svc])}
    kept = _reserve_known(plans, previous, pools)
    ingress = _ingress(cluster, networks, pools, previous) if INGRESS_NETWORK in networks else {}
    vips = _vips(stack, networks, pools, previous)
    tasks: dict[str, TaskState] = {}
    for task_name, (svc, slot, attach) in plans.items():
        old = previous.tasks.get(task_name)
        endpoints = _endpoints(task_name, attach, old, kept, networks, pools, host_of(task_name))
        tasks[task_name] = replace(_task(stack, svc, slot, task_name, old, endpoints, host_of(task_name)),
                                   node=node_of.get(task_name, ""))
    for svc_name, slot, task_name in names_:
        svc = stack.services[svc_name]
        if task_name not in tasks:
            tasks[task_name] = _shared_task(stack, svc, slot, task_name, tasks, previous, names_)
    tasks = {n: _with_links(t, stack, tasks, names_) for n, t in sorted(tasks.items(), key=_order(names_))}
    pubs = _publications(stack, tasks, networks, previous, names_)
    return DesiredState(stack.name, networks, tasks, pubs, connections, disconnections, vips,
                        dict(stack.services), dict(cluster.underlay) if cluster else {},
                        cluster.pending if cluster else (), ingress,
                        allocated={n: str(p.last) for n, p in pools.items() if p.last is not None})


def _check_host_ports_alone(stack: Stack) -> None:
    """Services may share a host-mode port in a cluster (their tasks go to different nodes); on a
    single host every task runs here, so they may not."""
    first: dict[tuple[int, str], str] = {}
    for svc in stack.services.values():
        for p in svc.ports:
            if p.mode != "host" or not p.published:
                continue
            other = first.setdefault((p.published, p.protocol), svc.name)
            if other != svc.name:
                raise AllocationError(
                    f"services.{svc.name}.ports: port {p.published}/{p.protocol} is published in host "
                    f"mode by services.{other} too; services share a host-mode port only in a cluster, "
                    f"where their tasks run on different nodes")


def _ingress_ports(svc: Service) -> bool:
    return any(p.mode == "ingress" for p in svc.ports)


def _wants_ingress(stack: Stack) -> bool:
    return any(_ingress_ports(s) for s in stack.services.values())


def _with_ingress_network(stack: Stack, networks, previous: DesiredState, routes,
                          host_netns: str | None) -> dict[str, NetworkState]:
    """The routing mesh's overlay: no gateway (nothing routes through it), no names, its own VNI."""
    taken = {n: ip_network(net.subnet) for n, net in networks.items()}
    state = _network_state(Network(INGRESS_NETWORK, driver="overlay"),
                           previous.networks.get(INGRESS_NETWORK), taken, routes, host_netns, True)
    out = dict(networks)
    out[INGRESS_NETWORK] = replace(state, gateway=None, ingress=True)
    return _with_vnis(out, previous)


def _ingress(cluster: ClusterPlacement, networks, pools, previous: DesiredState) -> dict:
    """One ingress namespace per node, each keeping the ingress address it had."""
    net, pool = networks[INGRESS_NETWORK], pools[INGRESS_NETWORK]
    addresses = {}
    for node in cluster.node_netns:
        old = previous.ingress.get(node)
        if old and pool.is_free(old.address):
            addresses[node] = str(pool.reserve(old.address))
    out = {}
    for node, node_netns in cluster.node_netns.items():
        sandbox = names.sandbox_netns(node_netns, INGRESS_NETWORK)
        address = addresses.get(node) or str(pool.allocate())
        out[node] = IngressState(node, sandbox, address, net.prefixlen,
                                 names.veth_link(sandbox, INGRESS_NETWORK), names.uplink_link(sandbox))
    return out


def _shares_sandbox(svc: Service) -> bool:
    return bool(svc.network_mode) and svc.network_mode.split(":")[0] in ("container", "service")


def _order(names_):
    rank = {task: i for i, (_, _, task) in enumerate(names_)}
    return lambda item: rank[item[0]]


def _reserve_known(plans, previous: DesiredState, pools) -> dict[tuple[str, str], str]:
    """Static addresses first, then the addresses tasks already had: a new task never takes them."""
    kept: dict[tuple[str, str], str] = {}
    for task, (svc, _, attach) in plans.items():
        static = {a.network: a.ipv4_address for a in svc.networks if a.ipv4_address}
        for net, _ in attach:
            if net in static:
                where = f"services.{svc.name}.networks.{net}.ipv4_address"
                kept[(task, net)] = str(pools[net].reserve(static[net], where))
    for task, (_, _, attach) in plans.items():
        old = previous.tasks.get(task)
        old_eps = {e.network: e.address for e in old.endpoints} if old else {}
        for net, _ in attach:
            address = old_eps.get(net)
            if (task, net) not in kept and address and pools[net].is_free(address):
                kept[(task, net)] = str(pools[net].reserve(address))
    return kept


def _vips(stack: Stack, networks, pools, previous: DesiredState) -> tuple[tuple[str, str, str], ...]:
    """One virtual IP per service (endpoint_mode vip) per user-defined network it is attached to."""
    old = {(s, n): a for s, n, a in previous.vips}
    wanted = [(svc.name, a.network) for svc in stack.services.values()
              if svc.endpoint_mode == "vip" and not svc.network_mode for a in svc.networks
              if not networks[a.network].builtin]
    chosen = {key: str(pools[key[1]].reserve(old[key])) for key in wanted
              if key in old and pools[key[1]].is_free(old[key])}
    return tuple((s, n, chosen.get((s, n)) or str(pools[n].allocate())) for s, n in wanted)


def _build_networks(stack: Stack, previous: DesiredState, routes: list[IPv4Network],
                    host_netns: str | None, cluster: bool = False) -> dict[str, NetworkState]:
    out: dict[str, NetworkState] = {}
    taken: dict[str, IPv4Network] = {}
    wanted = [Network(DEFAULT_BRIDGE)] + [n for n in stack.networks.values()
                                          if n.name != DEFAULT_BRIDGE]
    for net in wanted:
        if net.external:
            raise AllocationError(f"networks.{net.name}: external network '{net.name}' does not exist "
                                  f"(the predefined networks are bridge, host and none)")
    for net in sorted(wanted, key=lambda n: not any(c.subnet for c in n.ipam)):
        if cluster and net.driver == "bridge" and net.name != DEFAULT_BRIDGE:
            net = replace(net, driver="overlay")       # a stack's networks span the cluster
        old = previous.networks.get(net.name)
        out[net.name] = _network_state(net, old, taken, routes, host_netns, cluster)
        taken[net.name] = ip_network(out[net.name].subnet)
    return _with_vnis({n.name: out[n.name] for n in wanted}, previous)


def _with_vnis(networks: dict[str, NetworkState], previous: DesiredState) -> dict[str, NetworkState]:
    """Overlay networks keep their VNI; new ones take the lowest free one from 4096 up."""
    kept = {n: previous.networks[n].vni for n, net in networks.items()
            if net.driver == "overlay" and n in previous.networks and previous.networks[n].vni}
    used, out = set(kept.values()), {}
    for name, net in networks.items():
        if net.driver == "overlay":
            vni = kept.get(name) or next(v for v in range(VNI_BASE, 1 << 24) if v not in used)
            used.add(vni)
            net = replace(net, vni=vni, mtu=UNDERLAY_MTU - VXLAN_OVERHEAD)
        out[name] = net
    return out


def _network_state(net: Network, old: NetworkState | None, taken: dict[str, IPv4Network],
                   routes: list[IPv4Network], host_netns: str | None,
                   cluster: bool = False) -> NetworkState:
    cfg = net.ipam[0] if net.ipam else None
    if cfg and cfg.subnet:
        subnet = ip_network(cfg.subnet)
        check_subnet(net.name, subnet, taken, routes)
    elif old and not any(ip_network(old.subnet).overlaps(t) for t in taken.values()):
        subnet = ip_network(old.subnet)
    else:
        subnet = pick_subnet(list(taken.values()), routes)
    gateway = str(cfg.gateway) if cfg and cfg.gateway else str(default_gateway(subnet))
    parent = net.driver_opts.get("parent") if net.driver == "macvlan" else None
    vlan = None
    if parent and "." in parent:
        base, _, tag = parent.rpartition(".")
        if not tag.isdigit() or not 1 <= int(tag) <= 4094 or not base:
            raise AllocationError(f"networks.{net.name}.driver_opts.parent: '{parent}' is not NAME.VLAN "
                                  f"with a VLAN id from 1 to 4094")
        if len(parent) > names.IFNAME_MAX:
            raise AllocationError(f"networks.{net.name}.driver_opts.parent: '{parent}' is longer than "
                                  f"{names.IFNAME_MAX} characters, the kernel's limit")
        vlan = int(tag)
    if net.driver == "overlay" and not cluster:
        raise AllocationError(f"networks.{net.name}.driver: overlay networks need a cluster "
                              f"(mesh up --nodes N); a single host supports bridge and macvlan")
    return NetworkState(
        name=net.name, driver=net.driver, subnet=str(subnet), gateway=gateway,
        ip_range=cfg.ip_range if cfg else None, internal=net.internal,
        builtin=net.name == DEFAULT_BRIDGE,
        link=names.bridge_link(host_netns, net.name) if net.driver in ("bridge", "overlay") else None,
        parent=parent, vlan=vlan)


def _pools(networks: dict[str, NetworkState], previous: DesiredState) -> dict[str, AddressPool]:
    out = {}
    for n in networks.values():
        gw = ip_address(n.gateway) if n.gateway and n.bridged else None
        out[n.name] = AddressPool(n.name, ip_network(n.subnet), gw,
                                  ip_network(n.ip_range) if n.ip_range else None,
                                  previous.allocated.get(n.name))
        if n.gateway and n.driver == "macvlan":
            out[n.name].used.add(ip_address(n.gateway))
    return out


def _task_names(stack: Stack) -> list[tuple[str, int, str]]:
    out, seen = [], {}
    for svc in stack.services.values():
        count = 1 if svc.mode == "global" else svc.replicas
        for slot in range(1, count + 1):
            name = svc.container_name or f"{svc.name}.{slot}"
            if name in seen:
                raise AllocationError(f"services.{svc.name}: task name '{name}' is also used by "
                                      f"service '{seen[name]}'")
            seen[name] = svc.name
            out.append((svc.name, slot, name))
    return out


def _check_runtime_changes(names_, networks, connections, disconnections) -> None:
    tasks = {t for _, _, t in names_}
    for task, net in connections + disconnections:
        if task not in tasks:
            continue            # the task left the stack; its runtime change goes with it
        if net not in networks:
            raise AllocationError(f"network '{net}' does not exist (mesh network ls)")


def _attachments(svc: Service, task: str, networks, connections, disconnections) -> list:
    mode = svc.network_mode
    if mode in ("host", "none"):
        attach = []
    elif mode == DEFAULT_BRIDGE:
        attach = [(DEFAULT_BRIDGE, ())]
    else:
        attach = [(a.network, a.aliases) for a in svc.networks]
    attach += [(net, ()) for t, net in connections if t == task and
               net not in [a for a, _ in attach]]
    if INGRESS_NETWORK in networks and _ingress_ports(svc) and mode not in ("host", "none"):
        attach.append((INGRESS_NETWORK, ()))     # the routing mesh reaches the task on it
    return [(net, aliases) for net, aliases in attach if (task, net) not in disconnections]


def _endpoints(task: str, attach, old: TaskState | None, kept, networks, pools,
               host_netns: str | None) -> tuple[EndpointState, ...]:
    sandbox = names.sandbox_netns(host_netns, task)
    old_eps = {e.network: e for e in old.endpoints} if old else {}
    used_if = {old_eps[n].ifname for n, _ in attach if n in old_eps}
    out = []
    for net_name, aliases in attach:
        net = networks[net_name]
        address = kept.get((task, net_name)) or str(pools[net_name].allocate())
        prev = old_eps.get(net_name)
        ifname = prev.ifname if prev else _free_ifname(used_if)
        used_if.add(ifname)
        link = (names.macvlan_link if net.driver == "macvlan" else names.veth_link)(sandbox, net_name)
        out.append(EndpointState(net_name, ifname, address, net.prefixlen, link, tuple(aliases)))
    return _with_default_route(sorted(out, key=lambda e: int(e.ifname[3:])), networks)


def _free_ifname(used: set[str]) -> str:
    index = 0
    while names.container_ifname(index) in used:
        index += 1
    return names.container_ifname(index)


def _with_default_route(eps: list[EndpointState], networks) -> tuple[EndpointState, ...]:
    out, done = [], False
    for e in eps:
        net = networks[e.network]
        if not done and not net.internal and net.gateway:
            e = EndpointState(e.network, e.ifname, e.address, e.prefixlen, e.link, e.aliases, net.gateway)
            done = True
        out.append(e)
    return tuple(out)


def _task(stack: Stack, svc: Service, slot: int, task: str, old: TaskState | None,
          endpoints, host_netns: str | None) -> TaskState:
    tid = old.id if old else names.task_id(stack.name, task, secrets.token_hex(8))
    host = svc.network_mode == "host"
    return TaskState(
        name=task, id=tid, service=svc.name, slot=slot,
        netmode="host" if host else ("none" if svc.network_mode == "none" else "sandbox"),
        sandbox=None if host else names.sandbox_netns(host_netns, task), owns_sandbox=not host,
        hostname=svc.hostname or ("" if host else names.short_id(tid)),
        command=svc.command, environment=tuple(sorted(svc.environment.items())),
        restart=svc.restart, workdir=stack.directory, endpoints=endpoints,
        embedded_dns=any(e.network not in (DEFAULT_BRIDGE, INGRESS_NETWORK) for e in endpoints),
        healthcheck=svc.healthcheck)


def _shared_task(stack, svc: Service, slot, task, tasks, previous, names_) -> TaskState:
    kind, _, target = svc.network_mode.partition(":")
    if kind == "service":
        target = next(t for s, sl, t in names_ if s == target and sl == 1) \
            if any(s == target for s, _, _ in names_) else ""
    owner = tasks.get(target)
    if owner is None or owner.netmode == "container":
        raise AllocationError(f"services.{svc.name}.network_mode: '{svc.network_mode}' names no "
                              f"running task with its own network stack")
    old = previous.tasks.get(task)
    tid = old.id if old else names.task_id(stack.name, task, secrets.token_hex(8))
    return TaskState(
        name=task, id=tid, service=svc.name, slot=slot, netmode="container",
        sandbox=owner.sandbox, owns_sandbox=False, hostname=svc.hostname or owner.hostname,
        command=svc.command, environment=tuple(sorted(svc.environment.items())),
        restart=svc.restart, workdir=stack.directory, embedded_dns=owner.embedded_dns,
        healthcheck=svc.healthcheck)


def _with_links(task: TaskState, stack: Stack, tasks: dict[str, TaskState], names_) -> TaskState:
    svc = stack.services[task.service]
    if not svc.links:
        return task
    env = dict(task.environment)
    env.update(build_link_env(task, svc, stack, tasks, names_))
    hosts = build_link_hosts(task, svc, tasks, names_)
    return TaskState(**{**task.__dict__, "environment": tuple(sorted(env.items())), "hosts": hosts})


def _publications(stack: Stack, tasks, networks, previous: DesiredState, names_) -> tuple:
    old = {p.key: p.published for p in previous.publications}
    taken = {(p.protocol, p.published) for svc in stack.services.values()
             for p in svc.ports if p.published}
    out = []
    for svc in stack.services.values():
        if not svc.ports:
            continue
        for i, port in enumerate(svc.ports):
            mesh_ = port.mode == "ingress" and INGRESS_NETWORK in networks
            backends = tuple(_publish_address(tasks[t], networks, svc, mesh_)
                             for s, _, t in names_ if s == svc.name)
            key = f"{svc.name}/{i}"
            published = port.published or _pick_port(old.get(key), port.protocol, taken)
            taken.add((port.protocol, published))
            out.append(Publication(svc.name, published, port.target, port.protocol, port.host_ip,
                                   backends, key, port.mode))
    return tuple(out)


def _publish_address(task: TaskState, networks, svc: Service, ingress: bool = False) -> str:
    address = publish_address(task, networks, ingress)
    if address is not None:
        return address
    raise AllocationError(f"services.{svc.name}.ports: publishing a port needs the service on a "
                          f"bridge network that is not internal")


def _pick_port(previous: int | None, protocol: str, taken: set) -> int:
    if previous and (protocol, previous) not in taken:
        return previous
    for port in PORT_RANGE:
        if (protocol, port) not in taken:
            return port
    raise AllocationError(f"no free {protocol} port left in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")

"""The allocated, desired state of one host: what the agent makes real. Pure data, standard library.

mesh.allocator builds it from a Stack; mesh.agent diffs it against what it last applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mesh.model import Healthcheck, Service


@dataclass(frozen=True)
class NetworkState:
    name: str
    driver: str                      # "bridge" | "macvlan"
    subnet: str
    gateway: str | None
    ip_range: str | None = None
    internal: bool = False
    builtin: bool = False            # the default bridge: no embedded DNS
    link: str | None = None          # bridge link in the host namespace
    parent: str | None = None        # macvlan parent interface
    vlan: int | None = None          # set when mesh creates `parent` as a VLAN sub-interface
    vni: int | None = None           # overlay networks: the VXLAN network identifier
    mtu: int | None = None           # overlay networks: underlay MTU - 50
    ingress: bool = False            # the cluster's routing-mesh network: no names, no VIPs

    @property
    def bridged(self) -> bool:
        """A Linux bridge on the host carries it (bridge, and overlay with a VXLAN port)."""
        return self.driver in ("bridge", "overlay")

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.split("/")[1])


@dataclass(frozen=True)
class EndpointState:
    network: str
    ifname: str                      # eth0, eth1... inside the sandbox
    address: str
    prefixlen: int
    link: str                        # veth host side (bridge) or transient macvlan name
    aliases: tuple[str, ...] = ()
    default_gateway: str | None = None   # set on the one endpoint that carries the default route


@dataclass(frozen=True)
class TaskState:
    name: str
    id: str
    service: str
    slot: int
    netmode: str                     # "sandbox" | "host" | "none" | "container"
    sandbox: str | None              # netns the process runs in; None = the host namespace
    owns_sandbox: bool               # False for host mode and container:/service: modes
    hostname: str
    command: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    restart: str = "no"
    workdir: str = ""                # the process's working directory (the stack file's folder)
    endpoints: tuple[EndpointState, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()      # extra /etc/hosts lines: (address, names)
    embedded_dns: bool = False       # on a user-defined network: served by the embedded resolver
    node: str = ""                   # the node it runs on ("" on a single host)
    healthcheck: Healthcheck | None = None       # the service's; probed while the task runs


@dataclass(frozen=True)
class Publication:
    """A published port: host port -> target port on one or more task addresses."""
    service: str
    published: int
    target: int
    protocol: str
    host_ip: str | None
    backends: tuple[str, ...]
    key: str                         # stable identity for re-allocation: "service/index"
    mode: str = "ingress"            # "ingress": every node answers (in a cluster, through its
    #                                  ingress namespace); "host": only nodes running a task


@dataclass(frozen=True)
class IngressState:
    """One node's ingress namespace: on the `ingress` overlay, joined to the node by a veth pair.
    The node DNATs an ingress-mode published port to `local`; the namespace balances it to the
    service's tasks over the ingress network (mesh.lb.plan)."""
    node: str
    sandbox: str                     # the namespace
    address: str                     # its address on the ingress network
    prefixlen: int
    link: str                        # veth host side on the node's ingress bridge
    uplink: str                      # veth node side of the node <-> ingress namespace pair


INGRESS_NETWORK = "ingress"
INGRESS_UPLINK_NODE = "169.254.97.1"     # the node's end of the node <-> ingress namespace pair
INGRESS_LOCAL = "169.254.97.2"           # the ingress namespace's end: published ports go here
INGRESS_UPLINK_PREFIX = 30


@dataclass(frozen=True)
class DesiredState:
    stack: str = ""
    networks: dict[str, NetworkState] = field(default_factory=dict)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    publications: tuple[Publication, ...] = ()
    connections: tuple[tuple[str, str], ...] = ()      # (task, network) added at run time
    disconnections: tuple[tuple[str, str], ...] = ()   # (task, network) removed at run time
    vips: tuple[tuple[str, str, str], ...] = ()         # (service, network, virtual IP)
    services: dict[str, Service] = field(default_factory=dict)   # the stack's, for DNS and LB
    underlay: dict[str, str] = field(default_factory=dict)       # cluster: node -> underlay address
    pending: tuple[tuple[str, str, str], ...] = ()               # cluster: (service, task, reason)
    ingress: dict[str, IngressState] = field(default_factory=dict)  # cluster: node -> its ingress
    draining: frozenset[str] = frozenset()   # tasks leaving: out of the balancers and DNS, still running
    allocated: dict[str, str] = field(default_factory=dict)   # network -> address allocated last
    #                                  (mesh.ipam allocates serially: a freed address comes back last)

    def on_node(self, node: str) -> dict[str, TaskState]:
        """The tasks one node's agent runs ("" = a single host runs them all)."""
        return {n: t for n, t in self.tasks.items() if t.node == node}

    def vip(self, service: str, network: str) -> str | None:
        return next((a for s, n, a in self.vips if s == service and n == network), None)

    def endpoints_on(self, network: str) -> list[tuple[TaskState, EndpointState]]:
        return [(t, e) for t in self.tasks.values() for e in t.endpoints if e.network == network]


def publish_address(task: TaskState, networks: dict[str, NetworkState],
                    ingress: bool = False) -> str | None:
    """The address a published port of `task` leads to: on the ingress network (`ingress`), else
    on a bridged network that is neither internal nor the ingress one (its default route's)."""
    for e in task.endpoints:
        net = networks[e.network]
        if ingress and net.ingress:
            return e.address
        if not ingress and net.bridged and not net.internal and not net.ingress:
            return e.address
    return None

"""The stack as mesh understands it, after YAML parsing and validation (see mesh.spec).

Plain frozen dataclasses and the standard library only: every other layer builds on these.
Field names follow the compose specification.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RESTART_POLICIES = ("no", "always", "on-failure", "unless-stopped")
NETWORK_DRIVERS = ("bridge", "macvlan", "overlay")
DEFAULT_NETWORK = "default"      # a stack's own user-defined network, as compose creates it
DEFAULT_BRIDGE = "bridge"        # the daemon's default bridge: no embedded DNS, `links:` only


@dataclass(frozen=True)
class Port:
    """One published port. `published` None means: pick one from 30000-32767."""
    target: int
    published: int | None = None
    protocol: str = "tcp"            # "tcp" | "udp"
    mode: str = "ingress"            # "ingress" | "host"
    host_ip: str | None = None
    name: str | None = None          # names the SRV record _<name>._<protocol>.<service>


@dataclass(frozen=True)
class IpamConfig:
    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None


@dataclass(frozen=True)
class Network:
    name: str
    driver: str = "bridge"
    internal: bool = False
    external: bool = False
    attachable: bool = False
    driver_opts: dict[str, str] = field(default_factory=dict)
    ipam: tuple[IpamConfig, ...] = ()


@dataclass(frozen=True)
class Attachment:
    """A service's membership of one network, with its aliases and optional static address."""
    network: str
    aliases: tuple[str, ...] = ()
    ipv4_address: str | None = None


@dataclass(frozen=True)
class Link:
    """`links: ["db:database"]` -> Link(service="db", alias="database")."""
    service: str
    alias: str


@dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]            # argv to run inside the task's sandbox; exit 0 = healthy
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclass(frozen=True)
class Placement:
    constraints: tuple[str, ...] = ()
    max_replicas_per_node: int | None = None


@dataclass(frozen=True)
class Service:
    name: str
    command: tuple[str, ...] = ()    # argv; empty = an idle process (the sandbox still exists)
    container_name: str | None = None
    hostname: str | None = None
    networks: tuple[Attachment, ...] = ()
    network_mode: str | None = None  # "host" | "none" | "bridge" | "container:NAME" | "service:NAME"
    ports: tuple[Port, ...] = ()
    links: tuple[Link, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    restart: str = "no"
    replicas: int = 1
    mode: str = "replicated"         # deploy.mode: "replicated" | "global"
    endpoint_mode: str = "vip"       # deploy.endpoint_mode: "vip" | "dnsrr"
    placement: Placement = Placement()
    healthcheck: Healthcheck | None = None
    extensions: dict[str, object] = field(default_factory=dict)   # the service's `x-mesh` mapping
    dns: tuple[str, ...] = ()        # upstream resolvers of the embedded DNS ("addr" or "addr:port")


@dataclass(frozen=True)
class DnsOptions:
    """The stack's top-level `x-mesh: {dns: {...}}`: how the embedded resolver behaves."""
    ttl: int = 600                   # names; `tasks.` and dnsrr answers use min(ttl, 5)
    upstream_timeout: float = 4.0    # per upstream
    upstreams: tuple[str, ...] = ()  # default upstreams ("addr" or "addr:port"); empty = the host's
    max_inflight: int = 100          # forwarded queries at once; REFUSED beyond


@dataclass(frozen=True)
class Stack:
    name: str
    services: dict[str, Service]
    networks: dict[str, Network]
    warnings: tuple[str, ...] = ()
    directory: str = ""              # where the stack file is: tasks start there (compose's project dir)
    dns: DnsOptions = DnsOptions()

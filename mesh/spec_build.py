"""Semantic checks of a validated stack file and its conversion to mesh.model (used by mesh.spec):
cross references (networks, links, network modes), duplicate ports, subnets, placement.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any


from mesh.errors import SpecError
from mesh.interpolate import join_path
from mesh.model import (DEFAULT_NETWORK, DnsOptions, Attachment, Healthcheck, IpamConfig, Link,
                        Network, Placement, Port, Service, Stack)
from mesh.spec_ports import show
from mesh.spec_models import (CONSTRAINT_RE, ENV_KEY_RE, NAME_RE, NAME_RULE, NO_PORTS, PROJECT_RE,
                               RESERVED_NETWORKS, RESERVED_TASK_NAME, AttachSpec, DeploySpec,
                               HealthcheckSpec, IpamConfigSpec, NetworkSpec, PlacementSpec,
                               SWARM_RESTART, ServiceSpec, StackSpec)


# ---- semantic checks: the validated models -> mesh.model --------------------------------------

# the keys of a service's x-mesh that mesh reads
SERVICE_EXTENSIONS = ("affinity", "drain_timeout", "ingress", "preserve_client_ip")


class Builder:
    """Cross-field and cross-reference checks while building the dataclasses; problems collected."""

    def __init__(self, spec: StackSpec, env: Mapping[str, str]):
        self.spec, self.env = spec, env
        self.networks_written = spec.networks or {}
        self.problems: list[tuple[str, str]] = []
        self.uses_default = False

    def error(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def stack(self, fallback_name: str, directory: str) -> Stack:
        name = self.spec.name if self.spec.name is not None else fallback_name
        if not PROJECT_RE.fullmatch(name):
            self.error("name", "expected lower-case letters, digits, '_' or '-', starting with a "
                               f"letter or digit, got {name!r}")
        if not self.spec.services:
            self.error("services", "expected at least one service, got an empty mapping")
        networks = {n: self.network(n, s or NetworkSpec()) for n, s in self.networks_written.items()}
        services = {n: self.service(n, s) for n, s in self.spec.services.items()}
        if self.uses_default and DEFAULT_NETWORK not in networks:
            networks = {DEFAULT_NETWORK: Network(DEFAULT_NETWORK), **networks}
        self.check_published_ports()
        self.check_container_names(services)
        self.check_static_addresses(services, networks)
        self.check_subnets_disjoint(networks)
        dns = self.dns_options()
        if self.problems:
            raise SpecError(self.problems)
        return Stack(name, services, networks, (), directory, dns)

    def dns_options(self) -> DnsOptions:
        spec = self.spec.x_mesh.dns if self.spec.x_mesh and self.spec.x_mesh.dns else None
        if spec is None:
            return DnsOptions()
        default = DnsOptions()
        if spec.upstream_timeout is not None and spec.upstream_timeout <= 0:
            self.error("x-mesh.dns.upstream_timeout", "expected a duration above zero, "
                                                       f"got {spec.upstream_timeout}s")
        return DnsOptions(
            ttl=default.ttl if spec.ttl is None else spec.ttl,
            upstream_timeout=spec.upstream_timeout or default.upstream_timeout,
            upstreams=self.dns(spec.upstreams, "x-mesh.dns.upstreams"),
            max_inflight=spec.max_inflight or default.max_inflight)

    # -- networks

    def network(self, name: str, spec: NetworkSpec) -> Network:
        path = f"networks.{name}"
        if not NAME_RE.fullmatch(name):
            self.error(path, f"invalid network name {name!r}: expected {NAME_RULE}")
        if name in RESERVED_NETWORKS and not spec.external:
            self.error(path, f"'{name}' is the name of a predefined network (bridge, host, none): "
                             "declare it with `external: true` to use it, or pick another name")
        clash = [f for f in ("driver", "driver_opts", "ipam", "internal") if f in spec.model_fields_set]
        if spec.external and clash:
            self.error(path, "an external network is created outside this file, so it cannot set "
                             f"{', '.join(clash)}")
        driver, options = spec.driver or "bridge", spec.driver_opts or {}
        if driver == "macvlan" and not spec.external and "parent" not in options:
            self.error(f"{path}.driver_opts.parent", "missing: a macvlan network needs its parent "
                                                     "interface, e.g. driver_opts: {parent: eth0}")
        configs = (spec.ipam.config or []) if spec.ipam else []
        ipam = tuple(self.ipam_config(c, f"{path}.ipam.config[{i}]") for i, c in enumerate(configs))
        return Network(name, driver, spec.internal, spec.external, spec.attachable, dict(options), ipam)

    def ipam_config(self, spec: IpamConfigSpec, path: str) -> IpamConfig:
        subnet = self.cidr(spec.subnet, f"{path}.subnet") if spec.subnet is not None else None
        for field in ("gateway", "ip_range"):
            if getattr(spec, field) is not None and spec.subnet is None:
                self.error(f"{path}.{field}", f"a {field} needs a subnet in the same config entry")
        gateway, where = spec.gateway, f"{path}.gateway"
        if subnet and gateway is not None:
            address = _address(gateway)
            if address is None:
                self.error(where, f"expected an IPv4 address inside {subnet}, got {show(gateway)}")
            elif address not in subnet:
                self.error(where, f"gateway {address} is outside the subnet {subnet}")
            elif subnet.prefixlen < 31 and address in (subnet.network_address, subnet.broadcast_address):
                self.error(where, f"gateway {address} is the network or broadcast address of {subnet}")
        ip_range = self.cidr(spec.ip_range, f"{path}.ip_range") if spec.ip_range is not None else None
        if subnet and ip_range and not ip_range.subnet_of(subnet):
            self.error(f"{path}.ip_range", f"ip_range {ip_range} is outside the subnet {subnet}")
        return IpamConfig(str(subnet) if subnet else spec.subnet, gateway,
                          str(ip_range) if ip_range else spec.ip_range)

    def cidr(self, text: str, path: str) -> IPv4Network | None:
        network = _network(text, strict=True)
        if network is None:
            loose = _network(text, strict=False)
            hint = f" ({text!r} has host bits set; did you mean {loose}?)" if loose else f", got {text!r}"
            self.error(path, f"expected an IPv4 network in CIDR form like 10.1.0.0/24{hint}")
        return network

    def check_subnets_disjoint(self, networks: dict[str, Network]) -> None:
        seen: list[tuple[IPv4Network, str]] = []
        for name, net in networks.items():
            for i, config in enumerate(net.ipam):
                subnet = _network(config.subnet or "", strict=True)
                path = f"networks.{name}.ipam.config[{i}].subnet"
                for other, where in seen if subnet else ():
                    if subnet.overlaps(other):
                        self.error(path, f"subnet {subnet} overlaps {other} at {where}")
                if subnet:
                    seen.append((subnet, path))

    # -- services

    def service(self, name: str, spec: ServiceSpec) -> Service:
        path = f"services.{name}"
        if not NAME_RE.fullmatch(name):
            self.error(path, f"invalid service name {name!r}: expected {NAME_RULE}")
        deploy = spec.deploy or DeploySpec()
        self.check_deploy(path, spec, deploy)
        ports = self.ports(path, spec)
        extensions = self.service_extensions(spec.x_mesh or {}, f"{path}.x-mesh")
        self.check_dsr(f"{path}.x-mesh", extensions, ports)
        return Service(
            name=name, command=self.command(spec.command, f"{path}.command"),
            container_name=spec.container_name, hostname=spec.hostname,
            networks=self.attachments(name, spec), network_mode=self.network_mode(name, spec),
            ports=ports, links=self.links(name, spec.links or []),
            environment=self.environment(spec.environment, f"{path}.environment"),
            restart=self.restart(spec, deploy),
            replicas=1 if deploy.replicas is None else deploy.replicas,
            mode=deploy.mode or "replicated", endpoint_mode=deploy.endpoint_mode or "vip",
            placement=self.placement(deploy.placement, f"{path}.deploy.placement"),
            healthcheck=self.healthcheck(spec.healthcheck, f"{path}.healthcheck"),
            extensions=extensions,
            dns=self.dns(spec.dns, f"{path}.dns"))

    @staticmethod
    def restart(spec: ServiceSpec, deploy: DeploySpec) -> str:
        """deploy.restart_policy.condition when given (as docker stack deploy reads it: it wins
        over `restart:`), else `restart:`, else no."""
        condition = deploy.restart_policy.condition if deploy.restart_policy else None
        return SWARM_RESTART[condition] if condition else spec.restart or "no"

    def service_extensions(self, x_mesh: dict, path: str) -> dict:
        """A service's `x-mesh`: the keys mesh reads (SERVICE_EXTENSIONS) are checked; other keys
        are kept as they are (mesh.spec names them in its ignored-fields warning)."""
        out = _json_safe(x_mesh)
        affinity = out.get("affinity")
        if affinity is not None and affinity not in ("client-ip", "none"):
            self.error(f"{path}.affinity", f"expected client-ip or none, got {affinity!r}")
        keep = out.get("preserve_client_ip")
        if keep is not None and not isinstance(keep, bool):
            self.error(f"{path}.preserve_client_ip", f"expected true or false, got {keep!r}")
        ingress = out.get("ingress")
        if ingress is not None and ingress not in ("dsr", "nat"):
            self.error(f"{path}.ingress", f"expected dsr or nat, got {ingress!r}")
        drain = out.get("drain_timeout")
        if drain is not None and (isinstance(drain, bool) or not isinstance(drain, (int, float))
                                  or drain < 0):
            self.error(f"{path}.drain_timeout", f"expected seconds (a number, 0 or more), got {drain!r}")
        return out

    def check_dsr(self, path: str, extensions: dict, ports) -> None:
        """Direct server return (mesh.lb.dsr) carries ingress-mode ports and always keeps the
        client's address."""
        if extensions.get("ingress") != "dsr":
            return
        if not any(p.mode == "ingress" for p in ports):
            self.error(f"{path}.ingress", "dsr applies to ports published in ingress mode; "
                                          "this service publishes none")
        if extensions.get("preserve_client_ip") is False:
            self.error(f"{path}.ingress", "dsr always keeps the client's address: it cannot go "
                                          "with preserve_client_ip: false")
        if any(p.mode == "ingress" and p.host_ip for p in ports):
            self.error(f"{path}.ingress", "dsr hands a port over on every node's own address: it "
                                          "cannot go with a port published on one address (host_ip)")

    def check_deploy(self, path: str, spec: ServiceSpec, deploy: DeploySpec) -> None:
        replicas = deploy.replicas if deploy.replicas is not None else 1
        if deploy.mode == "global" and deploy.replicas is not None:
            self.error(f"{path}.deploy.replicas", "replicas cannot be set with mode: global "
                                                  "(a global service runs one task per node)")
        elif replicas > 1 and spec.container_name:
            self.error(f"{path}.container_name", f"a container name is unique, so the service can "
                                                 f"have only one replica, got replicas: {replicas}")
        if deploy.mode != "global" and replicas > 1 and isinstance(spec.networks, dict):
            for net, attach in spec.networks.items():
                if attach and attach.ipv4_address:
                    self.error(f"{path}.networks.{net}.ipv4_address", "a static address fits one task "
                               f"only, and the service has replicas: {replicas}")
        if deploy.endpoint_mode == "dnsrr" and any(p.mode == "ingress" for p in spec.ports or []):
            self.error(f"{path}.deploy.endpoint_mode", "endpoint_mode dnsrr has no virtual IP, so ports "
                       "cannot be published in ingress mode (Swarm refuses it): use mode: host on the "
                       "ports or endpoint_mode: vip")

    def dns(self, value: str | list[str] | None, path: str) -> tuple[str, ...]:
        """`dns:` upstreams, "addr" or "addr:port" (IPv4), for the embedded resolver to forward to."""
        servers = [value] if isinstance(value, str) else list(value or [])
        for i, server in enumerate(servers):
            addr, _, port = server.partition(":")
            try:
                IPv4Address(addr)
                ok = not port or 1 <= int(port) <= 65535
            except ValueError:
                ok = False
            if not ok:
                self.error(f"{path}[{i}]" if not isinstance(value, str) else path,
                           f"expected an IPv4 address, optionally with :port, got {server!r}")
        return tuple(servers)

    def command(self, value: str | list[str] | None, path: str) -> tuple[str, ...]:
        if value is None or isinstance(value, list):
            return tuple(value or ())
        try:
            return tuple(shlex.split(value))
        except ValueError as err:
            self.error(path, f"cannot split {value!r} into arguments: {err}")
            return ()

    def attachments(self, name: str, spec: ServiceSpec) -> tuple[Attachment, ...]:
        path = f"services.{name}.networks"
        if spec.network_mode is not None:
            if spec.networks:
                self.error(f"services.{name}.network_mode", "network_mode and networks cannot be used "
                           "together: a service either joins networks or takes its network_mode's stack")
            return ()
        if not spec.networks:
            self.uses_default = True
            return (Attachment(DEFAULT_NETWORK),)
        entries = ([(join_path(path, i), net, None) for i, net in enumerate(spec.networks)]
                   if isinstance(spec.networks, list) else
                   [(join_path(path, net), net, attach) for net, attach in spec.networks.items()])
        out: list[Attachment] = []
        for where, net, attach in entries:
            if any(a.network == net for a in out):
                self.error(where, f"network {net!r} is listed twice")
            elif self.known_network(net, where):
                attach = attach or AttachSpec()
                out.append(Attachment(net, tuple(attach.aliases or ()), attach.ipv4_address))
        return tuple(out)

    def known_network(self, net: str, where: str) -> bool:
        if net in self.networks_written:
            return True
        if net == DEFAULT_NETWORK:
            self.uses_default = True
            return True
        defined = ", ".join(sorted(self.networks_written)) or "none"
        self.error(where, f"network {net!r} is not defined under the top-level `networks:` "
                          f"(defined: {defined}; `{DEFAULT_NETWORK}` needs no definition)")
        return False

    def network_mode(self, name: str, spec: ServiceSpec) -> str | None:
        mode, path = spec.network_mode, f"services.{name}.network_mode"
        if mode is None or mode in ("host", "none", "bridge"):
            return mode
        kind, _, target = mode.partition(":")
        if kind == "service" and target:
            owner = self.spec.services.get(target)
            if target == name:
                self.error(path, "a service cannot share its own network stack: service:NAME must "
                                 "name another service")
            elif owner is None:
                self.error(path, f"service {target!r} is not defined in this file "
                                 f"(services: {', '.join(self.spec.services)})")
            elif (owner.network_mode or "").startswith(("service:", "container:")):
                self.error(path, f"service {target!r} itself borrows a network stack "
                                 f"({owner.network_mode}): name the service that owns it")
        elif not (kind == "container" and target):
            self.error(path, f"expected host, none, bridge, container:NAME or service:NAME, got {mode!r}")
        return mode

    def ports(self, path: str, spec: ServiceSpec) -> tuple[Port, ...]:
        kind = (spec.network_mode or "").partition(":")[0]
        if spec.ports and kind in NO_PORTS:
            self.error(f"{path}.ports", NO_PORTS[kind].format(mode=spec.network_mode))
        return tuple(port for entry in spec.ports or [] for port in entry.expand())

    def links(self, name: str, entries: list[str]) -> tuple[Link, ...]:
        out = []
        for i, text in enumerate(entries):
            where = f"services.{name}.links[{i}]"
            target, _, alias = text.partition(":")
            if text.count(":") > 1 or not NAME_RE.fullmatch(target) or not NAME_RE.fullmatch(alias or target):
                self.error(where, f"expected SERVICE or SERVICE:ALIAS, got {text!r}")
            elif target == name:
                self.error(where, f"a service cannot link to itself, got {text!r}")
            elif target not in self.spec.services:
                self.error(where, f"service {target!r} is not defined in this file "
                                  f"(services: {', '.join(self.spec.services)})")
            else:
                out.append(Link(target, alias or target))
        return tuple(out)

    def environment(self, value: dict[str, str] | list[str] | None, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if self.env_key(k, join_path(path, k))}
        for i, item in enumerate(value or []):
            key, equals, text = item.partition("=")
            if not self.env_key(key, f"{path}[{i}]"):
                continue
            if equals:
                out[key] = text
            elif key in self.env:               # `- KEY` alone passes the variable through
                out[key] = self.env[key]
        return out

    def env_key(self, key: str, where: str) -> bool:
        if ENV_KEY_RE.fullmatch(key):
            return True
        self.error(where, "expected a variable name (letters, digits and '_', not starting with a "
                          f"digit), got {key!r}")
        return False

    def placement(self, spec: PlacementSpec | None, path: str) -> Placement:
        """Constraints are kept without the spaces around the operator: 'node.role==manager'."""
        if spec is None:
            return Placement()
        kept = []
        for i, text in enumerate(spec.constraints or []):
            match = CONSTRAINT_RE.fullmatch(text)
            if not match:
                self.error(f"{path}.constraints[{i}]", "expected node.hostname, node.id, node.role or "
                           "node.labels.KEY, then == or !=, then a value (like 'node.role==manager'), "
                           f"got {text!r}")
            elif match[1] == "role" and match[3] not in ("manager", "worker"):
                self.error(f"{path}.constraints[{i}]", f"expected node.role to be compared with manager "
                                                       f"or worker, got {match[3]!r}")
            else:
                kept.append(f"node.{match[1]}{match[2]}{match[3]}")
        return Placement(tuple(kept), spec.max_replicas_per_node)

    def healthcheck(self, spec: HealthcheckSpec | None, path: str) -> Healthcheck | None:
        if spec is None:
            return None
        if spec.disable:
            if spec.test not in (None, ["NONE"]):
                self.error(f"{path}.disable", "disable: true cannot be combined with a test")
            return None
        for field in ("interval", "timeout"):
            if getattr(spec, field) == 0:
                self.error(f"{path}.{field}", "expected a duration above zero, got '0'")
        test = self.health_test(spec.test, f"{path}.test")
        if test is None:
            return None
        return Healthcheck(test, interval=_or(spec.interval, 30.0), timeout=_or(spec.timeout, 30.0),
                           retries=_or(spec.retries, 3), start_period=_or(spec.start_period, 0.0))

    def health_test(self, test: str | list[str] | None, path: str) -> tuple[str, ...] | None:
        if test is None:
            self.error(path, "missing: mesh has no image to inherit a health check from; "
                             "give a test or disable: true")
            return None
        words = ["CMD-SHELL", test] if isinstance(test, str) else test
        head, args = (words[0], words[1:]) if words else ("", [])
        if head == "NONE":
            return None
        if head in ("CMD", "CMD-SHELL") and args and all(args):
            return tuple(args) if head == "CMD" else ("sh", "-c", " ".join(args))
        if head in ("CMD", "CMD-SHELL"):
            self.error(path, f"expected a command to run after {head}, got {test!r}")
        else:
            self.error(join_path(path, 0), f"expected CMD, CMD-SHELL or NONE first, got {show(head)}")
        return None

    # -- stack-wide

    def check_published_ports(self) -> None:
        """A port/protocol pair is published once, except by several services in host mode, as in
        Swarm: the scheduler keeps their tasks on different nodes (a single host refuses it:
        mesh.allocator)."""
        seen: dict[tuple[int, str], list[tuple[str, str, str]]] = {}   # -> (where, mode, service)
        for name, spec in self.spec.services.items():
            for i, entry in enumerate(spec.ports or []):
                where = f"services.{name}.ports[{i}]"
                for port in entry.expand():
                    if port.published is None:
                        continue
                    others = seen.setdefault((port.published, port.protocol), [])
                    clash = next((w for w, mode, svc in others if svc == name or "ingress" in
                                  (mode, port.mode)), None)
                    if clash is not None:
                        self.error(f"{where}.published", f"port {port.published}/{port.protocol} is "
                                                         f"already published by {clash}")
                    others.append((where, port.mode, name))

    def check_container_names(self, services: dict[str, Service]) -> None:
        owners = {f"{svc.name}.{slot}": f"services.{svc.name}" for svc in services.values()
                  if not svc.container_name
                  for slot in range(1, (1 if svc.mode == "global" else svc.replicas) + 1)}
        for svc in (s for s in services.values() if s.container_name):
            if svc.container_name == RESERVED_TASK_NAME:
                self.error(f"services.{svc.name}.container_name",
                           f"the name {RESERVED_TASK_NAME!r} is reserved: each node's routing-mesh "
                           f"namespace is named after it")
                continue
            owner = owners.setdefault(svc.container_name, f"services.{svc.name}")
            if owner != f"services.{svc.name}":
                self.error(f"services.{svc.name}.container_name",
                           f"container name {svc.container_name!r} is already taken by {owner}")

    def check_static_addresses(self, services: dict[str, Service], networks: dict[str, Network]) -> None:
        for svc in services.values():
            for attach in (a for a in svc.networks if a.ipv4_address):
                where = f"services.{svc.name}.networks.{attach.network}.ipv4_address"
                net = networks[attach.network]
                subnets = [s for s in (_network(c.subnet or "", strict=True) for c in net.ipam) if s]
                address = IPv4Address(attach.ipv4_address)
                if not subnets:
                    self.error(where, f"a static address needs a subnet on network {net.name!r} "
                                      f"(networks.{net.name}.ipam.config[].subnet), as Docker requires")
                elif not any(address in s for s in subnets):
                    self.error(where, f"{address} is outside the subnet of network {net.name!r} "
                                      f"({', '.join(map(str, subnets))})")


# ---- small helpers ----------------------------------------------------------------------------

def _network(text: str, strict: bool) -> IPv4Network | None:
    try:
        return IPv4Network(text, strict=strict) if "/" in text else None
    except ValueError:
        return None


def _address(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def _or(value, default):
    return default if value is None else value


def project_name(text: str) -> str:
    """Compose's rule: lower-case, only [a-z0-9_-], starting with a letter or digit."""
    return re.sub(r"[^a-z0-9_-]", "", text.lower()).lstrip("_-") or "default"


def _json_safe(value: object) -> object:
    """x-mesh content as JSON keeps it: string keys, dates as text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def as_lists(value: object) -> object:
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def service_from_dict(d: Mapping[str, Any]) -> Service:
    health, placement = d.get("healthcheck"), d.get("placement") or {}
    return Service(**{
        **d, "command": tuple(d.get("command", ())), "dns": tuple(d.get("dns", ())),
        "networks": tuple(Attachment(**{**a, "aliases": tuple(a.get("aliases", ()))})
                          for a in d.get("networks", ())),
        "ports": tuple(Port(**p) for p in d.get("ports", ())),
        "links": tuple(Link(**link) for link in d.get("links", ())),
        "placement": Placement(**{**placement, "constraints": tuple(placement.get("constraints", ()))}),
        "healthcheck": Healthcheck(**{**health, "test": tuple(health["test"])}) if health else None})


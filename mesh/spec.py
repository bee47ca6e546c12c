"""Stack files: compose-spec YAML -> a validated mesh.model.Stack, and the Stack's JSON round trip.

    stack = load_stack_file("stack.yaml")        # or load_stack(text, name="demo", env={...})
    for warning in stack.warnings: ...           # ignored fields, unset variables
    payload = stack_to_dict(stack)               # JSON-safe; stack_from_dict(payload) == stack

Pipeline: yaml.safe_load (duplicate keys refused) -> variable substitution (mesh.interpolate) ->
strict pydantic v2 models named after compose-spec fields (ports: mesh.spec_ports) -> semantic
checks -> frozen dataclasses. Problems are raised together as SpecError([(path, message), ...])
with compose paths such as `services.web.ports[1].published`: first every structural problem (wrong
types, bad values), then, once the structure is sound, every cross-reference problem (undefined
networks, duplicate published ports...). Fields mesh does not use are named in one warning.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, replace
from datetime import date
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from mesh.errors import SpecError
from mesh.interpolate import interpolate, join_path
from mesh.model import (DEFAULT_NETWORK, NETWORK_DRIVERS, RESTART_POLICIES, Attachment, Healthcheck,
                        IpamConfig, Link, Network, Placement, Port, Service, Stack)
from mesh.spec_ports import IPv4, PortSpec, choice, problem, show

__all__ = ["load_stack", "load_stack_file", "stack_to_dict", "stack_from_dict"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_RULE = "letters, digits, '_', '.' or '-', starting with a letter or digit"
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROJECT = re.compile(r"[a-z0-9][a-z0-9_-]*")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CONSTRAINT = re.compile(r"\s*node\.(hostname|role|id|labels\.[A-Za-z0-9_.-]+)\s*(==|!=)\s*(\S.*?)\s*")
_RESERVED = ("bridge", "host", "none")
_NO_PORTS = {
    "host": "network_mode: host runs the service in the host's network stack, where its ports are "
            "already reachable: ports cannot be published (remove `ports`)",
    "none": "network_mode: none gives the service no network: there is nothing to publish (remove `ports`)",
    "container": "network_mode: {mode} shares another task's network stack: publish ports there instead",
    "service": "network_mode: {mode} shares another service's network stack: publish ports on that service",
}


# ---- value types: each accepts what compose accepts and says what it expected -----------------

def _integer(low: int, expected: str):
    def check(value: object) -> int:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)                 # "3", as `${REPLICAS}` substitution gives
        if number is None or number < low:
            raise problem(f"expected {expected}, got {show(value)}")
        return number
    return Annotated[int, BeforeValidator(check)]


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise problem(f"expected true or false, got {show(value)}")


def _duration(value: object) -> float:
    if isinstance(value, str) and (value == "0" or re.fullmatch(f"(?:{_DURATION.pattern})+", value)):
        return sum(float(number) * _SECONDS[unit] for number, unit in _DURATION.findall(value))
    raise problem(f"expected a duration like '10s', '1m30s' or '500ms', got {show(value)}")


def _scalar(value: object) -> str:
    """A YAML scalar as a string, as compose reads environment values and driver options."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (str, int, float, date)):
        return str(value)
    raise problem(f"expected a string, number or boolean, got {show(value)}")


def _restart(value: object) -> str:
    if value is False:                          # YAML 1.1 reads an unquoted `no` as false
        return "no"
    if isinstance(value, str) and (value in RESTART_POLICIES or re.fullmatch(r"on-failure:\d+", value)):
        return value.partition(":")[0]
    raise problem(f"expected one of {', '.join(RESTART_POLICIES)} or on-failure:N, got {show(value)}")


def _dns_name(what: str, max_length: int = 255):
    def check(value: object) -> str:
        if isinstance(value, str) and _NAME.fullmatch(value) and len(value) <= max_length:
            return value
        raise problem(f"expected a {what} ({_NAME_RULE}, at most {max_length} characters), "
                      f"got {show(value)}")
    return Annotated[str, BeforeValidator(check)]


def _either(forms: dict[type, Any], expected: str):
    """A union told apart by the YAML value's type (list, str, dict); errors keep compose paths."""
    tagged = tuple(Annotated[form, Tag(f"~{kind.__name__}")] for kind, form in forms.items())
    return Annotated[Union[tagged], Discriminator(
        lambda value: f"~{type(value).__name__}" if type(value) in forms else None,
        custom_error_type="shape", custom_error_message=expected)]


NonNegative = _integer(0, "a non-negative integer")
Positive = _integer(1, "an integer of at least 1")
Bool = Annotated[bool, BeforeValidator(_boolean)]
Duration = Annotated[float, BeforeValidator(_duration)]
Scalar = Annotated[str, BeforeValidator(_scalar)]
Restart = Annotated[str, BeforeValidator(_restart)]
Command = _either({str: str, list: list[Scalar]}, "expected a string or a list of strings")
HealthTest = _either({str: str, list: list[str]}, "expected a string or a list of strings")


# ---- the models, named after compose-spec fields ----------------------------------------------

class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class AttachSpec(_Spec):
    aliases: Optional[list[_dns_name("network alias")]] = None
    ipv4_address: Optional[IPv4] = None


class HealthcheckSpec(_Spec):
    test: Optional[HealthTest] = None
    interval: Optional[Duration] = None
    timeout: Optional[Duration] = None
    start_period: Optional[Duration] = None
    retries: Optional[Positive] = None
    disable: Bool = False


class PlacementSpec(_Spec):
    constraints: Optional[list[str]] = None
    max_replicas_per_node: Optional[Positive] = None


class DeploySpec(_Spec):
    replicas: Optional[NonNegative] = None
    mode: Optional[choice("replicated", "global")] = None
    endpoint_mode: Optional[choice("vip", "dnsrr")] = None
    placement: Optional[PlacementSpec] = None


class ServiceSpec(_Spec):
    command: Optional[Command] = None
    container_name: Optional[_dns_name("container name")] = None
    hostname: Optional[_dns_name("hostname", 63)] = None
    networks: Optional[_either({list: list[str], dict: dict[str, Optional[AttachSpec]]},
                               "expected a list of network names or a mapping of them")] = None
    network_mode: Optional[str] = None
    ports: Optional[list[PortSpec]] = None
    links: Optional[list[str]] = None
    environment: Optional[_either({dict: dict[str, Scalar], list: list[str]},
                                  "expected a mapping or a list of KEY=VALUE strings")] = None
    restart: Optional[Restart] = None
    deploy: Optional[DeploySpec] = None
    healthcheck: Optional[HealthcheckSpec] = None
    dns: Optional[_either({str: str, list: list[str]}, "expected an address or a list of them")] = None
    x_mesh: Optional[dict[Any, Any]] = Field(None, alias="x-mesh")


class IpamConfigSpec(_Spec):
    subnet: Optional[str] = None
    gateway: Optional[str] = None
    ip_range: Optional[str] = None


class IpamSpec(_Spec):
    driver: Optional[choice("default")] = None
    config: Optional[list[IpamConfigSpec]] = None


class NetworkSpec(_Spec):
    driver: Optional[choice(*NETWORK_DRIVERS)] = None
    driver_opts: Optional[dict[str, Scalar]] = None
    ipam: Optional[IpamSpec] = None
    internal: Bool = False
    external: Bool = False
    attachable: Bool = False


class StackSpec(_Spec):
    name: Optional[str] = None
    version: Any = None                         # obsolete in compose, ignored silently
    services: dict[str, ServiceSpec]
    networks: Optional[dict[str, Optional[NetworkSpec]]] = None


# ---- public API -------------------------------------------------------------------------------

def load_stack(text: str, *, name: str = "default", env: Mapping[str, str] | None = None,
               directory: str = "") -> Stack:
    """Parse and validate a stack. `name` is used when the file has no top-level `name:`;
    `directory` becomes Stack.directory (load_stack_file passes the file's folder)."""
    env = os.environ if env is None else env
    tree, problems, unset = interpolate(_parse_yaml(text), env)
    try:
        spec = StackSpec.model_validate(tree)
    except ValidationError as err:
        problems += [(_loc_path(e["loc"]), _message(e)) for e in err.errors()]
    if problems:
        raise SpecError(problems)
    stack = _Builder(spec, env).stack(_project_name(name), directory)
    ignored = _ignored_fields(spec)
    notes = [f"ignored fields (mesh does not use them): {', '.join(ignored)}"] if ignored else []
    return replace(stack, warnings=tuple(notes + unset))


def load_stack_file(path: str, env: Mapping[str, str] | None = None) -> Stack:
    """Load a stack file; the stack is named by its `name:` or else by the file's folder."""
    full = os.path.abspath(path)
    try:
        with open(full, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([("", f"cannot read stack file {path}: {err}")]) from None
    directory = os.path.dirname(full)
    return load_stack(text, name=_project_name(os.path.basename(directory)), env=env, directory=directory)


def stack_to_dict(stack: Stack) -> dict[str, Any]:
    """A JSON-safe dict of a validated stack (tuples become lists)."""
    return _lists(asdict(stack))


def stack_from_dict(data: Mapping[str, Any]) -> Stack:
    """The inverse of stack_to_dict, also after a trip through JSON."""
    try:
        return Stack(name=data["name"],
                     services={k: _service_from(v) for k, v in data["services"].items()},
                     networks={k: Network(**{**v, "ipam": tuple(IpamConfig(**c) for c in v.get("ipam", ()))})
                               for k, v in data["networks"].items()},
                     warnings=tuple(data.get("warnings", ())), directory=data.get("directory", ""))
    except (KeyError, TypeError, AttributeError) as err:
        raise SpecError([("", f"malformed stack document: {err!r}")]) from None


# ---- parsing and pydantic errors --------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing duplicate keys in a mapping as compose does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> dict:
    try:
        tree = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise SpecError([("", f"invalid YAML{where}: {what or err}")]) from None
    if tree is None:
        raise SpecError([("", "the stack file is empty: expected a mapping with a `services:` key")])
    if not isinstance(tree, dict):
        raise SpecError([("", f"expected a mapping at the top level (with `services:`), got {show(tree)}")])
    return tree


_EXPECTED = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
             "float_type": "a number", "list_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping"}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "mesh":
        return error["msg"]
    if kind == "missing":
        if tuple(error["loc"]) == ("services",):
            return "missing: a stack file needs a `services:` mapping with at least one service"
        return "required field is missing"
    got = show(error.get("input"))
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    return f"{error['msg']}, got {got}"        # "shape" (custom message) and anything unforeseen


def _loc_path(loc: tuple) -> str:
    """pydantic's ('services', 'web', 'ports', 1) -> 'services.web.ports[1]' (union tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, str) and (part == "[key]" or part.startswith("~")):
            continue
        path = join_path(path, part)
    return path


def _ignored_fields(node: object, path: str = "") -> list[str]:
    """Paths of every field the models did not declare, x-* extensions excepted."""
    out: list[str] = []
    if isinstance(node, BaseModel):
        out += [join_path(path, k) for k in (node.model_extra or {}) if not str(k).startswith("x-")]
        for field, info in type(node).model_fields.items():
            if field != "x_mesh":
                out += _ignored_fields(getattr(node, field), join_path(path, info.alias or field))
    elif isinstance(node, dict):
        for key, value in node.items():
            out += _ignored_fields(value, join_path(path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _ignored_fields(value, join_path(path, i))
    return out


# ---- semantic checks: the validated models -> mesh.model --------------------------------------

class _Builder:
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
        if not _PROJECT.fullmatch(name):
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
        if self.problems:
            raise SpecError(self.problems)
        return Stack(name, services, networks, (), directory)

    # -- networks

    def network(self, name: str, spec: NetworkSpec) -> Network:
        path = f"networks.{name}"
        if not _NAME.fullmatch(name):
            self.error(path, f"invalid network name {name!r}: expected {_NAME_RULE}")
        if name in _RESERVED and not spec.external:
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
        if not _NAME.fullmatch(name):
            self.error(path, f"invalid service name {name!r}: expected {_NAME_RULE}")
        deploy = spec.deploy or DeploySpec()
        self.check_deploy(path, spec, deploy)
        return Service(
            name=name, command=self.command(spec.command, f"{path}.command"),
            container_name=spec.container_name, hostname=spec.hostname,
            networks=self.attachments(name, spec), network_mode=self.network_mode(name, spec),
            ports=self.ports(path, spec), links=self.links(name, spec.links or []),
            environment=self.environment(spec.environment, f"{path}.environment"),
            restart=spec.restart or "no",
            replicas=1 if deploy.replicas is None else deploy.replicas,
            mode=deploy.mode or "replicated", endpoint_mode=deploy.endpoint_mode or "vip",
            placement=self.placement(deploy.placement, f"{path}.deploy.placement"),
            healthcheck=self.healthcheck(spec.healthcheck, f"{path}.healthcheck"),
            extensions=_json_safe(spec.x_mesh or {}), dns=self.dns(spec.dns, f"{path}.dns"))

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
        if spec.ports and kind in _NO_PORTS:
            self.error(f"{path}.ports", _NO_PORTS[kind].format(mode=spec.network_mode))
        return tuple(port for entry in spec.ports or [] for port in entry.expand())

    def links(self, name: str, entries: list[str]) -> tuple[Link, ...]:
        out = []
        for i, text in enumerate(entries):
            where = f"services.{name}.links[{i}]"
            target, _, alias = text.partition(":")
            if text.count(":") > 1 or not _NAME.fullmatch(target) or not _NAME.fullmatch(alias or target):
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
        if _ENV_KEY.fullmatch(key):
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
            match = _CONSTRAINT.fullmatch(text)
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
        first: dict[tuple[int, str], str] = {}
        for name, spec in self.spec.services.items():
            for i, entry in enumerate(spec.ports or []):
                where = f"services.{name}.ports[{i}]"
                for port in entry.expand():
                    key = (port.published, port.protocol)
                    if port.published is not None and key in first:
                        self.error(f"{where}.published", f"port {port.published}/{port.protocol} is "
                                                         f"already published by {first[key]}")
                    elif port.published is not None:
                        first[key] = where

    def check_container_names(self, services: dict[str, Service]) -> None:
        owners = {f"{svc.name}.{slot}": f"services.{svc.name}" for svc in services.values()
                  if not svc.container_name
                  for slot in range(1, (1 if svc.mode == "global" else svc.replicas) + 1)}
        for svc in (s for s in services.values() if s.container_name):
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


def _project_name(text: str) -> str:
    """Compose's rule: lower-case, only [a-z0-9_-], starting with a letter or digit."""
    return re.sub(r"[^a-z0-9_-]", "", text.lower()).lstrip("_-") or "default"


def _json_safe(value: object) -> object:
    """x-mesh content as JSON keeps it: string keys, dates as text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _lists(value: object) -> object:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _service_from(d: Mapping[str, Any]) -> Service:
    health, placement = d.get("healthcheck"), d.get("placement") or {}
    return Service(**{
        **d, "command": tuple(d.get("command", ())), "dns": tuple(d.get("dns", ())),
        "networks": tuple(Attachment(**{**a, "aliases": tuple(a.get("aliases", ()))})
                          for a in d.get("networks", ())),
        "ports": tuple(Port(**p) for p in d.get("ports", ())),
        "links": tuple(Link(**link) for link in d.get("links", ())),
        "placement": Placement(**{**placement, "constraints": tuple(placement.get("constraints", ()))}),
        "healthcheck": Healthcheck(**{**health, "test": tuple(health["test"])}) if health else None})

"""The strict pydantic models of a stack file, named after compose-spec fields, and the value types
they use (each accepts what compose accepts and says what it expected). mesh.spec drives them.
"""
from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from mesh.model import (NETWORK_DRIVERS, RESTART_POLICIES)
from mesh.spec_ports import IPv4, PortSpec, choice, problem, show

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '.' or '-', starting with a letter or digit"
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
CONSTRAINT_RE = re.compile(r"\s*node\.(hostname|role|id|labels\.[A-Za-z0-9_.-]+)\s*(==|!=)\s*(\S.*?)\s*")
RESERVED_NETWORKS = ("bridge", "host", "none")
RESERVED_TASK_NAME = "ingress"      # a node's ingress namespace is <node>-ingress, as a task's sandbox
NO_PORTS = {
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
        if isinstance(value, str) and NAME_RE.fullmatch(value) and len(value) <= max_length:
            return value
        raise problem(f"expected a {what} ({NAME_RULE}, at most {max_length} characters), "
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


class RestartPolicySpec(_Spec):
    """Swarm's deploy.restart_policy: its condition maps to a `restart:` policy (SWARM_RESTART);
    delay, max_attempts and window are not read (named in the ignored-fields warning)."""
    condition: Optional[choice("none", "on-failure", "any")] = None


SWARM_RESTART = {"none": "no", "on-failure": "on-failure", "any": "always"}


class DeploySpec(_Spec):
    replicas: Optional[NonNegative] = None
    restart_policy: Optional[RestartPolicySpec] = None
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


class DnsOptionsSpec(_Spec):
    ttl: Optional[Positive] = None
    upstream_timeout: Optional[Duration] = None
    upstreams: Optional[list[str]] = None
    max_inflight: Optional[Positive] = None


class MeshOptionsSpec(_Spec):
    dns: Optional[DnsOptionsSpec] = None


class StackSpec(_Spec):
    name: Optional[str] = None
    version: Any = None                         # obsolete in compose, ignored silently
    services: dict[str, ServiceSpec]
    networks: Optional[dict[str, Optional[NetworkSpec]]] = None
    x_mesh: Optional[MeshOptionsSpec] = Field(None, alias="x-mesh")


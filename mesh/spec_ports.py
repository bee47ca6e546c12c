"""Published ports for mesh.spec, and the small value validators its pydantic models share.

`PortSpec` accepts compose's short syntax (`80`, "8080:80", "8080:80/udp", "127.0.0.1:8080:80",
"127.0.0.1::80", "8000-8001:80-81") and long syntax (a mapping with target, published, protocol,
mode, host_ip, name (for SRV records); `app_protocol` is accepted and unused). `PortSpec.expand()` turns one
entry into mesh.model.Port values, one per port of a range. Errors are raised as pydantic errors of
type "mesh" whose message is final (see `problem`).
"""
from __future__ import annotations

import re
from ipaddress import IPv4Address
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from mesh.model import Port

PORT_EXPECTED = "an integer from 1 to 65535 (or a range like 8000-8001)"
SHORT_FORM = "[HOST_IP:][PUBLISHED:]TARGET[/PROTOCOL], like '127.0.0.1:8080:80/tcp'"


def show(value: object) -> str:
    """A value as the user wrote it in YAML, for messages: 'abc', 12, true, null, a list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message mesh.spec reports as it is."""
    return PydanticCustomError("mesh", message)


def choice(*options: str):
    """A string type that must be one of `options`."""
    def check(value: object) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise problem(f"expected one of {', '.join(options)}, got {show(value)}")
    return Annotated[str, BeforeValidator(check)]


def _ipv4(value: object) -> str:
    try:
        if isinstance(value, str):
            return str(IPv4Address(value))
    except ValueError:
        pass
    raise problem(f"expected an IPv4 address like 172.20.0.5, got {show(value)}")


IPv4 = Annotated[str, BeforeValidator(_ipv4)]


def port_range(value: object) -> tuple[int, int]:
    """80 -> (80, 80); "8000-8001" -> (8000, 8001)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif match:
        low, high = int(match[1]), int(match[2] or match[1])
    else:
        raise problem(f"expected {PORT_EXPECTED}, got {show(value)}")
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise problem(f"expected {PORT_EXPECTED}, got {show(value)}")
    if high < low:
        raise problem(f"port range {value!r} ends before it starts")
    return low, high


PortRange = Annotated[tuple[int, int], BeforeValidator(port_range)]


def parse_short(value: object) -> dict[str, Any]:
    """Short syntax -> the long syntax's mapping, still unvalidated (PortSpec checks each field)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 65535 < value <= 65535 * 60 + 59:
            raise problem(f"expected {PORT_EXPECTED}, got {value} (if you wrote "
                          f"{value // 60}:{value % 60:02d} unquoted, YAML read it as a base-60 "
                          "number: quote port mappings)")
        return {"target": value}
    if not isinstance(value, str):
        raise problem(f"expected a port like '8080:80' or a mapping with `target:`, got {show(value)}")
    body, slash, protocol = value.partition("/")
    parts = body.split(":")
    if len(parts) > 3:
        raise problem(f"expected {SHORT_FORM}, got {value!r} (IPv6 host addresses are not supported)")
    out: dict[str, Any] = {"target": parts[-1]}
    if len(parts) == 2 or (len(parts) == 3 and parts[1] != ""):
        out["published"] = parts[-2]
    if len(parts) == 3:
        out["host_ip"] = parts[0]
    if slash:
        out["protocol"] = protocol
    return out


class PortSpec(BaseModel):
    """One entry of a service's `ports:`, short or long syntax."""
    model_config = ConfigDict(extra="allow", strict=True)

    target: PortRange
    published: PortRange | None = None
    protocol: choice("tcp", "udp") = "tcp"
    mode: choice("ingress", "host") = "ingress"
    host_ip: IPv4 | None = None
    name: str | None = None
    app_protocol: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_syntax(cls, value: object) -> object:
        return value if isinstance(value, dict) else parse_short(value)

    @model_validator(mode="after")
    def _same_length(self) -> PortSpec:
        if self.published and _span(self.published) != _span(self.target):
            raise problem(f"published ports {_text(self.published)} and target ports "
                          f"{_text(self.target)} differ in length "
                          f"({_span(self.published)} vs {_span(self.target)}); they must match")
        return self

    def expand(self) -> list[Port]:
        """One Port per target port: "8000-8001:80-81" gives 8000->80 and 8001->81."""
        first_published = self.published[0] if self.published else None
        return [Port(target=self.target[0] + i,
                     published=None if first_published is None else first_published + i,
                     protocol=self.protocol, mode=self.mode,
                     host_ip=None if self.host_ip == ANY_ADDRESS else self.host_ip,
                     name=self.name if _span(self.target) == 1 else None)
                for i in range(_span(self.target))]


ANY_ADDRESS = "0.0.0.0"          # host_ip 0.0.0.0: every address, as no host_ip (as Docker)


def _span(ports: tuple[int, int]) -> int:
    return ports[1] - ports[0] + 1


def _text(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"

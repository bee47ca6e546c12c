"""What one sandbox's resolver knows: an immutable snapshot, swapped whole when records change.

The agent builds one View per sandbox from the desired state (mesh.dns.records); the server answers
from it without waiting for anything (DESIGN.md §2). Names are lower-case, without the trailing dot.

    View(a={"web": (("10.0.0.5",), 600), "tasks.web": (("10.0.0.7", "10.0.0.8"), 5)},
         ptr={"5.0.0.10.in-addr.arpa": ("web.1.front", 600)},
         srv={"_http._tcp.web": (((0, 0, 80, "web"),), 600)},
         forward=True, upstreams=("10.250.1.2",))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

Address = str
Ttl = int
SrvTarget = tuple[int, int, int, str]          # (priority, weight, port, target name)


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class View:
    a: Mapping[str, tuple[tuple[Address, ...], Ttl]] = field(default_factory=lambda: _frozen({}))
    ptr: Mapping[str, tuple[str, Ttl]] = field(default_factory=lambda: _frozen({}))
    srv: Mapping[str, tuple[tuple[SrvTarget, ...], Ttl]] = field(default_factory=lambda: _frozen({}))
    forward: bool = True            # False: only internal networks, unknown names get SERVFAIL
    upstreams: tuple[str, ...] = ()  # "addr" or "addr:port", at most 3 are used, in order

    def knows(self, name: str) -> bool:
        """True when `name` (lower-case, no trailing dot) has any record here, of any type."""
        return name in self.a or name in self.srv or name in self.ptr

"""Names of the kernel objects mesh makes, pure. Everything carries the `mesh-`/`mh` prefix so cleanup
and leak checks are exact (DESIGN.md §3).

- network namespaces: `mesh-<task>` when the host is the root namespace, `<host>-<task>` when the
  host namespace is itself named `mesh-…`, else `mesh-<host>-<task>`;
- links (15 characters at most): `mhb` + 12 hex for a bridge, `mhv` + 12 hex for a veth host side,
  `mhm` + 12 hex for a macvlan before it moves into its sandbox, `mhg` + 12 hex for the node side
  of a node's link to its ingress namespace.
"""
from __future__ import annotations

import hashlib

NETNS_PREFIX = "mesh-"
LINK_PREFIX = "mh"
IFNAME_MAX = 15


def _digest(*parts: str, size: int = 12) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:size]


def scope_of(host_netns: str | None) -> str:
    """A short label of the host namespace, used to keep two daemons' objects apart."""
    return host_netns or "root"


def sandbox_netns(host_netns: str | None, task: str) -> str:
    if not host_netns:
        return f"{NETNS_PREFIX}{task}"
    if host_netns.startswith(NETNS_PREFIX):
        return f"{host_netns}-{task}"
    return f"{NETNS_PREFIX}{host_netns}-{task}"


def sandbox_prefix(host_netns: str | None) -> str:
    """Every sandbox of this host namespace starts with this (used by the sweep)."""
    return sandbox_netns(host_netns, "")


def bridge_link(host_netns: str | None, network: str) -> str:
    return "mhb" + _digest(scope_of(host_netns), network)


def veth_link(sandbox: str, network: str) -> str:
    return "mhv" + _digest(sandbox, network)


def uplink_link(sandbox: str) -> str:
    """The node side of the veth pair between a node and its ingress namespace."""
    return "mhg" + _digest(sandbox)


def macvlan_link(sandbox: str, network: str) -> str:
    return "mhm" + _digest(sandbox, network)


def container_ifname(index: int) -> str:
    return f"eth{index}"


def short_id(task_id: str) -> str:
    return task_id[:12]


def task_id(stack: str, task: str, nonce: str) -> str:
    return hashlib.sha256(f"{stack}/{task}/{nonce}".encode()).hexdigest()

"""A sandbox's /etc/hosts and /etc/resolv.conf, pure. `ip netns exec` bind-mounts the files of
/etc/netns/<sandbox>/ over /etc, so every process of the sandbox sees them (mesh.agent writes them).

Sandboxes on a user-defined network are where the embedded resolver (nameserver 127.0.0.11) lives:
`TaskState.embedded_dns` marks them; render_resolv_conf takes the nameservers to write.
"""
from __future__ import annotations

from mesh.state import TaskState

FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")     # Docker's choice when the host has only loopback


def render_hosts(task: TaskState) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    names = " ".join(dict.fromkeys(n for n in (task.hostname, task.name) if n))
    lines += [f"{e.address}\t{names}" for e in task.endpoints]
    lines += [f"{address}\t{hostnames}" for address, hostnames in task.hosts]
    return "\n".join(lines) + "\n"


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, search domains, options) of a resolv.conf."""
    servers, search, options = [], [], []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) < 2:
            continue
        if parts[0] == "nameserver":
            servers.append(parts[1])
        elif parts[0] in ("search", "domain"):
            search = parts[1:]
        elif parts[0] == "options":
            options += parts[1:]
    return servers, search, options


def _is_loopback(server: str) -> bool:
    return server.startswith("127.") or server == "::1"


def upstream_servers(host_text: str) -> tuple[str, ...]:
    """The host's nameservers minus loopback ones: where the embedded resolver forwards by default."""
    return tuple(s for s in parse_resolv_conf(host_text)[0] if not _is_loopback(s))


def render_resolv_conf(host_text: str, embedded: bool = False) -> str:
    """With the embedded resolver: 127.0.0.11, ndots:0 and the host's search list. Without: the
    host's resolv.conf minus loopback nameservers (they mean nothing inside a sandbox)."""
    servers, search, options = parse_resolv_conf(host_text)
    if embedded:
        lines = ["nameserver 127.0.0.11"] + (["search " + " ".join(search)] if search else [])
        return "\n".join(lines + ["options ndots:0"]) + "\n"
    servers = [s for s in servers if not _is_loopback(s)] or list(FALLBACK_NAMESERVERS)
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"

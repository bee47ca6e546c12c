"""Does the running kernel have what the VM tests need? Used by tests/vm/test_guest_kernel.py (to skip
on a host that lacks it) and by `tests/vm/run.py --need-vm` (to decide whether `make test` boots the
VM). Stdlib only.

Each probe works in a scratch network namespace of its own (`meshvm-probe-…`, not `mesh-` so the
session leak check never sees it) and removes it; nothing is made in the machine's root namespace.
A probe returns None when the feature is usable, else a sentence saying why not.
"""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import subprocess


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _said(proc: subprocess.CompletedProcess) -> str:
    """What a command said, on one line."""
    return " ".join((proc.stderr or proc.stdout).split()).rstrip(".")


def _try_modprobe(*names: str) -> None:
    """Load modules when this machine can (a stock kernel); quietly nothing when it has no modprobe."""
    modprobe = shutil.which("modprobe") or ("/sbin/modprobe" if os.path.exists("/sbin/modprobe") else None)
    if modprobe:
        for name in names:
            _run([modprobe, "-q", name])


class _ScratchNetns:
    def __init__(self) -> None:
        self.name = f"meshvm-probe-{secrets.token_hex(3)}"

    def __enter__(self) -> str:
        proc = _run(["ip", "netns", "add", self.name])
        if proc.returncode != 0:
            raise RuntimeError(f"ip netns add {self.name}: {proc.stderr.strip()}")
        return self.name

    def __exit__(self, *exc) -> None:
        _run(["ip", "netns", "del", self.name])


def vlan_problem() -> str | None:
    """None when 802.1Q sub-interfaces can be made (a VLAN on a veth, in a scratch namespace)."""
    _try_modprobe("8021q")
    with _ScratchNetns() as ns:
        made = _run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        if made.returncode != 0:
            return f"cannot make a veth to probe 802.1Q on: {_said(made)}"
        vlan = _run(["ip", "-n", ns, "link", "add", "link", "p0", "name", "p0.9", "type", "vlan", "id", "9"])
        if vlan.returncode != 0:
            return (f"kernel {platform.release()} has no 802.1Q VLANs (CONFIG_VLAN_8021Q unset or the "
                    f"8021q module not loadable): ip link add type vlan said: {_said(vlan)}")
        detail = _run(["ip", "-n", ns, "-d", "link", "show", "p0.9"]).stdout
        if "802.1Q id 9" not in detail:
            return f"a VLAN link was made but does not look like one: {detail.strip()}"
    return None


def ip_vs_problem() -> str | None:
    """None when IPVS works: a virtual service made with ipvsadm in a scratch namespace is listed."""
    _try_modprobe("ip_vs", "ip_vs_rr")
    ipvsadm = shutil.which("ipvsadm") or ("/usr/sbin/ipvsadm" if os.path.exists("/usr/sbin/ipvsadm") else None)
    if not ipvsadm:
        if not os.path.exists("/proc/net/ip_vs"):
            return (f"kernel {platform.release()} has no ip_vs (CONFIG_IP_VS unset or the module not "
                    f"loadable) and ipvsadm is not installed")
        return "ipvsadm is not installed (apt-get install ipvsadm)"
    with _ScratchNetns() as ns:
        add = _run(["ip", "netns", "exec", ns, ipvsadm, "-A", "-t", "10.0.0.1:80", "-s", "rr"])
        if add.returncode != 0:
            return (f"kernel {platform.release()} has no usable ip_vs (CONFIG_IP_VS unset or the module "
                    f"not loadable): ipvsadm -A said: {_said(add)}")
        listing = _run(["ip", "netns", "exec", ns, ipvsadm, "-Ln"]).stdout
        if "10.0.0.1:80 rr" not in listing:
            return f"ipvsadm -Ln does not list the virtual service it just made:\n{listing}"
    return None


def problems() -> list[str]:
    """Every reason the running kernel cannot run the VM-only tests; empty when it can."""
    return [p for p in (vlan_problem(), ip_vs_problem()) if p]

"""Self-check of the VM harness (tests/vm/run.py): the kernel the tests run on has 802.1Q VLANs and
IPVS. The harness runs this file first inside the VM and runs the selected tests only if it passes,
so a guest kernel without them can never turn into tests that quietly take their fallback path.

On a host kernel without 8021q or ip_vs (this machine's has neither, and no modules) these tests are
skipped with the reason; `make test-vm` runs them where they apply. Inside the VM (MESH_VM_GUEST=1)
they are never skipped: a missing feature fails.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import pytest

# tests/ is on pythonpath (pyproject), tests/vm is not: load the sibling module by its path.
_spec = importlib.util.spec_from_file_location("mesh_vm_kernelcheck", Path(__file__).with_name("kernelcheck.py"))
kernelcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernelcheck)

IN_GUEST = os.environ.get("MESH_VM_GUEST") == "1"


def _unless_usable(problem: str | None) -> None:
    if problem and not IN_GUEST:
        pytest.skip(f"{problem}. This test runs inside the QEMU VM with a stock Debian kernel: "
                    f"make test-vm")
    assert problem is None, problem


def test_8021q_vlan_sub_interfaces_can_be_made():
    _unless_usable(kernelcheck.vlan_problem())


def test_ip_vs_virtual_service_is_listed_by_ipvsadm():
    _unless_usable(kernelcheck.ip_vs_problem())


def test_guest_runs_the_kernel_the_harness_booted():
    if not IN_GUEST:
        pytest.skip("only meaningful inside the VM (MESH_VM_GUEST=1), run by make test-vm")
    assert platform.release() == os.environ["MESH_VM_KVER"]
    assert os.path.isdir(f"/lib/modules/{platform.release()}/kernel")

"""The layout's guardrail: `import dns` is dnspython, `import mesh.dns` is ours (DESIGN.md §3)."""
from pathlib import Path

import dns
import dns.resolver

import mesh.dns
import mesh.lb

ROOT = Path(__file__).resolve().parents[2]


def test_dns_is_dnspython_and_mesh_dns_is_ours():
    assert Path(mesh.dns.__file__).resolve() == ROOT / "dns" / "__init__.py"
    assert Path(mesh.lb.__file__).resolve() == ROOT / "lb" / "__init__.py"
    assert Path(dns.__file__).resolve() != ROOT / "dns" / "__init__.py"
    assert "site-packages" in Path(dns.__file__).resolve().parts
    assert hasattr(dns.resolver, "Resolver")


def test_no_module_in_dns_shadows_a_dnspython_module():
    clashing = {"resolver", "zone", "message", "query", "name", "version"}
    ours = {p.stem for p in (ROOT / "dns").glob("*.py")}
    assert not ours & clashing

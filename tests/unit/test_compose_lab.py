"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine: the file parses as a
compose file (compose-spec basics: known keys, defined networks, volumes and dependencies, static
addresses inside their subnet), the image builds from files that exist, and every command the
containers run (and every command the file tells users to run) is a real `mesh` command."""
from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path

import pytest
import yaml

from mesh.cli import build_parser, cmd_agent, cmd_manager
from mesh.store import open_store

ROOT = Path(__file__).resolve().parents[2]
TOP_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "privileged", "cap_add",
                "cap_drop", "restart", "depends_on", "volumes", "networks", "hostname", "healthcheck",
                "ports", "working_dir", "init", "sysctls", "devices", "pull_policy"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services(compose) -> dict:
    return compose["services"]


def test_it_is_a_compose_file(compose):
    assert set(compose) - TOP_KEYS <= {k for k in compose if k.startswith("x-")}
    for name, svc in services(compose).items():
        assert "image" in svc or "build" in svc, name
        unknown = {k for k in svc if not k.startswith("x-")} - SERVICE_KEYS
        assert not unknown, f"services.{name}: {unknown}"
        assert isinstance(svc.get("command", []), list), f"services.{name}.command: use the list form"
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services(compose)) - {name}, name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("/", ".")) or source in compose.get("volumes", {}), volume
        assert set(svc.get("networks", {})) <= set(compose.get("networks", {})), name


def test_static_addresses_are_unique_and_inside_their_subnet(compose):
    seen = {}
    for name, svc in services(compose).items():
        for net, cfg in svc["networks"].items():
            subnet = ipaddress.ip_network(compose["networks"][net]["ipam"]["config"][0]["subnet"])
            address = ipaddress.ip_address(cfg["ipv4_address"])
            assert address in subnet, name
            assert address not in seen, f"{name} and {seen.get(address)}"
            seen[address] = name


def test_three_privileged_agents_a_manager_etcd_and_a_client(compose):
    svcs = services(compose)
    agents = [n for n, s in svcs.items() if s.get("command", [None, None])[:2] == ["mesh", "agent"]]
    assert len(agents) == 3
    for name in agents:
        svc = svcs[name]
        assert svc["privileged"] is True and {"NET_ADMIN", "SYS_ADMIN"} <= set(svc["cap_add"])
    assert [n for n, s in svcs.items() if s.get("command", [])[:2] == ["mesh", "manager"]] == ["manager"]
    assert "etcd" in svcs and "client" in svcs
    shared = {v for v in svcs["manager"]["volumes"]} & {v for v in svcs["client"]["volumes"]}
    assert any(v.endswith(":/run/mesh") for v in shared), "the client must see the manager's socket"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, out, pending = path.read_text().splitlines(), [], ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_the_image_builds_from_files_that_exist(compose):
    builds = {(s["build"]["context"], s["build"]["dockerfile"])
              for s in services(compose).values() if "build" in s}
    assert len(builds) == 1
    context, dockerfile = builds.pop()
    context = ROOT / context
    steps = dockerfile_instructions(context / dockerfile)
    assert steps[0][0] == "FROM"
    copies = [shlex.split(rest) for word, rest in steps if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        for source in args[:-1]:
            assert (context / source).exists(), f"{dockerfile}: COPY {source}: no such file"
    # what pip installs must be in the image: the packages pyproject maps
    copied = {Path(a).parts[0] for args in copies for a in args[:-1]}
    assert {"pyproject.toml", "README.md", "mesh", "dns", "lb"} <= copied
    assert any(w == "RUN" and "pip install" in r for w, r in steps)


def mesh_commands(compose) -> list[list[str]]:
    out = [s["command"] for s in services(compose).values() if s.get("command", [None])[0] == "mesh"]
    return out + compose["x-usage"]


def test_every_command_is_a_real_mesh_command(compose):
    parser = build_parser()
    commands = mesh_commands(compose)
    assert len(commands) >= 4 + len(compose["x-usage"])
    for argv in commands:
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"`{' '.join(argv)}` is not accepted by mesh's parser")
        if args.func in (cmd_agent, cmd_manager):
            open_store(args.store)                       # a valid etcd:// URL (no connection made)


def test_agents_register_their_own_address_and_reach_etcd(compose):
    svcs = services(compose)
    etcd_address = svcs["etcd"]["networks"]["underlay"]["ipv4_address"]
    parser = build_parser()
    names = set()
    for name, svc in svcs.items():
        if svc.get("command", [None])[0] != "mesh":
            continue
        args = parser.parse_args(svc["command"][1:])
        assert args.store == f"etcd://{etcd_address}:2379", name
        if args.func is cmd_agent:
            assert args.address == svc["networks"]["underlay"]["ipv4_address"], name
            names.add(args.node_name)
    assert len(names) == 3

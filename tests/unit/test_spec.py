"""Stack files, pure: compose-spec YAML -> mesh.model.Stack, variable substitution, warnings, the
JSON round trip, and one error per invalid input naming the compose path of the problem."""
import json
import textwrap

import pytest

from mesh.errors import SpecError
from mesh.model import (DEFAULT_NETWORK, Attachment, Healthcheck, IpamConfig, Link, Network, Placement,
                        Port)
from mesh.spec import load_stack, load_stack_file, stack_from_dict, stack_to_dict


def load(text: str, env: dict | None = None, **kw):
    return load_stack(textwrap.dedent(text), env=env or {}, **kw)


def problems(text: str, env: dict | None = None) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        load(text, env)
    return caught.value.problems


def ports_of(entries: str) -> tuple[Port, ...]:
    return load(f"services: {{web: {{ports: {entries}}}}}").services["web"].ports


FULL = """
    name: shop
    version: "3.9"
    x-common: &common {restart: always}
    services:
      web:
        <<: *common
        command: python3 -m http.server ${WEB_PORT:-80}
        hostname: web-host
        networks:
          front: {aliases: [www, site]}
          back: {ipv4_address: 10.20.0.10}
        ports: ["8080:80", {target: 443, published: 8443, mode: host}]
        environment: {LEVEL: debug, WORKERS: 4, STRICT: true}
        healthcheck:
          test: [CMD, curl, -f, http://localhost/]
          interval: 5s
          retries: 5
        deploy:
          placement: {constraints: [node.role==manager], max_replicas_per_node: 1}
        x-mesh: {affinity: client-ip, drain_timeout: 3}
      api:
        command: [sleep, infinity]
        networks: [back]
        links: ["db:database"]
        deploy: {replicas: 3, endpoint_mode: dnsrr}
      db:
        network_mode: bridge
        container_name: the-db
        restart: on-failure:5
    networks:
      front: {}
      back:
        driver: bridge
        internal: true
        ipam:
          driver: default
          config: [{subnet: 10.20.0.0/24, gateway: 10.20.0.1, ip_range: 10.20.0.128/25}]
      lan:
        driver: macvlan
        driver_opts: {parent: eth0, mtu: 1400}
"""


def test_full_stack_is_read_field_by_field_and_survives_json():
    stack = load(FULL)
    assert stack.name == "shop" and list(stack.services) == ["web", "api", "db"]
    web, api, db = stack.services["web"], stack.services["api"], stack.services["db"]
    assert web.command == ("python3", "-m", "http.server", "80")
    assert web.restart == "always" and web.hostname == "web-host"
    assert web.networks == (Attachment("front", ("www", "site")), Attachment("back", (), "10.20.0.10"))
    assert web.ports == (Port(80, 8080), Port(443, 8443, mode="host"))
    assert web.environment == {"LEVEL": "debug", "WORKERS": "4", "STRICT": "true"}
    assert web.healthcheck == Healthcheck(("curl", "-f", "http://localhost/"), interval=5.0, retries=5)
    assert web.placement == Placement(("node.role==manager",), 1)
    assert web.extensions == {"affinity": "client-ip", "drain_timeout": 3}
    assert api.links == (Link("db", "database"),) and api.replicas == 3 and api.endpoint_mode == "dnsrr"
    assert db.network_mode == "bridge" and db.networks == () and db.restart == "on-failure"
    assert stack.networks["back"] == Network("back", internal=True, ipam=(
        IpamConfig("10.20.0.0/24", "10.20.0.1", "10.20.0.128/25"),))
    assert stack.networks["lan"].driver_opts == {"parent": "eth0", "mtu": "1400"}
    assert DEFAULT_NETWORK not in stack.networks        # nobody uses it
    assert stack.warnings == ()
    wire = json.loads(json.dumps(stack_to_dict(stack)))
    assert stack_from_dict(wire) == stack
    assert stack_from_dict(stack_to_dict(stack)) == stack


def test_round_trip_keeps_an_implicit_default_network_and_no_healthcheck():
    stack = load("services: {a: {}, b: {network_mode: 'service:a', command: 'sleep 1'}}")
    assert stack_from_dict(json.loads(json.dumps(stack_to_dict(stack)))) == stack


def test_malformed_stack_document_is_a_spec_error():
    with pytest.raises(SpecError, match="malformed stack document"):
        stack_from_dict({"name": "x", "services": {"a": {"nonsense": 1}}, "networks": {}})


# ---- networks -----------------------------------------------------------------------------------

def test_implicit_default_network():
    stack = load("services: {web: {}, api: {networks: [default]}}")
    assert stack.networks == {DEFAULT_NETWORK: Network(DEFAULT_NETWORK)}
    assert stack.services["web"].networks == (Attachment(DEFAULT_NETWORK),)
    assert stack.services["api"].networks == (Attachment(DEFAULT_NETWORK),)


def test_a_default_network_defined_in_the_file_is_kept_as_written():
    stack = load("services: {web: {}}\nnetworks: {default: {internal: true}}")
    assert stack.networks == {DEFAULT_NETWORK: Network(DEFAULT_NETWORK, internal=True)}


@pytest.mark.parametrize("service", ["{network_mode: bridge}", "{network_mode: host}",
                                     "{networks: [front]}"])
def test_no_default_network_when_nobody_joins_it(service):
    stack = load(f"services: {{web: {service}}}\nnetworks: {{front: }}")
    assert DEFAULT_NETWORK not in stack.networks
    assert stack.networks["front"] == Network("front")      # a null network takes every default


def test_network_modes():
    stack = load("""
        services:
          a: {network_mode: host}
          b: {network_mode: none}
          c: {network_mode: "service:a"}
          d: {network_mode: "container:some.task"}
          e: {network_mode: bridge, ports: ["80"]}
        """)
    assert [s.network_mode for s in stack.services.values()] == [
        "host", "none", "service:a", "container:some.task", "bridge"]
    assert all(s.networks == () for s in stack.services.values())


def test_external_reserved_network_is_allowed():
    stack = load("services: {web: {networks: [bridge]}}\nnetworks: {bridge: {external: true}}")
    assert stack.networks["bridge"].external
    assert stack.services["web"].networks == (Attachment("bridge"),)


# ---- ports --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, expected", [
    ("80", Port(80)),
    ('"80"', Port(80)),
    ('"8080:80"', Port(80, 8080)),
    ('"8080:80/udp"', Port(80, 8080, "udp")),
    ('"53/udp"', Port(53, None, "udp")),
    ('"127.0.0.1:8080:80"', Port(80, 8080, host_ip="127.0.0.1")),
    ('"127.0.0.1::80"', Port(80, None, host_ip="127.0.0.1")),
    ("{target: 80}", Port(80)),
    ("{target: 80, published: 8080, protocol: udp, mode: host, host_ip: 10.0.0.1}",
     Port(80, 8080, "udp", "host", "10.0.0.1")),
    ('{target: 80, published: "8080", name: web, app_protocol: http}', Port(80, 8080, name="web")),
])
def test_port_forms(entry, expected):
    assert ports_of(f"[{entry}]") == (expected,)


def test_port_ranges_expand():
    assert ports_of('["8000-8001:80-81/udp"]') == (Port(80, 8000, "udp"), Port(81, 8001, "udp"))
    assert ports_of('["9000-9001"]') == (Port(9000), Port(9001))
    assert ports_of('[{target: "80-81", published: "8000-8001"}]') == (Port(80, 8000), Port(81, 8001))


# ---- environment, command, restart, placement ---------------------------------------------------

def test_environment_mapping_converts_scalars():
    env = load("services: {a: {environment: {S: x, I: 1, F: 1.5, B: false, N: }}}").services["a"].environment
    assert env == {"S": "x", "I": "1", "F": "1.5", "B": "false", "N": ""}


def test_environment_list_and_pass_through_from_the_host():
    env = load("services: {a: {environment: [A=1, B=x=y, C=, HOME, MISSING]}}",
               {"HOME": "/root"}).services["a"].environment
    assert env == {"A": "1", "B": "x=y", "C": "", "HOME": "/root"}


@pytest.mark.parametrize("command, argv", [
    ("echo hello world", ("echo", "hello", "world")),
    ("""sh -c 'echo "a b"; exit 3'""", ("sh", "-c", 'echo "a b"; exit 3')),
    ("[sleep, 10]", ("sleep", "10")),
    ('["echo", "a b"]', ("echo", "a b")),
    ('""', ()),
])
def test_command_forms(command, argv):
    assert load(f"services: {{a: {{command: {command}}}}}").services["a"].command == argv


def test_missing_command_is_an_idle_process():
    assert load("services: {a: {}}").services["a"].command == ()


@pytest.mark.parametrize("written, policy", [
    ("always", "always"), ("unless-stopped", "unless-stopped"), ("on-failure", "on-failure"),
    ('"on-failure:3"', "on-failure"), ('"no"', "no"), ("no", "no"),   # unquoted no is YAML false
])
def test_restart_policies(written, policy):
    assert load(f"services: {{a: {{restart: {written}}}}}").services["a"].restart == policy


@pytest.mark.parametrize("condition, policy", [("any", "always"), ("on-failure", "on-failure"),
                                               ("none", "no")])
def test_swarms_restart_policy_condition_is_the_restart_policy_and_wins_over_restart(condition, policy):
    stack = load(f"services: {{a: {{restart: unless-stopped, deploy: {{restart_policy: "
                 f"{{condition: {condition}, delay: 5s, max_attempts: 3}}}}}}}}")
    assert stack.services["a"].restart == policy
    assert stack.warnings == ("ignored fields (mesh does not use them): "
                              "services.a.deploy.restart_policy.delay, "
                              "services.a.deploy.restart_policy.max_attempts",)
    assert load("services: {a: {restart: always, deploy: {restart_policy: {delay: 5s}}}}"
                ).services["a"].restart == "always"          # no condition: restart: says


def test_placement_constraints_are_validated_and_normalised():
    svc = load("""
        services:
          a:
            deploy:
              placement:
                constraints: ["node.hostname == node-1", "node.role!=worker", "node.labels.zone==eu-1",
                              "node.id==abc123"]
        """).services["a"]
    assert svc.placement.constraints == ("node.hostname==node-1", "node.role!=worker",
                                         "node.labels.zone==eu-1", "node.id==abc123")


def test_links_default_their_alias_to_the_service_name():
    svc = load("services: {a: {links: [b, 'c:see']}, b: {}, c: {}}").services["a"]
    assert svc.links == (Link("b", "b"), Link("c", "see"))


def test_global_mode():
    svc = load("services: {a: {deploy: {mode: global}}}").services["a"]
    assert svc.mode == "global" and svc.replicas == 1


# ---- healthcheck --------------------------------------------------------------------------------

@pytest.mark.parametrize("test, argv", [
    ("[CMD, pg_isready, -U, app]", ("pg_isready", "-U", "app")),
    ('[CMD-SHELL, "curl -f localhost || exit 1"]', ("sh", "-c", "curl -f localhost || exit 1")),
    ('"curl -f localhost"', ("sh", "-c", "curl -f localhost")),
])
def test_healthcheck_test_forms(test, argv):
    check = load(f"services: {{a: {{healthcheck: {{test: {test}}}}}}}").services["a"].healthcheck
    assert check == Healthcheck(argv)             # compose's defaults: 30s, 30s, 3 retries, 0s


@pytest.mark.parametrize("healthcheck", ["{test: [NONE]}", "{disable: true}", "{disable: true, test: [NONE]}"])
def test_healthcheck_disabled(healthcheck):
    assert load(f"services: {{a: {{healthcheck: {healthcheck}}}}}").services["a"].healthcheck is None


@pytest.mark.parametrize("duration, seconds", [
    ("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5), ("2m", 120.0),
    ("1h2m3s", 3723.0), ("250us", 0.00025),
])
def test_durations(duration, seconds):
    check = load(f"services: {{a: {{healthcheck: {{test: [CMD, 'true'], interval: {duration}, "
                 f"timeout: {duration}, start_period: {duration}}}}}}}").services["a"].healthcheck
    assert check.interval == pytest.approx(seconds) and check.timeout == pytest.approx(seconds)
    assert check.start_period == pytest.approx(seconds)


# ---- variable substitution ----------------------------------------------------------------------

def test_variables_defaults_and_escapes():
    svc = load("""
        services:
          a:
            command: ["$$HOME", "$USER", "${USER}", "${EMPTY:-soft}", "${EMPTY-hard}", "${UNSET-hard}",
                      "${USER:+set}", "${UNSET:+set}", "${UNSET:-${USER}-x}", "cost: $$5"]
            environment: {REPLICAS: "${N}"}
            deploy: {replicas: "${N}"}
        """, {"USER": "ann", "EMPTY": "", "N": "2"}).services["a"]
    assert svc.command == ("$HOME", "ann", "ann", "soft", "", "hard", "set", "", "ann-x", "cost: $5")
    assert svc.replicas == 2 and svc.environment == {"REPLICAS": "2"}


def test_unset_variable_becomes_empty_and_is_warned_about_once():
    stack = load("services: {a: {command: 'echo x$NOPE y', hostname: 'h${NOPE}'}}")
    assert stack.services["a"].command == ("echo", "x", "y") and stack.services["a"].hostname == "h"
    assert stack.warnings == ("variable NOPE is not set: using an empty string (first used at "
                              "services.a.command)",)


def test_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("MESH_SPEC_TEST_CMD", "from-os")
    stack = load_stack("services: {a: {command: $MESH_SPEC_TEST_CMD}}")
    assert stack.services["a"].command == ("from-os",)


@pytest.mark.parametrize("reference, fragment", [
    ("${TAG:?set TAG first}", "required variable TAG is missing a value: set TAG first"),
    ("${TAG?}", "required variable TAG is missing a value"),
    ("${EMPTY:?}", "required variable EMPTY"),
    ("5$", "write '$$' for a literal '$'"),
    ("${1X}", "invalid variable reference"),
    ("${TAG", "unterminated"),
])
def test_variable_errors_name_the_path(reference, fragment):
    found = problems(f"services: {{web: {{hostname: x, command: ['run', '{reference}']}}}}", {"EMPTY": ""})
    assert any(path == "services.web.command[1]" and fragment in msg for path, msg in found), found


def test_values_are_substituted_but_keys_are_not():
    stack = load("services: {a: {x-mesh: {$A: $A, list: [$A, 1]}}}", {"A": "v"})
    assert stack.services["a"].extensions == {"$A": "v", "list": ["v", 1]}


# ---- warnings -----------------------------------------------------------------------------------

def test_ignored_fields_and_x_mesh_keys_mesh_does_not_read_make_one_warning():
    stack = load("""
        version: "3"
        x-defaults: {a: 1}
        services:
          web:
            image: nginx
            volumes: [./data:/data]
            x-notes: whatever
            x-mesh: {k: v}
            ports: [{target: 80, name: http, app_protocol: http, x-thing: 1}]
            deploy: {replicas: 1, resources: {limits: {cpus: "1"}}}
            networks: {front: {priority: 10}}
        networks:
          front: {name: real-front, foo: 1}
        volumes: {data: {}}
        """)
    assert stack.warnings == ("ignored fields (mesh does not use them): volumes, services.web.x-mesh.k, "
                              "services.web.image, "
                              "services.web.volumes, services.web.networks.front.priority, "
                              "services.web.deploy.resources, networks.front.name, networks.front.foo",)


def test_warnings_list_ignored_fields_and_unset_variables_separately():
    stack = load("services: {a: {user: root, command: $X}}")
    assert stack.warnings == ("ignored fields (mesh does not use them): services.a.user",
                              "variable X is not set: using an empty string (first used at services.a.command)")


# ---- names --------------------------------------------------------------------------------------

def test_stack_name_from_argument_or_file():
    assert load("services: {a: {}}", name="My App!").name == "myapp"
    assert load("name: given\nservices: {a: {}}", name="other").name == "given"


def test_load_stack_file_names_the_stack_after_its_folder(tmp_path):
    folder = tmp_path / "My_Project.v2"
    folder.mkdir()
    (folder / "stack.yaml").write_text("services: {a: {command: 'echo $GREETING'}}\n")
    stack = load_stack_file(str(folder / "stack.yaml"), env={"GREETING": "hi"})
    assert stack.name == "my_projectv2" and stack.directory == str(folder)
    assert stack.services["a"].command == ("echo", "hi")
    (folder / "named.yaml").write_text("name: shop\nservices: {a: {}}\n")
    assert load_stack_file(str(folder / "named.yaml"), env={}).name == "shop"


def test_unreadable_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read stack file"):
        load_stack_file(str(tmp_path / "nope.yaml"))


# ---- invalid inputs: the exact path and a key word of the message -------------------------------

INVALID = [
    # ports
    ("services: {web: {ports: ['8080:70000']}}", "services.web.ports[0].target", "from 1 to 65535"),
    ("services: {web: {ports: [0]}}", "services.web.ports[0].target", "got 0"),
    ("services: {web: {ports: ['80', 'abc:80']}}", "services.web.ports[1].published", "got 'abc'"),
    ("services: {web: {ports: [{target: 80, published: x}]}}", "services.web.ports[0].published",
     "expected an integer from 1 to 65535"),
    ("services: {web: {ports: [{target: true}]}}", "services.web.ports[0].target", "got true"),
    ("services: {web: {ports: [{published: 80}]}}", "services.web.ports[0].target", "required"),
    ("services: {web: {ports: ['8000-8002:80-81']}}", "services.web.ports[0]", "differ in length"),
    ("services: {web: {ports: ['81-80']}}", "services.web.ports[0].target", "ends before it starts"),
    ("services: {web: {ports: ['8080:80/sctp']}}", "services.web.ports[0].protocol", "tcp, udp"),
    ("services: {web: {ports: [{target: 80, mode: local}]}}", "services.web.ports[0].mode", "ingress, host"),
    ("services: {web: {ports: ['1:2:3:4']}}", "services.web.ports[0]", "[HOST_IP:]"),
    ("services: {web: {ports: ['localhost:80:80']}}", "services.web.ports[0].host_ip", "IPv4"),
    ("services: {web: {ports: [99999]}}", "services.web.ports[0]", "base-60"),
    ("services: {web: {ports: ['8080:80']}, api: {ports: ['9000:90', '8080:81']}}",
     "services.api.ports[1].published", "already published by services.web.ports[0]"),
    ("services: {web: {ports: ['8080:80', '8080:81/udp', {target: 82, published: 8080}]}}",
     "services.web.ports[2].published", "8080/tcp is already published by services.web.ports[0]"),
    ("services: {web: {ports: ['8000-8005:80-85']}, api: {ports: ['8003:80']}}",
     "services.api.ports[0].published", "8003/tcp"),
    ("services: {web: {ports: [{target: 80, published: 8080, mode: host}]}, api: {ports: ['8080:80']}}",
     "services.api.ports[0].published", "8080/tcp is already published by services.web.ports[0]"),
    ("services: {web: {ports: [{target: 80, published: 8080, mode: host},"
     " {target: 81, published: 8080, mode: host}]}}",
     "services.web.ports[1].published", "8080/tcp is already published by services.web.ports[0]"),
    ("services: {a: {ports: [{target: 80, published: 8080, mode: host}]}, b: {ports: ["
     "{target: 80, published: 8080, mode: host}, {target: 81, published: 8080, mode: host}]}}",
     "services.b.ports[1].published", "8080/tcp is already published by services.b.ports[0]"),
    ("services: {web: {ports: ['80'], deploy: {endpoint_mode: dnsrr}}}",
     "services.web.deploy.endpoint_mode", "ingress mode"),
    ("services: {web: {network_mode: host, ports: ['80:80']}}", "services.web.ports", "network_mode: host"),
    ("services: {web: {network_mode: none, ports: ['80']}}", "services.web.ports", "no network"),
    ("services: {web: {}, side: {network_mode: 'service:web', ports: ['80']}}", "services.side.ports",
     "publish ports on that service"),
    # networks of a service
    ("services: {web: {networks: [front]}}", "services.web.networks[0]", "'front' is not defined"),
    ("services: {web: {networks: {front: {}, back: }}}\nnetworks: {front: {}}", "services.web.networks.back",
     "defined: front"),
    ("services: {web: {networks: [front, front]}}\nnetworks: {front: {}}", "services.web.networks[1]",
     "listed twice"),
    ("services: {web: {networks: [front], network_mode: host}}\nnetworks: {front: {}}",
     "services.web.network_mode", "cannot be used together"),
    ("services: {web: {network_mode: 'service:web'}}", "services.web.network_mode", "its own network"),
    ("services: {web: {network_mode: 'service:db'}}", "services.web.network_mode", "'db' is not defined"),
    ("services: {a: {network_mode: host}, b: {network_mode: 'service:a'}, c: {network_mode: 'service:b'}}",
     "services.c.network_mode", "borrows a network stack"),
    ("services: {web: {network_mode: bogus}}", "services.web.network_mode", "container:NAME"),
    ("services: {web: {network_mode: 'container:'}}", "services.web.network_mode", "got 'container:'"),
    ("services: {web: {networks: 5}}", "services.web.networks", "list of network names or a mapping"),
    ("services: {web: {networks: {front: {ipv4_address: 10.0.0.300}}}}\nnetworks: {front: }",
     "services.web.networks.front.ipv4_address", "IPv4 address"),
    ("services: {web: {networks: {front: {ipv4_address: 10.1.0.5}}, deploy: {replicas: 2}}}\n"
     "networks: {front: {ipam: {config: [{subnet: 10.1.0.0/24}]}}}",
     "services.web.networks.front.ipv4_address", "replicas: 2"),
    ("services: {web: {networks: {front: {ipv4_address: 10.2.0.5}}}}\n"
     "networks: {front: {ipam: {config: [{subnet: 10.1.0.0/24}]}}}",
     "services.web.networks.front.ipv4_address", "outside the subnet"),
    ("services: {web: {networks: {front: {ipv4_address: 10.2.0.5}}}}\nnetworks: {front: {}}",
     "services.web.networks.front.ipv4_address", "needs a subnet"),
    ("services: {web: {networks: {front: {aliases: ['bad alias']}}}}\nnetworks: {front: }",
     "services.web.networks.front.aliases[0]", "network alias"),
    # links
    ("services: {web: {links: [db]}}", "services.web.links[0]", "'db' is not defined"),
    ("services: {web: {links: ['web:me']}}", "services.web.links[0]", "link to itself"),
    ("services: {web: {links: ['a:b:c']}, a: {}}", "services.web.links[0]", "SERVICE:ALIAS"),
    # names
    ("services: {web: {container_name: x, deploy: {replicas: 2}}}", "services.web.container_name",
     "one replica"),
    ("services: {web: {container_name: x}, api: {container_name: x}}", "services.api.container_name",
     "already taken by services.web"),
    ("services: {web: {}, api: {container_name: web.1}}", "services.api.container_name", "already taken"),
    ("services: {web: {container_name: ingress}}", "services.web.container_name", "reserved"),
    ("services: {web: {hostname: " + "h" * 64 + "}}", "services.web.hostname", "at most 63"),
    ("services: {web: {container_name: '-x'}}", "services.web.container_name", "starting with a letter"),
    ("services: {'we b': {}}", "services.we b", "invalid service name"),
    ("name: Shop\nservices: {web: {}}", "name", "lower-case"),
    # deploy
    ("services: {web: {deploy: {replicas: -1}}}", "services.web.deploy.replicas", "non-negative"),
    ("services: {web: {deploy: {replicas: true}}}", "services.web.deploy.replicas", "got true"),
    ("services: {web: {deploy: {replicas: two}}}", "services.web.deploy.replicas",
     "expected a non-negative integer, got 'two'"),
    ("services: {web: {deploy: {mode: global, replicas: 2}}}", "services.web.deploy.replicas", "global"),
    ("services: {web: {deploy: {mode: daemon}}}", "services.web.deploy.mode", "replicated, global"),
    ("services: {web: {deploy: {endpoint_mode: lb}}}", "services.web.deploy.endpoint_mode", "vip, dnsrr"),
    ("services: {web: {deploy: {placement: {constraints: ['node.zone==a']}}}}",
     "services.web.deploy.placement.constraints[0]", "node.labels.KEY"),
    ("services: {web: {deploy: {placement: {constraints: ['node.role=manager']}}}}",
     "services.web.deploy.placement.constraints[0]", "== or !="),
    ("services: {web: {deploy: {placement: {constraints: ['node.hostname==']}}}}",
     "services.web.deploy.placement.constraints[0]", "then a value"),
    ("services: {web: {deploy: {placement: {constraints: ['node.role==boss']}}}}",
     "services.web.deploy.placement.constraints[0]", "manager or worker"),
    ("services: {web: {deploy: {placement: {max_replicas_per_node: 0}}}}",
     "services.web.deploy.placement.max_replicas_per_node", "at least 1"),
    ("services: {web: {restart: sometimes}}", "services.web.restart", "unless-stopped"),
    ("services: {web: {deploy: {restart_policy: {condition: always}}}}",
     "services.web.deploy.restart_policy.condition", "none, on-failure, any"),
    ("services: {web: {restart: 'on-failure:x'}}", "services.web.restart", "on-failure:N"),
    # healthcheck
    ("services: {web: {healthcheck: {test: [CMD, 'true'], interval: 10}}}", "services.web.healthcheck.interval",
     "duration"),
    ("services: {web: {healthcheck: {test: [CMD, 'true'], timeout: 5 seconds}}}",
     "services.web.healthcheck.timeout", "'5 seconds'"),
    ("services: {web: {healthcheck: {test: [CMD, 'true'], interval: 0s}}}", "services.web.healthcheck.interval",
     "above zero"),
    ("services: {web: {healthcheck: {test: [CMD, 'true'], retries: 0}}}", "services.web.healthcheck.retries",
     "at least 1"),
    ("services: {web: {healthcheck: {test: [curl, x]}}}", "services.web.healthcheck.test[0]", "CMD"),
    ("services: {web: {healthcheck: {test: [CMD]}}}", "services.web.healthcheck.test",
     "command to run after CMD, got ['CMD']"),
    ("services: {web: {healthcheck: {interval: 5s}}}", "services.web.healthcheck.test", "missing"),
    ("services: {web: {healthcheck: {test: [CMD, 'true'], disable: true}}}", "services.web.healthcheck.disable",
     "cannot be combined"),
    # environment and command
    ("services: {web: {environment: {BAD-KEY: 1}}}", "services.web.environment.BAD-KEY", "variable name"),
    ("services: {web: {environment: [A=1, 1A=2]}}", "services.web.environment[1]", "variable name"),
    ("services: {web: {environment: {A: [1, 2]}}}", "services.web.environment.A", "got a list"),
    ("services: {web: {environment: 5}}", "services.web.environment", "KEY=VALUE"),
    ("services: {web: {command: 5}}", "services.web.command", "string or a list of strings"),
    ("services: {web: {command: \"echo 'unclosed\"}}", "services.web.command", "cannot split"),
    ("services: {web: {x-mesh: 5}}", "services.web.x-mesh", "expected a mapping"),
    ("services: {web: {x-mesh: {affinity: source}}}", "services.web.x-mesh.affinity", "client-ip"),
    ("services: {web: {x-mesh: {preserve_client_ip: maybe}}}", "services.web.x-mesh.preserve_client_ip",
     "true or false"),
    ("services: {web: {x-mesh: {drain_timeout: -1}}}", "services.web.x-mesh.drain_timeout", "seconds"),
    ("services: {web: {x-mesh: {drain_timeout: soon}}}", "services.web.x-mesh.drain_timeout", "seconds"),
    # top-level networks
    ("services: {web: {}}\nnetworks: {front: {driver: weave}}", "networks.front.driver",
     "bridge, macvlan, overlay"),
    ("services: {web: {}}\nnetworks: {lan: {driver: macvlan}}", "networks.lan.driver_opts.parent", "parent"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.5/24}]}}}",
     "networks.front.ipam.config[0].subnet", "host bits"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.0}]}}}",
     "networks.front.ipam.config[0].subnet", "CIDR"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.0/24, gateway: 10.2.0.1}]}}}",
     "networks.front.ipam.config[0].gateway", "outside the subnet"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.0/24, gateway: gw}]}}}",
     "networks.front.ipam.config[0].gateway", "IPv4 address"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.0/16, ip_range: 10.2.0.0/24}]}}}",
     "networks.front.ipam.config[0].ip_range", "outside the subnet"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{subnet: 10.1.0.0/24, gateway: 10.1.0.255}]}}}",
     "networks.front.ipam.config[0].gateway", "broadcast address"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {config: [{gateway: 10.2.0.1}]}}}",
     "networks.front.ipam.config[0].gateway", "needs a subnet"),
    ("services: {web: {}}\nnetworks: {front: {ipam: {driver: dhcp}}}", "networks.front.ipam.driver", "default"),
    ("services: {web: {}}\nnetworks: {a: {ipam: {config: [{subnet: 10.1.0.0/16}]}},"
     " b: {ipam: {config: [{subnet: 10.1.2.0/24}]}}}",
     "networks.b.ipam.config[0].subnet", "overlaps 10.1.0.0/16"),
    ("services: {web: {}}\nnetworks: {host: {}}", "networks.host", "predefined network"),
    ("services: {web: {}}\nnetworks: {bridge: {driver: bridge}}", "networks.bridge", "external: true"),
    ("services: {web: {}}\nnetworks: {ext: {external: true, driver: overlay}}", "networks.ext",
     "cannot set driver"),
    ("services: {web: {}}\nnetworks: {front: {internal: maybe}}", "networks.front.internal", "true or false"),
    ("services: {web: {}}\nnetworks: {front: [a]}", "networks.front", "expected a mapping"),
    # the file as a whole
    ("services:\n  web: {ports: [80\n  api: {}\n", "", "line 3"),
    ("services:\n  web: {}\n  web: {}\n", "", "duplicate key 'web'"),
    ("- services\n- web\n", "", "top level"),
    ("", "", "empty"),
    ("networks: {}\n", "services", "missing"),
    ("services: {}\n", "services", "at least one service"),
    ("services: [web]\n", "services", "expected a mapping"),
    ("services: {web: }\n", "services.web", "expected a mapping, got null"),
]


@pytest.mark.parametrize("text, path, fragment", INVALID, ids=[f"{i}-{p or 'file'}" for i, (_, p, _) in
                                                            enumerate(INVALID)])
def test_invalid_input_names_the_path(text, path, fragment):
    found = problems(text)
    assert any(p == path and fragment in m for p, m in found), found


def test_every_problem_is_reported_not_just_the_first():
    found = problems("""
        services:
          web: {ports: ["abc:80", 70000], deploy: {replicas: two}}
          api: {restart: sometimes}
        networks:
          front: {driver: weave}
        """)
    assert {p for p, _ in found} == {"services.web.ports[0].published", "services.web.ports[1]",
                                     "services.web.deploy.replicas", "services.api.restart",
                                     "networks.front.driver"}


def test_every_cross_reference_problem_is_reported_too():
    found = problems("services: {web: {networks: [x], links: [y]}, api: {network_mode: 'service:api'}}")
    assert [p for p, _ in found] == ["services.web.networks[0]", "services.web.links[0]",
                                     "services.api.network_mode"]


def test_spec_error_text_carries_every_path():
    with pytest.raises(SpecError) as caught:
        load("services: {web: {deploy: {replicas: two}}}")
    assert str(caught.value) == "services.web.deploy.replicas: expected a non-negative integer, got 'two'"


def test_services_may_share_a_host_mode_port_as_in_swarm():
    stack = load("services: {a: {ports: [{target: 80, published: 8080, mode: host}]},"
                 " b: {ports: [{target: 81, published: 8080, mode: host}]}}")
    assert [p.published for s in stack.services.values() for p in s.ports] == [8080, 8080]


def test_a_port_published_on_0_0_0_0_is_published_on_every_address():
    stack = load("services: {web: {ports: ['0.0.0.0:8080:80', '127.0.0.1:8081:81']}}")
    assert [p.host_ip for p in stack.services["web"].ports] == [None, "127.0.0.1"]

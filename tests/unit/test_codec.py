"""mesh.codec: DesiredState, Stack and the cluster document survive a trip through JSON unchanged."""
import dataclasses
import json
import typing

import pytest

from mesh.allocator import ClusterPlacement, build_desired
from mesh.codec import (ClusterDoc, CodecError, NodeInfo, decode, decode_doc, encode, from_json,
                        to_json)
from mesh.model import Stack
from mesh.scheduler import Node, schedule
from mesh.spec import load_stack
from mesh.state import DesiredState

STACK = """
x-mesh: {dns: {ttl: 30, upstreams: ["10.9.9.9"]}}
services:
  web:
    command: "python3 -m http.server 80"
    deploy: {replicas: 3, placement: {max_replicas_per_node: 2}}
    networks: {front: {aliases: [www]}}
    ports: ["8080:80", {target: 53, protocol: udp}]
    environment: {A: "1"}
    healthcheck: {test: ["CMD", "true"], interval: 5s}
    x-mesh: {anything: [1, 2, {deep: true}]}
  worker:
    command: sleep 300
    deploy: {mode: global, placement: {constraints: ["node.role!=manager"]}}
    networks: [front, back]
  db:
    command: sleep 300
    networks: {back: {ipv4_address: 10.20.0.50}, front: {}}
    links: ["web:w"]
  side:
    command: sleep 300
    network_mode: "service:db"
networks:
  front: {}
  back: {internal: true, ipam: {config: [{subnet: 10.20.0.0/24}]}}
"""


def cluster_state() -> tuple[Stack, DesiredState]:
    stack = load_stack(STACK, name="demo", directory="/srv/demo")
    nodes = [Node("n1", "n1", role="manager", labels={"zone": "a"}), Node("n2", "n2"), Node("n3", "n3")]
    placed = schedule(stack.services, nodes, {})
    placement = ClusterPlacement(
        node_netns={n.name: f"mesh-h-{n.name}" for n in nodes},
        underlay={n.name: f"10.97.0.{i}" for i, n in enumerate(nodes, 1)},
        tasks=tuple((p.service, p.slot, p.task, p.node) for p in placed if p.node),
        pending=tuple((p.service, p.task, p.reason or "") for p in placed if not p.node))
    return stack, build_desired(stack, DesiredState(), [], "mesh-h", cluster=placement)


def test_desired_state_round_trip():
    stack, desired = cluster_state()
    assert len(desired.tasks) >= 6 and desired.publications and desired.vips
    data = encode(desired)
    assert decode(DesiredState, data) == desired
    assert json.loads(data) == json.loads(encode(decode(DesiredState, data)))   # stable bytes


def test_stack_round_trip_keeps_extensions_healthcheck_and_dns_options():
    stack, _ = cluster_state()
    back = decode(Stack, encode(stack))
    assert back == stack
    assert back.services["web"].extensions == {"anything": [1, 2, {"deep": True}]}
    assert back.dns.upstreams == ("10.9.9.9",)


def test_cluster_doc_round_trip():
    stack, desired = cluster_state()
    doc = ClusterDoc(desired=desired, stack=stack, connections=(("web.1", "back"),),
                     nodes=(NodeInfo("n1", "10.97.0.1", "manager", (("zone", "a"),), "mesh-h-n1",
                                     ("10.97.0.0/24",)),
                            NodeInfo("n2", "10.97.0.2", state="down")),
                     leader="m1", serial=7)
    assert decode_doc(encode(doc)) == doc
    assert decode_doc(encode(ClusterDoc())) == ClusterDoc()


def test_defaults_are_left_out():
    assert encode(ClusterDoc()) == b"{}"
    assert to_json(NodeInfo("n1", "10.0.0.1")) == {"name": "n1", "address": "10.0.0.1"}


def test_frozensets_and_fixed_tuples():
    assert from_json(frozenset[str], ["b", "a"]) == frozenset({"a", "b"})
    assert to_json(frozenset({"b", "a"})) == ["a", "b"]
    assert from_json(tuple[str, int], ["a", 1]) == ("a", 1)
    assert from_json(float, 2) == 2.0 and isinstance(from_json(float, 2), float)


@pytest.mark.parametrize("tp, data, message", [
    (NodeInfo, {"name": "n1", "address": "a", "colour": "red"}, "unknown field(s) of NodeInfo: colour"),
    (NodeInfo, {"name": "n1"}, "address"),
    (NodeInfo, {"name": 5, "address": "a"}, "$.name: expected str"),
    (NodeInfo, ["n1"], "expected an object"),
    (tuple[str, int], ["a"], "expected 2 items"),
    (int, True, "expected int"),
    (tuple[str, ...], "abc", "expected a list"),
])
def test_errors_name_the_path(tp, data, message):
    with pytest.raises(CodecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        from_json(tp, data)


def test_not_json_is_a_codec_error():
    with pytest.raises(CodecError, match="not JSON"):
        decode_doc(b"{nope")


def _field_types(cls, seen):
    if cls in seen:
        return
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        stack = [hint]
        while stack:
            tp = stack.pop()
            if dataclasses.is_dataclass(tp):
                _field_types(tp, seen)
            stack.extend(a for a in typing.get_args(tp) if a is not Ellipsis)


def test_every_field_type_of_the_document_is_supported():
    """A field added to the state model with a type the codec cannot carry fails here first."""
    seen: set = set()
    _field_types(ClusterDoc, seen)
    supported = {str, int, float, bool, type(None), object}
    for cls in seen:
        for name, hint in typing.get_type_hints(cls).items():
            stack = [hint]
            while stack:
                tp = stack.pop()
                origin = typing.get_origin(tp)
                if origin is not None:
                    assert origin in (tuple, frozenset, dict, typing.Union, __import__("types").UnionType), \
                        f"{cls.__name__}.{name}: {tp}"
                    stack.extend(a for a in typing.get_args(tp) if a is not Ellipsis)
                else:
                    assert tp in supported or dataclasses.is_dataclass(tp), f"{cls.__name__}.{name}: {tp}"

"""JSON for what travels through the cluster store (pure, standard library).

    data = encode(desired)                       # bytes: compact, sorted keys, defaults left out
    decode(DesiredState, data) == desired        # any frozen dataclass of mesh.state / mesh.model
    decode_doc(encode(doc)) == doc               # the leader's ClusterDoc at /mesh/desired

The codec is driven by the dataclasses' type hints, so a field added to DesiredState, TaskState or
Service travels without a change here. Supported field types: str, int, float, bool, None, nested
frozen dataclasses, `X | None`, `tuple[X, ...]`, fixed tuples, `frozenset[X]`, `dict[str, X]`,
`object` (JSON as it is). Fields equal to their default are left out (a cluster document is mostly
defaults); decoding fills them in again. An unknown field or a value of the wrong type raises
CodecError: an agent does not apply a desired state it only half understands.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache

from mesh.model import Stack
from mesh.state import DesiredState


class CodecError(ValueError):
    """A document that does not match the dataclass it is decoded into."""


@dataclass(frozen=True)
class NodeInfo:
    """A node as its agent registers it (/mesh/nodes/<name>) and as the leader lists it."""
    name: str
    address: str                     # underlay address: VXLAN endpoint, reachable from the hosts
    role: str = "worker"             # "manager" | "worker" (node.role in constraints)
    labels: tuple[tuple[str, str], ...] = ()
    netns: str | None = None         # the named namespace the agent runs in (sandboxes are named after it)
    routes: tuple[str, ...] = ()     # the node's routes (not mesh's): subnets must not overlap them
    state: str = "ready"             # "ready" | "down" (lease expired), set by the leader
    agent_pid: int | None = None     # informational
    error: str | None = None         # the agent's last failed apply, if any
    applied: int = 0                 # the revision of /mesh/desired it applied last (drain steps)
    failed: int = 0                  # the revision whose apply failed (with `error`), if any
    balanced: tuple[str, ...] = ()   # tasks its balancers send new connections to (Agent.balanced)

    def placement_key(self) -> tuple:
        """What placement and allocation depend on (a re-registration that changes none of it
        changes nothing)."""
        return (self.name, self.address, self.role, self.labels, self.netns, self.routes, self.state)


@dataclass(frozen=True)
class ClusterDoc:
    """Everything the leading manager decides, written as one key: /mesh/desired."""
    desired: DesiredState = DesiredState()
    stack: Stack | None = None
    connections: tuple[tuple[str, str], ...] = ()
    disconnections: tuple[tuple[str, str], ...] = ()
    nodes: tuple[NodeInfo, ...] = ()             # every node the cluster knows, ready or down
    leader: str = ""                             # the manager that wrote it
    serial: int = 0                              # one more on every write
    extra: dict[str, object] = field(default_factory=dict)


def to_json(value):
    """A JSON-safe tree for a dataclass instance or container (defaults left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if not _is_default(f, v):
                out[f.name] = to_json(v)
        return out
    if isinstance(value, frozenset):
        return sorted((to_json(v) for v in value), key=json.dumps)
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {_key(k): to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CodecError(f"cannot encode {type(value).__name__}: {value!r}")


def _key(key) -> str:
    if not isinstance(key, str):
        raise CodecError(f"dict keys must be str, not {type(key).__name__}: {key!r}")
    return key


def _is_default(f: dataclasses.Field, value) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


@lru_cache(maxsize=None)
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def from_json(tp, data, where: str = "$"):
    """The inverse of to_json for the type `tp` (a dataclass or a typing form)."""
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, data, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise CodecError(f"{where}: unions of several types are not supported: {tp}")
        return from_json(options[0], data, where)
    if origin is tuple:
        items = _list(data, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise CodecError(f"{where}: expected {len(args)} items, got {len(items)}")
        return tuple(from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, items)))
    if origin is frozenset:
        return frozenset(from_json(args[0], v, f"{where}[{i}]")
                         for i, v in enumerate(_list(data, where)))
    if origin is dict:
        if not isinstance(data, dict):
            raise CodecError(f"{where}: expected an object, got {type(data).__name__}")
        return {_key(k): from_json(args[1], v, f"{where}.{k}") for k, v in data.items()}
    return _scalar(tp, data, where)


def _dataclass(cls, data, where: str):
    if not isinstance(data, dict):
        raise CodecError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints, names = _hints(cls), {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CodecError(f"{where}: unknown field(s) of {cls.__name__}: {', '.join(unknown)}")
    try:
        return cls(**{k: from_json(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    except TypeError as exc:            # a required field is missing
        raise CodecError(f"{where}: {exc}") from None


def _list(data, where: str) -> list:
    if not isinstance(data, list):
        raise CodecError(f"{where}: expected a list, got {type(data).__name__}")
    return data


def _scalar(tp, data, where: str):
    if tp is object or tp is typing.Any:
        return data
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if tp in (str, int, bool, float) and isinstance(data, tp) and \
            not (tp is int and isinstance(data, bool)):
        return data
    if tp is type(None) and data is None:
        return None
    raise CodecError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {data!r}")


def encode(value) -> bytes:
    """Compact JSON bytes of a dataclass instance (the store's values are bytes)."""
    return json.dumps(to_json(value), separators=(",", ":"), sort_keys=True).encode()


def decode(cls, data: bytes | str):
    """An instance of `cls` from encode()'s bytes; CodecError when they do not fit."""
    try:
        tree = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"not JSON: {exc}") from None
    return from_json(cls, tree)


def decode_doc(data: bytes | str) -> ClusterDoc:
    return decode(ClusterDoc, data)

"""Stack files: compose-spec YAML -> a validated mesh.model.Stack, and the Stack's JSON round trip.

    stack = load_stack_file("stack.yaml")        # or load_stack(text, name="demo", env={...})
    for warning in stack.warnings: ...           # ignored fields, unset variables
    payload = stack_to_dict(stack)               # JSON-safe; stack_from_dict(payload) == stack

Pipeline: yaml.safe_load (duplicate keys refused) -> variable substitution (mesh.interpolate) ->
strict pydantic v2 models named after compose-spec fields (mesh.spec_models; ports: mesh.spec_ports)
-> semantic checks (mesh.spec_build) -> frozen dataclasses. Problems are raised together as
SpecError([(path, message), ...]) with compose paths such as `services.web.ports[1].published`: first every structural problem (wrong
types, bad values), then, once the structure is sound, every cross-reference problem (undefined
networks, duplicate published ports...). Fields mesh does not use are named in one warning.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh.errors import SpecError
from mesh.interpolate import interpolate, join_path
from mesh.model import DnsOptions, IpamConfig, Network, Stack
from mesh.spec_build import SERVICE_EXTENSIONS, Builder, as_lists, project_name, service_from_dict
from mesh.spec_models import ServiceSpec, StackSpec
from mesh.spec_ports import show

__all__ = ["load_stack", "load_stack_file", "stack_to_dict", "stack_from_dict"]


# ---- public API -------------------------------------------------------------------------------

def load_stack(text: str, *, name: str = "default", env: Mapping[str, str] | None = None,
               directory: str = "") -> Stack:
    """Parse and validate a stack. `name` is used when the file has no top-level `name:`;
    `directory` becomes Stack.directory (load_stack_file passes the file's folder)."""
    env = os.environ if env is None else env
    tree, problems, unset = interpolate(_parse_yaml(text), env)
    try:
        spec = StackSpec.model_validate(tree)
    except ValidationError as err:
        problems += [(_loc_path(e["loc"]), _message(e)) for e in err.errors()]
    if problems:
        raise SpecError(problems)
    stack = Builder(spec, env).stack(project_name(name), directory)
    ignored = _ignored_fields(spec)
    notes = [f"ignored fields (mesh does not use them): {', '.join(ignored)}"] if ignored else []
    return replace(stack, warnings=tuple(notes + unset))


def load_stack_file(path: str, env: Mapping[str, str] | None = None) -> Stack:
    """Load a stack file; the stack is named by its `name:` or else by the file's folder."""
    full = os.path.abspath(path)
    try:
        with open(full, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([("", f"cannot read stack file {path}: {err}")]) from None
    directory = os.path.dirname(full)
    return load_stack(text, name=project_name(os.path.basename(directory)), env=env, directory=directory)


def stack_to_dict(stack: Stack) -> dict[str, Any]:
    """A JSON-safe dict of a validated stack (tuples become lists)."""
    return as_lists(asdict(stack))


def stack_from_dict(data: Mapping[str, Any]) -> Stack:
    """The inverse of stack_to_dict, also after a trip through JSON."""
    try:
        return Stack(name=data["name"],
                     services={k: service_from_dict(v) for k, v in data["services"].items()},
                     networks={k: Network(**{**v, "ipam": tuple(IpamConfig(**c) for c in v.get("ipam", ()))})
                               for k, v in data["networks"].items()},
                     warnings=tuple(data.get("warnings", ())), directory=data.get("directory", ""),
                     dns=DnsOptions(**{**data.get("dns", {}),
                                       "upstreams": tuple(data.get("dns", {}).get("upstreams", ()))}))
    except (KeyError, TypeError, AttributeError) as err:
        raise SpecError([("", f"malformed stack document: {err!r}")]) from None


# ---- parsing and pydantic errors --------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing duplicate keys in a mapping as compose does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> dict:
    try:
        tree = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise SpecError([("", f"invalid YAML{where}: {what or err}")]) from None
    if tree is None:
        raise SpecError([("", "the stack file is empty: expected a mapping with a `services:` key")])
    if not isinstance(tree, dict):
        raise SpecError([("", f"expected a mapping at the top level (with `services:`), got {show(tree)}")])
    return tree


_EXPECTED = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
             "float_type": "a number", "list_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping"}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "mesh":
        return error["msg"]
    if kind == "missing":
        if tuple(error["loc"]) == ("services",):
            return "missing: a stack file needs a `services:` mapping with at least one service"
        return "required field is missing"
    got = show(error.get("input"))
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    return f"{error['msg']}, got {got}"        # "shape" (custom message) and anything unforeseen


def _loc_path(loc: tuple) -> str:
    """pydantic's ('services', 'web', 'ports', 1) -> 'services.web.ports[1]' (union tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, str) and (part == "[key]" or part.startswith("~")):
            continue
        path = join_path(path, part)
    return path


def _ignored_fields(node: object, path: str = "") -> list[str]:
    """Paths of every field the models did not declare, x-* extensions excepted, and the keys of a
    service's x-mesh that mesh does not read (a typo there would silently change nothing)."""
    out: list[str] = []
    if isinstance(node, ServiceSpec) and isinstance(node.x_mesh, dict):
        out += [join_path(join_path(path, "x-mesh"), k) for k in node.x_mesh
                if k not in SERVICE_EXTENSIONS]
    if isinstance(node, BaseModel):
        out += [join_path(path, k) for k in (node.model_extra or {}) if not str(k).startswith("x-")]
        for field, info in type(node).model_fields.items():
            if field != "x_mesh":
                out += _ignored_fields(getattr(node, field), join_path(path, info.alias or field))
    elif isinstance(node, dict):
        for key, value in node.items():
            out += _ignored_fields(value, join_path(path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _ignored_fields(value, join_path(path, i))
    return out



"""Compose variable substitution, pure: `interpolate(tree, env)` rewrites every string scalar of a
parsed YAML tree (mapping keys are left alone, as compose does) and returns the new tree, the
problems found as (path, message) pairs and the warnings for variables that were not set.

Rules (compose-spec "Interpolation"): `$VAR` and `${VAR}`; `${VAR:-default}` (unset or empty) and
`${VAR-default}` (unset); `${VAR:?message}` and `${VAR?message}` are errors when the variable is
missing; `${VAR:+other}` and `${VAR+other}` give `other` when it is set; defaults may nest
(`${A:-${B}}`); `$$` is a literal `$`. An unset variable without a default becomes "" and is warned
about once. A `$` followed by anything else is an error, as in compose: write `$$`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def join_path(path: str, key: object) -> str:
    """Compose notation: `services` + `web` -> `services.web`; ints go in brackets."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def interpolate(tree: object, env: Mapping[str, str]) -> tuple[object, list[tuple[str, str]], list[str]]:
    """Substitute variables everywhere in `tree`; returns (new tree, problems, warnings)."""
    run = _Interpolation(env)
    out = run.walk(tree, "")
    warnings = [f"variable {name} is not set: using an empty string (first used at {path})"
                for name, path in run.unset.items()]
    return out, run.problems, warnings


class _Interpolation:
    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[tuple[str, str]] = []
        self.unset: dict[str, str] = {}          # variable -> the first path that used it

    def walk(self, node: object, path: str) -> object:
        if isinstance(node, str):
            return self.text(node, path)
        if isinstance(node, dict):
            return {key: self.walk(value, join_path(path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [self.walk(value, join_path(path, i)) for i, value in enumerate(node)]
        return node

    def text(self, text: str, path: str) -> str:
        out, i = [], 0
        while (j := text.find("$", i)) >= 0:
            out.append(text[i:j])
            value, i = self.dollar(text, j, path)
            out.append(value)
        out.append(text[i:])
        return "".join(out)

    def dollar(self, text: str, j: int, path: str) -> tuple[str, int]:
        """Expand the reference starting at text[j] == '$'; returns (value, index after it)."""
        following = text[j + 1:j + 2]
        if following == "$":
            return "$", j + 2
        if following == "{":
            end = _closing_brace(text, j + 2)
            if end < 0:
                self.problems.append((path, f"unterminated '${{' in {text!r}"))
                return "", len(text)
            return self.braced(text[j + 2:end], path), end + 1
        if match := _NAME.match(text, j + 1):
            return self.lookup(match.group(), path), match.end()
        self.problems.append((path, f"invalid interpolation in {text!r}: '$' must be followed by a "
                                    "variable name or '{'; write '$$' for a literal '$'"))
        return "$", j + 1

    def braced(self, inner: str, path: str) -> str:
        match = _NAME.match(inner)
        if not match:
            self.problems.append((path, f"invalid variable reference '${{{inner}}}': expected "
                                        "${NAME}, ${NAME:-default} or ${NAME:?message}"))
            return ""
        name, rest = match.group(), inner[match.end():]
        if not rest:
            return self.lookup(name, path)
        op = next((o for o in _OPERATORS if rest.startswith(o)), None)
        if op is None:
            self.problems.append((path, f"invalid variable reference '${{{inner}}}': unknown operator "
                                        f"after {name} (expected one of {', '.join(_OPERATORS)})"))
            return ""
        return self.apply(name, op, rest[len(op):], path)

    def apply(self, name: str, op: str, arg: str, path: str) -> str:
        value = self.env.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return self.text(arg, path) if missing else value
        if op.endswith("+"):
            return "" if missing else self.text(arg, path)
        if missing:                              # the ? operators
            detail = f": {arg}" if arg else ""
            self.problems.append((path, f"required variable {name} is missing a value{detail}"))
            return ""
        return value

    def lookup(self, name: str, path: str) -> str:
        value = self.env.get(name)
        if value is None:
            self.unset.setdefault(name, path)
            return ""
        return value


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing a `${` whose body starts at `start` (nested `${...}` allowed), or -1."""
    depth, i = 1, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1

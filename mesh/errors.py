"""Errors a user can act on. Each names what is wrong and where; the CLI prints them as they are."""
from __future__ import annotations


class MeshError(Exception):
    """Base of every error mesh reports to a user."""


class SpecError(MeshError):
    """Invalid stack input. `problems` holds (path, message) pairs, e.g. ("services.web.ports[1].published", ...)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{path}: {msg}" if path else msg for path, msg in self.problems))


class AllocationError(MeshError):
    """An address, subnet or port cannot be allocated (exhaustion, overlap, duplicate, out of subnet)."""


class NotFound(MeshError):
    """A task, network or service named by the user does not exist."""


class Conflict(MeshError):
    """The request contradicts the current state (already connected, port taken, daemon busy...)."""

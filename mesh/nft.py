"""The nftables adapter: one `nft -f -` transaction, in the root namespace or a named one.

    NftCli().apply("mesh-h1", text)     # raises MeshError with nft's own message on failure
"""
from __future__ import annotations

import subprocess
from typing import Protocol

from mesh.errors import MeshError


class Nft(Protocol):
    def apply(self, netns: str | None, text: str) -> None: ...
    def list_table(self, netns: str | None, family: str, table: str) -> str | None: ...


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """argv run inside `netns` (None = the namespace we are in)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class NftCli:
    def apply(self, netns: str | None, text: str) -> None:
        proc = subprocess.run(in_netns(netns, ["nft", "-f", "-"]), input=text, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise MeshError(f"nft transaction failed in {netns or 'the root namespace'}: "
                            f"{proc.stderr.strip()}")

    def list_table(self, netns: str | None, family: str, table: str) -> str | None:
        proc = subprocess.run(in_netns(netns, ["nft", "list", "table", family, table]),
                              text=True, capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

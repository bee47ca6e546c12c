"""nftables through libnftables in this process: one long-lived context per network namespace.

Why: a one-service change of a balancer with 10k services costs ~55 ms through `nft -f -` (a
process started in the namespace, which loads the table's cache before it may add a rule) and
~35 ms through a context that stays open. A context's netlink socket is bound to the namespace it
was made in (checked), so each is made by a thread visiting that namespace; the namespace file's
inode is kept with it, so a namespace deleted and made again under the same name gets a new one.

    nft = LibNft.or_cli(NftCli())   # falls back to the `nft` command when libnftables is missing
    nft.apply("mesh-h1-web.1", text); nft.forget("mesh-h1-web.1")
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading

from mesh import netns as ns
from mesh.errors import MeshError


def _load():
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    lib = ctypes.CDLL(name)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class LibNft:
    def __init__(self, fallback):
        self.lib = _load()
        self.fallback = fallback             # for list_table and anything else read-only
        self.contexts: dict[str | None, tuple[int, int]] = {}   # netns -> (inode, context)
        self.guard = threading.Lock()

    @classmethod
    def or_cli(cls, cli):
        try:
            return cls(cli)
        except OSError:
            return cli

    def _inode(self, netns: str | None) -> int:
        return os.stat(ns.path(netns) if netns else "/proc/self/ns/net").st_ino

    def _context(self, netns: str | None) -> int:
        inode = self._inode(netns)
        known = self.contexts.get(netns)
        if known and known[0] == inode:
            return known[1]
        if known:
            self.lib.nft_ctx_free(known[1])
        with ns.entered(netns) if netns else contextlib.nullcontext():
            ctx = self.lib.nft_ctx_new(0)
        if not ctx:
            raise MeshError(f"libnftables: cannot make a context in {netns or 'this namespace'}")
        self.lib.nft_ctx_buffer_error(ctx)
        self.lib.nft_ctx_buffer_output(ctx)
        self.contexts[netns] = (inode, ctx)
        return ctx

    def apply(self, netns: str | None, text: str) -> None:
        with self.guard:
            try:
                ctx = self._context(netns)
            except FileNotFoundError:
                raise MeshError(f"nft transaction failed: network namespace '{netns}' does not "
                                f"exist") from None
            rc = self.lib.nft_run_cmd_from_buffer(ctx, text.encode())
            error = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise MeshError(f"nft transaction failed in {netns or 'the root namespace'}: "
                            f"{error.strip()}")

    def list_table(self, netns: str | None, family: str, table: str) -> str | None:
        return self.fallback.list_table(netns, family, table)

    def forget(self, netns: str | None) -> None:
        with self.guard:
            known = self.contexts.pop(netns, None)
            if known:
                self.lib.nft_ctx_free(known[1])

"""mesh.libnft on the real kernel: each namespace's context writes there and only there, errors
come back as MeshError with nft's message, and a namespace made again gets a fresh context."""
import secrets

import pytest

from mesh.errors import MeshError
from mesh.libnft import LibNft
from mesh.nft import NftCli

from labkit import sh


def test_contexts_stay_in_their_namespace_and_follow_a_remade_one():
    name = f"mesh-nft{secrets.token_hex(3)}"
    nft = LibNft(NftCli())
    sh(["ip", "netns", "add", name])
    try:
        nft.apply(name, "add table ip mesh_probe\n")
        assert "mesh_probe" in sh(["nft", "list", "tables"], name).stdout
        assert "mesh_probe" not in sh(["nft", "list", "tables"]).stdout
        with pytest.raises(MeshError, match="nft transaction failed in .*: .*"):
            nft.apply(name, "add chain ip no_such_table c\n")
        sh(["ip", "netns", "del", name])
        sh(["ip", "netns", "add", name])                 # the same name, a new namespace
        nft.apply(name, "add table ip mesh_again\n")
        assert "mesh_again" in sh(["nft", "list", "tables"], name).stdout
        nft.forget(name)
        assert name not in nft.contexts
    finally:
        sh(["ip", "netns", "del", name], check=False)
    with pytest.raises(MeshError, match="does not exist"):
        nft.apply(name, "add table ip mesh_gone\n")

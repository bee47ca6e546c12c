"""Which namespaces `mesh down`'s sweep removes (mesh.sweep.owned_namespaces), pure: a daemon's own
sandboxes and lab nodes, never those of another host namespace whose names share its prefix. The
kernel test is in tests/kernel/test_cluster.py."""
from mesh.sweep import owned_namespaces

MACHINE = ["mesh-web.1", "mesh-db.1",                               # the root's sandboxes
           "mesh-n1", "mesh-n1-web.2", "mesh-n1-ingress",           # the root's lab node n1
           "mesh-x", "mesh-x-web.1",                                # host mesh-x and its sandbox
           "mesh-x-y", "mesh-x-y-web.1",                            # host mesh-x-y and its sandbox
           "lab1", "mesh-lab1-web.1",                               # host lab1 and its sandbox
           "mesh-idle", "other"]                                    # a host with no sandbox yet


def test_the_root_sweeps_only_its_sandboxes_and_lab_nodes():
    got = owned_namespaces(MACHINE, None, ["mesh-n1"], frozenset({"mesh-idle", "mesh-x"}))
    assert sorted(got) == ["mesh-db.1", "mesh-n1", "mesh-n1-ingress", "mesh-n1-web.2", "mesh-web.1"]


def test_a_host_sweeps_its_sandboxes_not_those_of_a_host_named_after_it():
    assert owned_namespaces(MACHINE, "mesh-x", []) == ["mesh-x-web.1"]
    assert owned_namespaces(MACHINE, "mesh-x-y", []) == ["mesh-x-y-web.1"]
    assert owned_namespaces(MACHINE, "lab1", []) == ["mesh-lab1-web.1"]


def test_a_sandbox_whose_name_starts_another_sandboxs_is_not_taken_for_a_host():
    machine = ["mesh-db", "mesh-db-backup", "mesh-x", "mesh-x-web.1"]
    got = owned_namespaces(machine, None, [], host_like=frozenset({"mesh-x"}))
    assert sorted(got) == ["mesh-db", "mesh-db-backup"]

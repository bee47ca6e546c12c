"""`mesh up`'s wait for readiness (mesh.cli._wait_ready), pure: the stack going away while it waits
is an error, not an empty summary; a running task waits for what the API says it waits for (its
ports, every node's balancers). Where its summary says a published port answers (_answers_on). The kernel test (tests/kernel/test_lifecycle.py) stops a daemon
while mesh up waits; there the daemon is often gone before the empty answer this one fakes."""
import pytest

from mesh.cli import _answers_on, _wait_ready, _warn_not_running
from mesh.errors import MeshError


class Answers:
    """An Api whose GET /v1/tasks gives each of `answers` in turn."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def checked(self, method, path, body=None):
        assert (method, path) == ("GET", "/v1/tasks")
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


WAITING = [{"name": "web.1", "state": "starting", "health": "starting"}]
READY = [{"name": "web.1", "state": "running", "health": "none"}]


def test_a_stack_that_goes_away_while_mesh_up_waits_is_an_error():
    with pytest.raises(MeshError, match="the stack went away while mesh up waited for it"):
        _wait_ready(Answers(WAITING, []), 5)


def test_a_stack_that_gets_ready_ends_the_wait_and_an_empty_stack_is_no_error():
    _wait_ready(Answers(WAITING, READY), 5)
    _wait_ready(Answers([]), 5, expect_tasks=False)


def test_a_running_task_keeps_mesh_up_waiting_until_every_node_balances_it(capsys):
    lagging = [{**READY[0], "waiting": "not in the balancers of n2 yet"}]
    answers = Answers(WAITING, lagging, lagging, [{**READY[0], "waiting": None}])
    _wait_ready(answers, 5)
    assert answers.answers == [[{**READY[0], "waiting": None}]]      # it asked until the last
    assert "(waiting: web.1 not in the balancers of n2 yet)" in capsys.readouterr().err


NODES = [{"name": "n1", "address": "10.97.0.1"}, {"name": "n2", "address": "10.97.0.2"}]


def test_the_summary_names_where_a_port_answers_with_its_host_ip():
    ingress = {"published": 8080, "mode": "ingress", "host_ip": None}
    assert _answers_on(ingress, NODES, set()) == "10.97.0.1:8080 10.97.0.2:8080"
    assert _answers_on(ingress, [], set()) == "every address of the host"
    local = {**ingress, "host_ip": "127.0.0.1"}
    assert _answers_on(local, [], set()) == "127.0.0.1:8080"
    assert _answers_on(local, NODES, set()) == "127.0.0.1:8080 on every node"
    assert _answers_on({**local, "mode": "host"}, NODES, {"n2"}) == "127.0.0.1:8080 on n2"
    assert _answers_on({**ingress, "host_ip": "10.97.0.2"}, NODES, set()) == "10.97.0.2:8080"
    assert _answers_on({**ingress, "host_ip": "10.97.0.2", "mode": "host"}, NODES, {"n1"}) == \
        "nowhere (its node runs no task)"


class Api:
    """GET answers by path."""
    def __init__(self, **by_path):
        self.by_path = by_path

    def checked(self, method, path, body=None):
        return self.by_path[path.rsplit("/", 1)[1]]


def test_mesh_up_names_tasks_that_exited_with_an_error_and_pending_ones(capsys):
    tasks = [{**READY[0]}, {"name": "job.1", "state": "exited", "exit_code": 0, "health": "none"},
             {"name": "nc.1", "state": "exited", "exit_code": 127, "health": "none"}]
    _wait_ready(Answers(tasks), 5)
    assert "mesh: 1/3 tasks ready, 2 exited" in capsys.readouterr().err
    services = [{"name": "bc", "pending": [{"name": "bc.1", "reason": "no node satisfies "
                                            "node.hostname==n9"}]}]
    _warn_not_running(Api(tasks=tasks, services=services))
    assert capsys.readouterr().err.splitlines() == [
        "mesh: warning: nc.1 exited with code 127 (mesh logs nc.1 may say why)",
        "mesh: warning: bc.1 is pending: no node satisfies node.hostname==n9"]


class Lingering:
    """An Api whose daemon answers POST /v1/down but whose socket stays (it does not exit)."""

    def __init__(self, tmp_path, monkeypatch):
        from mesh.client import Api
        monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
        self.api = Api("mesh-tlinger")
        self.api.running = lambda: True
        self.api.call = lambda method, path, body=None: (200, {"down": True})
        (tmp_path / "mesh-tlinger").mkdir()
        (tmp_path / "mesh-tlinger" / "api.sock").touch()


def test_mesh_down_says_so_when_the_daemon_answered_but_did_not_exit(tmp_path, monkeypatch, capsys):
    import argparse
    from mesh.cli import cmd_down
    monkeypatch.setattr("mesh.client.GONE_TIMEOUT", 0.2)
    api = Lingering(tmp_path, monkeypatch).api
    assert api.wait_gone(0.2) is False
    with pytest.raises(MeshError, match=r"answered mesh down but has not exited .*daemon\.log"):
        cmd_down(argparse.Namespace(), api)
    assert "daemon stopped" not in capsys.readouterr().out
    (tmp_path / "mesh-tlinger" / "api.sock").unlink()       # it exits: the same call says so
    assert cmd_down(argparse.Namespace(), api) == 0
    assert capsys.readouterr().out == "mesh: stack removed, daemon stopped\n"

"""Which tasks a change replaces one at a time (mesh.controller.Controller._rolling) and which a
cluster step writes draining first (mesh.manager.ClusterController._restarting), pure: from the
desired states before and after. Kernel tests: test_lb.py (a placement change moving every task
with no failed request) and the rolling-update tests."""
from dataclasses import replace

from mesh.controller import Controller
from mesh.model import Port, Service
from mesh.manager import ClusterController
from mesh.readiness import Readiness
from mesh.state import DesiredState, TaskState


def task(name: str, node: str, command: str = "serve") -> TaskState:
    return TaskState(name=name, id=f"id-{name}", service=name.split(".")[0], slot=1,
                     netmode="sandbox", sandbox=f"mesh-{node}-{name}", owns_sandbox=True,
                     hostname=name, command=(command,), node=node)


def state(*tasks: TaskState) -> DesiredState:
    return DesiredState(tasks={t.name: t for t in tasks})


class Alive(Controller):
    """A controller whose cluster-wide readiness is given (no agents)."""
    def __init__(self, alive: set[str]):
        super().__init__([], None, None)
        self.alive = alive

    def readiness(self) -> Readiness:
        return Readiness(set(self.alive), set(self.alive))


def test_running_tasks_that_move_or_change_roll_one_at_a_time_and_gone_ones_move_at_once():
    ctl = Alive({"web.1", "web.2", "db.1"})
    ctl.desired = state(task("web.1", "n1"), task("web.2", "n1"), task("db.1", "n2"),
                        task("old.1", "n3"))
    after = state(task("web.1", "n3"), task("web.2", "n1"), task("db.1", "n2", "serve --v2"),
                  task("old.1", "n1"))             # old.1's node is gone: it is not alive
    assert ctl._rolling(after) == ["web.1", "db.1"]
    assert ctl._rolling(replace(after, networks={"x": None})) == []      # networks change: at once


def test_a_cluster_step_writes_moved_and_restarted_tasks_draining_first_while_old_reports_live():
    before = state(task("web.1", "n1"), task("web.2", "n1"), task("db.1", "n2"))
    after = state(task("web.1", "n3"), task("web.2", "n1"), task("db.1", "n2", "serve --v2"),
                  task("new.1", "n2"))
    assert ClusterController._restarting(before, after, frozenset({"n1", "n2", "n3"})) == {
        "web.1", "db.1"}
    # a task moved off a node that is down: no report of it is left to mistake, no extra step
    assert ClusterController._restarting(before, after, frozenset({"n2", "n3"})) == {"db.1"}


def test_services_that_share_a_host_port_and_swap_nodes_move_at_once_not_one_by_one():
    """One at a time, a's task would reach n3 while b's still runs there: both on host port 9000."""
    ctl = Alive({"a.1", "b.1", "web.1"})
    ctl.desired = state(task("a.1", "n1"), task("b.1", "n3"), task("web.1", "n1"))
    services = {name: Service(name, ports=(Port(90, 9000, mode="host"),)) for name in ("a", "b")}
    after = replace(state(task("a.1", "n3"), task("b.1", "n1"), task("web.1", "n2")), services=services)
    assert ctl._rolling(after) == ["web.1"]
    # no port in common: each goes one at a time
    apart = {**services, "b": Service("b", ports=(Port(90, 9001, mode="host"),))}
    assert ctl._rolling(replace(after, services=apart)) == ["a.1", "b.1", "web.1"]

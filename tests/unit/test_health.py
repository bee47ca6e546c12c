"""The healthcheck state machine (mesh.health.Health), driven with made-up probe results: no processes."""
import pytest

from mesh.allocator import build_desired
from mesh.health import HEALTHY, LOG_ENTRIES, NONE, STARTING, UNHEALTHY, Health, ProbeResult
from mesh.model import Healthcheck
from mesh.runtime import exec_argv
from mesh.spec import load_stack
from mesh.state import DesiredState
from mesh.views import service_list, task_view

T0 = 1000.0


def ok(at: float) -> ProbeResult:
    return ProbeResult(T0 + at, T0 + at + 0.01, 0, "fine")


def fail(at: float, code: int = 1) -> ProbeResult:
    return ProbeResult(T0 + at, T0 + at + 0.01, code, "broken")


def timeout(at: float) -> ProbeResult:
    return ProbeResult(T0 + at, T0 + at + 1, None, "health check exceeded its timeout (1s)", timed_out=True)


def health(**kw) -> Health:
    return Health(Healthcheck(("true",), **{"interval": 1.0, "timeout": 1.0, **kw}), started_at=T0)


def statuses(h: Health, results) -> list[str]:
    out = []
    for r in results:
        h.record(r)
        out.append(h.status)
    return out


def test_starts_as_starting():
    h = health()
    assert (h.status, h.failing_streak) == (STARTING, 0)
    assert h.view() == {"health": STARTING, "health_failing_streak": 0, "health_log": []}


def test_first_success_makes_it_healthy_and_reports_the_change():
    h = health()
    assert h.record(ok(1)) is True and h.status == HEALTHY
    assert h.record(ok(2)) is False and h.status == HEALTHY


def test_retries_consecutive_failures_make_it_unhealthy():
    h = health(retries=3)
    assert statuses(h, [fail(1), fail(2), fail(3)]) == [STARTING, STARTING, UNHEALTHY]
    assert h.failing_streak == 3


def test_failures_from_healthy_count_too_and_one_success_recovers():
    h = health(retries=2)
    assert statuses(h, [ok(1), fail(2), fail(3), fail(4), ok(5)]) == \
        [HEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY]
    assert h.failing_streak == 0


def test_a_success_resets_the_failing_streak():
    h = health(retries=3)
    assert statuses(h, [fail(1), fail(2), ok(3), fail(4), fail(5)]) == \
        [STARTING, STARTING, HEALTHY, HEALTHY, HEALTHY]
    assert h.failing_streak == 2


def test_failures_inside_start_period_do_not_count():
    h = health(retries=1, start_period=10.0)
    assert statuses(h, [fail(1), fail(5), timeout(9.9)]) == [STARTING] * 3
    assert h.failing_streak == 0
    assert h.record(fail(10.0)) is True and h.status == UNHEALTHY     # the period has ended


def test_a_success_inside_start_period_makes_it_healthy_and_later_failures_count():
    h = health(retries=2, start_period=60.0)
    assert statuses(h, [fail(1), ok(2), fail(3), fail(4)]) == [STARTING, HEALTHY, HEALTHY, UNHEALTHY]


def test_start_period_is_judged_by_when_the_probe_started():
    h = health(retries=1, start_period=5.0)
    late_end = ProbeResult(T0 + 4.9, T0 + 7.0, 1, "")            # began inside, ended after
    assert h.record(late_end) is False and h.status == STARTING


def test_a_timed_out_probe_is_a_failure_even_with_exit_code_zero():
    h = health(retries=1)
    assert not ProbeResult(T0, T0 + 2, 0, "", timed_out=True).ok
    assert h.record(timeout(1)) is True and h.status == UNHEALTHY


@pytest.mark.parametrize("code", [1, 2, 127, 255, None])
def test_any_non_zero_outcome_is_a_failure(code):
    h = health(retries=1)
    h.record(fail(1, code))
    assert h.status == UNHEALTHY


def test_the_log_keeps_the_last_results():
    h = health(retries=100)
    for i in range(LOG_ENTRIES + 3):
        h.record(fail(i, code=i + 1))
    log = h.view()["health_log"]
    assert [e["exit_code"] for e in log] == list(range(4, LOG_ENTRIES + 4))
    assert set(log[0]) == {"start", "end", "exit_code", "timed_out", "output"}


def test_an_exited_process_is_unhealthy():
    h = health()
    h.record(ok(1))
    assert h.stopped() is True and h.status == UNHEALTHY
    assert h.stopped() is False


# ---- the wiring: the task carries its service's check, views show health -----------------------

STACK = """
services:
  web:
    command: sleep 300
    healthcheck: {test: [CMD-SHELL, "test -f /tmp/ready"], interval: 500ms, timeout: 1m30s, retries: 2}
  side:
    network_mode: "service:web"
    healthcheck: {test: [CMD, "true"]}
  plain:
    command: sleep 300
"""


def test_tasks_carry_their_service_healthcheck():
    desired = build_desired(load_stack(STACK), DesiredState(), [], None)
    web = desired.tasks["web.1"]
    assert web.healthcheck == Healthcheck(("sh", "-c", "test -f /tmp/ready"), interval=0.5, timeout=90.0,
                                          retries=2)
    assert desired.tasks["side.1"].healthcheck == Healthcheck(("true",))
    assert desired.tasks["plain.1"].healthcheck is None


def test_probe_argv_enters_the_task_namespaces_like_exec():
    desired = build_desired(load_stack(STACK), DesiredState(), [], "mesh-h")
    web = desired.tasks["web.1"]
    argv = exec_argv(web, "mesh-h", 4242, list(web.healthcheck.test))
    assert argv == ["ip", "netns", "exec", web.sandbox, "nsenter", "-t", "4242", "--uts", "--",
                    "sh", "-c", "test -f /tmp/ready"]


def test_views_show_health():
    desired = build_desired(load_stack(STACK), DesiredState(), [], None)
    status = {"web.1": {"state": "running", "pid": 7, "exit_code": None, "restarts": 0,
                        "health": HEALTHY, "health_failing_streak": 0, "health_log": []},
              "side.1": {"state": "running", "pid": 8, "exit_code": None, "restarts": 0,
                         "health": STARTING, "health_failing_streak": 0, "health_log": []},
              "plain.1": {"state": "running", "pid": 9, "exit_code": None, "restarts": 0}}
    view = task_view(desired.tasks["web.1"], status["web.1"], desired)
    assert view["health"] == HEALTHY and view["healthcheck"]["test"] == ["sh", "-c", "test -f /tmp/ready"]
    plain = task_view(desired.tasks["plain.1"], status["plain.1"], desired)
    assert (plain["health"], plain["healthcheck"], plain["health_log"]) == (NONE, None, [])
    services = {s["name"]: s for s in service_list(desired, status.__getitem__)}
    assert [t["health"] for t in services["web"]["tasks"]] == [HEALTHY]
    assert [t["health"] for t in services["side"]["tasks"]] == [STARTING]
    assert [t["health"] for t in services["plain"]["tasks"]] == [NONE]

"""`mesh up`'s wait for readiness (mesh.cli._wait_ready), pure: the stack going away while it waits
is an error, not an empty summary. The kernel test (tests/kernel/test_lifecycle.py) stops a daemon
while mesh up waits; there the daemon is often gone before the empty answer this one fakes."""
import pytest

from mesh.cli import _wait_ready
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

"""Healthchecks run for real: probes in the task's namespaces through the CLI, and the Supervisor's
health API on host-mode tasks. Short intervals, generous deadlines: no test asserts how fast."""
import asyncio
import json
import os
import time

from mesh.model import Healthcheck
from mesh.runtime import Supervisor
from mesh.state import TaskState

from labkit import wait_for




def _procs(*argv: str) -> list[int]:
    """PIDs of processes whose command line is exactly argv."""
    want, found = "\0".join(argv) + "\0", []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline") as f:
                if entry.isdigit() and f.read() == want:
                    found.append(int(entry))
        except OSError:
            pass
    return found


def _ps(lab) -> dict:
    return {t["name"]: t for t in lab.json("ps")}


def test_health_follows_the_check_and_shows_in_ps(lab):
    ready = lab.tmp / "ready"
    ready.write_text("")
    lab.up(f"""
services:
  web:
    command: sleep 300
    healthcheck:
      test: ["CMD", "test", "-f", "{ready}"]
      interval: 200ms
      timeout: 5s
      retries: 2
  slow:
    command: sleep 300
    healthcheck: {{test: "exit 1", interval: 200ms, timeout: 5s, retries: 1, start_period: 10m}}
  plain:
    command: sleep 300
""", "--wait", "0")                                 # slow.1 stays starting for 10 min
    web = wait_for(lambda: (t := _ps(lab)["web.1"])["health"] == "healthy" and t)
    assert web and web["state"] == "running"
    assert _ps(lab)["plain.1"]["health"] == "none"
    service = json.loads(lab.mesh("service", "ps", "web", "--json").stdout)
    assert [(t["name"], t["health"]) for t in service["tasks"]] == [("web.1", "healthy")]

    lab.exec("web.1", "rm", str(ready))             # the probe sees what exec sees
    sick = wait_for(lambda: (t := _ps(lab)["web.1"])["health"] == "unhealthy" and t)
    assert sick, _ps(lab)["web.1"]
    assert sick["health_failing_streak"] >= 2 and sick["health_log"][-1]["exit_code"] == 1
    assert (sick["state"], sick["pid"], sick["restarts"]) == ("running", web["pid"], 0)   # not restarted

    ready.write_text("")
    assert wait_for(lambda: _ps(lab)["web.1"]["health"] == "healthy"), _ps(lab)["web.1"]

    # failures inside start_period do not count: several failed, still starting
    slow = wait_for(lambda: len((t := _ps(lab)["slow.1"])["health_log"]) >= 3 and t)
    assert slow and slow["health"] == "starting"
    assert all(e["exit_code"] == 1 for e in slow["health_log"])


def test_a_failing_probe_shows_in_ps_in_a_lab_too(lab):
    path = lab.tmp / "sick.yaml"
    path.write_text("""
services:
  sick:
    command: sleep 300
    healthcheck: {test: "exit 3", interval: 200ms, timeout: 5s, retries: 2}
""")
    lab.mesh("up", "-f", str(path), "--nodes", "2", "--wait", "0")   # it never becomes healthy
    sick = wait_for(lambda: (t := _ps(lab)["sick.1"])["health"] == "unhealthy" and t)
    assert sick, _ps(lab)["sick.1"]               # reported by its node's agent through the store
    assert sick["health_failing_streak"] >= 2 and sick["health_log"][-1]["exit_code"] == 3


def test_probe_runs_in_the_task_namespaces(lab):
    lab.up("""
services:
  named:
    command: sleep 300
    hostname: probe-host
    healthcheck:
      test: ["CMD-SHELL", "test \\"$$(hostname)\\" = probe-host && ip -o addr show eth0 | grep -q inet"]
      interval: 200ms
      timeout: 5s
""")
    task = wait_for(lambda: (t := _ps(lab)["named.1"])["health"] != "starting" and t)
    assert task["health"] == "healthy", task["health_log"]


def test_a_hanging_probe_is_killed_at_its_timeout(lab):
    marker = ("sleep", "987.654")
    lab.up(f"""
services:
  hang:
    command: sleep 300
    healthcheck: {{test: {json.dumps(["CMD", *marker])}, interval: 200ms, timeout: 300ms, retries: 2}}
""", "--wait", "0")                                 # it never becomes healthy
    seen = []
    task = wait_for(lambda: seen.append(len(_procs(*marker))) or
                     ((t := _ps(lab)["hang.1"])["health"] == "unhealthy" and t))
    assert task, _ps(lab)["hang.1"]
    assert all(e["timed_out"] and e["exit_code"] is None and "timeout" in e["output"]
               for e in task["health_log"])
    assert max(seen) <= 1                           # probes do not pile up: each one was killed
    pid = task["pid"]
    lab.mesh("down")
    assert wait_for(lambda: not _procs(*marker), 5), _procs(*marker)
    assert not os.path.exists(f"/proc/{pid}")


# ---- the Supervisor API, on host-mode tasks (plain processes, no namespaces) --------------------

def _task(name: str, command: tuple, check: Healthcheck | None, restart: str = "no") -> TaskState:
    return TaskState(name=name, id=name, service=name.split(".")[0], slot=1, netmode="host", sandbox=None,
                     owns_sandbox=False, hostname="", command=command, restart=restart,
                     healthcheck=check)


async def _until(predicate, bound: float = 20.0) -> bool:
    deadline = time.monotonic() + bound
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return predicate()


def test_supervisor_health_api_and_on_change(tmp_path):
    flag = tmp_path / "ok"
    flag.write_text("")

    async def main():
        sup = Supervisor(str(tmp_path / "logs"), None)
        seen = []
        sup.on_change = lambda: seen.append(sup.status("c.1")["health"])
        check = Healthcheck(("test", "-f", str(flag)), interval=0.1, timeout=5.0, retries=2)
        await sup.start(_task("c.1", ("sleep", "300"), check))
        await sup.start(_task("p.1", ("sleep", "300"), None))
        try:
            assert sup.status("c.1")["health"] == "starting" and not sup.healthy("c.1")
            assert sup.status("p.1")["health"] == "none" and sup.healthy("p.1")
            assert await _until(lambda: sup.healthy("c.1"))
            flag.unlink()
            assert await _until(lambda: sup.status("c.1")["health"] == "unhealthy")
            assert not sup.healthy("c.1") and sup.status("c.1")["state"] == "running"
            flag.write_text("")
            assert await _until(lambda: sup.healthy("c.1"))
            assert seen == ["healthy", "unhealthy", "healthy"]      # each transition, once
            assert sup.status("gone.1")["health"] == "none" and not sup.healthy("gone.1")
        finally:
            await sup.stop_all()
        assert not sup.healthy("c.1")
    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_restart_starts_health_over(tmp_path):
    async def main():
        sup = Supervisor(str(tmp_path / "logs"), None)
        seen = []
        sup.on_change = lambda: seen.append((sup.status("r.1")["state"], sup.status("r.1")["health"]))
        check = Healthcheck(("true",), interval=0.1, timeout=5.0)
        await sup.start(_task("r.1", ("sleep", "1"), check, restart="always"))
        try:
            assert await _until(lambda: sup.status("r.1")["restarts"] >= 1 and sup.healthy("r.1"))
        finally:
            await sup.stop_all()
        first = seen.index(("running", "healthy"))
        assert ("restarting", "unhealthy") in seen[first:]
        assert seen[seen.index(("restarting", "unhealthy"), first):][1:3] == \
            [("running", "starting"), ("running", "healthy")]
    asyncio.run(asyncio.wait_for(main(), 60))


def test_stopping_kills_the_probe_in_flight_and_what_probes_leave(tmp_path):
    hang, orphan = ("sleep", "876.5"), ("sleep", "765.4")

    async def main():
        sup = Supervisor(str(tmp_path / "logs"), None)
        leaves = Healthcheck(("sh", "-c", "sleep 765.4 & exit 0"), interval=0.1, timeout=5.0)
        await sup.start(_task("l.1", ("sleep", "300"), leaves))
        await sup.start(_task("h.1", ("sleep", "300"), Healthcheck(hang, interval=0.1, timeout=60.0)))
        try:
            assert await _until(lambda: sup.healthy("l.1"))
            assert await _until(lambda: bool(_procs(*hang)))        # a probe is in flight
            assert len(_procs(*orphan)) <= 1          # each probe's leftovers die with its group
        finally:
            await sup.stop_all()
        assert await _until(lambda: not _procs(*hang) and not _procs(*orphan), 5)
    asyncio.run(asyncio.wait_for(main(), 60))

"""Tasks as processes: the YAML `command` run inside the task's sandbox, supervised by the daemon.

    sup = Supervisor(log_dir, host_netns)
    await sup.start(task)        # runs it, restarts it per `restart:`, output to <log_dir>/<task>.log
    await sup.adopt(task)        # after the daemon was killed: watch the process it had started
    sup.status("web.1")          # {"state": "running", "pid": ..., "exit_code": ..., "restarts": ...,
                                 #  "health": "none" | "starting" | "healthy" | "unhealthy", ...}
    sup.healthy("web.1")         # may take traffic: running, and healthy if it has a healthcheck
    await sup.stop("web.1")      # SIGTERM to its process group, SIGKILL after a grace period

A task with a `healthcheck` is probed (mesh.health) while its process runs, in its namespaces as
`mesh exec` runs commands; every health transition calls on_change(). The check is the one the task
had when its process started. An unhealthy task is not restarted: Swarm replaces it, which is the
orchestrator's decision, not the supervisor's.

A process sees its sandbox's own /etc/hosts and /etc/resolv.conf because it starts through
`ip netns exec` (the /etc/netns/<sandbox>/ convention) and gets its own UTS namespace (hostname).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

from mesh import health as hc
from mesh.model import Healthcheck
from mesh.nft import in_netns
from mesh.state import TaskState

IDLE_COMMAND = ("sleep", "infinity")
STOP_GRACE = 5.0


def run_argv(task: TaskState, host_netns: str | None) -> list[str]:
    """The argv that starts `task` (pure)."""
    argv = []
    if task.netmode != "host":
        argv += ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', task.hostname]
    return in_netns(task.sandbox or host_netns, argv + list(task.command or IDLE_COMMAND))


def exec_argv(task: TaskState, host_netns: str | None, pid: int | None, command: list[str]) -> list[str]:
    """The argv that runs `command` beside a task, in its network and UTS namespaces (pure)."""
    argv = ["nsenter", "-t", str(pid), "--uts", "--"] if pid and task.netmode != "host" else []
    return in_netns(task.sandbox or host_netns, argv + command)


def should_restart(policy: str, exit_code: int, stopping: bool) -> bool:
    if stopping:
        return False
    return policy in ("always", "unless-stopped") or (policy == "on-failure" and exit_code != 0)


def task_env(task: TaskState) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
           "HOME": "/root", "HOSTNAME": task.hostname}
    env.update(dict(task.environment))
    return env


@dataclass
class Run:
    task: TaskState
    state: str = "starting"          # starting | running | restarting | exited
    pid: int | None = None
    exit_code: int | None = None
    restarts: int = 0
    started_at: float | None = None
    stopping: bool = False
    runner: asyncio.Task | None = None
    proc: asyncio.subprocess.Process | None = None
    health: hc.Health | None = None          # set while a process with a healthcheck has run
    prober: asyncio.Task | None = None       # the probe loop of the running process


class Supervisor:
    def __init__(self, log_dir: str, host_netns: str | None):
        self.log_dir = log_dir
        self.host_netns = host_netns
        self.runs: dict[str, Run] = {}
        self.on_change = lambda: None    # called when a task's state changes (the agent resyncs DNS)
        os.makedirs(log_dir, exist_ok=True)

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def pid_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.pid")

    async def start(self, task: TaskState) -> None:
        run = Run(task)
        self.runs[task.name] = run
        started = asyncio.get_running_loop().create_future()
        run.runner = asyncio.create_task(self._loop(run, started))
        await started

    async def _loop(self, run: Run, started: asyncio.Future) -> None:
        delay = 0.1
        while True:
            t0 = time.monotonic()
            await self._spawn(run)
            if not started.done():
                started.set_result(None)
            run.exit_code = await run.proc.wait()
            await self._stop_health(run)
            run.pid = None
            _unlink(self.pid_path(run.task.name))
            if not should_restart(run.task.restart, run.exit_code, run.stopping):
                run.state = "exited"
                self.on_change()
                return
            run.state, run.restarts = "restarting", run.restarts + 1
            self.on_change()
            delay = 0.1 if time.monotonic() - t0 > 10 else min(delay * 2, 5.0)
            await asyncio.sleep(delay)

    async def adopt(self, task: TaskState) -> bool:
        """Take over the process a previous supervisor of this log dir started for `task` (its
        daemon was killed): it keeps running, and when it exits the task's restart policy applies
        as for a process started here (its exit code is unknown: not our child). False when that
        process no longer runs."""
        pid = live_pid(self.pid_path(task.name))
        if pid is None:
            return False
        run = Run(task, state="running", pid=pid, started_at=time.time())
        self.runs[task.name] = run
        self._start_health(run)
        run.runner = asyncio.create_task(self._adopted(run))
        return True

    async def _adopted(self, run: Run) -> None:
        await wait_exit(run.pid)
        await self._stop_health(run)
        run.pid = None
        _unlink(self.pid_path(run.task.name))
        if not should_restart(run.task.restart, -1, run.stopping):
            run.state = "exited"
            self.on_change()
            return
        run.state, run.restarts = "restarting", run.restarts + 1
        self.on_change()
        await asyncio.sleep(0.1)
        await self._loop(run, asyncio.get_running_loop().create_future())

    async def _spawn(self, run: Run) -> None:
        with open(self.log_path(run.task.name), "ab") as log:
            run.proc = await asyncio.create_subprocess_exec(
                *run_argv(run.task, self.host_netns), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=task_env(run.task),
                cwd=run.task.workdir if os.path.isdir(run.task.workdir or "") else "/",
                start_new_session=True)
        run.pid, run.state, run.started_at = run.proc.pid, "running", time.time()
        self._start_health(run)
        if run.restarts:
            self.on_change()
        with open(self.pid_path(run.task.name), "w") as f:
            f.write(f"{run.pid} {start_time(run.pid)}\n")

    def _start_health(self, run: Run) -> None:
        check, pid = run.task.healthcheck, run.pid
        if check is None:
            run.health = None
            return
        run.health = hc.Health(check, started_at=run.started_at)

        def argv_of(c: Healthcheck) -> list[str]:
            return exec_argv(run.task, self.host_netns, pid, list(c.test))
        run.prober = asyncio.create_task(hc.watch(
            run.health, argv_of, on_change=lambda: self.on_change(), env=task_env(run.task),
            cwd=run.task.workdir if os.path.isdir(run.task.workdir or "") else "/"))

    async def _stop_health(self, run: Run) -> None:
        """End the probe loop (its probe, if one runs, is killed); an exited task is unhealthy."""
        prober, run.prober = run.prober, None
        if prober is not None:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        if run.health is not None:
            run.health.stopped()

    async def stop(self, name: str, grace: float = STOP_GRACE) -> None:
        run = self.runs.pop(name, None)
        if run is None:
            return
        run.stopping = True
        await self._stop_health(run)
        if run.pid:
            _signal_group(run.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):    # not wait_for: see mesh.health.run_probe
                    await asyncio.shield(run.runner)
            except TimeoutError:
                _signal_group(run.pid, signal.SIGKILL)
        if run.runner:
            run.runner.cancel()
            await asyncio.gather(run.runner, return_exceptions=True)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self.runs)))

    def status(self, name: str) -> dict:
        run = self.runs.get(name)
        if run is None:
            return {"state": "stopped", "pid": None, "exit_code": None, "restarts": 0, **hc.NO_HEALTH}
        return {"state": run.state, "pid": run.pid, "exit_code": run.exit_code,
                "restarts": run.restarts, "started_at": run.started_at, **self._health(run)}

    @staticmethod
    def _health(run: Run) -> dict:
        """The checks of the process as it was started (a changed healthcheck applies at the next
        start); an exited or restarting process is unhealthy."""
        return run.health.view() if run.health is not None else dict(hc.NO_HEALTH)

    def healthy(self, name: str) -> bool:
        """May take traffic: running, and healthy when it has a healthcheck."""
        run = self.runs.get(name)
        return run is not None and run.state == "running" and \
            self._health(run)["health"] in (hc.NONE, hc.HEALTHY)


def start_time(pid: int) -> str:
    """The kernel's start time of a process (field 22 of /proc/PID/stat): tells a PID's reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def live_pid(pid_path: str) -> int | None:
    """The PID in a task's pid file if that very process still runs (same start time, not a
    zombie), else None."""
    try:
        with open(pid_path) as f:
            pid, _, started = f.read().strip().partition(" ")
        if not pid.isdigit() or not started or start_time(int(pid)) != started:
            return None
        with open(f"/proc/{pid}/stat") as f:
            return None if f.read().rsplit(")", 1)[1].split()[0] == "Z" else int(pid)
    except (OSError, IndexError):
        return None


async def wait_exit(pid: int) -> None:
    """Until a process that is not our child exits (a pidfd becomes readable when it does)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def kill_leftovers(log_dir: str, keep: frozenset[str] | set[str] = frozenset()) -> list[int]:
    """Kill the process groups of tasks whose daemon died (from their pid files), except the
    tasks named in `keep` (adopted); returns the PIDs."""
    killed = []
    for entry in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        if not entry.endswith(".pid") or entry[:-len(".pid")] in keep:
            continue
        path = os.path.join(log_dir, entry)
        pid = live_pid(path)
        if pid is not None:
            _signal_group(pid, signal.SIGKILL)
            killed.append(pid)
        _unlink(path)
    return killed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass

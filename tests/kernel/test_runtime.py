"""Tasks as processes: logs, restart policies, exec, environment and working directory."""
from labkit import wait_for




def test_logs_restart_policies_and_exit_codes(lab):
    stack = """
services:
  once:
    command: sh -c 'echo hello from once; exit 3'
  flaky:
    command: sh -c 'echo try; exit 4'
    restart: on-failure
  steady:
    command: sh -c 'echo tick; sleep 0.2'
    restart: always
  clean:
    command: sh -c 'echo done; exit 0'
    restart: on-failure
  swarmish:
    command: sh -c 'echo try; exit 5'
    deploy: {restart_policy: {condition: on-failure}}
  held:
    command: sh -c 'exit 6'
    restart: always
    deploy: {restart_policy: {condition: none}}
"""
    lab.up(stack, "--wait", "0")                      # tasks that restart forever: never all ready
    once = wait_for(lambda: (t := lab.task("once.1"))["state"] == "exited" and t)
    assert once["exit_code"] == 3 and once["restarts"] == 0
    assert lab.mesh("logs", "once.1").stdout == "hello from once\n"
    flaky = wait_for(lambda: (t := lab.task("flaky.1"))["restarts"] >= 2 and t)
    assert flaky["restarts"] >= 2
    assert lab.mesh("logs", "flaky.1").stdout.count("try\n") >= 3
    assert wait_for(lambda: lab.task("steady.1")["restarts"] >= 2)
    clean = wait_for(lambda: (t := lab.task("clean.1"))["state"] == "exited" and t)
    assert clean["exit_code"] == 0 and clean["restarts"] == 0
    # Swarm's deploy.restart_policy.condition is the policy, and wins over restart:
    assert wait_for(lambda: lab.task("swarmish.1")["restarts"] >= 2)
    held = wait_for(lambda: (t := lab.task("held.1"))["state"] == "exited" and t)
    assert held["exit_code"] == 6 and held["restarts"] == 0
    again = lab.up(stack, "--wait", "0").stderr      # mesh up names the task that failed, only it
    assert "mesh: warning: once.1 exited with code 3 (mesh logs once.1 may say why)" in again, again
    assert "clean.1" not in again, again
    missing = lab.mesh("logs", "nope.1", check=False)
    assert missing.returncode == 1 and "no task named 'nope.1'" in missing.stderr


def test_exec_sees_the_task_environment_and_directory(lab):
    lab.up("""
services:
  app:
    command: sleep 300
    environment:
      GREETING: hello
      MODE: ${MESH_TEST_MODE:-fallback}
""")
    env = lab.exec("app.1", "env").stdout.splitlines()
    assert "GREETING=hello" in env and "MODE=fallback" in env
    assert lab.exec("app.1", "pwd").stdout.strip() == str(lab.tmp)
    assert lab.exec("app.1", "sh", "-c", "exit 7", check=False).returncode == 7


def test_reapply_keeps_unchanged_tasks_and_restarts_changed_ones(lab):
    stack = """
services:
  a:
    command: sleep 300
  b:
    command: sleep {b}
    deploy: {{replicas: {n}}}
"""
    lab.up(stack.format(b=300, n=1))
    a_pid, b_pid = lab.task("a.1")["pid"], lab.task("b.1")["pid"]
    a_ip = lab.task("a.1")["networks"]["default"]["address"]
    lab.up(stack.format(b=301, n=2))
    assert lab.task("a.1")["pid"] == a_pid
    assert lab.task("a.1")["networks"]["default"]["address"] == a_ip
    assert lab.task("b.1")["pid"] != b_pid
    assert lab.task("b.2")["state"] == "running"
    lab.up(stack.format(b=301, n=0))
    assert [t["name"] for t in lab.json("ps")] == ["a.1"]

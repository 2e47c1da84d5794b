"""Durable sleep that wakes (PROTOCOL.md section 5): claims, relaunch, failures, several servers."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import runtara_core as rc
from conftest import addr, free_udp_port, run

ROOT = Path(__file__).resolve().parent.parent
Tx = rc.Tx

PRELUDE = '''
import asyncio, os, sys
sys.path.insert(0, {root!r})
import runtara_core as runtara

LOG = sys.argv[1]

def note(text):
    with open(LOG, "a") as log:
        log.write(os.environ["RUNTARA_INSTANCE_ID"] + " " + text + "\\n")

'''

SLEEPER = PRELUDE + '''
async def main():
    note("process")
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        @instance.durable("before")
        async def before():
            note("before")

        @instance.durable("after")
        async def after():
            note("after")

        await before()
        await instance.sleep("nap", 3000)
        await after()
        await instance.completed(b"woke and finished")

asyncio.run(main())
'''

STEPPER = PRELUDE + '''
async def main():
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        for n in range({steps}):
            @instance.durable(f"step-{{n}}")
            async def step():
                note(f"run {{n}}")
                await asyncio.sleep({pause})
                return n
            assert await step() == n
            note(f"acked {{n}}")
        await instance.completed(b"all steps")

asyncio.run(main())
'''

COUNTER = '''
import asyncio, os, sys
sys.path.insert(0, {root!r})
import runtara_core as runtara

with open(sys.argv[1], "a") as log:
    log.write(os.environ["RUNTARA_INSTANCE_ID"] + "\\n")

async def main():
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        await instance.completed(b"")

asyncio.run(main())
'''


def script(tmp_path, name, template, **fields):
    path = tmp_path / f"{name}.py"
    path.write_text(template.format(root=str(ROOT), **fields))
    log = tmp_path / f"{name}.log"
    log.touch()
    return f"{sys.executable} {path} {log}", log


def wait_until(predicate, timeout=30, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(server, instance_id):
    async def ask():
        async with rc.Client(addr(server), env={}) as operator:
            return await operator.get_instance_status(instance_id)
    return run(ask())


def events_of(server, instance_id):
    async def ask():
        async with rc.Client(addr(server), env={}) as operator:
            return (await operator.list_events(instance_id, limit=100))["events"]
    return list(reversed(run(ask())))


def start_instance(command, server, instance_id):
    argv = command.split()
    env = {**os.environ, "RUNTARA_INSTANCE_ID": instance_id, "RUNTARA_TENANT_ID": "t",
           "RUNTARA_SERVER_ADDR": addr(server)}
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def make_due(storage, instance_id, now, sleep_until=None, tenant="t"):
    storage.write(Tx.create_instance, instance_id, tenant, now).result()
    storage.write(Tx.start_instance, instance_id, tenant, now).result()
    storage.write(Tx.set_sleep, instance_id, sleep_until or now - 1).result()
    storage.write(Tx.transition, instance_id, "suspended", ("running",), now).result()


# -- storage claims -----------------------------------------------------------------------------


def test_claims_respect_the_lease_and_registration_ends_it(storage):
    now = rc.now_ms()
    make_due(storage, "due", now)
    make_due(storage, "later", now, sleep_until=now + 60_000)
    claimed = storage.write(Tx.claim_wakes, now, now + 1000, 10).result()
    assert [(c["instance_id"], c["launch_attempts"]) for c in claimed] == [("due", 1)]
    assert storage.write(Tx.claim_wakes, now + 500, now + 1500, 10).result() == []  # leased
    again = storage.write(Tx.claim_wakes, now + 1000, now + 2000, 10).result()  # the lease ran out
    assert [(c["instance_id"], c["launch_attempts"]) for c in again] == [("due", 2)]
    assert storage.read(Tx.unregistered_launch, "due").result() == 2
    assert storage.write(Tx.start_instance, "due", "t", now).result()
    assert storage.read(Tx.unregistered_launch, "due").result() is None
    due = storage.read(Tx.due_wakes, now + 100_000).result()
    assert [d["instance_id"] for d in due] == ["later"] and due[0]["launch_attempts"] == 0


def test_claim_takes_at_most_limit(storage):
    now = rc.now_ms()
    for n in range(5):
        make_due(storage, f"i-{n}", now)
    first = storage.write(Tx.claim_wakes, now, now + 1000, 3).result()
    second = storage.write(Tx.claim_wakes, now, now + 1000, 3).result()
    assert len(first) == 3 and len(second) == 2
    assert not {c["instance_id"] for c in first} & {c["instance_id"] for c in second}


def test_concurrent_claims_never_share_an_instance(storage):
    now = rc.now_ms()
    for n in range(40):
        make_due(storage, f"i-{n}", now)
    futures = [storage.write(Tx.claim_wakes, now, now + 60_000, 7) for _ in range(10)]
    claimed = [c["instance_id"] for future in futures for c in future.result()]
    assert sorted(claimed) == sorted(f"i-{n}" for n in range(40))


# -- end to end with a launch command -----------------------------------------------------------


def test_sleeping_instance_is_relaunched_and_completes(server_factory, tmp_path):
    command, log = script(tmp_path, "sleeper", SLEEPER)
    server = server_factory(launch_command=command, sleep_inline_max_ms=0, wake_interval_ms=100)
    first = start_instance(command, server, "sleepy")
    assert first.wait(timeout=30) == 0, first.stderr.read()
    assert status_of(server, "sleepy")["status"] == "suspended"
    wait_until(lambda: status_of(server, "sleepy")["status"] == "completed", what="the relaunched instance")
    assert log.read_text().splitlines() == ["sleepy process", "sleepy before", "sleepy process", "sleepy after"]
    timeline = [(e["event_type"], e.get("subtype")) for e in events_of(server, "sleepy")]
    assert timeline == [("started", None), ("suspended", "sleep"), ("launched", None), ("resumed", None),
                        ("completed", None)]
    events = events_of(server, "sleepy")
    assert events[2]["created_at_ms"] - events[1]["created_at_ms"] >= 2900  # woke after its 3 s
    assert msgpack.unpackb(events[2]["payload"])["attempt"] == 1
    status = status_of(server, "sleepy")
    assert status["output"] == b"woke and finished" and "sleep_until_ms" not in status


def test_paused_instance_is_relaunched_after_resume(server_factory, tmp_path, database_url):
    command, log = script(tmp_path, "stepper", STEPPER, steps=6, pause=0.3)
    server = server_factory(launch_command=command, wake_interval_ms=100)
    first = start_instance(command, server, "stepper")
    wait_until(lambda: "stepper acked 0" in log.read_text(), what="the first step")
    cli = [sys.executable, str(ROOT / "runtara_core.py"), "signal", "stepper"]
    subprocess.run(cli + ["pause", "--database-url", database_url], check=True, timeout=60)
    assert first.wait(timeout=30) == 0, first.stderr.read()
    assert status_of(server, "stepper")["status"] == "suspended"
    time.sleep(0.5)
    assert status_of(server, "stepper")["status"] == "suspended"  # a pause is not a wake
    subprocess.run(cli + ["resume", "--database-url", database_url], check=True, timeout=60)
    wait_until(lambda: status_of(server, "stepper")["status"] == "completed", what="the resumed instance")
    steps = [line for line in log.read_text().splitlines() if " run " in line]
    assert steps == [f"stepper run {n}" for n in range(6)]  # every step ran exactly once
    types = [e["event_type"] for e in events_of(server, "stepper")]
    assert types.count("launched") == 1 and types[-1] == "completed"


def test_failed_launches_are_retried_then_the_instance_fails(server_factory, storage, tmp_path):
    server = server_factory(launch_command=f"{sys.executable} -c 'import sys; sys.exit(3)'", wake_interval_ms=50,
                            launch_max_attempts=3)
    make_due(storage, "doomed", rc.now_ms())
    wait_until(lambda: status_of(server, "doomed")["status"] == "failed", what="the failed instance")
    status = status_of(server, "doomed")
    assert "launch failed 3 times" in status["error"] and "exited with code 3" in status["error"]
    events = events_of(server, "doomed")
    failures = [e for e in events if e["event_type"] == "launch_failed"]
    assert len(failures) == 3 and b"code 3" in failures[0]["payload"]
    gaps = [b["created_at_ms"] - a["created_at_ms"] for a, b in zip(failures, failures[1:])]
    assert gaps[1] > gaps[0] >= 90  # backed off: about 100 ms, then 200 ms


def test_a_launch_that_never_registers_is_killed_when_its_lease_ends(server_factory, storage):
    server = server_factory(launch_command=f"{sys.executable} -c 'import time; time.sleep(60)'",
                            wake_interval_ms=50, launch_timeout_ms=400, launch_max_attempts=1)
    make_due(storage, "hung", rc.now_ms())
    wait_until(lambda: status_of(server, "hung")["status"] == "failed", what="the hung launch")
    assert "did not register within 400 ms" in status_of(server, "hung")["error"]
    pid = msgpack.unpackb(next(e for e in events_of(server, "hung") if e["event_type"] == "launched")["payload"])["pid"]
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
               what="the killed process")


def test_a_missing_launch_program_counts_as_a_failed_launch(server_factory, storage):
    server = server_factory(launch_command="/nonexistent/runtara-worker --go", wake_interval_ms=50,
                            launch_max_attempts=1)
    make_due(storage, "orphan", rc.now_ms())
    wait_until(lambda: status_of(server, "orphan")["status"] == "failed", what="the failed instance")
    assert "could not start '/nonexistent/runtara-worker'" in status_of(server, "orphan")["error"]


def test_without_a_launch_command_due_instances_are_only_listed(server_factory, storage, database_url):
    server_factory(wake_interval_ms=50)
    make_due(storage, "waiting", rc.now_ms())
    time.sleep(0.4)
    assert storage.read(Tx.get_instance, "waiting").result()["status"] == "suspended"
    listed = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "wakes", "--json", "--database-url",
                             database_url], capture_output=True, text=True, timeout=60)
    assert '"instance_id": "waiting"' in listed.stdout and '"launch_attempts": 0' in listed.stdout


def test_launch_environment_carries_what_the_instance_needs_and_no_secrets(server_factory, monkeypatch):
    monkeypatch.setenv("RUNTARA_DATABASE_URL", "postgresql://user:password@db/runtara")
    monkeypatch.setenv("RUNTARA_SECRET", "s3cret")
    server = server_factory(secret="s3cret", launch_command="true")
    env = server.server.launch_environment({"instance_id": "i", "tenant_id": "t", "checkpoint_id": "c"})
    assert env["RUNTARA_INSTANCE_ID"] == "i" and env["RUNTARA_TENANT_ID"] == "t"
    assert env["RUNTARA_CHECKPOINT_ID"] == "c" and env["RUNTARA_SERVER_ADDR"] == addr(server)
    assert env["RUNTARA_INSTANCE_TOKEN"] == rc.instance_token("s3cret", "t", "i")
    assert "RUNTARA_SECRET" not in env and "RUNTARA_DATABASE_URL" not in env


def test_two_servers_on_one_database_launch_each_due_instance_once(database_url, storage, tmp_path):
    command, log = script(tmp_path, "counter", COUNTER)
    now = rc.now_ms()
    for n in range(50):
        make_due(storage, f"due-{n:02d}", now)
    servers = []
    for _ in range(2):
        argv = [sys.executable, str(ROOT / "runtara_core.py"), "serve", "--database-url", database_url,
                "--port", str(free_udp_port()), "--launch", command, "--wake-interval-ms", "50",
                "--log-level", "WARNING"]
        servers.append(subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True))
    try:
        def all_completed():
            return storage.read(Tx.count_instances, status="completed").result() == 50
        wait_until(all_completed, timeout=90, interval=0.2, what="50 completed instances")
    finally:
        for process in servers:
            process.terminate()
        errors = [process.communicate(timeout=30)[1] for process in servers]
    launches = log.read_text().splitlines()
    assert sorted(launches) == [f"due-{n:02d}" for n in range(50)], errors  # each exactly once
    assert storage.read(Tx.count_events, event_type="launched").result() == 50
    assert all(p.returncode == 0 for p in servers), errors


def test_completion_racing_the_stale_sweep_is_never_overwritten(storage):
    for n in range(20):
        instance_id = f"racer-{n}"
        storage.write(Tx.create_instance, instance_id, "t", 0).result()
        storage.write(Tx.start_instance, instance_id, "t", 0).result()  # silent since the epoch: stale
        completed = storage.write(Tx.transition, instance_id, "completed", ("running",), 1000, output=b"ok")
        stale = storage.write(Tx.fail_stale, 500, 1000)
        completed, stale = completed.result(), [i for i, _ in stale.result()]
        final = storage.read(Tx.get_instance, instance_id).result()
        assert completed != (instance_id in stale)  # exactly one of them took effect
        assert final["status"] == ("completed" if completed else "failed")
        if completed:
            assert final["error"] is None and final["output"] == b"ok"

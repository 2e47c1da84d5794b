"""The instance lifecycle end to end (issue 12) and bounded close (issue 18): a real server on loopback QUIC,
real workflow processes launched by it, on SQLite and on PostgreSQL."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import runtara_core as rc
from conftest import addr, run
from test_wake import events_of, script, status_of, wait_until
from test_wake import start_instance as spawn_by_hand

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "runtara_core.py")]

# Every line a script logs names its instance and its process, so that a test can tell runs apart.
PRELUDE = '''
import asyncio, os, sys, time
sys.path.insert(0, {root!r})
import runtara_core as runtara

LOG = sys.argv[1]

def note(text):
    with open(LOG, "a") as log:
        log.write(os.environ["RUNTARA_INSTANCE_ID"] + " " + str(os.getpid()) + " " + text + "\\n")

'''

# Steps that each log when they run and when their checkpoint came back; the output echoes the input.
# Step {hold_at} waits (at most a minute) until the file {hold} exists, so that a test knows where it is.
STEPS = PRELUDE + '''
async def main():
    note("process " + os.environ.get("RUNTARA_WORKFLOW", "-"))
    async with runtara.Instance(heartbeat_interval_ms={heartbeat}) as instance:
        note(f"registered run={{instance.run}} workflow={{instance.workflow}} input={{instance.input!r}}")
        try:
            for n in range({steps}):
                @instance.durable(f"step-{{n}}")
                async def step():
                    note(f"run {{n}}")
                    deadline = time.monotonic() + 60
                    while n == {hold_at} and not os.path.exists({hold!r}) and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                    await asyncio.sleep({pause})
                    return [n, os.getpid()]
                assert (await step())[0] == n
                note(f"acked {{n}}")
            await instance.completed(b"echo:" + instance.input)
            note("completed")
        except BaseException as exc:
            note("stopped " + type(exc).__name__)
            raise
    note("exit")

asyncio.run(main())
'''

# A step, a durable sleep of {sleep_ms} (the server suspends it when that is over sleep_inline_max_ms), a step.
SLEEPER = PRELUDE + '''
async def main():
    note("process")
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        note(f"registered run={{instance.run}}")
        @instance.durable("before")
        async def before():
            note("before")

        @instance.durable("after")
        async def after():
            note("after")
            await asyncio.sleep({pause})

        await before()
        started = time.monotonic()
        await instance.sleep("nap", {sleep_ms})
        note(f"slept {{int((time.monotonic() - started) * 1000)}}")
        await after()
        await instance.completed(b"slept")
        note("completed")
    note("exit")

asyncio.run(main())
'''

# Runs until the gate file exists (at most a minute), then completes.
BLOCKER = PRELUDE + '''
async def main():
    async with runtara.Instance(heartbeat_interval_ms=100) as instance:
        note("registered")
        deadline = time.monotonic() + 60
        while not os.path.exists({gate!r}) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await instance.completed(b"unblocked")
        note("completed")

asyncio.run(main())
'''

# Registers, then dies: a crash, with nothing reported.
CRASHER = PRELUDE + '''
async def main():
    instance = runtara.Instance(heartbeat_interval_ms=0)
    await instance.register()
    note(f"registered run={{instance.run}}")
    os._exit(1)

asyncio.run(main())
'''

# Quick steps with a heartbeat every millisecond, so that a heartbeat is in flight when the instance closes.
BUSY_HEARTBEAT = PRELUDE + '''
async def main():
    async with runtara.Instance(heartbeat_interval_ms=1) as instance:
        for n in range(5):
            @instance.durable(f"s-{{n}}")
            async def step():
                await asyncio.sleep(0.01)
                return n
            await step()
        flying = [asyncio.ensure_future(instance.get_checkpoint("s-0")) for _ in range(2)]
        await instance.completed(b"done")  # then close at once, with requests still in flight
        note("completed")
    await asyncio.gather(*flying, return_exceptions=True)
    note("closed")

asyncio.run(main())
'''


# -- helpers ------------------------------------------------------------------------------------


def operator(server, fn):
    """Run `fn(client)` with an operator Client of this server; its result."""
    async def ask():
        async with rc.Client(addr(server), env={}) as client:
            return await fn(client)
    return run(ask())


def start(server, instance_id, tenant="t", input=b"", workflow=None):
    return operator(server, lambda client: client.start(instance_id, tenant, input=input, workflow=workflow))


def send(server, instance_id, signal_type):
    return operator(server, lambda client: client.send_signal(instance_id, signal_type))


def events(server, instance_id, event_type=None):
    return [e for e in events_of(server, instance_id) if event_type is None or e["event_type"] == event_type]


def payloads(server, instance_id, event_type):
    return [msgpack.unpackb(e["payload"]) for e in events(server, instance_id, event_type)]


def status_is(server, instance_id, status):
    return lambda: status_of(server, instance_id)["status"] == status


def log_lines(log, instance_id=None):
    """[(instance_id, pid, text)] of a script's log."""
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    return [(i, int(pid), text) for i, pid, text in lines if instance_id is None or i == instance_id]


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def register_by_hand(server, instance_id, tenant="t"):
    """Register in this process (as a process started by hand would); the registration answer."""
    async def go():
        instance = rc.Instance(instance_id, tenant, server_addr=addr(server), heartbeat_interval_ms=0, env={})
        try:
            return await instance.register()
        finally:
            await instance.close()
    return run(go())


@pytest.fixture
def serve(server_factory, tmp_path):
    """server_factory, and afterwards the end of every launched process of the test that is still alive
    (a failing test must not leave workflow processes behind)."""
    servers = []

    def begin(**overrides):
        server = server_factory(**overrides)
        servers.append(server)
        return server
    yield begin
    for server in servers:
        if server._loop.is_closed():  # the test stopped it
            continue
        try:
            async def launches(client):
                listed = (await client.list_instances(limit=1000))["instances"]
                return [msgpack.unpackb(e["payload"]) for i in listed for e in
                        (await client.list_events(i["instance_id"], event_type="launched", limit=1000))["events"]]
            for launch in operator(server, launches):
                pid = launch["pid"]
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(tmp_path).encode() in cmdline and alive(pid):
                    os.killpg(pid, signal.SIGKILL)
        except Exception as exc:  # never hide the test's own failure
            print(f"cleanup of launched processes failed: {exc!r}")


def steps_script(tmp_path, steps, pause, heartbeat=0, hold_at=-1):
    """The STEPS script; its log; the file that lets step `hold_at` finish."""
    hold = tmp_path / "hold"
    command, log = script(tmp_path, "steps", STEPS, steps=steps, pause=pause, heartbeat=heartbeat, hold_at=hold_at,
                          hold=str(hold))
    return command, log, hold


def settings(command, **overrides):
    return {"launch_command": command, "wake_interval_ms": 100, **overrides}


# -- 1. start, SIGKILL, relaunch, wait ------------------------------------------------------------


def test_a_killed_run_is_relaunched_and_no_finished_step_runs_again(serve, tmp_path):
    command, log, hold = steps_script(tmp_path, steps=5, pause=0.1, hold_at=2)
    server = serve(**settings(command))
    started = start(server, "job", input=b"hello")
    assert started == {"instance_id": "job", "status": "pending", "created": True}

    wait_until(lambda: any(text == "run 2" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the third step of the first run")
    [first] = payloads(server, "job", "launched")
    assert first["run"] == 1 and first["attempt"] == 1
    os.killpg(first["pid"], signal.SIGKILL)  # mid-step: step 2 waits for the hold file
    hold.touch()  # the relaunched run goes through

    output = run(_wait(server, "job", 60))
    assert output["status"] == "completed" and output["output"] == b"echo:hello" and output["run"] == 2

    launched = payloads(server, "job", "launched")
    assert [(p["run"], p["attempt"]) for p in launched] == [(1, 1), (2, 1)]
    second = launched[1]["pid"]
    exited = payloads(server, "job", "exited")
    assert {"pid": first["pid"], "code": -signal.SIGKILL, "run": 1} in exited
    [restart] = payloads(server, "job", "restart")
    assert restart["run"] == 1 and restart["restarts"] == 1 and str(-signal.SIGKILL) in restart["reason"]
    assert not events(server, "job", "launch_failed") and not events(server, "job", "failed")

    lines = log_lines(log, "job")
    assert (first["pid"], "registered run=1 workflow=default input=b'hello'") in [(p, t) for _, p, t in lines]
    assert (second, "registered run=2 workflow=default input=b'hello'") in [(p, t) for _, p, t in lines]
    # A step whose checkpoint was saved before the relaunch never runs again; every other step runs in run 2.
    relaunched_at = events(server, "job", "launched")[1]["created_at_ms"]
    saved = {c["checkpoint_id"]: c["created_at_ms"]
             for c in operator(server, lambda client: client.list_checkpoints("job"))["checkpoints"]}
    assert sorted(saved) == [f"step-{n}" for n in range(5)]
    for n in range(5):
        runs = [pid for _, pid, text in lines if text == f"run {n}"]
        if saved[f"step-{n}"] < relaunched_at:
            assert runs == [first["pid"]], (n, lines)
        else:
            assert runs[-1:] == [second] and runs.count(second) == 1 and len(runs) <= 2, (n, lines)
    assert [pid for _, pid, text in lines if text == "completed"] == [second]
    assert [text for _, pid, text in lines if pid == second and text.startswith("run ")] == ["run 2", "run 3", "run 4"]
    assert [text for _, pid, text in lines if pid == first["pid"]][0] == "process default"  # RUNTARA_WORKFLOW


async def _wait(server, instance_id, timeout):
    async with rc.Client(addr(server), env={}) as client:
        return await client.wait(instance_id, timeout=timeout)


def test_a_silent_run_of_a_process_started_by_hand_is_relaunched(serve, tmp_path):
    """A run the server did not launch is found dead by its silence (heartbeat timeout) and relaunched."""
    command, log, hold = steps_script(tmp_path, steps=3, pause=0.1, heartbeat=100, hold_at=1)
    server = serve(**settings(command, heartbeat_timeout_ms=1500))
    by_hand = spawn_by_hand(command, server, "silent")
    try:
        wait_until(lambda: any(text == "acked 0" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
                   what="the first step")
        os.kill(by_hand.pid, signal.SIGKILL)  # in step 1, which waits for the hold file
    finally:
        by_hand.kill()
        by_hand.communicate(timeout=30)
    hold.touch()
    status = run(_wait(server, "silent", 60))
    assert status["status"] == "completed" and status["run"] == 2, status
    [restart] = payloads(server, "silent", "restart")
    assert restart["run"] == 1 and "no heartbeat, checkpoint or event since" in restart["reason"]
    [launch] = payloads(server, "silent", "launched")
    assert launch["run"] == 2
    runs = [(pid, text) for _, pid, text in log_lines(log, "silent") if text.startswith("run ")]
    assert [text for pid, text in runs if pid == by_hand.pid][0] == "run 0"
    assert "run 0" not in [text for pid, text in runs if pid == launch["pid"]]  # saved before the kill
    assert [text for pid, text in runs if pid == launch["pid"]][-1] == "run 2"


# -- 2. two processes for one instance ------------------------------------------------------------


def test_of_two_processes_for_one_instance_the_older_is_superseded(serve, tmp_path):
    command, log, hold = steps_script(tmp_path, steps=5, pause=0.1, heartbeat=50, hold_at=2)
    server = serve(**settings(command))
    start(server, "twice")
    wait_until(lambda: any(text == "run 2" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the launched process to be in step 2")
    [launched] = payloads(server, "twice", "launched")
    older = launched["pid"]
    newer = spawn_by_hand(command, server, "twice")
    try:
        wait_until(lambda: status_of(server, "twice")["run"] == 2, timeout=30, what="the second registration")
        hold.touch()  # the older one finishes step 2 now, after it was superseded
        assert newer.wait(timeout=60) == 0, newer.stderr.read()
    finally:
        newer.kill()
    wait_until(lambda: payloads(server, "twice", "exited"), timeout=30, what="the exit of the older process")
    [exited] = payloads(server, "twice", "exited")
    assert exited == {"pid": older, "code": 0, "run": 1}  # it exited cleanly

    status = status_of(server, "twice")
    assert status["status"] == "completed" and status["run"] == 2 and status["output"] == b"echo:"
    types = [e["event_type"] for e in events_of(server, "twice")]
    assert types.count("completed") == 1 and "failed" not in types  # the older reported nothing
    assert "restart" not in types and "launch_failed" not in types and types.count("launched") == 1

    lines = log_lines(log, "twice")
    older_lines = [text for _, pid, text in lines if pid == older]
    assert older_lines[-2:] == ["stopped Superseded", "exit"], older_lines
    assert "completed" not in older_lines
    # Each step's checkpoint was saved once, and a step the older one finished after it was superseded
    # kept the newer one's result.
    checkpoints = operator(server, lambda client: client.list_checkpoints("twice"))
    assert sorted(c["checkpoint_id"] for c in checkpoints["checkpoints"]) == [f"step-{n}" for n in range(5)]
    assert checkpoints["total_count"] == 5
    lost = [text.split()[1] for text in older_lines if text.startswith("run ")][-1]  # the step it was in
    assert lost == "2" and f"acked {lost}" not in older_lines
    state = _checkpoint_state(server, "twice", f"step-{lost}")
    assert state == [int(lost), newer.pid]
    for n in range(5):  # a step the older one ran and acknowledged was replayed, not run, by the newer one
        if f"run {n}" in older_lines and f"acked {n}" in older_lines:
            assert (newer.pid, f"run {n}") not in [(pid, text) for _, pid, text in lines]


def _checkpoint_state(server, instance_id, checkpoint_id):
    reply = operator(server, lambda client: client.call("get_checkpoint", instance_id=instance_id,
                                                        checkpoint_id=checkpoint_id))
    return msgpack.unpackb(reply["state"]) if reply["found"] else None


# -- 3. paused instances --------------------------------------------------------------------------


def test_a_paused_run_is_refused_and_not_relaunched_until_resumed(serve, tmp_path):
    command, log, hold = steps_script(tmp_path, steps=5, pause=0.05, hold_at=1)
    server = serve(**settings(command))
    start(server, "held")
    wait_until(lambda: any(text == "run 1" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the second step")
    assert send(server, "held", "pause")["status"] == "running"  # delivered at its next checkpoint
    hold.touch()
    wait_until(lambda: payloads(server, "held", "exited"), timeout=30, what="the paused process to exit")
    assert payloads(server, "held", "exited")[0]["code"] == 0
    status = status_of(server, "held")
    assert status["status"] == "suspended" and status["run"] == 1
    assert [text for _, _, text in log_lines(log, "held")][-2:] == ["stopped Paused", "exit"]

    with pytest.raises(rc.InvalidState, match="paused; send resume"):
        register_by_hand(server, "held")
    time.sleep(0.6)  # six wake intervals: a paused instance is not due
    assert status_of(server, "held")["status"] == "suspended" and status_of(server, "held")["run"] == 1
    assert len(payloads(server, "held", "launched")) == 1

    assert send(server, "held", "resume")["status"] == "suspended"
    status = run(_wait(server, "held", 60))
    assert status["status"] == "completed" and status["run"] == 2
    assert len(payloads(server, "held", "launched")) == 2
    assert [e.get("subtype") for e in events(server, "held", "signal")] == ["pause", "resume"]
    runs = [text for _, _, text in log_lines(log, "held") if text.startswith("run ")]
    assert sorted(runs) == [f"run {n}" for n in range(5)]  # each step ran once


def test_a_paused_pending_instance_is_refused_until_resumed(serve, tmp_path):
    command, _, _ = steps_script(tmp_path, steps=1, pause=0)
    server = serve(**settings(None, workflow_commands={"other": command}))  # "default" is never launched
    start(server, "manual")
    assert send(server, "manual", "pause")["status"] == "suspended"  # at once: no process is involved
    with pytest.raises(rc.InvalidState, match="instance manual is paused; send resume to run it again"):
        register_by_hand(server, "manual")
    assert status_of(server, "manual")["status"] == "suspended"
    assert send(server, "manual", "resume")["status"] == "suspended"
    registered = register_by_hand(server, "manual")
    assert registered["run"] == 1 and registered["status"] == "running"
    assert [(e["event_type"], e.get("subtype")) for e in events_of(server, "manual")] == [
        ("created", "default"), ("signal", "pause"), ("signal", "resume"), ("started", None)]


# -- 4. resume of a long sleeper ------------------------------------------------------------------


def test_resume_wakes_a_long_sleeper_with_one_launch(serve, tmp_path):
    command, log = script(tmp_path, "sleeper", SLEEPER, sleep_ms=600_000, pause=0)
    server = serve(**settings(command, sleep_inline_max_ms=1000))
    start(server, "dozer")
    wait_until(status_is(server, "dozer", "suspended"), timeout=30, what="the sleeper to suspend")
    assert status_of(server, "dozer")["sleep_until_ms"] > rc.now_ms() + 500_000
    time.sleep(0.5)  # five wake intervals: a sleeper is not due before its time
    assert len(payloads(server, "dozer", "launched")) == 1

    resumed_at = rc.now_ms()
    assert send(server, "dozer", "resume")["status"] == "suspended"
    status = run(_wait(server, "dozer", 60))
    assert status["status"] == "completed" and status["output"] == b"slept" and status["run"] == 2

    timeline = [(e["event_type"], e.get("subtype")) for e in events_of(server, "dozer") if e["event_type"] != "exited"]
    assert timeline == [("created", "default"), ("launched", None), ("started", None), ("suspended", "sleep"),
                        ("launched", None), ("signal", "resume"), ("resumed", None), ("completed", None)]
    wait_until(lambda: len(payloads(server, "dozer", "exited")) == 2, timeout=30, what="both processes to exit")
    assert [p["code"] for p in payloads(server, "dozer", "exited")] == [0, 0]
    assert [p["run"] for p in payloads(server, "dozer", "launched")] == [1, 2]
    lines = [text for _, _, text in log_lines(log, "dozer")]
    assert lines.count("before") == 1 and lines.count("after") == 1
    [slept] = [int(text.split()[1]) for text in lines if text.startswith("slept ")]
    assert slept < 2000  # the replayed sleep returned at once, not after its ten minutes
    completed_at = events(server, "dozer", "completed")[0]["created_at_ms"]
    assert completed_at - resumed_at < 30_000


# -- 5. the concurrency limit ---------------------------------------------------------------------


def test_with_limit_one_waiting_instances_queue_then_run_one_after_the_other(serve, tmp_path):
    gate = tmp_path / "gate"
    blocker, blocker_log = script(tmp_path, "blocker", BLOCKER, gate=str(gate))
    sleeper, sleeper_log = script(tmp_path, "sleeper", SLEEPER, sleep_ms=2000, pause=0.3)
    worker, worker_log, _ = steps_script(tmp_path, steps=2, pause=0.2)
    server = serve(wake_interval_ms=100, max_concurrent_instances=1, sleep_inline_max_ms=0,
                   workflow_commands={"blocker": blocker, "sleeper": sleeper, "worker": worker})

    start(server, "waker", workflow="sleeper")
    wait_until(status_is(server, "waker", "suspended"), timeout=30, what="the sleeper to suspend")
    start(server, "busy", workflow="blocker")
    wait_until(status_is(server, "busy", "running"), timeout=30, what="the busy instance to run")
    start(server, "late", workflow="worker")
    wakes_at = status_of(server, "waker")["sleep_until_ms"]
    assert events(server, "busy", "launched")[0]["created_at_ms"] < wakes_at  # the slot was taken first
    # Both wait: the waker's time has come and gone, the late one is pending, and neither is launched.
    wait_until(lambda: rc.now_ms() > wakes_at + 700, timeout=30, what="the wake time to pass")
    assert status_of(server, "waker")["status"] == "suspended"
    assert status_of(server, "late")["status"] == "pending"
    assert status_of(server, "busy")["status"] == "running"
    assert len(payloads(server, "waker", "launched")) == 1 and not payloads(server, "late", "launched")
    with pytest.raises(rc.Overloaded):  # a process that registers on its own beyond the limit
        register_by_hand(server, "intruder")

    gate.touch()
    for instance_id in ("busy", "waker", "late"):
        assert run(_wait(server, instance_id, 60))["status"] == "completed", instance_id
    for instance_id in ("busy", "waker", "late"):
        types = [e["event_type"] for e in events_of(server, instance_id)]
        assert "launch_failed" not in types and "failed" not in types and "restart" not in types, (instance_id, types)
    assert len(payloads(server, "waker", "launched")) == 2 and len(payloads(server, "late", "launched")) == 1

    def span(instance_id):  # from its last launch to its completion
        return (events(server, instance_id, "launched")[-1]["created_at_ms"],
                events(server, instance_id, "completed")[0]["created_at_ms"])
    spans = sorted([span("busy"), span("waker"), span("late")])
    assert spans[0] == span("busy")
    due = {"waker": wakes_at, "late": status_of(server, "late")["created_at_ms"]}
    assert spans[1:] == [span(i) for i in sorted(due, key=due.get)]  # in order of due time
    for (_, first_done), (second_launched, _) in zip(spans, spans[1:]):
        assert second_launched >= first_done, spans  # one after the other


# -- 6. cancel without a process ------------------------------------------------------------------


def test_cancel_of_pending_paused_and_sleeping_instances_is_immediate(serve, database_url):
    server = serve(sleep_inline_max_ms=0)  # no launch command: nothing runs them

    start(server, "c-pending")
    start(server, "c-paused")
    assert send(server, "c-paused", "pause")["status"] == "suspended"

    async def fall_asleep():
        instance = rc.Instance("c-sleeping", "t", server_addr=addr(server), heartbeat_interval_ms=0, env={})
        async with instance:
            await instance.sleep("nap", 600_000)
    run(fall_asleep())
    assert status_of(server, "c-sleeping")["status"] == "suspended"
    assert status_of(server, "c-sleeping")["sleep_until_ms"] > rc.now_ms()

    for instance_id in ("c-pending", "c-paused", "c-sleeping"):
        before = rc.now_ms()
        reply = send(server, instance_id, "cancel")
        assert reply == {"instance_id": instance_id, "signal_type": "cancel", "status": "cancelled"}
        status = operator(server, lambda client: client.call("wait_instance", instance_id=instance_id,
                                                             timeout_ms=0))
        assert status["status"] == "cancelled" and status["finished_at_ms"] >= before, status
        assert events(server, instance_id)[-1]["event_type"] == "signal"
        assert events(server, instance_id)[-1]["subtype"] == "cancel"
        with pytest.raises(rc.InvalidState):
            register_by_hand(server, instance_id)
        with pytest.raises(rc.InvalidState):
            send(server, instance_id, "resume")
    with rc.open_storage(database_url) as storage:
        for instance_id in ("c-pending", "c-paused", "c-sleeping"):
            assert storage.read(rc.Tx.get_signal, instance_id).result() is None  # no pending signal left


def test_a_pending_cancel_is_never_replaced_and_an_orphaned_run_applies_it(serve, tmp_path):
    command, log, _ = steps_script(tmp_path, steps=2, pause=0, hold_at=0)  # never released
    server = serve(**settings(command))
    start(server, "doomed")
    wait_until(lambda: any(text == "run 0" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the first step")
    [launched] = payloads(server, "doomed", "launched")
    os.killpg(launched["pid"], signal.SIGSTOP)  # it can acknowledge nothing now
    try:
        assert send(server, "doomed", "cancel")["status"] == "running"
        for other in ("pause", "resume"):
            with pytest.raises(rc.InvalidState, match="pending cancel"):
                send(server, "doomed", other)
    finally:
        os.killpg(launched["pid"], signal.SIGKILL)
    status = run(_wait(server, "doomed", 30))
    assert status["status"] == "cancelled" and status["run"] == 1  # applied by the server, not relaunched
    assert len(payloads(server, "doomed", "launched")) == 1 and not events(server, "doomed", "restart")


def test_an_orphaned_run_with_a_pending_pause_is_paused_until_resumed(serve, tmp_path):
    command, log, hold = steps_script(tmp_path, steps=3, pause=0, hold_at=1)
    server = serve(**settings(command))
    start(server, "frozen")
    wait_until(lambda: any(text == "run 1" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the second step")
    [launched] = payloads(server, "frozen", "launched")
    os.killpg(launched["pid"], signal.SIGSTOP)
    try:
        assert send(server, "frozen", "pause")["status"] == "running"
    finally:
        os.killpg(launched["pid"], signal.SIGKILL)
    wait_until(status_is(server, "frozen", "suspended"), timeout=30, what="the dead run to be paused")
    assert not events(server, "frozen", "restart")
    with pytest.raises(rc.InvalidState, match="paused"):
        register_by_hand(server, "frozen")
    assert len(payloads(server, "frozen", "launched")) == 1
    hold.touch()
    assert send(server, "frozen", "resume")["status"] == "suspended"
    status = run(_wait(server, "frozen", 60))
    assert status["status"] == "completed" and status["run"] == 2
    assert [p["run"] for p in payloads(server, "frozen", "launched")] == [1, 2]
    runs = [text for _, _, text in log_lines(log, "frozen") if text.startswith("run ")]
    assert runs == ["run 0", "run 1", "run 1", "run 2"]  # step 1 never finished in the first run


def test_a_stalled_run_is_replaced_and_superseded_when_it_wakes(serve, tmp_path):
    command, log, hold = steps_script(tmp_path, steps=3, pause=0, heartbeat=100, hold_at=1)
    server = serve(**settings(command, heartbeat_timeout_ms=1500))
    start(server, "stalled")
    wait_until(lambda: any(text == "run 1" for _, _, text in log_lines(log)), timeout=30, interval=0.02,
               what="the second step")
    [first] = payloads(server, "stalled", "launched")
    os.killpg(first["pid"], signal.SIGSTOP)  # alive, but silent
    try:
        wait_until(lambda: status_of(server, "stalled")["run"] == 2, timeout=30, what="the replacement run")
        [restart] = payloads(server, "stalled", "restart")
        assert restart["run"] == 1 and "no heartbeat" in restart["reason"]
    finally:
        os.killpg(first["pid"], signal.SIGCONT)
    hold.touch()
    status = run(_wait(server, "stalled", 60))
    assert status["status"] == "completed" and status["run"] == 2
    wait_until(lambda: len(payloads(server, "stalled", "exited")) == 2, timeout=30, what="both processes to exit")
    assert sorted((p["run"], p["code"]) for p in payloads(server, "stalled", "exited")) == [(1, 0), (2, 0)]
    first_lines = [text for _, pid, text in log_lines(log, "stalled") if pid == first["pid"]]
    assert first_lines[-2:] == ["stopped Superseded", "exit"] and "completed" not in first_lines
    types = [e["event_type"] for e in events_of(server, "stalled")]
    assert "failed" not in types and types.count("restart") == 1 and types.count("completed") == 1


# -- 7. a workflow that always crashes ------------------------------------------------------------


def test_a_workflow_that_always_crashes_fails_after_the_restart_limit(serve, tmp_path):
    command, log = script(tmp_path, "crasher", CRASHER)
    server = serve(**settings(command, wake_interval_ms=50, max_restarts=2))
    start(server, "crashy")
    status = run(_wait(server, "crashy", 60))
    assert status["status"] == "failed" and status["run"] == 3, status
    assert "exited with code 1" in status["error"] and "2 restarts" in status["error"], status["error"]
    restarts = payloads(server, "crashy", "restart")
    assert [(r["run"], r["restarts"]) for r in restarts] == [(1, 1), (2, 2)]
    assert all("exited with code 1" in r["reason"] for r in restarts)
    assert [p["run"] for p in payloads(server, "crashy", "launched")] == [1, 2, 3]
    wait_until(lambda: len(payloads(server, "crashy", "exited")) == 3, timeout=30, what="three exits")
    assert [(p["code"], p["run"]) for p in payloads(server, "crashy", "exited")] == [(1, 1), (1, 2), (1, 3)]
    assert not events(server, "crashy", "launch_failed")  # each one registered: crashes, not failed launches
    assert [text for _, _, text in log_lines(log, "crashy")] == [f"registered run={n}" for n in (1, 2, 3)]
    time.sleep(0.3)  # six wake intervals: a failed instance is launched no more
    assert len(payloads(server, "crashy", "launched")) == 3


# -- 8. start_instance and wait_instance ----------------------------------------------------------


def test_start_is_idempotent_per_tenant(serve):
    server = serve()  # no launch command: started instances stay pending
    assert start(server, "once", input=b"first", workflow="etl") == \
        {"instance_id": "once", "status": "pending", "created": True}
    assert start(server, "once", input=b"second") == {"instance_id": "once", "status": "pending", "created": False}
    with pytest.raises(rc.TenantMismatch):
        start(server, "once", tenant="other", input=b"third")
    status = status_of(server, "once")
    assert status["workflow"] == "etl" and status["run"] == 0 and status["tenant_id"] == "t"
    assert [(e["event_type"], e.get("subtype")) for e in events_of(server, "once")] == [("created", "etl")]
    registered = register_by_hand(server, "once")
    assert registered["input"] == b"first" and registered["workflow"] == "etl" and registered["run"] == 1
    assert start(server, "once", input=b"again") == {"instance_id": "once", "status": "running", "created": False}
    with pytest.raises(rc.TenantMismatch):
        register_by_hand(server, "once", tenant="other")
    start(server, "empty")
    assert "input" not in register_by_hand(server, "empty")


def test_wait_answers_at_the_timeout_and_at_once_on_completion(serve):
    server = serve()
    core = server.server.core
    assert core.WAIT_RECHECK_S == 1.0
    core.WAIT_RECHECK_S = 60  # so that only a notification, not a recheck, can answer early
    start(server, "waited")

    async def scenario():
        async with rc.Client(addr(server), env={}) as client:
            with pytest.raises(rc.InstanceNotFound):
                await client.call("wait_instance", instance_id="nobody", timeout_ms=100)
            asked = time.monotonic()
            status = await client.call("wait_instance", instance_id="waited", timeout_ms=500)
            assert 0.5 <= time.monotonic() - asked < 5 and status["status"] == "pending"
            asked = time.monotonic()
            status = await client.wait("waited", timeout=0.5)
            assert 0.5 <= time.monotonic() - asked < 5 and status["status"] == "pending"

            instance = rc.Instance("waited", "t", server_addr=addr(server), heartbeat_interval_ms=0, env={})
            async with instance:
                asked = time.monotonic()
                waiting = asyncio.ensure_future(client.call("wait_instance", instance_id="waited", timeout_ms=30_000))
                status = await client.call("wait_instance", instance_id="waited", timeout_ms=300)
                assert status["status"] == "running" and not waiting.done()
                await asyncio.sleep(0.2)
                await instance.completed(b"result")
                completed = time.monotonic()
                status = await waiting
                answered = time.monotonic()
            assert status["status"] == "completed" and status["output"] == b"result"
            assert answered - completed < 0.5, answered - completed  # well under the recheck
            assert answered - asked >= 0.5
            status = await client.wait("waited", timeout=10)
            assert status["status"] == "completed" and status["output"] == b"result"
    run(scenario())


def test_waiting_requests_are_answered_when_the_server_stops(serve):
    server = serve()
    start(server, "lingering")

    async def scenario():
        async with rc.Client(addr(server), env={}) as client:
            waiting = asyncio.ensure_future(client.call("wait_instance", instance_id="lingering",
                                                        timeout_ms=60_000))
            await asyncio.sleep(0.3)
            stopping = time.monotonic()
            await asyncio.to_thread(server.stop)
            status = await waiting
            assert status["status"] == "pending" and time.monotonic() - stopping < 5
    run(scenario())


# -- 9. issue 18: close() is bounded ----------------------------------------------------------------


def test_many_instances_close_within_a_bound_while_requests_are_in_flight(serve):
    count, bound = 40, 5.0
    server = serve(max_concurrent_instances=count)

    async def one(n):
        instance = rc.Instance(f"hb-{n}", "t", server_addr=addr(server), heartbeat_interval_ms=1 + n % 5, env={})
        flying = []
        try:
            await instance.register()
            for k in range(3):
                await instance.checkpoint(f"c-{k}", b"x" * 100)
                await asyncio.sleep(0.002 * (n % 7))  # let heartbeats go round meanwhile
            flying = [asyncio.ensure_future(instance.get_checkpoint("c-0")) for _ in range(3)]
            await instance.completed(b"")  # then close at once, as `async with` does
        finally:
            began = time.monotonic()
            await instance.close()
            took = time.monotonic() - began
            await asyncio.gather(*flying, return_exceptions=True)
        return took

    async def scenario():
        tasks = [asyncio.ensure_future(one(n)) for n in range(count)]
        done, hung = await asyncio.wait(tasks, timeout=60)
        for task in hung:
            task.cancel()
        assert not hung, f"{len(hung)} of {count} instances never finished closing"
        return [task.result() for task in tasks]

    took = run(scenario())
    assert max(took) < bound, sorted(took)[-5:]
    completed = operator(server, lambda client: client.list_instances(status="completed", limit=1000))
    assert completed["total_count"] == count


def test_a_launched_workflow_exits_soon_after_it_completes(serve, tmp_path):
    command, log = script(tmp_path, "busy", BUSY_HEARTBEAT)
    server = serve(**settings(command))
    ids = [f"quick-{n}" for n in range(10)]
    for instance_id in ids:
        start(server, instance_id)
    for instance_id in ids:
        assert run(_wait(server, instance_id, 60))["status"] == "completed"
    for instance_id in ids:
        wait_until(lambda: payloads(server, instance_id, "exited"), timeout=20, what=f"{instance_id} to exit")
        [exited] = payloads(server, instance_id, "exited")
        assert exited["code"] == 0
        completed_at = events(server, instance_id, "completed")[0]["created_at_ms"]
        exited_at = events(server, instance_id, "exited")[0]["created_at_ms"]
        assert exited_at - completed_at < 5000, (instance_id, exited_at - completed_at)
    assert sorted(text for i, _, text in log_lines(log) if text == "closed") == ["closed"] * len(ids)


# -- 10. the CLI ------------------------------------------------------------------------------------


def cli(*args, timeout=90):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_start_waits_for_the_output(serve, tmp_path, database_url):
    command, _, _ = steps_script(tmp_path, steps=2, pause=0.1)
    serve(**settings(command))
    done = cli("start", "from-cli", "--tenant", "t", "--input", "hello world", "--wait", "--timeout", "60s",
               "--database-url", database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "echo:hello world"
    again = cli("wait", "from-cli", "--database-url", database_url)
    assert again.returncode == 0 and again.stdout.strip() == "echo:hello world", again.stderr


def test_cli_wait_exit_codes(serve, database_url):
    server = serve()

    async def fail_one():
        instance = rc.Instance("broken", "t", server_addr=addr(server), heartbeat_interval_ms=0, env={})
        async with instance:
            await instance.failed("boom")
    run(fail_one())
    start(server, "stopped")
    send(server, "stopped", "cancel")
    register_by_hand(server, "busy")  # running, and stays so

    failed = cli("wait", "broken", "--database-url", database_url)
    assert failed.returncode == 3, failed.stderr
    assert "failed" in failed.stderr and "boom" in failed.stderr
    cancelled = cli("wait", "stopped", "--database-url", database_url)
    assert cancelled.returncode == 4 and "cancelled" in cancelled.stderr, cancelled.stderr
    began = time.monotonic()
    running = cli("wait", "busy", "--timeout", "1s", "--database-url", database_url)
    assert running.returncode == 5 and "running" in running.stderr, running.stderr
    assert time.monotonic() - began >= 1
    assert len(running.stderr.strip().splitlines()) == 1
    unknown = cli("wait", "nobody", "--database-url", database_url)
    assert unknown.returncode == 1, unknown.stderr


def test_shutdown_answers_held_requests_at_once_and_refuses_registrations(server_factory):
    """On SIGTERM an inline sleep in flight made the server wait about 10 s, then drop the connection without
    an answer. Now it answers at once that the server is shutting down (the wake time stays, so the sleep sent
    again waits only what is left), refuses new registrations the same way, and stops promptly."""
    server = server_factory()

    async def scenario():
        inst = rc.Instance("napper", "t", server_addr=addr(server), heartbeat_interval_ms=0, env={})
        await inst.register()
        sleeping = asyncio.ensure_future(inst.sleep("nap", 30_000))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        with pytest.raises(rc.Overloaded, match="shutting down"):
            await sleeping
        answered = time.monotonic() - started
        await stopping
        stopped = time.monotonic() - started
        await inst.close()
        return answered, stopped
    answered, stopped = run(scenario())
    assert answered < 2 and stopped < 4, (answered, stopped)


def test_a_workflow_stopped_by_a_shutdown_is_not_failed(database_url):
    """The shutdown answer is no fault of the workflow: `async with Instance()` reports nothing for it."""
    async def scenario():
        with rc.open_storage(database_url) as storage:
            core = rc.Core(storage, rc.Settings(database_url=database_url))
            transport = rc.EmbeddedTransport(core)
            with pytest.raises(rc.Overloaded):
                async with rc.Instance("stopped", "t", transport=transport, heartbeat_interval_ms=0, env={}) as inst:
                    napping = asyncio.ensure_future(inst.sleep("nap", 30_000))
                    await asyncio.sleep(0.2)
                    core.close()
                    await napping
            return storage.read(rc.Tx.get_instance, "stopped").result()["status"]
    assert run(scenario()) == "running"  # its run is dead; the scheduler relaunches it


def test_a_stopping_core_refuses_registrations(database_url):
    async def scenario():
        with rc.open_storage(database_url) as storage:
            core = rc.Core(storage, rc.Settings(database_url=database_url))
            core.close()
            with pytest.raises(rc.Overloaded, match="shutting down; register again"):
                await core.dispatch({"op": "register_instance", "instance_id": "i", "tenant_id": "t"}, rc.Session())
    run(scenario())


# -- what a review broke ------------------------------------------------------------------------


def embedded_core(storage, database_url, **settings):
    return rc.Core(storage, rc.Settings(database_url=database_url, **settings))


def test_a_superseded_runs_inline_sleep_leaves_the_newer_runs_wake_time(storage, database_url):
    """The older run's inline sleep, ending, cleared whatever wake time was stored: the newer run's long sleep
    lost its wake time and the instance could never wake."""
    core = embedded_core(storage, database_url, sleep_inline_max_ms=2000)

    async def scenario():
        older = rc.Instance("i", "t", transport=rc.EmbeddedTransport(core), heartbeat_interval_ms=0, env={})
        await older.register()
        napping = asyncio.ensure_future(older.sleep("short", 1000))
        await asyncio.sleep(0.2)
        newer = rc.Instance("i", "t", transport=rc.EmbeddedTransport(core), heartbeat_interval_ms=0, env={})
        await newer.register()
        with pytest.raises(rc.Suspended) as suspended:
            await newer.sleep("long", 60_000)
        with pytest.raises(rc.Superseded):
            await napping
        return suspended.value.wake_at_ms
    wake_at = run(scenario())
    assert storage.read(rc.Tx.get_instance, "i").result()["sleep_until_ms"] == wake_at


def test_stored_values_must_leave_their_answers_room(storage, database_url):
    """A start_instance input the registration answer could never carry was accepted, and every registration
    then committed a run and answered FRAME_TOO_LARGE."""
    core = embedded_core(storage, database_url, max_message_bytes=100_000)

    async def scenario():
        big = b"x" * (core.answer_room + 1)
        for message in ({"op": "start_instance", "instance_id": "i", "tenant_id": "t", "input": big},
                        {"op": "send_custom_signal", "instance_id": "i", "checkpoint_id": "c", "payload": big}):
            with pytest.raises(rc.InvalidRequest, match="holds"):
                await core.dispatch(message, rc.Session())
        assert (await core.dispatch({"op": "get_instance_status", "instance_id": "i"}, rc.Session()))["found"] is False
        await core.dispatch({"op": "start_instance", "instance_id": "i", "tenant_id": "t",
                             "input": big[:-1]}, rc.Session())
        registered = await core.dispatch({"op": "register_instance", "instance_id": "i", "tenant_id": "t"},
                                         rc.Session())
        assert len(rc.encode_frame(rc.FRAME_RESPONSE, registered)) - rc.FRAME_HEADER.size <= 100_000
    run(scenario())


def test_a_pause_calls_off_the_launch_of_a_due_sleeper(storage, database_url):
    """A pause sent while a due sleeper was being launched left the lease, which let the launched process
    register and run although the instance was paused."""
    core = embedded_core(storage, database_url, launch_command="x", sleep_inline_max_ms=0)

    async def scenario():
        session = rc.Session()
        await core.dispatch({"op": "register_instance", "instance_id": "i", "tenant_id": "t"}, session)
        await core.dispatch({"op": "sleep", "instance_id": "i", "checkpoint_id": "nap", "state": b"",
                             "duration_ms": 1}, session)
        await asyncio.sleep(0.01)
        [claim] = await core.claim_launches()
        sent = await core.dispatch({"op": "send_signal", "instance_id": "i", "signal_type": "pause"}, session)
        assert sent["status"] == "suspended"
        with pytest.raises(rc.InvalidState, match="paused"):
            await core.dispatch({"op": "register_instance", "instance_id": "i", "tenant_id": "t"}, session)
        assert await core.launch_ended(claim, 1, 1, "exited with code 1") == "suspended"  # not a failed launch
        assert storage.read(rc.Tx.count_events, "i", "launch_failed").result() == 0
    run(scenario())


def test_a_resume_to_a_live_run_takes_effect_at_once(storage, database_url):
    """A resume sent to a running instance lingered, and made its next long sleep due at once."""
    core = embedded_core(storage, database_url)

    async def scenario():
        session = rc.Session()
        await core.dispatch({"op": "register_instance", "instance_id": "i", "tenant_id": "t"}, session)
        await core.dispatch({"op": "send_signal", "instance_id": "i", "signal_type": "pause"}, session)
        sent = await core.dispatch({"op": "send_signal", "instance_id": "i", "signal_type": "resume"}, session)
        assert sent["status"] == "running"
        assert "signal" not in await core.dispatch({"op": "poll_signals", "instance_id": "i"}, session)
    run(scenario())
    assert storage.read(rc.Tx.count_events, "i", "signal", "resume").result() == 1


def test_serve_with_a_worker_claims_under_the_workers_executor(database_url):
    """Server.start used the settings' executor, so two servers with Workers of different names both claimed
    as "local" and each declared the other's live runs dead."""
    worker = rc.Worker(database_url, executor="edge-7")
    with rc.ServerThread(rc.Settings(database_url=database_url, port=0), worker=worker) as server:
        assert server.server.scheduler.executor == "edge-7"

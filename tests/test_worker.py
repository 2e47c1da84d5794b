"""In-process workflows (issue 13): a Worker runs registered workflow functions as tasks on the same
database and under the same rules as the server's scheduler; `serve --workflows`; fork_instance.
Every test runs on SQLite and on PostgreSQL."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import runtara_core as rc
from conftest import addr, free_udp_port, run, spawn_server, wait_ready

ROOT = Path(__file__).resolve().parent.parent
Tx = rc.Tx


def make_worker(database_url: str, **settings) -> rc.Worker:
    settings.setdefault("wake_interval_ms", 100)
    return rc.Worker(database_url, settings=rc.Settings(database_url=database_url, **settings))


async def until(predicate, timeout=10.0, what="condition"):
    """Poll `predicate` (sync or async) until it is true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def status_is(worker, instance_id, status):
    current = await worker.client.get_instance_status(instance_id)
    return current if current["status"] == status else None


async def events_of(client, instance_id, event_type=None):
    """The instance's events, oldest first."""
    listed = await client.list_events(instance_id, event_type=event_type, limit=1000)
    return list(reversed(listed["events"]))


def checkpoints_in_order(storage, instance_id):
    """[(checkpoint_id, state, created_at_ms)] in saving order (oldest first)."""
    listed = storage.read(Tx.list_checkpoints, instance_id, 1000, 0).result()
    return [(c["checkpoint_id"], storage.read(Tx.get_checkpoint, instance_id, c["checkpoint_id"]).result(),
             c["created_at_ms"]) for c in reversed(listed)]


# -- 1. a worker process SIGKILLed mid-workflow carries on when it starts again ---------------------------

WORKER_SCRIPT = '''
import asyncio, json, os, sys, time
sys.path.insert(0, {root!r})
import runtara_core as runtara

URL, LOG, RELEASE, MODE = sys.argv[1:5]
worker = runtara.Worker(URL, settings=runtara.Settings(database_url=URL, wake_interval_ms=100))


def note(text):
    with open(LOG, "a") as log:
        log.write(f"{{os.getpid()}} {{text}}\\n")


@worker.workflow("steps")
async def steps(instance):
    total = 0
    for n in range(5):
        @instance.durable(f"step-{{n}}")
        async def step():
            note(f"run {{n}}")
            await asyncio.sleep(0.05)
            while n == 2 and not os.path.exists(RELEASE):  # the first process is killed in here
                await asyncio.sleep(0.02)
            return n * 10
        total += await step()
    return {{"total": total}}


async def main():
    async with worker:
        if MODE == "start":
            await worker.start("steps", "job-1", "t", b"")
        status = await worker.wait("job-1", timeout=20)
        print(json.dumps({{"status": status["status"], "run": status["run"], "output": status.get("output", b"").hex()}}))

asyncio.run(main())
'''


def test_worker_killed_mid_workflow_finishes_it_after_a_restart(database_url, tmp_path):
    script = tmp_path / "edge.py"
    script.write_text(WORKER_SCRIPT.format(root=str(ROOT)))
    log, release = tmp_path / "steps.log", tmp_path / "release"
    log.touch()
    argv = [sys.executable, str(script), database_url, str(log), str(release)]

    def runs():
        return [line.split(" ", 1) for line in log.read_text().splitlines()]

    first = subprocess.Popen(argv + ["start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(text == "run 2" for _, text in runs()) or first.poll() is not None,
                   what="step 2 to begin")
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    before_kill = runs()

    with rc.open_storage(database_url) as storage:
        saved = {c["checkpoint_id"] for c in storage.read(Tx.list_checkpoints, "job-1", 100, 0).result()}
        at_kill = storage.read(Tx.get_instance, "job-1").result()
    assert saved == {"step-0", "step-1"}  # killed in the middle of step 2
    assert at_kill["status"] == "running" and at_kill["run"] == 1

    release.touch()
    second = subprocess.run(argv + ["wait"], capture_output=True, text=True, timeout=40)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr, second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed", result
    assert result["run"] == 2
    assert msgpack.unpackb(bytes.fromhex(result["output"])) == {"total": 0 + 10 + 20 + 30 + 40}

    after_kill = runs()[len(before_kill):]
    assert {pid for pid, _ in before_kill} == {str(first.pid)}
    assert len({pid for pid, _ in after_kill}) == 1 and after_kill[0][0] != str(first.pid)
    # no finished step ran again; the one in progress (step 2) and the rest ran in the second process
    assert [text for _, text in after_kill] == ["run 2", "run 3", "run 4"]
    everything = [text for _, text in runs()]
    for n in range(5):
        assert everything.count(f"run {n}") == (2 if n == 2 else 1), everything

    with rc.open_storage(database_url) as storage:
        events = list(reversed(storage.read(Tx.list_events, "job-1", None, None, 1000, 0).result()))
    restarts = [msgpack.unpackb(e["payload"]) for e in events if e["event_type"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["run"] == 1 and restarts[0]["restarts"] == 1
    launched = [msgpack.unpackb(e["payload"]) for e in events if e["event_type"] == "launched"]
    assert [(p["pid"], p["run"]) for p in launched] == [(first.pid, 1), (int(after_kill[0][0]), 2)]


# -- 2. a sleeping in-process instance wakes ---------------------------------------------------------------


def test_sleeping_in_process_instance_wakes_and_finishes(database_url):
    async def scenario():
        worker = make_worker(database_url, sleep_inline_max_ms=100)
        ran = []

        @worker.workflow("napper")
        async def napper(instance):
            @instance.durable("before")
            async def before():
                ran.append("before")
                return 1

            @instance.durable("after")
            async def after():
                ran.append("after")
                return 2

            first = await before()
            await instance.sleep("nap", 300)
            return {"sum": first + await after()}

        async with worker:
            began = time.monotonic()
            assert (await worker.start("napper", "sleeper", "t"))["created"] is True
            await until(lambda: status_is(worker, "sleeper", "suspended"), what="the sleep to suspend it")
            assert ran == ["before"]
            final = await worker.wait("sleeper", timeout=10)
            elapsed = time.monotonic() - began
            events = await events_of(worker.client, "sleeper")
        assert final["status"] == "completed", final
        assert msgpack.unpackb(final["output"]) == {"sum": 3}
        assert elapsed >= 0.3
        assert ran == ["before", "after"]  # the step before the sleep was not run again
        assert final["run"] == 2  # woken by a new launch, not slept inline
        assert [(e["event_type"], e.get("subtype")) for e in events if e["event_type"] == "suspended"] == \
            [("suspended", "sleep")]
        assert len([e for e in events if e["event_type"] == "launched"]) == 2

    run(scenario())


# -- 3. pause / resume / cancel ------------------------------------------------------------------------------


def gated_worker(database_url, log, gate):
    worker = make_worker(database_url)

    @worker.workflow("gated")
    async def gated(instance):
        for n in range(4):
            @instance.durable(f"step-{n}")
            async def step():
                log.append(n)
                if n == 1:
                    await gate.wait()  # the test sends a signal while step 1 is under way
                return n
            await step()
        return b"all four"

    return worker


def test_pause_stops_after_the_current_step_and_resume_carries_on(database_url):
    async def scenario():
        log, gate = [], asyncio.Event()
        worker = gated_worker(database_url, log, gate)
        async with worker:
            await worker.start("gated", "p-1", "t")
            await until(lambda: 1 in log, what="step 1")
            sent = await worker.client.send_signal("p-1", "pause")
            assert sent["status"] == "running"
            gate.set()
            paused = await until(lambda: status_is(worker, "p-1", "suspended"), what="the pause")
            assert log == [0, 1]  # stopped after its current step
            assert paused["run"] == 1
            await asyncio.sleep(0.6)  # six wake intervals: a paused instance is not launched again
            still = await worker.client.get_instance_status("p-1")
            assert still["status"] == "suspended" and still["run"] == 1
            assert log == [0, 1]
            saved = await worker.client.list_checkpoints("p-1")
            assert {c["checkpoint_id"] for c in saved["checkpoints"]} == {"step-0", "step-1"}

            resumed = await worker.client.send_signal("p-1", "resume")
            assert resumed["status"] == "suspended"
            final = await worker.wait("p-1", timeout=10)
            events = await events_of(worker.client, "p-1", "signal")
        assert final["status"] == "completed" and final["output"] == b"all four"
        assert final["run"] == 2
        assert log == [0, 1, 2, 3]  # carried on from step 2; no step ran twice
        assert [e["subtype"] for e in events] == ["pause", "resume"]

    run(scenario())


def test_cancel_of_a_running_in_process_instance(database_url):
    async def scenario():
        log, gate = [], asyncio.Event()
        worker = gated_worker(database_url, log, gate)
        async with worker:
            await worker.start("gated", "c-1", "t")
            await until(lambda: 1 in log, what="step 1")
            sent = await worker.client.send_signal("c-1", "cancel")
            assert sent["status"] == "running"  # its process learns of it at its next checkpoint
            gate.set()
            final = await worker.wait("c-1", timeout=10)
            events = await events_of(worker.client, "c-1", "signal")
            await asyncio.sleep(0.3)  # three wake intervals: nothing runs it again
        assert final["status"] == "cancelled", final
        assert log == [0, 1]
        assert [e["subtype"] for e in events] == ["cancel"]

    run(scenario())


def test_cancel_of_a_paused_in_process_instance_is_immediate(database_url):
    async def scenario():
        log, gate = [], asyncio.Event()
        worker = gated_worker(database_url, log, gate)
        async with worker:
            await worker.start("gated", "c-2", "t")
            await until(lambda: 1 in log, what="step 1")
            await worker.client.send_signal("c-2", "pause")
            gate.set()
            await until(lambda: status_is(worker, "c-2", "suspended"), what="the pause")
            sent = await worker.client.send_signal("c-2", "cancel")
            assert sent["status"] == "cancelled"
            final = await worker.wait("c-2", timeout=5)
        assert final["status"] == "cancelled" and log == [0, 1]

    run(scenario())


# -- 4. the concurrency limit --------------------------------------------------------------------------------


def test_concurrency_limit_holds_with_more_instances_than_slots(database_url):
    async def scenario():
        worker = make_worker(database_url, max_concurrent_instances=2)
        counter = {"now": 0, "max": 0, "ran": 0}

        @worker.workflow("busy")
        async def busy(instance):
            counter["now"] += 1
            counter["max"] = max(counter["max"], counter["now"])
            counter["ran"] += 1
            try:
                @instance.durable("work")
                async def work():
                    await asyncio.sleep(0.2)
                    return instance.instance_id
                return (await work()).encode()
            finally:
                counter["now"] -= 1

        async with worker:
            ids = [f"busy-{n}" for n in range(6)]
            for instance_id in ids:
                await worker.start("busy", instance_id, "t")
            finals = [await worker.wait(instance_id, timeout=20) for instance_id in ids]
            events = [await events_of(worker.client, instance_id) for instance_id in ids]
        assert [f["status"] for f in finals] == ["completed"] * 6
        assert [f["output"] for f in finals] == [i.encode() for i in ids]
        assert counter["max"] == 2  # never more than the limit; and the two slots were used
        assert counter["ran"] == 6 and counter["now"] == 0
        # each was claimed only when a slot was free: launched once, never refused for want of one
        for instance_events in events:
            assert [e["event_type"] for e in instance_events if e["event_type"] in ("launched", "launch_failed")] \
                == ["launched"], instance_events

    run(scenario())


# -- 5. serve --workflows: in-process and external workflows side by side ---------------------------------------

FLOWS = '''
import os, sys
sys.path.insert(0, {root!r})
import runtara_core as runtara

worker = runtara.Worker()


@worker.workflow("inproc")
async def inproc(instance):
    @instance.durable("where")
    async def where():
        return os.getpid()
    return b"inproc " + str(await where()).encode()
'''

EXTERNAL = '''
import asyncio, os, sys
sys.path.insert(0, {root!r})
import runtara_core as runtara


async def main():
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        @instance.durable("where")
        async def where():
            return os.getpid()
        await instance.completed(b"ext " + str(await where()).encode())

asyncio.run(main())
'''


def test_serve_runs_in_process_and_external_workflows_side_by_side(database_url, tmp_path):
    (tmp_path / "flows.py").write_text(FLOWS.format(root=str(ROOT)))
    (tmp_path / "ext.py").write_text(EXTERNAL.format(root=str(ROOT)))
    port = free_udp_port()
    server = spawn_server(database_url, tmp_path, port, "--workflows", "flows.py",
                          "--launch", f"ext={sys.executable} ext.py", "--wake-interval-ms", "100")
    try:
        run(wait_ready(port, server))

        async def scenario():
            async with rc.Client(f"127.0.0.1:{port}", env={}) as client:
                assert (await client.start("in-1", "t", workflow="inproc"))["created"] is True
                assert (await client.start("ext-1", "t", workflow="ext"))["created"] is True
                finals = {i: await client.wait(i, timeout=30) for i in ("in-1", "ext-1")}
                launched = {i: [msgpack.unpackb(e["payload"]) for e in await events_of(client, i, "launched")]
                            for i in ("in-1", "ext-1")}
            return finals, launched

        finals, launched = run(scenario())
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert "Traceback" not in errors, errors
    assert finals["in-1"]["status"] == "completed", finals["in-1"]
    assert finals["ext-1"]["status"] == "completed", finals["ext-1"]
    assert finals["in-1"]["workflow"] == "inproc" and finals["ext-1"]["workflow"] == "ext"
    assert [p["pid"] for p in launched["in-1"]] == [server.pid]  # a task of the server's process
    assert finals["in-1"]["output"] == b"inproc %d" % server.pid
    assert len(launched["ext-1"]) == 1 and launched["ext-1"][0]["pid"] != server.pid  # a process of its own
    assert finals["ext-1"]["output"] == b"ext %d" % launched["ext-1"][0]["pid"]


# -- 6. fork: restart from a checkpoint ---------------------------------------------------------------------

# saving order differs from the names' order, so that only the saving order gives these results
STEPS = ["s-zulu", "s-alpha", "s-mike", "s-bravo"]


def test_fork_of_a_failed_instance_from_its_second_checkpoint(database_url):
    async def scenario():
        worker = make_worker(database_url)
        log, broken = [], {"s-mike": True}

        @worker.workflow("pipeline")
        async def pipeline(instance):
            results = []
            for n, name in enumerate(STEPS):
                @instance.durable(name)
                async def step():
                    log.append((instance.instance_id, name))
                    if broken.pop(name, False):
                        raise RuntimeError(f"{name} broke on its first try")
                    return n
                results.append(await step())
            return {"input": instance.input, "results": results}

        async with worker:
            client = worker.client
            await worker.start("pipeline", "src", "acme", b"in\x00put")
            failed = await worker.wait("src", timeout=10)
            assert failed["status"] == "failed", failed
            assert "s-mike broke on its first try" in failed["error"]
            assert log == [("src", "s-zulu"), ("src", "s-alpha"), ("src", "s-mike")]

            forked = await client.fork("src", "fork-1", "s-alpha")
            assert forked == {"instance_id": "fork-1", "status": "pending", "checkpoint_id": "s-alpha",
                              "checkpoints": 2}
            done = await worker.wait("fork-1", timeout=10)
            assert done["status"] == "completed", done
            assert msgpack.unpackb(done["output"]) == {"input": b"in\x00put", "results": [0, 1, 2, 3]}
            assert log[3:] == [("fork-1", "s-mike"), ("fork-1", "s-bravo")]  # steps 1-2 not run again
            assert done["tenant_id"] == "acme" and done["workflow"] == "pipeline"
            assert worker.core.storage.read(Tx.get_input, "fork-1").result() == b"in\x00put"

            source_events = await events_of(client, "src", "forked")
            fork_events = await events_of(client, "fork-1", "forked_from")
            assert [(e["subtype"], e.get("checkpoint_id")) for e in source_events] == [("fork-1", "s-alpha")]
            assert [(e["subtype"], e.get("checkpoint_id")) for e in fork_events] == [("src", "s-alpha")]
            assert (await client.get_instance_status("src"))["status"] == "failed"  # the source is left as it was

            storage = worker.core.storage
            source_checkpoints = checkpoints_in_order(storage, "src")
            assert [c[0] for c in source_checkpoints] == ["s-zulu", "s-alpha"]
            fork_checkpoints = checkpoints_in_order(storage, "fork-1")
            assert [c[0] for c in fork_checkpoints] == STEPS
            assert fork_checkpoints[:2] == source_checkpoints  # copies: same states, saved in the same order

            # a source with later checkpoints: only those up to the fork point, in saving order, are copied
            again = await client.fork("fork-1", "fork-2", "s-alpha")
            assert again["checkpoints"] == 2 and again["checkpoint_id"] == "s-alpha"
            assert [c[0] for c in checkpoints_in_order(storage, "fork-2")] == ["s-zulu", "s-alpha"]
            assert (await worker.wait("fork-2", timeout=10))["status"] == "completed"
            assert log[5:] == [("fork-2", "s-mike"), ("fork-2", "s-bravo")]

            # no checkpoint named: all of them; nothing runs again
            whole = await client.fork("fork-1", "fork-3")
            assert whole == {"instance_id": "fork-3", "status": "pending", "checkpoint_id": "s-bravo",
                             "checkpoints": 4}
            assert [c[0] for c in checkpoints_in_order(storage, "fork-3")] == STEPS
            final = await worker.wait("fork-3", timeout=10)
            assert final["status"] == "completed"
            assert msgpack.unpackb(final["output"]) == {"input": b"in\x00put", "results": [0, 1, 2, 3]}
            assert len(log) == 7
            forks_of_fork_1 = await events_of(client, "fork-1", "forked")
            assert [e["subtype"] for e in forks_of_fork_1] == ["fork-2", "fork-3"]

    run(scenario())


# -- 7. fork errors, and the CLI -----------------------------------------------------------------------------


def failed_source(storage, instance_id="src", checkpoints=("a", "b", "c"), tenant="t"):
    """A failed instance of workflow `wf` with input and `checkpoints`, saved in that order."""
    now = rc.now_ms()
    assert storage.write(Tx.create_instance, instance_id, tenant, now, "wf", b"the input").result()
    storage.write(Tx.begin_run, instance_id, now, None).result()
    for n, checkpoint_id in enumerate(checkpoints):
        storage.write(Tx.save_checkpoint, instance_id, checkpoint_id, b"state-%d" % n, now + n).result()
    assert storage.write(Tx.transition, instance_id, "failed", ("running",), now + 10, None, "broke").result()


def test_fork_errors(server_factory, database_url):
    server = server_factory()
    with rc.open_storage(database_url) as storage:
        failed_source(storage)
        storage.write(Tx.create_instance, "taken", "other", rc.now_ms(), "default", None).result()

    async def scenario():
        async with rc.Client(addr(server), env={}) as client:
            with pytest.raises(rc.InstanceNotFound) as unknown:
                await client.fork("nobody", "new-1")
            assert unknown.value.code == "INSTANCE_NOT_FOUND"
            with pytest.raises(rc.CheckpointNotFound) as missing:
                await client.fork("src", "new-2", "zzz")
            assert missing.value.code == "CHECKPOINT_NOT_FOUND"
            with pytest.raises(rc.InvalidRequest) as exists:
                await client.fork("src", "taken", "b")
            assert exists.value.code == "INVALID_REQUEST"
            with pytest.raises(rc.InvalidRequest):  # the source itself exists too
                await client.fork("src", "src")

            for instance_id in ("new-1", "new-2"):
                assert (await client.get_instance_status(instance_id))["found"] is False
            taken = await client.get_instance_status("taken")
            assert taken["tenant_id"] == "other" and taken["status"] == "pending" and taken["workflow"] == "default"
            assert (await client.list_checkpoints("taken"))["total_count"] == 0
            assert (await client.list_events("taken", event_type="forked_from"))["total_count"] == 0
            assert (await client.list_events("src", event_type="forked"))["total_count"] == 0
            assert (await client.get_instance_status("src"))["status"] == "failed"

            forked = await client.fork("src", "new-3", "b")  # and a good one over the wire
            assert forked == {"instance_id": "new-3", "status": "pending", "checkpoint_id": "b", "checkpoints": 2}
            status = await client.get_instance_status("new-3")
            assert (status["tenant_id"], status["workflow"], status["status"]) == ("t", "wf", "pending")
    run(scenario())


def runtara_cli(*args, database_url):
    return subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), *args, "--database-url", database_url],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_fork_cli(database_url):
    with rc.open_storage(database_url) as storage:
        failed_source(storage)

    done = runtara_cli("fork", "src", "--new-id", "cli-new", "--from", "b", database_url=database_url)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "cli-new" in lines[0], lines

    with rc.open_storage(database_url) as storage:
        new = storage.read(Tx.get_instance, "cli-new").result()
        assert (new["status"], new["tenant_id"], new["workflow"], new["checkpoint_id"]) == ("pending", "t", "wf", "b")
        assert storage.read(Tx.get_input, "cli-new").result() == b"the input"
        assert [c[:2] for c in checkpoints_in_order(storage, "cli-new")] == [("a", b"state-0"), ("b", b"state-1")]

    for args, words in ((("src", "--new-id", "cli-new", "--from", "a"), "cli-new"),  # exists
                        (("src", "--new-id", "cli-other", "--from", "nope"), "nope"),  # no such checkpoint
                        (("nobody", "--new-id", "cli-other"), "nobody")):  # no such source
        refused = runtara_cli("fork", *args, database_url=database_url)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in refused.stderr, (args, lines)
    with rc.open_storage(database_url) as storage:
        assert storage.read(Tx.get_instance, "cli-other").result() is None
        assert storage.read(Tx.count_checkpoints, "cli-new").result() == 2


# -- 8. a workflow function's return value and exceptions ----------------------------------------------------


def test_return_value_is_the_output_and_an_exception_fails_the_instance(database_url):
    async def scenario():
        worker = make_worker(database_url)

        @worker.workflow("raw")
        async def raw(instance):
            return b"raw\x00bytes"

        @worker.workflow("buffer")
        async def buffer(instance):
            return bytearray(b"\x01\x02")

        @worker.workflow("nothing")
        async def nothing(instance):
            return None

        @worker.workflow("mapping")
        async def mapping(instance):
            return {"answer": 42, "items": [1, "two"]}

        @worker.workflow("text")
        async def text(instance):
            return "plain"

        @worker.workflow("own")
        async def own(instance):
            await instance.completed(b"reported by itself")
            return b"ignored"

        @worker.workflow("raises")
        async def raises(instance):
            @instance.durable("first")
            async def first():
                return 1
            await first()
            raise ValueError("the disk is full at step 2")

        async with worker:
            for name in worker.workflows:
                await worker.start(name, f"out-{name}", "t")
            finals = {name: await worker.wait(f"out-{name}", timeout=10) for name in worker.workflows}
        assert {name: f["status"] for name, f in finals.items()} == {
            "raw": "completed", "buffer": "completed", "nothing": "completed", "mapping": "completed",
            "text": "completed", "own": "completed", "raises": "failed"}
        assert finals["raw"]["output"] == b"raw\x00bytes"
        assert finals["buffer"]["output"] == b"\x01\x02"
        assert finals["nothing"].get("output", b"") == b""
        assert finals["mapping"]["output"] == msgpack.packb({"answer": 42, "items": [1, "two"]})
        assert finals["text"]["output"] == msgpack.packb("plain")
        assert finals["own"]["output"] == b"reported by itself"
        assert "the disk is full at step 2" in finals["raises"]["error"]
        assert finals["raises"].get("output", b"") == b""

    run(scenario())

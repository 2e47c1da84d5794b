"""Durable sleep that wakes (PROTOCOL.md section 5): claims, relaunch, failures, several servers."""

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
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


def gone(pid: int, marker: str) -> bool:
    """Whether the process `pid` whose command line held `marker` has ended (a zombie counts): the pid may
    already be another process's, or a thread's, where pids are few (pid_max 32768)."""
    try:
        if marker not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return True
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


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


def make_due(storage, instance_id, now, sleep_until=None, tenant="t", workflow="default"):
    """A suspended instance whose wake time (default: just passed) is stored."""
    storage.write(Tx.create_instance, instance_id, tenant, now, workflow).result()
    storage.write(Tx.begin_run, instance_id, now, None).result()
    storage.write(Tx.set_sleep, instance_id, sleep_until or now - 1).result()
    storage.write(Tx.transition, instance_id, "suspended", ("running",), now).result()


def make_running(storage, instance_id, now, workflow="default", tenant="t"):
    storage.write(Tx.create_instance, instance_id, tenant, now, workflow).result()
    return storage.write(Tx.begin_run, instance_id, now, None).result()


def make_orphaned(storage, instance_id, now, workflow="default"):
    """A running instance whose process is known dead, launchable from `now`."""
    make_running(storage, instance_id, now, workflow)
    storage.write(Tx.orphan, instance_id, now, now).result()


def w(storage, fn, *args, **kwargs):
    return storage.write(fn, *args, **kwargs).result(timeout=30)


def claim(storage, now, max_busy=100, limit=100, workflows=None, lease_ms=1000):
    """The ids claimed at `now`, leased for `lease_ms`."""
    return [c["instance_id"] for c in w(storage, Tx.claim_launches, now, now + lease_ms, workflows, max_busy, limit)]


def lifecycle(storage, instance_id):
    return w(storage, Tx.get_run, instance_id)


def payloads(storage, instance_id, event_type):
    """The payloads of the instance's events of this type, oldest first; msgpack maps decoded."""
    events = reversed(storage.read(Tx.list_events, instance_id, event_type).result())
    return [e["payload"] if event_type == "launch_failed" else msgpack.unpackb(e["payload"]) for e in events]


RULES = rc.Recovery(max_launch_attempts=3, max_restarts=2, backoff_ms=100, workflows=None)
T0 = 1_700_000_000_000


# -- storage claims -----------------------------------------------------------------------------


def test_claims_respect_the_lease_and_registration_ends_it(storage):
    now = rc.now_ms()
    make_due(storage, "due", now)
    make_due(storage, "later", now, sleep_until=now + 60_000)
    claimed = storage.write(Tx.claim_launches, now, now + 1000, None, 10, 10).result()
    assert [(c["instance_id"], c["launch_attempts"]) for c in claimed] == [("due", 1)]
    assert storage.write(Tx.claim_launches, now + 500, now + 1500, None, 10, 10).result() == []  # leased
    again = storage.write(Tx.claim_launches, now + 1000, now + 2000, None, 10, 10).result()  # the lease ran out
    assert [(c["instance_id"], c["launch_attempts"]) for c in again] == [("due", 2)]
    leased = lifecycle(storage, "due")
    assert (leased["launch_lease_until_ms"], leased["launch_attempts"]) == (now + 2000, 2)
    assert storage.write(rc._register, "due", "t", None, None, now + 1500, 10).result()["run"] == 2
    registered = lifecycle(storage, "due")
    assert (registered["status"], registered["launch_lease_until_ms"], registered["launch_attempts"]) == \
        ("running", None, 0)
    due = storage.read(Tx.launch_queue, now + 100_000).result()
    assert [d["instance_id"] for d in due] == ["later"] and due[0]["launch_attempts"] == 0


def test_claim_takes_at_most_limit(storage):
    now = rc.now_ms()
    for n in range(5):
        make_due(storage, f"i-{n}", now)
    first = storage.write(Tx.claim_launches, now, now + 1000, None, 10, 3).result()
    second = storage.write(Tx.claim_launches, now, now + 1000, None, 10, 3).result()
    assert len(first) == 3 and len(second) == 2
    assert not {c["instance_id"] for c in first} & {c["instance_id"] for c in second}


def test_concurrent_claims_never_share_an_instance(storage):
    now = rc.now_ms()
    for n in range(40):
        make_due(storage, f"i-{n}", now)
    futures = [storage.write(Tx.claim_launches, now, now + 60_000, None, 100, 7) for _ in range(10)]
    claimed = [c["instance_id"] for future in futures for c in future.result()]
    assert sorted(claimed) == sorted(f"i-{n}" for n in range(40))


def test_orphaned_runs_are_claimed_first_and_need_no_free_slot(storage):
    w(storage, Tx.create_instance, "pending", "t", T0 - 1000)  # due long before the runs below died
    for n in range(3):
        make_running(storage, f"run-{n}", T0)
    w(storage, Tx.orphan, "run-2", T0 + 1, T0 + 1)
    w(storage, Tx.orphan, "run-1", T0 + 2, T0 + 2)
    assert w(storage, Tx.count_busy, T0 + 10) == 3  # orphaned runs keep their slots
    # full (3 of 3): the orphans are claimed anyway, the pending instance is not
    assert sorted(claim(storage, T0 + 10, max_busy=3)) == ["run-1", "run-2"]
    assert w(storage, Tx.count_busy, T0 + 10) == 3  # their launches take no second slot
    assert claim(storage, T0 + 10, max_busy=3) == []
    assert claim(storage, T0 + 10, max_busy=4) == ["pending"]
    # with room for everything, orphans still come first, whatever their due time
    w(storage, Tx.create_instance, "pending-2", "t", T0 - 1000)
    w(storage, Tx.orphan, "run-0", T0 + 20, T0 + 20)
    assert claim(storage, T0 + 20, limit=1) == ["run-0"]
    assert claim(storage, T0 + 20, limit=1) == ["pending-2"]


def test_due_claims_take_only_free_slots(storage):
    make_running(storage, "busy", T0)
    make_due(storage, "napping", T0, sleep_until=T0 + 60_000)  # suspended, not due: takes no slot
    for n in range(5):
        w(storage, Tx.create_instance, f"p-{n}", "t", T0 + n)
    assert w(storage, Tx.count_busy, T0) == 1
    first = w(storage, Tx.claim_launches, T0 + 10, T0 + 1010, None, 4, 100)  # 4 - 1 busy = 3 free
    assert sorted(c["instance_id"] for c in first) == ["p-0", "p-1", "p-2"]  # the earliest due
    assert w(storage, Tx.count_busy, T0 + 10) == 4
    assert claim(storage, T0 + 11, max_busy=4) == []
    assert claim(storage, T0 + 11, max_busy=5) == ["p-3"]
    assert claim(storage, T0 + 11, max_busy=3) == []  # over the limit: free slots below 0 claim nothing
    # the leases run out at T0 + 1010: their slots are free again, and they are due again
    assert w(storage, Tx.count_busy, T0 + 1010) == 2  # busy, and p-3 (leased until T0 + 1011)
    again = w(storage, Tx.claim_launches, T0 + 1010, T0 + 2010, None, 4, 100)
    assert sorted((c["instance_id"], c["launch_attempts"]) for c in again) == [("p-0", 2), ("p-1", 2)]


def test_a_pending_pause_keeps_a_sleeper_from_being_due_and_a_resume_makes_it_due(storage):
    make_due(storage, "overslept", T0, sleep_until=T0 + 10)
    make_due(storage, "napping", T0, sleep_until=T0 + 60_000)
    w(storage, Tx.create_instance, "paused", "t", T0)
    w(storage, Tx.begin_run, "paused", T0, None)
    w(storage, Tx.transition, "paused", "suspended", ("running",), T0)  # no wake time: paused
    w(storage, Tx.put_signal, "overslept", "pause", b"", T0 + 5)
    assert claim(storage, T0 + 100) == []
    assert storage.read(Tx.launch_queue, T0 + 100).result() == []
    for name in ("overslept", "napping", "paused"):
        w(storage, Tx.put_signal, name, "resume", b"", T0 + 50)  # replaces the pending pause
    assert sorted(claim(storage, T0 + 100)) == ["napping", "overslept", "paused"]


def test_claims_follow_due_time_the_same_on_both_databases(storage):
    # created in an order unlike the due order; ties are broken by instance id
    make_due(storage, "s-future", T0, sleep_until=T0 + 1000)
    w(storage, Tx.put_signal, "s-future", "resume", b"", T0)  # a resumed sleeper is due at its wake time
    w(storage, Tx.create_instance, "p-late", "t", T0 + 30)
    make_due(storage, "s-mid", T0, sleep_until=T0 + 20)
    make_due(storage, "s-tie", T0, sleep_until=T0 + 10)
    w(storage, Tx.create_instance, "p-early", "t", T0 + 10)
    make_running(storage, "r-paused", T0)
    w(storage, Tx.transition, "r-paused", "suspended", ("running",), T0)
    w(storage, Tx.put_signal, "r-paused", "resume", b"", T0)  # a resumed paused instance is due at 0
    expected = ["r-paused", "p-early", "s-tie", "s-mid", "p-late", "s-future"]
    assert [q["instance_id"] for q in storage.read(Tx.launch_queue, T0 + 100).result()] == expected
    assert [claim(storage, T0 + 100, limit=1)[0] for _ in expected] == expected
    assert claim(storage, T0 + 100) == []


def test_claims_take_only_the_workflows_given(storage):
    for name, workflow in (("a-1", "a"), ("b-1", "b"), ("d-1", "default")):
        w(storage, Tx.create_instance, name, "t", T0, workflow)
    make_orphaned(storage, "b-orphan", T0, workflow="b")
    assert claim(storage, T0, workflows=()) == []  # no launch command at all: nothing, orphans included
    assert claim(storage, T0, workflows=("a",)) == ["a-1"]
    assert sorted(claim(storage, T0, workflows=("b", "c"))) == ["b-1", "b-orphan"]
    assert claim(storage, T0, workflows=None) == ["d-1"]


def test_claims_wait_for_the_backoff_and_the_lease(storage):
    w(storage, Tx.create_instance, "retried", "t", T0)
    assert claim(storage, T0, lease_ms=1000) == ["retried"]
    assert w(storage, Tx.count_busy, T0) == 1
    w(storage, Tx.end_launch, "retried", T0 + 500)  # its launch failed: retry after the backoff
    assert w(storage, Tx.count_busy, T0) == 0  # the slot is free at once
    assert claim(storage, T0 + 499) == []
    assert claim(storage, T0 + 500, lease_ms=1000) == ["retried"]
    assert claim(storage, T0 + 1499) == []  # leased until T0 + 1500
    assert claim(storage, T0 + 1500) == ["retried"]
    make_running(storage, "restarting", T0)
    w(storage, Tx.orphan, "restarting", T0, T0 + 300)
    assert claim(storage, T0 + 299, max_busy=0) == []
    assert claim(storage, T0 + 300, max_busy=0, lease_ms=100) == ["restarting"]
    assert claim(storage, T0 + 399, max_busy=0) == []
    assert claim(storage, T0 + 400, max_busy=0) == ["restarting"]


def test_claims_from_many_threads_never_share_an_instance_or_exceed_the_slots(storage):
    for n in range(5):
        make_orphaned(storage, f"o-{n}", T0)
    for n in range(40):
        w(storage, Tx.create_instance, f"p-{n:02d}", "t", T0 + n)
    barrier = threading.Barrier(8)

    def claimer(_):
        barrier.wait(timeout=30)
        mine = []
        while True:
            claimed = w(storage, Tx.claim_launches, T0 + 100, T0 + 60_000, None, 25, 3)
            if not claimed:
                return mine
            mine += [c["instance_id"] for c in claimed]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        claimed = [instance_id for mine in pool.map(claimer, range(8)) for instance_id in mine]
    assert len(claimed) == len(set(claimed)) == 25  # 5 orphans (already holding slots) and 20 free slots
    assert {f"o-{n}" for n in range(5)} <= set(claimed)
    assert sorted(i for i in claimed if i.startswith("p-")) == [f"p-{n:02d}" for n in range(20)]
    assert w(storage, Tx.count_busy, T0 + 100) == 25


# -- the scheduler's rules: a launch ended, a run went silent ------------------------------------


def test_a_launch_that_ends_before_registering_is_retried_after_backoff_then_fails(storage):
    w(storage, Tx.create_instance, "doomed", "t", T0)
    now = T0
    for attempt in (1, 2):
        [launch] = w(storage, Tx.claim_launches, now, now + 1000, None, 10, 10)
        assert (launch["run"], launch["launch_attempts"]) == (0, attempt)
        assert w(storage, rc._launch_ended, launch, 4000 + attempt, 3, "exited with code 3", now + 10, RULES) == \
            ("pending", "failed")
        state = lifecycle(storage, "doomed")
        # backoff: n = the launch attempts so far (100 ms, then 200 ms)
        assert (state["status"], state["launch_lease_until_ms"], state["launch_after_ms"], state["run"]) == \
            ("pending", None, now + 10 + 100 * 2 ** attempt, 0)
        assert w(storage, Tx.count_busy, now + 10) == 0  # its slot is free while it backs off
        assert claim(storage, state["launch_after_ms"] - 1) == []
        now = state["launch_after_ms"]
    [launch] = w(storage, Tx.claim_launches, now, now + 1000, None, 10, 10)
    assert w(storage, rc._launch_ended, launch, 4003, 3, "exited with code 3", now + 10, RULES) == ("failed", "failed")
    failed = lifecycle(storage, "doomed")
    assert failed["status"] == "failed" and failed["finished_at_ms"] == now + 10
    assert failed["error"] == "launch failed 3 times; the last one exited with code 3 before registering"
    assert payloads(storage, "doomed", "launch_failed") == [b"exited with code 3 before registering"] * 3  # text
    exits = payloads(storage, "doomed", "exited")
    assert [(e["pid"], e["code"]) for e in exits] == [(4001, 3), (4002, 3), (4003, 3)]
    assert payloads(storage, "doomed", "restart") == []


def test_a_registration_between_failed_launches_starts_the_count_again(storage):
    make_due(storage, "flaky", T0)
    [launch] = w(storage, Tx.claim_launches, T0, T0 + 1000, None, 10, 10)
    w(storage, rc._launch_ended, launch, 1, 1, "exited with code 1", T0, RULES)
    [launch] = w(storage, Tx.claim_launches, T0 + 200, T0 + 1200, None, 10, 10)
    assert launch["launch_attempts"] == 2
    w(storage, Tx.begin_run, "flaky", T0 + 300, None)
    w(storage, Tx.transition, "flaky", "suspended", ("running",), T0 + 400)  # it slept again
    w(storage, Tx.set_sleep, "flaky", T0 + 500)
    [launch] = w(storage, Tx.claim_launches, T0 + 500, T0 + 1500, None, 10, 10)
    assert launch["launch_attempts"] == 1


def test_the_end_of_a_registered_current_run_orphans_it(storage):
    w(storage, Tx.create_instance, "i", "t", T0)
    [launch] = w(storage, Tx.claim_launches, T0, T0 + 1000, None, 1, 10)
    assert w(storage, rc._register, "i", "t", None, None, T0 + 5, 1)["run"] == 1  # the launched process
    assert w(storage, rc._launch_ended, launch, 77, 9, "exited with code 9", T0 + 10, RULES) == ("running", "registered")
    state = lifecycle(storage, "i")
    assert (state["status"], state["run"], state["orphaned_at_ms"], state["restarts"], state["launch_after_ms"]) == \
        ("running", 1, T0 + 10, 1, T0 + 10 + 100)  # backoff: n = restarts before this one
    assert payloads(storage, "i", "exited") == [{"pid": 77, "code": 9, "run": 1}]
    assert payloads(storage, "i", "restart") == [{"run": 1, "restarts": 1,
                                                   "reason": "the process of run 1 exited with code 9"}]
    assert payloads(storage, "i", "launch_failed") == []
    assert w(storage, Tx.count_busy, T0 + 10) == 1  # it keeps its slot
    assert w(storage, Tx.silent_runs, T0 + 1_000_000) == []  # known dead: not silent as well
    # one death is one restart: an exit reported again for the orphaned run changes nothing
    assert w(storage, rc._launch_ended, launch, 77, 9, "exited with code 9", T0 + 20, RULES) == ("running", "registered")
    assert lifecycle(storage, "i") == state
    assert len(payloads(storage, "i", "restart")) == 1
    assert claim(storage, T0 + 109, max_busy=1) == []
    [relaunch] = w(storage, Tx.claim_launches, T0 + 110, T0 + 1110, None, 1, 10)  # full, and claimed anyway
    assert (relaunch["instance_id"], relaunch["run"]) == ("i", 1)


def test_the_end_of_a_superseded_or_finished_run_changes_nothing(storage):
    for name in ("superseded", "suspended", "completed"):
        w(storage, Tx.create_instance, name, "t", T0)
    launches = {c["instance_id"]: c for c in w(storage, Tx.claim_launches, T0, T0 + 1000, None, 10, 10)}
    for name in launches:
        assert w(storage, Tx.begin_run, name, T0 + 5, None) == 1
    assert w(storage, Tx.begin_run, "superseded", T0 + 6, None) == 2  # another process took over
    w(storage, Tx.transition, "suspended", "suspended", ("running",), T0 + 7)
    w(storage, Tx.transition, "completed", "completed", ("running",), T0 + 7, output=b"")
    for name, status in (("superseded", "running"), ("suspended", "suspended"), ("completed", "completed")):
        before = lifecycle(storage, name)
        assert w(storage, rc._launch_ended, launches[name], 5, 0, "exited with code 0", T0 + 10, RULES) == \
            (status, "registered")
        after = lifecycle(storage, name)
        assert after == before, name
        assert payloads(storage, name, "restart") == payloads(storage, name, "launch_failed") == []
        assert [e["run"] for e in payloads(storage, name, "exited")] == [1]


def test_silent_runs_are_relaunched_failed_cancelled_or_paused(storage):
    rules = rc.Recovery(max_launch_attempts=3, max_restarts=2, backoff_ms=100, workflows=("a",))
    for name in ("launchable", "cancelling", "pausing", "fresh"):
        make_running(storage, name, T0, workflow="a")
    make_running(storage, "unlaunchable", T0, workflow="b")
    w(storage, Tx.put_signal, "cancelling", "cancel", b"", T0)
    w(storage, Tx.put_signal, "pausing", "pause", b"", T0)
    w(storage, Tx.touch_heartbeat, "fresh", T0 + 50_000)
    recovered = w(storage, rc._recover_silent, T0 + 10_000, T0 + 60_000, rules)
    assert sorted(recovered) == [("cancelling", "cancelled"), ("launchable", "running"), ("pausing", "suspended"),
                                 ("unlaunchable", "failed")]
    since = "no heartbeat, checkpoint or event since 2023-11-14T22:13:20"
    launchable = lifecycle(storage, "launchable")
    assert (launchable["status"], launchable["orphaned_at_ms"], launchable["restarts"],
            launchable["launch_after_ms"]) == ("running", T0 + 60_000, 1, T0 + 60_100)
    [restart] = payloads(storage, "launchable", "restart")
    assert (restart["run"], restart["restarts"]) == (1, 1) and since in restart["reason"]
    unlaunchable = lifecycle(storage, "unlaunchable")
    assert unlaunchable["error"].startswith("stale: ") and since in unlaunchable["error"]
    assert unlaunchable["finished_at_ms"] == T0 + 60_000
    cancelled = lifecycle(storage, "cancelling")
    assert cancelled["finished_at_ms"] == T0 + 60_000 and storage.read(Tx.get_signal, "cancelling").result() is None
    assert [e["subtype"] for e in storage.read(Tx.list_events, "cancelling", "signal").result()] == ["cancel"]
    assert storage.read(Tx.get_signal, "pausing").result()["signal_type"] == "pause"  # stays pending: paused
    assert lifecycle(storage, "fresh")["status"] == "running"
    assert w(storage, rc._recover_silent, T0 + 50_000, T0 + 80_000, rules) == []  # the orphan is not silent again
    assert claim(storage, T0 + 80_000, workflows=rules.workflows) == ["launchable"]  # the paused one waits
    w(storage, Tx.put_signal, "pausing", "resume", b"", T0 + 80_000)
    assert claim(storage, T0 + 80_000, workflows=rules.workflows) == ["pausing"]


def test_an_orphaned_run_fails_after_max_restarts_naming_the_silence(storage):
    make_running(storage, "i", T0)
    now = T0
    for restarts in (1, 2):
        now += 100_000
        assert w(storage, rc._recover_silent, now - 1, now, RULES) == [("i", "running")]
        state = lifecycle(storage, "i")
        assert (state["restarts"], state["launch_after_ms"]) == (restarts, now + 100 * 2 ** (restarts - 1))
        w(storage, Tx.begin_run, "i", now + 1, None)
    now += 100_000
    assert w(storage, rc._recover_silent, now - 1, now, RULES) == [("i", "failed")]
    failed = lifecycle(storage, "i")
    assert failed["status"] == "failed" and failed["restarts"] == 2
    assert "no heartbeat, checkpoint or event since" in failed["error"] and "2 restarts" in failed["error"]
    assert [r["restarts"] for r in payloads(storage, "i", "restart")] == [1, 2]


def test_an_orphaned_run_fails_after_max_restarts_naming_the_exit_code(storage):
    w(storage, Tx.create_instance, "i", "t", T0)
    now = T0
    for run, status in ((1, "running"), (2, "running"), (3, "failed")):
        [launch] = w(storage, Tx.claim_launches, now, now + 1000, None, 10, 10)
        assert launch["run"] == run - 1
        assert w(storage, Tx.begin_run, "i", now + 1, None) == run
        w(storage, Tx.save_checkpoint, "i", "same", b"", now + 2)  # replayed after the first run: no progress
        assert w(storage, rc._launch_ended, launch, 9, 137, "exited with code 137", now + 3, RULES) == \
            (status, "registered")
        now = lifecycle(storage, "i")["launch_after_ms"] or now
    failed = lifecycle(storage, "i")
    assert failed["status"] == "failed" and failed["finished_at_ms"] == now + 3
    assert "the process of run 3 exited with code 137" in failed["error"] and "2 restarts" in failed["error"]


def test_a_new_checkpoint_between_restarts_keeps_the_instance_alive(storage):
    make_running(storage, "i", T0)
    w(storage, Tx.orphan, "i", T0, T0)
    w(storage, Tx.orphan, "i", T0, T0)
    w(storage, Tx.begin_run, "i", T0 + 1, None)
    w(storage, Tx.save_checkpoint, "i", "progress", b"", T0 + 2)
    assert w(storage, rc._recover_silent, T0 + 100_000, T0 + 100_000, RULES) == [("i", "running")]
    assert lifecycle(storage, "i")["restarts"] == 1


def test_restart_backoff_doubles_up_to_a_minute(storage):
    rules = rc.Recovery(max_launch_attempts=3, max_restarts=100, backoff_ms=1000, workflows=None)
    make_running(storage, "i", T0)
    w(storage, lambda tx: tx.rows("UPDATE instances SET restarts = 5 WHERE instance_id = 'i'"))
    w(storage, rc._recover_silent, T0 + 1, T0 + 1_000_000, rules)
    assert lifecycle(storage, "i")["launch_after_ms"] == T0 + 1_000_000 + 32_000
    w(storage, Tx.begin_run, "i", T0 + 1_000_001, None)
    w(storage, rc._recover_silent, T0 + 2_000_000, T0 + 2_000_000, rules)
    assert lifecycle(storage, "i")["launch_after_ms"] == T0 + 2_000_000 + 60_000  # 64 s, capped


# -- end to end with a launch command -----------------------------------------------------------


def test_sleeping_instance_is_relaunched_and_completes(server_factory, tmp_path):
    command, log = script(tmp_path, "sleeper", SLEEPER)
    server = server_factory(launch_command=command, sleep_inline_max_ms=0, wake_interval_ms=100)
    first = start_instance(command, server, "sleepy")
    assert first.wait(timeout=30) == 0, first.stderr.read()
    assert status_of(server, "sleepy")["status"] == "suspended"
    wait_until(lambda: status_of(server, "sleepy")["status"] == "completed", what="the relaunched instance")
    assert log.read_text().splitlines() == ["sleepy process", "sleepy before", "sleepy process", "sleepy after"]
    # the server records the launched process's exit too, once it has reaped it
    events = wait_until(lambda: (lambda events: events[-1]["event_type"] == "exited" and events)(
        events_of(server, "sleepy")), what="the exit of the launched process")
    timeline = [(e["event_type"], e.get("subtype")) for e in events]
    assert timeline == [("started", None), ("suspended", "sleep"), ("launched", None), ("resumed", None),
                        ("completed", None), ("exited", None)]
    assert events[2]["created_at_ms"] - events[1]["created_at_ms"] >= 2900  # woke after its 3 s
    launched = msgpack.unpackb(events[2]["payload"])
    assert (launched["attempt"], launched["run"]) == (1, 2)  # the run the launched process begins
    assert msgpack.unpackb(events[5]["payload"]) == {"pid": launched["pid"], "code": 0, "run": 2}
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
    events = wait_until(lambda: (lambda events: events[-1]["event_type"] == "exited" and events)(
        events_of(server, "stepper")), what="the exit of the launched process")
    types = [e["event_type"] for e in events]
    assert types.count("launched") == 1 and types[-2:] == ["completed", "exited"]
    # the pause was applied when acknowledged, the resume consumed by the relaunched process's registration
    assert [e["subtype"] for e in events if e["event_type"] == "signal"] == ["pause", "resume"]
    assert status_of(server, "stepper")["run"] == 2


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
    wait_until(lambda: gone(pid, "time.sleep(60)"), what="the killed process")


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
    [launcher] = server.server.scheduler.launchers
    env = launcher.environment({"instance_id": "i", "tenant_id": "t", "checkpoint_id": "c", "workflow": "billing"})
    assert env["RUNTARA_INSTANCE_ID"] == "i" and env["RUNTARA_TENANT_ID"] == "t"
    assert env["RUNTARA_WORKFLOW"] == "billing"
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
    unlaunchable = rc.Recovery(5, 5, 100, ())  # no launch command: a silent run fails
    for n in range(20):
        instance_id = f"racer-{n}"
        storage.write(Tx.create_instance, instance_id, "t", 0).result()
        storage.write(Tx.begin_run, instance_id, 0, None).result()  # silent since the epoch: stale
        completed = storage.write(Tx.transition, instance_id, "completed", ("running",), 1000, output=b"ok")
        stale = storage.write(rc._recover_silent, 500, 1000, unlaunchable)
        completed, stale = completed.result(), [i for i, _ in stale.result()]
        final = storage.read(Tx.get_instance, instance_id).result()
        assert completed != (instance_id in stale)  # exactly one of them took effect
        assert final["status"] == ("completed" if completed else "failed")
        if completed:
            assert final["error"] is None and final["output"] == b"ok"

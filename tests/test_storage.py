"""The storage contract, on SQLite and PostgreSQL alike (issue: Foundation)."""

import concurrent.futures
import os
import threading

import pytest

import runtara_core as rc
from conftest import TEST_DATABASE_URL

Tx = rc.Tx
T0 = 1_700_000_000_000


def w(storage, fn, *args, **kwargs):
    return storage.write(fn, *args, **kwargs).result(timeout=30)


def r(storage, fn, *args, **kwargs):
    return storage.read(fn, *args, **kwargs).result(timeout=30)


def save(storage, instance_id, checkpoint_id, state, at):
    """Save a checkpoint: None when saved, else the state saved first."""
    return w(storage, Tx.save_checkpoint, instance_id, checkpoint_id, state, at)["first"]


def running(storage, instance_id="i-1", tenant_id="t-1", at=T0, workflow="default"):
    """Create the instance and begin its first run."""
    assert w(storage, Tx.create_instance, instance_id, tenant_id, at, workflow)
    assert w(storage, Tx.begin_run, instance_id, at, None) == 1


def register(storage, instance_id="i-1", tenant_id="t-1", at=T0, max_busy=32):
    """Register the way register_instance does (no checkpoint, no run to re-attach): the answer."""
    return w(storage, rc._register, instance_id, tenant_id, None, None, at, max_busy)


def run_of(storage, instance_id="i-1"):
    """The instance with its lifecycle columns (restarts, orphaned, lease, backoff, attempts)."""
    return w(storage, Tx.get_run, instance_id)


def lease(storage, instance_id, until):
    w(storage, lambda tx: tx.rows("UPDATE instances SET launch_lease_until_ms = ? WHERE instance_id = ?",
                                  until, instance_id))


# -- opening and migrations ---------------------------------------------------------------------


def test_migrations_are_recorded_and_not_applied_twice(storage):
    status = storage.migration_status()
    assert [version for version, _, at in status if at is not None] == [v for v, _, _ in
                                                                        rc.known_migrations(storage.dialect)]
    assert storage.migrate() == []


def test_a_migration_this_version_does_not_know_is_refused(database_url):
    with rc.open_storage(database_url) as storage:
        w(storage, lambda tx: tx.rows("INSERT INTO runtara_migrations VALUES (999, 'from_the_future', 0)"))
    with pytest.raises(rc.StorageError, match="999_from_the_future.*does not know"):
        rc.open_storage(database_url)


def test_unknown_url_scheme_names_the_accepted_forms():
    with pytest.raises(rc.StorageError, match="sqlite:///relative.db.*postgresql://"):
        rc.open_storage("mysql://root@localhost/db")


def test_postgres_and_postgresql_schemes_are_both_accepted(postgres_url):
    short = postgres_url.replace("postgresql://", "postgres://", 1)
    with rc.open_storage(short) as storage:
        assert storage.dialect is rc.POSTGRESQL and r(storage, Tx.health)


def test_unreachable_postgresql_is_a_clear_error():
    with pytest.raises(rc.StorageError, match="cannot reach PostgreSQL at postgresql://u:\\*\\*\\*@127.0.0.1:1/x"):
        rc.open_storage("postgresql://u:secret@127.0.0.1:1/x")


def test_reading_a_missing_sqlite_file_does_not_create_it(tmp_path):
    path = tmp_path / "absent.db"
    with pytest.raises(rc.StorageError, match="no database at"):
        rc.open_storage(f"sqlite:///{path}", create=False)
    assert not path.exists()


def test_relative_and_absolute_sqlite_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with rc.open_storage("sqlite:///here.db"):
        pass
    assert (tmp_path / "here.db").exists()
    with rc.open_storage(f"sqlite:///{tmp_path / 'abs.db'}"):  # sqlite:////tmp/... (four slashes)
        pass
    assert (tmp_path / "abs.db").exists()


def test_sqlite_connection_settings(tmp_path):
    with rc.open_storage(f"sqlite:///{tmp_path / 'p.db'}") as storage:
        def pragmas(tx):
            return [tx.value(f"PRAGMA {name}") for name in ("journal_mode", "synchronous", "foreign_keys",
                                                           "busy_timeout")]
        assert w(storage, pragmas) == ["wal", 2, 1, 10_000]   # synchronous 2 = FULL
        assert r(storage, pragmas)[0] == "wal"
    with rc.open_storage(f"sqlite:///{tmp_path / 'n.db'}", synchronous="NORMAL") as storage:
        assert w(storage, lambda tx: tx.value("PRAGMA synchronous")) == 1


def test_status_check_constraint(storage):
    with pytest.raises(Exception):
        w(storage, lambda tx: tx.rows("INSERT INTO instances (instance_id, tenant_id, status, created_at_ms)"
                                      " VALUES ('x', 't', 'sleeping', 0)"))


# -- instances and guarded transitions ----------------------------------------------------------


def test_create_is_idempotent_and_keeps_the_first_tenant(storage):
    assert w(storage, Tx.create_instance, "i-1", "t-1", T0) is True
    assert w(storage, Tx.create_instance, "i-1", "t-2", T0 + 5) is False
    instance = r(storage, Tx.get_instance, "i-1")
    assert instance["tenant_id"] == "t-1" and instance["status"] == "pending" and instance["created_at_ms"] == T0
    assert r(storage, Tx.get_instance, "nope") is None


def test_a_run_stamps_the_first_start_only(storage):
    running(storage, at=T0)
    assert w(storage, Tx.transition, "i-1", "suspended", ("running",), T0 + 10)
    assert w(storage, Tx.begin_run, "i-1", T0 + 20, T0 + 30) == 2
    instance = r(storage, Tx.get_instance, "i-1")
    assert (instance["status"], instance["started_at_ms"], instance["heartbeat_at_ms"], instance["run"],
            instance["sleep_until_ms"]) == ("running", T0, T0 + 20, 2, T0 + 30)


def test_registration_is_guarded_by_tenant_and_status(storage):
    # The guards moved from the old Tx.start_instance to the registration rule (_register); begin_run guards nothing.
    running(storage)
    with pytest.raises(rc.TenantMismatch):
        register(storage, "i-1", "other", T0)
    assert r(storage, Tx.get_instance, "i-1")["run"] == 1  # nothing began
    assert w(storage, Tx.transition, "i-1", "completed", ("running",), T0 + 1, output=b"out")
    with pytest.raises(rc.InvalidState, match="completed"):
        register(storage, "i-1", "t-1", T0 + 2)
    instance = r(storage, Tx.get_instance, "i-1")
    assert (instance["status"], instance["run"]) == ("completed", 1)
    assert r(storage, Tx.count_events, "i-1") == 0


def test_transition_guards(storage):
    running(storage)
    assert w(storage, Tx.transition, "i-1", "completed", ("suspended",), T0 + 1) is False
    assert w(storage, Tx.transition, "i-1", "failed", ("running",), T0 + 2, error="boom") is True
    instance = r(storage, Tx.get_instance, "i-1")
    assert (instance["status"], instance["error"], instance["finished_at_ms"]) == ("failed", "boom", T0 + 2)
    for status in rc.STATUSES:  # nothing moves a terminal instance
        assert w(storage, Tx.transition, "i-1", status, rc.STATUSES, T0 + 3) is False
    assert w(storage, Tx.transition, "nope", "running", ("pending",), T0) is False


def test_suspend_keeps_finished_at_empty_and_complete_stores_output(storage):
    running(storage)
    assert w(storage, Tx.transition, "i-1", "suspended", ("running",), T0 + 1)
    assert r(storage, Tx.get_instance, "i-1")["finished_at_ms"] is None
    assert w(storage, Tx.transition, "i-1", "completed", ("running", "suspended"), T0 + 2, output=b"\x00\xfe")
    instance = r(storage, Tx.get_instance, "i-1")
    assert (instance["output"], instance["finished_at_ms"]) == (b"\x00\xfe", T0 + 2)


def test_heartbeat_and_stale_detection(storage):
    running(storage, "old", at=T0)
    running(storage, "fresh", at=T0)
    running(storage, "done", at=T0)
    running(storage, "orphaned", at=T0)
    assert w(storage, Tx.touch_heartbeat, "fresh", T0 + 50_000)
    assert w(storage, Tx.touch_heartbeat, "nope", T0) is False
    assert w(storage, Tx.touch_heartbeat, "old", T0 + 50_000, 0) is False   # not its run
    assert w(storage, Tx.touch_heartbeat, "old", T0 + 50_000, 2) is False
    assert w(storage, Tx.transition, "done", "completed", ("running",), T0 + 1)
    assert w(storage, Tx.touch_heartbeat, "done", T0 + 50_000) is False  # finished
    assert w(storage, Tx.orphan, "orphaned", T0 + 2, T0 + 2) == 1  # known dead already: not silent again
    assert w(storage, Tx.silent_runs, T0 + 10_000) == [("old", T0)]
    # A workflow without a launch command cannot be relaunched: a silent run fails it.
    stale = w(storage, rc._recover_silent, T0 + 10_000, T0 + 60_000, rc.Recovery(5, 5, 1000, ()))
    assert stale == [("old", "failed")]
    old = r(storage, Tx.get_instance, "old")
    assert old["status"] == "failed" and old["finished_at_ms"] == T0 + 60_000
    assert "stale" in old["error"] and "2023-11-14T22:13:20" in old["error"]
    assert r(storage, Tx.get_instance, "fresh")["status"] == "running"
    assert r(storage, Tx.get_instance, "done")["status"] == "completed"


def test_list_and_count_instances_with_filters(storage):
    for n in range(5):
        w(storage, Tx.create_instance, f"a-{n}", "tenant-a", T0 + n)
    for n in range(3):
        running(storage, f"b-{n}", "tenant-b", at=T0 + 10 + n)
    assert r(storage, Tx.count_instances) == 8
    assert r(storage, Tx.count_instances, tenant_id="tenant-a") == 5
    assert r(storage, Tx.count_instances, status="running") == 3
    assert r(storage, Tx.count_instances, tenant_id="tenant-a", status="running") == 0
    assert r(storage, Tx.count_instances, since=T0 + 3) == 5
    newest = r(storage, Tx.list_instances, limit=2)
    assert [i["instance_id"] for i in newest] == ["b-2", "b-1"]
    page = r(storage, Tx.list_instances, tenant_id="tenant-a", limit=2, offset=2)
    assert [i["instance_id"] for i in page] == ["a-2", "a-1"]
    assert r(storage, Tx.count_by_status) == {"pending": 5, "running": 3}
    assert r(storage, Tx.count_running) == 3


def test_delete_instance_removes_everything_it_owns(storage):
    running(storage)
    save(storage, "i-1", "c", b"s", T0)
    w(storage, Tx.insert_event, "i-1", "custom", T0)
    w(storage, Tx.put_signal, "i-1", "pause", b"", T0)
    w(storage, Tx.put_custom_signal, "i-1", "c", b"p", T0)
    assert w(storage, Tx.delete_instance, "i-1") is True
    assert w(storage, Tx.delete_instance, "i-1") is False

    def leftovers(tx):
        return [tx.value(f"SELECT count(*) FROM {table}") for table in
                ("instances", "checkpoints", "events", "signals", "custom_signals")]
    assert r(storage, leftovers) == [0, 0, 0, 0, 0]


def test_delete_finished_only_takes_old_terminal_instances(storage):
    for n, status in enumerate(["completed", "failed", "cancelled"]):
        running(storage, f"old-{status}", at=T0)
        w(storage, Tx.transition, f"old-{status}", status, ("running",), T0 + n)
    running(storage, "new-done", at=T0)
    w(storage, Tx.transition, "new-done", "completed", ("running",), T0 + 1_000)
    running(storage, "still-running", at=T0)
    assert sorted(w(storage, Tx.delete_finished, T0 + 500, 2) + w(storage, Tx.delete_finished, T0 + 500, 2)) == \
        ["old-cancelled", "old-completed", "old-failed"]
    assert sorted(i["instance_id"] for i in r(storage, Tx.list_instances)) == ["new-done", "still-running"]


# -- checkpoints --------------------------------------------------------------------------------


def test_first_state_saved_wins_forever(storage):
    running(storage)
    assert save(storage, "i-1", "c-1", b"first", T0) is None
    assert save(storage, "i-1", "c-1", b"second", T0 + 1) == b"first"
    assert r(storage, Tx.get_checkpoint, "i-1", "c-1") == b"first"
    assert r(storage, Tx.get_instance, "i-1")["checkpoint_id"] == "c-1"
    assert save(storage, "i-1", "c-2", b"", T0 + 2) is None  # empty state is a state
    assert save(storage, "i-1", "c-2", b"x", T0 + 3) == b""
    assert r(storage, Tx.get_instance, "i-1")["checkpoint_id"] == "c-2"


def test_a_checkpoint_saves_only_while_the_instance_runs_and_answers_what_waits_for_it(storage):
    assert w(storage, Tx.save_checkpoint, "nope", "c", b"s", T0) is None
    w(storage, Tx.create_instance, "i-1", "t-1", T0)
    assert w(storage, Tx.save_checkpoint, "i-1", "c", b"s", T0) is None  # pending, not running
    assert r(storage, Tx.count_checkpoints, "i-1") == 0
    w(storage, Tx.begin_run, "i-1", T0, None)
    assert w(storage, Tx.save_checkpoint, "i-1", "c-1", b"s", T0 + 5) == {
        "first": None, "run": 1, "sleep_until_ms": None, "signal": None, "custom_size": None}
    assert r(storage, Tx.get_instance, "i-1")["heartbeat_at_ms"] == T0 + 5
    w(storage, Tx.put_signal, "i-1", "pause", b"why", T0 + 6)
    w(storage, Tx.put_custom_signal, "i-1", "c-2", b"hello", T0 + 6)
    w(storage, Tx.set_sleep, "i-1", T0 + 99)
    assert w(storage, Tx.save_checkpoint, "i-1", "c-2", b"t", T0 + 7) == {
        "first": None, "run": 1, "sleep_until_ms": T0 + 99, "custom_size": 5,
        "signal": {"signal_type": "pause", "payload": b"why", "created_at_ms": T0 + 6}}
    assert w(storage, Tx.save_checkpoint, "i-1", "c-1", b"again", T0 + 8)["first"] == b"s"
    assert r(storage, Tx.get_instance, "i-1")["checkpoint_id"] == "c-2"  # a replayed id does not become the latest
    w(storage, Tx.transition, "i-1", "suspended", ("running",), T0 + 9)
    assert w(storage, Tx.save_checkpoint, "i-1", "c-3", b"u", T0 + 10) is None
    assert r(storage, Tx.count_checkpoints, "i-1") == 2


def test_checkpoints_are_per_instance(storage):
    running(storage, "i-1")
    running(storage, "i-2")
    save(storage, "i-1", "c", b"one", T0)
    assert r(storage, Tx.get_checkpoint, "i-2", "c") is None
    assert save(storage, "i-2", "c", b"two", T0) is None
    assert r(storage, Tx.get_checkpoint, "i-1", "c") == b"one"


@pytest.mark.parametrize("state", [bytes(range(256)) * 4096, b"\xff\xfe\x00\x80\xc3\x28", os.urandom(1 << 20)],
                         ids=["1MiB-pattern", "invalid-utf8", "1MiB-random"])
def test_states_round_trip_byte_for_byte(storage, state):
    running(storage)
    save(storage, "i-1", "c", state, T0)
    assert r(storage, Tx.get_checkpoint, "i-1", "c") == state
    assert save(storage, "i-1", "c", b"other", T0) == state
    assert r(storage, Tx.list_checkpoints, "i-1") == [{"checkpoint_id": "c", "created_at_ms": T0, "size": len(state)}]


def test_list_and_count_checkpoints_newest_first(storage):
    running(storage)
    for n in range(5):
        save(storage, "i-1", f"c-{n}", b"x" * n, T0 + n)
    assert [c["checkpoint_id"] for c in r(storage, Tx.list_checkpoints, "i-1", limit=2, offset=1)] == ["c-3", "c-2"]
    assert r(storage, Tx.count_checkpoints, "i-1") == 5
    assert r(storage, Tx.count_checkpoints) == 5
    assert r(storage, Tx.count_checkpoints, "nope") == 0


def test_100_concurrent_saves_of_one_checkpoint_keep_exactly_one_state(storage):
    running(storage)
    states = [f"state-{n}".encode() for n in range(100)]
    futures = [storage.write(Tx.save_checkpoint, "i-1", "contested", state, T0) for state in states]
    answers = [future.result(timeout=60)["first"] for future in futures]
    winners = [state for state, answer in zip(states, answers) if answer is None]
    assert len(winners) == 1
    assert all(answer in (None, winners[0]) for answer in answers)
    assert r(storage, Tx.count_checkpoints, "i-1") == 1
    assert r(storage, Tx.get_checkpoint, "i-1", "contested") == winners[0]


def test_100_concurrent_saves_from_many_threads(storage):
    running(storage)
    barrier = threading.Barrier(20)

    def save(n):
        barrier.wait()
        answer = storage.write(Tx.save_checkpoint, "i-1", "contested", f"s-{n}".encode(), T0).result(timeout=60)
        return answer["first"]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(save, range(100)))
    saved = r(storage, Tx.get_checkpoint, "i-1", "contested")
    assert answers.count(None) == 1 and all(a in (None, saved) for a in answers)


def test_two_writers_saving_one_checkpoint_keep_the_first_state(storage, database_url):
    """Two servers on one database: each checkpoint id is contested by both writers at once; one state wins,
    and the loser's answer carries the winner's state (on PostgreSQL, its INSERT found the row committed)."""
    other = rc.open_storage(database_url)
    try:
        running(storage)
        for n in range(40):
            barrier = threading.Barrier(2)

            def save_on(writer, label):
                barrier.wait()
                return writer.write(Tx.save_checkpoint, "i-1", f"c{n}", label, T0).result(timeout=30)["first"]

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(save_on, (storage, other), (b"one", b"two")))
            saved = r(storage, Tx.get_checkpoint, "i-1", f"c{n}")
            assert sorted(answers, key=repr) == [None, saved], (n, answers, saved)
        assert r(storage, Tx.count_checkpoints, "i-1") == 40
    finally:
        other.close()


# -- events -------------------------------------------------------------------------------------


def test_events_list_newest_first_with_filters(storage):
    running(storage)
    w(storage, Tx.insert_event, "i-1", "started", T0)
    for n in range(4):
        w(storage, Tx.insert_event, "i-1", "custom", T0 + n, subtype="even" if n % 2 == 0 else "odd",
          checkpoint_id=f"c-{n}", payload=bytes([n, 255]))
    events = r(storage, Tx.list_events, "i-1")
    assert [e["event_type"] for e in events] == ["custom"] * 4 + ["started"]
    assert events[0] == {"id": events[0]["id"], "event_type": "custom", "subtype": "odd", "checkpoint_id": "c-3",
                         "payload": b"\x03\xff", "payload_size": 2, "created_at_ms": T0 + 3}
    assert [e["checkpoint_id"] for e in r(storage, Tx.list_events, "i-1", subtype="even")] == ["c-2", "c-0"]
    assert r(storage, Tx.count_events, "i-1", event_type="custom") == 4
    assert r(storage, Tx.count_events, "i-1", event_type="custom", subtype="odd") == 2
    assert len(r(storage, Tx.list_events, "i-1", limit=2, offset=3)) == 2


# -- signals ------------------------------------------------------------------------------------


def test_one_pending_signal_newer_replaces_older(storage):
    running(storage)
    assert r(storage, Tx.get_signal, "i-1") is None
    w(storage, Tx.put_signal, "i-1", "pause", b"p", T0)
    w(storage, Tx.put_signal, "i-1", "cancel", b"\x00c", T0 + 1)
    assert r(storage, Tx.get_signal, "i-1") == {"signal_type": "cancel", "payload": b"\x00c", "created_at_ms": T0 + 1}
    assert w(storage, Tx.ack_signal, "i-1", "pause") is None  # the replaced one is gone
    assert w(storage, Tx.ack_signal, "i-1", "cancel") == b"\x00c"  # its payload, for the event
    assert r(storage, Tx.get_signal, "i-1") is None


def test_signal_for_missing_instance_is_refused_by_the_database(storage):
    with pytest.raises(Exception):
        w(storage, Tx.put_signal, "nope", "cancel", b"", T0)


def test_custom_signals_are_keyed_replaced_and_taken_once(storage):
    running(storage)
    w(storage, Tx.put_custom_signal, "i-1", "c-1", b"old", T0)
    w(storage, Tx.put_custom_signal, "i-1", "c-1", b"new", T0 + 1)
    w(storage, Tx.put_custom_signal, "i-1", "c-2", b"other", T0)
    assert w(storage, Tx.take_custom_signal, "i-1", "c-1") == b"new"
    assert w(storage, Tx.take_custom_signal, "i-1", "c-1") is None
    assert w(storage, Tx.take_custom_signal, "i-1", "c-2") == b"other"


# -- sleep and wake -----------------------------------------------------------------------------


def test_sleep_and_the_launch_queue(storage):
    for name in ("due", "later", "resumed", "awake", "paused-sleeper"):
        running(storage, name)
    w(storage, Tx.set_sleep, "due", T0 + 100)
    w(storage, Tx.set_sleep, "later", T0 + 10_000)
    w(storage, Tx.set_sleep, "awake", T0 + 50)
    w(storage, Tx.set_sleep, "paused-sleeper", T0 + 50)
    for name in ("due", "later", "resumed", "paused-sleeper"):
        w(storage, Tx.transition, name, "suspended", ("running",), T0)
    w(storage, Tx.put_signal, "resumed", "resume", b"", T0)
    w(storage, Tx.put_signal, "paused-sleeper", "pause", b"", T0)  # a pending pause: not due though its time passed
    # a resumed paused instance counts as due at 0: first
    assert [i["instance_id"] for i in r(storage, Tx.launch_queue, T0 + 200)] == ["resumed", "due"]
    w(storage, Tx.clear_sleep, "due")  # suspended without a wake time: paused, it needs a resume
    assert [i["instance_id"] for i in r(storage, Tx.launch_queue, T0 + 200)] == ["resumed"]
    # the queue also holds pending instances and orphaned runs (the CLI's `wakes` shows it)
    w(storage, Tx.create_instance, "new", "t-1", T0 + 150)
    w(storage, Tx.orphan, "awake", T0 + 160, T0 + 160)
    queue = r(storage, Tx.launch_queue, T0 + 200)
    assert [(i["instance_id"], i["status"]) for i in queue] == [("resumed", "suspended"), ("new", "pending"),
                                                                ("awake", "running")]
    assert queue[2]["orphaned_at_ms"] == T0 + 160 and queue[2]["launch_after_ms"] == T0 + 160
    assert [i["instance_id"] for i in r(storage, Tx.launch_queue, T0 + 200, 1)] == ["resumed"]


# -- runs, slots and restarts ------------------------------------------------------------------


def test_each_run_begins_with_a_clean_launch_state(storage):
    w(storage, Tx.create_instance, "i-1", "t-1", T0)
    assert r(storage, Tx.get_instance, "i-1")["run"] == 0  # no run before the first registration
    [claim] = w(storage, Tx.claim_launches, T0, T0 + 1000, None, 10, 10)
    assert (claim["run"], claim["launch_attempts"]) == (0, 1)
    w(storage, Tx.end_launch, "i-1", T0 + 500)  # the launch died before registering
    assert w(storage, Tx.claim_launches, T0 + 500, T0 + 1500, None, 10, 10)[0]["launch_attempts"] == 2
    assert w(storage, Tx.begin_run, "i-1", T0 + 600, None) == 1
    first = run_of(storage)
    assert (first["status"], first["run"], first["started_at_ms"], first["heartbeat_at_ms"]) == \
        ("running", 1, T0 + 600, T0 + 600)
    assert (first["launch_lease_until_ms"], first["launch_after_ms"], first["launch_attempts"],
            first["orphaned_at_ms"], first["restarts"]) == (None, None, 0, None, 0)
    assert w(storage, Tx.orphan, "i-1", T0 + 700, T0 + 800) == 1
    assert w(storage, Tx.claim_launches, T0 + 800, T0 + 1800, None, 10, 10)[0]["run"] == 1
    assert w(storage, Tx.begin_run, "i-1", T0 + 900, T0 + 5000) == 2
    second = run_of(storage)
    assert (second["run"], second["started_at_ms"], second["heartbeat_at_ms"], second["sleep_until_ms"]) == \
        (2, T0 + 600, T0 + 900, T0 + 5000)
    assert (second["launch_lease_until_ms"], second["launch_after_ms"], second["launch_attempts"],
            second["orphaned_at_ms"]) == (None, None, 0, None)
    assert second["restarts"] == 1  # only a new checkpoint ends a run of restarts, not a registration
    assert r(storage, Tx.launch_queue, T0 + 10_000) == []


def test_count_busy_counts_running_instances_and_unexpired_launches(storage):
    running(storage, "running")
    running(storage, "orphaned")
    w(storage, Tx.orphan, "orphaned", T0, T0)  # its process is gone, but it keeps its slot until relaunched
    for name in ("pending", "leased-pending"):
        w(storage, Tx.create_instance, name, "t-1", T0)
    for name in ("suspended", "leased-suspended", "completed"):
        running(storage, name)
    for name in ("suspended", "leased-suspended"):
        w(storage, Tx.transition, name, "suspended", ("running",), T0)
    w(storage, Tx.transition, "completed", "completed", ("running",), T0)
    for name in ("leased-pending", "leased-suspended", "completed"):
        lease(storage, name, T0 + 100)
    assert r(storage, Tx.count_busy, T0 + 99) == 4
    assert r(storage, Tx.count_busy, T0 + 100) == 2  # a lease that ran out holds nothing
    assert r(storage, Tx.count_running) == 2


def test_a_reserved_launch_registers_beyond_capacity_and_others_wait(storage):
    running(storage, "busy")
    for name in ("claimed", "unclaimed"):
        w(storage, Tx.create_instance, name, "t-1", T0)
    claims = w(storage, Tx.claim_launches, T0, T0 + 1000, None, 2, 10)
    assert [c["instance_id"] for c in claims] == ["claimed"]  # one free slot
    assert r(storage, Tx.count_busy, T0 + 5) == 2
    with pytest.raises(rc.Overloaded):
        register(storage, "unclaimed", at=T0 + 5, max_busy=2)
    assert register(storage, "claimed", at=T0 + 5, max_busy=2)["run"] == 1  # its slot was reserved
    assert r(storage, Tx.count_busy, T0 + 5) == 2
    claimed = run_of(storage, "claimed")
    assert (claimed["status"], claimed["launch_lease_until_ms"], claimed["launch_attempts"]) == ("running", None, 0)


def test_a_checkpoint_of_a_superseded_run_is_refused(storage):
    running(storage)
    assert w(storage, Tx.save_checkpoint, "i-1", "c-1", b"a", T0 + 1, 1)["first"] is None
    assert w(storage, Tx.begin_run, "i-1", T0 + 2, None) == 2  # another process took over
    assert w(storage, Tx.save_checkpoint, "i-1", "c-2", b"b", T0 + 3, 1) is None  # the old run's process
    assert w(storage, Tx.save_checkpoint, "i-1", "c-2", b"b", T0 + 3, 3) is None  # a run not begun
    instance = r(storage, Tx.get_instance, "i-1")
    assert (instance["checkpoint_id"], instance["heartbeat_at_ms"]) == ("c-1", T0 + 2)  # nothing changed
    assert r(storage, Tx.count_checkpoints, "i-1") == 1
    assert w(storage, Tx.save_checkpoint, "i-1", "c-2", b"b", T0 + 4, 2)["first"] is None
    assert w(storage, Tx.save_checkpoint, "i-1", "c-3", b"c", T0 + 5)["first"] is None  # no run given: any
    assert r(storage, Tx.count_checkpoints, "i-1") == 3


def test_a_new_checkpoint_ends_a_run_of_restarts(storage):
    running(storage)
    save(storage, "i-1", "c-1", b"a", T0)
    for n in (1, 2):
        assert w(storage, Tx.orphan, "i-1", T0 + n, T0 + n) == n
        w(storage, Tx.begin_run, "i-1", T0 + n, None)
    assert save(storage, "i-1", "c-1", b"replayed", T0 + 3) == b"a"
    assert run_of(storage)["restarts"] == 2  # a replayed checkpoint is no progress
    assert save(storage, "i-1", "c-2", b"b", T0 + 4) is None
    assert run_of(storage)["restarts"] == 0
    assert w(storage, Tx.orphan, "i-1", T0 + 5, T0 + 5) == 1


def test_health_and_size(storage):
    assert r(storage, Tx.health) is True
    assert r(storage, Tx.database_size) > 0


# -- group commit -------------------------------------------------------------------------------


class Refused(Exception):
    pass


def _write_then_fail(tx, instance_id):
    tx.create_instance(instance_id, "t", T0)
    raise Refused(instance_id)


def test_a_failing_write_fails_alone_and_the_others_land(storage):
    futures = []
    for n in range(30):
        if n == 13:
            futures.append(storage.write(_write_then_fail, "doomed"))
        else:
            futures.append(storage.write(Tx.create_instance, f"ok-{n}", "t", T0))
    for n, future in enumerate(futures):
        if n == 13:
            with pytest.raises(Refused):
                future.result(timeout=30)
        else:
            assert future.result(timeout=30) is True
    assert r(storage, Tx.get_instance, "doomed") is None  # its own write was undone
    assert r(storage, Tx.count_instances) == 29


def test_queued_writes_share_one_commit(storage):
    """PostgreSQL ran each write in its own transaction (five round trips a checkpoint): both databases now
    put everything queued while a commit runs into the next transaction, and a failing write fails alone."""
    gate = threading.Event()
    blocker = storage.write(lambda tx: gate.wait(10))
    futures = [storage.write(Tx.create_instance, f"i-{n}", "t", T0) for n in range(50)]
    futures.append(storage.write(_write_then_fail, "doomed"))
    before = storage.commits
    gate.set()
    blocker.result(timeout=30)
    assert all(f.result(timeout=30) for f in futures[:-1])
    with pytest.raises(Refused):
        futures[-1].result(timeout=30)
    assert storage.commits - before <= 2  # the blocker's group, then one for all 51 queued writes
    assert r(storage, Tx.count_instances) == 50


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="TEST_DATABASE_URL is not set")
def test_a_group_chosen_as_a_deadlock_victim_runs_again(postgres_url):
    """Two servers' commit groups can lock rows in opposite orders; PostgreSQL then aborts one of them, whose
    writes must not fail for it: the group runs again."""
    first, second = rc.open_storage(postgres_url), rc.open_storage(postgres_url)
    try:
        for instance_id in ("x", "y"):
            w(first, Tx.create_instance, instance_id, "t", T0)
        holds = {"x": threading.Event(), "y": threading.Event()}

        def lock_both(tx, mine, theirs):
            tx.rows("UPDATE instances SET heartbeat_at_ms = 1 WHERE instance_id = ?", mine)
            holds[mine].set()
            holds[theirs].wait(10)
            tx.rows("UPDATE instances SET heartbeat_at_ms = 2 WHERE instance_id = ?", theirs)
            return mine
        one, other = first.write(lock_both, "x", "y"), second.write(lock_both, "y", "x")
        assert (one.result(timeout=30), other.result(timeout=30)) == ("x", "y")
    finally:
        first.close()
        second.close()


def test_reads_do_not_wait_for_a_long_write(tmp_path):
    with rc.open_storage(f"sqlite:///{tmp_path / 'r.db'}") as storage:
        w(storage, Tx.create_instance, "i-1", "t", T0)
        gate = threading.Event()
        blocker = storage.write(lambda tx: (tx.create_instance("i-2", "t", T0), gate.wait(10)))
        assert r(storage, Tx.count_instances) == 1  # answered while the writer holds its transaction
        gate.set()
        blocker.result(timeout=30)
        assert r(storage, Tx.count_instances) == 2


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="TEST_DATABASE_URL is not set")
def test_postgresql_migrations_race_safely_between_two_processes(postgres_url):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        storages = list(pool.map(lambda _: rc.open_storage(postgres_url), range(4)))
    for storage in storages:
        assert all(at is not None for _, _, at in storage.migration_status())
        storage.close()


def test_close_is_idempotent_from_many_threads_and_later_writes_fail(database_url):
    storage = rc.open_storage(database_url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: storage.close(), range(8)))
    storage.close()
    with pytest.raises(Exception):
        storage.write(Tx.create_instance, "late", "t", T0).result(timeout=10)

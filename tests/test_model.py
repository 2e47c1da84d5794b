"""A stateful model test of the instance lifecycle (issue 12): runs and ownership, who may register, signals,
start, the scheduler's claims within capacity, launch exits and recovery of silent or orphaned runs.

Hypothesis drives random sequences of operations against a small pure-Python model of the rules (the lifecycle
design, PROTOCOL.md) and against one Core per database (SQLite, and PostgreSQL when TEST_DATABASE_URL is set),
all on one fake clock. Every step compares the answer or error code of each database with the model's, then
every instance's stored state (status, run, pending signal, wake time, restarts, orphaned mark, launch lease,
attempts and backoff, checkpoints, events) with the model's, and the whole stored rows of the databases with
each other."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import os

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import runtara_core as rc
from conftest import TEST_DATABASE_URL

T0 = 1_700_000_000_000
IDS = ("i0", "i1", "i2")
TENANT, OTHER = "t", "u"
CHECKPOINT_IDS = ("a", "b", "c")
SETTINGS = dict(max_concurrent_instances=2, max_restarts=2, launch_max_attempts=2, heartbeat_timeout_ms=1000,
                wake_interval_ms=100, launch_timeout_ms=1000, launch_command="x", sleep_inline_max_ms=1000)
MAX_BUSY, MAX_RESTARTS, MAX_ATTEMPTS = 2, 2, 2
HEARTBEAT_TIMEOUT, LAUNCH_TIMEOUT, INLINE_MAX, BACKOFF = 1000, 1000, 1000, 100
TERMINAL, ACTIVE = ("completed", "failed", "cancelled"), ("pending", "running", "suspended")


def backoff(now: int, tries: int) -> int:
    """When a launch may be tried again: min(wake_interval * 2^tries, 60 s) from now."""
    return now + min(BACKOFF * 2 ** min(tries, 20), 60_000)


# =============================================================================================
# The model
# =============================================================================================


class Refused(Exception):
    """The model's error answer: a wire code, and a word the message must contain (or None)."""

    def __init__(self, code: str, hint: str | None = None):
        super().__init__(code, hint)
        self.code, self.hint = code, hint


@dataclasses.dataclass
class Instance:
    tenant: str
    created_at: int
    input: bytes | None = None
    status: str = "pending"
    run: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    heartbeat_at: int | None = None
    output: bytes | None = None
    failed_with_error: bool = False
    checkpoint_id: str | None = None                  # the newest checkpoint id
    checkpoints: dict = dataclasses.field(default_factory=dict)  # id -> first state
    sleep_until: int | None = None
    signal: tuple | None = None                       # the one pending signal: (type, sent at)
    restarts: int = 0
    orphaned_at: int | None = None
    lease_until: int | None = None
    launch_after: int | None = None
    launch_attempts: int = 0
    events: list = dataclasses.field(default_factory=list)  # [(event_type, subtype)]

    def signal_type(self):
        return self.signal and self.signal[0]

    def signal_map(self):
        return self.signal and {"signal_type": self.signal[0], "payload": b"", "created_at_ms": self.signal[1]}

    def view(self) -> dict:
        """What the databases must hold for this instance."""
        return {
            "tenant_id": self.tenant, "status": self.status, "run": self.run, "workflow": "default",
            "input": self.input, "started_at_ms": self.started_at, "finished_at_ms": self.finished_at,
            "heartbeat_at_ms": self.heartbeat_at, "output": self.output, "error?": self.failed_with_error,
            "checkpoint_id": self.checkpoint_id, "checkpoints": dict(self.checkpoints),
            "sleep_until_ms": self.sleep_until, "signal": self.signal, "restarts": self.restarts,
            "orphaned_at_ms": self.orphaned_at, "launch_lease_until_ms": self.lease_until,
            "launch_after_ms": self.launch_after, "launch_attempts": self.launch_attempts,
            "events": list(self.events)}


def check_run(instance: Instance, run) -> None:
    """A request naming a run acts only while it is the newest: older SUPERSEDED, not begun INVALID_REQUEST."""
    if run is None or run == instance.run:
        return
    raise Refused("SUPERSEDED" if run < instance.run else "INVALID_REQUEST")


def refuse(instance: Instance | None, run) -> None:
    if instance is None:
        raise Refused("INSTANCE_NOT_FOUND")
    check_run(instance, run)
    raise Refused("INVALID_STATE")


def transition(instance: Instance, to: str, from_statuses, now: int, output=None, error=False, run=None) -> bool:
    """A guarded status change; a terminal status is final and drops the pending signal. It stamps a sign of
    life and ends any launch (lease and attempts) or orphaned mark (as the code's transition does)."""
    if instance.status in TERMINAL or instance.status not in from_statuses or run not in (None, instance.run):
        return False
    instance.status = to
    if to in TERMINAL and instance.finished_at is None:
        instance.finished_at = now
    if output is not None:
        instance.output = output
    instance.failed_with_error |= error
    instance.heartbeat_at, instance.orphaned_at, instance.lease_until = now, None, None
    instance.launch_attempts = 0
    if to in TERMINAL:
        instance.signal = None
    return True


def cancel_waiting(instance: Instance, now: int) -> None:
    """Just suspended: a cancel that waited for the process takes effect, as none runs now."""
    if instance.signal_type() == "cancel":
        instance.signal = None
        transition(instance, "cancelled", ACTIVE, now)
        instance.events.append(("signal", "cancel"))


class Model:
    def __init__(self):
        self.instances: dict[str, Instance] = {}

    def busy(self, now: int) -> int:
        """Slots held: running instances (orphaned ones too), and those a launch is under way for."""
        return sum(1 for i in self.instances.values() if i.status == "running" or (
            i.status in ("pending", "suspended") and i.lease_until is not None and i.lease_until > now))

    @staticmethod
    def not_due(instance: Instance, now: int) -> str | None:
        """Why a suspended instance may not run (the word its refusal says), or None when it is due."""
        if instance.signal_type() == "resume":
            return None
        if instance.sleep_until is None or instance.signal_type() == "pause":
            return "paused"
        if instance.sleep_until > now:
            return "sleeps until"
        return None

    # -- instance operations --------------------------------------------------------------------

    def register(self, iid, tenant, checkpoint_id, run, now) -> dict:
        instance = self.instances.get(iid)
        if instance is None:  # registering an unknown instance creates it (rolled back if refused)
            instance = self.instances[iid] = Instance(tenant, now)
        if instance.tenant != tenant:
            raise Refused("TENANT_MISMATCH")
        if instance.status in TERMINAL:
            raise Refused("INVALID_STATE")
        reply = {"instance_id": iid, "status": "running", "checkpoint_id": instance.checkpoint_id,
                 "resumed": instance.started_at is not None, "workflow": "default", "input": instance.input}
        if run is not None:  # re-attach to the current run: nothing begins
            check_run(instance, run)
            if instance.status != "running":
                raise Refused("INVALID_STATE")
            return rc._compact({**reply, "run": run})
        if checkpoint_id is not None and checkpoint_id not in instance.checkpoints:
            raise Refused("CHECKPOINT_NOT_FOUND")
        reserved = instance.lease_until is not None and instance.lease_until > now
        if instance.status == "suspended" and not reserved:
            why = self.not_due(instance, now)
            if why:
                raise Refused("INVALID_STATE", why)
        if instance.status != "running" and not reserved and self.busy(now) >= MAX_BUSY:
            raise Refused("OVERLOADED")
        if instance.signal_type() == "resume":  # consumed by the registration it let in
            instance.signal = None
            instance.events.append(("signal", "resume"))
            if instance.sleep_until is not None:
                instance.sleep_until = min(instance.sleep_until, now)
        resumed = instance.started_at is not None
        instance.status, instance.run = "running", instance.run + 1
        instance.started_at = instance.started_at if resumed else now
        instance.heartbeat_at = now
        instance.lease_until = instance.launch_after = instance.orphaned_at = None
        instance.launch_attempts = 0
        instance.events.append(("resumed" if resumed else "started", None))
        return rc._compact({**reply, "run": instance.run})

    def save(self, iid, checkpoint_id, state, run, now) -> tuple[Instance, bytes | None]:
        instance = self.instances.get(iid)
        if instance is None or instance.status != "running" or run not in (None, instance.run):
            refuse(instance, run)
        instance.heartbeat_at = now
        first = instance.checkpoints.get(checkpoint_id)
        if first is None:  # a new checkpoint is progress: the restarts in a row start again
            instance.checkpoints[checkpoint_id] = state
            instance.checkpoint_id = checkpoint_id
            instance.restarts = 0
        return instance, first

    def checkpoint(self, iid, checkpoint_id, state, run, now) -> dict:
        instance, first = self.save(iid, checkpoint_id, state, run, now)
        return rc._compact({"found": first is not None, "state": first or b"",
                            "pending_signal": instance.signal_map()})

    def sleep(self, iid, checkpoint_id, state, duration, run, now) -> dict:
        """The answer; an inline sleep must not need real waiting (the machine moves the clock first)."""
        instance, first = self.save(iid, checkpoint_id, state, run, now)
        stored = instance.sleep_until
        if first is not None and stored is not None:
            wake = stored  # a replayed sleep waits only for what is left
        elif first is not None:
            wake = None    # this sleep already returned once
        else:
            wake = instance.sleep_until = now + duration
        if wake is None or wake - now <= INLINE_MAX:
            instance.sleep_until = None  # held inline, then cleared
            return {"suspended": False, "wake_at_ms": now if wake is None else wake}
        transition(instance, "suspended", ("running",), now)
        instance.events.append(("suspended", "sleep"))
        cancel_waiting(instance, now)
        return {"suspended": True, "wake_at_ms": wake}

    def event(self, iid, event_type, run, now) -> None:
        instance = self.instances.get(iid)
        moved = False
        if instance is not None:
            if event_type == "completed":
                moved = transition(instance, "completed", ("running", "suspended"), now, output=b"out", run=run)
            elif event_type == "failed":
                moved = transition(instance, "failed", ("running", "suspended"), now, error=True, run=run)
            elif event_type == "suspended":
                moved = transition(instance, "suspended", ("running",), now, run=run)
            elif instance.status in ACTIVE and run in (None, instance.run):  # heartbeat, custom
                instance.heartbeat_at = now
                moved = True
        if not moved:
            refuse(instance, run)
        if event_type != "heartbeat":
            instance.events.append((event_type, EVENT_SUBTYPES.get(event_type)))
        if event_type == "suspended":
            cancel_waiting(instance, now)

    def events(self, events, now) -> dict:
        for iid, event_type, run in events:  # one transaction: the first refusal undoes the batch
            self.event(iid, event_type, run, now)
        return {"accepted": len(events)}

    def poll_signals(self, iid, run) -> dict:
        instance = self.instances.get(iid)
        if instance is None:
            raise Refused("INSTANCE_NOT_FOUND")
        check_run(instance, run)
        return rc._compact({"signal": instance.signal_map()})

    def signal_ack(self, iid, signal_type, acknowledged, run, now) -> dict:
        instance = self.instances.get(iid)
        if instance is None:
            raise Refused("INSTANCE_NOT_FOUND")
        check_run(instance, run)
        applied = acknowledged and instance.signal_type() == signal_type
        if applied:
            instance.signal = None
            instance.events.append(("signal", signal_type))
            if signal_type == "cancel":
                transition(instance, "cancelled", ACTIVE, now)
            elif signal_type == "pause":
                transition(instance, "suspended", ("pending", "running"), now)
                instance.sleep_until = None  # paused: no pause is left pending, so no wake time either
        return {"status": instance.status, "applied": applied}

    # -- operator operations --------------------------------------------------------------------

    def send_signal(self, iid, signal_type, now) -> dict:
        instance = self.instances.get(iid)
        if instance is None:
            raise Refused("INSTANCE_NOT_FOUND")
        if instance.status in TERMINAL:
            raise Refused("INVALID_STATE")
        if instance.signal_type() == "cancel" and signal_type != "cancel":  # a pending cancel is never replaced
            raise Refused("INVALID_STATE", "cancel")
        # Applied at once where no process is involved: a pending or suspended instance, or a dead run.
        dead = instance.status != "running" or instance.orphaned_at is not None
        if signal_type == "cancel" and dead:
            instance.signal = None
            transition(instance, "cancelled", (instance.status,), now)
            instance.events.append(("signal", "cancel"))
        elif signal_type == "pause" and dead and instance.status in ("pending", "running"):
            instance.signal = None
            transition(instance, "suspended", (instance.status,), now)
            instance.sleep_until = None  # paused: no pause is left pending, so no wake time either
            instance.events.append(("signal", "pause"))
        elif signal_type == "resume" and not dead:  # nothing to resume in a live run: it replaces a pause
            instance.signal = None
            instance.events.append(("signal", "resume"))
        else:
            instance.signal = (signal_type, now)
            if signal_type == "pause" and instance.status == "suspended":  # a launch under way is called off
                instance.lease_until = None
        return {"instance_id": iid, "signal_type": signal_type, "status": instance.status}

    def start(self, iid, tenant, input, now) -> dict:
        created = iid not in self.instances
        if created:
            self.instances[iid] = Instance(tenant, now, input=input or None)
            self.instances[iid].events.append(("created", "default"))
        instance = self.instances[iid]
        if instance.tenant != tenant:
            raise Refused("TENANT_MISMATCH")
        return {"instance_id": iid, "status": instance.status, "created": created}

    # -- the scheduler ----------------------------------------------------------------------------

    @staticmethod
    def launchable(instance: Instance, now: int) -> bool:
        return (instance.lease_until is None or instance.lease_until <= now) and (
            instance.launch_after is None or instance.launch_after <= now)

    def claim_launches(self, now) -> list[dict]:
        """Orphaned runs first (they hold their slot), then pending and due suspended instances by due time,
        only as many as free slots."""
        orphans = sorted((i.orphaned_at, iid) for iid, i in self.instances.items()
                         if i.status == "running" and i.orphaned_at is not None and self.launchable(i, now))
        claimed = [iid for _, iid in orphans]
        for iid in claimed:
            self.lease(iid, now)
        waiting = []
        for iid, i in self.instances.items():
            if not self.launchable(i, now):
                continue
            if i.status == "pending":
                waiting.append((i.created_at, iid))
            elif i.status == "suspended" and self.not_due(i, now) is None:
                waiting.append((i.sleep_until or 0, iid))  # a resumed paused one counts as due at 0
        free = MAX_BUSY - self.busy(now)
        for _, iid in sorted(waiting)[:max(free, 0)]:
            self.lease(iid, now)
            claimed.append(iid)
        return sorted((self.claim_map(iid) for iid in claimed), key=lambda claim: claim["instance_id"])

    def lease(self, iid, now) -> None:
        instance = self.instances[iid]
        instance.lease_until = now + LAUNCH_TIMEOUT + rc.Core.LAUNCH_LEASE_GRACE_MS
        instance.launch_attempts += 1

    def claim_map(self, iid) -> dict:
        instance = self.instances[iid]
        return {"instance_id": iid, "tenant_id": instance.tenant, "workflow": "default",
                "checkpoint_id": instance.checkpoint_id, "run": instance.run,
                "launch_attempts": instance.launch_attempts, "status": instance.status,
                "sleep_until_ms": instance.sleep_until}

    def still_launching(self, claim) -> bool:
        instance = self.instances[claim["instance_id"]]
        return instance.run == claim["run"]  # not registered: killed at its timeout, whatever the instance is

    def launch_ended(self, claim, now) -> str:
        """A launched process ended: charged to its own launch only."""
        instance = self.instances[claim["instance_id"]]
        registered = instance.run > claim["run"]
        instance.events.append(("exited", None))
        if instance.status in TERMINAL:
            return instance.status
        if not registered and instance.launch_attempts != claim["launch_attempts"]:
            return instance.status  # a later claim holds the launch now: this exit is not charged to it
        if not registered and instance.lease_until is None:
            return instance.status  # a pause or cancel called the launch off
        if not registered:  # a failed launch
            instance.events.append(("launch_failed", None))
            if instance.launch_attempts >= MAX_ATTEMPTS:
                transition(instance, "failed", ACTIVE, now, error=True)
                return "failed"
            instance.lease_until, instance.launch_after = None, backoff(now, instance.launch_attempts)
            return instance.status
        if claim["run"] + 1 == instance.run and instance.status == "running" and instance.orphaned_at is None:
            return self.orphaned(instance, now)
        return instance.status

    def orphaned(self, instance: Instance, now: int) -> str:
        """The current run is dead: a pending cancel cancels, a pending pause suspends, else relaunch (after
        backoff) up to the restart limit, then fail."""
        if instance.signal_type() == "cancel":
            instance.signal = None
            transition(instance, "cancelled", ("running",), now)
            instance.events.append(("signal", "cancel"))
        elif instance.signal_type() == "pause":
            transition(instance, "suspended", ("running",), now)
            instance.events.append(("suspended", "pause"))
        elif instance.restarts >= MAX_RESTARTS:
            transition(instance, "failed", ("running",), now, error=True)
        else:
            instance.orphaned_at, instance.launch_after = now, backoff(now, instance.restarts)
            instance.lease_until = None
            instance.restarts += 1
            instance.events.append(("restart", None))
        return instance.status

    def recover_silent(self, now) -> list[tuple[str, str]]:
        cutoff = now - HEARTBEAT_TIMEOUT
        silent = sorted(iid for iid, i in self.instances.items()
                        if i.status == "running" and i.orphaned_at is None
                        and (i.heartbeat_at or i.started_at or i.created_at) < cutoff)
        return [(iid, self.orphaned(self.instances[iid], now)) for iid in silent]


EVENT_SUBTYPES = {"custom": "note"}
EVENT_PAYLOADS = {"completed": b"out", "failed": b"boom", "custom": b"c"}


# =============================================================================================
# The databases
# =============================================================================================


def _plain(value):
    return bytes(value) if isinstance(value, memoryview) else value


def stored_state(tx: rc.Tx) -> dict:
    """Everything stored about the model's instances, read through the storage interface."""
    state = {}
    for iid in IDS:
        row = tx.get_run(iid)
        if row is None:
            continue
        signal = tx.get_signal(iid)
        events = tx.rows("SELECT event_type, subtype, checkpoint_id, payload, created_at_ms FROM events"
                         " WHERE instance_id = ? ORDER BY id", iid)
        checkpoints = tx.rows("SELECT checkpoint_id, state, created_at_ms FROM checkpoints WHERE instance_id = ?"
                              " ORDER BY checkpoint_id", iid)
        state[iid] = {"row": {key: _plain(value) for key, value in row.items()}, "input": _plain(tx.get_input(iid)),
                      "signal": signal and {key: _plain(value) for key, value in signal.items()},
                      "events": [tuple(_plain(value) for value in event) for event in events],
                      "checkpoints": [tuple(_plain(value) for value in checkpoint) for checkpoint in checkpoints]}
    return state


def model_view(stored: dict) -> dict:
    """The part of the stored state the model keeps, in the model's shape."""
    row = stored["row"]
    signal = stored["signal"]
    return {
        "tenant_id": row["tenant_id"], "status": row["status"], "run": row["run"], "workflow": row["workflow"],
        "input": stored["input"], "started_at_ms": row["started_at_ms"], "finished_at_ms": row["finished_at_ms"],
        "heartbeat_at_ms": row["heartbeat_at_ms"], "output": row["output"], "error?": row["error"] is not None,
        "checkpoint_id": row["checkpoint_id"], "checkpoints": {c: s for c, s, _ in stored["checkpoints"]},
        "sleep_until_ms": row["sleep_until_ms"],
        "signal": signal and (signal["signal_type"], signal["created_at_ms"]), "restarts": row["restarts"],
        "orphaned_at_ms": row["orphaned_at_ms"], "launch_lease_until_ms": row["launch_lease_until_ms"],
        "launch_after_ms": row["launch_after_ms"], "launch_attempts": row["launch_attempts"],
        "events": [(event_type, subtype) for event_type, subtype, *_ in stored["events"]]}


def clear(tx: rc.Tx) -> None:
    tx.rows("DELETE FROM instances")  # checkpoints, events and signals go with them


async def outcome(awaitable):
    try:
        return ("ok", await awaitable)
    except rc.RuntaraError as error:
        return ("error", error.code, str(error))


def lifecycle_machine(storages: list):
    names = [storage.dialect.name for storage in storages]

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.now = T0
            self.model = Model()
            self.claims: list[dict] = []  # claims whose process has not exited yet
            self.pids = itertools.count(1000)
            self.loop = asyncio.new_event_loop()
            for storage in storages:
                storage.write(clear).result()
            config = rc.Settings(**SETTINGS)
            self.cores = [rc.Core(storage, config, clock=lambda: self.now) for storage in storages]

        def teardown(self):
            self.loop.close()

        # -- driving ------------------------------------------------------------------------------

        def on_cores(self, call) -> list:
            """call(core) -> awaitable, on every database at once; each one's outcome."""
            async def both():
                return await asyncio.gather(*(outcome(call(core)) for core in self.cores))
            return self.loop.run_until_complete(asyncio.wait_for(both(), 20))

        def step(self, what: str, predict, call, normalize=lambda answer: answer):
            """Apply `predict(model)` to a copy of the model and `call(core)` to every database; compare."""
            model = copy.deepcopy(self.model)
            try:
                expected = ("ok", predict(model))
            except Refused as refusal:
                expected = ("error", refusal.code, refusal.hint)
            else:
                self.model = model
            for name, got in zip(names, self.on_cores(call)):
                if got[0] == "ok":
                    got = ("ok", normalize(got[1]))
                if expected[0] == "error" and got[0] == "error":
                    assert got[1] == expected[1], f"{what} on {name}: {got}, the model says {expected}"
                    if expected[2] is not None:
                        assert expected[2] in got[2], f"{what} on {name}: {got[2]!r} should say {expected[2]!r}"
                else:
                    assert got == expected, f"{what} on {name}: {got}, the model says {expected}"
            return expected

        def run_of(self, iid: str, kind: str):
            instance = self.model.instances.get(iid)
            current = instance.run if instance else 0
            return {"none": None, "current": current, "stale": max(current - 1, 0), "future": current + 1}[kind]

        def dispatch(self, message: dict):
            return lambda core: core.dispatch(message, rc.Session())

        # -- instance operations --------------------------------------------------------------------

        @initialize(started=st.lists(st.sampled_from(IDS), unique=True, max_size=3))
        def start_some(self, started):
            for iid in started:
                self.start_instance(iid, TENANT, b"in" if iid == "i0" else b"")

        @rule(iid=st.sampled_from(IDS), tenant=st.sampled_from([TENANT] * 8 + [OTHER]),
              checkpoint_id=st.sampled_from([None, None, *CHECKPOINT_IDS]),
              run=st.sampled_from(["none"] * 5 + ["current", "stale", "future"]))
        def register(self, iid, tenant, checkpoint_id, run):
            run = self.run_of(iid, run)
            self.step(f"register {iid}", lambda m: m.register(iid, tenant, checkpoint_id, run, self.now),
                      self.dispatch({"op": "register_instance", "instance_id": iid, "tenant_id": tenant,
                                     "checkpoint_id": checkpoint_id, "run": run}))

        @rule(iid=st.sampled_from(IDS))
        def register_plainly(self, iid):
            """The common case, twice as likely: the instance's own process registers."""
            self.register(iid, TENANT, None, "none")

        @rule(iid=st.sampled_from(IDS), checkpoint_id=st.sampled_from(CHECKPOINT_IDS),
              run=st.sampled_from(["current", "none", "current", "stale", "future"]))
        def checkpoint(self, iid, checkpoint_id, run):
            run, state = self.run_of(iid, run), f"{checkpoint_id}@{self.now}".encode()
            self.step(f"checkpoint {iid}", lambda m: m.checkpoint(iid, checkpoint_id, state, run, self.now),
                      self.dispatch({"op": "checkpoint", "instance_id": iid, "checkpoint_id": checkpoint_id,
                                     "state": state, "run": run}))

        @rule(iid=st.sampled_from(IDS), checkpoint_id=st.sampled_from(CHECKPOINT_IDS),
              duration=st.sampled_from([0, 5000, 8000]),
              run=st.sampled_from(["none", "current", "current", "stale"]))
        def sleep(self, iid, checkpoint_id, duration, run):
            run = self.run_of(iid, run)
            try:  # a replayed sleep with a little left is held inline: the clock moves to its end first
                answer = copy.deepcopy(self.model).sleep(iid, checkpoint_id, b"", duration, run, self.now)
                if not answer["suspended"] and answer["wake_at_ms"] > self.now:
                    self.now = answer["wake_at_ms"]
            except Refused:
                pass
            state = f"{checkpoint_id}@{self.now}".encode()
            self.step(f"sleep {iid}", lambda m: m.sleep(iid, checkpoint_id, state, duration, run, self.now),
                      self.dispatch({"op": "sleep", "instance_id": iid, "checkpoint_id": checkpoint_id,
                                     "state": state, "duration_ms": duration, "run": run}))

        event_types = st.sampled_from(["heartbeat", "heartbeat", "heartbeat", "custom", "suspended", "completed",
                                       "failed"])

        def event_message(self, iid, event_type, run):
            return {"instance_id": iid, "event_type": event_type, "payload": EVENT_PAYLOADS.get(event_type),
                    "subtype": EVENT_SUBTYPES.get(event_type), "run": self.run_of(iid, run)}

        @rule(iid=st.sampled_from(IDS), event_type=event_types,
              run=st.sampled_from(["none", "current", "current", "stale", "future"]))
        def event(self, iid, event_type, run):
            message = self.event_message(iid, event_type, run)
            self.step(f"{event_type} event {iid}", lambda m: m.event(iid, event_type, message["run"], self.now)
                      or {"accepted": True}, self.dispatch({"op": "instance_event", **message}))

        @rule(events=st.lists(st.tuples(st.sampled_from(IDS), event_types,
                                        st.sampled_from(["none", "current", "current", "stale"])),
                              min_size=1, max_size=3))
        def event_batch(self, events):
            messages = [self.event_message(*event) for event in events]
            self.step("event batch", lambda m: m.events([(e["instance_id"], e["event_type"], e["run"])
                                                          for e in messages], self.now),
                      self.dispatch({"op": "instance_event_batch", "events": messages}))

        @rule(iid=st.sampled_from(IDS), run=st.sampled_from(["none", "current", "stale"]))
        def poll_signals(self, iid, run):
            run = self.run_of(iid, run)
            self.step(f"poll_signals {iid}", lambda m: m.poll_signals(iid, run),
                      self.dispatch({"op": "poll_signals", "instance_id": iid, "run": run}))

        @rule(iid=st.sampled_from(IDS), signal_type=st.sampled_from(rc.SIGNAL_TYPES), acknowledged=st.booleans(),
              run=st.sampled_from(["none", "current", "current", "stale"]))
        def signal_ack(self, iid, signal_type, acknowledged, run):
            run = self.run_of(iid, run)
            self.step(f"signal_ack {signal_type} {iid}",
                      lambda m: m.signal_ack(iid, signal_type, acknowledged, run, self.now),
                      self.dispatch({"op": "signal_ack", "instance_id": iid, "signal_type": signal_type,
                                     "acknowledged": acknowledged, "run": run}))

        # -- operator operations --------------------------------------------------------------------

        @rule(iid=st.sampled_from(IDS), signal_type=st.sampled_from(["pause", "resume", "pause", "resume", "cancel"]))
        def send_signal(self, iid, signal_type):
            self.step(f"send_signal {signal_type} {iid}", lambda m: m.send_signal(iid, signal_type, self.now),
                      self.dispatch({"op": "send_signal", "instance_id": iid, "signal_type": signal_type}))

        @rule(iid=st.sampled_from(IDS), tenant=st.sampled_from([TENANT] * 8 + [OTHER]),
              input=st.sampled_from([b"", b"in"]))
        def start_instance(self, iid, tenant, input):
            self.step(f"start_instance {iid}", lambda m: m.start(iid, tenant, input, self.now),
                      self.dispatch({"op": "start_instance", "instance_id": iid, "tenant_id": tenant,
                                     "input": input}))

        # -- the scheduler ----------------------------------------------------------------------------

        @rule()
        def claim_launches(self):
            expected = self.step("claim_launches", lambda m: m.claim_launches(self.now),
                                 lambda core: core.claim_launches(),
                                 lambda claims: sorted(claims, key=lambda claim: claim["instance_id"]))
            for claim in expected[1]:
                pid = next(self.pids)
                self.claims.append({"claim": claim, "pid": pid})
                self.model.instances[claim["instance_id"]].events.append(("launched", None))
                recorded = self.on_cores(lambda core: core.record_launch(claim, pid))
                assert all(result[0] == "ok" for result in recorded), recorded

        @precondition(lambda self: self.claims)
        @rule(which=st.integers(0, 7), code=st.sampled_from([0, 1]))
        def launch_ended(self, which, code):
            launch = self.claims.pop(which % len(self.claims))
            claim, pid = launch["claim"], launch["pid"]
            self.step(f"still_launching {claim['instance_id']}", lambda m: m.still_launching(claim),
                      lambda core: core.still_launching(claim))
            self.step(f"launch of {claim['instance_id']} (run {claim['run']}) ended",
                      lambda m: m.launch_ended(claim, self.now),
                      lambda core: core.launch_ended(claim, pid, code, f"exited with code {code}"))

        @rule()
        def recover_silent(self):
            self.step("recover_silent", lambda m: m.recover_silent(self.now), lambda core: core.recover_silent(),
                      lambda recovered: [tuple(item) for item in recovered])

        @rule(ms=st.sampled_from([1000, 1, 100, 500, 999, 1001, 2000, 5000, 8000]))
        def advance_clock(self, ms):
            self.now += ms

        # -- after every step -------------------------------------------------------------------------

        @invariant()
        def capacity_is_kept(self):
            assert self.model.busy(self.now) <= MAX_BUSY

        @invariant()
        def stored_state_matches(self):
            states = [future.result() for future in [storage.read(stored_state) for storage in storages]]
            expected = {iid: instance.view() for iid, instance in self.model.instances.items()}
            for name, state in zip(names, states):
                got = {iid: model_view(stored) for iid, stored in state.items()}
                for iid in sorted(set(got) | set(expected)):
                    assert got.get(iid) == expected.get(iid), (
                        f"instance {iid} on {name}:\n  stored {got.get(iid)}\n  model  {expected.get(iid)}")
            for name, state in zip(names[1:], states[1:]):
                assert state == states[0], f"{names[0]} and {name} differ:\n  {states[0]}\n  {state}"

    return Lifecycle


@pytest.fixture
def storages(tmp_path, request):
    """SQLite, and PostgreSQL when TEST_DATABASE_URL is set (one schema for the whole test: the machine empties
    the tables before each example)."""
    urls = [f"sqlite:///{tmp_path / 'model.db'}"]
    if TEST_DATABASE_URL:  # else the model runs against SQLite alone
        urls.append(request.getfixturevalue("postgres_url"))
    opened = []
    try:
        for url in urls:
            opened.append(rc.open_storage(url, synchronous="NORMAL"))
        yield opened
    finally:
        for storage in opened:
            storage.close()


# RUNTARA_MODEL_EXAMPLES=2000 (with --timeout 900) searches deeper than the bounded default.
EXAMPLES = int(os.environ.get("RUNTARA_MODEL_EXAMPLES", 60))


def test_lifecycle_matches_the_model(storages):
    run_state_machine_as_test(lifecycle_machine(storages), settings=settings(
        max_examples=EXAMPLES, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


# Sequences the search found (or that it reaches too rarely for the bounded run), replayed on every run.
SEQUENCES = {
    # Two claims of one launch-pending instance: the first one's lease ran out, a second claim took the launch
    # over, then the first process exited without registering. Its exit must not be charged to the second
    # launch (issue 12: "an exit is never charged to another launch"; the launched process "finds its slot
    # reserved"), but launch_ended reads the instance's launch_attempts (2, the second claim's) and fails the
    # instance "launch failed 2 times" while the second process is still starting (with more attempts allowed,
    # it ends the second claim's lease instead, so that process can get OVERLOADED).
    "stale_claim_exit": [
        ("start_instance", dict(iid="i0", tenant=TENANT, input=b"")),
        ("claim_launches", {}),
        ("advance_clock", dict(ms=8000)),  # past the lease (the launch timeout and its grace)
        ("claim_launches", {}),
        ("launch_ended", dict(which=0, code=1)),
    ],
    # A pause acknowledged by a run that began after its wake time (the row keeps sleep_until in the past)
    # leaves the instance suspended with a past wake time and no pending pause: not paused, due at once, so
    # the scheduler claims it and a registration is admitted with no resume.
    "acknowledged_pause_keeps_a_past_wake_time": [
        ("register_plainly", dict(iid="i0")),
        ("sleep", dict(iid="i0", checkpoint_id="a", duration=5000, run="current")),
        ("advance_clock", dict(ms=5000)),
        ("register_plainly", dict(iid="i0")),
        ("send_signal", dict(iid="i0", signal_type="pause")),
        ("signal_ack", dict(iid="i0", signal_type="pause", acknowledged=True, run="current")),
        ("claim_launches", {}),
        ("register_plainly", dict(iid="i0")),
    ],
    # The same through a pause sent to a dead (orphaned) run, which applies at once.
    "pause_of_a_dead_run_keeps_a_past_wake_time": [
        ("register_plainly", dict(iid="i0")),
        ("sleep", dict(iid="i0", checkpoint_id="a", duration=5000, run="current")),
        ("advance_clock", dict(ms=5000)),
        ("register_plainly", dict(iid="i0")),
        ("advance_clock", dict(ms=1001)),
        ("recover_silent", {}),
        ("send_signal", dict(iid="i0", signal_type="pause")),
        ("advance_clock", dict(ms=1000)),
        ("claim_launches", {}),
        ("register_plainly", dict(iid="i0")),
    ],
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_sequence_matches_the_model(storages, name):
    machine = lifecycle_machine(storages)()
    try:
        machine.stored_state_matches()
        for rule_name, arguments in SEQUENCES[name]:
            getattr(machine, rule_name)(**arguments)
            machine.stored_state_matches()
            machine.capacity_is_kept()
    finally:
        machine.teardown()

"""Crash safety: kill things and count. Whatever the server acknowledged survives."""

import asyncio
import contextlib
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runtara_core as rc
from conftest import (ROOT, TEST_DATABASE_URL, free_udp_port, run, settings_for, spawn_server, start_server_process,
                      stop_server_process, wait_ready)
from test_wake import STEPPER

Tx = rc.Tx


async def retrying(call, *args, seen: list | None = None):
    """Call until the server answers, as a workflow kept alive through an outage would."""
    for _ in range(600):
        try:
            return await call(*args)
        except rc.ConnectionLost as exc:
            failure = exc
        except rc.RuntaraError as exc:
            if exc.code != "INTERNAL":  # only an outage of the database is worth waiting out
                raise
            failure = exc
        if seen is not None:
            seen.append(str(failure))
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server never came back: {failure}")


def impossible_states(storage) -> list:
    def find(tx):
        return tx.rows(
            "SELECT instance_id, status FROM instances WHERE"
            " (status IN ('completed', 'failed', 'cancelled')) <> (finished_at_ms IS NOT NULL)"
            " OR (status <> 'pending' AND started_at_ms IS NULL)"
            " OR (checkpoint_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM checkpoints c"
            "     WHERE c.instance_id = instances.instance_id AND c.checkpoint_id = instances.checkpoint_id))")
    return storage.read(find).result()


class Load:
    """Instances that each save `steps` checkpoints of random bytes and complete, recording every
    state the server acknowledged. `patience` is how long a request waits for its answer."""

    def __init__(self, server_addr: str, instances: int, steps: int, patience: float):
        self.server_addr, self.instances, self.steps, self.patience = server_addr, instances, steps, patience
        self.acknowledged: dict[tuple[str, str], bytes] = {}
        self.failures: list[str] = []

    async def worker(self, n: int) -> None:
        instance = rc.Instance(f"w-{n}", "t", server_addr=self.server_addr, heartbeat_interval_ms=0, env={})
        instance.transport.REQUEST_TIMEOUT_S = instance.transport.CONNECT_TIMEOUT_S = self.patience
        await retrying(instance.register, seen=self.failures)
        for step in range(self.steps):
            state = os.urandom(random.randint(1, 4096))
            result = await retrying(instance.checkpoint, f"s-{step}", state, seen=self.failures)
            # After a lost answer the retry finds the checkpoint saved: what the server kept is what counts.
            self.acknowledged[(instance.instance_id, f"s-{step}")] = result.state if result.found else state
        try:
            await retrying(instance.completed, b"done", seen=self.failures)
        except rc.InvalidState:  # the answer to the first attempt was lost, and it had completed
            assert (await retrying(instance.status))["status"] == "completed"
        await instance.close()

    async def until(self, count: int) -> None:
        while len(self.acknowledged) < count:
            await asyncio.sleep(0.01)

    def run_with(self, chaos):
        async def everything():
            await asyncio.gather(chaos(), *(self.worker(n) for n in range(self.instances)))
        run(everything())

    def verify(self, database_url: str) -> None:
        with rc.open_storage(database_url) as storage:
            for (instance_id, checkpoint_id), state in self.acknowledged.items():
                assert storage.read(Tx.get_checkpoint, instance_id, checkpoint_id).result() == state
            assert storage.read(Tx.count_instances, status="completed").result() == self.instances
            assert storage.read(Tx.count_checkpoints).result() == self.instances * self.steps
            assert impossible_states(storage) == []


def test_server_killed_while_32_instances_checkpoint(database_url, tmp_path):
    port = free_udp_port()
    server = spawn_server(database_url, tmp_path, port)
    run(wait_ready(port, server))
    load = Load(f"127.0.0.1:{port}", instances=32, steps=25, patience=2)  # a dead server sends no close
    killed_after = []

    async def chaos():
        nonlocal server
        await load.until(200)
        server.kill()  # SIGKILL: no shutdown, no WAL checkpoint, transactions cut short
        server.wait()
        killed_after.append(len(load.acknowledged))
        await asyncio.sleep(0.5)
        server = spawn_server(database_url, tmp_path, port)
        await wait_ready(port, server)

    try:
        load.run_with(chaos)
    finally:
        stop_server_process(server)
    assert 200 <= killed_after[0] < 32 * 25 and load.failures  # the kill really hit the load
    load.verify(database_url)


def test_instances_killed_mid_workflow_never_redo_a_finished_step(server, tmp_path):
    script, log = tmp_path / "killable.py", tmp_path / "killable.log"
    script.write_text(STEPPER.format(root=str(ROOT), steps=40, pause=0.06))
    host, port = server.address
    env = {**os.environ, "RUNTARA_INSTANCE_ID": "victim", "RUNTARA_TENANT_ID": "t",
           "RUNTARA_SERVER_ADDR": f"{host}:{port}"}
    chance = random.Random(8)
    kills = 0
    while True:
        process = subprocess.Popen([sys.executable, str(script), str(log)], env=env, stderr=subprocess.PIPE)
        if kills < 5:
            time.sleep(chance.uniform(0.45, 0.75))
            if process.poll() is None:
                process.kill()
                process.wait()
                kills += 1
                continue
        assert process.wait(timeout=60) == 0, process.stderr.read()
        break
    lines = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    for n in range(40):
        acked = lines.index(f"acked {n}")
        assert f"run {n}" not in lines[acked:], f"step {n} ran again after it was acknowledged"
    assert kills == 5

    async def status():
        async with rc.Client(f"{host}:{port}", env={}) as operator:
            return await operator.get_instance_status("victim")
    assert run(status())["status"] == "completed"


def _postgres_cluster() -> list[str] | None:
    if not TEST_DATABASE_URL or not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql"):
        return None
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".") if p.isdigit()])[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def _postgres_up() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0


@pytest.mark.skipif(_postgres_cluster() is None, reason="needs TEST_DATABASE_URL and a local pg_ctlcluster")
def test_postgresql_restart_during_load(postgres_url):
    cluster = _postgres_cluster()
    server = rc.ServerThread(settings_for(postgres_url)).start()
    load = Load("%s:%d" % server.address, instances=8, steps=40, patience=rc.QuicTransport.REQUEST_TIMEOUT_S)

    async def chaos():
        await load.until(60)
        await asyncio.to_thread(subprocess.run, cluster + ["stop", "-m", "fast"], check=True)
        for _ in range(200):  # a request waits up to the pool's 5 s timeout before it fails
            if load.failures:
                break
            await asyncio.sleep(0.1)
        down_errors = len(load.failures)
        await asyncio.sleep(1)
        await asyncio.to_thread(subprocess.run, cluster + ["start"], check=True)
        assert down_errors > 0  # requests failed while it was down

    try:
        load.run_with(chaos)
    finally:
        if not _postgres_up():
            subprocess.run(cluster + ["start"])
        server.stop()
    assert any("PostgreSQL is unavailable" in failure for failure in load.failures), load.failures[:5]
    load.verify(postgres_url)  # and the same server process carried on: it was never restarted


def test_sqlite_waits_out_another_writer(tmp_path):
    path = tmp_path / "locked.db"
    server = rc.ServerThread(settings_for(f"sqlite:///{path}")).start()
    holder = subprocess.Popen([sys.executable, "-c", "import apsw, sys, time\n"
                               "c = apsw.Connection(sys.argv[1]); c.execute('BEGIN IMMEDIATE')\n"
                               "print('locked', flush=True); time.sleep(3); c.execute('COMMIT')", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        async def write():
            async with rc.Instance("patient", "t", server_addr="%s:%d" % server.address, heartbeat_interval_ms=0,
                                   env={}) as instance:
                return await instance.checkpoint("c", b"waited")
        started = time.monotonic()
        assert run(write()).found is False
        assert time.monotonic() - started >= 2.5  # it waited for the lock instead of failing
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        server.stop()
    with rc.open_storage(f"sqlite:///{path}") as storage:
        assert storage.read(Tx.get_checkpoint, "patient", "c").result() == b"waited"


def test_sqlite_disk_full_then_space_returns(tmp_path):
    url = f"sqlite:///{tmp_path / 'small.db'}"
    limit = 800_000  # bytes any file of the server may reach: the disk "fills up" there
    port, process = start_server_process(url, tmp_path, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
    acknowledged = {}

    async def scenario():
        async with rc.Instance("filler", "t", server_addr=f"127.0.0.1:{port}", heartbeat_interval_ms=0,
                               env={}) as instance, rc.Client(f"127.0.0.1:{port}", env={}) as operator:
            for n in range(200):
                state = os.urandom(16_384)
                try:
                    await instance.checkpoint(f"c-{n}", state)
                except rc.RuntaraError as exc:
                    assert exc.code == "INTERNAL" and "SQLite write failed" in str(exc), str(exc)
                    assert "nothing of this request was saved" in str(exc)
                    break
                acknowledged[f"c-{n}"] = state
            else:
                raise AssertionError("the disk never filled up")
            with pytest.raises(rc.RuntaraError):  # still full
                await instance.checkpoint("more", os.urandom(16_384))
            for checkpoint_id, state in acknowledged.items():  # reads keep working
                assert await instance.get_checkpoint(checkpoint_id) == state
            assert (await operator.list_checkpoints("filler"))["total_count"] == len(acknowledged)
            assert (await operator.health_check())["healthy"] is True
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            for n in range(10):  # space is back: writes recover without a restart
                state = os.urandom(16_384)
                assert (await instance.checkpoint(f"after-{n}", state)).found is False
                acknowledged[f"after-{n}"] = state
            await instance.completed()

    try:
        run(scenario())
    finally:
        stop_server_process(process)
    assert len(acknowledged) > 20
    with rc.open_storage(url) as storage:
        for checkpoint_id, state in acknowledged.items():
            assert storage.read(Tx.get_checkpoint, "filler", checkpoint_id).result() == state
        assert impossible_states(storage) == []


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding: a database that hangs (SIGSTOPped, a dead network
    path) without closing anything."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.frozen = target, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():  # hold the bytes: nobody answers, nobody closes
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


HANGING = """
import sys, time
sys.path.insert(0, {root!r})
import runtara_core as rc
rc.Storage.CLOSE_WAIT_S = 1.0
storage = rc.open_storage({url!r})
storage.write(rc.Tx.create_instance, "before", "t", rc.now_ms()).result(timeout=10)
print("ready", flush=True)
sys.stdin.readline()  # the database hangs now
in_flight = [storage.read(rc.Tx.count_instances)]
if {write!r}:
    in_flight.append(storage.write(rc.Tx.create_instance, "during", "t", rc.now_ms()))
time.sleep(0.5)
started = time.monotonic()
storage.close()
print("closed in", round(time.monotonic() - started), "s; answered:", any(f.done() for f in in_flight), flush=True)
"""


@pytest.mark.parametrize("write", [False, True])
def test_a_hung_postgresql_never_keeps_the_process_from_ending(postgres_url, write):
    """With PostgreSQL hung, SIGTERM logged "shutting down" and the server never exited: closing the storage
    waited for ever for the write in flight, and the interpreter's exit for the read in flight."""
    from urllib.parse import urlsplit

    parts = urlsplit(postgres_url)
    proxy = FreezingProxy((parts.hostname, parts.port or 5432))
    url = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    process = subprocess.Popen([sys.executable, "-c", HANGING.format(root=str(ROOT), url=url, write=write)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        proxy.frozen.set()
        process.stdin.write("\n")
        process.stdin.flush()
        out, errors = process.communicate(timeout=30)  # the process ends, its daemons with it
        assert out == "closed in 1 s; answered: False\n", out + errors
        assert "did not answer the reads in flight" in errors, errors
        assert ("did not finish the writes in flight within 1 s" in errors) == write, errors
    finally:
        process.kill()
        proxy.close()

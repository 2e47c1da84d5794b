"""The SDK: durable steps, signals, reconnects, environment, and the embedded backend."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import runtara_core as rc
from conftest import addr, free_udp_port, run, settings_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["quic", "embedded"])
def connect(request, database_url):
    """Makes Instances and Clients over QUIC to a real server, or embedded in this process."""
    if request.param == "quic":
        server = request.getfixturevalue("server")

        def make(cls, *args, **options):
            return cls(*args, server_addr=addr(server), env={}, **options)
    else:
        storage = rc.open_storage(database_url)
        request.addfinalizer(storage.close)
        core = rc.Core(storage, settings_for(database_url))

        def make(cls, *args, **options):
            return cls(*args, transport=rc.EmbeddedTransport(core), env={}, **options)
    return make


def test_durable_steps_run_once_and_replay_their_results(connect):
    runs = []

    async def workflow():
        async with connect(rc.Instance, "wf", "t", heartbeat_interval_ms=0) as inst:
            @inst.durable("fetch")
            async def fetch():
                runs.append("fetch")
                return {"items": [1, 2], "raw": b"\x00\xff"}

            @inst.durable()
            def double(n):
                runs.append(f"double {n}")
                return n * 2

            data = await fetch()
            doubled = [await double(n) for n in data["items"]]
            return data, doubled

    first = run(workflow())
    second = run(workflow())
    assert first == second == ({"items": [1, 2], "raw": b"\x00\xff"}, [2, 4])
    assert runs == ["fetch", "double 1", "double 2"]  # the replay ran nothing again


def test_retries_with_backoff_are_reported(connect):
    attempts = []

    async def workflow():
        async with connect(rc.Instance, "retry", "t", heartbeat_interval_ms=0) as inst:
            @inst.durable("flaky", retries=3, backoff_ms=20)
            async def flaky():
                attempts.append(time.monotonic())
                if len(attempts) < 3:
                    raise ConnectionResetError("bank hung up")
                return "paid"

            assert await flaky() == "paid"
            async with connect(rc.Client) as operator:
                return (await operator.list_events("retry", event_type="retry"))["events"]

    events = run(workflow())
    assert len(attempts) == 3 and attempts[2] - attempts[1] >= 0.035  # 20 ms, then 40 ms
    assert [msgpack.unpackb(e["payload"])["attempt_number"] for e in events] == [2, 1]
    assert "ConnectionResetError: bank hung up" in msgpack.unpackb(events[0]["payload"])["error_message"]


def test_an_exception_fails_the_instance(connect):
    async def workflow():
        async with connect(rc.Instance, "doomed", "t", heartbeat_interval_ms=0) as inst:
            @inst.durable("boom", retries=1, backoff_ms=1)
            async def boom():
                raise ValueError("no such account")
            await boom()

    with pytest.raises(ValueError):
        run(workflow())

    async def check():
        async with connect(rc.Client) as operator:
            return await operator.get_instance_status("doomed")
    status = run(check())
    assert status["status"] == "failed" and status["error"] == "ValueError: no such account"


class Receipt:
    pass


@pytest.mark.parametrize("result, says", [(Receipt(), "returned a Receipt, which cannot be saved"),
                                          ({1: "a"}, "returned a dict, which cannot be saved"),
                                          ({(1, 2): 3}, "returned a dict, which cannot be saved"),
                                          (object(), "returned an object, which cannot be saved")])
def test_a_step_result_that_cannot_be_saved_fails_naming_the_step_and_the_type(connect, result, says):
    """A dict with int keys was saved, and then could not be read back: the step failed naming neither itself
    nor the type, and every replay or fork of the instance failed the same way."""
    async def workflow():
        async with connect(rc.Instance, "odd-result", "t", heartbeat_interval_ms=0) as inst:
            @inst.durable("issue-receipt")
            async def issue():
                return result
            await issue()

    with pytest.raises(TypeError, match=f"step issue-receipt {says}"):
        run(workflow())

    async def check():
        async with connect(rc.Client) as operator:
            return await operator.get_instance_status("odd-result"), await operator.list_checkpoints("odd-result")
    status, checkpoints = run(check())
    assert status["status"] == "failed" and "issue-receipt" in status["error"] and checkpoints["total_count"] == 0


@pytest.mark.parametrize("signal_type, status, exception", [("cancel", "cancelled", rc.Cancelled),
                                                            ("pause", "suspended", rc.Paused)])
def test_durable_steps_obey_cancel_and_pause(connect, signal_type, status, exception):
    ran = []

    async def workflow():
        async with connect(rc.Client) as operator:
            async with connect(rc.Instance, "obedient", "t", heartbeat_interval_ms=0) as inst:
                @inst.durable("one")
                async def one():
                    ran.append("one")
                    await operator.send_signal("obedient", signal_type)

                @inst.durable("two")
                async def two():
                    ran.append("two")

                try:
                    await one()
                    await two()
                except exception:
                    ran.append("stopped")
                    raise
            return await operator.get_instance_status("obedient")

    assert run(workflow())["status"] == status
    assert ran == ["one", "stopped"]


def test_sleep_suspension_is_absorbed_by_the_context_manager(connect, database_url):
    async def workflow():
        async with connect(rc.Instance, "sleepy", "t", heartbeat_interval_ms=0) as inst:
            await inst.sleep("nap", 10 * 60 * 1000)
            raise AssertionError("not reached")
        async with connect(rc.Client) as operator:
            return await operator.get_instance_status("sleepy")
    assert run(workflow())["status"] == "suspended"


def test_background_heartbeat(connect):
    async def workflow():
        async with connect(rc.Instance, "beating", "t", heartbeat_interval_ms=40) as inst:
            first = (await inst.status())["heartbeat_at_ms"]
            await asyncio.sleep(0.2)
            return first, (await inst.status())["heartbeat_at_ms"]
    first, later = run(workflow())
    assert later - first >= 80


def test_signal_polls_are_rate_limited(connect):
    async def workflow():
        async with connect(rc.Client) as operator:
            async with connect(rc.Instance, "poller", "t", heartbeat_interval_ms=0, poll_interval_ms=60_000) as inst:
                assert "signal" not in await inst.poll_signals()
                await operator.send_signal("poller", "pause")
                assert "signal" not in await inst.poll_signals()  # answered from the last poll
                assert (await inst.poll_signals(force=True))["signal"]["signal_type"] == "pause"
    run(workflow())


def test_instance_reads_its_environment(server):
    env = {"RUNTARA_INSTANCE_ID": "from-env", "RUNTARA_TENANT_ID": "tenant-env",
           "RUNTARA_SERVER_ADDR": addr(server).replace("127.0.0.1", "localhost"),
           "RUNTARA_HEARTBEAT_INTERVAL_MS": "0", "RUNTARA_SKIP_CERT_VERIFICATION": "1"}

    async def workflow():
        async with rc.Instance(env=env) as inst:
            assert inst.heartbeat_interval_ms == 0 and inst.transport.skip_cert_verification
            await inst.checkpoint("c", b"x")
        async with rc.Instance(env={**env, "RUNTARA_CHECKPOINT_ID": "c"}) as again:
            return again.registration
    assert run(workflow())["resumed"] is True


def test_instance_without_ids_is_a_clear_error():
    with pytest.raises(ValueError, match="RUNTARA_INSTANCE_ID"):
        rc.Instance(env={})


def test_lost_connection_fails_then_the_next_request_reconnects(database_url):
    settings = settings_for(database_url)
    settings.port = free_udp_port()

    async def workflow():
        server = await rc.Server(settings).start()
        inst = rc.Instance("phoenix", "t", server_addr=f"127.0.0.1:{settings.port}", heartbeat_interval_ms=0, env={})
        await inst.register()
        await inst.checkpoint("before", b"1")
        await server.stop()
        with pytest.raises(rc.ConnectionLost):
            await inst.checkpoint("during", b"2")
        server = await rc.Server(settings).start()
        try:
            assert (await inst.checkpoint("before", b"x")).state == b"1"
            assert (await inst.checkpoint("after", b"3")).found is False
        finally:
            await inst.close()
            await server.stop()
    run(workflow())


def test_connecting_to_nothing_is_a_clear_error():
    async def workflow():
        inst = rc.Instance("i", "t", server_addr=f"127.0.0.1:{free_udp_port()}", heartbeat_interval_ms=0, env={})
        inst.transport.CONNECT_TIMEOUT_S = 1
        with pytest.raises(rc.ConnectionLost, match="cannot connect to 127.0.0.1"):
            await inst.register()
        await inst.close()
    run(workflow())


def _serve(cwd, *args, env=None):
    environment = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "runtara_core.py"), "serve", *args], cwd=cwd,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(process, text, timeout=20):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if text in line:
            return "".join(seen)
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)}")


def test_serve_with_no_environment_uses_the_defaults_and_stops_cleanly(tmp_path):
    process = _serve(tmp_path)
    try:
        _wait_for(process, "listening on 127.0.0.1:8001")

        async def sleeper():
            async with rc.Instance("sleeper", "t", server_addr="127.0.0.1:8001", heartbeat_interval_ms=0,
                                   env={}) as inst:
                pending = asyncio.ensure_future(inst.sleep("nap", 15_000))
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)  # shut down while the sleep is in flight
                started = time.monotonic()
                with pytest.raises(rc.Overloaded, match="shutting down"):  # answered at once, not dropped
                    await pending
                return time.monotonic() - started
        assert run(sleeper()) < 3
        assert process.wait(timeout=20) == 0
        log = process.stdout.read()
        assert "stopped" in log and "Traceback" not in log
    finally:
        process.kill()
    assert (tmp_path / "runtara.db").exists()
    wal = tmp_path / "runtara.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at close
    assert (tmp_path / "runtara-key.pem").stat().st_mode & 0o777 == 0o600


def test_serve_reports_bad_settings_and_a_taken_port(tmp_path):
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        process = _serve(tmp_path, "--port", str(port))
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in output
    process = _serve(tmp_path, env={"RUNTARA_QUIC_PORT": "eighty"})
    output = process.communicate(timeout=30)[0]
    assert process.returncode != 0 and "eighty" in output
    process = _serve(tmp_path, "--database-url", "mongodb://x")
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "unsupported database URL" in output and "Traceback" not in output

"""serve --metrics (issue 17): a real HTTP client scrapes a running server after a scripted workload, on
SQLite and on PostgreSQL, and finds the counts the workload caused; the endpoint stays up while PostgreSQL
is down and says so."""

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import runtara_core as rc
from conftest import addr, run, settings_for
from test_faults import _postgres_cluster, _postgres_up

ROOT = Path(__file__).resolve().parent.parent

# One step; the first process dies after it (a crash the server must relaunch); then a durable sleep over the
# inline maximum (the instance is suspended, and launched again when it is due); then it completes.
WORKFLOW = '''
import asyncio, os, sys
sys.path.insert(0, {root!r})
import runtara_core as runtara

async def main():
    async with runtara.Instance(heartbeat_interval_ms=0) as instance:
        @instance.durable("one")
        async def one():
            return 1
        await one()
        if not os.path.exists({marker!r}):
            open({marker!r}, "w").close()
            os._exit(1)
        await instance.sleep("nap", 300)
        await instance.completed(b"done")

asyncio.run(main())
'''


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(server: rc.ServerThread) -> dict:
    """{(name, ((label, value), ...)): value} of every sample /metrics gives."""
    host, port = server.server.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_scrape_finds_what_the_workload_did(database_url, tmp_path):
    script = tmp_path / "workflow.py"
    script.write_text(WORKFLOW.format(root=str(ROOT), marker=str(tmp_path / "crashed")))
    server = rc.ServerThread(settings_for(database_url, metrics_addr="0", sleep_inline_max_ms=0,
                                          wake_interval_ms=100, launch_command=f"{sys.executable} {script}")).start()
    try:
        async def workload():
            async with rc.Client(addr(server), env={}) as operator:
                await operator.start("m-1", "t")
                with pytest.raises(rc.InstanceNotFound):
                    await operator.send_signal("ghost", "cancel")
                assert (await operator.wait("m-1", timeout=60))["status"] == "completed"
                deadline = time.monotonic() + 30
                while True:  # the last process reports its end after it exits, a little after completing
                    seen = await asyncio.to_thread(scrape, server)  # while this client is connected
                    ended = sum(v for (name, _), v in seen.items() if name == "runtara_launches_total")
                    if ended >= 3 or time.monotonic() > deadline:
                        return seen
                    await asyncio.sleep(0.1)
        seen = run(workload())
    finally:
        server.stop()

    def value(name, **labels):
        return seen.get((name, tuple(sorted(labels.items()))), 0)
    assert value("runtara_requests_total", op="send_signal", outcome="INSTANCE_NOT_FOUND") == 1
    assert value("runtara_requests_total", op="start_instance", outcome="ok") == 1
    assert value("runtara_requests_total", op="register_instance", outcome="ok") == 3  # crashed, slept, completed
    assert value("runtara_requests_total", op="checkpoint", outcome="ok") >= 1
    assert value("runtara_request_duration_seconds_count", op="checkpoint") >= 1
    assert value("runtara_launches_total", workflow="default", outcome="registered") == 3
    assert value("runtara_launches_total", workflow="default", outcome="failed") == 0
    assert value("runtara_restarts_total") == 1
    assert value("runtara_wake_lag_seconds_count") == 1
    groups, writes = value("runtara_commit_group_size_count"), value("runtara_commit_group_size_sum")
    assert groups >= 1 and writes >= groups and value("runtara_commit_duration_seconds_count") == groups
    assert value("runtara_connections") >= 1
    assert value("runtara_database_up") == 1
    assert value("runtara_instances", status="completed") == 1 and value("runtara_instances", status="failed") == 0
    assert ("runtara_instances", (("status", "cancelled"),)) in seen  # every status, zeros too
    assert value("runtara_queue_depth") == 0


def test_metrics_are_off_unless_asked_and_a_bad_address_is_one_clear_error(tmp_path):
    with rc.ServerThread(settings_for(f"sqlite:///{tmp_path / 'x.db'}")) as server:
        assert server.server.metrics_address is None
    for bad in ("x", "host", "70000", "1.2.3.4:"):
        with pytest.raises(ValueError, match="metrics_addr must be PORT or HOST:PORT"):
            settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr=bad)
    done = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "serve", "--metrics", "nope",
                           "--database-url", f"sqlite:///{tmp_path / 'x.db'}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stderr == "error: --metrics must be PORT or HOST:PORT, not 'nope'\n"
    without_extra = ("import sys; sys.modules['prometheus_client'] = None; import runtara_core;"
                     f" runtara_core.main(['serve', '--metrics', '0', '--database-url', 'sqlite:///{tmp_path}/x.db'])")
    done = subprocess.run([sys.executable, "-c", without_extra], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "error: metrics (--metrics, RUNTARA_METRICS_ADDR) need prometheus-client: pip install"
        " 'runtara-core[metrics]'"], done.stderr
    assert rc.Settings(metrics_addr="[::1]:0").metrics_address == ("::1", 0)
    with pytest.raises(ValueError):
        rc.Settings(metrics_addr="\u0661\u0662\u0663").metrics_address  # Arabic-Indic digits are no port


def test_nothing_is_left_listening_when_the_start_fails_after_the_metrics_began(tmp_path):
    """A start that failed after /metrics was served (here: TLS files that do not exist) left its port
    listening and the database open."""
    port = free_tcp_port()
    settings = settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr=str(port))
    settings.tls_cert, settings.tls_key = str(tmp_path / "none.pem"), str(tmp_path / "none.key")  # past validation
    with pytest.raises(ValueError, match="cannot use the TLS certificate"):
        rc.ServerThread(settings).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free again
    with rc.ServerThread(settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr=str(port))):
        pass  # and the database was closed: it opens again


@pytest.mark.skipif(_postgres_cluster() is None, reason="needs TEST_DATABASE_URL and a local pg_ctlcluster")
def test_the_endpoint_stays_up_while_postgresql_is_down(postgres_url):
    cluster = _postgres_cluster()
    server = rc.ServerThread(settings_for(postgres_url, metrics_addr="0")).start()
    try:
        assert scrape(server)[("runtara_database_up", ())] == 1
        subprocess.run(cluster + ["stop", "-m", "fast"], check=True)
        time.sleep(rc.Metrics.REFRESH_S)  # the counts read last are kept that long
        started = time.monotonic()
        down = scrape(server)
        assert down[("runtara_database_up", ())] == 0 and time.monotonic() - started < 5
        assert not any(name == "runtara_instances" for name, _ in down)  # no counts it could not read
        assert ("runtara_requests_total", ()) not in down and ("runtara_restarts_total", ()) in down
        subprocess.run(cluster + ["start"], check=True)
        deadline = time.monotonic() + 60
        while scrape(server)[("runtara_database_up", ())] != 1:
            assert time.monotonic() < deadline, "the database never came back in the metrics"
            time.sleep(1)
    finally:
        if not _postgres_up():
            subprocess.run(cluster + ["start"])
        server.stop()


def test_idle_scrapers_hold_few_connections_and_never_starve_the_server(tmp_path, monkeypatch):
    """prometheus-client's server took a thread per connection and waited on each for ever: a thousand idle
    connections to the metrics port used every file descriptor, and the QUIC server then refused everyone."""
    monkeypatch.setattr(rc.Metrics, "SCRAPE_IDLE_S", 1.0)
    with rc.ServerThread(settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr="0")) as server:
        descriptors = len(list(Path("/proc/self/fd").iterdir()))
        idle = [socket.create_connection(server.server.metrics_address) for _ in range(200)]
        try:
            for connection in idle:
                connection.send(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            time.sleep(0.5)
            held = len(list(Path("/proc/self/fd").iterdir())) - descriptors - len(idle)
            assert held <= rc.Metrics.SCRAPERS + 2, held

            async def serve_one():
                async with rc.Client(addr(server), env={}) as operator:
                    await operator.start("still-served", "t")
            run(serve_one())
            time.sleep(1.5)  # the idle ones were closed
            assert scrape(server)[("runtara_requests_total", (("op", "start_instance"), ("outcome", "ok")))] == 1
        finally:
            for connection in idle:
                connection.close()


def test_frames_refused_before_any_operation_are_counted(tmp_path):
    """A frame refused as too large, malformed or stalled got its error answer but was never counted."""
    with rc.ServerThread(settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr="0",
                                      max_message_bytes=1000)) as server:
        async def bad():
            transport = rc.QuicTransport(*server.server.address)
            protocol = await transport._connection()
            for frame in (rc.FRAME_HEADER.pack(5000, rc.FRAME_REQUEST), rc.FRAME_HEADER.pack(1, 9) + b"\x80"):
                frame_type, answer = await protocol.send_request(frame)
                assert frame_type == rc.FRAME_ERROR
            await transport.close()
        run(bad())
        seen = scrape(server)
    assert seen[("runtara_requests_total", (("op", "unknown"), ("outcome", "FRAME_TOO_LARGE")))] == 1
    assert seen[("runtara_requests_total", (("op", "unknown"), ("outcome", "INVALID_REQUEST")))] == 1


def test_restarts_count_deaths_and_workflow_labels_are_bounded(tmp_path):
    """A relaunch that failed was counted as another restart; and every workflow name a client sent became a
    series of its own."""
    settings = settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr="0", workflow_commands={"known": "true"})
    with rc.ServerThread(settings) as server:
        metrics = server.server.metrics
        died = {"status": "running", "sleep_until_ms": None}
        metrics.claimed([{**died, "launch_attempts": 1}], rc.now_ms())
        metrics.claimed([{**died, "launch_attempts": 2}], rc.now_ms())  # the same death, launched again
        for workflow in ("known", "default", "wf-1", "wf-2"):
            metrics.launch_ended(workflow, "failed")
        seen = scrape(server)
    assert seen[("runtara_restarts_total", ())] == 1
    launches = {labels: value for (name, labels), value in seen.items() if name == "runtara_launches_total"}
    assert launches == {(("outcome", "failed"), ("workflow", "known")): 1,
                        (("outcome", "failed"), ("workflow", "default")): 1,
                        (("outcome", "failed"), ("workflow", "other")): 2}


def test_a_slow_scraper_is_closed_at_its_deadline_quietly(tmp_path, monkeypatch, capfd):
    """The 5 s limit was per read: eight clients sending a byte every few seconds kept every scrape out for as
    long as they liked; and each connection that timed out wrote a traceback to stderr, whatever the log level."""
    monkeypatch.setattr(rc.Metrics, "SCRAPE_IDLE_S", 1.0)
    with rc.ServerThread(settings_for(f"sqlite:///{tmp_path / 'x.db'}", metrics_addr="0")) as server:
        slow = [socket.create_connection(server.server.metrics_address) for _ in range(rc.Metrics.SCRAPERS)]
        started = time.monotonic()
        try:
            for connection in slow:
                connection.send(b"GET /metrics HTTP/1.1\r\nX-a: ")
            while time.monotonic() - started < 2.5:  # a byte each 0.3 s: never idle for a whole second
                for connection in slow:
                    with __import__("contextlib").suppress(OSError):
                        connection.send(b"a")
                time.sleep(0.3)
            assert scrape(server)[("runtara_database_up", ())] == 1  # their slots were freed at their deadline
        finally:
            for connection in slow:
                connection.close()
    assert "Traceback" not in capfd.readouterr().err

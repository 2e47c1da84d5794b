"""The README's worked example, run as written: killed with SIGKILL, started again, cancelled, paused."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtara_core as rc
from conftest import addr, free_udp_port, run, stop_server_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workflow_file(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# workflow\.py\n.*?)```", readme, re.S)[1]
    path = tmp_path / "workflow.py"
    path.write_text(code)
    return path


class Workflow:
    def __init__(self, path, server, instance_id):
        self.path, self.server, self.instance_id = path, server, instance_id

    def start(self):
        env = {**os.environ, "RUNTARA_INSTANCE_ID": self.instance_id, "RUNTARA_TENANT_ID": "shop",
               "RUNTARA_SERVER_ADDR": addr(self.server), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([sys.executable, str(self.path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run_until(self, text):
        process = self.start()
        seen = ""
        deadline = time.monotonic() + 30
        while text not in seen and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            seen += line
        assert text in seen, seen + process.stderr.read()
        return process, seen

    def status(self):
        async def ask():
            async with rc.Client(addr(self.server), env={}) as operator:
                return await operator.get_instance_status(self.instance_id)
        return run(ask())

    def signal(self, signal_type):
        async def send():
            async with rc.Client(addr(self.server), env={}) as operator:
                await operator.send_signal(self.instance_id, signal_type)
        run(send())


def test_killed_workflow_resumes_without_redoing_finished_steps(server, workflow_file):
    flow = Workflow(workflow_file, server, "order-42")
    process, seen = flow.run_until("charging")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert "fetching orders" in seen
    assert flow.status()["status"] == "running"  # killed: nobody said otherwise

    again = flow.start()
    output, errors = again.communicate(timeout=60)
    assert again.returncode == 0, errors
    assert "fetching orders" not in output  # the finished step was not run again
    assert "charging [12, 30]" in output and "notifying: charged 42" in output and "done: charged 42" in output
    status = flow.status()
    assert status["status"] == "completed" and status["output"] == b"charged 42"


def test_cancelled_workflow_stops_after_its_step(server, workflow_file):
    flow = Workflow(workflow_file, server, "order-cancel")
    process, _ = flow.run_until("fetching orders")
    flow.signal("cancel")
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert "charging" not in output
    assert flow.status()["status"] == "cancelled"
    rerun = flow.start()
    _, errors = rerun.communicate(timeout=60)
    assert rerun.returncode != 0 and "cancelled; it cannot run again" in errors


def test_paused_workflow_resumes_from_its_checkpoint(server, workflow_file):
    flow = Workflow(workflow_file, server, "order-pause")
    process, _ = flow.run_until("fetching orders")
    flow.signal("pause")
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0 and "charging" not in output, errors
    assert flow.status()["status"] == "suspended"
    flow.signal("resume")
    resumed = flow.start()
    output, errors = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, errors
    assert "fetching orders" not in output and "done: charged 42" in output
    assert flow.status()["status"] == "completed"


def readme_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if containing in block)


def test_walkthrough_starts_waits_and_recovers_a_killed_run(tmp_path, workflow_file, database_url):
    """The README's shell walk-through, run as written by bash: `serve --launch`, `start --wait`, a SIGKILLed
    run that the server relaunches by itself, `wait`, `events`; then its Python `start`/`wait` example."""
    (tmp_path / "runtara_core.py").symlink_to(ROOT / "runtara_core.py")
    port = free_udp_port()
    env = {**os.environ, "RUNTARA_QUIC_PORT": str(port), "RUNTARA_DATABASE_URL": database_url,
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    walk = subprocess.run(["bash", "-c", readme_block("sh", 'serve --launch "python3 workflow.py"')], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=100)
    assert walk.returncode == 0, walk.stdout + walk.stderr
    out = walk.stdout
    assert out.count("fetching orders") == 2, out + walk.stderr  # order-42, and order-43 once: not after the kill
    assert out.count("charging") == 3 and out.count("done: charged 42") == 2, out
    assert out.count("charged 42\n") >= 4  # the two waits print the output too
    assert "restart" in out and "exited with code -9" in walk.stderr, out + walk.stderr

    python = readme_block("python", "operator.start(").replace("127.0.0.1:8001", f"127.0.0.1:{port}")
    server = subprocess.Popen([sys.executable, "runtara_core.py", "serve", "--launch", "python3 workflow.py"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run(wait_ready(port, server))
        example = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert example.returncode == 0 and example.stdout.strip() == "b'charged 42'", example.stdout + example.stderr
    finally:
        stop_server_process(server)


def saved(database_url: str, *checkpoints) -> bool:
    """Whether each (instance_id, checkpoint_id) is in the database (made by another process)."""
    try:
        with rc.open_storage(database_url, create=False, migrate=False) as storage:
            return all(storage.read(rc.Tx.get_checkpoint, *checkpoint).result() is not None
                       for checkpoint in checkpoints)
    except Exception:  # not created yet (no SQLite file; on PostgreSQL, no tables)
        return False


def test_embedding_example_survives_being_killed(tmp_path, database_url):
    """The README's edge runtime, as written (on PostgreSQL with its URL swapped in): killed with SIGKILL while
    an instance sleeps, started again, it finishes both instances without running a finished step again."""
    code = readme_block("python", "# edge.py").replace("sqlite:///edge.db", database_url)
    (tmp_path / "edge.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "edge.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not saved(database_url, ("reading-1", "settle"), ("report-1", "send")):  # reading-1 sleeps: kill it now
        assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    seen, _ = first.communicate(timeout=10)
    assert seen.count("measuring") == 1 and "sending all well" in seen and "reading-1 completed" not in seen, seen

    again = subprocess.run([sys.executable, "edge.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reading-1 completed" in again.stdout and "report-1 completed" in again.stdout, again.stdout
    assert "measuring" not in again.stdout and "sending" not in again.stdout, again.stdout


def test_single_embedded_instance_closes_the_database_it_owns(tmp_path, database_url, monkeypatch):
    """The README's one-instance example, as written: it completes, and with owns_transport=True closing the
    instance closes the database (SQLite leaves no WAL file behind); EmbeddedTransport.open honours RUNTARA_*."""
    code = readme_block("python", "# note.py").replace("sqlite:///edge.db", database_url)
    (tmp_path / "note.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "note.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([sys.executable, "note.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)  # the instance is completed: registering fails, and still closes it all
    assert again.returncode == 1 and "InvalidState" in again.stderr, again.stderr
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        assert path.exists() and not Path(f"{path}-wal").exists()

    async def check():
        monkeypatch.setenv("RUNTARA_MAX_CONCURRENT_INSTANCES", "7")
        transport = rc.EmbeddedTransport.open(database_url)
        assert transport.core.settings.max_concurrent_instances == 7
        async with rc.Client(transport=transport) as operator:  # a transport given is not the client's to close
            assert (await operator.get_instance_status("note-1"))["status"] == "completed"
        assert (await transport.request({"op": "get_instance_status", "instance_id": "note-1"}))["found"]
        await transport.close()
    run(check())

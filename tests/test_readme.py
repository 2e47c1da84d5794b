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
from conftest import addr, run

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

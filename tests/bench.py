"""runtara-core benchmark: every comparison in one run, so the ratios are fair.

    python tests/bench.py                       # the full table (needs the `bench` extra for DBOS)
    python tests/bench.py --instances 16 --skip-dbos
    python tests/bench.py --soak 600            # 10 minutes of 64 instances: memory and WAL over time

Each scenario runs the same workflow: N instances, each registering, saving K checkpoints of S bytes
one after another, and completing. Servers run as their own processes, so their CPU time is theirs.

1. ceiling   a bare aioquic echo server, driven by the SDK's own QUIC client code, same frames
2. quic      `runtara serve` on SQLite FULL, SQLite NORMAL and PostgreSQL, on uvloop when installed; SQLite FULL
             also on asyncio's own event loop, and with `--metrics` (what serving Prometheus metrics costs)
3. embedded  the same workflow in-process through the embedded backend (SQLite FULL)
4. dbos      DBOS steps of the same payload, SQLite system database in WAL mode, its own process

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import runtara_core as rc  # noqa: E402
import aioquic.asyncio  # noqa: E402,F401  (the SDK imports it at its first connect: not while a server's start is timed)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until_answering(port: int, deadline: float = 20.0) -> float:
    """Seconds until a server on `port` answers a health check. The port is watched until something binds it
    (every 5 ms), and only then asked: a QUIC probe of a port nobody holds costs its client a connect timeout
    and aioquic's closing period (0.6 s), which would be counted against the server."""
    import socket

    started = time.perf_counter()
    while time.perf_counter() - started < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # bound: the server is listening, or about to
                transport = rc.QuicTransport("127.0.0.1", port)
                try:
                    await transport.request({"op": "health_check"})
                    return time.perf_counter() - started
                except rc.RuntaraError:
                    pass
                finally:
                    await transport.close()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"nothing answered on port {port}")


class ServerProcess:
    """A server in its own process: runtara (`serve`) or the echo ceiling (`_echo`)."""

    def __init__(self, argv: list[str], port: int, folder: str):
        self.port = port
        self.log = Path(folder) / f"server-{port}.log"  # a pipe nobody reads would stall the server
        self.started = time.perf_counter()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(argv, cwd=folder, stderr=log)
        asyncio.run(until_answering(port))
        self.ready_s = time.perf_counter() - self.started  # from the process's start to its first answer

    @classmethod
    def runtara(cls, database_url: str, folder: str, *options: str) -> "ServerProcess":
        port = free_port()
        return cls([sys.executable, str(ROOT / "runtara_core.py"), "serve", "--port", str(port), "--database-url",
                    database_url, "--max-concurrent-instances", "5000", *options], port, folder)

    @classmethod
    def echo(cls, folder: str) -> "ServerProcess":
        port = free_port()
        return cls([sys.executable, __file__, "_echo", str(port), folder], port, folder)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=60)
        return self.log.read_text()


# -- the workload -------------------------------------------------------------------------------


async def workload(make_transport, instances: int, checkpoints: int, size: int, tag: str) -> dict:
    """N instances: register, K checkpoints of `size` bytes one after another, complete."""
    payload = os.urandom(size)
    latencies: list[float] = []
    workers = [rc.Instance(f"{tag}-{n}", "bench", transport=make_transport(), heartbeat_interval_ms=0, env={})
               for n in range(instances)]
    await asyncio.gather(*(w.register() for w in workers))

    async def run(worker):
        for k in range(checkpoints):
            started = time.perf_counter()
            await worker.checkpoint(f"c{k}", payload)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(run(w) for w in workers))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(w.completed() for w in workers))
    await asyncio.gather(*(w.close() for w in workers))
    await asyncio.gather(*(t.close() for t in {id(w.transport): w.transport for w in workers}.values()))
    return {"operations": instances * checkpoints, "seconds": elapsed, "latencies": latencies}


async def echo_workload(port: int, connections: int, round_trips: int, size: int) -> dict:
    """The same frames over the same client code, answered by an echo: the transport's ceiling."""
    frame = rc.encode_frame(rc.FRAME_REQUEST, {"op": "checkpoint", "instance_id": "bench", "checkpoint_id": "c0",
                                               "state": os.urandom(size)})
    transports = [rc.QuicTransport("127.0.0.1", port) for _ in range(connections)]
    protocols = await asyncio.gather(*(t._connection() for t in transports))
    latencies: list[float] = []

    async def run(protocol):
        for _ in range(round_trips):
            started = time.perf_counter()
            await protocol.send_request(frame)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(run(p) for p in protocols))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(t.close() for t in transports))
    return {"operations": connections * round_trips, "seconds": elapsed, "latencies": latencies}


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate, carrying every run's rate."""
    row = sorted(runs, key=lambda run: run["per_second"])[len(runs) // 2]
    return {**row, "runs_per_second": [round(run["per_second"]) for run in runs]}


def summarize(name: str, database: str, instances: int, result: dict, cpu: float | None = None,
              commits: int | None = None, loop: str = "asyncio") -> dict:
    operations, seconds = result["operations"], result["seconds"]
    return {"scenario": name, "database": database, "loop": loop, "instances": instances,
            "per_second": operations / seconds,
            "p50_ms": percentile(result["latencies"], 0.50) * 1000,
            "p99_ms": percentile(result["latencies"], 0.99) * 1000,
            "server_cpu_us": None if cpu is None else cpu / operations * 1e6,
            "commits_per_second": None if commits is None else commits / seconds}


# -- scenarios ----------------------------------------------------------------------------------


def run_ceiling(folder: str, instances: int, checkpoints: int, size: int) -> dict:
    server = ServerProcess.echo(folder)
    try:
        cpu = server.cpu()
        result = asyncio.run(echo_workload(server.port, instances, checkpoints, size))
        return summarize("ceiling (aioquic echo)", "-", instances, result, server.cpu() - cpu)
    finally:
        server.stop()


def run_quic(label: str, database_url: str, folder: str, instances: int, checkpoints: int, size: int, loop: str,
             *options: str) -> dict:
    server = ServerProcess.runtara(database_url, folder, "--loop", loop, *options)
    try:
        cpu = server.cpu()
        result = asyncio.run(workload(lambda: rc.QuicTransport("127.0.0.1", server.port), instances, checkpoints,
                                      size, f"quic-{instances}-{time.monotonic_ns()}"))
        cpu = server.cpu() - cpu
    finally:
        log = server.stop()
    found = re.findall(r"(\d+) writes? committed in (\d+) transactions?", log)
    writes, commits = map(int, found[-1]) if found else (0, 0)
    # Commits during the timed part, estimated from the server's totals (registrations and completions are
    # two more writes per instance).
    commits = commits * result["operations"] / max(writes, 1)
    return summarize("runtara over QUIC", label, instances, result, cpu, commits, loop)


def run_embedded(folder: str, instances: int, checkpoints: int, size: int) -> dict:
    async def go():
        transport = rc.EmbeddedTransport.open(settings=rc.Settings(
            database_url=f"sqlite:///{folder}/embedded-{instances}.db", max_concurrent_instances=5000))
        storage = transport.core.storage
        commits = storage.commits
        cpu = time.process_time()
        result = await workload(lambda: transport, instances, checkpoints, size, f"emb-{instances}-{time.monotonic_ns()}")
        cpu = time.process_time() - cpu
        summary = summarize("runtara embedded", "sqlite FULL", instances, result, cpu,
                            (storage.commits - commits) * result["operations"] / max(1, result["operations"] + 2 * instances))
        summary["server_cpu_us"] = None  # one process: its CPU is the client's too
        await transport.close()
        return summary
    return asyncio.run(go())


DBOS_PROGRAM = r"""
import json, os, sqlite3, sys, time, threading
instances, steps, size, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with sqlite3.connect(path) as connection:
    connection.execute("PRAGMA journal_mode=WAL")
from dbos import DBOS
DBOS(config={"name": "runtara-bench", "system_database_url": f"sqlite:///{path}"})
payload = os.urandom(size)
latencies, lock = [], threading.Lock()

@DBOS.step()
def step(k):
    return payload

@DBOS.workflow()
def flow(n):
    mine = []
    for k in range(steps):
        started = time.perf_counter()
        step(k)
        mine.append(time.perf_counter() - started)
    with lock:
        latencies.extend(mine)

DBOS.launch()
started = time.perf_counter()
handles = [DBOS.start_workflow(flow, n) for n in range(instances)]
for handle in handles:
    handle.get_result()
elapsed = time.perf_counter() - started
print(json.dumps({"operations": instances * steps, "seconds": elapsed, "latencies": latencies}))
DBOS.destroy()
"""


def run_dbos(folder: str, instances: int, checkpoints: int, size: int) -> dict | None:
    try:
        import dbos  # noqa: F401
    except ImportError:
        return None
    done = subprocess.run([sys.executable, "-c", DBOS_PROGRAM, str(instances), str(checkpoints), str(size),
                           f"{folder}/dbos-{instances}.sqlite"], capture_output=True, text=True, timeout=900,
                          cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return summarize("DBOS steps", "sqlite WAL", instances, result, loop="-")


def run_connected(folder: str, count: int) -> dict:
    """Server memory with `count` instances registered, each over its own connection."""
    server = ServerProcess.runtara(f"sqlite:///{folder}/connected.db", folder)

    async def connect():
        instances = [rc.Instance(f"idle-{n}", "bench", server_addr=f"127.0.0.1:{server.port}",
                                 heartbeat_interval_ms=0, env={}) for n in range(count)]
        for batch in range(0, count, 50):
            await asyncio.gather(*(i.register() for i in instances[batch:batch + 50]))
        await asyncio.sleep(1)
        memory = rss_mb(server.process.pid)
        await asyncio.gather(*(i.close() for i in instances))
        return memory
    try:
        return {"connected_instances": count, "server_rss_mb": asyncio.run(connect()), "ready_s": server.ready_s}
    finally:
        server.stop()


# -- soak ---------------------------------------------------------------------------------------


def soak(folder: str, seconds: int, instances: int, size: int) -> dict:
    """Instances checkpointing for `seconds`; memory and the WAL sampled every 10 s."""
    database = Path(folder) / "soak.db"
    server = ServerProcess.runtara(f"sqlite:///{database}", folder)
    samples = []

    async def load():
        stop_at = time.monotonic() + seconds
        payload = os.urandom(size)

        async def worker(n):
            round_ = 0
            while time.monotonic() < stop_at:
                async with rc.Instance(f"soak-{n}-{round_}", "soak", server_addr=f"127.0.0.1:{server.port}",
                                       heartbeat_interval_ms=0, env={}) as instance:
                    for k in range(100):
                        await instance.checkpoint(f"c{k}", payload)
                    await instance.completed()
                round_ += 1

        async def sample():
            while time.monotonic() < stop_at:
                wal = Path(f"{database}-wal")
                samples.append({"t": round(seconds - (stop_at - time.monotonic())), "rss_mb": rss_mb(server.process.pid),
                                "wal_mb": wal.stat().st_size / 2**20 if wal.exists() else 0.0})
                print(f"  {samples[-1]}", file=sys.stderr)
                await asyncio.sleep(10)
        await asyncio.gather(sample(), *(worker(n) for n in range(instances)))
    try:
        asyncio.run(load())
    finally:
        server.stop()
    settled = [s["rss_mb"] for s in samples[len(samples) // 4:]]  # after warm-up
    return {"samples": samples, "rss_growth_mb": max(settled) - min(settled) if settled else 0.0,
            "wal_max_mb": max(s["wal_mb"] for s in samples)}


# -- the echo server (a subprocess of this script) ----------------------------------------------


def echo_server(port: int, folder: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import StreamDataReceived

    class Echo(QuicConnectionProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.buffers: dict[int, bytearray] = {}

        def quic_event_received(self, event):
            if isinstance(event, StreamDataReceived):
                buffer = self.buffers.setdefault(event.stream_id, bytearray())
                buffer += event.data
                if event.end_stream:
                    self._quic.send_stream_data(event.stream_id, bytes(self.buffers.pop(event.stream_id)), True)
                    self.transmit()

    async def main():
        configuration = QuicConfiguration(is_client=False, alpn_protocols=[rc.ALPN])
        configuration.load_cert_chain(*rc.ensure_certificate(rc.Settings(database_url=f"sqlite:///{folder}/x.db")))
        await serve("127.0.0.1", port, configuration=configuration, create_protocol=Echo)
        await asyncio.Event().wait()
    asyncio.run(main())


@contextlib.contextmanager
def own_schema(url: str | None):
    """A PostgreSQL URL whose tables live in a schema of their own, dropped afterwards."""
    if not url:
        yield None
        return
    import psycopg

    schema = f"runtara_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


# -- report -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def report(rows: list[dict], extras: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    table = Table("scenario", "database", "loop", "N", "per s", "p50 ms", "p99 ms", "server CPU µs/op", "commits/s",
                  "× ceiling", "× DBOS", title=f"runtara-core {rc.__version__} — {extras['machine']}")
    for row in rows:
        table.add_row(row["scenario"], row["database"], row["loop"], str(row["instances"]), fmt(row["per_second"]),
                      fmt(row["p50_ms"], 2), fmt(row["p99_ms"], 2), fmt(row["server_cpu_us"]),
                      fmt(row["commits_per_second"]), fmt(row.get("vs_ceiling"), 2), fmt(row.get("vs_dbos"), 1))
    console = Console(width=160)
    console.print(table)
    for key, value in extras.items():
        if key != "machine":
            console.print(f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="1,16,64", help="comma-separated instance counts")
    parser.add_argument("--checkpoints", type=int, default=200, help="checkpoints per instance")
    parser.add_argument("--size", type=int, default=1024, help="bytes per checkpoint")
    parser.add_argument("--postgres", default=os.environ.get("TEST_DATABASE_URL"), help="PostgreSQL URL")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each transport row; the median is shown")
    parser.add_argument("--skip-dbos", action="store_true")
    parser.add_argument("--connected", type=int, default=1000, help="instances for the memory measurement")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--soak", type=int, default=0, help="seconds of soak instead of the table")
    args = parser.parse_args()
    counts = [int(n) for n in args.instances.split(",")]
    import importlib.util
    fast_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # what `serve` picks by default
    import resource
    _, most = resource.getrlimit(resource.RLIMIT_NOFILE)  # a UDP socket per client connection
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))

    with tempfile.TemporaryDirectory(prefix="runtara-bench-") as folder, own_schema(args.postgres) as postgres:
        if args.soak:
            result = soak(folder, args.soak, 64, args.size)
            Path(args.json).write_text(json.dumps(result, indent=2))
            print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
            return
        rows, metrics_cost = [], {}
        for n in counts:
            # The transport rows run round robin, `--repeat` times, and each reports its median run: a slow
            # spell of a shared machine then hits the ceiling and runtara alike, and the ratios stay fair.
            scenarios = [functools.partial(run_ceiling, folder, n, args.checkpoints, args.size)]
            for label, url, loop, options in (
                    ("sqlite FULL", "full", fast_loop, ("--sqlite-synchronous", "FULL")),
                    ("sqlite FULL", "full-asyncio", "asyncio", ("--sqlite-synchronous", "FULL")),
                    ("sqlite FULL, metrics", "metrics" if importlib.util.find_spec("prometheus_client") else None,
                     fast_loop, ("--sqlite-synchronous", "FULL", "--metrics", "0")),
                    ("sqlite NORMAL", "normal", fast_loop, ("--sqlite-synchronous", "NORMAL")),
                    ("postgresql", postgres, fast_loop, ())):
                if url and (loop == fast_loop or fast_loop != "asyncio"):
                    url = url if label == "postgresql" else f"sqlite:///{folder}/{url}-{n}.db"
                    scenarios.append(functools.partial(run_quic, label, url, folder, n, args.checkpoints, args.size,
                                                       loop, *options))
            runs = [[] for _ in scenarios]
            for _ in range(args.repeat):
                for scenario, done in zip(scenarios, runs):
                    done.append(scenario())
            group = [median_run(done) for done in runs]
            ceiling = group[0]
            dbos = None if args.skip_dbos else run_dbos(folder, n, args.checkpoints, args.size)
            group.append(run_embedded(folder, n, args.checkpoints, args.size))
            if dbos:
                group.append(dbos)
            for row in group:
                row["vs_ceiling"] = row["per_second"] / ceiling["per_second"] if row is not ceiling else None
                row["vs_dbos"] = row["per_second"] / dbos["per_second"] if dbos and row is not dbos else None
            plain, measured = ([row for row in group if row["database"] == label and row["loop"] == fast_loop]
                               for label in ("sqlite FULL", "sqlite FULL, metrics"))
            if plain and measured:  # what serving metrics costs: server CPU per checkpoint, with over without
                metrics_cost[n] = round(measured[0]["server_cpu_us"] / plain[0]["server_cpu_us"], 3)
            rows += group
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))  # kept if a later part fails
            print(f"done: {n} instances", file=sys.stderr)
        extras = {"machine": machine(), **run_connected(folder, args.connected),
                  "server CPU with metrics, × without (by N)": metrics_cost,
                  "command": "python tests/bench.py " + " ".join(sys.argv[1:])}
        Path(args.json).write_text(json.dumps({"rows": rows, **extras}, indent=2))
        report(rows, extras)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_echo":
        echo_server(int(sys.argv[2]), sys.argv[3])
    else:
        main()

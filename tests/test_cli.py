"""The CLI against databases a real server filled over QUIC, on SQLite and PostgreSQL."""

import base64
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import apsw
import msgpack
import pytest
from typer.testing import CliRunner

import runtara_core as rc
from conftest import addr, run

ROOT = Path(__file__).resolve().parent.parent
app = rc.build_cli()


def cli(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def cli_json(*args):
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture
def filled(server, database_url):
    """A server-filled database: a finished workflow, a running one, a failed one."""
    async def fill():
        def inst(name, tenant="shop"):
            return rc.Instance(name, tenant, server_addr=addr(server), heartbeat_interval_ms=0, env={})
        async with inst("order-1") as done:
            await done.checkpoint("fetch", msgpack.packb({"orders": [1, 2]}))
            await done.checkpoint("charge", b'{"total": 3}')
            await done.checkpoint("note", "plain text, ünïcode".encode())
            await done.checkpoint("blob", b"\xff\x00\xfe")
            await done.event("progress", b"half", checkpoint_id="charge")
            await done.completed(b"charged 3")
        running = inst("order-2")
        await running.register()
        await running.checkpoint("fetch", msgpack.packb([]))
        await running.close()
        async with inst("report-1", tenant="reports") as failed:
            await failed.failed("printer on fire")
    run(fill())
    return database_url


def test_instances_table_and_json(filled):
    table = cli("instances", "--database-url", filled).stdout
    assert "order-1" in table and "order-2" in table and "report-1" in table and "3 of 3 instances" in table
    listed = cli_json("instances", "--database-url", filled)
    assert listed["total_count"] == 3 and {i["instance_id"] for i in listed["instances"]} == {"order-1", "order-2",
                                                                                            "report-1"}
    done = next(i for i in listed["instances"] if i["instance_id"] == "order-1")
    assert base64.b64decode(done["output"]) == b"charged 3"
    assert [i["instance_id"] for i in cli_json("instances", "--database-url", filled, "--status", "running")[
        "instances"]] == ["order-2"]
    assert cli_json("instances", "--database-url", filled, "--tenant", "reports")["total_count"] == 1
    assert cli_json("instances", "--database-url", filled, "--since", "1h")["total_count"] == 3
    assert cli_json("instances", "--database-url", filled, "--limit", "1")["total_count"] == 3
    cli("instances", "--database-url", filled, "--status", "sleeping", code=1)


def test_show(filled):
    shown = cli("show", "order-1", "--database-url", filled).stdout
    for text in ("completed", "charged 3", "blob", "progress", "newest checkpoints (4 in all)"):
        assert text in shown
    assert "printer on fire" in cli("show", "report-1", "--database-url", filled).stdout
    data = cli_json("show", "order-2", "--database-url", filled)
    assert data["instance"]["status"] == "running" and data["checkpoint_count"] == 1


def test_checkpoints_and_decoded_states(filled):
    listed = cli_json("checkpoints", "order-1", "--database-url", filled)
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["blob", "note", "charge", "fetch"]
    assert "fetch" in cli("checkpoints", "order-1", "--database-url", filled).stdout
    assert cli_json("checkpoint", "order-1", "fetch", "--database-url", filled)["value"] == {"orders": [1, 2]}
    decoded = cli_json("checkpoint", "order-1", "charge", "--database-url", filled)
    assert decoded["format"] == "json" and decoded["value"] == {"total": 3}
    assert cli_json("checkpoint", "order-1", "note", "--database-url", filled)["value"] == "plain text, ünïcode"
    assert cli_json("checkpoint", "order-1", "blob", "--database-url", filled)["format"] == "binary"
    assert "'orders'" in cli("checkpoint", "order-1", "fetch", "--database-url", filled).stdout


def test_raw_checkpoint_is_the_exact_bytes(filled):
    raw = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "checkpoint", "order-1", "blob", "--raw",
                          "--database-url", filled], capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == b"\xff\x00\xfe"


def test_events(filled):
    listed = cli_json("events", "order-1", "--database-url", filled)
    assert [e["event_type"] for e in listed["events"]] == ["completed", "custom", "started"]
    custom = cli_json("events", "order-1", "--database-url", filled, "--type", "custom", "--subtype", "progress")
    assert custom["total_count"] == 1 and base64.b64decode(custom["events"][0]["payload"]) == b"half"
    assert "progress" in cli("events", "order-1", "--database-url", filled).stdout


def test_signals_reach_the_instance(filled, server):
    cli("signal", "order-2", "pause", "--payload", "maintenance", "--database-url", filled)
    cli("custom-signal", "order-2", "approve", "--payload", "yes", "--database-url", filled)

    async def poll():
        async with rc.Instance("order-2", "shop", server_addr=addr(server), heartbeat_interval_ms=0,
                               env={}) as inst:
            return await inst.poll_signals("approve")
    polled = run(poll())
    assert polled["signal"]["signal_type"] == "pause" and polled["signal"]["payload"] == b"maintenance"
    assert polled["custom_signal"]["payload"] == b"yes"
    assert "no more signals" in cli("signal", "order-1", "cancel", "--database-url", filled, code=1).stderr
    cli("signal", "order-2", "explode", "--database-url", filled, code=1)


def test_stats(filled):
    numbers = cli_json("stats", "--database-url", filled)
    assert numbers["instances"] == {"pending": 0, "running": 1, "suspended": 0, "completed": 1, "failed": 1,
                                    "cancelled": 0}  # zero counts too, as the table lists them
    assert numbers["checkpoints"] == 5 and numbers["events"] >= 6 and numbers["database_bytes"] > 0
    assert numbers["oldest_running"]["instance_id"] == "order-2"
    assert "oldest running" in cli("stats", "--database-url", filled).stdout


def test_gc_removes_exactly_what_it_says(filled):
    def older(tx):  # make order-1 finish 40 days ago; report-1 stays recent
        tx.rows("UPDATE instances SET finished_at_ms = ? WHERE instance_id = 'order-1'", rc.now_ms() - 40 * 86_400_000)
    with rc.open_storage(filled) as storage:
        storage.write(older).result()
    dry = cli_json("gc", "--older-than", "30d", "--dry-run", "--database-url", filled)
    assert dry == {"instances": 1, "checkpoints": 4, "events": 3, "dry_run": True, "removed_instances": 0}
    assert cli_json("stats", "--database-url", filled)["instances"]["completed"] == 1  # nothing went
    done = cli("gc", "--older-than", "30d", "--database-url", filled, "--batch-size", "1")
    assert "removed 1 instance finished" in done.stdout
    left = cli_json("instances", "--database-url", filled)
    assert {i["instance_id"] for i in left["instances"]} == {"order-2", "report-1"}
    assert cli_json("stats", "--database-url", filled)["checkpoints"] == 1
    assert cli_json("gc", "--older-than", "1ms", "--database-url", filled)["removed_instances"] == 1  # report-1
    assert cli_json("instances", "--database-url", filled)["instances"][0]["status"] == "running"  # never touched


def test_watch_refreshes(filled):
    shown = cli("watch", "--database-url", filled, "--interval", "0.1", "--iterations", "2").stdout
    assert "order-2" in shown and "running" in shown


def test_migrate_lists_migrations(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    result = cli("migrate", "--database-url", url)
    assert "001" in result.stdout and "(now)" in result.stdout and "applying 001_initial" in result.stderr
    assert "(now)" not in cli("migrate", "--database-url", url).stdout


def test_clear_errors(filled, tmp_path):
    assert "no instance ghost" in cli("show", "ghost", "--database-url", filled, code=1).stderr
    assert "no checkpoint nope" in cli("checkpoint", "order-1", "nope", "--database-url", filled, code=1).stderr
    cli("events", "ghost", "--database-url", filled, code=1)
    missing = tmp_path / "missing.db"
    assert "no database at" in cli("instances", "--database-url", f"sqlite:///{missing}", code=1).stderr
    assert not missing.exists()
    assert "bad duration" in cli("gc", "--older-than", "soon", "--database-url", filled, code=1).stderr
    assert "cannot reach PostgreSQL" in cli("stats", "--database-url", "postgresql://x@127.0.0.1:1/db",
                                            code=1).stderr
    assert "must be auto, uvloop or asyncio" in cli("serve", "--loop", "fastest", "--database-url", filled,
                                                    code=1).stderr


def test_the_event_loop_setting():
    import uvloop

    assert rc.uvloop_for(rc.Settings.from_env(env={})) is uvloop  # "auto", and the test extra installs it
    assert rc.uvloop_for(rc.Settings.from_env(env={"RUNTARA_EVENT_LOOP": "UVLOOP"})) is uvloop
    assert rc.uvloop_for(rc.Settings.from_env(env={"RUNTARA_EVENT_LOOP": "asyncio"})) is None
    with pytest.raises(ValueError, match="RUNTARA_EVENT_LOOP"):
        rc.Settings.from_env(env={"RUNTARA_EVENT_LOOP": "trio"})


def test_json_output_is_only_json_in_a_real_process(filled):
    done = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "instances", "--json", "--database-url",
                           filled], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_count"] == 3


def test_importing_the_engine_does_not_import_the_cli_libraries():
    probe = "import sys, runtara_core; print(any(m in sys.modules for m in ('typer', 'rich', 'aioquic')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("text, ms", [("30d", 30 * 86_400_000), ("1h30m", 5_400_000), ("500ms", 500), ("2w", 1_209_600_000)])
def test_durations(text, ms):
    assert rc.parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "1h 30m", "-1d"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="bad duration"):
        rc.parse_duration(text)


HOSTILE = {"instance_id": "x[/red]y", "tenant_id": "[bold]acme[/bold]",
           "error": "boom \x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\ \x1b[2J[red]x", "subtype": "\x1b[31mred\r",
           "checkpoint_id": "[link=http://evil.example]c[/link]"}


def console(*args, database_url) -> subprocess.CompletedProcess:
    """The real console script, piped, at 80 columns."""
    return subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), *args, "--database-url", database_url],
                          capture_output=True, text=True, timeout=60, env={**__import__("os").environ, "COLUMNS": "80"})


def test_stored_text_is_shown_literally_and_never_sent_to_the_terminal(database_url):
    """Ids, tenants, errors, subtypes and checkpoint ids come from clients: shown as they are, never read as
    markup (which crashed `instances` for every instance), and with control characters made visible."""
    now = rc.now_ms()
    with rc.open_storage(database_url) as storage:
        h = HOSTILE
        storage.write(rc.Tx.create_instance, h["instance_id"], h["tenant_id"], now).result()
        storage.write(rc._register, h["instance_id"], h["tenant_id"], None, None, now, 10).result()
        storage.write(rc._checkpoint, h["instance_id"], h["checkpoint_id"], b"s", None, now, 1 << 20).result()
        storage.write(rc.Tx.insert_event, h["instance_id"], "custom", now, h["subtype"], h["checkpoint_id"],
                      b"[bold]payload[/bold]").result()
        storage.write(rc.Tx.transition, h["instance_id"], "failed", ("running",), now, None, h["error"]).result()
    for command in (["instances"], ["show", h["instance_id"]], ["events", h["instance_id"]],
                    ["checkpoints", h["instance_id"]], ["watch", "--iterations", "1"], ["stats"],
                    ["wait", h["instance_id"]]):
        done = console(*command, database_url=database_url)
        shown = done.stdout + done.stderr
        assert "Traceback" not in shown and "MarkupError" not in shown, shown
        assert "\x1b" not in shown and "\r" not in shown, repr(shown)
        if command[0] in ("instances", "show", "watch"):
            assert h["instance_id"] in shown and "[bold]acme[/bold" in shown, shown  # whole: ids fold, never cut
        if command[0] == "show":
            assert "\\x1b]8;;http://evil.example" in shown and "[red]x" in shown, shown
        if command[0] == "events":
            assert "\\x1b[31mred\\x" in shown and "[bold]payloa" in shown, shown  # folded at 80 columns
    missing = console("show", "no[/red]such", database_url=database_url)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no instance no[/red]such", missing.stderr


def test_previews_of_a_hostile_payload_cost_little_memory(database_url):
    """An 8 MiB payload of empty maps took the CLI's event preview to 686 MB: listings carry a bounded prefix,
    decoded with the request decoder's bounds, and a whole state that does not decode within them is shown as
    bytes."""
    import resource

    hostile = b"\xdc\x03\xe8" + b"\x80" * 1000  # one array of a thousand empty maps, 8 MiB of them below
    payload = b"\xdd" + (8 * 1024).to_bytes(4, "big") + hostile * (8 * 1024)
    now = rc.now_ms()
    with rc.open_storage(database_url) as storage:
        storage.write(rc.Tx.create_instance, "big", "t", now).result()
        storage.write(rc.Tx.insert_event, "big", "custom", now, "s", None, payload).result()
        storage.write(rc._register, "big", "t", None, None, now, 10).result()
        storage.write(rc._checkpoint, "big", "c", payload, None, now, 1 << 30).result()
    for command in (["events", "big"], ["show", "big"], ["checkpoint", "big", "c"]):
        probe = ("import resource, sys, runtara_core; sys.argv[0] = 'runtara'\n"
                 "try:\n    runtara_core.main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", probe, *command, "--database-url", database_url], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        peak_mb = int(done.stderr.strip().splitlines()[-1])
        assert "Traceback" not in done.stderr and peak_mb < 250, (command, peak_mb, done.stderr[-500:])
    del resource


def test_reads_never_create_or_migrate_a_database(database_url, tmp_path):
    """`runtara stats` on an empty PostgreSQL database created the tables, and any read applied newer
    migrations, after which an older server refused the database. Reads say what to run instead."""
    if database_url.startswith("sqlite"):
        missing = console("stats", database_url=f"sqlite:///{tmp_path / 'none.db'}")
        assert missing.returncode == 1 and "no database at" in missing.stderr and not (tmp_path / "none.db").exists()
        (tmp_path / "empty.db").touch()  # an empty file, and another program's database: neither turned to WAL
        other = apsw.Connection(str(tmp_path / "other.db"))
        other.execute("CREATE TABLE notes (body TEXT)")
        other.close()
        for name in ("empty.db", "other.db"):
            before = (tmp_path / name).read_bytes()
            done = console("stats", database_url=f"sqlite:///{tmp_path / name}")
            assert done.returncode == 1 and "no runtara-core tables" in done.stderr, done.stderr
            assert (tmp_path / name).read_bytes() == before and not (tmp_path / f"{name}-wal").exists()
    with rc.open_storage(database_url, migrate=False) as storage:  # an empty database (an empty schema)
        empty = console("stats", database_url=database_url)
        assert empty.returncode == 1 and "run 'runtara migrate --database-url " in empty.stderr, empty.stderr
        assert console("start", "early", "--tenant", "t", database_url=database_url).returncode == 1
        assert storage.read(rc._recorded_migrations).result() is None  # no record table made either
        older = [m for m in rc.known_migrations(storage.dialect) if m[0] < 3]  # as an older version left it
        for version, name, sql in older:
            storage.write(rc._apply_migration, version, name, sql).result()
        for command in (["instances"], ["stats"], ["show", "x"], ["signal", "x", "cancel"], ["wakes"],
                        ["start", "y", "--tenant", "t"]):
            done = console(*command, database_url=database_url)
            assert done.returncode == 1 and "needs migration 003_runs" in done.stderr, (command, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1
        assert set(storage.read(rc._recorded_migrations).result()) == {1, 2}  # still as it was
        assert console("migrate", database_url=database_url).returncode == 0
        assert console("stats", database_url=database_url).returncode == 0


def test_version_unknown_event_types_and_plurals(filled):
    assert cli("--version").stdout.strip() == f"runtara-core {rc.__version__}"
    bogus = cli("events", "order-1", "--type", "bogus", "--database-url", filled, code=1)
    assert "unknown event type 'bogus'" in bogus.stderr
    assert "1 of 1 event " in cli("events", "order-1", "--type", "custom", "--database-url", filled).stdout
    shown = cli_json("show", "order-1", "--database-url", filled)
    assert all(None not in event.values() for event in shown["events"])  # as `events --json` has them


@pytest.mark.parametrize("url, cause", [("postgresql://postgres@127.0.0.1:1/postgres", "Connection refused"),
                                        ("postgresql://runtara_nobody@127.0.0.1:5432/postgres",
                                         'role "runtara_nobody" does not exist')])
@pytest.mark.parametrize("command", [["stats"], ["serve", "--port", "0"]])
def test_postgresql_mistakes_are_one_quick_line_naming_the_cause(postgres_url, url, cause, command):
    """A wrong port took 5.3 s and printed the pool's warnings three times; a missing role ended with "pool
    initialization incomplete"."""
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), *command, "--database-url", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot reach PostgreSQL") and cause in errors[0], errors


LONG = {"instance_id": "order-2026-12-02-very-long-instance-identifier-0001",
        "tenant_id": "tenant-with-a-rather-long-name-xyz", "checkpoint_id": "checkpoint-with-a-long-name-42"}


def long_ids(database_url: str) -> None:
    """A running instance with long ids, a checkpoint and an event naming it."""
    now = rc.now_ms()
    with rc.open_storage(database_url) as storage:
        storage.write(rc.Tx.create_instance, LONG["instance_id"], LONG["tenant_id"], now).result()
        storage.write(rc._register, LONG["instance_id"], LONG["tenant_id"], None, None, now, 10).result()
        storage.write(rc._checkpoint, LONG["instance_id"], LONG["checkpoint_id"], b"s", None, now, 1 << 20).result()
        storage.write(rc.Tx.insert_event, LONG["instance_id"], "custom", now, "progress", LONG["checkpoint_id"],
                      None).result()


@pytest.mark.parametrize("columns", ["80", "40"])
def test_ids_are_never_cut_in_narrow_or_piped_output(database_url, columns, tmp_path):
    """`runtara instances | cat` and 80-column terminals showed `…` for ids, or split them over two lines, so
    that grep found nothing; the columns right of them were cropped away."""
    long_ids(database_url)
    env = {**__import__("os").environ, "COLUMNS": columns}
    for command in (["instances"], ["watch", "--iterations", "1"], ["wakes"],
                    ["checkpoints", LONG["instance_id"]], ["events", LONG["instance_id"]]):
        done = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), *command, "--database-url",
                               database_url], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        for key in ("instance_id", "tenant_id", "checkpoint_id") if command[0] in ("instances", "watch") else (
                ("checkpoint_id",) if command[0] != "wakes" else ()):
            assert any(LONG[key] in line for line in lines), (command, key, done.stdout)
        assert "…" not in done.stdout, (command, done.stdout)
        if command[0] in ("instances", "watch"):
            assert "heartbeat" in done.stdout and "cancelled 0" in done.stdout.replace("\n", " ") or \
                command[0] == "instances", done.stdout


def on_terminal(*args, columns=80, lines=50, raw=False) -> str:
    """The real console script on a pseudo-terminal `columns` wide: what the screen would get, colours (and
    cursor moves, unless `raw`) removed."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / "runtara_core.py"), *args], stdin=follower,
                               stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": str(columns),
                                                                       "LINES": str(lines), "TERM": "xterm"})
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        screen += chunk
    process.wait(timeout=60)
    os.close(leader)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]" if not raw else r"\x1b\[[0-9;]*m", "", screen.decode())


def test_ids_are_never_cut_on_a_terminal_in_watch_and_show(database_url):
    """On an 80-column terminal `watch` (a live display) cut ids to `…` and squeezed the other columns to
    nothing; `show` folded its nested tables' columns to `ti…` once ids had their full width."""
    long_ids(database_url)
    for command in (["watch", "--iterations", "1"], ["show", LONG["instance_id"]], ["instances"]):
        screen = on_terminal(*command, "--database-url", database_url)
        for key in ("instance_id", "tenant_id", "checkpoint_id"):
            assert any(LONG[key] in line for line in screen.splitlines()), (command, key, screen)
        assert "…" not in screen, (command, screen)
        for heading in (("heartbeat",) if command[0] != "show" else ("saved", "size", "type")):
            assert heading in screen, (command, heading, screen)


def test_short_ids_keep_a_terminal_table_within_its_width_and_watch_live(database_url):
    """After ids were made never to give way, an ordinary 80-column terminal got every table at full width
    (96 columns, wrapped by the terminal) and `watch` scrolled instead of redrawing; and an id too long for
    the terminal that came while `watch` ran was cut, its neighbours squeezed to nothing."""
    import threading

    now = rc.now_ms()
    with rc.open_storage(database_url) as storage:
        for name in ("o1", "o2"):
            storage.write(rc.Tx.create_instance, name, "shop", now).result()
    screen = on_terminal("instances", "--database-url", database_url)
    assert "o1" in screen and max(len(line.rstrip("\r")) for line in screen.splitlines()) <= 80, screen
    late = threading.Timer(1.0, long_ids, (database_url,))
    late.start()
    try:
        screen = on_terminal("watch", "--iterations", "5", "--interval", "0.5", "--database-url", database_url,
                             raw=True)
    finally:
        late.join()
    assert "\x1b[" in screen.split(LONG["instance_id"])[0]  # redrawn in place while it fitted
    assert any(LONG["instance_id"] in line for line in screen.splitlines()), screen
    assert "…" not in screen, screen


@pytest.mark.parametrize("columns", [80, 120])
def test_show_keeps_ids_among_its_facts_whole_and_watch_hides_no_row(database_url, columns):
    """`show` split a long tenant or workflow over two lines of its facts; `events` split an event's id;
    and `watch` replaced the rows below the terminal's height with `...` on every redraw."""
    now = rc.now_ms()
    tenant, workflow = "tenant-" + "q" * 93, "wf-" + "v" * 90
    with rc.open_storage(database_url) as storage:
        storage.write(rc.Tx.create_instance, "o9", tenant, now, workflow).result()
        for n in range(120):
            storage.write(rc.Tx.insert_event, "o9", "custom", now, "sub-" + "s" * 70, "checkpoint-" + "c" * 80,
                          None).result()
        for n in range(30):
            storage.write(rc.Tx.create_instance, f"row-{n:02d}", "shop", now).result()
    screen = on_terminal("show", "o9", "--database-url", database_url, columns=columns)
    for value in (tenant, workflow):
        assert any(value in line for line in screen.splitlines()), screen
    screen = on_terminal("events", "o9", "--limit", "3", "--database-url", database_url, columns=columns)
    listed = cli_json("events", "o9", "--limit", "3", "--database-url", database_url)["events"]
    assert all(any(f"│ {e['id']} " in line for line in screen.splitlines()) for e in listed), screen
    screen = on_terminal("watch", "--iterations", "3", "--interval", "0.3", "--limit", "40", "--database-url",
                         database_url, columns=columns, lines=20)
    assert all(screen.count(f"row-{n:02d}") >= 3 for n in range(30)), screen


def test_messages_are_one_line_when_piped(filled):
    """At 80 columns, `gc --dry-run` and long notices wrapped onto a second line; fork said "1 checkpoints"."""
    done = console("gc", "--older-than", "3650d", "--dry-run", database_url=filled)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1 and len(done.stdout) > 80, done.stdout
    long_id = "a-checkpoint-id-long-enough-that-the-notice-passes-eighty-columns"
    done = console("custom-signal", "order-2", long_id, database_url=filled)
    assert done.returncode == 0 and len(done.stderr.splitlines()) == 1, done.stderr
    forked = console("fork", "order-1", "--new-id", "order-1b", "--from", "fetch", database_url=filled)
    assert forked.stderr.startswith("forked order-1 as order-1b with 1 checkpoint,"), forked.stderr


def test_watch_piped_prints_each_snapshot(filled):
    """Piped, `watch` printed nothing until it stopped (a live display draws only on a terminal)."""
    watcher = subprocess.Popen([sys.executable, str(ROOT / "runtara_core.py"), "watch", "--interval", "0.2",
                                "--database-url", filled], stdout=subprocess.PIPE, text=True)
    try:
        first = watcher.stdout.readline()  # while it still runs
        assert "running 1" in first and "failed 1" in first, first
    finally:
        watcher.kill()
        watcher.wait(timeout=10)


def script(*args, env=None) -> subprocess.CompletedProcess:
    """The real console script, piped, at 80 columns, without RUNTARA_* variables unless given."""
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RUNTARA_")}
    return subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), *args], capture_output=True, text=True,
                          timeout=60, env={**clean, "COLUMNS": "80", **(env or {})})


@pytest.mark.parametrize("args, says", [
    (["serve", "--port", "x"], "'--port'"), (["serve", "--port", "70000"], "'--port'"), (["bogus"], "bogus"),
    (["show"], "Missing argument"), (["serve", "--nope"], "--nope"), (["instances", "--limit", "0"], "'--limit'"),
    (["serve", "--loop", "trio"], "--loop must be"), (["serve", "--log-level", "loud"], "--log-level must be"),
    (["serve", "--max-restarts", "-1"], "'--max-restarts'"), (["serve", "--max-message-bytes", "0"], "'--max-message-bytes'"),
])
def test_every_mistake_is_one_line_with_exit_code_1_naming_what_was_typed(args, says, tmp_path):
    """Usage mistakes exited 2 with a boxed message of several lines, other mistakes 1 with one line; and an
    error named RUNTARA_QUIC_PORT for a --port the user typed."""
    done = script(*args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}") if args[0] == "serve" else script(*args)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert "RUNTARA_" not in lines[0]


@pytest.mark.parametrize("args, says", [
    (["serve", "--tls-cert", "c.pem"], "--tls-cert and --tls-key must be set together"),
    (["serve", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert: no file"),
    (["serve", "--launch", 'python3 "x'], "--launch 'python3 \"x': no closing quotation"),
    (["start", "x", "--tenant", "t", "--input-file", "/nonexistent"], "--input-file: cannot read"),
    (["watch", "--status", "bogus"], "unknown status 'bogus'"),
    (["gc", "--older-than", "99999999999999999999d", "--dry-run"], "longer than 100 years"),
    (["instances", "--since", "99999999999999999999d"], "longer than 100 years"),
    (["signal", "x", "pause", "--payload", "p" * 70_000], "--payload holds 70000 bytes; a signal's payload is at most 65536"),
    (["custom-signal", "x", ""], "'CHECKPOINT_ID'"), (["custom-signal", "x", "a\nb"], "'CHECKPOINT_ID'"),
    (["custom-signal", "x", "c" * 600], "'CHECKPOINT_ID'"), (["signal", "x\ty", "cancel"], "'INSTANCE_ID'"),
])
def test_mistakes_in_values_are_one_line_naming_the_option(args, says, tmp_path):
    """A missing --tls-key was named as RUNTARA_TLS_KEY; a missing file, a bad quote or a huge duration gave an
    errno text or a traceback; `watch --status bogus` listed nothing; signals skipped the protocol's limits."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert script("migrate", "--database-url", url).returncode == 0
    done = script(*args, "--database-url", url)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert "RUNTARA_" not in lines[0] and "Errno" not in lines[0]
    with rc.open_storage(url, migrate=False) as storage:
        assert storage.read(rc.Tx.count_instances).result() == 0  # nothing was written


def test_tls_files_that_cannot_serve_are_refused_before_anything_is_opened(tmp_path):
    """A key that was not the certificate's was accepted (every handshake then failed), a non-PEM file was
    named by neither option, and the database was created before the refusal."""
    pairs = [rc.ensure_certificate(rc.Settings(database_url=f"sqlite:///{tmp_path / name / 'x.db'}"))
             for name in ("one", "two")]
    (tmp_path / "bad.pem").write_text("not a certificate")
    url = f"sqlite:///{tmp_path / 'never.db'}"
    for cert, key, says in ((pairs[0][0], pairs[1][1], f"--tls-key {pairs[1][1]} is not the key of --tls-cert"),
                            (str(tmp_path / "bad.pem"), pairs[0][1], "--tls-cert"),
                            (pairs[0][0], str(tmp_path / "bad.pem"), "--tls-key")):
        done = script("serve", "--tls-cert", cert, "--tls-key", key, "--database-url", url)
        assert done.returncode == 1 and done.stderr.startswith(f"error: {says}"), done.stderr
        assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "never.db").exists()
    done = script("serve", "--database-url", url, env={"RUNTARA_TLS_CERT": pairs[0][0], "RUNTARA_TLS_KEY": pairs[1][1]})
    assert done.stderr.startswith("error: RUNTARA_TLS_KEY"), done.stderr


def test_a_variable_is_named_when_the_mistake_is_in_the_variable(tmp_path):
    done = script("serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}", env={"RUNTARA_QUIC_PORT": "x"})
    assert done.returncode == 1 and done.stderr == "error: RUNTARA_QUIC_PORT must be a whole number, not 'x'\n"
    done = script("serve", env={"RUNTARA_EVENT_LOOP": "trio", "RUNTARA_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert done.stderr.startswith("error: RUNTARA_EVENT_LOOP must be"), done.stderr
    done = script("serve", env={"RUNTARA_MAX_CONCURRENT_INSTANCES": "0",
                                "RUNTARA_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})  # --max-... 0 is refused too
    assert done.stderr == "error: RUNTARA_MAX_CONCURRENT_INSTANCES must be at least 1, not 0\n", done.stderr
    done = script("serve", "--tls-cert", "c.pem", env={"RUNTARA_TLS_KEY": "k.pem"})
    assert done.stderr == "error: --tls-cert: no file c.pem\n", done.stderr


def test_serve_help_gives_every_option_its_default_and_variable():
    """Seven of serve's options showed neither their default nor their variable."""
    text = " ".join(script("serve", "--help").stdout.split())
    options = re.split(r" (?=--[a-z-]+ )(?<!/ )", text.split("Options:")[1])[1:]  # each option with its help
    assert len(options) == 22, options
    for option in options:
        assert option.startswith("--help") or "default: " in option, option
    for field, variable in rc.Settings.VARIABLES.items():
        if field not in ("stall_timeout_ms",):  # no option: an operator's knob for hostile networks only
            assert f"[env var: {variable}]" in text, variable
    assert script().returncode == 0 and "Commands:" in script().stdout  # nothing asked: the help


def test_the_server_log_counts_in_words(tmp_path, caplog):
    """It said "1 writes committed in 1 transactions"."""
    caplog.set_level(logging.INFO, logger="runtara")
    with rc.ServerThread(rc.Settings.from_env(env={}, database_url=f"sqlite:///{tmp_path / 'x.db'}", port=0)) as server:
        async def start():
            async with rc.Client(addr(server), env={}) as operator:
                await operator.start("one", "t")
        run(start())
    said = re.findall(r"(\d+) (writes?) committed in (\d+) (transactions?)", caplog.text)
    assert said, caplog.text
    for writes, noun, commits, other in said:
        assert (noun == "write") == (writes == "1") and (other == "transaction") == (commits == "1"), said

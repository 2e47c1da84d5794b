"""Authentication, connection binding, TLS verification and hostile input (PROTOCOL.md sections 1 and 6)."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

import runtara_core as rc
from conftest import addr, run, settings_for, start_server_process, stop_server_process
from test_protocol import raises, raw

ROOT = Path(__file__).resolve().parent.parent
SECRET = "correct horse battery staple"


def snapshot(storage) -> list:
    """Every row of every table, to show that a rejected request changed nothing."""
    def read(tx):
        return [tx.rows(f"SELECT * FROM {table} ORDER BY 1, 2") for table in
                ("instances", "checkpoints", "events", "signals", "custom_signals")]
    return storage.read(read).result()


def instance(server, instance_id="i-1", tenant_id="t-1", **options):
    options.setdefault("token", rc.instance_token(SECRET, tenant_id, instance_id))
    return rc.Instance(instance_id, tenant_id, server_addr=addr(server), heartbeat_interval_ms=0, env={}, **options)


@pytest.fixture
def secured(server_factory):
    return server_factory(secret=SECRET)


# -- authentication -----------------------------------------------------------------------------


def test_operator_operations_need_the_admin_token(secured):
    async def scenario():
        async with rc.Client(addr(secured), env={}) as anonymous:
            for call in (anonymous.health_check(), anonymous.list_instances(), anonymous.send_signal("i", "cancel")):
                await raises("UNAUTHORIZED", call)
        async with rc.Client(addr(secured), env={}, token=rc.instance_token(SECRET, "t-1", "i-1")) as impostor:
            await raises("UNAUTHORIZED", impostor.health_check())
        async with rc.Client(addr(secured), env={"RUNTARA_SECRET": SECRET}) as operator:
            assert (await operator.health_check())["healthy"] is True
    run(scenario())


def test_register_needs_the_instance_token(secured):
    async def scenario():
        for token in (None, "", "0" * 64, rc.instance_token("another secret", "t-1", "i-1"),
                      rc.instance_token(SECRET, "t-2", "i-1"), rc.instance_token(SECRET, "t-1", "i-2"), "ünï"):
            inst = instance(secured, token=token)
            inst.token = token
            await raises("UNAUTHORIZED", inst.register())
            await inst.close()
        async with instance(secured) as inst:
            assert inst.registration["status"] == "running"
    run(scenario())


def test_a_connection_is_bound_to_its_instance(secured, storage):
    async def scenario():
        async with instance(secured, "b", "t-1"):
            pass
        async with instance(secured, "a", "t-1") as a:
            await a.checkpoint("mine", b"a")
            before = snapshot(storage)
            for op, fields in (("checkpoint", {"checkpoint_id": "c", "state": b"x"}),
                               ("get_checkpoint", {"checkpoint_id": "c"}), ("get_instance_status", {}),
                               ("instance_event", {"event_type": "completed"}), ("poll_signals", {}),
                               ("signal_ack", {"signal_type": "cancel", "acknowledged": True}),
                               ("sleep", {"checkpoint_id": "c", "state": b"", "duration_ms": 1}),
                               ("retry_attempt", {"checkpoint_id": "c", "attempt_number": 1})):
                error = await raises("UNAUTHORIZED", a.call(op, instance_id="b", **fields))
                assert "bound to instance a" in str(error)
            await raises("UNAUTHORIZED", a.call("instance_event_batch", events=[
                {"instance_id": "a", "event_type": "custom"}, {"instance_id": "b", "event_type": "completed"}]))
            assert snapshot(storage) == before  # the half that named instance a was not stored either
            assert (await a.checkpoint("mine", b"")).state == b"a"
    run(scenario())


def test_a_connection_that_has_not_registered_can_do_nothing(secured):
    async def scenario():
        transport = rc.QuicTransport(*secured.address)
        error = await raises("UNAUTHORIZED", transport.request({"op": "get_instance_status", "instance_id": "i"}))
        assert "not registered" in str(error)
        await transport.close()
    run(scenario())


def test_a_tenant_a_token_never_reaches_a_tenant_b_instance(secured, storage):
    async def scenario():
        async with instance(secured, "shared", "tenant-b") as owner:
            await owner.checkpoint("secret-state", b"b's data")
        before = snapshot(storage)
        intruder = instance(secured, "shared", "tenant-a")  # a valid token, for tenant A's "shared"
        await raises("TENANT_MISMATCH", intruder.register())
        await raises("UNAUTHORIZED", intruder.get_checkpoint("secret-state"))
        await raises("UNAUTHORIZED", intruder.checkpoint("secret-state", b"overwrite"))
        await raises("UNAUTHORIZED", intruder.completed(b"hijacked"))
        await intruder.close()
        assert snapshot(storage) == before
    run(scenario())


def test_the_admin_token_may_act_for_any_instance(secured):
    async def scenario():
        async with instance(secured, "i-1", "t-1"):
            pass
        admin = rc.Instance("i-1", "t-1", server_addr=addr(secured), heartbeat_interval_ms=0, env={},
                            token=rc.admin_token(SECRET))
        assert (await admin.status())["status"] == "running"
        await admin.register()
        assert (await admin.checkpoint("by-admin", b"x")).found is False
        other = rc.Instance("i-2", "t-9", transport=admin.transport, token=rc.admin_token(SECRET), env={})
        await other.register()  # the admin connection is not bound
        assert (await admin.status())["status"] == "running"
        await admin.close()
    run(scenario())


def test_the_sdk_binds_again_after_a_reconnect(secured):
    async def scenario():
        async with instance(secured) as inst:
            await inst.checkpoint("before", b"1")
            await inst.transport.close()
            assert (await inst.checkpoint("before", b"2")).state == b"1"
    run(scenario())


def test_token_command():
    runner, app = CliRunner(), rc.build_cli()
    result = runner.invoke(app, ["token", "i-1", "--tenant", "t-1"], env={"RUNTARA_SECRET": SECRET})
    assert result.exit_code == 0 and result.stdout.strip() == rc.instance_token(SECRET, "t-1", "i-1")
    result = runner.invoke(app, ["token", "--admin"], env={"RUNTARA_SECRET": SECRET})
    assert result.stdout.strip() == rc.admin_token(SECRET) and len(result.stdout.strip()) == 64
    assert runner.invoke(app, ["token", "i-1", "--tenant", "t"], env={"RUNTARA_SECRET": ""}).exit_code == 1
    assert runner.invoke(app, ["token", "i-1"], env={"RUNTARA_SECRET": SECRET}).exit_code == 1


def test_tokens_are_hmac_sha256_of_tenant_newline_instance():
    import hashlib
    import hmac
    expected = hmac.new(b"k", b"tenant\ninstance", hashlib.sha256).hexdigest()
    assert rc.instance_token("k", "tenant", "instance") == expected
    assert rc.admin_token("k") == hmac.new(b"k", b"admin", hashlib.sha256).hexdigest()


# -- binding to addresses -----------------------------------------------------------------------


def test_no_secret_no_public_address(database_url):
    async def attempt(**overrides):
        server = rc.Server(settings_for(database_url, host="0.0.0.0", **overrides))
        await server.start()
        await server.stop()
    with pytest.raises(ValueError, match="RUNTARA_SECRET.*--insecure"):
        run(attempt())
    run(attempt(insecure=True))
    run(attempt(secret=SECRET))


def test_serve_says_why_it_refuses_a_public_address(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "serve", "--host", "0.0.0.0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode == 1 and "without authentication" in done.stderr


# -- TLS ----------------------------------------------------------------------------------------


def test_generated_certificate_is_kept_across_restarts(server_factory, database_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a PostgreSQL-backed server keeps its files
    first = server_factory()
    folder = rc.state_dir(database_url)
    cert = (folder / rc.TLS_CERT_FILE).read_bytes()
    assert (folder / rc.TLS_KEY_FILE).stat().st_mode & 0o777 == 0o600
    first.stop()
    server_factory()
    assert (folder / rc.TLS_CERT_FILE).read_bytes() == cert


def _other_certificate(tmp_path) -> tuple[str, str]:
    return rc.ensure_certificate(rc.Settings(database_url=f"sqlite:///{tmp_path / 'other' / 'x.db'}"))


def test_the_sdk_verifies_against_a_ca_file(server, database_url, tmp_path):
    async def scenario():
        own_cert = str(rc.state_dir(database_url) / rc.TLS_CERT_FILE)
        trusted = rc.QuicTransport(*server.address, ca_file=own_cert)
        assert (await trusted.request({"op": "health_check"}))["healthy"]
        await trusted.close()
        wrong = rc.QuicTransport(*server.address, ca_file=_other_certificate(tmp_path)[0])
        with pytest.raises(rc.ConnectionLost, match="TLS handshake failed.*RUNTARA_CA_FILE"):
            await wrong.request({"op": "health_check"})
        await wrong.close()
    run(scenario())


def test_configured_certificate_files_are_used(server_factory, tmp_path):
    cert, key = _other_certificate(tmp_path)
    server = server_factory(tls_cert=cert, tls_key=key)

    async def scenario():
        transport = rc.QuicTransport(*server.address, ca_file=cert)
        assert (await transport.request({"op": "health_check"}))["healthy"]
        await transport.close()
    run(scenario())


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 9))  # no packet is sent; this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_an_unverified_remote_server_is_refused_unless_verification_is_skipped(server_factory):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = server_factory(host="0.0.0.0", secret=SECRET)
    port = server.address[1]

    async def scenario():
        strict = rc.Client(f"{address}:{port}", env={"RUNTARA_SECRET": SECRET})
        with pytest.raises(rc.ConnectionLost, match="TLS handshake failed"):
            await strict.health_check()
        await strict.close()
        relaxed = rc.Client(f"{address}:{port}", env={"RUNTARA_SECRET": SECRET,
                                                      "RUNTARA_SKIP_CERT_VERIFICATION": "1"})
        assert (await relaxed.health_check())["healthy"]
        await relaxed.close()
    run(scenario())


def test_only_loopback_goes_unverified_by_default():
    import ssl
    assert rc.QuicTransport("127.0.0.1")._configuration().verify_mode == ssl.CERT_NONE
    assert rc.QuicTransport("localhost")._configuration().verify_mode == ssl.CERT_NONE
    assert rc.QuicTransport("::1")._configuration().verify_mode == ssl.CERT_NONE
    assert rc.QuicTransport("runtara.example")._configuration().verify_mode != ssl.CERT_NONE
    assert rc.QuicTransport("10.0.0.5", skip_cert_verification=True)._configuration().verify_mode == ssl.CERT_NONE


# -- ids ----------------------------------------------------------------------------------------

ODD_IDS = ["it's \"quoted\"", "100%_done %s %% ?", "ünïcødé 🚀 ✓", "é" * 256, "x" * 512, "; DROP TABLE instances; --"]


@pytest.mark.parametrize("odd", ODD_IDS, ids=["quotes", "percent", "unicode", "512-bytes-2byte", "512-bytes",
                                              "sql"])
def test_odd_ids_round_trip_through_every_operation(server, odd):
    async def scenario():
        async with rc.Instance(odd, odd, server_addr=addr(server), heartbeat_interval_ms=0, env={}) as inst, \
                rc.Client(addr(server), env={}) as operator:
            assert inst.registration["instance_id"] == odd
            assert (await inst.checkpoint(odd, b"s")).found is False
            assert await inst.get_checkpoint(odd) == b"s"
            await operator.send_custom_signal(odd, odd, b"c")
            assert (await inst.checkpoint(odd, b"")).custom_signal == {"checkpoint_id": odd, "payload": b"c"}
            await inst.sleep(odd + "" if len(odd.encode()) < 512 else odd, 1)
            await inst.event(odd, b"e", checkpoint_id=odd)
            await inst.retry_attempt(odd, 1, odd)
            await operator.send_signal(odd, "pause")
            assert (await inst.poll_signals(odd, force=True))["signal"]["signal_type"] == "pause"
            assert await inst.ack("pause") == "suspended"
            status = await inst.status()
            assert status["instance_id"] == odd and status["tenant_id"] == odd and status["checkpoint_id"] == odd
            assert (await operator.list_instances(tenant_id=odd))["instances"][0]["instance_id"] == odd
            assert (await operator.list_checkpoints(odd))["checkpoints"][0]["checkpoint_id"] == odd
            events = (await operator.list_events(odd, event_type="custom", subtype=odd))["events"]
            assert events[0]["subtype"] == odd and events[0]["checkpoint_id"] == odd
            await inst.completed(odd.encode())
            assert (await inst.status())["output"] == odd.encode()
    run(scenario())


@pytest.mark.parametrize("bad", ["x" * 513, "é" * 256 + "x", "nul\x00inside", "", "x\nvictim", "esc\x1b[31m",
                                 "del\x7f", "c1\x9b"])
def test_ids_one_byte_over_or_with_nul_are_rejected(server, bad):
    async def scenario():
        transport = rc.QuicTransport(*server.address)
        for message in ({"op": "register_instance", "instance_id": bad, "tenant_id": "t"},
                        {"op": "register_instance", "instance_id": "i", "tenant_id": bad},
                        {"op": "checkpoint", "instance_id": "i", "checkpoint_id": bad, "state": b""},
                        {"op": "send_custom_signal", "instance_id": "i", "checkpoint_id": bad}):
            await raises("INVALID_REQUEST", transport.request(message))
        await transport.close()
    run(scenario())


# -- hostile input against the real server ------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
FIELDS = sorted({name for spec in rc.OPERATIONS.values() for name in spec} | {"token"})
hostile_requests = st.fixed_dictionaries(
    {"op": st.sampled_from(sorted(rc.OPERATIONS)) | st.text(max_size=12)},
    optional={name: msgpack_values | st.sampled_from(["i", "c", "t"]) for name in FIELDS})


class Probe:
    """One connection kept across hypothesis examples, on a loop of its own."""

    def __init__(self, server):
        self.loop = asyncio.new_event_loop()
        self.transport = rc.QuicTransport(*server.address)

    def send(self, data: bytes):
        async def go():
            return await (await self.transport._connection()).send_request(data)
        return self.loop.run_until_complete(asyncio.wait_for(go(), 30))

    def healthy(self) -> bool:
        reply = self.loop.run_until_complete(self.transport.request({"op": "health_check"}))
        return reply["healthy"] is True

    def close(self):
        self.loop.run_until_complete(self.transport.close())
        self.loop.close()


@pytest.fixture
def probe(server):
    probe = Probe(server)
    yield probe
    probe.close()


HYPOTHESIS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(data=st.binary(max_size=64) | st.builds(lambda n, t, rest: rc.FRAME_HEADER.pack(n, t) + rest,
                                               st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1),
                                               st.binary(max_size=64)))
def test_random_bytes_get_an_answer(probe, storage, data):
    before = snapshot(storage)
    frame_type, reply = probe.send(data)
    if frame_type == rc.FRAME_ERROR:
        assert reply["code"] in ("INVALID_REQUEST", "FRAME_TOO_LARGE", "UNAUTHORIZED") and reply["message"]
        assert snapshot(storage) == before
    assert probe.healthy()


@HYPOTHESIS
@given(message=hostile_requests)
def test_random_requests_are_answered_and_rejected_ones_change_nothing(probe, storage, message):
    before = snapshot(storage)
    frame_type, reply = probe.send(rc.encode_frame(rc.FRAME_REQUEST, message))
    assert frame_type in (rc.FRAME_RESPONSE, rc.FRAME_ERROR)
    if frame_type == rc.FRAME_ERROR:
        assert reply["code"] != "INTERNAL", reply
        assert snapshot(storage) == before
    assert probe.healthy()


def test_deep_nesting_wrong_types_and_oversized_ids(probe, storage):
    before = snapshot(storage)
    cases = [
        rc.FRAME_HEADER.pack(200_001, 1) + b"\x91" * 200_000 + b"\xc0",
        rc.encode_frame(1, {"op": "checkpoint", "instance_id": ["i"], "checkpoint_id": {"c": 1}, "state": 5}),
        rc.encode_frame(1, {"op": "register_instance", "instance_id": "i" * 100_000, "tenant_id": "t"}),
        rc.encode_frame(1, {"op": "sleep", "instance_id": "i", "checkpoint_id": "c", "state": b"",
                            "duration_ms": 2**63 - 1}),
    ]
    for data in cases:
        frame_type, reply = probe.send(data)
        assert frame_type == rc.FRAME_ERROR and reply["code"] == "INVALID_REQUEST"
    assert snapshot(storage) == before and probe.healthy()


# -- attacks on the transport, against a server process whose memory we can read ----------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server_process(database_url, tmp_path):
    port, process = start_server_process(database_url, tmp_path)
    yield port, process
    stop_server_process(process)


async def answered(port: int, connections: int = 3) -> bool:
    async def one():
        transport = rc.QuicTransport("127.0.0.1", port)
        try:
            return (await transport.request({"op": "health_check"}))["healthy"]
        finally:
            await transport.close()
    return all(await asyncio.gather(*(one() for _ in range(connections))))


async def open_connections(port: int, count: int) -> list:
    transports = [rc.QuicTransport("127.0.0.1", port) for _ in range(count)]
    protocols = await asyncio.gather(*(t._connection() for t in transports))
    return list(zip(transports, protocols))


def test_unfinished_streams_and_resets_hold_bounded_memory(server_process):
    port, process = server_process

    async def attack():
        baseline = rss_mb(process.pid)
        connections = await open_connections(port, 20)
        for _, protocol in connections:  # 20 x 100 streams, each a few bytes of a frame, never finished
            for _ in range(100):
                stream_id = protocol._quic.get_next_available_stream_id()
                protocol._quic.send_stream_data(stream_id, b"\x00\x00\x01", end_stream=False)
            protocol.transmit()
        await asyncio.sleep(0.5)
        assert await answered(port)
        for _, protocol in connections:  # reset half-written frames mid-way
            for _ in range(20):
                stream_id = protocol._quic.get_next_available_stream_id()
                protocol._quic.send_stream_data(stream_id, rc.FRAME_HEADER.pack(1000, 1) + b"\x80" * 500)
                protocol._quic.reset_stream(stream_id, 7)
            protocol.transmit()
        await asyncio.sleep(0.5)
        assert await answered(port)
        during = rss_mb(process.pid)
        for transport, _ in connections:
            await transport.close()
        await asyncio.sleep(0.5)
        assert await answered(port)
        return baseline, during, rss_mb(process.pid)

    baseline, during, after = run(attack())
    assert during - baseline < 60 and after - baseline < 40, (baseline, during, after)


def test_unfinished_frames_cannot_fill_the_memory(database_url, tmp_path):
    # With 2 MiB messages a connection may hold 2 MiB of unfinished requests and the server 8 MiB. Measured
    # on this attack: about 20 MB of growth with those bounds, 80 MB after 4 s (and climbing) without them.
    port, process = start_server_process(database_url, tmp_path, "--max-message-bytes", str(2 * 2**20))

    async def attack():
        baseline = rss_mb(process.pid)
        connections = await open_connections(port, 16)
        chunk = b"\x00" * 65536
        for _, protocol in connections:  # 16 connections x 4 streams x 2 MiB, never finished: 128 MiB
            for _ in range(4):
                stream_id = protocol._quic.get_next_available_stream_id()
                protocol._quic.send_stream_data(stream_id, rc.FRAME_HEADER.pack(2 * 2**20 - 100, 1))
                for _ in range(32):
                    protocol._quic.send_stream_data(stream_id, chunk)
            protocol.transmit()
        peak = 0.0
        for _ in range(8):
            await asyncio.sleep(0.5)
            peak = max(peak, rss_mb(process.pid))
        assert await answered(port)
        for transport, _ in connections:
            await transport.close()
        await asyncio.sleep(1)
        return baseline, peak, rss_mb(process.pid)

    try:
        baseline, peak, after = run(attack())
    finally:
        stop_server_process(process)
    assert peak - baseline < 40 and after - baseline < 40, (baseline, peak, after)


def test_oversized_frame_is_answered_then_the_stream_stopped(server_process):
    port, _ = server_process

    async def attack():
        transport = rc.QuicTransport("127.0.0.1", port)
        protocol = await transport._connection()
        frame_type, reply = await protocol.send_request(b"\xff\xff\xff\xff\x00\x01" + b"\x00" * 200_000)
        assert frame_type == rc.FRAME_ERROR and reply["code"] == "FRAME_TOO_LARGE"
        assert (await transport.request({"op": "health_check"}))["healthy"]
        await transport.close()
    run(attack())


def test_hundreds_of_handshakes_at_once(server_process):
    port, process = server_process

    async def attack():
        transports = [rc.QuicTransport("127.0.0.1", port) for _ in range(200)]
        replies = await asyncio.gather(*(t.request({"op": "health_check"}) for t in transports),
                                       return_exceptions=True)
        await asyncio.gather(*(t.close() for t in transports))
        return replies

    replies = run(attack())
    answered_ok = [r for r in replies if isinstance(r, dict) and r["healthy"]]
    assert len(answered_ok) >= 190, [r for r in replies if not isinstance(r, dict)][:3]
    assert run(answered(port)) and process.poll() is None


def test_an_idle_connection_keeps_no_handshake_state_and_shares_its_frame_table(server):
    """Memory per connection (issue 16): what only the handshake needed (the TLS buffers and context, the keys
    of discarded epochs) goes once it is done, two connection ids serve each way, and aioquic's table of frame
    handlers is one table for all connections, which binds each connection's own."""
    from aioquic.tls import Epoch

    async def scenario():
        transports = [rc.QuicTransport(*server.address) for _ in range(2)]
        for transport in transports:
            assert (await transport.request({"op": "health_check"}))["healthy"]
        first, second = list(server.server.connections)
        for connection in (first, second):
            quic = connection._quic
            assert [buffer.capacity for buffer in quic._crypto_buffers.values()] == [0, 0, 0]
            assert len(quic._host_cids) == 2 and len(quic._peer_cid_available) == 1
            assert quic._cryptos[Epoch.ONE_RTT].send.is_valid()
            assert not any(quic._cryptos[epoch].recv.is_valid() for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE))
        assert first._quic.tls is second._quic.tls
        assert all(first._quic._cryptos[epoch] is second._quic._cryptos[epoch]
                   for epoch in (Epoch.INITIAL, Epoch.ZERO_RTT, Epoch.HANDSHAKE))
        tables = [connection._quic._QuicConnection__frame_handlers for connection in (first, second)]
        assert tables[0].table is tables[1].table and len(tables[0].table) == 33
        for connection, table in zip((first, second), tables):
            handler, epochs = table[0x08]  # a STREAM frame
            assert handler == connection._quic._handle_stream_frame and epochs is tables[0].table[0x08][1]
        with pytest.raises(KeyError):  # what aioquic turns into "Unknown frame type"
            tables[0][0x99]
        for transport in transports:  # and they still answer
            assert (await transport.request({"op": "health_check"}))["healthy"]
            await transport.close()

    run(scenario())


@pytest.mark.parametrize("messages", [(b"\x04\x00\x00\x00", b"\x01\x00\x00\x04junk"), (b"\x04\x00",)],
                         ids=["a session ticket and a client hello", "the start of a message"])
def test_handshake_messages_after_the_handshake_close_only_that_connection(server, messages):
    """The server keeps no TLS state once the handshake is done: a peer that sends handshake data afterwards,
    even an incomplete message, has its connection closed, and the server serves everyone else."""
    from aioquic.tls import Epoch

    async def scenario():
        hostile, other = rc.QuicTransport(*server.address), rc.QuicTransport(*server.address)
        protocol = await hostile._connection()
        assert (await other.request({"op": "health_check"}))["healthy"]
        quic = protocol._quic
        for message in messages:
            quic._crypto_streams[Epoch.ONE_RTT].sender.write(message)
        protocol.transmit()
        await asyncio.wait_for(protocol.wait_closed(), 5)
        assert quic._close_event is not None and quic._close_event.error_code >= 0x100  # a TLS alert
        assert (await other.request({"op": "health_check"}))["healthy"]
        for _ in range(250):  # the server forgets the connection when its closing period (3 PTO) ends
            if len(server.server.connections) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(server.server.connections) == 1
        await other.close()
        await hostile.close()

    run(scenario())


def test_stream_buffers_are_freed_on_finish_reset_and_close(server):
    held = lambda: sum(connection.buffered for connection in list(server.server.connections))  # noqa: E731

    async def wait_for(expected):
        for _ in range(100):
            if held() == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"server holds {held()} bytes, expected {expected}")

    async def scenario():
        transport = rc.QuicTransport(*server.address)
        protocol = await transport._connection()
        streams = []
        for _ in range(10):
            stream_id = protocol._quic.get_next_available_stream_id()
            protocol._quic.send_stream_data(stream_id, rc.FRAME_HEADER.pack(1000, 1) + b"\x80" * 94)
            streams.append(stream_id)
        protocol.transmit()
        await wait_for(1000)
        for stream_id in streams[:4]:
            protocol._quic.reset_stream(stream_id, 1)
        protocol.transmit()
        await wait_for(600)
        stream_id = streams[4]  # finishing a frame frees its buffer (the answer is an error: it is no request)
        protocol._quic.send_stream_data(stream_id, b"\x00" * 900, end_stream=True)
        protocol.transmit()
        await wait_for(500)
        await transport.close()
        await wait_for(0)
        fresh = rc.QuicTransport(*server.address)
        assert (await fresh.request({"op": "health_check"}))["healthy"]
        await fresh.close()
    run(scenario())


def test_servers_starting_together_make_one_certificate(tmp_path):
    import concurrent.futures
    settings = rc.Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pairs = set(pool.map(lambda _: rc.ensure_certificate(settings), range(8)))
    assert len(pairs) == 1
    cert = (tmp_path / rc.TLS_CERT_FILE).read_bytes()
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----") and cert.rstrip().endswith(b"-----END CERTIFICATE-----")
    assert (tmp_path / rc.TLS_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".runtara-")) == [".runtara-tls.lock"]


# -- what a review broke (issue 14) -------------------------------------------------------------


def test_a_token_cannot_be_shared_by_two_instances_through_a_newline(secured):
    """The token of tenant `acme`, instance `x\nvictim` is the HMAC of `acme\nx\nvictim`, which is also
    tenant `acme\nx`, instance `victim`: ids refuse control characters, so neither pair exists."""
    async def scenario():
        token = rc.instance_token(SECRET, "acme", "x\nvictim")
        for tenant_id, instance_id in (("acme", "x\nvictim"), ("acme\nx", "victim")):
            error = await raises("INVALID_REQUEST", instance(secured, instance_id, tenant_id, token=token).register())
            assert "control characters" in str(error)
    run(scenario())


def test_a_finished_instance_takes_no_events_heartbeats_or_retries(server, storage):
    async def scenario():
        async with instance(server, token=None) as inst:
            await inst.completed(b"done")
            before = await inst.status()
            for call in (inst.event("late", b"x"), inst.heartbeat(), inst.retry_attempt("c", 1, "late"),
                         inst.failed("late"), inst.suspended()):
                await raises("INVALID_STATE", call)
            after = await inst.status()
            assert after == before and after["heartbeat_at_ms"] == before["heartbeat_at_ms"]
    run(scenario())
    assert storage.read(rc.Tx.count_events, "i-1", "custom").result() == 0


def test_a_batch_is_bounded(server):
    async def scenario():
        async with instance(server, token=None) as inst:
            event = {"instance_id": "i-1", "event_type": "custom", "subtype": "s"}
            error = await raises("INVALID_REQUEST", inst.call("instance_event_batch",
                                                               events=[event] * (rc.MAX_BATCH_EVENTS + 1)))
            assert str(rc.MAX_BATCH_EVENTS) in str(error)
            reply = await inst.call("instance_event_batch", events=[event] * rc.MAX_BATCH_EVENTS)
            assert reply["accepted"] == rc.MAX_BATCH_EVENTS
    run(scenario())


def test_the_instance_limit_holds_under_concurrent_registrations(server_factory, storage):
    """Count-then-start under READ COMMITTED let 4 to 7 of 8 in with a limit of 2 on PostgreSQL."""
    server = server_factory(max_concurrent_instances=2)

    async def scenario(round):
        instances = [instance(server, f"i-{round}-{n}", token=None) for n in range(8)]
        outcomes = await asyncio.gather(*(inst.register() for inst in instances), return_exceptions=True)
        assert sum(isinstance(outcome, dict) for outcome in outcomes) == 2, outcomes
        assert all(isinstance(outcome, rc.Overloaded) for outcome in outcomes if not isinstance(outcome, dict))
        for inst in instances:
            await inst.close()
    for round in range(3):
        run(scenario(round))
        assert storage.read(rc.Tx.count_running).result() == 2
        storage.write(lambda tx: tx.rows("UPDATE instances SET status = 'completed'")).result()


STEP_ID_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import runtara_core as rc

class Order:
    pass

def charge(*args, **kwargs):
    pass

print(rc._step_id(charge, ({{"apple", "pear", "plum"}}, {{"b": 2, "a": 1}}, (1, b"x", None, 2.5, True)),
                  {{"tags": frozenset({{"x", "y"}})}}))
try:
    rc._step_id(charge, (Order(),), {{}})
except TypeError as exc:
    print(exc)
"""


def test_a_default_step_id_is_the_same_in_every_process():
    """repr() of a set or a plain object differs between processes, so a restarted workflow gave a step another
    id and ran it again. The id comes from a canonical encoding; anything else must be named."""
    script = STEP_ID_SCRIPT.format(root=str(ROOT))
    outputs = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                              capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3, 4)}
    assert len(outputs) == 1, outputs
    step_id, error = outputs.pop().splitlines()
    assert step_id.startswith("charge:")
    assert "step charge" in error and "Order" in error and '@instance.durable("charge")' in error
    assert rc._step_id(len, ({1: "a", 2: "b"},), {}) != rc._step_id(len, ([[1, "a"], [2, "b"]],), {})
    assert rc._step_id(len, ({1, 2},), {}) != rc._step_id(len, ([1, 2],), {})


def test_the_secret_can_come_from_a_file(server_factory, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    settings = rc.Settings.from_env(env={"RUNTARA_SECRET_FILE": str(secret_file)})
    assert settings.secret == SECRET
    for env, why in (({"RUNTARA_SECRET_FILE": str(tmp_path / "missing")}, "cannot read"),
                     ({"RUNTARA_SECRET_FILE": str(secret_file), "RUNTARA_SECRET": "x"}, "not both")):
        with pytest.raises(ValueError, match=why):
            rc.Settings.from_env(env=env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        rc.Settings.from_env(env={"RUNTARA_SECRET_FILE": str(tmp_path / "empty")})
    server = server_factory(secret=settings.secret)

    async def scenario():
        async with rc.Client(addr(server), env={"RUNTARA_SECRET_FILE": str(secret_file)}) as operator:
            assert (await operator.health_check())["healthy"] is True
    run(scenario())
    result = subprocess.run([sys.executable, str(ROOT / "runtara_core.py"), "token", "--admin"], capture_output=True,
                            text=True, env={**os.environ, "RUNTARA_SECRET_FILE": str(secret_file)})
    assert result.stdout.strip() == rc.admin_token(SECRET)


def test_a_hostile_payload_costs_memory_of_the_order_of_its_size(server_process):
    """16 MiB of empty maps nested in arrays, in an unauthenticated health_check's ignored key, took the server
    from 66 MiB to 1.2 GB. The decoder refuses what no operation needs as it meets it."""
    port, process = server_process
    inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x80" * 1000  # an array of 1000 empty maps
    value = b"\xdc" + (1000).to_bytes(2, "big") + inner * 1000     # 1000 of those: a million maps
    payload = b"\x8f" + msgpack.packb("op") + msgpack.packb("health_check") + b"".join(
        msgpack.packb(f"x{n}") + value for n in range(14))        # 14 million maps in 14 MiB
    frame = rc.FRAME_HEADER.pack(len(payload), rc.FRAME_REQUEST) + payload

    async def attack():
        baseline = rss_mb(process.pid)
        transport = rc.QuicTransport("127.0.0.1", port)
        try:
            frame_type, reply = await raw(transport, frame)
        finally:
            await transport.close()
        return baseline, rss_mb(process.pid), frame_type, reply
    baseline, after, frame_type, reply = run(attack())
    assert frame_type == rc.FRAME_ERROR and reply["code"] == "INVALID_REQUEST", reply
    assert after - baseline < 3 * len(frame) / 2**20, (baseline, after)  # the stream's own bytes, and a little


def test_answers_fit_the_frame_maximum_and_consume_nothing_they_do_not_carry(server_factory, storage):
    """A large state beside a large custom signal made an answer over the maximum, which the SDK refuses, and the
    custom signal, consumed by the committed transaction, was lost. Listings were unbounded too."""
    limit = 2**20
    server = server_factory(max_message_bytes=limit)

    async def scenario():
        async with instance(server, token=None) as inst, rc.Client(addr(server), env={}) as operator:
            await inst.checkpoint("big", b"s" * (limit * 3 // 5))
            await operator.send_custom_signal("i-1", "big", b"c" * (limit // 2))
            answer = await inst.call("checkpoint", instance_id="i-1", checkpoint_id="big", state=b"")  # a replay
            assert answer["found"] and len(answer["state"]) == limit * 3 // 5
            assert "custom_signal" not in answer and len(msgpack.packb(answer)) <= limit  # it stays for a poll
            polled = await inst.poll_signals("big")
            assert polled["custom_signal"]["payload"] == b"c" * (limit // 2)
            assert "custom_signal" not in await inst.poll_signals("big")  # delivered once

            await operator.send_signal("i-1", "pause", b"p" * rc.MAX_SIGNAL_PAYLOAD)
            await raises("INVALID_REQUEST", operator.send_signal("i-1", "pause", b"p" * (rc.MAX_SIGNAL_PAYLOAD + 1)))
            nearly_full = b"f" * (limit - rc.ANSWER_RESERVE)  # the most a stored value may hold
            await raises("INVALID_REQUEST", inst.checkpoint("over", nearly_full + b"f"))
            await inst.checkpoint("full", nearly_full)
            replayed = await inst.call("checkpoint", instance_id="i-1", checkpoint_id="full", state=b"")
            assert replayed["state"] == nearly_full and "pending_signal" not in replayed  # no room: it waits
            assert (await inst.poll_signals(force=True))["signal"]["signal_type"] == "pause"  # and is still there

            for n in range(3):
                await inst.event(f"big-{n}", bytes([n]) * (limit * 9 // 10))
            listed = await operator.list_events("i-1", event_type="custom")
            assert len(listed["events"]) == 3 and listed["total_count"] == 3
            for event in listed["events"]:
                assert len(event["payload"]) == rc.PREVIEW_BYTES and event["payload_size"] == limit * 9 // 10
    run(scenario())


def test_slow_unauthenticated_clients_never_lock_out_a_holder_of_a_token(server_factory):
    """Four connections holding almost complete 1 MiB frames made every registration OVERLOADED for as long as
    they liked. Now a connection that has shown no valid token may hold only small frames, from a pool of its
    own, and an unfinished request that receives nothing for the stall timeout is reset."""
    server = server_factory(secret=SECRET, max_message_bytes=2**20, stall_timeout_ms=4000)
    pools = server.server

    async def scenario():
        hanging = await open_connections(server.address[1], 100)
        for _, protocol in hanging:  # each holds an unfinished frame just under the small limit, and waits
            stream_id = protocol._quic.get_next_available_stream_id()
            protocol._quic.send_stream_data(stream_id, rc.FRAME_HEADER.pack(rc.UNTRUSTED_FRAME_BYTES - 100, 1)
                                            + b"\x00" * (rc.UNTRUSTED_FRAME_BYTES - 1000))
            protocol.transmit()
        big = hanging[0][1]
        stream_id = big._quic.get_next_available_stream_id()
        refused = big.send_request(rc.FRAME_HEADER.pack(2**20 - 100, 1) + b"\x00" * 100_000)
        frame_type, reply = await refused  # a large frame before any token is refused at once
        assert frame_type == rc.FRAME_ERROR and reply["code"] == "FRAME_TOO_LARGE" and "register" in reply["message"]
        for _ in range(30):  # the hanging bytes arrive
            if pools.untrusted.held >= 95 * (rc.UNTRUSTED_FRAME_BYTES - 1000 - rc.CONNECTION_ALLOWANCE):
                break
            await asyncio.sleep(0.1)
        assert pools.untrusted.held >= 95 * (rc.UNTRUSTED_FRAME_BYTES - 1000 - rc.CONNECTION_ALLOWANCE)
        async with instance(server) as inst:  # the holder of a token gets in, and may send large frames
            assert (await inst.checkpoint("large", b"x" * (2**20 - 4096))).found is False
        async with rc.Client(addr(server), env={"RUNTARA_SECRET": SECRET}) as operator:
            await operator.send_custom_signal("i-1", "c", b"y" * (2**20 - 4096))
        for _ in range(100):  # the stalled requests are reset, and their bytes freed
            if pools.untrusted.held == 0:
                break
            await asyncio.sleep(0.1)
        assert pools.untrusted.held == 0 and pools.trusted.held == 0
        await asyncio.gather(*(transport.close() for transport, _ in hanging))
    run(scenario())


def test_the_generated_certificate_passes_a_verifier_as_strict_as_webpki(tmp_path):
    """rustls refused the generated certificate (CaUsedAsEndEntity): it was its own CA. It is an end-entity
    certificate now, which cryptography's X.509 verifier (webpki's rules) accepts as its own trust anchor for
    every name the server answers to; one made by an earlier version is replaced."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    settings = rc.Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
    cert_file, _ = rc.ensure_certificate(settings)
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("::1"))):
        verifier = PolicyBuilder().store(Store([cert])).build_server_verifier(name)
        assert verifier.verify(cert, [])[0] == cert

    old = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    made_before = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.subject)
                   .public_key(key.public_key()).serial_number(1).not_valid_before(old.not_valid_before_utc)
                   .not_valid_after(old.not_valid_after_utc)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    Path(cert_file).write_bytes(made_before.public_bytes(serialization.Encoding.PEM))
    replaced, _ = rc.ensure_certificate(settings)
    renewed = x509.load_pem_x509_certificate(Path(replaced).read_bytes())
    assert not renewed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

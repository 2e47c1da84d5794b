"""runtara-core: a durable execution engine in one module.

Workflow instances talk to it over QUIC (see PROTOCOL.md) to save checkpoints, sleep durably,
report events and receive cancel/pause/resume signals; it keeps all of that in SQLite (WAL,
through apsw) or PostgreSQL (psycopg 3), chosen by the database URL.

Sections, each using only those above it:

    1. Settings      5. Core semantics
    2. Errors        6. QUIC server
    3. Wire format   7. Client SDK (QUIC and embedded backends)
    4. Storage       8. CLI, main()

Copyright (C) 2026 the runtara-core authors. AGPL-3.0-or-later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import hmac
import ipaddress
import logging
import os
import queue
import re
import shlex
import signal as signal_module
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

__version__ = "0.1.0"
__all__ = [
    "Settings", "RuntaraError", "InvalidRequest", "FrameTooLarge", "Unauthorized", "InstanceNotFound",
    "CheckpointNotFound", "TenantMismatch", "InvalidState", "Overloaded", "Superseded", "StorageError",
    "ConnectionLost", "Interrupted", "Cancelled", "Paused", "Suspended", "Instance", "CheckpointResult", "Client",
    "Worker", "Server", "ServerThread", "QuicTransport", "EmbeddedTransport", "open_storage", "main",
]
log = logging.getLogger("runtara")


# =============================================================================================
# 1. Settings
# =============================================================================================

DEFAULT_DATABASE_URL = "sqlite:///runtara.db"
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def counted(count: int, noun: str) -> str:
    """'1 write', '2 writes': for messages a person reads."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def within(awaitable, seconds: float):
    """Await with a deadline, raising asyncio.TimeoutError past it. Unlike asyncio.wait_for on Python 3.10
    and 3.11, a cancellation that arrives just as the awaited work finishes is never swallowed, and a timed-out
    task gets at most a second to finish its cancellation: the caller never waits past the bound for good."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        raise asyncio.TimeoutError
    return task.result()


def _env_int(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {value}")
    return value


def secret_from(env) -> str | None:
    """RUNTARA_SECRET, or the first line of the file RUNTARA_SECRET_FILE names (read once, at start: a file
    kept from other users is safer than the environment, which some tools print)."""
    secret, path = env.get("RUNTARA_SECRET") or None, env.get("RUNTARA_SECRET_FILE") or None
    if secret and path:
        raise ValueError("set RUNTARA_SECRET or RUNTARA_SECRET_FILE, not both")
    if path is None:
        return secret
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read RUNTARA_SECRET_FILE {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"RUNTARA_SECRET_FILE {path} is empty")
    return secret


@dataclasses.dataclass
class Settings:
    """Everything the server reads from its environment; `serve` options override it."""

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8001
    tls_cert: str | None = None
    tls_key: str | None = None
    secret: str | None = None
    insecure: bool = False
    max_message_bytes: int = MAX_PAYLOAD_BYTES
    max_concurrent_instances: int = 32
    sleep_inline_max_ms: int = 60_000
    heartbeat_timeout_ms: int = 120_000
    wake_interval_ms: int = 1_000
    launch_command: str | None = None  # for any workflow without a command of its own
    workflow_commands: dict[str, str] = dataclasses.field(default_factory=dict)  # workflow name -> command
    launch_timeout_ms: int = 30_000
    launch_max_attempts: int = 5
    max_restarts: int = 5
    executor: str = "local"  # the name in-process runs are claimed under: one live process per name
    stall_timeout_ms: int = 10_000  # an unfinished request that receives nothing for this long is reset
    metrics_addr: str | None = None  # where Prometheus metrics are served: PORT (on 127.0.0.1) or HOST:PORT
    sqlite_synchronous: str = "FULL"
    event_loop: str = "auto"  # what `serve` runs on: uvloop when installed ("auto"), or "uvloop", "asyncio"

    # The variable each setting is read from; `secret` comes from secret_from(), the rest have no variable.
    VARIABLES = {"database_url": "RUNTARA_DATABASE_URL", "host": "RUNTARA_HOST", "port": "RUNTARA_QUIC_PORT",
                 "tls_cert": "RUNTARA_TLS_CERT", "tls_key": "RUNTARA_TLS_KEY",
                 "max_message_bytes": "RUNTARA_MAX_MESSAGE_BYTES",
                 "max_concurrent_instances": "RUNTARA_MAX_CONCURRENT_INSTANCES",
                 "sleep_inline_max_ms": "RUNTARA_SLEEP_INLINE_MAX_MS",
                 "heartbeat_timeout_ms": "RUNTARA_HEARTBEAT_TIMEOUT_MS", "wake_interval_ms": "RUNTARA_WAKE_INTERVAL_MS",
                 "launch_command": "RUNTARA_LAUNCH_COMMAND", "launch_timeout_ms": "RUNTARA_LAUNCH_TIMEOUT_MS",
                 "launch_max_attempts": "RUNTARA_LAUNCH_MAX_ATTEMPTS", "max_restarts": "RUNTARA_MAX_RESTARTS",
                 "executor": "RUNTARA_EXECUTOR", "stall_timeout_ms": "RUNTARA_STALL_TIMEOUT_MS",
                 "sqlite_synchronous": "RUNTARA_SQLITE_SYNCHRONOUS", "event_loop": "RUNTARA_EVENT_LOOP",
                 "metrics_addr": "RUNTARA_METRICS_ADDR"}

    @classmethod
    def from_env(cls, env=None, names: dict[str, str] | None = None, **overrides) -> "Settings":
        """Settings from RUNTARA_* variables (`env`, else os.environ), with `overrides` that are not None.
        A value the server cannot use is a ValueError naming where it came from: the variable, else the
        override's entry in `names` (the CLI's `--port`), else the keyword."""
        env = os.environ if env is None else env
        given = {key: value for key, value in overrides.items() if value is not None}
        values = {"secret": secret_from(env)}
        for field in dataclasses.fields(cls):
            variable = cls.VARIABLES.get(field.name)
            if field.name in given or variable is None or not env.get(variable):
                continue
            values[field.name] = (_env_int(env, variable, field.default) if field.type == "int" else
                                  env[variable].upper() if field.name == "sqlite_synchronous" else
                                  env[variable].lower() if field.name == "event_loop" else env[variable])
        settings = cls(**{**values, **given})
        # Named where it came from: the variable when it was set, else the option (or keyword) one would give.
        settings.validate(lambda field: cls.VARIABLES[field] if field in values and field not in given
                          else (names or {}).get(field, field))
        return settings

    def validate(self, name: Callable[[str], str] = lambda field: Settings.VARIABLES.get(field, field)) -> None:
        """Raise ValueError, naming the setting as `name(field)` says, for a value the server cannot use."""
        for field in dataclasses.fields(self):
            if field.type == "int" and getattr(self, field.name) < 0:
                raise ValueError(f"{name(field.name)} must not be negative, not {getattr(self, field.name)}")
        if self.max_concurrent_instances < 1:
            raise ValueError(f"{name('max_concurrent_instances')} must be at least 1,"
                             f" not {self.max_concurrent_instances}")
        if not 1 <= self.max_message_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"{name('max_message_bytes')} must be between 1 and {MAX_PAYLOAD_BYTES}")
        if self.sqlite_synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"{name('sqlite_synchronous')} must be FULL or NORMAL, not {self.sqlite_synchronous!r}")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError(f"{name('event_loop')} must be auto, uvloop or asyncio, not {self.event_loop!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{name('port')} must be a UDP port number, not {self.port}")
        for workflow, command in ((None, self.launch_command), *self.workflow_commands.items()):
            if command is None:
                continue
            typed = f"{workflow}={command}" if workflow else command
            try:
                words = shlex.split(command)
            except ValueError as exc:  # an unclosed quote
                raise ValueError(f"{name('launch_command')} {typed!r}: {str(exc).lower()}") from None
            if not words:
                raise ValueError(f"{name('launch_command')} {typed!r}: the command is empty")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{name('tls_cert')} and {name('tls_key')} must be set together")
        for field in ("tls_cert", "tls_key"):
            if getattr(self, field) and not os.path.isfile(getattr(self, field)):
                raise ValueError(f"{name(field)}: no file {getattr(self, field)}")
        if self.tls_cert:
            _check_tls_pair(self.tls_cert, self.tls_key, name)
        if self.metrics_addr is not None:
            try:
                self.metrics_address
            except ValueError:
                raise ValueError(f"{name('metrics_addr')} must be PORT or HOST:PORT,"
                                 f" not {self.metrics_addr!r}") from None

    @property
    def metrics_address(self) -> tuple[str, int]:
        """(host, port) of the metrics endpoint: a bare port listens on loopback only, like the QUIC port."""
        match = re.fullmatch(r"(?:\[([^\]]+)\]:|([^:\[\]]+):)?([0-9]+)", self.metrics_addr.strip(), re.ASCII)
        if not match or int(match[3]) > 65535:
            raise ValueError(f"no port in {self.metrics_addr!r}")
        return match[1] or match[2] or "127.0.0.1", int(match[3])

    def command_for(self, workflow: str) -> str | None:
        """The launch command for `workflow`: its own, else the default, else None."""
        return self.workflow_commands.get(workflow, self.launch_command)

    @property
    def launched_workflows(self) -> tuple[str, ...] | None:
        """The workflows the server launches: None for all of them (a default command), else their names."""
        return None if self.launch_command else tuple(self.workflow_commands)


def _check_tls_pair(cert_path: str, key_path: str, name: Callable[[str], str]) -> None:
    """Refuse, before anything is opened, a certificate or key that is not PEM, and a key that is not the
    certificate's (TLS would accept both, and every handshake would then fail)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name('tls_cert')} {cert_path}: not a PEM certificate ({_first_line(exc)})") from None
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: the key has a password
        raise ValueError(f"{name('tls_key')} {key_path}: not an unencrypted PEM private key"
                         f" ({_first_line(exc)})") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
        raise ValueError(f"{name('tls_key')} {key_path} is not the key of {name('tls_cert')} {cert_path}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _reason(exc: OSError) -> str:
    """An OSError's reason without its "[Errno N]" (uvloop's own carries the system's as its cause)."""
    if exc.strerror is None and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    return exc.strerror or str(exc)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_server_addr(addr: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' (port 8001) into (host, port)."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", addr.strip())
    if not match:
        raise ValueError(f"server address must be host:port, not {addr!r}")
    host = match[1] or match[3]
    port = int(match[2] or match[4] or 8001)
    if not 0 < port < 65536:
        raise ValueError(f"server address {addr!r} has no valid port")
    return host, port


WORKFLOW_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_launch(values) -> tuple[str | None, dict[str, str]]:
    """`--launch` values: 'NAME=CMD' gives workflow NAME its command, anything else is the default command.
    NAME is letters, digits and _.- only, so a command like `run.py --flag=1` stays a command."""
    default, commands = None, {}
    for value in values:
        name, equals, command = value.partition("=")
        if equals and WORKFLOW_NAME.fullmatch(name):
            commands[name] = command
        else:
            default = value
    return default, commands


# =============================================================================================
# 2. Errors
# =============================================================================================


class Interrupted(Exception):
    """Raised inside a workflow when it must stop now; `async with Instance(...)` absorbs it."""


class RuntaraError(Exception):
    """An error with a wire code (PROTOCOL.md section 3); `str(error)` is the sentence for people."""

    code = "INTERNAL"


class InvalidRequest(RuntaraError):
    """The request is malformed: not a map, an unknown op, a missing or wrong field."""

    code = "INVALID_REQUEST"


class FrameTooLarge(RuntaraError):
    """The frame announces more than the maximum payload."""

    code = "FRAME_TOO_LARGE"


class Unauthorized(RuntaraError):
    """The token is missing or wrong, or the connection is bound to another instance."""

    code = "UNAUTHORIZED"


class InstanceNotFound(RuntaraError):
    """No instance has this id."""

    code = "INSTANCE_NOT_FOUND"


class CheckpointNotFound(RuntaraError):
    """The instance has no checkpoint with this id."""

    code = "CHECKPOINT_NOT_FOUND"


class TenantMismatch(RuntaraError):
    """The instance belongs to another tenant."""

    code = "TENANT_MISMATCH"


class InvalidState(RuntaraError):
    """The operation is not allowed in the instance's status (or with its pending signal)."""

    code = "INVALID_STATE"


class Overloaded(RuntaraError):
    """The server is full: RUNTARA_MAX_CONCURRENT_INSTANCES instances run or are being launched."""

    code = "OVERLOADED"


class Superseded(RuntaraError, Interrupted):
    """The request named a run that is no longer the instance's newest: another process took it over."""

    code = "SUPERSEDED"


class StorageError(RuntaraError):
    """The database could not be opened, migrated or reached."""


class ConnectionLost(RuntaraError):
    """The client's connection to the server failed or closed before the answer came."""


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (InvalidRequest, FrameTooLarge, Unauthorized, InstanceNotFound, CheckpointNotFound,
                TenantMismatch, InvalidState, Overloaded, Superseded, RuntaraError)
}


def error_from_wire(code: str, message: str) -> RuntaraError:
    error = ERRORS_BY_CODE.get(code, RuntaraError)(message)
    error.code = code  # keep a code this version does not know
    return error


# =============================================================================================
# 3. Wire format: frames and messages, pure functions over bytes
# =============================================================================================

FRAME_HEADER = struct.Struct(">IH")
FRAME_REQUEST, FRAME_RESPONSE, FRAME_ERROR = 1, 2, 6
FRAME_TYPES = (FRAME_REQUEST, FRAME_RESPONSE, FRAME_ERROR)
ALPN = "runtara/1"
MAX_ID_BYTES = 512
MAX_BATCH_EVENTS = 1000  # one batch is one transaction: bounded, so that no request holds the writer for long
MAX_SIGNAL_PAYLOAD = 64 * 1024  # a signal's payload rides in every checkpoint answer until acknowledged
PREVIEW_BYTES = 4096  # how much of an event's payload (or an error) a listing carries
ANSWER_RESERVE = 4096  # room an answer keeps for its keys and ids beside large values (a tiny maximum: a quarter)

STATUSES = ("pending", "running", "suspended", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
ACTIVE = ("pending", "running", "suspended")
SIGNAL_TYPES = ("cancel", "pause", "resume")
EVENT_TYPES = ("heartbeat", "completed", "failed", "suspended", "custom")
STORED_EVENT_TYPES = ("created", "started", "resumed", "completed", "failed", "suspended", "custom", "signal", "retry",
                      "launched", "exited", "launch_failed", "restart", "forked", "forked_from")  # what events lists
KNOWN_EVENT_TYPES = tuple(dict.fromkeys(EVENT_TYPES + STORED_EVENT_TYPES))  # what a listing may ask for


def encode_frame(frame_type: int, message: dict) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return FRAME_HEADER.pack(len(payload), frame_type) + payload


def encode_error(error: RuntaraError) -> bytes:
    return encode_frame(FRAME_ERROR, {"code": error.code, "message": str(error)})


class FrameReader:
    """Collects one frame from a stream's bytes; rejects it as early as the bytes allow.

    feed() returns the (frame_type, message) once the frame is whole and the stream finished,
    None while more is needed, and raises InvalidRequest / FrameTooLarge for a bad frame.
    """

    __slots__ = ("max_payload", "buffer", "length", "frame_type")

    def __init__(self, max_payload: int = MAX_PAYLOAD_BYTES):
        self.max_payload = max_payload
        self.buffer = bytearray()
        self.length = None
        self.frame_type = None

    def feed(self, data: bytes, end: bool):
        self.buffer += data
        if self.length is None and len(self.buffer) >= FRAME_HEADER.size:
            self.length, self.frame_type = FRAME_HEADER.unpack_from(self.buffer)
            if self.length > self.max_payload:
                raise FrameTooLarge(f"frame announces {self.length} bytes; the maximum is {self.max_payload}")
            if self.frame_type not in FRAME_TYPES:
                raise InvalidRequest(f"unknown frame type {self.frame_type}")
        if self.length is not None and len(self.buffer) > FRAME_HEADER.size + self.length:
            raise InvalidRequest("bytes after the frame; a stream carries exactly one frame")
        if not end:
            return None
        if self.length is None or len(self.buffer) < FRAME_HEADER.size + self.length:
            raise InvalidRequest(f"truncated frame: the stream ended after {len(self.buffer)} bytes")
        with memoryview(self.buffer) as view:  # msgpack reads it in place: no copy of a large payload
            return self.frame_type, decode_payload(view[FRAME_HEADER.size:])


# No operation needs more than a map of fields holding one array of flat maps (a batch of events): the
# decoder refuses bigger containers, and more elements in all than that shape can hold, as it meets them, so
# that a request costs memory of the order of its size whatever its shape (16 MiB of empty maps would
# otherwise become gigabytes of dicts).
MAX_MAP_FIELDS = 64
MAX_ELEMENTS = (MAX_BATCH_EVENTS + 1) * MAX_MAP_FIELDS


def unpack_bounded(data) -> Any:
    """msgpack.unpackb with the bounds above; raises ValueError past them."""
    budget = [MAX_ELEMENTS]

    def spend(container):
        budget[0] -= len(container) + 1
        if budget[0] < 0:
            raise ValueError(f"more than {MAX_ELEMENTS} elements in all")
        return container
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_map_len=MAX_MAP_FIELDS,
                           max_array_len=MAX_BATCH_EVENTS, object_hook=spend, list_hook=spend)


def decode_payload(payload: bytes) -> dict:
    try:
        message = unpack_bounded(payload)
    except Exception as exc:
        reason = "a map key is a map or an array" if isinstance(exc, TypeError) else str(exc) or type(exc).__name__
        raise InvalidRequest(f"payload is not valid msgpack, or holds more than a request needs: {reason}") from None
    if not isinstance(message, dict):
        raise InvalidRequest(f"payload must be a msgpack map, not {type(message).__name__}")
    return message


def decode_frame(data: bytes, max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[int, dict]:
    """Decode one whole frame held in `data`."""
    return FrameReader(max_payload).feed(data, end=True)


# Field checks: each returns the value or raises InvalidRequest naming the field.


def _check(ok: bool, field: str, what: str):
    if not ok:
        raise InvalidRequest(f"field {field!r} must be {what}")


def check_text(value, field):
    # PostgreSQL text cannot hold NUL; refusing it here keeps both databases alike.
    _check(isinstance(value, str) and "\x00" not in value, field, "a string without NUL characters")
    return value


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_id(value, field):
    # Control characters have no use in an id, and a newline would make two (tenant, instance) pairs share
    # one token (PROTOCOL.md section 6).
    _check(isinstance(value, str) and value != "" and len(value.encode()) <= MAX_ID_BYTES
           and not CONTROL_CHARACTERS.search(value), field,
           f"a non-empty string of at most {MAX_ID_BYTES} bytes without control characters")
    return value


def check_bin(value, field):
    _check(isinstance(value, (bytes, bytearray)), field, "binary (msgpack bin)")
    return bytes(value)


def check_signal_payload(value, field):
    _check(isinstance(value, (bytes, bytearray)) and len(value) <= MAX_SIGNAL_PAYLOAD, field,
           f"binary of at most {MAX_SIGNAL_PAYLOAD} bytes")
    return bytes(value)


def check_uint(value, field):
    _check(type(value) is int and 0 <= value < 2**63, field, "a non-negative integer")
    return value


MAX_DURATION_MS = 100 * 365 * 86_400_000  # a century: far past any wake time, far from 64-bit overflow


def check_duration(value, field):
    _check(type(value) is int and 0 <= value <= MAX_DURATION_MS, field,
           f"a number of milliseconds from 0 to {MAX_DURATION_MS}")
    return value


MAX_WAIT_MS = 3_600_000  # an hour: a client that waits longer asks again


def check_wait(value, field):
    _check(type(value) is int and 0 <= value <= MAX_WAIT_MS, field, f"a number of milliseconds from 0 to {MAX_WAIT_MS}")
    return value


def check_bool(value, field):
    _check(isinstance(value, bool), field, "true or false")
    return value


def check_limit(value, field):
    _check(type(value) is int and 1 <= value <= 1000, field, "an integer from 1 to 1000")
    return value


def one_of(choices):
    def check(value, field):
        _check(value in choices, field, "one of " + ", ".join(choices))
        return value
    return check


def check_events(value, field):
    _check(isinstance(value, list) and 0 < len(value) <= MAX_BATCH_EVENTS, field,
           f"an array of 1 to {MAX_BATCH_EVENTS} event maps")
    events = []
    for index, event in enumerate(value):
        _check(isinstance(event, dict), f"{field}[{index}]", "a map")
        try:
            events.append(parse_fields(OPERATIONS["instance_event"], event))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{field}[{index}]: {exc}") from None
    return events


REQUIRED, OPTIONAL = True, False
_instance = {"instance_id": (check_id, REQUIRED)}
_run = {"run": (check_uint, OPTIONAL)}  # the sender's run: a request of an older one is SUPERSEDED
_paging = {"limit": (check_limit, OPTIONAL), "offset": (check_uint, OPTIONAL)}

OPERATIONS: dict[str, dict[str, tuple[Callable, bool]]] = {
    # Section 3.1: workflow instances.
    "register_instance": {**_instance, "tenant_id": (check_id, REQUIRED), "checkpoint_id": (check_id, OPTIONAL),
                          **_run},
    "checkpoint": {**_instance, "checkpoint_id": (check_id, REQUIRED), "state": (check_bin, REQUIRED), **_run},
    "get_checkpoint": {**_instance, "checkpoint_id": (check_id, REQUIRED)},
    "sleep": {**_instance, "checkpoint_id": (check_id, REQUIRED), "state": (check_bin, REQUIRED),
              "duration_ms": (check_duration, REQUIRED), **_run},
    "instance_event": {**_instance, "event_type": (one_of(EVENT_TYPES), REQUIRED), "payload": (check_bin, OPTIONAL),
                       "subtype": (check_text, OPTIONAL), "checkpoint_id": (check_id, OPTIONAL),
                       "timestamp_ms": (check_uint, OPTIONAL), **_run},
    "instance_event_batch": {"events": (check_events, REQUIRED)},
    "get_instance_status": {**_instance},
    "poll_signals": {**_instance, "checkpoint_id": (check_id, OPTIONAL), **_run},
    "signal_ack": {**_instance, "signal_type": (one_of(SIGNAL_TYPES), REQUIRED),
                   "acknowledged": (check_bool, REQUIRED), **_run},
    "retry_attempt": {**_instance, "checkpoint_id": (check_id, REQUIRED), "attempt_number": (check_uint, REQUIRED),
                      "error_message": (check_text, OPTIONAL), "timestamp_ms": (check_uint, OPTIONAL), **_run},
    # Section 3.2: operators.
    "health_check": {},
    "start_instance": {**_instance, "tenant_id": (check_id, REQUIRED), "workflow": (check_id, OPTIONAL),
                       "input": (check_bin, OPTIONAL)},
    "wait_instance": {**_instance, "timeout_ms": (check_wait, REQUIRED)},
    "fork_instance": {**_instance, "new_instance_id": (check_id, REQUIRED), "checkpoint_id": (check_id, OPTIONAL)},
    "send_signal": {**_instance, "signal_type": (one_of(SIGNAL_TYPES), REQUIRED),
                    "payload": (check_signal_payload, OPTIONAL)},
    "send_custom_signal": {**_instance, "checkpoint_id": (check_id, REQUIRED), "payload": (check_bin, OPTIONAL)},
    "list_instances": {"tenant_id": (check_id, OPTIONAL), "status": (one_of(STATUSES), OPTIONAL), **_paging},
    "list_checkpoints": {**_instance, **_paging},
    "list_events": {**_instance, "event_type": (one_of(KNOWN_EVENT_TYPES), OPTIONAL),
                    "subtype": (check_text, OPTIONAL), **_paging},
}
OPERATOR_OPERATIONS = frozenset(("health_check", "start_instance", "wait_instance", "fork_instance", "send_signal",
                                 "send_custom_signal", "list_instances", "list_checkpoints", "list_events"))


def parse_fields(spec: dict, message: dict) -> dict:
    fields = {}
    for name, (check, required) in spec.items():
        value = message.get(name)
        if value is None:
            if required:
                raise InvalidRequest(f"missing required field {name!r}")
            fields[name] = None
        else:
            fields[name] = check(value, name)
    return fields


def parse_request(message: dict) -> tuple[str, dict, str | None]:
    """Validate a request map: (op, its fields, the token if any). Unknown keys are ignored."""
    op = message.get("op")
    if not isinstance(op, str):
        raise InvalidRequest("missing field 'op'")
    spec = OPERATIONS.get(op)
    if spec is None:
        raise InvalidRequest(f"unknown op {op!r}")
    token = message.get("token")
    if token is not None:
        check_text(token, "token")
    return op, parse_fields(spec, message), token


# =============================================================================================
# 4. Storage: one interface, two dialects (SQLite through apsw, PostgreSQL through psycopg 3)
# =============================================================================================

SCHEMA_DIRS = (
    Path(os.environ.get("RUNTARA_SCHEMA_DIR", "")) if os.environ.get("RUNTARA_SCHEMA_DIR") else None,
    Path(__file__).resolve().parent / "schema",
    Path(sys.prefix) / "share" / "runtara-core" / "schema",  # where the wheel installs it
)
MIGRATION_FILE = re.compile(r"^(\d+)_(\w+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What differs between the two databases is data, not code paths."""

    name: str
    placeholder: str
    lock_row: str          # appended to a SELECT that must hold the row until commit
    skip_locked: str       # appended to a SELECT that claims rows other servers may be claiming
    migration_lock: str    # run first in every migration transaction
    capacity_lock: str     # run before counting busy slots, so two servers never both take the last one
    begin_write: str       # opens the writer's transaction
    database_size: str
    has_table: str         # counts the tables named ?, in the schema this connection works in
    writes_in_with: bool   # an INSERT may ride in a WITH of an UPDATE: a checkpoint is one statement, not two

    @functools.lru_cache(maxsize=None)
    def sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?", "", "", "SELECT 1", "SELECT 1",  # SQLite's writers are serial already
                 "BEGIN IMMEDIATE",  # the write lock at once, not at the first write (no upgrade deadlock)
                 "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                 "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", False)
POSTGRESQL = Dialect("postgresql", "%s", " FOR UPDATE", " FOR UPDATE SKIP LOCKED",
                     "SELECT pg_advisory_xact_lock(7361746172)",  # one migrator at a time per database
                     "SELECT pg_advisory_xact_lock(7361746173)", "BEGIN",
                     "SELECT pg_database_size(current_database())",
                     "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = ?", True)

INSTANCE_COLUMNS = ("instance_id", "tenant_id", "status", "checkpoint_id", "created_at_ms", "started_at_ms",
                    "finished_at_ms", "heartbeat_at_ms", "sleep_until_ms", "output", "error", "run", "workflow")
_INSTANCE_SELECT = "SELECT " + ", ".join(INSTANCE_COLUMNS) + " FROM instances"
# What the lifecycle rules look at besides the status map.
RUN_COLUMNS = INSTANCE_COLUMNS + ("restarts", "orphaned_at_ms", "launch_lease_until_ms", "launch_after_ms",
                                  "launch_attempts")
SIGNAL_COLUMNS = ("signal_type", "payload", "created_at_ms")
CLAIM_COLUMNS = ("instance_id", "tenant_id", "workflow", "checkpoint_id", "run", "launch_attempts", "status",
                 "sleep_until_ms")
QUEUE_COLUMNS = ("instance_id", "tenant_id", "workflow", "status", "checkpoint_id", "sleep_until_ms",
                 "orphaned_at_ms", "launch_lease_until_ms", "launch_after_ms", "launch_attempts")


def _filters(**conditions) -> tuple[str, tuple]:
    """A WHERE clause from `column_op=value` pairs, leaving out the None ones."""
    clauses, args = [], []
    for key, value in conditions.items():
        if value is not None:
            column, _, op = key.partition("__")
            clauses.append(f"{column} {'>=' if op == 'since' else '='} ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


class Tx:
    """One transaction: the storage operations, written once for both dialects.

    Every guarded transition is one conditional statement, so it cannot race with another.
    """

    __slots__ = ("dialect", "_run")

    def __init__(self, dialect: Dialect, run: Callable[[str, tuple], list]):
        self.dialect = dialect
        self._run = run

    def rows(self, statement: str, *args) -> list[tuple]:
        return self._run(self.dialect.sql(statement), args)

    def row(self, statement: str, *args) -> tuple | None:
        rows = self.rows(statement, *args)
        return rows[0] if rows else None

    def script(self, statements: str) -> None:
        """Run several statements at once; no parameters, so none are parsed."""
        self._run(statements, None)

    def value(self, statement: str, *args):
        row = self.row(statement, *args)
        return row[0] if row else None

    # -- instances --------------------------------------------------------------------------

    def create_instance(self, instance_id: str, tenant_id: str, now: int, workflow: str = "default",
                        input: bytes | None = None) -> bool:
        """Create a pending instance unless it exists; True when it was created."""
        return bool(self.rows("INSERT INTO instances (instance_id, tenant_id, status, created_at_ms, workflow, input)"
                              " VALUES (?, ?, 'pending', ?, ?, ?) ON CONFLICT (instance_id) DO NOTHING"
                              " RETURNING 1", instance_id, tenant_id, now, workflow, input))

    def get_instance(self, instance_id: str, lock: bool = False) -> dict | None:
        row = self.row(_INSTANCE_SELECT + " WHERE instance_id = ?" + (self.dialect.lock_row if lock else ""),
                       instance_id)
        return dict(zip(INSTANCE_COLUMNS, row)) if row else None

    def get_run(self, instance_id: str) -> dict | None:
        """The instance with what the lifecycle rules need, its row locked until commit."""
        row = self.row("SELECT " + ", ".join(RUN_COLUMNS) + " FROM instances WHERE instance_id = ?"
                       + self.dialect.lock_row, instance_id)
        return dict(zip(RUN_COLUMNS, row)) if row else None

    def get_input(self, instance_id: str) -> bytes | None:
        return self.value("SELECT input FROM instances WHERE instance_id = ?", instance_id)

    def begin_run(self, instance_id: str, now: int, sleep_until: int | None) -> int:
        """Make the instance running under a new run, ending any launch lease or orphaned mark; the new run.
        The run belongs to the executor of the launch whose reservation it takes, else to none."""
        return self.value("UPDATE instances SET status = 'running', started_at_ms = COALESCE(started_at_ms, ?),"
                          " heartbeat_at_ms = ?, run = run + 1, sleep_until_ms = ?, launch_lease_until_ms = NULL,"
                          " launch_after_ms = NULL, launch_attempts = 0, orphaned_at_ms = NULL,"
                          " executor = CASE WHEN launch_lease_until_ms > ? THEN executor END"
                          " WHERE instance_id = ? RETURNING run", now, now, sleep_until, now, instance_id)

    def transition(self, instance_id: str, to_status: str, from_statuses: tuple, now: int,
                   output: bytes | None = None, error: str | None = None, run: int | None = None) -> bool:
        """Move the instance to `to_status` if it is in one of `from_statuses` (and `run` is its current run,
        when given); terminal ones finish it. True when it moved."""
        finished = now if to_status in TERMINAL else None
        marks = ", ".join("?" * len(from_statuses))
        moved = bool(self.rows(f"UPDATE instances SET status = ?, finished_at_ms = COALESCE(?, finished_at_ms),"
                               f" output = COALESCE(?, output), error = COALESCE(?, error), heartbeat_at_ms = ?,"
                               f" orphaned_at_ms = NULL, launch_lease_until_ms = NULL, launch_attempts = 0"
                               f" WHERE instance_id = ? AND status IN ({marks}) AND run = COALESCE(?, run)"
                               f" AND status NOT IN ('completed', 'failed', 'cancelled') RETURNING 1",  # final
                               to_status, finished, output, error, now, instance_id, *from_statuses, run))
        if moved and finished:
            self.delete_signal(instance_id)  # a finished instance has nothing left to be told
        return moved

    def lock_capacity(self) -> None:
        self.rows(self.dialect.capacity_lock)

    def count_busy(self, now: int) -> int:
        """Instances that hold a slot: running ones, and those a launch is under way for."""
        return self.value("SELECT count(*) FROM instances WHERE status = 'running'"
                          " OR (status IN ('pending', 'suspended') AND launch_lease_until_ms > ?)", now)

    def count_running(self) -> int:
        return self.value("SELECT count(*) FROM instances WHERE status = 'running'")

    def touch_heartbeat(self, instance_id: str, now: int, run: int | None = None) -> bool:
        """Stamp a sign of life on an unfinished instance (of `run`, when given); True when it was."""
        return bool(self.rows("UPDATE instances SET heartbeat_at_ms = ? WHERE instance_id = ?"
                              " AND run = COALESCE(?, run) AND status IN ('pending', 'running', 'suspended')"
                              " RETURNING 1",
                              now, instance_id, run))

    def oldest_running(self) -> dict | None:
        row = self.row("SELECT instance_id, started_at_ms FROM instances WHERE status = 'running'"
                       " ORDER BY started_at_ms LIMIT 1")
        return row and {"instance_id": row[0], "started_at_ms": row[1]}

    def silent_runs(self, cutoff: int, limit: int = 100) -> list[tuple[str, int]]:
        """Running instances not known to be orphaned and silent since before `cutoff`, locked (other servers
        skip them): [(instance_id, last sign of life)]."""
        return self.rows("SELECT instance_id, COALESCE(heartbeat_at_ms, started_at_ms, created_at_ms) FROM instances"
                         " WHERE status = 'running' AND orphaned_at_ms IS NULL"
                         " AND COALESCE(heartbeat_at_ms, started_at_ms, created_at_ms) < ? ORDER BY instance_id"
                         " LIMIT ?" + self.dialect.skip_locked, cutoff, limit)

    def orphan(self, instance_id: str, now: int, launch_after: int) -> int:
        """Mark the current run dead, to be launched again after `launch_after`; the restarts in a row now."""
        return self.value("UPDATE instances SET orphaned_at_ms = ?, launch_after_ms = ?, launch_lease_until_ms = NULL,"
                          " restarts = restarts + 1 WHERE instance_id = ? RETURNING restarts",
                          now, launch_after, instance_id)

    def list_instances(self, tenant_id=None, status=None, since=None, limit=100, offset=0) -> list[dict]:
        where, args = _filters(tenant_id=tenant_id, status=status, created_at_ms__since=since)
        rows = self.rows(_INSTANCE_SELECT + where + " ORDER BY created_at_ms DESC, instance_id LIMIT ? OFFSET ?",
                         *args, limit, offset)
        return [dict(zip(INSTANCE_COLUMNS, row)) for row in rows]

    def count_instances(self, tenant_id=None, status=None, since=None) -> int:
        where, args = _filters(tenant_id=tenant_id, status=status, created_at_ms__since=since)
        return self.value("SELECT count(*) FROM instances" + where, *args)

    def count_by_status(self) -> dict[str, int]:
        return dict(self.rows("SELECT status, count(*) FROM instances GROUP BY status"))

    def delete_instance(self, instance_id: str) -> bool:
        """Delete an instance with its checkpoints, events and signals (by cascade)."""
        return bool(self.rows("DELETE FROM instances WHERE instance_id = ? RETURNING 1", instance_id))

    _FINISHED = ("SELECT instance_id FROM instances WHERE status IN ('completed', 'failed', 'cancelled')"
                 " AND finished_at_ms < ?")

    def count_finished(self, before: int) -> dict[str, int]:
        """What delete_finished would remove: terminal instances finished before `before`, and theirs."""
        return {table: self.value(f"SELECT count(*) FROM {table} WHERE instance_id IN ({self._FINISHED})", before)
                for table in ("instances", "checkpoints", "events")}

    def delete_finished(self, before: int, limit: int) -> list[str]:
        """Delete up to `limit` terminal instances finished before `before`; their ids."""
        return [row[0] for row in self.rows(
            f"DELETE FROM instances WHERE instance_id IN ({self._FINISHED} LIMIT ?) RETURNING instance_id",
            before, limit)]

    # -- checkpoints ------------------------------------------------------------------------

    # The hot path: one statement checks that the instance runs, stamps its heartbeat, makes a new checkpoint
    # id the latest and reads all the answer needs; the INSERT follows, in the same statement where the
    # database allows writes in a WITH (PostgreSQL: one round trip per checkpoint, not two).
    _SAVE = ("UPDATE instances SET heartbeat_at_ms = ?, checkpoint_id = CASE WHEN EXISTS (SELECT 1 FROM checkpoints c"
             " WHERE c.instance_id = instances.instance_id AND c.checkpoint_id = ?) THEN checkpoint_id ELSE ? END"
             " WHERE instance_id = ? AND status = 'running' AND run = COALESCE(?, run)"
             " RETURNING run, sleep_until_ms, restarts, (SELECT state FROM checkpoints c"
             " WHERE c.instance_id = instances.instance_id AND c.checkpoint_id = ?) AS first, "
             + ", ".join(f"(SELECT {column} FROM signals s WHERE s.instance_id = instances.instance_id)"
                         for column in SIGNAL_COLUMNS) +
             ", (SELECT length(payload) FROM custom_signals u WHERE u.instance_id = instances.instance_id"
             " AND u.checkpoint_id = ?) AS custom_size")
    _INSERT_CHECKPOINT = ("INSERT INTO checkpoints (instance_id, checkpoint_id, state, created_at_ms) {}"
                          " ON CONFLICT (instance_id, checkpoint_id) DO NOTHING RETURNING 1")
    _INSERT_ONE = _INSERT_CHECKPOINT.format("VALUES (?, ?, ?, ?)")
    _SAVE_AND_INSERT = ("WITH saved AS (" + _SAVE + "), inserted AS ("
                        + _INSERT_CHECKPOINT.format("SELECT ?, ?, ?, ? FROM saved WHERE first IS NULL") +
                        ") SELECT *, EXISTS (SELECT 1 FROM inserted) FROM saved")

    def save_checkpoint(self, instance_id: str, checkpoint_id: str, state: bytes, now: int,
                        run: int | None = None) -> dict | None:
        """Save a running instance's `state` unless this checkpoint id has one (the first state stays, forever),
        and stamp its heartbeat. None when the instance is not running (under `run`, when given); else
        {"first": the state already saved or None, "run": the current run, "sleep_until_ms",
        "signal": the pending signal or None,
        "custom_size": the size of the custom signal waiting on this checkpoint id, or None}. A new checkpoint
        is progress: it ends a run of restarts."""
        save = (now, checkpoint_id, checkpoint_id, instance_id, run, checkpoint_id, checkpoint_id)
        if self.dialect.writes_in_with:
            row = self.row(self._SAVE_AND_INSERT, *save, instance_id, checkpoint_id, state, now)
        else:
            row = self.row(self._SAVE, *save)
            row = row and (*row, None)  # inserted: not yet tried
        if row is None:
            return None
        run, sleep_until, restarts, first, signal_type, *signal, custom_size, inserted = row
        if first is None:
            if inserted is None:
                inserted = self.rows(self._INSERT_ONE, instance_id, checkpoint_id, state, now)
            if inserted:
                if restarts:
                    self.rows("UPDATE instances SET restarts = 0 WHERE instance_id = ?", instance_id)
            else:
                first = self.get_checkpoint(instance_id, checkpoint_id)  # a concurrent transaction saved it first
        return {"first": first, "run": run, "sleep_until_ms": sleep_until, "custom_size": custom_size,
                "signal": dict(zip(SIGNAL_COLUMNS, (signal_type, *signal))) if signal_type else None}

    def get_checkpoint(self, instance_id: str, checkpoint_id: str) -> bytes | None:
        return self.value("SELECT state FROM checkpoints WHERE instance_id = ? AND checkpoint_id = ?",
                          instance_id, checkpoint_id)

    def list_checkpoints(self, instance_id: str, limit=100, offset=0) -> list[dict]:
        rows = self.rows("SELECT checkpoint_id, created_at_ms, length(state) FROM checkpoints WHERE instance_id = ?"
                         " ORDER BY id DESC LIMIT ? OFFSET ?", instance_id, limit, offset)
        return [{"checkpoint_id": c, "created_at_ms": t, "size": s} for c, t, s in rows]

    def checkpoint_order(self, instance_id: str, checkpoint_id: str) -> int | None:
        """Where the checkpoint stands in its instance's saving order (a larger number was saved later)."""
        return self.value("SELECT id FROM checkpoints WHERE instance_id = ? AND checkpoint_id = ?",
                          instance_id, checkpoint_id)

    def copy_checkpoints(self, source: str, target: str, up_to: int | None) -> str | None:
        """Copy the source's checkpoints saved up to `up_to` (all when None) to `target`, in saving order, and
        make the last one the target's latest; its id, or None when there was none."""
        self.rows("INSERT INTO checkpoints (instance_id, checkpoint_id, state, created_at_ms)"
                  " SELECT ?, checkpoint_id, state, created_at_ms FROM checkpoints WHERE instance_id = ?"
                  " AND id <= COALESCE(?, id) ORDER BY id", target, source, up_to)
        return self.value("UPDATE instances SET checkpoint_id = (SELECT checkpoint_id FROM checkpoints"
                          " WHERE instance_id = ? ORDER BY id DESC LIMIT 1) WHERE instance_id = ?"
                          " RETURNING checkpoint_id",
                          target, target)

    def count_checkpoints(self, instance_id: str | None = None) -> int:
        where, args = _filters(instance_id=instance_id)
        return self.value("SELECT count(*) FROM checkpoints" + where, *args)

    # -- events -----------------------------------------------------------------------------

    def insert_event(self, instance_id: str, event_type: str, now: int, subtype: str | None = None,
                     checkpoint_id: str | None = None, payload: bytes | None = None) -> None:
        self.rows("INSERT INTO events (instance_id, event_type, subtype, checkpoint_id, payload, created_at_ms)"
                  " VALUES (?, ?, ?, ?, ?, ?)", instance_id, event_type, subtype, checkpoint_id, payload, now)

    def list_events(self, instance_id: str, event_type=None, subtype=None, limit=100, offset=0) -> list[dict]:
        """Newest first, each payload cut to its first PREVIEW_BYTES, with its whole size."""
        where, args = _filters(instance_id=instance_id, event_type=event_type, subtype=subtype)
        rows = self.rows("SELECT id, event_type, subtype, checkpoint_id, substr(payload, 1, ?), length(payload),"
                         " created_at_ms FROM events" + where + " ORDER BY id DESC LIMIT ? OFFSET ?",
                         PREVIEW_BYTES, *args, limit, offset)
        keys = ("id", "event_type", "subtype", "checkpoint_id", "payload", "payload_size", "created_at_ms")
        return [dict(zip(keys, row)) for row in rows]

    def count_events(self, instance_id: str | None = None, event_type=None, subtype=None) -> int:
        where, args = _filters(instance_id=instance_id, event_type=event_type, subtype=subtype)
        return self.value("SELECT count(*) FROM events" + where, *args)

    # -- signals ----------------------------------------------------------------------------

    def put_signal(self, instance_id: str, signal_type: str, payload: bytes, now: int) -> None:
        """Make this the instance's one pending signal, replacing an older one."""
        self.rows("INSERT INTO signals (instance_id, signal_type, payload, created_at_ms) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT (instance_id) DO UPDATE SET signal_type = excluded.signal_type,"
                  " payload = excluded.payload, created_at_ms = excluded.created_at_ms",
                  instance_id, signal_type, payload, now)

    def get_signal(self, instance_id: str) -> dict | None:
        row = self.row("SELECT " + ", ".join(SIGNAL_COLUMNS) + " FROM signals WHERE instance_id = ?", instance_id)
        return dict(zip(SIGNAL_COLUMNS, row)) if row else None

    def delete_signal(self, instance_id: str) -> None:
        self.rows("DELETE FROM signals WHERE instance_id = ?", instance_id)

    def ack_signal(self, instance_id: str, signal_type: str) -> bytes | None:
        """Clear the pending signal if it is of `signal_type`: its payload then, else None."""
        return self.value("DELETE FROM signals WHERE instance_id = ? AND signal_type = ? RETURNING payload",
                          instance_id, signal_type)

    def put_custom_signal(self, instance_id: str, checkpoint_id: str, payload: bytes, now: int) -> None:
        self.rows("INSERT INTO custom_signals (instance_id, checkpoint_id, payload, created_at_ms) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT (instance_id, checkpoint_id) DO UPDATE SET payload = excluded.payload,"
                  " created_at_ms = excluded.created_at_ms", instance_id, checkpoint_id, payload, now)

    def custom_signal_size(self, instance_id: str, checkpoint_id: str) -> int | None:
        return self.value("SELECT length(payload) FROM custom_signals WHERE instance_id = ? AND checkpoint_id = ?",
                          instance_id, checkpoint_id)

    def take_custom_signal(self, instance_id: str, checkpoint_id: str) -> bytes | None:
        """Read and delete the custom signal waiting on this checkpoint id: delivered once."""
        return self.value("DELETE FROM custom_signals WHERE instance_id = ? AND checkpoint_id = ? RETURNING payload",
                          instance_id, checkpoint_id)

    # -- sleep and wake ---------------------------------------------------------------------

    def set_sleep(self, instance_id: str, until: int) -> None:
        self.rows("UPDATE instances SET sleep_until_ms = ? WHERE instance_id = ?", until, instance_id)

    def clear_sleep(self, instance_id: str) -> None:
        self.rows("UPDATE instances SET sleep_until_ms = NULL WHERE instance_id = ?", instance_id)

    def end_sleep(self, instance_id: str, wake_at: int, run: int) -> bool:
        """An inline sleep of `run` until `wake_at` returns: it clears that wake time, unless another run took
        the instance over meanwhile (whose own sleep it must not touch); False then."""
        return bool(self.rows("UPDATE instances SET sleep_until_ms = CASE WHEN sleep_until_ms = ? AND status NOT IN"
                              " ('completed', 'failed', 'cancelled') THEN NULL ELSE sleep_until_ms END"
                              " WHERE instance_id = ? AND run = ? RETURNING 1",
                              wake_at, instance_id, run))

    # What waits for a launch: orphaned runs (they hold their slot already), pending instances, and suspended ones
    # that are due: a resume is pending, or their wake time has passed and no pause is pending. Ordered by when
    # they became due, the same on both databases.
    _ORPHANED = "status = 'running' AND orphaned_at_ms IS NOT NULL"
    _DUE = ("(status = 'pending' OR status = 'suspended' AND (EXISTS (SELECT 1 FROM signals s WHERE"
            " s.instance_id = instances.instance_id AND s.signal_type = 'resume') OR sleep_until_ms <= ? AND NOT EXISTS"
            " (SELECT 1 FROM signals s WHERE s.instance_id = instances.instance_id AND s.signal_type = 'pause')))")
    _DUE_ORDER = (" ORDER BY CASE WHEN status = 'pending' THEN created_at_ms"
                  " WHEN status = 'running' THEN orphaned_at_ms ELSE COALESCE(sleep_until_ms, 0) END, instance_id")

    def launch_queue(self, now: int, limit: int = 100) -> list[dict]:
        """Everything waiting for a launch, with its lease and backoff: what `runtara wakes` shows."""
        rows = self.rows("SELECT " + ", ".join(QUEUE_COLUMNS) + " FROM instances WHERE (" + self._ORPHANED + " OR "
                         + self._DUE + ")" + self._DUE_ORDER + " LIMIT ?", now, limit)
        return [dict(zip(QUEUE_COLUMNS, row)) for row in rows]

    def count_waiting(self, now: int) -> int:
        """Instances waiting for a launch that none has begun: the scheduler's queue."""
        return self.value("SELECT count(*) FROM instances WHERE (" + self._ORPHANED + " OR " + self._DUE + ")"
                          " AND (launch_lease_until_ms IS NULL OR launch_lease_until_ms <= ?)", now, now)

    def claim(self, waiting: str, args: tuple, now: int, lease_until: int, workflows: tuple | None,
              limit: int, in_process: tuple = (), executor: str | None = None) -> list[dict]:
        """Claim up to `limit` instances matching `waiting` (with `args`) whose backoff has passed and that no
        unexpired launch lease holds, of `workflows` (None: any), leasing them until `lease_until`; those of
        the `in_process` workflows are claimed for `executor`.

        Atomic: servers sharing a database never claim the same instance while its lease lasts."""
        if limit <= 0 or workflows == ():
            return []
        of_workflows = "" if workflows is None else f" AND workflow IN ({', '.join('?' * len(workflows))})"
        claimed_by = f"CASE WHEN workflow IN ({', '.join('?' * len(in_process))}) THEN ? END" if in_process else "NULL"
        rows = self.rows("UPDATE instances SET launch_lease_until_ms = ?, launch_attempts = launch_attempts + 1,"
                         " executor = " + claimed_by +
                         " WHERE instance_id IN (SELECT instance_id FROM instances WHERE " + waiting
                         + " AND (launch_lease_until_ms IS NULL OR launch_lease_until_ms <= ?)"
                         " AND (launch_after_ms IS NULL OR launch_after_ms <= ?)" + of_workflows + self._DUE_ORDER
                         + " LIMIT ?" + self.dialect.skip_locked + ") RETURNING " + ", ".join(CLAIM_COLUMNS),
                         lease_until, *(in_process and (*in_process, executor)), *args, now, now, *(workflows or ()),
                         limit)
        return [dict(zip(CLAIM_COLUMNS, row)) for row in rows]

    def claim_launches(self, now: int, lease_until: int, workflows: tuple | None, max_busy: int,
                       limit: int, in_process: tuple = (), executor: str | None = None) -> list[dict]:
        """Claim what to launch now: orphaned runs first, then due instances while slots are free."""
        self.lock_capacity()
        orphans = self.claim(self._ORPHANED, (), now, lease_until, workflows, limit, in_process, executor)
        free = min(max_busy - self.count_busy(now), limit - len(orphans))
        return orphans + self.claim(self._DUE, (now,), now, lease_until, workflows, free, in_process, executor)

    def executor_runs(self, executor: str) -> list[str]:
        """The instances whose current run or launch under way belongs to `executor`."""
        return [row[0] for row in self.rows(
            "SELECT instance_id FROM instances WHERE executor = ? AND (status = 'running' AND orphaned_at_ms IS NULL"
            " OR status IN ('pending', 'suspended') AND launch_lease_until_ms IS NOT NULL) ORDER BY instance_id",
            executor)]

    def end_launch(self, instance_id: str, launch_after: int | None) -> None:
        """The launch under way ended without a run: free its slot; launch again after `launch_after`."""
        self.rows("UPDATE instances SET launch_lease_until_ms = NULL, launch_after_ms = ? WHERE instance_id = ?",
                  launch_after, instance_id)

    # -- whole database ---------------------------------------------------------------------

    def health(self) -> bool:
        return self.value("SELECT 1") == 1

    def database_size(self) -> int:
        return self.value(self.dialect.database_size)


def schema_dir() -> Path:
    for candidate in SCHEMA_DIRS:
        if candidate is not None and candidate.is_dir():
            return candidate
    raise StorageError("cannot find the schema/ folder of migrations; set RUNTARA_SCHEMA_DIR")


def known_migrations(dialect: Dialect) -> list[tuple[int, str, str]]:
    """[(version, name, sql)] from schema/<dialect>/NNN_name.sql, in order."""
    found = []
    for path in sorted((schema_dir() / dialect.name).glob("*.sql")):
        match = MIGRATION_FILE.match(path.name)
        if match:
            found.append((int(match[1]), match[2], path.read_text()))
    return found


def _record_table(tx: Tx) -> None:
    tx.rows(tx.dialect.migration_lock)
    tx.rows("CREATE TABLE IF NOT EXISTS runtara_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at_ms BIGINT NOT NULL)")


def _applied_migrations(tx: Tx) -> dict[int, tuple[str, int]]:
    _record_table(tx)
    return {version: (name, at) for version, name, at in
            tx.rows("SELECT version, name, applied_at_ms FROM runtara_migrations")}


MIGRATE_HINT = "run 'runtara migrate' (or start the server)"  # what to do about a database not made or not current
NO_TABLES = f"the database has no runtara-core tables; {MIGRATE_HINT} to create them"


def _recorded_migrations(tx: Tx) -> dict[int, str] | None:
    """{version: name} of the migrations recorded as applied, None when there is no record at all; without
    writing anything."""
    if not tx.value(tx.dialect.has_table, "runtara_migrations"):
        return None
    return dict(tx.rows("SELECT version, name FROM runtara_migrations"))


def _apply_migration(tx: Tx, version: int, name: str, sql: str) -> bool:
    if version in _applied_migrations(tx):  # another process applied it while we waited for the lock
        return False
    tx.script(sql)
    tx.rows("INSERT INTO runtara_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)", version, name, now_ms())
    return True


class ReadThreads:
    """Threads that run reads, made as they are needed up to `size`. Daemons, unlike concurrent.futures'
    threads (which the interpreter joins at exit), so that a read stuck on a database that never answers
    cannot keep the process from exiting."""

    def __init__(self, size: int, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._size, self._name = size, name
        self._idle = threading.Semaphore(0)  # released by each thread as it waits for a call
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(StorageError("the database is closed"))
                return future
            self._calls.put((future, fn, args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
                thread = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _run(self):
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
            self._idle.release()

    def shutdown(self, timeout: float) -> bool:
        """Let the reads queued finish, for at most `timeout` seconds; whether they all did."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._calls.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)


class Storage:
    """The database behind the engine: `write(fn, ...)` and `read(fn, ...)` run `fn(tx, ...)` in a
    transaction on a database thread and return a concurrent.futures.Future of its result;
    `write_soon(fn, ...)` is write() for a caller on an event loop, returning an asyncio future.

    Writes go to one writer thread with its own connection, which runs everything queued while the last
    commit ran in one transaction (group commit). Writes that fail roll back alone; a caller's future
    resolves only after its commit is durable. A write function must touch nothing but `tx`: it may run
    more than once (see _commit_group).

    The dialects differ in what they connect to and which exceptions mean what, not in these rules.
    """

    dialect: Dialect
    name: str              # what messages call the database
    errors: tuple = ()     # the database library's exceptions
    transient: tuple = ()  # those after which the whole group runs again (PostgreSQL's deadlock victims)
    writes = commits = 0   # write jobs committed, and the transactions that held them
    on_commit: Callable[[int, float], None] | None = None  # told (writes, seconds) of each commit, on the writer

    def _start_writer(self) -> None:
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="runtara-write", daemon=True)
        self._writer.start()

    def _writer_connection(self) -> tuple[Callable[[str], Any], Tx]:
        """The writer's connection, as a function that runs one statement and a Tx over it; raises one of
        `errors` when there is none to be had."""
        raise NotImplementedError

    def _failure(self, exc: BaseException) -> StorageError:
        return StorageError(f"{self.name} write failed, nothing of this request was saved: {exc}")

    def write(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        return self._queue(concurrent.futures.Future(), fn, args, kwargs)

    def write_soon(self, fn: Callable, *args) -> asyncio.Future:
        # Resolved with the rest of its commit group in one call on the loop, not one wake-up per write.
        return self._queue(asyncio.get_running_loop().create_future(), fn, args, {})

    def _queue(self, future, fn, args, kwargs):
        with self._closing:
            if self._writer.is_alive():
                self._writes.put((future, fn, args, kwargs))
                return future
        future.set_exception(StorageError(f"the {self.name} database is closed"))
        return future

    def _write_loop(self):
        while True:
            batch = [self._writes.get()]
            while True:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            stop = any(job is None for job in batch)
            jobs = [job for job in batch if job is not None and _wanted(job[0])]
            if jobs:
                _settle_all(self._commit_group(jobs))
            if stop:
                return

    def _commit_group(self, jobs) -> list[tuple]:
        """Run the jobs in one transaction and commit it: [(future, result, exception)].

        A savepoint around each job would cost two statements per write, so a group first runs without
        them; only when a job fails is the group rolled back and run again with one savepoint per job.
        A group that another transaction's deadlock chose as its victim runs again whole."""
        execute, started = None, time.perf_counter()
        try:
            execute, tx = self._writer_connection()
            for attempt in range(4):
                outcomes = self._run_jobs(execute, tx, jobs, savepoints=False)
                if outcomes[-1][2] is not None:  # a job failed, and its writes are mixed with the others'
                    execute("ROLLBACK")
                    if len(jobs) > 1:
                        outcomes = self._run_jobs(execute, tx, jobs, savepoints=True)
                if attempt < 3 and any(isinstance(error, self.transient) for _, _, error in outcomes):
                    with contextlib.suppress(*self.errors):
                        execute("ROLLBACK")
                    continue
                break
            if len(jobs) > 1 or outcomes[-1][2] is None:  # else the one job failed and nothing is open
                execute("COMMIT")
                written = sum(error is None for _, _, error in outcomes)
                self.writes += written
                self.commits += 1
                if self.on_commit is not None:
                    self.on_commit(written, time.perf_counter() - started)
            return [(future, result, self._failure(error) if isinstance(error, self.errors) else error)
                    for future, result, error in outcomes]
        except self.errors as exc:
            if execute is not None:
                with contextlib.suppress(*self.errors):
                    execute("ROLLBACK")
            failure = self._failure(exc)
            return [(future, None, failure) for future, *_ in jobs]

    def _run_jobs(self, execute, tx, jobs, savepoints: bool) -> list[tuple]:
        """The jobs' outcomes in a new transaction; without savepoints, up to the first that fails."""
        execute(self.dialect.begin_write)
        outcomes = []
        for future, fn, args, kwargs in jobs:
            if savepoints:
                execute("SAVEPOINT job")
            try:
                outcomes.append((future, fn(tx, *args, **kwargs), None))
            except BaseException as exc:
                outcomes.append((future, None, exc))
                if not savepoints:
                    return outcomes
                execute("ROLLBACK TO job")  # the job fails alone; its writes are undone
            if savepoints:
                execute("RELEASE job")
        return outcomes

    def read(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run fn(tx, *args) in a read transaction on a reader thread."""
        return self._read_threads.submit(self._read, fn, args, kwargs)

    def _read(self, fn: Callable, args: tuple, kwargs: dict):
        raise NotImplementedError

    CLOSE_WAIT_S = 30.0

    def close(self) -> None:
        """Finish the writes queued, then close; idempotent, from any thread. A database that stops answering
        (a hung PostgreSQL) is waited for CLOSE_WAIT_S, then left to the process's exit: the writes in flight
        were never confirmed to anyone."""
        with self._closing:
            if not self._writer.is_alive():
                return
            self._writes.put(None)
            self._writer.join(self.CLOSE_WAIT_S)
            written = not self._writer.is_alive()
            if not written:
                log.error("the %s database did not finish the writes in flight within %g s; closing without them"
                          " (none of them was confirmed)", self.name, self.CLOSE_WAIT_S)
            read = self._read_threads.shutdown(self.CLOSE_WAIT_S if written else 0)
            if not read:
                log.error("the %s database did not answer the reads in flight; closing without them", self.name)
            if written and read:
                self._close_connections()

    def _close_connections(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def migration_status(self) -> list[tuple[int, str, int | None]]:
        """[(version, name, applied_at_ms or None)] for every migration, known or recorded."""
        applied = self.write(_applied_migrations).result()
        known = {version: name for version, name, _ in known_migrations(self.dialect)}
        _refuse_unknown({version: name for version, (name, _) in applied.items()}, known)
        return [(version, name, applied.get(version, (None, None))[1]) for version, name in sorted(known.items())]

    def check_schema(self) -> None:
        """Raise StorageError unless every migration this version knows is applied; reads only, so that a
        look at a database never creates or upgrades it (an older server would then refuse it)."""
        recorded = self.read(_recorded_migrations).result()
        if not recorded:
            raise StorageError(NO_TABLES)
        known = {version: name for version, name, _ in known_migrations(self.dialect)}
        _refuse_unknown(recorded, known)
        pending = [f"{version:03d}_{name}" for version, name in sorted(known.items()) if version not in recorded]
        if pending:
            raise StorageError(f"the database needs migration {', '.join(pending)} of runtara-core {__version__};"
                               f" {MIGRATE_HINT} to apply it")

    def migrate(self, progress: Callable[[int, str], None] | None = None) -> list[int]:
        """Apply pending migrations, each in its own transaction; the versions applied."""
        pending = [version for version, _, at in self.migration_status() if at is None]
        done = []
        for version, name, sql in known_migrations(self.dialect):
            if version in pending:
                if progress:
                    progress(version, name)
                if self.write(_apply_migration, version, name, sql).result():
                    log.info("applied migration %03d_%s", version, name)
                    done.append(version)
        return done


def _refuse_unknown(applied: dict[int, str], known: dict[int, str]) -> None:
    unknown = sorted(set(applied) - set(known))
    if unknown:
        version = unknown[0]
        raise StorageError(f"the database has migration {version:03d}_{applied[version]}, which this version of"
                           f" runtara-core ({__version__}) does not know; upgrade runtara-core")


def _sqlite_rows(cursor, statement: str, args: tuple) -> list:
    return list(cursor.execute(statement, args or None))


def _wanted(future) -> bool:
    """False for a job whose caller gave up before it started; a started concurrent future cannot be cancelled."""
    if isinstance(future, concurrent.futures.Future):
        return future.set_running_or_notify_cancel()
    return not future.cancelled()


def _settle(outcomes: list[tuple]) -> None:
    for future, result, error in outcomes:
        if not future.cancelled():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


def _settle_all(outcomes: list[tuple]) -> None:
    """Resolve futures from the writer thread: concurrent ones here, each event loop's in one call on it."""
    on_loops: dict = {}
    for outcome in outcomes:
        future = outcome[0]
        on_loops.setdefault(None if isinstance(future, concurrent.futures.Future) else future.get_loop(),
                            []).append(outcome)
    for loop, settled in on_loops.items():
        if loop is None:
            _settle(settled)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits these any more
                loop.call_soon_threadsafe(_settle, settled)


class SQLiteStorage(Storage):
    """SQLite in WAL mode: the writer thread, and a few reader threads with a connection each."""

    dialect = SQLITE
    name = "SQLite"

    def __init__(self, path: str, synchronous: str = "FULL", create: bool = True, readers: int = 4):
        import apsw

        self._apsw = apsw
        self.errors = (apsw.Error,)
        self.path = path
        self.synchronous = synchronous
        if not create and path != ":memory:" and not os.path.exists(path):
            raise StorageError(f"no database at {path}; {MIGRATE_HINT} to create it")
        self._create = create  # readers open as the writer did: without it, only a runtara-core database
        self._writer_conn = self._connect(create)
        self._writer_tx = (self._writer_conn.execute,
                           Tx(SQLITE, functools.partial(_sqlite_rows, self._writer_conn.cursor())))
        self._readers = []
        self._reader_local = threading.local()
        self._read_threads = ReadThreads(readers, "runtara-read")
        self._start_writer()

    def _connect(self, create: bool):
        apsw = self._apsw
        flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
        try:
            conn = apsw.Connection(self.path, flags=flags)
            conn.setbusytimeout(10_000)
            if not create and not conn.execute(SQLITE.has_table, ("runtara_migrations",)).fetchall()[0][0]:
                conn.close()  # another program's file, or an empty one: not ours to turn to WAL
                raise StorageError(NO_TABLES)
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
        except apsw.Error as exc:
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from None
        return conn

    def _writer_connection(self):
        return self._writer_tx

    # Reads: each reader thread has its own connection; WAL readers never block the writer.

    def _read(self, fn, args, kwargs):
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = self._connect(self._create)
            self._readers.append(conn)
        try:
            conn.execute("BEGIN")
            try:
                return fn(Tx(SQLITE, functools.partial(_sqlite_rows, conn.cursor())), *args, **kwargs)
            finally:
                conn.execute("COMMIT")
        except self._apsw.Error as exc:
            raise StorageError(f"SQLite read failed: {exc}") from None

    def _close_connections(self):
        for conn in self._readers:
            conn.close()
        try:
            self._writer_conn.wal_checkpoint(mode=self._apsw.SQLITE_CHECKPOINT_TRUNCATE)
        except self._apsw.Error as exc:  # another process still reads; its last reader checkpoints
            log.debug("WAL checkpoint at close skipped: %s", exc)
        self._writer_conn.close()


def _postgres_rows(cursor, statement: str, args: tuple) -> list:
    cursor.execute(statement, args or None)
    # Whether rows came, from the result's field count: cursor.description builds a Column per field first,
    # a tenth of the writer's time per checkpoint.
    return cursor.fetchall() if cursor.pgresult.nfields else []


class PostgresStorage(Storage):
    """PostgreSQL: the writer thread on a connection of its own, made again when it breaks (a database
    restart costs the writes in flight, never the server), and a pool of connections for reads."""

    dialect = POSTGRESQL
    name = "PostgreSQL"

    def __init__(self, url: str, pool_size: int = 8, connect_timeout: float = 5.0):
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise StorageError("PostgreSQL needs psycopg: pip install 'runtara-core[postgres]'") from None
        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.transient = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        self.url = url
        self._connect_timeout = max(1, int(connect_timeout))
        self._writer_conn = self._writer_tx = None
        try:  # the writer's connection first: a refused port or a missing role is said at once, in one line
            self._writer_connection()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())  # libpq's message spans lines
            raise StorageError(f"cannot reach PostgreSQL at {_redact(url)}: {reason}") from None
        # No check on borrowing (a query per read): a read that finds its connection broken runs again once.
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=connect_timeout, open=False,
                                    kwargs={"autocommit": False, "connect_timeout": self._connect_timeout},
                                    name="runtara")
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except Exception as exc:
            self._pool.close()
            self._writer_conn.close()
            raise StorageError(f"cannot reach PostgreSQL at {_redact(url)}: {exc}") from None
        self._read_threads = ReadThreads(pool_size, "runtara-pg")
        self._start_writer()

    def _writer_connection(self):
        if self._writer_conn is None or self._writer_conn.broken or self._writer_conn.closed:
            if self._writer_conn is not None:
                self._writer_conn.close()
            self._writer_conn = None  # until a new one is made, each group tries again
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout)
            self._writer_conn = conn
            self._writer_tx = (conn.execute, Tx(POSTGRESQL, functools.partial(_postgres_rows, conn.cursor())))
        return self._writer_tx

    def _failure(self, exc):
        if isinstance(exc, self._psycopg.OperationalError):  # down, unreachable, out of disk
            return StorageError(f"PostgreSQL is unavailable: {exc}")
        return super()._failure(exc)

    def _read(self, fn, args, kwargs):
        for attempt in (1, 2):
            conn = None
            try:
                with self._pool.connection() as conn:
                    with conn.transaction():
                        return fn(Tx(POSTGRESQL, functools.partial(_postgres_rows, conn.cursor())), *args, **kwargs)
            except self._psycopg.OperationalError as exc:  # down, unreachable, pool timeout, or a broken connection
                if attempt == 2 or conn is None or not conn.broken:
                    raise StorageError(f"PostgreSQL is unavailable: {exc}") from None

    def _close_connections(self):
        self._pool.close()
        if self._writer_conn is not None:
            self._writer_conn.close()


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str = DEFAULT_DATABASE_URL, *, create: bool = True, migrate: bool = True,
                 synchronous: str = "FULL") -> Storage:
    """Open the database a URL names, applying pending migrations unless told not to.

    Accepted: sqlite:///relative.db, sqlite:////absolute/path.db, postgresql://..., postgres://...
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StorageError("the SQLite URL names no file: use sqlite:///runtara.db or sqlite:////abs/path.db")
        storage = SQLiteStorage(path, synchronous=synchronous, create=create)
    elif url.startswith(("postgresql://", "postgres://")):
        storage = PostgresStorage(url)
    else:
        raise StorageError(f"unsupported database URL {_redact(url)!r}: use sqlite:///relative.db,"
                           " sqlite:////absolute/path.db, postgresql://user@host/db or postgres://user@host/db")
    if migrate:
        try:
            storage.migrate()
        except BaseException:
            storage.close()
            raise
    return storage


# =============================================================================================
# 5. Core semantics: each request is one transaction over the storage (PROTOCOL.md section 4)
# =============================================================================================


def instance_token(secret: str, tenant_id: str, instance_id: str) -> str:
    return hmac.new(secret.encode(), f"{tenant_id}\n{instance_id}".encode(), hashlib.sha256).hexdigest()


def admin_token(secret: str) -> str:
    return hmac.new(secret.encode(), b"admin", hashlib.sha256).hexdigest()


def _same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclasses.dataclass
class Session:
    """What the server knows about one client connection."""

    instance_id: str | None = None  # the instance this connection registered, when authentication is on
    trusted: bool = False  # a request on it carried a valid token (or authentication is off)


def _compact(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def _status_map(instance: dict, with_output: bool = True) -> dict:
    fields = {"found": True, **instance}
    if not with_output:
        del fields["output"]
    return _compact(fields)


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="seconds")


def _check_run(instance: dict, run: int | None) -> None:
    """A request of `run` may act only while that run is the instance's newest."""
    if run is None or run == instance["run"]:
        return
    if run < instance["run"]:
        raise Superseded(f"run {run} of instance {instance['instance_id']} was superseded by run {instance['run']}")
    raise InvalidRequest(f"instance {instance['instance_id']} has no run {run} yet (its newest is {instance['run']})")


def _refuse(tx: Tx, instance_id: str, action: str, run: int | None = None):
    """Raise the error that explains why a guarded statement changed nothing."""
    instance = _existing(tx, instance_id)
    _check_run(instance, run)
    raise InvalidState(f"instance {instance_id} is {instance['status']}; cannot {action}")


def _existing(tx: Tx, instance_id: str, lock: bool = False) -> dict:
    instance = tx.get_instance(instance_id, lock=lock)
    if instance is None:
        raise InstanceNotFound(f"no instance {instance_id}")
    return instance


def _not_due(instance: dict, signal: dict | None, now: int) -> str | None:
    """Why a suspended instance may not run yet, or None when it is due."""
    wakes = instance["sleep_until_ms"]
    if signal is not None and signal["signal_type"] == "resume":
        return None
    if wakes is None or signal is not None and signal["signal_type"] == "pause":
        return f"instance {instance['instance_id']} is paused; send resume to run it again"
    if wakes > now:
        return f"instance {instance['instance_id']} sleeps until {_iso(wakes)}; send resume to wake it now"
    return None


def _register(tx: Tx, instance_id, tenant_id, checkpoint_id, run, now, max_busy) -> dict:
    tx.create_instance(instance_id, tenant_id, now)
    instance = tx.get_run(instance_id)
    if instance["tenant_id"] != tenant_id:
        raise TenantMismatch(f"instance {instance_id} belongs to another tenant")
    if instance["status"] in TERMINAL:
        raise InvalidState(f"instance {instance_id} is {instance['status']}; it cannot run again")
    reply = {"instance_id": instance_id, "status": "running", "checkpoint_id": instance["checkpoint_id"],
             "resumed": instance["started_at_ms"] is not None, "workflow": instance["workflow"],
             "input": tx.get_input(instance_id)}
    if run is not None:  # a new connection of the same run: bound, nothing begins
        _check_run(instance, run)
        if instance["status"] != "running":
            raise InvalidState(f"instance {instance_id} is {instance['status']}; run {run} has ended")
        return _compact({**reply, "run": run})
    if checkpoint_id is not None and tx.get_checkpoint(instance_id, checkpoint_id) is None:
        raise CheckpointNotFound(f"instance {instance_id} has no checkpoint {checkpoint_id}")
    signal = tx.get_signal(instance_id)
    lease = instance["launch_lease_until_ms"]
    reserved = lease is not None and lease > now  # a launch holds a slot for this registration
    if instance["status"] == "suspended" and not reserved:
        refusal = _not_due(instance, signal, now)
        if refusal:
            raise InvalidState(refusal)
    if instance["status"] != "running" and not reserved:
        tx.lock_capacity()
        if tx.count_busy(now) >= max_busy:
            raise Overloaded(f"{max_busy} instances are already running or being launched; try again later")
    wakes = instance["sleep_until_ms"]
    if signal is not None and signal["signal_type"] == "resume":  # it let this run in: consumed
        tx.delete_signal(instance_id)
        tx.insert_event(instance_id, "signal", now, subtype="resume")
        wakes = None if wakes is None else min(wakes, now)  # the replayed sleep returns at once
    reply["run"] = tx.begin_run(instance_id, now, wakes)
    tx.insert_event(instance_id, "resumed" if reply["resumed"] else "started", now, checkpoint_id=checkpoint_id)
    return _compact(reply)


def _save(tx: Tx, instance_id, checkpoint_id, state, run, now, action: str) -> dict:
    saved = tx.save_checkpoint(instance_id, checkpoint_id, state, now, run)
    if saved is None:
        _refuse(tx, instance_id, action, run)
    return saved


def _signals_that_fit(tx: Tx, instance_id, checkpoint_id, signal, custom_size, room: int) -> dict:
    """The signals an answer with `room` bytes to spare carries: the custom signal first (taken, so delivered
    once, only when it goes out), then the pending signal (delivered until acknowledged, so it can wait)."""
    carried = {}
    if custom_size is not None and custom_size <= room:
        carried["custom_signal"] = {"checkpoint_id": checkpoint_id,
                                    "payload": tx.take_custom_signal(instance_id, checkpoint_id)}
        room -= custom_size
    if signal is not None and len(signal["payload"]) <= room:
        carried["signal"] = signal
    return carried


def _checkpoint(tx: Tx, instance_id, checkpoint_id, state, run, now, room) -> dict:
    saved = _save(tx, instance_id, checkpoint_id, state, run, now, "save a checkpoint")
    first = saved["first"] or b""
    carried = _signals_that_fit(tx, instance_id, checkpoint_id, saved["signal"], saved["custom_size"],
                                room - len(first))
    return _compact({"found": saved["first"] is not None, "state": first, "pending_signal": carried.get("signal"),
                     "custom_signal": carried.get("custom_signal")})


def _get_checkpoint(tx: Tx, instance_id, checkpoint_id) -> dict:
    _existing(tx, instance_id)
    state = tx.get_checkpoint(instance_id, checkpoint_id)
    return {"found": state is not None, "state": b"" if state is None else state}


def _start_sleep(tx: Tx, instance_id, checkpoint_id, state, duration_ms, run, now,
                 inline_max_ms) -> tuple[bool, int, int]:
    """Save the checkpoint and settle the wake time: (suspended, wake_at_ms, the run that sleeps)."""
    saved = _save(tx, instance_id, checkpoint_id, state, run, now, "sleep")
    replayed, stored = saved["first"] is not None, saved["sleep_until_ms"]
    if replayed and stored is not None:
        wake_at = stored  # a relaunched instance replaying its sleep waits only for what is left
    elif replayed:
        return False, now, saved["run"]  # this sleep already returned once; it is not slept again
    else:
        wake_at = now + duration_ms
        tx.set_sleep(instance_id, wake_at)
    if wake_at - now <= inline_max_ms:
        return False, wake_at, saved["run"]
    tx.transition(instance_id, "suspended", ("running",), now)
    tx.insert_event(instance_id, "suspended", now, subtype="sleep", checkpoint_id=checkpoint_id)
    _cancel_waiting(tx, instance_id, now)
    return True, wake_at, saved["run"]


def _apply_event(tx: Tx, now: int, instance_id, event_type, payload=None, subtype=None, checkpoint_id=None,
                 timestamp_ms=None, run=None) -> None:
    # timestamp_ms is the instance's clock; events are stamped by the server's, so they order across instances
    if event_type == "completed":
        moved = tx.transition(instance_id, "completed", ("running", "suspended"), now, output=payload or b"", run=run)
    elif event_type == "failed":
        error = (payload or b"").decode("utf-8", "replace").replace("\x00", "\ufffd") or "failed"
        moved = tx.transition(instance_id, "failed", ("running", "suspended"), now, error=error, run=run)
    elif event_type == "suspended":
        moved = tx.transition(instance_id, "suspended", ("running",), now, run=run)
    else:  # heartbeat, custom: change no status
        moved = tx.touch_heartbeat(instance_id, now, run)
    if not moved:
        _refuse(tx, instance_id, f"report {event_type}", run)
    if event_type != "heartbeat":
        tx.insert_event(instance_id, event_type, now, subtype=subtype, checkpoint_id=checkpoint_id, payload=payload)
    if event_type == "suspended":
        _cancel_waiting(tx, instance_id, now)


def _apply_events(tx: Tx, events: list[dict], now: int) -> int:
    for event in events:
        _apply_event(tx, now, **event)
    return len(events)


def _poll_signals(tx: Tx, instance_id, checkpoint_id, run, room) -> dict:
    _check_run(_existing(tx, instance_id), run)
    custom_size = tx.custom_signal_size(instance_id, checkpoint_id) if checkpoint_id else None
    return _signals_that_fit(tx, instance_id, checkpoint_id, tx.get_signal(instance_id), custom_size,
                             room)


SIGNAL_EFFECTS = {"cancel": ("cancelled", ACTIVE), "pause": ("suspended", ("pending", "running"))}


def _take_effect(tx: Tx, instance_id: str, signal_type: str, now: int, payload: bytes | None = None) -> None:
    """A signal takes effect: cancel ends the instance; pause suspends it with no wake time, so that only a
    resume lets it run again; resume changes nothing here."""
    if signal_type in SIGNAL_EFFECTS:
        to_status, from_statuses = SIGNAL_EFFECTS[signal_type]
        tx.transition(instance_id, to_status, from_statuses, now)
    if signal_type == "pause":
        tx.clear_sleep(instance_id)
    tx.insert_event(instance_id, "signal", now, subtype=signal_type, payload=payload)


def _cancel_waiting(tx: Tx, instance_id: str, now: int) -> None:
    """The instance was just suspended: a cancel that waited for its process takes effect, as none runs now."""
    signal = tx.get_signal(instance_id)
    if signal is not None and signal["signal_type"] == "cancel":
        tx.delete_signal(instance_id)
        _take_effect(tx, instance_id, "cancel", now)


def _signal_ack(tx: Tx, instance_id, signal_type, acknowledged, run, now) -> dict:
    _check_run(_existing(tx, instance_id, lock=True), run)
    payload = tx.ack_signal(instance_id, signal_type) if acknowledged else None
    if payload is not None:
        _take_effect(tx, instance_id, signal_type, now, payload or None)  # the event keeps what the operator said
    return {"status": tx.get_instance(instance_id)["status"], "applied": payload is not None}


def _retry_attempt(tx: Tx, instance_id, checkpoint_id, attempt_number, error_message, timestamp_ms, run, now) -> None:
    if not tx.touch_heartbeat(instance_id, now, run):
        _refuse(tx, instance_id, "report a retry", run)
    payload = msgpack.packb(_compact({"attempt_number": attempt_number, "error_message": error_message,
                                      "timestamp_ms": timestamp_ms}))
    tx.insert_event(instance_id, "retry", now, checkpoint_id=checkpoint_id, payload=payload)


def _require_active(tx: Tx, instance_id: str) -> dict:
    instance = tx.get_run(instance_id)
    if instance is None:
        raise InstanceNotFound(f"no instance {instance_id}")
    if instance["status"] in TERMINAL:
        raise InvalidState(f"instance {instance_id} is {instance['status']}; it takes no more signals")
    return instance


def _send_signal(tx: Tx, instance_id, signal_type, payload, now) -> dict:
    """Store the signal for the instance's process, or apply it at once where no process is involved: cancel
    of a pending or suspended instance or of a dead run, pause of a pending one or of a dead run. A pending
    cancel is never replaced."""
    instance = _require_active(tx, instance_id)
    status, process = instance["status"], instance["status"] == "running" and instance["orphaned_at_ms"] is None
    pending = tx.get_signal(instance_id)
    if pending is not None and pending["signal_type"] == "cancel" and signal_type != "cancel":
        raise InvalidState(f"instance {instance_id} has a pending cancel; it takes no {signal_type}")
    immediate = SIGNAL_EFFECTS.get(signal_type)
    if immediate and not process and status in immediate[1] or signal_type == "resume" and process:
        # No process is involved, or (a resume to a live run) there is nothing to resume: it takes effect now,
        # replacing a pending pause, instead of lingering to make a later sleep of the run due at once.
        tx.delete_signal(instance_id)
        _take_effect(tx, instance_id, signal_type, now, payload or None)
    else:
        tx.put_signal(instance_id, signal_type, payload, now)
        if signal_type == "pause" and status == "suspended":  # a launch under way for it is called off
            tx.end_launch(instance_id, instance["launch_after_ms"])
    return {"instance_id": instance_id, "signal_type": signal_type,
            "status": tx.get_instance(instance_id)["status"]}


def _send_custom_signal(tx: Tx, instance_id, checkpoint_id, payload, now) -> None:
    _require_active(tx, instance_id)
    tx.put_custom_signal(instance_id, checkpoint_id, payload, now)


def _start_instance(tx: Tx, instance_id, tenant_id, workflow, input, now) -> dict:
    created = tx.create_instance(instance_id, tenant_id, now, workflow or "default", input or None)
    instance = _existing(tx, instance_id)
    if instance["tenant_id"] != tenant_id:
        raise TenantMismatch(f"instance {instance_id} belongs to another tenant")
    if created:
        tx.insert_event(instance_id, "created", now, subtype=instance["workflow"])
    return {"instance_id": instance_id, "status": instance["status"], "created": created}


def _fork_instance(tx: Tx, instance_id, new_instance_id, checkpoint_id, now) -> dict:
    """A new pending instance that replays the source's steps up to `checkpoint_id` (all when None) from
    copies of their checkpoints, then runs the rest: restart from a good step."""
    source = _existing(tx, instance_id)
    up_to = None if checkpoint_id is None else tx.checkpoint_order(instance_id, checkpoint_id)
    if checkpoint_id is not None and up_to is None:
        raise CheckpointNotFound(f"instance {instance_id} has no checkpoint {checkpoint_id}")
    if not tx.create_instance(new_instance_id, source["tenant_id"], now, source["workflow"], tx.get_input(instance_id)):
        raise InvalidRequest(f"instance {new_instance_id} exists already; a fork needs a new id")
    latest = tx.copy_checkpoints(instance_id, new_instance_id, up_to)
    tx.insert_event(instance_id, "forked", now, subtype=new_instance_id, checkpoint_id=checkpoint_id)
    tx.insert_event(new_instance_id, "forked_from", now, subtype=instance_id, checkpoint_id=checkpoint_id)
    return _compact({"instance_id": new_instance_id, "status": "pending", "checkpoint_id": latest,
                     "checkpoints": tx.count_checkpoints(new_instance_id)})


def _fitting(rows: list[dict], room: int | None) -> list[dict]:
    """The first rows whose encodings add up to at most `room` bytes (None: all): a listing's answer never
    exceeds the frame maximum; the client asks for the rest with `offset`."""
    if room is None:
        return rows
    for count, row in enumerate(rows):
        room -= len(msgpack.packb(row))
        if room < 0:
            return rows[:count]
    return rows


def _list_instances(tx: Tx, tenant_id, status, limit, offset, room=None) -> dict:
    instances = tx.list_instances(tenant_id=tenant_id, status=status, limit=limit or 100, offset=offset or 0)
    listed = []
    for instance in instances:
        error = instance["error"]
        if error is not None and len(error) > PREVIEW_BYTES:  # listings carry a preview of a long error
            instance = {**instance, "error": error[:PREVIEW_BYTES], "error_size": len(error)}
        listed.append(_status_map(instance, with_output=False))
    return {"instances": _fitting(listed, room),
            "total_count": tx.count_instances(tenant_id=tenant_id, status=status)}


def _list_checkpoints(tx: Tx, instance_id, limit, offset, room=None) -> dict:
    _existing(tx, instance_id)
    checkpoints = tx.list_checkpoints(instance_id, limit=limit or 100, offset=offset or 0)
    return {"checkpoints": _fitting(checkpoints, room),
            "total_count": tx.count_checkpoints(instance_id)}


def _list_events(tx: Tx, instance_id, event_type, subtype, limit, offset, room=None) -> dict:
    _existing(tx, instance_id)
    events = tx.list_events(instance_id, event_type, subtype, limit=limit or 100, offset=offset or 0)
    return {"events": _fitting([_compact(event) for event in events], room),
            "total_count": tx.count_events(instance_id, event_type, subtype)}


# -- the scheduler's rules (section 5): what a launch, an exit and silence mean --------------------------


@dataclasses.dataclass(frozen=True)
class Recovery:
    """The settings the recovery rules need, so that the rules stay pure functions of the transaction."""

    max_launch_attempts: int
    max_restarts: int
    backoff_ms: int                   # the first retry's delay; each one after doubles it, up to a minute
    workflows: tuple | None           # the workflows that have a launch command (None: all)

    def retry_at(self, now: int, tries: int) -> int:
        return now + min(self.backoff_ms * 2 ** min(tries, 20), 60_000)

    def launches(self, workflow: str) -> bool:
        return self.workflows is None or workflow in self.workflows


def _orphaned(tx: Tx, instance: dict, reason: str, now: int, rules: Recovery) -> str:
    """The current run of a running instance is dead (`reason`): apply what its pending signal says, or
    relaunch it, or fail it after too many restarts in a row. The instance's status after."""
    instance_id, signal = instance["instance_id"], tx.get_signal(instance["instance_id"])
    if signal is not None and signal["signal_type"] == "cancel":  # nobody is left to acknowledge it
        tx.delete_signal(instance_id)
        _take_effect(tx, instance_id, "cancel", now)
        return "cancelled"
    if signal is not None and signal["signal_type"] == "pause":  # stays pending: paused until a resume
        tx.transition(instance_id, "suspended", ("running",), now)
        tx.insert_event(instance_id, "suspended", now, subtype="pause")
        return "suspended"
    if not rules.launches(instance["workflow"]):
        tx.transition(instance_id, "failed", ("running",), now, error=f"stale: {reason}")
        return "failed"
    if instance["restarts"] >= rules.max_restarts:
        tx.transition(instance_id, "failed", ("running",), now,
                      error=f"{reason}; {instance['restarts']} restarts in a row saved no new checkpoint")
        return "failed"
    restarts = tx.orphan(instance_id, now, rules.retry_at(now, instance["restarts"]))
    tx.insert_event(instance_id, "restart", now, payload=msgpack.packb(
        {"run": instance["run"], "restarts": restarts, "reason": reason}))
    return "running"


def _recover_silent(tx: Tx, cutoff: int, now: int, rules: Recovery) -> list[tuple[str, str]]:
    """Runs silent since before `cutoff` are dead: [(instance_id, its status after)]."""
    recovered = []
    for instance_id, since in tx.silent_runs(cutoff):
        reason = f"no heartbeat, checkpoint or event since {_iso(since)}"
        recovered.append((instance_id, _orphaned(tx, tx.get_run(instance_id), reason, now, rules)))
    return recovered


def _recover_executor(tx: Tx, executor: str, now: int, rules: Recovery) -> list[tuple[str, str]]:
    """`executor` starts: the runs and launches it held died with its last process. [(instance_id, status)]"""
    recovered = []
    for instance_id in tx.executor_runs(executor):
        instance = tx.get_run(instance_id)
        if instance["status"] == "running":
            status = _orphaned(tx, instance, f"its worker {executor!r} stopped", now, rules)
        else:
            tx.end_launch(instance_id, None)
            status = instance["status"]
        recovered.append((instance_id, status))
    return recovered


def _launch_ended(tx: Tx, claim: dict, pid: int | None, code: int | None, reason: str, now: int,
                  rules: Recovery) -> tuple[str | None, str]:
    """A launched process ended (`code` None: it never started, or the server killed it). Charged only to
    this launch: as a failed launch when the instance has begun no run since the claim, as an orphaned run
    when the run the launch began is still the newest and running. (The instance's status after, and
    whether the launch "registered" or "failed".)"""
    instance = tx.get_run(claim["instance_id"])
    if instance is None:
        return None, "failed"
    began = claim["run"] + 1 if instance["run"] > claim["run"] else None
    return _launch_charged(tx, claim, instance, began, pid, code, reason, now, rules), \
        "failed" if began is None else "registered"


def _launch_charged(tx: Tx, claim: dict, instance: dict, began: int | None, pid: int | None, code: int | None,
                    reason: str, now: int, rules: Recovery) -> str | None:
    """_launch_ended's rules, with what it found: the instance's status after."""
    tx.insert_event(claim["instance_id"], "exited", now,
                    payload=msgpack.packb({"pid": pid, "code": code, "run": began}))
    if instance["status"] in TERMINAL:
        return instance["status"]
    if began is None and (instance["launch_lease_until_ms"] is None
                          or instance["launch_attempts"] != claim["launch_attempts"]):
        return instance["status"]  # a signal called this launch off, or a later claim replaced it: not charged
    if began is None:
        attempts = instance["launch_attempts"]
        reason = reason if code is None else f"{reason} before registering"  # else it says so already
        tx.insert_event(claim["instance_id"], "launch_failed", now, payload=reason.encode())
        if attempts >= rules.max_launch_attempts:
            tx.transition(claim["instance_id"], "failed", ACTIVE, now,
                          error=f"launch failed {attempts} times; the last one {reason}")
            return "failed"
        tx.end_launch(claim["instance_id"], rules.retry_at(now, attempts))
        return instance["status"]
    if began == instance["run"] and instance["status"] == "running" and instance["orphaned_at_ms"] is None:
        return _orphaned(tx, instance, f"the process of run {began} {reason}", now, rules)
    return instance["status"]


def _health(tx: Tx) -> int:
    tx.health()
    return tx.count_running()


SHUTTING_DOWN = "the server is shutting down"


class Observer:
    """What the engine tells about its work as it goes, for metrics: this one listens to none of it (the
    server's Metrics does)."""

    def request(self, op: str, outcome: str, seconds: float) -> None:
        """A request of operation `op` (or "unknown") was answered: "ok", or the error code."""

    def claimed(self, claims: list[dict], now: int) -> None:
        """The scheduler claimed these instances for launches at `now`."""

    def launch_ended(self, workflow: str, outcome: str) -> None:
        """A launch of `workflow` ended: its process "registered" a run, or it "failed" before."""


class Core:
    """The protocol's operations over a storage; the server and the embedded backend both call dispatch().

    `clock` gives the time in epoch milliseconds (a test may replace it)."""

    def __init__(self, storage: Storage, settings: Settings | None = None, clock: Callable[[], int] = now_ms):
        self.storage = storage
        self.settings = settings or Settings()
        self.clock = clock
        self.observer = Observer()
        self.started = time.monotonic()
        self.admin_token = admin_token(self.settings.secret) if self.settings.secret else None
        self.launched = self.settings.launched_workflows  # what has a launcher here; a Scheduler sets it
        maximum = self.settings.max_message_bytes
        self.answer_room = maximum - min(ANSWER_RESERVE, maximum // 4)  # for the large values of one answer
        self._waiters: dict[str, set[asyncio.Future]] = {}  # wait_instance requests, by instance
        self.closing = False
        self._held: set[asyncio.Future] = set()  # resolved by close(): held requests answer at once

    def _write(self, fn, *args):
        return self.storage.write_soon(fn, *args)

    def _read(self, fn, *args):
        return asyncio.wrap_future(self.storage.read(fn, *args))

    async def dispatch(self, message: dict, session: Session) -> dict:
        """Answer one request map, or raise the RuntaraError that is its answer."""
        started, op = time.perf_counter(), message.get("op")
        op = op if isinstance(op, str) and op in OPERATIONS else "unknown"
        try:
            reply = await self._dispatch(message, session)
        except BaseException as exc:  # a cancelled request (its connection went away) is no error of ours
            outcome = (exc.code if isinstance(exc, RuntaraError) else
                       "cancelled" if isinstance(exc, asyncio.CancelledError) else "INTERNAL")
            self.observer.request(op, outcome, time.perf_counter() - started)
            raise
        self.observer.request(op, "ok", time.perf_counter() - started)
        return reply

    async def _dispatch(self, message: dict, session: Session) -> dict:
        op, fields, token = parse_request(message)
        self.authorize(op, fields, token, session)
        self.check_sizes(op, fields)
        if self.closing and op == "register_instance":
            raise Overloaded(SHUTTING_DOWN + "; register again in a few seconds, with this server restarted or another")
        try:
            reply = await getattr(self, op)(**fields)
        finally:
            if self._waiters:  # whatever the request changed, someone may be waiting for it
                self.changed(*([event["instance_id"] for event in fields["events"]] if op == "instance_event_batch"
                               else [fields.get("instance_id")]))
        if op == "register_instance" and self.admin_token and not _same_token(token, self.admin_token):
            session.instance_id = fields["instance_id"]
        return reply

    # The fields whose bytes are stored and come back in answers (a replayed checkpoint, a status map, an
    # event listing, a delivered custom signal, a registration): each must leave an answer room to fit.
    STORED_FIELDS = ("state", "payload", "input")

    def check_sizes(self, op: str, fields: dict) -> None:
        limit = self.answer_room
        for values in (fields["events"] if op == "instance_event_batch" else [fields]):
            for name in self.STORED_FIELDS:
                value = values.get(name)
                if value is not None and len(value) > limit:
                    raise InvalidRequest(f"field {name!r} holds {len(value)} bytes; what is stored may hold at most"
                                         f" {limit}, to leave an answer that carries it room for the rest")

    def changed(self, *instance_ids) -> None:
        """Wake the wait_instance requests of these instances, to look again."""
        for instance_id in instance_ids:
            for waiter in self._waiters.pop(instance_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def close(self) -> None:
        """Answer every held request now and take no more registrations: the server is stopping."""
        self.closing = True
        for held in self._held:
            if not held.done():
                held.set_result(None)
        self.changed(*list(self._waiters))

    async def _hold(self, seconds: float) -> None:
        """Wait `seconds`, or less if the server starts stopping meanwhile."""
        held = asyncio.get_running_loop().create_future()
        self._held.add(held)
        try:
            await asyncio.wait({held}, timeout=seconds)
        finally:
            self._held.discard(held)

    def authorize(self, op: str, fields: dict, token: str | None, session: Session) -> None:
        """PROTOCOL.md section 6; a no-op when no secret is set."""
        if self.admin_token is None or _same_token(token, self.admin_token):
            session.trusted = True
            return
        if op in OPERATOR_OPERATIONS:
            raise Unauthorized(f"{op} needs the admin token")
        if op == "register_instance":
            if not _same_token(token, instance_token(self.settings.secret, fields["tenant_id"], fields["instance_id"])):
                raise Unauthorized(f"missing or wrong token for instance {fields['instance_id']}")
            session.trusted = True
            return
        if session.instance_id is None:
            raise Unauthorized("this connection has not registered an instance")
        targets = [event["instance_id"] for event in fields["events"]] if op == "instance_event_batch" \
            else [fields["instance_id"]]
        for instance_id in targets:
            if instance_id != session.instance_id:
                raise Unauthorized(f"this connection is bound to instance {session.instance_id}, not {instance_id}")

    # -- section 3.1 ------------------------------------------------------------------------

    async def register_instance(self, instance_id, tenant_id, checkpoint_id, run):
        return await self._write(_register, instance_id, tenant_id, checkpoint_id, run, self.clock(),
                                 self.settings.max_concurrent_instances)

    async def checkpoint(self, instance_id, checkpoint_id, state, run):
        return await self._write(_checkpoint, instance_id, checkpoint_id, state, run, self.clock(),
                                 self.answer_room)

    async def get_checkpoint(self, instance_id, checkpoint_id):
        return await self._read(_get_checkpoint, instance_id, checkpoint_id)

    async def sleep(self, instance_id, checkpoint_id, state, duration_ms, run):
        suspended, wake_at, sleeper = await self._write(_start_sleep, instance_id, checkpoint_id, state, duration_ms,
                                                        run, self.clock(), self.settings.sleep_inline_max_ms)
        if not suspended:
            while (left := wake_at - self.clock()) > 0:  # asyncio may wake a hair early; never answer before the time
                if self.closing:  # the wake time stays stored: the sleep sent again waits only what is left
                    raise Overloaded(SHUTTING_DOWN + "; send the sleep again once connected: it waits only what is"
                                                     " left")
                await self._hold(left / 1000)
            if not await self._write(Tx.end_sleep, instance_id, wake_at, sleeper):
                raise Superseded(f"run {sleeper} of instance {instance_id} was superseded while it slept")
        return {"suspended": suspended, "wake_at_ms": wake_at}

    async def instance_event(self, **event):
        await self._write(_apply_events, [event], self.clock())
        return {"accepted": True}

    async def instance_event_batch(self, events):
        return {"accepted": await self._write(_apply_events, events, self.clock())}

    async def get_instance_status(self, instance_id):
        instance = await self._read(Tx.get_instance, instance_id)
        if instance is None:
            return {"found": False, "instance_id": instance_id, "status": "unknown"}
        return _status_map(instance)

    async def poll_signals(self, instance_id, checkpoint_id, run):
        job = self._write if checkpoint_id else self._read  # only a named checkpoint consumes a custom signal
        return await job(_poll_signals, instance_id, checkpoint_id, run, self.answer_room)

    async def signal_ack(self, instance_id, signal_type, acknowledged, run):
        return await self._write(_signal_ack, instance_id, signal_type, acknowledged, run, self.clock())

    async def retry_attempt(self, instance_id, checkpoint_id, attempt_number, error_message, timestamp_ms, run):
        await self._write(_retry_attempt, instance_id, checkpoint_id, attempt_number, error_message, timestamp_ms,
                          run, self.clock())
        return {"accepted": True}

    # -- section 3.2 ------------------------------------------------------------------------

    async def health_check(self):
        try:
            running, healthy = await self._read(_health), True
        except StorageError as exc:
            log.warning("health check: %s", exc)
            running, healthy = 0, False
        return {"healthy": healthy, "version": __version__, "database": self.storage.dialect.name,
                "uptime_ms": int((time.monotonic() - self.started) * 1000), "running_instances": running}

    async def start_instance(self, instance_id, tenant_id, workflow, input):
        return await self._write(_start_instance, instance_id, tenant_id, workflow, input, self.clock())

    # Other servers and the CLI change instances too, unseen here: a waiting request also looks every second.
    WAIT_RECHECK_S = 1.0

    async def wait_instance(self, instance_id, timeout_ms):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            waiter = loop.create_future()  # registered before the read, so no change between them is missed
            self._waiters.setdefault(instance_id, set()).add(waiter)
            try:
                status = await self.get_instance_status(instance_id)
                if not status["found"]:
                    raise InstanceNotFound(f"no instance {instance_id}")
                left = deadline - loop.time()
                if status["status"] in TERMINAL or left <= 0 or self.closing:
                    return status
                await asyncio.wait({waiter}, timeout=min(left, self.WAIT_RECHECK_S))
            finally:
                waiters = self._waiters.get(instance_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[instance_id]

    async def fork_instance(self, instance_id, new_instance_id, checkpoint_id):
        return await self._write(_fork_instance, instance_id, new_instance_id, checkpoint_id, self.clock())

    async def send_signal(self, instance_id, signal_type, payload):
        return await self._write(_send_signal, instance_id, signal_type, payload or b"", self.clock())

    async def send_custom_signal(self, instance_id, checkpoint_id, payload):
        await self._write(_send_custom_signal, instance_id, checkpoint_id, payload or b"", self.clock())
        return {"instance_id": instance_id, "checkpoint_id": checkpoint_id}

    async def list_instances(self, tenant_id, status, limit, offset):
        return await self._read(_list_instances, tenant_id, status, limit, offset, self.answer_room)

    async def list_checkpoints(self, instance_id, limit, offset):
        return await self._read(_list_checkpoints, instance_id, limit, offset, self.answer_room)

    async def list_events(self, instance_id, event_type, subtype, limit, offset):
        return await self._read(_list_events, instance_id, event_type, subtype, limit, offset,
                                self.answer_room)

    # -- the scheduler's rules (section 5): a Scheduler drives them, launchers run what they decide ----------

    # A launcher judges its launch when the launch timeout has passed since the process started; the lease
    # lasts longer, so that no other claim replaces the launch before its launcher has judged it.
    LAUNCH_LEASE_GRACE_MS = 5_000

    @property
    def rules(self) -> Recovery:
        settings = self.settings
        return Recovery(settings.launch_max_attempts, settings.max_restarts, max(settings.wake_interval_ms, 10),
                        self.launched)

    async def claim_launches(self, limit: int = 32, in_process: tuple = (), executor: str | None = None) -> list[dict]:
        """Claim the instances to launch now, within the concurrency limit (see Tx.claim_launches)."""
        now = self.clock()
        lease_until = now + self.settings.launch_timeout_ms + self.LAUNCH_LEASE_GRACE_MS
        claims = await self._write(Tx.claim_launches, now, lease_until, self.launched,
                                   self.settings.max_concurrent_instances, limit, in_process, executor)
        self.observer.claimed(claims, now)
        return claims

    async def record_launch(self, claim: dict, pid: int) -> None:
        await self._write(Tx.insert_event, claim["instance_id"], "launched", self.clock(), None, None,
                          msgpack.packb({"pid": pid, "attempt": claim["launch_attempts"], "run": claim["run"] + 1}))

    async def still_launching(self, claim: dict) -> bool:
        """True while the instance has begun no run since the claim (its launched process has not registered):
        whatever became of the instance meanwhile, such a process past its launch timeout is to be killed."""
        instance = await self._read(Tx.get_instance, claim["instance_id"])
        return instance is None or instance["run"] == claim["run"]

    async def launch_ended(self, claim: dict, pid: int | None, code: int | None, reason: str) -> str | None:
        status, outcome = await self._write(_launch_ended, claim, pid, code, reason, self.clock(), self.rules)
        self.observer.launch_ended(claim["workflow"], outcome)
        log.info("launch of instance %s ended: it %s; the instance is %s", claim["instance_id"], reason, status)
        self.changed(claim["instance_id"])
        return status

    async def recover_silent(self) -> list[tuple[str, str]]:
        now = self.clock()
        recovered = await self._write(_recover_silent, now - self.settings.heartbeat_timeout_ms, now, self.rules)
        for instance_id, status in recovered:
            log.warning("instance %s went silent; it is now %s", instance_id, status)
        self.changed(*(instance_id for instance_id, _ in recovered))
        return recovered

    async def recover_executor(self, executor: str) -> list[tuple[str, str]]:
        recovered = await self._write(_recover_executor, executor, self.clock(), self.rules)
        for instance_id, status in recovered:
            log.warning("instance %s was running in worker %r when it stopped; it is now %s", instance_id, executor,
                        status)
        self.changed(*(instance_id for instance_id, _ in recovered))
        return recovered


class Scheduler:
    """Drives the rules above: at start and every wake interval (or sooner when poked) it recovers silent
    runs and claims what waits for a launch, then hands each claim to the launcher of its workflow.

    A launcher has `workflows` (a tuple of names, or None for any workflow without a launcher of its own),
    `in_process` (True when its runs live in this process) and `async launch(claim)`, which runs the claim
    to its end and reports it with Core.launch_ended. With `executor`, in-process runs are claimed under
    that name, and the runs it held when its last process stopped are recovered first."""

    def __init__(self, core: Core, launchers: list, executor: str | None = None):
        self.core, self.launchers, self.executor = core, launchers, executor
        self.in_process = tuple(name for launcher in launchers if launcher.in_process for name in launcher.workflows)
        named = {name for launcher in launchers if launcher.workflows is not None for name in launcher.workflows}
        core.launched = None if any(launcher.workflows is None for launcher in launchers) else tuple(sorted(named))
        self.tasks: set[asyncio.Task] = set()  # launches under way
        self._poked = asyncio.Event()
        self._loop: asyncio.Task | None = None

    def launcher_for(self, workflow: str):
        named = [launcher for launcher in self.launchers if launcher.workflows and workflow in launcher.workflows]
        return (named or [launcher for launcher in self.launchers if launcher.workflows is None])[0]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        """Look for work now rather than at the next interval (something was just started)."""
        self._poked.set()

    async def _run(self):
        interval = max(self.core.settings.wake_interval_ms, 10) / 1000
        if self.executor is not None:
            await self.core.recover_executor(self.executor)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._poked.wait(), interval)
            self._poked.clear()

    async def tick(self) -> None:
        await self.core.recover_silent()
        if self.launchers:
            for claim in await self.core.claim_launches(in_process=self.in_process, executor=self.executor):
                task = asyncio.get_running_loop().create_task(self.launcher_for(claim["workflow"]).launch(claim))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        """Stop deciding, and stop watching launches; in-process runs are cancelled (their process stops)."""
        tasks = {task for task in (self._loop, *self.tasks) if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


# =============================================================================================
# 6. QUIC server (aioquic)
# =============================================================================================

TLS_CERT_FILE, TLS_KEY_FILE = "runtara-cert.pem", "runtara-key.pem"


def state_dir(database_url: str) -> Path:
    """Where the server keeps its own files: beside a SQLite database, else the working directory."""
    if database_url.startswith("sqlite:///") and database_url != "sqlite:///:memory:":
        return Path(database_url[len("sqlite:///"):]).resolve().parent
    return Path.cwd()


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def _usable_certificate(cert_path: Path, key_path: Path) -> bool:
    """A kept certificate is used unless it is missing, or an earlier version's CA:TRUE one, which strict
    verifiers (rustls, webpki) refuse as a server's own certificate."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    from cryptography import x509

    try:
        constraints = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
            x509.BasicConstraints).value
    except (ValueError, x509.ExtensionNotFound):
        return True  # not one of ours: leave it alone
    return not constraints.ca


def ensure_certificate(settings: Settings) -> tuple[str, str]:
    """The configured certificate, or a self-signed one for localhost made once and kept: an end-entity
    certificate (CA:FALSE, with key identifiers and the server key usages) that clients may trust as is."""
    if settings.tls_cert:
        return settings.tls_cert, settings.tls_key
    folder = state_dir(settings.database_url)
    cert_path, key_path = folder / TLS_CERT_FILE, folder / TLS_KEY_FILE
    if _usable_certificate(cert_path, key_path):
        return str(cert_path), str(key_path)
    import fcntl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".runtara-tls.lock", "w") as lock:  # servers starting together make one pair
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable_certificate(cert_path, key_path):
            return str(cert_path), str(key_path)
        if cert_path.exists() and key_path.exists():  # so it was an earlier version's CA certificate
            log.warning("replacing %s: earlier versions made it a CA certificate, which rustls refuses", cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        signing_only = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                                      "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(start)
                .not_valid_after(start + datetime.timedelta(days=3650))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, **signing_only), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
                .sign(key, hashes.SHA256()))
        _write_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), 0o600)
        _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("created a self-signed TLS certificate at %s", cert_path)
    return str(cert_path), str(key_path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@functools.cache
def _frame_protocol():
    """What both ends of a connection share, built on first use: importing aioquic costs about 0.2 s,
    which the CLI and the embedded backend do not pay."""
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.tls import Epoch

    class FrameProtocol(QuicConnectionProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Neither end changes its address on purpose, so each asks the other for two connection ids,
            # RFC 9000's minimum, not aioquic's eight: six fewer ids and routing entries (3 KB) a connection.
            self._quic._local_active_connection_id_limit = 2
            # aioquic acknowledges a packet after 1 ms, in a datagram of its own unless this end sends
            # something sooner. Each end's next frame usually follows within milliseconds (the server's answer
            # after its commit, the client's next request after the answer), so wait up to 15 ms for it (under
            # the 25 ms max_ack_delay aioquic advertises, with room for a busy loop's late timer): with 64
            # instances, a quarter fewer datagrams.
            self._quic._ack_delay = 0.015

        def send_frame(self, stream_id: int, frame: bytes) -> None:
            """Send a whole frame on a stream, with the ACK this end owes the peer in the same datagram.

            aioquic writes an ACK frame only once its ack delay has run out, so a request or answer sent
            sooner leaves the ACK to a datagram of its own, which costs each end as much CPU as the frame.
            Making the owed ACK due now lets it ride (RFC 9000, 13.2.1 and 13.2.2: an ACK may go in any
            packet); a frame per request and one per answer is then all that crosses."""
            space = self._quic._spaces[Epoch.ONE_RTT]
            if space.ack_at is not None:
                space.ack_at = 0.0
            self._quic.send_stream_data(stream_id, frame, end_stream=True)
            self.transmit()

    return FrameProtocol


@functools.cache
def _server_protocol():
    from aioquic.buffer import Buffer
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived, StreamReset
    from aioquic.tls import AlertUnexpectedMessage, State

    class FrameHandlers:
        """What aioquic reads, for each frame type, from the table of handlers each connection builds: 33 bound
        methods with the epochs each frame may come in, 5 KB a connection. One table of the functions serves
        every connection instead; this view binds the connection's handler as a frame is read."""
        __slots__ = ("connection", "table")

        def __init__(self, connection, table: dict):
            self.connection, self.table = connection, table

        def __getitem__(self, frame_type: int):
            handler, epochs = self.table[frame_type]
            return handler.__get__(self.connection), epochs

    class TLSAfterHandshake:
        """What a server's TLS context is once the handshake is done: aioquic reads it for nothing but the
        handshake data a client sends after it, and a QUIC client has none to send (RFC 9001 forbids KeyUpdate;
        this server asks for no certificate and sends no session tickets). aioquic's own would wait for a whole
        message before refusing it; this refuses the first byte."""
        state = State.SERVER_POST_HANDSHAKE

        def handle_message(self, data: bytes, output: dict) -> None:
            raise AlertUnexpectedMessage

    shared_table: dict[int, tuple] | None = None  # built from the first connection's, whole before it is shared
    tls_after_handshake, discarded_keys = TLSAfterHandshake(), CryptoPair()  # never set up: not valid

    class ServerProtocol(_frame_protocol()):
        """One client connection: one frame in and one frame out per bidirectional stream."""

        def __init__(self, *args, server: "Server", **kwargs):
            super().__init__(*args, **kwargs)
            # Memory: an idle connection cost aioquic about 71 KB. Its table of frame handlers is the same for
            # every connection, so all share one (FrameHandlers); what only the handshake needed goes when it
            # is done (shed_handshake_state).
            nonlocal shared_table
            handlers = getattr(self._quic, "_QuicConnection__frame_handlers", None)
            if isinstance(handlers, dict):
                if shared_table is None:  # servers on other threads may race here: each builds a whole table
                    shared_table = {frame_type: (handler.__func__, epochs)
                                    for frame_type, (handler, epochs) in handlers.items()}
                self._quic._QuicConnection__frame_handlers = FrameHandlers(self._quic, shared_table)
            self.server = server
            self.session = Session()
            self.readers: dict[int, FrameReader] = {}
            self.progress: dict[int, float] = {}  # when each unfinished request last received bytes
            self.rejected: set[int] = set()  # streams answered early whose remaining bytes are dropped
            self.buffered = 0  # bytes held by self.readers
            self.pool = server.untrusted if server.core.admin_token else server.trusted  # where they count
            self.open = True
            server.connections.add(self)
            server.connection_changes += 1
            self.new_requests = False  # the datagram being read started requests
            self.transmit_timer: asyncio.TimerHandle | None = None

        # aioquic transmits after every datagram it reads. After one that brought requests, that would only
        # build an empty packet: what this end owes (the ACK, flow control) goes with the answers, a commit
        # later. Wait for them, but never longer than ANSWER_WAIT_S, which is less than the ACK delay.
        ANSWER_WAIT_S = 0.010

        def datagram_received(self, data, addr):
            self.new_requests = False
            self._quic.receive_datagram(data, addr, now=self._loop.time())
            self._process_events()
            if not self.new_requests:
                self.transmit()
            elif self.transmit_timer is None:
                self.transmit_timer = self._loop.call_later(self.ANSWER_WAIT_S, self.transmit)

        def transmit(self):
            if self.transmit_timer is not None:
                self.transmit_timer.cancel()
                self.transmit_timer = None
            super().transmit()

        def quic_event_received(self, event):
            if isinstance(event, StreamDataReceived):
                self.data_received(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                self.drop(event.stream_id)
                self.rejected.discard(event.stream_id)
            elif isinstance(event, HandshakeCompleted):
                self.shed_handshake_state()
            elif isinstance(event, ConnectionTerminated):
                self.open = False
                for stream_id in list(self.readers):
                    self.drop(stream_id)
                self.rejected.clear()
                self.server.connections.discard(self)
                self.server.connection_changes += 1

        def shed_handshake_state(self):
            """aioquic keeps, for the connection's life, what only the handshake needed: a 16 KiB buffer per
            epoch for the TLS messages this end sends (48 of the 71 KB), the TLS context with its key schedule
            and key shares (6 KB, OpenSSL's part included), and the keys of the epochs it has discarded
            (initial, handshake, and 0-RTT, which this server never accepts: 4 KB). A server's TLS writes
            nothing once the handshake is done, so empty buffers, one TLS stand-in and one set of keys that
            were never set up, all shared, take their place."""
            quic = self._quic
            buffers = getattr(quic, "_crypto_buffers", {})
            for epoch in buffers:
                buffers[epoch] = Buffer(capacity=0)
            if hasattr(quic, "tls"):
                quic.tls = tls_after_handshake
            for keys in (getattr(quic, "_cryptos", {}), getattr(quic, "_cryptos_initial", {})):
                for name, pair in keys.items():  # by epoch, and by QUIC version
                    if not (pair.recv.is_valid() or pair.send.is_valid()):
                        keys[name] = discarded_keys

        def data_received(self, stream_id: int, data: bytes, end: bool):
            if stream_id in self.rejected:
                if end:
                    self.rejected.discard(stream_id)
                return
            reader = self.readers.get(stream_id)
            if reader is None:
                reader = self.readers[stream_id] = FrameReader(self.server.settings.max_message_bytes
                                                               if self.trusted() else
                                                               UNTRUSTED_FRAME_BYTES - FRAME_HEADER.size)
            try:
                self.hold(len(data))
                frame = reader.feed(data, end)
                if frame is not None and frame[0] != FRAME_REQUEST:
                    raise InvalidRequest(f"expected a request frame (type {FRAME_REQUEST}), got type {frame[0]}")
            except RuntaraError as exc:
                if isinstance(exc, FrameTooLarge) and self.pool is self.server.untrusted:
                    exc = FrameTooLarge(f"{exc} until this connection shows a valid token: register first")
                self.reject(stream_id, exc, end)
                return
            self.progress[stream_id] = self._loop.time()
            if frame is not None:
                self.drop(stream_id)
                self.server.track(self.handle(stream_id, frame[1]))
                self.new_requests = True

        def reject(self, stream_id: int, error: RuntaraError, end: bool = False):
            """Answer a stream with an error now and drop the rest of its bytes (a request of no operation yet:
            its frame was bad, too large, or stalled)."""
            self.server.core.observer.request("unknown", error.code, 0.0)
            self.drop(stream_id)
            if not end:
                self.rejected.add(stream_id)
                self._quic.stop_stream(stream_id, 0)
            self.answer(stream_id, encode_error(error))

        def trusted(self) -> bool:
            """Whether this connection has shown a valid token (always, without authentication). Until it has,
            it draws on a pool of its own and may hold only small frames, so that peers without a token can
            never lock out those with one."""
            if self.pool is self.server.untrusted and self.session.trusted:  # its bytes move with it
                self.server.untrusted.held -= _pooled(self.buffered)
                self.pool = self.server.trusted
                self.server.trusted.held += _pooled(self.buffered)
            return self.pool is self.server.trusted

        def hold(self, size: int):
            """Bound the bytes of unfinished requests, per connection and in the whole server."""
            trusted = self.trusted()
            limit = self.server.settings.max_message_bytes + FRAME_HEADER.size if trusted else UNTRUSTED_FRAME_BYTES
            if self.buffered + size > limit:
                raise (Overloaded(f"this connection's unfinished requests would hold more than {limit} bytes")
                       if trusted else FrameTooLarge(f"this connection's unfinished requests would hold more than"
                                                     f" {limit} bytes"))
            if not self.pool.take(_pooled(self.buffered + size) - _pooled(self.buffered)):
                raise Overloaded("the server holds too many bytes of unfinished requests; try again")
            self.buffered += size

        def drop(self, stream_id: int):
            reader = self.readers.pop(stream_id, None)
            self.progress.pop(stream_id, None)
            if reader is not None:
                self.pool.take(_pooled(self.buffered - len(reader.buffer)) - _pooled(self.buffered))
                self.buffered -= len(reader.buffer)

        def reset_stalled(self, before: float):
            """Reset the unfinished requests that received nothing since `before`."""
            for stream_id in [stream_id for stream_id, at in self.progress.items() if at < before]:
                self.reject(stream_id, Overloaded("this request received no bytes for too long; it was reset"))
            self.transmit()

        async def handle(self, stream_id: int, message: dict):
            try:
                reply = encode_frame(FRAME_RESPONSE, await self.server.core.dispatch(message, self.session))
                if len(reply) - FRAME_HEADER.size > self.server.settings.max_message_bytes:  # a client refuses it
                    raise FrameTooLarge(f"the answer would be {len(reply) - FRAME_HEADER.size} bytes; the maximum is"
                                        f" {self.server.settings.max_message_bytes}")
            except RuntaraError as exc:
                reply = encode_error(exc)
            except Exception:
                log.exception("request %r failed", message.get("op"))
                reply = encode_error(RuntaraError("internal error; the server logged the cause"))
            self.answer(stream_id, reply)

        def answer(self, stream_id: int, frame: bytes):
            if not self.open:
                return
            try:
                self.send_frame(stream_id, frame)
            except Exception as exc:  # the peer reset or stopped the stream meanwhile
                log.debug("stream %d: answer dropped: %s", stream_id, exc)

    return ServerProtocol


UNTRUSTED_FRAME_BYTES = 64 * 1024  # what a connection without a valid token may hold: a registration is small
# Each connection's first unfinished bytes are its own, outside the shared pools: however a peer fills them, a
# small request (a registration, a checkpoint of a small state, an operator's listing) always gets in.
CONNECTION_ALLOWANCE = 4096


def _pooled(buffered: int) -> int:
    """What a connection holding `buffered` bytes of unfinished requests draws from its pool."""
    return max(0, buffered - CONNECTION_ALLOWANCE)


class BytePool:
    """Bytes of unfinished requests held against a cap."""

    def __init__(self, cap: int):
        self.cap, self.held = cap, 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes (or give back, when negative); False when that would pass the cap."""
        if size > 0 and self.held + size > self.cap:
            return False
        self.held += size
        return True


class ProcessLauncher:
    """Runs a claimed instance as a process: its workflow's launch command, in a process group of its own,
    watched until it exits (PROTOCOL.md section 5). Launched processes outlive the server."""

    in_process = False

    def __init__(self, core: Core, address: tuple[str, int]):
        self.core, self.settings = core, core.settings
        self.workflows = self.settings.launched_workflows
        host, port = address
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.server_addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def environment(self, claim: dict) -> dict[str, str]:
        """The launched process's environment: ours, less the secrets, plus what the instance needs."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RUNTARA_SECRET", "RUNTARA_SECRET_FILE", "RUNTARA_DATABASE_URL")}
        env.update(RUNTARA_INSTANCE_ID=claim["instance_id"], RUNTARA_TENANT_ID=claim["tenant_id"],
                   RUNTARA_WORKFLOW=claim["workflow"], RUNTARA_SERVER_ADDR=self.server_addr)
        env.pop("RUNTARA_CHECKPOINT_ID", None)
        if claim["checkpoint_id"]:
            env["RUNTARA_CHECKPOINT_ID"] = claim["checkpoint_id"]
        if self.settings.secret:
            env["RUNTARA_INSTANCE_TOKEN"] = instance_token(self.settings.secret, claim["tenant_id"],
                                                           claim["instance_id"])
        return env

    async def launch(self, claim: dict) -> None:
        """Run the workflow's command and watch it until it exits: it must register within the launch
        timeout, and its exit is reported either way."""
        argv = shlex.split(self.settings.command_for(claim["workflow"]))
        try:
            process = await asyncio.create_subprocess_exec(*argv, env=self.environment(claim),
                                                           stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            await self.core.launch_ended(claim, None, None, f"could not start {argv[0]!r}: {exc.strerror}")
            return
        log.info("launched instance %s (attempt %d, pid %d)", claim["instance_id"], claim["launch_attempts"],
                 process.pid)
        await self.core.record_launch(claim, process.pid)
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait({exited}, timeout=self.settings.launch_timeout_ms / 1000)
        if not done and await self.core.still_launching(claim):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal_module.SIGKILL)
            await exited
            reason = f"did not register within {self.settings.launch_timeout_ms} ms and was killed"
            await self.core.launch_ended(claim, process.pid, None, reason)
            return
        code = await exited
        await self.core.launch_ended(claim, process.pid, code, f"exited with code {code}")


def _shut(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _database_counts(tx: Tx, now: int) -> tuple[dict[str, int], int]:
    return tx.count_by_status(), tx.count_waiting(now)


class Metrics(Observer):
    """A server's Prometheus metrics, in a registry of their own, served over HTTP at /metrics by
    prometheus-client (serve --metrics). Each server says what it did itself; the instance counts are the
    database's, read at most every REFRESH_S seconds whatever the scrape rate."""

    REFRESH_S = 5.0
    SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)

    def __init__(self, server: "Server"):
        try:
            import prometheus_client as prometheus
            from prometheus_client.core import GaugeMetricFamily
        except ImportError:
            raise ImportError("metrics (--metrics, RUNTARA_METRICS_ADDR) need prometheus-client: pip install"
                              " 'runtara-core[metrics]'") from None
        self._prometheus, self._family, self.server = prometheus, GaugeMetricFamily, server
        self.registry = registry = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter("runtara_requests", "Requests answered, by operation and outcome (ok or"
                                           " the error code)", ["op", "outcome"], registry=registry)
        self.request_seconds = prometheus.Histogram("runtara_request_duration_seconds", "Time from a request to its"
                                                    " answer (inline sleeps and waits included)", ["op"],
                                                    buckets=self.SECONDS, registry=registry)
        self.commit_size = prometheus.Histogram("runtara_commit_group_size", "Writes committed by one transaction",
                                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.commit_seconds = prometheus.Histogram("runtara_commit_duration_seconds", "Time of one commit group,"
                                                   " its writes and its commit", buckets=self.SECONDS,
                                                   registry=registry)
        prometheus.Gauge("runtara_connections", "QUIC connections open", registry=registry).set_function(
            lambda: len(server.connections))
        self.launches = prometheus.Counter("runtara_launches", "Launches that ended, by workflow (the configured"
                                           " names; any other is \"other\") and outcome (registered: its process"
                                           " began a run; failed: it did not)", ["workflow", "outcome"],
                                           registry=registry)
        self.restarts = prometheus.Counter("runtara_restarts", "Runs whose process died, relaunched (once per"
                                           " death, however many launches it takes)", registry=registry)
        self.wake_lag = prometheus.Histogram("runtara_wake_lag_seconds", "A sleeper's launch time minus its wake"
                                             " time", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                                             registry=registry)
        registry.register(self)  # collect() below: the database's numbers
        self._read_at, self._counts, self._http, self._children = -self.REFRESH_S, None, None, {}

    def request(self, op, outcome, seconds):
        # Per request: the labelled children are looked up once (labels() costs more than the counting).
        counted = self._children.get((op, outcome))
        if counted is None:
            counted = self._children[op, outcome] = (self.requests.labels(op, outcome),
                                                     self.request_seconds.labels(op))
        counted[0].inc()
        counted[1].observe(seconds)

    def commit(self, writes: int, seconds: float) -> None:
        self.commit_size.observe(writes)
        self.commit_seconds.observe(seconds)

    def claimed(self, claims, now):
        for claim in claims:
            if claim["status"] == "running":
                if claim["launch_attempts"] == 1:  # the first launch since the run died; the others retry it
                    self.restarts.inc()
            elif claim["status"] == "suspended" and claim["sleep_until_ms"] is not None:
                self.wake_lag.observe(max(0, now - claim["sleep_until_ms"]) / 1000)

    def launch_ended(self, workflow, outcome):
        # Workflow names come from clients: only those the server was told of become labels, so that no client
        # can make series without end.
        settings, worker = self.server.settings, self.server.worker
        known = workflow == "default" or workflow in settings.workflow_commands or (
            worker is not None and workflow in worker.functions)
        self.launches.labels(workflow if known else "other", outcome).inc()

    def collect(self):
        """runtara_database_up, and unless it is 0, runtara_instances{status} and runtara_queue_depth."""
        if time.monotonic() - self._read_at >= self.REFRESH_S:
            self._read_at = time.monotonic()
            try:
                self._counts = self.server.storage.read(_database_counts, now_ms()).result(timeout=2)
            except Exception:  # down, or too slow to answer a scrape
                self._counts = None
        yield self._family("runtara_database_up", "1 when the last read of the database worked",
                           value=int(self._counts is not None))
        if self._counts is not None:
            by_status, waiting = self._counts
            instances = self._family("runtara_instances", "Instances in the database by status", labels=["status"])
            for status in STATUSES:
                instances.add_metric([status], by_status.get(status, 0))
            yield instances
            yield self._family("runtara_queue_depth", "Instances waiting for a launch that none has begun",
                               value=waiting)

    SCRAPERS = 8        # connections served at once; one more is closed at once
    SCRAPE_IDLE_S = 5.0  # a connection is closed this long after it came, however slowly it sends

    def serve(self, address: tuple[str, int]) -> tuple[str, int]:
        """Serve /metrics on threads of its own; the address it listens on. prometheus-client's own server
        takes a thread per connection and waits on each for ever, so idle connections could take every file
        descriptor the QUIC server needs: here they are few and short-lived."""
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

        slots = threading.BoundedSemaphore(self.SCRAPERS)

        deadline = self.SCRAPE_IDLE_S

        class Handler(WSGIRequestHandler):
            timeout = deadline

            def log_message(self, *args):  # a scrape is not news
                pass

        class HTTPServer(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

            def process_request(self, request, client_address):
                if slots.acquire(blocking=False):
                    super().process_request(request, client_address)
                else:
                    self.shutdown_request(request)

            def process_request_thread(self, request, client_address):
                # A per-read timeout alone lets a client that sends a byte now and then hold its slot for ever.
                watchdog = threading.Timer(deadline, functools.partial(_shut, request))
                watchdog.start()
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    watchdog.cancel()
                    slots.release()

            def handle_error(self, request, client_address):  # a client that timed out or went away: no news
                log.debug("metrics connection from %s ended", client_address, exc_info=True)
        try:
            self._http = HTTPServer(address, Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {_host_port(*address)}: {_reason(exc)}") from None
        self._http.set_app(self._prometheus.make_wsgi_app(self.registry))
        threading.Thread(target=self._http.serve_forever, name="runtara-metrics", daemon=True).start()
        return self._http.server_address[:2]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, which returns the free pages inside the heap to the system; None where the C
    library has none (musl, macOS)."""
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return None


class Server:
    """The QUIC server over a storage (opened from the settings unless given), with the scheduler, and a
    Worker's in-process workflows when given: `async with Server(settings) as server:`, or `await start()`
    and `await stop()`; `run()` serves until SIGINT or SIGTERM."""

    def __init__(self, settings: Settings | None = None, storage: Storage | None = None, worker=None):
        self.settings = settings or Settings.from_env()
        self.storage = storage
        self._owns_storage = storage is None
        self.worker = worker  # a Worker whose workflows run in this process, beside launched processes
        self.core: Core | None = None
        self.scheduler: Scheduler | None = None
        self.metrics: Metrics | None = None
        self.metrics_address: tuple[str, int] | None = None  # where /metrics is served, with --metrics
        self._quic = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.connections: set = set()
        self.connection_changes = 0  # connections opened and closed, for _sweep
        # Unfinished requests of all connections: four maximal messages for those that showed a valid token
        # (or all, without authentication), and a pool of their own for the others.
        self.trusted = BytePool(4 * (self.settings.max_message_bytes + FRAME_HEADER.size))
        self.untrusted = BytePool(256 * UNTRUSTED_FRAME_BYTES)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        return self._quic._transport.get_extra_info("sockname")[:2]

    def track(self, coroutine) -> asyncio.Task:
        """Run `coroutine` as a task that stop() lets finish."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> "Server":
        """Open the database (unless given), listen, and start the scheduler."""
        settings = self.settings
        if not settings.secret and not is_loopback(settings.host) and not settings.insecure:
            raise ValueError(f"refusing to listen on {settings.host} without authentication: anyone who reaches it"
                             " could read and change every instance. Set RUNTARA_SECRET, or pass --insecure")
        if settings.metrics_addr is not None:
            self.metrics = Metrics(self)  # first: a missing extra is said before anything is opened
        try:
            await self._open()
        except BaseException:
            await self.stop()  # nothing is left half-started: no port listening, no database open
            raise
        log.info("runtara-core %s listening on %s (QUIC, ALPN %s, %s loop), database %s", __version__,
                 _host_port(*self.address), ALPN, type(asyncio.get_running_loop()).__module__.split(".")[0],
                 _redact(settings.database_url))
        return self

    async def _open(self) -> None:
        from aioquic.asyncio import serve
        from aioquic.quic.configuration import QuicConfiguration

        settings = self.settings
        if self.storage is None:
            self.storage = await asyncio.to_thread(open_storage, settings.database_url,
                                                   synchronous=settings.sqlite_synchronous)
        self.core = Core(self.storage, settings)
        if self.metrics is not None:
            self.metrics_address = self.metrics.serve(settings.metrics_address)
            self.core.observer, self.storage.on_commit = self.metrics, self.metrics.commit
            log.info("metrics at http://%s/metrics", _host_port(*self.metrics_address))
        cert, key = await asyncio.to_thread(ensure_certificate, settings)
        configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=60.0,
                                          max_stream_data=settings.max_message_bytes + FRAME_HEADER.size)
        try:
            configuration.load_cert_chain(cert, key)
        except (OSError, ValueError) as exc:  # not PEM, or a key that is not the certificate's
            raise ValueError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}") from None
        try:
            self._quic = await serve(settings.host, settings.port, configuration=configuration,
                                     create_protocol=functools.partial(_server_protocol(), server=self))
        except OSError as exc:
            raise OSError(f"cannot listen on {_host_port(settings.host, settings.port)}: {_reason(exc)}") from None
        self._enlarge_receive_buffer()
        launchers = [ProcessLauncher(self.core, self.address)] if settings.launched_workflows != () else []
        if self.worker is not None:
            launchers.append(self.worker.bind(self.core))
        self.scheduler = Scheduler(self.core, launchers, self.worker.executor if self.worker is not None else None)
        self.scheduler.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    RECEIVE_BUFFER = 4 * 2**20

    def _enlarge_receive_buffer(self) -> None:
        """Bursts of datagrams overflow Linux's default UDP buffer (about 208 KiB), and every lost packet
        costs a retransmission timeout. Ask for more; the kernel grants up to net.core.rmem_max."""
        sock = self._quic._transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RECEIVE_BUFFER)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
        if granted < self.RECEIVE_BUFFER:
            log.warning("the UDP receive buffer is %d KiB, not the %d KiB asked for; under load packets may be"
                        " dropped (raise net.core.rmem_max)", granted // 1024, self.RECEIVE_BUFFER // 1024)

    async def _sweep(self):
        """Every second, reset the unfinished requests that received nothing for the stall timeout (a peer
        cannot hold its share of the buffers for ever), and once connections that came or went are at rest,
        give the system back the heap pages they left free. glibc keeps them otherwise: after 1,000 TLS
        handshakes, 12 MB on a ServerThread's heap (about 1 MB on the main thread's). Not more often: the
        trim walks the whole heap (2 ms here, tens of ms for a heap of gigabytes), stopping the loop."""
        loop, timeout = asyncio.get_running_loop(), self.settings.stall_timeout_ms / 1000
        trim, seen = _malloc_trim(), self.connection_changes
        trimmed = seen
        while True:
            await asyncio.sleep(min(1.0, timeout))
            for connection in list(self.connections):
                connection.reset_stalled(loop.time() - timeout)
            if trim is not None and self.connection_changes == seen and seen != trimmed:
                trim(0)
                trimmed = seen
            seen = self.connection_changes

    async def __aenter__(self) -> "Server":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Answer what is in flight, close connections and the database (checkpointing the WAL).
        Launched processes live on; a server that starts again finds them by their heartbeats."""
        listened = self._quic is not None  # else a start failed, and its error says all
        if self.core is not None:
            self.core.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=10)
            for task in pending:
                task.cancel()
        if self._quic is not None:
            try:
                self._quic.close()
            except Exception:  # aioquic cannot close a connection whose TLS setup failed (no descriptor left)
                log.exception("closing the QUIC connections failed; stopping anyway")
            self._quic = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
            if self.storage is not None:
                self.storage.on_commit = None
        if self.storage is not None and self._owns_storage:
            if listened:
                log.info("%s: %s committed in %s", self.storage.dialect.name,
                         counted(self.storage.writes, "write"), counted(self.storage.commits, "transaction"))
            await asyncio.to_thread(self.storage.close)
            self.storage = None
        if listened:
            log.info("runtara-core stopped")

    async def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal_module.SIGINT, signal_module.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        # What exists now (modules, the CLI, aioquic's tables; no garbage yet) lives as long as this process.
        # Frozen out of the collector's reach, it no longer makes each full collection stop the loop for 30-40
        # ms, which happened once in each benchmark run of 64 instances.
        gc.freeze()
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()


def uvloop_for(settings: Settings):
    """The uvloop module when the settings choose it, or choose "auto" and it is installed; else None.

    uvloop takes a tenth to a third off the server's CPU per request under load (tests/bench.py); it is optional."""
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if settings.event_loop == "uvloop":
            raise ValueError("RUNTARA_EVENT_LOOP=uvloop needs uvloop: pip install 'runtara-core[uvloop]'") from None
        return None
    return uvloop


def run_server(settings: Settings, worker=None) -> None:
    """Serve until SIGINT or SIGTERM on the event loop the settings choose: what `serve` does."""
    uvloop = uvloop_for(settings)
    (uvloop.run if uvloop else asyncio.run)(Server(settings, worker=worker).run())


class ServerThread:
    """A Server on its own event loop in a background thread, for programs that are not asyncio:
    `with ServerThread(settings) as server: ... server.address ...`."""

    def __init__(self, settings: Settings | None = None, storage: Storage | None = None, worker=None):
        self.server = Server(settings, storage, worker)
        uvloop = uvloop_for(self.server.settings)
        self._loop = (uvloop.new_event_loop if uvloop else asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runtara-server", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        return self.server.address

    def start(self) -> "ServerThread":
        """Start the thread and the server on it; returns once the server listens."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        except BaseException:
            self._shutdown()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and its thread; idempotent."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
        self._shutdown()

    def _shutdown(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# =============================================================================================
# 7. Client SDK: QUIC and embedded transports, Instance for workflows, Client for operators
# =============================================================================================


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _client_protocol():
    from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset

    class ClientProtocol(_frame_protocol()):
        """Matches each answer frame to the request waiting on its stream."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.waiting: dict[int, tuple[FrameReader, asyncio.Future]] = {}
            self.failure: ConnectionLost | None = None
            self.close_event: ConnectionTerminated | None = None

        def quic_event_received(self, event):
            if isinstance(event, StreamDataReceived) and event.stream_id in self.waiting:
                reader, future = self.waiting[event.stream_id]
                try:
                    frame = reader.feed(event.data, event.end_stream)
                except RuntaraError as exc:
                    frame = exc
                if frame is not None:
                    del self.waiting[event.stream_id]
                    if not future.done():
                        (future.set_exception if isinstance(frame, Exception) else future.set_result)(frame)
            elif isinstance(event, StreamReset) and event.stream_id in self.waiting:
                _, future = self.waiting.pop(event.stream_id)
                if not future.done():
                    future.set_exception(ConnectionLost(f"the server reset the stream (code {event.error_code})"))
            elif isinstance(event, ConnectionTerminated):
                self.close_event = event
                self.fail(ConnectionLost(f"connection closed: {event.reason_phrase or 'code ' + str(event.error_code)}"))

        def fail(self, error: ConnectionLost):
            """Give up on this connection: every request waiting on it fails, the next one reconnects."""
            if self.failure is None:
                self.failure = error
                self.close()
            for _, future in self.waiting.values():
                if not future.done():
                    future.set_exception(error)
            self.waiting.clear()

        async def wait_connected(self):
            try:
                await super().wait_connected()
            except asyncio.CancelledError:  # our connect timeout: aioquic fails its waiter later, unheard
                if self._connected_waiter is not None:
                    self._connected_waiter.add_done_callback(lambda waiter: waiter.cancelled() or waiter.exception())
                raise

        def send_request(self, frame: bytes) -> asyncio.Future:
            if self.failure is not None:
                raise self.failure
            stream_id = self._quic.get_next_available_stream_id()
            future = self._loop.create_future()
            self.waiting[stream_id] = (FrameReader(MAX_PAYLOAD_BYTES), future)
            self.send_frame(stream_id, frame)
            return future

    return ClientProtocol


class QuicTransport:
    """One long-lived QUIC connection carrying concurrent requests. When it is lost, the request
    under way fails with ConnectionLost and the next one connects again."""

    KEEPALIVE_S = 20.0
    CONNECT_TIMEOUT_S = 10.0
    # A server killed outright sends no close: without a deadline a request would wait for the 60 s idle
    # timeout. Long enough for SQLite's 10 s busy timeout; a sleep adds its own duration.
    REQUEST_TIMEOUT_S = 15.0

    def __init__(self, host: str = "127.0.0.1", port: int = 8001, *, ca_file: str | None = None,
                 skip_cert_verification: bool = False, on_connect: Callable | None = None):
        self.host, self.port = host, port
        self.ca_file = ca_file
        self.skip_cert_verification = skip_cert_verification
        self.on_connect = on_connect  # awaited on every new connection, before the first request on it
        self._protocol = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self._keepalive: asyncio.Task | None = None

    @classmethod
    def from_env(cls, server_addr: str | None = None, env=None, **options) -> "QuicTransport":
        """A transport to `server_addr` (else RUNTARA_SERVER_ADDR), verifying the server as RUNTARA_CA_FILE
        and RUNTARA_SKIP_CERT_VERIFICATION say."""
        env = os.environ if env is None else env
        host, port = parse_server_addr(server_addr or env.get("RUNTARA_SERVER_ADDR") or "127.0.0.1:8001")
        options.setdefault("ca_file", env.get("RUNTARA_CA_FILE") or None)
        options.setdefault("skip_cert_verification", _truthy(env.get("RUNTARA_SKIP_CERT_VERIFICATION")))
        return cls(host, port, **options)

    def _configuration(self):
        from aioquic.quic.configuration import QuicConfiguration

        configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], idle_timeout=60.0,
                                          server_name=self.host.strip("[]"))
        if self.ca_file:
            configuration.load_verify_locations(self.ca_file)
        elif self.skip_cert_verification or is_loopback(self.host):
            configuration.verify_mode = ssl.CERT_NONE  # on loopback the peer is this machine
        return configuration

    async def _connection(self):
        if self._protocol is not None and self._protocol.failure is None:
            return self._protocol
        async with self._lock:
            if self._protocol is not None and self._protocol.failure is None:
                return self._protocol
            await self._disconnect()
            from aioquic.asyncio import connect

            stack, attempt = contextlib.AsyncExitStack(), []

            def create_protocol(*args, **kwargs):
                attempt.append(_client_protocol()(*args, **kwargs))
                return attempt[-1]
            try:
                protocol = await within(stack.enter_async_context(connect(
                    self.host.strip("[]"), self.port, configuration=self._configuration(),
                    create_protocol=create_protocol)), self.CONNECT_TIMEOUT_S)
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                reason = self._why(exc, attempt[0].close_event if attempt else None)  # before our own close
                await stack.aclose()
                raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {reason}") from None
            self._protocol, self._exit_stack = protocol, stack
            self._keepalive = asyncio.get_running_loop().create_task(self._ping(protocol))
            if self.on_connect is not None:
                await self.on_connect(protocol)
            return protocol

    def _why(self, exc: BaseException, closed) -> str:
        if isinstance(exc, asyncio.TimeoutError):  # (the close that followed was our own)
            return f"no answer within {self.CONNECT_TIMEOUT_S:g} s (is the server running, and the UDP port open?)"
        if closed is not None and 0x100 <= closed.error_code <= 0x1FF:  # a TLS alert (RFC 9001, 4.8)
            return (f"the TLS handshake failed: {closed.reason_phrase or 'alert ' + str(closed.error_code - 0x100)}"
                    " (check RUNTARA_CA_FILE, or set RUNTARA_SKIP_CERT_VERIFICATION=1 to skip verification)")
        if closed is not None:
            return f"the connection closed: {closed.reason_phrase or 'code ' + str(closed.error_code)}"
        return str(exc) or type(exc).__name__

    async def _ping(self, protocol):
        while protocol.failure is None:
            await asyncio.sleep(self.KEEPALIVE_S)
            try:
                await within(protocol.ping(), self.KEEPALIVE_S)
            except (asyncio.TimeoutError, ConnectionError):
                protocol.fail(ConnectionLost(f"{self.host}:{self.port} stopped answering pings"))

    # Operations the server may hold for as long as the request asks, besides the usual deadline.
    HELD_FOR = {"sleep": "duration_ms", "wait_instance": "timeout_ms"}

    async def send(self, protocol, message: dict) -> dict:
        """Send one request on `protocol`'s connection and return the answer map, or raise its error."""
        held = message.get(self.HELD_FOR.get(message["op"]), 0)
        timeout = self.REQUEST_TIMEOUT_S + (held / 1000 if isinstance(held, int) else 0)
        answer = protocol.send_request(encode_frame(FRAME_REQUEST, message))
        done, _ = await asyncio.wait({answer}, timeout=timeout)  # not wait_for: see within()
        if not done:
            error = ConnectionLost(f"no answer from {self.host}:{self.port} within {timeout:g} s; reconnecting")
            protocol.fail(error)
            raise error
        frame_type, reply = answer.result()
        if frame_type == FRAME_ERROR:
            raise error_from_wire(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def request(self, message: dict) -> dict:
        """Send one request, connecting first when needed; the answer map, or raise its error."""
        return await self.send(await self._connection(), message)

    async def _disconnect(self):
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._exit_stack is not None:
            stack, self._exit_stack, self._protocol = self._exit_stack, None, None
            with contextlib.suppress(Exception):
                await within(stack.aclose(), 2)

    async def close(self):
        """Close the connection."""
        async with self._lock:
            await self._disconnect()


class EmbeddedTransport:
    """Calls a Core in this process: the same API and semantics as QUIC, without a network."""

    def __init__(self, core: Core, owns_storage: bool = False):
        self.core = core
        self.owns_storage = owns_storage
        self.session = Session()

    @classmethod
    def open(cls, database_url: str | None = None, settings: Settings | None = None) -> "EmbeddedTransport":
        """Open the database and a Core over it, with the settings given, else the RUNTARA_* variables the
        server reads; close() closes both."""
        settings = settings or Settings.from_env(database_url=database_url)
        storage = open_storage(settings.database_url, synchronous=settings.sqlite_synchronous)
        return cls(Core(storage, settings), owns_storage=True)

    async def request(self, message: dict) -> dict:
        """Answer one request map, as the server would."""
        if self.core.admin_token and "token" not in message:  # this process holds the database: it is trusted
            message = {**message, "token": self.core.admin_token}
        return await self.core.dispatch(message, self.session)

    async def close(self):
        """Close the database if this transport opened it."""
        if self.owns_storage:
            await asyncio.to_thread(self.core.storage.close)


class Cancelled(Interrupted):
    """The instance acknowledged a cancel signal and is cancelled."""


class Paused(Interrupted):
    """The instance acknowledged a pause signal and is suspended until resumed."""


class Suspended(Interrupted):
    """A durable sleep suspended the instance; the server relaunches it at `wake_at_ms`."""

    def __init__(self, wake_at_ms: int):
        super().__init__(f"suspended until {wake_at_ms} ms")
        self.wake_at_ms = wake_at_ms


@dataclasses.dataclass
class CheckpointResult:
    found: bool                 # the checkpoint existed: `state` is what was saved first, the new one was ignored
    state: bytes
    signal: dict | None = None  # the pending {signal_type, payload, created_at_ms}
    custom_signal: dict | None = None

    @property
    def should_cancel(self) -> bool:
        """A cancel is pending."""
        return bool(self.signal) and self.signal["signal_type"] == "cancel"

    @property
    def should_pause(self) -> bool:
        """A pause is pending."""
        return bool(self.signal) and self.signal["signal_type"] == "pause"

    @property
    def should_exit(self) -> bool:
        """A cancel or pause is pending: the workflow should acknowledge it and stop."""
        return self.should_cancel or self.should_pause


class _Caller:
    """Sends operations through a transport, adding the token."""

    token: str | None = None

    def _use(self, transport, owns_transport: bool, server_addr: str | None, env, options: dict) -> None:
        """Send through `transport`, closed by close() only when `owns_transport`, so that one transport can
        serve many callers; without one, through a QUIC transport made from the environment, always closed."""
        self.transport = transport or QuicTransport.from_env(server_addr, env, **options)
        self._owns_transport = transport is None or owns_transport

    async def close(self) -> None:
        """Close the transport if this object made it or was given it to own."""
        if self._owns_transport:
            await self.transport.close()

    async def call(self, op: str, **fields) -> dict:
        """Send operation `op` with the fields that are not None, and the token; the answer map."""
        message = {"op": op, **_compact(fields)}
        if self.token:
            message["token"] = self.token
        return await self.transport.request(message)

    async def get_instance_status(self, instance_id: str) -> dict:
        """An instance's status map; found=False for an unknown one."""
        return await self.call("get_instance_status", instance_id=instance_id)


def _canonical(value, step: str):
    """`value` in a form whose msgpack bytes are the same in every process for equal values: dicts and sets
    sorted (and tagged, so that they differ from lists), tuples as lists. repr() would not do: a set's or a
    plain object's differs between processes, and a step must get the same id after a restart."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(item, step) for item in value]
    if isinstance(value, dict):
        pack = functools.partial(_packed, step=step)
        return msgpack.ExtType(1, b"".join(sorted(pack(key) + pack(item) for key, item in value.items())))
    if isinstance(value, (set, frozenset)):
        return msgpack.ExtType(2, b"".join(sorted(_packed(item, step) for item in value)))
    raise TypeError(f"step {step}: an argument of type {type(value).__name__} cannot make a step id; name the"
                    f" step: @instance.durable(\"{step}\")")


def _packed(value, step: str) -> bytes:
    return msgpack.packb(_canonical(value, step))


def _step_id(fn: Callable, args: tuple, kwargs: dict) -> str:
    if not args and not kwargs:
        return fn.__qualname__
    digest = hashlib.sha256(_packed([list(args), kwargs], fn.__qualname__)).hexdigest()[:16]
    return f"{fn.__qualname__}:{digest}"


class Instance(_Caller):
    """A workflow instance's side of the protocol. Arguments default to the environment the server's
    launcher sets: RUNTARA_INSTANCE_ID, RUNTARA_TENANT_ID, RUNTARA_SERVER_ADDR, RUNTARA_CA_FILE,
    RUNTARA_SKIP_CERT_VERIFICATION, RUNTARA_INSTANCE_TOKEN, RUNTARA_CHECKPOINT_ID,
    RUNTARA_HEARTBEAT_INTERVAL_MS. A `transport` given (an EmbeddedTransport, or a QuicTransport shared by
    several instances) stays open when the instance closes, unless `owns_transport=True`.

        async with Instance() as instance:
            @instance.durable("fetch")
            async def fetch(): ...
            await instance.completed(msgpack.packb(await fetch()))
    """

    def __init__(self, instance_id: str | None = None, tenant_id: str | None = None, *,
                 server_addr: str | None = None, transport=None, token: str | None = None,
                 owns_transport: bool = False, checkpoint_id: str | None = None,
                 heartbeat_interval_ms: int | None = None, poll_interval_ms: int = 1000, env=None,
                 **transport_options):
        env = os.environ if env is None else env
        self.instance_id = instance_id or env.get("RUNTARA_INSTANCE_ID")
        self.tenant_id = tenant_id or env.get("RUNTARA_TENANT_ID")
        if not self.instance_id or not self.tenant_id:
            raise ValueError("an Instance needs instance_id and tenant_id (or RUNTARA_INSTANCE_ID, RUNTARA_TENANT_ID)")
        self.token = token or env.get("RUNTARA_INSTANCE_TOKEN") or None
        self.resume_from = checkpoint_id or env.get("RUNTARA_CHECKPOINT_ID") or None
        self.heartbeat_interval_ms = (_env_int(env, "RUNTARA_HEARTBEAT_INTERVAL_MS", 30_000)
                                      if heartbeat_interval_ms is None else heartbeat_interval_ms)
        self.poll_interval_ms = poll_interval_ms
        self._use(transport, owns_transport, server_addr, env, transport_options)
        if self.token and isinstance(self.transport, QuicTransport):
            self.transport.on_connect = self._rebind  # a new connection must register again to be bound
        self.registration: dict | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._last_poll = (0.0, None)

    @property
    def run(self) -> int | None:
        """This process's run of the instance (PROTOCOL.md section 4), once registered."""
        return self.registration and self.registration.get("run")

    @property
    def input(self) -> bytes:
        """The input the instance was started with (empty when none)."""
        return (self.registration or {}).get("input") or b""

    @property
    def workflow(self) -> str | None:
        """The workflow this instance runs (chosen when it was started), once registered."""
        return self.registration and self.registration.get("workflow")

    async def call(self, op: str, **fields) -> dict:
        """Every instance operation names this process's run, so that a superseded process changes nothing."""
        if op != "register_instance" and "run" in OPERATIONS[op]:
            fields["run"] = self.run
        return await super().call(op, **fields)

    async def _rebind(self, protocol):
        if self.registration is not None:  # the same run on a new connection: nothing begins
            await self.transport.send(protocol, {"op": "register_instance", "instance_id": self.instance_id,
                                                 "tenant_id": self.tenant_id, "token": self.token, "run": self.run})

    async def __aenter__(self) -> "Instance":
        try:
            await self.register()
        except BaseException:
            await self.close()  # a transport it owns is closed even when the run never began
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            # A lost connection or a server that is full or stopping says nothing about the workflow: the run
            # ends here and is relaunched, rather than the instance failed.
            if exc is not None and not isinstance(exc, (Interrupted, asyncio.CancelledError, ConnectionLost,
                                                        Overloaded)):
                with contextlib.suppress(RuntaraError):
                    await self.failed(f"{type(exc).__name__}: {exc}")
        finally:
            await self.close()
        return isinstance(exc, Interrupted)

    async def register(self) -> dict:
        """Register (or re-register after a restart); starts the background heartbeat."""
        self.registration = await self.call("register_instance", instance_id=self.instance_id,
                                            tenant_id=self.tenant_id, checkpoint_id=self.resume_from)
        if self.heartbeat_interval_ms > 0 and self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())
        return self.registration

    async def _heartbeats(self):
        """Beat until close() sets the stop event, which this loop checks itself: its stop never depends on a
        cancellation being delivered through the transport's waits."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                await asyncio.wait({stop}, timeout=self.heartbeat_interval_ms / 1000)
                if stop.done():
                    return
                try:
                    await self.heartbeat()
                except (Superseded, InvalidState):  # this run is over
                    return
                except RuntaraError as exc:
                    log.warning("heartbeat for %s failed: %s", self.instance_id, exc)
        finally:
            stop.cancel()

    async def checkpoint(self, checkpoint_id: str, state: bytes) -> CheckpointResult:
        """Save `state` under `checkpoint_id`, or get back what was saved there first."""
        reply = await self.call("checkpoint", instance_id=self.instance_id, checkpoint_id=checkpoint_id, state=state)
        return CheckpointResult(reply["found"], reply.get("state") or b"", reply.get("pending_signal"),
                                reply.get("custom_signal"))

    async def get_checkpoint(self, checkpoint_id: str) -> bytes | None:
        """The state saved under `checkpoint_id`, or None; changes nothing."""
        reply = await self.call("get_checkpoint", instance_id=self.instance_id, checkpoint_id=checkpoint_id)
        return reply["state"] if reply["found"] else None

    async def sleep(self, checkpoint_id: str, duration_ms: int, state: bytes = b"") -> int:
        """Sleep durably; returns the wake time, or raises Suspended when the server took over the wait."""
        reply = await self.call("sleep", instance_id=self.instance_id, checkpoint_id=checkpoint_id, state=state,
                                duration_ms=duration_ms)
        if reply["suspended"]:
            raise Suspended(reply["wake_at_ms"])
        return reply["wake_at_ms"]

    async def _event(self, event_type: str, **fields) -> None:
        await self.call("instance_event", instance_id=self.instance_id, event_type=event_type, **fields)

    async def heartbeat(self) -> None:
        """Tell the server this run is alive (the background heartbeat does it on its own)."""
        await self._event("heartbeat")

    async def completed(self, output: bytes = b"") -> None:
        """End the instance as completed with `output`; final."""
        await self._event("completed", payload=output)

    async def failed(self, error: str) -> None:
        """End the instance as failed with `error`; final."""
        await self._event("failed", payload=error.encode())

    async def suspended(self) -> None:
        """Suspend the instance: it waits for a resume (a sleep does this on its own)."""
        await self._event("suspended")

    async def event(self, subtype: str, payload: bytes = b"", checkpoint_id: str | None = None) -> None:
        """A custom event: stored under `subtype`, changes no status."""
        await self._event("custom", subtype=subtype, payload=payload, checkpoint_id=checkpoint_id)

    async def poll_signals(self, checkpoint_id: str | None = None, force: bool = False) -> dict:
        """The pending signal and custom signal; asks the server at most once per poll interval."""
        last_at, last = self._last_poll
        if not force and checkpoint_id is None and last is not None and \
                time.monotonic() - last_at < self.poll_interval_ms / 1000:
            return last
        reply = await self.call("poll_signals", instance_id=self.instance_id, checkpoint_id=checkpoint_id)
        self._last_poll = (time.monotonic(), reply)
        return reply

    async def _ack(self, signal_type: str, acknowledged: bool) -> dict:
        self._last_poll = (0.0, None)
        return await self.call("signal_ack", instance_id=self.instance_id, signal_type=signal_type,
                               acknowledged=acknowledged)

    async def ack(self, signal_type: str, acknowledged: bool = True) -> str:
        """Acknowledge a signal (it takes effect if it is the pending one); returns the instance's status after."""
        return (await self._ack(signal_type, acknowledged))["status"]

    async def obey(self, signal: dict | None) -> None:
        """Acknowledge a pending signal and raise Cancelled or Paused when it says to stop and was applied:
        a signal the operator replaced meanwhile stops nothing."""
        if signal is None or not (await self._ack(signal["signal_type"], True)).get("applied"):
            return
        if signal["signal_type"] == "cancel":
            raise Cancelled("cancelled by signal")
        if signal["signal_type"] == "pause":
            raise Paused("paused by signal")

    async def status(self) -> dict:
        """This instance's status map (PROTOCOL.md section 3.1)."""
        return await self.get_instance_status(self.instance_id)

    async def retry_attempt(self, checkpoint_id: str, attempt_number: int, error_message: str) -> None:
        """Record a failed attempt of the step `checkpoint_id` (durable() does it on its own)."""
        await self.call("retry_attempt", instance_id=self.instance_id, checkpoint_id=checkpoint_id,
                        attempt_number=attempt_number, error_message=error_message, timestamp_ms=now_ms())

    def durable(self, checkpoint_id: str | None = None, *, retries: int = 0, backoff_ms: int = 100,
                max_backoff_ms: int = 30_000):
        """Decorate a step: its msgpack-encoded result is saved under `checkpoint_id` (by default the
        function's name and a hash of its arguments) and returned on replay without running it again.
        A failing step is retried `retries` times with exponential backoff, each attempt reported."""

        def decorate(fn):
            @functools.wraps(fn)
            async def step(*args, **kwargs):
                step_id = checkpoint_id or _step_id(fn, args, kwargs)
                saved = await self.get_checkpoint(step_id)
                if saved is not None:
                    return msgpack.unpackb(saved, raw=False)
                for attempt in range(1, retries + 2):
                    try:
                        result = fn(*args, **kwargs)
                        if asyncio.iscoroutine(result):
                            result = await result
                        break
                    except Interrupted:
                        raise
                    except Exception as exc:
                        if attempt > retries:
                            raise
                        await self.retry_attempt(step_id, attempt, f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(min(backoff_ms * 2 ** (attempt - 1), max_backoff_ms) / 1000)
                try:
                    packed = msgpack.packb(result)
                    msgpack.unpackb(packed, raw=False)  # as a replay reads it: a map's keys are str (or bytes)
                except (TypeError, ValueError, OverflowError) as exc:  # nothing was saved
                    kind = type(result).__name__
                    raise TypeError(f"step {step_id} returned {'an' if kind[0] in 'aeiou' else 'a'} {kind}, which"
                                    f" cannot be saved: {exc}; return None, bools, numbers, str, bytes, lists or"
                                    " dicts with str keys") from None
                saved = await self.checkpoint(step_id, packed)
                await self.obey(saved.signal)
                return msgpack.unpackb(saved.state if saved.found else packed, raw=False)
            return step
        return decorate

    CLOSE_WAIT_S = 1.0

    async def close(self) -> None:
        """Stop the heartbeat and close the transport this instance made; returns within a few seconds
        whatever the transport does."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            self._stopping.set()
            if not (await asyncio.wait({task}, timeout=self.CLOSE_WAIT_S))[0]:
                task.cancel()
                if not (await asyncio.wait({task}, timeout=self.CLOSE_WAIT_S))[0]:
                    log.warning("the heartbeat of %s did not stop; left behind", self.instance_id)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(super().close(), 3 * self.CLOSE_WAIT_S)


class Client(_Caller):
    """An operator's side of the protocol (PROTOCOL.md section 3.2)."""

    def __init__(self, server_addr: str | None = None, *, transport=None, owns_transport: bool = False,
                 token: str | None = None, env=None, **transport_options):
        env = os.environ if env is None else env
        self._use(transport, owns_transport, server_addr, env, transport_options)
        secret = secret_from(env)
        self.token = token or env.get("RUNTARA_ADMIN_TOKEN") or (admin_token(secret) if secret else None)
        if self.token and isinstance(self.transport, QuicTransport):
            self.transport.on_connect = self._show_token

    async def _show_token(self, protocol):
        """A new connection shows the token first: until it has, the server takes only small frames on it."""
        await self.transport.send(protocol, {"op": "health_check", "token": self.token})

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def health_check(self) -> dict:
        """The server's health: {healthy, version, database, uptime_ms, running_instances}."""
        return await self.call("health_check")

    async def start(self, instance_id: str, tenant_id: str, input: bytes = b"", workflow: str | None = None) -> dict:
        """Create a pending instance for the scheduler to launch: {instance_id, status, created}. Idempotent."""
        return await self.call("start_instance", instance_id=instance_id, tenant_id=tenant_id, input=input,
                               workflow=workflow)

    async def fork(self, instance_id: str, new_instance_id: str, checkpoint_id: str | None = None) -> dict:
        """A new pending instance that replays `instance_id`'s checkpoints up to `checkpoint_id` (all when None)
        and runs the steps after: {instance_id, status, checkpoint_id?, checkpoints}."""
        return await self.call("fork_instance", instance_id=instance_id, new_instance_id=new_instance_id,
                               checkpoint_id=checkpoint_id)

    async def wait(self, instance_id: str, timeout: float | None = None) -> dict:
        """The instance's status map once it is terminal, or at `timeout` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            asked = loop.time()
            left = MAX_WAIT_MS if deadline is None else max(0, min(MAX_WAIT_MS, int((deadline - asked) * 1000)))
            status = await self.call("wait_instance", instance_id=instance_id, timeout_ms=left)
            if status["status"] in TERMINAL or deadline is not None and loop.time() >= deadline:
                return status
            if loop.time() - asked < left / 1000:  # answered early: the server is stopping; ask again soon
                await asyncio.sleep(0.5)

    async def send_signal(self, instance_id: str, signal_type: str, payload: bytes = b"") -> dict:
        """Send cancel, pause or resume: {instance_id, signal_type, status} (PROTOCOL.md section 4)."""
        return await self.call("send_signal", instance_id=instance_id, signal_type=signal_type, payload=payload)

    async def send_custom_signal(self, instance_id: str, checkpoint_id: str, payload: bytes = b"") -> dict:
        """Leave `payload` for the instance's next checkpoint or poll naming `checkpoint_id`."""
        return await self.call("send_custom_signal", instance_id=instance_id, checkpoint_id=checkpoint_id,
                               payload=payload)

    async def list_instances(self, tenant_id: str | None = None, status: str | None = None, limit: int | None = None,
                             offset: int | None = None) -> dict:
        """Instances, newest first: {instances, total_count}."""
        return await self.call("list_instances", tenant_id=tenant_id, status=status, limit=limit, offset=offset)

    async def list_checkpoints(self, instance_id: str, limit: int | None = None, offset: int | None = None) -> dict:
        """An instance's checkpoints, newest first: {checkpoints, total_count}."""
        return await self.call("list_checkpoints", instance_id=instance_id, limit=limit, offset=offset)

    async def list_events(self, instance_id: str, event_type: str | None = None, subtype: str | None = None,
                          limit: int | None = None, offset: int | None = None) -> dict:
        """An instance's events, newest first: {events, total_count}."""
        return await self.call("list_events", instance_id=instance_id, event_type=event_type, subtype=subtype,
                               limit=limit, offset=offset)


def _output(result) -> bytes:
    """A workflow function's return value as the instance's output: bytes as they are, None as nothing,
    anything else msgpack-encoded."""
    if result is None:
        return b""
    return bytes(result) if isinstance(result, (bytes, bytearray)) else msgpack.packb(result)


class Worker:
    """Runs workflows in this process: `@worker.workflow("name")` registers `async def fn(instance)`, and
    while the worker runs (`async with worker:` or `await worker.run()`) it does what the server's scheduler
    does with launch commands, on the same database and under the same rules (PROTOCOL.md section 5): it
    runs pending instances of its workflows, wakes due sleepers, lets resumed instances carry on, and
    relaunches dead runs, each as a task with an Instance over the embedded backend, within
    RUNTARA_MAX_CONCURRENT_INSTANCES. Started again after a crash or power loss, it carries on the runs
    its last process held, from their last checkpoint.

    A workflow function's return value is the instance's output (see _output) unless it reported the end
    itself; an exception that escapes it fails the instance. `executor` names this worker's runs (default
    RUNTARA_EXECUTOR, else "local"): workers on one database need names of their own."""

    in_process = True

    def __init__(self, database: str | Storage | None = None, *, settings: Settings | None = None,
                 executor: str | None = None):
        url = database if isinstance(database, str) else None
        self.settings = Settings.from_env(database_url=url) if settings is None else \
            dataclasses.replace(settings, database_url=url or settings.database_url)
        self.executor = executor or self.settings.executor
        self._storage = database if isinstance(database, Storage) else None
        self.functions: dict[str, Callable] = {}
        self.core: Core | None = None
        self.client: Client | None = None
        self._scheduler: Scheduler | None = None
        self._owns_core = False

    @property
    def workflows(self) -> tuple[str, ...]:
        """The names of the workflows registered here."""
        return tuple(self.functions)

    def workflow(self, name: str):
        """Register `async def fn(instance)` as the workflow `name`."""
        check_id(name, "workflow")

        def register(fn):
            self.functions[name] = fn
            return fn
        return register

    def bind(self, core: Core) -> "Worker":
        """Run on `core` (a server's): the server's scheduler then launches this worker's workflows."""
        self.core, self.client = core, Client(transport=EmbeddedTransport(core))
        return self

    async def launch(self, claim: dict) -> None:
        """Run one claimed instance as a task of this process, and report its end."""
        instance = Instance(claim["instance_id"], claim["tenant_id"], transport=EmbeddedTransport(self.core),
                            checkpoint_id=claim["checkpoint_id"], env={},
                            heartbeat_interval_ms=max(self.settings.heartbeat_timeout_ms // 4, 10))
        await self.core.record_launch(claim, os.getpid())
        code, reason = 0, "returned"
        try:
            async with instance:
                result = await self.functions[claim["workflow"]](instance)
                with contextlib.suppress(InvalidState):  # it reported its end itself
                    await instance.completed(_output(result))
        except Exception as exc:  # reported as failed by `async with`, unless the database was unreachable
            code, reason = 1, f"raised {type(exc).__name__}: {exc}"
        await self.core.launch_ended(claim, None, code, reason)

    async def __aenter__(self) -> "Worker":
        if self.core is None:
            storage = self._storage or await asyncio.to_thread(open_storage, self.settings.database_url,
                                                               synchronous=self.settings.sqlite_synchronous)
            self.bind(Core(storage, self.settings))
            self._owns_core = True
        self._scheduler = Scheduler(self.core, [self], self.executor)
        self._scheduler.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._scheduler.stop()
        self._scheduler = None
        if self._owns_core:
            self.core.close()
            if self._storage is None:
                await asyncio.to_thread(self.core.storage.close)
            self.core, self._owns_core = None, False

    async def run(self) -> None:
        """Run until cancelled."""
        async with self:
            await asyncio.Event().wait()

    async def start(self, workflow: str, instance_id: str, tenant_id: str, input: bytes = b"") -> dict:
        """Start an instance of one of this worker's workflows: {instance_id, status, created}."""
        if workflow not in self.functions:
            raise ValueError(f"this worker has no workflow {workflow!r}; it has {', '.join(self.functions)}")
        started = await self.client.start(instance_id, tenant_id, input, workflow)
        if self._scheduler is not None:
            self._scheduler.poke()
        return started

    async def wait(self, instance_id: str, timeout: float | None = None) -> dict:
        """The instance's status map once it is terminal, or at `timeout` seconds."""
        return await self.client.wait(instance_id, timeout)


def load_worker(source: str) -> Worker:
    """The Worker a module (`package.module`) or a Python file (`path/to/flows.py`) defines."""
    import importlib
    import importlib.util

    if source.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(source).stem, source)
        if spec is None or not Path(source).is_file():
            raise ValueError(f"no Python file {source}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    workers = [value for value in vars(module).values() if isinstance(value, Worker)]
    if len(workers) != 1:
        raise ValueError(f"{source} defines {len(workers)} Worker objects; it must define exactly one")
    return workers[0]


# =============================================================================================
# 8. CLI (typer + rich, imported only here) and main()
# =============================================================================================


DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
MAX_DURATION_MS = 100 * 365 * 86_400_000  # beyond it, no date is representable and no wait makes sense
DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(text: str) -> int:
    """'30d', '12h', '1h30m', '500ms' -> milliseconds."""
    parts = DURATION.findall(text.strip().lower())
    if not parts or "".join(n + unit for n, unit in parts) != text.strip().lower():
        raise ValueError(f"bad duration {text!r}: use a number and a unit (ms, s, m, h, d, w), like 30d or 1h30m")
    total = sum(int(n) * DURATION_MS[unit] for n, unit in parts)
    if total > MAX_DURATION_MS:
        raise ValueError(f"duration {text!r} is longer than 100 years")
    return total


def _format_ms(ms: int | None, short: bool = False) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).astimezone().strftime("%m-%d %H:%M:%S" if short
                                                                             else "%Y-%m-%d %H:%M:%S")


def _format_age(ms: int | None, now: int) -> str:
    if ms is None:
        return "-"
    seconds = max(0, now - ms) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def decode_state(state: bytes) -> tuple[str, Any]:
    """Guess what a state holds: ('json' | 'msgpack' | 'text' | 'binary', value). What does not decode within
    the bounds a request has is shown as text or bytes."""
    import json

    try:
        text = state.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and len(state) <= 1 << 20:  # JSON has no bounded decoder: only a modest one is tried
        with contextlib.suppress(ValueError, RecursionError):
            return "json", json.loads(text)
    with contextlib.suppress(Exception):  # bounded like requests: a hostile state cannot take the memory
        return "msgpack", unpack_bounded(state)
    if text is not None:
        return "text", text
    return "binary", state


def visible(text: str) -> str:
    """Stored text made safe for a terminal: control characters (ESC sequences, OSC 8 links, carriage returns)
    are shown as \\xNN escapes instead of being sent."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)



def _to_json(data) -> str:
    import base64
    import json

    def default(value):
        if isinstance(value, (bytes, bytearray)):
            return base64.b64encode(value).decode()
        return repr(value)
    return json.dumps(data, default=default, indent=2, ensure_ascii=False)


STATUS_STYLES = {"pending": "dim", "running": "green", "suspended": "yellow", "completed": "blue",
                 "failed": "red", "cancelled": "magenta"}


def _stats(tx: Tx) -> dict:
    counts = tx.count_by_status()
    return {"instances": {status: counts.get(status, 0) for status in STATUSES},
            "checkpoints": tx.count_checkpoints(), "events": tx.count_events(),
            "database_bytes": tx.database_size(), "oldest_running": tx.oldest_running()}


def _show(tx: Tx, instance_id: str, checkpoints: int, events: int) -> dict:
    instance = _existing(tx, instance_id)
    return {"instance": instance, "signal": tx.get_signal(instance_id),
            "checkpoints": tx.list_checkpoints(instance_id, limit=checkpoints),
            "checkpoint_count": tx.count_checkpoints(instance_id),
            "events": [_compact(event) for event in tx.list_events(instance_id, limit=events)],
            "event_count": tx.count_events(instance_id)}


def _checkpoint_state(tx: Tx, instance_id: str, checkpoint_id: str) -> bytes:
    _existing(tx, instance_id)
    state = tx.get_checkpoint(instance_id, checkpoint_id)
    if state is None:
        raise CheckpointNotFound(f"instance {instance_id} has no checkpoint {checkpoint_id}")
    return state


def build_cli():
    """The `runtara` command. typer and rich are imported here, so embedding the engine never pays for them."""
    import typer
    import typer.core
    from rich.console import Console, Group
    from rich.live import Live
    from rich.measure import Measurement
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.pretty import Pretty
    from rich.progress import Progress
    from rich.table import Table
    from rich.text import Text

    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)  # a message is one line, piped too

    def say_error(message: str) -> int:
        err.print(Text.assemble(("error:", "red"), " ", visible(message)), highlight=False, soft_wrap=True)
        return 1

    class OneLineErrors(typer.core.TyperGroup):
        """Every mistake is one line on stderr, `error: ...`, and exit code 1: a usage mistake click finds
        (which it would box on several lines, with code 2) as much as one a command finds."""

        def main(self, args=None, prog_name=None, **extra):
            args = list(sys.argv[1:] if args is None else args) or ["--help"]  # nothing asked: the help
            extra["standalone_mode"] = False
            try:
                code = super().main(args, prog_name, **extra)
            except typer.TyperException as exc:
                context = getattr(exc, "ctx", None)
                code = say_error(exc.format_message().strip().rstrip(".") +
                                 (f" (see {context.command_path} --help)" if context else ""))
            except typer.Abort:
                code = 1
            sys.exit(code or 0)

    app = typer.Typer(cls=OneLineErrors, help="runtara-core: a durable execution engine.",
                      rich_markup_mode=None,  # plain help: it wraps, where rich's boxes cut long option names
                      pretty_exceptions_enable=False, add_completion=False)

    def show_version(value: bool) -> None:
        if value:
            typer.echo(f"runtara-core {__version__}")
            raise typer.Exit()

    @app.callback()
    def runtara(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                             help="Print the version and exit")):
        """runtara-core: a durable execution engine."""
    DatabaseUrl = typer.Option(None, "--database-url", envvar="RUNTARA_DATABASE_URL", show_envvar=True,
                               help=f"Database URL [default: {DEFAULT_DATABASE_URL}]")
    Json = typer.Option(False, "--json", help="Print JSON only (bytes as base64)")
    Limit = typer.Option(50, min=1, max=1000, help="How many rows at most")
    Status = typer.Option(None, help="Only this status: " + ", ".join(STATUSES))
    Tenant = typer.Option(None, help="Only this tenant")

    def fail(message: str) -> typer.Exit:
        return typer.Exit(say_error(message))

    class Database:
        """The storage, answering blocking calls for the commands."""

        def __init__(self, storage: Storage):
            self.storage = storage

        def read(self, fn, *args, **kwargs):
            return self.storage.read(fn, *args, **kwargs).result()

        def write(self, fn, *args, **kwargs):
            return self.storage.write(fn, *args, **kwargs).result()

    @contextlib.contextmanager
    def database(url: str | None):
        """Open the database, which must exist and be current: nothing about it changes but what the command
        writes (only `migrate` and `serve` create or upgrade one). Any RuntaraError becomes exit 1."""
        try:
            with open_storage(url or DEFAULT_DATABASE_URL, create=False, migrate=False) as storage:
                storage.check_schema()
                yield Database(storage)
        except (RuntaraError, ValueError) as exc:
            hint = (f"run 'runtara migrate --database-url {shlex.quote(_redact(url))}' (or start the server on it)"
                    if url else "")
            raise fail(str(exc).replace(MIGRATE_HINT, hint) if hint else str(exc))

    def check_status(status: str | None) -> None:
        if status is not None and status not in STATUSES:
            raise fail(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")

    def duration(text: str) -> int:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise fail(str(exc))

    def emit_json(data) -> None:
        typer.echo(_to_json(data))

    def shown(value) -> Text:
        """A value from the database, shown literally: never read as markup, control characters visible."""
        return Text(visible(str(value)))

    def status_text(status: str) -> Text:
        return Text(status, style=STATUS_STYLES.get(status, "white"))

    def id_column(table: Table, heading: str, values) -> None:
        """A column of ids, as wide as its longest: other columns give way (their text wraps), an id never
        does, so that it can be read, copied and found with grep."""
        table.add_column(heading, no_wrap=True, width=max([len(heading), *(len(visible(v)) for v in values)]))

    def shown_id(value) -> Text:
        """An id among other values: never wrapped (narrowest() counts it whole)."""
        return Text(visible(str(value)), no_wrap=True)

    def narrowest(renderable) -> int:
        """How narrow tables (or a panel or group of them) can be with no id cut: id columns and ids whole,
        every other column at least one character, its text wrapping; and a panel's title whole."""
        if isinstance(renderable, Table):
            top, right, bottom, left = Padding.unpack(renderable.padding)
            widths = [column.width or max([1, *(Text(str(cell)).cell_len for cell in column.cells
                                                 if column.no_wrap or isinstance(cell, Text) and cell.no_wrap)])
                      for column in renderable.columns]
            return sum(widths) + (left + right) * len(widths) + (len(widths) + 1 if renderable.box else 0)
        if isinstance(renderable, Panel):
            return max(narrowest(renderable.renderable), Text(str(renderable.title or "")).cell_len + 4)
        if isinstance(renderable, Group):
            return max(narrowest(part) for part in renderable.renderables)
        return 1

    def natural(renderable) -> int:
        """The width it takes when nothing need wrap."""
        return Measurement.get(out, out.options.update_width(1 << 16), renderable).maximum

    def fits(renderable) -> bool:
        return narrowest(renderable) <= out.width

    def folding(renderable):
        """The renderable, its tables' text folded onto more lines where a column is narrow, never cut to `…`."""
        for part in (renderable.renderable,) if isinstance(renderable, Panel) else getattr(renderable, "renderables",
                                                                                           ()):
            folding(part)
        for column in getattr(renderable, "columns", ()):
            column.overflow = "fold"
        return renderable

    def print_whole(renderable) -> None:
        """Print tables (or a panel of them) with nothing cut. Piped, they have their full width; on a terminal,
        columns other than ids wrap, and what still does not fit is printed at full width too, for the
        terminal to wrap."""
        width = out.width
        if not out.is_terminal or not fits(renderable):
            out.width = max(width, natural(renderable))
        try:
            out.print(folding(renderable), crop=False, soft_wrap=False)
        finally:
            out.width = width

    def instances_table(instances: list[dict], title: str | Text | None = None) -> Table:
        now = now_ms()
        table = Table(title=title)
        for heading, key in (("instance", "instance_id"), ("tenant", "tenant_id"), ("checkpoint", "checkpoint_id")):
            id_column(table, heading, (i[key] or "-" for i in instances))
            if heading == "tenant":
                table.add_column("status", min_width=9)
        for heading in ("created", "started", "finished", "heartbeat"):
            table.add_column(heading)
        for i in instances:
            table.add_row(shown(i["instance_id"]), shown(i["tenant_id"]), status_text(i["status"]),
                          shown(i["checkpoint_id"] or "-"),
                          *(_format_ms(i[key], short=True) for key in ("created_at_ms", "started_at_ms",
                                                                       "finished_at_ms")),
                          _format_age(i["heartbeat_at_ms"], now))
        # On a narrow terminal the times of least use go first, rather than every column folding.
        for heading in ("finished", "started", "created"):
            if not out.is_terminal or natural(table) <= out.width:
                break
            table.columns.remove(next(column for column in table.columns if column.header == heading))
        return table

    def checkpoints_table(checkpoints: list[dict], title: str | None = None) -> Table:
        table = Table(title=title)
        id_column(table, "checkpoint", (c["checkpoint_id"] for c in checkpoints))
        table.add_column("saved")
        table.add_column("size")
        for c in checkpoints:
            table.add_row(shown(c["checkpoint_id"]), _format_ms(c["created_at_ms"]), _format_size(c["size"]))
        return table

    def print_value(kind: str, value) -> None:
        if kind == "binary":  # bytes are shown as a preview: --raw writes them all
            more = f" ... ({len(value)} bytes in all; --raw writes them)" if len(value) > PREVIEW_BYTES else ""
            out.print(shown(repr(value[:PREVIEW_BYTES]) + more))
        else:
            out.print(shown(value) if kind == "text" else Pretty(value))

    def payload_preview(payload: bytes | None) -> str:
        if not payload:
            return ""
        kind, value = decode_state(payload)
        text = repr(value) if kind in ("msgpack", "binary") else str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def events_table(events: list[dict], title: str | None = None) -> Table:
        table = Table(title=title)
        id_column(table, "id", (str(e["id"]) for e in events))
        table.add_column("time")
        table.add_column("type")
        table.add_column("subtype", overflow="fold")
        id_column(table, "checkpoint", (e.get("checkpoint_id") or "" for e in events))
        table.add_column("payload")
        for e in events:
            table.add_row(str(e["id"]), _format_ms(e["created_at_ms"], short=True), shown(e["event_type"]),
                          shown(e.get("subtype") or ""), shown(e.get("checkpoint_id") or ""),
                          shown(payload_preview(e.get("payload"))))
        return table

    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}

    def setting(field: str, help: str = "", option: str | None = None, **extra):
        """A `serve` option for a Settings field: unset, the field's variable (else its default) holds."""
        variable, default = Settings.VARIABLES.get(field), defaults.get(field)
        shown_default = {None: "none", dataclasses.MISSING: "none", False: "off"}.get(default, default)
        notes = (f"[env var: {variable}] " if variable else "") + f"[default: {shown_default}]"
        return typer.Option(None, *([option] if option else []), help=f"{help} {notes}".strip(), **extra)

    @app.command()
    def serve(
        database_url: str = setting("database_url", "Database URL"),
        host: str = setting("host", "Address to bind"),
        port: int = setting("port", "UDP port (0: any free one)", min=0, max=65535),
        tls_cert: str = setting("tls_cert", "PEM certificate (default: one made beside the database)"),
        tls_key: str = setting("tls_key", "PEM private key"),
        insecure: bool = typer.Option(False, help="Allow a non-loopback address without RUNTARA_SECRET (no"
                                                  " variable: a choice made on the command line)"),
        max_concurrent_instances: int = setting("max_concurrent_instances", "Instances running at once", min=1),
        sleep_inline_max_ms: int = setting("sleep_inline_max_ms", "Longest sleep answered on the connection;"
                                           " longer ones suspend the instance", min=0),
        heartbeat_timeout_ms: int = setting("heartbeat_timeout_ms", "Silence after which a run is dead", min=1),
        launch: list[str] = setting("launch_command", "Command that launches instances, split like a shell"
                                    " would; NAME=CMD for workflow NAME only (repeatable)"),
        max_restarts: int = setting("max_restarts", "Relaunches of a dead run in a row without a new"
                                    " checkpoint", min=0),
        workflows: str = typer.Option(None, help="A module or .py file defining a Worker: its workflows run in"
                                                 " this process (no variable: code to import is named on the"
                                                 " command line) [default: none]"),
        executor: str = setting("executor", "The name this server's in-process runs are claimed under"
                                " (a Worker's own name comes first)"),
        launch_timeout_ms: int = setting("launch_timeout_ms", "Time a launched process has to register", min=1),
        launch_max_attempts: int = setting("launch_max_attempts", "Failed launches in a row before the"
                                           " instance fails", min=1),
        wake_interval_ms: int = setting("wake_interval_ms", "How often the scheduler looks for work", min=1),
        max_message_bytes: int = setting("max_message_bytes", "Largest request payload", min=1,
                                         max=MAX_PAYLOAD_BYTES),
        sqlite_synchronous: str = setting("sqlite_synchronous", "FULL or NORMAL"),
        event_loop: str = setting("event_loop", "auto (uvloop if installed), uvloop or asyncio", "--loop"),
        metrics: str = setting("metrics_addr", "Serve Prometheus metrics at /metrics on PORT (loopback) or"
                               " HOST:PORT; needs the metrics extra", "--metrics"),
        log_level: str = typer.Option("INFO", envvar="RUNTARA_LOG_LEVEL", show_envvar=True,
                                      help="DEBUG, INFO, WARNING or ERROR"),
    ):
        """Run the QUIC server until SIGINT or SIGTERM. RUNTARA_SECRET_FILE (or RUNTARA_SECRET; environment only)
        turns on authentication."""
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {log_level!r}")
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if log_level.upper() != "DEBUG":
            logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic says two lines per connection
        try:
            launch_command, workflow_commands = parse_launch(launch or ())
            names = {field: "--" + field.replace("_", "-") for field in Settings.VARIABLES}
            settings = Settings.from_env(names={**names, "event_loop": "--loop", "launch_command": "--launch",
                                                "metrics_addr": "--metrics"},
                                         database_url=database_url, host=host, port=port, tls_cert=tls_cert,
                                         tls_key=tls_key, insecure=insecure or None,
                                         max_concurrent_instances=max_concurrent_instances,
                                         sleep_inline_max_ms=sleep_inline_max_ms,
                                         heartbeat_timeout_ms=heartbeat_timeout_ms, launch_command=launch_command,
                                         workflow_commands=workflow_commands or None, max_restarts=max_restarts,
                                         launch_timeout_ms=launch_timeout_ms, launch_max_attempts=launch_max_attempts,
                                         wake_interval_ms=wake_interval_ms, max_message_bytes=max_message_bytes,
                                         sqlite_synchronous=sqlite_synchronous and sqlite_synchronous.upper(),
                                         event_loop=event_loop and event_loop.lower(), metrics_addr=metrics)
            worker = None if workflows is None else load_worker(workflows)
            if worker is not None and executor:
                worker.executor = executor
            run_server(settings, worker)
        except (ValueError, OSError, ImportError, RuntaraError) as exc:
            raise fail(str(exc))

    @app.command()
    def migrate(database_url: str = DatabaseUrl):
        """Apply pending migrations; list applied and pending ones."""
        try:
            with open_storage(database_url or DEFAULT_DATABASE_URL, migrate=False) as storage:
                applied = storage.migrate(progress=lambda v, name: err.print(f"applying {v:03d}_{name}"))
                table = Table("version", "name", "applied")
                for version, name, at in storage.migration_status():
                    table.add_row(f"{version:03d}", name, _format_ms(at) + (" (now)" if version in applied else ""))
        except RuntaraError as exc:
            raise fail(str(exc))
        print_whole(table)

    @app.command()
    def instances(
        database_url: str = DatabaseUrl,
        status: str = Status,
        tenant: str = Tenant,
        since: str = typer.Option(None, help="Only created within this long, like 1h or 7d"),
        limit: int = Limit,
        json: bool = Json,
    ):
        """List instances, newest first."""
        check_status(status)
        created_since = None if since is None else now_ms() - duration(since)
        with database(database_url) as db:
            rows = db.read(Tx.list_instances, tenant_id=tenant, status=status, since=created_since, limit=limit)
            total = db.read(Tx.count_instances, tenant_id=tenant, status=status, since=created_since)
        if json:
            return emit_json({"instances": rows, "total_count": total})
        print_whole(instances_table(rows, title=f"{len(rows)} of {counted(total, 'instance')}"))

    @app.command()
    def show(instance_id: str, database_url: str = DatabaseUrl, json: bool = Json):
        """Everything about one instance."""
        with database(database_url) as db:
            found = db.read(_show, instance_id, 5, 10)
        if json:
            return emit_json(found)
        i, signal = found["instance"], found["signal"]
        facts = Table.grid(padding=(0, 2))
        facts.add_column(no_wrap=True)
        facts.add_column(overflow="fold")  # ids among the values: folded at worst, never cut
        facts.add_row("status", status_text(i["status"]))
        facts.add_row("tenant", shown_id(i["tenant_id"]))
        facts.add_row("workflow", shown_id(i["workflow"]))
        facts.add_row("run", str(i["run"]))
        for label, key in (("created", "created_at_ms"), ("started", "started_at_ms"),
                           ("finished", "finished_at_ms"), ("heartbeat", "heartbeat_at_ms"),
                           ("wakes at", "sleep_until_ms")):
            facts.add_row(label, _format_ms(i[key]))
        facts.add_row("latest checkpoint", shown_id(i["checkpoint_id"] or "-"))
        facts.add_row("pending signal", "-" if signal is None else
                      f"{signal['signal_type']} (sent {_format_ms(signal['created_at_ms'])})")
        if i["output"] is not None:
            facts.add_row("output", Pretty(decode_state(i["output"])[1]))
        if i["error"] is not None:
            facts.add_row("error", Text(visible(i["error"]), style="red"))
        print_whole(Panel(Group(
            facts,
            checkpoints_table(found["checkpoints"], title=f"newest checkpoints ({found['checkpoint_count']} in all)"),
            events_table(found["events"], title=f"newest events ({found['event_count']} in all)")),
            title=Text(f"instance {visible(instance_id)}")))

    @app.command()
    def checkpoints(instance_id: str, database_url: str = DatabaseUrl, limit: int = Limit, json: bool = Json):
        """List an instance's checkpoints, newest first."""
        with database(database_url) as db:
            listed = db.read(_list_checkpoints, instance_id, limit, 0)
        if json:
            return emit_json(listed)
        print_whole(checkpoints_table(listed["checkpoints"],
                                    title=f"{len(listed['checkpoints'])} of"
                                          f" {counted(listed['total_count'], 'checkpoint')}"))

    @app.command()
    def checkpoint(instance_id: str, checkpoint_id: str, database_url: str = DatabaseUrl,
                   raw: bool = typer.Option(False, "--raw", help="Write the exact bytes to stdout"),
                   json: bool = Json):
        """Print one checkpoint's state, decoded when it is msgpack, JSON or text."""
        with database(database_url) as db:
            state = db.read(_checkpoint_state, instance_id, checkpoint_id)
        if raw:
            sys.stdout.buffer.write(state)
            sys.stdout.flush()
            return
        kind, value = decode_state(state)
        if json:
            return emit_json({"checkpoint_id": checkpoint_id, "format": kind, "size": len(state), "value": value})
        err.print(shown(f"{checkpoint_id}: {_format_size(len(state))}, {kind}"))
        print_value(kind, value)

    @app.command()
    def events(instance_id: str, database_url: str = DatabaseUrl,
               type: str = typer.Option(None, "--type", help="Only this event type"),
               subtype: str = typer.Option(None, help="Only this subtype"), limit: int = Limit, json: bool = Json):
        """List an instance's events, newest first."""
        if type is not None and type not in KNOWN_EVENT_TYPES:
            raise fail(f"unknown event type {type!r}: use one of {', '.join(KNOWN_EVENT_TYPES)}")
        with database(database_url) as db:
            listed = db.read(_list_events, instance_id, type, subtype, limit, 0)
        if json:
            return emit_json(listed)
        print_whole(events_table(listed["events"],
                               title=f"{len(listed['events'])} of {counted(listed['total_count'], 'event')}"))

    @app.command()
    def signal(instance_id: str, signal_type: str = typer.Argument(..., help="cancel, pause or resume"),
               payload: str = typer.Option(None, help="Text delivered with the signal"),
               database_url: str = DatabaseUrl):
        """Send cancel, pause or resume to an instance."""
        if signal_type not in SIGNAL_TYPES:
            raise fail(f"unknown signal {signal_type!r}: use cancel, pause or resume")
        data = checked_signal(instance_id, None, payload)
        with database(database_url) as db:
            sent = db.write(_send_signal, instance_id, signal_type, data, now_ms())
        err.print(shown(f"sent {signal_type} to {instance_id}; it is {sent['status']}"))

    def checked_signal(instance_id: str, checkpoint_id: str | None, payload: str | None) -> bytes:
        """The payload's bytes, once the ids and the payload keep the protocol's rules."""
        try:
            check_id(instance_id, "INSTANCE_ID")
            if checkpoint_id is not None:
                check_id(checkpoint_id, "CHECKPOINT_ID")
        except InvalidRequest as exc:
            raise fail(str(exc))
        data = (payload or "").encode()
        if len(data) > MAX_SIGNAL_PAYLOAD:
            raise fail(f"--payload holds {len(data)} bytes; a signal's payload is at most {MAX_SIGNAL_PAYLOAD}")
        return data

    WAIT_EXIT = {"completed": 0, "failed": 3, "cancelled": 4}  # and 5: not finished at the timeout

    def wait_for_end(db, instance_id: str, timeout: str | None) -> None:
        """Poll the database until the instance is terminal or the timeout passes; print the output; exit."""
        deadline = None if timeout is None else time.monotonic() + duration(timeout) / 1000
        waiting = err.status(f"waiting for {instance_id}") if err.is_terminal else contextlib.nullcontext()
        with waiting as spinner:
            while True:
                instance = db.read(_existing, instance_id)
                if instance["status"] in TERMINAL or deadline is not None and time.monotonic() >= deadline:
                    break
                if spinner is not None:
                    spinner.update(shown(f"waiting for {instance_id}: {instance['status']}"))
                time.sleep(0.2)
        status = instance["status"]
        if status == "completed":
            if instance["output"]:
                print_value(*decode_state(instance["output"]))
        elif status in TERMINAL:
            error = f": {instance['error']}" if instance["error"] else ""
            err.print(shown(f"instance {instance_id} {status}{error}"))
        else:
            err.print(shown(f"instance {instance_id} is still {status} after {timeout}"))
        raise typer.Exit(WAIT_EXIT.get(status, 5))

    @app.command()
    def start(instance_id: str, tenant: str = typer.Option(..., help="The instance's tenant"),
              workflow: str = typer.Option(None, help="Which workflow runs it (chooses the launch command)"
                                                      " [default: default]"),
              input: str = typer.Option(None, "--input", help="Text the instance gets as its input"),
              input_file: Path = typer.Option(None, "--input-file", help="A file whose bytes are the input"),
              wait: bool = typer.Option(False, "--wait", help="Wait for the end, as `wait` does"),
              timeout: str = typer.Option(None, help="With --wait: give up after this long, like 30s or 5m"),
              database_url: str = DatabaseUrl):
        """Start an instance: the server launches it with its workflow's launch command."""
        if input is not None and input_file is not None:
            raise fail("give --input or --input-file, not both")
        try:
            data = input_file.read_bytes() if input_file is not None else (input or "").encode()
        except OSError as exc:
            raise fail(f"--input-file: cannot read {input_file}: {exc.strerror}")
        try:
            check_id(instance_id, "INSTANCE_ID")
            check_id(tenant, "--tenant")
            if workflow is not None:
                check_id(workflow, "--workflow")
        except InvalidRequest as exc:
            raise fail(str(exc))
        with database(database_url) as db:
            started = db.write(_start_instance, instance_id, tenant, workflow, data, now_ms())
            err.print(shown(f"{'started' if started['created'] else 'already started:'} {instance_id}"
                           f" ({started['status']})"))
            if wait:
                wait_for_end(db, instance_id, timeout)

    @app.command()
    def fork(instance_id: str, new_id: str = typer.Option(..., "--new-id", help="The new instance's id"),
             from_checkpoint: str = typer.Option(None, "--from", help="Copy the checkpoints saved up to this one"
                                                                      " [default: all]"),
             wait: bool = typer.Option(False, "--wait", help="Wait for the new instance's end, as `wait` does"),
             timeout: str = typer.Option(None, help="With --wait: give up after this long, like 30s or 5m"),
             database_url: str = DatabaseUrl):
        """Restart an instance from a checkpoint: a new instance replays its steps up to there and runs the rest."""
        try:
            check_id(new_id, "--new-id")
        except InvalidRequest as exc:
            raise fail(str(exc))
        with database(database_url) as db:
            forked = db.write(_fork_instance, instance_id, new_id, from_checkpoint, now_ms())
            err.print(shown(f"forked {instance_id} as {new_id} with {counted(forked['checkpoints'], 'checkpoint')}"
                           + (f", up to {forked['checkpoint_id']}" if forked.get("checkpoint_id") else "")))
            if wait:
                wait_for_end(db, new_id, timeout)

    @app.command("wait")
    def wait_command(instance_id: str, timeout: str = typer.Option(None, help="Give up after this long, like 30s"),
                     database_url: str = DatabaseUrl):
        """Wait until an instance ends and print its output. Exit code: 0 completed, 3 failed, 4 cancelled,
        5 not finished at the timeout (1 for other errors)."""
        with database(database_url) as db:
            wait_for_end(db, instance_id, timeout)

    @app.command("custom-signal")
    def custom_signal(instance_id: str, checkpoint_id: str,
                      payload: str = typer.Option(None, help="Text delivered with the signal"),
                      database_url: str = DatabaseUrl):
        """Leave a signal for the instance's next checkpoint or poll naming CHECKPOINT_ID."""
        data = checked_signal(instance_id, checkpoint_id, payload)
        with database(database_url) as db:
            db.write(_send_custom_signal, instance_id, checkpoint_id, data, now_ms())
        err.print(shown(f"left a signal for {instance_id} at checkpoint {checkpoint_id}"))

    @app.command()
    def stats(database_url: str = DatabaseUrl, json: bool = Json):
        """Instances by status, checkpoints, events, database size, the oldest running instance."""
        with database(database_url) as db:
            numbers = db.read(_stats)
        if json:
            return emit_json(numbers)
        table = Table("what", "how many", title="runtara-core")
        for status in STATUSES:
            table.add_row(status_text(status), str(numbers["instances"].get(status, 0)))
        table.add_row("checkpoints", str(numbers["checkpoints"]))
        table.add_row("events", str(numbers["events"]))
        table.add_row("database size", _format_size(numbers["database_bytes"]))
        oldest = numbers["oldest_running"]
        table.add_row("oldest running", "-" if oldest is None else
                      shown(f"{oldest['instance_id']} (since {_format_ms(oldest['started_at_ms'])})"))
        print_whole(table)

    @app.command()
    def gc(older_than: str = typer.Option(..., help="Finished longer ago than this, like 30d"),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would go"),
           batch_size: int = typer.Option(500, min=1, max=10_000), database_url: str = DatabaseUrl,
           json: bool = Json):
        """Delete terminal instances finished before the cutoff, with their checkpoints, events and signals."""
        before = now_ms() - duration(older_than)
        with database(database_url) as db:
            summary = db.read(Tx.count_finished, before)
            removed = 0
            if not dry_run and summary["instances"]:
                with Progress(console=err, transient=False) as progress:
                    task = progress.add_task("deleting", total=summary["instances"])
                    while batch := db.write(Tx.delete_finished, before, batch_size):
                        removed += len(batch)
                        progress.advance(task, len(batch))
        result = {**summary, "dry_run": dry_run, "removed_instances": removed}
        if json:
            return emit_json(result)
        verb = "would remove" if dry_run else "removed"
        out.print(f"{verb} {counted(summary['instances'] if dry_run else removed, 'instance')} finished before"
                  f" {_format_ms(before)}, with {counted(summary['checkpoints'], 'checkpoint')} and"
                  f" {counted(summary['events'], 'event')}")

    @app.command()
    def wakes(database_url: str = DatabaseUrl, limit: int = Limit, json: bool = Json):
        """Instances waiting for a launch: pending ones, suspended ones whose time has come or that have a
        resume, and runs whose process died; with any launch under way and the backoff before the next."""
        now = now_ms()
        with database(database_url) as db:
            due = db.read(Tx.launch_queue, now, limit)
        if json:
            return emit_json({"wakes": due})
        table = Table(title=f"{counted(len(due), 'instance')} waiting for a launch")
        for heading, key in (("instance", "instance_id"), ("tenant", "tenant_id"), ("workflow", "workflow"),
                             ("checkpoint", "checkpoint_id")):
            id_column(table, heading, (d[key] or "-" for d in due))
        for heading in ("why", "launch", "attempts"):
            table.add_column(heading)

        def why(d) -> str:
            if d["status"] == "pending":
                return "started"
            if d["status"] == "running":
                return f"process gone since {_format_ms(d['orphaned_at_ms'])}"
            return f"woke at {_format_ms(d['sleep_until_ms'])}" if d["sleep_until_ms"] else "resume signal"

        for d in due:
            lease, after = d["launch_lease_until_ms"], d["launch_after_ms"]
            launch = (f"under way until {_format_ms(lease)}" if lease and lease > now else
                      f"not before {_format_ms(after)}" if after and after > now else "-")
            table.add_row(shown(d["instance_id"]), shown(d["tenant_id"]), shown(d["workflow"]),
                          shown(d["checkpoint_id"] or "-"), why(d), launch,
                          str(d["launch_attempts"]))
        print_whole(table)

    @app.command()
    def token(instance_id: str = typer.Argument(None, help="The instance the token is for"),
              tenant: str = typer.Option(None, help="The instance's tenant"),
              admin: bool = typer.Option(False, "--admin", help="Print the operators' token instead")):
        """Print an instance's (or the operators') token under RUNTARA_SECRET (or RUNTARA_SECRET_FILE)."""
        try:
            secret = secret_from(os.environ)
        except ValueError as exc:
            raise fail(str(exc))
        if not secret:
            raise fail("neither RUNTARA_SECRET nor RUNTARA_SECRET_FILE is set; tokens are made from the secret")
        if admin:
            return typer.echo(admin_token(secret))
        if not instance_id or not tenant:
            raise fail("give INSTANCE_ID and --tenant, or --admin")
        try:
            check_id(instance_id, "INSTANCE_ID")
            check_id(tenant, "--tenant")
        except InvalidRequest as exc:
            raise fail(str(exc))
        typer.echo(instance_token(secret, tenant, instance_id))

    @app.command()
    def watch(database_url: str = DatabaseUrl,
              status: str = Status, tenant: str = Tenant,
              interval: float = typer.Option(1.0, min=0.1, help="Seconds between refreshes"),
              limit: int = typer.Option(30, min=1, max=1000, help="At most this many instances, newest first"),
              iterations: int = typer.Option(0, min=0, help="Stop after this many refreshes (0: until Ctrl-C)")):
        """A live table of instances."""
        check_status(status)
        def snapshot(db) -> Table:
            rows = db.read(Tx.list_instances, tenant_id=tenant, status=status, limit=limit)
            counts = db.read(Tx.count_by_status)
            summary = Text("  ").join(Text.assemble(status_text(s), f" {counts.get(s, 0)}") for s in STATUSES)
            return instances_table(rows, title=Text.assemble(summary, f"  ({_format_ms(now_ms())})"))

        with database(database_url) as db:
            # On a terminal the table is redrawn in place; piped, each snapshot is printed as it is taken.
            first = snapshot(db)
            live = (Live(folding(first), console=out, auto_refresh=False, vertical_overflow="visible")  # no row hidden
                    if out.is_terminal and fits(first) else None)

            def show():
                nonlocal live
                table = snapshot(db)
                if live is not None and fits(table):
                    return live.update(folding(table), refresh=True)
                if live is not None:  # an id too long for the terminal came: from now on, snapshots printed whole
                    live.stop()
                    live = None
                print_whole(table)
            with live or contextlib.nullcontext(), contextlib.suppress(KeyboardInterrupt):
                if live is None:
                    print_whole(first)
                shown = 1
                while iterations == 0 or shown < iterations:
                    time.sleep(interval)
                    show()
                    shown += 1

    return app


def main(argv: list[str] | None = None) -> None:
    """The `runtara` command line."""
    build_cli()(args=argv, prog_name="runtara")


if __name__ == "__main__":
    # Run as a script, this module is __main__; a workflow file that imports runtara_core must get this
    # module, not a second copy whose Worker class is another class.
    sys.modules.setdefault("runtara_core", sys.modules[__name__])
    main()

"""The wire format as pure functions over bytes (PROTOCOL.md sections 2, 3 and 7)."""

import re

import msgpack
import pytest

import runtara_core as rc

# PROTOCOL.md section 7, byte for byte.
VECTORS = [
    (rc.FRAME_REQUEST, {"op": "health_check"},
     "00 00 00 11 00 01 81 a2 6f 70 ac 68 65 61 6c 74 68 5f 63 68 65 63 6b"),
    (rc.FRAME_REQUEST, {"op": "checkpoint", "instance_id": "i-1", "checkpoint_id": "step-1", "state": b"\x00\xff"},
     "00 00 00 3e 00 01 84 a2 6f 70 aa 63 68 65 63 6b 70 6f 69 6e 74 ab 69 6e 73 74 61 6e 63 65 5f 69 64 a3 69 2d 31"
     " ad 63 68 65 63 6b 70 6f 69 6e 74 5f 69 64 a6 73 74 65 70 2d 31 a5 73 74 61 74 65 c4 02 00 ff"),
    (rc.FRAME_RESPONSE, {"found": False, "state": b""},
     "00 00 00 10 00 02 82 a5 66 6f 75 6e 64 c2 a5 73 74 61 74 65 c4 00"),
    (rc.FRAME_ERROR, {"code": "INSTANCE_NOT_FOUND", "message": "no instance i-9"},
     "00 00 00 31 00 06 82 a4 63 6f 64 65 b2 49 4e 53 54 41 4e 43 45 5f 4e 4f 54 5f 46 4f 55 4e 44 a7 6d 65 73 73 61"
     " 67 65 af 6e 6f 20 69 6e 73 74 61 6e 63 65 20 69 2d 39"),
]


@pytest.mark.parametrize("frame_type, message, hex_bytes", VECTORS)
def test_protocol_vectors_encode_and_decode(frame_type, message, hex_bytes):
    data = bytes.fromhex(hex_bytes)
    assert rc.encode_frame(frame_type, message) == data
    assert rc.decode_frame(data) == (frame_type, message)


def test_error_frame_from_exception_matches_vector():
    assert rc.encode_error(rc.InstanceNotFound("no instance i-9")) == bytes.fromhex(VECTORS[3][2])


def test_reader_accepts_any_split_of_the_bytes():
    data = rc.encode_frame(rc.FRAME_REQUEST, {"op": "checkpoint", "state": bytes(range(256))})
    for cut in range(len(data) + 1):
        reader = rc.FrameReader()
        assert reader.feed(data[:cut], end=False) is None
        assert reader.feed(data[cut:], end=True) == (rc.FRAME_REQUEST, {"op": "checkpoint", "state": bytes(range(256))})


def test_reader_decodes_other_valid_encodings():
    payload = b"\xde\x00\x01" + msgpack.packb("op") + msgpack.packb("health_check")  # map16 instead of fixmap
    frame = rc.FRAME_HEADER.pack(len(payload), rc.FRAME_REQUEST) + payload
    assert rc.decode_frame(frame) == (rc.FRAME_REQUEST, {"op": "health_check"})


def test_too_large_is_rejected_from_the_header_alone():
    reader = rc.FrameReader(max_payload=1000)
    with pytest.raises(rc.FrameTooLarge, match="1001"):
        reader.feed(rc.FRAME_HEADER.pack(1001, rc.FRAME_REQUEST), end=False)
    with pytest.raises(rc.FrameTooLarge):
        rc.FrameReader().feed(b"\xff\xff\xff\xff\x00\x01", end=False)


def test_maximum_payload_is_accepted_exactly():
    payload = msgpack.packb({"op": "x", "pad": b"a" * 100})
    frame = rc.FRAME_HEADER.pack(len(payload), rc.FRAME_REQUEST) + payload
    assert rc.decode_frame(frame, max_payload=len(payload))[1]["op"] == "x"
    with pytest.raises(rc.FrameTooLarge):
        rc.decode_frame(frame, max_payload=len(payload) - 1)


@pytest.mark.parametrize("frame_type", [0, 3, 4, 5, 7, 65535])
def test_unknown_frame_type_is_rejected(frame_type):
    with pytest.raises(rc.InvalidRequest, match="frame type"):
        rc.FrameReader().feed(rc.FRAME_HEADER.pack(1, frame_type) + b"\x80", end=True)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00\x00\x00\x05\x00\x01\x81"])
def test_truncated_frames_are_rejected(data):
    with pytest.raises(rc.InvalidRequest, match="truncated"):
        rc.FrameReader().feed(data, end=True)


def test_bytes_after_the_frame_are_rejected_at_once():
    frame = rc.encode_frame(rc.FRAME_REQUEST, {"op": "health_check"})
    with pytest.raises(rc.InvalidRequest, match="after the frame"):
        rc.FrameReader().feed(frame + b"\x00", end=False)


@pytest.mark.parametrize("payload", [b"\xc1", b"\x93\x01\x02\x03", b"\xa3abc", b"\x81\xa2op", b"\x80\x80"])
def test_payload_that_is_not_one_map_is_rejected(payload):
    with pytest.raises(rc.InvalidRequest):
        rc.decode_frame(rc.FRAME_HEADER.pack(len(payload), rc.FRAME_REQUEST) + payload)


@pytest.mark.parametrize("payload, reason", [(b"\xc1", "FormatError"), (b"\x81\x91\x01\x02", "a map key is a map or an array")])
def test_an_undecodable_payload_says_why(payload, reason):
    """The error ended in an empty reason, or in Python's "unhashable type: 'list'"."""
    with pytest.raises(rc.InvalidRequest) as refused:
        rc.decode_payload(payload)
    assert str(refused.value).endswith(f"holds more than a request needs: {reason}")


def test_deep_nesting_is_rejected_not_crashing():
    payload = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(rc.InvalidRequest):
        rc.decode_payload(payload)


def test_parse_request_checks_every_field():
    op, fields, token = rc.parse_request({"op": "checkpoint", "instance_id": "i", "checkpoint_id": "c",
                                          "state": b"\x01", "unknown": 1, "token": "t"})
    assert (op, fields, token) == ("checkpoint", {"instance_id": "i", "checkpoint_id": "c", "state": b"\x01",
                                                  "run": None}, "t")
    assert rc.parse_request({"op": "list_instances", "status": None})[1]["status"] is None


@pytest.mark.parametrize("message, complaint", [
    ({}, "missing field 'op'"),
    ({"op": 5}, "missing field 'op'"),
    ({"op": "launch_missiles"}, "unknown op"),
    ({"op": "checkpoint", "instance_id": "i", "checkpoint_id": "c"}, "missing required field 'state'"),
    ({"op": "checkpoint", "instance_id": "i", "checkpoint_id": "c", "state": "text"}, "'state' must be binary"),
    ({"op": "checkpoint", "instance_id": "", "checkpoint_id": "c", "state": b""}, "'instance_id'"),
    ({"op": "checkpoint", "instance_id": "x" * 513, "checkpoint_id": "c", "state": b""}, "at most 512 bytes"),
    ({"op": "checkpoint", "instance_id": "é" * 257, "checkpoint_id": "c", "state": b""}, "at most 512 bytes"),
    ({"op": "sleep", "instance_id": "i", "checkpoint_id": "c", "state": b"", "duration_ms": -1}, "milliseconds from 0"),
    ({"op": "sleep", "instance_id": "i", "checkpoint_id": "c", "state": b"", "duration_ms": True}, "milliseconds"),
    ({"op": "sleep", "instance_id": "i", "checkpoint_id": "c", "state": b"", "duration_ms": 1.5}, "milliseconds"),
    ({"op": "sleep", "instance_id": "i", "checkpoint_id": "c", "state": b"", "duration_ms": rc.MAX_DURATION_MS + 1},
     "milliseconds from 0 to 3153600000000"),
    ({"op": "retry_attempt", "instance_id": "i", "checkpoint_id": "c", "attempt_number": -2}, "non-negative"),
    ({"op": "instance_event", "instance_id": "i", "event_type": "custom", "subtype": "a\x00b"}, "without NUL"),
    ({"op": "instance_event", "instance_id": "i", "event_type": "exploded"}, "event_type"),
    ({"op": "signal_ack", "instance_id": "i", "signal_type": "cancel", "acknowledged": 1}, "true or false"),
    ({"op": "send_signal", "instance_id": "i", "signal_type": "stop"}, "one of cancel, pause, resume"),
    ({"op": "list_instances", "limit": 1001}, "from 1 to 1000"),
    ({"op": "list_instances", "limit": 0}, "from 1 to 1000"),
    ({"op": "list_instances", "status": "sleeping"}, "'status'"),
    ({"op": "instance_event_batch", "events": []}, "an array of 1 to 1000 event maps"),
    ({"op": "instance_event_batch", "events": [{"instance_id": "i"}]}, "events[0]: missing required field 'event_type'"),
    ({"op": "instance_event_batch", "events": ["x"]}, "events[0]"),
    ({"op": "health_check", "token": 7}, "'token'"),
])
def test_invalid_requests_say_what_is_wrong(message, complaint):
    with pytest.raises(rc.InvalidRequest, match=re.escape(complaint)):
        rc.parse_request(message)


def test_ids_of_exactly_the_maximum_length_are_accepted():
    longest = "é" * 256  # 512 bytes of UTF-8
    assert rc.parse_request({"op": "get_instance_status", "instance_id": longest})[1]["instance_id"] == longest


def test_error_codes_round_trip_to_their_classes():
    for code, cls in rc.ERRORS_BY_CODE.items():
        error = rc.error_from_wire(code, "why")
        assert type(error) is cls and error.code == code and str(error) == "why"
    assert rc.error_from_wire("NEW_CODE", "later").code == "NEW_CODE"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8001", ("127.0.0.1", 8001)), ("localhost:9", ("localhost", 9)), ("[::1]:8001", ("::1", 8001)),
    ("example.org", ("example.org", 8001)), ("runtara.internal:443", ("runtara.internal", 443)),
])
def test_server_addresses(text, expected):
    assert rc.parse_server_addr(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:70000", "a:b:c"])
def test_bad_server_addresses(text):
    with pytest.raises(ValueError):
        rc.parse_server_addr(text)

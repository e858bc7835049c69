"""Bad messages, sent with raw pyzmq, are skipped and counted; good ones around them arrive."""

from __future__ import annotations

import json
import time

import numpy as np
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from psss_ioc.pipeline.source import BAD_IMAGE, MISSING_CHANNEL, SourceFault
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.stream import CameraSource

CHANNEL = "TEST-CAM:FPICTURE"
IMAGE = np.arange(24, dtype=np.uint16).reshape(4, 6)
TS = (1700000000, 7)


def message(pulse_id: int, image: object = IMAGE, spec: wire.ChannelSpec | None = None,
            extra: bool = True) -> list[bytes]:
    """A well-formed message: the image channel (per `spec`) and one other channel."""
    spec = spec or wire.ChannelSpec.for_array(CHANNEL, IMAGE)
    specs = [spec, wire.ChannelSpec("TEST-CAM:OTHER", "float64")] if extra else [spec]
    writer = wire.MessageWriter(specs)
    values = [image, 1.0] if extra else [image]
    parts = writer.encode(pulse_id, TS, writer.encode_values(values))
    return [bytes(p) for p in parts]


def main_header(pulse_id: int, digest: str) -> bytes:
    return wire.encode_main_header(pulse_id, TS, digest)


def with_spec(pulse_id: int, **changes: object) -> list[bytes]:
    """A message whose image channel header is altered (value bytes those of IMAGE)."""
    header = wire.ChannelSpec.for_array(CHANNEL, IMAGE).to_json() | changes
    data_header = json.dumps({"htype": "bsr_d-1.1", "channels": [header]}).encode()
    return [main_header(pulse_id, f"h{pulse_id}"), data_header, IMAGE.tobytes(),
            wire.encode_timestamp(TS)]


def corrupt_bslz4(pulse_id: int) -> list[bytes]:
    spec = wire.ChannelSpec.for_array(CHANNEL, IMAGE, wire.BSLZ4)
    parts = message(pulse_id, spec=spec)
    value = bytearray(parts[2])
    value[12:16] = (10_000).to_bytes(4, "big")  # first block claims more bytes than there are
    parts[2] = bytes(value)
    return parts


def bad_sequence() -> list[tuple[str | None, list[bytes]]]:
    """(expected counter, message) in sending order; None marks a good message."""
    good = message(1)
    return [
        (None, good),
        ("garbage", [b"\x00\xff not bsread at all"]),
        ("garbage", [b'{"some": "json"}', b"", b""]),
        ("bad_json", [b'{"htype": "bsr_m-1.1", "pulse_id": ', good[1], good[2], good[3]]),
        ("bad_json", [b'{"htype": "bsr_m-1.1", "pulse_id": "2"}', *good[1:]]),
        ("frame_count", message(2)[:-1]),
        ("frame_count", message(3)[:1]),
        ("bad_json", [main_header(4, "broken"), b'{"htype": "bsr_d-1.1", "chan', *good[2:]]),
        ("bad_json", [main_header(5, "nochannels"), b'{"htype": "bsr_d-1.1"}', *good[2:]]),
        ("size", with_spec(6, shape=[7, 4])),
        ("size", [*message(7)[:2], IMAGE.tobytes()[:-1], *message(7)[3:]]),
        ("unknown_type", with_spec(8, type="uint128")),
        ("unknown_type", with_spec(9, type="string")),
        ("unknown_compression", with_spec(10, compression="zstd")),
        ("unknown_compression", [wire.encode_main_header(11, TS, "x", None)[:-1]
                                 + b', "dh_compression": "zip"}', *good[1:]]),
        ("corrupt", corrupt_bslz4(12)),
        ("missing_channel", message(13, spec=wire.ChannelSpec.for_array("OTHER:IMAGE", IMAGE))),
        ("empty_image", message(14, image=None)),
        (None, message(15)),
        (None, message(16, spec=wire.ChannelSpec.for_array(CHANNEL, IMAGE, wire.BSLZ4))),
    ]


def test_bad_messages_are_skipped_and_counted(raw_push: tuple[zmq.Socket, str]) -> None:
    sock, address = raw_push
    sequence = bad_sequence()
    with CameraSource(address, "PULL", CHANNEL, receive_timeout=0.5) as source:
        for _, parts in sequence:
            sock.send_multipart(parts)
        frames = []
        for _ in range(20):  # receive() gives up (None) after a run of bad messages
            if (frame := source.receive()) is not None:
                frames.append(frame)
            if len(frames) == 3:
                break

    assert [f.pulse_id for f in frames] == [1, 15, 16]
    for frame in frames:
        np.testing.assert_array_equal(frame.image, IMAGE)
        assert frame.timestamp == TS
    c = source.counters
    expected = {kind: 0 for kind in wire.MALFORMED_KINDS} | {"missing_channel": 0,
                                                              "empty_image": 0}
    for kind, _ in sequence:
        if kind is not None:
            expected[kind] += 1
    counted = c.malformed | {"missing_channel": c.missing_channel, "empty_image": c.empty_image}
    assert counted == expected
    assert c.received == 3 and c.skipped == len(sequence) - 3
    assert "empty image" in c.last_error
    # what the pipeline adds to its error counts: the kinds seen, malformed ones prefixed
    assert source.errors() == {
        (f"malformed_{kind}" if kind in wire.MALFORMED_KINDS else kind): n
        for kind, n in expected.items() if n
    }
    assert source.errors()["malformed_corrupt"] == 1


def test_a_stream_of_only_bad_messages_still_times_out(raw_push: tuple[zmq.Socket, str]) -> None:
    sock, address = raw_push
    with CameraSource(address, "PULL", CHANNEL, receive_timeout=0.2) as source:
        for _ in range(20):
            sock.send_multipart([b"garbage"])
        assert source.receive() is None
        assert source.counters.malformed["garbage"] >= 1


def test_fault_is_the_latest_missing_channel_or_unusable_image() -> None:
    image = np.arange(24, dtype=np.uint16).reshape(4, 6)
    specs = [
        wire.ChannelSpec.for_array("OTHER-CAM:FPICTURE", image),
        wire.ChannelSpec("OTHER-CAM:SCALAR", "float64"),
        wire.ChannelSpec.for_array("OTHER-CAM:ROI_PROFILE", image[0]),  # 1-D: not an image
        wire.ChannelSpec.for_array("SOME:FRAME", image.astype(np.float32)),  # 2-D numeric
    ]
    writer = wire.MessageWriter(specs)
    values = writer.encode_values([image, 1.0, image[0], image.astype(np.float32)])
    source = CameraSource("tcp://127.0.0.1:1", image_channel="MY-CAM:FPICTURE")
    assert source.fault() is None and source.errors() == {}
    before = time.monotonic()
    for pulse_id in (1, 2, 3):
        assert source.decode(writer.encode(pulse_id, TS, values)) is None
    c = source.counters
    assert c.missing_channel == 3
    assert c.missing_channel_seen == ("OTHER-CAM:FPICTURE", "SOME:FRAME")
    assert c.missing_channel_n_channels == 4
    assert c.missing_channel_time is not None and c.missing_channel_time >= before
    assert source.errors() == {"missing_channel": 3}
    assert all(isinstance(v, int) for v in source.errors().values())  # the counters stay counters
    assert source.fault() == SourceFault(MISSING_CHANNEL, c.missing_channel_time,
                                         channel="MY-CAM:FPICTURE",
                                         channels_seen=("OTHER-CAM:FPICTURE", "SOME:FRAME"),
                                         n_channels=4)

    # the image channel there, but of a type no image can be made of: the latest one wins
    text = wire.MessageWriter([wire.ChannelSpec("MY-CAM:FPICTURE", "string", None)])
    assert source.decode(text.encode(4, TS, text.encode_values(["not an image"]))) is None
    assert source.errors() == {"missing_channel": 3, "malformed_unknown_type": 1}
    assert c.malformed[wire.UNKNOWN_TYPE] == 1
    fault = source.fault()
    assert fault is not None and fault.kind == BAD_IMAGE and fault.time == c.bad_image_time
    assert fault.channel == "MY-CAM:FPICTURE"
    assert "'string'" in fault.reason and "MY-CAM:FPICTURE" in fault.reason

    # ... and a message without the channel again makes it the missing channel once more
    assert source.decode(writer.encode(5, TS, values)) is None
    fault = source.fault()
    assert fault is not None and fault.kind == MISSING_CHANNEL


# ---------------------------------------------------------------------------------------------
# Fuzzing the decoder directly (no sockets): it returns a Frame or None, never raises.

GOOD = message(100)
GOOD_BSLZ4 = message(100, spec=wire.ChannelSpec.for_array(CHANNEL, IMAGE, wire.BSLZ4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_never_raise(parts: list[bytes]) -> None:
    source = CameraSource("tcp://127.0.0.1:1", image_channel=CHANNEL)
    assert source.decode(parts) is None
    assert source.counters.skipped == 1


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([GOOD, GOOD_BSLZ4]),
    index=st.integers(0, 5),
    cut=st.integers(0, 200),
    noise=st.binary(min_size=0, max_size=8),
)
def test_mutated_messages_never_raise(base: list[bytes], index: int, cut: int,
                                      noise: bytes) -> None:
    parts = list(base)
    frame_bytes = parts[index]
    parts[index] = frame_bytes[:cut] + noise + frame_bytes[cut + len(noise):]
    source = CameraSource("tcp://127.0.0.1:1", image_channel=CHANNEL)
    frame = source.decode(parts)
    assert (frame is not None) + source.counters.skipped == 1
    if frame is not None and frame.lazy_image is not None:
        # A compressed image is decoded when asked for: data that does not decompress is
        # counted as the corrupt message it was then, and the frame is no good one.
        try:
            frame.image  # noqa: B018
        except wire.WireError:
            assert source.counters.malformed[wire.CORRUPT] == 1
            assert source.counters.received == 0
            return
    if frame is not None:
        # A decoded frame holds the message's value bytes: the same image, or (when the noise
        # hit the header's "shape" key, so no shape is declared) the same bytes as a 1-D
        # array, which the pipeline then refuses per frame as not 2-D.
        assert frame.image.nbytes == IMAGE.nbytes
        assert frame.image.shape in (IMAGE.shape, (IMAGE.size,)) or frame.image.dtype != IMAGE.dtype

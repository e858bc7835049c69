"""psi-bsread Sender -> CameraSource and ResultSender -> psi-bsread Source, over real sockets."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import bsread
import numpy as np
import pytest
import zmq

from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.channels import OutputChannels
from psss_ioc.streams.stream import CameraSource, Frame, ResultSender

CHANNEL = "TEST-CAM:FPICTURE"
NAMES = OutputChannels.for_image(CHANNEL)
SOURCE_MODE = {"PUSH": "PULL", "PUB": "SUB"}
BSREAD_MODE = {"PUSH": bsread.PUSH, "PUB": bsread.PUB, "PULL": bsread.PULL, "SUB": bsread.SUB}
FIRST = 1000  # pulse ids from here on are the test's; lower ones only open the stream


@contextmanager
def bsread_sender(mode: str, compression: str | None = None) -> Iterator[tuple[Any, str]]:
    """A psi-bsread Sender bound to a free loopback port: (sender, address)."""
    sender = bsread.Sender(port="*", address="tcp://127.0.0.1", mode=BSREAD_MODE[mode],
                           data_compression=compression, data_header_compression=compression,
                           send_timeout=5000)
    sender.open()
    try:
        yield sender, sender.stream.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        sender.close()


def prime(send: Callable[[int], object], receive: Callable[[], object]) -> None:
    """Send throw-away messages until one arrives (PUB/SUB joins late; PUSH waits)."""
    for pulse_id in range(200):
        send(pulse_id)
        if receive() is not None:
            return
    raise AssertionError("the stream never delivered a message")


def receive_frames(source: CameraSource, n: int) -> list[Frame]:
    frames: list[Frame] = []
    timeouts = 0
    while len(frames) < n and timeouts < 10:
        frame = source.receive()
        timeouts += frame is None
        if frame is not None and frame.pulse_id >= FIRST:
            frames.append(frame)
    return frames


def images(dtype: type, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(rng.random((5, 7)) * 4000).astype(dtype) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# psi-bsread Sender -> CameraSource


@pytest.mark.parametrize("mode", ["PUSH", "PUB"])
@pytest.mark.parametrize("compression", [None, "bitshuffle_lz4"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_bsread_sender_to_camera_source(mode: str, compression: str | None, dtype: type) -> None:
    sent = images(dtype)
    with (
        bsread_sender(mode, compression) as (sender, address),
        CameraSource(address, SOURCE_MODE[mode], CHANNEL, receive_timeout=0.2) as source,
    ):
        prime(lambda p: sender.send(data={CHANNEL: sent[0]}, pulse_id=p), source.receive)
        for i, image in enumerate(sent):
            sender.send(data={CHANNEL: image, "TEST-CAM:OTHER": 3.5}, pulse_id=FIRST + i,
                        timestamp=(1700000000 + i, 123 + i))
        frames = receive_frames(source, len(sent))

    assert [f.pulse_id for f in frames] == [FIRST, FIRST + 1, FIRST + 2]
    assert [f.timestamp for f in frames] == [(1700000000 + i, 123 + i) for i in range(3)]
    for frame, image in zip(frames, sent, strict=True):
        assert frame.image.shape == (5, 7) and frame.image.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.image, image)


def test_pulse_gaps_and_format_changes_pass_as_they_come() -> None:
    """The source returns frames of any shape and dtype, whatever their pulse ids: the
    sequence is the pipeline's to count, not an error of the stream."""
    shapes = [((4, 6), np.uint16), ((4, 6), np.uint16), ((5, 6), np.uint16), ((5, 6), np.float32)]
    with (
        bsread_sender("PUSH") as (sender, address),
        CameraSource(address, "PULL", CHANNEL, receive_timeout=2.0) as source,
    ):
        for pulse_id, (shape, dtype) in zip([10, 11, 14, 15], shapes, strict=True):
            sender.send(data={CHANNEL: np.ones(shape, dtype)}, pulse_id=pulse_id)
        frames = [source.receive() for _ in shapes]

    assert [(f.pulse_id, f.image.shape, f.image.dtype) for f in frames] == [
        (p, s, np.dtype(d)) for p, (s, d) in zip([10, 11, 14, 15], shapes, strict=True)
    ]
    assert source.counters.received == 4 and source.counters.skipped == 0
    assert source.errors() == {} and source.fault() is None


def test_receive_times_out_with_none() -> None:
    with (
        bsread_sender("PUSH") as (_, address),
        CameraSource(address, "PULL", CHANNEL, receive_timeout=0.05) as source,
    ):
        assert source.receive() is None


# ---------------------------------------------------------------------------------------------
# ResultSender -> psi-bsread Source


def fit_result(spectrum: np.ndarray, center: float = 3.25, fwhm: float = 1.5,
               fit_ok: bool = True) -> SimpleNamespace:
    """A stand-in for processing.Result (duck-typed by ResultSender)."""
    fit = SimpleNamespace(center=center, fwhm=fwhm, ok=fit_ok)
    return SimpleNamespace(spectrum=spectrum, fit=fit)


SPECTRUM = np.array([5, 9, 4000000000, 2, 0, 1, 3], np.uint32)
PARAMETERS = {"background": "", "roi": [1, 4]}


@pytest.mark.parametrize("mode", ["PUSH", "PUB"])
@pytest.mark.parametrize("forward_image", [True, False])
def test_result_sender_to_bsread_source(mode: str, forward_image: bool) -> None:
    image = images(np.uint16, 1)[0]
    results = [fit_result(SPECTRUM), fit_result(SPECTRUM, math.nan, math.nan, False), None]
    sender = ResultSender(port=0, mode=mode, image_channel=CHANNEL, forward_image=forward_image,
                          host="127.0.0.1")
    with (
        sender,
        bsread.Source(host="127.0.0.1", port=sender.port, mode=BSREAD_MODE[SOURCE_MODE[mode]],
                      receive_timeout=200) as source,
    ):
        prime(lambda p: sender.send(Frame(p, (1, 2), image), results[0], PARAMETERS),
              source.receive)
        for i, result in enumerate(results):
            assert sender.send(Frame(FIRST + i, (1700000000, 42 + i), image), result, PARAMETERS)
        messages = []
        for _ in range(50):
            message = source.receive()
            if message is not None and message.data.pulse_id >= FIRST:
                messages.append(message.data)
            if len(messages) == len(results):
                break

    assert [m.pulse_id for m in messages] == [FIRST, FIRST + 1, FIRST + 2]
    assert [(m.global_timestamp, m.global_timestamp_offset) for m in messages] == [
        (1700000000, 42), (1700000000, 43), (1700000000, 44)]
    data = [m.data for m in messages]
    expected_names = [NAMES.spectrum, NAMES.center, NAMES.fwhm, NAMES.parameters,
                      NAMES.saturated]
    if forward_image:
        expected_names.insert(0, CHANNEL)
    assert all(list(d) == expected_names for d in data)
    ok, failed, missing = data
    assert ok[NAMES.spectrum].value.dtype == np.uint32
    np.testing.assert_array_equal(ok[NAMES.spectrum].value, SPECTRUM)
    assert ok[NAMES.center].value == 3.25 and ok[NAMES.center].value.dtype == np.float64
    assert ok[NAMES.fwhm].value == 1.5
    np.testing.assert_array_equal(failed[NAMES.spectrum].value, SPECTRUM)
    assert failed[NAMES.center].value is None and failed[NAMES.fwhm].value is None
    assert missing[NAMES.spectrum].value is None and missing[NAMES.center].value is None
    for d in data:
        assert json.loads(d[NAMES.parameters].value) == PARAMETERS
        if forward_image:
            assert d[CHANNEL].value.shape == (5, 7) and d[CHANNEL].value.dtype == np.uint16
            np.testing.assert_array_equal(d[CHANNEL].value, image)
    assert sender.counters.sent >= 3 and sender.counters.last_pulse_id == FIRST + 2


def recv_or_none(sock: zmq.Socket) -> list[bytes] | None:
    try:
        return sock.recv_multipart()
    except zmq.Again:
        return None


def recv_messages(sock: zmq.Socket, n: int) -> list[list[bytes]]:
    """The next n messages of the test (pulse_id >= FIRST), skipping left-over primers."""
    messages: list[list[bytes]] = []
    timeouts = 0
    while len(messages) < n and timeouts < 10:
        parts = recv_or_none(sock)
        timeouts += parts is None
        if parts is not None and json.loads(parts[0])["pulse_id"] >= FIRST:
            messages.append(parts)
    return messages


@contextmanager
def raw_pull(address: str) -> Iterator[zmq.Socket]:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close(0)
        context.term()


@pytest.mark.parametrize(
    ("image_dtype", "spectrum_dtype", "bsread_type"),
    [(np.uint16, np.uint32, "uint32"), (np.int32, np.int64, "int64"),
     (np.uint32, np.uint64, "uint64"), (np.float32, np.float64, "float64")],
)
def test_result_types_are_declared_and_stable(
    image_dtype: type, spectrum_dtype: type, bsread_type: str
) -> None:
    """The data header does not change when fit values go missing; missing = 2 empty frames."""
    image = images(image_dtype, 1)[0]
    spectrum = image.sum(axis=0, dtype=spectrum_dtype)
    results = [fit_result(spectrum), fit_result(spectrum, math.nan, math.nan, False),
               fit_result(spectrum, 2.0, math.inf)]
    with ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1") as sender, \
            raw_pull(f"tcp://127.0.0.1:{sender.port}") as sock:
        prime(lambda p: sender.send(Frame(p, (0, 0), image), results[0], PARAMETERS),
              lambda: recv_or_none(sock))
        for i, result in enumerate(results):
            sender.send(Frame(FIRST + i, (0, 0), image), result, PARAMETERS)
        messages = recv_messages(sock, len(results))

    assert len({m[1] for m in messages}) == 1  # one data header for all
    assert len({json.loads(m[0])["hash"] for m in messages}) == 1
    header = {c["name"]: c for c in json.loads(messages[0][1])["channels"]}
    assert header[CHANNEL]["shape"] == [7, 5]  # fastest dimension first
    assert header[CHANNEL]["type"] == np.dtype(image_dtype).name
    assert header[NAMES.spectrum]["type"] == bsread_type
    assert header[NAMES.spectrum]["shape"] == [7]
    assert header[NAMES.center]["type"] == header[NAMES.fwhm]["type"] == "float64"
    assert header[NAMES.parameters]["type"] == "string"
    center, fwhm = 6, 8  # frame index of the value of each channel
    assert np.frombuffer(messages[0][center], "<f8")[0] == 3.25
    assert messages[1][center:center + 2] == [b"", b""]  # failed fit: missing values
    assert messages[1][fwhm:fwhm + 2] == [b"", b""]
    assert np.frombuffer(messages[2][center], "<f8")[0] == 2.0
    assert messages[2][fwhm:fwhm + 2] == [b"", b""]  # an infinite FWHM is not a value either


def test_image_on_its_own_port() -> None:
    image = images(np.uint16, 1)[0]
    sender = ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1", image_port=0)
    with sender, raw_pull(f"tcp://127.0.0.1:{sender.port}") as results, \
            raw_pull(f"tcp://127.0.0.1:{sender.image_port}") as pictures:
        for sock in (results, pictures):  # both streams must be connected
            prime(lambda p: sender.send(Frame(p, (0, 0), image), None, {}),
                  lambda s=sock: recv_or_none(s))
        sender.send(Frame(FIRST, (5, 6), image), fit_result(SPECTRUM), PARAMETERS)
        [message] = recv_messages(results, 1)
        [picture] = recv_messages(pictures, 1)

    assert CHANNEL not in [c["name"] for c in json.loads(message[1])["channels"]]
    assert [c["name"] for c in json.loads(picture[1])["channels"]] == [CHANNEL]
    assert json.loads(picture[0])["global_timestamp"] == {"sec": 5, "ns": 6}
    np.testing.assert_array_equal(np.frombuffer(picture[2], np.uint16).reshape(5, 7), image)
    assert sender.counters.image_sent >= 1


@pytest.mark.parametrize("mode", ["PUSH", "PUB"])
def test_no_consumer_drops_and_counts(mode: str) -> None:
    image = images(np.uint16, 1)[0]
    with ResultSender(port=0, mode=mode, image_channel=CHANNEL, host="127.0.0.1") as sender:
        outcomes = [sender.send(Frame(i, (0, 0), image), None, {}) for i in range(5)]

    assert outcomes == [False] * 5
    assert (sender.counters.sent, sender.counters.dropped) == (0, 5)
    assert "consumer" in sender.counters.last_error


def test_send_on_a_closed_sender_is_a_counted_drop() -> None:
    sender = ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1")
    assert not sender.send(Frame(1, (0, 0), images(np.uint16, 1)[0]), None, {})
    assert sender.counters.dropped == 1 and "not open" in sender.counters.last_error


@pytest.mark.parametrize("mode", ["PUSH"])
def test_full_queue_drops_instead_of_blocking(mode: str) -> None:
    """A consumer that does not read: the sender queues a few messages, then drops (PUB: see
    test_a_subscriber_that_stops_reading_loses_only_its_own_messages)."""
    image = np.zeros((512, 1024), np.uint16)  # 1 MB: socket buffers fill after a few
    sender = ResultSender(port=0, mode=mode, image_channel=CHANNEL, host="127.0.0.1",
                          queue_size=1)
    context = zmq.Context()
    sock = context.socket(zmq.PULL if mode == "PUSH" else zmq.SUB)
    sock.set_hwm(1)
    if mode == "PUB":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with sender:
            sock.connect(f"tcp://127.0.0.1:{sender.port}")
            outcomes = []
            for i in range(2000):
                outcomes.append(sender.send(Frame(i, (0, 0), image), None, {}))
                if any(outcomes) and not outcomes[-1]:
                    break
                if not any(outcomes):
                    time.sleep(0.01)  # still connecting
    finally:
        sock.close(0)
        context.term()

    assert any(outcomes) and not outcomes[-1]
    assert sender.counters.sent == sum(outcomes)
    assert sender.counters.dropped == len(outcomes) - sum(outcomes)


def test_a_subscriber_that_stops_reading_loses_only_its_own_messages() -> None:
    """PUB, one SUB that never reads and one that does, real sockets: the reader gets every
    message; the other's overflow is counted (issue "Robust against hostile input" 4: with
    XPUB_NODROP alone, the reader got 10 of 400)."""
    image = np.zeros((512, 1024), np.uint16)  # 1 MB: the stalled queues fill after a few
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    healthy = context.socket(zmq.SUB)
    for sock in (stalled, healthy):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    for sock in (stalled, healthy):
        sock.setsockopt(zmq.RCVTIMEO, 200)
    stalled.setsockopt(zmq.RCVHWM, 1)
    sender = ResultSender(port=0, mode="PUB", image_channel=CHANNEL, host="127.0.0.1")
    try:
        with sender:
            stalled.connect(f"tcp://127.0.0.1:{sender.port}")
            prime(lambda p: sender.send(Frame(p, (0, 0), image), None, {}),
                  lambda: recv_or_none(stalled))
            healthy.connect(f"tcp://127.0.0.1:{sender.port}")
            prime(lambda p: sender.send(Frame(p, (0, 0), image), None, {}),
                  lambda: recv_or_none(healthy))
            received, dropped = 0, sender.counters.dropped
            for i in range(100):
                assert sender.send(Frame(FIRST + i, (0, 0), image), None, {})
                while (parts := recv_or_none(healthy)) is not None:
                    received += json.loads(parts[0])["pulse_id"] >= FIRST
                    healthy.setsockopt(zmq.RCVTIMEO, 0)
                healthy.setsockopt(zmq.RCVTIMEO, 200)
            while (parts := recv_or_none(healthy)) is not None:
                received += json.loads(parts[0])["pulse_id"] >= FIRST
    finally:
        stalled.close(0)
        healthy.close(0)
        context.term()
    assert received == 100
    assert sender.counters.subscriber_overflows >= 1
    assert sender.counters.dropped == dropped


def test_v18_names_with_the_energy_axis_to_bsread_source() -> None:
    """psss_processing 1.8's names: <prefix>:SPECTRUM_Y, SPECTRUM_X (the result's axis),
    SPECTRUM_CENTER, SPECTRUM_FWHM, processing_parameters; the image on its own port."""
    image = images(np.uint16, 1)[0]
    axis = np.linspace(9000.0, 9060.0, 7)
    result = SimpleNamespace(spectrum=SPECTRUM, fit=SimpleNamespace(center=9010.0, fwhm=4.5),
                             axis=axis)
    sender = ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1", image_port=0,
                          output_names="v1.8", prefix="TEST-CAM")
    sender.parameters_view = lambda p: {**p, "tag": "x"}
    with (sender,
          bsread.Source(host="127.0.0.1", port=sender.port, mode=bsread.PULL,
                        receive_timeout=200) as source,
          raw_pull(f"tcp://127.0.0.1:{sender.image_port}") as pictures):
        for receive in (source.receive, lambda: recv_or_none(pictures)):  # both connected
            prime(lambda p: sender.send(Frame(p, (0, 0), image), result, PARAMETERS), receive)
        assert sender.send(Frame(FIRST, (0, 0), image), result, PARAMETERS)
        message = None
        while message is None or message.data.pulse_id < FIRST:
            message = source.receive()
        [picture] = recv_messages(pictures, 1)

    data = message.data.data
    assert list(data) == ["TEST-CAM:SPECTRUM_Y", "TEST-CAM:SPECTRUM_X", "TEST-CAM:SPECTRUM_CENTER",
                          "TEST-CAM:SPECTRUM_FWHM", "TEST-CAM:processing_parameters"]
    np.testing.assert_array_equal(data["TEST-CAM:SPECTRUM_Y"].value, SPECTRUM)
    np.testing.assert_array_equal(data["TEST-CAM:SPECTRUM_X"].value, axis)
    assert data["TEST-CAM:SPECTRUM_CENTER"].value == 9010.0
    assert json.loads(data["TEST-CAM:processing_parameters"].value) == {**PARAMETERS, "tag": "x"}
    assert [c["name"] for c in json.loads(picture[1])["channels"]] == [CHANNEL]


def test_output_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"v1\.8, document"):
        ResultSender(port=0, image_channel=CHANNEL, output_names="v2")


def test_pub_notices_when_the_subscriber_leaves() -> None:
    image = images(np.uint16, 1)[0]
    with ResultSender(port=0, mode="PUB", image_channel=CHANNEL, host="127.0.0.1") as sender:
        with bsread.Source(host="127.0.0.1", port=sender.port, mode=bsread.SUB,
                           receive_timeout=200) as source:
            prime(lambda p: sender.send(Frame(p, (0, 0), image), None, {}), source.receive)
        for _ in range(500):  # the unsubscription arrives asynchronously
            if not sender.send(Frame(FIRST, (0, 0), image), None, {}):
                break
            time.sleep(0.01)

    assert sender.counters.last_error.endswith("no consumer connected")


@pytest.mark.parametrize("compression", [None, "bitshuffle_lz4"])
def test_our_encoder_is_read_by_psi_bsread(raw_push: tuple[zmq.Socket, str],
                                           compression: str | None) -> None:
    """MessageWriter output (simulator, ResultSender) checked against psi-bsread's decoder."""
    sock, address = raw_push
    image = images(np.uint16, 1)[0]
    big = np.arange(6, dtype=">i4")
    specs = [wire.ChannelSpec.for_array("IMG", image, compression),
             wire.ChannelSpec.for_array("BIG", big, compression),
             wire.ChannelSpec("TEXT", "string", compression=compression),
             wire.ChannelSpec("NONE", "float64")]
    writer = wire.MessageWriter(specs, dh_compression=compression)
    parts = writer.encode(77, (1700000000, 9), writer.encode_values([image, big, "h\u00e9", None]))
    host, port = address.rsplit(":", 1)
    with bsread.Source(host=host.removeprefix("tcp://"), port=int(port), receive_timeout=5000
                       ) as source:
        sock.send_multipart(parts, copy=False)
        message = source.receive().data

    assert message.pulse_id == 77
    assert (message.global_timestamp, message.global_timestamp_offset) == (1700000000, 9)
    data = message.data
    np.testing.assert_array_equal(data["IMG"].value, image)
    assert data["IMG"].value.dtype == np.uint16
    np.testing.assert_array_equal(data["BIG"].value, big)
    assert data["TEXT"].value == "h\u00e9" and data["NONE"].value is None
    assert (data["IMG"].timestamp, data["IMG"].timestamp_offset) == (1700000000, 9)
    assert (data["BIG"].timestamp, data["BIG"].timestamp_offset) == (1700000000, 9)

"""Compressed camera frames (issue 19): only the ROI rows are decoded, spectra equal those of
the same frames uncompressed bit for bit, corrupt data is counted as before, the image is
forwarded as it came, and a decompression bomb is refused before it is decompressed."""

from __future__ import annotations

import queue
import resource
import struct
import time
from typing import Any

import bitshuffle
import bsread
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline import FakeSource, Recorder, wait_until

from psss_ioc.core.processing import Settings, process
from psss_ioc.ioc.pvs import State
from psss_ioc.pipeline.source import BAD_IMAGE
from psss_ioc.pipeline.worker import Pipeline
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera
from psss_ioc.streams.stream import CameraSource, Frame, ResultSender

CHANNEL = "TEST-CAM:FPICTURE"
TS = (1700000000, 5)
# 203 x 301 uint16: 4096-element blocks of 13.6 rows, so ROIs start and end mid-block, a
# smaller last block and an uncompressed tail of 7 elements.
H, W = 203, 301
CAMERA = SimulatedCamera(SimConfig(height=H, width=W, pool=3, seed=3))


def message(image: np.ndarray, pulse_id: int = 1, compression: str | None = wire.BSLZ4,
            value: Any = None) -> list[bytes]:
    writer = wire.MessageWriter([wire.ChannelSpec.for_array(CHANNEL, image, compression)])
    values = writer.encode_values([image]) if value is None else [value]
    return [bytes(p) for p in writer.encode(pulse_id, TS, values)]


def source() -> CameraSource:
    return CameraSource("tcp://127.0.0.1:1", image_channel=CHANNEL)


def compressed(image: np.ndarray) -> bytes:
    return bytes(wire.encode_value(wire.ChannelSpec.for_array("x", image, wire.BSLZ4), image))


def block_starts(value: bytes, itemsize: int = 2) -> list[int]:
    """Where each block's 4-byte size starts in a bitshuffle_lz4 value (and where they end)."""
    n, block_bytes = struct.unpack(">qi", value[:12])
    starts, pos = [], 12
    for _ in range((n // itemsize + block_bytes // itemsize - 1) // (block_bytes // itemsize)):
        starts.append(pos)
        pos += 4 + int.from_bytes(value[pos:pos + 4], "big")
    return [*starts, pos]


# ------------------------------------------------------------------------------ decoding
@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 700)),
       dtype=st.sampled_from(["u1", "u2", "i4", "f4", "f8"]), data=st.data())
def test_rows_decode_exactly_whatever_the_shape_and_rows(shape: tuple[int, int], dtype: str,
                                                         data: st.DataObject) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    image = (rng.random(shape) * 200).astype(dtype)
    raw = compressed(image)
    lazy = wire.Bslz4Image(raw, wire.Bslz4Blocks(raw, image.dtype, image.size), shape)
    for _ in range(2):  # a second range decodes what the first left out (and the gap)
        ymin = data.draw(st.integers(0, shape[0] - 1))
        ymax = data.draw(st.integers(ymin + 1, shape[0]))
        np.testing.assert_array_equal(lazy.rows(ymin, ymax)[ymin:ymax], image[ymin:ymax])
    np.testing.assert_array_equal(lazy.full(), image)


def test_only_the_blocks_of_the_rows_are_decoded() -> None:
    image = CAMERA.images[0]
    raw = compressed(image)
    blocks = wire.Bslz4Blocks(raw, image.dtype, image.size)
    assert (blocks.n_blocks, blocks.tail) == (15, 7)  # 14 full, a smaller last one, the tail
    lazy = wire.Bslz4Image(raw, blocks, image.shape)
    decoded = lazy.rows(100, 120)
    first, stop = 100 * W // 4096, (120 * W - 1) // 4096 + 1
    assert lazy._done == (first, stop) == (7, 9)
    np.testing.assert_array_equal(decoded[100:120], image[100:120])
    np.testing.assert_array_equal(lazy.rows(H - 1, H)[H - 1], image[H - 1])  # tail included
    assert lazy._done == (7, blocks.n_units)


def test_parallel_decoding_gives_the_same_image() -> None:
    image = SimulatedCamera(SimConfig(height=300, width=2560, pool=1)).images[0]
    raw = compressed(image)
    blocks = wire.Bslz4Blocks(raw, image.dtype, image.size)
    np.testing.assert_array_equal(blocks.decode(threads=2).reshape(image.shape), image)
    lazy = wire.Bslz4Image(raw, blocks, image.shape, threads=2)
    np.testing.assert_array_equal(lazy.rows(10, 290)[10:290], image[10:290])


def test_without_the_c_function_the_python_api_decodes_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_DECOMPRESS", None)  # a bitshuffle build that hides it
    image = CAMERA.images[0]
    raw = compressed(image)
    lazy = wire.Bslz4Image(raw, wire.Bslz4Blocks(raw, image.dtype, image.size), image.shape)
    np.testing.assert_array_equal(lazy.rows(30, 70)[30:70], image[30:70])
    np.testing.assert_array_equal(lazy.full(), image)
    bad = corrupt_payload(raw, 3)
    with pytest.raises(wire.WireError) as error:
        wire.Bslz4Image(bad, wire.Bslz4Blocks(bad, image.dtype, image.size), image.shape).full()
    assert error.value.kind == wire.CORRUPT


# ------------------------------------------------------------------------------ the pipeline
def run_pipeline(frames: list[Any], settings: Settings) -> Recorder:
    """Feed `frames` through a Pipeline; the recorder holds what it published."""
    frames_in: queue.Queue[Any] = queue.Queue()
    for f in frames:
        frames_in.put(f)
    recorder = Recorder()
    pipeline = Pipeline(lambda a, m: FakeSource(a, m, frames_in), recorder, settings=settings)
    pipeline.set_input("tcp://camera:1")
    pipeline.start()
    try:
        wait_until(lambda: frames_in.empty() and pipeline.statistics().n_received == len(frames))
        time.sleep(0.05)
    finally:
        pipeline.stop()
    return recorder


@pytest.mark.parametrize("roi", [None, (0, 0), (1, 2), (20, 21), (100, 0), (13, 150),
                                 (0, H), (202, 203), (55, 137)])
@pytest.mark.parametrize("dark", ["none", "camera", "float"])
def test_spectra_from_compressed_frames_equal_the_uncompressed_bit_for_bit(
        roi: tuple[int, int] | None, dark: str) -> None:
    background = {"none": None, "camera": CAMERA.background,
                  "float": CAMERA.background.astype(np.float32) + 0.25}[dark]
    settings = Settings(roi=roi, background=background)
    cam = source()
    frames = [cam.decode(message(image, pulse_id=i + 1))
              for i, image in enumerate(CAMERA.images)]
    assert all(f is not None and f.lazy_image is not None for f in frames)
    results = run_pipeline(frames, settings).results
    assert len(results) == len(CAMERA.images)
    for (_, result, _), image in zip(results, CAMERA.images, strict=True):
        plain = process(image, settings)
        assert result.spectrum.dtype == plain.spectrum.dtype
        np.testing.assert_array_equal(result.spectrum, plain.spectrum)
        assert result.roi == plain.roi
        assert result.fit.status == plain.fit.status
        np.testing.assert_array_equal(np.asarray(result.fit[2:10], float),
                                      np.asarray(plain.fit[2:10], float))
    assert cam.counters.received == len(CAMERA.images) and cam.counters.skipped == 0


def test_process_reads_no_row_outside_the_roi() -> None:
    """The lazy path hands process() an image whose rows outside the ROI hold anything."""
    image = CAMERA.images[1]
    for chosen in (Settings(roi=(40, 90)), Settings(roi=(40, 90), background=CAMERA.background)):
        poisoned = image.copy()
        poisoned[:40] = 65535
        poisoned[90:] = 65535
        np.testing.assert_array_equal(process(poisoned, chosen).spectrum,
                                      process(image, chosen).spectrum)


# ------------------------------------------------------------------------------ bad data
def corrupt_payload(value: bytes, block: int) -> bytes:
    """The value with block `block`'s LZ4 data overwritten (its size kept)."""
    starts = block_starts(value)
    start, end = starts[block] + 4, starts[block + 1]
    return value[:start] + b"\xff" * (end - start) + value[end:]


def lying_size(value: bytes, block: int, by: int) -> bytes:
    start = block_starts(value)[block]
    size = int.from_bytes(value[start:start + 4], "big") + by
    return value[:start] + size.to_bytes(4, "big") + value[start + 4:]


@pytest.mark.parametrize(("what", "late"), [
    ("size too large, in the ROI", False), ("size too small, in the ROI", False),
    ("size wrong, outside the ROI", False), ("last block truncated", False),
    ("trailing bytes", False), ("data corrupt, in the ROI", True),
])
def test_corrupt_compressed_data_is_counted_and_skipped(what: str, late: bool) -> None:
    image = CAMERA.images[2]
    value = compressed(image)
    roi = (100, 120)  # blocks 7 and 8
    bad = {"size too large, in the ROI": lambda v: lying_size(v, 7, 5),
           "size too small, in the ROI": lambda v: lying_size(v, 8, -3),
           "size wrong, outside the ROI": lambda v: lying_size(v, 2, 1),
           "last block truncated": lambda v: v[:-20],
           "trailing bytes": lambda v: v + b"\x00",
           "data corrupt, in the ROI": lambda v: corrupt_payload(v, 8)}[what](value)
    cam = source()
    good = [cam.decode(message(image, pulse_id=p)) for p in (1, 3)]
    frame = cam.decode(message(image, pulse_id=2, value=bad))
    assert (frame is not None) == late
    frames = [good[0], *([frame] if late else []), good[1]]
    recorder = run_pipeline(frames, Settings(roi=roi))
    assert [f.pulse_id for f, _, _ in recorder.results] == [1, 3]
    c = cam.counters
    assert (c.received, c.malformed[wire.CORRUPT], c.skipped) == (2, 1, 1)
    assert "pulse 2" in c.last_error and "corrupt" in c.last_error
    assert all(state != State.ERROR for state, _ in recorder.states)


def test_corrupt_data_outside_the_roi_shows_when_the_whole_image_is_asked_for() -> None:
    image = CAMERA.images[0]
    cam = source()
    frame = cam.decode(message(image, value=corrupt_payload(compressed(image), 2)))
    assert frame is not None and frame.lazy_image is not None
    rows = frame.lazy_image.rows(100, 120)
    assert rows is not None
    np.testing.assert_array_equal(rows[100:120], image[100:120])
    with pytest.raises(wire.WireError) as error:
        frame.image  # noqa: B018
    assert error.value.kind == wire.CORRUPT
    assert cam.counters.malformed[wire.CORRUPT] == 1 and cam.counters.received == 0


# ------------------------------------------------------------------------------ size cap
def bomb(rows: int = 262_144, width: int = 2048,
         channel: str = CHANNEL) -> tuple[wire.ChannelSpec, bytes]:
    """A bitshuffle_lz4 uint16 image of rows x width (default 1 GiB) of zeros, built from one
    compressed zero block repeated: about 6 MB."""
    block = bitshuffle.compress_lz4(np.zeros(4096, np.uint16), 4096).tobytes()
    nbytes = rows * width * 2
    value = struct.pack(">qi", nbytes, 8192) + block * (nbytes // 8192)
    return wire.ChannelSpec(channel, "uint16", (rows, width), "little", wire.BSLZ4), value


def test_a_decompression_bomb_is_refused_before_it_is_decompressed() -> None:
    spec, value = bomb()
    writer = wire.MessageWriter([spec])
    parts = writer.encode(7, TS, [value])
    assert len(value) < 8e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    cam = source()
    assert cam.decode(parts) is None
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000
    c = cam.counters
    assert c.malformed[wire.TOO_LARGE] == 1 and cam.errors() == {"malformed_too_large": 1}
    assert "1073.7 MB exceeds the 64.0 MB allowed" in c.bad_image
    fault = cam.fault()
    assert fault is not None and fault.kind == BAD_IMAGE and fault.reason == c.bad_image
    # lz4 and uncompressed values are held to the same cap
    small = CameraSource("tcp://127.0.0.1:1", image_channel=CHANNEL, max_image_bytes=1000)
    lz4_value = (2**30).to_bytes(4, "little") + b"\x00" * 64
    for parts in (message(CAMERA.images[0], compression=None),
                  message(CAMERA.images[0], value=compressed(CAMERA.images[0])),
                  wire.MessageWriter([wire.ChannelSpec(CHANNEL, "uint16", (2**14, 2**15),
                                                       "little", wire.LZ4)]).encode(
                      8, TS, [lz4_value])):
        assert small.decode(parts) is None
    assert small.counters.malformed[wire.TOO_LARGE] == 3
    # a compressed data header is held to a cap of its own
    header = struct.pack(">qi", 2**30, 8192) + bitshuffle.compress_lz4(
        np.zeros(8192, np.uint8), 8192).tobytes() * (2**30 // 8192)
    main = wire.encode_main_header(10, TS, "bomb-header", wire.BSLZ4)
    assert small.decode([main, header, b"", b""]) is None
    assert small.counters.malformed[wire.TOO_LARGE] == 4
    # below the cap, the same kind of image is a frame
    spec, value = bomb(rows=64)
    frame = source().decode(wire.MessageWriter([spec]).encode(9, TS, [value]))
    assert frame is not None and frame.shape == (64, 2048)
    assert not frame.image.any()


# ------------------------------------------------------------------------------ forwarding
@pytest.mark.parametrize("image_port", [False, True])
def test_the_image_is_forwarded_as_it_came(image_port: bool) -> None:
    image = CAMERA.images[1]
    parts = message(image, pulse_id=5)
    frame = source().decode(parts)
    assert frame is not None and frame.lazy_image is not None
    result = process(frame.lazy_image.rows(50, 60), Settings(roi=(50, 60)))
    sender = ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1",
                          image_port=0 if image_port else None)
    with sender:
        context = zmq.Context()
        ports = [sender.port, *([sender.image_port] if image_port else [])]
        sockets = [context.socket(zmq.PULL) for _ in ports]  # every stream needs a consumer
        for sock, port in zip(sockets, ports, strict=True):
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            wait_until(lambda: sender.send(frame, result, {"roi": [50, 60]})
                       and (sender.counters.image_sent > 0 or not image_port))
            got = sockets[-1].recv_multipart()
        finally:
            for sock in sockets:
                sock.close(0)
            context.term()
    header = wire.DataHeader.parse(got[1])
    spec = header.channels[header.index[CHANNEL]]
    assert spec.compression == wire.BSLZ4 and spec.shape == (H, W)
    assert got[2 + 2 * header.index[CHANNEL]] == parts[2]  # the camera's bytes, not re-encoded
    assert frame.lazy_image._image._done == (3, 5)  # the ROI's blocks only: nothing more


def test_psi_bsread_reads_the_forwarded_image_equal_to_the_cameras() -> None:
    image = CAMERA.images[2]
    frame = source().decode(message(image, pulse_id=9))
    assert frame is not None and frame.lazy_image is not None
    result = process(frame.lazy_image.rows(50, 60), Settings(roi=(50, 60)))
    with ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1") as sender, \
            bsread.Source(host="127.0.0.1", port=sender.port, mode=bsread.PULL,
                          receive_timeout=200) as stream:
        got = None
        for _ in range(50):
            sender.send(frame, result, {"roi": [50, 60]})
            got = stream.receive()
            if got is not None:
                break
    assert got is not None
    np.testing.assert_array_equal(got.data.data[CHANNEL].value, image)
    np.testing.assert_array_equal(got.data.data[CHANNEL + ".spectrum"].value, result.spectrum)


def test_an_uncompressed_frame_is_forwarded_as_an_array() -> None:
    frame = Frame(1, TS, CAMERA.images[0])
    spec, value = frame.output_value("X")
    assert spec == wire.ChannelSpec.for_array("X", CAMERA.images[0]) and value is frame.image


"""Every bsread wire fixture decodes to the values its README documents."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zmq

from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.stream import CameraSource

PSI_TIMESTAMP = (1600000000, 500)
JAVA_CHANNEL_TIMESTAMP = (1517934907, 307000000)


def load_parts(directory: Path, name: str) -> list[bytes]:
    doc = json.loads((directory / name).read_text())
    return [base64.b64decode(frame) for frame in doc["frames_b64"]]


def decode_all(parts: list[bytes]) -> tuple[wire.MainHeader, dict[str, tuple[object, object]]]:
    """The main header and every channel's (value, timestamp), decoded as `CameraSource`
    decodes its image channel: both headers (`MessageReader.split`), then the value."""
    main, header = wire.MessageReader().split(parts)
    return main, {
        spec.name: (wire.decode_value(spec, parts[2 + 2 * i]),
                    wire.decode_timestamp(parts[3 + 2 * i], spec.encoding))
        for i, spec in enumerate(header.channels)
    }


def expected_image() -> np.ndarray:
    return (np.arange(24).reshape(4, 6) * 1000).astype(np.uint16)


@pytest.mark.parametrize("name", ["psi_bsread_plain.json", "psi_bsread_bslz4.json"])
def test_psi_bsread_fixture_values(bsread_fixtures: Path, name: str) -> None:
    main, ch = decode_all(load_parts(bsread_fixtures, name))

    assert main.pulse_id == 1234
    assert main.timestamp == PSI_TIMESTAMP
    assert list(ch) == ["image", "value", "count", "text", "none"]
    image = ch["image"][0]
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint16 and image.shape == (4, 6)
    np.testing.assert_array_equal(image, expected_image())
    value, count = ch["value"][0], ch["count"][0]
    assert isinstance(value, np.ndarray) and isinstance(count, np.ndarray)
    assert value.dtype == np.float64 and value.tolist() == [1.5]
    assert count.dtype == np.int64 and count.tolist() == [7]
    assert ch["text"][0] == "abc"
    assert ch["none"] == (None, None)
    assert {ch[n][1] for n in ("image", "value", "count", "text")} == {PSI_TIMESTAMP}


def test_java_style_fixture_values(bsread_fixtures: Path) -> None:
    parts = load_parts(bsread_fixtures, "java_style_no_pulse_id.json")
    main = json.loads(parts[0])
    assert "pulse_id" not in main
    assert len(main["hash"]) == 30 and main["hash"] != hashlib.md5(parts[1]).hexdigest()

    main, ch = decode_all(parts)

    assert main.pulse_id == 0
    data, timestamp = ch["data"]
    assert isinstance(data, np.ndarray) and data.dtype == np.float64
    np.testing.assert_array_equal(data, np.arange(10.0))
    assert timestamp == JAVA_CHANNEL_TIMESTAMP


def test_java_dispatcher_compressed_data_header(bsread_fixtures: Path) -> None:
    meta = json.loads((bsread_fixtures / "java_dispatcher_data_header_bslz4.json").read_text())
    raw = (bsread_fixtures / meta["data_header_file"]).read_bytes()
    main = wire.parse_main_header(json.dumps(meta["main_header"]).encode())
    assert main.pulse_id == 147196131823 and main.dh_compression == wire.BSLZ4
    assert main.hash == hashlib.md5(raw).hexdigest()

    text = wire.decode_value(wire.ChannelSpec("dh", "string", compression=wire.BSLZ4), raw)
    assert isinstance(text, str) and len(text) == meta["uncompressed_length"] == 1083

    header = wire.DataHeader.parse(raw, main.dh_compression)
    assert len(header.channels) == meta["n_channels"] == 23
    by_name = {c.name: c for c in header.channels}
    # Absent fields take the defaults: float64, little endian, no compression.
    assert by_name["Float64Scalar"].type == "float64"
    assert by_name["Float64Waveform"].shape == (2048,)
    assert {c.encoding for c in header.channels} == {"little"}
    assert {c.compression for c in header.channels} == {None}
    assert by_name["UInt16Waveform"].dtype == np.dtype("<u2")


def _send_and_receive(raw_push: tuple[zmq.Socket, str], parts: list[bytes], channel: str
                      ) -> tuple[CameraSource, object]:
    sock, address = raw_push
    with CameraSource(address, image_channel=channel, receive_timeout=5.0) as source:
        sock.send_multipart(parts)
        return source, source.receive()


@pytest.mark.parametrize("name", ["psi_bsread_plain.json", "psi_bsread_bslz4.json"])
def test_camera_source_decodes_psi_fixtures(
    bsread_fixtures: Path, raw_push: tuple[zmq.Socket, str], name: str
) -> None:
    source, frame = _send_and_receive(raw_push, load_parts(bsread_fixtures, name), "image")

    assert frame is not None
    assert frame.pulse_id == 1234 and frame.timestamp == PSI_TIMESTAMP
    np.testing.assert_array_equal(frame.image, expected_image())
    assert frame.image.dtype == np.uint16
    assert source.counters.received == 1 and source.counters.skipped == 0


def test_camera_source_decodes_java_fixture(
    bsread_fixtures: Path, raw_push: tuple[zmq.Socket, str]
) -> None:
    parts = load_parts(bsread_fixtures, "java_style_no_pulse_id.json")
    _, frame = _send_and_receive(raw_push, parts, "data")

    assert frame is not None and frame.pulse_id == 0
    assert frame.timestamp == (1946920, 787198131)  # the global timestamp of the main header
    np.testing.assert_array_equal(frame.image, np.arange(10.0))


def _dispatcher_value(spec: wire.ChannelSpec) -> object:
    if spec.type == "string":
        return "hello"
    count = spec.shape[0] if spec.shape is not None else 1
    return (np.arange(count) % 2 if spec.type == "bool" else np.arange(count) % 100).astype(
        spec.dtype)


def test_camera_source_with_dispatcher_header(
    bsread_fixtures: Path, raw_push: tuple[zmq.Socket, str]
) -> None:
    """A message around the Java dispatcher's compressed data header, 23 channels."""
    meta = json.loads((bsread_fixtures / "java_dispatcher_data_header_bslz4.json").read_text())
    raw_header = (bsread_fixtures / meta["data_header_file"]).read_bytes()
    header = wire.DataHeader.parse(raw_header, wire.BSLZ4)
    stamp = wire.encode_timestamp((1471961318, 233131827))
    parts = [json.dumps(meta["main_header"]).encode(), raw_header]
    for spec in header.channels:
        parts += [bytes(wire.encode_value(spec, _dispatcher_value(spec))), stamp]

    _, frame = _send_and_receive(raw_push, parts, "UInt16Waveform")

    assert frame is not None and frame.pulse_id == 147196131823
    assert frame.timestamp == (1471961318, 233131827)
    np.testing.assert_array_equal(frame.image, (np.arange(2048) % 100).astype(np.uint16))
    _, everything = decode_all(parts)
    assert everything["StringScalar"][0] == "hello"
    scalar = everything["Float64Scalar"][0]
    assert isinstance(scalar, np.ndarray) and scalar.tolist() == [0.0]

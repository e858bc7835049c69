"""Compressed and oversized camera frames against a real IOC process (issue 19, and defect 10
of the "robust against hostile input" issue): compressed frames are processed, a
decompression bomb is refused without the IOC's memory growing, and an image wider than the
spectrum records is refused with a reason instead of being counted as processed.

The camera is this test process (`test_faults.Camera`: a bound raw PUSH socket).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from iochelpers import EPICS_ENV, IocProcess, wait_until
from test_compressed import bomb
from test_faults import CHANNEL, Camera, H, W, _timestamp

from psss_ioc.ioc import pvs
from psss_ioc.streams import bsread_wire as wire

PREFIX = "TST-PSSS-CZ"


def memory_mb(ioc: IocProcess, field: str) -> float:
    status = Path(f"/proc/{ioc.proc.pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith(field)).split()[1]) / 1024


@pytest.fixture
def camera() -> Iterator[Camera]:
    with Camera() as cam:
        yield cam


def send(camera: Camera, image: np.ndarray, compression: str | None, count: int) -> None:
    """`count` frames of `image` at 100 Hz."""
    writer = wire.MessageWriter([wire.ChannelSpec.for_array(CHANNEL, image, compression)])
    value = writer.encode_values([image])
    for _ in range(count):
        camera.pulse_id += 1
        camera.send([bytes(p) for p in writer.encode(camera.pulse_id, _timestamp(), value)])
        time.sleep(0.01)


def test_bombs_and_images_too_wide_are_refused_compressed_frames_processed(
        tmp_path: Path, camera: Camera) -> None:
    ioc = IocProcess(PREFIX, [camera.address, "--output-port", "0", "--no-rest",
                              "--image-channel", CHANNEL, "--auto-start"],
                     {**EPICS_ENV, "XDG_STATE_HOME": str(tmp_path / "state")},
                     tmp_path / "ioc.log")
    try:
        image = camera.camera(H, W).images[0]
        send(camera, image, wire.BSLZ4, 20)
        wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) == 20, 30, what="20 processed")
        assert ioc.get(pvs.STATUS) == "Processing"
        errors = int(ioc.get(pvs.N_ERRORS))

        # a 6 MB message that decompresses to 1 GiB: refused, counted, no memory taken
        peak = memory_mb(ioc, "VmHWM:")
        spec, value = bomb(channel=CHANNEL)
        writer = wire.MessageWriter([spec])
        for _ in range(3):
            camera.pulse_id += 1
            camera.send([bytes(p) for p in writer.encode(camera.pulse_id, _timestamp(),
                                                         [value])])
        send(camera, image, wire.BSLZ4, 10)
        wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) == 30, 30, what="30 processed")
        wait_until(lambda: int(ioc.get(pvs.N_ERRORS)) == errors + 3, 10, what="3 errors")
        assert memory_mb(ioc, "VmHWM:") - peak < 150

        # an image wider than the spectrum records: refused with the reason, not processed
        wide = np.ones((16, pvs.MAX_WIDTH + 1808), np.uint16)
        send(camera, wide, None, 300)  # 3 s: a state once no good frame came for 2 s
        wait_until(lambda: ioc.get(pvs.STATUS) == "Image not usable", 10,
                   what="Image not usable")
        message = ioc.get(pvs.MESSAGE, "-S")
        assert "10000 columns wide" in message and f"{pvs.MAX_WIDTH}" in message, message
        assert int(ioc.get(pvs.N_PROCESSED)) == 30
        assert int(ioc.get(pvs.IMAGE_WIDTH)) == W

        send(camera, image, wire.BSLZ4, 20)
        wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 20, what="Processing again")
        wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) == 50, 10, what="50 processed")
        log = ioc.log()
        assert "unexpected" not in log and "Traceback" not in log, log
    finally:
        assert ioc.stop() == 0, ioc.log()

"""Hostile input against a real IOC process (issue "robust against hostile input"): crafted
camera messages, files that lie about their size or block, autosave files that are broken or
cannot be written. Each test checks the IOC goes on, says what happened, and that SIGTERM ends
it within 5 s.

The camera is this test process (`test_faults.Camera`: bsread messages built with
`bsread_wire`, sent from a bound PUSH socket).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from iochelpers import EPICS_ENV, IocProcess, caget, wait_until
from test_faults import CHANNEL, Camera, _timestamp

from psss_ioc.ioc import pvs
from psss_ioc.streams import bsread_wire as wire

PREFIX = "TST-PSSS-HX"


@pytest.fixture
def camera() -> Iterator[Camera]:
    with Camera() as cam:
        yield cam


def start_ioc(tmp_path: Path, camera: Camera | None = None, *extra: str,
              log: str = "ioc.log") -> IocProcess:
    args = [camera.address if camera else "tcp://127.0.0.1:1", "--output-port", "0",
            "--no-rest", "--image-channel", CHANNEL, "--background-path", str(tmp_path),
            "--autosave-period", "0.5", *extra]
    if camera is not None:
        args.append("--auto-start")
    return IocProcess(PREFIX, args, {**EPICS_ENV, "XDG_STATE_HOME": str(tmp_path / "state")},
                      tmp_path / log)


def stop_within_5_s(ioc: IocProcess) -> None:
    """SIGTERM ends the IOC within 5 s, cleanly."""
    start = time.monotonic()
    ioc.proc.send_signal(signal.SIGTERM)
    code = ioc.proc.wait(15)
    elapsed = time.monotonic() - start
    ioc.stop()
    assert elapsed < 5.0, (elapsed, ioc.log())
    assert code == 0, ioc.log()


def send_pulse(camera: Camera, pulse_id: int) -> None:
    camera.send(camera.good(pulse_id))


def counter(ioc: IocProcess, pv: pvs.PV) -> int:
    return int(ioc.get(pv))


def rss_mb(ioc: IocProcess) -> float:
    status = Path(f"/proc/{ioc.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# ------------------------------------------------------------------------------ pulse ids
def test_pulse_ids_near_2_63_are_jumps_not_lost_frames(tmp_path: Path, camera: Camera) -> None:
    ioc = start_ioc(tmp_path, camera)
    try:
        for pid in range(1001, 1021):
            send_pulse(camera, pid)
            time.sleep(0.01)
        wait_until(lambda: counter(ioc, pvs.PULSE_ID) == 1020, 20, what="pulse 1020")
        errors = counter(ioc, pvs.N_ERRORS)
        for pid in (2**63 - 5, 2**63 - 1, 2**63 + 5, 2**64 + 1):  # the last two: malformed
            send_pulse(camera, pid)
            time.sleep(0.05)
        for pid in range(1021, 1031):
            send_pulse(camera, pid)
            time.sleep(0.01)
        wait_until(lambda: counter(ioc, pvs.PULSE_ID) == 1030, 20, what="back at pulse 1030")
        wait_until(lambda: counter(ioc, pvs.N_ERRORS) >= errors + 4, 10, what="errors counted")
        assert counter(ioc, pvs.N_LOST) < 10  # 3 between the two near 2^63, none else
        assert ioc.get(pvs.STATUS) == "Processing"
        log = ioc.log()
        assert "pulse id jumped" in log and "Traceback" not in log
    finally:
        stop_within_5_s(ioc)


# ------------------------------------------------------------------------------ 64-bit pixels
def test_int64_pixels_whose_sum_overflows_are_refused_not_summed_wrong(
        tmp_path: Path, camera: Camera) -> None:
    ioc = start_ioc(tmp_path, camera)
    try:
        for pid in range(1001, 1006):
            send_pulse(camera, pid)
        wait_until(lambda: counter(ioc, pvs.N_PROCESSED) == 5, 20, what="5 processed")
        image = np.full((256, 64), 2**62, dtype=np.int64)
        writer = wire.MessageWriter([wire.ChannelSpec.for_array(CHANNEL, image)])
        for pid in range(1006, 1306):  # 3 s of them
            camera.send([bytes(p) for p in writer.encode(pid, _timestamp(),
                                                         writer.encode_values([image]))])
            time.sleep(0.01)
        wait_until(lambda: ioc.get(pvs.STATUS) == "Image not usable", 10, what="state")
        assert "overflow" in ioc.get(pvs.MESSAGE, "-S")
        assert counter(ioc, pvs.N_PROCESSED) == 5  # no spectrum of 0 was published
        for pid in range(1306, 1316):
            send_pulse(camera, pid)
        wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 20, what="Processing again")
    finally:
        stop_within_5_s(ioc)


# ------------------------------------------------------------------------------ image shapes
def test_a_new_image_width_every_frame_does_not_grow_memory(tmp_path: Path,
                                                            camera: Camera) -> None:
    ioc = start_ioc(tmp_path, camera)
    try:
        def frames(first: int, n: int) -> None:
            for i in range(n):
                image = np.full((1, 3000 + (first + i) % 5000), 7, dtype=np.uint16)
                writer = wire.MessageWriter([wire.ChannelSpec.for_array(CHANNEL, image)])
                camera.send([bytes(p) for p in writer.encode(
                    2000 + first + i, _timestamp(), writer.encode_values([image]))])

        frames(0, 300)  # warm: the first shapes settle the allocator
        wait_until(lambda: counter(ioc, pvs.PULSE_ID) == 2299, 60, what="first 300")
        before = rss_mb(ioc)
        frames(300, 1500)
        wait_until(lambda: counter(ioc, pvs.PULSE_ID) == 3799, 120, what="1500 more widths")
        grown = rss_mb(ioc) - before
        assert grown < 40, f"RSS grew {grown:.0f} MB over 1500 image widths"
    finally:
        stop_within_5_s(ioc)


# ------------------------------------------------------------------------------ background files
def _lying_npy(path: Path, shape: tuple[int, int]) -> Path:
    """A .npy of a few bytes whose header claims `shape` (uint16)."""
    header = {"descr": "<u2", "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\x00" * 64)
    return path


def _lying_h5(path: Path, shape: tuple[int, int]) -> Path:
    """A small HDF5 file whose compressed /image is `shape` (all fill value)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", shape=shape, dtype="uint16", chunks=(1024, 1024),
                         compression="gzip")
    return path


def test_a_tiny_file_claiming_a_huge_background_is_refused_before_reading(
        tmp_path: Path) -> None:
    files = [_lying_npy(tmp_path / "huge.npy", (200_000, 200_000)),
             _lying_npy(tmp_path / "short.npy", (200, 256)),
             _lying_h5(tmp_path / "huge.h5", (200_000, 200_000))]
    good = tmp_path / "good.npy"
    np.save(good, np.full((200, 256), 3, dtype=np.uint16))
    ioc = start_ioc(tmp_path)
    try:
        assert ioc.put(pvs.BACKGROUND_FILE, str(good), "-S").returncode == 0
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
        for bad in files:
            done = ioc.put(pvs.BACKGROUND_FILE, str(bad), "-S")
            assert done.returncode == 0, done.stderr
            message = ioc.get(pvs.MESSAGE, "-S")
            assert "refused" in message and str(bad) in message, message
            assert ioc.get(pvs.BACKGROUND_STATUS) == "Error"
            assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(good)  # the good one is kept
        assert rss_mb(ioc) < 2000
        time.sleep(1.5)  # two autosave periods: nothing of the refused files is saved
        saved = "".join(p.read_text() for p in (tmp_path / "state").rglob("*.softsav"))
        assert str(good) in saved and "huge" not in saved and "short" not in saved
    finally:
        stop_within_5_s(ioc)


def test_a_fifo_named_as_background_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "swapped.npy"
    os.mkfifo(fifo)
    ioc = start_ioc(tmp_path)
    try:
        start = time.monotonic()
        done = ioc.put(pvs.BACKGROUND_FILE, str(fifo), "-S")
        assert done.returncode == 0 and time.monotonic() - start < 5, done.stderr
        assert "not a regular file" in ioc.get(pvs.MESSAGE, "-S")
        assert ioc.get(pvs.BACKGROUND_FILE, "-S") == ""
        assert ioc.put(pvs.AVG_N, 12).returncode == 0  # the IOC still takes puts
    finally:
        stop_within_5_s(ioc)


def test_a_saved_background_name_that_lies_does_not_stop_the_boot(tmp_path: Path) -> None:
    bad = _lying_npy(tmp_path / "huge.npy", (200_000, 200_000))
    state = tmp_path / "state" / "psss-ioc" / PREFIX
    state.mkdir(parents=True)
    (state / f"{PREFIX}.softsav").write_text(
        f"{PREFIX}:BACKGROUND_FILE: {bad}\n{PREFIX}:AVG_N: 21\n")
    ioc = start_ioc(tmp_path)
    try:
        assert ioc.get(pvs.AVG_N) == "21"
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Error"
        assert ioc.put(pvs.AVG_N, 22).returncode == 0
    finally:
        stop_within_5_s(ioc)


# ------------------------------------------------------------------------------ autosave
@pytest.mark.parametrize("content", [
    "", "{{{ not yaml", "just a string\n",
    # what softioc's autosave wrote for an energy axis, and could not read back itself
    "X:SPECTRUM_X: !!python/object/apply:numpy._core.multiarray._reconstruct\n  args: []\n",
], ids=["empty", "garbage", "scalar", "numpy-object"])
def test_a_bad_autosave_file_boots_with_the_backup_or_defaults(tmp_path: Path,
                                                               content: str) -> None:
    state = tmp_path / "state" / "psss-ioc" / PREFIX
    state.mkdir(parents=True)
    saved = state / f"{PREFIX}.softsav"
    saved.write_text(content)
    with_backup = content == ""
    if with_backup:  # the copy the last good start made
        (state / f"{PREFIX}.softsav.bu").write_text(f"{PREFIX}:AVG_N: 31\n")
    ioc = start_ioc(tmp_path)
    try:
        status = caget(ioc.name(pvs.AUTOSAVE_STATUS), "-a").split()
        if with_backup:
            assert ioc.get(pvs.AVG_N) == "31"
            assert ioc.get(pvs.AUTOSAVE_STATUS) == "From backup" and status[-1] == "MINOR"
        else:
            assert ioc.get(pvs.AVG_N) == "10"
            assert ioc.get(pvs.AUTOSAVE_STATUS) == "Bad file: defaults"
            assert status[-1] == "MAJOR"
        message = ioc.get(pvs.MESSAGE, "-S")
        assert "unusable" in message and str(saved) in message, message
        assert list(state.glob(f"{PREFIX}.softsav.bad-*"))  # kept for a look
        assert ioc.put(pvs.AVG_N, 14).returncode == 0
        wait_until(lambda: "14" in saved.read_text() if saved.exists() else False, 10,
                   what="saved again")
    finally:
        stop_within_5_s(ioc)


def test_a_failing_save_is_shown_rate_limited_and_the_ioc_still_stops(tmp_path: Path) -> None:
    ioc = start_ioc(tmp_path)
    state = tmp_path / "state" / "psss-ioc" / PREFIX
    blocker = state / f"{PREFIX}.softsav.tmp"  # the save's temporary file cannot be created
    try:
        blocker.mkdir(parents=True)
        assert ioc.put(pvs.AVG_N, 15).returncode == 0
        wait_until(lambda: ioc.get(pvs.AUTOSAVE_STATUS) == "Save failing", 10,
                   what="Save failing")
        assert "cannot be saved" in ioc.get(pvs.MESSAGE, "-S")
        time.sleep(3)  # six failing periods: one report
        assert ioc.log().count("cannot be saved") == 1
        blocker.rmdir()
        wait_until(lambda: ioc.get(pvs.AUTOSAVE_STATUS) == "OK", 10, what="saving again")
        blocker.mkdir()  # failing again at the stop: the IOC stops all the same
        assert ioc.put(pvs.AVG_N, 16).returncode == 0
    finally:
        stop_within_5_s(ioc)
    assert "15" in (state / f"{PREFIX}.softsav").read_text()


# ------------------------------------------------------------------------------ prefixes
@pytest.mark.parametrize("prefix", ["A B", "A/B", "", "A.B", "X" * 50])
def test_a_prefix_the_ioc_cannot_serve_is_refused_at_start(prefix: str) -> None:
    from click.testing import CliRunner

    from psss_ioc.cli.commands import legacy_main, run_command

    for command, args in ((run_command, ["--prefix", prefix]),
                          (legacy_main, ["tcp://cam:9000", "-i", prefix])):
        result = CliRunner().invoke(command, [*args, "--no-rest"] if command is run_command
                                    else args)
        assert result.exit_code == 2, result.output
        assert "prefix" in result.output and "Traceback" not in result.output

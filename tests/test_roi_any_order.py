"""The ROI limits in any order (issue "field-ready" 1): each `caput` of SPC_ROI_YMIN or
SPC_ROI_YMAX is taken; the pair in force is the last valid pair; a pair that waits is alarmed.

One IOC fed by the simulated camera; its output stream is read with psi-bsread's Source and
every spectrum after the second put must be the exact int64 sum of the new rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import bsread
import numpy as np
import pytest
from iochelpers import EPICS_ENV, IocProcess, caget, simulator_args, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

PREFIX = "TST-PSSS-ROI"
H, W, SEED, POOL = 200, 256, 11, 8
SPECTRUM = f"{PREFIX}:FPICTURE.spectrum"
PARAMETERS = f"{PREFIX}:FPICTURE.processing_parameters"


class OutputReader:
    """psi-bsread Source on the IOC's output stream, in a thread: (pulse id, roi, spectrum)."""

    def __init__(self, port: int) -> None:
        self.messages: deque[tuple[int, list[int] | None, np.ndarray]] = deque(maxlen=400)
        self._stop = threading.Event()
        self._port = port
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import json

        source = bsread.Source(host="127.0.0.1", port=self._port, mode=bsread.PULL,
                               receive_timeout=200)
        source.connect()
        try:
            while not self._stop.is_set():
                message = source.receive()
                if message is None:
                    continue
                data = message.data.data
                roi = json.loads(data[PARAMETERS].value)["roi"]
                self.messages.append((int(message.data.pulse_id), roi,
                                      np.asarray(data[SPECTRUM].value)))
        finally:
            source.disconnect()

    def after(self, pulse_id: int, n: int = 3) -> list[tuple[int, list[int] | None, np.ndarray]]:
        """`n` messages of frames after `pulse_id` (waits for them)."""
        return wait_until(lambda: [m for m in list(self.messages) if m[0] > pulse_id][:n]
                          if sum(m[0] > pulse_id for m in list(self.messages)) >= n else None,
                          20, what=f"{n} output messages after pulse {pulse_id}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED, pool=POOL))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IocProcess, OutputReader]]:
    workdir: Path = tmp_path_factory.mktemp("roi-order")
    port = free_port()
    with SimulatorProcess(simulator_args(PREFIX, height=H, width=W, seed=SEED, pool=POOL)) as sim:
        ioc = IocProcess(PREFIX, [sim.address, "--output-port", str(port), "--auto-start",
                                  "--no-forward-image", "--no-rest",
                                  "--autosave-dir", str(workdir / "autosave")],
                         EPICS_ENV, workdir / "ioc.log")
        reader = OutputReader(port)
        try:
            wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 60, what="Processing")
            yield ioc, reader
        finally:
            reader.close()
            assert ioc.stop() == 0, ioc.log()
            assert "Traceback" not in ioc.log_path.read_text(errors="replace")


def severity(ioc: IocProcess, pv: pvs.PV) -> str:
    """The alarm severity column of `caget -a` (empty when there is no alarm)."""
    fields = caget(ioc.name(pv), "-a").split()
    return fields[-1] if fields[-1] in ("MINOR", "MAJOR", "INVALID") else "NO_ALARM"


def put(ioc: IocProcess, pv: pvs.PV, value: int) -> None:
    """As an operator types it: the real `caput`, and it exits 0."""
    done = ioc.put(pv, value)
    assert done.returncode == 0, done.stderr


def rbv(ioc: IocProcess) -> tuple[int, int]:
    return int(ioc.get(pvs.ROI_YMIN_RBV)), int(ioc.get(pvs.ROI_YMAX_RBV))


def assert_in_force(ioc: IocProcess, reader: OutputReader, camera: SimulatedCamera,
                    rows: tuple[int, int]) -> None:
    """The readbacks show `rows`, and the frames after now are the exact sum of those rows."""
    assert rbv(ioc) == rows
    after = int(ioc.get(pvs.PULSE_ID)) + 1  # a frame in progress may still use the pair before
    for pulse_id, _, spectrum in reader.after(after):
        image = camera.images[(pulse_id - 1) % POOL]
        expected = image[rows[0]:rows[1]].astype(np.int64).sum(axis=0)
        np.testing.assert_array_equal(spectrum, expected, err_msg=f"pulse {pulse_id} {rows}")


def assert_no_alarm(ioc: IocProcess) -> None:
    assert ioc.get(pvs.ROI_STATUS) == "OK"
    for pv in (pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX, pvs.ROI_STATUS):
        assert severity(ioc, pv) == "NO_ALARM", pv.name


def start_from(ioc: IocProcess, pair: tuple[int, int]) -> None:
    """From the whole image (0, 0) to `pair`, YMIN first: (ymin, 0) is rows [ymin, H)."""
    put(ioc, pvs.SPC_ROI_YMIN, 0)
    put(ioc, pvs.SPC_ROI_YMAX, 0)
    assert rbv(ioc) == (0, H)
    put(ioc, pvs.SPC_ROI_YMIN, pair[0])
    assert rbv(ioc) == (pair[0], H)  # YMAX 0: to the last row
    put(ioc, pvs.SPC_ROI_YMAX, pair[1])


LOW, HIGH = (40, 80), (120, 160)


@pytest.mark.parametrize("first", ["YMIN", "YMAX"])
@pytest.mark.parametrize(("start", "end"), [(LOW, HIGH), (HIGH, LOW)], ids=["up", "down"])
def test_roi_moves_in_any_put_order(rig: tuple[IocProcess, OutputReader],
                                    camera: SimulatedCamera, start: tuple[int, int],
                                    end: tuple[int, int], first: str) -> None:
    ioc, reader = rig
    start_from(ioc, start)
    assert_in_force(ioc, reader, camera, start)
    assert_no_alarm(ioc)
    order = [(pvs.SPC_ROI_YMIN, end[0]), (pvs.SPC_ROI_YMAX, end[1])]
    if first == "YMAX":
        order.reverse()
    (pv1, v1), (pv2, v2) = order
    put(ioc, pv1, v1)
    between = (v1, start[1]) if pv1 is pvs.SPC_ROI_YMIN else (start[0], v1)
    assert (int(ioc.get(pvs.SPC_ROI_YMIN)), int(ioc.get(pvs.SPC_ROI_YMAX))) == between
    if between[0] >= between[1]:  # the pair waits: the one before stays in force, alarmed
        assert ioc.get(pvs.ROI_STATUS) == "Invalid pair"
        for pv in (pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX, pvs.ROI_STATUS):
            assert severity(ioc, pv) == "MAJOR", pv.name
        message = ioc.get(pvs.MESSAGE, "-S")
        assert f"[{between[0]}, {between[1]})" in message and "waits" in message, message
        assert_in_force(ioc, reader, camera, start)
    else:
        assert_in_force(ioc, reader, camera, between)
        assert_no_alarm(ioc)
    put(ioc, pv2, v2)
    assert (int(ioc.get(pvs.SPC_ROI_YMIN)), int(ioc.get(pvs.SPC_ROI_YMAX))) == end
    assert_in_force(ioc, reader, camera, end)
    assert_no_alarm(ioc)


def test_a_pair_never_completed_keeps_the_last_valid_pair(
        rig: tuple[IocProcess, OutputReader], camera: SimulatedCamera) -> None:
    ioc, reader = rig
    start_from(ioc, LOW)
    put(ioc, pvs.SPC_ROI_YMIN, 150)  # the script that should have moved YMAX never does
    time.sleep(1.0)
    assert (int(ioc.get(pvs.SPC_ROI_YMIN)), int(ioc.get(pvs.SPC_ROI_YMAX))) == (150, LOW[1])
    assert ioc.get(pvs.ROI_STATUS) == "Invalid pair"
    assert severity(ioc, pvs.SPC_ROI_YMIN) == "MAJOR"
    assert_in_force(ioc, reader, camera, LOW)
    assert "ymin 150 must be less than ymax 80" in ioc.get(pvs.MESSAGE, "-S")
    # out of range: refused with a reason, nothing changes
    put(ioc, pvs.SPC_ROI_YMAX, 70000)
    assert int(ioc.get(pvs.SPC_ROI_YMAX)) == LOW[1]
    assert "SPC_ROI_YMAX refused" in ioc.get(pvs.MESSAGE, "-S")
    put(ioc, pvs.SPC_ROI_YMIN, 10)  # completed at last
    assert_in_force(ioc, reader, camera, (10, LOW[1]))
    assert_no_alarm(ioc)

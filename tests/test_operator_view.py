"""The operator's view (issue "operator's view"), on a real IOC fed by the simulated camera:
the row profile and the binned image, ROI_SUGGEST, saturated pixels, the energy axis from a
polynomial, and a background taken from the camera, each as an operator drives them (the real
`caput`, a PV Access client, the REST API).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests
from iochelpers import EPICS_ENV, IocProcess, caget, simulator_args, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

PREFIX = "TST-PSSS-VIEW"
H, W, SEED, POOL, SATURATE = 200, 256, 5, 8, 3
DARK_POOL = 5  # with BACKGROUND_N 5: any 5 frames in a row are the whole pool once


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED, pool=POOL,
                                     saturate=SATURATE))


@pytest.fixture(scope="module")
def dark_camera() -> SimulatedCamera:
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED + 1, pool=DARK_POOL,
                                     dark=True))


class Rig:
    def __init__(self, ioc: IocProcess, sim: SimulatorProcess, dark: SimulatorProcess,
                 rest: str) -> None:
        self.ioc, self.sim, self.dark, self.rest = ioc, sim, dark, rest


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir: Path = tmp_path_factory.mktemp("view")
    rest_port = free_port()
    with SimulatorProcess(simulator_args(PREFIX, height=H, width=W, seed=SEED, pool=POOL,
                                         extra=["--saturate", str(SATURATE)])) as sim, \
            SimulatorProcess(simulator_args(PREFIX, height=H, width=W, seed=SEED + 1,
                                            pool=DARK_POOL, extra=["--dark"])) as dark:
        ioc = IocProcess(PREFIX, [sim.address, "--auto-start", "--output-port", "0",
                                  "--rest-port", str(rest_port),
                                  "--autosave-dir", str(workdir / "autosave")],
                         EPICS_ENV, workdir / "ioc.log")
        try:
            wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 60, what="Processing")
            yield Rig(ioc, sim, dark, f"http://127.0.0.1:{rest_port}/")
        finally:
            assert ioc.stop() == 0, ioc.log()
            assert "Traceback" not in ioc.log_path.read_text(errors="replace")


def put(ioc: IocProcess, pv: pvs.PV, value: object) -> None:
    """As an operator types it: the real `caput`, and it exits 0."""
    done = ioc.put(pv, value)
    assert done.returncode == 0, done.stderr


def array(pva, ioc: IocProcess, pv: pvs.PV) -> np.ndarray:
    return np.asarray(pva.get(ioc.name(pv)))


def severity(ioc: IocProcess, pv: pvs.PV) -> str:
    fields = caget(ioc.name(pv), "-a").split()
    return fields[-1] if fields[-1] in ("MINOR", "MAJOR", "INVALID") else "NO_ALARM"


def _signal(image: np.ndarray) -> np.ndarray:
    return np.maximum(image.astype(np.int64), 0)


def _binned(image: np.ndarray, b: int) -> np.ndarray:
    s = _signal(image)
    h, w = s.shape[0] // b, s.shape[1] // b
    return s[: h * b, : w * b].reshape(h, b, w, b).sum(axis=(1, 3))


def test_the_profile_and_the_binned_image_are_those_of_a_frame_sent(rig: Rig, pva,
                                                                    camera: SimulatedCamera
                                                                    ) -> None:
    ioc = rig.ioc
    profiles = [_signal(image).sum(axis=1) for image in camera.images]
    wait_until(lambda: array(pva, ioc, pvs.PROFILE_Y).size == H, 10, what="a profile")
    profile = array(pva, ioc, pvs.PROFILE_Y)
    which = [i for i, p in enumerate(profiles) if np.array_equal(p, profile)]
    assert len(which) == 1, "PROFILE_Y is no frame's exact row sum"
    np.testing.assert_array_equal(array(pva, ioc, pvs.PROFILE_X), np.arange(H))
    assert (ioc.get(pvs.IMAGE_HEIGHT_BINNED), ioc.get(pvs.IMAGE_WIDTH_BINNED)) == ("25", "32")
    image = array(pva, ioc, pvs.IMAGE).reshape(25, 32)
    assert any(np.array_equal(image, _binned(frame, 8)) for frame in camera.images)

    put(ioc, pvs.IMAGE_BIN, 3)  # does not divide 200 x 256: the remainder is cropped
    wait_until(lambda: ioc.get(pvs.IMAGE_WIDTH_BINNED) == "85", 10, what="IMAGE_BIN 3")
    assert ioc.get(pvs.IMAGE_HEIGHT_BINNED) == "66"
    image = array(pva, ioc, pvs.IMAGE).reshape(66, 85)
    assert any(np.array_equal(image, _binned(frame, 3)) for frame in camera.images)
    for bad in (0, 65, 300):
        put(ioc, pvs.IMAGE_BIN, bad)
        assert ioc.get(pvs.IMAGE_BIN) == "3"
        assert "IMAGE_BIN refused" in ioc.get(pvs.MESSAGE, "-S")
    put(ioc, pvs.IMAGE_BIN, 8)


def test_roi_suggest_puts_the_band_inside_the_roi(rig: Rig, camera: SimulatedCamera) -> None:
    ioc = rig.ioc
    put(ioc, pvs.SPC_ROI_YMIN, 0)
    put(ioc, pvs.SPC_ROI_YMAX, 0)
    put(ioc, pvs.ROI_SUGGEST, 1)
    y0, y1 = camera.band
    centre = (y0 + y1) // 2
    rows = wait_until(lambda: (int(ioc.get(pvs.ROI_YMIN_RBV)), int(ioc.get(pvs.ROI_YMAX_RBV)))
                      if ioc.get(pvs.ROI_YMAX_RBV) not in ("0", str(H)) else None, 10,
                      what="a suggested ROI")
    assert rows[0] <= centre - 2 and centre + 2 < rows[1], (rows, camera.band)
    assert rows[1] - rows[0] < H // 2  # the band, not the whole image
    assert "ROI_SUGGEST" in ioc.get(pvs.MESSAGE, "-S")
    put(ioc, pvs.SPC_ROI_YMIN, 0)
    put(ioc, pvs.SPC_ROI_YMAX, 0)


def test_saturated_pixels_are_counted_and_alarmed(rig: Rig) -> None:
    ioc = rig.ioc
    wait_until(lambda: ioc.get(pvs.N_SATURATED) == str(SATURATE), 10,
               what=f"{SATURATE} saturated pixels")
    assert severity(ioc, pvs.N_SATURATED) == "MINOR"  # 3 of 51200 pixels: below 0.1 %
    put(ioc, pvs.SATURATION_LEVEL, 50)  # below the pedestal: every pixel
    wait_until(lambda: ioc.get(pvs.N_SATURATED) == str(H * W), 10, what="all pixels")
    assert severity(ioc, pvs.N_SATURATED) == "MAJOR"
    put(ioc, pvs.SATURATION_LEVEL, 70000)  # no uint16 pixel reaches it: refused
    assert ioc.get(pvs.SATURATION_LEVEL) == "50"
    assert "SATURATION_LEVEL refused" in ioc.get(pvs.MESSAGE, "-S")
    put(ioc, pvs.SATURATION_LEVEL, 0)  # the top of uint16 again
    wait_until(lambda: ioc.get(pvs.N_SATURATED) == str(SATURATE), 10, what="back to 3")


def test_the_energy_axis_from_a_polynomial(rig: Rig, pva) -> None:
    ioc = rig.ioc
    put(ioc, pvs.AXIS_C0, 9000)
    put(ioc, pvs.AXIS_C1, 0.5)
    put(ioc, pvs.AXIS_C2, 0.001)
    put(ioc, pvs.AXIS_MODE, 1)
    x = np.arange(W)
    expected = 9000 + 0.5 * x + 0.001 * x**2
    wait_until(lambda: np.allclose(array(pva, ioc, pvs.SPECTRUM_AXIS), expected, rtol=1e-12),
               10, what="the polynomial axis")
    assert caget(ioc.name(pvs.SPECTRUM_CENTER) + ".EGU") == "eV"
    put(ioc, pvs.AXIS_C2, -0.002)  # turns at column 125: no axis, refused, the last one kept
    assert ioc.get(pvs.AXIS_C2) == "0.001"
    assert "not monotonic" in ioc.get(pvs.MESSAGE, "-S")
    np.testing.assert_allclose(array(pva, ioc, pvs.SPECTRUM_AXIS), expected, rtol=1e-12)
    put(ioc, pvs.AXIS_MODE, 2)
    wait_until(lambda: np.array_equal(array(pva, ioc, pvs.SPECTRUM_AXIS), x), 10,
               what="the column index")
    assert caget(ioc.name(pvs.SPECTRUM_CENTER) + ".EGU") == "px"
    assert caget(ioc.name(pvs.SPECTRUM_AXIS) + ".EGU") == "px"
    put(ioc, pvs.AXIS_MODE, 0)


def _dark_mean(dark_camera: SimulatedCamera) -> np.ndarray:
    mean = np.mean([image.astype(np.float64) for image in dark_camera.images], axis=0)
    return np.rint(mean).astype(np.uint16)


def test_a_background_taken_from_the_camera(rig: Rig, dark_camera: SimulatedCamera) -> None:
    ioc = rig.ioc
    put(ioc, pvs.STOP, 1)
    wait_until(lambda: ioc.get(pvs.STATUS) == "Stopped", 10, what="Stopped")
    put(ioc, pvs.BACKGROUND_ACQUIRE, 1)  # nothing to average: refused, with the reason
    assert "START first" in ioc.get(pvs.MESSAGE, "-S")
    for bad in (0, 10001):
        put(ioc, pvs.BACKGROUND_N, bad)
        assert ioc.get(pvs.BACKGROUND_N) == "100"
    assert ioc.put(pvs.INPUT_STREAM, rig.dark.address, "-S").returncode == 0
    put(ioc, pvs.START, 1)
    wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 20, what="Processing dark")
    put(ioc, pvs.BACKGROUND_N, 10000)
    put(ioc, pvs.BACKGROUND_ACQUIRE, 1)
    put(ioc, pvs.BACKGROUND_ACQUIRE, 1)  # again: cancelled, nothing loaded
    assert "cancelled" in ioc.get(pvs.MESSAGE, "-S")
    assert ioc.get(pvs.BACKGROUND_STATUS) == "None"

    put(ioc, pvs.BACKGROUND_N, DARK_POOL)
    put(ioc, pvs.BACKGROUND_ACQUIRE, 1)
    wait_until(lambda: ioc.get(pvs.BACKGROUND_STATUS) == "Loaded", 20, what="acquired")
    assert float(ioc.get(pvs.BACKGROUND_PROGRESS)) == 100
    path = ioc.get(pvs.BACKGROUND_FILE, "-S")
    with h5py.File(path) as f:
        acquired = f["/image"][()]
    np.testing.assert_array_equal(acquired, _dark_mean(dark_camera))

    # the same over REST: the reply at once, the progress in /statistics
    reply = requests.post(rig.rest + "background/acquire", json={"n": DARK_POOL}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["acquisition"]["n"] == DARK_POOL
    wait_until(lambda: ioc.get(pvs.BACKGROUND_FILE, "-S") != path, 20, what="a second one")
    statistics = requests.get(rig.rest + "statistics", timeout=10).json()["statistics"]
    assert statistics["background_progress"] == 100 and not statistics["background_acquiring"]
    reply = requests.post(rig.rest + "background/acquire", json={"n": 0}, timeout=10)
    assert reply.status_code == 400

    # the image size changes during an acquisition: it ends, the background in force stays
    in_force = ioc.get(pvs.BACKGROUND_FILE, "-S")
    put(ioc, pvs.BACKGROUND_N, 10000)
    put(ioc, pvs.BACKGROUND_ACQUIRE, 1)
    put(ioc, pvs.STOP, 1)
    wait_until(lambda: "processing stopped" in ioc.get(pvs.MESSAGE, "-S"), 10,
               what="acquisition ended by STOP")
    assert ioc.get(pvs.BACKGROUND_FILE, "-S") == in_force
    assert ioc.put(pvs.INPUT_STREAM, rig.sim.address, "-S").returncode == 0
    assert ioc.put(pvs.BACKGROUND_FILE, "", "-S").returncode == 0
    put(ioc, pvs.START, 1)

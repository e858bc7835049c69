"""A real IOC subprocess fed by the real simulated camera, read and written by real clients.

One IOC and one simulator for the whole module (small 200 x 256 frames at 20 Hz).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from iochelpers import EPICS_ENV, IocProcess, caget, caput, simulator_args, wait_until
from p4p.client.thread import Context

from psss_ioc.core.processing import Settings, process
from psss_ioc.ioc import pvs
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

PREFIX = "TST-PSSS-F"
H, W, SEED, POOL = 200, 256, 7, 8


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    """The same frames the simulator streams (same config and seed)."""
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED, pool=POOL))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ioc-functional")


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[SimulatorProcess]:
    args = simulator_args(PREFIX, height=H, width=W, seed=SEED, pool=POOL,
                          extra=["--write-background", str(workdir / "bg.h5")])
    with SimulatorProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def ioc(sim: SimulatorProcess, workdir: Path) -> Iterator[IocProcess]:
    proc = IocProcess(PREFIX, [sim.address, "--output-port", "0", "--auto-start",
                               "--background-path", str(workdir)],
                      EPICS_ENV, workdir / "ioc.log")
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.log()


def processing(ioc: IocProcess) -> None:
    wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 60, what="STATUS Processing")


def message(ioc: IocProcess) -> str:
    return ioc.get(pvs.MESSAGE, "-S")


def snapshot(pva: Context, ioc: IocProcess) -> Any:
    return pva.get(ioc.name(pvs.PVA_GROUP), timeout=5)


def expected_spectrum(camera: SimulatedCamera, pulse_id: int, **settings: Any) -> Any:
    image = camera.images[(pulse_id - 1) % POOL]
    return process(image, Settings(**settings))


def fresh_snapshot(pva: Context, ioc: IocProcess, after: int) -> Any:
    """A PVA group snapshot of a frame processed after pulse id `after`."""
    def newer() -> Any:
        snap = snapshot(pva, ioc)
        return snap if int(snap.pulse_id.value) > after else None

    return wait_until(newer, 10, what="a newer frame")


def assert_snapshot_is_its_frame(snap: Any, camera: SimulatedCamera) -> None:
    """Spectrum, centre and FWHM are process() of the frame the pulse id names, and every
    field carries that frame's own timestamp (TSE=-2): identical to the ns."""
    exp = expected_spectrum(camera, int(snap.pulse_id.value))
    np.testing.assert_array_equal(np.asarray(snap.spectrum.value), exp.spectrum)
    np.testing.assert_allclose(snap.center.value, exp.fit.center, rtol=1e-9)
    np.testing.assert_allclose(snap.fwhm.value, exp.fit.fwhm, rtol=1e-9)
    stamps = {(f.timeStamp.secondsPastEpoch, f.timeStamp.nanoseconds)
              for f in (snap.spectrum, snap.center, snap.fwhm, snap.pulse_id)}
    assert len(stamps) == 1


def test_processing_after_auto_start(ioc: IocProcess) -> None:
    processing(ioc)
    assert ioc.get(pvs.IMAGE_WIDTH) == str(W) and ioc.get(pvs.IMAGE_HEIGHT) == str(H)
    n = int(ioc.get(pvs.N_PROCESSED))
    wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) > n + 5, what="N_PROCESSED grows")
    wait_until(lambda: float(ioc.get(pvs.RATE)) > 5, what="RATE")
    assert int(ioc.get(pvs.N_LOST)) == 0


def test_results_equal_process_on_the_same_frames(ioc: IocProcess, pva: Context,
                                                  camera: SimulatedCamera) -> None:
    processing(ioc)
    for _ in range(3):
        snap = fresh_snapshot(pva, ioc, 0)
        assert_snapshot_is_its_frame(snap, camera)


def test_every_group_update_holds_one_frame(ioc: IocProcess, pva: Context,
                                             camera: SimulatedCamera) -> None:
    """Monitored, not polled: each PVA group update (posted by the frame chain) carries the
    spectrum, centre, FWHM and timestamps of the frame its pulse id names, never a mix."""
    import queue
    import time

    processing(ioc)
    updates: queue.Queue[Any] = queue.Queue()
    sub = pva.monitor(ioc.name(pvs.PVA_GROUP), updates.put, notify_disconnect=True)
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while len(got) < 12 and time.monotonic() < deadline:
            try:
                got.append(updates.get(timeout=1))
            except queue.Empty:
                continue
    finally:
        sub.close()
    assert len(got) >= 12, f"only {len(got)} group updates in 20 s"
    pulses = [int(snap.pulse_id.value) for snap in got[1:]]  # the first is the current value
    assert pulses == sorted(set(pulses)), pulses
    for snap in got[1:]:
        assert_snapshot_is_its_frame(snap, camera)


def test_results_change_frame_by_frame(ioc: IocProcess, pva: Context) -> None:
    processing(ioc)
    first = fresh_snapshot(pva, ioc, 0)
    second = fresh_snapshot(pva, ioc, int(first.pulse_id.value))
    assert int(second.pulse_id.value) > int(first.pulse_id.value)
    assert not np.array_equal(first.spectrum.value, second.spectrum.value)
    # CA clients see the same result records
    center = float(ioc.get(pvs.SPECTRUM_CENTER))
    assert 0 < center < W


def test_stop_and_start(ioc: IocProcess) -> None:
    processing(ioc)
    assert ioc.put(pvs.STOP, 1).returncode == 0
    assert ioc.get(pvs.STATUS) == "Stopped"  # caput -c returned after the state changed
    n = int(ioc.get(pvs.N_PROCESSED))
    pid = int(ioc.get(pvs.PULSE_ID))
    assert ioc.put(pvs.STOP, 1).returncode == 0  # harmless when stopped
    assert int(ioc.get(pvs.PULSE_ID)) == pid
    assert ioc.put(pvs.START, 1).returncode == 0
    assert ioc.get(pvs.STATUS) in ("Waiting for stream", "Processing")
    processing(ioc)
    wait_until(lambda: int(ioc.get(pvs.PULSE_ID)) > pid, what="new pulses after restart")
    assert n >= 0


def test_roi_put_takes_effect(ioc: IocProcess, pva: Context, camera: SimulatedCamera) -> None:
    processing(ioc)
    assert ioc.put(pvs.SPC_ROI_YMAX, 120).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMIN, 80).returncode == 0
    wait_until(lambda: ioc.get(pvs.ROI_YMIN_RBV) == "80" and ioc.get(pvs.ROI_YMAX_RBV) == "120",
               what="ROI in force")
    snap = fresh_snapshot(pva, ioc, int(ioc.get(pvs.PULSE_ID)))
    exp = expected_spectrum(camera, int(snap.pulse_id.value), roi=(80, 120))
    np.testing.assert_array_equal(np.asarray(snap.spectrum.value), exp.spectrum)
    assert ioc.get(pvs.ROI_STATUS) == "OK"


def test_roi_ymin_not_below_ymax_waits_alarmed(ioc: IocProcess) -> None:
    """A limit that makes no pair is taken and waits, alarmed; the last valid pair stays in
    force until the other limit completes a valid pair (issue "field-ready": the old refusal
    left caput exiting 0 with the wrong ROI in force)."""
    ioc.put(pvs.SPC_ROI_YMAX, 120)
    ioc.put(pvs.SPC_ROI_YMIN, 80)
    ioc.put(pvs.SPC_ROI_YMIN, 150)
    assert ioc.get(pvs.SPC_ROI_YMIN) == "150"  # the record takes the value written
    assert "waits" in message(ioc) and "less than ymax" in message(ioc)
    assert ioc.get(pvs.ROI_STATUS) == "Invalid pair"
    assert ioc.get(pvs.SPC_ROI_YMIN, "-a").split()[-1] == "MAJOR"
    wait_until(lambda: ioc.get(pvs.ROI_YMIN_RBV) == "80", what="old ROI still in force")
    ioc.put(pvs.SPC_ROI_YMIN, 80)
    assert ioc.get(pvs.ROI_STATUS) == "OK"
    wait_until(lambda: ioc.get(pvs.ROI_YMAX_RBV) == "120", what="ROI in force")


def test_roi_beyond_image_raises_alarm_and_keeps_last_good(ioc: IocProcess) -> None:
    processing(ioc)
    ioc.put(pvs.SPC_ROI_YMAX, 120)
    ioc.put(pvs.SPC_ROI_YMIN, 80)
    wait_until(lambda: ioc.get(pvs.ROI_YMAX_RBV) == "120", what="ROI in force")
    ioc.put(pvs.SPC_ROI_YMAX, H + 50)
    wait_until(lambda: ioc.get(pvs.ROI_STATUS) == "Outside image", what="ROI alarm")
    assert ioc.get(pvs.ROI_STATUS, "-a").split()[-1] == "MAJOR"
    assert f"image height {H}" in message(ioc)
    pid = int(ioc.get(pvs.PULSE_ID))
    wait_until(lambda: int(ioc.get(pvs.PULSE_ID)) > pid + 2, what="processing goes on")
    assert ioc.get(pvs.ROI_YMAX_RBV) == "120"
    ioc.put(pvs.SPC_ROI_YMAX, 130)
    wait_until(lambda: ioc.get(pvs.ROI_YMAX_RBV) == "130", what="good ROI again")
    assert ioc.get(pvs.ROI_STATUS) == "OK"


def test_background_good_missing_wrong_shape_not_hdf5(
    ioc: IocProcess, pva: Context, camera: SimulatedCamera, workdir: Path
) -> None:
    processing(ioc)
    ioc.put(pvs.SPC_ROI_YMIN, 0)
    ioc.put(pvs.SPC_ROI_YMAX, 0)  # (0, 0): the whole image
    good = workdir / "bg.h5"
    assert ioc.put(pvs.BACKGROUND_FILE, str(good), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    with h5py.File(good) as f:
        dark = f["/image"][()]

    def check_uses_good_background() -> None:
        snap = fresh_snapshot(pva, ioc, int(ioc.get(pvs.PULSE_ID)))
        exp = expected_spectrum(camera, int(snap.pulse_id.value), background=dark)
        np.testing.assert_array_equal(np.asarray(snap.spectrum.value), exp.spectrum)

    wait_until(lambda: ioc.get(pvs.ROI_YMAX_RBV) == str(H), what="whole image")
    check_uses_good_background()

    wrong = workdir / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["/image"] = np.zeros((H - 1, W), dtype=np.uint16)
    not_hdf5 = workdir / "text.h5"
    not_hdf5.write_text("not an HDF5 file")
    cases = [(workdir / "missing.h5", "does not exist"), (wrong, "does not match"),
             (not_hdf5, "not an HDF5 file")]
    for path, reason in cases:
        assert ioc.put(pvs.BACKGROUND_FILE, str(path), "-S").returncode == 0
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Error"
        assert ioc.get(pvs.BACKGROUND_STATUS, "-a").split()[-1] == "MAJOR"
        text = message(ioc)
        assert reason in text and "keeping" in text and str(good) in text
        check_uses_good_background()
    assert ioc.put(pvs.BACKGROUND_FILE, "", "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "None"


def test_axis(ioc: IocProcess, pva: Context) -> None:
    processing(ioc)
    before = ioc.get(pvs.SPECTRUM_X)
    result = ioc.put(pvs.SPECTRUM_X, [float(i) for i in range(10)])
    assert ioc.get(pvs.SPECTRUM_X) == before, result.stdout
    assert "SPECTRUM_X refused" in message(ioc) and f"{W} columns" in message(ioc)
    axis = list(np.linspace(9000.0, 9255.0, W))
    assert ioc.put(pvs.SPECTRUM_X, axis).returncode == 0
    wait_until(lambda: abs(float(ioc.get(pvs.SPECTRUM_CENTER)) - 9000) < 300,
               what="centre in eV")
    got = np.asarray(pva.get(ioc.name(pvs.SPECTRUM_AXIS), timeout=5))
    np.testing.assert_allclose(got, axis)
    assert ioc.put(pvs.SPECTRUM_X, [1.0] * W).returncode == 0  # right length, not monotonic
    assert "increasing" in message(ioc)
    np.testing.assert_allclose(np.asarray(pva.get(ioc.name(pvs.SPECTRUM_X), timeout=5)), axis)
    ioc.put(pvs.SPECTRUM_X, [])  # empty: column index again
    wait_until(lambda: float(ioc.get(pvs.SPECTRUM_CENTER)) < W, what="column index again")


def test_fit_enable(ioc: IocProcess) -> None:
    processing(ioc)
    ioc.put(pvs.FIT_ENABLE, 0)
    wait_until(lambda: ioc.get(pvs.FIT_STATUS) == "Disabled", what="fit disabled")
    # no fit: the fitted values say they are not valid, the fitted curve is empty
    wait_until(lambda: "INVALID" in ioc.get(pvs.SPECTRUM_CENTER, "-a"), what="centre INVALID")
    assert caget(ioc.name(pvs.SPECTRUM_FIT) + ".NORD") == "0"
    assert float(ioc.get(pvs.SPECTRUM_COM)) > 0  # moments are still computed
    ioc.put(pvs.FIT_ENABLE, 1)
    wait_until(lambda: ioc.get(pvs.FIT_STATUS) == "OK", what="fit OK")
    wait_until(lambda: "INVALID" not in ioc.get(pvs.SPECTRUM_CENTER, "-a"), what="centre valid")
    wait_until(lambda: caget(ioc.name(pvs.SPECTRUM_FIT) + ".NORD") == str(W), what="curve")


def test_avg_n_and_average(ioc: IocProcess, pva: Context) -> None:
    processing(ioc)
    ioc.put(pvs.AVG_N, 0)
    assert ioc.get(pvs.AVG_N) != "0"
    assert ioc.put(pvs.AVG_N, 4).returncode == 0
    avg = np.asarray(pva.get(ioc.name(pvs.SPECTRUM_AVG_Y), timeout=5))
    assert avg.shape == (W,) and avg.sum() > 0
    assert float(ioc.get(pvs.SPECTRUM_AVG_FWHM)) > 0


def test_results_and_statistics_refuse_client_puts(ioc: IocProcess, pva: Context) -> None:
    processing(ioc)
    for pv in (pvs.SPECTRUM_CENTER, pvs.PULSE_ID, pvs.N_PROCESSED):
        put = caput(ioc.name(pv), 5)  # caput reports the refusal but exits 0
        # refused by access security (group RESULTS has no write rule), DISP=1 behind it
        assert "Write access denied" in put.stdout + put.stderr, put
        with pytest.raises(Exception, match=r"(?i)disabled|failed|error"):
            pva.put(ioc.name(pv), 5, timeout=5)
    # ... and the IOC still writes them
    first = int(ioc.get(pvs.PULSE_ID))
    wait_until(lambda: int(ioc.get(pvs.PULSE_ID)) > first, what="results still published")
    assert int(ioc.get(pvs.N_PROCESSED)) > 5


def test_iocstats_and_sysreset_locked(ioc: IocProcess) -> None:
    assert int(caget(ioc.name(pvs.IOC_STATS) + ":HEARTBEAT")) > 0
    assert caget(ioc.name(pvs.IOC_STATS) + ":SYSRESET.ASG") == pvs.LOCKED_ASG


def test_pva_serves_the_records(ioc: IocProcess, pva: Context) -> None:
    processing(ioc)
    value = pva.get(ioc.name(pvs.SPECTRUM_FWHM), timeout=5)
    assert float(value) > 0
    assert pva.get(ioc.name(pvs.STATUS), timeout=5).raw.value.index == 2

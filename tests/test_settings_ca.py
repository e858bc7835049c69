"""Settings through Channel Access against one live IOC with the simulated camera (issue 7).

Every writable setting is validated when it is put, and whatever the puts (valid or not, from
one client or from two at once), the settings in force always fit the frames and agree with
what the records show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import epics
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from iochelpers import EPICS_ENV, IocProcess, simulator_args, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.streams.simulate import SimulatorProcess

PREFIX = "TST-PSSS-S"
# The real camera's width; fewer rows to spare the CPU. The float64 background (10 MB) makes
# every ROI put copy a frame-sized array, as in production, which is where the ROI race showed.
H, W = 512, 2560
RATE = 20.0


@dataclass
class Rig:
    ioc: IocProcess
    sim: SimulatorProcess
    bgdir: Path
    background: Path  # float64 .npy of the image shape


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("settings")
    bgdir = workdir / "backgrounds"
    bgdir.mkdir()
    background = bgdir / "dark.npy"
    np.save(background, np.full((H, W), 100.0))
    with SimulatorProcess(simulator_args(PREFIX, height=H, width=W, rate=RATE, pool=4)) as sim:
        ioc = IocProcess(PREFIX, [sim.address, "--output-port", "0", "--no-rest",
                                  "--auto-start", "--background-path", str(bgdir)],
                         EPICS_ENV, workdir / "ioc.log")
        try:
            wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 60, what="Processing")
            yield Rig(ioc, sim, bgdir, background)
        finally:
            code = ioc.stop()
            log = ioc.log_path.read_text(errors="replace")
            assert code == 0, log[-5000:]
            assert "Traceback" not in log, log[-5000:]


def roi_records(ioc: IocProcess) -> tuple[int, int]:
    return int(ioc.get(pvs.SPC_ROI_YMIN)), int(ioc.get(pvs.SPC_ROI_YMAX))


def roi_rbv(ioc: IocProcess) -> tuple[int, int]:
    return int(ioc.get(pvs.ROI_YMIN_RBV)), int(ioc.get(pvs.ROI_YMAX_RBV))


def next_frames(ioc: IocProcess, n: int = 2) -> None:
    """Wait until `n` more frames were processed (so that the ROI readbacks are current)."""
    start = int(ioc.get(pvs.N_PROCESSED))
    wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) >= start + n, 10, period=0.02,
               what=f"{n} more frames")


# ------------------------------------------------------------------------------ ROI race
# One CA client per process (one circuit each, so the IOC serves them in two threads); each
# puts its value when told, at the same wall-clock instant as the other.
PUT_ON_CUE = r"""
import sys, time
import epics
name, value = sys.argv[1], int(sys.argv[2])
pv = epics.PV(name)
assert pv.wait_for_connection(timeout=20), name
print("ready", flush=True)
for line in sys.stdin:
    at = float(line)
    while time.time() < at:
        pass
    pv.put(value, wait=True, timeout=10)
    print("done", flush=True)
"""


def test_simultaneous_roi_puts_from_two_clients_never_put_an_unwritten_pair_in_force(
        rig: Rig) -> None:
    """Two clients put YMIN=300 and YMAX=200 at the same instant, from ROI [100, 400): either
    put alone is valid, both together are not. Both are taken (each limit takes what is
    written), the pair they make waits alarmed, and the ROI used for the frames is the valid
    pair the first of them made, never one nobody wrote, every round."""
    ioc = rig.ioc
    assert ioc.put(pvs.BACKGROUND_FILE, str(rig.background), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded", ioc.get(pvs.MESSAGE, "-S")
    low, high = (100, 400), (300, 200)  # (ymin, ymax) before, and the two values put
    env = {**os.environ, **EPICS_ENV}
    clients = [subprocess.Popen([sys.executable, "-c", PUT_ON_CUE, ioc.name(pv), str(v)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env)
               for pv, v in ((pvs.SPC_ROI_YMIN, high[0]), (pvs.SPC_ROI_YMAX, high[1]))]
    outcomes: dict[tuple[int, int], int] = {}
    ymin, ymax = (epics.PV(ioc.name(pv)) for pv in (pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX))
    try:
        assert ymin.wait_for_connection(20) and ymax.wait_for_connection(20)
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        for rounds in range(1, 41):
            # back to [100, 400): from (300, 200), YMAX first keeps every pair valid
            ymax.put(low[1], wait=True, timeout=10)
            ymin.put(low[0], wait=True, timeout=10)
            assert (ymin.get(use_monitor=False), ymax.get(use_monitor=False)) == low
            at = time.time() + 0.02
            for c in clients:
                assert c.stdin is not None
                c.stdin.write(f"{at}\n")
                c.stdin.flush()
            for c in clients:
                assert c.stdout is not None and c.stdout.readline().strip() == "done"
            pair = (ymin.get(use_monitor=False), ymax.get(use_monitor=False))
            assert pair == high, (rounds, pair)
            assert ioc.get(pvs.ROI_STATUS) == "Invalid pair"
            in_force = roi_rbv(ioc)
            outcomes[in_force] = outcomes.get(in_force, 0) + 1
            assert in_force in ((300, 400), (100, 200)), (rounds, in_force, outcomes)
            if rounds % 10 == 0:  # the frames use the pair the readbacks show
                next_frames(ioc)
                assert roi_rbv(ioc) == in_force, (rounds, in_force, outcomes)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(5)
    assert ioc.proc.poll() is None
    assert ioc.put(pvs.BACKGROUND_FILE, "", "-S").returncode == 0


# ------------------------------------------------------------------------------ property test
HIGH_ROI = int(pvs.SPC_ROI_YMAX.high or 0)


def in_range(value: float, pv: pvs.PV) -> bool:
    """Whether a writable record takes a put: out of its range it is refused, not clamped."""
    return bool((pv.low or 0) <= value <= (pv.high or np.inf))


@dataclass
class Model:
    """What the records must show, and what the frames must be processed with."""

    ymin: int
    ymax: int
    roi_in_force: tuple[int, int]
    axis: np.ndarray | None
    background: str
    background_status: str
    avg_n: int
    fit: int
    snr: float

    def fits(self, ymin: int, ymax: int) -> bool:
        return ymin < (ymax or H) <= H

    def is_pair(self) -> bool:
        return self.ymax == 0 or self.ymin < self.ymax

    def requested_rows(self) -> tuple[int, int]:
        return self.ymin, self.ymax or H


class Client:
    """pyepics channels to the settings (numbers, arrays) and the EPICS base binaries for
    strings (odd characters go through as the bytes a user types)."""

    def __init__(self, ioc: IocProcess) -> None:
        self.ioc = ioc
        self.pvs: dict[str, epics.PV] = {}

    def pv(self, pv: pvs.PV) -> epics.PV:
        if pv.name not in self.pvs:
            channel = epics.PV(self.ioc.name(pv))
            assert channel.wait_for_connection(20), pv.name
            self.pvs[pv.name] = channel
        return self.pvs[pv.name]

    def get(self, pv: pvs.PV, **kw: object) -> object:
        value = self.pv(pv).get(use_monitor=False, timeout=5, **kw)
        assert value is not None, f"no answer from {pv.name}"
        return value

    def put(self, pv: pvs.PV, value: object) -> None:
        assert self.pv(pv).put(value, wait=True, timeout=10) == 1, (pv.name, value)


def read_model(client: Client) -> Model:
    axis = np.asarray(client.get(pvs.SPECTRUM_X), dtype=np.float64)
    return Model(
        ymin=int(client.get(pvs.SPC_ROI_YMIN)), ymax=int(client.get(pvs.SPC_ROI_YMAX)),
        roi_in_force=(int(client.get(pvs.ROI_YMIN_RBV)), int(client.get(pvs.ROI_YMAX_RBV))),
        axis=axis if axis.size else None,
        background=client.ioc.get(pvs.BACKGROUND_FILE, "-S"),
        background_status=str(client.get(pvs.BACKGROUND_STATUS, as_string=True)),
        avg_n=int(client.get(pvs.AVG_N)), fit=int(client.get(pvs.FIT_ENABLE)),
        snr=float(client.get(pvs.FIT_MIN_SNR)))


AXES: dict[str, np.ndarray] = {
    "increasing": np.linspace(9000.0, 9100.0, W),
    "decreasing": np.linspace(9100.0, 9000.0, W),
    "empty": np.zeros(0),
    "short": np.linspace(9000.0, 9100.0, W - 1),
    "long": np.linspace(9000.0, 9100.0, W + 1),
    "single": np.array([9000.0]),
    "nan": np.where(np.arange(W) == W // 2, np.nan, np.linspace(9000.0, 9100.0, W)),
    "infinite": np.where(np.arange(W) == 0, -np.inf, np.linspace(9000.0, 9100.0, W)),
    "flat": np.full(W, 9000.0),
    "zigzag": np.linspace(9000.0, 9100.0, W) + np.where(np.arange(W) % 2, 1.0, 0.0),
}


def axis_ok(axis: np.ndarray) -> bool:
    if axis.size == 0:
        return True
    steps = np.diff(axis)
    return (axis.size == W and bool(np.isfinite(axis).all())
            and bool((steps > 0).all() or (steps < 0).all()))


def background_files(bgdir: Path) -> dict[str, tuple[str, bool | None]]:
    """Names put to BACKGROUND_FILE: name -> (the string put, whether it is taken; None: the
    put never reaches the record)."""
    files = bgdir / "odd"
    if not files.exists():
        files.mkdir()
        np.save(files / "wrong_shape.npy", np.zeros((H - 1, W)))
        np.save(files / "one_d.npy", np.zeros(W))
        np.save(files / "nan.npy", np.full((H, W), np.nan))
        (files / "garbage.npy").write_bytes(b"\x93NUMPY garbage" * 10)
        (files / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage" * 10)
        np.save(files / "dark ünï code.npy", np.full((H, W), 90.0))
    return {
        "good": (str(bgdir / "dark.npy"), True),
        "unicode": (str(files / "dark ünï code.npy"), True),
        "clear": ("", True),
        "missing": (str(files / "missing.npy"), False),
        "wrong_shape": (str(files / "wrong_shape.npy"), False),
        "one_d": (str(files / "one_d.npy"), False),
        "nan": (str(files / "nan.npy"), False),
        "garbage_npy": (str(files / "garbage.npy"), False),
        "garbage_h5": (str(files / "garbage.h5"), False),
        "directory": (str(files), False),
        "relative": ("dark.npy", False),
        "outside": ("/etc/passwd", False),
        "dotdot": (f"{files}/../../dark.npy", False),
        "long": ("/" + "x" * 1500, None),  # longer than the record: CA refuses the put
    }


ROWS = st.one_of(st.integers(0, H + 10), st.sampled_from([-1, HIGH_ROI + 1, 2**31 - 1]))
STEPS = st.one_of(
    st.tuples(st.just("ymin"), ROWS),
    st.tuples(st.just("ymax"), ROWS),
    st.tuples(st.just("axis"), st.sampled_from(sorted(AXES))),
    st.tuples(st.just("background"), st.sampled_from(
        ["good", "unicode", "clear", "missing", "wrong_shape", "one_d", "nan", "garbage_npy",
         "garbage_h5", "directory", "relative", "outside", "dotdot", "long"])),
    st.tuples(st.just("avg_n"), st.integers(-3, 12000)),
    st.tuples(st.just("fit"), st.integers(0, 1)),
    st.tuples(st.just("snr"), st.one_of(st.floats(-5.0, 50.0), st.sampled_from(
        [float("nan"), float("inf"), float("-inf"), 2e6]))),
    st.tuples(st.just("mode"), st.integers(0, 3)),
    st.tuples(st.just("stream"), st.sampled_from(
        ["", "not an address", "tcp://127.0.0.1:1", "tcp://256.0.0.1:5", "ipc:///nonexistent"])),
)


def apply_step(rig: Rig, client: Client, model: Model, step: tuple[str, object]) -> None:
    """Put one setting; update the model with what the IOC must make of it."""
    what, value = step
    ioc = rig.ioc
    if what in ("ymin", "ymax"):
        pv = pvs.SPC_ROI_YMIN if what == "ymin" else pvs.SPC_ROI_YMAX
        client.put(pv, value)
        if in_range(int(value), pv):  # type: ignore[call-overload]
            setattr(model, what, int(value))  # type: ignore[call-overload]
            if model.is_pair() and model.fits(model.ymin, model.ymax):
                model.roi_in_force = model.requested_rows()
    elif what == "axis":
        axis = AXES[str(value)]
        client.put(pvs.SPECTRUM_X, axis)
        if axis_ok(axis):
            model.axis = axis if axis.size else None
    elif what == "background":
        text, ok = background_files(rig.bgdir)[str(value)]
        assert ioc.put(pvs.BACKGROUND_FILE, text, "-S").returncode == 0
        if ok is None:
            pass
        elif ok:
            model.background = text
            model.background_status = "Loaded" if text else "None"
        else:
            model.background_status = "Error"
    elif what == "avg_n":
        client.put(pvs.AVG_N, value)
        if in_range(int(value), pvs.AVG_N):  # type: ignore[call-overload]
            model.avg_n = int(value)  # type: ignore[call-overload]
    elif what == "fit":
        client.put(pvs.FIT_ENABLE, value)
        model.fit = int(value)  # type: ignore[call-overload]
    elif what == "snr":
        client.put(pvs.FIT_MIN_SNR, value)
        if in_range(float(value), pvs.FIT_MIN_SNR):  # type: ignore[arg-type]
            model.snr = float(value)  # type: ignore[arg-type]
    elif what == "mode":
        client.put(pvs.INPUT_MODE, value)
        if value not in (0, 1):  # an mbbo takes 0..15; only PULL (0) and SUB (1) exist
            assert int(client.get(pvs.INPUT_MODE)) == 0
            assert "INPUT_MODE refused" in ioc.get(pvs.MESSAGE, "-S")
        # SUB cannot talk to the simulator's PUSH: back to PULL, processing must go on
        client.put(pvs.INPUT_MODE, 0)
    elif what == "stream":
        # a malformed address is refused (the record and the stream stay), a well-formed one
        # is taken: nothing arrives from there, then back to the simulator
        assert ioc.put(pvs.INPUT_STREAM, value, "-S").returncode == 0
        taken = value == "" or str(value).startswith("tcp://")
        assert ioc.get(pvs.INPUT_STREAM, "-S") == (value if taken else rig.sim.address)
        if taken:
            wait_until(lambda: client.get(pvs.STATUS) != 2, 10, period=0.02,
                       what=f"not processing from {value!r}")
            assert ioc.put(pvs.INPUT_STREAM, rig.sim.address, "-S").returncode == 0
        else:
            assert "INPUT_STREAM refused" in ioc.get(pvs.MESSAGE, "-S")
    else:  # pragma: no cover
        raise AssertionError(what)


def check(rig: Rig, client: Client, model: Model, done: list[tuple[str, object]]) -> None:
    """The IOC is alive and clean, the records show the model, the frames use it."""
    ioc = rig.ioc
    assert ioc.proc.poll() is None, ioc.log()
    log = ioc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]

    def read_records() -> Model:
        axis = np.asarray(client.get(pvs.SPECTRUM_X), dtype=np.float64)
        return Model(
            ymin=int(client.get(pvs.SPC_ROI_YMIN)), ymax=int(client.get(pvs.SPC_ROI_YMAX)),
            roi_in_force=model.roi_in_force, axis=axis if axis.size else None,
            background=ioc.get(pvs.BACKGROUND_FILE, "-S"),
            background_status=str(client.get(pvs.BACKGROUND_STATUS, as_string=True)),
            avg_n=int(client.get(pvs.AVG_N)), fit=int(client.get(pvs.FIT_ENABLE)),
            snr=float(client.get(pvs.FIT_MIN_SNR)))

    def same_axis(records: Model) -> bool:
        if model.axis is None or records.axis is None:
            return model.axis is None and records.axis is None
        return bool(np.array_equal(records.axis, model.axis))

    # A status set by an on_update callback (asyncio thread) may land a moment after the put
    # completed; a wrong value stays wrong, so allow a short settling time, then compare.
    records = read_records()
    deadline = time.monotonic() + 3.0
    while not (same_axis(records) and records.background_status == model.background_status) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        records = read_records()
    assert (records.ymin, records.ymax) == (model.ymin, model.ymax), done
    if model.axis is None:
        assert records.axis is None, done
    else:
        np.testing.assert_array_equal(records.axis, model.axis, err_msg=str(done))
    assert records.background == model.background, done
    assert records.background_status == model.background_status, done
    assert (records.avg_n, records.fit) == (model.avg_n, model.fit), done
    assert records.snr == pytest.approx(model.snr), done
    # the frames: wait until two more were processed with these settings
    wait_until(lambda: client.get(pvs.STATUS) == 2, 10, period=0.02, what="Processing")
    start = int(client.get(pvs.N_PROCESSED))
    wait_until(lambda: int(client.get(pvs.N_PROCESSED)) >= start + 2, 10, period=0.02,
               what="2 more frames")
    assert (int(client.get(pvs.IMAGE_HEIGHT)), int(client.get(pvs.IMAGE_WIDTH))) == (H, W)
    rbv = (int(client.get(pvs.ROI_YMIN_RBV)), int(client.get(pvs.ROI_YMAX_RBV)))
    assert 0 <= rbv[0] < rbv[1] <= H, (rbv, done)
    assert rbv == model.roi_in_force, (rbv, model, done)
    roi_status = str(client.get(pvs.ROI_STATUS, as_string=True))
    assert roi_status == ("Invalid pair" if not model.is_pair()
                          else "OK" if model.fits(model.ymin, model.ymax)
                          else "Outside image"), done
    assert str(client.get(pvs.AXIS_STATUS, as_string=True)) == "OK", done
    spectrum_axis = np.asarray(client.get(pvs.SPECTRUM_AXIS), dtype=np.float64)
    expected_axis = model.axis if model.axis is not None else np.arange(W, dtype=np.float64)
    np.testing.assert_array_equal(spectrum_axis, expected_axis, err_msg=str(done))
    assert np.asarray(client.get(pvs.SPECTRUM_Y)).size == W, done


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),  # no shrinking against a live IOC
          suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEPS, min_size=1, max_size=6))
def test_any_sequence_of_puts_leaves_valid_settings_in_force(
        rig: Rig, steps: list[tuple[str, object]]) -> None:
    """Random sequences of valid and invalid puts to every writable setting, into one live IOC
    with the simulated camera running: after each, the IOC is alive with no traceback, a
    refused put left the record as it was (a number out of range is refused, not clamped; a
    ROI limit is taken and an invalid pair waits; a refused file name is put
    back to the file in force), and the frames are processed with settings that fit them."""
    client = Client(rig.ioc)
    model = read_model(client)
    done: list[tuple[str, object]] = []
    for step in steps:
        done.append(step)
        apply_step(rig, client, model, step)
        check(rig, client, model, done)

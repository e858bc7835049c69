"""The ROI pair rule on its own (control.RoiControl), without an IOC."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from psss_ioc.core.processing import FrameMismatchError, Settings, process
from psss_ioc.ioc.control import RoiControl, RoiOutcome, roi_pair_problem


class Recorder:
    def __init__(self) -> None:
        self.applied: list[tuple[int, int] | None] = []
        self.shown: list[RoiOutcome] = []

    def control(self) -> RoiControl:
        return RoiControl(self.applied.append, self.shown.append)


@pytest.mark.parametrize(("start", "end", "first"), [
    ((40, 80), (120, 160), "ymin"), ((40, 80), (120, 160), "ymax"),
    ((120, 160), (40, 80), "ymin"), ((120, 160), (40, 80), "ymax")])
def test_limits_in_any_order_end_in_force(start: tuple[int, int], end: tuple[int, int],
                                          first: str) -> None:
    rec = Recorder()
    roi = rec.control()
    roi.write(*start)
    limits = {"ymin": end[0], "ymax": end[1]}
    second = "ymax" if first == "ymin" else "ymin"
    middle = roi.write(**{first: limits[first]})
    if middle.waiting:  # the pair before stays in force, nothing applied
        assert middle.in_force == start and rec.applied[-1] == start
        assert "waits" in middle.message() and "less than ymax" in middle.message()
    outcome = roi.write(**{second: limits[second]})
    assert not outcome.waiting and outcome.in_force == end == rec.applied[-1]
    assert roi.written == end


def test_whole_image_and_to_the_last_row() -> None:
    rec = Recorder()
    roi = rec.control()
    assert roi.write(ymin=900).in_force == (900, 0)  # from (0, 0): rows [900, H)
    assert rec.applied == [(900, 0)]
    assert roi.write(ymin=0).in_force == (0, 0) and rec.applied[-1] is None  # whole image
    assert roi_pair_problem((900, 0)) is None and roi_pair_problem((5, 5)) is not None


@pytest.mark.parametrize("bad", [-1, 65536, 2**31, 1.5, True, "10"])
def test_out_of_range_is_refused_and_changes_nothing(bad: object) -> None:
    rec = Recorder()
    roi = rec.control()
    roi.write(10, 20)
    with pytest.raises(ValueError):
        roi.write(ymax=bad)  # type: ignore[arg-type]
    assert roi.written == roi.in_force == (10, 20) and len(rec.shown) == 1


def test_concurrent_writers_never_put_an_unwritten_pair_in_force() -> None:
    """Two threads write the limits of two different pairs as fast as they can; every pair
    ever put in force is made of values somebody wrote, and it is valid."""
    rec = Recorder()
    roi = rec.control()
    roi.write(100, 400)

    def hammer(limit: str, values: tuple[int, ...]) -> None:
        for i in range(3000):
            roi.write(**{limit: values[i % len(values)]})

    threads = [threading.Thread(target=hammer, args=("ymin", (100, 300, 50))),
               threading.Thread(target=hammer, args=("ymax", (400, 200, 60)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for pair in rec.applied:
        assert pair is not None and pair[0] in (100, 300, 50) and pair[1] in (400, 200, 60)
        assert roi_pair_problem(pair) is None
    shown = rec.shown[-1]
    assert shown.written == roi.written and shown.in_force == roi.in_force == rec.applied[-1]


def test_settings_with_ymax_zero_sum_to_the_last_row() -> None:
    image = np.arange(12 * 5, dtype=np.uint16).reshape(12, 5)
    result = process(image, Settings(roi=(7, 0), fit_enabled=False))
    np.testing.assert_array_equal(result.spectrum, image[7:].astype(np.int64).sum(axis=0))
    assert result.roi == (7, 12)
    with pytest.raises(FrameMismatchError, match="from 12"):
        Settings(roi=(12, 0)).check_frame((12, 5))
    with pytest.raises(ValueError):
        Settings(roi=(5, 5))


# ------------------------------------------------------------------ the control layer
class FakeView:
    """The records as the control layer shows them."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.alarmed: dict[str, bool] = {}
        self.status: dict[str, int] = {}
        self.rows: tuple[int, int] | None = None
        self.messages: list[tuple[str, bool]] = []

    def show_value(self, pv, value, alarmed=False) -> None:
        self.values[pv.name] = value
        self.alarmed[pv.name] = alarmed

    def show_status(self, pv, state: int) -> None:
        self.status[pv.name] = state

    def show_roi_rows(self, rows) -> None:
        self.rows = rows

    def message(self, text: str, error: bool = False) -> None:
        self.messages.append((text, error))

    def show_reading(self, pv, value) -> None:
        self.values[pv.name] = value

    def show_units(self, unit: str) -> None:
        self.values["units"] = unit


def _control(tmp_path, shape=(100, 64)):
    from psss_ioc.ioc.control import Control
    from psss_ioc.ioc.parameters import LegacyParameters
    from psss_ioc.pipeline.worker import Pipeline

    pipeline = Pipeline(lambda address, mode: None)
    if shape is not None:
        pipeline._note_shape(shape, np.dtype(np.uint16))  # as the first frame of that size does
    view = FakeView()
    control = Control(pipeline, view, lambda: (tmp_path,), LegacyParameters(lambda pv: 0))
    return control, pipeline, view


def test_the_control_layer_decides_the_status_records(tmp_path) -> None:
    from psss_ioc.core.processing import Mismatch
    from psss_ioc.ioc import pvs
    from psss_ioc.ioc.pvs import SettingState

    control, pipeline, view = _control(tmp_path)
    control.write_roi(10, 40)
    assert pipeline.settings.roi == (10, 40) and view.rows == (10, 40)
    assert view.status[pvs.ROI_STATUS.name] == SettingState.OK
    control.frame_fit(Mismatch.ROI, "ROI rows [10, 40) exceed the image height 30")
    assert view.status[pvs.ROI_STATUS.name] == SettingState.INVALID
    control.write_roi(ymin=50)  # no pair: waits, and that wins over the frames' fit
    assert view.status[pvs.ROI_STATUS.name] == SettingState.PAIR_INVALID
    assert view.alarmed[pvs.SPC_ROI_YMIN.name] and pipeline.settings.roi == (10, 40)
    control.write_roi(ymax=60)
    assert pipeline.settings.roi == (50, 60)
    assert view.status[pvs.ROI_STATUS.name] == SettingState.OK
    assert not view.alarmed[pvs.SPC_ROI_YMIN.name]


def test_a_rest_pair_that_does_not_fit_the_frames_is_refused_up_front(tmp_path) -> None:
    from psss_ioc.ioc.control import Refused

    control, pipeline, _ = _control(tmp_path)
    for pair, reason in (((50, 20), "less than"), ((10, 101), "exceed the image height"),
                         ((0, 70000), "0..65535")):
        with pytest.raises(Refused, match=reason):
            control.check_roi_pair(pair)
    control.check_roi_pair((10, 100))
    assert pipeline.settings.roi is None  # checking changes nothing


def test_axis_written_is_checked_then_applied_and_shown(tmp_path) -> None:
    from psss_ioc.ioc import pvs
    from psss_ioc.ioc.control import Refused

    control, pipeline, view = _control(tmp_path)
    with pytest.raises(Refused, match="63 values but the image has 64 columns"):
        control.set_axis(np.arange(63.0))
    with pytest.raises(Refused, match="strictly"):
        control.set_axis(np.full(64, 9000.0))
    assert pipeline.settings.axis is None and pvs.SPECTRUM_X.name not in view.values
    control.set_axis(np.linspace(9000, 9100, 64))
    assert pipeline.settings.axis is not None
    np.testing.assert_array_equal(view.values[pvs.SPECTRUM_X.name], pipeline.settings.axis)
    control.set_axis(np.zeros(0))  # empty: the column index again
    assert pipeline.settings.axis is None and view.values[pvs.SPECTRUM_X.name].size == 0


def test_a_refused_background_keeps_the_one_in_force(tmp_path) -> None:
    from psss_ioc.core import background
    from psss_ioc.ioc import pvs
    from psss_ioc.ioc.control import Refused
    from psss_ioc.ioc.pvs import BackgroundState

    control, pipeline, view = _control(tmp_path)
    good = background.save(tmp_path / "good.h5", np.full((100, 64), 3, np.uint16))
    wrong = background.save(tmp_path / "wrong.h5", np.full((90, 64), 3, np.uint16))
    control.set_background(str(good))
    assert pipeline.settings.background_name == str(good)
    assert view.status[pvs.BACKGROUND_STATUS.name] == BackgroundState.LOADED
    with pytest.raises(Refused, match="shape"):
        control.set_background(str(wrong))
    assert pipeline.settings.background_name == str(good)
    assert view.values[pvs.BACKGROUND_FILE.name] == str(good)  # the record shows the one used
    assert view.status[pvs.BACKGROUND_STATUS.name] == BackgroundState.ERROR
    assert view.messages[-1][1] and "keeping" in view.messages[-1][0]
    control.set_background("")
    assert pipeline.settings.background is None
    assert view.status[pvs.BACKGROUND_STATUS.name] == BackgroundState.NONE


def test_scalars_out_of_range_are_refused_with_the_reason(tmp_path) -> None:
    from psss_ioc.ioc.control import Refused

    control, pipeline, _ = _control(tmp_path)
    with pytest.raises(Refused, match="AVG_N"):
        control.set_average_n(0)
    with pytest.raises(Refused, match="FIT_MIN_SNR"):
        control.set_min_snr(float("nan"))
    control.set_average_n(7)
    control.set_min_snr(5.5)
    control.set_fit_enabled(False)
    assert pipeline.average_n == 7
    assert (pipeline.settings.min_snr, pipeline.settings.fit_enabled) == (5.5, False)

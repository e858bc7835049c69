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

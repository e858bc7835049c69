"""The rules that turn what operators write into the settings in force. No EPICS, no HTTP.

The IOC's record callbacks, the REST shim, autosave restore and the external-PV mirror all
write the ROI through `RoiControl`, so one place decides which rows are in force.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from psss_ioc.core.processing import roi_rows

ROI_LIMIT_MAX = 65535  # a limit record takes 0..65535 (EPICS longout, any camera height)
WHOLE_IMAGE = (0, 0)

RoiPair = tuple[int, int]


def roi_limit_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be written to the ROI limit `name`, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number, not {value!r}"
    if not 0 <= value <= ROI_LIMIT_MAX:
        return f"{name} must be within 0..{ROI_LIMIT_MAX}, got {value}"
    return None


def roi_pair_problem(pair: RoiPair) -> str | None:
    """Why the pair (ymin, ymax) is not a ROI, or None. ymax = 0 means "to the last row"."""
    ymin, ymax = pair
    if ymax and ymin >= ymax:
        return f"ymin {ymin} must be less than ymax {ymax}"
    return None


def roi_setting(pair: RoiPair) -> tuple[int, int] | None:
    """The pipeline's form of a valid pair: None for the whole image."""
    return None if pair == WHOLE_IMAGE else pair


def describe_roi(pair: RoiPair, height: int | None = None) -> str:
    """"whole image", "rows [900, 1600)", "rows [900, 2016)" or "rows from 900"."""
    if pair == WHOLE_IMAGE:
        return "whole image"
    if pair[1] == 0 and height is None:
        return f"rows from {pair[0]} to the last"
    ymin, ymax = roi_rows(pair, height or 0)
    return f"rows [{ymin}, {ymax})"


@dataclass(frozen=True)
class RoiOutcome:
    """What one write made of the ROI: the pair written, the pair in force, and why the
    written pair waits (None when it is the one in force)."""

    written: RoiPair
    in_force: RoiPair
    waits_because: str | None

    @property
    def waiting(self) -> bool:
        return self.waits_because is not None

    def message(self) -> str:
        if self.waits_because is None:
            return f"ROI set to {describe_roi(self.in_force)}"
        return (f"ROI [{self.written[0]}, {self.written[1]}) waits: {self.waits_because}; "
                f"{describe_roi(self.in_force)} stay in force until SPC_ROI_YMIN/SPC_ROI_YMAX "
                f"make a valid pair")


class RoiControl:
    """The ROI pair rule.

    Each limit takes the value written (range-checked only), so a script may write them in any
    order. The pair in force is the last valid pair written: while the written pair is invalid
    it waits (the caller shows an alarm) and the pair before stays in force; the write that
    makes it valid puts it in force at once. Writes are serialised, so two clients writing at
    once end with the records' pair: in force if valid, waiting if not.

    Args:
        apply: puts a valid pair in force (the pipeline's ``configure(roi=...)``).
        show: shows an outcome (records, alarms, message); called under the lock, so what
            is shown follows the order of the writes.
    """

    def __init__(self, apply: Callable[[tuple[int, int] | None], object],
                 show: Callable[[RoiOutcome], None]) -> None:
        self._apply = apply
        self._show = show
        self._lock = threading.Lock()
        self._written: RoiPair = WHOLE_IMAGE
        self._in_force: RoiPair = WHOLE_IMAGE

    @property
    def written(self) -> RoiPair:
        return self._written

    @property
    def in_force(self) -> RoiPair:
        return self._in_force

    def write(self, ymin: int | None = None, ymax: int | None = None) -> RoiOutcome:
        """Write one limit or both; raises ValueError (nothing changed) for a value out of
        range. An invalid pair is taken and waits: see the class."""
        for name, value in (("ymin", ymin), ("ymax", ymax)):
            if value is not None and (problem := roi_limit_problem(name, value)):
                raise ValueError(problem)
        with self._lock:
            written = (self._written[0] if ymin is None else ymin,
                       self._written[1] if ymax is None else ymax)
            problem = roi_pair_problem(written)
            self._written = written
            if problem is None and written != self._in_force:
                self._apply(roi_setting(written))
                self._in_force = written
            outcome = RoiOutcome(written, self._in_force, problem)
            self._show(outcome)
        return outcome

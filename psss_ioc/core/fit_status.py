"""The outcome of a fit, as the FIT_STATUS record shows it.

A module of its own, without numpy or numba: the PV table (`psss_ioc.ioc.pvs`) imports it
for the record's labels and severities, and must stay light.
"""

from __future__ import annotations

import enum


class FitStatus(enum.IntEnum):
    """Outcome of a fit. The value is FIT_STATUS's, `label` the text the record shows for it
    and `severity` its alarm severity (spelled as the softioc builder spells it)."""

    label: str
    severity: str

    def __new__(cls, value: int, label: str, severity: str) -> FitStatus:
        member = int.__new__(cls, value)
        member._value_ = value
        member.label = label
        member.severity = severity
        return member

    # The one list of statuses: value, label, severity.
    OK = 0, "OK", "NO_ALARM"
    LOW_SIGNAL = 1, "Low signal", "MINOR"
    NOT_CONVERGED = 2, "Not converged", "MINOR"
    INVALID_INPUT = 3, "Invalid input", "MAJOR"
    DISABLED = 4, "Disabled", "NO_ALARM"

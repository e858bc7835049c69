"""The legacy parameter set: what ``GET /parameters`` and the output stream's
``processing_parameters`` show, the same for both. No EPICS, no HTTP.

As in psss_processing 1.8, a client gets back what it gave:

- ``background`` is the name the client uploaded a background under (kept with the stored
  file, so it survives restarts), or the path of a file loaded by name; ``background_file``
  is the path of the file in force ('' none);
- keys the IOC does not know are kept and shown (a way to tag data), bounded: at most
  `MAX_EXTRA_KEYS`, names up to `MAX_KEY_LENGTH` characters, values JSON numbers, true/false or
  strings up to `MAX_STRING_LENGTH` characters. They live in the autosaved record
  ``PARAMETERS_EXTRA`` (a JSON object), so they survive restarts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from psss_ioc.core.background import uploaded_name
from psss_ioc.ioc import pvs

# The settings a client may set (GET returns them too); background_file is shown, read-only.
SETTABLE = ("background", "roi", "average_n", "fit_enabled", "min_snr")
BACKGROUND_FILE = "background_file"
KNOWN = (*SETTABLE, BACKGROUND_FILE)
MAX_EXTRA_KEYS = 32
MAX_KEY_LENGTH = 64
MAX_STRING_LENGTH = 256


def value_problem(key: Any, value: Any) -> str | None:
    """Why `key`: `value` cannot be an extra parameter, or None."""
    if not isinstance(key, str) or not key:
        return f"parameter names must be non-empty strings, not {json.dumps(key)[:80]}"
    if len(key) > MAX_KEY_LENGTH:
        return f"parameter name {key[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            return (f"parameter {key!r}: strings may have up to {MAX_STRING_LENGTH} characters, "
                    f"this has {len(value)}")
        return None
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"parameter {key!r}: {value} is not a number"
    return (f"parameter {key!r} must be a number, a string, true/false or null, not "
            f"{type(value).__name__} {json.dumps(value, default=str)[:60]}")


def merged_extra(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`current` extra parameters with `changes` applied (a value None removes its key);
    ValueError with the reason if a change is not allowed (nothing is changed then)."""
    merged = dict(current)
    for key, value in changes.items():
        if key in KNOWN:
            raise ValueError(f"{key!r} is a setting, not an extra parameter")
        problem = value_problem(key, value)
        if problem:
            raise ValueError(problem)
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > MAX_EXTRA_KEYS:
        raise ValueError(f"at most {MAX_EXTRA_KEYS} extra parameters are kept; this makes "
                         f"{len(merged)} (null removes one)")
    return merged


def dump_extra(extra: Mapping[str, Any]) -> str:
    """The record's text: compact JSON (control characters escaped: no NUL in the record)."""
    return json.dumps(dict(extra), ensure_ascii=False, separators=(",", ":"))


def parse_extra(text: str) -> dict[str, Any]:
    """The record's text as extra parameters ('' none); ValueError if it is not a valid set."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, not {type(value).__name__}")
    return merged_extra({}, value)


class LegacyParameters:
    """The legacy view of the settings, for GET /parameters and the output stream alike.

    `rec` reads a record's value (the IOC's records are the settings' one source of truth).
    `view` is called from the worker thread for every message: it reads a few record values
    and caches what is costly (the parsed extra keys, a file's uploaded name).
    """

    def __init__(self, rec: Callable[[pvs.PV], Any]) -> None:
        self._rec = rec
        self._extra: tuple[str, dict[str, Any]] = ("", {})
        self._names: tuple[str, str] = ("", "")  # (path, name to show), the last asked

    def extra(self) -> dict[str, Any]:
        """The extra parameters in force (a bad record value, which validation keeps out,
        shows as none)."""
        text = str(self._rec(pvs.PARAMETERS_EXTRA) or "")
        cached = self._extra
        if cached[0] != text:
            try:
                cached = (text, parse_extra(text))
            except ValueError:
                cached = (text, {})
            self._extra = cached
        return cached[1]

    def background_name(self, path: str) -> str:
        """What `background` shows for the file at `path`: its uploaded name, else `path`."""
        cached = self._names
        if cached[0] != path:
            name = uploaded_name(path) if path else None
            cached = self._names = (path, path if name is None else name)
        return cached[1]

    def view(self, described: Mapping[str, Any]) -> dict[str, Any]:
        """The legacy parameters from `Settings.describe()` (background path, ROI in force)."""
        path = str(described.get("background") or "")
        roi = described.get("roi")
        return {
            "background": self.background_name(path),
            BACKGROUND_FILE: path,
            "roi": [int(roi[0]), int(roi[1])] if roi else [0, 0],
            "average_n": int(self._rec(pvs.AVG_N)),
            "fit_enabled": bool(self._rec(pvs.FIT_ENABLE)),
            "min_snr": float(self._rec(pvs.FIT_MIN_SNR)),
            **self.extra(),
        }

"""The pipeline's processing state (the IOC shows it as STATUS; labels and alarm
severities are the PV table's)."""

from __future__ import annotations

from enum import IntEnum


class State(IntEnum):
    """Processing state, the values of STATUS."""

    STOPPED = 0
    WAITING = 1
    PROCESSING = 2
    ERROR = 3
    NO_IMAGE_CHANNEL = 4  # messages arrive, but without the image channel
    BAD_IMAGE = 5  # frames arrive, but none can be processed (1-D, unsupported type, ...)

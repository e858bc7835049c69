"""What the pipeline takes frames from and what it tells about its input: the frame and
source interfaces any input implements (the bsread `streams.stream.CameraSource`, fakes in
tests), and `SourceFault`, input that arrives but gives no spectrum."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from psss_ioc.pipeline.state import State


class FrameLike(Protocol):
    pulse_id: int
    timestamp: tuple[int, int]
    image: np.ndarray


class PartialImage(Protocol):
    """An image decoded on request (a compressed camera frame's `lazy_image`, which the
    pipeline finds on a frame instead of reading its `image`): only the rows processed are
    decoded (`Pipeline._process`)."""

    shape: tuple[int, ...]
    ndim: int
    dtype: np.dtype

    def rows(self, ymin: int, ymax: int) -> np.ndarray | None:
        """The image, of its full shape, with rows [ymin, ymax) decoded (the others hold
        anything); None when they cannot be decoded (its source counted that)."""
        ...


class FrameSource(Protocol):
    """An input stream. It may also have ``errors() -> dict[str, int]`` (the malformed
    messages it skipped, by kind: it counts those, the pipeline counts everything about the
    frames it gets) and ``fault() -> SourceFault | None`` (what it saw in the messages it made
    no frame of)."""

    def receive(self) -> FrameLike | None: ...

    def close(self) -> None: ...


SourceFactory = Callable[[str, str], FrameSource]

# SourceFault kinds
MISSING_CHANNEL = "missing_channel"
BAD_IMAGE = "bad_image"
FAULT_STATES = {MISSING_CHANNEL: State.NO_IMAGE_CHANNEL, BAD_IMAGE: State.BAD_IMAGE}


@dataclass(frozen=True)
class SourceFault:
    """Input that arrives but gives no spectrum, for a reason the operator has to fix: the
    messages lack the image channel (MISSING_CHANNEL; `channels_seen`: the image-like channels
    they carry) or their image cannot be processed (BAD_IMAGE; `reason`). Reported by the
    source (`source_fault`) or found by the pipeline itself; the pipeline decides the state."""

    kind: str
    time: float  # time.monotonic() of the last message or frame showing it
    channel: str = ""  # the image channel expected
    channels_seen: tuple[str, ...] = ()
    n_channels: int = 0  # channels in the last message without the image channel, all kinds
    reason: str = ""



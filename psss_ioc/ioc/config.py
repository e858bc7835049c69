"""What an IOC instance is configured with (command line, boot script). Imports nothing heavy,
so the command line can build it without loading EPICS."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from psss_ioc.ioc import pvs
from psss_ioc.streams.channels import (
    DEFAULT_IMAGE_PORT,
    DEFAULT_MAX_IMAGE_MB,
    DEFAULT_OUTPUT_PORT,
    DEFAULT_PREFIX,
    DOCUMENT_NAMES,
    V18_NAMES,
    image_channel_for,
)
from psss_ioc.streams.channels import OUTPUT_NAMES as OUTPUT_NAMES

# Record names are <prefix>:<NAME>, at most 60 characters (EPICS).
_LONGEST_NAME = max(len(pv.name) for pv in pvs.TABLE)
_RECORD_NAME = re.compile(r"[A-Za-z0-9_:\-<>\[\]{};]+")


def prefix_problem(prefix: str) -> str | None:
    """Why records cannot be served under `prefix`, or None."""
    if not prefix:
        return "the prefix is empty"
    if not _RECORD_NAME.fullmatch(prefix):
        bad = sorted({c for c in prefix if not _RECORD_NAME.fullmatch(c)})
        return (f"the prefix {prefix!r} has characters EPICS record names cannot have: "
                f"{' '.join(repr(c) for c in bad)} (use letters, digits, _ - : [ ] < > {{ }} ;)")
    if len(prefix) + 1 + _LONGEST_NAME > 60:
        return (f"the prefix {prefix!r} is too long: record names are at most 60 characters, "
                f"so the prefix may have {60 - 1 - _LONGEST_NAME}")
    return None


# Environment variables a boot script (st.cmd) may set with epicsEnvSet.
ENV_PREFIX = "PSSS_PREFIX"
ENV_INPUT_STREAM = "PSSS_INPUT_STREAM"
ENV_INPUT_MODE = "PSSS_INPUT_MODE"
ENV_OUTPUT_PORT = "PSSS_OUTPUT_PORT"
ENV_OUTPUT_NAMES = "PSSS_OUTPUT_NAMES"  # "v1.8" or "document"
ENV_AUTOSAVE_DIR = "PSSS_AUTOSAVE_DIR"
ENV_REST_HOST = "PSSS_REST_HOST"
ENV_REST_PORT = "PSSS_REST_PORT"  # "0": no REST API

# The IOC's log line before it loads its compiled kernels (the demo looks for it to tell a
# first start, which compiles them, from a stuck one).
KERNELS_LOADING = "loading the processing kernels"


@dataclass
class IocConfig:
    prefix: str = DEFAULT_PREFIX
    input_stream: str = ""
    input_mode: str = "PULL"
    image_channel: str | None = None  # default <prefix>:FPICTURE
    output_port: int = DEFAULT_OUTPUT_PORT  # 0: no output stream
    output_mode: str = "PUSH"
    image_port: int | None = None  # legacy: the image in its own stream on this port
    output_names: str = DOCUMENT_NAMES  # V18_NAMES: 1.8's names, image on DEFAULT_IMAGE_PORT
    forward_image: bool = True
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB  # larger images are refused (--max-image-mb)
    auto_start: bool = False
    autosave: bool = True  # False: settings are not saved (--no-autosave)
    autosave_dir: Path | None = None  # default: `default_autosave_dir`
    autosave_period: float = 10.0
    acf: Path | None = None
    st_cmd: Path | None = None
    roi_pvs: tuple[str, str] | None = None
    axis_pv: str | None = None
    receive_timeout: float = 0.2  # seconds
    enable_pva: bool = True
    rest: tuple[str, int] | None = None  # legacy REST API (interface, port); None: off
    rest_token: str | None = None  # REST write requests need "Authorization: Bearer <token>"
    background_dir: Path | None = None  # REST uploads [default: <autosave_dir>/backgrounds]
    # BACKGROUND_FILE must lie inside one of these (after `..` and symlinks are resolved);
    # empty: the background directory only (see `allowed_background_dirs`)
    background_paths: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def channel(self) -> str:
        return self.image_channel or image_channel_for(self.prefix)

    @property
    def image_output_port(self) -> int | None:
        """The port of the image's own stream; None: the image goes with the results."""
        if self.image_port is None and self.output_names == V18_NAMES:
            return DEFAULT_IMAGE_PORT
        return self.image_port

    def allowed_background_dirs(self) -> tuple[Path, ...]:
        """The directories background files may be read from: the background directory
        (where REST uploads go) and every ``background_paths`` entry, fully resolved."""
        dirs = [default_background_dir(self), *self.background_paths]
        return tuple(dict.fromkeys(Path(os.path.realpath(d)) for d in dirs))


def default_autosave_dir(prefix: str, environ: Mapping[str, str] = os.environ) -> Path:
    """Where settings are saved when no directory is given: systemd's StateDirectory
    (``$STATE_DIRECTORY``), else ``$XDG_STATE_HOME/psss-ioc/<prefix>``, by default
    ``~/.local/state/psss-ioc/<prefix>``."""
    state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return Path(state_directory)
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "psss-ioc" / prefix.replace("/", "_")


def autosave_dir_of(config: IocConfig) -> Path | None:
    """The autosave directory in force, None when autosave is off."""
    if not config.autosave:
        return None
    return config.autosave_dir or default_autosave_dir(config.prefix)


def default_background_dir(config: IocConfig) -> Path:
    """Where uploads go: the configured directory, else next to the autosave files, else the
    user's state directory (all survive a restart, unlike /tmp)."""
    configured = getattr(config, "background_dir", None)
    if configured:
        return Path(configured)
    autosave_dir = autosave_dir_of(config)
    if autosave_dir:
        return Path(autosave_dir) / "backgrounds"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "psss-ioc" / "backgrounds"

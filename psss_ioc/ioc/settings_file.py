"""The autosave file: the settings records' values, restored at start and saved while running.

softioc's autosave module could not be made safe from here: a file it cannot parse (empty,
truncated by a crash, an energy axis it wrote as a numpy object) stops the IOC at boot, and a
save error at stop makes its thread spin and the IOC never exit. This one keeps its file format
(YAML ``{record name: value}`` in ``<name>.softsav``, the last good boot's copy in
``.softsav.bu``) and:

- boots with the backup, else the defaults, when the file is bad; the bad file is kept aside
  (``.softsav.bad-<time>``) and the state says what happened;
- writes atomically (temporary file, fsync, rename) in a daemon thread that never spins and
  never keeps the process alive; a failing save (disk full) is reported, rate-limited, and
  retried each period.
No EPICS here: the IOC passes functions that read and report.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from psss_ioc.ioc.pvs import AutosaveState

log = logging.getLogger(__name__)

SUFFIX = ".softsav"


@dataclass(frozen=True)
class Restored:
    values: dict[str, Any]
    state: AutosaveState
    message: str


def _plain(value: Any) -> Any:
    """A value YAML's safe dumper writes (arrays as lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class SettingsFile:
    """One IOC's autosave file in `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{name}{SUFFIX}"
        self.backup = self.path.with_name(self.path.name + ".bu")
        self._last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one writer at a time (thread, final save)

    # ------------------------------------------------------------------ restore
    def restore(self) -> Restored:
        """The saved values, from the file, else its backup, else none (defaults)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return Restored({}, AutosaveState.OK,
                            f"no saved settings in {self.directory} (first start): defaults; "
                            "settings will be saved there")
        try:
            values = self._read(self.path)
        except (OSError, ValueError) as e:
            return self._restore_backup(str(e))
        self._copy_to_backup()
        self._last = values
        return Restored(values, AutosaveState.OK, f"settings restored from {self.path}")

    def _restore_backup(self, problem: str) -> Restored:
        aside = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, aside)
            kept = f"kept as {aside.name}"
        except OSError as e:
            kept = f"could not be moved aside: {e.strerror}"
        what = f"the autosave file {self.path} is unusable ({problem}; {kept})"
        try:
            values = self._read(self.backup)
        except (OSError, ValueError) as e:
            return Restored({}, AutosaveState.DEFAULTS,
                            f"{what}, and so is its backup ({e}): started with defaults")
        return Restored(values, AutosaveState.FROM_BACKUP,
                        f"{what}: settings restored from the backup of the last good start "
                        f"{self.backup}")

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        text = path.read_text(encoding="utf-8")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not YAML the IOC can read: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ValueError("empty" if values is None else "not a table of record values")
        return values

    def _copy_to_backup(self) -> None:
        try:
            data = self.path.read_bytes()
            self._write_atomically(self.backup, data)
        except OSError as e:
            log.warning("could not back up %s: %s", self.path, e)

    # ------------------------------------------------------------------ save
    def save(self, values: Mapping[str, Any]) -> bool:
        """Write `values` if they changed since the last save; raises OSError on failure."""
        plain = {k: _plain(v) for k, v in values.items()}
        with self._lock:
            if plain == self._last:
                return False
            data = yaml.safe_dump(plain, indent=4, allow_unicode=True).encode()
            self._write_atomically(self.path, data)
            self._last = plain
        return True

    def _write_atomically(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a half-written file must not fill the disk further
            raise

    def start(self, read: Callable[[], Mapping[str, Any]], period: float,
              report: Callable[[AutosaveState, str], None]) -> None:
        """Save what `read` returns every `period` seconds (when it changed) in a daemon
        thread; `report` hears when saving starts failing and when it works again."""
        def loop() -> None:
            failing = False
            last_report = -1e9
            while not self._stop.wait(period):
                try:
                    self.save(read())
                except Exception as e:  # disk full, read-only: say so, keep trying
                    now = time.monotonic()
                    if not failing or now - last_report > 60.0:
                        report(AutosaveState.SAVE_FAILING,
                               f"settings cannot be saved to {self.path}: {e}")
                        last_report = now
                    failing = True
                    continue
                if failing:
                    failing = False
                    report(AutosaveState.OK, f"settings saved to {self.path} again")

        self._thread = threading.Thread(target=loop, name="psss-autosave", daemon=True)
        self._thread.start()

    def stop(self, read: Callable[[], Mapping[str, Any]]) -> None:
        """Stop the thread and save a last time (never raises: the IOC is stopping)."""
        self._stop.set()
        try:
            self.save(read())
        except Exception as e:
            log.error("settings could not be saved at stop to %s: %s", self.path, e)

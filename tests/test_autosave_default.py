"""Settings survive restarts without being asked (issue "field-ready" 2): autosave is on for
every way of starting the IOC, in the state directory, and the log says where."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from iochelpers import EPICS_ENV, LEGACY, IocProcess, caget, wait_until

from psss_ioc.core import background
from psss_ioc.ioc import pvs
from psss_ioc.ioc.config import IocConfig, autosave_dir_of, default_autosave_dir
from psss_ioc.processes import free_port
from psss_ioc.rest.client import PsssProcessingClient

DARK = np.arange(40 * 32, dtype=np.uint16).reshape(40, 32) % 7 + 100


def test_default_autosave_directory(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert default_autosave_dir("CAM:X", env) == tmp_path / "xdg" / "psss-ioc" / "CAM:X"
    assert default_autosave_dir("CAM", {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == \
        Path("/var/lib/a")
    assert default_autosave_dir("CAM", {}) == Path.home() / ".local/state/psss-ioc/CAM"
    assert autosave_dir_of(IocConfig(autosave=False)) is None
    assert autosave_dir_of(IocConfig(autosave_dir=tmp_path)) == tmp_path


def _start(kind: str, prefix: str, rest_port: int, state: Path, log: Path) -> IocProcess:
    """The production command lines, with no autosave option: `psss-ioc run` and the legacy
    unit's `psss_processing STREAM -i PREFIX --auto_start`."""
    env = {**EPICS_ENV, "XDG_STATE_HOME": str(state)}
    if kind == "run":
        return IocProcess(prefix, ["tcp://127.0.0.1:1", "--output-port", "0", "--rest-port",
                                   str(rest_port), "--auto-start"], env, log)
    return IocProcess(prefix, ["tcp://127.0.0.1:1", "-i", prefix, "-o", "0", "-r",
                               str(rest_port), "--rest_api_interface", "127.0.0.1",
                               "--auto_start"], env, log, pass_prefix=False, command=LEGACY)


def _rest_up(client: PsssProcessingClient) -> bool:
    """The REST API answers (it starts a moment after Channel Access)."""
    try:
        client.get_status()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("kind", ["run", "psss_processing"])
def test_settings_changed_over_ca_and_rest_come_back_after_sigterm(
        kind: str, tmp_path: Path) -> None:
    prefix = f"TST-PSSS-AS{kind[:1].upper()}"
    state = tmp_path / "state"
    port = free_port()
    ioc = _start(kind, prefix, port, state, tmp_path / "ioc1.log")
    client = PsssProcessingClient(f"http://127.0.0.1:{port}/")
    try:
        wait_until(lambda: _rest_up(client), 20, what="REST up")
        assert ioc.put(pvs.SPC_ROI_YMIN, 12).returncode == 0  # CA, in the legacy order
        assert ioc.put(pvs.SPC_ROI_YMAX, 30).returncode == 0
        assert ioc.put(pvs.FIT_MIN_SNR, 4.5).returncode == 0
        assert client.set_background("dark.h5", DARK) == "ok"  # REST
        client.set_parameters({"average_n": 17})
        in_use = ioc.get(pvs.BACKGROUND_FILE, "-S")
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    finally:
        client.close()
        assert ioc.stop() == 0, ioc.log()  # SIGTERM right after the changes
    log = ioc.log_path.read_text()
    saved_in = state / "psss-ioc" / prefix
    assert f"no saved settings in {saved_in}" in log, log[-3000:]
    assert Path(in_use).parent == saved_in / "backgrounds"  # uploads beside the settings

    ioc = _start(kind, prefix, port, state, tmp_path / "ioc2.log")
    client = PsssProcessingClient(f"http://127.0.0.1:{port}/")
    try:
        wait_until(lambda: _rest_up(client), 20, what="REST up")
        wait_until(lambda: ioc.get(pvs.AVG_N) == "17", 20, what="restored AVG_N")
        assert (ioc.get(pvs.SPC_ROI_YMIN), ioc.get(pvs.SPC_ROI_YMAX)) == ("12", "30")
        assert (ioc.get(pvs.ROI_YMIN_RBV), ioc.get(pvs.ROI_YMAX_RBV)) == ("12", "30")
        assert float(ioc.get(pvs.FIT_MIN_SNR)) == pytest.approx(4.5)
        assert ioc.get(pvs.BACKGROUND_FILE, "-S") == in_use
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
        parameters = client.get_parameters()
        assert parameters["roi"] == [12, 30] and parameters["average_n"] == 17
    finally:
        client.close()
        assert ioc.stop() == 0, ioc.log()
    assert f"settings restored from {saved_in / (prefix + '.softsav')}" in \
        ioc.log_path.read_text()


VIEW_SETTINGS = ((pvs.IMAGE_BIN, "4"), (pvs.IMAGE_RATE, "5"), (pvs.SATURATION_LEVEL, "60000"),
                 (pvs.BACKGROUND_N, "250"), (pvs.AXIS_C0, "9000"), (pvs.AXIS_C1, "0.5"),
                 (pvs.AXIS_C2, "-0.0001"), (pvs.AXIS_MODE, "Polynomial"))


def test_the_operators_view_and_axis_settings_come_back_after_sigterm(tmp_path: Path) -> None:
    """The settings of the operator's view and of the axis polynomial are autosaved and
    restored through the control layer: the axis mode after its coefficients, so the
    polynomial is in force (EGU eV) after the restart."""
    prefix, state, port = "TST-PSSS-ASV", tmp_path / "state", free_port()
    ioc = _start("run", prefix, port, state, tmp_path / "ioc1.log")
    try:
        for pv, value in VIEW_SETTINGS:
            put = ioc.put(pv, 1 if pv == pvs.AXIS_MODE else value)
            assert put.returncode == 0, put.stderr
        assert ioc.get(pvs.AXIS_MODE) == "Polynomial"
    finally:
        assert ioc.stop() == 0, ioc.log()
    ioc = _start("run", prefix, port, state, tmp_path / "ioc2.log")
    try:
        wait_until(lambda: ioc.get(pvs.AXIS_MODE) == "Polynomial", 20, what="restored mode")
        for pv, value in VIEW_SETTINGS:
            shown = ioc.get(pv)
            assert shown == value or float(shown) == pytest.approx(float(value)), (pv, shown)
        wait_until(lambda: caget(ioc.name(pvs.SPECTRUM_CENTER) + ".EGU") == "eV", 10,
                   what="energy units")
        assert "Traceback" not in ioc.log_path.read_text(errors="replace")
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_no_autosave_saves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ioc = IocProcess("TST-PSSS-ASN", ["tcp://127.0.0.1:1", "--output-port", "0", "--no-rest",
                                      "--no-autosave"],
                     {**EPICS_ENV, "XDG_STATE_HOME": str(state)}, tmp_path / "ioc.log")
    try:
        assert ioc.put(pvs.AVG_N, 33).returncode == 0
    finally:
        assert ioc.stop() == 0, ioc.log()
    assert not state.exists() or not any(state.rglob("*.softsav"))
    assert "autosave is off" in ioc.log_path.read_text()


def test_old_uploads_are_pruned_but_the_one_in_use(tmp_path: Path) -> None:
    paths = [background.write_background(tmp_path, f"dark{i}.h5", DARK) for i in range(14)]
    for i, path in enumerate(paths):  # distinct ages, oldest first
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    mine = tmp_path / "operators_own_file.h5"
    mine.write_bytes(b"not an upload")
    os.utime(mine, (1, 1))
    removed = background.prune_uploads(tmp_path, in_use=str(paths[0]))
    assert sorted(removed) == sorted(paths[1:4])
    assert paths[0].exists() and mine.exists()
    assert all(p.exists() for p in paths[4:])

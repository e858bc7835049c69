"""IOC life cycle with real processes: stream loss and return, restart with autosave, access
security, booting from an st.cmd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from iochelpers import (
    EPICS_ENV,
    IocProcess,
    caget,
    free_port_pair,
    simulator_args,
    wait_until,
)

from psss_ioc.ioc import pvs
from psss_ioc.streams.simulate import SimulatorProcess

PREFIX = "TST-PSSS-L"
H, W = 200, 256


@pytest.fixture(scope="module")
def sim_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="module")
def sim(sim_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    bg = tmp_path_factory.mktemp("lifecycle") / "bg.h5"
    with SimulatorProcess(simulator_args(PREFIX, extra=["--port", str(sim_port),
                                                        "--write-background", str(bg)])) as s:
        s.background = bg  # type: ignore[attr-defined]
        yield s


def state(ioc: IocProcess) -> str:
    return ioc.get(pvs.STATUS)


def test_stream_loss_and_return(sim_port: int, tmp_path: Path) -> None:
    first = SimulatorProcess(simulator_args(PREFIX, extra=["--port", str(sim_port + 1)]))
    ioc = IocProcess(PREFIX, [first.address, "--output-port", "0", "--auto-start"], EPICS_ENV,
                     tmp_path / "ioc.log")
    try:
        wait_until(lambda: state(ioc) == "Processing", 60, what="Processing")
        first.stop()
        wait_until(lambda: state(ioc) == "Waiting for stream", 15, what="Waiting for stream")
        assert ioc.get(pvs.STATUS, "-a").split()[-1] == "MINOR"
        assert "no frame" in ioc.get(pvs.MESSAGE, "-S")
        pid = int(ioc.get(pvs.PULSE_ID))
        with SimulatorProcess(simulator_args(PREFIX, extra=["--port", str(sim_port + 1)])):
            wait_until(lambda: state(ioc) == "Processing", 30, what="Processing again")
            wait_until(lambda: int(ioc.get(pvs.PULSE_ID)) != pid, what="new frames")
    finally:
        first.stop()
        assert ioc.stop() == 0, ioc.log()


def test_restart_restores_settings(sim: SimulatorProcess, tmp_path: Path) -> None:
    autosave = tmp_path / "autosave"
    args = [sim.address, "--output-port", "0", "--auto-start", "--autosave-dir", str(autosave),
            "--autosave-period", "0.5", "--background-path",
            str(sim.background.parent)]  # type: ignore[attr-defined]
    axis = [float(x) for x in np.linspace(9000.0, 9100.0, W)]
    ioc = IocProcess(PREFIX, args, EPICS_ENV, tmp_path / "ioc1.log")
    try:
        wait_until(lambda: state(ioc) == "Processing", 60, what="Processing")
        ioc.put(pvs.SPC_ROI_YMAX, 150)
        ioc.put(pvs.SPC_ROI_YMIN, 50)
        ioc.put(pvs.AVG_N, 7)
        ioc.put(pvs.FIT_MIN_SNR, 4.5)
        ioc.put(pvs.SPECTRUM_X, axis)
        ioc.put(pvs.BACKGROUND_FILE, str(sim.background), "-S")  # type: ignore[attr-defined]
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    finally:
        assert ioc.stop() == 0, ioc.log()
    assert any(autosave.iterdir())
    ioc = IocProcess(PREFIX, args, EPICS_ENV, tmp_path / "ioc2.log")
    try:
        assert ioc.get(pvs.SPC_ROI_YMIN) == "50" and ioc.get(pvs.SPC_ROI_YMAX) == "150"
        assert ioc.get(pvs.AVG_N) == "7"
        assert float(ioc.get(pvs.FIT_MIN_SNR)) == pytest.approx(4.5)
        assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(sim.background)  # type: ignore[attr-defined]
        # restored values are applied, not just shown
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
        wait_until(lambda: ioc.get(pvs.ROI_YMIN_RBV) == "50", 60, what="restored ROI in force")
        assert ioc.get(pvs.ROI_YMAX_RBV) == "150"
        wait_until(lambda: float(ioc.get(pvs.SPECTRUM_CENTER)) > 8990, what="axis in force")
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_acf_refuses_a_put_from_an_unlisted_client(sim: SimulatorProcess, tmp_path: Path) -> None:
    acf = tmp_path / "strict.acf"
    acf.write_text(
        "UAG(operators) { someone_else }\n"
        "ASG(DEFAULT) {\n    RULE(1, READ)\n    RULE(1, WRITE) { UAG(operators) }\n}\n"
        "ASG(LOCKED) {\n    RULE(1, READ)\n}\n"
    )
    ioc = IocProcess(PREFIX, [sim.address, "--output-port", "0", "--acf", str(acf)],
                     EPICS_ENV, tmp_path / "ioc.log")
    try:
        before = ioc.get(pvs.SPC_ROI_YMAX)
        result = ioc.put(pvs.SPC_ROI_YMAX, 111)
        assert result.returncode != 0 or "denied" in (result.stdout + result.stderr).lower()
        assert ioc.get(pvs.SPC_ROI_YMAX) == before
        result = ioc.put(pvs.START, 1)
        assert ioc.get(pvs.STATUS) == "Stopped"
        assert caget(ioc.name(pvs.IOC_STATS) + ":SYSRESET.ASG") == pvs.LOCKED_ASG
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_boot_from_st_cmd(sim: SimulatorProcess, tmp_path: Path) -> None:
    prefix = "TST-PSSS-ST"
    (tmp_path / "psss.acf").write_text(
        Path(__file__).parents[1].joinpath("iocBoot", "iocpsss", "psss.acf").read_text())
    st = tmp_path / "st.cmd"
    st.write_text(
        f'epicsEnvSet("PSSS_PREFIX", "{prefix}")\n'
        f'epicsEnvSet("PSSS_INPUT_STREAM", "{sim.address}")\n'
        'epicsEnvSet("PSSS_OUTPUT_PORT", "0")\n'
        f'epicsEnvSet("PSSS_AUTOSAVE_DIR", "{tmp_path / "as"}")\n'
        'asSetFilename("$(ST_DIR)/psss.acf")\n'
    )
    ioc = IocProcess(prefix, ["--st-cmd", str(st), "--image-channel", f"{PREFIX}:FPICTURE",
                              "--auto-start"], EPICS_ENV, tmp_path / "ioc.log",
                     pass_prefix=False)
    try:
        # A new CA client's first search in the IOC's first seconds can take 1-2 s (seen with
        # this session's and older code alike, ~1 run in 10 over caget's default 2 s wait).
        first = caget(ioc.name(pvs.INPUT_STREAM), "-S", "-w", "8", timeout=15)
        assert first == sim.address
        wait_until(lambda: state(ioc) == "Processing", 60, what="Processing")
        assert caget(ioc.name(pvs.IOC_STATS) + ":SYSRESET.ASG") == pvs.LOCKED_ASG
        assert (tmp_path / "as").is_dir()
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_demo_command_processes_and_exits() -> None:
    import subprocess
    import sys

    ca, pva = free_port_pair(), free_port_pair()
    out = subprocess.run(
        [sys.executable, "-c", "from psss_ioc.cli.main import main; main()", "demo",
         "--height", "200",
         "--width", "256", "--ca-port", str(ca), "--pva-port", str(pva), "--duration", "6"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SPECTRUM_FWHM" in out.stdout
    assert "Processing" in out.stdout and "fit OK" in out.stdout


def test_legacy_psss_processing_command_line(sim: SimulatorProcess, tmp_path: Path) -> None:
    """The legacy systemd unit's command line: psss_processing STREAM -i PREFIX --auto_start."""
    import os
    import signal
    import subprocess
    import sys

    log = open(tmp_path / "legacy.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from psss_ioc.cli.commands import legacy_main; legacy_main()",
         sim.address, "-i", PREFIX, "-o", "0", "-r", str(free_port_pair()),
         "--rest_api_interface", "127.0.0.1", "--log_level", "INFO", "--auto_start"],
        env={**os.environ, **EPICS_ENV}, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        name = pvs.full_name(PREFIX, pvs.STATUS)

        def status() -> str:
            try:
                return caget(name)
            except (RuntimeError, subprocess.TimeoutExpired):
                return ""

        wait_until(lambda: status() == "Processing", 60, what="legacy IOC processing")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
        log.close()
    assert code == 0, (tmp_path / "legacy.log").read_text()

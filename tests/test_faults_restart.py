"""Fault injection that needs IOCs of its own (issue 7): access security over PV Access, and
stopping the IOC (SIGTERM: clean exit with autosave written; kill -9: settings restored from
the last periodic save). One IOC at a time: two IOCs on one CA port would not both answer."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from iochelpers import EPICS_ENV, IocProcess, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

H, W = 200, 256


# ------------------------------------------------------------------------------ access security
def test_acf_refuses_a_pva_put_from_an_unlisted_client(tmp_path: Path) -> None:
    from p4p.client.thread import Context, RemoteError

    acf = tmp_path / "strict.acf"
    acf.write_text(
        "UAG(operators) { someone_else }\n"
        "ASG(DEFAULT) {\n    RULE(1, READ)\n    RULE(1, WRITE) { UAG(operators) }\n}\n"
        "ASG(LOCKED) {\n    RULE(1, READ)\n}\n"
    )
    prefix = "TST-PSSS-FA"
    ioc = IocProcess(prefix, ["tcp://127.0.0.1:1", "--output-port", "0", "--no-rest",
                              "--acf", str(acf)], EPICS_ENV, tmp_path / "ioc.log")
    ctx = Context("pva")
    try:
        name = ioc.name(pvs.AVG_N)
        assert int(ctx.get(name, timeout=10)) == 10  # reads work
        with pytest.raises(RemoteError) as refused:
            ctx.put(name, 33, timeout=10)
        assert "denied" in str(refused.value).lower() or "put" in str(refused.value).lower()
        assert int(ctx.get(name, timeout=10)) == 10
        assert ioc.get(pvs.AVG_N) == "10"
        with pytest.raises(RemoteError):
            ctx.put(ioc.name(pvs.START), 1, timeout=10)
        assert ioc.get(pvs.STATUS) == "Stopped"
    finally:
        ctx.close()
        assert ioc.stop() == 0, ioc.log()


# ------------------------------------------------------------------------------ stopping
def _autosaved(directory: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(directory.glob("*.softsav")))


def test_sigterm_saves_and_kill9_restores(tmp_path: Path) -> None:
    autosave = tmp_path / "autosave"
    bgdir = tmp_path / "bg"
    bgdir.mkdir()
    background = SimulatedCamera(SimConfig(height=H, width=W, pool=1)).write_background(
        bgdir / "dark.h5")
    prefix = "TST-PSSS-FK"
    args = ["tcp://127.0.0.1:1", "--output-port", "0", "--no-rest", "--autosave-dir",
            str(autosave), "--autosave-period", "600", "--background-path", str(bgdir)]

    def start(log: str) -> IocProcess:
        return IocProcess(prefix, args, EPICS_ENV, tmp_path / log)

    ioc = start("ioc1.log")
    try:
        assert ioc.put(pvs.AVG_N, 17).returncode == 0
        assert ioc.put(pvs.SPC_ROI_YMAX, 160).returncode == 0
        assert ioc.put(pvs.SPC_ROI_YMIN, 40).returncode == 0
        assert ioc.put(pvs.BACKGROUND_FILE, str(background), "-S").returncode == 0
    finally:
        code = ioc.stop()  # SIGTERM right after the puts, long before the next periodic save
    assert code == 0, ioc.log()
    saved = _autosaved(autosave)
    assert "17" in saved and "160" in saved and str(background) in saved, saved

    args[args.index("600")] = "0.3"
    ioc = start("ioc2.log")
    try:
        wait_until(lambda: ioc.get(pvs.AVG_N) == "17", 20, what="restored AVG_N")
        assert ioc.get(pvs.SPC_ROI_YMIN) == "40"
        assert ioc.put(pvs.AVG_N, 23).returncode == 0
        assert ioc.put(pvs.FIT_MIN_SNR, 6.5).returncode == 0
        # both puts must be in one periodic save (one could land between the two puts)
        wait_until(lambda: "23" in (text := _autosaved(autosave)) and "6.5" in text, 10,
                   what="periodic save")
        ioc.proc.send_signal(signal.SIGKILL)
        ioc.proc.wait(10)
    finally:
        ioc.stop()
    ioc = start("ioc3.log")
    try:
        wait_until(lambda: ioc.get(pvs.AVG_N) == "23", 20, what="restored AVG_N")
        assert float(ioc.get(pvs.FIT_MIN_SNR)) == pytest.approx(6.5)
        assert (ioc.get(pvs.SPC_ROI_YMIN), ioc.get(pvs.SPC_ROI_YMAX)) == ("40", "160")
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    finally:
        assert ioc.stop() == 0, ioc.log()


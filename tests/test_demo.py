"""`psss-ioc demo` on a fresh clone (issue "Field-ready", section 4).

The demo runs as `make demo` runs it: the venv's bin not on PATH, no terminal, its own session
(so the test can signal its process group as Ctrl-C, `timeout -s INT` or a supervisor does) and
its own TMPDIR (so the test sees what it leaves behind). Output goes to files, not pipes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from iochelpers import EPICS_ENV, IocProcess, caget, free_port_pair, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port

PSSS_IOC = Path(sys.executable).parent / "psss-ioc"
LIVE = re.compile(r"^Processing +[\d.]+ Hz +pulse \d+ +centre +[\d.]+ eV .*fit OK",
                  re.MULTILINE)
STOP_WITHIN = 5.0  # s from the signal until the demo and everything it started are gone
# Output the terminal must never show (log lines, EPICS noise, colour codes).
NOISE = ("WARNING", "INFO", "caRepeater", "Could not", "DBF_STRING", "\x1b", "Traceback")


class Demo:
    """`psss-ioc demo` with small frames on free ports, in a session of its own."""

    def __init__(self, tmp_path: Path, *, numba_cache: Path | None = None,
                 sigint_ignored: bool = False, log: Path | None = None) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.out = tmp_path / "demo.out"
        self.err = tmp_path / "demo.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(PATH="/usr/bin:/bin", TMPDIR=str(self.tmpdir))  # as `make demo`: no venv
        if numba_cache is not None:
            env["NUMBA_CACHE_DIR"] = str(numba_cache)
        command = [str(PSSS_IOC), "demo", "--height", "200", "--width", "256",
                   "--ca-port", str(free_port_pair()), "--pva-port", str(free_port_pair()),
                   "--rest-port", "0", *(["--log", str(log)] if log else [])]
        if sigint_ignored:  # a background job of a shell without job control
            command = ["bash", "-c", "trap '' INT; exec \"$@\"", "bash", *command]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def live_lines(self) -> list[str]:
        if self.proc.poll() is not None:
            raise AssertionError(f"the demo exited {self.proc.returncode}:\n{self.output()}\n"
                                 f"{self.err.read_text(errors='replace')}")
        return LIVE.findall(self.output())

    def interrupt(self, sig: int = signal.SIGINT, group: bool = True) -> float:
        """Signal the demo (its process group, as Ctrl-C does); seconds until it exited."""
        start = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        return time.monotonic() - start

    def survivors(self) -> list[str]:
        """Processes of the demo's session still there (zombies too)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = stat.read_text()
                fields = text.rsplit(")", 1)[1].split()
                if int(fields[3]) == self.proc.pid:  # session id
                    found.append(text[:120])
        return found

    def kill(self) -> None:
        """The test's own clean-up: whatever is left of the session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def assert_quiet_terminal(demo: Demo) -> None:
    out = demo.output()
    for noise in NOISE:
        assert noise not in out, (noise, out)
    assert demo.err.read_text(errors="replace") == ""
    assert out.startswith("psss-ioc demo: the log of the IOC and the camera is ")


def assert_all_gone(demo: Demo, seconds: float) -> None:
    assert demo.proc.returncode == 0, (demo.proc.returncode, demo.output())
    assert seconds < STOP_WITHIN, seconds
    assert demo.survivors() == []
    assert list(demo.tmpdir.iterdir()) == []  # work directory and log removed


def test_first_start_with_an_empty_numba_cache(tmp_path: Path) -> None:
    """The kernels compile (30-60 s): the demo says so and waits, then shows live lines only."""
    demo = Demo(tmp_path, numba_cache=tmp_path / "numba-cache")
    try:
        wait_until(lambda: len(demo.live_lines()) >= 2, 240, 1.0, "two live lines")
        seconds = demo.interrupt()
    finally:
        demo.kill()
    assert "compiling processing kernels, first start only" in demo.output()
    assert "IOC PSSS-DEMO" in demo.output()
    assert_quiet_terminal(demo)
    assert_all_gone(demo, seconds)


@pytest.mark.parametrize(("sig", "group", "sigint_ignored"), [
    (signal.SIGINT, True, True),  # `timeout -s INT` / a supervisor, no terminal, SIGINT ignored
    (signal.SIGINT, True, False),  # Ctrl-C
    (signal.SIGTERM, False, False),  # a supervisor that signals the demo alone
], ids=["sigint-ignored-by-parent", "ctrl-c", "sigterm-to-the-demo-alone"])
def test_a_signal_ends_everything_within_5_s(tmp_path: Path, sig: int, group: bool,
                                             sigint_ignored: bool) -> None:
    log = tmp_path / "demo.log"
    demo = Demo(tmp_path, sigint_ignored=sigint_ignored, log=log)
    try:
        wait_until(lambda: len(demo.live_lines()) >= 2, 120, 0.5, "two live lines")
        seconds = demo.interrupt(sig, group)
    finally:
        demo.kill()
    assert_quiet_terminal(demo)
    assert_all_gone(demo, seconds)
    # --log keeps the log: the start-up is clean and "no consumer" is one line, not a warning
    # every 10 s
    text = log.read_text(errors="replace")
    for noise in ("Could not", "DBF_STRING", "\x1b", "caRepeater"):
        assert noise not in text, (noise, text[-3000:])
    assert text.count("output stream: no consumer connected") == 1, text[-3000:]
    assert "IOC PSSS-DEMO serving" in text


def test_a_first_boot_from_st_cmd_prints_no_stray_lines(tmp_path: Path) -> None:
    """Production start-up (st.cmd, autosave, no consumer on the output stream): the echo of
    st.cmd without colour codes, no `DBF_STRING: "LOCKED"`, no "Could not back up autosave"
    with no file yet; SYSRESET still locked and settings still saved."""
    prefix = "TST-PSSS-QUIET"
    (tmp_path / "psss.acf").write_text(
        Path(__file__).parents[1].joinpath("iocBoot", "iocpsss", "psss.acf").read_text())
    st = tmp_path / "st.cmd"
    st.write_text(
        "# a comment that iocsh echoes\n"
        f'epicsEnvSet("PSSS_PREFIX", "{prefix}")\n'
        f'epicsEnvSet("PSSS_AUTOSAVE_DIR", "{tmp_path / "as"}")\n'
        'asSetFilename("$(ST_DIR)/psss.acf")\n'
    )
    ioc = IocProcess(prefix, ["--st-cmd", str(st), "--output-port", str(free_port()),
                              "--no-rest", "--autosave-period", "0.5"],
                     EPICS_ENV, tmp_path / "ioc.log", pass_prefix=False)
    try:
        assert caget(ioc.name(pvs.IOC_STATS) + ":SYSRESET.ASG") == pvs.LOCKED_ASG
        assert ioc.put(pvs.AVG_N, 7).returncode == 0
        saved = tmp_path / "as" / f"{prefix}.softsav"
        wait_until(lambda: saved.is_file() and f"{prefix}:AVG_N: 7" in saved.read_text(),
                   10, 0.2, "the setting saved")
    finally:
        assert ioc.stop() == 0, ioc.log()
    text = (tmp_path / "ioc.log").read_text(errors="replace")
    assert f'epicsEnvSet("PSSS_PREFIX", "{prefix}")' in text  # the echo stays, plain
    assert "# a comment that iocsh echoes" in text
    for noise in ("\x1b", "DBF_STRING", "Could not", "Traceback"):
        assert noise not in text, (noise, text)

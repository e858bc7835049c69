"""README.md cannot rot: its generated sections are up to date, and every command it shows runs.

Every line of every fenced ``bash`` block is a command. Each one is, in this module, either

- run for real as written (the default: ``--help`` of every subcommand, the ``--check``
  commands), from a scratch directory, with the venv's scripts first on PATH, the session's
  loopback EPICS ports and a timeout; it must exit 0;
- run for real with arguments appended that keep it small and bounded (`APPENDED`; click takes
  the last value of a repeated option, so an appended ``--port`` wins);
- run as a client of a live process this module starts: the demo (`DEMO_CLIENTS`) or an IOC
  with REST and a token (`REST_CLIENTS`; ``127.0.0.1:12000`` becomes that IOC's REST address);
- or listed in `NOT_RUN` with the reason it cannot run here.

`NOT_RUN` and the other tables must name exactly commands of the README, so a new command is
run as written unless someone adds it here with a reason. The README's Python block runs
against the REST IOC too (its only change: the address). Output goes to files, not pipes
(EPICS clients start a caRepeater that inherits them), and every process group started here is
stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from iochelpers import BIN, EPICS_ENV, IocProcess, caget, simulator_args, wait_until

from psss_ioc import pvs, readme
from psss_ioc.cli import main
from psss_ioc.commands import free_port
from psss_ioc.simulate import SimulatorProcess

README = readme.README_PATH
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
REST_CLIENTS = (
    "curl -s http://127.0.0.1:12000/status",
    "curl -s http://127.0.0.1:12000/parameters",
    'curl -s -X POST -H "Authorization: Bearer $PSSS_REST_TOKEN" -d \'{"roi": [100, 200]}\' '
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
    "make demo": "builds .venv and runs the full-size bench core (minutes); CI's `make test` "
                 "builds the same venv and this module runs `psss-ioc bench core` small",
    "make test": "runs the test suite this module belongs to (it would recurse); it is CI",
    "psss_processing tcp://<camera-host>:9000 -i SARFE10-PSSS059 --auto_start":
        "production line: <camera-host> is the beamline camera, and it opens REST on "
        "0.0.0.0:12000 (tests/test_rest_config.py runs the legacy options on loopback)",
    "PSSS_REST_TOKEN=<secret> psss-ioc run tcp://<camera-host>:9000 --prefix SARFE10-PSSS059 "
    "--auto-start --rest-host 0.0.0.0":
        "production line: beamline camera, REST open to the network; the same options on "
        "loopback (token, REST) run in test_rest_examples_and_client_sample_on_a_live_ioc",
    "psss-ioc run --st-cmd iocBoot/iocpsss/st.cmd":
        "production boot: camera sf-daqsync-02, /var/lib/psss-ioc, CA on the beamline network "
        "(tests/test_deployment.py checks the unit runs exactly this command)",
    "install -m 644 iocBoot/iocpsss/psss-ioc.service /etc/systemd/system/":
        "root on the IOC host (tests/test_deployment.py verifies the unit with systemd-analyze)",
    "install -D -m 644 iocBoot/iocpsss/psss-ioc.env.example /etc/psss-ioc/psss-ioc.env":
        "root on the IOC host (tests/test_deployment.py checks every variable it sets)",
    "useradd --system --no-create-home psss-ioc": "root on the IOC host",
    "systemctl daemon-reload && systemctl enable --now psss-ioc": "root and systemd as PID 1",
    "journalctl -u psss-ioc -f": "follows the journal of the installed service forever",
    "conda build -c paulscherrerinstitute -c conda-forge conda-recipe":
        "needs conda-build and the PSI channel (tests/test_packaging.py checks the recipe "
        "against pyproject.toml)",
    "psss-ioc bench e2e": "~20 s even with tiny frames, over this module's budget; "
                          "tests/test_bench_e2e.py runs it with tiny frames",
    "psss-ioc bench soak": "17 min at full size; tests/test_bench_soak.py runs it with tiny "
                           "frames",
}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return [textwrap.dedent(body) for indent, lang, body in FENCE.findall(readme_text())
            if lang == language]


def shell_blocks() -> list[list[str]]:
    """Commands of each bash block, inline comments removed, continuation lines joined."""
    result = []
    for body in blocks("bash"):
        commands: list[str] = []
        for line in body.replace("\\\n", " ").splitlines():
            line = INLINE_COMMENT.sub("", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
        result.append(commands)
    return result


def exports(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith("export ")]


def shell_commands() -> list[str]:
    return [c for block in shell_blocks() for c in block if not c.startswith("export ")]


def direct_commands() -> list[str]:
    special = set(NOT_RUN) | set(APPENDED) | set(DEMO_CLIENTS) | set(REST_CLIENTS)
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
    for table in (NOT_RUN, APPENDED, DEMO_CLIENTS, REST_CLIENTS):
        assert set(table) <= commands, set(table) - commands
    assert set(NOT_RUN).isdisjoint(set(APPENDED) | set(DEMO_CLIENTS) | set(REST_CLIENTS))
    # what is not run here is exactly the allow-list; everything else runs below
    ran = set(direct_commands()) | set(APPENDED) | set(DEMO_CLIENTS) | set(REST_CLIENTS)
    assert commands - ran == set(NOT_RUN)
    assert all(reason for reason in NOT_RUN.values())


def test_readme_opens_with_the_two_fresh_clone_commands() -> None:
    assert shell_blocks()[0] == ["make demo", "make test"]
    assert "make demo   # creates .venv, installs psss-ioc, runs the demo\n" in readme_text()


def test_client_blocks_are_where_the_tables_say() -> None:
    """The demo clients are the block after the demo, with its export line; the curl lines of
    the REST section are one block."""
    by_block = shell_blocks()
    demo_block = next(b for b in by_block if set(DEMO_CLIENTS) <= set(b))
    assert [c for c in demo_block if not c.startswith("export ")] == list(DEMO_CLIENTS)
    assert exports(demo_block)
    assert list(REST_CLIENTS) in by_block


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
    assert outputs["psss-ioc run --help"] == readme.help_text("run") + "\n"
    assert outputs["psss_processing --help"] == readme.help_text("psss_processing") + "\n"
    for command in commands:
        if command.endswith(" --help") and command.startswith("psss-ioc "):
            name = command.removeprefix("psss-ioc ").removesuffix("--help").split()
            assert outputs[command] == readme.help_text(*name) + "\n", command


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
    assert "IOC PSSS-DEMO" in out.read_text()


def _status(prefix: str, proc: subprocess.Popen[bytes], out: Path) -> str | None:
    if proc.poll() is not None:
        raise AssertionError(f"the demo exited {proc.returncode}:\n{out.read_text()[-3000:]}")
    try:
        return caget(f"{prefix}:{pvs.STATUS.name}")
    except (RuntimeError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------------------ REST and Python
PREFIX = "TST-PSSS-README"
TOKEN = "readme-token"


@pytest.fixture(scope="module")
def rest_ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IocProcess, int, Path]]:
    """An IOC with REST on a free port and a token, fed 200 x 256 frames; its directory holds
    the camera's dark frame as background.h5 (what the README's Python block reads)."""
    workdir = tmp_path_factory.mktemp("readme-rest")
    rest_port = free_port()
    args = simulator_args(PREFIX, extra=["--write-background", str(workdir / "background.h5")])
    with SimulatorProcess(args) as sim:
        ioc = IocProcess(PREFIX, [sim.address, "--output-port", "0", "--auto-start",
                                  "--rest-port", str(rest_port), "--rest-token", TOKEN,
                                  "--autosave-dir", str(workdir / "autosave")],
                         EPICS_ENV, workdir / "ioc.log")
        try:
            wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 30, what="processing")
            yield ioc, rest_port, workdir
        finally:
            assert ioc.stop() == 0, ioc.log()


def test_rest_examples_and_client_sample_on_a_live_ioc(
        rest_ioc: tuple[IocProcess, int, Path]) -> None:
    ioc, port, workdir = rest_ioc
    env = environment(PSSS_REST_TOKEN=TOKEN)
    for command in REST_CLIENTS:
        reply = json.loads(sh(command.replace(README_REST, f"127.0.0.1:{port}"), workdir, env))
        assert reply["state"] == "ok", (command, reply)
    assert ioc.get(pvs.ROI_YMIN_RBV) == "100" and ioc.get(pvs.ROI_YMAX_RBV) == "200"
    # without the token, the POST of the README is refused
    refused = sh(REST_CLIENTS[2].replace(README_REST, f"127.0.0.1:{port}"), workdir,
                 environment(PSSS_REST_TOKEN=""))
    assert json.loads(refused)["state"] == "error"

    (sample,) = blocks("python")
    assert sample.count(README_REST_PYTHON) == 1
    script = workdir / "sample.py"
    script.write_text(sample.replace(README_REST_PYTHON, f"http://localhost:{port}/"))
    ioc.put(pvs.SPC_ROI_YMIN, 0)
    ioc.put(pvs.SPC_ROI_YMAX, 0)
    output = sh(f"python {script}", workdir, env).splitlines()
    assert output[0].startswith("processing {")
    assert int(output[-1]) > 0  # n_processed_images
    assert ioc.get(pvs.STATUS) == "Processing"
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    assert ioc.get(pvs.ROI_YMIN_RBV) == "100" and ioc.get(pvs.ROI_YMAX_RBV) == "200"
    stored = Path(ioc.get(pvs.BACKGROUND_FILE, "-S"))
    assert stored.parent == workdir / "autosave" / "backgrounds"

"""Deployment files in iocBoot/iocpsss/: the systemd unit and the example environment file.

The unit must load in systemd, run the documented boot command with options `psss-ioc run`
accepts, and every variable the two files name must be one that EPICS, Python, numba, systemd
or the unit itself reads.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import epicscorelibs.path
import pvxslibs
import pytest

from psss_ioc.cli.commands import run_command
from psss_ioc.ioc import pvs

TOP = Path(__file__).resolve().parent.parent
BOOT = TOP / "iocBoot" / "iocpsss"
UNIT = BOOT / "psss-ioc.service"
TEMPLATE = BOOT / "psss-ioc@.service"  # one instance per camera, several on one host
README = TOP / "README.md"
ENV_EXAMPLE = BOOT / "psss-ioc.env.example"
INSTALL_TOP = "/opt/psss-ioc"  # where the unit expects the repository
BIN = Path(sys.executable).parent

_ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
_REFERENCE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit -> {section: [(key, value), ...]}; keys may repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"entry outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def only(section: list[tuple[str, str]], key: str) -> str:
    (value,) = values(section, key)
    return value


def env_assignments(text: str) -> dict[str, str]:
    """NAME=value lines of an environment file, commented-out examples included."""
    found = {}
    for line in text.splitlines():
        if match := _ASSIGNMENT.match(line.strip()):
            found[match.group(1)] = match.group(2)
    return found


def active_env(text: str) -> dict[str, str]:
    """What systemd sets from the file: uncommented lines, quotes removed."""
    env = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition("=")
            env[name] = " ".join(shlex.split(value))
    return env


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return unit_entries(UNIT.read_text(encoding="utf-8"))


def local_copy(unit: Path, directory: Path) -> Path:
    """The unit pointing at this checkout, this interpreter and the example environment."""
    text = unit.read_text(encoding="utf-8")
    text = text.replace(f"{INSTALL_TOP}/.venv/bin/", f"{BIN}/").replace(INSTALL_TOP, str(TOP))
    for env_file in ("/etc/psss-ioc/psss-ioc.env", "/etc/psss-ioc/%i.env"):
        text = text.replace(env_file, str(ENV_EXAMPLE))
    copy = directory / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.parametrize("unit_file", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_unit_loads_in_systemd(unit_file: Path, tmp_path: Path) -> None:
    """systemd-analyze verify, on a copy pointing at this checkout and this interpreter (the
    template as one of its instances)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed for this test"
    copy = local_copy(unit_file, tmp_path)
    if "@" in copy.name:
        copy = copy.with_name(copy.name.replace("@.", "@psss059."))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "psss-ioc" not in out.stderr, out.stderr  # no warning about our unit


def test_unit_runs_non_interactive_always_restarting_with_state_and_unbuffered_logs(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    service = unit["Service"]
    assert only(service, "Type") == "simple"
    assert only(service, "Restart") == "always"
    assert int(only(service, "RestartSec")) > 0
    assert only(service, "StandardInput") == "null"
    assert "PYTHONUNBUFFERED=1" in values(service, "Environment")
    assert only(service, "EnvironmentFile") == "/etc/psss-ioc/psss-ioc.env"
    assert only(service, "StateDirectory") == "psss-ioc"
    assert only(unit["Install"], "WantedBy") == "multi-user.target"
    assert only(unit["Unit"], "StartLimitIntervalSec") == "0"


def exec_start_args(unit: dict[str, list[tuple[str, str]]], state_dir: Path) -> list[str]:
    """ExecStart as systemd expands it: ${X} inside words, $X split into words."""
    env = active_env(ENV_EXAMPLE.read_text(encoding="utf-8"))
    env["STATE_DIRECTORY"] = str(state_dir)
    words = []
    for word in shlex.split(only(unit["Service"], "ExecStart")):
        if re.fullmatch(r"\$[A-Z][A-Z0-9_]*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Z][A-Z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return words


def test_exec_start_is_the_documented_boot_command(
    unit: dict[str, list[tuple[str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = unit["Service"]
    assert only(service, "WorkingDirectory") == INSTALL_TOP
    args = exec_start_args(unit, tmp_path)
    assert args[0] == f"{INSTALL_TOP}/.venv/bin/psss-ioc"
    assert args[1:4] == ["run", "--st-cmd", "iocBoot/iocpsss/st.cmd"]
    # `psss-ioc run` accepts the whole command line (run from the working directory)
    monkeypatch.chdir(TOP)
    ctx = run_command.make_context("run", args[2:])
    assert Path(ctx.params["st_cmd"]).resolve() == BOOT / "st.cmd"
    assert ctx.params["autosave_dir"] == tmp_path / "autosave"
    assert ctx.params["auto_start"] is True


def _epics_library_text() -> bytes:
    libs = [*Path(epicscorelibs.path.lib_path).glob("lib*.so"),
            *(Path(pvxslibs.__file__).parent / "lib").glob("lib*.so")]
    assert libs
    return b"".join(lib.read_bytes() for lib in libs)


def _python_reads(name: str, value: str | None, code: str) -> str:
    """What a fresh interpreter prints with `code`, the variable set to `value` or unset."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if value is not None:
        env[name] = value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_every_variable_named_is_read_by_epics_python_numba_systemd_or_the_unit(
    unit: dict[str, list[tuple[str, str]]], tmp_path: Path,
) -> None:
    service = unit["Service"]
    names = set(env_assignments(ENV_EXAMPLE.read_text(encoding="utf-8")))
    names |= {v.partition("=")[0] for v in values(service, "Environment")}
    exec_start = only(service, "ExecStart")
    names |= set(_REFERENCE.findall(exec_start))
    libraries = _epics_library_text()
    unread = []
    for name in sorted(names):
        if name.startswith("EPICS_"):
            # the EPICS libraries softioc loads (CA: libCom/libca/libdbCore, PVA: pvxs) name it
            if not re.search(rb"(?<![A-Z0-9_])" + name.encode() + rb"(?![A-Z0-9_])", libraries):
                unread.append(name)
        elif name == "PYTHONUNBUFFERED":
            # stdout on a pipe: buffered, unless the variable makes it raw
            code = "import sys; print(type(sys.stdout.buffer).__name__)"
            assert _python_reads(name, None, code) == "BufferedWriter"
            assert _python_reads(name, "1", code) == "FileIO"
        elif name == "NUMBA_CACHE_DIR":
            seen = _python_reads(name, str(tmp_path),
                                 "import numba.core.config as c; print(c.CACHE_DIR)")
            assert seen == str(tmp_path)
        elif name == "STATE_DIRECTORY":  # set by systemd from StateDirectory=
            assert values(service, "StateDirectory")
        elif name == "PSSS_IOC_ARGS":  # read by the unit itself
            assert f"${name}" in exec_start.split()
        elif name == "PSSS_REST_TOKEN":  # read by `psss-ioc run` (--rest-token)
            previous = os.environ.get(name)
            os.environ[name] = "t"
            try:
                assert run_command.make_context("run", []).params["rest_token"] == "t"
            finally:
                os.environ.pop(name)
                if previous is not None:
                    os.environ[name] = previous
        elif name == "PSSS_BACKGROUND_PATH":  # read by `psss-ioc run` (--background-path)
            previous = os.environ.get(name)
            os.environ[name] = f"{tmp_path}/a:{tmp_path}/b"
            try:
                assert run_command.make_context("run", []).params["background_paths"] == (
                    tmp_path / "a", tmp_path / "b")
            finally:
                os.environ.pop(name)
                if previous is not None:
                    os.environ[name] = previous
        else:
            unread.append(name)
    assert not unread, f"variables nothing reads: {unread}"
    assert {"EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_MAX_ARRAY_BYTES",
            "EPICS_PVA_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST"} <= names


def test_env_example_values_suit_the_ioc() -> None:
    env = active_env(ENV_EXAMPLE.read_text(encoding="utf-8"))
    # a spectrum waveform (MAX_WIDTH doubles) and its header must fit through CA
    assert int(env["EPICS_CA_MAX_ARRAY_BYTES"]) == 40_000_000 > pvs.MAX_WIDTH * 8
    assert env["EPICS_CA_AUTO_ADDR_LIST"] == env["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_CA_ADDR_LIST"] and env["EPICS_PVA_ADDR_LIST"]
    # placeholders only: documentation addresses (RFC 5737), no real host
    for name in ("EPICS_CA_ADDR_LIST", "EPICS_PVA_ADDR_LIST"):
        assert all(a.startswith("192.0.2.") for a in env[name].split())
    st_cmd = (BOOT / "st.cmd").read_text(encoding="utf-8")
    assert f'epicsEnvSet("EPICS_CA_MAX_ARRAY_BYTES", "{env["EPICS_CA_MAX_ARRAY_BYTES"]}")' \
        in st_cmd


# ------------------------------------------------------------------------------ hardening
SANDBOX = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateDevices": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "LockPersonality": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
}
# Not the same in the template: what makes each instance its own.
PER_INSTANCE = {"Description", "EnvironmentFile", "StateDirectory", "SyslogIdentifier"}


@pytest.mark.parametrize("unit_file", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_unit_is_sandboxed_as_a_dedicated_user(unit_file: Path) -> None:
    service = unit_entries(unit_file.read_text(encoding="utf-8"))["Service"]
    for key, value in SANDBOX.items():
        assert only(service, key) == value, key
    families = set(only(service, "RestrictAddressFamilies").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    # numba compiles the kernels into executable memory at run time
    assert not values(service, "MemoryDenyWriteExecute")
    assert only(service, "User") == "psss-ioc" and not values(service, "DynamicUser")
    # ProtectSystem=strict: the state and cache directories are the only writable places
    assert only(service, "StateDirectory").startswith("psss-ioc")
    assert only(service, "CacheDirectory") == "psss-ioc"
    assert "NUMBA_CACHE_DIR=/var/cache/psss-ioc/numba" in values(service, "Environment")
    assert int(only(service, "LimitNOFILE")) >= 16384  # a socket per client and stream


def test_template_is_the_unit_per_instance() -> None:
    """psss-ioc@NAME.service: its own environment file, state directory and log name;
    everything else exactly as psss-ioc.service."""
    single = unit_entries(UNIT.read_text(encoding="utf-8"))
    template = unit_entries(TEMPLATE.read_text(encoding="utf-8"))
    for section in ("Unit", "Service", "Install"):
        def common(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
            return [(k, v) for k, v in entries if k not in PER_INSTANCE]
        assert common(template[section]) == common(single[section]), section
    service = template["Service"]
    assert only(service, "EnvironmentFile") == "/etc/psss-ioc/%i.env"
    assert only(service, "StateDirectory") == "psss-ioc/%i"
    assert "%i" in only(service, "SyslogIdentifier")


def test_exposure_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`systemd-analyze security --offline`: printed, and 4 or lower (it was 8.7)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here: the sandbox settings are checked above")
    for unit_file in (UNIT, TEMPLATE):
        out = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                              str(local_copy(unit_file, tmp_path))],
                             capture_output=True, text=True, timeout=60, check=False)
        found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)",
                          out.stdout)
        if found is None and "offline" in out.stderr:
            pytest.skip(f"systemd-analyze without --offline: {out.stderr.strip()}")
        assert found, out.stdout + out.stderr
        with capsys.disabled():
            print(f"\n{unit_file.name}: systemd-analyze security exposure {found.group(1)} "
                  f"{found.group(2)}")
        assert float(found.group(1)) <= 4.0, out.stdout


def readme_deployment() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## Deployment"):text.index("## Troubleshooting")]


def test_install_steps_runtime_only_and_environment_file_root_only() -> None:
    """The venv of a production host has no test tools; the file with the REST token is
    readable by root only (systemd reads it before dropping to the service user)."""
    section = readme_deployment()
    installs = re.findall(r"^\s*install .*psss-ioc\.env\.example.*$", section, re.M)
    assert installs and all(" -m 600 " in line for line in installs), installs
    pip = re.findall(r"pip install \S+", section)
    assert pip == ["pip install ."], pip  # no `.[test]`
    for unit_file in (UNIT, TEMPLATE):
        comments = unit_file.read_text(encoding="utf-8")
        assert "-m 600 iocBoot/iocpsss/psss-ioc.env.example" in comments, unit_file.name
        assert "-m 644 iocBoot/iocpsss/psss-ioc.env.example" not in comments, unit_file.name
    assert "PSSS_REST_TOKEN" in ENV_EXAMPLE.read_text(encoding="utf-8")

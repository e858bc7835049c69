"""How the REST API is configured: `psss-ioc run` options, the legacy command line, st.cmd
variables; the background directory; the background checks. No IOC process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psss_ioc import commands, ioc, rest
from psss_ioc.ioc_config import IocConfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[IocConfig, set[str]]]:
    """`ioc.run` replaced: the configs the commands would boot with."""
    seen: list[tuple[IocConfig, set[str]]] = []

    def fake_run(config: IocConfig, explicit: set[str] | None = None, **_: Any) -> None:
        seen.append((config, explicit or set()))

    monkeypatch.setattr(ioc, "run", fake_run)
    monkeypatch.delenv("PSSS_REST_TOKEN", raising=False)
    return seen


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    result = CliRunner().invoke(commands.run_command, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_run_serves_rest_on_loopback_12000_by_default(captured: list[Any]) -> None:
    _run([])
    config, _ = captured[-1]
    assert config.rest == ("127.0.0.1", 12000) and config.rest_token is None
    assert config.background_dir is None


def test_run_rest_options(captured: list[Any], tmp_path: Path) -> None:
    _run(["--rest-host", "0.0.0.0", "--rest-port", "12345", "--rest-token", "t",
          "--background-dir", str(tmp_path)])
    config, explicit = captured[-1]
    assert config.rest == ("0.0.0.0", 12345) and config.rest_token == "t"
    assert config.background_dir == tmp_path
    assert {"rest_host", "rest_port"} <= explicit
    _run(["--no-rest"])
    assert captured[-1][0].rest is None
    _run(["--rest-port", "0"])
    assert captured[-1][0].rest is None
    _run([], env={"PSSS_REST_TOKEN": "from-env"})
    assert captured[-1][0].rest_token == "from-env"


def test_legacy_command_line_serves_rest_where_it_did(captured: list[Any]) -> None:
    result = CliRunner().invoke(commands.legacy_main, ["tcp://cam:9000", "-r", "12001"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert captured[-1][0].rest == ("0.0.0.0", 12001)


@pytest.mark.parametrize(("env", "explicit", "before", "after"), [
    ({}, set(), ("127.0.0.1", 12000), ("127.0.0.1", 12000)),
    ({"PSSS_REST_HOST": "0.0.0.0", "PSSS_REST_PORT": "12002"}, set(),
     ("127.0.0.1", 12000), ("0.0.0.0", 12002)),
    ({"PSSS_REST_PORT": "0"}, set(), ("127.0.0.1", 12000), None),
    # the command line wins over st.cmd
    ({"PSSS_REST_HOST": "0.0.0.0", "PSSS_REST_PORT": "12002"}, {"rest_host", "rest_port"},
     ("127.0.0.1", 12003), ("127.0.0.1", 12003)),
    ({"PSSS_REST_PORT": "12002"}, {"no_rest"}, None, None),
])
def test_boot_script_sets_rest_host_and_port(env: dict[str, str], explicit: set[str],
                                             before: Any, after: Any) -> None:
    config = IocConfig(rest=before)
    ioc.apply_boot_environment(config, env, explicit)
    assert config.rest == after


def test_shipped_st_cmd_sets_the_rest_defaults() -> None:
    st_cmd = (Path(__file__).parent.parent / "iocBoot" / "iocpsss" / "st.cmd").read_text()
    assert 'epicsEnvSet("PSSS_REST_HOST", "127.0.0.1")' in st_cmd
    assert f'epicsEnvSet("PSSS_REST_PORT", "{rest.DEFAULT_PORT}")' in st_cmd


def test_background_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert rest.default_background_dir(IocConfig(background_dir=tmp_path)) == tmp_path
    assert (rest.default_background_dir(IocConfig(autosave_dir=tmp_path / "as"))
            == tmp_path / "as" / "backgrounds")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    # autosave on by default: uploads live beside the saved settings of this prefix
    assert (rest.default_background_dir(IocConfig(prefix="CAM"))
            == tmp_path / "state" / "psss-ioc" / "CAM" / "backgrounds")
    assert (rest.default_background_dir(IocConfig(autosave=False))
            == tmp_path / "state" / "psss-ioc" / "backgrounds")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd"))
    assert (rest.default_background_dir(IocConfig())
            == tmp_path / "systemd" / "backgrounds")


def test_stored_names_are_new_and_safe(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    first = rest.write_background(tmp_path, "../../etc/dark frame.h5", image)
    second = rest.write_background(tmp_path, "../../etc/dark frame.h5", image)
    assert first != second and first.parent == second.parent == tmp_path.resolve()
    assert first.name.startswith("dark_frame_") and first.suffix == ".h5"
    assert not list(tmp_path.glob("*.part"))
    assert rest.write_background(tmp_path, "", image).name.startswith("background_")


@pytest.mark.parametrize(("data", "shape"), [
    ([[0, 65535], [1, 2]], None),
    ([[1.0, 2.0]], None),
    (np.ones((3, 4), dtype=np.int64), (3, 4)),
    (np.ones((3, 4), dtype=np.float32), (3, 4)),
])
def test_good_backgrounds_become_uint16(data: Any, shape: Any) -> None:
    array = rest.background_array(data, shape)
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, np.asarray(data))

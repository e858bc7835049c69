"""How the REST API is configured: `psss-ioc run` options, the legacy command line, st.cmd
variables; the background directory; the background checks. No IOC process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psss_ioc.cli import commands
from psss_ioc.core import background
from psss_ioc.ioc import app as ioc
from psss_ioc.ioc import parameters
from psss_ioc.ioc.config import IocConfig
from psss_ioc.rest import server as rest


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


def test_legacy_command_line_sends_the_v18_names_and_layout(captured: list[Any]) -> None:
    """psss_processing replaces 1.8.0: its names, the image on its own stream on 8890."""
    for args, names, image_port in (
            ([], "v1.8", 8890),
            (["--image_output_stream_port", "9001"], "v1.8", 9001),
            (["--output_names", "document"], "document", None)):
        result = CliRunner().invoke(commands.legacy_main, ["tcp://cam:9000", *args],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        config = captured[-1][0]
        assert (config.output_names, config.image_output_port) == (names, image_port), args


def test_run_output_names(captured: list[Any]) -> None:
    _run([])
    assert (captured[-1][0].output_names, captured[-1][0].image_output_port) == ("document",
                                                                                None)
    _run(["--output-names", "v1.8"])
    config, explicit = captured[-1]
    assert (config.output_names, config.image_output_port) == ("v1.8", 8890)
    assert "output_names" in explicit
    _run(["--output-names", "v1.8", "--image-output-port", "9002"])
    assert captured[-1][0].image_output_port == 9002


def test_boot_script_sets_the_output_names() -> None:
    config = IocConfig()
    ioc.apply_boot_environment(config, {"PSSS_OUTPUT_NAMES": "v1.8"}, set())
    assert config.output_names == "v1.8"
    config = IocConfig()  # the command line wins
    ioc.apply_boot_environment(config, {"PSSS_OUTPUT_NAMES": "v1.8"}, {"output_names"})
    assert config.output_names == "document"
    with pytest.raises(ValueError, match="PSSS_OUTPUT_NAMES"):
        ioc.apply_boot_environment(IocConfig(), {"PSSS_OUTPUT_NAMES": "1.8"}, set())
    st_cmd = (Path(__file__).parent.parent / "iocBoot" / "iocpsss" / "st.cmd").read_text()
    assert 'epicsEnvSet("PSSS_OUTPUT_NAMES", "v1.8")' in st_cmd


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
    first = background.write_background(tmp_path, "../../etc/dark frame.h5", image)
    second = background.write_background(tmp_path, "../../etc/dark frame.h5", image)
    assert first != second and first.parent == second.parent == tmp_path.resolve()
    assert first.name.startswith("dark_frame_") and first.suffix == ".h5"
    assert not list(tmp_path.glob("*.part"))
    assert background.write_background(tmp_path, "", image).name.startswith("background_")
    # the name it was uploaded under stays with the file
    assert parameters.uploaded_name(str(first)) == "../../etc/dark frame.h5"
    assert parameters.uploaded_name(str(tmp_path / "none.h5")) is None


@pytest.mark.parametrize(("changes", "reason"), [
    ({"tag": [1]}, "a number, a string, true/false or null"),
    ({"tag": {"a": 1}}, "a number, a string, true/false or null"),
    ({"tag": float("nan")}, "not a number"),
    ({"tag": "x" * 257}, "256 characters"),
    ({"x" * 65: 1}, "64 characters"),
    ({"": 1}, "non-empty"),
    ({"roi": "x"}, "a setting"),
    ({f"k{i}": i for i in range(33)}, "at most 32"),
])
def test_extra_parameters_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parameters.merged_extra({}, changes)


def test_extra_parameters_kept_changed_removed() -> None:
    extra = parameters.merged_extra({}, {"tag": "a\x00b", "n": 3, "ok": False, "x": 1.5})
    text = parameters.dump_extra(extra)
    assert "\x00" not in text and parameters.parse_extra(text) == extra
    extra = parameters.merged_extra(extra, {"n": None, "tag": "c"})
    assert extra == {"tag": "c", "ok": False, "x": 1.5}
    full = parameters.merged_extra({}, {f"k{i}": i for i in range(32)})
    assert len(parameters.merged_extra(full, {"k0": None, "new": 1})) == 32
    assert parameters.parse_extra("") == {}
    for bad in ("[1]", "{", '{"roi": 1}'):
        with pytest.raises(ValueError):
            parameters.parse_extra(bad)


@pytest.mark.parametrize(("data", "shape"), [
    ([[0, 65535], [1, 2]], None),
    ([[1.0, 2.0]], None),
    (np.ones((3, 4), dtype=np.int64), (3, 4)),
    (np.ones((3, 4), dtype=np.float32), (3, 4)),
])
def test_good_backgrounds_become_uint16(data: Any, shape: Any) -> None:
    array = background.background_array(data, shape)
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, np.asarray(data))

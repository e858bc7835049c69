"""The conda recipe agrees with pyproject.toml: name, version, entry points, run requirements."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

TOP = Path(__file__).resolve().parent.parent
RECIPE = TOP / "conda-recipe" / "meta.yaml"
PYPROJECT = tomllib.loads((TOP / "pyproject.toml").read_text(encoding="utf-8"))

# PyPI distribution name -> conda package name (conda-forge unless noted). Every dependency
# of pyproject.toml must be listed here: a new one makes the test below fail until the recipe
# and this mapping are updated together.
CONDA_NAMES = {
    "numpy": "numpy",
    "numba": "numba",
    "scipy": "scipy",
    "h5py": "h5py",
    "click": "click",
    "pyzmq": "pyzmq",
    "psi-bsread": "bsread",  # paulscherrerinstitute channel
    "psi-mflow": "mflow",  # paulscherrerinstitute channel
    "bitshuffle": "bitshuffle",
    "lz4": "lz4",  # the Python binding (the C library is lz4-c)
    "softioc": "softioc",
    "pyepics": "pyepics",
    "requests": "requests",
    "aiohttp": "aiohttp",
}

# Floors of the recipe that differ from pyproject.toml's, because the channels cannot meet
# them: PSI's channel (which provides bitshuffle under strict priority) has 0.3.6 at most.
CONDA_FLOORS = {"bitshuffle": ">=0.3.6"}
# Run requirements on neither channel: built by the recipes beside the main one (their own
# requirements that the channels lack too: epicscorelibs 7.0.10, pvxslibs, epicsdbbuilder).
BUILT_BESIDE = ("softioc", "epicscorelibs", "pvxslibs", "epicsdbbuilder")

# conda-build variables a recipe may use in {{ }} (the value only matters for parsing)
BUILD_VARIABLES = {"PYTHON": "python"}

_SET = re.compile(r"^\{%\s*set\s+(\w+)\s*=\s*(.+?)\s*%\}\s*$")
_EXPR = re.compile(r"\{\{\s*(.+?)\s*\}\}")
_LOAD = re.compile(r"""^load_file_data\(\s*["']([^"']+)["']\s*\)$""")
_LOOKUP = re.compile(r"""^(\w+)((?:\[\s*["'][^"']+["']\s*\])*)$""")


def _evaluate(expr: str, names: dict[str, Any]) -> Any:
    """The Jinja this recipe uses: load_file_data("file"), name["key"]["key"]... and (the
    recipes beside it) a string literal."""
    if literal := re.fullmatch(r'"([^"]*)"', expr):
        return literal.group(1)
    if load := _LOAD.match(expr):
        # conda-build reads the file from the source tree (source: path: .. = the repo top)
        return tomllib.loads((TOP / load.group(1)).read_text(encoding="utf-8"))
    lookup = _LOOKUP.match(expr)
    if lookup is None or lookup.group(1) not in names:
        raise ValueError(f"Jinja expression this test cannot render: {expr!r}")
    value = names[lookup.group(1)]
    for key in re.findall(r"""["']([^"']+)["']""", lookup.group(2)):
        value = value[key]
    return value


def render_recipe(text: str) -> str:
    """Minimal Jinja: `{% set %}` lines and `{{ }}` lookups; anything else is an error."""
    names: dict[str, Any] = dict(BUILD_VARIABLES)
    lines = []
    for line in text.splitlines():
        if match := _SET.match(line):
            names[match.group(1)] = _evaluate(match.group(2), names)
            continue
        if "{%" in line:
            raise ValueError(f"Jinja statement this test cannot render: {line!r}")
        lines.append(_EXPR.sub(lambda m: str(_evaluate(m.group(1), names)), line))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    return yaml.safe_load(render_recipe(RECIPE.read_text(encoding="utf-8")))


def split_requirement(spec: str) -> tuple[str, str]:
    """'numpy>=1.26' or 'numpy >=1.26' -> ('numpy', '>=1.26')."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$", spec)
    assert match, spec
    return match.group(1).lower(), match.group(2).replace(" ", "")


def test_name_version_and_summary_come_from_pyproject(recipe: dict[str, Any]) -> None:
    project = PYPROJECT["project"]
    assert recipe["package"] == {"name": project["name"], "version": project["version"]}
    assert recipe["about"]["summary"] == project["description"]
    assert recipe["about"]["license"] == project["license"]
    assert (TOP / recipe["about"]["license_file"]).is_file()


def test_noarch_python_built_with_pip(recipe: dict[str, Any]) -> None:
    build = recipe["build"]
    assert build["noarch"] == "python"
    assert re.match(r"^python -m pip install \. .*--no-deps", build["script"])
    host = [split_requirement(r)[0] for r in recipe["requirements"]["host"]]
    assert "pip" in host and "python" in host
    backend = [split_requirement(r)[0] for r in PYPROJECT["build-system"]["requires"]]
    assert set(backend) <= set(host)


def test_entry_points_are_the_console_scripts(recipe: dict[str, Any]) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    entry_points = dict(
        (name.strip(), target.strip())
        for name, target in (e.split("=", 1) for e in recipe["build"]["entry_points"])
    )
    assert entry_points == scripts


def test_run_requirements_match_pyproject_dependencies(recipe: dict[str, Any]) -> None:
    dependencies = dict(split_requirement(d) for d in PYPROJECT["project"]["dependencies"])
    assert set(dependencies) == set(CONDA_NAMES), "update CONDA_NAMES and the recipe"
    expected = {CONDA_NAMES[name]: CONDA_FLOORS.get(CONDA_NAMES[name], version)
                for name, version in dependencies.items()}
    python = PYPROJECT["project"]["requires-python"]
    expected["python"] = python
    run = dict(split_requirement(r) for r in recipe["requirements"]["run"])
    assert run == expected


def test_recipe_test_section_imports_the_package_and_runs_the_cli(
    recipe: dict[str, Any],
) -> None:
    test = recipe["test"]
    assert "psss_ioc" in test["imports"]
    for script in PYPROJECT["project"]["scripts"]:
        assert f"{script} --help" in test["commands"]
    # the packaged operator screen is shipped and up to date
    assert "psss-ioc screens --check" in test["commands"]


def test_renderer_refuses_jinja_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="cannot render"):
        render_recipe("version: {{ environ['GIT_DESCRIBE_TAG'] }}\n")
    with pytest.raises(ValueError, match="cannot render"):
        render_recipe("{% if linux %}\n")


def sub_recipe(name: str) -> dict[str, Any]:
    """A recipe beside the main one; compiler()/pin_compatible() and selectors as plain text."""
    text = (RECIPE.parent / name / "meta.yaml").read_text(encoding="utf-8")
    text = re.sub(r"\{\{\s*(compiler|pin_compatible)\('([\w-]+)'\)\s*\}\}", r"\1-\2", text)
    sub: dict[str, Any] = yaml.safe_load(render_recipe(text))
    sub["package"]["version"] = str(sub["package"]["version"])  # conda-build reads "1.5" so
    return sub


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def test_packages_no_channel_has_are_built_by_recipes_beside(recipe: dict[str, Any]) -> None:
    """softioc and what it needs, from PyPI sources pinned by hash; versions that meet the
    floors the other recipes ask for."""
    built = {name: sub_recipe(name) for name in BUILT_BESIDE}
    for name, sub in built.items():
        assert sub["package"]["name"] == name
        source = sub["source"]
        assert source["url"].startswith("https://pypi.org/packages/source/"), name
        assert source["url"].endswith(f"{name}-{sub['package']['version']}.tar.gz"), name
        assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"]), name
        assert "--no-deps" in sub["build"]["script"], name
        assert name in sub["test"]["imports"][0], name
    run = dict(split_requirement(r) for r in recipe["requirements"]["run"])
    floor = run["softioc"].removeprefix(">=")
    assert _version(built["softioc"]["package"]["version"]) >= _version(floor)
    # every run requirement between them is met by the version built beside
    for name, sub in built.items():
        for requirement in sub["requirements"]["run"]:
            dep, spec = split_requirement(requirement)
            if dep not in built:
                continue
            have = _version(built[dep]["package"]["version"])
            for clause in filter(None, spec.split(",")):
                op, bound = re.match(r"(>=|<|==|)(.*)", clause).groups()  # type: ignore[union-attr]
                if op == ">=":
                    assert have >= _version(bound), (name, requirement)
                elif op == "<":
                    assert have < _version(bound), (name, requirement)
                else:
                    assert have == _version(bound), (name, requirement)

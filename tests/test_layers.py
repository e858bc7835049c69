"""The package's layers, as docs/architecture.md draws them: arrows point downward only.

Parses every module's imports (also those inside functions) and fails on an import cycle
between modules or on an arrow the architecture forbids.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "psss_ioc"

# third-party packages that speak EPICS, HTTP or ZeroMQ
EPICS = {"softioc", "epicscorelibs", "epics", "p4p", "pvxslibs"}
HTTP = {"aiohttp", "requests"}
SOCKETS = {"zmq", "bsread", "mflow"}


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _is_module(dotted: str) -> bool:
    p = PACKAGE.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of psss_ioc, third-party top-level packages) that `path` imports."""
    own: set[str] = set()
    third: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == "psss_ioc":
                    own.add(rest or "__init__")
                else:
                    third.add(top)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top, _, base = node.module.partition(".")
            if top != "psss_ioc":
                third.add(top)
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                own.add(name if _is_module(name) else base or "__init__")
    return own, third


GRAPH = {_module_of(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        for target in GRAPH.get(module, (set(), set()))[0]:
            if target == goal:
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def test_the_graph_is_read() -> None:
    """(A parser that found nothing would pass every rule below.)"""
    assert "ioc.pvs" in GRAPH["ioc.app"][0]
    assert "softioc" in GRAPH["ioc.app"][1]
    assert "core.fit" in GRAPH["core.processing"][0]


def test_no_import_cycles() -> None:
    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a, (own, _) in GRAPH.items()
                    for b in own if b != a and _reaches(b, a))
    assert not cycles, cycles


def _in(module: str, *layers: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def test_the_core_knows_nothing_of_epics_http_or_sockets() -> None:
    for module, (own, third) in GRAPH.items():
        if _in(module, "core"):
            assert not third & (EPICS | HTTP | SOCKETS), (module, third)
            assert all(_in(m, "core") for m in own), (module, own)


def test_the_pipeline_knows_nothing_of_epics_or_the_pv_table() -> None:
    for module, (own, third) in GRAPH.items():
        if _in(module, "pipeline"):
            assert not third & (EPICS | HTTP | SOCKETS), (module, third)
            assert all(_in(m, "core", "pipeline", "ratelimit") for m in own), (module, own)


def test_streams_know_nothing_of_the_ioc_or_epics() -> None:
    for module, (own, third) in GRAPH.items():
        if _in(module, "streams"):
            assert not third & (EPICS | HTTP), (module, third)
            assert not any(_in(m, "ioc", "rest", "cli", "generate", "bench") for m in own), (
                module, own)


def test_the_control_layer_speaks_no_epics_and_no_http() -> None:
    own, third = GRAPH["ioc.control"]
    assert not third & (EPICS | HTTP), third
    assert not any(_in(m, "ioc.app", "rest", "cli") for m in own), own


def test_one_softioc_user_one_http_server() -> None:
    softioc_users = {m for m, (_, third) in GRAPH.items() if "softioc" in third}
    assert softioc_users == {"ioc.app"}
    servers = {m for m, (_, third) in GRAPH.items() if "aiohttp" in third}
    assert servers == {"rest.server"}


def test_benchmarks_do_not_import_the_command_line() -> None:
    for module, (own, _) in GRAPH.items():
        if _in(module, "bench"):
            assert not any(_in(m, "cli") for m in own), (module, own)

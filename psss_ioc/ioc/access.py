"""Access security as the IOC applies it (EPICS asLib), for start-up and for the REST shim.

Channel Access and PV Access puts are checked by asLib itself. The REST shim is a second door
to the same settings, so it asks asLib the same question for the HTTP client's address: may a
client on this host write the value of a record in the settings group (`pvs.SETTINGS_ASG`)
under the access security file in force? The answer follows the file the IOC loaded (the boot
script's ``asSetFilename``, ``--acf``, else the built-in `DEFAULT_ACF`), exactly as a
``caput`` from that host would get it.

Hosts are checked by address (``asCheckClientIP``): asLib resolves the host names of every HAG
when it loads the file and compares the client's IP address. PV Access (pvxs QSRV) always
passes the client's address, and a Channel Access client's own claim of its host name is then
ignored. User names (UAG) are whatever the client says: not authenticated.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from psss_ioc.ioc import pvs

log = logging.getLogger(__name__)

DEFAULT_ACF = Path(__file__).resolve().parent / "default.acf"
# The host list of the shipped psss.acf; the macro names the IOC's own host.
CONTROL_HOSTS = "control_hosts"
IOC_HOST_MACRO = "IOC_HOST"

_AS_READ, _AS_WRITE = 1, 2
_VALUE_LEVEL = 0  # VAL, the field a REST write ends up in, is an ASL0 field


class _AsgClient(ctypes.Structure):
    """asLib.h `struct asgClient` (EPICS 7): only `access` is read."""

    _fields_ = [
        ("next", ctypes.c_void_p),
        ("previous", ctypes.c_void_p),
        ("pasgMember", ctypes.c_void_p),
        ("user", ctypes.c_char_p),
        ("host", ctypes.c_char_p),
        ("userPvt", ctypes.c_void_p),
        ("pcallback", ctypes.c_void_p),
        ("level", ctypes.c_int),
        ("access", ctypes.c_int),
        ("trapMask", ctypes.c_int),
    ]


def _libraries() -> tuple[Any, Any]:
    from epicscorelibs.ioc import Com, dbCore

    return Com, dbCore


def check_client_addresses() -> None:
    """``var asCheckClientIP 1``: HAG host names are resolved when the file is loaded and the
    client's IP address is compared (before iocInit; the boot script cannot turn it off)."""
    com, _ = _libraries()
    ctypes.c_int.in_dll(com, "asCheckClientIP").value = 1


def set_file(path: Path) -> None:
    """``asSetFilename``: the file iocInit loads (the last one set wins)."""
    _, db_core = _libraries()
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"access security file {path} does not exist")
    fn = db_core.asSetFilename
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = ctypes.c_int
    if fn(str(path).encode()) != 0:
        raise RuntimeError(f"asSetFilename({path}) failed")


def set_substitutions(text: str) -> None:
    """``asSetSubstitutions``: macros of the access security file ("NAME=value,...")."""
    _, db_core = _libraries()
    fn = db_core.asSetSubstitutions
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = ctypes.c_int
    if fn(text.encode()) != 0:
        raise RuntimeError(f"asSetSubstitutions({text!r}) failed")


def use_defaults() -> None:
    """Before the boot script: the built-in file, and $(IOC_HOST) for any file that names the
    IOC's own host (psss.acf). A boot script's asSetFilename/asSetSubstitutions replace them."""
    check_client_addresses()
    set_file(DEFAULT_ACF)
    set_substitutions(f"{IOC_HOST_MACRO}={socket.gethostname()}")


def active() -> bool:
    """Access security loaded (after iocInit)."""
    com, _ = _libraries()
    return bool(ctypes.c_int.in_dll(com, "asActive").value)


def hag_hosts(name: str = CONTROL_HOSTS) -> tuple[str, ...] | None:
    """The hosts of one HAG in force, as asLib holds them (IP addresses under
    asCheckClientIP, ``unresolved:<name>`` for a name that did not resolve); None when the
    file in force has no such HAG."""
    com, _ = _libraries()
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    dump = com.asDumpHagFP
    dump.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    dump.restype = ctypes.c_int
    with tempfile.TemporaryFile() as out:
        stream = libc.fdopen(os.dup(out.fileno()), b"w")
        if not stream:
            raise OSError("fdopen failed")
        try:
            dump(stream, name.encode())
        finally:
            libc.fclose(stream)
        out.seek(0)
        text = out.read().decode(errors="replace")
    for line in text.splitlines():  # HAG(name) {host,host}
        head, _, body = line.partition("{")
        if head.strip() == f"HAG({name})":  # no "{...}": a HAG without hosts
            return tuple(h.strip() for h in body.rstrip().rstrip("}").split(",") if h.strip())
    return None


def client_address(remote: str | None) -> str | None:
    """An HTTP peer address as asLib compares it (IPv4 dotted quad); None if it has none.
    IPv6 loopback is the IPv4 one; other IPv6 addresses match no HAG entry."""
    if not remote:
        return None
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_loopback:
            return "127.0.0.1"
        else:
            return None
    return str(address)


class SettingsWriteCheck:
    """May a client at this address write a setting's value, as asLib decides for CA/PVA?

    One asLib member of the settings group, made on first use (asLib must be active); each
    check adds a client with the address, reads its access and removes it again.
    """

    def __init__(self, group: str = pvs.SETTINGS_ASG) -> None:
        self._group = ctypes.create_string_buffer(group.encode())  # asLib keeps the pointer
        self._user = ctypes.create_string_buffer(b"")
        self._member = ctypes.c_void_p()
        self._lock = threading.Lock()

    def allows(self, remote: str | None) -> bool:
        if not active():  # no access security: CA and PVA allow every write too
            return True
        address = client_address(remote)
        if address is None:
            return False
        com, _ = _libraries()
        with self._lock:
            if not self._member:
                add_member = com.asAddMember
                add_member.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
                add_member.restype = ctypes.c_long
                if add_member(ctypes.byref(self._member), self._group) != 0:
                    log.error("access security: no member of %s; REST writes refused",
                              self._group.value.decode())
                    return False
            add_client = com.asAddClient
            add_client.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
            add_client.restype = ctypes.c_long
            remove_client = com.asRemoveClient
            remove_client.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            remove_client.restype = ctypes.c_long
            host = ctypes.create_string_buffer(address.encode())  # asLib lowercases in place
            client = ctypes.c_void_p()
            status = add_client(ctypes.byref(client), self._member, _VALUE_LEVEL, self._user,
                                host)
            try:
                if status != 0 or not client:
                    return False
                return ctypes.cast(client, ctypes.POINTER(_AsgClient)).contents.access \
                    >= _AS_WRITE
            finally:
                if client:
                    remove_client(ctypes.byref(client))


_settings_check = SettingsWriteCheck()


def may_write_settings(remote: str | None) -> bool:
    """The REST shim's host check (see `SettingsWriteCheck`)."""
    return _settings_check.allows(remote)


def describe() -> str:
    """One log line on who may write the settings under the file in force."""
    hosts = hag_hosts()
    if hosts is None:
        return (f"access security: the file in force has no HAG({CONTROL_HOSTS}) (the "
                f"built-in one lets any host write the settings' values)")
    return f"access security: HAG({CONTROL_HOSTS}) = {', '.join(hosts) or 'no host'}"

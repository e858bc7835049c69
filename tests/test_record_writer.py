"""The GIL-free record writer against a real IOC database, in a subprocess of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from iochelpers import EPICS_ENV

SCRIPT = textwrap.dedent('''
    import math, os, numpy as np
    from softioc import softioc, builder, asyncio_dispatcher, fields
    from psss_ioc.ioc import record_writer as rw
    assert (rw.DBR_LONG, rw.DBR_ULONG, rw.DBR_INT64, rw.DBR_UINT64, rw.DBR_DOUBLE) == (
        fields.DBF_LONG, fields.DBF_ULONG, fields.DBF_INT64, fields.DBF_UINT64, fields.DBF_DOUBLE)
    builder.SetDeviceName("RW")
    builder.records.int64in("HEAD", TSE=-2, FLNK="RW:A")
    builder.records.ai("A", TSEL="RW:HEAD.TIME", FLNK="RW:W")
    builder.records.waveform("W", NELM=16, FTVL="DOUBLE", TSEL="RW:HEAD.TIME", FLNK="RW:M")
    builder.records.mbbi("M", TSEL="RW:HEAD.TIME", ZRST="ok", ONST="bad", ONSV="MAJOR")
    builder.LoadDatabase()
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    names = ["RW:HEAD", "RW:A", "RW:W", "RW:M"]
    rw.warm_up()
    assert len(rw._publish.signatures) == 1
    w = rw.FrameChainWriter(names)
    def read(name, n=1):
        buf = np.zeros(n)
        from softioc.imports import db_get_field
        db_get_field(name, fields.DBF_DOUBLE, buf.ctypes.data, n)
        return buf
    w.write([7, 2.5, np.arange(5.0), 1], 1_700_000_000, 5)
    assert read("RW:HEAD")[0] == 7 and read("RW:A")[0] == 2.5
    assert list(read("RW:W", 5)) == [0, 1, 2, 3, 4] and read("RW:W.NORD")[0] == 5
    assert read("RW:M")[0] == 1 and read("RW:M.SEVR")[0] == 2  # MAJOR from the state
    w.write([8, math.nan, np.zeros(0), 0], 1_700_000_001, 0)
    assert read("RW:W.NORD")[0] == 0
    w.write([9, 1.0, np.arange(3, dtype=np.uint32), 0], 1_700_000_002, 0)  # put as ULONG
    assert list(read("RW:W", 3)) == [0, 1, 2] and read("RW:W.NORD")[0] == 3
    w.write([10, math.nan, np.zeros(0), 0], 1_700_000_003, 0)
    assert read("RW:W.NORD")[0] == 0 and read("RW:A.SEVR")[0] == 3  # NaN: INVALID
    assert len(rw._publish.signatures) == 1  # warm_up compiled what the writes use
    for bad in ([1.0], [1.0] * (len(names) + 1)):
        try:
            w.write(bad, 0, 0)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {bad}")
    try:
        rw.FrameChainWriter(["RW:HEAD", "RW:NOPE"])
    except KeyError as e:
        assert "RW:NOPE" in str(e)
    else:
        raise AssertionError("accepted a missing record")
    print("OK")
    os._exit(0)
''')


def test_values_timestamps_and_errors_in_a_real_database() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, **EPICS_ENV})
    assert out.stdout.strip().endswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]

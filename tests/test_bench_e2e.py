"""Smoke run of `psss-ioc bench e2e` with tiny frames: the chain runs and reports its keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("forward", ["--forward-image", "--no-forward-image"])
def test_bench_e2e_reports_every_case(forward):
    out = subprocess.run(
        [sys.executable, "-m", "psss_ioc.cli", "bench", "e2e", "--json", "--duration", "2",
         "--step-seconds", "1", "--height", "64", "--width", "128", "--rate", "50",
         "--max-steps", "1", forward],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == {"rate_50hz", "ceiling", "max_lossless"}
    steady = rows["rate_50hz"]
    for key in ("rate_hz", "lost", "cpu_ms_per_frame", "ratio", "out_received"):
        assert key in steady
    assert steady["rate_hz"] > 0 and steady["cpu_ms_per_frame"] > 0
    # The user-space share is part of the whole (clock ticks: it may round to 0 on tiny frames).
    assert 0 <= steady["user_cpu_ms_per_frame"] <= steady["cpu_ms_per_frame"] + 1e-9
    assert 0 <= steady["floor_user_cpu_ms_per_frame"] <= steady["floor_cpu_ms_per_frame"] + 1e-9
    assert steady["floor_cpu_ms_per_frame"] > 0  # the bare relay ran and relayed frames
    assert steady["cpu_vs_floor"] == steady["cpu_ms_per_frame"] / steady["floor_cpu_ms_per_frame"]
    assert steady["out_received"] > 0  # the output stream carried the results
    assert rows["ceiling"]["rate_hz"] > 0
    assert 0.0 <= rows["max_lossless"]["ratio"] <= 1.0

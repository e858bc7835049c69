"""Smoke run of `psss-ioc bench soak` with tiny frames: the chain runs and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_soak_reports_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "psss_ioc.cli", "bench", "soak", "--json", "--frames", "300",
         "--rate", "100", "--height", "64", "--width", "128"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = out.stdout.splitlines()
    row = json.loads(line)
    for key in ("sent", "camera_dropped", "processed", "lost", "ioc_n_lost", "ioc_n_errors",
                "rss_start_mb", "rss_end_mb", "rss_growth_mb", "proc_time_ms_p50",
                "proc_time_ms_p99", "proc_time_ms_max", "proc_time_samples", "ca_updates",
                "out_received"):
        assert key in row, key
    assert row["sent"] == 300  # the camera sends until 300 are out (drops not included)
    assert 0 < row["processed"] <= row["sent"] and row["lost"] == row["sent"] - row["processed"]
    assert row["ioc_n_errors"] == 0
    assert row["rss_start_mb"] > 0 and row["rss_end_mb"] > 0
    assert row["proc_time_samples"] > 0
    assert 0 < row["proc_time_ms_p50"] <= row["proc_time_ms_p99"] <= row["proc_time_ms_max"]
    assert 0 < row["ca_updates"] <= row["processed"]
    assert 0 < row["out_received"] <= row["processed"]

"""Smoke run of `psss-ioc bench soak` with tiny frames: the chain runs and reports its figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys


def test_bench_soak_reports_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "psss_ioc.cli.main", "bench", "soak", "--json", "--frames", "300",
         "--rate", "100", "--height", "64", "--width", "128", "--sample-seconds", "0.5"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = out.stdout.splitlines()
    row = json.loads(line)
    for key in ("sent", "camera_dropped", "processed", "lost", "ioc_n_lost", "ioc_n_errors",
                "rss_start_mb", "rss_end_mb", "rss_growth_mb", "rss_warm_mb", "rss_peak_mb",
                "rss_hwm_mb", "rss_anon_end_mb", "rss_growth_after_warmup_mb",
                "rss_slope_mb_per_10k", "rss_slope_samples", "warmup_frames", "rss_curve",
                "ioc_cpu_ms_per_frame", "proc_time_ms_p50",
                "proc_time_ms_p99", "proc_time_ms_max", "proc_time_samples", "ca_updates",
                "out_received"):
        assert key in row, key
    assert row["sent"] == 300  # the camera sends until 300 are out (drops not included)
    assert 0 < row["processed"] <= row["sent"] and row["lost"] == row["sent"] - row["processed"]
    assert row["ioc_n_errors"] == 0
    assert row["rss_start_mb"] > 0 and row["rss_end_mb"] > 0
    curve = row["rss_curve"]  # [seconds, processed, rss, anon], first and last included
    assert len(curve) >= 3 and curve[0][2] == row["rss_start_mb"]
    assert curve[-1][1] == row["processed"] and curve[-1][2] == row["rss_end_mb"]
    assert [s[0] for s in curve] == sorted(s[0] for s in curve)
    assert row["rss_peak_mb"] == max(s[2] for s in curve) <= row["rss_hwm_mb"]
    assert row["warmup_frames"] == 60  # a fifth of the frames
    assert row["rss_slope_samples"] == sum(1 for s in curve if s[1] >= 60)
    assert row["ioc_cpu_ms_per_frame"] > 0
    assert row["proc_time_samples"] > 0
    assert 0 < row["proc_time_ms_p50"] <= row["proc_time_ms_p99"] <= row["proc_time_ms_max"]
    assert 0 < row["ca_updates"] <= row["processed"]
    assert 0 < row["out_received"] <= row["processed"]


def test_rss_curve_figures_tell_growth_after_warmup() -> None:
    from psss_ioc.bench.soak import RssCurve, slope

    assert slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0]) == 2.0
    assert math.isnan(slope([0, 1], [0.0, 1.0])) and math.isnan(slope([1, 1, 1], [0.0, 1, 2]))
    curve = RssCurve(os.getpid(), warmup_frames=1000)
    # warm-up: +50 MB in the first 1000 frames, then 1 MB per 1000 frames
    curve.samples = [(0.0, 0, 100.0, 50.0), (1.0, 500, 140.0, 90.0), (2.0, 1000, 150.0, 100.0),
                     (3.0, 2000, 151.0, 101.0), (4.0, 3000, 152.0, 102.0)]
    figures = curve.figures()
    assert figures["rss_start_mb"] == 100.0 and figures["rss_warm_mb"] == 150.0
    assert figures["rss_end_mb"] == 152.0 and figures["rss_peak_mb"] == 152.0
    assert figures["rss_growth_mb"] == 52.0 and figures["rss_growth_after_warmup_mb"] == 2.0
    assert figures["rss_slope_mb_per_10k"] == 10.0 and figures["rss_slope_samples"] == 3


def test_bench_soak_with_faults_loses_no_good_frame() -> None:
    """`bench soak --faults` with tiny frames and a short fault period: every fault happens at
    least once (CA burst, REST upload, camera restart with a malformed message), no good frame
    is lost, and the malformed messages are counted by the IOC."""
    out = subprocess.run(
        [sys.executable, "-m", "psss_ioc.cli.main", "bench", "soak", "--json", "--faults",
         "--fault-period", "5", "--frames", "1100", "--rate", "100", "--height", "64",
         "--width", "128", "--sample-seconds", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["sent"] == 1100 and row["lost"] == 0, row
    assert row["camera_restarts"] == 2 and row["malformed_sent"] >= 1, row
    assert row["ca_bursts"] >= 2 and row["rest_uploads"] >= 2 and row["rest_failures"] == 0
    assert row["ioc_n_errors"] >= row["malformed_sent"]

"""Smoke run of `psss-ioc bench e2e` with tiny frames: the chain runs and reports its keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from psss_ioc.bench import e2e
from psss_ioc.ioc import pvs


@pytest.mark.parametrize("forward", ["--forward-image", "--no-forward-image"])
def test_bench_e2e_reports_every_case(forward):
    # the forwarding run also compares compressed frames with plain ones (issue 19) and the
    # IOC with its image view at the default with the view off (issue 18); the other skips that
    compressed = ["--compression", "bitshuffle_lz4", "--roi", "10", "40"] \
        if forward == "--forward-image" else []
    view = forward == "--forward-image"
    out = subprocess.run(
        [sys.executable, "-m", "psss_ioc.cli.main", "bench", "e2e", "--json", "--duration", "2",
         "--step-seconds", "1", "--height", "64", "--width", "128", "--rate", "50",
         "--max-steps", "1", forward, *compressed, *([] if view else ["--no-view-phase"])],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == {"rate_50hz", "ceiling", "max_lossless",
                         *(["rate_50hz_bitshuffle_lz4"] if compressed else []),
                         *(["rate_50hz_no_view"] if view else [])}
    assert rows["rate_50hz"]["image_rate_hz"] == pvs.IMAGE_RATE.initial  # the IOC's default
    if view:
        off = rows["rate_50hz_no_view"]
        assert off["image_rate_hz"] == 0.0 and off["rate_hz"] > 0 and off["out_received"] > 0
        assert off["view_cpu_ms_per_frame"] == rows["rate_50hz"]["cpu_ms_per_frame"]
        assert off["no_view_cpu_ms_per_frame"] == off["cpu_ms_per_frame"] > 0
        assert off["view_vs_no_view"] == (off["view_cpu_ms_per_frame"]
                                          / off["no_view_cpu_ms_per_frame"])
    if compressed:
        packed = rows["rate_50hz_bitshuffle_lz4"]
        assert packed["rate_hz"] > 0 and packed["out_received"] > 0
        assert packed["compressed_vs_plain"] == (packed["cpu_ms_per_frame"]
                                                 / rows["rate_50hz"]["cpu_ms_per_frame"])
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
    ceiling = rows["ceiling"]
    assert ceiling["before_hz"] > 0 and ceiling["after_hz"] > 0
    assert ceiling["rate_hz"] == (ceiling["before_hz"] + ceiling["after_hz"]) / 2
    assert 0.0 <= rows["max_lossless"]["ratio"] <= 1.0


def _fake_ioc_that_keeps(limit_hz: float, throughput_hz: float, calls: list[float]):
    def run_window(ioc, rate, seconds, height, width, compression=None):
        calls.append(rate)
        achieved = min(rate, throughput_hz)
        kept = rate <= limit_hz
        return {"requested_hz": rate, "rate_hz": achieved, "lost": 0 if kept else 3,
                "sustained": kept}
    return run_window


@pytest.mark.parametrize(("limit", "throughput", "steps"),
                         [(150.0, 160.0, 7), (100.0, 180.0, 7), (239.0, 250.0, 7),
                          (150.0, 160.0, 3)])
def test_lossless_search_finds_the_limit_within_its_steps(monkeypatch, limit, throughput, steps):
    calls: list[float] = []
    monkeypatch.setattr(e2e, "run_window", _fake_ioc_that_keeps(limit, throughput, calls))
    best = e2e._highest_lossless_rate(None, 240.0, steps, 8, 8, 0.1, quiet=True)
    assert len(calls) <= steps
    assert best is not None and best["requested_hz"] <= limit
    assert best["requested_hz"] == max(c for c in calls if c <= limit)  # the highest kept
    if (limit, throughput, steps) == (150.0, 160.0, 7):  # steps enough to narrow the gap
        assert best["requested_hz"] >= limit / 1.03


def test_lossless_search_reports_nothing_when_no_rate_is_kept(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(e2e, "run_window", _fake_ioc_that_keeps(1.0, 100.0, calls))
    assert e2e._highest_lossless_rate(None, 240.0, 7, 8, 8, 0.1, quiet=True) is None
    assert len(calls) == 7

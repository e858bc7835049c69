"""`psss-ioc bench stream`: a quick smoke run with tiny frames checks its JSON output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from psss_ioc.bench.stream import stream


def test_bench_stream_json_smoke() -> None:
    args = ["--json", "--frames", "5", "--rounds", "1", "--warmup", "2", "--height", "32",
            "--width", "64", "--roi-rows", "16", "--roi-rows", "8"]
    result = CliRunner().invoke(stream, args)

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["case"] for row in rows] == [
        "32x64 uint16 none", "32x64 uint16 bitshuffle_lz4",
        "decode 16 of 32 rows bitshuffle_lz4", "decode 8 of 32 rows bitshuffle_lz4"]
    for row in rows[:2]:
        assert {"case", "ours_hz", "ceiling_hz", "ratio"} <= set(row)
        assert row["ours_hz"] > 0 and row["ceiling_hz"] > 0
        assert row["ratio"] == pytest.approx(row["ours_hz"] / row["ceiling_hz"], abs=2e-3)
        assert row["frames"] == 5 and row["rounds"] == 1
    for row, roi in zip(rows[2:], ([8, 24], [12, 20]), strict=True):
        assert row["rows"] == roi and row["roi_ms"] > 0 and row["full_ms"] > 0
        assert row["ratio"] == pytest.approx(row["roi_ms"] / row["full_ms"], abs=2e-3)

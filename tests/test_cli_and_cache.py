"""The command line of the core, the core benchmark's output, and numba's on-disk cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from psss_ioc import __version__
from psss_ioc.cli.main import main


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    result = runner.invoke(main, ["--log-level", "debug", "bench", "--help"])
    assert result.exit_code == 0
    assert "core" in result.output


def test_bad_log_level_is_refused():
    result = CliRunner().invoke(main, ["--log-level", "LOUD", "bench", "--help"])
    assert result.exit_code != 0
    assert "LOUD" in result.output


def test_bench_core_json_has_the_documented_keys():
    result = CliRunner().invoke(
        main,
        ["bench", "core", "--json", "--size", "64x512", "--frames", "2", "--rounds", "1",
         "--baseline-every", "1"],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    cases = {row["case"] for row in rows}
    assert cases == {"64x512_full", "64x512_roi700", "64x512_roi300", "fit_2560"}
    for row in rows:
        for key in ("ours_ms_median", "ours_ms_p99", "baseline_ms_median", "speedup"):
            assert row[key] > 0, (row["case"], key)
        if row["case"] != "fit_2560":
            assert row["bandwidth_fraction"] > 0
            assert row["reference_ms_median"] == min(
                row["read_in_halves_ms_median"], row["read_in_order_ms_median"]
            )
            assert row["ours_ms_p99"] >= row["ours_ms_median"]


def test_bench_core_refuses_bad_sizes():
    result = CliRunner().invoke(main, ["bench", "core", "--size", "big"])
    assert result.exit_code != 0
    assert "HEIGHTxWIDTH" in result.output


_PROBE = """
import json
from psss_ioc.core import fit, processing
processing.warm_up()
kernels = [processing._sum_rows, processing._sum_rows_minus_compact_background,
           fit.analyse_on_axis, fit.analyse]
print(json.dumps({k.__name__: [sum(k.stats.cache_hits.values()),
                               sum(k.stats.cache_misses.values())] for k in kernels}))
"""


def test_compiled_code_is_cached_across_process_starts(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))

    def run() -> dict[str, list[int]]:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    run()  # fills the cache (or finds it filled by an earlier run)
    second = run()
    for name, (hits, misses) in second.items():
        assert hits > 0 and misses == 0, (name, hits, misses)

"""Shared output for all benchmarks: one JSON object per line, or an aligned table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import click


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, by linear interpolation."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def emit(rows: list[dict[str, Any]], as_json: bool, title: str = "") -> None:
    """Print rows as JSON lines (machine form) or as a table (human form)."""
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[_format(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    if title:
        click.echo(title)
    click.echo("  ".join(col.rjust(w) for col, w in zip(columns, widths, strict=True)))
    for r in cells:
        click.echo("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)))

"""`psss-ioc bench ...`: benchmarks that measure ours and a baseline side by side in one run.

Each benchmark lives in its own module and registers one subcommand of the `bench` group.
"""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: ratios against a baseline measured in the same run."""


def _register() -> None:
    from psss_ioc.bench import core, e2e, soak, stream

    bench.add_command(core.core)
    bench.add_command(stream.stream)
    bench.add_command(e2e.e2e)
    bench.add_command(soak.soak)


_register()

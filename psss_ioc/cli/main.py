"""The `psss-ioc` command line: one click group, subcommands defined next to their code."""

from __future__ import annotations

import logging

import click

from psss_ioc import __version__
from psss_ioc.bench import bench
from psss_ioc.cli.commands import legacy_main, run_command
from psss_ioc.cli.demo import demo_command
from psss_ioc.generate.database import db_command
from psss_ioc.generate.readme import Programs, readme_command
from psss_ioc.generate.screens import screens_command
from psss_ioc.streams.simulate import simulate

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="psss-ioc")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Logging level for all subcommands.",
)
def main(log_level: str) -> None:
    """psss-ioc: PSSS spectrometer processing served as an EPICS IOC."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


main.add_command(bench)
main.add_command(simulate)
main.add_command(run_command)
main.add_command(demo_command)
main.add_command(screens_command)
main.add_command(db_command)
main.add_command(readme_command(Programs(psss_ioc=main, psss_processing=legacy_main)))


if __name__ == "__main__":
    main()

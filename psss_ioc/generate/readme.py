"""`psss-ioc readme`: the generated parts of README.md, between marker comments.

Sections (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``): the PV table (`pvs.markdown_table`)
and the help of `psss-ioc run` and of the legacy `psss_processing`, as they print at 80
columns. Like `psss-ioc db` and `psss-ioc screens`: the command rewrites them, ``--check``
writes nothing and exits 1 when the file is out of date (a test runs it).

The command line is given, not imported (`Programs`): `psss_ioc.cli` registers this command
and hands it the two console scripts' commands, so the imports go one way, cli -> readme.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from psss_ioc.generate.generated import write_or_check
from psss_ioc.ioc import pvs

README_PATH = Path(__file__).resolve().parents[2] / "README.md"
HELP_WIDTH = 78  # click wraps at the terminal width less 2 (80 columns: 78)


@dataclass(frozen=True)
class Programs:
    """The click commands of the two console scripts whose help the README shows."""

    psss_ioc: click.Group  # `psss-ioc`
    psss_processing: click.Command  # the legacy `psss_processing`


def help_text(programs: Programs, *path: str) -> str:
    """The ``--help`` text of ``psss-ioc <path...>`` (or of ``psss_processing`` when `path` is
    ``("psss_processing",)``), exactly as the console script prints it at 80 columns."""
    if path == ("psss_processing",):
        legacy = programs.psss_processing
        ctx = click.Context(legacy, info_name="psss_processing", terminal_width=HELP_WIDTH,
                            **legacy.context_settings)
        return legacy.get_help(ctx)
    command: click.Command = programs.psss_ioc
    ctx = click.Context(command, info_name="psss-ioc", terminal_width=HELP_WIDTH,
                        **command.context_settings)
    for name in path:
        assert isinstance(command, click.Group)
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no subcommand {name!r}")
        command = sub
        ctx = click.Context(command, parent=ctx, info_name=name)
    # click (8.2+) caches a command's help option the first time one is built; a command that
    # ran on its own earlier in this process (tests, `processes.ioc_command`) cached plain --help.
    # Drop the cache so the text is what the console script prints.
    command._help_option = None
    return command.get_help(ctx)


def _fenced(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```"


SECTIONS: dict[str, Callable[[Programs], str]] = {
    "pv-table": lambda programs: pvs.markdown_table(),
    "run-help": lambda programs: _fenced(help_text(programs, "run")),
    "legacy-help": lambda programs: _fenced(help_text(programs, "psss_processing")),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)",
                      re.S)


def render(text: str, programs: Programs) -> str:
    """`text` with every generated section replaced by what the code gives now."""
    for name, make in SECTIONS.items():
        pattern = _pattern(name)
        if len(pattern.findall(text)) != 1:
            raise click.ClickException(f"README: expected one '<!-- {name}:start -->' ... "
                                       f"'<!-- {name}:end -->' section")
        body = make(programs).rstrip("\n") + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def readme_command(programs: Programs) -> click.Command:
    """The `psss-ioc readme` command, for the command line `programs`."""

    @click.command("readme")
    @click.option("--output", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                  default=None, help="README to update [default: README.md of this checkout].")
    @click.option("--check", is_flag=True,
                  help="Write nothing; exit 1 if a generated section is out of date.")
    def readme(output: Path | None, check: bool) -> None:
        """Regenerate the README's PV table and command-line help sections."""
        path = output or README_PATH
        write_or_check(path, render(path.read_text(encoding="utf-8"), programs), "readme",
                       check, output is not None)

    return readme

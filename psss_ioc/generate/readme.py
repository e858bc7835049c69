"""`psss-ioc readme`: the generated parts of README.md, between marker comments.

Sections (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``): the PV table (`pvs.markdown_table`)
and the help of `psss-ioc run` and of the legacy `psss_processing`, as they print at 80
columns. Like `psss-ioc db` and `psss-ioc screens`: the command rewrites them, ``--check``
writes nothing and exits 1 when the file is out of date (a test runs it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click

from psss_ioc.generate.generated import write_or_check
from psss_ioc.ioc import pvs

README_PATH = Path(__file__).resolve().parents[2] / "README.md"
HELP_WIDTH = 78  # click wraps at the terminal width less 2 (80 columns: 78)


def help_text(*path: str) -> str:
    """The ``--help`` text of ``psss-ioc <path...>`` (or of ``psss_processing`` when `path` is
    ``("psss_processing",)``), exactly as the console script prints it at 80 columns."""
    from psss_ioc.cli.commands import legacy_main
    from psss_ioc.cli.main import main

    if path == ("psss_processing",):
        ctx = click.Context(legacy_main, info_name="psss_processing",
                            terminal_width=HELP_WIDTH, **legacy_main.context_settings)
        return legacy_main.get_help(ctx)
    command: click.Command = main
    ctx = click.Context(main, info_name="psss-ioc", terminal_width=HELP_WIDTH,
                        **main.context_settings)
    for name in path:
        assert isinstance(command, click.Group)
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no subcommand {name!r}")
        command = sub
        ctx = click.Context(command, parent=ctx, info_name=name)
    # click (8.2+) caches a command's help option the first time one is built; a command that
    # ran on its own earlier in this process (tests, `ioc_command`) cached plain --help.
    # Drop the cache so the text is what the console script prints.
    command._help_option = None
    return command.get_help(ctx)


def _fenced(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```"


SECTIONS: dict[str, Callable[[], str]] = {
    "pv-table": pvs.markdown_table,
    "run-help": lambda: _fenced(help_text("run")),
    "legacy-help": lambda: _fenced(help_text("psss_processing")),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)",
                      re.S)


def render(text: str) -> str:
    """`text` with every generated section replaced by what the code gives now."""
    for name, make in SECTIONS.items():
        pattern = _pattern(name)
        if len(pattern.findall(text)) != 1:
            raise click.ClickException(f"README: expected one '<!-- {name}:start -->' ... "
                                       f"'<!-- {name}:end -->' section")
        body = make().rstrip("\n") + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


@click.command("readme")
@click.option("--output", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="README to update [default: README.md of this checkout].")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if a generated section is out of date.")
def readme_command(output: Path | None, check: bool) -> None:
    """Regenerate the README's PV table and command-line help sections."""
    path = output or README_PATH
    write_or_check(path, render(path.read_text(encoding="utf-8")), "readme", check,
                   output is not None)

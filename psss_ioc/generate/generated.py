"""Files generated from the PV table (screen, record database, README sections): one rule for
writing them and for `--check`, which CI uses to catch a table change nobody regenerated."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def write_or_check(path: Path, text: str, command: str, check: bool, custom_path: bool) -> None:
    """Write `text` to `path` (when it differs), or with `check` exit 1 if it differs.

    `command` is the `psss-ioc` subcommand that regenerates the file (named in the message).
    """
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current == text:
        click.echo(f"{path} is up to date")
        return
    if check:
        again = f"psss-ioc {command}" + (f" --output {path}" if custom_path else "")
        click.echo(f"{path} is out of date: run `{again}`", err=True)
        sys.exit(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}")

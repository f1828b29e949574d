"""`dynpose-export` (filled in by its issue)."""

from __future__ import annotations

import click

from dynpose.cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def main() -> None:
    """Not implemented yet."""
    raise click.ClickException("not implemented yet")

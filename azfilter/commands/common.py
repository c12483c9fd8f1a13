"""What every subcommand shares: exit statuses, click settings, the one-line error."""

from __future__ import annotations

from typing import Any

import click

EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 130, 143

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Fatal(click.ClickException):
    """A usage or configuration error: one line ``azfilter: error: ...``, exit status 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:  # noqa: D102 - click's interface
        click.echo(f"azfilter: error: {self.format_message()}", err=True)


class RunFailed(Fatal):
    """The run stopped part-way (an output could not be written): exit status 3."""

    exit_code = EXIT_FAILED


def stderr_line(text: str) -> None:
    """One line on stderr."""
    click.echo(text, err=True)

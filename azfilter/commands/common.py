"""What every subcommand shares: exit statuses, click settings, the one-line error."""

from __future__ import annotations

import sys
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


def setup_logging(verbose: int) -> None:
    """Log azfilter's messages to stderr: warnings always, -v info, -vv debug.

    On a terminal a line reads ``azfilter: message``; in a log file (cron, SLURM output) it
    starts with the date and time.
    """
    import logging

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else \
        logging.DEBUG
    logger = logging.getLogger("azfilter")
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_azfilter", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._azfilter = True  # type: ignore[attr-defined]
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    handler.setFormatter(logging.Formatter(
        "azfilter: %(message)s" if terminal else
        "%(asctime)s azfilter: %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False

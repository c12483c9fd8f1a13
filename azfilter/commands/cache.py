"""``azfilter cache info|clear``: inspect or empty the on-disk cache.

The cache (:mod:`azfilter.cache`) holds the radial lookup tables and per-pixel correction
factors of the geometries reduced so far; it is bounded by ``AZFILTER_CACHE_MAX`` (least
recently used entries go first) and lives in ``AZFILTER_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from .. import cache
from ..errors import AzfilterError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CacheCommandError(click.ClickException):
    """A user error (bad ``AZFILTER_CACHE_MAX``): one line ``azfilter: error: ...``, exit 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:  # noqa: D102 - click's interface
        click.echo(f"azfilter: error: {self.format_message()}", err=True)


def human_size(size: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"unlimited"``."""
    if size is None:
        return "unlimited"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _limit_origin() -> str:
    return cache.MAX_ENV if os.environ.get(cache.MAX_ENV, "").strip() else "default"


@click.group("cache", context_settings=_CONTEXT,
             epilog="\b\nExamples:\n  azfilter cache info\n  azfilter cache clear")
def cache_command() -> None:
    """Inspect or empty the on-disk cache of lookup tables and correction factors.

    \b
    Folder: $AZFILTER_CACHE_DIR (off disables it), else $XDG_CACHE_HOME/azfilter, else
    ~/.cache/azfilter. Size bound: $AZFILTER_CACHE_MAX (e.g. 500M, 4G, unlimited; default
    2G); the least recently used entries are deleted first.
    """


@cache_command.command("info", context_settings=_CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_command(as_json: bool) -> None:
    """Where the cache is, how many entries and bytes it holds, and its bound."""
    try:
        info = cache.cache_info()
    except AzfilterError as err:
        raise CacheCommandError(str(err)) from None
    if as_json:
        click.echo(json.dumps(info))
        return
    if info["path"] is None:
        click.echo("cache: off (AZFILTER_CACHE_DIR)")
        return
    click.echo(f"cache:   {info['path']}")
    click.echo(f"entries: {info['entries']}")
    click.echo(f"size:    {human_size(info['bytes'])} ({info['bytes']} bytes)")
    click.echo(f"limit:   {human_size(info['limit'])} ({_limit_origin()})")


@cache_command.command("clear", context_settings=_CONTEXT)
def clear_command() -> None:
    """Delete every cache entry (tables are rebuilt when next needed)."""
    removed = cache.clear_cache()
    if removed["path"] is None:
        click.echo("cache: off (AZFILTER_CACHE_DIR); nothing to clear")
        return
    click.echo(f"removed {removed['entries']} entries ({human_size(removed['bytes'])}) "
               f"from {removed['path']}")


__all__ = ["cache_command", "human_size"]

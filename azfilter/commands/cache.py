"""``azfilter cache info|clear``: inspect or empty the on-disk cache.

The cache (:mod:`azfilter.cache`) holds the radial lookup tables and per-pixel correction
factors of the geometries reduced so far; it is bounded by ``AZFILTER_CACHE_MAX`` (least
recently used entries go first) and lives in ``AZFILTER_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os

import click

from .. import cache
from ..errors import AzfilterError
from .common import CONTEXT, Fatal


def human_size(size: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"unlimited"``."""
    if size is None:
        return "unlimited"
    if size < 1024:
        return f"{int(size)} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _limit_origin() -> str:
    return cache.MAX_ENV if os.environ.get(cache.MAX_ENV, "").strip() else "default"


@click.group("cache", context_settings=CONTEXT,
             epilog="\b\nExamples:\n  azfilter cache info\n  azfilter cache clear")
def cache_command() -> None:
    """Inspect or empty the on-disk cache of lookup tables and correction factors.

    \b
    Folder: $AZFILTER_CACHE_DIR (off disables it), else $XDG_CACHE_HOME/azfilter, else
    ~/.cache/azfilter. Size bound: $AZFILTER_CACHE_MAX (e.g. 500M, 4G, unlimited; default
    2G); the least recently used entries are deleted first.
    """


@cache_command.command("info", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_command(as_json: bool) -> None:
    """Where the cache is, how many entries and bytes it holds, and its bound."""
    try:
        info = cache.cache_info()
    except AzfilterError as err:
        raise Fatal(str(err)) from None
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


@cache_command.command("clear", context_settings=CONTEXT)
def clear_command() -> None:
    """Delete every cache entry (tables are rebuilt when next needed)."""
    removed = cache.clear_cache()
    if removed["path"] is None:
        click.echo("cache: off (AZFILTER_CACHE_DIR); nothing to clear")
        return
    click.echo(f"removed {removed['entries']} entries ({human_size(removed['bytes'])}) "
               f"from {removed['path']}")


__all__ = ["cache_command", "human_size"]

"""The on-disk cache shared by lookup tables and per-pixel correction factors.

Entries are ``.npz`` files written atomically (a temporary file in the same folder, fsync, then
rename), so that many processes starting at once (a SLURM array) never read a partial file.
Caching is an optimisation: any failure to write only skips it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .fileio import atomic_output

logger = logging.getLogger(__name__)

_DISABLED = {"", "0", "off", "no", "false", "none"}


def cache_dir() -> Path | None:
    """Where azfilter caches, or None when caching is off.

    ``$AZFILTER_CACHE_DIR`` (``off``, ``0``, ``no``, ``false``, ``none`` or empty disable the
    cache), else ``$XDG_CACHE_HOME/azfilter``, else ``~/.cache/azfilter``.
    """
    value = os.environ.get("AZFILTER_CACHE_DIR")
    if value is not None:
        if value.strip().lower() in _DISABLED:
            return None
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "azfilter"
    try:
        return Path.home() / ".cache" / "azfilter"
    except RuntimeError:  # no home directory: nowhere to cache
        return None


def store_npz(path: Path, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` to ``path`` atomically; returns whether it was stored.

    The file gets the permissions of an ordinary new file (umask), so that a cache folder
    shared by a group is usable by all its members.
    """
    try:
        with atomic_output(path, make_folder=True) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        return True
    except Exception as err:  # caching is an optimisation: never fail the reduction for it
        logger.debug("cannot cache %s: %s", path, err)
        return False

"""The on-disk cache shared by lookup tables and per-pixel correction factors.

Entries are ``.npz`` files written atomically (a temporary file in the same folder, fsync, then
rename), so that many processes starting at once (a SLURM array) never read a partial file.
Caching is an optimisation: any failure to write only skips it.

Size bound: after each store the folder is trimmed to :func:`cache_limit` bytes (default
:data:`DEFAULT_MAX_BYTES`, ``$AZFILTER_CACHE_MAX``, :func:`set_cache_limit`) by deleting the
least recently used entries. "Used" is the file's modification time: a store sets it and every
hit (:func:`open_npz`) sets it to now, so the order holds across processes and machines sharing
the folder. Several processes may store and trim at once: trimming holds an advisory lock on
the folder when the file system offers one, only ever looks at finished entries
(temporary files are hidden names, never counted or deleted while they may be being written),
and treats a file that vanished under it as already gone. A reader whose entry is deleted
between finding and opening it sees a miss and rebuilds; one that has the file open keeps
reading it (POSIX keeps the data until it is closed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AzfilterError
from .fileio import atomic_output, sweep_stale_temporaries

logger = logging.getLogger(__name__)

_DISABLED = {"", "0", "off", "no", "false", "none"}

#: default size bound: 2 GiB holds about 20 full-split tables of an Eiger 4M (~90 MB each) or
#: 5 of an Eiger 16M, and is a small share of a laptop's disk
DEFAULT_MAX_BYTES = 2 * 1024**3

#: environment variable holding the size bound (``"2G"``, ``"500MiB"``, ``"unlimited"``)
MAX_ENV = "AZFILTER_CACHE_MAX"

#: a temporary file older than this is a leftover of a killed process (of any host), not a
#: write in progress (a write refreshes its modification time with every block it writes)
STALE_TEMPORARY_SECONDS = 3600.0

_NO_BOUND_WORDS = {"unlimited", "inf", "infinite", "none", "no"}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
# K, M, G, T and KiB... are binary (as ``du -h``); KB, MB... are decimal
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}

# process-wide bound set by set_cache_limit(); _UNSET: none set (use the environment)
_UNSET = object()
_limit_override: Any = _UNSET
_warned_too_large = False


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


# ---------------------------------------------------------------------------- size bound
def parse_size(value: int | float | str | None, what: str = MAX_ENV) -> int | None:
    """A cache size bound in bytes, or None for no bound.

    Parameters
    ----------
    value : int, float, str or None
        Bytes as a number, or a string with an optional suffix: ``K``, ``M``, ``G``, ``T``
        and ``KiB`` ... ``TiB`` are powers of 1024, ``KB`` ... ``TB`` powers of 1000
        (case-insensitive): ``"2G"``, ``"500MiB"``, ``"1.5GB"``. None, ``"unlimited"``,
        ``"inf"`` or ``"none"`` mean no bound.
    what : str
        Where the value came from, for the error message.

    Returns
    -------
    int or None

    Raises
    ------
    AzfilterError
        For anything else, or a bound that is not positive (``AZFILTER_CACHE_DIR=off``
        turns the cache off).
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _NO_BOUND_WORDS:
        return None
    number: float
    if isinstance(value, bool):
        number = math.nan
    elif isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        if math.isinf(number) and number > 0:
            return None
    else:
        match = _SIZE_PATTERN.match(str(value))
        suffix = match.group(2).lower() if match else "?"
        if match is None or suffix not in _SIZE_FACTORS:
            raise AzfilterError(
                f"{what}: cannot read {value!r} as a size (examples: 2G, 500MiB, 1.5GB, "
                "unlimited)"
            )
        number = float(match.group(1)) * _SIZE_FACTORS[suffix]
    if not (math.isfinite(number) and number >= 1):
        raise AzfilterError(
            f"{what}: the cache size bound must be at least 1 byte, got {value!r} "
            "(AZFILTER_CACHE_DIR=off turns the cache off)"
        )
    return int(number)


def set_cache_limit(max_bytes: int | str | None | object = _UNSET) -> None:
    """Set this process's cache size bound (over ``$AZFILTER_CACHE_MAX``).

    Parameters
    ----------
    max_bytes : int, str or None
        As :func:`parse_size` (None: no bound). Called without an argument, the bound goes
        back to ``$AZFILTER_CACHE_MAX`` or the default.

    Raises
    ------
    AzfilterError
        For a value :func:`parse_size` refuses.
    """
    global _limit_override
    _limit_override = _UNSET if max_bytes is _UNSET else parse_size(max_bytes, "cache limit")


def cache_limit(max_bytes: int | str | None | object = _UNSET) -> int | None:
    """The cache size bound in bytes (None: no bound).

    Parameters
    ----------
    max_bytes : int, str or None, optional
        An explicit bound (:func:`parse_size`); when left out: the bound of
        :func:`set_cache_limit`, else ``$AZFILTER_CACHE_MAX``, else :data:`DEFAULT_MAX_BYTES`.

    Raises
    ------
    AzfilterError
        When the bound (or ``$AZFILTER_CACHE_MAX``) cannot be read.
    """
    if max_bytes is not _UNSET:
        return parse_size(max_bytes, "cache limit")  # type: ignore[arg-type]
    if _limit_override is not _UNSET:
        return _limit_override
    value = os.environ.get(MAX_ENV)
    if value is None or not value.strip():
        return DEFAULT_MAX_BYTES
    return parse_size(value, MAX_ENV)


def _limit_for_store() -> int | None:
    """:func:`cache_limit`, with a bad ``$AZFILTER_CACHE_MAX`` logged and the default used
    (a reduction never fails for its cache)."""
    try:
        return cache_limit()
    except AzfilterError as err:
        logger.warning("%s; using %d bytes", err, DEFAULT_MAX_BYTES)
        return DEFAULT_MAX_BYTES


# ---------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime_ns: int


def _is_entry_name(name: str) -> bool:
    return name.endswith(".npz") and not name.startswith(".")


def _is_temporary_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _scan(directory: Path) -> tuple[list[_Entry], list[_Entry]]:
    """The finished entries and the temporary files of ``directory`` (missing folder: none)."""
    entries: list[_Entry] = []
    temporaries: list[_Entry] = []
    try:
        listing = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return entries, temporaries
    for item in listing:
        is_entry = _is_entry_name(item.name)
        if not (is_entry or _is_temporary_name(item.name)):
            continue
        try:
            info = item.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed by another process since the listing
            continue
        if not item.is_file(follow_symlinks=False):
            continue
        record = _Entry(Path(item.path), int(info.st_size), int(info.st_mtime_ns))
        (entries if is_entry else temporaries).append(record)
    return entries, temporaries


def _unlink(path: Path) -> bool:
    """Delete ``path``; False when it was already gone or cannot be deleted."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as err:
        logger.debug("cannot remove cache file %s: %s", path, err)
        return False


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder itself while trimming, where available.

    The lock is ``flock`` on a descriptor of the folder (no lock file to leave behind or to
    own). Without it (no ``fcntl``, a file system whose folders cannot be locked, as NFS)
    trimming still works: every step tolerates another process doing the same at once.
    """
    handle = None
    try:
        import fcntl

        handle = os.open(directory, os.O_RDONLY)
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError) as err:
        logger.debug("trimming %s without a lock: %s", directory, err)
        if handle is not None:
            os.close(handle)
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            os.close(handle)  # closing releases the lock


def _remove_stale_temporaries(folder: Path, temporaries: list[_Entry], now_ns: int) -> None:
    """Remove the temporary files no process is writing any more.

    Those of azfilter processes of this host that are gone (:func:`fileio.
    sweep_stale_temporaries` knows them by name), and any older than
    :data:`STALE_TEMPORARY_SECONDS` (another host's, on a shared file system).
    """
    targets = {item.path.name[1:item.path.name.rindex(".azf-")] for item in temporaries
               if ".azf-" in item.path.name}
    for target in targets:
        sweep_stale_temporaries(folder / target)
    stale_ns = int(STALE_TEMPORARY_SECONDS * 1e9)
    for item in temporaries:
        if now_ns - item.mtime_ns > stale_ns:
            _unlink(item.path)


def trim_cache(max_bytes: int | str | None | object = _UNSET,
               directory: str | os.PathLike | None = None,
               keep: str | os.PathLike | None = None) -> list[Path]:
    """Delete least recently used entries until the cache holds at most ``max_bytes``.

    Parameters
    ----------
    max_bytes : int, str or None, optional
        The bound (:func:`cache_limit`); None: no bound, nothing is deleted.
    directory : path, optional
        The cache folder (default :func:`cache_dir`).
    keep : path, optional
        An entry never deleted here (the one just stored).

    Returns
    -------
    list of pathlib.Path
        The entries this call deleted, least recently used first.
    """
    limit = cache_limit(max_bytes)
    folder = cache_dir() if directory is None else Path(directory)
    removed: list[Path] = []
    if folder is None or not folder.is_dir():
        return removed
    keep_name = None if keep is None else Path(keep).name  # an entry of this folder
    with _folder_lock(folder):
        entries, temporaries = _scan(folder)
        _remove_stale_temporaries(folder, temporaries, time.time_ns())
        if limit is None:
            return removed
        total = sum(entry.size for entry in entries)
        # least recently used first; the name breaks ties so that all processes agree
        for entry in sorted(entries, key=lambda e: (e.mtime_ns, e.path.name)):
            if total <= limit:
                break
            if entry.path.name == keep_name:
                continue
            if _unlink(entry.path):
                removed.append(entry.path)
            # gone either way (deleted here or by another process): no longer counts
            total -= entry.size
    if removed:
        logger.debug("cache %s: removed %d least recently used entries", folder, len(removed))
    return removed


def cache_info(max_bytes: int | str | None | object = _UNSET,
               directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the cache holds.

    Parameters
    ----------
    max_bytes : int, str or None, optional
        Report this bound instead of :func:`cache_limit`'s.
    directory : path, optional
        The cache folder (default :func:`cache_dir`).

    Returns
    -------
    dict
        ``path`` (str, or None when caching is off), ``entries`` (number of finished
        entries), ``bytes`` (their total size), ``limit`` (the bound in bytes, None for
        none).

    Raises
    ------
    AzfilterError
        When ``$AZFILTER_CACHE_MAX`` (or ``max_bytes``) cannot be read.
    """
    folder = cache_dir() if directory is None else Path(directory)
    entries = [] if folder is None else _scan(folder)[0]
    return {
        "path": None if folder is None else str(folder),
        "entries": len(entries),
        "bytes": sum(entry.size for entry in entries),
        "limit": cache_limit(max_bytes),
    }


def clear_cache(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """Delete every entry of the cache (files being written by running jobs stay).

    Parameters
    ----------
    directory : path, optional
        The cache folder (default :func:`cache_dir`).

    Returns
    -------
    dict
        ``path`` (str or None), ``entries`` and ``bytes``: what was deleted.
    """
    folder = cache_dir() if directory is None else Path(directory)
    removed, freed = 0, 0
    if folder is not None and folder.is_dir():
        with _folder_lock(folder):
            entries, temporaries = _scan(folder)
            _remove_stale_temporaries(folder, temporaries, time.time_ns())
            for entry in entries:
                if _unlink(entry.path):
                    removed += 1
                    freed += entry.size
    return {"path": None if folder is None else str(folder), "entries": removed,
            "bytes": freed}


# ---------------------------------------------------------------------------- read, write
def mark_used(path: str | os.PathLike) -> None:
    """Set an entry's modification time to now: it becomes the most recently used.

    Silently does nothing when the file is gone or belongs to another user without group
    write permission (then that entry's recency is its store time).
    """
    try:
        os.utime(path)
    except OSError:
        pass


def open_npz(path: str | os.PathLike) -> Any:
    """Open a cache entry for reading (:func:`numpy.load`) and mark it used.

    Raises
    ------
    FileNotFoundError
        When the entry is not there (a miss).
    """
    mark_used(path)
    return np.load(path, allow_pickle=False)


# Stores handed to background threads (store_soon), when the process asked for it.
_deferring = False
_background: list[Any] = []


def defer_stores(enabled: bool = True) -> None:
    """Let :func:`store_soon` write cache entries on a background thread.

    The command turns this on: a run with an empty cache then starts reducing while its new
    table and correction factors are written and flushed to disk (an Eiger 4M: ~0.3 s of
    copying, checksumming and fsync). The threads are not daemons: the process ends only
    after every entry is complete (each appears atomically in any case).
    """
    global _deferring
    _deferring = bool(enabled)


def store_soon(path: Path, **arrays: np.ndarray) -> bool:
    """:func:`store_npz`, on a background thread after :func:`defer_stores` (returns True:
    the entry is being stored), else at once (returns whether it was stored).

    The arrays must not change afterwards (lookup tables and correction factors do not).
    """
    if not _deferring:
        return store_npz(path, **arrays)
    import threading

    thread = threading.Thread(target=store_npz, args=(path,), kwargs=arrays,
                              name="azfilter-cache-store")
    thread.start()
    _background.append(thread)
    return True


def wait_for_stores() -> None:
    """Wait until the entries handed to background threads are written."""
    while _background:
        _background.pop().join()


def store_npz(path: Path, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` to ``path`` atomically; returns whether it was stored.

    The file gets the permissions of an ordinary new file (umask), so that a cache folder
    shared by a group is usable by all its members. The folder is then trimmed to
    :func:`cache_limit` (least recently used entries first, never this one); an entry larger
    than the bound by itself is not stored.
    """
    global _warned_too_large
    limit = _limit_for_store()
    size = sum(np.asarray(value).nbytes for value in arrays.values())
    if limit is not None and size > limit:
        if not _warned_too_large:  # once per process: every later table would say the same
            _warned_too_large = True
            logger.warning("not caching %s: %.0f MB is over the cache bound (%s=%.0f MB)",
                           path.name, size / 1e6, MAX_ENV, limit / 1e6)
        return False
    try:
        with atomic_output(path, make_folder=True) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
    except Exception as err:  # caching is an optimisation: never fail the reduction for it
        logger.debug("cannot cache %s: %s", path, err)
        return False
    try:
        trim_cache(limit, path.parent, keep=path)
    except Exception as err:  # noqa: BLE001 - a failed trim must not fail the reduction
        logger.debug("cannot trim cache %s: %s", path.parent, err)
    return True

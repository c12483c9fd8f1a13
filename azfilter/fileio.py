"""File helpers: the one atomic-write implementation every output, cache and config uses.

Every file azfilter writes appears atomically: it is written under a temporary name in the
same folder, flushed to disk, given the permissions of an ordinary new file and renamed over
the final name. A crash or a kill never leaves a truncated file under the final name.

Temporary names carry the host and process id (``.NAME.azf-HOST-PID-RANDOM.tmp``), so that a
later run can tell the debris of a killed process (same host, process gone) from a file that
another live process is still writing, and remove only the former
(:func:`sweep_stale_temporaries`).

The permission mask is read from ``/proc/self/status`` rather than with ``os.umask``: changing
the umask to read it is not thread-safe while another thread creates files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

_FALLBACK_MODE = 0o644


@functools.cache
def new_file_mode() -> int:
    """Permissions an ordinary ``open(path, "w")`` would give a new file (0o666 minus umask).

    Read once per process (azfilter never changes its umask): a run writing one text file
    per frame would otherwise read ``/proc/self/status`` once per frame.

    Returns
    -------
    int
        The mode bits; 0o644 where the umask cannot be read without changing it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _FALLBACK_MODE


@functools.cache
def host_name() -> str:
    """This machine's host name, as ``socket.gethostname()`` gives it.

    ``os.uname().nodename`` is the same value on POSIX without importing :mod:`socket`
    (a few milliseconds of every command's start-up).
    """
    uname = getattr(os, "uname", None)
    if uname is not None:
        return uname().nodename
    import socket  # Windows

    return socket.gethostname()


@functools.cache
def _host_tag() -> str:
    # host names may contain dots and dashes; keep a form that cannot hide the separators
    return re.sub(r"[^A-Za-z0-9]", "_", host_name() or "host")


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name prefix of this process's temporary files for ``path`` (in its folder)."""
    return f".{Path(path).name}.azf-{_host_tag()}-{os.getpid()}-"


def temporary_path(path: str | os.PathLike, make_folder: bool = False) -> Path:
    """Create an empty temporary file next to ``path`` and return its path.

    The caller renames the file over ``path`` (:func:`commit_temporary`) or removes it.

    Parameters
    ----------
    path : str or os.PathLike
        The final name.
    make_folder : bool
        Create the folder of ``path`` when it is missing (else a missing folder raises
        FileNotFoundError).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if make_folder:
        folder.mkdir(parents=True, exist_ok=True)
    fd, name = _create_temporary(target, 0o600)
    os.close(fd)
    return Path(name)


#: names tried by :func:`_create_temporary` before it gives up (as :func:`tempfile.mkstemp`)
_TEMPORARY_ATTEMPTS = 100


def _create_temporary(target: Path, mode: int) -> tuple[int, str]:
    """Create a new temporary file for ``target`` in its folder, opened for writing.

    The name is :func:`temporary_prefix` + 12 random hex digits + ``.tmp``; the file is made
    with ``O_EXCL`` (never an existing file, never through a symbolic link) and ``mode``
    (the umask applies). What :func:`tempfile.mkstemp` does, in fewer system calls and
    without importing :mod:`tempfile`.

    Returns
    -------
    (int, str)
        The open descriptor and the temporary file's path.
    """
    folder = os.fspath(target.parent) if str(target.parent) else "."
    prefix = os.path.join(folder, temporary_prefix(target))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_BINARY", 0)
    for _ in range(_TEMPORARY_ATTEMPTS):
        name = f"{prefix}{os.urandom(6).hex()}.tmp"
        try:
            return os.open(name, flags, mode), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary file name for {target.name}")


def commit_temporary(temporary: str | os.PathLike, path: str | os.PathLike,
                     fsync: bool = True) -> None:
    """Give ``temporary`` ordinary permissions, flush it to disk and rename it to ``path``."""
    if fsync:
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(temporary, new_file_mode())
    os.replace(temporary, path)


def remove_quietly(path: str | os.PathLike | None) -> None:
    """Remove a file if it exists; never raise (cleanup after a failure)."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, fsync: bool = True,
                  make_folder: bool = False) -> Iterator[Path]:
    """Context manager: yields a temporary path to write; renamed to ``path`` on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    exception propagates; ``path`` is left as it was.
    """
    temporary = temporary_path(path, make_folder=make_folder)
    try:
        yield temporary
        commit_temporary(temporary, path, fsync=fsync)
    except BaseException:
        remove_quietly(temporary)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + rename).

    The same guarantees as :func:`atomic_output` (the data are on disk before the file
    appears under ``path``), in as few system calls as possible: a run writing one text file
    per frame calls this for every frame, from a writer thread that gives up the GIL at each
    call. The temporary file is created with mode 0o666 less the umask, the permissions of
    an ordinary new file, so no ``chmod`` is needed; then write, fsync, close, rename.
    """
    fd, name = _create_temporary(Path(path), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(name, path)
    except BaseException:
        remove_quietly(name)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file + rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.azf-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[^.]*\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _sweep(folder: str | os.PathLike, name: str | None) -> list[Path]:
    """Remove this host's stale temporaries in ``folder`` (for final name ``name``, or any)."""
    host = _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != host or (name is not None and match["name"] != name):
            continue
        if _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def sweep_folder(folder: str | os.PathLike) -> list[Path]:
    """Remove every stale azfilter temporary file in ``folder`` (see
    :func:`sweep_stale_temporaries`), whatever final name it was for."""
    return _sweep(folder, None)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards every read-modify-write of the output ``path``.

    ``.NAME.lock`` next to the output, for a file as for a directory of text outputs (kept
    outside the directory, whose listing stays the outputs). The empty lock file stays after
    the run: removing a ``flock`` file while another process waits on it would let two runs
    hold "the" lock at once.
    """
    target = Path(os.path.abspath(path))
    return target.parent / f".{target.name}.lock"


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed azfilter processes left next to ``path``.

    Only files written for ``path`` by a process of this host that no longer exists are
    removed; a file of a live process, or of another host (a shared file system), is kept.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    target = Path(path)
    return _sweep(target.parent if str(target.parent) else Path("."), target.name)

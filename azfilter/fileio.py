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
from typing import Any

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


class AtomicFiles:
    """Many files written atomically by one thread, each file's fsync and rename done on a few
    background threads.

    Each file keeps the guarantees of :func:`atomic_write_bytes`: it is written under a
    temporary name, flushed to disk (fsync), then renamed to its final name, so a file under
    its final name is always complete and on disk. Only the waiting moves: an fsync waits for
    the disk (a fraction of a millisecond on a local SSD, several on a loaded disk or a
    network file system) while the caller goes on with the next file; up to ``pending``
    files are in flight, their fsyncs overlapping on ``workers`` threads. Files may therefore
    appear a few at a time, not strictly in the order written.

    A failed fsync or rename removes that file's temporary and is raised, naming the file, by
    the next :meth:`write_bytes` or by :meth:`finish`.

    Parameters
    ----------
    workers : int
        Threads doing the fsyncs and renames.
    pending : int
        Most files written but not yet renamed (each holds an open descriptor).
    """

    def __init__(self, workers: int = 4, pending: int = 16):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="azfilter-commit")
        self._slots = threading.BoundedSemaphore(pending)
        self._lock = threading.Lock()
        self._failure: OSError | None = None
        self._futures: set = set()

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        """Write ``data`` to a temporary file next to ``path``; it is renamed to ``path`` once
        on disk.

        Raises
        ------
        OSError
            When the temporary file cannot be created or written (nothing is left behind),
            or when an earlier file of this writer failed to reach the disk.
        """
        self._raise_failure()
        fd, name = _create_temporary(Path(path), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            remove_quietly(name)
            raise
        self._slots.acquire()
        try:
            future = self._pool.submit(self._commit, fd, name, os.fspath(path))
        except BaseException:
            self._slots.release()
            os.close(fd)
            remove_quietly(name)
            raise
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        """:meth:`write_bytes` of ``text`` in UTF-8."""
        self.write_bytes(path, text.encode("utf-8"))

    def _commit(self, fd: int, name: str, path: str) -> None:
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(name, path)
        except OSError as err:
            remove_quietly(name)
            with self._lock:
                if self._failure is None:
                    self._failure = OSError(err.errno, err.strerror, path)
        finally:
            self._slots.release()

    def _forget(self, future: Any) -> None:
        with self._lock:
            self._futures.discard(future)

    def _raise_failure(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def finish(self) -> None:
        """Wait until every file written is on disk under its final name.

        Raises
        ------
        OSError
            The first failure (naming the file); the other files are finished all the same.
        """
        from concurrent.futures import wait

        with self._lock:
            futures = list(self._futures)
        wait(futures)
        self._pool.shutdown(wait=True)
        self._raise_failure()


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


def try_lock(path: str | os.PathLike) -> int | None:
    """Take the ``flock`` lock of ``path`` (created if missing) if it is free right now.

    The common case of :func:`azfilter.pipeline.run.output_lock` (no other run on the
    output, a file system with ``flock``) without importing the ``filelock`` package, whose
    import costs more than the rest of a text job's start-up modules together. Both lock
    the same file with ``flock``, so they exclude each other.

    Returns
    -------
    int or None
        The descriptor that holds the lock (:func:`unlock` releases it); None when the lock
        is held by another process or the file system gives no ``flock`` (the caller then
        goes through ``filelock``, which waits, or falls back to its own scheme).

    Raises
    ------
    OSError
        When the lock file cannot be created or opened.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:    # held elsewhere (EWOULDBLOCK), or no flock here (ENOSYS, ENOLCK...)
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken by :func:`try_lock` (closing its descriptor)."""
    os.close(fd)


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

"""Sinks: where the pipeline's writer thread puts each reduced frame.

A sink receives ``write(planned, frame_source, result)`` calls from one thread, then
``close()`` (the run finished: make the output final) or ``abort()`` (the run stopped: drop
what is unfinished). Text sinks write one finished file per frame; the NeXus sink appends rows
to one temporary file that ``close`` renames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import RunFailed
from ..fileio import AtomicFiles
from .meta import OutputMeta
from .text import format_text, sector_paths

if TYPE_CHECKING:  # the NeXus writer (h5py) is imported by jobs that write HDF5 only
    from .nexus import NexusWriter


class PlannedFrame(Protocol):
    """What a sink needs of a planned frame (``azfilter.pipeline.plan.Planned``)."""

    source: str
    index: int
    nframes: int
    out_path: Path | None


class Sink:
    """Base class: ``write`` runs in the writer thread; ``close``/``abort`` end the run."""

    def write(self, planned: PlannedFrame, frame_source: str, result: Any) -> None:
        """Store one frame's result."""
        raise NotImplementedError

    def fail(self, planned: PlannedFrame, reason: str) -> None:
        """Record a planned frame that could not be reduced (kept in HDF5 outputs)."""
        self.record_failure(planned.source, planned.index, reason)

    def record_failure(self, source: str, index: int | None, reason: str) -> None:
        """Record a failed frame by source and index (None or -1: the whole source)."""

    def close(self) -> None:
        """Finish: make a shared output final (atomic rename)."""

    def abort(self) -> None:
        """Drop an unfinished shared output."""


class TextSink(Sink):
    """One text file per frame (``planned.out_path``), or the text on stdout.

    Each file is written atomically and durably (:class:`azfilter.fileio.AtomicFiles`): the
    writer thread formats and writes it under a temporary name, and a few background threads
    fsync and rename it, so that the writer never waits for the disk. :meth:`close` returns
    once every file is on disk under its final name.
    """

    def __init__(self, meta: OutputMeta, stdout: bool = False):
        self.meta = meta
        self.stdout = stdout
        self._made: set[Path] = set()
        self._files: AtomicFiles | None = None
        # (source, frame index, reason) of each failed frame, for the run's summary
        self.failures: list[tuple[str, int, str]] = []

    def record_failure(self, source: str, index: int | None, reason: str) -> None:
        """Remember a failed frame in :attr:`failures` (text outputs have no shared file to
        record it in)."""
        self.failures.append((source, -1 if index is None else int(index),
                              " ".join(str(reason).split())))

    def _meta_for(self, planned: PlannedFrame) -> OutputMeta:
        # Each text file's config reruns that file's reduction (a config line listing
        # thousands of inputs in each of thousands of files would be absurd).
        config = dict(self.meta.config, inputs=[planned.source])
        return dataclasses.replace(self.meta, config=config)

    def write(self, planned: PlannedFrame, frame_source: str, result: Any) -> None:
        if getattr(result, "sectors", None) is not None:
            # one file (or one block on stdout) per sector, each a plain 1-D result
            paths = sector_paths(planned.out_path, result.sectors.shape[0]) \
                if planned.out_path is not None else [None] * result.sectors.shape[0]
            for k, path in enumerate(paths):
                one = result.sector(k)
                meta = self._meta_for(planned)
                meta = dataclasses.replace(meta, parameters=dict(
                    meta.parameters, sector=k, sector_range=one.parameters["sector_range"]))
                self._write_one(planned, frame_source, one, meta, path)
            return
        self._write_one(planned, frame_source, result, self._meta_for(planned),
                        planned.out_path)

    def _write_one(self, planned: PlannedFrame, frame_source: str, result: Any,
                   meta: OutputMeta, out_path: Path | None) -> None:
        if self.stdout:
            sys.stdout.write(format_text(result, meta, frame_source, planned.index,
                                         planned.nframes))
            sys.stdout.flush()
            return
        if out_path is None:
            raise ValueError(f"{planned.source} frame {planned.index}: no output path planned")
        parent = out_path.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        if self._files is None:
            self._files = AtomicFiles()
        self._files.write_text(out_path, format_text(result, meta, frame_source, planned.index,
                                                     planned.nframes))

    def close(self) -> None:
        """Wait until every file is on disk under its final name.

        Raises
        ------
        RunFailed
            When a file could not be flushed or renamed (naming it).
        """
        files, self._files = self._files, None
        if files is None:
            return
        try:
            files.finish()
        except OSError as err:
            raise RunFailed(f"{err.filename}: cannot write the output: "
                            f"{err.strerror or err}") from None

    def abort(self) -> None:
        """Finish the files already written (they are complete), ignoring failures."""
        files, self._files = self._files, None
        if files is not None:
            with contextlib.suppress(OSError):
                files.finish()


class NexusSink(Sink):
    """Rows appended to one NeXus file, renamed into place by ``close``."""

    def __init__(self, writer: NexusWriter):
        self.writer = writer

    def write(self, planned: PlannedFrame, frame_source: str, result: Any) -> None:
        self.writer.write(result, planned.source, planned.index)

    def record_failure(self, source: str, index: int | None, reason: str) -> None:
        """Record the failed frame in the file (``entry/azfilter/failed``)."""
        self.writer.record_failure(source, index, reason)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()

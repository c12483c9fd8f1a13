"""Sinks: where the pipeline's writer thread puts each reduced frame.

A sink receives ``write(planned, frame_source, result)`` calls from one thread, then
``close()`` (the run finished: make the output final) or ``abort()`` (the run stopped: drop
what is unfinished). Text sinks write one finished file per frame; the NeXus sink appends rows
to one temporary file that ``close`` renames.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Protocol

from .meta import OutputMeta
from .nexus import NexusWriter
from .text import format_text, write_text


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

    def close(self) -> None:
        """Finish: make a shared output final (atomic rename)."""

    def abort(self) -> None:
        """Drop an unfinished shared output."""


class TextSink(Sink):
    """One text file per frame (``planned.out_path``), or the text on stdout."""

    def __init__(self, meta: OutputMeta, stdout: bool = False):
        self.meta = meta
        self.stdout = stdout
        self._made: set[Path] = set()

    def _meta_for(self, planned: PlannedFrame) -> OutputMeta:
        # Each text file's config reruns that file's reduction (a config line listing
        # thousands of inputs in each of thousands of files would be absurd).
        config = dict(self.meta.config, inputs=[planned.source])
        return dataclasses.replace(self.meta, config=config)

    def write(self, planned: PlannedFrame, frame_source: str, result: Any) -> None:
        meta = self._meta_for(planned)
        if self.stdout:
            sys.stdout.write(format_text(result, meta, frame_source, planned.index,
                                         planned.nframes))
            sys.stdout.flush()
            return
        if planned.out_path is None:
            raise ValueError(f"{planned.source} frame {planned.index}: no output path planned")
        parent = planned.out_path.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        write_text(planned.out_path, result, meta, frame_source, planned.index,
                   planned.nframes)


class NexusSink(Sink):
    """Rows appended to one NeXus file, renamed into place by ``close``."""

    def __init__(self, writer: NexusWriter):
        self.writer = writer

    def write(self, planned: PlannedFrame, frame_source: str, result: Any) -> None:
        self.writer.write(result, planned.source, planned.index)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()

"""The reduction pipeline as a library: plan a job, run it, report what happened.

``azfilter.run_job(config)`` is what the command line calls after turning its options into a
config; a Python user or a test can call it the same way::

    import azfilter
    report = azfilter.run_job({"operation": "sigma-clip", "poni": "geo.poni",
                               "inputs": ["run/*.cbf"], "output": "out.h5", "thres": 4})
    report.reduced, report.failed, report.failures

Modules: :mod:`.plan` (inputs → frames, shards, output names, collisions, skip-existing),
:mod:`.run` (readers → engine.process_many → writer → sink), :mod:`.progress`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .. import config as cfg
from ..errors import AzfilterError
from .progress import Progress
from .run import (
    Job,
    JobReport,
    execute,
    output_lock,
    prepare_job,
    resolve_output,
    sweep_temporaries,
    write_summary,
)

__all__ = ["Job", "JobReport", "load_job", "prepare_job", "execute", "run_job"]


def load_job(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job config from a job file (.toml/.json) or an azfilter output (.h5/.dat...).

    Returns the normalized, upgraded config layer (not merged with the defaults).

    Raises
    ------
    AzfilterError
        When the file is missing or holds no valid config.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".toml", ".json"):
        return cfg.load_config(path)
    if not path.is_file():
        raise AzfilterError(f"{path}: config file not found")
    from ..output import read_stored_config

    raw = read_stored_config(path)
    return cfg.from_raw(raw, str(path), base_dir=path.resolve().parent)


def run_job(config: dict[str, Any], *, dry_run: bool = False, quiet: bool | None = None,
            stream: TextIO | None = None) -> JobReport:
    """Plan and run one job; the library form of ``azfilter integrate|sigma-clip|medfilt``.

    Parameters
    ----------
    config : dict
        Job options as in a job file (missing keys take their defaults; ``operation``,
        ``poni``, ``inputs`` and ``output`` are required).
    dry_run : bool
        Plan only: the report lists what would be reduced (``report.planned``).
    quiet : bool, optional
        No progress or notes (failures are still reported); default: the config's ``quiet``.
    stream : file, optional
        Where progress and failure lines go (default: stderr).

    Returns
    -------
    JobReport
        Frames reduced, skipped, failed (with one line per failure), time, output.

    Raises
    ------
    AzfilterError
        A usage or configuration problem found while planning (nothing written).
    azfilter.errors.RunFailed
        The output could not be written; the unfinished output was removed.
    """
    merged = cfg.effective(cfg.normalize(config, "job"))
    if merged.get("wavelength") is not None and merged.get("energy") is not None:
        raise AzfilterError("job: wavelength and energy exclude each other")
    for key, what in (("operation", "an operation"), ("poni", "a PONI file"),
                      ("inputs", "inputs"), ("output", "an output")):
        if not merged.get(key):
            raise AzfilterError(f"job: {key} missing: give {what}")
    quiet = merged["quiet"] if quiet is None else quiet
    stream = sys.stderr if stream is None else stream

    def note(text: str) -> None:
        if not quiet:
            stream.write(f"azfilter: note: {text}\n")
            stream.flush()

    if dry_run:
        job = prepare_job(merged, dry_run=True, note=note)
        report = JobReport(label=job.label, output=job.output, skipped=job.skipped,
                           failed=len(job.failures), notes=list(job.notes))
        for planned in job.todo:
            target = planned.out_path if planned.out_path is not None else job.output
            report.planned.append((planned.source, planned.index, str(target)))
        report.failures = [str(p.error) for p in job.failures]
        return report
    out_kind, output, _ = resolve_output(merged)
    with output_lock(output, out_kind, wait=merged["wait"], note=note):
        # Under the lock: what the output holds now is what this run extends.
        sweep_temporaries(output, out_kind)
        job = prepare_job(merged, note=note)
        try:
            progress = Progress(len(job.todo) + len(job.failures), quiet, job.label,
                                stream=stream)
            report = execute(job, progress)
        finally:
            job.finish_warm_up()
    write_summary(job, report)
    return report

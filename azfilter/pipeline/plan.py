"""Planning a job: inputs → the ordered list of frames, this task's shard, output names,
collisions and what already exists.

Everything here runs before any frame is reduced, so that a usage or configuration error
stops the job (exit status 2) with nothing written. No click, no frames decoded: only file
names, frame counts and existing outputs are looked at.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AzfilterError, FrameReadError
from ..vocabulary import HDF5_SUFFIXES, TEXT_SUFFIXES

# Frames per reader task: a stack is cut into blocks read in parallel (each task opens the
# file once); single-frame files are one block each.
BLOCK_FRAMES = 8


@dataclass
class Planned:
    """One frame to reduce (or a whole file that already failed while planning).

    Attributes
    ----------
    item : azfilter.frames.InputItem
        The whole input file (no frame selection).
    index : int
        Frame index inside the file (-1 for a file that failed while planning).
    nframes : int
        Frames in the file.
    source : str
        Absolute path, or ``path::dataset`` when a dataset was given.
    out_path : pathlib.Path or None
        The text output of this frame (None for HDF5 and stdout outputs).
    error : FrameReadError or None
        Why the file could not be planned.
    """

    item: Any
    index: int
    nframes: int
    source: str
    out_path: Path | None = None
    error: FrameReadError | None = None


@dataclass
class Block:
    """Consecutive frames of one file, read by one reader task."""

    item: Any
    frames: list[Planned]


def _integer(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value or value.lower() == "undefined":   # SGE writes "undefined" outside arrays
        return None
    try:
        return int(value)
    except ValueError:
        raise AzfilterError(f"cannot read {name}={value!r} (an integer was expected); give "
                            "--shard I/N") from None


def _array_shard(environ: Mapping[str, str], scheduler: str, task: int, first: int,
                 last: int, step: int, count: int | None = None) -> tuple[int, int]:
    """(I, N) of array task ``task`` in first..last by step; refuses what is ambiguous."""
    rerun = ("rerun one task with --shard I/N (I = its shard index, N = the number of "
             "shards of the job)")
    if step < 1 or last < first:
        raise AzfilterError(f"{scheduler} array task {task}: range {first}-{last} step {step} "
                            f"is not usable; {rerun}")
    spaced = (last - first) // step + 1
    if count is not None and count != spaced:
        raise AzfilterError(
            f"{scheduler} array task ids are not evenly spaced ({count} tasks between {first} "
            f"and {last}, step {step}), so the shard of task {task} is ambiguous; submit an "
            f"evenly spaced array (--array=0-{count - 1}) or {rerun}")
    if spaced == 1:
        # One task: a whole job, or one task of a bigger array resubmitted alone
        # (--array=3)? The environment cannot tell, so say it rather than guess.
        raise AzfilterError(
            f"{scheduler} array of one task ({task}): cannot tell whether it is a whole job "
            f"or one shard resubmitted; {rerun}, or --shard 0/1 for the whole job")
    if (task - first) % step or not first <= task <= last:
        raise AzfilterError(f"{scheduler} array task {task} is not in {first}-{last} step "
                            f"{step}; {rerun}")
    return (task - first) // step, spaced


def _scheduler_array(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """The array task as (I, N) from SLURM, SGE, LSF or PBS variables, or None."""
    task = _integer(environ, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _integer(environ, "SLURM_ARRAY_TASK_COUNT")
        first = _integer(environ, "SLURM_ARRAY_TASK_MIN")
        last = _integer(environ, "SLURM_ARRAY_TASK_MAX")
        step = _integer(environ, "SLURM_ARRAY_TASK_STEP") or 1
        if count is None:
            raise AzfilterError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is "
                                "not; give --shard I/N")
        first = 0 if first is None else first
        last = first + (count - 1) * step if last is None else last
        return _array_shard(environ, "SLURM", task, first, last, step, count)
    task = _integer(environ, "SGE_TASK_ID")
    if task is not None:
        first = _integer(environ, "SGE_TASK_FIRST")
        last = _integer(environ, "SGE_TASK_LAST")
        step = _integer(environ, "SGE_TASK_STEPSIZE") or 1
        if first is None or last is None:
            raise AzfilterError(f"SGE array task {task}: SGE_TASK_FIRST/SGE_TASK_LAST are not "
                                "set; give --shard I/N")
        return _array_shard(environ, "SGE", task, first, last, step)
    task = _integer(environ, "LSB_JOBINDEX")
    if task is not None and task > 0:
        # LSF names the array in the job name: name[1-16] or name[1-16:2]; a list such as
        # name[1,3,8] is not evenly spaced.
        import re

        match = re.search(r"\[(\d+)-(\d+)(?::(\d+))?\]$", environ.get("LSB_JOBNAME", ""))
        if not match:
            raise AzfilterError(
                f"LSF array task {task}: the array range cannot be read from LSB_JOBNAME="
                f"{environ.get('LSB_JOBNAME', '')!r} (a list of indices is not evenly "
                "spaced); give --shard I/N")
        first, last, step = int(match[1]), int(match[2]), int(match[3] or 1)
        return _array_shard(environ, "LSF", task, first, last, step)
    for name in ("PBS_ARRAY_INDEX", "PBS_ARRAYID"):
        task = _integer(environ, name)
        if task is not None:
            # PBS does not tell a task how many tasks its array has.
            raise AzfilterError(
                f"PBS array task {task}: PBS does not give the number of tasks; give "
                f"--shard I/N (e.g. --shard ${name}/16 for qsub -J 0-15)")
    return None


def environment_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(I, N) of the array task or parallel task this process runs as, or None.

    Recognised: SLURM arrays (``SLURM_ARRAY_TASK_*``, evenly spaced ids only), SGE
    (``SGE_TASK_*``), LSF (``LSB_JOBINDEX`` with the range in ``LSB_JOBNAME``), and the
    tasks of one ``srun -n N`` step (``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, which
    only srun sets: a batch script's own ``SLURM_NTASKS`` does not shard it). Inside an array
    task, ``srun -n M`` splits that task's shard M ways. PBS arrays are recognised and refused
    (PBS does not say how many tasks there are).

    Raises
    ------
    AzfilterError
        When the variables are unreadable, ambiguous (one task, unevenly spaced ids) or
        incomplete; the message says how to give ``--shard I/N``.
    """
    environ = os.environ if environ is None else environ
    array = _scheduler_array(environ)
    step_tasks = _integer(environ, "SLURM_STEP_NUM_TASKS")
    procid = _integer(environ, "SLURM_PROCID")
    if step_tasks is not None and step_tasks > 1 and procid is not None:
        if not 0 <= procid < step_tasks:
            raise AzfilterError(f"SLURM_PROCID={procid} is not one of {step_tasks} tasks; "
                                "give --shard I/N")
        if array is None:
            return procid, step_tasks
        return array[0] * step_tasks + procid, array[1] * step_tasks
    return array


def absolute_source(item: Any) -> str:
    """The source name of an input item: absolute path, plus ``::dataset`` when given."""
    path = os.path.abspath(item.path)
    return path if item.h5path is None else f"{path}::{item.h5path}"


def file_part(source: str) -> str:
    """The file of a source name (``a.h5::/entry/data`` → ``a.h5``)."""
    return source.split("::", 1)[0]


def output_kind(output: str) -> str:
    """``"stdout"``, ``"hdf5"``, ``"textdir"`` or ``"textfile"`` for an ``-o`` value.

    Raises
    ------
    AzfilterError
        For a name that is none of these.
    """
    if output == "-":
        return "stdout"
    lower = output.lower()
    if lower.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        return "textdir"
    if lower.endswith(TEXT_SUFFIXES):
        return "textfile"
    raise AzfilterError(
        f"-o {output}: not an existing directory; end it with / to create one, or use "
        ".h5/.nxs (one HDF5 file) or .dat/.xy (one frame)")


def shard_output(path: str, shard: tuple[int, int] | None) -> str:
    """``out.h5`` -> ``out_shard02of16.h5`` for shard 2 of 16 (``{shard}`` in the name is
    replaced instead)."""
    if shard is None or shard[1] == 1:
        return path
    index, count = shard
    width = len(str(count - 1))
    if "{shard}" in path:
        return path.replace("{shard}", f"{index:0{width}d}")
    root, ext = os.path.splitext(path)
    return f"{root}_shard{index:0{width}d}of{count}{ext}"


def expand(inputs: list[str], recursive: bool, output: str | None = None,
           note: Callable[[str], None] | None = None) -> list[tuple[Any, str | None]]:
    """Input items and, for items found in a directory input, the directory they came from.

    The HDF5 output itself is left out (``-r data/ -o data/all.h5`` run twice must not read
    its own result). An existing directory without data files yet is not an error (a cron
    job over a directory that fills up): ``note`` is told, nothing is planned for it.
    """
    from ..frames import expand_inputs

    items: list[tuple[Any, str | None]] = []
    seen: set[tuple] = set()
    duplicates = 0
    if output is not None and output != "-":
        seen.add((os.path.realpath(output), None))
    for spec in inputs:
        root = spec if os.path.isdir(os.path.expanduser(spec)) else None
        try:
            found = expand_inputs([spec], recursive=recursive)
        except AzfilterError as err:
            if root is not None:
                if note is not None:
                    note(f"{spec}: no data files yet")
                continue
            raise AzfilterError(f"input {err}") from None
        for item in found:
            key = (os.path.realpath(item.path), item.h5path)
            if key not in seen:
                seen.add(key)
                items.append((item, root))
            elif key[0] != os.path.realpath(output or "\0"):
                duplicates += 1
    if duplicates and note is not None:
        # Links to one file, a file named twice, overlapping globs: reduced once, said so.
        note(f"{duplicates} input(s) name a file already in the job (the same file through "
             "links or overlapping names); each file is reduced once")
    return items


def plan_frames(items: list[tuple[Any, str | None]], out_kind: str, output: str,
                unit: str) -> list[Planned]:
    """Every frame of the inputs in order, with its text output name where there is one.

    Files whose frames cannot be counted become one failed entry each.
    """
    from ..output import text_output_name

    plan: list[Planned] = []
    for item, root in items:
        source = absolute_source(item)
        try:
            nframes = item.nframes
        except AzfilterError as err:
            error = err if isinstance(err, FrameReadError) else FrameReadError(
                source, None, str(err))
            plan.append(Planned(item, -1, 0, source, error=error))
            continue
        for index in range(nframes):
            out_path = None
            if out_kind == "textdir":
                name = text_output_name(source, index, nframes, unit)
                subdir = ""
                if root is not None:
                    subdir = os.path.relpath(os.path.dirname(os.path.abspath(item.path)),
                                             os.path.abspath(root))
                    subdir = "" if subdir == "." else subdir
                out_path = Path(output) / subdir / name
            elif out_kind == "textfile":
                out_path = Path(output)
            plan.append(Planned(item, index, nframes, source, out_path))
    return plan


def select_shard(plan: list[Planned], shard: tuple[int, int] | None) -> list[Planned]:
    """Shard I of N: the I-th of N contiguous, nearly equal blocks of the plan."""
    if shard is None:
        return plan
    index, count = shard
    return plan[index * len(plan) // count:(index + 1) * len(plan) // count]


def blocks(plan: list[Planned]) -> list[Block]:
    """Group consecutive frames of the same file into blocks of at most BLOCK_FRAMES."""
    grouped: list[Block] = []
    for planned in plan:
        last = grouped[-1] if grouped else None
        if (last is not None and planned.error is None and last.frames[-1].error is None
                and last.item is planned.item and len(last.frames) < BLOCK_FRAMES
                and last.frames[-1].index + 1 == planned.index):
            last.frames.append(planned)
        else:
            grouped.append(Block(planned.item, [planned]))
    return grouped


def check_collisions(plan: list[Planned]) -> None:
    """Refuse two frames planned to the same text output.

    Raises
    ------
    AzfilterError
        Naming both frames and the output.
    """
    owners: dict[Path, Planned] = {}
    for planned in plan:
        if planned.out_path is None:
            continue
        other = owners.get(planned.out_path)
        if other is not None:
            raise AzfilterError(
                f"{other.source} frame {other.index} and {planned.source} frame "
                f"{planned.index} would both be written to {planned.out_path}; use an .h5 "
                "output or separate runs"
            )
        owners[planned.out_path] = planned


def skip_existing(plan: list[Planned], out_kind: str, output: str, mode: str,
                  npt: int) -> tuple[list[Planned], int]:
    """Frames still to reduce and the number skipped because their text output is complete.

    ``mode`` is ``"new"`` (refuse existing outputs), ``"overwrite"`` or ``"append"``
    (``--skip-existing``). HDF5 outputs are checked by the writer, which knows their rows.

    Raises
    ------
    AzfilterError
        In mode ``"new"`` when an output exists.
    """
    from ..output import text_output_complete

    if out_kind == "hdf5":
        if mode == "new" and Path(output).exists():
            raise AzfilterError(f"{output}: output exists; use --overwrite to replace it or "
                                "--skip-existing to add only new frames")
        return plan, 0
    if out_kind not in ("textdir", "textfile"):
        return plan, 0
    existing = [p for p in plan if p.out_path is not None and p.out_path.exists()]
    if not existing:
        return plan, 0
    if mode == "new":
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise AzfilterError(
            f"{existing[0].out_path}: output exists{more}; use --overwrite to replace or "
            "--skip-existing to reduce only the missing frames")
    if mode == "overwrite":
        return plan, 0
    done = {id(p) for p in existing if text_output_complete(p.out_path, npt)}
    return [p for p in plan if id(p) not in done], len(done)


def drop_stored(plan: list[Planned],
                stored: set[tuple[str, int]]) -> tuple[list[Planned], int]:
    """Frames of ``plan`` not among the (source, frame) pairs already in an HDF5 output."""
    if not stored:
        return plan, 0
    stored_files = {(file_part(source), index) for source, index in stored}
    todo = []
    for planned in plan:
        key = (planned.source, planned.index)
        if key in stored or ("::" not in planned.source and key in stored_files):
            continue
        todo.append(planned)
    return todo, len(plan) - len(todo)

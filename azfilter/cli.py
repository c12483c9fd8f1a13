"""The ``azfilter`` command.

Reduction commands (``integrate``, ``sigma-clip``, ``medfilt``, ``run``) plan the whole job
first (expand the inputs, count the frames, pick this shard, check the outputs), so that any
usage or configuration error stops the run with exit status 2 before anything is written.
Then reading, reducing and writing overlap: a pool of reader threads decodes blocks of frames
ahead into bounded queues, the main thread reduces (the compiled engines use all cores), and a
writer thread writes the outputs.  A frame that cannot be read or reduced is reported (file,
frame, reason) and the run goes on; the exit status is then 3.

Exit status: 0 all frames reduced (or skipped), 2 usage or configuration error, 3 some frames
failed, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from . import __version__
from . import config as cfg
from .errors import AzfilterError, FrameReadError

EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 130, 143

# Frames per reader task: a stack is cut into blocks read in parallel (each task opens the file
# once); single-frame files are one block each.
BLOCK_FRAMES = 8
# Frames each reader may have decoded ahead of the reducer (memory stays flat).
READ_AHEAD = 2
# Seconds between log lines when stderr is not a terminal (cron mail stays short).
try:
    LOG_INTERVAL = float(os.environ.get("AZFILTER_LOG_INTERVAL", "10"))
except ValueError:
    LOG_INTERVAL = 10.0

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Fatal(click.ClickException):
    """A usage or configuration error: one line ``azfilter: error: ...``, exit status 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:  # noqa: D102 - click's interface
        click.echo(f"azfilter: error: {self.format_message()}", err=True)


class RunFailed(Fatal):
    """The run stopped part-way (an output could not be written): exit status 3."""

    exit_code = EXIT_FAILED


def _stderr_line(text: str) -> None:
    click.echo(text, err=True)


# ============================================================================ option plumbing


class _ReductionCommand(click.Command):
    """A click command whose ``--percentile`` takes one or two numbers (``40`` or ``40 60``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _join_percentile(list(args)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join_percentile(args: list[str]) -> list[str]:
    """Rewrite ``--percentile 40 60`` as ``--percentile 40,60`` (click options take a fixed
    number of values)."""
    out: list[str] = []
    k = 0
    while k < len(args):
        arg = args[k]
        if arg == "--":
            out.extend(args[k:])
            break
        if arg == "--percentile" and k + 1 < len(args):
            value = args[k + 1]
            if k + 2 < len(args) and _is_number(value) and _is_number(args[k + 2]):
                out += [arg, f"{value},{args[k + 2]}"]
                k += 3
                continue
            out += [arg, value]
            k += 2
            continue
        out.append(arg)
        k += 1
    return out


class _ShardType(click.ParamType):
    name = "I/N"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            shard = cfg.parse_shard(value, "--shard")
        except AzfilterError as err:
            self.fail(str(err).removeprefix("--shard: "), param, ctx)
        return f"{shard[0]}/{shard[1]}" if shard else ""


class _PercentileType(click.ParamType):
    name = "P [P]"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            return cfg.parse_percentile(value, "--percentile")
        except AzfilterError as err:
            self.fail(str(err).removeprefix("--percentile: "), param, ctx)


def _unit_names() -> list[str]:
    from .units import UNITS

    return list(UNITS)


def _reduction_options(operation: str | None) -> list[Callable]:
    """The options of one reduction command (``operation`` None: ``run``, all of them)."""
    defaults = cfg.OPERATION_DEFAULTS.get(operation or "", {})

    def opt(*decls: str, ops: tuple[str, ...] | None = None, **kwargs: Any) -> Callable | None:
        if ops is not None and operation is not None and operation not in ops:
            return None
        return click.option(*decls, **kwargs)

    error_default = defaults.get("error_model", "per operation: poisson; sigma-clip azimuthal")
    split_default = defaults.get("split", "per operation: no; medfilt full")
    options = [
        opt("-p", "--poni", type=click.Path(dir_okay=False), metavar="FILE",
            help="Geometry (pyFAI PONI file). Required (here or in --config)."),
        opt("-o", "--output", metavar="OUT",
            help="Output: FILE.h5/.nxs (one NeXus file for all frames), DIR/ (one text file "
                 "per frame), FILE.dat/.xy (one frame), or - (one frame to stdout)."),
        opt("--config", type=click.Path(dir_okay=False), metavar="JOB",
            help="Read options from a job file (.toml, .json) or from an azfilter output "
                 "(.h5/.nxs/.dat/.xy); options given here override it."),
        opt("--save-config", type=click.Path(dir_okay=False), metavar="JOB",
            help="Write the effective options to JOB (.toml or .json); without inputs, only "
                 "write it."),
        opt("--npt", type=click.IntRange(min=1), default=cfg.DEFAULTS["npt"], show_default=True,
            help="Number of radial bins."),
        opt("--unit", type=click.Choice(_unit_names()), default=cfg.DEFAULTS["unit"],
            show_default=True,
            help="Radial unit: q in nm^-1 or A^-1, 2theta in deg or rad, r in mm."),
        opt("--radial-range", type=float, nargs=2, metavar="LO HI", default=None,
            help="Radial range of the bins, in --unit [default: the extent of the unmasked "
                 "pixels]."),
        opt("--azimuth-range", type=float, nargs=2, metavar="LO HI", default=None,
            help="Azimuthal range in deg, chi in (-180, 180]; LO > HI crosses 180 "
                 "[default: all]."),
        opt("--split", type=click.Choice(cfg.SPLITS), default=None, show_default=split_default,
            help="Pixel splitting: no (each pixel in the bin of its centre) or full (exact "
                 "area). sigma-clip is no-split only."),
        opt("--error-model", type=click.Choice(cfg.ERROR_MODELS), default=None,
            show_default=error_default,
            help="Variance model: poisson (raw counts), azimuthal (scatter in the ring), "
                 "hybrid (clip azimuthal, report poisson)."),
        opt("--thres", ops=("sigma-clip",), type=click.FloatRange(min=0),
            default=cfg.DEFAULTS["thres"], show_default=True,
            help="sigma-clip: reject pixels further than THRES standard deviations from the "
                 "ring mean."),
        opt("--max-iter", ops=("sigma-clip",), type=click.IntRange(min=0),
            default=cfg.DEFAULTS["max_iter"], show_default=True,
            help="sigma-clip: maximum clipping passes."),
        opt("--percentile", ops=("medfilt",), type=_PercentileType(), default="50",
            show_default=True,
            help="medfilt: one percentile (50 = median) or two (40 60: mean of the fragments "
                 "between them), in 0-100."),
        opt("--mask", type=click.Path(dir_okay=False), metavar="FILE",
            help="Mask image, non-zero = masked; OR-ed with the detector's gaps and dummy "
                 "pixels."),
        opt("--dark", type=click.Path(dir_okay=False), metavar="FILE",
            help="Dark-current image, subtracted from each frame (counts)."),
        opt("--flat", type=click.Path(dir_okay=False), metavar="FILE",
            help="Flat-field image each frame is divided by (pixels <= 0 are masked)."),
        opt("--polarization", type=click.FloatRange(-1, 1), metavar="FACTOR", default=None,
            help="Polarization factor in [-1, 1] (0.99 at most synchrotrons) [default: no "
                 "correction]."),
        opt("--solid-angle/--no-solid-angle", default=True, show_default=True,
            help="Correct each pixel's solid angle."),
        opt("--normalization", type=click.FloatRange(min=0, min_open=True),
            default=cfg.DEFAULTS["normalization"], show_default=True, metavar="FACTOR",
            help="Divide intensities by FACTOR (monitor)."),
        opt("--backend", type=click.Choice(cfg.BACKENDS), default=cfg.DEFAULTS["backend"],
            show_default=True,
            help="Engine: cython (compiled, all cores), opencl (GPU/CPU), python (reference)."),
        opt("--device", metavar="DEV",
            help="OpenCL device: gpu, cpu or P:D indices (see azfilter devices) [default: the "
                 "best GPU, else CPU]."),
        opt("-r", "--recursive", is_flag=True, default=False,
            help="Descend into subdirectories of directory inputs."),
        opt("--overwrite", is_flag=True, default=False,
            help="Replace existing outputs (default: refuse, exit 2)."),
        opt("--skip-existing", is_flag=True, default=False,
            help="Only reduce frames whose output is missing or incomplete; HDF5: add the new "
                 "frames to the file."),
        opt("--shard", type=_ShardType(), default=None,
            help="Reduce only part I of N (0 <= I < N) of the frames: contiguous blocks in "
                 "input order. Default inside a SLURM array job: the task's index and count."),
        opt("--threads", type=click.IntRange(min=1), default=None,
            help="Threads of the compiled engine [default: all cores]."),
        opt("--dry-run", is_flag=True, default=False,
            help="Plan only: say what would be reduced, skipped, written."),
        opt("-q", "--quiet", is_flag=True, default=False,
            help="No progress and no summary (failures are still reported)."),
    ]
    return [decorator for decorator in options if decorator is not None]


def _apply(decorators: list[Callable]) -> Callable:
    def wrap(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return wrap


# Options whose value is not part of the job config.
_NOT_CONFIG = {"config", "save_config", "dry_run", "inputs", "config_file"}


def _given_options(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (not click's defaults), as config keys."""
    from click.core import ParameterSource

    given = {}
    for name, value in params.items():
        if name in _NOT_CONFIG:
            continue
        source = ctx.get_parameter_source(name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            if isinstance(value, tuple):
                value = list(value)
            given[name] = value
    inputs = params.get("inputs")
    if inputs:
        given["inputs"] = list(inputs)
    return given


# ============================================================================ the group


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="azfilter")
def main() -> None:
    """azfilter: batch azimuthal integration of X-ray diffraction frames with outlier
    rejection (sigma-clipping, median/quantile filter).

    \b
    Exit status: 0 all frames reduced, 2 usage or configuration error (nothing written),
    3 some inputs failed (the others were written; each failure is named on stderr).
    """
    # Reader and writer threads share the cores with the engine's OpenMP threads: OpenMP's
    # default busy-waiting between parallel regions then steals their time (measured: 27
    # instead of 73 frames/s on 2 cores). Sleeping waits cost microseconds per frame. Must be
    # set before the compiled engine (libgomp) loads; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_EXAMPLES = {
    "integrate": "azfilter integrate -p geo.poni --npt 2000 --unit 2th_deg 'run1/*.cbf' -o out/",
    "sigma-clip": "azfilter sigma-clip -p geo.poni --thres 4 scan.h5 -o scan_clipped.h5",
    "medfilt": "azfilter medfilt -p geo.poni --percentile 40 60 data/ -r -o med.h5",
    "run": "azfilter run job.toml --skip-existing",
}

_SUMMARIES = {
    "integrate": "Azimuthal integration: mean corrected intensity per radial bin.",
    "sigma-clip": "Azimuthal sigma-clipping: per bin, iteratively drop pixels further than "
                  "THRES standard deviations from the ring mean, average the rest.",
    "medfilt": "Azimuthal median/quantile filter: per bin, sort the pixel fragments by "
               "corrected intensity and average those between two percentiles.",
    "run": "Run the job described by a config file (.toml/.json) or stored in an azfilter "
           "output (.h5/.nxs/.dat/.xy); options given here override it.",
}


def _make_reduction_command(operation: str | None, name: str) -> click.Command:
    epilog = (
        "\b\nINPUT: files, globs, directories, or file.h5::/path/to/dataset; stacks are "
        "streamed frame by frame.\n"
        f"\b\nExample:\n  {_EXAMPLES[name]}"
    )

    @click.pass_context
    def command(ctx: click.Context, **params: Any) -> None:
        config_file = params.pop("config_file", None)
        if config_file is not None:
            params["config"] = config_file
        _run_reduction(ctx, operation, params)

    function = _apply(_reduction_options(operation))(command)
    # click lists parameters outermost decorator first: JOB before INPUT for "run".
    function = click.argument("inputs", nargs=-1,
                              metavar="[INPUT]..." if operation is None else "INPUT...")(function)
    if operation is None:
        function = click.argument("config_file", metavar="JOB",
                                  type=click.Path(dir_okay=False))(function)
    return click.command(name, cls=_ReductionCommand, help=_SUMMARIES[name], epilog=epilog,
                         context_settings=CONTEXT)(function)


for _operation in cfg.OPERATIONS:
    main.add_command(_make_reduction_command(_operation, _operation))
main.add_command(_make_reduction_command(None, "run"))


# ============================================================================ job set-up


def _environment_shard() -> tuple[int, int] | None:
    """(I, N) of the SLURM array task this process runs in, or None."""
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    task_count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if not task_id or not task_count:
        return None
    try:
        task = int(task_id)
        count = int(task_count)
        minimum = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except ValueError:
        raise Fatal(f"cannot read the SLURM array task from SLURM_ARRAY_TASK_ID={task_id!r}, "
                    f"SLURM_ARRAY_TASK_COUNT={task_count!r}") from None
    index = (task - minimum) // max(step, 1)
    if count < 1 or not 0 <= index < count:
        raise Fatal(f"SLURM array task {task} (min {minimum}, step {step}) is not one of "
                    f"{count} tasks; give --shard I/N")
    return index, count


@dataclass
class Planned:
    """One frame to reduce (or a whole file that already failed while planning)."""

    item: Any  # azfilter.frames.InputItem (the whole file, no selection)
    index: int
    nframes: int
    source: str  # absolute path, or path::dataset when one was given
    out_path: Path | None = None
    error: FrameReadError | None = None


@dataclass
class Block:
    """Consecutive frames of one file, read by one reader task."""

    item: Any
    frames: list[Planned]


@dataclass
class Counters:
    reduced: int = 0
    skipped: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _absolute_source(item: Any) -> str:
    path = os.path.abspath(item.path)
    return path if item.h5path is None else f"{path}::{item.h5path}"


def _file_part(source: str) -> str:
    return source.split("::", 1)[0]


def _output_kind(output: str) -> str:
    from .vocabulary import HDF5_SUFFIXES, TEXT_SUFFIXES

    if output == "-":
        return "stdout"
    lower = output.lower()
    if lower.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        return "textdir"
    if lower.endswith(TEXT_SUFFIXES):
        return "textfile"
    raise Fatal(f"-o {output}: not an existing directory; end it with / to create one, or "
                f"use .h5/.nxs (one HDF5 file) or .dat/.xy (one frame)")


def _shard_output(path: str, shard: tuple[int, int] | None) -> str:
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


def _expand(config: dict[str, Any], output: str | None = None) -> list[tuple[Any, str | None]]:
    """Input items and, for items found in a directory input, the directory they came from.

    The HDF5 output itself is left out (``-r data/ -o data/all.h5`` run twice must not read
    its own result).
    """
    from .frames import expand_inputs

    items: list[tuple[Any, str | None]] = []
    seen: set[tuple] = set()
    if output is not None and output != "-":
        seen.add((os.path.realpath(output), None))
    for spec in config["inputs"]:
        root = spec if os.path.isdir(os.path.expanduser(spec)) else None
        try:
            found = expand_inputs([spec], recursive=config["recursive"])
        except AzfilterError as err:
            if root is not None:
                # An existing directory with no data files yet (a cron job over a directory
                # that fills up) is not an error: there is nothing to do.
                if not config["quiet"]:
                    _stderr_line(f"azfilter: note: {spec}: no data files yet")
                continue
            raise Fatal(f"input {err}") from None
        for item in found:
            key = (os.path.realpath(item.path), item.h5path)
            if key not in seen:
                seen.add(key)
                items.append((item, root))
    return items


def _plan(config: dict[str, Any], items: list[tuple[Any, str | None]], out_kind: str,
          output: str) -> list[Planned]:
    """Every frame of the inputs in order (files whose frames cannot be counted become one
    failed entry)."""
    from .output import text_output_name

    plan: list[Planned] = []
    for item, root in items:
        source = _absolute_source(item)
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
                name = text_output_name(source, index, nframes, config["unit"])
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


def _blocks(plan: list[Planned]) -> list[Block]:
    """Group consecutive frames of the same file into blocks of at most BLOCK_FRAMES."""
    blocks: list[Block] = []
    for planned in plan:
        last = blocks[-1] if blocks else None
        if (last is not None and planned.error is None and last.frames[-1].error is None
                and last.item is planned.item and len(last.frames) < BLOCK_FRAMES
                and last.frames[-1].index + 1 == planned.index):
            last.frames.append(planned)
        else:
            blocks.append(Block(planned.item, [planned]))
    return blocks


def _operation_parameters(config: dict[str, Any]) -> dict[str, Any]:
    keys = ["npt", "unit", "split", "error_model"] + list(
        cfg.OPERATION_KEYS[config["operation"]]) + [
        "mask", "dark", "flat", "polarization", "solid_angle", "normalization",
        "radial_range", "azimuth_range", "backend", "device"]
    parameters = {}
    for key in keys:
        value = config.get(key)
        if key in ("mask", "dark", "flat") and value:
            value = os.path.abspath(value)
        parameters[key] = value
    return parameters


def _make_integrator(config: dict[str, Any], geometry: Any, first_item: Any | None) -> Any:
    from .integrator import Integrator

    if geometry.detector.shape is None and first_item is not None:
        # A generic detector takes the image shape: read it from the first input now, so that
        # mask/dark/flat and the lookup table are checked before any frame.
        from .frames import describe_file

        try:
            shape = describe_file(first_item).get("shape")
        except AzfilterError:
            shape = None
        if shape:
            geometry = dataclasses.replace(
                geometry, detector=geometry.detector.with_shape(tuple(shape)))
    pixel_mask = None
    if first_item is not None:
        # Eiger/NeXus files carry the detector's own pixel mask (dead, noisy, gap pixels): use
        # it, OR-ed with the gap mask and the user mask, when it fits the detector.
        from .frames import pixel_mask_for

        try:
            pixel_mask = pixel_mask_for(first_item)
        except AzfilterError:
            pixel_mask = None
        shape = geometry.detector.shape
        if pixel_mask is not None and (shape is None or tuple(pixel_mask.shape) != tuple(shape)):
            pixel_mask = None
    integrator = Integrator(
        geometry, npt=config["npt"], unit=config["unit"], backend=config["backend"],
        device=config["device"], mask=config["mask"], dark=config["dark"], flat=config["flat"],
        polarization=config["polarization"], solid_angle=config["solid_angle"],
        radial_range=config["radial_range"], azimuth_range=config["azimuth_range"],
        normalization=config["normalization"], threads=config["threads"],
        pixel_mask=pixel_mask,
    )
    if integrator.shape is not None:
        integrator.table(config["split"])  # builds (or loads) the table: errors show now
    return integrator


def _reduce(integrator: Any, config: dict[str, Any], data: Any) -> Any:
    operation = config["operation"]
    if operation == "integrate":
        return integrator.integrate(data, error_model=config["error_model"],
                                    split=config["split"])
    if operation == "sigma-clip":
        return integrator.sigma_clip(data, thres=config["thres"], max_iter=config["max_iter"],
                                     error_model=config["error_model"])
    percentile = config["percentile"]
    return integrator.medfilt(data, percentile=percentile[0] if len(percentile) == 1
                              else tuple(percentile), split=config["split"],
                              error_model=config["error_model"])


# ============================================================================ progress


class Progress:
    """Progress on stderr: a bar on a terminal, a log line every LOG_INTERVAL s otherwise."""

    def __init__(self, total: int, quiet: bool, label: str):
        self.total = total
        self.quiet = quiet
        self.label = label
        self.stream = sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.start = time.monotonic()
        self.done = 0
        self.failed = 0
        self.lock = threading.Lock()
        self._last_draw = 0.0
        self._last_log = self.start
        self._bar_shown = False

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False

    def message(self, text: str) -> None:
        """A line that is always shown (failures), above the bar."""
        with self.lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def step(self, failed: bool = False) -> None:
        with self.lock:
            self.done += 1
            self.failed += int(failed)
            if self.quiet:
                return
            now = time.monotonic()
            if self.tty:
                if now - self._last_draw >= 0.1 or self.done == self.total:
                    self._draw(now)
            elif now - self._last_log >= LOG_INTERVAL and self.done < self.total:
                self._last_log = now
                self.stream.write(f"azfilter: {self.label}: {self._status(now)}\n")
                self.stream.flush()

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}/{self.total} frames, {rate:.1f} frames/s"
        if rate > 0 and self.done < self.total:
            eta = (self.total - self.done) / rate
            text += f", ETA {_duration(eta)}"
        return text

    def _draw(self, now: float) -> None:
        self._last_draw = now
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r\033[K{self.label} [{bar}] {self._status(now)}")
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        with self.lock:
            self._clear()
            self.stream.flush()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ============================================================================ sinks


class _Sink:
    """Where results go; ``write`` runs in the writer thread."""

    def write(self, planned: Planned, frame_source: str, result: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish (atomic rename of a shared output)."""

    def abort(self) -> None:
        """Drop unfinished shared output."""


class _TextSink(_Sink):
    def __init__(self, meta: Any, stdout: bool = False):
        self.meta = meta
        self.stdout = stdout
        self._made: set[Path] = set()

    def _meta_for(self, planned: Planned) -> Any:
        # Each text file's config reruns that file's reduction (a config line listing
        # thousands of inputs in each of thousands of files would be absurd).
        config = dict(self.meta.config, inputs=[planned.source])
        return dataclasses.replace(self.meta, config=config)

    def write(self, planned: Planned, frame_source: str, result: Any) -> None:
        from .output import format_text, write_text

        meta = self._meta_for(planned)
        if self.stdout:
            click.echo(format_text(result, meta, frame_source, planned.index, planned.nframes),
                       nl=False)
            return
        assert planned.out_path is not None
        parent = planned.out_path.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        write_text(planned.out_path, result, meta, frame_source, planned.index,
                   planned.nframes)


class _NexusSink(_Sink):
    def __init__(self, writer: Any):
        self.writer = writer

    def write(self, planned: Planned, frame_source: str, result: Any) -> None:
        self.writer.write(result, planned.source, planned.index)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


# ============================================================================ the run


def _merge_config(ctx: click.Context, operation: str | None,
                  params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    given = _given_options(ctx, params)
    layers = []
    config_path = params.get("config")
    if config_path:
        try:
            layers.append(cfg.load_config(config_path))
        except AzfilterError as err:
            raise Fatal(str(err)) from None
    try:
        command_line = cfg.normalize(given, "command line")
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    if operation is not None:
        command_line["operation"] = operation
    if command_line.get("overwrite") and command_line.get("skip_existing"):
        raise click.UsageError("--overwrite and --skip-existing exclude each other", ctx)
    # --overwrite / --skip-existing on the command line replace the config's choice.
    if command_line.get("overwrite"):
        command_line["skip_existing"] = False
    if command_line.get("skip_existing"):
        command_line["overwrite"] = False
    layers.append(command_line)
    merged = cfg.effective(*layers)
    if merged.get("operation") is None:
        raise Fatal(f"{config_path}: the config names no operation "
                    f"(operation = {' | '.join(cfg.OPERATIONS)})")
    return merged, config_path


class _Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. a SLURM time limit): stop like Ctrl-C, dropping unfinished outputs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _run_reduction(ctx: click.Context, operation: str | None, params: dict[str, Any]) -> None:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = _reduction(ctx, operation, params)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    except KeyboardInterrupt as err:
        terminated = isinstance(err, _Terminated)
        _stderr_line(f"azfilter: {'terminated' if terminated else 'interrupted'}; "
                     "unfinished outputs were removed")
        ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    ctx.exit(status)


def _reduction(ctx: click.Context, operation: str | None, params: dict[str, Any]) -> int:
    config, config_path = _merge_config(ctx, operation, params)
    op = config["operation"]
    if op == "sigma-clip" and config.get("split") == "full":
        raise click.UsageError(
            "sigma-clip works without pixel splitting only (--split no): a pixel shared "
            "between bins cannot be rejected in one of them and kept in the other; use medfilt "
            "--split full for a split-pixel outlier filter", ctx)
    if config["overwrite"] and config["skip_existing"]:
        raise click.UsageError("--overwrite and --skip-existing exclude each other", ctx)

    save_path = params.get("save_config")
    if not config.get("poni"):
        raise click.UsageError("Missing option '-p' / '--poni' (the geometry PONI file)", ctx)
    if save_path and not config.get("inputs") and not config.get("output"):
        _save_config(config, save_path)
        _stderr_line(f"azfilter: wrote {save_path}")
        return EXIT_OK
    if not config.get("inputs"):
        raise click.UsageError("Missing argument 'INPUT...' (files, globs, directories)", ctx)
    if not config.get("output"):
        raise click.UsageError("Missing option '-o' / '--output'", ctx)

    if config.get("shard"):
        shard = cfg.parse_shard(config["shard"])
    else:
        shard = _environment_shard()
    quiet = config["quiet"]

    # ---- set-up: anything wrong here is exit 2 with nothing written
    from .poni import load_poni

    geometry = load_poni(config["poni"])
    output_arg = config["output"]
    out_kind = _output_kind(output_arg)
    output = _shard_output(output_arg, shard) if out_kind == "hdf5" else output_arg
    items = _expand(config, output if out_kind == "hdf5" else None)
    plan_all = _plan(config, items, out_kind, output)
    if shard is not None:
        start = shard[0] * len(plan_all) // shard[1]
        stop = (shard[0] + 1) * len(plan_all) // shard[1]
        plan = plan_all[start:stop]
    else:
        plan = plan_all
    frames_planned = [p for p in plan if p.error is None]
    if out_kind in ("stdout", "textfile") and len(frames_planned) > 1:
        raise Fatal(f"-o {output_arg} takes one frame, but the inputs hold "
                    f"{len(frames_planned)}; give a directory (out/) or an .h5 file")
    _check_collisions(frames_planned)

    job = cfg.job_config(config)
    job["output"] = os.path.abspath(output_arg) if output_arg != "-" else "-"

    from .output import NexusWriter, OutputMeta, geometry_lines

    meta = OutputMeta(
        operation=op, unit=config["unit"], parameters=_operation_parameters(config),
        poni_text=geometry.to_poni(), geometry=geometry_lines(geometry), config=job,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}",
    )

    # ---- existing outputs
    mode = "overwrite" if config["overwrite"] else (
        "append" if config["skip_existing"] else "new")
    todo, skipped = _skip_existing(frames_planned, out_kind, output, mode, config["npt"])
    writer = None
    if out_kind == "hdf5":
        writer = NexusWriter(output, meta, mode=mode)
        if mode == "append":
            todo, more = _drop_stored(todo, writer.existing)
            skipped += more
    plan_failures = [p for p in plan if p.error is not None]

    if params.get("dry_run"):
        if save_path:
            _save_config(config, save_path)
        _dry_run_report(op, todo, skipped, plan_failures, out_kind, output, shard)
        return EXIT_OK

    # The integrator (lookup table) only when there is work: a cron run that finds nothing new
    # stays cheap.  Bad mask/dark/flat files or a unit the geometry cannot give fail here.
    integrator = None
    # An HDF5 output with nothing to put in it is still written (empty) when nothing failed,
    # so that every shard of an array job leaves its file for `azfilter merge`.
    empty_output = (out_kind == "hdf5" and not todo and not plan_failures
                    and not Path(output).exists())
    if todo or empty_output:
        integrator = _make_integrator(config, geometry, todo[0].item if todo else None)
        meta.geometry = geometry_lines(integrator.geometry)
        if empty_output and writer is not None and integrator.shape is not None:
            writer.start(integrator.table(config["split"]).radial)
    if save_path:
        _save_config(config, save_path)

    sink: _Sink = _NexusSink(writer) if writer is not None else _TextSink(
        meta, stdout=out_kind == "stdout")
    label = op if shard is None else f"{op} shard {shard[0]}/{shard[1]}"
    progress = Progress(len(todo) + len(plan_failures), quiet, label)
    counters = Counters(skipped=skipped)
    started = time.monotonic()
    for failure in plan_failures:
        _report_failure(progress, counters, failure.error, 1)
    try:
        _pipeline(todo, integrator, config, sink, progress, counters)
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    if not quiet or counters.failed:
        rate = counters.reduced / elapsed if elapsed > 0 else 0.0
        where = "stdout" if out_kind == "stdout" else output
        _stderr_line(
            f"azfilter: {label}: {_plural(counters.reduced, 'frame')} reduced, "
            f"{counters.skipped} skipped, {counters.failed} failed in {elapsed:.1f} s "
            f"({rate:.1f} frames/s) -> {where}"
        )
    return EXIT_FAILED if counters.failed else EXIT_OK


def _save_config(config: dict[str, Any], path: str) -> None:
    job = cfg.job_config(config)
    try:
        cfg.save_config(job, path)
    except AzfilterError as err:
        raise Fatal(str(err)) from None


def _check_collisions(plan: list[Planned]) -> None:
    owners: dict[Path, Planned] = {}
    for planned in plan:
        if planned.out_path is None:
            continue
        other = owners.get(planned.out_path)
        if other is not None:
            raise Fatal(
                f"{other.source} frame {other.index} and {planned.source} frame "
                f"{planned.index} would both be written to {planned.out_path}; use an .h5 "
                "output or separate runs"
            )
        owners[planned.out_path] = planned


def _skip_existing(plan: list[Planned], out_kind: str, output: str, mode: str,
                   npt: int) -> tuple[list[Planned], int]:
    """Frames still to reduce and the number skipped; refuses existing text outputs in
    mode "new"."""
    from .output import text_output_complete

    if out_kind == "hdf5":
        if mode == "new" and Path(output).exists():
            raise Fatal(f"{output}: output exists; use --overwrite to replace it or "
                        "--skip-existing to add only new frames")
        return plan, 0
    if out_kind not in ("textdir", "textfile"):
        return plan, 0
    existing = [p for p in plan if p.out_path is not None and p.out_path.exists()]
    if not existing:
        return plan, 0
    if mode == "new":
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise Fatal(f"{existing[0].out_path}: output exists{more}; use --overwrite to replace "
                    "or --skip-existing to reduce only the missing frames")
    if mode == "overwrite":
        return plan, 0
    done = {id(p) for p in existing if text_output_complete(p.out_path, npt)}
    return [p for p in plan if id(p) not in done], len(done)


def _drop_stored(plan: list[Planned], stored: set[tuple[str, int]]) -> tuple[list[Planned], int]:
    if not stored:
        return plan, 0
    stored_files = {(_file_part(source), index) for source, index in stored}
    todo = []
    for planned in plan:
        key = (planned.source, planned.index)
        if key in stored or ("::" not in planned.source and key in stored_files):
            continue
        todo.append(planned)
    return todo, len(plan) - len(todo)


def _dry_run_report(operation: str, todo: list[Planned], skipped: int,
                    failures: list[Planned], out_kind: str, output: str,
                    shard: tuple[int, int] | None) -> None:
    where = f" shard {shard[0]}/{shard[1]}" if shard else ""
    for planned in todo:
        target = planned.out_path if planned.out_path is not None else output
        click.echo(f"{planned.source} frame {planned.index} -> {target}")
    for failure in failures:
        click.echo(f"unreadable: {failure.error}")
    _stderr_line(f"azfilter: {operation}{where} (dry run): {len(todo)} frames to reduce, "
                 f"{skipped} skipped, {len(failures)} unreadable -> {output}")


def _report_failure(progress: Progress, counters: Counters, error: Exception,
                    frames: int) -> None:
    with counters.lock:
        counters.failed += frames
    progress.message(f"azfilter: failed: {error}")
    for _ in range(frames):
        progress.step(failed=True)


_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the run is stopping; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class _FrameBuffers:
    """Reused frame buffers that the engine reads fastest (page-locked memory for OpenCL).

    Readers decode HDF5 frames straight into them (``Dataset.read_direct``) and copy frames
    of other formats into them; the reducer gives each back once its frame is reduced (the
    engine has finished reading it by then). At most ``capacity`` buffers exist: when all
    are in use a reader gets a plain array instead, so memory stays bounded and a reader
    never waits for a buffer (no deadlock with the bounded queues).
    """

    def __init__(self, integrator: Any, capacity: int):
        self._integrator = integrator
        self._capacity = capacity
        self._free: dict[tuple, list[Any]] = {}
        # buffers handed out, by id; one dropped by a reader (read error) is forgotten
        self._lent: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._failed = False     # page-locked allocation failed once: plain arrays from then on

    def take(self, shape: tuple[int, ...], dtype: Any, fallback: bool = True) -> Any:
        """A buffer of ``shape`` and ``dtype``; a plain array (or None without ``fallback``)
        when all ``capacity`` are in use."""
        import numpy as np

        key = (tuple(int(n) for n in shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            buffer = free.pop() if free else None
            if buffer is None and not self._failed:
                if self._count() >= self._capacity:
                    for items in self._free.values():   # idle, of another shape: drop one
                        if items:
                            items.pop()
                            break
                if self._count() < self._capacity:
                    try:
                        buffer = self._integrator.frame_buffer(*key)
                    except AzfilterError:
                        self._failed = True
            if buffer is not None:
                self._lent[id(buffer)] = buffer
                return buffer
        return np.empty(key[0], dtype=key[1]) if fallback else None

    def _count(self) -> int:
        return len(self._lent) + sum(len(items) for items in self._free.values())

    def fill(self, data: Any) -> Any:
        """``data`` copied into a buffer (``data`` itself when it is one or none is free)."""
        if self._lent.get(id(data)) is data or data.ndim != 2 or data.dtype.kind not in "biuf":
            return data
        buffer = self.take(data.shape, data.dtype, fallback=False)
        if buffer is None:
            return data
        buffer[...] = data
        return buffer

    def give_back(self, data: Any) -> None:
        """Return a buffer from :meth:`take` (anything else is ignored)."""
        with self._lock:
            if self._lent.get(id(data)) is data:
                del self._lent[id(data)]
                self._free.setdefault((data.shape, data.dtype.str), []).append(data)


def _read_block(block: Block, q: queue.Queue, stop: threading.Event,
                buffers: _FrameBuffers | None = None) -> None:
    """Reader task: decode the block's frames into ``q`` (then _END)."""
    from .frames import Frame, open_frames

    first, last = block.frames[0].index, block.frames[-1].index
    item = block.item.select(range(first, last + 1))
    try:
        for obj in open_frames([item], errors="report",
                               buffer=None if buffers is None else buffers.take):
            if buffers is not None and isinstance(obj, Frame):
                obj.data = buffers.fill(obj.data)
            if not _put(q, obj, stop):
                return
    except Exception as err:  # noqa: BLE001 - a reader must never die silently
        _put(q, FrameReadError(block.frames[0].source, None,
                               f"read error: {type(err).__name__}: {err}"), stop)
    finally:
        _put(q, _END, stop)


def _pipeline(todo: list[Planned], integrator: Any, config: dict[str, Any], sink: _Sink,
              progress: Progress, counters: Counters) -> None:
    """Read (thread pool) -> reduce (this thread) -> write (writer thread), bounded queues."""
    if not todo:
        sink.close()
        return
    blocks = _blocks(todo)
    threads = config.get("threads")
    readers = 1 if threads == 1 else 2
    stop = threading.Event()
    write_queue: queue.Queue = queue.Queue(maxsize=8)
    writer_error: list[BaseException] = []

    def writer() -> None:
        while True:
            job = write_queue.get()
            if job is _END:
                return
            planned, frame_source, result = job
            try:
                sink.write(planned, frame_source, result)
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                writer_error.append(err)
                stop.set()
                return
            with counters.lock:
                counters.reduced += 1
            progress.step()

    writer_thread = threading.Thread(target=writer, name="azfilter-writer", daemon=True)
    writer_thread.start()
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="azfilter-reader")
    window = readers + 1
    # OpenCL: frames are read into page-locked buffers (DMA to the GPU, no staging copy);
    # enough for every frame the queues can hold, plus the readers' and the reducer's
    buffers = _FrameBuffers(integrator, window * (READ_AHEAD + 1) + 1) \
        if config.get("backend") == "opencl" else None
    pending: list[tuple[Block, queue.Queue]] = []
    next_block = 0
    interrupted: BaseException | None = None
    try:
        while (pending or next_block < len(blocks)) and not stop.is_set():
            while next_block < len(blocks) and len(pending) < window:
                block_queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
                pool.submit(_read_block, blocks[next_block], block_queue, stop, buffers)
                pending.append((blocks[next_block], block_queue))
                next_block += 1
            block, block_queue = pending.pop(0)
            _consume_block(block, block_queue, integrator, config, write_queue, progress,
                           counters, stop, buffers)
    except BaseException as err:  # KeyboardInterrupt, SIGTERM: clean up, then re-raise
        interrupted = err
        stop.set()
    finally:
        pool.shutdown(wait=True, cancel_futures=stop.is_set())
        if writer_thread.is_alive():
            # The writer drains what was reduced, then stops (the queue has room as it runs).
            _put(write_queue, _END, threading.Event())
            writer_thread.join()
    if interrupted is not None or writer_error:
        sink.abort()
    if interrupted is not None:
        raise interrupted
    if writer_error:
        err = writer_error[0]
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RunFailed(f"cannot write the output: {reason}")
    sink.close()


def _consume_block(block: Block, block_queue: queue.Queue, integrator: Any,
                   config: dict[str, Any], write_queue: queue.Queue, progress: Progress,
                   counters: Counters, stop: threading.Event,
                   buffers: _FrameBuffers | None = None) -> None:
    expected = {planned.index: planned for planned in block.frames}
    while not stop.is_set():
        try:
            obj = block_queue.get(timeout=0.1)
        except queue.Empty:
            continue
        if obj is _END:
            break
        if isinstance(obj, FrameReadError):
            if obj.index is None:
                _report_failure(progress, counters, obj, len(expected))
                expected.clear()
            elif obj.index in expected:
                expected.pop(obj.index)
                _report_failure(progress, counters, obj, 1)
            continue
        planned = expected.pop(obj.index, None)
        if planned is None:
            if buffers is not None:
                buffers.give_back(obj.data)
            continue
        try:
            result = _reduce(integrator, config, obj.data)
        except AzfilterError as err:
            _report_failure(progress, counters,
                            FrameReadError(planned.source, planned.index, str(err)), 1)
            continue
        except Exception as err:  # noqa: BLE001 - one bad frame must not stop the run
            _report_failure(progress, counters, FrameReadError(
                planned.source, planned.index,
                f"reduction failed: {type(err).__name__}: {err}"), 1)
            continue
        finally:
            if buffers is not None:   # reduced (the engine has read it): reuse the buffer
                buffers.give_back(obj.data)
        frame_source = obj.source if os.path.isabs(_file_part(obj.source)) else (
            os.path.abspath(_file_part(obj.source))
            + (obj.source[len(_file_part(obj.source)):]))
        if not _put(write_queue, (planned, frame_source, result), stop):
            return
    if expected and not stop.is_set():
        for planned in expected.values():
            _report_failure(progress, counters, FrameReadError(
                planned.source, planned.index, "frame was not delivered by the reader"), 1)


# ============================================================================ info


@main.command("info", context_settings=CONTEXT,
              epilog="\b\nExample:\n  azfilter info geo.poni run1/img_0001.cbf scan.h5")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def info_command(paths: tuple[str, ...]) -> None:
    """Describe PONI files (detector, distance, beam centre, energy), data files (format,
    frame shape, dtype, frame count: nothing is reduced) and azfilter results."""
    status = EXIT_OK
    for number, path in enumerate(paths):
        if number:
            click.echo("")
        file_part = path.split("::", 1)[0]
        if not os.path.exists(os.path.expanduser(file_part)):
            _stderr_line(f"azfilter: error: {path}: no such file")
            status = max(status, EXIT_USAGE)
            continue
        try:
            for line in _describe(path):
                click.echo(line)
        except AzfilterError as err:
            _stderr_line(f"azfilter: error: {err}")
            status = max(status, EXIT_FAILED) if status != EXIT_USAGE else status
    if status:
        sys.exit(status)


def _describe(path: str) -> list[str]:
    from .output import geometry_lines
    from .vocabulary import HDF5_SUFFIXES, TEXT_SUFFIXES

    lower = path.lower()
    if lower.endswith(".poni"):
        from .poni import load_poni

        geometry = load_poni(path)
        return [f"{path}: PONI geometry"] + [f"  {line}" for line in geometry_lines(geometry)]
    if lower.endswith(TEXT_SUFFIXES):
        return _describe_result(path)
    if lower.endswith(HDF5_SUFFIXES) and "::" not in path:
        try:
            return _describe_result(path)
        except AzfilterError:
            pass  # not an azfilter result: a data file
    from .frames import describe_file

    info = describe_file(path)
    shape = "x".join(str(n) for n in info.get("shape", ())) or "?"
    lines = [f"{path}: {info.get('format', '?')} data file",
             f"  frames: {info.get('nframes', '?')}",
             f"  frame shape: {shape} (rows x columns)",
             f"  dtype: {info.get('dtype', '?')}",
             f"  compression: {info.get('compression', 'none')}",
             f"  size: {info.get('size_bytes', 0) / 1e6:.2f} MB"]
    if info.get("h5path"):
        lines.append(f"  dataset: {info['h5path']} ({info.get('layout', 'dataset')})")
    mask = info.get("pixel_mask")
    if mask:
        lines.append(f"  pixel mask: {mask['source']} ({mask['masked']} masked pixels)")
    for error in info.get("errors") or []:
        lines.append(f"  unreadable part: {error}")
    return lines


def _describe_result(path: str) -> list[str]:
    from .output import read_result

    table = read_result(path)
    config = table.config
    lines = [f"{path}: azfilter result ({table.operation or config.get('operation', '?')})",
             f"  frames: {table.intensity.shape[0]}",
             f"  bins: {table.radial.shape[0]} in {table.unit} "
             f"({table.radial[0]:.6g} .. {table.radial[-1]:.6g})"]
    if config.get("poni"):
        lines.append(f"  geometry: {config['poni']}")
    sources = sorted({_file_part(s) for s in table.sources if s})
    if sources:
        lines.append(f"  sources: {len(sources)} file(s), first {sources[0]}")
    keys = [k for k in ("error_model", "split", "thres", "max_iter", "percentile",
                        "polarization", "solid_angle") if k in config]
    if keys:
        lines.append("  options: " + ", ".join(f"{k}={config[k]}" for k in keys))
    return lines


# ============================================================================ devices


@main.command("devices", context_settings=CONTEXT,
              epilog="\b\nExample:\n  azfilter devices")
def devices_command() -> None:
    """List the OpenCL platforms and devices usable with --backend opencl (or say why
    there are none). Select one with --device gpu|cpu|P:D."""
    try:
        from .backends import opencl
    except Exception as err:  # noqa: BLE001 - pyopencl or the driver may be missing
        click.echo(f"No OpenCL: {type(err).__name__}: {err}")
        return
    try:
        devices = list(opencl.list_devices())
    except Exception as err:  # noqa: BLE001
        devices = []
        click.echo(f"No OpenCL: {err}")
    if not devices:
        status = getattr(opencl, "opencl_status", None)
        reason = status() if callable(status) else "no OpenCL platform found"
        click.echo(f"No OpenCL device: {reason}")
        return
    platform_shown = None
    for device in devices:
        if isinstance(device, dict) and device.get("platform_name") != platform_shown:
            platform_shown = device.get("platform_name")
            click.echo(f"platform {device.get('platform', '?')}: {platform_shown}")
        click.echo("  " + _format_device(device))
    click.echo("Select one with --backend opencl --device P:D (or gpu / cpu).")


def _format_device(device: Any) -> str:
    if not isinstance(device, dict):
        return str(device)
    parts = [str(device.get("id", "?")), str(device.get("type", "")),
             str(device.get("name", "")).strip()]
    details = []
    if device.get("global_memory"):
        details.append(f"{float(device['global_memory']) / 2**30:.1f} GiB")
    if device.get("compute_units"):
        details.append(f"{device['compute_units']} compute units")
    if "fp64" in device:
        details.append(f"fp64 {'yes' if device['fp64'] else 'no'}")
    if device.get("version"):
        details.append(str(device["version"]).strip())
    text = "  ".join(p for p in parts if p)
    return f"{text} ({', '.join(details)})" if details else text


# ============================================================================ plot


@main.command("plot", context_settings=CONTEXT,
              epilog="\b\nExamples:\n  azfilter plot out/*.dat -o patterns.png\n"
                     "  azfilter plot scan.h5 --heatmap --log -o scan.png")
@click.argument("results", nargs=-1, required=True, metavar="RESULT...")
@click.option("-o", "--output", required=True, metavar="FIG",
              help="Figure file (.png, .pdf, .svg).")
@click.option("--heatmap", is_flag=True, help="One image row per frame instead of curves "
              "(automatic above 50 frames).")
@click.option("--log", "log_scale", is_flag=True, help="Logarithmic intensity scale.")
@click.option("--no-errors", is_flag=True, help="Leave out the ±sigma error bands.")
@click.option("--title", default=None, help="Figure title [default: the first file name].")
@click.option("--overwrite", is_flag=True, help="Replace an existing figure.")
def plot_command(results: tuple[str, ...], output: str, heatmap: bool, log_scale: bool,
                 no_errors: bool, title: str | None, overwrite: bool) -> None:
    """Plot 1-D patterns from azfilter results (text or HDF5): intensity with a ±sigma band
    against the radial unit, frames overlaid, or a heatmap of many frames."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Fatal("azfilter plot needs matplotlib: pip install 'azfilter[plot]' "
                    "(or pip install matplotlib)") from None
    import numpy as np

    from .output import read_result

    if os.path.exists(output) and not overwrite:
        raise Fatal(f"{output}: exists; use --overwrite to replace it")
    tables = []
    try:
        for path in results:
            tables.append(read_result(path))
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    units = {t.unit for t in tables}
    if len(units) > 1:
        raise Fatal(f"the results use different units ({', '.join(sorted(units))}); "
                    "plot them separately")
    from .units import get_unit

    unit = get_unit(tables[0].unit)
    rows = sum(t.intensity.shape[0] for t in tables)
    if rows == 0:
        raise Fatal("the results hold no frames")
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    if heatmap or rows > 50:
        radial = tables[0].radial
        for table in tables[1:]:
            if table.radial.shape != radial.shape or not np.allclose(table.radial, radial):
                raise Fatal("--heatmap needs results with the same radial bins")
        image = np.concatenate([t.intensity for t in tables], axis=0)
        # Robust colour limits: a few extreme bins (edges, unrejected spots) must not wash
        # out the rings.
        finite = image[np.isfinite(image) & (image > 0)] if log_scale else \
            image[np.isfinite(image)]
        norm = None
        if finite.size:
            low, high = np.percentile(finite, [0.5, 99.5])
            if log_scale:
                from matplotlib.colors import LogNorm

                norm = LogNorm(vmin=low, vmax=max(high, low * 1.0001))
            else:
                from matplotlib.colors import Normalize

                norm = Normalize(vmin=low, vmax=max(high, low + 1e-12))
        mesh = axes.imshow(image, aspect="auto", origin="lower", interpolation="nearest",
                           extent=(radial[0], radial[-1], -0.5, rows - 0.5), norm=norm)
        figure.colorbar(mesh, ax=axes, label="intensity")
        axes.set_ylabel("frame")
    else:
        operations = {t.operation for t in tables}
        for table in tables:
            labels = table.labels
            if len(operations) > 1:
                labels = [f"{table.operation}: {label}" for label in labels]
            for row, label in enumerate(labels):
                intensity = table.intensity[row]
                line, = axes.plot(table.radial, intensity, lw=1, label=label)
                if not no_errors:
                    sigma = table.sigma[row]
                    axes.fill_between(table.radial, intensity - sigma, intensity + sigma,
                                      color=line.get_color(), alpha=0.3, lw=0)
        axes.set_ylabel("intensity")
        if log_scale:
            axes.set_yscale("log")
        if rows <= 12:
            axes.legend(fontsize="small")
    axes.set_xlabel(unit.label)
    axes.set_title(title if title is not None else Path(results[0]).name)
    figure.tight_layout()
    tmp = f"{output}.tmp{os.getpid()}{Path(output).suffix}"
    try:
        figure.savefig(tmp)
        os.replace(tmp, output)
    except (OSError, ValueError) as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise Fatal(f"{output}: cannot write the figure: {err}") from None
    finally:
        plt.close(figure)
    _stderr_line(f"azfilter: plot: {rows} pattern(s) -> {output}")


# ============================================================================ merge


@main.command("merge", context_settings=CONTEXT,
              epilog="\b\nExample (after a SLURM array job):\n"
                     "  azfilter merge results/run_shard*.h5 -o results/run.h5")
@click.argument("shards", nargs=-1, required=True, metavar="SHARD.h5...")
@click.option("-o", "--output", required=True, metavar="ALL.h5",
              help="The joined NeXus file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def merge_command(shards: tuple[str, ...], output: str, overwrite: bool, quiet: bool) -> None:
    """Join the HDF5 outputs of the shards of one job (--shard I/N) into one file, in
    source/frame order. Exit status 3 when shards are missing (the file is still written)."""
    from .output import merge_nexus

    try:
        summary = merge_nexus(shards, output, overwrite=overwrite)
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    status = EXIT_OK
    if summary["missing_shards"]:
        missing = ", ".join(str(k) for k in summary["missing_shards"])
        _stderr_line(f"azfilter: merge: shard(s) {missing} missing from the inputs")
        status = EXIT_FAILED
    if not quiet or status:
        extra = f", {summary['duplicates']} duplicate rows dropped" if summary["duplicates"] \
            else ""
        _stderr_line(f"azfilter: merge: {len(shards)} file(s), {summary['rows']} frames"
                     f"{extra} -> {output}")
    if status:
        sys.exit(status)


def run(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        main.main(args=argv, prog_name="azfilter", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())


__all__ = ["main", "run", "Fatal"]

"""The ``azfilter`` command: click only.

Options and help live here; a reduction command turns its command line (and job file) into a
config and hands it to :func:`azfilter.pipeline.run_job` (plan → readers → engine → writer),
then turns the job's report into an exit status. The other subcommands live in
:mod:`azfilter.commands`, one module each, imported only when they run.

Exit status: 0 all frames reduced (or skipped), 2 usage or configuration error, 3 some frames
failed, 130 interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

# numpy's OpenBLAS starts one thread per core when numpy is imported, and these threads spin
# for a while: ~0.1 s of CPU at every start (2 cores), taken from the command's own threads.
# azfilter calls no BLAS routine (its engines are its own code), so one BLAS thread is all it
# needs. Set before anything imports numpy; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402 - after the environment above

from . import __version__
from . import config as cfg
from .commands.common import (
    CONTEXT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    Fatal,
    RunFailed,
    setup_logging,
    stderr_line,
)
from .commands.options import PercentileType, ReductionCommand, ShardType
from .errors import AzfilterError
from .errors import RunFailed as OutputFailed

# ============================================================================ option plumbing


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
        opt("--freeze-inputs", is_flag=True, default=False,
            help="With --save-config: store the inputs as expanded now (every file), so the "
                 "job reruns on exactly these frames."),
        opt("--npt", type=click.IntRange(min=1), default=cfg.DEFAULTS["npt"], show_default=True,
            help="Number of radial bins."),
        opt("--unit", type=click.Choice(_unit_names()), default=cfg.DEFAULTS["unit"],
            show_default=True,
            help="Radial unit: q in nm^-1 or A^-1, 2theta in deg or rad, r in mm, "
                 "d-spacing in nm or A."),
        opt("--radial-range", type=float, nargs=2, metavar="LO HI", default=None,
            help="Radial range of the bins, in --unit [default: the extent of the unmasked "
                 "pixels]."),
        opt("--azimuth-range", type=float, nargs=2, metavar="LO HI", default=None,
            help="Azimuthal range in deg, chi in (-180, 180]; LO > HI crosses 180 "
                 "[default: all]."),
        opt("--sectors", type=click.IntRange(min=1), metavar="N", default=None,
            help="N equal azimuthal sectors (over --azimuth-range, default the full circle), "
                 "reduced in one pass: HDF5 rows of shape (sectors, npt), one text file per "
                 "sector."),
        opt("--sector", "sector_ranges", type=float, nargs=2, multiple=True,
            metavar="LO HI", help="One sector's chi range in deg (repeat for several)."),
        opt("--split", type=click.Choice(cfg.SPLITS), default=None, show_default=split_default,
            help="Pixel splitting: no (each pixel in the bin of its centre) or full (exact "
                 "area). sigma-clip is no-split only."),
        opt("--error-model", type=click.Choice(cfg.ERROR_MODELS), default=None,
            show_default=error_default,
            help="Variance model: poisson (raw counts), azimuthal (scatter in the ring), "
                 "hybrid (clip azimuthal, report poisson)."),
        opt("--thres", ops=("sigma-clip", "sparsify"), type=click.FloatRange(min=0),
            default=defaults.get("thres", cfg.DEFAULTS["thres"]), show_default=True,
            help="sigma-clip: reject pixels further than THRES standard deviations from the "
                 "ring mean (the Chauvenet cutoff takes over when larger; 0: Chauvenet)."),
        opt("--max-iter", ops=("sigma-clip", "sparsify"), type=click.IntRange(min=0),
            default=cfg.DEFAULTS["max_iter"], show_default=True,
            help="sigma-clip: maximum clipping passes."),
        opt("--cutoff-pick", ops=("sparsify",), type=click.FloatRange(min=0),
            default=cfg.DEFAULTS["cutoff_pick"], show_default=True,
            help="sparsify: keep the pixels whose corrected intensity exceeds the clipped "
                 "background by more than CUTOFF_PICK * sqrt(std^2 + noise^2)."),
        opt("--noise", ops=("sparsify",), type=click.FloatRange(min=0),
            default=cfg.DEFAULTS["noise"], show_default=True,
            help="sparsify: noise floor (corrected intensity): a kept pixel exceeds the "
                 "background by more than NOISE in any case."),
        opt("--pick", ops=("sigma-clip", "medfilt"), type=float,
            default=cfg.DEFAULTS["pick"], show_default=True,
            help="Outlier statistics: count the pixels more than PICK standard deviations "
                 "above their ring's mean (NeXus /entry/outliers, text '# outliers:' line)."),
        opt("--percentile", ops=("medfilt",), type=PercentileType(), default="50",
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
        opt("--wavelength", type=click.FloatRange(min=0, min_open=True), metavar="ANGSTROM",
            help="Wavelength in angstrom, replacing the PONI file's."),
        opt("--energy", type=click.FloatRange(min=0, min_open=True), metavar="KEV",
            help="Photon energy in keV, replacing the PONI file's wavelength."),
        opt("--dummy", type=float, metavar="VALUE",
            help="Raw value of invalid pixels, replacing the detector's (Pilatus/Eiger: -1)."),
        opt("--delta-dummy", type=click.FloatRange(min=0), metavar="TOL",
            help="Pixels within TOL of --dummy are invalid [default: 0, or the detector's]."),
        opt("--monitor", metavar="KEY",
            help="Divide each frame by its monitor: a header key of EDF/CBF/TIFF frames, or "
                 "an HDF5 dataset of one value per frame (/entry/instrument/i0/data in each "
                 "input, or file.h5::/path). A missing or zero monitor fails the frame."),
        opt("--backend", type=click.Choice(cfg.BACKENDS), default=cfg.DEFAULTS["backend"],
            show_default=True,
            help="Engine: cython (compiled, all cores), opencl (GPU/CPU), python (reference)."),
        opt("--device", metavar="DEV",
            help="OpenCL device: gpu, cpu or P:D indices (see azfilter devices); several, "
                 "comma-separated (0:0,0:1), or all (every GPU) spread the frames over them "
                 "[default: the best GPU, else CPU]."),
        opt("--decode", type=click.Choice(cfg.DECODE_MODES), default=cfg.DEFAULTS["decode"],
            show_default=True,
            help="Where --backend opencl decodes bitshuffle-LZ4 HDF5 chunks: on the device "
                 "(the compressed chunk crosses PCIe), on the host, or auto (device for GPUs)."),
        opt("-r", "--recursive", is_flag=True, default=False,
            help="Descend into subdirectories of directory inputs."),
        opt("--overwrite", is_flag=True, default=False,
            help="Replace existing outputs (default: refuse, exit 2)."),
        opt("--skip-existing", is_flag=True, default=False,
            help="Only reduce frames whose output is missing or incomplete; HDF5: add the new "
                 "frames to the file."),
        opt("--shard", type=ShardType(), default=None,
            help="Reduce only part I of N (0 <= I < N) of the frames: contiguous blocks in "
                 "input order. Default inside a SLURM array job: the task's index and count."),
        opt("--threads", type=click.IntRange(min=1), default=None,
            help="Threads of the compiled engine and of the frame decoders [default: the "
                 "usable cores; 3/4 of them for --backend cython above 2]."),
        opt("--wait/--no-wait", default=True, show_default=True,
            help="When another run is writing the same output: wait for it, or refuse."),
        opt("--dry-run", is_flag=True, default=False,
            help="Plan only: say what would be reduced, skipped, written."),
        opt("-v", "--verbose", count=True, default=0,
            help="More messages: -v the set-up (cores, threads, pools, device, cache), -vv "
                 "debug logs. Log lines carry a timestamp when stderr is not a terminal."),
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
_NOT_CONFIG = {"config", "save_config", "dry_run", "inputs", "config_file", "verbose",
               "sector_ranges", "freeze_inputs"}


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
    if params.get("sector_ranges"):
        if "sectors" in given:
            raise click.UsageError("--sectors N and --sector LO HI exclude each other", ctx)
        given["sectors"] = [list(pair) for pair in params["sector_ranges"]]
    return given

# ============================================================================ the group

#: Subcommands that are not reductions: name -> ("module:attribute", one-line help). Their
#: modules are imported only when they run; ``azfilter --help`` shows the line given here.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("azfilter.commands.info:info_command",
             "Describe PONI files, data files and azfilter results."),
    "devices": ("azfilter.commands.devices:devices_command",
                "List the OpenCL devices usable with --backend opencl."),
    "plot": ("azfilter.commands.plot:plot_command",
             "Plot 1-D patterns from azfilter results."),
    "merge": ("azfilter.commands.merge:merge_command",
              "Join the shard files of one job into one HDF5 file."),
    "cache": ("azfilter.commands.cache:cache_command",
              "Show or empty the on-disk cache of lookup tables."),
    "hits": ("azfilter.commands.hits:hits_command",
             "List the frames with Bragg spots (crystal hits) of sparsify/sigma-clip outputs."),
}


#: The reduction commands (name -> operation, None for ``run``), built when they run: each
#: has some forty options, and a command line runs only one of them.
REDUCTION_COMMANDS: dict[str, str | None] = {**{op: op for op in cfg.OPERATIONS}, "run": None}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs, and
    builds a reduction command's options only when it runs (or help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS)
                      | set(REDUCTION_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module_name, attribute = LAZY_COMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        if name in REDUCTION_COMMANDS and name not in self.commands:
            self.add_command(_make_reduction_command(REDUCTION_COMMANDS[name], name))
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                command = self.get_command(ctx, name)
                assert command is not None
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="azfilter")
def main() -> None:
    """azfilter: batch azimuthal integration of X-ray diffraction frames with outlier
    rejection (sigma-clipping, median/quantile filter).

    \b
    Exit status: 0 all frames reduced, 2 usage or configuration error (nothing written),
    3 some inputs failed (the others were written; each failure is named on stderr).
    """
    # OpenMP's default busy-waiting steals the reader and writer threads' cores (27 instead of
    # 73 frames/s on 2 cores); set before libgomp loads, a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # damaged TIFFs

_EXAMPLES = {
    "integrate": "azfilter integrate -p geo.poni --npt 2000 --unit 2th_deg 'run1/*.cbf' -o out/",
    "sigma-clip": "azfilter sigma-clip -p geo.poni --thres 4 scan.h5 -o scan_clipped.h5",
    "medfilt": "azfilter medfilt -p geo.poni --percentile 40 60 data/ -r -o med.h5",
    "sparsify": "azfilter sparsify -p geo.poni --npt 800 'run1/*.cbf' -o run1_sparse.h5",
    "run": "azfilter run job.toml --skip-existing",
}

_SUMMARIES = {
    "integrate": "Azimuthal integration: mean corrected intensity per radial bin.",
    "sigma-clip": "Azimuthal sigma-clipping: per bin, iteratively drop pixels further than "
                  "THRES standard deviations from the ring mean, average the rest.",
    "medfilt": "Azimuthal median/quantile filter: per bin, sort the pixel fragments by "
               "corrected intensity and average those between two percentiles.",
    "sparsify": "Sparse Bragg frames (pyFAI sparsify-Bragg's format, read by fabio): per "
                "frame the sigma-clipped background (mean and std per radial bin) and the "
                "pixels above it (index, raw value), in one HDF5 file.",
    "run": "Run the job described by a config file (.toml/.json) or stored in an azfilter "
           "output (.h5/.nxs/.dat/.xy); options given here override it.",
}


def _make_reduction_command(operation: str | None, name: str) -> click.Command:
    epilog = (
        "\b\nINPUT: files, globs, directories, file.h5::/path/to/dataset, or @LIST (a file "
        "naming one input per line); stacks are "
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
    return click.command(name, cls=ReductionCommand, help=_SUMMARIES[name], epilog=epilog,
                         context_settings=CONTEXT)(function)



# ============================================================================ the run


def _merge_config(ctx: click.Context, operation: str | None,
                  params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    from .pipeline import load_job

    given = _given_options(ctx, params)
    layers = []
    config_path = params.get("config")
    if config_path:
        try:
            layers.append(load_job(config_path))
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
    """SIGTERM (a SLURM time limit) or SIGHUP (a closed terminal, a lost node): stop like
    Ctrl-C, dropping unfinished outputs."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Terminated()


#: Signals that stop a run cleanly (temporary files removed, exit 143).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _run_reduction(ctx: click.Context, operation: str | None, params: dict[str, Any]) -> None:
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            previous[signum] = signal.signal(signum, _on_signal)
    from . import cache

    # A new lookup table is written to the cache while the frames are reduced; the run ends
    # once it is complete.
    cache.defer_stores()
    try:
        status = _reduction(ctx, operation, params)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except OutputFailed as err:
        raise RunFailed(str(err)) from None
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    except KeyboardInterrupt as err:
        terminated = isinstance(err, _Terminated)
        stderr_line(f"azfilter: {'terminated' if terminated else 'interrupted'}; "
                    "unfinished outputs were removed")
        ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    finally:
        cache.defer_stores(False)
        cache.wait_for_stores()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    ctx.exit(status)


def _reduction(ctx: click.Context, operation: str | None, params: dict[str, Any]) -> int:
    from .pipeline import run_job

    setup_logging(int(params.get("verbose") or 0))

    config, _ = _merge_config(ctx, operation, params)
    if config.get("wavelength") is not None and config.get("energy") is not None:
        raise click.UsageError("--wavelength and --energy exclude each other", ctx)
    if config["operation"] in ("sigma-clip", "sparsify") and config.get("split") == "full":
        raise click.UsageError(
            f"{config['operation']} works without pixel splitting only (--split no): a pixel "
            "shared between bins cannot be rejected in one of them and kept in the other; use "
            "medfilt --split full for a split-pixel outlier filter", ctx)
    save_path = params.get("save_config")
    if not config.get("poni"):
        raise click.UsageError("Missing option '-p' / '--poni' (the geometry PONI file)", ctx)
    if save_path and not config.get("inputs") and not config.get("output"):
        _save_config(config, save_path, bool(params.get("freeze_inputs")))
        stderr_line(f"azfilter: wrote {save_path}")
        return EXIT_OK
    if not config.get("inputs"):
        raise click.UsageError("Missing argument 'INPUT...' (files, globs, directories)", ctx)
    if not config.get("output"):
        raise click.UsageError("Missing option '-o' / '--output'", ctx)

    dry_run = bool(params.get("dry_run"))
    if dry_run:
        report = run_job(config, dry_run=True)
        if save_path:
            _save_config(config, save_path, bool(params.get("freeze_inputs")))
        for source, index, target in report.planned:
            click.echo(f"{source} frame {index} -> {target}")
        for failure in report.failures:
            click.echo(f"unreadable: {failure}")
        stderr_line(f"azfilter: {report.label} (dry run): {len(report.planned)} frames to "
                    f"reduce, {report.skipped} skipped, {report.failed} unreadable -> "
                    f"{report.output}")
        return EXIT_OK
    if save_path:
        _save_config(config, save_path, bool(params.get("freeze_inputs")))
    report = run_job(config)
    if not config["quiet"] or report.failed:
        stderr_line(report.summary())
    return EXIT_FAILED if report.failed else EXIT_OK


def _save_config(config: dict[str, Any], path: str, freeze: bool = False) -> None:
    if freeze and config.get("inputs"):
        from .pipeline.plan import frozen_inputs

        config = dict(config, inputs=frozen_inputs(config["inputs"], config["recursive"]),
                      recursive=False)
    try:
        cfg.save_config(cfg.job_config(config), path)
    except AzfilterError as err:
        raise Fatal(str(err)) from None


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

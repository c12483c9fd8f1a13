"""``azfilter plot``: figures of azfilter results (the figure code is azfilter.plot)."""

from __future__ import annotations

import click

from ..errors import AzfilterError
from .common import CONTEXT, Fatal, stderr_line


@click.command("plot", context_settings=CONTEXT,
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
    from ..plot import plot_results

    try:
        rows = plot_results(results, output, heatmap=heatmap, log_scale=log_scale,
                            errors=not no_errors, title=title, overwrite=overwrite)
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    stderr_line(f"azfilter: plot: {rows} pattern(s) -> {output}")

"""``azfilter hits``: the frames with Bragg spots of sparsify (or sigma-clip) outputs."""

from __future__ import annotations

import sys

import click

from ..errors import AzfilterError
from .common import CONTEXT, Fatal

#: exit status when no frame passes (as grep: 0 some, 1 none, 2 error)
EXIT_NO_HIT = 1


@click.command("hits", context_settings=CONTEXT,
               epilog="\b\nOutput: one line per hit, 'source frame picked peaks' (peaks '-' "
                      "when the file has no pixel positions).\n"
                      "Exit status: 0 some frames are hits, 1 none, 2 error.\n"
                      "\b\nExamples:\n"
                      "  azfilter hits run1_sparse.h5 --min-peaks 5 --peak-size 3\n"
                      "  azfilter hits run1_sparse.h5 --min-pixels 50 --count\n"
                      "  azfilter hits shard*.h5 --min-peaks 3 -o hits.h5")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--min-pixels", type=click.IntRange(min=0), default=None, metavar="N",
              help="A hit has at least N picked pixels.")
@click.option("--min-peaks", type=click.IntRange(min=0), default=None, metavar="N",
              help="A hit has at least N peaks (needs sparsify outputs: pixel positions).")
@click.option("--peak-size", type=click.IntRange(min=1), default=2, show_default=True,
              metavar="K", help="A peak is a group of at least K picked pixels touching "
                                "by a side or a corner.")
@click.option("--count", is_flag=True, default=False,
              help="Print only the number of hits.")
@click.option("-o", "--output", metavar="HITS.txt|HITS.h5", default=None,
              help="Also write the hit list to a text or HDF5 file (atomically).")
def hits_command(files: tuple[str, ...], min_pixels: int | None, min_peaks: int | None,
                 peak_size: int, count: bool, output: str | None) -> None:
    """List the frames whose picked pixels (--min-pixels) and/or peaks (--min-peaks of at
    least --peak-size pixels) pass the thresholds; with both, a hit passes both.

    FILE: outputs of 'azfilter sparsify' (or pyFAI's sparsify-Bragg), or of sigma-clip /
    medfilt with per-frame outlier statistics (/entry/outliers/picked: pixels only)."""
    from ..hits import format_line, is_hit, read_frame_hits, write_hits

    if min_pixels is None and min_peaks is None:
        raise click.UsageError("give --min-pixels N and/or --min-peaks N")
    hits = []
    try:
        for path in files:
            for frame in read_frame_hits(path, peak_size, need_peaks=min_peaks is not None):
                if is_hit(frame, min_pixels, min_peaks):
                    hits.append(frame)
                    if not count:
                        click.echo(format_line(frame))
        if count:
            click.echo(str(len(hits)))
        if output:
            write_hits(output, hits, {"min_pixels": min_pixels, "min_peaks": min_peaks,
                                      "peak_size": peak_size,
                                      "files": " ".join(files)})
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    sys.exit(0 if hits else EXIT_NO_HIT)

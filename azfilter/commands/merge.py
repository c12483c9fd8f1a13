"""``azfilter merge``: join the shard files of one job into one NeXus file."""

from __future__ import annotations

import sys

import click

from ..errors import AzfilterError
from .common import CONTEXT, EXIT_FAILED, EXIT_OK, Fatal, stderr_line


@click.command("merge", context_settings=CONTEXT,
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
    from ..output import merge_nexus

    try:
        summary = merge_nexus(shards, output, overwrite=overwrite)
    except AzfilterError as err:
        raise Fatal(str(err)) from None
    status = EXIT_OK
    if summary["missing_shards"]:
        missing = ", ".join(str(k) for k in summary["missing_shards"])
        stderr_line(f"azfilter: merge: shard(s) {missing} missing from the inputs")
        status = EXIT_FAILED
    if not quiet or status:
        extra = f", {summary['duplicates']} duplicate rows dropped" if summary["duplicates"] \
            else ""
        stderr_line(f"azfilter: merge: {len(shards)} file(s), {summary['rows']} frames"
                    f"{extra} -> {output}")
    if status:
        sys.exit(status)

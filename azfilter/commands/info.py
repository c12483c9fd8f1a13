"""``azfilter info``: describe PONI files, data files and azfilter results."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..errors import AzfilterError
from .common import CONTEXT, EXIT_FAILED, EXIT_OK, EXIT_USAGE, stderr_line


@click.command("info", context_settings=CONTEXT,
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
            stderr_line(f"azfilter: error: {path}: no such file")
            status = max(status, EXIT_USAGE)
            continue
        try:
            for line in describe(path):
                click.echo(line)
        except AzfilterError as err:
            stderr_line(f"azfilter: error: {err}")
            status = max(status, EXIT_FAILED) if status != EXIT_USAGE else status
    if status:
        sys.exit(status)


def describe(path: str) -> list[str]:
    """Lines describing a PONI file, a data file or an azfilter result."""
    from ..output import geometry_lines
    from ..vocabulary import HDF5_SUFFIXES, TEXT_SUFFIXES

    lower = path.lower()
    if lower.endswith(".poni"):
        from ..poni import load_poni

        geometry = load_poni(path)
        return [f"{path}: PONI geometry"] + [f"  {line}" for line in geometry_lines(geometry)]
    if lower.endswith(TEXT_SUFFIXES):
        return describe_result(path)
    if lower.endswith(HDF5_SUFFIXES) and "::" not in path:
        try:
            return describe_result(path)
        except AzfilterError:
            pass  # not an azfilter result: a data file
    from ..frames import describe_file

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


def describe_result(path: str) -> list[str]:
    """Lines describing an azfilter result (text or NeXus)."""
    from ..output import read_result

    table = read_result(path)
    config = table.config
    lines = [f"{path}: azfilter result ({table.operation or config.get('operation', '?')})",
             f"  frames: {table.intensity.shape[0]}",
             f"  bins: {table.radial.shape[0]} in {table.unit} "
             f"({table.radial[0]:.6g} .. {table.radial[-1]:.6g})"]
    sectors = getattr(table, "sectors", None)
    if sectors is not None:
        from ..output.meta import describe_sectors

        lines.append(f"  chi sectors: {describe_sectors(sectors)}")
    if config.get("poni"):
        lines.append(f"  geometry: {config['poni']}")
    sources = sorted({s.split("::", 1)[0] for s in table.sources if s})
    if sources:
        lines.append(f"  sources: {len(sources)} file(s), first {sources[0]}")
    keys = [k for k in ("error_model", "split", "thres", "max_iter", "percentile", "pick",
                        "polarization", "solid_angle") if k in config]
    if keys:
        lines.append("  options: " + ", ".join(f"{k}={config[k]}" for k in keys))
    if table.outliers is not None:
        lines.append(outliers_line(table.outliers, table.pick))
    if table.layout != "text":
        lines.extend(job_record_lines(table))
    return lines


def outliers_line(outliers: dict[str, Any], pick: float | None) -> str:
    """One line summing up a result's outlier statistics (rows without any left out)."""
    import numpy as np

    rejected = np.asarray(outliers["rejected"])
    picked = np.asarray(outliers["picked"])
    max_sigma = np.asarray(outliers["max_sigma"], dtype=np.float64)
    with_stats = rejected >= 0
    head = f"  outliers (pick={pick:g}): " if pick is not None else "  outliers: "
    if not with_stats.any():
        return head + f"no statistics in the {rejected.size} row(s)"
    rejected, picked = rejected[with_stats], picked[with_stats]
    sigmas = max_sigma[with_stats]
    sigmas = sigmas[~np.isnan(sigmas)]
    line = (head + f"rejected {rejected.mean():.6g} pixels per frame (max {rejected.max()}), "
            f"picked {picked.min()}..{picked.max()} per frame "
            f"({np.count_nonzero(picked)} of {picked.size} frames > 0)")
    if sigmas.size:
        line += f", max_sigma up to {sigmas.max():.4g}"
    missing = int(np.count_nonzero(~with_stats))
    if missing:
        line += f"; {missing} row(s) without statistics"
    return line


def job_record_lines(table: Any, shown: int = 5) -> list[str]:
    """Lines on a NeXus result's layout, job manifest, completeness and failed frames."""
    layout = {"nxazint1d": "NXazint1d", "legacy": "azfilter's layout before NXazint1d"}
    lines = [f"  layout: {layout.get(table.layout, table.layout)}"]
    if table.manifest_entries is None:
        lines.append("  job manifest: not recorded (completeness cannot be checked)")
    else:
        shards = f", {table.shards} shards" if table.shards and table.shards > 1 else ""
        lines.append(f"  job manifest: {table.manifest_entries} planned frames{shards} "
                     f"(sha256 {table.manifest_digest[:12]})")
    if table.complete is True:
        lines.append("  complete: yes (every planned frame is a row or listed as failed)")
    elif table.complete is False:
        parts = []
        if table.missing_shards:
            parts.append("shard(s) " + ", ".join(str(k) for k in table.missing_shards)
                         + " missing")
        if table.missing:
            parts.append(f"{len(table.missing)} planned frame(s) missing")
        lines.append("  complete: NO (" + ("; ".join(parts) or "see entry/azfilter") + ")")
        for source, index in table.missing[:shown]:
            lines.append(f"    missing: {source}" + ("" if index < 0 else f" frame {index}"))
        if len(table.missing) > shown:
            lines.append(f"    ... and {len(table.missing) - shown} more")
    lines.append(f"  failed frames: {len(table.failed)}")
    for source, index, reason in table.failed[:shown]:
        where = source if index < 0 else f"{source} frame {index}"
        lines.append(f"    failed: {where}: {reason}")
    if len(table.failed) > shown:
        lines.append(f"    ... and {len(table.failed) - shown} more")
    return lines

"""Figures of 1-D results: intensity with a ±sigma band against the radial unit (frames
overlaid), or a heatmap of many frames. Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import AzfilterError
from .fileio import atomic_output

#: Above this many frames a figure is a heatmap (curves would be unreadable).
HEATMAP_ABOVE = 50


def _curves(table) -> tuple[list[str], object, object]:
    """(labels, intensities, sigmas) with one row per curve: a frame, or a frame's sector."""
    intensity, sigma = table.intensity, table.sigma
    if intensity.ndim == 3:      # (frames, sectors, npt): one curve per sector
        frames, n_sectors, npt = intensity.shape
        ranges = getattr(table, "sectors", None)
        labels = []
        for label in table.labels:
            for k in range(n_sectors):
                where = f"{ranges[k][0]:g}..{ranges[k][1]:g} deg" if ranges is not None \
                    else f"sector {k}"
                labels.append(f"{label} chi {where}")
        return labels, intensity.reshape(frames * n_sectors, npt), \
            sigma.reshape(frames * n_sectors, npt)
    return table.labels, intensity, sigma


def plot_results(results: Sequence[str], output: str, heatmap: bool = False,
                 log_scale: bool = False, errors: bool = True, title: str | None = None,
                 overwrite: bool = False) -> int:
    """Plot azfilter results (text or NeXus) into one figure file.

    Parameters
    ----------
    results : sequence of str
        Result files; they must share the radial unit (and the bins, for a heatmap).
    output : str
        Figure file; its suffix (.png, .pdf, .svg) is the format.
    heatmap : bool
        One image row per frame (automatic above :data:`HEATMAP_ABOVE` frames).
    log_scale : bool
        Logarithmic intensity.
    errors : bool
        Draw the ±sigma bands.
    title : str, optional
        Default: the first file's name.
    overwrite : bool
        Replace an existing figure.

    Returns
    -------
    int
        Patterns plotted.

    Raises
    ------
    AzfilterError
        Missing matplotlib, unreadable or incompatible results, an unwritable figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AzfilterError("azfilter plot needs matplotlib: pip install 'azfilter[plot]' "
                            "(or pip install matplotlib)") from None
    import numpy as np

    from .output import read_result
    from .units import get_unit

    if os.path.exists(output) and not overwrite:
        raise AzfilterError(f"{output}: exists; use --overwrite to replace it")
    tables = [read_result(path) for path in results]
    units = {t.unit for t in tables}
    if len(units) > 1:
        raise AzfilterError(f"the results use different units ({', '.join(sorted(units))}); "
                            "plot them separately")
    unit = get_unit(tables[0].unit)
    curves = [_curves(t) for t in tables]
    rows = sum(len(c[0]) for c in curves)
    if rows == 0:
        raise AzfilterError("the results hold no frames")
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        if heatmap or rows > HEATMAP_ABOVE:
            radial = tables[0].radial
            for table in tables[1:]:
                if table.radial.shape != radial.shape or not np.allclose(table.radial, radial):
                    raise AzfilterError("--heatmap needs results with the same radial bins")
            image = np.concatenate([c[1] for c in curves], axis=0)
            # Robust colour limits: a few extreme bins (edges, unrejected spots) must not
            # wash out the rings.
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
            for table, (labels, intensities, sigmas) in zip(tables, curves, strict=True):
                if len(operations) > 1:
                    labels = [f"{table.operation}: {label}" for label in labels]
                for row, label in enumerate(labels):
                    intensity = intensities[row]
                    line, = axes.plot(table.radial, intensity, lw=1, label=label)
                    if errors:
                        sigma = sigmas[row]
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
        file_format = Path(output).suffix.lstrip(".").lower() or "png"
        try:
            with atomic_output(output) as temporary:
                figure.savefig(temporary, format=file_format)
        except (OSError, ValueError) as err:
            raise AzfilterError(f"{output}: cannot write the figure: {err}") from None
    finally:
        plt.close(figure)
    return rows

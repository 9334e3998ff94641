"""The tutorial's figure as a PNG: the embedding coloured by a metadata column."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from distumap import __version__
from distumap._format import OUTPUT_MARK, check_replaceable
from distumap._palette import hex_to_rgb
from distumap.pl._shared import (
    default_title,
    density_rgba,
    extent,
    marker_style,
    plot_data,
)

#: figure size in inches and resolution: 1,650 x 1,200 pixels
FIGSIZE = (11.0, 8.0)
DPI = 150
#: legend entries shown at most; the smallest categories beyond it are summed up in one line
MAX_LEGEND = 60
#: above this many cells the cells are shaded into an image instead of drawn one by one
#: (each pixel the mean colour of its cells, opacity by their number): time and memory stay
#: linear and small; at and below it the scatter is the tutorial's look
DENSITY_CELLS = 2_000_000
#: the shading's long side in pixels (about the axes' size at 150 dpi)
DENSITY_PIXELS = 1_200


def umap(
    ds: xr.Dataset,
    *,
    color: str | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    ax=None,
):
    """Scatter plot of ``X_umap``, coloured by a metadata column, as a matplotlib figure.

    Parameters
    ----------
    ds
        A store after the embed stage; only ``X_umap`` and the ``color`` column are loaded.
    color
        A ``cell`` column. Text, booleans and integers with few values are drawn as categories
        with a legend (largest first, with cell counts); other numbers with a colour bar.
    path
        Write the figure there (PNG, 1,650 x 1,200 pixels unless ``ax`` is given); also an
        fsspec URL.
    title
        Defaults to the number of cells and the column.
    ax
        A matplotlib axes to draw into; its figure is returned and the figure size is the
        caller's.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    This computes ``X_umap`` and the colour column (small: 12 bytes per cell). Marker size and
    alpha follow the number of cells, points are drawn in a seeded random order (no category
    hides under another by drawing order) and rasterized, so the file stays small at millions
    of cells (about 0.6 MB and 7 s at 1,000,000). Above ``DENSITY_CELLS`` cells they are
    shaded into one image instead. Drawing uses the Agg canvas directly and never opens a
    window.

    Examples
    --------
    >>> fig = distumap.pl.umap(ds, color="subclass_label", path="umap.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    embedding, values, groups = plot_data(ds, color)
    n = embedding.shape[0]
    if ax is None:
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    size, alpha = marker_style(n)
    if n > DENSITY_CELLS:
        _shaded(fig, ax, embedding, values, groups, color)
    else:
        _scatter(fig, ax, embedding, values, groups, color, size, alpha)
    ax.set_title(title or default_title(n, color))
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if path is not None:
        _save(fig, os.fspath(path))
    return fig


def _scatter(fig, ax, embedding, values, groups, color, size: float, alpha: float) -> None:
    order = np.random.default_rng(0).permutation(embedding.shape[0])
    x, y = embedding[order, 0], embedding[order, 1]
    common = dict(s=size, alpha=alpha, linewidths=0, rasterized=True, plotnonfinite=True)
    if groups is not None:
        codes, names, counts, colors = groups
        from matplotlib.colors import to_rgba_array

        ax.scatter(x, y, c=to_rgba_array(colors)[codes[order]], **common)
        _legend(ax, names, counts, colors, color)
    elif values is not None:
        import matplotlib as mpl

        cmap = mpl.colormaps["viridis"].with_extremes(bad="#c8c8c8")
        points = ax.scatter(x, y, c=values[order].astype(float), cmap=cmap, **common)
        fig.colorbar(points, ax=ax, label=color, shrink=0.6, pad=0.02)
    else:
        ax.scatter(x, y, c="#1f77b4", **common)


def _shaded(fig, ax, embedding, values, groups, color) -> None:
    import matplotlib as mpl

    bounds = x0, x1, y0, y1 = extent(embedding)
    aspect = (y1 - y0) / (x1 - x0)
    cols = DENSITY_PIXELS if aspect <= 1 else max(round(DENSITY_PIXELS / aspect), 1)
    shape = (max(round(cols * aspect), 1), cols)
    if groups is not None:
        codes, names, counts, colors = groups
        rgb = hex_to_rgb(colors)
        _legend(ax, names, counts, colors, color)
    elif values is not None:
        numbers = values.astype(float)
        finite = np.isfinite(numbers)
        low, high = (numbers[finite].min(), numbers[finite].max()) if finite.any() else (0.0, 1.0)
        norm = mpl.colors.Normalize(low, high)
        cmap = mpl.colormaps["viridis"].with_extremes(bad="#c8c8c8")
        rgb, codes = lookup(cmap, norm, numbers)
        fig.colorbar(
            mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=color, shrink=0.6, pad=0.02
        )
    else:
        rgb, codes = hex_to_rgb(["#1f77b4"]), None
    image = density_rgba(embedding, rgb, bounds=bounds, shape=shape, codes=codes)
    ax.imshow(image, extent=(x0, x1, y0, y1), origin="upper", interpolation="nearest")


def lookup(cmap, norm, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colour map's own table (its ``N`` colours, then the colour of NaN) and each value's
    row in it, as ``cmap(norm(numbers))`` looks the values up: the shading takes a code per
    cell, not a colour (32 bytes) per cell."""
    rgb = np.vstack([cmap(np.arange(cmap.N))[:, :3], [cmap.get_bad()[:3]]])
    known = ~np.isnan(numbers)
    codes = np.full(len(numbers), cmap.N, dtype=np.int32)
    scaled = np.asarray(norm(numbers[known]), dtype=np.float64) * cmap.N
    codes[known] = np.clip(scaled, 0, cmap.N - 1).astype(np.int32)
    return rgb, codes


def _legend(ax, names, counts, colors, color: str | None) -> None:
    from matplotlib.lines import Line2D

    shown = min(len(names), MAX_LEGEND)
    handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=6,
            markeredgewidth=0,
            color=colors[i],
            label=f"{names[i]} ({counts[i]:,})",
        )
        for i in range(shown)
    ]
    if shown < len(names):
        rest = int(np.sum(counts[shown:]))
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="",
                label=f"+{len(names) - shown} more ({rest:,} cells)",
            )
        )
    ax.legend(
        handles=handles,
        title=color,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
        ncols=1 if len(handles) <= 26 else 2,
        handletextpad=0.1,
        columnspacing=0.8,
        borderaxespad=0.0,
    )


def _save(fig, path: str) -> None:
    check_replaceable(path, "png")
    # the mark by which distumap knows the picture as its own (and may replace it)
    metadata = {"Software": f"{OUTPUT_MARK} {__version__}"}
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as f:
            fig.savefig(f, format="png", dpi="figure", metadata=metadata)
    else:
        fig.savefig(path, dpi="figure", metadata=metadata)

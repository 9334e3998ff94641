"""What the static and the interactive plot share: the data they draw, which columns are
categories, marker sizes, titles, bounds and the density shading of many cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from distumap._compute import as_blocks
from distumap._palette import categories, codes_of, labels, merge_tallies, ranked, tally

#: integer columns with at most this many distinct values are drawn as categories
MAX_INTEGER_CATEGORIES = 60


def is_categorical(values: np.ndarray) -> bool:
    """Whether a column is drawn with a legend (text, booleans, few integers) or a colour bar."""
    kind = values.dtype.kind
    if kind in "OUSTb":
        return True
    if kind in "iu":
        return np.unique(values).size <= MAX_INTEGER_CATEGORIES
    return False


def plot_data(ds: xr.Dataset, color: str | None) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """The embedding (cells x 2, float32), and the colour column: its values when they are
    numbers drawn on a colour bar, else its categories (codes per cell, names, counts and
    colours, as :func:`distumap._palette.categories` gives them), using the data's own colours
    if it has them (``<color>_color``, as the Allen Institute's metadata has for
    ``subclass_label``).

    A text column is tallied and coded block by block where it lies (``plot-categories``,
    ``plot-codes``), so that this process holds a code per cell, never the column's strings.
    """
    import dask

    if "X_umap" not in ds:
        raise ValueError("the dataset has no X_umap: run the embed stage first")
    if color is not None and color not in ds.variables:
        columns = sorted(name for name, c in ds.coords.items() if c.dims == ("cell",))
        raise ValueError(f"no column {color!r} to colour by; the cell columns are {columns}")
    embedding = ds["X_umap"].transpose("cell", ...).data
    if color is None:
        (embedding,) = dask.compute(embedding)
        return np.asarray(embedding, dtype=np.float32), None, None
    values = ds[color].data
    given_name = f"{color.removesuffix('_label')}_color"
    given = None
    if given_name in ds.variables and ds[given_name].dims == ("cell",):
        given = ds[given_name].data
    if np.dtype(values.dtype).kind in "OUST":
        embedding, groups = dask.compute(embedding, _text_categories(values, given))
        return np.asarray(embedding, dtype=np.float32), None, groups
    embedding, values, given = dask.compute(embedding, values, given)
    values = np.asarray(values)
    if is_categorical(values):
        return np.asarray(embedding, dtype=np.float32), None, categories(values, given)
    return np.asarray(embedding, dtype=np.float32), values, None


def _text_categories(values, given) -> Any:
    """:func:`distumap._palette.categories` of a text column, as a dask graph: a tally per
    block, their sum, then the codes per block."""
    import dask

    values = as_blocks(values)
    blocks = values.to_delayed().ravel()
    given_blocks = [None] * len(blocks)
    if given is not None:
        given_blocks = as_blocks(given).rechunk(values.chunks).to_delayed().ravel()
    token = dask.base.tokenize(values, given)
    tallies = [
        dask.delayed(tally, pure=True)(
            block, colours, dask_key_name=(f"plot-categories-{token}", i)
        )
        for i, (block, colours) in enumerate(zip(blocks, given_blocks, strict=True))
    ]
    order = dask.delayed(_ranked_tallies, pure=True)(tallies, dask_key_name=f"plot-ranked-{token}")
    codes = [
        dask.delayed(_codes, pure=True)(block, order, dask_key_name=(f"plot-codes-{token}", i))
        for i, block in enumerate(blocks)
    ]
    return dask.delayed(_groups, pure=True)(codes, order, dask_key_name=f"plot-groups-{token}")


def _ranked_tallies(tallies) -> tuple:
    return ranked(merge_tallies(tallies))


def _codes(block: np.ndarray, order: tuple) -> np.ndarray:
    return codes_of(block, order[0])


def _groups(codes: list[np.ndarray], order: tuple) -> tuple:
    keys, counts, colors = order
    codes = np.concatenate(codes) if codes else np.zeros(0, np.int32)
    return codes, labels(keys), counts, colors


def marker_style(n: int) -> tuple[float, float]:
    """Marker area (points^2) and alpha for ``n`` cells on a ~7 inch wide axes at 150 dpi.

    Area falls as 1/n (the ink per cell stays the same) but not below about two pixels, or
    sparse populations fade away; alpha falls above 200,000 cells so dense regions show
    density instead of a solid blot.
    """
    size = float(np.clip(120_000 / max(n, 1), 0.5, 30.0))
    alpha = float(np.clip(1.0 - 0.45 * np.log10(max(n, 1) / 200_000), 0.5, 1.0))
    return size, alpha


def default_title(n: int, color: str | None) -> str:
    title = f"UMAP of {n:,} cells"
    return f"{title}, coloured by {color}" if color else title


def extent(embedding: np.ndarray, margin: float = 0.02) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` around the finite points of ``embedding``, with a margin."""
    finite = embedding[np.isfinite(embedding).all(axis=1)]
    if finite.size == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    low, high = finite.min(axis=0).astype(float), finite.max(axis=0).astype(float)
    pad = np.maximum((high - low) * margin, 1e-6)
    return (low[0] - pad[0], high[0] + pad[0], low[1] - pad[1], high[1] + pad[1])


#: cells shaded at a time: the shading's memory is the image's and this many cells' arrays
SHADE_CELLS = 2**18


def density_rgba(
    embedding: np.ndarray,
    rgb: np.ndarray,
    *,
    bounds: tuple[float, float, float, float],
    shape: tuple[int, int],
    codes: np.ndarray | None = None,
) -> np.ndarray:
    """Every cell shaded into one ``(rows, cols, 4)`` uint8 image, top row first.

    A pixel's colour is the mean colour of its cells (``rgb``: one row for all cells, one per
    cell, or with ``codes`` a palette and each cell's row in it), its opacity grows with the
    log of their number: dense regions show their inner structure instead of a solid blot,
    and a single cell still shows. The cells are taken :data:`SHADE_CELLS` at a time, so that
    the memory is the image's whatever the number of cells: how pictures stay light at any
    size.
    """
    rows, cols = shape
    x0, x1, y0, y1 = bounds
    rgb = np.asarray(rgb, dtype=np.float64)
    uniform = codes is None and rgb.shape[0] == 1  # one colour for every cell
    count = np.zeros(rows * cols)
    totals = np.zeros((3, rows * cols))
    for start in range(0, embedding.shape[0], SHADE_CELLS):
        part = slice(start, start + SHADE_CELLS)
        xy = np.asarray(embedding[part], dtype=np.float64)
        finite = np.isfinite(xy).all(axis=1)
        xy = xy[finite]
        col = np.clip(((xy[:, 0] - x0) / (x1 - x0) * cols).astype(np.int64), 0, cols - 1)
        row = np.clip(((y1 - xy[:, 1]) / (y1 - y0) * rows).astype(np.int64), 0, rows - 1)
        pixel = row * cols + col
        count += np.bincount(pixel, minlength=rows * cols)
        if uniform:
            continue
        colours = rgb[codes[part][finite]] if codes is not None else rgb[part][finite]
        for channel in range(3):
            weights = colours[:, channel]
            totals[channel] += np.bincount(pixel, weights=weights, minlength=rows * cols)
    image = np.zeros((rows * cols, 4))
    if uniform:
        image[:, :3] = rgb[0]
    else:
        for channel in range(3):
            image[:, channel] = np.divide(
                totals[channel], count, out=np.ones_like(count), where=count > 0
            )
    peak = max(float(count.max()), 1.0)
    opacity = 0.55 + 0.45 * np.log1p(count) / np.log1p(peak)
    image[:, 3] = np.where(count > 0, opacity, 0.0)
    return np.round(image * 255).astype(np.uint8).reshape(rows, cols, 4)

"""Colours for categories and the shared logic of the static and interactive plots.

Up to ten categories get matplotlib's ``tab10``; more get a palette grown greedily in CIELAB
space, each new colour as far as possible from the ones already taken (and from the white
background), starting from ``tab10`` so the first ten stay familiar. Forty or more categories
then stay tellable apart, unlike ``tab20``'s light/dark pairs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the dashboard imports this module on the scheduler: no xarray needed
    import xarray as xr

#: matplotlib's tab10, written out so that bokeh does not need matplotlib
TAB10 = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MISSING_COLOR = "#c8c8c8"
_HEX = re.compile(r"#[0-9a-fA-F]{6}")
MISSING_LABEL = "(missing)"
#: integer columns with at most this many distinct values are drawn as categories
MAX_INTEGER_CATEGORIES = 60


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1], shape (n, 3)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [
            [0.4124, 0.3576, 0.1805],
            [0.2126, 0.7152, 0.0722],
            [0.0193, 0.1192, 0.9505],
        ]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{round(float(c) * 255):02x}" for c in rgb)


@lru_cache(maxsize=8)
def _grown_palette(n: int) -> tuple[str, ...]:
    steps = np.linspace(0.0, 1.0, 18)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    # neither too light (invisible on white) nor too dark (all look black at small sizes)
    usable = (lab[:, 0] > 30) & (lab[:, 0] < 78)
    grid, lab = grid[usable], lab[usable]
    seeds = np.array([[int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)] for h in TAB10])
    chosen = [_hex(c) for c in seeds[:n]]
    taken = np.vstack([_srgb_to_lab(seeds[:n]), _srgb_to_lab(np.ones((1, 3)))])
    nearest = np.min(np.linalg.norm(lab[:, None] - taken[None], axis=-1), axis=1)
    while len(chosen) < n:
        best = int(np.argmax(nearest))
        chosen.append(_hex(grid[best]))
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[best], axis=1))
    return tuple(chosen)


def palette(n: int) -> list[str]:
    """``n`` distinct colours as hex strings."""
    if n <= len(TAB10):
        return list(TAB10[:n])
    return list(_grown_palette(n))


def is_categorical(values: np.ndarray) -> bool:
    """Whether a column is drawn with a legend (text, booleans, few integers) or a colour bar."""
    kind = values.dtype.kind
    if kind in "OUSTb":
        return True
    if kind in "iu":
        return np.unique(values).size <= MAX_INTEGER_CATEGORIES
    return False


def plot_data(
    ds: xr.Dataset, color: str | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The embedding (cells x 2, float32), the colour column and its colours, if the data has
    them (``<color>_color``, as the Allen Institute's metadata has for ``subclass_label``)."""
    import dask

    if "X_umap" not in ds:
        raise ValueError("the dataset has no X_umap: run the embed stage first")
    if color is not None and color not in ds.variables:
        columns = sorted(name for name, c in ds.coords.items() if c.dims == ("cell",))
        raise ValueError(f"no column {color!r} to colour by; the cell columns are {columns}")
    embedding = ds["X_umap"].transpose("cell", ...).data
    values = ds[color].data if color is not None else None
    given_name = f"{color.removesuffix('_label')}_color" if color is not None else None
    given = None
    if given_name in ds.variables and ds[given_name].dims == ("cell",):
        given = ds[given_name].data
    embedding, values, given = dask.compute(embedding, values, given)
    return (
        np.asarray(embedding, dtype=np.float32),
        None if values is None else np.asarray(values),
        None if given is None else np.asarray(given),
    )


def _given_colors(
    codes: np.ndarray, n: int, given: np.ndarray | None, missing: bool
) -> list[str] | None:
    """One colour per category from the data's own colour column, if it has exactly that.

    The missing category (the last one, if ``missing``) gets grey whatever the column says.
    """
    if given is None:
        return None
    first = np.zeros(n, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]  # a cell of each category
    colors = [str(given[i]) for i in first]
    if missing:
        colors[-1] = MISSING_COLOR
    if not all(_HEX.fullmatch(c) for c in colors):
        return None
    known = codes != n - 1 if missing else slice(None)
    if not np.array_equal(np.asarray(colors, dtype=object)[codes][known], given[known]):
        return None  # a category with several colours: not a colour per category
    return colors


def categories(
    values: np.ndarray, given: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Codes per cell and the category names, counts and colours, largest category first.

    Missing values (empty strings, None, NaN) become one grey category listed last. ``given``
    (hex colours per cell) is used when it assigns one colour to each category.
    """
    text = np.array(
        [
            "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in values.tolist()
        ],
        dtype=object,
    )
    names, codes, counts = np.unique(text, return_inverse=True, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: (names[i] == "", -counts[i], names[i]))
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    missing = bool(names[0] == "") if len(names) else False
    names = [str(names[i]) or MISSING_LABEL for i in order]
    counts = counts[order]
    codes = rank[codes.ravel()]
    colors = _given_colors(codes, len(names), given, missing)
    if colors is None:
        colors = palette(len(names) - int(missing)) + ([MISSING_COLOR] if missing else [])
    return codes, names, counts, colors


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


def hex_to_rgb(colors: list[str]) -> np.ndarray:
    """``(n, 3)`` floats in [0, 1] of ``#rrggbb`` colours."""
    return np.array([[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors]).reshape(
        -1, 3
    )


def extent(embedding: np.ndarray, margin: float = 0.02) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` around the finite points of ``embedding``, with a margin."""
    finite = embedding[np.isfinite(embedding).all(axis=1)]
    if finite.size == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    low, high = finite.min(axis=0).astype(float), finite.max(axis=0).astype(float)
    pad = np.maximum((high - low) * margin, 1e-6)
    return (low[0] - pad[0], high[0] + pad[0], low[1] - pad[1], high[1] + pad[1])


def density_rgba(
    embedding: np.ndarray,
    rgb: np.ndarray,
    *,
    bounds: tuple[float, float, float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """Every cell shaded into one ``(rows, cols, 4)`` uint8 image, top row first.

    A pixel's colour is the mean colour of its cells (``rgb``: one row per cell, or one row
    for all), its opacity grows with the log of their number: dense regions show their
    inner structure instead of a solid blot, and a single cell still shows. Memory and time
    are linear in the cells and bounded by the image: how pictures stay light at any size.
    """
    rows, cols = shape
    x0, x1, y0, y1 = bounds
    finite = np.isfinite(embedding).all(axis=1)
    xy = embedding[finite].astype(np.float64)
    col = np.clip(((xy[:, 0] - x0) / (x1 - x0) * cols).astype(np.int64), 0, cols - 1)
    row = np.clip(((y1 - xy[:, 1]) / (y1 - y0) * rows).astype(np.int64), 0, rows - 1)
    pixel = row * cols + col
    count = np.bincount(pixel, minlength=rows * cols).astype(np.float64)
    rgb = np.asarray(rgb, dtype=np.float64)
    image = np.zeros((rows * cols, 4))
    if rgb.shape[0] == 1:
        image[:, :3] = rgb[0]
    else:
        rgb = rgb[finite]
        for channel in range(3):
            total = np.bincount(pixel, weights=rgb[:, channel], minlength=rows * cols)
            image[:, channel] = np.divide(total, count, out=np.ones_like(total), where=count > 0)
    peak = max(float(count.max()), 1.0)
    opacity = 0.55 + 0.45 * np.log1p(count) / np.log1p(peak)
    image[:, 3] = np.where(count > 0, opacity, 0.0)
    return np.round(image * 255).astype(np.uint8).reshape(rows, cols, 4)

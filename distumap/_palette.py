"""Colours for categories: one palette for the plots and the dashboard.

Up to ten categories get matplotlib's ``tab10``; more get a palette grown greedily in CIELAB
space, each new colour as far as possible from the ones already taken (and from the white
background), starting from ``tab10`` so the first ten stay familiar. Forty or more categories
then stay tellable apart, unlike ``tab20``'s light/dark pairs.

numpy only: the dashboard imports this module on the scheduler, which needs no xarray.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

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


def _text(values: np.ndarray) -> np.ndarray:
    """A column as strings, missing values (None, NaN) as ``""``."""
    return np.array(
        [
            "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in values.tolist()
        ],
        dtype=object,
    )


def tally(values: np.ndarray, given: np.ndarray | None = None) -> dict[str, tuple[int, set]]:
    """Every category of ``values`` (as text, missing as ``""``) with its number of cells and
    the colours ``given`` (hex per cell) gives its cells (at most two: one means a colour per
    category). Tallies of parts of a column add up with :func:`merge_tallies`."""
    text = _text(np.asarray(values))
    names, inverse, counts = np.unique(text, return_inverse=True, return_counts=True)
    found: dict[str, tuple[int, set]] = {
        name: (int(count), set()) for name, count in zip(names.tolist(), counts, strict=True)
    }
    if given is not None:  # each distinct (category, colour) pair once, sorted by colour
        hues, hue = np.unique(np.asarray(given).astype(str), return_inverse=True)
        for pair in np.unique(inverse.ravel() * len(hues) + hue.ravel()).tolist():
            colours = found[names[pair // len(hues)]][1]
            if len(colours) < 2:
                colours.add(str(hues[pair % len(hues)]))
    return found


def merge_tallies(tallies) -> dict[str, tuple[int, set]]:
    """The tally of a whole column from those of its parts (:func:`tally`)."""
    merged: dict[str, tuple[int, set]] = {}
    for part in tallies:
        for name, (count, colours) in part.items():
            total, seen = merged.get(name, (0, set()))
            merged[name] = (total + count, set(sorted(seen | colours)[:2]))
    return merged


def ranked(merged: dict[str, tuple[int, set]]) -> tuple[list[str], np.ndarray, list[str]]:
    """The categories of a tally, largest first and missing values last, as the keys that
    :func:`codes_of` looks up; their counts and colours (the column's own where it gives one
    per category, grey for missing values)."""
    keys = sorted(merged, key=lambda name: (name == "", -merged[name][0], name))
    counts = np.array([merged[name][0] for name in keys], dtype=np.int64)
    missing = bool(keys) and keys[-1] == ""
    colors = [next(iter(merged[name][1])) if len(merged[name][1]) == 1 else "" for name in keys]
    if missing:
        colors[-1] = MISSING_COLOR
    if not keys or not all(_HEX.fullmatch(c) for c in colors):
        colors = palette(len(keys) - int(missing)) + ([MISSING_COLOR] if missing else [])
    return keys, counts, colors


def codes_of(values: np.ndarray, keys: list[str]) -> np.ndarray:
    """Each cell's category among ``keys`` (:func:`ranked`)."""
    rank = {name: i for i, name in enumerate(keys)}
    return np.array([rank[name] for name in _text(np.asarray(values)).tolist()], dtype=np.int32)


def categories(
    values: np.ndarray, given: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Codes per cell and the category names, counts and colours, largest category first.

    Missing values (empty strings, None, NaN) become one grey category listed last. ``given``
    (hex colours per cell) is used when it assigns one colour to each category.
    """
    keys, counts, colors = ranked(tally(values, given))
    return codes_of(values, keys), labels(keys), counts, colors


def labels(keys: list[str]) -> list[str]:
    """The categories' names as a legend shows them (:func:`ranked`'s keys, missing named)."""
    return [name or MISSING_LABEL for name in keys]


def hex_to_rgb(colors: list[str]) -> np.ndarray:
    """``(n, 3)`` floats in [0, 1] of ``#rrggbb`` colours."""
    return np.array([[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors]).reshape(
        -1, 3
    )

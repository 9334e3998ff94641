"""The embedding as a standalone, offline bokeh page: pan, zoom, hover, click a legend entry."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from distumap._format import HTML_MARK, check_replaceable
from distumap._palette import hex_to_rgb
from distumap.pl._shared import (
    default_title,
    density_rgba,
    extent,
    marker_style,
    plot_data,
)

#: seed of the subsample drawn above ``max_points``
SAMPLE_SEED = 0
#: cells drawn as points at most; above it, a sample over a shading of all cells
MAX_POINTS = 50_000
#: when sampling, each category keeps at least this many of its cells as points (hover targets)
CATEGORY_FLOOR = 50
#: the long side of the shading of all cells, in pixels, drawn under a sample's points
DENSITY_PIXELS = 800


def umap_html(
    ds: xr.Dataset,
    *,
    color: str | None = None,
    path: str | os.PathLike | None = None,
    max_points: int = MAX_POINTS,
    title: str | None = None,
) -> str:
    """Interactive scatter plot of ``X_umap`` as one self-contained HTML file.

    Parameters
    ----------
    ds
        A store after the embed stage; only ``X_umap``, the cell names and the ``color``
        column are loaded.
    color
        A ``cell`` column: categories get a legend with cell counts (click an entry to hide
        its points), numbers a colour bar.
    path
        Where to write the page; also an fsspec URL. Without it the page is returned.
    max_points
        Cells drawn as points (with hover) at most. Above it the points are a seeded, uniform
        sample in which every category keeps at least ``CATEGORY_FLOOR`` cells, drawn over a
        shading of all cells (each pixel the mean colour of its cells, opacity by their
        number); the title says so. The page then stays about the same size at any number
        of cells.
    title
        Defaults to the number of cells and the column.

    Returns
    -------
    str
        ``path`` when given, else the HTML document.

    Notes
    -----
    This computes ``X_umap``, the colour column and the sampled cells' names. Points are
    drawn with WebGL; the hover shows the cell name and its label. bokeh's JavaScript is
    embedded inline, so the page works offline (about 1 MB on top of the data; the shading
    is one PNG of a few hundred kB).

    Examples
    --------
    >>> distumap.pl.umap_html(ds, color="subclass_label", path="umap.html")  # doctest: +SKIP
    'umap.html'
    """
    # groups: codes per cell, then the categories' names, counts and colours
    embedding, values, groups = plot_data(ds, color)
    n = embedding.shape[0]
    keep = np.arange(n)
    if n > max_points:
        keep = sample_cells(n, max_points, None if groups is None else groups[0])
    heading = title or default_title(n, color)
    if keep.size < n:
        heading += f" (points: a sample of {keep.size:,} of {n:,} cells; shading: all cells)"
    fig = _figure(heading)
    legend_items = []
    if keep.size < n:
        legend_items.append(_shading_item(fig, embedding, groups))
    # marker sizes in screen pixels, from the area in points^2 the static plot would use
    size, alpha = marker_style(keep.size)
    style = {"size": float(np.clip(np.sqrt(size) * 2.0, 2.0, 8.0)), "alpha": alpha}
    cells = np.asarray(ds["cell"].isel(cell=keep).values).astype(str)  # the sample's names alone
    data = {"x": embedding[keep, 0], "y": embedding[keep, 1], "cell": cells}
    tooltips = [("cell", "@cell")]
    if groups is not None:
        points = _category_points(fig, data, groups[0][keep], groups[1:], style, legend_items)
        tooltips.append((color, "$name"))
        _add_legend(fig, legend_items, title=color)
    else:
        if values is not None:
            data["value"] = values[keep].astype(float)
            tooltips.append((color, "@value"))
        points = [_value_points(fig, data, color, style)]
        if legend_items:  # the shading can be hidden too
            legend_items.append(_legend_item(f"a sample of {keep.size:,} cells", points))
            _add_legend(fig, legend_items)
    _add_hover(fig, tooltips, points)
    return _write_page(fig, heading, path)


def _figure(heading: str):
    """An empty square-aspect figure without ticks or grid: UMAP's axes carry no units."""
    from bokeh.plotting import figure

    fig = figure(
        title=heading,
        output_backend="webgl",
        sizing_mode="stretch_both",
        tools="pan,wheel_zoom,box_zoom,reset,save",
        active_scroll="wheel_zoom",
        x_axis_label="UMAP 1",
        y_axis_label="UMAP 2",
        match_aspect=True,
    )
    fig.axis.major_tick_line_color = None
    fig.axis.minor_tick_line_color = None
    fig.axis.major_label_text_font_size = "0pt"
    fig.grid.visible = False
    return fig


def _shading_item(fig, embedding: np.ndarray, groups):
    """The shading of all cells, in their categories' colours, and its legend entry."""
    n = embedding.shape[0]
    if groups is not None:
        shading = _shading(fig, embedding, hex_to_rgb(groups[3]), groups[0])
    else:
        shading = _shading(fig, embedding, hex_to_rgb(["#1f77b4"]))
    return _legend_item(f"all {n:,} cells (shading)", [shading])


def _legend_item(label: str, renderers: list):
    from bokeh.models import LegendItem

    return LegendItem(label=label, renderers=renderers)


def _category_points(fig, data, codes: np.ndarray, groups, style, legend_items) -> list:
    """One scatter per category (named for the hover), each with a legend entry that
    counts its cells; returns the scatters."""
    from bokeh.models import ColumnDataSource

    names, counts, colors = groups
    points = []
    for code, (name, count, hue) in enumerate(zip(names, counts, colors, strict=True)):
        mask = codes == code
        source = ColumnDataSource({key: column[mask] for key, column in data.items()})
        renderer = fig.scatter(
            "x",
            "y",
            source=source,
            size=style["size"],
            color=hue,
            alpha=style["alpha"],
            line_color=None,
            name=name,
        )
        points.append(renderer)
        legend_items.append(_legend_item(f"{name} ({count:,})", [renderer]))
    return points


def _value_points(fig, data, color: str | None, style):
    """One scatter, coloured along viridis with a colour bar when ``data`` holds values."""
    from bokeh.models import ColorBar, ColumnDataSource
    from bokeh.transform import linear_cmap

    kwargs = {"color": "#1f77b4"}
    if "value" in data:
        finite = data["value"][np.isfinite(data["value"])]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        mapper = linear_cmap("value", "Viridis256", low, high, nan_color="#c8c8c8")
        kwargs = {"color": mapper}
        fig.add_layout(ColorBar(color_mapper=mapper.transform, title=color), "right")
    return fig.scatter(
        "x",
        "y",
        source=ColumnDataSource(data),
        size=style["size"],
        alpha=style["alpha"],
        line_color=None,
        **kwargs,
    )


def _add_legend(fig, items: list, title: str | None = None) -> None:
    """The legend on the right; click an entry to hide its points."""
    from bokeh.models import Legend

    if title is None:
        fig.add_layout(Legend(items=items, click_policy="hide"), "right")
        return
    legend = Legend(
        items=items,
        title=title,
        click_policy="hide",
        label_text_font_size="9pt",
        spacing=0,
        padding=4,
        ncols=1 if len(items) <= 26 else 2,  # as the PNG's legend
    )
    fig.add_layout(legend, "right")


def _add_hover(fig, tooltips: list, points: list) -> None:
    from bokeh.models import HoverTool

    fig.add_tools(HoverTool(tooltips=tooltips, renderers=points))


def _write_page(fig, heading: str, path: str | os.PathLike | None) -> str:
    """The page as one HTML document with bokeh inline, marked as distumap's; written to
    ``path`` (a file or an fsspec URL) when given, which is then returned."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    html = file_html(fig, resources=INLINE, title=heading)
    # the mark by which distumap knows the page as its own (and may replace it)
    html = html.replace("<head>", f"<head>\n    {HTML_MARK}", 1)
    if path is None:
        return html
    target = os.fspath(path)
    check_replaceable(target, "html")
    if "://" in target:
        import fsspec

        with fsspec.open(target, "w", encoding="utf-8") as f:
            f.write(html)
    else:
        with open(target, "w", encoding="utf-8") as f:
            f.write(html)
    return target


def sample_cells(n: int, size: int, codes: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of a seeded, uniform sample of ``size`` of ``n`` cells, in which each
    category (``codes``) keeps at least ``min(CATEGORY_FLOOR, its cells)`` cells, so that no
    population vanishes from the points and every legend entry has cells to hover."""
    order = np.random.default_rng(SAMPLE_SEED).permutation(n)
    if codes is None:
        return np.sort(order[:size])
    ordered = codes[order]
    by_code = np.argsort(ordered, kind="stable")  # each category's cells, in random order
    sorted_codes = ordered[by_code]
    rank = np.arange(n) - np.searchsorted(sorted_codes, sorted_codes, side="left")
    forced = order[by_code[rank < CATEGORY_FLOOR]]
    if forced.size >= size:
        return np.sort(forced)
    chosen = np.zeros(n, dtype=bool)
    chosen[forced] = True
    rest = order[~chosen[order]]
    return np.sort(np.concatenate([forced, rest[: size - forced.size]]))


def _shading(fig, embedding: np.ndarray, rgb: np.ndarray, codes: np.ndarray | None = None):
    """All cells as one PNG image under the points (a data URL: the page stays one file), in
    the colours ``rgb`` (by ``codes``, where given: see :func:`density_rgba`)."""
    import base64
    import io

    from matplotlib.image import imsave

    x0, x1, y0, y1 = extent(embedding)
    aspect = (y1 - y0) / (x1 - x0)
    cols = DENSITY_PIXELS if aspect <= 1 else max(round(DENSITY_PIXELS / aspect), 1)
    rows = max(round(cols * aspect), 1)
    image = density_rgba(embedding, rgb, bounds=(x0, x1, y0, y1), shape=(rows, cols), codes=codes)
    buffer = io.BytesIO()
    imsave(buffer, image, format="png")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return fig.image_url(url=[url], x=x0, y=y1, w=x1 - x0, h=y1 - y0, anchor="top_left")

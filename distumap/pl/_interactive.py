"""The embedding as a standalone, offline bokeh page: pan, zoom, hover, click a legend entry."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from distumap._format import HTML_MARK, check_replaceable
from distumap._palette import categories, hex_to_rgb
from distumap.pl._shared import (
    default_title,
    density_rgba,
    extent,
    is_categorical,
    marker_style,
    plot_data,
)

#: seed of the subsample drawn above ``max_points``
SAMPLE_SEED = 0
#: cells drawn as points at most: at 50,000 the page is about 3 MB with long cell names
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
    from bokeh.embed import file_html
    from bokeh.models import ColorBar, ColumnDataSource, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    from bokeh.transform import linear_cmap

    embedding, values, given = plot_data(ds, color)
    n = embedding.shape[0]
    categorical = values is not None and is_categorical(values)
    if categorical:
        all_codes, names, counts, colors = categories(values, given)
    keep = np.arange(n)
    if n > max_points:
        keep = sample_cells(n, max_points, all_codes if categorical else None)
    cells = np.asarray(ds["cell"].values[keep]).astype(str)
    heading = title or default_title(n, color)
    if keep.size < n:
        heading += f" (points: a sample of {keep.size:,} of {n:,} cells; shading: all cells)"

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
    # marker sizes in screen pixels, from the area in points^2 the static plot would use
    size, alpha = marker_style(keep.size)
    radius_px = float(np.clip(np.sqrt(size) * 2.0, 2.0, 8.0))
    tooltips = [("cell", "@cell")]
    x, y = embedding[keep, 0], embedding[keep, 1]
    items, points = [], []
    if keep.size < n:
        rgb = hex_to_rgb(colors)[all_codes] if categorical else hex_to_rgb(["#1f77b4"])
        shading = _shading(fig, embedding, rgb)
        items.append(LegendItem(label=f"all {n:,} cells (shading)", renderers=[shading]))
    if categorical:
        codes = all_codes[keep]
        for code, (name, count, hue) in enumerate(zip(names, counts, colors, strict=True)):
            mask = codes == code
            source = ColumnDataSource({"x": x[mask], "y": y[mask], "cell": cells[mask]})
            renderer = fig.scatter(
                "x",
                "y",
                source=source,
                size=radius_px,
                color=hue,
                alpha=alpha,
                line_color=None,
                name=name,
            )
            points.append(renderer)
            items.append(LegendItem(label=f"{name} ({count:,})", renderers=[renderer]))
        tooltips.append((color, "$name"))
        legend = Legend(
            items=items,
            title=color,
            click_policy="hide",
            label_text_font_size="9pt",
            spacing=0,
            padding=4,
            ncols=1 if len(items) <= 26 else 2,  # as the PNG's legend
        )
        fig.add_layout(legend, "right")
    else:
        data = {"x": x, "y": y, "cell": cells}
        kwargs = {"color": "#1f77b4"}
        if values is not None:
            data["value"] = values[keep].astype(float)
            finite = data["value"][np.isfinite(data["value"])]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            mapper = linear_cmap("value", "Viridis256", low, high, nan_color="#c8c8c8")
            kwargs = {"color": mapper}
            tooltips.append((color, "@value"))
            fig.add_layout(ColorBar(color_mapper=mapper.transform, title=color), "right")
        renderer = fig.scatter(
            "x",
            "y",
            source=ColumnDataSource(data),
            size=radius_px,
            alpha=alpha,
            line_color=None,
            **kwargs,
        )
        points.append(renderer)
        if items:  # the shading can be hidden too
            items.append(LegendItem(label=f"a sample of {keep.size:,} cells", renderers=points))
            fig.add_layout(Legend(items=items, click_policy="hide"), "right")
    fig.add_tools(HoverTool(tooltips=tooltips, renderers=points))
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


def _shading(fig, embedding: np.ndarray, rgb: np.ndarray):
    """All cells as one PNG image under the points (a data URL: the page stays one file)."""
    import base64
    import io

    from matplotlib.image import imsave

    x0, x1, y0, y1 = extent(embedding)
    aspect = (y1 - y0) / (x1 - x0)
    cols = DENSITY_PIXELS if aspect <= 1 else max(round(DENSITY_PIXELS / aspect), 1)
    rows = max(round(cols * aspect), 1)
    image = density_rgba(embedding, rgb, bounds=(x0, x1, y0, y1), shape=(rows, cols))
    buffer = io.BytesIO()
    imsave(buffer, image, format="png")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return fig.image_url(url=[url], x=x0, y=y1, w=x1 - x0, h=y1 - y0, anchor="top_left")

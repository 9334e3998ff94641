"""The embedding as a standalone, offline bokeh page: pan, zoom, hover, click a legend entry."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from distumap._format import HTML_MARK, check_replaceable
from distumap.pl._palette import (
    categories,
    default_title,
    is_categorical,
    marker_style,
    plot_data,
)

#: seed of the subsample drawn above ``max_points``
SAMPLE_SEED = 0


def umap_html(
    ds: xr.Dataset,
    *,
    color: str | None = None,
    path: str | os.PathLike | None = None,
    max_points: int = 200_000,
    title: str | None = None,
) -> str:
    """Interactive scatter plot of ``X_umap`` as one self-contained HTML file.

    Parameters
    ----------
    ds
        A store after the embed stage; only ``X_umap``, the cell names and the ``color``
        column are loaded.
    color
        A ``cell`` column: categories get a legend (click an entry to hide it), numbers a
        colour bar.
    path
        Where to write the page; also an fsspec URL. Without it the page is returned.
    max_points
        Draw a seeded uniform sample of this many cells when there are more; the title says
        so. Keeps the page light (about 30 bytes per point plus the cell names).
    title
        Defaults to the number of cells and the column.

    Returns
    -------
    str
        ``path`` when given, else the HTML document.

    Notes
    -----
    This computes ``X_umap``, the cell names and the colour column. Points are drawn with
    WebGL; the hover shows the cell name and its label. bokeh's JavaScript is embedded
    inline, so the page works offline (about 1 MB on top of the data).

    Examples
    --------
    >>> distumap.pl.umap_html(ds, color="subclass_label", path="umap.html")  # doctest: +SKIP
    'umap.html'
    """
    import dask
    from bokeh.embed import file_html
    from bokeh.models import ColorBar, ColumnDataSource, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    from bokeh.transform import linear_cmap

    embedding, values, given = plot_data(ds, color)
    (cells,) = dask.compute(ds["cell"].data)
    cells = np.asarray(cells).astype(str)
    n = embedding.shape[0]
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, max_points, replace=False))
    heading = title or default_title(n, color)
    if keep.size < n:
        heading += f" (showing a random sample of {keep.size:,} of {n:,} cells)"

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
    if values is not None and is_categorical(values):
        codes, names, counts, colors = categories(values, given)
        codes = codes[keep]
        items = []
        for code, (name, count, hue) in enumerate(zip(names, counts, colors, strict=True)):
            mask = codes == code
            source = ColumnDataSource({"x": x[mask], "y": y[mask], "cell": cells[keep][mask]})
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
            items.append(LegendItem(label=f"{name} ({count:,})", renderers=[renderer]))
        tooltips.append((color, "$name"))
        legend = Legend(
            items=items,
            title=color,
            click_policy="hide",
            label_text_font_size="9pt",
            spacing=0,
            padding=4,
        )
        fig.add_layout(legend, "right")
    else:
        data = {"x": x, "y": y, "cell": cells[keep]}
        kwargs = {"color": "#1f77b4"}
        if values is not None:
            data["value"] = values[keep].astype(float)
            finite = data["value"][np.isfinite(data["value"])]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            mapper = linear_cmap("value", "Viridis256", low, high, nan_color="#c8c8c8")
            kwargs = {"color": mapper}
            tooltips.append((color, "@value"))
            fig.add_layout(ColorBar(color_mapper=mapper.transform, title=color), "right")
        fig.scatter(
            "x",
            "y",
            source=ColumnDataSource(data),
            size=radius_px,
            alpha=alpha,
            line_color=None,
            **kwargs,
        )
    fig.add_tools(HoverTool(tooltips=tooltips))
    html = file_html(fig, resources=INLINE, title=heading)
    # the mark by which distumap knows the page as its own (and may replace it)
    html = html.replace("<head>", f"<head>\n    {HTML_MARK}", 1)
    if path is None:
        return html
    target = os.fspath(path)
    check_replaceable(target)
    if "://" in target:
        import fsspec

        with fsspec.open(target, "w", encoding="utf-8") as f:
            f.write(html)
    else:
        with open(target, "w", encoding="utf-8") as f:
            f.write(html)
    return target

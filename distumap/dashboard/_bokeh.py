"""The Bokeh page: one document per open browser session, the stage table above a scatter of the
embedding that grows as blocks finish. Bokeh is imported when a document is built."""

from __future__ import annotations

from typing import Any

from distumap.dashboard._html import render_table
from distumap.dashboard._state import ProgressState, state_of

#: how often an open page asks the plugin for news, in milliseconds
UPDATE_MS = 500
#: legend entries shown at most (more categories: the colours alone)
MAX_LEGEND = 40


def page_doc(scheduler, extra, doc) -> None:
    """Build one browser session's document (Dask's page signature: scheduler, extra, doc)."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    view = _PageView(scheduler)
    view.update()
    add_periodic_callback(doc, view, UPDATE_MS)
    doc.title = "Dask: distumap"
    doc.add_root(view.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


class _PageView:
    """The stage table and the growing scatter of one open page."""

    def __init__(self, scheduler) -> None:
        from bokeh.layouts import column
        from bokeh.models import ColumnDataSource, Div
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self.heading = Div(text="<h2 style='margin:0.2em 0'>distumap</h2>", name="distumap-heading")
        self.table = Div(text="", name="distumap-stages", sizing_mode="stretch_width")
        self.source = ColumnDataSource(
            {"x": [], "y": [], "label": [], "color": []}, name="distumap-points"
        )
        self.figure = figure(
            title="Embedding: waiting for the first embedded block",
            name="distumap-embedding",
            height=640,
            sizing_mode="stretch_width",
            match_aspect=True,
            tools="pan,wheel_zoom,box_zoom,reset,save",
            active_scroll="wheel_zoom",
            x_axis_label="UMAP 1",
            y_axis_label="UMAP 2",
        )
        self.figure.grid.visible = False
        self.figure.axis.major_label_text_font_size = "0pt"
        self.figure.axis.major_tick_line_color = None
        self.figure.axis.minor_tick_line_color = None
        self.figure.scatter(
            "x",
            "y",
            source=self.source,
            color="color",
            size=3,
            alpha=0.8,
            line_color=None,
            legend_field="label",
        )
        self.legend = self.figure.legend[0]
        self.legend.label_text_font_size = "9pt"
        self.legend.spacing = 0
        self.legend.visible = False
        self.figure.add_layout(self.legend, "right")
        self.root = column(
            self.heading, self.table, self.figure, sizing_mode="stretch_width", name="distumap"
        )
        self.run: tuple[str, int] | None = None
        self.seen: set[Any] = set()
        self.version = -1
        self.labels: set[str] = set()

    def update(self) -> None:
        plugin = state_of(self.scheduler)
        table = render_table(plugin.snapshot())
        if table != self.table.text:
            self.table.text = table
        self._update_points(plugin)

    def _update_points(self, plugin: ProgressState) -> None:
        latest = plugin.latest_points()
        if latest is None:
            return
        stage, points = latest
        run = (stage, id(points))
        if run != self.run:  # a new run: start the drawing again
            self.run, self.seen, self.version, self.labels = run, set(), -1, set()
            self.source.data = {"x": [], "y": [], "label": [], "color": []}
        if points.version == self.version:
            return
        self.version = points.version
        new = {"x": [], "y": [], "label": [], "color": []}
        for block, (x, y, labels, colors) in list(points.blocks.items()):
            if block in self.seen:
                continue  # a block sent again brings the same cells
            self.seen.add(block)
            new["x"] += x
            new["y"] += y
            new["label"] += labels
            new["color"] += colors
        if new["x"]:
            self.source.stream(new)
            self.labels.update(new["label"])
        self.legend.visible = 1 < len(self.labels) <= MAX_LEGEND
        drawn = len(self.source.data["x"])
        every = f", 1 cell in {points.stride:,}" if points.stride > 1 else ""
        self.figure.title.text = (
            f"Embedding ({stage}): {drawn:,} points drawn of {points.total:,} cells{every}"
        )

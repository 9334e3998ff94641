"""distumap's page on the Dask dashboard: each stage's progress and the embedding as it is drawn.

Tasks log events to the scheduler; a scheduler plugin keeps small running sums of them and serves

- ``/distumap``: a Bokeh page, built and served like Dask's own pages (same Bokeh server
  factory, template, theme and navigation bar, where it is listed as "Distumap"): per stage the
  units done of the total with rate and time left (genes kept is a result, shown as a number),
  the UMAP fit's state and run time from the scheduler's task state, and a bounded, evenly
  subsampled scatter of the embedding that grows as transform blocks finish;
- ``/distumap/progress.json``: the same numbers as JSON.

Two topics feed it: :data:`distumap._progress.TOPIC` (``{"stage", "done", "total", "block"}``,
sent by :func:`distumap._progress.report`) and :data:`POINTS_TOPIC` (a few points of each
embedded block, sent by :func:`distumap._progress.send_points`). The points of a run are at most
:data:`~distumap._progress.MAX_POINTS` whatever the number of cells: each block sends only
the cells whose global index is a multiple of one stride, so the scheduler holds an even
sample of the whole embedding.

Two ways to install it:

- a separate scheduler: ``dask scheduler --preload distumap.dashboard`` (the module's
  :func:`dask_setup` adds the plugin when the scheduler starts);
- an existing cluster, e.g. the embedded ``LocalCluster`` of :func:`distumap.connect`:
  ``distumap.dashboard.install(client)``, which registers the same plugin from the client.

Counting rules: an event that names a ``block`` sets that block's count (a retried or re-run
block is not counted twice); an event without a block adds to the stage, except for a stage
whose number is a result (``preprocess``: genes kept), which takes the latest value. A stage
restarts from zero when an event brings a different ``total`` (a new run on a long-lived
cluster).

This module imports cheaply (Bokeh only when the page is built, on the scheduler), so a task
may call :func:`distumap._progress.send_points` from a fresh worker process.
"""

from __future__ import annotations

import html
import time
from collections import deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from distumap._palette import MISSING_COLOR, MISSING_LABEL, palette
from distumap._progress import POINTS_TOPIC, STAGES, TOPIC

#: where the page lives on the dashboard server (the JSON is at ``ROUTE + "/progress.json"``)
ROUTE = "/distumap"

#: points the scheduler keeps per run whatever the senders ask for (a sender that does not say
#: the run's total sends up to ``max_points`` per block; this bounds the scheduler's memory)
_STORED_POINTS = 50_000

#: the task key prefixes of distumap's graphs, counted by state in the JSON: the scheduler's
#: prefixes (``dask.utils.key_split``), which stop before a word holding a digit or a "+", so
#: ``read-10x-h5-block-...``, ``read-h5ad-block-...`` and blocks of mixed inputs
#: (``read-10x-h5+loom-block-...``) all count as ``read``
TASK_PREFIXES = (
    "parse-csv-block",
    "parse-csv-gzip",
    "parse-csv-gene-block",
    "parse-csv-gzip-genes",
    "transpose-block",
    "read",
    "read-mex-block",
    "read-loom-block",
    "read-anndata-zarr-block",
    "read-mex-gzip",
    "gene-stats",
    "select-genes",
    "umap-fit",
    "umap-transform",
    "umap-refine-knn",
    "umap-refine-epoch",
    "loom-block",
    "loom-graph-block",
)

#: tasks whose keys start with this are the UMAP fit (one task ``umap-fit-<token>``)
FIT_PREFIX = "umap-fit"
#: the optional progress stage of the fit's own steps: ``report("fit", 1, len(FIT_STEPS),
#: block=i)`` after step ``i`` finished
FIT_STAGE = "fit"
FIT_STEPS = ("PCA of the landmarks", "UMAP of the landmarks", "transform calibration", "saved")

#: the task key prefixes of each stage's tasks: a stage's time starts when its first task runs
STAGE_TASKS = {
    # every reader's tasks: the CSV's (parse-csv-block, parse-csv-gzip), genes-by-cells'
    # (parse-csv-gene-block, parse-csv-gzip-genes, transpose-block), the binary formats'
    # read-<format>-block (mixed inputs join formats with "+") and read-mex-gzip
    "ingest": (
        "index-csv",
        "parse-csv",
        "transpose-block",
        "index-mtx",
        "transpose-csc",
        "read-10x-h5",
        "read-h5ad",
        "read-anndata-zarr",
        "read-loom",
        "read-mex",
    ),
    "preprocess": ("gene-stats", "select-genes"),
    "embed": ("umap-transform", "umap-refine"),
    "export": ("loom-block", "loom-graph-block", "h5ad-block", "anndata-zarr"),
}
_WATCHED = (FIT_PREFIX, *(prefix for prefixes in STAGE_TASKS.values() for prefix in prefixes))

#: stages whose number is a result, not progress towards a total
RESULT_STAGES = frozenset({"preprocess"})

#: the scheduler plugin's name (one per scheduler)
PLUGIN_NAME = "distumap-dashboard"

#: the scheduler task states shown per prefix (the JSON adds a cumulative "finished")
TASK_STATES = ("waiting", "queued", "no-worker", "processing", "memory", "erred")

#: how often an open page asks the plugin for news, in milliseconds
UPDATE_MS = 500
#: rates are measured over the events of the last this many seconds
_RATE_WINDOW = 60.0
#: legend entries shown at most (more categories: the colours alone)
MAX_LEGEND = 40
_REFRESH_SECONDS = 2


# ---------------------------------------------------------------- what the scheduler keeps


class _StageProgress:
    """The running count of one stage: per-block counts plus counts without a block, and
    recent (time, done) samples for the rate."""

    __slots__ = ("blocks", "loose", "samples", "started", "total", "updated")

    def __init__(self, total: int) -> None:
        self.total = total
        self.blocks: dict[Any, int] = {}
        self.loose = 0
        self.started: float | None = None
        self.updated = 0.0
        self.samples: deque[tuple[float, int]] = deque(maxlen=256)

    @property
    def done(self) -> int:
        return self.loose + sum(self.blocks.values())

    def record(self, timestamp: float) -> None:
        if self.started is None:
            self.started = timestamp
        self.updated = max(self.updated, timestamp)
        self.samples.append((timestamp, self.done))

    def rate(self) -> float | None:
        """Units per second over the last minute of events (the whole run once complete)."""
        if len(self.samples) < 2:
            return None
        last_time, last_done = self.samples[-1]
        complete = self.total and last_done >= self.total
        first_time, first_done = self.samples[0]
        if not complete:
            for sample_time, sample_done in self.samples:
                if last_time - sample_time <= _RATE_WINDOW:
                    first_time, first_done = sample_time, sample_done
                    break
        if last_time <= first_time or last_done <= first_done:
            return None
        return (last_done - first_done) / (last_time - first_time)


class _Points:
    """The points of one run of one stage, by block, with a colour per label."""

    __slots__ = ("blocks", "count", "label_colors", "stride", "total", "updated", "version")

    def __init__(self, total: int) -> None:
        self.total = total
        self.blocks: dict[Any, tuple[list, list, list, list]] = {}
        self.label_colors: dict[str, str] = {}
        self.count = 0
        self.stride = 1
        self.updated = 0.0
        self.version = 0

    def add(self, msg: dict[str, Any], timestamp: float) -> None:
        block = msg["block"]
        x, y = [float(v) for v in msg["x"]], [float(v) for v in msg["y"]]
        if len(x) != len(y):
            return
        labels = msg.get("label") or [""] * len(x)
        colors = msg.get("color") or [self._color(str(label)) for label in labels]
        if len(labels) != len(x) or len(colors) != len(x):
            return
        old = self.blocks.pop(block, None)
        if old is not None:
            self.count -= len(old[0])
        room = max(_STORED_POINTS - self.count, 0)
        texts = [str(label) or MISSING_LABEL for label in labels[:room]]
        self.blocks[block] = (x[:room], y[:room], texts, [str(c) for c in colors[:room]])
        self.count += min(len(x), room)
        self.stride = int(msg.get("stride", 1))
        self.updated = timestamp
        self.version += 1

    def _color(self, label: str) -> str:
        color = self.label_colors.get(label)
        if color is None:
            if not label:
                color = MISSING_COLOR
            else:
                # colours in the order labels arrive: a label keeps its colour for the run
                index = sum(1 for known in self.label_colors if known)
                color = _colors()[index] if index < len(_colors()) else MISSING_COLOR
            self.label_colors[label] = color
        return color


_PALETTE: list[str] = []


def _colors() -> list[str]:
    if not _PALETTE:
        _PALETTE.extend(palette(64))  # palette(n)[:k] == palette(k): colours never shift
    return _PALETTE


# ---------------------------------------------------------------- the scheduler plugin


class ProgressDashboard(SchedulerPlugin):
    """Scheduler plugin that sums distumap's events and serves them on the dashboard.

    Notes
    -----
    ``start`` replays the events the scheduler still holds for both topics (installing the page
    late loses nothing that the scheduler's bounded event log kept), then ``log_event`` keeps
    counting, so the sums are exact even after the event log has dropped old entries. The fit's
    state comes from ``transition`` (task keys starting with :data:`FIT_PREFIX`). Everything
    kept is small: a few numbers per stage and block, and at most
    :data:`~distumap._progress.MAX_POINTS` points per run.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.stages: dict[str, _StageProgress] = {}
        self.points: dict[str, _Points] = {}
        self.fit: dict[str, Any] = {}
        self.first_task: dict[str, float] = {}
        self.scheduler = None

    async def start(self, scheduler) -> None:
        if self.scheduler is scheduler:  # started already: do not count the event log twice
            return
        self.scheduler = scheduler
        for timestamp, msg in scheduler.get_events(TOPIC):
            self._count(msg, timestamp)
        for timestamp, msg in scheduler.get_events(POINTS_TOPIC):
            self._add_points(msg, timestamp)
        for key, task in getattr(scheduler, "tasks", {}).items():
            if _is_fit(key) and task.state in ("processing", "memory", "erred"):
                # already under way or done when the page came: the start time is unknown
                self._fit_transition(key, task.state, None)
        _add_routes(scheduler)

    async def close(self) -> None:
        if self.scheduler is not None:
            _remove_page(self.scheduler)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC:
            self._count(msg, time.time())
        elif topic == POINTS_TOPIC:
            self._add_points(msg, time.time())

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        # called for every transition of every task: one type check and one startswith
        name = _key_name(key)
        if name is None or not name.startswith(_WATCHED):
            return
        if name.startswith(FIT_PREFIX):
            self._fit_transition(key, finish, time.time())
        elif finish == "processing":
            stage = next(s for s, prefixes in STAGE_TASKS.items() if name.startswith(prefixes))
            progress = self.stages.get(stage)
            idle = progress is None or (progress.total and progress.done >= progress.total)
            if idle and stage not in self.first_task:
                self.first_task[stage] = time.time()  # a new run of the stage begins

    def _fit_transition(self, key, state: str, timestamp: float | None) -> None:
        if self.fit.get("key") != key:
            self.fit = {"key": key, "state": "waiting", "started": None, "finished": None}
        if state == "processing":
            self.fit.update(state="running", started=timestamp, finished=None)
        elif state == "memory":
            self.fit.update(state="done", finished=timestamp)
        elif state == "erred":
            self.fit.update(state="failed", finished=timestamp)
        elif state in ("released", "forgotten") and self.fit["state"] == "running":
            self.fit.update(state="stopped", finished=timestamp)
        elif state in ("waiting", "queued", "no-worker"):
            self.fit.update(state="waiting", started=None, finished=None)

    def _count(self, msg: Any, timestamp: float) -> None:
        try:
            stage = str(msg["stage"])
            done = int(msg["done"])
            total = int(msg["total"])
        except (TypeError, KeyError, ValueError):
            return  # not ours to judge; a malformed event must not break the scheduler
        progress = self.stages.get(stage)
        if progress is None or progress.total != total:
            previous = progress.updated if progress is not None else 0.0
            progress = self.stages[stage] = _StageProgress(total)
            first_task = self.first_task.get(stage)
            if first_task is not None and previous <= first_task <= timestamp:
                progress.started = first_task
        self.first_task.pop(stage, None)
        block = msg.get("block")
        if block is not None:
            progress.blocks[block] = done
        elif stage in RESULT_STAGES:
            progress.loose = done  # a result: the latest value, not a sum
        else:
            progress.loose += done
        progress.record(timestamp)

    def _add_points(self, msg: Any, timestamp: float) -> None:
        try:
            stage = str(msg["stage"])
            total = int(msg["total"])
            hash(msg["block"])
            points = self.points.get(stage)
            if points is None or points.total != total:
                points = self.points[stage] = _Points(total)
            points.add(msg, timestamp)
        except (TypeError, KeyError, ValueError):
            return  # malformed: ignored, as above

    def latest_points(self) -> tuple[str, _Points] | None:
        """The stage whose points arrived last, and its points."""
        if not self.points:
            return None
        return max(self.points.items(), key=lambda item: item[1].updated)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The page's numbers: per-stage progress, the fit, the points, task counts by prefix."""
        now = time.time() if now is None else now
        stages = {}
        for stage in [*STAGES, *sorted(set(self.stages) - set(STAGES))]:
            stages[stage] = _stage_numbers(stage, self.stages.get(stage), now)
        latest = self.latest_points()
        points = None
        if latest is not None:
            stage, kept = latest
            points = {"stage": stage, "count": kept.count, "total": kept.total}
            points["stride"] = kept.stride
        return {
            "stages": stages,
            "fit": self._fit_numbers(now),
            "points": points,
            "tasks": self._task_counts(),
        }

    def _fit_numbers(self, now: float) -> dict[str, Any]:
        fit = dict(self.fit) or {"key": None, "state": "not started", "started": None}
        fit.setdefault("finished", None)
        started, finished = fit.get("started"), fit.get("finished")
        fit["seconds"] = None
        if started is not None:
            fit["seconds"] = round((finished if finished is not None else now) - started, 1)
        steps = self.stages.get(FIT_STAGE)
        fit["steps_done"] = steps.done if steps else 0
        fit["steps_total"] = steps.total if steps else 0
        fit["step"] = None
        if steps and steps.blocks:
            last = max(b for b in steps.blocks if isinstance(b, int))
            fit["step"] = FIT_STEPS[last] if 0 <= last < len(FIT_STEPS) else f"step {last + 1}"
        if fit["key"] is not None:
            fit["key"] = str(fit["key"])
        return fit

    def _task_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        prefixes = self.scheduler.task_prefixes if self.scheduler is not None else {}
        for name in TASK_PREFIXES:
            prefix = prefixes.get(name)
            states = prefix.states if prefix is not None else {}
            counts[name] = {state: states.get(state, 0) for state in TASK_STATES}
            # cumulative, so tasks that finished and were forgotten still count
            counts[name]["finished"] = (
                prefix.state_counts.get("memory", 0) if prefix is not None else 0
            )
        return counts


def _key_name(key) -> str | None:
    """The text of a task key: the key itself, or the name of a ``(name, index)`` key."""
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return key[0]
    return None


def _is_fit(key) -> bool:
    name = _key_name(key)
    return name is not None and name.startswith(FIT_PREFIX)


def _stage_numbers(stage: str, progress: _StageProgress | None, now: float) -> dict[str, Any]:
    done = progress.done if progress else 0
    total = progress.total if progress else 0
    result = stage in RESULT_STAGES
    complete = bool(total) and done >= total
    rate = progress.rate() if progress else None
    seconds_left = None
    if rate and not complete and not result:
        seconds_left = max((total - done) / rate - max(now - progress.updated, 0.0), 0.0)
    return {
        "unit": STAGES.get(stage, "units"),
        "kind": "result" if result else "progress",
        "done": done,
        "total": total,
        "fraction": min(done / total, 1.0) if total else 0.0,
        "complete": complete or (result and progress is not None),
        "updated": progress.updated if progress else None,
        "started": progress.started if progress else None,
        "rate": None if result or rate is None else round(rate, 3),
        "seconds_left": None if seconds_left is None else round(seconds_left, 1),
    }


# ---------------------------------------------------------------- HTTP: the page and the JSON


def _add_routes(scheduler) -> None:
    app = getattr(scheduler, "http_application", None)
    if app is None or getattr(app, "_distumap_routes", False):
        return  # no dashboard server (--no-dashboard), or the routes are already there
    prefix = _http_prefix(app)
    kwargs = {"scheduler": scheduler}
    handlers = [(prefix + ROUTE + r"/progress\.json", _JSONHandler, kwargs)]
    page = _add_bokeh_page(scheduler, prefix)
    if page is None:  # Dask serves no Bokeh pages here: the plain page instead
        handlers.append((prefix + ROUTE + r"/?", _PageHandler, kwargs))
    app.add_handlers(r".*", handlers)
    app._distumap_routes = True
    app._distumap_page = page


def _http_prefix(app) -> str:
    """The dashboard's URL prefix (``dask scheduler --dashboard-prefix``), taken from Dask's
    own Bokeh server; ``""`` for none."""
    for child in getattr(app, "applications", []):
        prefix = getattr(child, "prefix", None)
        if isinstance(prefix, str) and hasattr(child, "app_paths"):
            return prefix.rstrip("/")
    return ""


def _add_bokeh_page(scheduler, prefix: str):
    """Serve the Bokeh page at ``ROUTE`` as Dask serves its own: the same Bokeh server factory,
    template and theme, added to the scheduler's HTTP application, and listed in the navigation
    bar of every dashboard page. None when Dask's dashboard (or Bokeh) is not there."""
    if not any(hasattr(child, "app_paths") for child in scheduler.http_application.applications):
        return None
    try:
        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop
    except ImportError:
        return None
    variables = template_variables(scheduler)
    page = BokehApplication(
        {ROUTE: _page_doc}, scheduler, prefix=prefix, template_variables=variables
    )
    scheduler.http_application.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    # Dask memoizes these per scheduler and every page's navigation bar shares the list
    pages = variables.get("pages")
    if isinstance(pages, list) and ROUTE.strip("/") not in pages:
        pages.append(ROUTE.strip("/"))
    return page


def _remove_page(scheduler) -> None:
    app = getattr(scheduler, "http_application", None)
    page = getattr(app, "_distumap_page", None)
    if page is None:
        return
    page.stop()
    if page in app.applications:
        app.applications.remove(page)
    app._distumap_page = None


class _Handler(web.RequestHandler):
    def initialize(self, scheduler) -> None:
        self.scheduler = scheduler

    def _snapshot(self) -> dict[str, Any]:
        return _plugin(self.scheduler).snapshot()


def _plugin(scheduler) -> ProgressDashboard:
    # looked up per request, so a replaced plugin is the one that answers
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    return plugin if plugin is not None else ProgressDashboard()


class _JSONHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(self._snapshot())  # tornado serialises a dict as application/json


class _PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render_page(self._snapshot()))


# ---------------------------------------------------------------- what the page says


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _format_rate(rate: float, unit: str) -> str:
    what = unit.split()[0]  # "cells ingested" -> cells
    shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
    return f"{shown} {what}/s"


def stage_rows(snapshot: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """One row per stage for the page: ``stage``, ``text`` (what is done), ``fraction`` (None
    for results and the fit: no bar), ``detail`` (rate and time left, or time taken)."""
    now = time.time() if now is None else now
    rows = []
    for stage, info in snapshot["stages"].items():
        if stage == FIT_STAGE:
            continue  # shown in the fit's row
        if stage == "embed":
            rows.append(_fit_row(snapshot.get("fit") or {}, now))
        rows.append(_stage_row(stage, info, snapshot.get("tasks", {})))
    return rows


def _stage_row(stage: str, info: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    unit, done, total = info["unit"], info["done"], info["total"]
    row = {"key": stage, "stage": stage, "fraction": None, "detail": "", "state": "idle"}
    if info["kind"] == "result":
        if info["updated"] is None:
            running = tasks.get("gene-stats", {}).get("processing", 0)
            row["text"] = "gene statistics running" if running else "not started"
            row["state"] = "running" if running else "idle"
        else:
            row["text"] = f"{done:,} of {total:,} {unit}"
            row["state"] = "done"
        return row
    if not total:
        row["text"] = "not started"
        return row
    row["text"] = f"{done:,} of {total:,} {unit}"
    row["fraction"] = info["fraction"]
    rate = info.get("rate")
    if info["complete"]:
        row["state"] = "done"
        took = (info["updated"] or 0) - (info["started"] or 0)
        parts = [f"done in {format_duration(took)}"] if took > 0 else ["done"]
        if rate:
            parts.append(f"{_format_rate(rate, unit)} on average")
        row["detail"] = " · ".join(parts)
    else:
        row["state"] = "running"
        parts = [_format_rate(rate, unit)] if rate else ["measuring rate"]
        if info.get("seconds_left") is not None:
            parts.append(f"about {format_duration(info['seconds_left'])} left")
        row["detail"] = " · ".join(parts)
    return row


def _fit_row(fit: dict[str, Any], now: float) -> dict[str, Any]:
    state = fit.get("state", "not started")
    seconds = fit.get("seconds")
    row = {"key": FIT_STAGE, "stage": "UMAP fit", "fraction": None, "detail": "", "state": "idle"}
    if state == "running":
        row["state"] = "running"
        row["text"] = "running" + (f" for {format_duration(seconds)}" if seconds else "")
    elif state == "done":
        row["state"] = "done"
        row["text"] = "done" + (f" in {format_duration(seconds)}" if seconds else "")
    elif state == "failed":
        row["state"] = "failed"
        row["text"] = "failed" + (f" after {format_duration(seconds)}" if seconds else "")
    else:
        row["text"] = {"waiting": "waiting for a worker", "stopped": "stopped"}.get(
            state, "not started"
        )
    if fit.get("steps_total"):
        step = f"step {fit['steps_done']} of {fit['steps_total']} finished"
        row["detail"] = step + (f": {fit['step']}" if fit.get("step") else "")
    elif state == "running":
        row["detail"] = "one task on one worker: umap-learn on the landmarks"
    return row


_STATE_COLORS = {"done": "#2e9d4f", "running": "#3b7dd8", "failed": "#c0392b", "idle": "#999"}


def render_table(snapshot: dict[str, Any], now: float | None = None) -> str:
    """The stages as an HTML table (bars only for progress; results and the fit as text)."""
    esc = html.escape
    body = []
    for row in stage_rows(snapshot, now):
        bar = ""
        if row["fraction"] is not None:
            percent = 100.0 * row["fraction"]
            fill = _STATE_COLORS["done" if row["state"] == "done" else "running"]
            bar = (
                '<div style="width:16em;height:0.9em;background:#e6e6e6">'
                f'<div class="fill" style="width:{percent:.1f}%;height:100%;background:{fill}">'
                f"</div></div>"
            )
        color = _STATE_COLORS.get(row["state"], "#999")
        body.append(
            f'<tr id="stage-{esc(row["key"])}">'
            f'<td style="padding:0.3em 0.8em;font-weight:bold;color:{color}">'
            f"{esc(row['stage'])}</td>"
            f'<td class="text" style="padding:0.3em 0.8em">{esc(row["text"])}</td>'
            f'<td style="padding:0.3em 0.8em">{bar}</td>'
            f'<td class="detail" style="padding:0.3em 0.8em;color:#555">{esc(row["detail"])}</td>'
            "</tr>"
        )
    return (
        '<table style="border-collapse:collapse;font-family:sans-serif;font-size:14px">'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def render_page(snapshot: dict[str, Any]) -> str:
    """A plain, self-refreshing HTML page of the stages, served at ``/distumap`` only where the
    scheduler has no Bokeh dashboard."""
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{_REFRESH_SECONDS}">'
        "<title>distumap progress</title></head><body>"
        "<h1>distumap progress</h1>"
        f"{render_table(snapshot)}"
        f'<p><a href="{ROUTE}/progress.json">JSON</a></p>'
        "</body></html>\n"
    )


# ---------------------------------------------------------------- the Bokeh page


def _page_doc(scheduler, extra, doc) -> None:
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
        plugin = _plugin(self.scheduler)
        table = render_table(plugin.snapshot())
        if table != self.table.text:
            self.table.text = table
        self._update_points(plugin)

    def _update_points(self, plugin: ProgressDashboard) -> None:
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


# ---------------------------------------------------------------- installing


def dask_setup(scheduler) -> None:
    """Preload hook: ``dask scheduler --preload distumap.dashboard`` adds the page."""
    scheduler.add_plugin(ProgressDashboard(), idempotent=True)
    # the scheduler calls the plugin's start() after its preloads; that adds the routes


def install(client) -> str:
    """Add the progress page to the scheduler that ``client`` is connected to.

    Parameters
    ----------
    client
        A ``distributed.Client``; the scheduler must be able to import distumap (it can for the
        embedded ``LocalCluster`` and for the distumap container image).

    Returns
    -------
    str
        The page's URL, derived from ``client.dashboard_link``.

    Notes
    -----
    Idempotent: a scheduler started with ``--preload distumap.dashboard`` keeps its plugin.

    Examples
    --------
    >>> client = distumap.connect(n_workers=2)  # doctest: +SKIP
    >>> distumap.dashboard.install(client)  # doctest: +SKIP
    'http://127.0.0.1:8787/distumap'
    """
    client.register_plugin(ProgressDashboard())
    return page_link(client)


def page_link(client) -> str:
    """The progress page's URL for ``client``'s scheduler."""
    link = client.dashboard_link
    base = link[: -len("/status")] if link.endswith("/status") else link.rstrip("/")
    return base + ROUTE

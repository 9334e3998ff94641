"""A distumap progress page on the Dask scheduler's dashboard server.

Tasks log progress events under :data:`distumap._progress.TOPIC` (see
:func:`distumap._progress.report`). A scheduler plugin adds them up per stage and serves

- ``/distumap``: a self-refreshing HTML page (a table with bars, no external resources), and
- ``/distumap/progress.json``: the same numbers as JSON,

on the same HTTP server as the Dask dashboard (port 8787 by default).

Two ways to install it:

- a separate scheduler: ``dask scheduler --preload distumap.dashboard`` (the module's
  :func:`dask_setup` adds the plugin when the scheduler starts);
- an existing cluster, e.g. the embedded ``LocalCluster`` of :func:`distumap.connect`:
  ``distumap.dashboard.install(client)``, which registers the same plugin from the client.

Counting rules: an event that names a ``block`` sets that block's count (a retried or re-run
block is not counted twice); an event without a block adds to the stage. A stage restarts from
zero when an event brings a different ``total`` (a new run on a long-lived cluster).
"""

from __future__ import annotations

import html
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from distumap._progress import STAGES, TOPIC

#: where the page lives on the dashboard server
ROUTE = "/distumap"

#: the task key prefixes of distumap's graphs, counted by state on the page
TASK_PREFIXES = ("parse-csv-block", "gene-stats", "umap-transform", "loom-block")

#: the scheduler plugin's name (one per scheduler)
PLUGIN_NAME = "distumap-dashboard"

#: the scheduler task states shown per prefix (the page adds a cumulative "finished")
TASK_STATES = ("waiting", "queued", "no-worker", "processing", "memory", "erred")

_REFRESH_SECONDS = 2


class _StageProgress:
    """The running count of one stage: per-block counts plus counts without a block."""

    __slots__ = ("blocks", "loose", "total", "updated")

    def __init__(self, total: int) -> None:
        self.total = total
        self.blocks: dict[Any, int] = {}
        self.loose = 0
        self.updated = 0.0

    @property
    def done(self) -> int:
        return self.loose + sum(self.blocks.values())


class ProgressDashboard(SchedulerPlugin):
    """Scheduler plugin that sums distumap's progress events and serves them over HTTP.

    Notes
    -----
    ``start`` replays the events the scheduler still holds for the topic (installing the page
    late loses nothing that the scheduler's bounded event log kept), then ``log_event`` keeps
    counting, so the sums are exact even after the event log has dropped old entries.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.stages: dict[str, _StageProgress] = {}
        self.scheduler = None

    async def start(self, scheduler) -> None:
        if self.scheduler is scheduler:  # started already: do not count the event log twice
            return
        self.scheduler = scheduler
        for timestamp, msg in scheduler.get_events(TOPIC):
            self._count(msg, timestamp)
        _add_routes(scheduler)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC:
            self._count(msg, time.time())

    def _count(self, msg: Any, timestamp: float) -> None:
        try:
            stage = str(msg["stage"])
            done = int(msg["done"])
            total = int(msg["total"])
        except (TypeError, KeyError, ValueError):
            return  # not ours to judge; a malformed event must not break the scheduler
        progress = self.stages.get(stage)
        if progress is None or progress.total != total:
            progress = self.stages[stage] = _StageProgress(total)
        block = msg.get("block")
        if block is None:
            progress.loose += done
        else:
            progress.blocks[block] = done
        progress.updated = timestamp

    def snapshot(self) -> dict[str, Any]:
        """The page's numbers: per-stage progress and task counts by key prefix and state."""
        stages = {}
        for stage in [*STAGES, *sorted(set(self.stages) - set(STAGES))]:
            progress = self.stages.get(stage)
            done = progress.done if progress else 0
            total = progress.total if progress else 0
            stages[stage] = {
                "unit": STAGES.get(stage, "units"),
                "done": done,
                "total": total,
                "fraction": min(done / total, 1.0) if total else 0.0,
                "updated": progress.updated if progress else None,
            }
        return {"stages": stages, "tasks": self._task_counts()}

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


def _add_routes(scheduler) -> None:
    app = getattr(scheduler, "http_application", None)
    if app is None or getattr(app, "_distumap_routes", False):
        return  # no dashboard server (--no-dashboard), or the routes are already there
    kwargs = {"scheduler": scheduler}
    app.add_handlers(
        r".*",
        [
            (ROUTE + r"/?", _PageHandler, kwargs),
            (ROUTE + r"/progress\.json", _JSONHandler, kwargs),
        ],
    )
    app._distumap_routes = True


class _Handler(web.RequestHandler):
    def initialize(self, scheduler) -> None:
        self.scheduler = scheduler

    def _snapshot(self) -> dict[str, Any]:
        # look the plugin up per request, so a replaced plugin is the one that answers
        plugin = self.scheduler.plugins.get(PLUGIN_NAME)
        if plugin is None:
            return ProgressDashboard().snapshot()
        return plugin.snapshot()


class _JSONHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(self._snapshot())  # tornado serialises a dict as application/json


class _PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render_page(self._snapshot()))


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: 0.3em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 20em; height: 1em; background: #eee; }
.fill { height: 100%; background: #3b7dd8; }
.fill.complete { background: #2e9d4f; }
"""


def render_page(snapshot: dict[str, Any]) -> str:
    """The HTML page for a :meth:`ProgressDashboard.snapshot`."""
    esc = html.escape
    rows = []
    for stage, info in snapshot["stages"].items():
        percent = 100.0 * info["fraction"]
        complete = " complete" if info["total"] and info["done"] >= info["total"] else ""
        rows.append(
            f'<tr id="stage-{esc(stage)}"><td>{esc(stage)}</td><td>{esc(info["unit"])}</td>'
            f'<td class="num done">{info["done"]:,}</td>'
            f'<td class="num total">{info["total"]:,}</td>'
            f'<td class="num">{percent:.1f}%</td>'
            f'<td><div class="bar"><div class="fill{complete}" style="width:{percent:.1f}%">'
            f"</div></div></td></tr>"
        )
    states = [*TASK_STATES, "finished"]
    task_rows = []
    for name, counts in snapshot["tasks"].items():
        cells = "".join(f'<td class="num">{counts.get(state, 0):,}</td>' for state in states)
        task_rows.append(f'<tr id="tasks-{esc(name)}"><td>{esc(name)}</td>{cells}</tr>')
    state_headers = "".join(f"<th>{esc(state)}</th>" for state in states)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{_REFRESH_SECONDS}">'
        f"<title>distumap progress</title><style>{_STYLE}</style></head><body>"
        "<h1>distumap progress</h1>"
        "<table><thead><tr><th>stage</th><th>unit</th><th>done</th><th>total</th><th></th>"
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<h2>tasks by key prefix</h2>"
        f"<table><thead><tr><th>prefix</th>{state_headers}</tr></thead>"
        f"<tbody>{''.join(task_rows)}</tbody></table>"
        '<p><a href="/status">Dask dashboard</a> · '
        f'<a href="{ROUTE}/progress.json">JSON</a></p>'
        "</body></html>\n"
    )


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

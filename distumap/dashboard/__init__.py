"""distumap's page on the Dask dashboard: each stage's progress and the embedding as it is drawn.

Tasks log events to the scheduler; a scheduler plugin keeps small running sums of them and serves

- ``/distumap``: a Bokeh page, built and served like Dask's own pages (same Bokeh server
  factory, template, theme and navigation bar, where it is listed as "Distumap"): a row per
  stage and, under it, a row per step (:data:`STEPS`, in the order a run executes them; an
  optional step such as the PCA of all cells once it has begun), each with what it has done of
  its total in its own unit (cells, blocks, epochs, pictures), rate and time left (genes kept
  is a result, shown as a number); a stage made of steps says which one runs (the embed is
  running while its refinement is); the UMAP fit's state and run time from the scheduler's
  task state; and a bounded, evenly subsampled scatter of the embedding that grows as
  transform blocks finish;
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

Counting rules: an event counts towards its ``step`` if it names one (``"transform"``,
``"refine"``, ``"h5ad"``, ...), else towards its ``stage``. An event that names a ``block``
sets that block's count (a retried or re-run block is not counted twice); an event without a
block adds to the stage, except for a stage whose number is a result (``preprocess``: genes
kept), which takes the latest value. A stage or step restarts from zero when an event brings a
different ``total`` (a new run on a long-lived cluster), and a stage's ``"started"`` status
(:func:`distumap._progress.report_status`) starts its steps anew. A status says when a stage or
step runs, whatever its blocks say (an export file is open after its last block). A step
without events (the PCA of all cells) counts the tasks of its latest task group that finished,
out of those the scheduler has seen.

This package imports cheaply (Bokeh only when the page is built, on the scheduler), so a task
may call :func:`distumap._progress.send_points` from a fresh worker process.
"""

from __future__ import annotations

from distumap.dashboard._bokeh import MAX_LEGEND, UPDATE_MS
from distumap.dashboard._html import ROUTE, format_duration, render_page, render_table, stage_rows
from distumap.dashboard._plugin import ProgressDashboard
from distumap.dashboard._state import (
    FIT_PREFIX,
    FIT_STAGE,
    FIT_STEPS,
    PLUGIN_NAME,
    RESULT_STAGES,
    STAGE_TASKS,
    STEPS,
    TASK_PREFIXES,
    TASK_STATES,
    Step,
)

__all__ = [
    "FIT_PREFIX",
    "FIT_STAGE",
    "FIT_STEPS",
    "MAX_LEGEND",
    "PLUGIN_NAME",
    "RESULT_STAGES",
    "ROUTE",
    "STAGE_TASKS",
    "STEPS",
    "TASK_PREFIXES",
    "TASK_STATES",
    "UPDATE_MS",
    "ProgressDashboard",
    "Step",
    "dask_setup",
    "format_duration",
    "install",
    "page_link",
    "render_page",
    "render_table",
    "stage_rows",
]


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

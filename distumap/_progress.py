"""Progress events that tasks send to the scheduler, for the dashboard page and the CLI.

A task calls :func:`report` with the stage, the units it finished and the stage's total; the
event lands in the scheduler's event log under :data:`TOPIC`, where the distumap dashboard page
(``distumap.dashboard``) sums it up. A stage made of several steps (the embed's transform,
graph and refinement; one export per file) names the step, which the page counts on its own
row; :func:`report_status` says when a stage or a step starts and ends. Outside a worker and
without a distributed client the calls do nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from distumap._compute import current_client
from distumap._format import STAGES

__all__ = [
    "MAX_POINTS",
    "POINTS_TOPIC",
    "STAGES",
    "STATUSES",
    "TOPIC",
    "report",
    "report_status",
    "send_points",
]

TOPIC = "distumap-progress"

#: the event topic of the embedding's points, drawn by the dashboard page as blocks finish
POINTS_TOPIC = "distumap-points"

#: points of one run that the page draws, at most: an even sample of the embedding
MAX_POINTS = 20_000


#: what :func:`report_status` says of a stage or a step
STATUSES = ("started", "complete", "failed")


def report(
    stage: str,
    done: int,
    total: int,
    *,
    block: int | None = None,
    step: str | None = None,
    per_unit: int | None = None,
) -> None:
    """Log that ``done`` more units of ``stage`` (out of ``total``) finished.

    ``step`` names the step of the stage they belong to (``"transform"`` of ``"embed"``),
    counted apart from the stage's other steps; ``per_unit`` says how many of them make one
    unit that the page shows (the cells of one refinement epoch, which counts cells).

    From inside a task the event goes through the worker; elsewhere through the current
    distributed client, if there is one. Without either, nothing happens.
    """
    message: dict[str, Any] = {
        "stage": stage,
        "done": int(done),
        "total": int(total),
        "block": block,
    }
    if step is not None:
        message["step"] = str(step)
    if per_unit is not None:
        message["per_unit"] = int(per_unit)
    _log(message)


def report_status(stage: str, status: str, *, step: str | None = None) -> None:
    """Log that ``stage`` (or its ``step``) has ``"started"``, is ``"complete"`` or has
    ``"failed"``: the page shows it running from start to end, whatever its blocks say."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    # done, total and block as in every event, so that readers of the topic need no case
    message: dict[str, Any] = {
        "stage": stage,
        "status": status,
        "done": 0,
        "total": 0,
        "block": None,
    }
    if step is not None:
        message["step"] = str(step)
    _log(message)


def _log(message: dict[str, Any]) -> None:
    try:
        from distributed import get_worker

        get_worker().log_event(TOPIC, message)
        return
    except (ImportError, ValueError):
        pass
    client = current_client()
    if client is not None:
        client.log_event(TOPIC, message)


def send_points(
    stage: str,
    block: int,
    xy: np.ndarray,
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    first_cell: int = 0,
    total: int | None = None,
    colors: Sequence[str] | np.ndarray | None = None,
    max_points: int = MAX_POINTS,
) -> int:
    """Send an even sample of one embedded block's points to the dashboard page.

    Parameters
    ----------
    stage
        The stage the points belong to (``"embed"``).
    block
        The block's number (a block sent again replaces its points).
    xy
        ``(cells, 2)`` coordinates of the block's cells.
    labels
        The colour column's values for the same cells (any type; shown as text), or None.
    first_cell
        Index of the block's first cell in the whole embedding.
    total
        Number of cells in the whole embedding. With it every block sends the cells whose index
        is a multiple of ``ceil(total / max_points)``: at most ``max_points`` points per run, an
        even sample whatever the chunking. Without it the block alone is subsampled.
    colors
        Hex colours per cell (the data's own, like ``subclass_color``); by default the page
        gives each label a colour in the order labels arrive.
    max_points
        Points per run at most.

    Returns
    -------
    int
        The number of points sent; 0 outside a Dask worker, where nothing is sent.

    Notes
    -----
    One small event (about 30 bytes per point) goes to the scheduler under
    :data:`POINTS_TOPIC`. Non-finite coordinates are left out.

    Examples
    --------
    >>> send_points("embed", 3, coords, labels, first_cell=3 * 4096, total=76_533)  # doctest: +SKIP
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 0
    coords = np.asarray(xy)
    n = coords.shape[0]
    total = n if total is None else int(total)
    stride = max(1, math.ceil(total / max(int(max_points), 1)))
    rows = np.arange((-int(first_cell)) % stride, n, stride)
    points = coords[rows, :2].astype(np.float64)
    finite = np.isfinite(points).all(axis=1)
    rows, points = rows[finite], points[finite]
    message: dict[str, Any] = {
        "stage": str(stage),
        "block": int(block),
        "total": total,
        "stride": stride,
        "x": points[:, 0].tolist(),
        "y": points[:, 1].tolist(),
    }
    if labels is not None:
        message["label"] = [_label_text(value) for value in np.asarray(labels, object)[rows]]
    if colors is not None:
        message["color"] = [str(value) for value in np.asarray(colors, object)[rows]]
    worker.log_event(POINTS_TOPIC, message)
    return len(rows)


def _label_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)

"""What the scheduler keeps: per stage the running count of distumap's progress events, the
UMAP fit's state from the scheduler's task transitions, and a bounded sample of the embedding's
points, by the counting rules that :mod:`distumap.dashboard` states.

No Bokeh, no HTTP: the scheduler plugin and the pages build on it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from distumap._palette import MISSING_COLOR, MISSING_LABEL, palette
from distumap._progress import POINTS_TOPIC, STAGES, TOPIC

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
    "h5ad-graph-index",
    "h5ad-graph-block",
    "anndata-zarr-graph-index",
    "anndata-zarr-graph-block",
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
    "export": ("loom-block", "loom-graph-block", "h5ad-block", "h5ad-graph", "anndata-zarr"),
}
_WATCHED = (FIT_PREFIX, *(prefix for prefixes in STAGE_TASKS.values() for prefix in prefixes))

#: stages whose number is a result, not progress towards a total
RESULT_STAGES = frozenset({"preprocess"})

#: the scheduler plugin's name (one per scheduler)
PLUGIN_NAME = "distumap-dashboard"

#: the scheduler task states shown per prefix (the JSON adds a cumulative "finished")
TASK_STATES = ("waiting", "queued", "no-worker", "processing", "memory", "erred")

#: rates are measured over the events of the last this many seconds
_RATE_WINDOW = 60.0


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


class ProgressState:
    """The running sums of one scheduler's distumap events, and the numbers the page shows.

    Notes
    -----
    :meth:`catch_up` replays the events the scheduler still holds for both topics, then
    ``log_event`` keeps counting, so the sums are exact even after the event log has dropped
    old entries. The fit's state comes from ``transition`` (task keys starting with
    :data:`FIT_PREFIX`). Everything kept is small: a few numbers per stage and block, and at
    most :data:`~distumap._progress.MAX_POINTS` points per run.
    """

    def __init__(self) -> None:
        self.stages: dict[str, _StageProgress] = {}
        self.points: dict[str, _Points] = {}
        self.fit: dict[str, Any] = {}
        self.first_task: dict[str, float] = {}
        self.scheduler = None

    def catch_up(self, scheduler) -> None:
        """Attach to ``scheduler`` and count what it still holds: the events of both topics
        (installing the page late loses nothing that the scheduler's bounded event log kept)
        and a fit already under way."""
        self.scheduler = scheduler
        for timestamp, msg in scheduler.get_events(TOPIC):
            self._count(msg, timestamp)
        for timestamp, msg in scheduler.get_events(POINTS_TOPIC):
            self._add_points(msg, timestamp)
        for key, task in getattr(scheduler, "tasks", {}).items():
            if _is_fit(key) and task.state in ("processing", "memory", "erred"):
                # already under way or done when the page came: the start time is unknown
                self._fit_transition(key, task.state, None)

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


def state_of(scheduler) -> ProgressState:
    """The progress kept by ``scheduler``'s plugin; empty when it has none. Looked up per
    request, so a replaced plugin is the one that answers."""
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    return plugin if plugin is not None else ProgressState()

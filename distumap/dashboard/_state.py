"""What the scheduler keeps: per stage and per step the running count of distumap's progress
events, the UMAP fit's state and the steps counted by their tasks from the scheduler's task
transitions, and a bounded sample of the embedding's points, by the counting rules that
:mod:`distumap.dashboard` states.

No Bokeh, no HTTP: the scheduler plugin and the pages build on it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from dask.utils import key_split

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
    "read-obsm-block",
    "gene-stats",
    "select-genes",
    "pca-all-gram",
    "umap-fit",
    "umap-transform",
    "umap-refine-knn",
    "umap-refine-graph",
    "umap-refine-epoch",
    "loom-block",
    "loom-graph-block",
    "h5ad-deflate",
    "h5ad-graph-edges",
    "h5ad-graph-block",
    "anndata-zarr-graph-edges",
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
        "read-obsm",  # --use-rep: the representation's blocks
    ),
    "preprocess": ("gene-stats", "select-genes"),
    "embed": ("umap-transform", "umap-refine"),
    "export": ("loom-block", "loom-graph-block", "h5ad-block", "h5ad-graph", "anndata-zarr"),
}


@dataclass(frozen=True)
class Step:
    """One row of the page: a stage, or a step of one (``stage`` names it).

    ``key`` is what progress events name it by (their ``step``, else their ``stage``);
    ``unit`` what its numbers count; ``optional`` steps are listed once they have begun (the
    PCA of all cells runs only when asked); the first task whose key starts with one of
    ``tasks`` starts its clock, and a step ``counted`` by its tasks (no events) is as far as
    those of its latest task group that finished. ``kind``: ``"progress"``, ``"result"`` (a
    number, not a fraction) or ``"task"`` (the UMAP fit: one task, its state).
    """

    key: str
    name: str
    unit: str
    stage: str | None = None
    optional: bool = False
    tasks: tuple[str, ...] = ()
    counted: bool = False
    kind: str = "progress"


#: the page's rows in the order a run executes them (``distumap run``'s exports write their
#: count blocks beside the embed, and add the graph and the embedding after it)
STEPS: tuple[Step, ...] = (
    Step("ingest", "ingest", STAGES["ingest"], tasks=STAGE_TASKS["ingest"]),
    Step("ingest_genes", "gene blocks read", "genes", "ingest", optional=True),
    Step("sort-csc", "CSC entries sorted by cell", "entries", "ingest", optional=True),
    Step("preprocess", "preprocess", STAGES["preprocess"], kind="result", tasks=("gene-stats",)),
    Step("select", "selected genes copied", "cells", "preprocess", True, ("select-genes",)),
    Step("embed", "embed", STAGES["embed"]),
    Step("pca", "PCA of all cells", "blocks", "embed", True, ("pca-all-gram",), True),
    Step("fit", "UMAP fit", "steps", "embed", tasks=(FIT_PREFIX,), kind="task"),
    Step("transform", "transform", "cells", "embed", tasks=("umap-transform",)),
    Step("graph", "graph of all cells", "cells", "embed", True, ("umap-refine-knn",)),
    Step("union", "graph made symmetric", "cells", "embed", True, ("umap-refine-graph",)),
    Step("refine", "refinement", "epochs", "embed", True, ("umap-refine-epoch",)),
    Step("export", "export", STAGES["export"]),
    Step("h5ad-graph", "graph to h5ad", "blocks", "export", True, ("h5ad-graph",)),
    Step(
        "anndata-zarr-graph",
        "graph to AnnData zarr",
        "blocks",
        "export",
        True,
        ("anndata-zarr-graph",),
    ),
    Step("loom", "loom", "blocks", "export", True, ("loom-block", "loom-graph-block")),
    Step("h5ad", "h5ad", "blocks", "export", True, ("h5ad-block", "h5ad-deflate")),
    Step(
        "anndata-zarr",
        "AnnData zarr",
        "blocks",
        "export",
        True,
        ("anndata-zarr-block", "anndata-zarr-edge", "anndata-zarr-done"),
    ),
    Step("pictures", "pictures", "pictures", optional=True),
)
STEP_BY_KEY = {step.key: step for step in STEPS}

#: (task key prefix, step), longest prefix first: ``h5ad-graph`` before ``h5ad``
_TASK_STEPS = sorted(
    ((prefix, step) for step in STEPS for prefix in step.tasks),
    key=lambda item: -len(item[0]),
)
_WATCHED = tuple(prefix for prefix, _ in _TASK_STEPS)

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

    __slots__ = ("blocks", "loose", "per_unit", "samples", "started", "total", "updated")

    def __init__(self, total: int, per_unit: int = 1) -> None:
        self.total = total
        self.per_unit = max(int(per_unit), 1)  # counted things per unit shown (cells/epoch)
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


class _Status:
    """What :func:`distumap._progress.report_status` last said of a stage or a step."""

    __slots__ = ("ended", "started", "state")

    def __init__(self, state: str, started: float | None, ended: float | None = None) -> None:
        self.state, self.started, self.ended = state, started, ended


class _TaskGroup:
    """The tasks of one group (one key name, one run) of a step counted by its tasks."""

    __slots__ = ("name", "seen")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[Any] = set()


_STATUS_STATES = {"started": "running", "complete": "done", "failed": "failed"}


class ProgressState:
    """The running sums of one scheduler's distumap events, and the numbers the page shows.

    Notes
    -----
    :meth:`catch_up` replays the events the scheduler still holds for both topics, then
    ``log_event`` keeps counting, so the sums are exact even after the event log has dropped
    old entries. The fit's state, the steps' first tasks and the steps counted by their tasks
    come from ``transition``. Everything kept is small: a few numbers per step and block (a
    task key per block of a step counted by its tasks), and at most
    :data:`~distumap._progress.MAX_POINTS` points per run.
    """

    def __init__(self) -> None:
        self.stages: dict[str, _StageProgress] = {}
        self.status: dict[str, _Status] = {}
        self.points: dict[str, _Points] = {}
        self.fit: dict[str, Any] = {}
        self.first_task: dict[str, float] = {}
        self.task_groups: dict[str, _TaskGroup] = {}
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
            return
        prefix, step = next(item for item in _TASK_STEPS if name.startswith(item[0]))
        if step.counted:
            # its tasks alone (pca-all-gram-<token>), not those of the sums that follow them
            if key_split(name) == prefix:
                self._task_transition(step.key, key, name, finish, time.time())
        elif finish == "processing":
            progress = self.stages.get(step.key)
            idle = progress is None or (progress.total and progress.done >= progress.total)
            if idle and step.key not in self.first_task:
                self.first_task[step.key] = time.time()  # a new run of the step begins

    def _task_transition(self, step: str, key, name: str, finish: str, now: float) -> None:
        """A step counted by its tasks: those of its latest group that the scheduler has seen
        are the total, those that finished the progress."""
        group = self.task_groups.get(step)
        if group is None or group.name != name:
            if finish not in ("waiting", "queued", "no-worker", "processing"):
                return  # the end of a group that the page did not see begin
            group = self.task_groups[step] = _TaskGroup(name)
            self.stages[step] = _StageProgress(0)
            self.status.pop(step, None)
        progress = self.stages[step]
        if finish in ("waiting", "queued", "no-worker", "processing", "memory"):
            group.seen.add(key)
            progress.total = len(group.seen)
        if finish == "processing" and progress.started is None:
            progress.started = now
        elif finish == "memory":
            progress.blocks[key] = 1
            progress.record(now)
        elif finish == "erred":
            self.status[step] = _Status("failed", progress.started, now)

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
            key = str(msg.get("step") or stage)
            status = msg.get("status")
            if status is not None:
                self._status(stage, key, str(status), timestamp)
                return
            done = int(msg["done"])
            total = int(msg["total"])
            per_unit = int(msg.get("per_unit") or 1)
        except (TypeError, KeyError, ValueError, AttributeError):
            return  # not ours to judge; a malformed event must not break the scheduler
        progress = self.stages.get(key)
        if progress is None or progress.total != total:
            previous = progress.updated if progress is not None else 0.0
            progress = self.stages[key] = _StageProgress(total, per_unit)
            first_task = self.first_task.get(key)
            begun = self.status.get(key)
            if first_task is not None and previous <= first_task <= timestamp:
                progress.started = first_task
            elif begun is not None and begun.started is not None and begun.ended is None:
                progress.started = begun.started
        self.first_task.pop(key, None)
        block = msg.get("block")
        if block is not None:
            # one step may take markers of two arrays (the refinement's last epoch writes the
            # stage's own): a block is a block of its markers
            progress.blocks[(stage, block)] = done
        elif key in RESULT_STAGES:
            progress.loose = done  # a result: the latest value, not a sum
        else:
            progress.loose += done
        progress.record(timestamp)

    def _status(self, stage: str, key: str, status: str, timestamp: float) -> None:
        state = _STATUS_STATES.get(status)
        if state is None:
            return
        if status == "started":
            # a new run of a stage: its rows start again (a resumed run does not start)
            for forget in [key, *(s.key for s in STEPS if key == stage and s.stage == stage)]:
                for kept in (self.stages, self.status, self.first_task, self.task_groups):
                    kept.pop(forget, None)
                if forget == FIT_STAGE:
                    self.fit = {}
            self.status[key] = _Status(state, timestamp)
            return
        begun = self.status.get(key)
        started = begun.started if begun is not None else None
        self.status[key] = _Status(state, started, timestamp)

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
        """The page's numbers: per stage and step in the order a run executes them (optional
        steps once begun, then any other stage events named), the fit, the points, task counts
        by prefix."""
        now = time.time() if now is None else now
        fit = self._fit_numbers(now)
        stages: dict[str, dict[str, Any]] = {}
        for step in STEPS:
            if step.optional and not self._begun(step.key):
                continue
            stages[step.key] = self._step_numbers(step, fit, now)
        known = set(STEP_BY_KEY) | {FIT_STAGE}
        for key in sorted(set(self.stages) - known):
            stages[key] = self._step_numbers(Step(key, key, "units"), fit, now)
        for key, numbers in stages.items():
            children = [child for child in stages.values() if child["stage"] == key]
            if children:
                _gather(numbers, children)
        latest = self.latest_points()
        points = None
        if latest is not None:
            stage, kept = latest
            points = {"stage": stage, "count": kept.count, "total": kept.total}
            points["stride"] = kept.stride
        return {
            "stages": stages,
            "fit": fit,
            "points": points,
            "tasks": self._task_counts(),
        }

    def _begun(self, key: str) -> bool:
        return key in self.stages or key in self.status or key in self.first_task

    def _step_numbers(self, step: Step, fit: dict[str, Any], now: float) -> dict[str, Any]:
        numbers = {"name": step.name, "stage": step.stage}
        if step.kind == "task":  # the fit: its task's state
            state = {"running": "running", "done": "done", "failed": "failed"}
            numbers.update(_stage_numbers(step, None, now))
            numbers["state"] = state.get(fit["state"], "idle")
            numbers["started"] = fit["started"]
            numbers["updated"] = fit["finished"]
            numbers["complete"] = fit["state"] == "done"
            return numbers
        progress = self.stages.get(step.key)
        numbers.update(_stage_numbers(step, progress, now))
        status = self.status.get(step.key)
        if status is not None and status.state in ("running", "failed"):
            numbers["state"] = status.state
        elif status is not None and status.state == "done":
            numbers["state"] = "done"
        elif numbers["complete"]:
            numbers["state"] = "done"
        elif numbers["total"] or step.key in self.first_task:
            numbers["state"] = "running"
        else:
            numbers["state"] = "idle"
        if numbers["started"] is None:
            if status is not None and status.started is not None:
                numbers["started"] = status.started
            else:
                numbers["started"] = self.first_task.get(step.key)
        if status is not None and status.ended is not None:
            numbers["updated"] = max(numbers["updated"] or 0.0, status.ended)
        return numbers

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
            last = max(b for _, b in steps.blocks if isinstance(b, int))
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


def _gather(parent: dict[str, Any], children: list[dict[str, Any]]) -> None:
    """A stage with steps: running while any step runs (the embed runs while its refinement
    does), ``current`` the step that began last of those running, its time from its first
    step's start to its last step's end."""
    running = [child for child in children if child["state"] == "running"]
    states = {child["state"] for child in children}
    if parent["state"] == "failed" or "failed" in states:
        parent["state"] = "failed"
    elif running:
        parent["state"] = "running"
    elif parent["state"] == "idle" and states == {"done"}:
        parent["state"] = "done"  # no word of its own (the exports): its steps say
    elif parent["state"] == "idle" and "done" in states:
        parent["state"] = "running"  # between two steps
    current = max(running, key=lambda child: child["started"] or 0.0, default=None)
    parent["current"] = current["name"] if current is not None else None
    if current is not None and parent["seconds_left"] is None:
        parent["seconds_left"] = current["seconds_left"]
    starts = [t for t in (parent["started"], *(c["started"] for c in children)) if t is not None]
    ends = [t for t in (parent["updated"], *(c["updated"] for c in children)) if t is not None]
    parent["started"] = min(starts, default=None)
    parent["updated"] = max(ends, default=None)


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


def _stage_numbers(step: Step, progress: _StageProgress | None, now: float) -> dict[str, Any]:
    done = progress.done if progress else 0
    total = progress.total if progress else 0
    result = step.kind == "result"
    complete = bool(total) and done >= total
    rate = progress.rate() if progress else None
    seconds_left = None
    if rate and not complete and not result:
        seconds_left = max((total - done) / rate - max(now - progress.updated, 0.0), 0.0)
    return {
        "unit": step.unit,
        "kind": step.kind,
        "done": done,
        "total": total,
        "per_unit": progress.per_unit if progress else 1,
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

"""The embed's refinement, on the cluster: every cell moves with UMAP's SGD over its nearest cells.

After the transform, ``refine_epochs`` epochs of UMAP's SGD over the kNN graph of all cells
(:mod:`distumap.tl._refine`, the kernels) run as steps of the embed stage, each a set of tasks
over contiguous cell ranges (a few store chunks each): ``umap-refine-knn`` tasks find their
cells' nearest cells (written as the store's ``knn_cell``, ``knn_distance`` and
``knn_cell_weight``: a result), in passes over ranges of buckets when the cells' features are
many (each worker reads a pass's buckets' features once; the tasks keep the best so far in
working arrays); ``umap-refine-graph`` tasks write their cells' rows of the symmetrised graph
(each reads every cell's kNN rows a block at a time and keeps the edges into its cells); then
each epoch's ``umap-refine-epoch`` tasks read every cell's position after the previous epoch and
their own cells' rows of the graph, and write their cells' new positions. What every task of a
step reads (a pass's features, the positions) is read once per worker process; nothing of the
graph is held whole. The working arrays live beside the stage's markers (``_progress/refine-*``,
hidden from xarray); the last epoch writes ``X_umap``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import zarr

from distumap import _progress
from distumap._compute import on_workers_later, trim_memory
from distumap._format import CELL_GRAPH, PROGRESS_GROUP
from distumap._memory import search_passes
from distumap._stage import Stage, StagePass
from distumap._store import (
    progress_array,
)
from distumap._workers import WorkerCache
from distumap.tl import _model_io, _refine, _union

logger = logging.getLogger(__name__)


#: the refinement's working arrays: name -> (trailing shape, dtype, writer); "features" is as
#: wide as the kNN features, "weight" as the graph's rows. Each is chunked as its writer's
#: tasks cover cells (a store chunk for the transform, a refinement task's cells for the
#: refinement), so that no two tasks share a chunk and a whole array is read in a few large
#: chunks.
_SCRATCH = {
    "features": (None, "f4", "transform"),  # every cell's kNN features
    "home": ((), "i4", "transform"),  # each cell's bucket: its nearest landmark (or itself)
    "start": ((2,), "f4", "transform"),  # the transform's coordinates, where epoch 0 starts
    "xy-0": ((2,), "f4", "refine"),  # the positions after even epochs
    "xy-1": ((2,), "f4", "refine"),  # ... and after odd ones
    "weight": ("k", "f4", "refine"),  # the out-edges' weights in the symmetrised graph
    "lone": ((), "i4", "refine"),  # each cell's in-edges that it does not list itself
    # the nearest cells found by a search's passes so far (after even and odd passes)
    "best-cell-0": ("k", "i4", "refine"),
    "best-cell-1": ("k", "i4", "refine"),
    "best-sqdist-0": ("k", "f8", "refine"),  # squared, as the search ranks them: the same bits
    "best-sqdist-1": ("k", "f8", "refine"),
}
#: a graph task's lone in-edges, ascending cell then source: refine-lone-{source,weight}-<first>,
#: in chunks of LONE_CHUNK edges (an epoch task reads its cells' stretch)
_LONE = ("source", "weight")
#: the working arrays that hold the graph's rows
_GRAPH_ROWS = ("weight", "lone")
LONE_CHUNK = 65536

#: kNN rows a graph task reads at a time, looking for the edges into its cells
GRAPH_SCAN_CELLS = 131072
#: refinement tasks per graph task: each graph task reads every cell's kNN rows once, so that
#: fewer, larger ones read them less often (a graph task holds about 150 bytes per cell of its
#: own: ~40 MB for 8 tasks of 32,768 cells, whatever the store's size)
GRAPH_GROUP = 8


def _scratch_path(name: str) -> str:
    return f"{PROGRESS_GROUP}/refine-{name}"


def n_features(params: dict[str, Any], n_genes: int) -> int:
    """Width of the kNN features: ``pca`` components, or the selected genes themselves when
    there are not more of them (as :func:`distumap.tl._model.fit_landmark_model` decides)."""
    return params["pca"] if 0 < params["pca"] < n_genes else n_genes


def create_scratch(
    store: str,
    n_cells: int,
    chunk: int,
    chunks_per_task: int,
    n_features: int,
    n_neighbors: int = _refine.RefineSettings.n_neighbors,
) -> None:
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    progress = group.require_group(PROGRESS_GROUP)
    for name, (tail, dtype, writer) in _SCRATCH.items():
        tail = {None: (n_features,), "k": (n_neighbors,)}.get(tail, tail)
        rows = chunk * (chunks_per_task if writer == "refine" else 1)
        progress.create_array(
            f"refine-{name}",
            shape=(n_cells, *tail),
            chunks=(min(rows, max(n_cells, 1)), *tail),
            dtype=dtype,
            fill_value=0,
            # the graph's rows are read every epoch: stored as they are (random weights
            # compress little, and their decompression cost a fifth of an epoch)
            compressors=None if name in _GRAPH_ROWS else "auto",
            overwrite=True,
        )


def write_scratch(store: str, rows: slice, **arrays: np.ndarray) -> None:
    for name, value in arrays.items():
        zarr.open_array(store, path=_scratch_path(name), mode="r+")[rows] = value


def drop_scratch(store: str) -> None:
    """Remove the refinement's working arrays once the stage is complete (at a million cells
    about 0.35 GB of the store: every cell's features, positions and rows of the graph)."""
    progress = zarr.open_group(store, path=PROGRESS_GROUP, mode="r+", use_consolidated=False)
    for name in list(progress.array_keys()):
        if name.startswith("refine-"):
            del progress[name]


def _read_scratch(store: str, name: str) -> np.ndarray:
    return zarr.open_array(store, path=_scratch_path(name), mode="r")[...]


_SEARCH = WorkerCache(1)  # a search pass's buckets: their cells' features (kNN step)
_POSITIONS = WorkerCache(1)  # all positions after the previous epoch
_ROWS = WorkerCache(1)  # a refinement task's rows of the graph (the last epoch's tasks share them)


def clear_caches() -> None:
    for cache in (_SEARCH, _POSITIONS, _ROWS):
        cache.clear()
    trim_memory()


async def _clear_refine_caches_async() -> None:
    clear_caches()


def _search_index(store: str, n_landmarks: int, search_pass: int, passes: int):
    home = _read_scratch(store, "home")
    edges = _refine.pass_buckets(np.bincount(home, minlength=n_landmarks), passes)
    # the features in store chunks, the pass's buckets' placed in bucket order as read
    features = zarr.open_array(store, path=_scratch_path("features"), mode="r")
    buckets = (edges[search_pass], edges[search_pass + 1])
    return _refine.bucket_index(home, n_landmarks, features, buckets)


def _refine_knn_task(
    first: int,
    last: int,
    landmark_cells: np.ndarray,
    *,
    store: str,
    token: str,
    run: str,
    settings: dict[str, Any],
    search_pass: int = 0,
    passes: int = 1,
) -> int:
    """The nearest cells of one block's cells among the candidates in one pass's buckets, and
    after the last pass their membership weights."""
    model = _model_io.load_fitted(store, token)
    index = _SEARCH.get(
        (store, token, run, search_pass),
        lambda: _search_index(store, model.n_landmarks, search_pass, passes),
    )
    rows = slice(first, last)
    cells = np.arange(first, last)
    features = _read_rows(store, _scratch_path("features"), rows)
    home = _read_rows(store, _scratch_path("home"), rows)
    nearest = np.searchsorted(landmark_cells, _read_rows(store, "knn_landmark", rows))
    settings = _refine.RefineSettings(**settings)
    best = None
    if search_pass:  # the previous pass's, kept apart from this one's (a task may run twice)
        best = tuple(
            _read_rows(store, _scratch_path(f"best-{part}-{(search_pass - 1) % 2}"), rows)
            for part in ("cell", "sqdist")
        )
    if search_pass < passes - 1:
        neighbors, sqdistances, _ = _refine.knn_pass(
            index,
            cells,
            features,
            _refine.candidate_landmarks(home, nearest),
            k=settings.n_neighbors,
            max_candidates=settings.max_candidates,
            bucket_cap=settings.bucket_cap,
            best=best,
        )
        parity = search_pass % 2
        found = {f"best-cell-{parity}": neighbors.astype(np.int32)}
        write_scratch(store, rows, **found, **{f"best-sqdist-{parity}": sqdistances})
        return last - first
    neighbors, weights, _, distances = _refine.nearest_cells(
        index,
        cells,
        features,
        home,
        nearest,
        mean_distance=model.mean_distance_reference,
        settings=settings,
        return_distances=True,
        best=best,
    )
    # the task's cells are whole store chunks: no chunk of these has another writer
    for name, values in zip(CELL_GRAPH, (neighbors, distances, weights), strict=True):
        zarr.open_array(store, path=name, mode="r+")[rows] = values
    return last - first


def _read_rows(store: str, path: str, rows: slice) -> np.ndarray:
    return zarr.open_array(store, path=path, mode="r")[rows]


def _lone_path(first: int, part: str) -> str:
    return _scratch_path(f"lone-{part}-{first}")


def _refine_graph_task(first: int, last: int, *, store: str, token: str, run: str) -> int:
    """The symmetrised graph's rows of cells ``first:last`` (a few refinement tasks' cells):
    their out-edges, the edges' weights and the in-edges they do not list, found among every
    cell's kNN rows."""
    _SEARCH.clear()  # the kNN step is over: its features need not stay in memory
    neighbors = zarr.open_array(store, path=CELL_GRAPH[0], mode="r")
    weights = zarr.open_array(store, path=CELL_GRAPH[2], mode="r")
    n_cells = neighbors.shape[0]
    chunk = int(neighbors.chunks[0])
    step = max(1, GRAPH_SCAN_CELLS // chunk) * chunk  # whole store chunks
    edges = [
        _union.in_edges(neighbors[at : at + step], weights[at : at + step], at, first, last)
        for at in range(0, n_cells, step)
    ]
    graph = _union.graph_part(neighbors[first:last], weights[first:last], first, edges)
    del edges
    progress = zarr.open_group(store, path=PROGRESS_GROUP, mode="r+", use_consolidated=False)
    for part, values in zip(_LONE, (graph.in_source, graph.in_weight), strict=True):
        progress.create_array(
            f"refine-lone-{part}-{first}",
            shape=values.shape,
            chunks=(max(min(values.size, LONE_CHUNK), 1),),
            dtype=values.dtype,
            compressors=None,  # as the graph's other rows
            overwrite=True,
        )[...] = values
    write_scratch(
        store,
        slice(first, last),
        weight=graph.out_weight,
        lone=np.diff(graph.in_start).astype(np.int32),
    )
    return last - first


def _graph_rows(store: str, first: int, last: int, task_first: int) -> _union.Graph:
    """Cells ``first:last``'s rows of the symmetrised graph, which the graph task of the cells
    from ``task_first`` wrote."""
    lone = _read_rows(store, _scratch_path("lone"), slice(task_first, last)).astype(np.int64)
    skip = int(lone[: first - task_first].sum())
    in_start = np.zeros(last - first + 1, dtype=np.int64)
    np.cumsum(lone[first - task_first :], out=in_start[1:])
    lo, hi = skip, skip + int(in_start[-1])
    return _union.Graph(
        _read_rows(store, CELL_GRAPH[0], slice(first, last)),
        _read_rows(store, _scratch_path("weight"), slice(first, last)),
        in_start,
        *(_read_rows(store, _lone_path(task_first, part), slice(lo, hi)) for part in _LONE),
        first=first,
    )


def _positions_after(store: str, epoch: int) -> str:
    """Where the positions after ``epoch`` live (-1: the transform's)."""
    return _scratch_path("start" if epoch < 0 else f"xy-{epoch % 2}")


def _refine_epoch_task(
    first: int,
    last: int,
    landmark_rows: np.ndarray,
    *,
    store: str,
    token: str,
    run: str,
    epoch: int,
    settings: dict[str, Any],
    n_cells: int,
    rows: tuple[int, int, int],
    color: str | None = None,
) -> int:
    """One epoch for cells ``first:last``: new positions from every cell's previous ones and
    their rows of the graph, read with those of the refinement task that holds them: ``rows``
    is that task's first and last cell and the first cell of the graph task that wrote them.
    The last epoch writes ``X_umap`` (one store chunk a task) and sends its points to the
    page."""
    _SEARCH.clear()  # on a worker that ran no graph task, the kNN step's features are still held
    model = _model_io.load_fitted(store, token)
    task_first, task_last, graph_first = rows
    if (first, last) == (task_first, task_last):  # a task's own rows: read once an epoch
        graph = _graph_rows(store, first, last, graph_first)
    else:  # the last epoch: a store chunk of a task whose rows this worker may hold
        graph = _ROWS.get(
            (store, token, run, task_first),
            lambda: _graph_rows(store, task_first, task_last, graph_first),
        )
    source = _positions_after(store, epoch - 1)
    positions = _POSITIONS.get(
        (store, token, run, epoch),
        lambda: zarr.open_array(store, path=source, mode="r")[...],
    )
    frozen = np.zeros(last - first, dtype=bool)
    if not settings["move_landmarks"]:
        frozen[landmark_rows - first] = True
    coords = _refine.epoch(
        positions,
        np.arange(first, last),
        graph,
        frozen,
        epoch=epoch,
        n_epochs=settings["n_epochs"],
        a=model.a,
        b=model.b,
        gamma=model.repulsion_strength,
        initial_alpha=settings["initial_alpha"],
        negative_sample_rate=model.negative_sample_rate,
        seed=model.seed,
    )
    if epoch < settings["n_epochs"] - 1:
        zarr.open_array(store, path=_positions_after(store, epoch), mode="r+")[first:last] = coords
        return last - first
    zarr.open_array(store, path="X_umap", mode="r+")[first:last] = coords
    labels = None if color is None else zarr.open_array(store, path=color, mode="r")[first:last]
    _progress.send_points("embed", first, coords, labels, first_cell=first, total=n_cells)
    return last - first


#: the markers of the embed stage's steps before the last one when it refines (the transform,
#: the nearest cells, the graph, every epoch but the last), one after the other:
#: ``_progress/embed`` keeps vouching for ``X_umap``, which only the last epoch writes
REFINE_MARKERS = "embed-refine"


class Steps(StagePass):
    """One step of the embed stage (the transform, the nearest cells, the graph or an epoch) as
    a pass of the stage: ``count`` tasks, whose markers are
    ``_progress/embed-refine[first:first + count]`` (one array for every step; each step's
    progress events name the step, which the dashboard shows on a row of its own)."""

    def __init__(self, stage: Stage, first: int, count: int):
        super().__init__(stage, REFINE_MARKERS)
        self.blocks = range(first, first + count)

    def pending(self) -> list[int]:
        # this step's markers only: reading every step's would cost more than a step
        start, stop = self.blocks.start, self.blocks.stop
        done = progress_array(self.store, self.markers, mode="r")[start:stop]
        return [start + int(block) for block in np.flatnonzero(~done)]


#: cells per refinement task, about: an epoch is cheap per cell, so each task takes
#: several store chunks, or the per-task cost (markers, opening arrays) would outweigh it
REFINE_TASK_CELLS = 32768


def refine_epochs(params: dict[str, Any], is_landmark: np.ndarray) -> int:
    """The epochs to run: none when every cell is a landmark (umap-learn's fit is the result)."""
    return params["refine_epochs"] if not is_landmark.all() else 0


def _chunks_per_task(chunk_cells: int) -> int:
    return max(1, REFINE_TASK_CELLS // max(chunk_cells, 1))


def refine_layout(
    n_chunks: int, chunk_cells: int, epochs: int, n_cells: int, n_features: int
) -> dict[str, int]:
    """How many store chunks one refinement task covers (the last epoch's tasks take one each,
    as they write ``X_umap``), how many tasks one graph task covers (:data:`GRAPH_GROUP`), in
    how many passes the nearest cells are searched (:func:`distumap._memory.search_passes`),
    and how many markers :data:`REFINE_MARKERS` holds: one per store chunk for the transform,
    one per task for each pass of the nearest cells, one per graph task, one per task for each
    earlier epoch."""
    per_task = _chunks_per_task(chunk_cells)
    n_tasks = -(-n_chunks // per_task)
    passes = search_passes(n_cells, n_features)
    return {
        "refine_chunks_per_task": per_task,
        "refine_graph_group": GRAPH_GROUP,
        "refine_knn_passes": passes,
        "refine_markers": n_chunks + (passes + epochs - 1) * n_tasks + -(-n_tasks // GRAPH_GROUP),
    }


def resumable(store: str, record: dict[str, Any]) -> bool:
    """Whether a started embed's refinement can go on: its markers follow this version's steps
    (a refinement started before the graph had a step of its own numbered them differently)
    and its working arrays are there (they go when the stage completes)."""
    if "refine_chunks_per_task" not in record:  # no refinement
        return True
    if "refine_graph_group" not in record:
        return False
    group = zarr.open_group(store, path=PROGRESS_GROUP, mode="r", use_consolidated=False)
    return "refine-start" in group.array_keys()


def refine(
    stage: Stage,
    params: dict[str, Any],
    bounds: np.ndarray,
    rows: np.ndarray,
    landmark_cells: Any,
    *,
    token: str,
    color: str | None,
) -> dict[str, float]:
    """Run the refinement's steps that are not done yet, in order; return their timings."""
    n_epochs = params["refine_epochs"]
    settings = dataclasses.asdict(dataclasses.replace(_refine.RefineSettings(), n_epochs=n_epochs))
    n_chunks, n_cells = len(bounds) - 1, int(bounds[-1])
    # the run that started the stage chose the tasks' extent: a resumed run keeps it
    per_task = stage.record.get("refine_chunks_per_task")
    if per_task is None:  # a record without it: the layout the markers were made with
        per_task = _chunks_per_task(int(bounds[1] - bounds[0]))
    passes = stage.record.get("refine_knn_passes", 1)  # one before the search had passes
    edges = np.append(bounds[:-1:per_task], bounds[-1])
    n_tasks = len(edges) - 1
    graph_edges = np.append(
        edges[: -1 : stage.record.get("refine_graph_group", GRAPH_GROUP)], edges[-1]
    )
    n_graph = len(graph_edges) - 1
    common = {"store": stage.store, "token": token, "run": stage.record.get("run", "")}
    # the dashboard shows the graph of all cells in cells, the epochs in epochs (of n_cells)
    epochs = {"step": "refine", "total": n_cells * n_epochs, "per_unit": n_cells}

    task_edges = edges

    def calls(
        step: Stage, edges: np.ndarray, graph: bool = False, **extra: Any
    ) -> dict[int, tuple]:
        todo = {}
        for block in step.pending():
            task = block - (step.blocks.start if isinstance(step, Steps) else 0)
            first, last = int(edges[task]), int(edges[task + 1])
            if "epoch" in extra:  # an epoch needs the task's landmarks (to hold them, maybe)
                lo, hi = np.searchsorted(rows, [first, last])
                args = (first, last, rows[lo:hi])
                # and the refinement task and graph task that hold its rows of the graph
                at = np.searchsorted(task_edges, first, side="right") - 1
                owner = graph_edges[np.searchsorted(graph_edges, first, side="right") - 1]
                held = (int(task_edges[at]), int(task_edges[at + 1]), int(owner))
                todo[block] = (args, {**common, "settings": settings, **extra, "rows": held})
                continue
            if graph:
                todo[block] = ((first, last), common)
                continue
            # the kNN step maps landmark cells to landmark numbers: one shared key
            todo[block] = ((first, last, landmark_cells), {**common, "settings": settings, **extra})
        return todo

    seconds = {}
    try:
        started = time.perf_counter()
        for search_pass in range(passes):
            # each pass's progress counts toward one row of the dashboard, in cells
            step = Steps(stage, n_chunks + search_pass * n_tasks, n_tasks)
            step.run_blocks(
                _refine_knn_task,
                calls(step, edges, search_pass=search_pass, passes=passes),
                key="umap-refine-knn",
                label="embed: refine, nearest cells"
                + (f", pass {search_pass + 1}/{passes}" if passes > 1 else ""),
                total=n_cells * passes,
                step="graph",
                per_unit=passes,
            )
        seconds["refine_knn_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        step = Steps(stage, n_chunks + passes * n_tasks, n_graph)
        step.run_blocks(
            _refine_graph_task,
            calls(step, graph_edges, graph=True),
            key="umap-refine-graph",
            label="embed: refine, symmetrised graph",
            total=n_cells,
            step="union",
        )
        seconds["refine_graph_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        for epoch in range(n_epochs):
            label = f"embed: refine, epoch {epoch + 1}/{n_epochs}"
            extra = {"epoch": epoch, "n_cells": n_cells}
            if epoch < n_epochs - 1:
                step = Steps(stage, n_chunks + n_graph + (passes + epoch) * n_tasks, n_tasks)
                todo = calls(step, edges, **extra)
                step.run_blocks(
                    _refine_epoch_task,
                    todo,
                    key="umap-refine-epoch",
                    label=label,
                    **epochs,
                )
            else:  # the last: a task per store chunk writes X_umap and sets the stage's marker
                last_started = time.perf_counter()
                todo = calls(stage, bounds, **extra, color=color)
                stage.run_blocks(
                    _refine_epoch_task, todo, key="umap-refine-epoch", label=label, **epochs
                )
                seconds["refine_last_epoch_seconds"] = round(time.perf_counter() - last_started, 3)
        seconds["refine_epochs_seconds"] = round(time.perf_counter() - started, 3)
    finally:
        # the workers' copies of whole arrays (hundreds of MB at a million cells) go
        clear_caches()
        on_workers_later(_clear_refine_caches_async)
    return seconds

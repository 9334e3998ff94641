"""The graph of all cells in the AnnData exports, where scanpy keeps a neighbour graph:
``obsp["distances"]``, ``obsp["connectivities"]`` and ``uns["neighbors"]``.

One task (``<format>-graph-index``) builds the symmetrised graph of every cell from the store's
``knn_cell`` and ``knn_cell_weight``, on one worker, where it stays while one task per cell block
(``<format>-graph-block``) reads its rows of both matrices; the client appends them in cell order,
as it appends ``X``, and holds a few blocks of rows, never the graph (with a distributed client;
dask's local schedulers run in this process anyway).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from distumap._compute import results_in_order
from distumap._format import (
    ANNDATA_CONNECTIVITIES,
    ANNDATA_DISTANCES,
    ANNDATA_UNS_NEIGHBORS,
    CELL_GRAPH,
    stages,
)
from distumap._progress import report, report_status
from distumap.io.writers._anndata_elements import csr_group
from distumap.tl import cell_graph, connectivity_rows, distance_rows

#: the obsp matrices in the order a graph block gives their rows
GRAPH_MATRICES = (ANNDATA_DISTANCES, ANNDATA_CONNECTIVITIES)


def has_cell_graph(ds: xr.Dataset) -> bool:
    """Whether the store holds the refinement's graph of all cells."""
    return all(name in ds for name in CELL_GRAPH)


def neighbors_uns(ds: xr.Dataset) -> dict[str, Any]:
    """``{"neighbors": ...}`` as ``scanpy.pp.neighbors`` writes it to ``uns``, for the store's
    graph of all cells; empty without one.

    scanpy counts a cell among its own ``n_neighbors`` (its ``distances`` hold
    ``n_neighbors - 1`` per row), so the store's k nearest *other* cells are ``k + 1``.
    """
    if not has_cell_graph(ds):
        return {}
    embed = stages(ds).get("embed", {}).get("params", {}) or {}
    params: dict[str, Any] = {
        "n_neighbors": int(ds.sizes["cell_knn"]) + 1,
        "method": "umap",
        "metric": "euclidean",
    }
    if embed.get("seed") is not None:
        params["random_state"] = int(embed["seed"])
    if embed.get("use_rep"):  # as sc.pp.neighbors(use_rep=...) records the graph's features
        params["use_rep"] = str(embed["use_rep"])
    record = {
        "connectivities_key": ANNDATA_CONNECTIVITIES,
        "distances_key": ANNDATA_DISTANCES,
        "params": params,
    }
    return {ANNDATA_UNS_NEIGHBORS: record}


def report_no_graph(path: str, progress: bool) -> None:
    """The one line of an AnnData export of a store without the graph of all cells."""
    if progress:
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        print(
            f"distumap export: {name}: no neighbour graph (the embed ran without refinement): "
            "obsp and uns['neighbors'] left empty",
            file=sys.stderr,
            flush=True,
        )


def _index(neighbors: np.ndarray, distances: np.ndarray, weights: np.ndarray) -> tuple:
    return cell_graph(neighbors, weights), np.asarray(distances, dtype=np.float32)


def _graph_block(index: tuple, first: int, last: int, block: tuple[str, int, int]) -> tuple:
    """Rows ``first:last`` of ``distances`` and ``connectivities``, as two CSR row tuples;
    ``block`` (the graph's step, this block's number and their count) goes to the dashboard."""
    graph, distances = index
    rows = (
        tuple(distance_rows(graph.neighbors[first:last], distances[first:last])),
        tuple(connectivity_rows(graph, first, last)),
    )
    step, number, n_blocks = block
    report("export", 1, n_blocks, block=number, step=step)
    return rows


def _whole(ds: xr.Dataset, name: str) -> Any:
    values = ds[name].transpose("cell", "cell_knn").data
    return values if isinstance(values, da.Array) else np.asarray(values)


def graph_rows(
    ds: xr.Dataset, block_cells: int, prefix: str, *, in_flight: int, client
) -> Iterator[tuple]:
    """The rows of ``distances`` and ``connectivities`` (two CSR row tuples) of every block of
    ``block_cells`` cells, in cell order.

    With a distributed ``client`` the symmetrised graph is built once on a worker (task
    ``<prefix>-graph-index-<token>``) and held there while one task per block
    (``<prefix>-graph-block-<token>``) reads its rows, at most ``in_flight`` ahead; with
    dask's local schedulers, which run in this process anyway, it is built here.
    """
    arrays = [_whole(ds, name) for name in CELL_GRAPH]
    n_cells = ds.sizes["cell"]
    bounds = [
        (first, min(first + block_cells, n_cells)) for first in range(0, n_cells, block_cells)
    ]
    token = tokenize(*arrays, block_cells)
    step = f"{prefix}-graph"  # the dashboard's row of this graph, apart from its file's
    index = dask.delayed(_index, pure=True)(*arrays, dask_key_name=f"{step}-index-{token}")
    report_status("export", "started", step=step)
    if client is None:
        (held,) = dask.compute(index)
        for i, (first, last) in enumerate(bounds):
            yield _graph_block(held, first, last, (step, i, len(bounds)))
        report_status("export", "complete", step=step)
        return
    held = client.compute(index)  # kept on its worker until every block has its rows
    block = dask.delayed(_graph_block, pure=True)
    tasks = [
        block(held, first, last, (step, i, len(bounds)), dask_key_name=(f"{step}-block-{token}", i))
        for i, (first, last) in enumerate(bounds)
    ]
    try:
        yield from results_in_order(
            tasks, stage=f"export: {prefix} graph", in_flight=in_flight, client=client
        )
    except BaseException:
        report_status("export", "failed", step=step)
        raise
    finally:
        held.release()
    report_status("export", "complete", step=step)


def write_obsp(
    el,
    n_cells: int,
    max_per_row: int,
    results: Iterable[tuple],
    appendable: Callable[[Any, str, Any], Any],
) -> None:
    """``obsp["distances"]`` and ``obsp["connectivities"]`` from the graph blocks' rows, in
    cell order. ``max_per_row`` is the neighbours a cell lists (a row of the connectivities
    holds at most twice as many, on average). ``appendable(group, name, dtype)`` gives a 1-D
    array of the backend that takes values by ``append`` and is finished by ``close``."""
    obsp = el.root["obsp"]
    # indices and indptr of one dtype, as scipy makes them: scipy's sorting and arithmetic
    # refuse a matrix whose two differ (and these rows are not sorted by column)
    index_dtype = np.int32 if 2 * n_cells * max_per_row < 2**31 else np.int64
    parts = {}
    for key in GRAPH_MATRICES:
        group = csr_group(el, obsp, key, (n_cells, n_cells))
        parts[key] = [
            appendable(group, "data", np.float32),
            appendable(group, "indices", index_dtype),
            appendable(group, "indptr", index_dtype),
        ]
        parts[key][2].append(np.zeros(1, dtype=index_dtype))
    offsets = dict.fromkeys(GRAPH_MATRICES, 0)
    for rows in results:
        for key, (data, indices, row_nnz) in zip(GRAPH_MATRICES, rows, strict=True):
            values, columns, pointers = parts[key]
            values.append(data)
            columns.append(indices)
            ends = offsets[key] + np.cumsum(row_nnz, dtype=np.int64)
            pointers.append(ends)
            if ends.size:
                offsets[key] = int(ends[-1])
    for arrays in parts.values():
        for array in arrays:
            array.close()

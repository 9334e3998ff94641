"""The graph of all cells in the AnnData exports, where scanpy keeps a neighbour graph:
``obsp["distances"]``, ``obsp["connectivities"]`` and ``uns["neighbors"]``.

One task per block of :data:`GRAPH_BLOCK_CELLS` cells (``<format>-graph-block``) gives its rows
of both matrices from its cells' kNN rows and every edge into them, which
``<format>-graph-edges`` tasks find in every cell's rows, :data:`SCAN_CELLS` at a time; the
client appends the rows in cell order, as it appends ``X``. No process holds the graph of all
cells: a block's task holds its cells' edges, an edges task one piece of the kNN rows, the
client a few blocks of rows (with a distributed client; dask's local schedulers run in this
process anyway).
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
from distumap.io.writers._blocks import blocks_in_flight
from distumap.tl import distance_rows, in_edges, union_rows

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


#: cells per graph block (the export's own blocks, one store chunk by default, are too small:
#: every few blocks read every cell's kNN rows once)
GRAPH_BLOCK_CELLS = 32768
#: kNN rows per edges task
SCAN_CELLS = 262144


def _graph_block(
    neighbors: np.ndarray,
    distances: np.ndarray,
    weights: np.ndarray,
    first: int,
    n_cells: int,
    block: tuple[str, int, int],
    *edges: tuple,
) -> tuple:
    """Rows ``first:first + len(neighbors)`` of ``distances`` and ``connectivities``, as two CSR
    row tuples, from ``edges`` into these cells and the next ones; ``block`` (the graph's step,
    this block's number and their count) goes to the dashboard."""
    last = first + len(neighbors)
    into = []
    for targets, sources, values in edges:
        keep = (targets >= first) & (targets < last)
        into.append((targets[keep], sources[keep], values[keep]))
    rows = (
        tuple(distance_rows(neighbors, distances)),
        tuple(union_rows(neighbors, weights, first, n_cells, into)),
    )
    step, number, n_blocks = block
    report("export", 1, n_blocks, block=number, step=step)
    return rows


def _cell_rows(ds: xr.Dataset, name: str, rows: int) -> list:
    """``name`` (cells x cell_knn) as one piece per ``rows`` cells, delayed or numpy."""
    values = ds[name].transpose("cell", "cell_knn").data
    if not isinstance(values, da.Array):
        values = np.asarray(values)
        return [values[at : at + rows] for at in range(0, len(values), rows)]
    return list(values.rechunk({0: rows, 1: -1}).to_delayed()[:, 0])


def graph_rows(ds: xr.Dataset, prefix: str, *, client) -> Iterator[tuple]:
    """The rows of ``distances`` and ``connectivities`` (two CSR row tuples) of every block of
    :data:`GRAPH_BLOCK_CELLS` cells, in cell order (tasks ``<prefix>-graph-block-<token>``), a
    few blocks ahead of the caller. The blocks in flight together share the edges into their
    cells (tasks ``<prefix>-graph-edges-<token>``, one per :data:`SCAN_CELLS` kNN rows), so
    that every cell's rows are read once per that many blocks."""
    n_cells = ds.sizes["cell"]
    # a block's rows of both matrices: at most 3 edges per neighbour, 8 bytes each
    block_bytes = 24 * GRAPH_BLOCK_CELLS * int(ds.sizes["cell_knn"])
    in_flight = blocks_in_flight(client, block_bytes, 2**28)
    own = [_cell_rows(ds, name, GRAPH_BLOCK_CELLS) for name in CELL_GRAPH]
    scan = [_cell_rows(ds, CELL_GRAPH[i], SCAN_CELLS) for i in (0, 2)]
    token = tokenize(own, scan)
    step = f"{prefix}-graph"  # the dashboard's row of this graph, apart from its file's
    edges = dask.delayed(in_edges, pure=True)
    block = dask.delayed(_graph_block, pure=True)
    tasks = []
    group = GRAPH_BLOCK_CELLS * in_flight
    for i, first in enumerate(range(0, n_cells, GRAPH_BLOCK_CELLS)):
        if first % group == 0:  # the edges into this block and the next ones in flight
            into = [
                edges(
                    neighbors, weights, j * SCAN_CELLS, first, min(first + group, n_cells),
                    dask_key_name=(f"{step}-edges-{token}", first // group, j),
                )
                for j, (neighbors, weights) in enumerate(zip(*scan, strict=True))
            ]  # fmt: skip
        tasks.append(
            block(
                *(rows[i] for rows in own), first, n_cells, (step, i, len(own[0])), *into,
                dask_key_name=(f"{step}-block-{token}", i),
            )
        )  # fmt: skip
    report_status("export", "started", step=step)
    try:
        yield from results_in_order(
            tasks, stage=f"export: {prefix} graph", in_flight=in_flight, client=client
        )
    except BaseException:
        report_status("export", "failed", step=step)
        raise
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

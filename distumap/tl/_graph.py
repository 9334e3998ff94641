"""The refinement's graph of all cells, handed back as scanpy keeps a neighbour graph.

The embed stage's refinement (:mod:`distumap.tl._refine`) finds every cell's nearest other cells
and keeps them in the store: ``knn_cell``, ``knn_distance`` and ``knn_cell_weight`` (umap-learn's
membership weights of these directed edges). scanpy keeps a neighbour graph as two sparse
matrices, cells x cells: ``distances``, each cell's k nearest neighbours (the cell itself left
out, nearest first, as ``scanpy.pp.neighbors`` stores them) and ``connectivities``, umap-learn's
fuzzy union ``w + w.T - w * w.T`` of the membership weights, symmetric. The functions here build
them row block by row block, so that a writer streams them like any other matrix: a block's rows
of the union need its cells' edges and every edge into them (:func:`union_rows`, from the
refinement's own :func:`~distumap.tl._union.graph_part`), never the graph of all cells.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

from distumap._errors import IncompleteStoreError, InputError
from distumap._format import CELL_GRAPH
from distumap.tl._union import Graph, graph_part, symmetrize

__all__ = [
    "CsrRows",
    "cell_graph",
    "connectivity_rows",
    "distance_rows",
    "neighbor_graph",
    "union_rows",
]


class CsrRows(NamedTuple):
    """Consecutive rows of a CSR matrix: their values, column indices and nonzeros per row."""

    data: np.ndarray
    indices: np.ndarray
    row_nnz: np.ndarray


def cell_graph(neighbors: np.ndarray, weights: np.ndarray) -> Graph:
    """Every cell's edges of the symmetrised graph, from the store's directed one.

    Parameters
    ----------
    neighbors, weights
        ``knn_cell`` (int, cells x k; -1: none) and ``knn_cell_weight`` (float32) of every
        cell of the store, in cell order.

    Returns
    -------
    Graph
        umap-learn's fuzzy union of the edges (:func:`~distumap.tl._union.symmetrize`), the
        graph the refinement's epochs ran on.

    Raises
    ------
    InputError
        An edge points outside the cells given: they are not a whole store's cells in the
        store's order (``ds.isel(cell=...)`` keeps the store's cell numbers in the graph).

    Notes
    -----
    Computes, and holds the whole graph (about 24 bytes per edge).
    """
    neighbors = np.asarray(neighbors)
    _check_targets(neighbors, len(neighbors))
    return symmetrize(neighbors, np.asarray(weights))


def _check_targets(neighbors: np.ndarray, n_cells: int) -> None:
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n_cells):
        raise InputError(
            f"the graph of all cells points at cells beyond these {n_cells}: is this a subset of "
            f"a store's cells? Drop {', '.join(CELL_GRAPH)} to export it without the graph"
        )


def union_rows(
    neighbors: np.ndarray,
    weights: np.ndarray,
    first: int,
    n_cells: int,
    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> CsrRows:
    """Rows of scanpy's ``connectivities`` for consecutive cells, without the graph of all.

    Parameters
    ----------
    neighbors, weights
        ``knn_cell`` and ``knn_cell_weight`` of cells ``first:first + n`` (n x k).
    first
        The cell of row 0.
    n_cells
        The store's cells (an edge beyond them is refused, as :func:`cell_graph` refuses it).
    edges
        Every edge into these cells: :func:`~distumap.tl._union.in_edges` of every cell's
        rows, in cell order.

    Returns
    -------
    CsrRows
        The rows :func:`connectivity_rows` gives from the graph of all cells, the same bits.
    """
    neighbors = np.asarray(neighbors)
    _check_targets(neighbors, n_cells)
    graph = graph_part(neighbors, weights, first, edges)
    return connectivity_rows(graph, first, first + len(neighbors))


def distance_rows(neighbors: np.ndarray, distances: np.ndarray) -> CsrRows:
    """Rows of scanpy's ``distances``: each cell's nearest cells, nearest first.

    Parameters
    ----------
    neighbors, distances
        ``knn_cell`` and ``knn_distance`` of consecutive cells (cells x k).

    Returns
    -------
    CsrRows
        float32 distances, int32 columns, int64 nonzeros per row; an edge to -1 (fewer
        neighbours found) is left out. A zero distance (a duplicate cell) is kept as an
        explicit zero, as scanpy keeps it.
    """
    neighbors = np.asarray(neighbors)
    valid = neighbors >= 0
    return CsrRows(
        np.asarray(distances, dtype=np.float32)[valid],
        neighbors[valid].astype(np.int32),
        valid.sum(axis=1).astype(np.int64),
    )


def connectivity_rows(graph: Graph, first: int, last: int) -> CsrRows:
    """Rows ``first:last`` of scanpy's ``connectivities``: the symmetric fuzzy union.

    Parameters
    ----------
    graph
        Every cell's edges (:func:`cell_graph`), or those of consecutive cells that include
        these (:func:`~distumap.tl._union.graph_part`).
    first, last
        The rows (cells) to give.

    Returns
    -------
    CsrRows
        float32 weights and int32 columns, ascending within a row (canonical CSR), int64
        nonzeros per row. A row holds the cell's out-edges and the edges of cells that list it
        but that it does not list, so that the matrix is symmetric; zero weights are left out.
    """
    n = last - first
    first, last = first - graph.first, last - graph.first  # the graph's own rows
    neighbors = graph.neighbors[first:last]
    valid = neighbors >= 0
    starts = graph.in_start[first : last + 1]
    lo, hi = int(starts[0]), int(starts[-1])
    rows = np.concatenate(
        [np.repeat(np.arange(n), valid.sum(axis=1)), np.repeat(np.arange(n), np.diff(starts))]
    )
    columns = np.concatenate([neighbors[valid], graph.in_source[lo:hi]]).astype(np.int32)
    weights = np.concatenate([graph.out_weight[first:last][valid], graph.in_weight[lo:hi]])
    keep = weights > 0
    rows, columns, weights = rows[keep], columns[keep], weights[keep]
    order = np.lexsort((columns, rows))
    return CsrRows(
        weights[order].astype(np.float32),
        columns[order],
        np.bincount(rows, minlength=n).astype(np.int64),
    )


def neighbor_graph(ds: xr.Dataset) -> tuple:
    """The store's graph of all cells as scanpy keeps it: ``distances`` and ``connectivities``.

    Parameters
    ----------
    ds
        A store embedded with refinement (``knn_cell``, ``knn_distance``, ``knn_cell_weight``).

    Returns
    -------
    distances, connectivities
        ``scipy.sparse.csr_matrix`` of float32, cells x cells: what the AnnData exports write
        to ``obsp["distances"]`` and ``obsp["connectivities"]``.

    Notes
    -----
    Computes, and holds the whole graph in memory: for tests and small stores; the AnnData
    writers stream it in cell blocks instead.

    Examples
    --------
    >>> distances, connectivities = distumap.tl.neighbor_graph(ds)  # doctest: +SKIP
    """
    from scipy import sparse

    if any(name not in ds for name in CELL_GRAPH):
        raise IncompleteStoreError(
            "the store has no graph of all cells: embed it with refinement (refine_epochs > 0)"
        )
    neighbors, distances, weights = (ds[name].values for name in CELL_GRAPH)
    n_cells = len(neighbors)
    matrices = []
    for rows in (distance_rows(neighbors, distances), _all_rows(neighbors, weights)):
        indptr = np.concatenate([[0], np.cumsum(rows.row_nnz)])
        matrices.append(
            sparse.csr_matrix((rows.data, rows.indices, indptr), shape=(n_cells, n_cells))
        )
    return matrices[0], matrices[1]


def _all_rows(neighbors: np.ndarray, weights: np.ndarray) -> CsrRows:
    return connectivity_rows(cell_graph(neighbors, weights), 0, len(neighbors))

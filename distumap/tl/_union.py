"""umap-learn's fuzzy union of the directed kNN graph, built by rows.

The refinement (:mod:`distumap.tl._refine`) and the AnnData exports (:mod:`distumap.tl._graph`)
both need rows of the union ``w + w.T - w * w.T`` of every cell's membership weights. A cell's
row needs its own out-edges and every edge into it, which any cell may hold: :func:`in_edges`
collects those from a block of kNN rows, and :func:`graph_part` makes a range of cells' rows
from their out-edges and the edges collected from every block, so that no process holds the
graph of all cells. :func:`symmetrize` is the same for all cells at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["Graph", "graph_part", "in_edges", "symmetrize"]


@dataclass(frozen=True)
class Graph:
    """The symmetrised kNN graph of consecutive cells (all of them, or one task's), as the
    epochs read it.

    Attributes
    ----------
    neighbors
        int32 ``(n, k)``: the out-edges of cells ``first:first + n`` (-1: none).
    out_weight
        float32 ``(n, k)``: their fuzzy-union weights ``w_ij + w_ji - w_ij w_ji``.
    in_start, in_source, in_weight
        CSR over those cells (int64 ``(n + 1,)``, int32, float32): the in-edges ``j -> i``
        whose reverse ``i -> j`` is not an out-edge of ``i``, ascending ``j``, with weight
        ``w_ji``.
    first
        The cell of row 0 (0: the graph of every cell).
    """

    neighbors: np.ndarray
    out_weight: np.ndarray
    in_start: np.ndarray
    in_source: np.ndarray
    in_weight: np.ndarray
    first: int = 0

    @property
    def nbytes(self) -> int:
        arrays = ("neighbors", "out_weight", "in_start", "in_source", "in_weight")
        return sum(getattr(self, name).nbytes for name in arrays)


def in_edges(
    neighbors: np.ndarray, weights: np.ndarray, source_first: int, first: int, last: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges ``j -> i`` of some cells' kNN rows whose target ``i`` lies in ``first:last``.

    Parameters
    ----------
    neighbors, weights
        ``(m, k)`` out-edges of cells ``source_first:source_first + m`` (-1: none) and their
        membership weights.
    source_first
        The cell of row 0.
    first, last
        The targets wanted.

    Returns
    -------
    targets, sources, weights
        int32, int32, float32, one entry per edge, ascending source. Computes.
    """
    neighbors = np.asarray(neighbors)
    rows, slots = np.nonzero((neighbors >= first) & (neighbors < last))
    return (
        neighbors[rows, slots].astype(np.int32),
        (rows + source_first).astype(np.int32),
        np.asarray(weights)[rows, slots].astype(np.float32),
    )


@njit(cache=True, nogil=True)
def _lists(neighbors, q, j):
    """Whether row ``q`` lists cell ``j`` among its out-edges."""
    for e in range(neighbors.shape[1]):
        if neighbors[q, e] == j:
            return True
    return False


@njit(cache=True, nogil=True)
def _union_rows(neighbors, weights, in_start, in_source, in_weight):
    """The fuzzy union's rows of consecutive cells, from their out-edges and all their in-edges
    (CSR, ascending source): out-edge weights with their reverses', then the lone in-edges."""
    n, k = neighbors.shape
    out_weight = np.zeros((n, k), dtype=np.float32)
    lone_start = np.zeros(n + 1, dtype=np.int64)
    for q in range(n):
        for e in range(k):
            j = neighbors[q, e]
            if j < 0:
                continue
            w = np.float64(weights[q, e])
            reverse = 0.0
            for t in range(in_start[q], in_start[q + 1]):
                if in_source[t] == j:  # j lists this cell: the edge's reverse
                    reverse = np.float64(in_weight[t])
                    break
            out_weight[q, e] = np.float32(w + reverse - w * reverse)
        count = 0
        for t in range(in_start[q], in_start[q + 1]):
            if not _lists(neighbors, q, in_source[t]):
                count += 1
        lone_start[q + 1] = lone_start[q] + count
    lone_source = np.empty(lone_start[n], dtype=np.int32)
    lone_weight = np.empty(lone_start[n], dtype=np.float32)
    at = 0
    for q in range(n):
        for t in range(in_start[q], in_start[q + 1]):
            if not _lists(neighbors, q, in_source[t]):
                lone_source[at] = in_source[t]
                lone_weight[at] = in_weight[t]
                at += 1
    return out_weight, lone_start, lone_source, lone_weight


def graph_part(
    neighbors: np.ndarray,
    weights: np.ndarray,
    first: int,
    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> Graph:
    """The fuzzy union's rows of cells ``first:first + n``.

    Parameters
    ----------
    neighbors, weights
        ``(n, k)`` out-edges of those cells (-1: none; no cell twice in a row) and their
        membership weights.
    first
        The cell of row 0.
    edges
        Every edge into those cells, from every cell's rows: :func:`in_edges` of row blocks
        in cell order (so that sources ascend).

    Returns
    -------
    Graph
        The rows :func:`symmetrize` gives these cells, the same bits. Computes (linear in the
        edges given).
    """
    neighbors = np.ascontiguousarray(neighbors, dtype=np.int32)
    n = len(neighbors)
    targets, sources, in_weight = (
        np.concatenate([edge[part] for edge in edges]) if edges else np.zeros(0, dtype)
        for part, dtype in enumerate((np.int32, np.int32, np.float32))
    )
    order = np.argsort(targets, kind="stable")  # by target, sources ascending within
    in_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(targets - first, minlength=n), out=in_start[1:])
    out_weight, lone_start, lone_source, lone_weight = _union_rows(
        neighbors,
        np.ascontiguousarray(weights, dtype=np.float32),
        in_start,
        sources[order],
        in_weight[order],
    )
    return Graph(neighbors, out_weight, lone_start, lone_source, lone_weight, first=int(first))


def symmetrize(neighbors: np.ndarray, weights: np.ndarray) -> Graph:
    """umap-learn's fuzzy union of the directed kNN graph (``w + w.T - w * w.T``).

    Parameters
    ----------
    neighbors, weights
        ``(n_cells, k)`` out-edges of every cell (-1: none; no cell twice in a row) and their
        membership weights.

    Returns
    -------
    Graph
        Every edge of the union, held by both of its cells: :func:`graph_part` of all cells.
        Computes (linear in the edges).
    """
    n = len(neighbors)
    return graph_part(neighbors, weights, 0, [in_edges(neighbors, weights, 0, 0, n)])

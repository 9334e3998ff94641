"""Refining a landmark UMAP embedding over the kNN graph of all cells, chunk-invariantly.

The landmark transform places every other cell against the landmarks alone, so transformed cells
sit worse than fitted ones (their kNN-label agreement is lower; benchmarks/RESULTS.md).
This module moves every cell with umap-learn's own SGD over its nearest *cells*, in epochs that
any chunking computes to the same bits:

1. **Nearest cells through the landmarks** (:func:`nearest_cells`). Cells are bucketed by their
   nearest landmark (:func:`bucket_index`: one int per cell); a cell's candidates are the cells
   of its own bucket and of its nearest landmarks' buckets, nearest landmark first, whole buckets
   until ``max_candidates`` were examined (a bucket larger than ``bucket_cap`` gives an even,
   deterministic stride of its cells). Exact float64 distances in a fixed feature order rank
   them by ``(distance, cell index)``, so the result depends neither on BLAS nor on the order of
   the candidates. No all-pairs search: the work is ``cells x candidates x features``.
2. **Weights and graph**: umap-learn's fit-time fuzzy membership (:func:`fit_weights`: ``rho`` =
   the nearest neighbour's distance, sigma from the binary search for ``log2(k + 1)``), then its
   fuzzy union ``w + w.T - w * w.T`` (:func:`~distumap.tl._union.symmetrize`), held by both
   cells of an edge.
3. **Jacobi epochs** (:func:`epoch`): epoch ``e`` reads the positions of *all* cells after epoch
   ``e - 1`` and returns new positions for a set of cells. A cell moves along its edges with
   umap-learn's attraction and repulsion (the model's curve ``a``, ``b``, gradient clipping at
   4, a learning rate that falls linearly over the epochs); an edge of weight ``w`` fires in
   the epochs where ``floor((e + 1) w)`` steps (umap-learn's epochs-per-sample schedule, without
   state), each firing followed by ``negative_sample_rate`` negative samples drawn uniformly over
   all cells from a random stream seeded by ``(seed, cell, epoch)``. Only the moving cell's own
   coordinates change during its update, in the fixed order of its edges, so its new position
   depends only on its edges, the epoch and the previous positions: bit for bit the same in any
   chunk, on any worker.

The defaults (:class:`RefineSettings`) were chosen by measurement (``benchmarks/refine.py``,
``benchmarks/RESULTS.md``, "Transform refinement"): landmarks move too (holding them fixed
keeps the landmark fit's mistakes), the fuzzy union beats the directed graph, and a learning
rate of 0.1 (umap-learn fits start at 1.0) suits a start that is already an embedding.

Everything here takes arrays and returns arrays; the stage that runs it on a cluster, with
markers per task and epoch, lives in :mod:`distumap.tl._refine_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from distumap.tl._kernels import (
    MIN_K_DIST_SCALE,
    bandwidth,
    clip,
    heap_before,
    heap_push,
    heap_sift_down,
    splitmix64,
)
from distumap.tl._union import Graph, symmetrize

__all__ = [
    "BucketIndex",
    "RefineSettings",
    "bucket_index",
    "candidate_landmarks",
    "epoch",
    "fit_weights",
    "home_buckets",
    "knn_pass",
    "nearest_cells",
    "pass_buckets",
    "refine",
    "refine_embedding",
    "warm_up",
]


@dataclass(frozen=True)
class RefineSettings:
    """How the refinement runs; everything that decides its result besides the data.

    Attributes
    ----------
    n_epochs
        Jacobi epochs (0: no refinement). The embed stage takes it from ``refine_epochs``.
    n_neighbors
        Nearest cells per cell in the refinement graph, the cell itself not counted (twice as
        many gained little label agreement for twice the graph's memory and slower epochs).
    max_candidates
        Candidate cells examined per cell: whole buckets, nearest landmark first, until this many
        were examined (fewer lose label agreement when landmarks are few).
    bucket_cap
        A bucket contributes at most this many of its cells (an even stride of them).
    initial_alpha
        Learning rate of the first epoch; it falls linearly to 0 over ``n_epochs``.
    move_landmarks
        Whether landmarks move too; holding them measured clearly worse.
    """

    n_epochs: int = 30
    n_neighbors: int = 15
    max_candidates: int = 1024
    bucket_cap: int = 256
    initial_alpha: float = 0.1
    move_landmarks: bool = True


# ----------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class BucketIndex:
    """The inverted index landmark -> cells, with the cells' features stored bucket by bucket:
    of every bucket, or of a range of them (one pass of a search, :func:`pass_buckets`).

    Attributes
    ----------
    start
        int64 ``(n_landmarks + 1,)``: bucket ``b`` holds cells ``start[b]:start[b + 1]`` of all
        cells in bucket order (every bucket's, whatever the range).
    cells
        int32 ``(m,)``: the cells of buckets ``first_bucket:last_bucket`` in bucket order,
        ascending within a bucket.
    features
        float32 ``(m, n_features)``: those cells' features, so that a bucket's candidates are
        read from one contiguous stretch of memory, not from scattered rows.
    first_bucket, last_bucket
        The buckets held.
    """

    start: np.ndarray
    cells: np.ndarray
    features: np.ndarray
    first_bucket: int
    last_bucket: int

    @property
    def nbytes(self) -> int:
        return self.start.nbytes + self.cells.nbytes + self.features.nbytes


def pass_buckets(counts: np.ndarray, n_passes: int) -> np.ndarray:
    """Cut the buckets into ``n_passes`` consecutive ranges of about equal cells.

    ``counts`` are the buckets' sizes (int ``(n_landmarks,)``). Returns int64
    ``(n_passes + 1,)`` bucket numbers from 0 to ``n_landmarks``: pass ``p`` holds buckets
    ``edges[p]:edges[p + 1]`` (at most ``n_cells / n_passes`` cells and one bucket).
    """
    start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    targets = -(-np.arange(n_passes + 1, dtype=np.int64) * start[-1] // max(n_passes, 1))
    edges = np.searchsorted(start, targets, side="left").astype(np.int64)
    edges[0], edges[-1] = 0, len(counts)
    return edges


def bucket_index(
    home: np.ndarray,
    n_landmarks: int,
    features: np.ndarray,
    buckets: tuple[int, int] | None = None,
) -> BucketIndex:
    """Bucket every cell by its home landmark (:func:`home_buckets`).

    Parameters
    ----------
    home
        int ``(n_cells,)``: each cell's nearest landmark (a landmark's is itself), as a landmark
        number in ``[0, n_landmarks)``.
    n_landmarks
        Number of landmarks.
    features
        float32 ``(n_cells, n_features)``: every cell's kNN features, in memory or an array
        read in row blocks (a zarr array): then only the held buckets' copy is held whole.
    buckets
        ``(first, last)``: hold the features of these buckets only (default: all).

    Returns
    -------
    BucketIndex
        Computes (a stable sort of the held cells by bucket and a copy of their features).
    """
    home = np.asarray(home).reshape(-1)
    if home.size and (home.min() < 0 or home.max() >= n_landmarks):
        raise ValueError(f"bucket numbers must lie in [0, {n_landmarks})")
    if features.shape[0] != len(home):
        raise ValueError(f"{len(home)} cells but features for {features.shape[0]}")
    first, last = (0, n_landmarks) if buckets is None else map(int, buckets)
    start = np.zeros(n_landmarks + 1, dtype=np.int64)
    np.cumsum(np.bincount(home, minlength=n_landmarks), out=start[1:])
    held = (
        np.arange(len(home)) if buckets is None else np.flatnonzero((home >= first) & (home < last))
    )
    order = np.argsort(home[held], kind="stable")  # held cells ascend: so do a bucket's
    place = np.empty(len(held), dtype=np.int64)
    place[order] = np.arange(len(held))
    ordered = np.empty((len(held), features.shape[1]), dtype=np.float32)
    step = int(getattr(features, "chunks", (len(home),))[0]) or 1
    for lo in range(0, len(home), step):
        # each block of rows goes straight to its held cells' places in bucket order
        a, b = np.searchsorted(held, [lo, lo + step])
        if a < b:
            block = np.asarray(features[lo : min(lo + step, len(home))])
            ordered[place[a:b]] = block[held[a:b] - lo]
    return BucketIndex(
        start=start,
        cells=held[order].astype(np.int32),
        features=ordered,
        first_bucket=first,
        last_bucket=last,
    )


def candidate_landmarks(home: np.ndarray, knn_landmark: np.ndarray) -> np.ndarray:
    """The buckets to search for each cell: its own first, then its nearest landmarks in order.

    ``home`` (n,) and ``knn_landmark`` (n, k) are landmark numbers; a landmark's own row of
    ``knn_landmark`` lists other landmarks, a transformed cell's starts with its home. Returns
    int64 ``(n, k + 1)``, with -1 where a bucket repeats the home.
    """
    home = np.asarray(home, dtype=np.int64).reshape(-1, 1)
    knn_landmark = np.asarray(knn_landmark, dtype=np.int64)
    rest = np.where(knn_landmark == home, -1, knn_landmark)
    return np.ascontiguousarray(np.concatenate([home, rest], axis=1))


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _sqdist(x, a, y, b):
    """Squared distance of row a of x and row b of y in float64: four running sums over
    interleaved features, combined in a fixed order (the same bits for a pair, whatever else is
    computed)."""
    n = x.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    f = 0
    while f + 4 <= n:
        d0 = np.float64(x[a, f]) - np.float64(y[b, f])
        d1 = np.float64(x[a, f + 1]) - np.float64(y[b, f + 1])
        d2 = np.float64(x[a, f + 2]) - np.float64(y[b, f + 2])
        d3 = np.float64(x[a, f + 3]) - np.float64(y[b, f + 3])
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        f += 4
    while f < n:
        d0 = np.float64(x[a, f]) - np.float64(y[b, f])
        s0 += d0 * d0
        f += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, nogil=True)
def _knn_block(
    cells,
    query_features,
    query_buckets,
    bucket_start,
    first_bucket,
    last_bucket,
    bucket_cells,
    features,
    best_j,
    best_d,
    k,
    max_candidates,
    bucket_cap,
):
    """Exact k nearest cells among each row's bucket candidates; -1 / inf where fewer exist.

    A row walks its buckets in order until ``max_candidates`` were taken, as if every bucket
    were held, but computes distances in the held buckets only (``features``, in bucket order,
    of buckets ``first_bucket:last_bucket``), merged with the row's best so far (``best_j``,
    ``best_d``: ascending squared distances, -1 / inf past the end). Returns the new best in
    the same form, and the distances computed.
    """
    n = cells.shape[0]
    out_index = np.full((n, k), -1, dtype=np.int64)
    out_dist = np.full((n, k), np.inf, dtype=np.float64)
    heap_d = np.empty(k, dtype=np.float64)
    heap_j = np.empty(k, dtype=np.int64)
    offset = bucket_start[first_bucket]
    n_examined = 0
    for q in range(n):
        i = cells[q]
        size = 0
        for r in range(k):
            if best_j[q, r] < 0:
                break
            size = heap_push(heap_d, heap_j, size, best_d[q, r], best_j[q, r], True)
        seen = 0
        for r in range(query_buckets.shape[1]):
            bucket = query_buckets[q, r]
            if bucket < 0:
                continue
            lo = bucket_start[bucket]
            count = bucket_start[bucket + 1] - lo
            take = min(count, bucket_cap)
            if first_bucket <= bucket < last_bucket:
                for t in range(take):
                    # an even stride through a bucket larger than its cap; all of a smaller one
                    at = lo + (t * count) // take - offset
                    j = np.int64(bucket_cells[at])
                    if j == i:
                        continue
                    d = _sqdist(query_features, q, features, at)
                    # a max-heap ordered by (distance, cell index)
                    if size < k:
                        size = heap_push(heap_d, heap_j, size, d, j, True)
                    elif heap_before(d, j, heap_d[0], heap_j[0], True):
                        heap_sift_down(heap_d, heap_j, size, d, j, True)
                n_examined += take
            seen += take
            if seen >= max_candidates:
                break
        # pop the heap from the back: nearest first
        for r in range(size - 1, -1, -1):
            out_index[q, r] = heap_j[0]
            out_dist[q, r] = heap_d[0]
            heap_sift_down(heap_d, heap_j, r, heap_d[r], heap_j[r], True)
    return out_index, out_dist, n_examined


@njit(cache=True, nogil=True)
def _fit_weights_block(dists, target, floor):
    """umap-learn's smooth_knn_dist and membership strengths (local_connectivity 1), per row.

    ``dists`` hold a row's neighbours without the cell itself, nearest first (inf: none).
    """
    n, k = dists.shape
    out = np.zeros((n, k), dtype=np.float32)
    for i in range(n):
        rho = 0.0
        for j in range(k):
            if dists[i, j] > 0.0 and np.isfinite(dists[i, j]):
                rho = dists[i, j]
                break
        sigma = max(bandwidth(dists[i], 0, rho, target), floor)
        for j in range(k):
            if not np.isfinite(dists[i, j]):
                continue
            d = dists[i, j] - rho
            out[i, j] = 1.0 if d <= 0.0 else np.exp(-(d / sigma))
    return out


@njit(cache=True, nogil=True)
def _move(x, y, px, py, coeff_kind, a, b32, attract, repel, alpha):
    """One umap-learn SGD step of the point (x, y) against (px, py): attraction (kind 0) or
    repulsion (kind 1), clipped per coordinate as umap-learn clips."""
    dx = x - px
    dy = y - py
    d2 = dx * dx + dy * dy
    if d2 > 0.0:
        # float32 pow: twice as fast as float64's, as exact as umap-learn's float32 layout
        d2b = np.float64(np.float32(d2) ** b32)
        if coeff_kind == 0:
            coeff = attract * d2b / (d2 * (a * d2b + 1.0))
        else:
            coeff = repel / ((0.001 + d2) * (a * d2b + 1.0))
        x += clip(coeff * dx) * alpha
        y += clip(coeff * dy) * alpha
    return x, y


@njit(cache=True, nogil=True)
def _fires(weight, epoch):
    """Whether an edge of ``weight`` fires in ``epoch``: floor((epoch + 1) w) steps there."""
    return np.floor((epoch + 1) * weight) > np.floor(epoch * weight)


@njit(cache=True, nogil=True)
def _epoch_block(
    cells,
    frozen,
    row0,
    neighbors,
    out_weight,
    in_start,
    in_source,
    in_weight,
    positions,
    epoch,
    n_epochs,
    a,
    b,
    gamma,
    initial_alpha,
    negative_sample_rate,
    seed,
):
    """New positions of ``cells`` after one epoch that reads only ``positions``.

    A cell's edges are its out-edges (row order, nearest first) with their symmetrised weights,
    then the in-edges whose reverse it does not hold (ascending source): a fixed order. Cell
    ``i``'s edges are the graph's row ``i - row0``.
    """
    n = cells.shape[0]
    k = neighbors.shape[1]
    n_all_u = np.uint64(positions.shape[0])
    out = np.empty((n, 2), dtype=np.float32)
    b32 = np.float32(b)
    attract = -2.0 * a * b
    repel = 2.0 * gamma * b
    alpha = initial_alpha * (1.0 - epoch / n_epochs)
    state0, _ = splitmix64(seed ^ np.uint64(0xBB67AE8584CAA73B))
    epoch_key = np.uint64(epoch + 1) * np.uint64(0x9E3779B97F4A7C15)
    for q in range(n):
        i = cells[q]
        if frozen[q]:
            out[q, 0] = positions[i, 0]
            out[q, 1] = positions[i, 1]
            continue
        x = np.float64(positions[i, 0])
        y = np.float64(positions[i, 1])
        # the cell's own random stream for this epoch
        _, mixed = splitmix64(state0 ^ np.uint64(i))
        _, state = splitmix64(mixed ^ epoch_key)
        g = i - row0
        n_edges = k + in_start[g + 1] - in_start[g]
        for e in range(n_edges):
            if e < k:
                j = np.int64(neighbors[g, e])
                w = np.float64(out_weight[g, e])
            else:
                t = in_start[g] + e - k
                j = np.int64(in_source[t])
                w = np.float64(in_weight[t])
            if j < 0 or not _fires(w, epoch):
                continue
            x, y = _move(x, y, positions[j, 0], positions[j, 1], 0, a, b32, attract, repel, alpha)
            for _ in range(negative_sample_rate):
                state, r = splitmix64(state)
                other = np.int64(((r >> np.uint64(32)) * n_all_u) >> np.uint64(32))
                if other != i:
                    x, y = _move(
                        x,
                        y,
                        positions[other, 0],
                        positions[other, 1],
                        1,
                        a,
                        b32,
                        attract,
                        repel,
                        alpha,
                    )
        out[q, 0] = np.float32(x)
        out[q, 1] = np.float32(y)
    return out


# ----------------------------------------------------------------------------- public API


def knn_pass(
    index: BucketIndex,
    cells: np.ndarray,
    features: np.ndarray,
    query_buckets: np.ndarray,
    *,
    k: int,
    max_candidates: int = 1024,
    bucket_cap: int = 256,
    best: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Each cell's k nearest other cells among the candidates in the buckets ``index`` holds,
    merged with its best so far: the search of :func:`nearest_cells`, in one pass or several.

    Parameters
    ----------
    index
        The buckets searched in this pass (:func:`bucket_index`).
    cells, features
        int ``(n,)``: the cells to query, and float32 ``(n, n_features)`` their features.
    query_buckets
        int ``(n, m)``: buckets to search per cell, nearest landmark first; -1 skips
        (:func:`candidate_landmarks`). Each cell takes whole buckets until ``max_candidates``
        were examined, counting the buckets of every pass, so the passes over ranges of buckets
        examine the candidates of one search over all.
    k, max_candidates, bucket_cap
        Neighbours kept; candidates examined per cell; a bucket gives at most ``bucket_cap`` of
        its cells (an even stride).
    best
        The previous passes' result (neighbours, squared distances), or None.

    Returns
    -------
    neighbors, sqdistances, examined
        int64 ``(n, k)`` cell indices, nearest first (ties by cell index; -1 where fewer
        candidates were found), float64 ``(n, k)`` squared euclidean distances (inf there), and
        the candidates examined. The k best of the union of candidates are the k best
        of the passes' k best: the passes in any number give the bits of one. Computes.
    """
    cells = np.ascontiguousarray(cells, dtype=np.int64)
    if best is None:
        best = (np.full((len(cells), k), -1, np.int64), np.full((len(cells), k), np.inf))
    return _knn_block(
        cells,
        np.ascontiguousarray(features, dtype=np.float32),
        np.ascontiguousarray(query_buckets, dtype=np.int64),
        index.start,
        int(index.first_bucket),
        int(index.last_bucket),
        index.cells,
        index.features,
        np.ascontiguousarray(best[0], dtype=np.int64),
        np.ascontiguousarray(best[1], dtype=np.float64),
        int(k),
        int(max_candidates),
        int(bucket_cap),
    )


def fit_weights(distances: np.ndarray, n_neighbors: int, mean_distance: float) -> np.ndarray:
    """umap-learn's fit-time membership weights of kNN rows that leave the cell itself out.

    ``n_neighbors`` counts the cell itself, as umap-learn's does (its target is
    ``log2(n_neighbors)``); sigma's floor is ``MIN_K_DIST_SCALE * mean_distance``. Returns
    float32 weights in [0, 1], 0 where a distance is inf (no neighbour). Computes.
    """
    distances = np.ascontiguousarray(distances, dtype=np.float64)
    return _fit_weights_block(
        distances, float(np.log2(n_neighbors)), MIN_K_DIST_SCALE * float(mean_distance)
    )


def epoch(
    positions: np.ndarray,
    cells: np.ndarray,
    graph: Graph,
    frozen: np.ndarray,
    *,
    epoch: int,
    n_epochs: int,
    a: float,
    b: float,
    gamma: float = 1.0,
    initial_alpha: float = 1.0,
    negative_sample_rate: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """The positions of ``cells`` after epoch ``epoch`` (0-based) of ``n_epochs``.

    Parameters
    ----------
    positions
        float32 ``(n_cells, 2)``: every cell's position after the previous epoch.
    cells
        int ``(n,)``: the cells to move.
    graph
        The symmetrised kNN graph of all cells (:func:`~distumap.tl._union.symmetrize`), or
        of consecutive cells that include ``cells`` (:func:`~distumap.tl._union.graph_part`).
    frozen
        bool ``(n,)``: cells of ``cells`` that keep their position.
    epoch, n_epochs, a, b, gamma, initial_alpha, negative_sample_rate, seed
        The epoch, the schedule's length, umap-learn's curve and repulsion, the first epoch's
        learning rate, negative samples per edge firing, and the seed of the random streams.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, 2)``. Row ``i`` depends only on ``cells[i]``, the graph, the epoch and
        ``positions``: the same bits in any chunk. Computes.
    """
    if not 0 <= epoch < n_epochs:
        raise ValueError(f"epoch {epoch} outside [0, {n_epochs})")
    return _epoch_block(
        np.ascontiguousarray(cells, dtype=np.int64),
        np.ascontiguousarray(frozen, dtype=np.bool_),
        int(graph.first),
        graph.neighbors,
        graph.out_weight,
        graph.in_start,
        graph.in_source,
        graph.in_weight,
        np.ascontiguousarray(positions, dtype=np.float32),
        int(epoch),
        int(n_epochs),
        float(a),
        float(b),
        float(gamma),
        float(initial_alpha),
        int(negative_sample_rate),
        np.uint64(int(seed) % 2**64),
    )


def refine(
    positions: np.ndarray,
    graph: Graph,
    frozen: np.ndarray,
    *,
    n_epochs: int,
    chunk: int | None = None,
    **options,
) -> np.ndarray:
    """Every epoch over all cells in one process, ``chunk`` cells at a time (tests and
    benchmarks; the embed stage runs the same epochs as tasks). ``options`` go to :func:`epoch`.
    Returns float32 ``(n_cells, 2)``."""
    positions = np.ascontiguousarray(positions, dtype=np.float32)
    n = positions.shape[0]
    chunk = max(n, 1) if chunk is None else int(chunk)
    for e in range(n_epochs):
        new = np.empty_like(positions)
        for s in range(0, n, chunk):
            rows = np.arange(s, min(s + chunk, n))
            new[rows] = epoch(
                positions, rows, graph, frozen[rows], epoch=e, n_epochs=n_epochs, **options
            )
        positions = new
    return positions


def warm_up() -> None:
    """Compile (or load from numba's cache) every refinement kernel on a few rows."""
    features = np.arange(20, dtype=np.float32).reshape(4, 5)
    index = bucket_index(np.array([0, 0, 1, 1]), 2, features)
    buckets = candidate_landmarks(np.array([0, 0, 1, 1]), np.array([[0], [1], [1], [0]]))
    neighbors, sqdistances, _ = knn_pass(index, np.arange(4), features, buckets, k=2)
    graph = symmetrize(neighbors, fit_weights(np.sqrt(sqdistances), 3, 1.0))
    epoch(features[:, :2], np.arange(4), graph, np.zeros(4, bool), epoch=0, n_epochs=1, a=1, b=1)


def home_buckets(is_landmark: np.ndarray, nearest_landmarks: np.ndarray) -> np.ndarray:
    """Each cell's bucket: its nearest landmark, or for a landmark itself (landmark numbers;
    landmark ``i`` is the ``i``-th True of ``is_landmark``). Returns int32 ``(n_cells,)``."""
    is_landmark = np.asarray(is_landmark, dtype=bool)
    home = np.asarray(nearest_landmarks)[:, 0].astype(np.int32)
    home[is_landmark] = np.arange(int(is_landmark.sum()), dtype=np.int32)
    return home


def nearest_cells(
    index: BucketIndex,
    cells: np.ndarray,
    features: np.ndarray,
    home: np.ndarray,
    nearest_landmarks: np.ndarray,
    *,
    mean_distance: float,
    settings: RefineSettings = RefineSettings(),
    return_distances: bool = False,
    best: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple:
    """The refinement graph's out-edges of ``cells``: their nearest cells and weights.

    Parameters
    ----------
    index
        Every cell's bucket and features (:func:`bucket_index`), or the last pass's buckets
        (:func:`knn_pass`).
    cells, features
        int ``(n,)``: the cells to query, and float32 ``(n, n_features)`` their features.
    home, nearest_landmarks
        ``(n,)`` and ``(n, k)`` for those cells: their bucket (:func:`home_buckets`) and their
        nearest landmarks as landmark numbers, nearest first (a landmark's: the nearest
        *other* landmarks).
    mean_distance
        The model's ``mean_distance_reference`` (sigma's floor).
    settings
        ``n_neighbors``, ``max_candidates`` and ``bucket_cap`` are used.
    return_distances
        Also return the edges' euclidean distances.
    best
        The earlier passes' result when ``index`` holds the last pass's buckets.

    Returns
    -------
    neighbors, weights, examined
        int32 ``(n, k)`` cell indices (-1 where fewer candidates existed), float32 ``(n, k)``
        membership weights and the number of candidates examined; with
        ``return_distances`` a fourth, float32 ``(n, k)`` distances (inf where no neighbour).
        Computes.
    """
    neighbors, sqdistances, examined = knn_pass(
        index,
        cells,
        features,
        candidate_landmarks(home, nearest_landmarks),
        k=settings.n_neighbors,
        max_candidates=settings.max_candidates,
        bucket_cap=settings.bucket_cap,
        best=best,
    )
    distances = np.sqrt(sqdistances)
    # umap-learn counts the cell itself among its n_neighbors
    weights = fit_weights(distances, settings.n_neighbors + 1, mean_distance)
    if return_distances:
        return neighbors.astype(np.int32), weights, examined, distances.astype(np.float32)
    return neighbors.astype(np.int32), weights, examined


def refine_embedding(
    positions: np.ndarray,
    features: np.ndarray,
    is_landmark: np.ndarray,
    nearest_landmarks: np.ndarray,
    model,
    *,
    settings: RefineSettings = RefineSettings(),
    chunk: int | None = None,
) -> np.ndarray:
    """The whole refinement in one process: :func:`nearest_cells`,
    :func:`~distumap.tl._union.symmetrize` and ``settings.n_epochs`` epochs with the model's
    curve, repulsion, negative sampling and seed; the bits the embed stage writes for the same
    inputs. For tests and benchmarks.

    ``model`` is the fitted :class:`~distumap.tl._model.LandmarkModel`. Returns float32
    ``(n_cells, 2)``. Computes.
    """
    home = home_buckets(is_landmark, nearest_landmarks)
    neighbors, weights, _ = nearest_cells(
        bucket_index(home, int(np.sum(is_landmark)), features),
        np.arange(len(home)),
        features,
        home,
        nearest_landmarks,
        mean_distance=model.mean_distance_reference,
        settings=settings,
    )
    frozen = np.zeros(len(positions), dtype=bool)
    if not settings.move_landmarks:
        frozen = np.asarray(is_landmark, dtype=bool)
    return refine(
        positions,
        symmetrize(neighbors, weights),
        frozen,
        n_epochs=settings.n_epochs,
        chunk=chunk,
        a=model.a,
        b=model.b,
        gamma=model.repulsion_strength,
        initial_alpha=settings.initial_alpha,
        negative_sample_rate=model.negative_sample_rate,
        seed=model.seed,
    )

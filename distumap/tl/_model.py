"""A landmark UMAP model whose transform does not depend on how cells are batched.

umap-learn's ``UMAP.transform`` couples the cells of one call: it picks the number of epochs
from the batch size, prunes edges against the batch's largest membership weight, scales the
epochs per sample by that weight, floors every sigma with the batch's mean kNN distance and
draws negative samples from one random state shared by the batch. Our transform runs block by
block on Dask workers, so every one of those constants is fixed at fit time and stored in the
model, and each cell is computed on its own:

1. project the cell (optional PCA, a fixed-order row kernel);
2. its exact euclidean k nearest landmarks (BLAS only proposes candidates; their distances are
   recomputed in a fixed order and ranked by ``(distance, index)``);
3. membership weights as umap-learn's transform computes them (``rho = 0``, sigma from a binary
   search for ``log2(k)``, floored with the stored reference distance);
4. the weighted mean of the neighbours' landmark coordinates as the starting point;
5. umap-learn's SGD with the cell as the only moving point, the landmark embedding read-only and
   negative samples drawn from the landmarks with a random stream seeded by
   ``(seed, global cell index)``.

Row ``i`` of :func:`transform` therefore depends only on ``X[i]``, ``cell_index[i]`` and the
model, bit for bit, whatever the block size, order or number of workers.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from distumap.tl._kernels import (
    MIN_K_DIST_SCALE,
    bandwidth,
    clip,
    heap_push,
    heap_sift_down,
    splitmix64,
)

__all__ = [
    "LandmarkModel",
    "fit_landmark_model",
    "landmark_knn",
    "project",
    "transform",
    "warm_up",
    "warm_up_fit",
]

#: held around each umap-learn fit and the warning filters it sets (see fit_landmark_model)
_UMAP_FIT_LOCK = threading.Lock()

#: landmarks queried (without themselves) to calibrate the weight and distance references
CALIBRATION_CELLS = 2000
#: candidates proposed by BLAS beyond k before the exact re-ranking
CANDIDATE_MARGIN = 16
#: cap on one block's candidate-score matrix (cells x landmarks float32 values)
_BLOCK_SCORE_VALUES = 16 * 1024 * 1024


@dataclass(eq=False)
class LandmarkModel:
    """Everything needed to place new cells into a landmark UMAP embedding.

    Attributes
    ----------
    pca_mean, pca_components
        float32 ``(n_genes,)`` and ``(n_pca, n_genes)``, or ``None`` when no PCA is used.
    landmark_features
        float32 ``(n_landmarks, n_features)``: the landmarks' kNN features (after PCA).
    landmark_embedding
        float32 ``(n_landmarks, 2)``: the fitted UMAP coordinates of the landmarks.
    a, b
        umap-learn's curve parameters for ``min_dist`` and spread.
    n_neighbors, transform_epochs
        k of the kNN query and the fixed number of SGD epochs per transformed cell.
    weight_reference
        The largest membership weight met when landmarks were queried against the others;
        stands in for the batch maximum that umap-learn prunes and samples edges against.
    mean_distance_reference
        Mean kNN distance of those queries; sigma's floor is ``MIN_K_DIST_SCALE`` times this.
    seed, negative_sample_rate, repulsion_strength, initial_alpha
        SGD settings; ``initial_alpha`` is the fit's learning rate (the transform uses a quarter).
    params
        Parameters and calibration details, for provenance.
    """

    pca_mean: np.ndarray | None
    pca_components: np.ndarray | None
    landmark_features: np.ndarray
    landmark_embedding: np.ndarray
    a: float
    b: float
    n_neighbors: int
    transform_epochs: int
    weight_reference: float
    mean_distance_reference: float
    seed: int
    negative_sample_rate: int
    repulsion_strength: float
    initial_alpha: float
    params: dict[str, Any] = field(default_factory=dict)
    #: the variance of the fitted cells along each component, and its share of their total
    #: (scikit-learn's explained_variance_ and explained_variance_ratio_; scanpy's
    #: uns["pca"]), when the fit knew them
    pca_variance: np.ndarray | None = None
    pca_variance_ratio: np.ndarray | None = None
    # derived arrays, rebuilt after unpickling rather than stored
    _components_t: np.ndarray | None = field(init=False, repr=False, default=None)
    _mean_offset: np.ndarray | None = field(init=False, repr=False, default=None)
    _landmark_sqnorm: np.ndarray = field(init=False, repr=False, default=None)
    _landmark_norm_max: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        self._derive()

    def _derive(self) -> None:
        self.landmark_features = np.ascontiguousarray(self.landmark_features, dtype=np.float32)
        self.landmark_embedding = np.ascontiguousarray(self.landmark_embedding, dtype=np.float32)
        if self.pca_components is not None:
            self.pca_mean = np.ascontiguousarray(self.pca_mean, dtype=np.float32)
            self.pca_components = np.ascontiguousarray(self.pca_components, dtype=np.float32)
            # genes x components, so the projection kernel streams one gene's row at a time
            self._components_t = np.ascontiguousarray(self.pca_components.T)
            # (x - mean) @ C.T == x @ C.T - mean @ C.T: lets the kernel skip zero genes
            self._mean_offset = _project_rows(
                self.pca_mean[None, :], self._components_t, np.zeros(len(self.pca_components))
            )[0].astype(np.float64)
        sqnorm = _row_sqnorms(self.landmark_features)
        self._landmark_sqnorm = sqnorm
        self._landmark_norm_max = float(np.sqrt(sqnorm.max())) if len(sqnorm) else 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._derive()

    @property
    def n_landmarks(self) -> int:
        return self.landmark_features.shape[0]

    @property
    def n_genes(self) -> int:
        """Width of the matrix that :func:`project` and :func:`transform` accept."""
        if self.pca_components is not None:
            return self.pca_components.shape[1]
        return self.landmark_features.shape[1]


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _row_sqnorms(features):
    out = np.empty(features.shape[0], dtype=np.float64)
    for i in range(features.shape[0]):
        acc = 0.0
        for f in range(features.shape[1]):
            v = np.float64(features[i, f])
            acc += v * v
        out[i] = acc
    return out


@njit(cache=True, nogil=True)
def _project_rows(X, components_t, offset):
    """``X @ components_t - offset`` row by row, float64 sums in gene order, float32 out.

    The inner loop runs over components (no reduction), so it vectorises without changing the
    order of any sum: every row is computed the same way whatever the block holds.
    """
    n_cells, n_genes = X.shape
    n_comp = components_t.shape[1]
    out = np.empty((n_cells, n_comp), dtype=np.float32)
    acc = np.empty(n_comp, dtype=np.float64)
    for i in range(n_cells):
        acc[:] = 0.0
        for g in range(n_genes):
            x = np.float64(X[i, g])
            if x != 0.0:
                for c in range(n_comp):
                    acc[c] += x * components_t[g, c]
        for c in range(n_comp):
            out[i, c] = np.float32(acc[c] - offset[c])
    return out


@njit(cache=True, nogil=True)
def _exact_sqdist(features, i, landmarks, j):
    acc = 0.0
    for f in range(features.shape[1]):
        d = np.float64(features[i, f]) - np.float64(landmarks[j, f])
        acc += d * d
    return acc


@njit(cache=True, nogil=True)
def _rank_exact(features, i, landmarks, candidates, k, out_index, out_dist):
    """Exact distances of ``candidates`` (ascending indices); the k best by (distance, index).

    Returns the k-th smallest squared distance.
    """
    n = candidates.shape[0]
    sq = np.empty(n, dtype=np.float64)
    for c in range(n):
        sq[c] = _exact_sqdist(features, i, landmarks, candidates[c])
    # a stable sort of index-ordered candidates ranks ties by landmark index
    order = np.argsort(sq, kind="mergesort")
    for r in range(k):
        out_index[i, r] = candidates[order[r]]
        out_dist[i, r] = np.sqrt(sq[order[r]])
    return sq[order[k - 1]]


@njit(cache=True, nogil=True)
def _exact_knn_block(
    features, dots, landmarks, landmark_sqnorm, norm_max, k, n_candidates, exclude
):
    """Exact k nearest landmarks per row, ranked by (distance, landmark index).

    ``dots`` (BLAS's ``features @ landmarks.T``) only proposes candidates; the answer comes
    from exact, fixed-order distances. If BLAS's rounding could have hidden a landmark that
    belongs in the k best, every landmark whose estimate is within the rounding bound of the
    k-th exact distance is checked too, so the result never depends on BLAS.
    ``exclude[i]`` is a landmark to leave out for row i (itself, in calibration) or -1.
    """
    n_cells = features.shape[0]
    n_land = landmarks.shape[0]
    n_feat = features.shape[1]
    out_index = np.empty((n_cells, k), dtype=np.int64)
    out_dist = np.empty((n_cells, k), dtype=np.float64)
    heap_score = np.empty(n_candidates, dtype=np.float64)
    heap_index = np.empty(n_candidates, dtype=np.int64)
    for i in range(n_cells):
        x_sq = 0.0
        for f in range(n_feat):
            v = np.float64(features[i, f])
            x_sq += v * v
        # bound on |estimate - exact| of a squared distance: float32 dot products of n_feat
        # terms err by at most ~n_feat * eps * |x| |l|; doubled for safety
        tol = 2.0 * (n_feat + 2) * 1.1920929e-07 * np.sqrt(x_sq) * norm_max * 2.0 + 1e-12
        # max-heap of the n_candidates smallest estimates (|x|^2 left out: same for the row)
        size = 0
        for j in range(n_land):
            if j == exclude[i]:
                continue
            s = landmark_sqnorm[j] - 2.0 * np.float64(dots[i, j])
            if size < n_candidates:
                size = heap_push(heap_score, heap_index, size, s, j, False)
            elif s < heap_score[0]:
                heap_sift_down(heap_score, heap_index, size, s, j, False)
        candidates = np.sort(heap_index[:size])
        kth = _rank_exact(features, i, landmarks, candidates, k, out_index, out_dist)
        n_available = n_land - (1 if 0 <= exclude[i] < n_land else 0)
        if size < n_available and x_sq + heap_score[0] - tol <= kth:
            # a landmark outside the candidates may tie or beat the k-th: widen and redo
            count = 0
            for j in range(n_land):
                if j != exclude[i] and x_sq + landmark_sqnorm[j] - 2.0 * dots[i, j] - tol <= kth:
                    count += 1
            wide = np.empty(count, dtype=np.int64)
            count = 0
            for j in range(n_land):
                if j != exclude[i] and x_sq + landmark_sqnorm[j] - 2.0 * dots[i, j] - tol <= kth:
                    wide[count] = j
                    count += 1
            _rank_exact(features, i, landmarks, wide, k, out_index, out_dist)
    return out_index, out_dist


@njit(cache=True, nogil=True)
def _membership_weights(dists, floor):
    """umap-learn's transform weights for one row: rho = 0, bandwidth 1, target log2(k)."""
    k = dists.shape[0]
    # as in umap-learn, the nearest neighbour is left out of the sum
    sigma = max(bandwidth(dists, 1, 0.0, np.log2(k)), floor)
    weights = np.empty(k, dtype=np.float64)
    for j in range(k):
        if dists[j] <= 0.0 or sigma == 0.0:
            weights[j] = 1.0
        else:
            weights[j] = np.exp(-(dists[j] / sigma))
    return weights


@njit(cache=True, nogil=True)
def _weights_block(dists, floor):
    out = np.empty(dists.shape, dtype=np.float64)
    for i in range(dists.shape[0]):
        out[i] = _membership_weights(dists[i], floor)
    return out


@njit(cache=True, nogil=True)
def _embed_block(
    neighbors,
    dists,
    cell_index,
    landmark_embedding,
    a,
    b,
    n_epochs,
    weight_reference,
    distance_floor,
    seed,
    negative_sample_rate,
    gamma,
    initial_alpha,
):
    """Initial position and SGD for each row, each with its own random stream."""
    n_cells, k = neighbors.shape
    n_land = landmark_embedding.shape[0]
    out = np.empty((n_cells, 2), dtype=np.float32)
    epochs_per_sample = np.empty(k, dtype=np.float64)
    epochs_per_negative = np.empty(k, dtype=np.float64)
    next_sample = np.empty(k, dtype=np.float64)
    next_negative = np.empty(k, dtype=np.float64)
    edges = np.empty(k, dtype=np.int64)
    prune_below = weight_reference / n_epochs
    # float32 pow is about twice as fast as float64's and as exact as umap-learn's float32 layout
    b32 = np.float32(b)
    attract = -2.0 * a * b
    repel = 2.0 * gamma * b
    n_land_u = np.uint64(n_land)
    for i in range(n_cells):
        weights = _membership_weights(dists[i], distance_floor)
        # weighted mean of the neighbours; a weight of exactly 1 (a landmark at distance 0)
        # puts the cell on that landmark, as umap-learn's init_graph_transform does
        total = 0.0
        for j in range(k):
            total += weights[j]
        x = 0.0
        y = 0.0
        for j in range(k):
            lm = neighbors[i, j]
            if weights[j] == 1.0:
                x = np.float64(landmark_embedding[lm, 0])
                y = np.float64(landmark_embedding[lm, 1])
                break
            share = weights[j] / total
            x += share * landmark_embedding[lm, 0]
            y += share * landmark_embedding[lm, 1]
        # edges too weak to be sampled even once in n_epochs are dropped, as in umap-learn
        n_edges = 0
        for j in range(k):
            if weights[j] >= prune_below:
                edges[n_edges] = neighbors[i, j]
                epochs_per_sample[n_edges] = weight_reference / weights[j]
                epochs_per_negative[n_edges] = epochs_per_sample[n_edges] / negative_sample_rate
                next_sample[n_edges] = epochs_per_sample[n_edges]
                next_negative[n_edges] = epochs_per_negative[n_edges]
                n_edges += 1
        state, _ = splitmix64(seed ^ np.uint64(0x6A09E667F3BCC909))
        state, mixed = splitmix64(state ^ np.uint64(cell_index[i]))
        state = mixed
        alpha = initial_alpha
        for epoch in range(n_epochs):
            for e in range(n_edges):
                if next_sample[e] > epoch:
                    continue
                lm = edges[e]
                dx = x - landmark_embedding[lm, 0]
                dy = y - landmark_embedding[lm, 1]
                d2 = dx * dx + dy * dy
                if d2 > 0.0:
                    d2b = np.float64(np.float32(d2) ** b32)
                    coeff = attract * d2b / (d2 * (a * d2b + 1.0))
                    x += clip(coeff * dx) * alpha
                    y += clip(coeff * dy) * alpha
                next_sample[e] += epochs_per_sample[e]
                n_negative = int((epoch - next_negative[e]) / epochs_per_negative[e])
                for _ in range(n_negative):
                    state, r = splitmix64(state)
                    other = np.int64(((r >> np.uint64(32)) * n_land_u) >> np.uint64(32))
                    dx = x - landmark_embedding[other, 0]
                    dy = y - landmark_embedding[other, 1]
                    d2 = dx * dx + dy * dy
                    if d2 > 0.0:
                        d2b = np.float64(np.float32(d2) ** b32)
                        coeff = repel / ((0.001 + d2) * (a * d2b + 1.0))
                        x += clip(coeff * dx) * alpha
                        y += clip(coeff * dy) * alpha
                next_negative[e] += n_negative * epochs_per_negative[e]
            alpha = initial_alpha * (1.0 - (epoch + 1) / n_epochs)
        out[i, 0] = np.float32(x)
        out[i, 1] = np.float32(y)
    return out


# ----------------------------------------------------------------------------- helpers


def _block_rows(n_landmarks: int) -> int:
    return int(max(64, min(4096, _BLOCK_SCORE_VALUES // max(n_landmarks, 1))))


def _knn(model: LandmarkModel, features: np.ndarray, exclude: np.ndarray | None = None):
    return _knn_of(
        features,
        model.landmark_features,
        model._landmark_sqnorm,
        model._landmark_norm_max,
        model.n_neighbors,
        exclude,
    )


def _knn_of(
    features: np.ndarray,
    landmarks: np.ndarray,
    landmark_sqnorm: np.ndarray,
    norm_max: float,
    k: int,
    exclude: np.ndarray | None = None,
):
    """Each row's exact k nearest ``landmarks``: (indices, Euclidean distances), ranked by
    (distance, index); ``exclude[i]`` (>= 0) is a landmark row ``i`` may not have."""
    n_land = len(landmarks)
    if exclude is None:
        exclude = np.full(len(features), -1, dtype=np.int64)
    n_available = n_land - 1 if np.any(exclude >= 0) else n_land
    if n_available < k:
        raise ValueError(f"n_neighbors={k} needs more than {n_available} landmarks")
    n_candidates = min(k + CANDIDATE_MARGIN, n_available)
    dots = features @ landmarks.T
    return _exact_knn_block(
        features,
        np.ascontiguousarray(dots, dtype=np.float32),
        landmarks,
        landmark_sqnorm,
        norm_max,
        k,
        n_candidates,
        np.ascontiguousarray(exclude, dtype=np.int64),
    )


#: rows per block of the landmarks' own kNN (the block's dot products: rows x landmarks float32)
SELF_KNN_ROWS = 512


def _self_knn(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest landmarks of every landmark, itself first (distance 0), as
    umap-learn's ``precomputed_knn`` takes them: int64 indices and float32 distances.

    Exact, and ranked by (distance, index), so the same for any BLAS and thread count; in
    blocks of :data:`SELF_KNN_ROWS` rows, so memory stays at one block's dot products."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    sqnorm = _row_sqnorms(features)
    norm_max = float(np.sqrt(sqnorm.max())) if len(sqnorm) else 0.0
    indices = np.empty((len(features), k), dtype=np.int64)
    distances = np.empty((len(features), k), dtype=np.float32)
    for start in range(0, len(features), SELF_KNN_ROWS):
        stop = min(start + SELF_KNN_ROWS, len(features))
        index, dist = _knn_of(features[start:stop], features, sqnorm, norm_max, k)
        indices[start:stop] = index
        distances[start:stop] = dist
    return indices, distances


def _as_matrix(X: np.ndarray, width: int) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != width:
        raise ValueError(f"expected a (cells, {width}) matrix, got shape {X.shape}")
    return X


def _calibrate(model: LandmarkModel, seed: int) -> tuple[float, float, int]:
    """Weight and distance references from landmarks queried against all the others."""
    n_land = model.n_landmarks
    size = min(n_land, CALIBRATION_CELLS)
    sample = np.sort(np.random.default_rng(seed).choice(n_land, size=size, replace=False))
    _, dists = _knn(model, model.landmark_features[sample], exclude=sample.astype(np.int64))
    mean_distance = float(dists.mean())
    weights = _weights_block(dists, MIN_K_DIST_SCALE * mean_distance)
    return float(weights.max()), mean_distance, size


# ----------------------------------------------------------------------------- public API


def fit_landmark_model(
    X: np.ndarray,
    *,
    n_pca: int = 50,
    n_neighbors: int = 30,
    min_dist: float = 0.25,
    seed: int = 999,
    transform_epochs: int = 100,
    pca: tuple[np.ndarray, ...] | None = None,
) -> LandmarkModel:
    """Fit UMAP on the landmark cells and fix every constant the transform needs.

    Parameters
    ----------
    X
        float32 ``(n_landmarks, n_genes)``: log2(x+1) values of the landmark cells, in
        landmark order.
    n_pca
        Principal components to reduce to before UMAP (fitted on the landmarks); 0, or a
        value not below ``n_genes``, uses the genes themselves.
    n_neighbors, min_dist, seed
        umap-learn's ``n_neighbors``, ``min_dist`` and ``random_state``.
    transform_epochs
        SGD epochs for every transformed cell, whatever the batch.
    pca
        A PCA fitted elsewhere (all cells: :mod:`distumap.tl._pca`), as its mean and
        ``(n_pca, n_genes)`` components (and optionally each component's variance and
        variance ratio), used instead of one fitted on the landmarks.

    Returns
    -------
    LandmarkModel

    Notes
    -----
    Computes: PCA and umap-learn's fit run here, in this process, on the landmarks only.

    Examples
    --------
    >>> model = fit_landmark_model(log_landmarks, n_pca=50)  # doctest: +SKIP
    >>> xy = transform(model, log_cells, cell_index=np.arange(len(log_cells)))  # doctest: +SKIP
    """
    import umap

    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a (landmarks, genes) matrix, got shape {X.shape}")
    n_land, n_genes = X.shape
    if n_land <= n_neighbors:
        raise ValueError(f"n_neighbors={n_neighbors} needs more than {n_land} landmarks")
    if transform_epochs < 1:
        raise ValueError("transform_epochs must be at least 1")
    use_pca = 0 < n_pca < n_genes
    if use_pca and pca is None and n_pca > n_land:
        raise ValueError(f"n_pca={n_pca} exceeds the number of landmarks ({n_land})")

    pca_mean = pca_components = variance = None
    features = X
    if use_pca:
        pca_mean, pca_components, *variance = _fit_pca(X, n_pca, seed) if pca is None else pca
        pca_mean, pca_components, features = _project_landmarks(X, pca_mean, pca_components)
    reducer = _fit_umap(features, n_neighbors, min_dist, seed)
    model = LandmarkModel(
        pca_mean=pca_mean,
        pca_components=pca_components,
        landmark_features=features,
        landmark_embedding=np.asarray(reducer.embedding_, dtype=np.float32),
        a=float(reducer._a),
        b=float(reducer._b),
        n_neighbors=int(n_neighbors),
        transform_epochs=int(transform_epochs),
        weight_reference=1.0,
        mean_distance_reference=1.0,
        seed=int(seed),
        negative_sample_rate=int(reducer.negative_sample_rate),
        repulsion_strength=float(reducer.repulsion_strength),
        initial_alpha=float(reducer._initial_alpha),
    )
    if variance:
        model.pca_variance, model.pca_variance_ratio = (
            np.asarray(v, dtype=np.float32) for v in variance
        )
    weight_reference, mean_distance, n_calibration = _calibrate(model, seed)
    model.weight_reference = weight_reference
    model.mean_distance_reference = mean_distance
    model.params = {
        "n_landmarks": int(n_land),
        "n_genes": int(n_genes),
        "n_pca": int(n_pca) if use_pca else 0,
        "n_neighbors": int(n_neighbors),
        "min_dist": float(min_dist),
        "seed": int(seed),
        "transform_epochs": int(transform_epochs),
        "metric": "euclidean",
        "calibration_cells": int(n_calibration),
        "weight_reference": weight_reference,
        "mean_distance_reference": mean_distance,
        "umap_learn": umap.__version__ if hasattr(umap, "__version__") else "unknown",
    }
    if use_pca and pca is not None:
        model.params["pca_fit"] = "given"
    return model


def _fit_pca(X: np.ndarray, n_pca: int, seed: int) -> tuple[np.ndarray, ...]:
    """PCA fitted on the landmarks: its mean, components, variances and variance ratios."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=n_pca, random_state=seed).fit(X)
    return pca.mean_, pca.components_, pca.explained_variance_, pca.explained_variance_ratio_


def _project_landmarks(X: np.ndarray, mean: np.ndarray, components: np.ndarray):
    """float32 mean and components, and the landmarks' features projected by the same kernel
    as every other cell's."""
    pca_mean = np.asarray(mean).astype(np.float32)
    pca_components = np.asarray(components).astype(np.float32)
    n_pca = len(pca_components)
    components_t = np.ascontiguousarray(pca_components.T)
    offset = _project_rows(pca_mean[None, :], components_t, np.zeros(n_pca))[0]
    return pca_mean, pca_components, _project_rows(X, components_t, offset.astype(np.float64))


def _fit_umap(features: np.ndarray, n_neighbors: int, min_dist: float, seed: int):
    """umap-learn's fit on the landmarks' features, over their exact kNN."""
    import umap

    # warning filters are process-wide: one umap-learn fit at a time changes them (a background
    # warm_up_fit may run beside the real fit in the same worker)
    with _UMAP_FIT_LOCK, warnings.catch_warnings():
        # umap-learn: "n_jobs value 1 overridden to 1 by setting random_state" - expected, seeded
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        # the landmarks' exact kNN, from the same kernel as the transform's, instead of
        # pynndescent's approximate one: no NN-descent to compile or run in each fit
        warnings.filterwarnings("ignore", message=".*is not an NNDescent object.*")
        knn = _self_knn(features, n_neighbors)
        return umap.UMAP(
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            random_state=seed,
            n_components=2,
            precomputed_knn=(*knn, None),
        ).fit(features)


def project(model: LandmarkModel, X: np.ndarray) -> np.ndarray:
    """The kNN features of cells: their PCA projection, or ``X`` as float32 without PCA.

    Each row is projected with the same fixed-order float64 sums, so a row's result does not
    depend on the other rows of ``X``. Computes (numpy in, numpy out).
    """
    X = _as_matrix(X, model.n_genes)
    if model.pca_components is None:
        return X
    return _project_rows(X, model._components_t, model._mean_offset)


def transform(
    model: LandmarkModel,
    X: np.ndarray,
    cell_index: np.ndarray,
    *,
    return_knn: bool = False,
    features_out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place cells into the landmark embedding, each independently of the others.

    Parameters
    ----------
    model
        A fitted :class:`LandmarkModel`.
    X
        float32 ``(n, n_genes)``: log2(x+1) values of any cells.
    cell_index
        int64 ``(n,)``: each cell's global row index; it seeds the cell's random stream.
    return_knn
        Also return each cell's k nearest landmarks and their membership weights.
    features_out
        float32 ``(n, n_features)``, optional: receives the cells' kNN features (what
        :func:`project` returns), computed here anyway, for callers that keep them.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, 2)``. Row ``i`` depends only on ``X[i]``, ``cell_index[i]`` and the
        model, bit for bit, whatever the batch size, order or worker.
    neighbors, weights
        With ``return_knn``: int64 ``(n, k)`` landmark indices, nearest first (ties by index),
        and float32 ``(n, k)`` membership weights in [0, 1], the ones the SGD starts from.

    Notes
    -----
    Computes, in blocks that keep memory bounded (a block's cells x landmarks float32 scores
    stay under a fixed cap). Numba kernels release the GIL.
    """
    X = _as_matrix(X, model.n_genes)
    cell_index = np.ascontiguousarray(cell_index, dtype=np.int64).reshape(-1)
    if cell_index.shape[0] != X.shape[0]:
        raise ValueError(f"{X.shape[0]} cells but {cell_index.shape[0]} cell indices")
    if np.any(cell_index < 0):
        raise ValueError("cell_index must be non-negative")
    n_features = model.landmark_features.shape[1]
    if features_out is not None and features_out.shape != (X.shape[0], n_features):
        raise ValueError(f"features_out must have shape {(X.shape[0], n_features)}")
    out = np.empty((X.shape[0], 2), dtype=np.float32)
    knn_shape = (X.shape[0], model.n_neighbors) if return_knn else (0, 0)
    all_neighbors = np.empty(knn_shape, dtype=np.int64)
    all_weights = np.empty(knn_shape, dtype=np.float32)
    block = _block_rows(model.n_landmarks)
    seed = np.uint64(model.seed % 2**64)
    for start in range(0, X.shape[0], block):
        stop = min(start + block, X.shape[0])
        features = project(model, X[start:stop])
        if features_out is not None:
            features_out[start:stop] = features
        neighbors, dists = _knn(model, features)
        if return_knn:
            all_neighbors[start:stop] = neighbors
            floor = MIN_K_DIST_SCALE * model.mean_distance_reference
            all_weights[start:stop] = _weights_block(dists, floor)
        out[start:stop] = _embed_block(
            neighbors,
            dists,
            cell_index[start:stop],
            model.landmark_embedding,
            model.a,
            model.b,
            model.transform_epochs,
            model.weight_reference,
            MIN_K_DIST_SCALE * model.mean_distance_reference,
            seed,
            float(model.negative_sample_rate),
            model.repulsion_strength,
            model.initial_alpha / 4.0,
        )
    return (out, all_neighbors, all_weights) if return_knn else out


def landmark_knn(model: LandmarkModel, landmark_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other landmarks of landmarks, with membership weights.

    Parameters
    ----------
    model
        A fitted :class:`LandmarkModel`.
    landmark_index
        int ``(n,)``: indices into the model's landmarks.

    Returns
    -------
    neighbors, weights
        int64 ``(n, k)`` landmark indices (never the landmark itself), nearest first, and
        float32 ``(n, k)`` membership weights, computed as :func:`transform` computes them for
        any other cell. Row ``i`` depends only on ``landmark_index[i]`` and the model.

    Notes
    -----
    Computes (numpy in, numpy out), in blocks as :func:`transform` does.
    """
    landmark_index = np.ascontiguousarray(landmark_index, dtype=np.int64).reshape(-1)
    if np.any((landmark_index < 0) | (landmark_index >= model.n_landmarks)):
        raise ValueError(f"landmark indices must lie in [0, {model.n_landmarks})")
    neighbors = np.empty((len(landmark_index), model.n_neighbors), dtype=np.int64)
    weights = np.empty((len(landmark_index), model.n_neighbors), dtype=np.float32)
    block = _block_rows(model.n_landmarks)
    for start in range(0, len(landmark_index), block):
        rows = landmark_index[start : start + block]
        found, dists = _knn(model, model.landmark_features[rows], exclude=rows)
        neighbors[start : start + block] = found
        floor = MIN_K_DIST_SCALE * model.mean_distance_reference
        weights[start : start + block] = _weights_block(dists, floor)
    return neighbors, weights


def warm_up_fit(part: str = "all") -> None:
    """Compile (or load from numba's cache) what a fit runs, on a tiny seeded problem; kernels
    compile by argument types, not sizes, so the real fit finds them compiled.

    ``part`` is ``"umap"`` (importing umap-learn, which compiles pynndescent, and umap-learn's
    fit), ``"kernels"`` (distumap's own: the projection, the exact kNN, the calibration) or
    ``"all"``: two processes sharing numba's cache can take one part each.
    """
    rng = np.random.default_rng(0)
    X = rng.random((64, 8), dtype=np.float32)
    if part in ("kernels", "all"):
        components_t = rng.random((8, 4), dtype=np.float32)
        features = _project_rows(X, components_t, np.zeros(4))
        # the kernels of _self_knn and of the calibration (which excludes each row's own)
        sqnorm = _row_sqnorms(features)
        exclude = np.arange(len(features), dtype=np.int64)
        _, dists = _knn_of(features, features, sqnorm, float(np.sqrt(sqnorm.max())), 5, exclude)
        _weights_block(dists, 0.1)
    if part in ("umap", "all"):
        import umap

        dist = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1, dtype=np.float32))
        index = np.argsort(dist, axis=1, kind="stable")[:, :5].astype(np.int64)
        knn = (index, np.take_along_axis(dist, index, axis=1).astype(np.float32), None)
        with _UMAP_FIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            umap.UMAP(n_neighbors=5, min_dist=0.25, random_state=0, precomputed_knn=knn).fit(X)


def warm_up(model: LandmarkModel) -> None:
    """Compile (or load from numba's cache) every transform kernel on a few rows."""
    if model.pca_components is not None:
        rows = np.repeat(model.pca_mean[None, :], 3, axis=0)
    else:
        rows = model.landmark_features[:3]
    transform(model, rows, np.arange(len(rows), dtype=np.int64))

"""The landmark UMAP model: batch-invariant transform, exact kNN, persistence, quality floors."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from distumap._errors import InputError
from distumap._format import check_model
from distumap.tl import _model
from distumap.tl._model import (
    LandmarkModel,
    fit_landmark_model,
    project,
    transform,
    warm_up,
)
from distumap.tl._model_io import from_arrays, load_model, save_model, to_arrays

N_CELLS = 2000
N_GENES = 200
N_LANDMARKS = 800
K = 15


def make_log_counts(n_cells: int, n_genes: int, seed: int = 0):
    """Seeded clustered Poisson counts, populations from 35% down to 1.5% of cells; log2(x+1)."""
    rng = np.random.default_rng(seed)
    shares = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.045, 0.015])
    labels = rng.choice(len(shares), size=n_cells, p=shares)
    base = rng.gamma(0.6, 2.0, size=n_genes)
    profiles = np.empty((len(shares), n_genes))
    for p in range(len(shares)):
        fold = np.ones(n_genes)
        markers = rng.choice(n_genes, size=n_genes // 10, replace=False)
        fold[markers] = rng.lognormal(1.0, 0.5, size=markers.size)
        profiles[p] = base * fold
    depth = rng.lognormal(0.0, 0.3, size=n_cells)
    counts = rng.poisson(profiles[labels] * depth[:, None])
    counts[:3] = 0  # all-zero cells happen in real data
    return np.log2(counts + 1).astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
    X, labels = make_log_counts(N_CELLS, N_GENES)
    landmarks = np.sort(np.random.default_rng(1).choice(N_CELLS, N_LANDMARKS, replace=False))
    return X, labels, landmarks


@pytest.fixture(scope="module")
def model_pca(data) -> LandmarkModel:
    X, _, landmarks = data
    return fit_landmark_model(X[landmarks], n_pca=20, n_neighbors=K, seed=7, transform_epochs=60)


@pytest.fixture(scope="module")
def model_raw(data) -> LandmarkModel:
    X, _, landmarks = data
    return fit_landmark_model(X[landmarks], n_pca=0, n_neighbors=K, seed=7, transform_epochs=60)


@pytest.fixture(params=["pca", "raw"])
def model(request, model_pca, model_raw) -> LandmarkModel:
    return model_pca if request.param == "pca" else model_raw


def _in_chunks(model, X, index, size):
    return np.concatenate(
        [transform(model, X[s : s + size], index[s : s + size]) for s in range(0, len(X), size)]
    )


def test_model_holds_fixed_constants(model_pca, model_raw):
    assert model_pca.pca_components.shape == (20, N_GENES)
    assert model_pca.landmark_features.shape == (N_LANDMARKS, 20)
    assert model_raw.pca_components is None
    assert model_raw.landmark_features.shape == (N_LANDMARKS, N_GENES)
    for model in (model_pca, model_raw):
        assert model.landmark_embedding.dtype == np.float32
        assert model.landmark_embedding.shape == (N_LANDMARKS, 2)
        assert 0.0 < model.weight_reference <= 1.0
        assert model.mean_distance_reference > 0.0
        assert model.transform_epochs == 60
        assert model.params["n_neighbors"] == K
        assert model.params["weight_reference"] == model.weight_reference


@pytest.mark.parametrize("chunk", [1, 7, 333])
def test_transform_identical_across_chunk_sizes(model, data, chunk):
    X, _, _ = data
    cells = X[: {1: 400, 7: 1000}.get(chunk, len(X))]  # small chunks on a subset: short runs
    index = np.arange(len(cells), dtype=np.int64) + 10_000
    whole = transform(model, cells, index)
    assert whole.dtype == np.float32 and whole.shape == (len(cells), 2)
    assert np.isfinite(whole).all()
    np.testing.assert_array_equal(_in_chunks(model, cells, index, chunk), whole)


def test_transform_identical_when_shuffled(model, data):
    X, _, _ = data
    index = np.arange(len(X), dtype=np.int64)
    whole = transform(model, X, index)
    order = np.random.default_rng(3).permutation(len(X))
    shuffled = transform(model, X[order], index[order])
    np.testing.assert_array_equal(shuffled, whole[order])


def test_transform_identical_across_blocks_inside_one_call(model_pca, data, monkeypatch):
    X, _, _ = data
    index = np.arange(len(X), dtype=np.int64)
    whole = transform(model_pca, X, index)
    monkeypatch.setattr(_model, "_block_rows", lambda n_landmarks: 37)
    np.testing.assert_array_equal(transform(model_pca, X, index), whole)


def test_cell_index_seeds_the_cell(model_pca, data):
    X, _, _ = data
    cells = X[100:110]
    same = transform(model_pca, cells, np.arange(10))
    np.testing.assert_array_equal(transform(model_pca, cells, np.arange(10)), same)
    other = transform(model_pca, cells, np.arange(10) + 1_000_000)
    assert not np.array_equal(other, same)
    # another random stream moves a cell a little, not to another place
    assert np.median(np.linalg.norm(other - same, axis=1)) < 1.0


def test_projection_is_row_independent_and_matches_pca(model_pca, data):
    X, _, landmarks = data
    whole = project(model_pca, X)
    rows = np.concatenate([project(model_pca, X[i : i + 1]) for i in range(0, 300)])
    np.testing.assert_array_equal(rows, whole[:300])
    expected = (X.astype(np.float64) - model_pca.pca_mean) @ model_pca.pca_components.T
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(whole[landmarks], model_pca.landmark_features)


def _brute_force(features, landmarks, k):
    d2 = ((features[:, None, :].astype(np.float64) - landmarks[None, :, :]) ** 2).sum(-1)
    index = np.arange(landmarks.shape[0])
    order = np.array([np.lexsort((index, row))[:k] for row in d2])
    return order, np.sqrt(np.take_along_axis(d2, order, axis=1))


def test_knn_is_exact(model, data):
    X, _, _ = data
    features = project(model, X[:300])
    neighbors, dists = _model._knn(model, features)
    expected_index, expected_dist = _brute_force(features, model.landmark_features, K)
    np.testing.assert_array_equal(neighbors, expected_index)
    np.testing.assert_allclose(dists, expected_dist, rtol=1e-12)


def _synthetic_model(landmark_features, k=5):
    rng = np.random.default_rng(0)
    n = len(landmark_features)
    return LandmarkModel(
        pca_mean=None,
        pca_components=None,
        landmark_features=landmark_features,
        landmark_embedding=rng.normal(size=(n, 2)).astype(np.float32),
        a=1.58,
        b=0.9,
        n_neighbors=k,
        transform_epochs=20,
        weight_reference=1.0,
        mean_distance_reference=1.0,
        seed=0,
        negative_sample_rate=5,
        repulsion_strength=1.0,
        initial_alpha=1.0,
    )


def test_knn_breaks_ties_by_landmark_index():
    rng = np.random.default_rng(5)
    # many identical landmarks (all-zero cells, duplicated profiles) around the k-th rank
    distinct = rng.poisson(1.0, size=(60, 30)).astype(np.float32)
    landmarks = np.concatenate([distinct, np.zeros((40, 30), np.float32), distinct[:20]])
    landmarks = landmarks[rng.permutation(len(landmarks))]
    model = _synthetic_model(landmarks, k=12)
    queries = np.concatenate([np.zeros((3, 30), np.float32), distinct[:20], landmarks[:10]])
    queries = queries + np.float32(0.0)
    neighbors, dists = _model._knn(model, queries)
    expected_index, expected_dist = _brute_force(queries, landmarks, 12)
    np.testing.assert_array_equal(neighbors, expected_index)
    np.testing.assert_allclose(dists, expected_dist, rtol=1e-12)
    for i in range(len(queries)):
        one_index, _ = _model._knn(model, queries[i : i + 1])
        np.testing.assert_array_equal(one_index[0], neighbors[i])
    index = np.arange(len(queries))
    np.testing.assert_array_equal(
        _in_chunks(model, queries, index, 1), transform(model, queries, index)
    )


def test_knn_calibration_excludes_self(model_raw):
    sample = np.arange(0, N_LANDMARKS, 5, dtype=np.int64)
    neighbors, _ = _model._knn(model_raw, model_raw.landmark_features[sample], sample)
    assert not (neighbors == sample[:, None]).any()
    expected = _brute_force(
        model_raw.landmark_features[sample], model_raw.landmark_features, K + 1
    )[0]
    for row, expected_row, own in zip(neighbors, expected, sample, strict=True):
        np.testing.assert_array_equal(row, [j for j in expected_row if j != own][:K])


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_save_load_round_trip(model, data, tmp_path, scheme):
    X, _, _ = data
    path = str(tmp_path / "model.zarr") if scheme == "file" else "memory://distumap/model.zarr"
    save_model(model, path)
    loaded = load_model(path)
    for name in (
        "a",
        "b",
        "n_neighbors",
        "transform_epochs",
        "weight_reference",
        "mean_distance_reference",
        "seed",
        "negative_sample_rate",
        "repulsion_strength",
        "initial_alpha",
        "params",
    ):
        assert getattr(loaded, name) == getattr(model, name)
    np.testing.assert_array_equal(loaded.landmark_embedding, model.landmark_embedding)
    index = np.arange(300, dtype=np.int64)
    np.testing.assert_array_equal(
        transform(loaded, X[:300], index), transform(model, X[:300], index)
    )


class _Planted:
    """A pickle that creates a file when it is loaded: what an attacker would plant."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_load_never_unpickles(tmp_path):
    import pickle

    proof = tmp_path / "pwned"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_Planted(str(proof))))
    with pytest.raises(InputError, match="no distumap UMAP model"):
        load_model(str(path))
    assert not proof.exists()


def test_model_layout_is_validated_on_load(model_pca, tmp_path):
    arrays, attrs = to_arrays(model_pca)
    pca = {"pca_mean", "pca_components", "pca_variance", "pca_variance_ratio"}
    assert set(arrays) == {"landmark_features", "landmark_embedding", *pca}
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert check_model(arrays, attrs) == []
    bad = dict(arrays, landmark_embedding=arrays["landmark_embedding"][:-1])
    with pytest.raises(InputError, match="landmark has length"):
        from_arrays(bad, attrs)
    nan = arrays["landmark_features"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(InputError, match="not finite"):
        from_arrays(dict(arrays, landmark_features=nan), attrs)
    with pytest.raises(InputError, match="pca_mean and pca_components"):
        from_arrays({k: v for k, v in arrays.items() if k != "pca_mean"}, attrs)
    with pytest.raises(InputError, match="'a' is"):
        from_arrays(arrays, {**attrs, "a": "import os"})
    pickled = np.frombuffer(b"\x80\x05pickle bytes", dtype=np.uint8)
    with pytest.raises(InputError, match="dtype uint8"):
        from_arrays(dict(arrays, landmark_features=pickled), attrs)
    # zarr and xarray read the saved model as plain arrays
    import zarr

    save_model(model_pca, str(tmp_path / "m.zarr"))
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    np.testing.assert_array_equal(group["landmark_embedding"][:], model_pca.landmark_embedding)
    assert group.attrs["n_neighbors"] == model_pca.n_neighbors


def test_warm_up_and_input_checks(model_pca, data):
    X, _, _ = data
    warm_up(model_pca)
    with pytest.raises(ValueError, match="matrix"):
        transform(model_pca, X[:, :10], np.arange(len(X)))
    with pytest.raises(ValueError, match="indices"):
        transform(model_pca, X[:5], np.arange(4))
    with pytest.raises(ValueError, match="landmarks"):
        fit_landmark_model(X[:10], n_neighbors=15)
    assert transform(model_pca, X[:0], np.arange(0)).shape == (0, 2)


def test_landmarks_land_near_their_fitted_positions(model, data):
    X, _, landmarks = data
    placed = transform(model, X[landmarks], landmarks)
    fitted = model.landmark_embedding
    extent = np.linalg.norm(fitted.max(0) - fitted.min(0))
    drift = np.linalg.norm(placed - fitted, axis=1)
    # the transform's fuzzy neighbourhood (rho = 0) is not the fit's, so SGD moves them a little
    assert np.median(drift) < 0.08 * extent
    assert np.quantile(drift, 0.95) < 0.25 * extent
    # and each one among its own fitted neighbourhood
    d = np.linalg.norm(placed[:, None, :] - fitted[None, :, :], axis=-1)
    rank_of_self = (d < d[np.arange(len(d)), np.arange(len(d))][:, None]).sum(1)
    assert np.median(rank_of_self) < K


def _label_agreement(embedding, labels, k=15):
    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())


@pytest.mark.slow
def test_quality_against_a_full_fit(model_pca, model_raw, data):
    import umap
    from sklearn.manifold import trustworthiness

    X, labels, landmarks = data
    rest = np.setdiff1d(np.arange(N_CELLS), landmarks)
    with warnings.catch_warnings():
        # umap-learn: "n_jobs value 1 overridden to 1 by setting random_state" - seeded on purpose
        warnings.filterwarnings("ignore", message=".*overridden to 1.*", category=UserWarning)
        full = umap.UMAP(n_neighbors=K, min_dist=0.25, random_state=7).fit_transform(X)
    subsample = np.sort(np.random.default_rng(2).choice(N_CELLS, 1000, replace=False))
    full_agreement = _label_agreement(full, labels)
    full_trust = trustworthiness(X[subsample], full[subsample], n_neighbors=15)
    assert full_agreement > 0.9  # the populations are separable: the reference is meaningful
    for model in (model_pca, model_raw):
        emb = np.empty((N_CELLS, 2), dtype=np.float32)
        emb[landmarks] = model.landmark_embedding
        emb[rest] = transform(model, X[rest], rest)
        agreement = _label_agreement(emb, labels)
        trust = trustworthiness(X[subsample], emb[subsample], n_neighbors=15)
        assert agreement >= 0.97 * full_agreement, (agreement, full_agreement)
        assert trust >= full_trust - 0.03, (trust, full_trust)


# ------------------------------------------------ the refinement's kernels (distumap.tl._refine)


def _refine_inputs(model, data):
    """What the embed stage hands the refinement: start positions, features, nearest landmarks."""
    X, _, landmarks = data
    is_landmark = np.zeros(N_CELLS, dtype=bool)
    is_landmark[landmarks] = True
    rest = np.flatnonzero(~is_landmark)
    positions = np.empty((N_CELLS, 2), dtype=np.float32)
    nearest = np.empty((N_CELLS, model.n_neighbors), dtype=np.int64)
    features = np.empty((N_CELLS, model.landmark_features.shape[1]), dtype=np.float32)
    positions[landmarks] = model.landmark_embedding
    nearest[landmarks], _ = _model.landmark_knn(model, np.arange(len(landmarks)))
    features[landmarks] = model.landmark_features
    moved = np.empty((len(rest), features.shape[1]), dtype=np.float32)
    positions[rest], nearest[rest], _ = transform(
        model, X[rest], rest, return_knn=True, features_out=moved
    )
    features[rest] = moved
    return positions, features, is_landmark, nearest


def test_transform_hands_out_the_features_it_projects(model_pca, data):
    X, _, _ = data
    features = np.empty((50, 20), dtype=np.float32)
    placed = transform(model_pca, X[:50], np.arange(50), features_out=features)
    np.testing.assert_array_equal(features, project(model_pca, X[:50]))
    np.testing.assert_array_equal(placed, transform(model_pca, X[:50], np.arange(50)))
    with pytest.raises(ValueError, match="features_out"):
        transform(model_pca, X[:50], np.arange(50), features_out=features[:10])


def test_refine_knn_is_exact_when_the_buckets_hold_every_cell(model_pca, data):
    from distumap.tl import _refine

    _, features, is_landmark, nearest = _refine_inputs(model_pca, data)
    home = _refine.home_buckets(is_landmark, nearest)
    cells = np.arange(0, N_CELLS, 7)
    every_bucket = np.tile(np.arange(N_LANDMARKS), (len(cells), 1))
    found, sqdist, examined = _refine.knn_pass(
        _refine.bucket_index(home, N_LANDMARKS, features),
        cells,
        features[cells],
        every_bucket,
        k=K,
        max_candidates=N_CELLS,
        bucket_cap=N_CELLS,
    )
    assert examined == len(cells) * N_CELLS
    exact = np.sqrt(((features[cells, None, :].astype(np.float64) - features[None]) ** 2).sum(-1))
    # (the kernel sums in another, fixed order: distances agree to rounding, ranks exactly)
    exact[np.arange(len(cells)), cells] = np.inf  # never the cell itself
    order = np.lexsort((np.broadcast_to(np.arange(N_CELLS), exact.shape), exact), axis=1)[:, :K]
    np.testing.assert_array_equal(found, order)
    np.testing.assert_allclose(np.sqrt(sqdist), np.take_along_axis(exact, order, 1), rtol=1e-12)


@pytest.mark.parametrize("n_passes", [2, 5, N_LANDMARKS + 3])
def test_refine_knn_in_passes_over_the_buckets_equals_one_search(model_pca, data, n_passes):
    from distumap.tl import _refine

    _, features, is_landmark, nearest = _refine_inputs(model_pca, data)
    home = _refine.home_buckets(is_landmark, nearest)
    buckets = _refine.candidate_landmarks(home, nearest)
    cells = np.arange(N_CELLS)
    options = {"k": K, "max_candidates": 300, "bucket_cap": 40}  # walks stop, strides thin
    whole = _refine.bucket_index(home, N_LANDMARKS, features)
    found, sqdist, examined = _refine.knn_pass(whole, cells, features, buckets, **options)
    edges = _refine.pass_buckets(np.bincount(home, minlength=N_LANDMARKS), n_passes)
    assert edges[0] == 0 and edges[-1] == N_LANDMARKS and (np.diff(edges) >= 0).all()
    best, counted, held = None, 0, 0
    for first, last in itertools.pairwise(edges):
        part = _refine.bucket_index(home, N_LANDMARKS, features, (first, last))
        held = max(held, len(part.cells))
        *best, computed = _refine.knn_pass(part, cells, features, buckets, best=best, **options)
        counted += computed
    np.testing.assert_array_equal(best[0], found)
    np.testing.assert_array_equal(best[1], sqdist)
    assert counted == examined
    # each pass holds its share of the cells (and at most one bucket more)
    largest = np.bincount(home).max()
    assert held <= -(-N_CELLS // n_passes) + largest and held < N_CELLS


def test_refine_knn_through_the_landmarks_finds_most_neighbours(model_pca, data):
    from sklearn.neighbors import NearestNeighbors

    from distumap.tl import _refine

    _, features, is_landmark, nearest = _refine_inputs(model_pca, data)
    home = _refine.home_buckets(is_landmark, nearest)
    found, weights, _ = _refine.nearest_cells(
        _refine.bucket_index(home, N_LANDMARKS, features),
        np.arange(N_CELLS),
        features,
        home,
        nearest,
        mean_distance=model_pca.mean_distance_reference,
    )
    exact = NearestNeighbors(n_neighbors=16).fit(features).kneighbors(return_distance=False)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(found, exact, strict=True)])
    assert recall > 0.8, recall  # 0.95 measured; a bucket search that lost its way falls far
    assert weights.dtype == np.float32 and ((weights > 0) & (weights <= 1)).all()
    np.testing.assert_array_equal(weights[:, 0], 1.0)  # rho: the nearest is fully connected


def test_symmetrize_is_umaps_fuzzy_union():
    import scipy.sparse as sp

    from distumap.tl import _union

    rng = np.random.default_rng(0)
    n, k = 200, 6
    neighbors = np.stack(
        [rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)]
    )
    neighbors[:5, -1] = -1  # fewer neighbours than k
    weights = rng.random((n, k)).astype(np.float32)
    graph = _union.symmetrize(neighbors, weights)
    valid = neighbors >= 0
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    directed = sp.csr_matrix(
        (weights[valid].astype(np.float64), (rows, neighbors[valid])), shape=(n, n)
    )
    expected = (directed + directed.T - directed.multiply(directed.T)).toarray()
    union = np.zeros((n, n))
    out_rows = np.repeat(np.arange(n), k)
    union[out_rows[valid.ravel()], neighbors[valid]] = graph.out_weight[valid]
    in_rows = np.repeat(np.arange(n), np.diff(graph.in_start))
    assert not union[in_rows, graph.in_source].any()  # an edge is held once per cell
    union[in_rows, graph.in_source] = graph.in_weight
    np.testing.assert_allclose(union, expected, rtol=1e-6)
    for i in range(n):  # in-edges in ascending source order: a fixed order of updates
        sources = graph.in_source[graph.in_start[i] : graph.in_start[i + 1]]
        assert (np.diff(sources) > 0).all()


@pytest.mark.parametrize("piece", [1, 64, 1000])
def test_graph_rows_from_pieces_are_the_whole_graphs(piece):
    """A part of the graph (a task's cells), built from the edges into it found piece by piece
    in every cell's rows, holds the whole graph's rows, and an epoch on it moves its cells as an
    epoch on the whole graph does."""
    from distumap.tl import _refine, _union

    rng = np.random.default_rng(3)
    n, k = 300, 8
    neighbors = np.stack(
        [rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)]
    ).astype(np.int32)
    neighbors[::7, -2:] = -1  # fewer neighbours than k
    weights = np.where(neighbors >= 0, rng.random((n, k)), 0).astype(np.float32)
    whole = _union.symmetrize(neighbors, weights)
    positions = rng.normal(size=(n, 2)).astype(np.float32)
    options = {"epoch": 2, "n_epochs": 5, "a": 1.6, "b": 0.9, "seed": 7}
    for first, last in [(0, 1), (0, 117), (117, 118), (118, n)]:
        edges = [
            _union.in_edges(neighbors[at : at + piece], weights[at : at + piece], at, first, last)
            for at in range(0, n, piece)
        ]
        part = _union.graph_part(neighbors[first:last], weights[first:last], first, edges)
        lo, hi = whole.in_start[first], whole.in_start[last]
        np.testing.assert_array_equal(part.out_weight, whole.out_weight[first:last])
        np.testing.assert_array_equal(part.in_start, whole.in_start[first : last + 1] - lo)
        np.testing.assert_array_equal(part.in_source, whole.in_source[lo:hi])
        np.testing.assert_array_equal(part.in_weight, whole.in_weight[lo:hi])
        cells, frozen = np.arange(first, last), np.zeros(last - first, dtype=bool)
        np.testing.assert_array_equal(
            _refine.epoch(positions, cells, part, frozen, **options),
            _refine.epoch(positions, cells, whole, frozen, **options),
        )


@pytest.mark.parametrize("chunk", [1, 97, N_CELLS])
def test_refine_epochs_identical_across_chunk_sizes(model_pca, data, chunk):
    from distumap.tl import _refine

    positions, features, is_landmark, nearest = _refine_inputs(model_pca, data)
    settings = _refine.RefineSettings(n_epochs=3)
    whole = _refine.refine_embedding(
        positions, features, is_landmark, nearest, model_pca, settings=settings
    )
    assert whole.dtype == np.float32 and np.isfinite(whole).all()
    assert not np.array_equal(whole, positions)
    chunked = _refine.refine_embedding(
        positions, features, is_landmark, nearest, model_pca, settings=settings, chunk=chunk
    )
    np.testing.assert_array_equal(chunked, whole)


def test_refine_can_hold_the_landmarks(model_pca, data):
    from distumap.tl import _refine

    positions, features, is_landmark, nearest = _refine_inputs(model_pca, data)
    settings = _refine.RefineSettings(n_epochs=3, move_landmarks=False)
    out = _refine.refine_embedding(
        positions, features, is_landmark, nearest, model_pca, settings=settings
    )
    np.testing.assert_array_equal(out[is_landmark], positions[is_landmark])
    assert not np.array_equal(out[~is_landmark], positions[~is_landmark])
    with pytest.raises(ValueError, match="epoch"):
        _refine.epoch(positions, [0], None, [False], epoch=3, n_epochs=3, a=1.0, b=1.0)


def test_the_fit_uses_the_exact_knn_of_the_landmarks(monkeypatch):
    from distumap.tl import _model

    rng = np.random.default_rng(5)
    features = rng.normal(size=(300, 7)).astype(np.float32)
    features[17] = features[3]  # a tie: ranked by index
    monkeypatch.setattr(_model, "SELF_KNN_ROWS", 64)  # several blocks, a short last one
    index, dist = _model._self_knn(features, 10)
    exact = np.sqrt(((features[:, None, :].astype(np.float64) - features[None]) ** 2).sum(-1))
    expected = np.lexsort((np.broadcast_to(np.arange(300), exact.shape), exact), axis=1)[:, :10]
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(exact, expected, 1), rtol=1e-6)
    assert (index[:, 0] == np.arange(300))[np.arange(300) != 17].all()  # itself first
    assert index[17, 0] == 3 and index[17, 1] == 17 and dist[17, 0] == 0

"""loompy's own API on distumap's loom export, and the cells' kNN graph it carries.

Two small stores go through the real pipeline (ingest, preprocess, embed): different cells,
the same genes. Their exports must take every step of loompy's API walkthrough (connect,
slicing, layers, attributes, graphs, ``map``, ``scan``, ``view``, ``permute``) and grow with
``add_columns``, ``add_loom`` and ``loompy.combine``; ``col_graphs["KNN"]`` must hold each
cell's exact k nearest landmarks.
"""

from __future__ import annotations

import shutil

import dask
import h5py
import numpy as np
import pytest
import xarray as xr
from scipy import sparse

import distumap
from distumap import tl
from distumap._format import MODEL_GROUP, check_loom
from distumap._store import read_group, store_of
from distumap.io.writers.loom import knn_graph, write_loom
from distumap.testing import synthetic_counts, write_dataset
from distumap.tl import _model, _model_io

N_CELLS, N_GENES, K = 400, 120, 8

pytestmark = pytest.mark.filterwarnings(
    # loompy's add_loom (and so combine) calls its own deprecated batch_scan_layers, which
    # reports that through logging.warn, itself deprecated: loompy's, not ours
    "ignore:The 'warn' function is deprecated:DeprecationWarning"
)
EMBED = {"landmarks": 100, "pca": 10, "n_neighbors": K, "transform_epochs": 20}


def _store(directory, seed: int, chunk_cells: int) -> xr.Dataset:
    data = synthetic_counts(N_CELLS, N_GENES, seed=seed, zero_cells=2)
    matrix, metadata = write_dataset(directory / f"input-{seed}-{chunk_cells}", data)
    store = directory / f"store-{seed}-{chunk_cells}.zarr"
    ds = distumap.io.read_csv(matrix, store, metadata=metadata, chunk_cells=chunk_cells)
    return tl.umap(distumap.pp.preprocess(ds, max_zero_fraction=0.95), **EMBED)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, xr.Dataset]:
    directory = tmp_path_factory.mktemp("loom-api")
    with dask.config.set(scheduler="threads"):
        return {
            "first": _store(directory, 1, 128),
            "rechunked": _store(directory, 1, 300),  # the same cells in other blocks
            "second": _store(directory, 2, 128),
        }


@pytest.fixture(scope="module")
def exports(stores, tmp_path_factory) -> tuple[str, str]:
    """Exports of two stores with the same genes selected (loompy aligns rows by ``Gene``)."""
    directory = tmp_path_factory.mktemp("loom-api-exports")
    first, second = stores["first"], stores["second"]
    np.testing.assert_array_equal(first["gene"].values, second["gene"].values)
    selected = first["selected"].values & second["selected"].values
    paths = []
    with dask.config.set(scheduler="threads"):
        for name, ds in (("a", first), ("b", second)):
            path = str(directory / f"{name}.loom")
            # the graph on request (--loom-graph): these files carry it, to test it
            write_loom(ds.assign(selected=("gene", selected)), path, block_cells=256, graph=True)
            _validate(path)
            paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def default_export(stores, tmp_path_factory) -> str:
    """The loom file as written by default: no graph."""
    path = str(tmp_path_factory.mktemp("loom-api-default") / "default.loom")
    with dask.config.set(scheduler="threads"):
        write_loom(stores["first"], path, block_cells=256)
    _validate(path)
    return path


@pytest.fixture
def loompy_isin(monkeypatch):
    """loompy 3.0.8 (its latest release) slices graphs with ``np.in1d``, which NumPy 2.4
    removed: ``view`` and ``scan`` fail on *any* loom file with a graph, loompy's own
    included. ``np.isin`` is the same function under its current name."""
    if not hasattr(np, "in1d"):
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)


def _validate(path) -> None:
    import loompy

    validator = loompy.LoomValidator()
    assert validator.validate(str(path), strictness="speconly") is True, validator.errors
    assert check_loom(path) == []


def _copy(path, tmp_path, name: str) -> str:
    target = str(tmp_path / name)
    shutil.copyfile(path, target)
    return target


def _contents(path) -> dict[str, np.ndarray]:
    import loompy

    with loompy.connect(path, "r") as lc:
        return {
            "matrix": lc[:, :],
            "log2p1": lc.layers["log2p1"][:, :],
            "CellID": lc.ca.CellID,
            "X_umap": lc.ca.X_umap,
            "Gene": lc.ra.Gene,
        }


# ------------------------------------------------------------------- the graph in the store


def test_knn_graph_does_not_depend_on_chunks(stores):
    first, rechunked = stores["first"], stores["rechunked"]
    for name in ("knn_landmark", "knn_weight", "X_umap"):
        np.testing.assert_array_equal(first[name].values, rechunked[name].values)
    assert first["knn_landmark"].dtype == np.int32 and first["knn_weight"].dtype == np.float32
    assert first.sizes["knn"] == K
    assert distumap._format.check_store(first) == []


def test_knn_graph_is_the_exact_nearest_landmarks(stores):
    ds = stores["first"]
    store = store_of(ds)
    model = _model_io.from_arrays(*read_group(store, MODEL_GROUP))
    features = _model.project(model, distumap.pp.log2p1(ds).values).astype(np.float64)
    landmark_cells = np.flatnonzero(ds["landmark"].values)
    np.testing.assert_array_equal(features[landmark_cells], model.landmark_features)
    distances = np.sqrt(((features[:, None, :] - features[None, landmark_cells, :]) ** 2).sum(-1))
    # a landmark's neighbours are the nearest *other* landmarks
    distances[landmark_cells, np.arange(len(landmark_cells))] = np.inf
    nearest = landmark_cells[np.argsort(distances, axis=1, kind="stable")[:, :K]]

    neighbours, weights = ds["knn_landmark"].values, ds["knn_weight"].values
    assert neighbours.shape == weights.shape == (N_CELLS, K)
    np.testing.assert_array_equal(np.sort(neighbours, axis=1), np.sort(nearest, axis=1))
    assert ds["landmark"].values[neighbours].all()
    assert (neighbours != np.arange(N_CELLS)[:, None]).all()
    assert ((weights > 0) & (weights <= 1)).all()
    # nearest first: weights fall along each row, as the distances rise
    assert (np.diff(weights, axis=1) <= 0).all()
    rows = np.arange(N_CELLS)[:, None]
    assert (
        np.diff(distances[rows, np.searchsorted(landmark_cells, neighbours)], axis=1) >= 0
    ).all()


def test_re_embedding_with_another_k_replaces_the_graph(tmp_path):
    with dask.config.set(scheduler="threads"):
        ds = _store(tmp_path, 3, 200)
        store = store_of(ds)
        before = ds["knn_landmark"].values  # lazy: read it before the store changes
        again = tl.umap(store, **{**EMBED, "n_neighbors": K + 3})
        assert again.sizes["knn"] == K + 3
        assert again["landmark"].values[again["knn_landmark"].values].all()
        assert distumap._format.check_store(again) == []
        back = tl.umap(store, **EMBED)
    np.testing.assert_array_equal(back["knn_landmark"].values, before)


def test_loom_col_graph_holds_the_store_graph(stores, exports):
    import loompy

    want = knn_graph(stores["first"])
    with loompy.connect(exports[0], "r") as lc:
        graph = lc.col_graphs["KNN"]
        assert graph.shape == (N_CELLS, N_CELLS) and graph.nnz == N_CELLS * K
        np.testing.assert_array_equal(np.bincount(graph.row, minlength=N_CELLS), K)
        assert (lc.ca.Landmark[graph.col] == 1).all()
        assert ((graph.data > 0) & (graph.data <= 1)).all()
        np.testing.assert_array_equal(graph.row, want.row)
        np.testing.assert_array_equal(graph.col, want.col)
        np.testing.assert_array_equal(graph.data, want.data)


# ------------------------------------------------------------------- loompy's walkthrough


def test_connect_slice_layers_attributes(stores, exports, tmp_path):
    import loompy

    ds = stores["first"]
    selected = stores["first"]["selected"].values & stores["second"]["selected"].values
    expected = ds["counts"].values[:, selected].T
    path = _copy(exports[0], tmp_path, "walk.loom")
    with loompy.connect(path) as lc:
        assert lc.shape == expected.shape
        np.testing.assert_array_equal(lc[:, :], expected)
        np.testing.assert_array_equal(lc[0:10, 0:10], expected[0:10, 0:10])
        np.testing.assert_array_equal(lc[[0, 5, 9], :], expected[[0, 5, 9]])
        landmarks = lc.ca.Landmark == 1
        np.testing.assert_array_equal(lc[:, landmarks], expected[:, landmarks])
        assert sorted(lc.layers.keys()) == ["", "log2p1"]
        np.testing.assert_array_equal(
            lc.layers["log2p1"][:, 0:10], np.log2(expected[:, 0:10] + 1).astype(np.float32)
        )
        # attributes: read, add, replace, delete; a new layer; a global attribute
        np.testing.assert_array_equal(lc.ca.CellID, ds["cell"].values)
        np.testing.assert_array_equal(lc.ra.Gene, ds["gene"].values[selected])
        lc.ca.Cluster = np.arange(lc.shape[1]) % 4
        lc.ra.Total = lc[:, :].sum(axis=1)
        lc.layers["scaled"] = lc[:, :].astype(np.float32) / 2
        lc.attrs.title = "distumap export"
        del lc.ca.Cluster
        lc.ca.Cluster = np.arange(lc.shape[1]) % 5
    _validate(path)
    with loompy.connect(path, "r") as lc:
        np.testing.assert_array_equal(lc.ca.Cluster, np.arange(N_CELLS) % 5)
        np.testing.assert_array_equal(lc.ra.Total, expected.sum(axis=1))
        np.testing.assert_array_equal(lc.layers["scaled"][:, :], expected / 2)
        assert lc.attrs.title == "distumap export"


def test_map_scan_view(exports, loompy_isin):
    import loompy

    expected = _contents(exports[0])
    matrix = expected["matrix"]
    with loompy.connect(exports[0], "r") as lc:
        means, maxima = lc.map([np.mean, np.max], axis=0, chunksize=50)
        np.testing.assert_allclose(means, matrix.mean(axis=1), rtol=1e-6)
        np.testing.assert_array_equal(maxima, matrix.max(axis=1))
        (cell_sums,) = lc.map([np.sum], axis=1, chunksize=64)
        np.testing.assert_array_equal(cell_sums, matrix.sum(axis=0))

        seen = []
        for _, selection, view in lc.scan(axis=1, batch_size=128):
            np.testing.assert_array_equal(view[:, :], matrix[:, selection])
            np.testing.assert_array_equal(
                view.layers["log2p1"][:, :], expected["log2p1"][:, selection]
            )
            np.testing.assert_array_equal(view.ca.CellID, expected["CellID"][selection])
            seen.append(selection)
        np.testing.assert_array_equal(np.concatenate(seen), np.arange(N_CELLS))
        landmark_rows = np.flatnonzero(lc.ca.Landmark == 1)
        for _, _selection, view in lc.scan(items=landmark_rows, axis=1, batch_size=64):
            assert (view.ca.Landmark == 1).all()

        view = lc.view[:, 10:20]
        assert view.shape == (matrix.shape[0], 10)
        np.testing.assert_array_equal(view[:, :], matrix[:, 10:20])
        np.testing.assert_array_equal(view.ca.X_umap, expected["X_umap"][10:20])
        # a view's graph keeps the edges between the cells it holds
        assert view.col_graphs["KNN"].shape == (10, 10)


def test_permute_and_graphs(exports, tmp_path):
    import loompy

    expected = _contents(exports[0])
    path = _copy(exports[0], tmp_path, "permute.loom")
    ordering = np.random.default_rng(0).permutation(N_CELLS)
    with loompy.connect(path) as lc:
        before = lc.col_graphs["KNN"]
        lc.permute(ordering, axis=1)
        np.testing.assert_array_equal(lc[:, :], expected["matrix"][:, ordering])
        np.testing.assert_array_equal(lc.layers["log2p1"][:, :], expected["log2p1"][:, ordering])
        np.testing.assert_array_equal(lc.ca.CellID, expected["CellID"][ordering])
        # the graph follows its cells: old column c is now column position[c]
        position = np.argsort(ordering)
        after = lc.col_graphs["KNN"]
        want = sparse.coo_matrix(
            (before.data, (position[before.row], position[before.col])), shape=before.shape
        )
        assert (after.tocsr() != want.tocsr()).nnz == 0
        # graphs: add one, read it back, remove it
        lc.row_graphs["identity"] = sparse.identity(lc.shape[0], format="coo", dtype=np.float32)
        lc.col_graphs["self"] = sparse.identity(lc.shape[1], format="coo", dtype=np.float32)
        assert sorted(lc.col_graphs.keys()) == ["KNN", "self"]
        assert lc.row_graphs["identity"].nnz == lc.shape[0]
        del lc.col_graphs["self"]
    _validate(path)


def test_add_columns_extends_the_export(exports, tmp_path):
    import loompy

    a, b = (_contents(path) for path in exports)
    path = _copy(exports[0], tmp_path, "grown.loom")
    with loompy.connect(exports[1], "r") as other, loompy.connect(path) as lc:
        batch = slice(0, 150)
        lc.add_columns(
            {"": other[:, batch], "log2p1": other.layers["log2p1"][:, batch]},
            {key: values[batch] for key, values in other.ca.items()},
        )
        assert lc.shape == (a["matrix"].shape[0], N_CELLS + 150)
        np.testing.assert_array_equal(lc[:, :], np.hstack([a["matrix"], b["matrix"][:, batch]]))
        np.testing.assert_array_equal(
            lc.ca.CellID, np.concatenate([a["CellID"], b["CellID"][batch]])
        )
        # the graph keeps its edges (among the first cells) and takes the new shape
        assert lc.col_graphs["KNN"].shape == (N_CELLS + 150, N_CELLS + 150)
    _validate(path)


def test_add_loom(exports, tmp_path):
    import loompy

    a, b = (_contents(path) for path in exports)
    path = _copy(exports[0], tmp_path, "added.loom")
    with loompy.connect(exports[0], "r") as first:
        graph = first.col_graphs["KNN"]
    with loompy.connect(path) as lc:
        # include_graphs=True is broken in loompy 3.0.8 for any file (it sizes the merged graph
        # from the already grown file); without it the graph keeps the first file's edges
        lc.add_loom(exports[1], key="Gene", batch_size=100)
        np.testing.assert_array_equal(lc[:, :], np.hstack([a["matrix"], b["matrix"]]))
        np.testing.assert_array_equal(
            lc.layers["log2p1"][:, :], np.hstack([a["log2p1"], b["log2p1"]])
        )
        grown = lc.col_graphs["KNN"]
        assert grown.shape == (2 * N_CELLS, 2 * N_CELLS)
        np.testing.assert_array_equal(grown.row, graph.row)
        np.testing.assert_array_equal(grown.col, graph.col)
    _validate(path)


@pytest.mark.xfail(
    not hasattr(np, "in1d"),
    reason="loompy 3.0.8 slices graphs with np.in1d, removed in NumPy 2.4",
    raises=AttributeError,
    strict=True,
)
def test_view_of_a_file_with_graphs_without_the_numpy_shim(exports):
    import loompy

    with loompy.connect(exports[0], "r") as lc:
        assert lc.view[:, 0:10].shape[1] == 10


def test_the_default_export_views_and_scans_without_a_shim(default_export):
    """No graph by default, so loompy's view and scan work under the installed NumPy as they
    are (no ``np.in1d`` shim), and the graph groups are there, empty."""
    import loompy

    matrix = _contents(default_export)["matrix"]
    with loompy.connect(default_export, "r") as lc:
        assert list(lc.col_graphs.keys()) == list(lc.row_graphs.keys()) == []
        view = lc.view[:, 10:20]
        np.testing.assert_array_equal(view[:, :], matrix[:, 10:20])
        seen = []
        for _, selection, view in lc.scan(axis=1, batch_size=128):
            np.testing.assert_array_equal(view[:, :], matrix[:, selection])
            seen.append(selection)
        np.testing.assert_array_equal(np.concatenate(seen), np.arange(N_CELLS))
    with h5py.File(default_export, "r") as f:
        assert "row_graphs" in f and "col_graphs" in f


def test_scan_without_graphs_needs_no_shim(exports):
    # the workaround for loompy users on NumPy >= 2.4: leave the graphs out of the scan
    import loompy

    matrix = _contents(exports[0])["matrix"]
    with loompy.connect(exports[0], "r") as lc:
        what = ["col_attrs", "row_attrs", "layers"]
        for _, selection, view in lc.scan(axis=1, batch_size=128, what=what):
            np.testing.assert_array_equal(view[:, :], matrix[:, selection])


def test_combine_two_exports(exports, tmp_path):
    import anndata
    import loompy

    a, b = (_contents(path) for path in exports)
    out = str(tmp_path / "combined.loom")
    loompy.combine(list(exports), out, key="Gene")
    _validate(out)
    combined = _contents(out)
    np.testing.assert_array_equal(combined["matrix"], np.hstack([a["matrix"], b["matrix"]]))
    np.testing.assert_array_equal(combined["log2p1"], np.hstack([a["log2p1"], b["log2p1"]]))
    np.testing.assert_array_equal(combined["CellID"], np.concatenate([a["CellID"], b["CellID"]]))
    np.testing.assert_array_equal(combined["X_umap"], np.vstack([a["X_umap"], b["X_umap"]]))
    np.testing.assert_array_equal(combined["Gene"], a["Gene"])
    with h5py.File(out, "r") as f:
        assert f["matrix"].maxshape[1] is None  # and it can grow again
    # the combined file can be combined again, and anndata still reads it
    again = str(tmp_path / "again.loom")
    loompy.combine([out, exports[1]], again, key="Gene")
    assert _contents(again)["matrix"].shape[1] == 3 * N_CELLS
    adata = anndata.io.read_loom(out)
    assert adata.shape == (2 * N_CELLS, a["matrix"].shape[0])
    np.testing.assert_array_equal(adata.obsm["X_umap"], combined["X_umap"])


def test_a_new_loom_built_from_an_export(exports, tmp_path, loompy_isin):
    import loompy

    a = _contents(exports[0])
    path = str(tmp_path / "new.loom")
    with loompy.new(path) as lc, loompy.connect(exports[0], "r") as source:
        for _, _selection, view in source.scan(axis=1, batch_size=128):
            lc.add_columns(view.layers, col_attrs=view.ca, row_attrs=view.ra)
    _validate_spec(path)
    np.testing.assert_array_equal(_contents(path)["matrix"], a["matrix"])


def _validate_spec(path) -> None:
    import loompy

    validator = loompy.LoomValidator()
    assert validator.validate(str(path), strictness="speconly") is True, validator.errors

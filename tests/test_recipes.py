"""scanpy's standard recipe, distributed: exact against scanpy, lazy, recorded, and embedded."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import distumap
from distumap import pp, tl
from distumap._errors import InputError
from distumap._format import check_store
from distumap.testing import synthetic_counts, write_dataset

HVG_COLUMNS = ("means", "dispersions", "dispersions_norm")


class CountingScheduler:
    """A dask scheduler that fails on any compute (after xarray's ``raise_if_dask_computes``)."""

    def __init__(self):
        self.total_computes = 0

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        raise RuntimeError(f"compute number {self.total_computes}: nothing may compute")


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    # all-zero genes (NaN dispersions), all-zero cells (a zero size factor) and, with these
    # seeds, a bin of mean expression that holds a single gene
    return synthetic_counts(701, 300, seed=3, zero_genes=7, zero_cells=5).counts


def _dataset(counts: np.ndarray, chunk: int) -> xr.Dataset:
    return xr.Dataset(
        {"counts": (("cell", "gene"), da.from_array(counts, chunks=(chunk, -1)))},
        coords={
            "cell": [f"c{i}" for i in range(counts.shape[0])],
            "gene": [f"g{j}" for j in range(counts.shape[1])],
        },
    )


def _scanpy(counts: np.ndarray, n_top_genes: int, target_sum: float = 1e4):
    """scanpy's recipe on an in-memory AnnData: its ``var`` and the normalised log values."""
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(counts.copy())
    with warnings.catch_warnings():
        # scanpy's own: zero-count cells, and n_top_genes above the genes with a dispersion
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
        logged = np.asarray(adata.X).copy()
        sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
    return adata.var, logged


@pytest.mark.parametrize(("n_top_genes", "chunk"), [(50, 64), (120, 97), (290, 701), (400, 97)])
def test_highly_variable_genes_equal_scanpys(counts, n_top_genes, chunk):
    var, logged = _scanpy(counts, n_top_genes)
    ours = pp.highly_variable_genes(_dataset(counts, chunk), n_top_genes=n_top_genes)
    ours = ours.compute(scheduler="threads")
    np.testing.assert_array_equal(ours["highly_variable"].values, var["highly_variable"].values)
    for name in HVG_COLUMNS:
        expected = var[name].to_numpy()
        assert ours[name].dtype == expected.dtype, name
        np.testing.assert_allclose(ours[name].values, expected, rtol=2e-6, atol=1e-6, err_msg=name)
    assert np.isnan(ours["dispersions"].values).sum() >= 7  # the all-zero genes
    np.testing.assert_array_equal(ours["counts_per_cell"].values, counts.sum(axis=1))
    np.testing.assert_array_equal(
        ours["zero_fraction"].values, (counts == 0).mean(axis=0).astype(np.float32)
    )
    # the features: log1p of the normalised counts of the chosen genes, as scanpy's X
    ds = _dataset(counts, chunk).assign(selected=ours["highly_variable"])
    features = pp.normalize_log1p(ds, target_sum=1e4)
    assert features.dtype == np.float32
    selected = var["highly_variable"].to_numpy()
    np.testing.assert_allclose(features.values, logged[:, selected], rtol=1e-6, atol=1e-6)


def test_the_recipe_builds_graphs_and_computes_nothing(counts):
    ds = _dataset(counts, 64)
    scheduler = CountingScheduler()
    with dask.config.set(scheduler=scheduler):
        hvg = pp.highly_variable_genes(ds, n_top_genes=50)
        totals = pp.total_counts(ds)
        mask = np.zeros(counts.shape[1], dtype=bool)
        mask[::3] = True
        features = pp.normalize_log1p(ds.assign(selected=("gene", mask)), target_sum=1e4)
    assert scheduler.total_computes == 0
    for array in (*(hvg[name].data for name in hvg.data_vars), totals.data, features.data):
        assert isinstance(array, da.Array)
    assert features.shape == (counts.shape[0], int(mask.sum()))
    layers = list(hvg["means"].data.dask.layers)
    assert any(name.startswith("gene-moments-") for name in layers)
    assert any(name.startswith("seurat-dispersions-") for name in layers)
    assert totals.data.name.startswith("cell-totals-")
    assert features.data.name.startswith("normalize-log1p-")
    assert features.data.numblocks == (len(ds["counts"].data.chunks[0]), 1)


def test_bad_recipe_settings_are_refused(tmp_path):
    with pytest.raises(InputError, match="recipe"):
        pp.preprocess(str(tmp_path / "none.zarr"), recipe="seurat")
    with pytest.raises(InputError, match="n_top_genes"):
        pp.preprocess(str(tmp_path / "none.zarr"), recipe="scanpy", n_top_genes=0)


def test_cli_flags_reach_the_preprocess_stage():
    from distumap.cli import _preprocess_kwargs, build_parser

    for command in (["preprocess", "s.zarr"], ["run", "m.csv", "--out", "o"]):
        args = build_parser().parse_args(
            [*command, "--recipe", "scanpy", "--n-top-genes", "100", "--target-sum", "1e6"]
        )
        kwargs = _preprocess_kwargs(args)
        assert (kwargs["recipe"], kwargs["n_top_genes"], kwargs["target_sum"]) == (
            "scanpy",
            100,
            1e6,
        )
    # unset flags leave the settings to the dask config
    kwargs = _preprocess_kwargs(build_parser().parse_args(["preprocess", "s.zarr"]))
    assert kwargs["recipe"] is None and kwargs["n_top_genes"] is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["preprocess", "s.zarr", "--recipe", "seurat"])


def test_preprocess_with_the_scanpy_recipe_records_and_writes_it(tmp_path):
    data = synthetic_counts(400, 250, seed=5, zero_genes=3, zero_cells=2)
    matrix, _ = write_dataset(tmp_path / "in", data)
    store = str(tmp_path / "store.zarr")
    default = pp.preprocess(distumap.io.read_csv(matrix, store, chunk_cells=64))
    default_selected = default["selected"].values.copy()
    with dask.config.set({"distumap.recipe": "scanpy", "distumap.n-top-genes": 60}):
        out = pp.preprocess(store)
    var, logged = _scanpy(data.counts, 60)
    record = out.attrs["distumap"]["stages"]["preprocess"]
    assert record["params"] == {"recipe": "scanpy", "n_top_genes": 60, "target_sum": 1e4}
    assert record["genes_selected"] == int(var["highly_variable"].sum())
    assert pp.recipe_of(out) == "scanpy" and check_store(out) == []
    np.testing.assert_array_equal(out["selected"].values, var["highly_variable"].values)
    for name in HVG_COLUMNS:
        np.testing.assert_allclose(out[name].values, var[name].to_numpy(), rtol=2e-6, atol=1e-6)
    totals = out["counts_per_cell"]
    assert totals.dtype == np.float64 and totals.encoding["chunks"] == (64,)
    # the embed's features come from the cache of the selected genes and the stored totals
    features = pp.features(out.drop_vars("counts"))
    np.testing.assert_allclose(
        features.values, logged[:, out["selected"].values], rtol=1e-6, atol=1e-6
    )
    # the default recipe again: its variables exactly as before, the scanpy ones gone
    back = pp.preprocess(store)
    np.testing.assert_array_equal(back["selected"].values, default_selected)
    assert not any(name in back for name in (*HVG_COLUMNS, "counts_per_cell"))
    assert back.attrs["distumap"]["stages"]["preprocess"]["params"] == {"max_zero_fraction": 0.5}
    np.testing.assert_array_equal(
        pp.features(back).values,
        np.log2(data.counts[:, default_selected] + 1.0).astype(np.float32),
    )


def _label_agreement(points: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(points)
    neighbours = index.kneighbors(points, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


def test_embedding_with_the_scanpy_recipe_separates_the_populations(tmp_path):
    from sklearn.decomposition import PCA

    data = synthetic_counts(1500, 600, seed=11, zero_cells=3)
    matrix, metadata = write_dataset(tmp_path / "in", data)
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, tmp_path / "s.zarr", metadata=metadata, chunk_cells=256)
        ds = pp.preprocess(ds, recipe="scanpy", n_top_genes=200)
        ds = tl.umap(ds, landmarks=500, pca=10, n_neighbors=15)
    labels = np.asarray(data.metadata["subclass_label"])
    var, logged = _scanpy(data.counts, 200)
    np.testing.assert_array_equal(ds["selected"].values, var["highly_variable"].values)
    # the labels' agreement among the exact features' neighbours (their PCA, all cells) is
    # what an embedding can keep; a random layout keeps about a tenth of it
    exact = PCA(10, random_state=0).fit_transform(logged[:, var["highly_variable"].to_numpy()])
    ours, reachable = _label_agreement(ds["X_umap"].values, labels), _label_agreement(exact, labels)
    assert ours >= 0.85 * reachable, (ours, reachable)
    assert ds.attrs["distumap"]["stages"]["preprocess"]["params"]["recipe"] == "scanpy"
    # the AnnData export carries scanpy's var columns and the recipe in uns
    import anndata

    with dask.config.set(scheduler="threads"):
        distumap.io.write(ds, tmp_path / "out.h5ad")
    exported = anndata.read_h5ad(tmp_path / "out.h5ad")
    hv = var[var["highly_variable"]]
    assert exported.var["highly_variable"].all() and list(exported.var_names) == list(
        ds["gene"].values[ds["selected"].values]
    )
    for name in HVG_COLUMNS:
        np.testing.assert_allclose(exported.var[name], hv[name], rtol=2e-6, atol=1e-6)
    assert exported.uns["distumap"]["stages"]["preprocess"]["params"]["recipe"] == "scanpy"

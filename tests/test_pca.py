"""PCA of all cells: exact against scikit-learn, chunk-invariant, lazy, and used by the embed."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import distumap
from distumap import pp, tl
from distumap._errors import InputError
from distumap.testing import synthetic_counts, write_dataset
from distumap.tl._params import embed_params
from distumap.tl._pca import covariance_moments, pca_from_moments


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    counts = synthetic_counts(701, 120, seed=4, zero_cells=3).counts
    return np.log2(counts + 1.0).astype(np.float32)


def _pca(values: np.ndarray, chunk: int, n_components: int):
    moments = covariance_moments(da.from_array(values, chunks=(chunk, -1)))
    return pca_from_moments(moments.compute(scheduler="sync"), len(values), n_components)


def _same_up_to_sign(ours: np.ndarray, theirs: np.ndarray, **tolerance) -> None:
    signs = np.sign(np.sum(ours * theirs, axis=1))
    np.testing.assert_allclose(ours * signs[:, None], theirs, **tolerance)


def test_pca_of_all_cells_equals_sklearns(values):
    from sklearn.decomposition import PCA

    reference = PCA(n_components=10, svd_solver="full").fit(values.astype(np.float64))
    mean, components, variances = _pca(values, 97, 10)  # a ragged last chunk
    np.testing.assert_allclose(mean, reference.mean_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variances, reference.explained_variance_, rtol=1e-6)
    _same_up_to_sign(components, reference.components_, atol=1e-5)
    # scikit-learn's sign convention: each component's largest entry is positive
    largest = np.abs(components).argmax(axis=1)
    assert (components[np.arange(10), largest] > 0).all()


def test_pca_of_all_cells_does_not_depend_on_chunks(values):
    mean, components, variances = _pca(values, 64, 10)
    for chunk in (97, 701):
        other_mean, other_components, other_variances = _pca(values, chunk, 10)
        np.testing.assert_allclose(other_mean, mean, rtol=1e-12)
        np.testing.assert_allclose(other_variances, variances, rtol=1e-10)
        np.testing.assert_allclose(other_components, components, atol=1e-9)


def test_covariance_moments_build_a_graph_and_compute_nothing(values):
    def refuse(dsk, keys, **kwargs):
        raise RuntimeError("nothing may compute")

    with dask.config.set(scheduler=refuse):
        moments = covariance_moments(da.from_array(values, chunks=(64, -1)))
    assert moments.shape == (1 + values.shape[1], values.shape[1])
    assert any(name.startswith("pca-moments-") for name in moments.dask.layers)


def test_pca_fit_setting_is_checked_and_recorded_only_when_not_the_default():
    assert "pca_fit" not in embed_params()
    assert embed_params(pca_fit="all")["pca_fit"] == "all"
    with dask.config.set({"distumap.pca-fit": "all"}):
        assert embed_params()["pca_fit"] == "all"
    with pytest.raises(InputError, match="pca_fit"):
        embed_params(pca_fit="some")
    with pytest.raises(InputError, match="pca > 0"):
        embed_params(pca_fit="all", pca=0)


def test_pca_fit_flag_reaches_the_embed():
    from distumap.cli import _embed_kwargs, build_parser

    for command in (["embed", "s.zarr"], ["run", "m.csv", "--out", "o"]):
        args = build_parser().parse_args([*command, "--pca-fit", "all"])
        assert _embed_kwargs(args)["pca_fit"] == "all"
    assert _embed_kwargs(build_parser().parse_args(["embed", "s.zarr"]))["pca_fit"] is None


def test_embed_fits_the_pca_on_all_cells(tmp_path):
    data = synthetic_counts(600, 150, seed=6, zero_cells=2)
    matrix, _ = write_dataset(tmp_path / "in", data)
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, tmp_path / "s.zarr", chunk_cells=64)
        ds = tl.umap(
            pp.preprocess(ds), pca_fit="all", landmarks=200, pca=8, n_neighbors=10, refine_epochs=0
        )
    features = pp.features(ds).values
    mean, components, _ = pca_from_moments(
        covariance_moments(da.from_array(features, chunks=(100, -1))).compute(), len(features), 8
    )
    store = ds.encoding["distumap_store"]
    stored = zarr.open_group(store, mode="r")["umap_model"]
    np.testing.assert_allclose(stored["pca_mean"][:], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored["pca_components"][:], components, atol=1e-5)
    record = ds.attrs["distumap"]["stages"]["embed"]
    assert record["params"]["pca_fit"] == "all"
    assert np.isfinite(ds["X_umap"].values).all()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One small dataset embedded with 8 PCs in two chunkings, refined and not."""
    tmp = tmp_path_factory.mktemp("pca-results")
    matrix, _ = write_dataset(tmp / "in", synthetic_counts(600, 150, seed=6, zero_cells=2))
    out = {}
    with dask.config.set(scheduler="threads"):
        for chunk, refine in ((64, 2), (150, 2), (64, 0)):
            ds = distumap.io.read_csv(matrix, tmp / f"s{chunk}-{refine}.zarr", chunk_cells=chunk)
            out[chunk, refine] = tl.umap(
                pp.preprocess(ds), landmarks=200, pca=8, n_neighbors=10, refine_epochs=refine
            )
    return out


def test_the_embed_keeps_every_cells_principal_components(embedded):
    from sklearn.decomposition import PCA

    ds = embedded[64, 2]
    model = zarr.open_group(ds.encoding["distumap_store"], mode="r")["umap_model"]
    mean, components = model["pca_mean"][:], model["pca_components"][:]
    features = pp.features(ds).values
    assert ds["X_pca"].shape == (600, 8) and ds["X_pca"].dtype == np.float32
    np.testing.assert_allclose(ds["X_pca"].values, (features - mean) @ components.T, atol=1e-5)
    # the same bits whatever the chunks, with or without the refinement
    for other in (embedded[150, 2], embedded[64, 0]):
        np.testing.assert_array_equal(other["X_pca"].values, ds["X_pca"].values)
    # every gene's loadings: the selected genes' components, 0 for the others
    selected = ds["selected"].values
    np.testing.assert_array_equal(ds["PCs"].values[selected], components.T)
    assert not ds["PCs"].values[~selected].any()
    # the variances are the landmark fit's, as scikit-learn gives them
    landmarks = ds["landmark"].values
    reference = PCA(n_components=8, random_state=999).fit(features[landmarks])
    np.testing.assert_allclose(ds["pca_variance"], reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(
        ds["pca_variance_ratio"], reference.explained_variance_ratio_, rtol=1e-4
    )


def test_the_pca_of_all_cells_gives_its_variance_ratios(tmp_path):
    from sklearn.decomposition import PCA

    matrix, _ = write_dataset(tmp_path / "in", synthetic_counts(400, 120, seed=2))
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, tmp_path / "s.zarr", chunk_cells=128)
        ds = tl.umap(pp.preprocess(ds), pca_fit="all", landmarks=150, pca=6, refine_epochs=0)
    reference = PCA(n_components=6, svd_solver="full").fit(pp.features(ds).values.astype(float))
    np.testing.assert_allclose(ds["pca_variance"], reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(
        ds["pca_variance_ratio"], reference.explained_variance_ratio_, rtol=1e-4
    )


def test_a_re_embed_without_pca_drops_the_components(embedded, tmp_path):
    import shutil

    store = tmp_path / "again.zarr"
    shutil.copytree(embedded[64, 0].encoding["distumap_store"], store)
    with dask.config.set(scheduler="threads"):
        ds = tl.umap(str(store), landmarks=200, pca=0, n_neighbors=10, refine_epochs=0)
    assert not {"X_pca", "PCs", "pca_variance", "pca_variance_ratio"} & set(ds.variables)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_the_anndata_exports_carry_the_pca_as_scanpy_keeps_it(embedded, tmp_path, suffix):
    import anndata

    ds = embedded[64, 2]
    path = tmp_path / f"e{suffix}"
    with dask.config.set(scheduler="threads"):
        distumap.io.write(ds, path)
    adata = anndata.read_h5ad(path) if suffix == ".h5ad" else anndata.read_zarr(path)
    selected = ds["selected"].values
    np.testing.assert_array_equal(adata.obsm["X_pca"], ds["X_pca"].values)
    np.testing.assert_array_equal(adata.varm["PCs"], ds["PCs"].values[selected])
    np.testing.assert_array_equal(adata.uns["pca"]["variance"], ds["pca_variance"].values)
    ratio = adata.uns["pca"]["variance_ratio"]
    np.testing.assert_array_equal(ratio, ds["pca_variance_ratio"].values)
    assert (np.diff(ratio) <= 0).all() and ratio.sum() < 1
    assert adata.uns["pca"]["params"]["zero_center"]

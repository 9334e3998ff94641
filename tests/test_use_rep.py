"""--use-rep: an AnnData obsm array read into the store, embedded as it is, exported by its key."""

from __future__ import annotations

import subprocess
import sys
import warnings

import dask
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import distumap
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import check_store, stages

N_CELLS, N_GENES, N_DIMS = 600, 30, 8
SIZES = (300, 200, 100)  # three populations of different sizes
EMBED = {"landmarks": 200, "n_neighbors": 15, "refine_epochs": 5}


def _atlas():
    """A small AnnData as an atlas ships: integer counts in X, a float32 scVI-like
    representation with cluster structure in obsm, and a label per cell."""
    import anndata

    rng = np.random.default_rng(20)
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    centres = rng.normal(scale=6.0, size=(len(SIZES), N_DIMS))
    rep = (centres[labels] + rng.normal(size=(N_CELLS, N_DIMS))).astype(np.float32)
    counts = rng.poisson(2.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(N_CELLS)]
    adata.var_names = [f"gene{j}" for j in range(N_GENES)]
    adata.obs["population"] = [f"p{label}" for label in labels]
    adata.obsm["X_scVI"] = rep
    adata.obsm["X_int"] = rng.integers(0, 5, size=(N_CELLS, 3))
    with_nan = rep.copy()
    with_nan[500, 3] = np.nan
    adata.obsm["X_nan"] = with_nan
    adata.obsm["X_frame"] = pd.DataFrame({"a": rep[:, 0]}, index=adata.obs_names)
    return adata


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """The atlas as ``.h5ad`` and as AnnData zarr, written by anndata itself."""
    directory = tmp_path_factory.mktemp("use-rep")
    adata = _atlas()
    h5ad, zarr_path = directory / "atlas.h5ad", directory / "atlas.zarr"
    adata.write_h5ad(h5ad)
    with warnings.catch_warnings():
        # anndata's notice that its default zarr format will change: the v2 it writes is wanted
        warnings.filterwarnings("ignore", "Writing zarr v2 data", UserWarning)
        adata.write_zarr(zarr_path)
    return adata, {"h5ad": h5ad, "zarr": zarr_path}


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_the_representation_alone_is_read_exactly_and_no_counts(tmp_path, atlas, kind):
    adata, paths = atlas
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read(paths[kind], tmp_path / "s.zarr", use_rep="X_scVI", chunk_cells=128)
    assert "counts" not in ds and check_store(ds) == []
    assert ds["rep"].dims == ("cell", "rep_dim") and ds["rep"].dtype == np.float32
    assert ds["rep"].attrs["obsm_key"] == "X_scVI"
    assert ds["rep"].data.chunks[0][0] == 128  # read in store chunks, like the counts
    np.testing.assert_array_equal(ds["rep"].values, adata.obsm["X_scVI"])
    np.testing.assert_array_equal(ds["cell"].values, adata.obs_names)
    assert list(ds["population"].values) == list(adata.obs["population"])
    params = stages(ds)["ingest"]["params"]
    assert params["use_rep"] == "X_scVI" and params["counts"] is False


def _label_agreement(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    neighbours = index.kneighbors(embedding, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


def test_embedding_of_a_representation_does_not_depend_on_chunks_or_workers(
    tmp_path, atlas, loopback_cluster
):
    _, paths = atlas

    def embedded(name: str, chunk_cells: int, **embed):
        store = tmp_path / f"{name}.zarr"
        ds = distumap.io.read(paths["h5ad"], store, use_rep="X_scVI", chunk_cells=chunk_cells)
        return distumap.tl.umap(distumap.pp.preprocess(ds), **EMBED, **embed)

    with dask.config.set(scheduler="threads"):
        # a store without counts: the embed takes its representation by default
        small = embedded("small", 128)  # 5 chunks, one process
    with loopback_cluster.client():
        large = embedded("large", 250, use_rep="X_scVI")  # 3 chunks, two worker processes
    for ds in (small, large):  # the preprocess had nothing to compute
        assert stages(ds)["preprocess"]["genes_selected"] == 0
        assert stages(ds)["embed"]["params"]["use_rep"] == "X_scVI"
        assert check_store(ds) == []
    reference = small["X_umap"].values
    np.testing.assert_array_equal(large["X_umap"].values, reference)
    np.testing.assert_array_equal(large["landmark"].values, small["landmark"].values)
    for name in ("knn_cell", "knn_distance", "knn_cell_weight"):  # the graph too
        np.testing.assert_array_equal(large[name].values, small[name].values, err_msg=name)
    # a floor, not a snapshot: the populations stay apart
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    assert _label_agreement(reference, labels) > 0.95
    # an export writes the selected genes' counts, which these stores do not hold
    with pytest.raises(IncompleteStoreError, match="--use-rep X_scVI --with-counts"):
        distumap.io.write(small, tmp_path / "out.h5ad")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distumap.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_run_embeds_the_representation_and_every_export_carries_it(
    tmp_path, atlas, loopback_cluster
):
    import anndata
    import loompy

    adata, paths = atlas
    out = tmp_path / "out"
    cluster = ["--no-progress", "--scheduler-file", str(loopback_cluster.scheduler_file)]
    result = _cli(
        "run", str(paths["zarr"]), "--out", str(out), "--use-rep", "X_scVI",
        "--formats", "h5ad,zarr,loom", "--chunk-cells", "256", "--landmarks", "200",
        "--n-neighbors", "15", "--refine-epochs", "5", *cluster,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = adata.obsm["X_scVI"]
    for name, read in (
        ("embedding.h5ad", anndata.read_h5ad),
        ("embedding.zarr", anndata.read_zarr),
    ):
        exported = read(out / name)
        np.testing.assert_array_equal(exported.obsm["X_scVI"], expected, err_msg=name)
        assert exported.obsm["X_scVI"].dtype == np.float32
        assert exported.obsm["X_umap"].shape == (N_CELLS, 2)
        # the exports need the counts, so run read them: X holds the selected genes'
        np.testing.assert_array_equal(exported.X.toarray(), adata.X.toarray())
        assert exported.uns["neighbors"]["params"]["use_rep"] == "X_scVI"
    with loompy.connect(str(out / "embedding.loom"), "r") as loom:
        np.testing.assert_array_equal(loom.ca["X_scVI"], expected)
    records = stages(distumap.io.open_store(out / "store.zarr", require="embed"))
    assert records["ingest"]["params"]["counts"] is True
    assert records["embed"]["params"]["use_rep"] == "X_scVI"
    assert records["embed"]["params"]["pca"] == 0
    # a key the file lacks: exit 2 with one line naming the file, the key and the keys there are
    refused = _cli(
        "ingest", str(paths["h5ad"]), str(tmp_path / "s.zarr"), "--use-rep", "X_harmony", *cluster
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"distumap: error: {paths['h5ad']}: --use-rep X_harmony: obsm has no 'X_harmony' "
        "(obsm keys: X_frame, X_int, X_nan, X_scVI)"
    )
    assert not (tmp_path / "s.zarr").exists()


def _wrong_length(path) -> None:
    """obsm/X_scVI one row short (anndata itself refuses to write such a file)."""
    with h5py.File(path, "r+") as f:
        values = f["obsm/X_scVI"][:-1]
        attrs = dict(f["obsm/X_scVI"].attrs)
        del f["obsm/X_scVI"]
        f["obsm"].create_dataset("X_scVI", data=values)
        f["obsm/X_scVI"].attrs.update(attrs)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("X_harmony", "obsm has no 'X_harmony' (obsm keys: X_frame, X_int, X_nan, X_scVI)"),
        ("X_int", "dataset obsm/X_int holds int64 values, not floats"),
        ("X_frame", "obsm/X_frame is a dataframe, not a dense array of floats"),
        ("X_umap", "the exports write the new embedding under obsm['X_umap']"),
    ],
)
def test_a_representation_that_cannot_be_embedded_is_refused_before_any_work(
    tmp_path, atlas, key, message
):
    _, paths = atlas
    with pytest.raises(
        InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        distumap.io.read(paths["h5ad"], tmp_path / "s.zarr", use_rep=key)
    assert not (tmp_path / "s.zarr").exists()


def test_a_wrong_length_or_a_value_not_finite_is_refused_naming_file_and_key(tmp_path, atlas):
    import shutil

    _, paths = atlas
    short = tmp_path / "short.h5ad"
    shutil.copy(paths["h5ad"], short)
    _wrong_length(short)
    with pytest.raises(InputError) as refused:
        distumap.io.read(short, tmp_path / "s.zarr", use_rep="X_scVI")
    assert str(refused.value) == (
        f"{short}: --use-rep X_scVI: dataset obsm/X_scVI has {N_CELLS - 1} rows, but obs has "
        f"{N_CELLS} cells"
    )
    assert not (tmp_path / "s.zarr").exists()
    # a NaN is found by the block that reads it; the counts are not read, the ingest not done
    store = tmp_path / "nan.zarr"
    with dask.config.set(scheduler="threads"), pytest.raises(InputError) as refused:
        distumap.io.read(paths["h5ad"], store, use_rep="X_nan", counts=True, chunk_cells=128)
    assert str(refused.value) == (
        f"{paths['h5ad']}: --use-rep X_nan: dataset obsm/X_nan: a value that is not finite as "
        "float32 (nan) for cell 500, column 3"
    )
    assert stages(distumap.io.open_store(store, require=None))["ingest"]["status"] == "started"
    assert not distumap.io.open_store(store, require=None)["counts"].any()
    with pytest.raises(IncompleteStoreError):
        distumap.pp.preprocess(store)


def test_use_rep_refuses_what_it_cannot_do(tmp_path, atlas):
    from distumap.testing import synthetic_counts, write_dataset

    _, paths = atlas
    matrix, _ = write_dataset(tmp_path / "csv", synthetic_counts(50, 20, seed=1))
    with pytest.raises(InputError, match="a csv input holds no representations"):
        distumap.io.read(matrix, tmp_path / "csv.zarr", use_rep="X_scVI")
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read(paths["h5ad"], tmp_path / "both.zarr", use_rep="X_scVI", counts=True)
        ds = distumap.pp.preprocess(ds)
        with pytest.raises(InputError, match="a representation is embedded as it is"):
            distumap.tl.umap(ds, use_rep="X_scVI", pca=10)
        with pytest.raises(InputError, match="the store holds no representation 'X_pca'"):
            distumap.tl.umap(ds, use_rep="X_pca")
    # with counts the default embed is the genes' (the recipe's features), as ever
    assert "counts" in ds and "rep" in ds and check_store(ds) == []


def test_flags_reach_the_api_and_contradictions_exit_2_before_a_cluster(tmp_path, atlas, capsys):
    from distumap.cli import _embed_kwargs, build_parser, main

    _, paths = atlas
    for command in (["embed", "s.zarr"], ["run", "a.h5ad", "--out", "o"]):
        args = build_parser().parse_args([*command, "--use-rep", "X_scVI"])
        assert _embed_kwargs(args)["use_rep"] == "X_scVI"
    out = tmp_path / "out"
    assert (
        main(["run", str(paths["h5ad"]), "--out", str(out), "--use-rep", "X_scVI", "--pca", "10"])
        == 2
    )
    assert "--use-rep X_scVI: a representation is embedded as it is" in capsys.readouterr().err
    assert main(["ingest", str(paths["h5ad"]), str(tmp_path / "s.zarr"), "--with-counts"]) == 2
    assert "--with-counts goes with --use-rep" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.zarr").exists()

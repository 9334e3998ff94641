"""Embed: landmark sampling, chunk- and worker-invariant coordinates, quality against a full fit."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr

import distumap
from distumap import tl
from distumap.testing import SyntheticSpec, synthetic_counts, write_dataset

N_CELLS, N_GENES = 1500, 300
EMBED = {"landmarks": 500, "pca": 10, "n_neighbors": 15, "transform_epochs": 60}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("embed-data")
    data = synthetic_counts(N_CELLS, N_GENES, seed=11, zero_cells=3)
    matrix, metadata = write_dataset(directory, data)
    return data, matrix, metadata


def _embedded(tmp_path, dataset, chunk_cells: int, name: str, **embed) -> xr.Dataset:
    _, matrix, metadata = dataset
    store = tmp_path / f"{name}.zarr"
    ds = distumap.io.read_csv(matrix, store, metadata=metadata, chunk_cells=chunk_cells)
    ds = distumap.pp.preprocess(ds)
    return tl.umap(ds, **{**EMBED, **embed})


def test_uniform_landmarks_are_seeded_and_exact_in_number():
    ds = xr.Dataset(coords={"cell": np.arange(1000).astype(str)})
    a = tl.landmarks(ds, 100, seed=1).values
    assert a.sum() == 100
    np.testing.assert_array_equal(a, tl.landmarks(ds, 100, seed=1).values)
    assert not np.array_equal(a, tl.landmarks(ds, 100, seed=2).values)
    assert tl.landmarks(ds, 5000).values.all()  # more landmarks than cells: every cell


def test_stratified_landmarks_represent_rare_groups():
    groups = np.array(["big"] * 9000 + ["mid"] * 900 + ["rare"] * 20 + ["tiny"] * 3)
    ds = xr.Dataset(coords={"cell": np.arange(len(groups)).astype(str), "label": ("cell", groups)})
    mask = tl.landmarks(ds, 500, stratify="label", seed=0, min_per_group=50).values
    assert mask.sum() == 500
    chosen = {g: int((groups[mask] == g).sum()) for g in ("big", "mid", "rare", "tiny")}
    assert chosen["rare"] == 20 and chosen["tiny"] == 3  # whole small groups
    assert chosen["mid"] >= 50 and chosen["big"] > chosen["mid"]
    uniform = tl.landmarks(ds, 500, seed=0).values
    assert (groups[uniform] == "rare").sum() < 20  # what stratifying buys


def test_embedding_does_not_depend_on_chunks_or_workers(tmp_path, dataset, local_client):
    with dask.config.set(scheduler="threads"):
        small = _embedded(tmp_path, dataset, 64, "small")
        large = _embedded(tmp_path, dataset, 700, "large")
    on_cluster = _embedded(tmp_path, dataset, 250, "cluster")  # two worker processes
    reference = small["X_umap"].values
    assert reference.shape == (N_CELLS, 2) and np.isfinite(reference).all()
    np.testing.assert_array_equal(large["X_umap"].values, reference)
    np.testing.assert_array_equal(on_cluster["X_umap"].values, reference)
    np.testing.assert_array_equal(small["landmark"].values, on_cluster["landmark"].values)
    assert int(small["landmark"].sum()) == EMBED["landmarks"]
    stages = on_cluster.attrs["distumap"]["stages"]
    assert stages["embed"]["status"] == "complete"
    assert stages["embed"]["landmarks_used"] == EMBED["landmarks"]


def _label_agreement(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    neighbours = index.kneighbors(embedding, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


@pytest.mark.slow
def test_quality_floor_against_a_full_fit(tmp_path):
    import umap
    from sklearn.manifold import trustworthiness

    # enough genes that a full fit separates the populations (agreement ~0.75 here)
    data = synthetic_counts(N_CELLS, 2000, seed=11)
    dataset = (data, *write_dataset(tmp_path / "quality-data", data))
    with dask.config.set(scheduler="threads"):
        ds = _embedded(
            tmp_path, dataset, 256, "quality", pca=30, landmarks=600, transform_epochs=30
        )
    features = np.log2(data.counts[:, ds["selected"].values] + 1.0).astype(np.float32)
    full = umap.UMAP(n_neighbors=15, min_dist=0.25, random_state=999).fit_transform(features)
    labels = np.asarray(data.metadata["subclass_label"])
    ours, theirs = _label_agreement(ds["X_umap"].values, labels), _label_agreement(full, labels)
    assert ours >= 0.97 * theirs, (ours, theirs)
    sample = np.random.default_rng(0).choice(N_CELLS, 1000, replace=False)
    t_ours = trustworthiness(features[sample], ds["X_umap"].values[sample], n_neighbors=15)
    t_full = trustworthiness(features[sample], full[sample], n_neighbors=15)
    assert t_ours >= t_full - 0.03, (t_ours, t_full)


def test_embed_resumes_without_rewriting_blocks(tmp_path, dataset):
    with dask.config.set(scheduler="threads"):
        ds = _embedded(tmp_path, dataset, 300, "resume")
        store = ds.encoding["distumap_store"]
        before = ds["X_umap"].values.copy()
        markers = distumap._store.progress_array(store, "embed")
        # pretend the run died after three blocks: clear the others' markers and coordinates
        markers[3:] = False
        import zarr

        zarr.open_array(store, path="X_umap", mode="r+")[900:] = 0
        distumap._store.mark_stage(
            store,
            "embed",
            "started",
            ds.attrs["distumap"]["stages"]["embed"]["params"],
            token=ds.attrs["distumap"]["stages"]["embed"]["token"],
        )
        resumed = tl.umap(store, **EMBED)
    np.testing.assert_array_equal(resumed["X_umap"].values, before)
    assert resumed.attrs["distumap"]["stages"]["embed"]["status"] == "complete"


def test_embed_needs_preprocess(tmp_path, dataset):
    _, matrix, _ = dataset
    store = tmp_path / "raw.zarr"
    distumap.io.read_csv(matrix, store, chunk_cells=500)
    with pytest.raises(distumap._errors.IncompleteStoreError, match="preprocess"):
        tl.umap(str(store))


def test_spec_dataclass_is_the_demo_entry_point():
    spec = SyntheticSpec(50, 40, seed=1)
    assert synthetic_counts(50, 40, seed=1).counts.shape == (spec.n_cells, spec.n_genes)


def test_re_embedding_with_other_parameters_replaces_the_result(tmp_path, dataset):
    with dask.config.set(scheduler="threads"):
        first = _embedded(tmp_path, dataset, 500, "again")
        store = first.encoding["distumap_store"]
        before = first["X_umap"].values  # X_umap is lazy: read it before the store changes
        second = tl.umap(store, **{**EMBED, "landmarks": 300})
        assert int(second["landmark"].sum()) == 300
        assert second.attrs["distumap"]["stages"]["embed"]["params"]["landmarks"] == 300
        assert not np.array_equal(second["X_umap"].values, before)
        back = tl.umap(store, **EMBED)
    np.testing.assert_array_equal(back["X_umap"].values, before)

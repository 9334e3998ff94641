"""Embed: landmark sampling, chunk- and worker-invariant coordinates, quality against a full fit."""

from __future__ import annotations

import time

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

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


def test_stratified_landmarks_from_a_column_in_blocks():
    """The stratifying column is coded block by block where it lies (this process holds a
    code per cell, not the strings): in blocks, with a group first seen in the last one, it
    picks the landmarks the column in memory picks."""
    import dask.array as da

    rng = np.random.default_rng(2)
    groups = rng.choice(np.array(["b", "a", "c"], dtype=object), 5_000)
    groups[-7:] = "late"
    cells = np.arange(len(groups)).astype(str)
    in_memory = xr.Dataset(coords={"cell": cells, "label": ("cell", groups)})
    in_blocks = in_memory.assign_coords(label=("cell", da.from_array(groups, chunks=512)))
    picked = tl.landmarks(in_memory, 300, stratify="label", seed=4, min_per_group=5).values
    again = tl.landmarks(in_blocks, 300, stratify="label", seed=4, min_per_group=5).values
    np.testing.assert_array_equal(again, picked)
    assert picked.sum() == 300 and (groups[picked] == "late").sum() == 5


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
        # without refinement (its resumption mid-epoch is tested below): the transform's blocks
        ds = _embedded(tmp_path, dataset, 300, "resume", refine_epochs=0)
        store = ds.encoding["distumap_store"]
        before = ds["X_umap"].values.copy()
        markers = distumap._store.progress_array(store, "embed")
        # pretend the run died after three blocks: clear the others' markers and coordinates
        markers[3:] = False
        import zarr

        zarr.open_array(store, path="X_umap", mode="r+")[900:] = 0
        record = ds.attrs["distumap"]["stages"]["embed"]
        kept = {k: v for k, v in record.items() if k not in ("status", "params")}
        distumap._store.mark_stage(store, "embed", "started", record["params"], **kept)
        resumed = tl.umap(store, **EMBED, refine_epochs=0)
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


# ------------------------------------------------ the refinement over all cells (tl._refine)

REFINE = {**EMBED, "refine_epochs": 6}


def _from_the_model(ds: xr.Dataset, refine_epochs: int = 0) -> np.ndarray:
    """The embedding rebuilt in this process, in one piece, from the model in the store: the
    landmarks' fitted coordinates and the transform of the others (today's embedding), then
    ``refine_epochs`` epochs of the refinement over all cells at once."""
    from distumap.tl import _model, _model_io, _refine

    store = ds.encoding["distumap_store"]
    model = _model_io.from_arrays(*distumap._store.read_group(store, "umap_model"))
    with dask.config.set(scheduler="threads"):
        X = distumap.pp.log2p1(ds).values
    is_landmark = ds["landmark"].values
    rest = np.flatnonzero(~is_landmark)
    positions = np.empty((len(X), 2), dtype=np.float32)
    nearest = np.empty((len(X), model.n_neighbors), dtype=np.int64)
    features = np.empty((len(X), model.landmark_features.shape[1]), dtype=np.float32)
    positions[is_landmark] = model.landmark_embedding
    nearest[is_landmark], _ = _model.landmark_knn(model, np.arange(model.n_landmarks))
    features[is_landmark] = model.landmark_features
    moved = np.empty((len(rest), features.shape[1]), dtype=np.float32)
    positions[rest], nearest[rest], _ = _model.transform(
        model, X[rest], rest, return_knn=True, features_out=moved
    )
    features[rest] = moved
    if not refine_epochs:
        return positions
    settings = _refine.RefineSettings(n_epochs=refine_epochs)
    return _refine.refine_embedding(
        positions, features, is_landmark, nearest, model, settings=settings
    )


def test_refine_zero_is_the_transform_and_refining_keeps_the_knn_graph(tmp_path, dataset):
    from distumap._format import check_store

    with dask.config.set(scheduler="threads"):
        plain = _embedded(tmp_path, dataset, 300, "plain", refine_epochs=0)
        store = plain.encoding["distumap_store"]
        kept = {name: plain[name].values for name in ("X_umap", "knn_landmark", "knn_weight")}
        np.testing.assert_array_equal(kept["X_umap"], _from_the_model(plain))
        assert "refine_knn_seconds" not in plain.attrs["distumap"]["stages"]["embed"]
        assert not {"knn_cell", "knn_distance", "knn_cell_weight"} & set(plain.variables)
        refined = tl.umap(store, **REFINE)
        assert not np.array_equal(refined["X_umap"].values, kept["X_umap"])
        for name in ("knn_landmark", "knn_weight"):  # the landmark graph stays
            np.testing.assert_array_equal(refined[name].values, kept[name])
        np.testing.assert_array_equal(refined["landmark"].values, plain["landmark"].values)
        record = refined.attrs["distumap"]["stages"]["embed"]
        assert record["params"]["refine_epochs"] == 6 and record["refine_epochs_seconds"] > 0
        assert check_store(refined) == []  # the working arrays stay out of the layout
        graph = {name: refined[name].values for name in ("knn_cell", "knn_distance")}
        again = tl.umap(store, **{**REFINE, "refine_epochs": 0})  # no refinement: its graph goes
    # the refinement's graph of all cells is a result: no self-loops, nearest first
    neighbors, distances = graph["knn_cell"], graph["knn_distance"]
    assert neighbors.dtype == np.int32 and distances.dtype == np.float32
    assert neighbors.shape == (refined.sizes["cell"], refined.sizes["cell_knn"])
    assert (neighbors >= 0).all() and (neighbors != np.arange(len(neighbors))[:, None]).all()
    assert (np.diff(distances, axis=1) >= 0).all()
    assert not {"knn_cell", "knn_distance", "knn_cell_weight"} & set(again.variables)
    assert check_store(again) == []


def _search_in_passes(monkeypatch, n_passes: int) -> None:
    """The refinement's nearest cells searched in ``n_passes`` passes over the buckets."""
    budget = -(-N_CELLS * 4 * EMBED["pca"] // n_passes)
    monkeypatch.setitem(dask.config.config["distumap"], "search-pass-bytes", budget)


def test_refined_embedding_does_not_depend_on_chunks_or_workers(
    tmp_path, dataset, local_client, monkeypatch
):
    from distumap.tl import _refine_stage

    # several refinement tasks per epoch, covering different cells in each run
    monkeypatch.setattr(_refine_stage, "REFINE_TASK_CELLS", 128)
    # and the nearest cells searched in 3 passes over the buckets, each pass's task run twice
    # (a task retried after its worker died: it reads the previous pass's best, not its own)
    _search_in_passes(monkeypatch, 3)
    knn_task = _refine_stage._refine_knn_task

    def twice(*args, **kwargs):
        knn_task(*args, **kwargs)
        return knn_task(*args, **kwargs)

    with dask.config.set(scheduler="threads"):
        monkeypatch.setattr(_refine_stage, "_refine_knn_task", twice)
        small = _embedded(tmp_path, dataset, 64, "refine-small", **REFINE)  # 12 tasks an epoch
    monkeypatch.setattr(_refine_stage, "_refine_knn_task", knn_task)
    # on two workers: 6 tasks, the search in 2 passes
    _search_in_passes(monkeypatch, 2)
    on_cluster = _embedded(tmp_path, dataset, 250, "refine-cluster", **REFINE)
    reference = small["X_umap"].values
    assert np.isfinite(reference).all()
    np.testing.assert_array_equal(on_cluster["X_umap"].values, reference)
    for name in ("knn_cell", "knn_distance", "knn_cell_weight"):  # the graph too
        np.testing.assert_array_equal(on_cluster[name].values, small[name].values, err_msg=name)
    # and the whole refinement in one process, all cells in one piece
    np.testing.assert_array_equal(_from_the_model(small, refine_epochs=6), reference)
    records = [ds.attrs["distumap"]["stages"]["embed"] for ds in (small, on_cluster)]
    assert [record["refine_chunks_per_task"] for record in records] == [2, 1]
    assert [record["refine_knn_passes"] for record in records] == [3, 2]
    # the working arrays went with the stage's end; the graph is chunked as its tasks wrote it
    for ds in (small, on_cluster):
        store = zarr.open_group(ds.encoding["distumap_store"], mode="r")  # consolidated
        assert not [name for name in store["_progress"].array_keys() if name.startswith("refine-")]
    assert (
        small["knn_cell"].data.chunks[0][0] == 128
        and on_cluster["knn_cell"].data.chunks[0][0] == 250
    )
    # the workers dropped their copies of the positions and the index after the stage
    # (sent without waiting: give the workers a moment)
    held = None
    for _ in range(50):
        held = local_client.run(_refine_caches_held)
        if not any(held.values()):
            break
        time.sleep(0.1)
    assert len(held) == 2 and not any(held.values())


def _refine_caches_held() -> int:
    from distumap.tl import _refine_stage

    caches = (_refine_stage._SEARCH, _refine_stage._POSITIONS, _refine_stage._ROWS)
    return sum(len(cache._items) for cache in caches)


def test_refinement_resumes_mid_epoch(tmp_path, dataset, monkeypatch):
    from distumap.tl import _embed, _refine_stage

    monkeypatch.setattr(_refine_stage, "REFINE_TASK_CELLS", 300)  # 5 chunks of 300: 5 tasks a step
    _search_in_passes(monkeypatch, 2)
    epoch_task = _refine_stage._refine_epoch_task

    def dies_in_epoch_3(first, last, *args, epoch, **kwargs):
        if epoch == 3 and first >= 600:  # a worker lost in the middle of epoch 3
            raise RuntimeError("worker lost")
        return epoch_task(first, last, *args, epoch=epoch, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    with dask.config.set(scheduler="threads"):
        monkeypatch.setattr(_refine_stage, "_refine_epoch_task", dies_in_epoch_3)
        with pytest.raises(RuntimeError, match="worker lost"):
            _embedded(tmp_path, dataset, 300, "refine-resume", **REFINE)
        store = str(tmp_path / "refine-resume.zarr")
        record = distumap._store.stage_record(store, "embed")
        assert record["status"] == "started"
        steps = distumap._store.progress_array(store, _refine_stage.REFINE_MARKERS, mode="r")[:]
        # transform (5), kNN in 2 passes (10), graph (1: 8 tasks' cells) and epochs 0-2 (15)
        # done; epoch 3 not, nor later ones
        assert len(steps) == 5 + 2 * 5 + 1 + 5 * 5 and steps[:31].all() and not steps[33:].any()
        # and no chunk of X_umap vouched for: only the last epoch writes it
        assert not distumap._store.progress_array(store, "embed", mode="r")[:].any()
        monkeypatch.setattr(_refine_stage, "_refine_epoch_task", epoch_task)
        monkeypatch.setattr(_embed, "_transform_task", never)
        monkeypatch.setattr(_refine_stage, "_refine_knn_task", never)
        monkeypatch.setattr(_refine_stage, "_refine_graph_task", never)
        # the stage keeps its own layout
        monkeypatch.setattr(_refine_stage, "REFINE_TASK_CELLS", 600)
        _search_in_passes(monkeypatch, 1)
        resumed = tl.umap(store, **REFINE)
    assert resumed.attrs["distumap"]["stages"]["embed"]["status"] == "complete"
    np.testing.assert_array_equal(resumed["X_umap"].values, _from_the_model(resumed, 6))


def test_a_refinement_without_its_working_arrays_or_graph_step_starts_again(tmp_path):
    from distumap.tl import _refine_stage

    store = str(tmp_path / "store.zarr")
    zarr.open_group(store, mode="w").require_group("_progress")
    assert _refine_stage.resumable(store, {})  # an embed without refinement
    layout = _refine_stage.refine_layout(10, 1024, 5, 10 * 1024, 8)
    assert not _refine_stage.resumable(store, layout)  # its working arrays went
    _refine_stage.create_scratch(store, 10 * 1024, 1024, layout["refine_chunks_per_task"], 8)
    assert _refine_stage.resumable(store, layout)
    # markers numbered without the graph's step: resuming would skip it
    assert not _refine_stage.resumable(store, {"refine_chunks_per_task": 32})


def test_refinement_needs_principal_components(tmp_path):
    from distumap._errors import InputError
    from distumap.tl._params import embed_params

    with pytest.raises(InputError, match="pca"):
        tl.umap(str(tmp_path / "never-read.zarr"), pca=0, refine_epochs=5)
    # by default, pca=0 (the tutorial's raw genes) embeds without refinement
    assert embed_params(pca=0)["refine_epochs"] == 0
    assert embed_params(pca=10)["refine_epochs"] > 0


@pytest.mark.slow
def test_refinement_places_transformed_cells_as_well_as_landmarks():
    from distumap.tl import _model, _refine

    # 2,000 cells of 20 subclasses, 400 landmarks: the transformed cells sit clearly worse
    data = synthetic_counts(2000, 3000, seed=1)
    counts = data.counts
    X = np.log2(counts[:, (counts == 0).mean(axis=0) < 0.5] + 1.0).astype(np.float32)
    labels = np.asarray(data.metadata["subclass_label"])
    is_landmark = np.zeros(len(X), dtype=bool)
    is_landmark[np.random.default_rng(1).choice(len(X), 400, replace=False)] = True
    rows, rest = np.flatnonzero(is_landmark), np.flatnonzero(~is_landmark)
    model = _model.fit_landmark_model(X[rows], n_pca=20, n_neighbors=15, transform_epochs=30)
    positions = np.empty((len(X), 2), dtype=np.float32)
    nearest = np.empty((len(X), 15), dtype=np.int64)
    features = np.empty((len(X), 20), dtype=np.float32)
    positions[rows], features[rows] = model.landmark_embedding, model.landmark_features
    nearest[rows], _ = _model.landmark_knn(model, np.arange(len(rows)))
    moved = np.empty((len(rest), 20), dtype=np.float32)
    positions[rest], nearest[rest], _ = _model.transform(
        model, X[rest], rest, return_knn=True, features_out=moved
    )
    features[rest] = moved
    refined = _refine.refine_embedding(
        positions, features, is_landmark, nearest, model, settings=_refine.RefineSettings()
    )

    def agreement(embedding, cells):
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=16).fit(embedding)
        neighbours = index.kneighbors(embedding[cells], return_distance=False)[:, 1:]
        return float((labels[neighbours] == labels[cells, None]).mean())

    landmarks_before = agreement(positions, rows)
    transformed_before, transformed_after = agreement(positions, rest), agreement(refined, rest)
    assert transformed_before < landmarks_before  # the issue: 0.787 against 0.821 here
    # measured on data seeds 0-4: +0.071 to +0.099 (0.076 here), and every time above the
    # landmarks' agreement before refinement
    assert transformed_after >= transformed_before + 0.04, (transformed_before, transformed_after)
    assert transformed_after >= landmarks_before, (landmarks_before, transformed_after)


def test_the_transform_takes_fewer_epochs_when_the_refinement_follows():
    from distumap.tl._params import TRANSFORM_EPOCHS, TRANSFORM_EPOCHS_REFINED, embed_params

    assert TRANSFORM_EPOCHS_REFINED < TRANSFORM_EPOCHS
    assert embed_params()["transform_epochs"] == TRANSFORM_EPOCHS_REFINED
    assert embed_params(refine_epochs=0)["transform_epochs"] == TRANSFORM_EPOCHS
    assert embed_params(pca=0)["transform_epochs"] == TRANSFORM_EPOCHS  # no refinement there
    assert embed_params(transform_epochs=7)["transform_epochs"] == 7
    with dask.config.set({"distumap.transform-epochs": 12}):
        assert embed_params(refine_epochs=0)["transform_epochs"] == 12


def test_prepared_workers_take_the_fit_and_it_is_the_same_fit(tmp_path, dataset, local_client):
    from distributed import get_task_stream

    tl.prepare_workers(local_client)
    workers = sorted(local_client.scheduler_info()["workers"])
    with get_task_stream(local_client) as stream:
        prepared = _embedded(tmp_path, dataset, 250, "prepared")
    fits = [task["worker"] for task in stream.data if str(task["key"]).startswith("umap-fit")]
    assert fits == [workers[0]]  # the worker that imported umap-learn in the background
    with dask.config.set(scheduler="threads"):
        reference = _embedded(tmp_path, dataset, 64, "reference")
    np.testing.assert_array_equal(prepared["X_umap"].values, reference["X_umap"].values)


@pytest.mark.parametrize(
    ("part", "compiled", "imports_umap"),
    [("kernels", "_exact_knn_block", False), ("umap", "_project_rows", True)],
)
def test_each_warm_up_part_compiles_its_own_kernels(part, compiled, imports_umap):
    # a fresh process: in this one, other tests have compiled everything already
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from distumap.tl import _model\n"
        f"_model.warm_up_fit({part!r})\n"
        f"print(bool(_model.{compiled}.signatures), 'umap' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(part == "kernels"), str(imports_umap)]

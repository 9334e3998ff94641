"""write_loom: the loom contract, exact values, every scheduler, and no half-written file."""

from __future__ import annotations

import time

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import xarray as xr

from distumap._errors import IncompleteStoreError, InputError
from distumap._format import check_loom, written_by_distumap
from distumap._progress import TOPIC
from distumap.io.writers.loom import knn_graph, write_loom

N_CELLS, N_GENES, CHUNK, KNN = 3_000, 300, 1_024, 5


def make_dataset(
    n_cells: int = N_CELLS, n_genes: int = N_GENES, chunk: int = CHUNK, seed: int = 0
) -> xr.Dataset:
    """A finished store in memory: zero genes and cells, a ragged last chunk, str and numeric
    metadata (with a missing value and non-ASCII text)."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(1, 0.6, size=(n_cells, n_genes)).astype(np.int32)
    counts[rng.random((n_cells, n_genes)) < 0.5] = 0
    counts[:, ::7] = 0  # all-zero genes
    counts[::11] = 0  # all-zero cells
    counts[5, 3] = 2**31 - 2  # a large count survives exactly
    zero_fraction = (counts == 0).mean(axis=0).astype(np.float32)
    selected = zero_fraction < 0.9
    subclass = np.array([f"type {i % 23}" for i in range(n_cells)], dtype=object)
    subclass[7] = "naïve T ✓"
    depth = rng.normal(size=n_cells)
    depth[3] = np.nan
    landmark = rng.random(n_cells) < 0.1
    # each cell's KNN nearest landmarks (as cell indices) and weights, as the embed stage writes
    knn_landmark = rng.choice(np.flatnonzero(landmark), size=(n_cells, KNN)).astype(np.int32)
    knn_weight = rng.uniform(0.01, 1, size=(n_cells, KNN)).astype(np.float32)
    ds = xr.Dataset(
        {
            "counts": (("cell", "gene"), da.from_array(counts, chunks=(chunk, n_genes))),
            "zero_fraction": ("gene", zero_fraction),
            "selected": ("gene", selected),
            "X_umap": (
                ("cell", "umap"),
                da.from_array(rng.normal(size=(n_cells, 2)).astype(np.float32), chunks=(chunk, 2)),
            ),
            "landmark": ("cell", da.from_array(landmark, chunks=chunk)),
            "knn_landmark": (("cell", "knn"), da.from_array(knn_landmark, chunks=(chunk, KNN))),
            "knn_weight": (("cell", "knn"), da.from_array(knn_weight, chunks=(chunk, KNN))),
        },
        coords={
            "cell": [f"cell_{i:05d}" for i in range(n_cells)],
            "gene": [f"Gene{i}" for i in range(n_genes)],
            "subclass_label": ("cell", subclass),
            "class_label": (
                "cell",
                np.array(["GABA", "Glut", "Non-neuronal"])[np.arange(n_cells) % 3],
            ),
            "depth": ("cell", depth),
            "n_reads": ("cell", np.arange(n_cells, dtype=np.int64) * 10),
        },
        attrs={
            "distumap": {
                "version": "0.1.0",
                "stages": {
                    "ingest": {"status": "complete", "params": {"chunk_cells": chunk}},
                    "preprocess": {"status": "complete", "params": {"max_zero_fraction": 0.9}},
                    "embed": {"status": "complete", "params": {"landmarks": 300, "seed": 999}},
                },
            }
        },
    )
    return ds


@pytest.fixture(scope="module")
def dataset() -> xr.Dataset:
    return make_dataset()


def _validate(path) -> None:
    import loompy

    validator = loompy.LoomValidator()
    ok = validator.validate(str(path), strictness="speconly")
    assert ok is True, validator.errors
    assert validator.errors == []
    assert check_loom(path) == []


def _assert_contents(path, ds: xr.Dataset, *, graph: bool = True) -> None:
    import loompy

    counts = ds["counts"].values
    selected = ds["selected"].values
    expected = counts[:, selected].T
    with loompy.connect(str(path), "r") as lc:
        matrix = lc[:, :]
        assert matrix.dtype == np.int32
        np.testing.assert_array_equal(matrix, expected)
        layer = lc.layers["log2p1"][:, :]
        assert layer.dtype == np.float32
        np.testing.assert_array_equal(layer, np.log2(expected + 1).astype(np.float32))
        np.testing.assert_array_equal(lc.ra["Gene"], ds["gene"].values[selected])
        np.testing.assert_array_equal(lc.ra["ZeroFraction"], ds["zero_fraction"].values[selected])
        np.testing.assert_array_equal(lc.ca["CellID"], ds["cell"].values)
        np.testing.assert_array_equal(lc.ca["X_umap"], ds["X_umap"].values)
        np.testing.assert_array_equal(lc.ca["Landmark"], ds["landmark"].values.astype(int))
        np.testing.assert_array_equal(lc.ca["subclass_label"], ds["subclass_label"].values)
        np.testing.assert_array_equal(lc.ca["class_label"], ds["class_label"].values)
        np.testing.assert_array_equal(lc.ca["depth"], ds["depth"].values)
        np.testing.assert_array_equal(lc.ca["n_reads"], ds["n_reads"].values)
        assert lc.attrs["LOOM_SPEC_VERSION"] == "3.0.0"
        assert "max_zero_fraction" in lc.attrs["distumap_preprocess_params"]
        if not graph:
            assert list(lc.col_graphs.keys()) == list(lc.row_graphs.keys()) == []
            return
        edges = lc.col_graphs["KNN"]
        want = knn_graph(ds)
        np.testing.assert_array_equal(edges.row, want.row)
        np.testing.assert_array_equal(edges.col, want.col)
        np.testing.assert_array_equal(edges.data, want.data)
        assert edges.data.dtype == np.float32 and edges.shape == (len(counts), len(counts))


def _matrix_and_layer(path) -> tuple[np.ndarray, ...]:
    """The matrix, the layer and the kNN graph's a, b and w, as stored."""
    names = ("matrix", "layers/log2p1", "col_graphs/KNN/a", "col_graphs/KNN/b", "col_graphs/KNN/w")
    with h5py.File(path, "r") as f:
        return tuple(f[name][()] for name in names if name in f)


def test_threaded_scheduler_writes_a_valid_exact_loom(dataset, tmp_path):
    path = tmp_path / "embedding.loom"
    with dask.config.set(scheduler="threads"):
        assert write_loom(dataset, path, graph=True) == str(path)
    _validate(path)
    _assert_contents(path, dataset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding.loom"]
    with h5py.File(path, "r") as f:
        assert f["matrix"].chunks == (min(512, int(dataset["selected"].sum())), 256)
        assert f["matrix"].compression == "gzip" and f["matrix"].shuffle
        assert f["layers/log2p1"].compression == "gzip" and not f["layers/log2p1"].shuffle
        assert f["row_graphs"].keys() == set()
        assert f["col_graphs"].keys() == {"KNN"}
        assert h5py.check_string_dtype(f["col_attrs/CellID"].dtype).length is None
        # extendable along cells, as loompy's add_columns and combine need
        n_genes = f["matrix"].shape[0]
        assert f["matrix"].maxshape == f["layers/log2p1"].maxshape == (n_genes, None)
        for name in ("CellID", "X_umap", "Landmark", "subclass_label", "depth"):
            assert f["col_attrs"][name].maxshape[0] is None
        for name in "abw":
            edges = f["col_graphs/KNN"][name]
            assert edges.shape == (N_CELLS * KNN,) and edges.maxshape == (None,)
            assert edges.chunks == (256 * KNN,)
        assert f["col_graphs/KNN/a"].dtype == f["col_graphs/KNN/b"].dtype == np.int32
        assert f["col_graphs/KNN/w"].dtype == np.float32


def test_the_graph_is_written_only_when_asked(dataset, tmp_path):
    path = tmp_path / "embedding.loom"
    with dask.config.set(scheduler="threads"):
        write_loom(dataset, path)
    _validate(path)
    _assert_contents(path, dataset, graph=False)
    with h5py.File(path, "r") as f:  # the groups loom requires, empty
        assert f["row_graphs"].keys() == f["col_graphs"].keys() == set()
        assert '"graph": false' in f["attrs/distumap_export_params"][()].decode()


def test_anndata_reads_embedding_and_metadata(dataset, tmp_path):
    import anndata

    path = tmp_path / "embedding.loom"
    write_loom(dataset, path, block_cells=512)
    adata = anndata.io.read_loom(path)
    assert adata.shape == (N_CELLS, int(dataset["selected"].sum()))
    np.testing.assert_array_equal(adata.obs_names, dataset["cell"].values)
    np.testing.assert_array_equal(adata.obsm["X_umap"], dataset["X_umap"].values)
    np.testing.assert_array_equal(adata.obs["subclass_label"], dataset["subclass_label"].values)
    np.testing.assert_array_equal(adata.obs["n_reads"], dataset["n_reads"].values)
    np.testing.assert_array_equal(adata.var_names, dataset["gene"].values[dataset["selected"]])
    # anndata reads X as float32 by default (the large count rounds like any float32 does)
    np.testing.assert_array_equal(
        adata.X.toarray(),
        dataset["counts"].values[:, dataset["selected"].values].astype(np.float32),
    )
    np.testing.assert_array_equal(
        adata.layers["log2p1"].toarray(),
        np.log2(dataset["counts"].values[:, dataset["selected"].values] + 1).astype(np.float32),
    )


@pytest.mark.parametrize("block_cells", [100, 700, 1_024, 5_000])
def test_block_size_does_not_change_contents(dataset, tmp_path, block_cells):
    reference = tmp_path / "reference.loom"
    path = tmp_path / f"blocks-{block_cells}.loom"
    write_loom(dataset, reference, block_cells=1_024, graph=True)
    write_loom(dataset, path, block_cells=block_cells, graph=True)
    _validate(path)
    for got, want in zip(_matrix_and_layer(path), _matrix_and_layer(reference), strict=True):
        np.testing.assert_array_equal(got, want)


def test_column_attributes_written_in_many_blocks_and_chunks(dataset, tmp_path, monkeypatch):
    """The per-cell attributes come in blocks the client appends in order, chunk by chunk: a
    block size and an HDF5 chunk that divide no other (and the cell count) change nothing."""
    from distumap.io.writers import _cells, loom

    monkeypatch.setattr(_cells, "CELL_BLOCK", 97)
    monkeypatch.setattr(loom, "ATTR_CHUNK", 40)
    path = tmp_path / "small-blocks.loom"
    write_loom(dataset, path, graph=True)
    _validate(path)
    _assert_contents(path, dataset)
    with h5py.File(path, "r") as f:
        assert f["col_attrs/CellID"].chunks == (40,)


@pytest.mark.cluster
def test_worker_processes_give_the_same_file(dataset, tmp_path, local_client):
    path = tmp_path / "cluster.loom"
    reference = tmp_path / "threads.loom"
    write_loom(dataset, path, client=local_client, graph=True)
    with dask.config.set(scheduler="threads"):
        write_loom(dataset, reference, client=None, graph=True)
    _validate(path)
    _assert_contents(path, dataset)
    for got, want in zip(_matrix_and_layer(path), _matrix_and_layer(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    prefixes = {key[0] if isinstance(key, tuple) else key for key in _task_keys(local_client)}
    assert any(str(prefix).startswith("loom-block-") for prefix in prefixes)
    # the blocks of this file (3 of 1,024 cells) reported to the dashboard's progress topic
    events = [msg for _, msg in local_client.get_events(TOPIC) if msg["stage"] == "export"]
    assert {(msg["block"], msg["total"]) for msg in events} >= {(0, 3), (1, 3), (2, 3)}


def _task_keys(client) -> list:
    def keys(dask_scheduler):  # run on the scheduler: the keys of the tasks it has seen
        return [ts.key for ts in dask_scheduler.tasks.values()] + [
            key for key, *_ in dask_scheduler.transition_log
        ]

    return client.run_on_scheduler(keys)


def _failing(block):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize(
    ("existing", "on_cluster"),
    [(False, False), (True, False), pytest.param(False, True, marks=pytest.mark.cluster)],
)
def test_failure_leaves_nothing_at_path(dataset, tmp_path, existing, on_cluster, request):
    client = request.getfixturevalue("local_client") if on_cluster else None
    path = tmp_path / "embedding.loom"
    if existing:  # an older export of ours, which a failed export must leave as it was
        write_loom(dataset, path, block_cells=CHUNK)
        older = path.read_bytes()
    counts = dataset["counts"].data
    # the third block fails after two were written
    poisoned = counts.map_blocks(
        lambda block, block_info=None: (
            _failing(block) if block_info[0]["chunk-location"][0] == 2 else block
        ),
        dtype=counts.dtype,
    )
    # without the preprocess cache, so that the writer reads the poisoned counts
    broken = dataset.drop_vars("selected_counts", errors="ignore").assign(
        counts=(("cell", "gene"), poisoned)
    )
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_loom(broken, path, block_cells=CHUNK, client=client)
    if existing:
        assert path.read_bytes() == older
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["embedding.loom"] if existing else [])


def test_refuses_to_replace_a_file_it_did_not_write(dataset, tmp_path):
    path = tmp_path / "thesis.loom"
    path.write_bytes(b"three years of work")
    with pytest.raises(InputError, match="not a distumap loom"):
        write_loom(dataset, path, block_cells=CHUNK)
    assert path.read_bytes() == b"three years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.loom"]
    path.unlink()
    write_loom(dataset, path, block_cells=CHUNK)
    assert written_by_distumap(path)
    write_loom(dataset, path, block_cells=CHUNK)  # its own export is replaced
    _validate(path)


def test_fsspec_memory_target(dataset, tmp_path, capsys):
    import fsspec

    url = "memory://distumap-test/embedding.loom"
    assert write_loom(dataset, url, block_cells=2_048, progress=True, graph=True) == url
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [
        "distumap export: embedding.loom: block 1/2 written",
        "distumap export: embedding.loom: block 2/2 written",
    ]
    assert lines[2].startswith(f"distumap export: {url} written in")
    fs = fsspec.filesystem("memory")
    local = tmp_path / "copy.loom"
    local.write_bytes(fs.cat_file("/distumap-test/embedding.loom"))
    fs.rm("/distumap-test", recursive=True)
    _validate(local)
    _assert_contents(local, dataset)


def test_missing_embedding_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="X_umap"):
        write_loom(dataset.drop_vars("X_umap"), tmp_path / "x.loom")
    assert list(tmp_path.iterdir()) == []


def test_a_store_without_knn_graph_exports_without_one(dataset, tmp_path):
    path = tmp_path / "no-graph.loom"
    write_loom(dataset.drop_vars(["knn_landmark", "knn_weight"]), path, graph=True)
    _validate(path)
    with h5py.File(path, "r") as f:
        assert f["col_graphs"].keys() == set()


def test_cell_subset_with_the_store_graph_is_refused(dataset, tmp_path):
    # the graph names cells by their position in the store, which a subset does not keep
    path = tmp_path / "subset.loom"
    with pytest.raises(InputError, match="not landmarks of this dataset"):
        write_loom(dataset.isel(cell=slice(1_000, None)), path, graph=True)
    assert not path.exists()
    write_loom(dataset.isel(cell=slice(1_000, None)), path)  # no graph asked: nothing to refuse
    _validate(path)
    subset = dataset.isel(cell=slice(1_000, None)).drop_vars(["knn_landmark", "knn_weight"])
    write_loom(subset, path)
    _validate(path)


def test_knn_graph_is_the_stores_graph(dataset):
    graph = knn_graph(dataset)
    assert graph.shape == (N_CELLS, N_CELLS) and graph.nnz == N_CELLS * KNN
    np.testing.assert_array_equal(graph.row, np.repeat(np.arange(N_CELLS), KNN))
    np.testing.assert_array_equal(graph.col, dataset["knn_landmark"].values.ravel())
    np.testing.assert_array_equal(graph.data, dataset["knn_weight"].values.ravel())
    with pytest.raises(IncompleteStoreError, match="kNN graph"):
        knn_graph(dataset.drop_vars("knn_weight"))


def test_without_selection_every_gene_is_written(tmp_path):
    ds = make_dataset(n_cells=300, n_genes=40, chunk=128).drop_vars("selected")
    path = tmp_path / "all.loom"
    write_loom(ds, path)
    _validate(path)
    matrix, *_ = _matrix_and_layer(path)
    np.testing.assert_array_equal(matrix, ds["counts"].values.T)


def test_a_single_writer_prints_twenty_progress_lines_not_one_per_block(capsys):
    from distumap.io.writers._blocks import block_written

    for i in range(977):
        block_written("out/embedding.loom", i, 977, True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 21  # every 48 blocks, and the last
    assert lines[0] == "distumap export: embedding.loom: block 48/977 written"
    assert lines[-1] == "distumap export: embedding.loom: block 977/977 written"
    block_written("out/embedding.loom", 0, 977, False)
    assert capsys.readouterr().err == ""


def _before_embed(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as the preprocess leaves it: no embedding, graph or embed record."""
    attrs = {"distumap": {**ds.attrs["distumap"]}}
    attrs["distumap"]["stages"] = {
        k: v for k, v in attrs["distumap"]["stages"].items() if k != "embed"
    }
    dropped = ds.drop_vars(["X_umap", "landmark", "knn_landmark", "knn_weight"])
    return dropped.assign_attrs(attrs)


@pytest.mark.cluster
def test_count_layers_first_then_the_embedding(dataset, tmp_path, local_client, capsys):
    """With ``embedded``, the count layers are written from a store without an embedding while
    the embed runs; the file is the one written from the embedded store, byte for byte in its
    arrays, with the embed's record."""
    import threading
    from concurrent.futures import Future

    path, reference = tmp_path / "early.loom", tmp_path / "reference.loom"
    write_loom(dataset, reference, client=local_client, graph=True)
    embedded: Future = Future()
    written = {}
    writer = threading.Thread(
        target=lambda: written.update(
            path=write_loom(
                _before_embed(dataset),
                path,
                client=local_client,
                embedded=embedded,
                progress=True,
                graph=True,
            )
        )
    )
    writer.start()
    deadline = time.monotonic() + 30
    while "block 3/3 written" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the count layers were not written before the embedding"
    assert writer.is_alive() and not path.exists()  # waiting for the embedding, not done
    embedded.set_result(dataset)
    writer.join(timeout=60)
    assert written["path"] == str(path)
    _validate(path)
    _assert_contents(path, dataset)
    for got, want in zip(_matrix_and_layer(path), _matrix_and_layer(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    with h5py.File(path, "r") as f:
        assert "landmarks" in f["attrs/distumap_embed_params"][()].decode()


@pytest.mark.cluster
def test_a_failed_embed_leaves_no_file(dataset, tmp_path, local_client):
    from concurrent.futures import Future

    embedded: Future = Future()
    embedded.set_exception(RuntimeError("the embed failed"))
    path = tmp_path / "early.loom"
    with pytest.raises(RuntimeError, match="the embed failed"):
        write_loom(_before_embed(dataset), path, client=local_client, embedded=embedded)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.cluster
def test_an_embedding_of_other_cells_is_refused(dataset, tmp_path, local_client):
    from concurrent.futures import Future

    embedded: Future = Future()
    embedded.set_result(dataset.isel(cell=slice(0, 100)))
    with pytest.raises(ValueError, match="other cells or genes"):
        write_loom(
            _before_embed(dataset), tmp_path / "x.loom", client=local_client, embedded=embedded
        )
    assert list(tmp_path.iterdir()) == []

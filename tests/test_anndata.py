"""write_h5ad / write_anndata_zarr: anndata reads them back exactly, in anndata's own layout, on
every scheduler, whatever the block size, and a failure leaves nothing at the target."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import distumap
from distumap import tl
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import CELL_GRAPH
from distumap._progress import TOPIC
from distumap.io.writers import write_anndata_zarr, write_h5ad
from distumap.pp._preprocess import log2p1_values
from distumap.testing import SEPARATED, synthetic_counts, write_dataset

N_CELLS, N_GENES, CHUNK = 1_200, 200, 256
EMBED = {"landmarks": 300, "pca": 10, "n_neighbors": 15, "min_dist": 0.3, "seed": 7}
WRITERS = {"h5ad": write_h5ad, "zarr": write_anndata_zarr}
#: floors of the exported graph's quality on this data, measured with a margin below them
#: (benchmarks/RESULTS.md, "Neighbour graph"): its kNN recall against brute force, and the
#: adjusted Rand index of leiden on it against leiden on sc.pp.neighbors of the same features
RECALL_FLOOR, ARI_FLOOR = 0.85, 0.7
SUFFIX = {"h5ad": ".h5ad", "zarr": ".zarr"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A finished store made by the real pipeline (threaded scheduler)."""
    directory = tmp_path_factory.mktemp("anndata-data")
    data = synthetic_counts(N_CELLS, N_GENES, seed=5, zero_cells=3, zero_genes=4, **SEPARATED)
    matrix, metadata = write_dataset(directory, data)
    location = directory / "store.zarr"
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, location, metadata=metadata, chunk_cells=CHUNK)
        ds = distumap.pp.preprocess(ds)
        tl.umap(ds, **EMBED)
    return str(location)


@pytest.fixture(scope="module")
def dataset(store) -> xr.Dataset:
    """The store as the export gets it, plus nasty metadata: non-ASCII and missing strings,
    NaN, integers and bools."""
    ds = distumap.io.open_store(store, require="embed")
    n_cells = ds.sizes["cell"]
    note = np.array([f"note {i % 5}" for i in range(n_cells)], dtype=object)
    note[3], note[8] = "naïve T ✓", None
    depth = np.linspace(0, 1, n_cells)
    depth[4] = np.nan
    return ds.assign_coords(
        note=("cell", note),
        depth=("cell", depth),
        n_reads=("cell", np.arange(n_cells, dtype=np.int64) * 10),
        doublet=("cell", np.arange(n_cells) % 4 == 0),
    )


def _read(fmt: str, path):
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no OldFormatWarning or any other complaint
        return anndata.read_h5ad(path) if fmt == "h5ad" else anndata.read_zarr(path)


def _write(fmt: str, ds: xr.Dataset, path, **options) -> str:
    return WRITERS[fmt](ds, path, **options)


def _assert_contents(adata, ds: xr.Dataset) -> None:
    selected = ds["selected"].values
    counts = ds["counts"].values[:, selected]
    assert adata.shape == counts.shape
    assert adata.X.format == "csr" and adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    layer = adata.layers["log2p1"]
    assert layer.format == "csr" and layer.dtype == np.float32
    np.testing.assert_array_equal(layer.toarray(), log2p1_values(counts))
    assert layer.nnz == adata.X.nnz == np.count_nonzero(counts)
    np.testing.assert_array_equal(adata.obsm["X_umap"], ds["X_umap"].values)
    assert adata.obsm["X_umap"].dtype == np.float32
    np.testing.assert_array_equal(adata.obs_names, ds["cell"].values)
    np.testing.assert_array_equal(adata.var_names, ds["gene"].values[selected])
    np.testing.assert_array_equal(adata.var["zero_fraction"], ds["zero_fraction"].values[selected])
    assert adata.var["zero_fraction"].dtype == np.float32
    assert adata.obs["landmark"].dtype == bool
    np.testing.assert_array_equal(adata.obs["landmark"], ds["landmark"].values)
    for name in ("class_label", "subclass_label", "subclass_color", "note"):
        column = adata.obs[name]
        assert isinstance(column.dtype, pd.CategoricalDtype), name
        expected = pd.Series(ds[name].values, dtype=object)
        assert column.isna().tolist() == expected.isna().tolist(), name
        np.testing.assert_array_equal(
            column.astype(object)[~expected.isna().to_numpy()],
            expected[~expected.isna()].astype(str),
        )
    assert adata.obs["note"].iloc[3] == "naïve T ✓"
    for name in ("size_factor", "depth", "n_reads", "doublet"):
        assert adata.obs[name].dtype == ds[name].dtype, name
        np.testing.assert_array_equal(adata.obs[name], ds[name].values)
    embed = ds.attrs["distumap"]["stages"]["embed"]["params"]
    params = adata.uns["umap"]["params"]
    assert set(params) == {"a", "b", "random_state"}
    assert params["random_state"] == embed["seed"] == EMBED["seed"]
    record = adata.uns["distumap"]
    assert record["version"] == ds.attrs["distumap"]["version"]
    for stage in ("ingest", "preprocess", "embed", "export"):
        assert record["stages"][stage]["status"] == "complete"
    assert record["stages"]["embed"]["params"]["min_dist"] == embed["min_dist"]


def test_open_store_reads_no_cell_until_asked(store):
    """Opening a store holds nothing per cell (at ten million cells the names alone are a
    gigabyte): the names and metadata stay lazy and ``cell`` has no index until one is set."""
    import dask.array as da

    ds = distumap.io.open_store(store, require="embed")
    assert "cell" not in ds.xindexes and "gene" in ds.xindexes
    along_cells = [name for name, var in ds.variables.items() if "cell" in var.dims]
    assert {"cell", "class_label", "landmark", "X_umap"} <= set(along_cells)
    for name in along_cells:
        assert isinstance(ds[name].variable.data, da.Array), name
    assert ds["cell"].dtype == object and isinstance(ds["cell"].values[0], str)
    name = ds["cell"].values[17]
    picked = ds.set_xindex("cell").sel(cell=name)
    np.testing.assert_array_equal(picked["X_umap"].values, ds["X_umap"].values[17])
    # a new array along cell takes the coordinates as they are, reading no name
    logged = distumap.pp.log2p1(ds)
    assert "cell" not in logged.xindexes and isinstance(logged["cell"].data, da.Array)
    assert logged.sel(gene=logged["gene"].values[:2]).shape == (ds.sizes["cell"], 2)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_per_cell_parts_written_in_many_blocks_and_chunks(dataset, tmp_path, monkeypatch, fmt):
    """obs and obsm come in blocks the client appends in order, chunk by chunk: block sizes and
    chunks that divide no other (nor the cell count), a category first seen in a later block
    and missing values change nothing that anndata reads."""
    from distumap.io.writers import _anndata_elements, _cells

    monkeypatch.setattr(_cells, "CELL_BLOCK", 97)
    monkeypatch.setattr(_anndata_elements, "ZARR_CELL_CHUNK", 130)
    monkeypatch.setattr(_anndata_elements, "H5_CHUNK_VALUES", 130)
    monkeypatch.setattr(_anndata_elements, "H5_STRING_CHUNK", 130)
    late = dataset["class_label"].values.astype(object)
    late[-5:] = "seen last"
    ds = dataset.assign_coords(late=("cell", late))
    adata = _read(fmt, _write(fmt, ds, tmp_path / f"blocks{SUFFIX[fmt]}"))
    _assert_contents(adata, ds)
    assert adata.obs["late"].cat.categories.tolist() == sorted(set(late.tolist()))
    np.testing.assert_array_equal(adata.obs["late"].astype(str), late.astype(str))
    np.testing.assert_array_equal(adata.obsm["X_pca"], ds["X_pca"].values)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_anndata_reads_back_exactly(dataset, tmp_path, fmt):
    path = tmp_path / f"embedding{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        assert _write(fmt, dataset, path) == str(path)
    _assert_contents(_read(fmt, path), dataset)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    if fmt == "h5ad":  # the layer's sparsity is X's, stored once (hard links)
        import h5py

        with h5py.File(path, "r") as f:
            for name in ("indices", "indptr"):
                assert f[f"layers/log2p1/{name}"] == f[f"X/{name}"]


def test_umap_curve_parameters_are_umap_learns(dataset, tmp_path):
    from umap.umap_ import find_ab_params

    path = tmp_path / "embedding.h5ad"
    with dask.config.set(scheduler="threads"):
        write_h5ad(dataset, path)
    params = _read("h5ad", path).uns["umap"]["params"]
    a, b = find_ab_params(1.0, EMBED["min_dist"])
    assert (params["a"], params["b"]) == (float(a), float(b))


def _layout(fmt: str, path) -> dict[str, tuple]:
    """Every element's path, encoding and dtype kind."""
    out: dict[str, tuple] = {}

    def describe(node) -> tuple:
        attrs = dict(node.attrs)
        dtype = getattr(node, "dtype", None)
        kind = None if dtype is None else np.dtype(dtype).kind
        return attrs.get("encoding-type"), attrs.get("encoding-version"), kind

    if fmt == "h5ad":
        import h5py

        def walk(group, prefix: str) -> None:  # every path (visititems skips hard links)
            for key, node in group.items():
                out[prefix + key] = describe(node)
                if isinstance(node, h5py.Group):
                    walk(node, f"{prefix}{key}/")

        with h5py.File(path, "r") as f:
            out["/"] = describe(f)
            walk(f, "")
        return out
    import zarr

    def visit(node, name: str) -> None:
        out[name or "/"] = describe(node)
        if isinstance(node, zarr.Group):
            for key, child in node.members():
                visit(child, f"{name}/{key}".lstrip("/"))

    visit(zarr.open_group(str(path), mode="r"), "")
    return out


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_layout_is_the_one_anndata_writes(dataset, tmp_path, fmt):
    path = tmp_path / f"ours{SUFFIX[fmt]}"
    reference = tmp_path / f"anndata{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        _write(fmt, dataset, path)
    adata = _read(fmt, path)
    with warnings.catch_warnings():
        # anndata 0.12: "zarr v2 ... will no longer be the default"; its own note to its users
        warnings.simplefilter("ignore", UserWarning)
        adata.write_h5ad(reference) if fmt == "h5ad" else adata.write_zarr(reference)
    ours, theirs = _layout(fmt, path), _layout(fmt, reference)
    theirs.pop("raw", None)  # anndata 0.12's zarr writes an explicit null for the absent raw
    assert ours == theirs


def _arrays(fmt: str, path) -> dict[str, np.ndarray]:
    matrices = ("X", "layers/log2p1", "obsp/distances", "obsp/connectivities")
    names = [f"{m}/{p}" for m in matrices for p in ("data", "indices", "indptr")]
    if fmt == "h5ad":
        import h5py

        with h5py.File(path, "r") as f:
            return {name: f[name][()] for name in names}
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {name: root[name][...] for name in names}


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize(("block_cells", "zarr_chunk_min"), [(100, None), (7, 64), (5_000, 64)])
def test_block_size_does_not_change_contents(
    dataset, tmp_path, monkeypatch, fmt, block_cells, zarr_chunk_min
):
    reference = tmp_path / f"reference{SUFFIX[fmt]}"
    path = tmp_path / f"blocks{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        _write(fmt, dataset, reference, block_cells=CHUNK)
        if zarr_chunk_min is not None:
            # small zarr chunks: most lie inside a block, some span many blocks
            monkeypatch.setattr("distumap.io.writers.anndata_zarr.ZARR_CHUNK_MIN", zarr_chunk_min)
        _write(fmt, dataset, path, block_cells=block_cells)
    want = _arrays(fmt, reference)
    for name, got in _arrays(fmt, path).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    _assert_contents(_read(fmt, path), dataset)


@pytest.mark.parametrize("h5ad_chunk", [1_000, 3_000])
def test_h5ad_chunks_span_blocks(dataset, tmp_path, monkeypatch, h5ad_chunk):
    """The CSR datasets are filled in whole chunks written raw: chunks that span many blocks
    and a padded last chunk read back as the same values as one chunk does."""
    import h5py

    reference, path = tmp_path / "one-chunk.h5ad", tmp_path / "chunks.h5ad"
    with dask.config.set(scheduler="threads"):
        _write("h5ad", dataset, reference, block_cells=CHUNK)
        monkeypatch.setattr("distumap.io.writers.h5ad.H5AD_CHUNK", h5ad_chunk)
        _write("h5ad", dataset, path, block_cells=7)
    want = _arrays("h5ad", reference)
    got = _arrays("h5ad", path)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with h5py.File(path, "r") as f:
        data = f["X/data"]
        assert data.chunks == (h5ad_chunk,) and data.compression == "gzip" and data.shuffle
        assert len(data) > 2 * h5ad_chunk and len(data) % h5ad_chunk  # a partial last chunk
        assert data.id.get_num_chunks() == -(-len(data) // h5ad_chunk)
    _assert_contents(_read("h5ad", path), dataset)


@pytest.mark.parametrize("seed", [0, 1])
def test_h5ad_stretches_deflated_elsewhere_make_the_chunks_deflated_here(tmp_path, seed):
    """Values in groups of any size, their whole chunks deflated where the dataset puts them
    (as the workers do) and the straddling chunks here, store the chunks that appending the
    same values here stores, byte for byte."""
    from concurrent.futures import ThreadPoolExecutor

    import h5py

    from distumap.io.writers import h5ad
    from distumap.io.writers._blocks import deflate_stretch

    chunk = h5ad.H5AD_CHUNK
    rng = np.random.default_rng(seed)
    # groups within a chunk, across one boundary, across many, ending on one, empty
    sizes = [5, 100, chunk - 105, 0, 3 * chunk + 7, chunk, 17, 2 * chunk - 24, 1]
    groups = [rng.integers(0, 50, size).astype(np.int32) for size in rng.permutation(sizes)]
    paths = tmp_path / "here.h5", tmp_path / "elsewhere.h5"
    with ThreadPoolExecutor(2) as pool:
        for path in paths:
            with h5py.File(path, "w") as f:
                dataset = h5ad._Appendable(f, "values", np.int32, True, pool)
                start = 0
                for values in groups:
                    if path == paths[0]:
                        dataset.append(values)
                    else:
                        dataset.extend(deflate_stretch(values, start, chunk, shuffle=True))
                    start += len(values)
                dataset.close()
    _assert_same_chunks(*paths, ("values",))
    with h5py.File(paths[1], "r") as f:
        np.testing.assert_array_equal(f["values"][:], np.concatenate(groups))


def _task_keys(client) -> list:
    def keys(dask_scheduler):  # run on the scheduler: the keys of the tasks it has seen
        return [ts.key for ts in dask_scheduler.tasks.values()] + [
            key for key, *_ in dask_scheduler.transition_log
        ]

    return client.run_on_scheduler(keys)


@pytest.mark.cluster
@pytest.mark.parametrize(("fmt", "prefix"), [("h5ad", "h5ad-block-"), ("zarr", "anndata-zarr-")])
def test_worker_processes_write_the_same_file(
    dataset, tmp_path, local_client, fmt, prefix, monkeypatch
):
    from distumap.io.writers import _blocks, _graph

    path = tmp_path / f"cluster{SUFFIX[fmt]}"
    reference = tmp_path / f"threads{SUFFIX[fmt]}"
    # X in chunks of 1,000 values (several per block), deflated on the workers a block at a
    # time (4 groups: more than a few, or this process would deflate them); the reference's
    # chunks deflated in this process
    monkeypatch.setattr("distumap.io.writers.h5ad.H5AD_CHUNK", 1_000)
    with monkeypatch.context() as patched:
        # the graph's rows in 5 blocks, each finding its in-edges in 3 pieces of the kNN rows
        patched.setattr(_graph, "GRAPH_BLOCK_CELLS", 256)
        patched.setattr(_graph, "SCAN_CELLS", 500)
        patched.setattr(_blocks, "DEFLATE_GROUP_CELLS", 300)
        _write(fmt, dataset, path, client=local_client, block_cells=300)
    with dask.config.set(scheduler="threads"):  # the graph's rows in one block
        _write(fmt, dataset, reference, client=None)
    _assert_contents(_read(fmt, path), dataset)
    want = _arrays(fmt, reference)
    for name, got in _arrays(fmt, path).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    keys = {str(key[0] if isinstance(key, tuple) else key) for key in _task_keys(local_client)}
    assert any(key.startswith(prefix + ("block-" if fmt == "zarr" else "")) for key in keys)
    # the graph: its rows by cell block, from the edges into them found piece by piece
    graph = prefix.split("-block")[0].rstrip("-") + "-graph-"
    assert sum(key.startswith(graph + "edges-") for key in set(keys)) >= 1
    assert any(key.startswith(graph + "block-") for key in keys)
    assert not any(key.startswith(graph + "index-") for key in keys)
    if fmt == "h5ad":  # X's chunks deflated by the workers, a task per block of 300
        assert sum(key.startswith("h5ad-deflate-") and "summary" not in key for key in keys) == 4
        _assert_same_chunks(path, reference, ("X/data", "X/indices", "layers/log2p1/data"))
    # the four blocks of 300 cells reported to the dashboard's progress topic
    events = [msg for _, msg in local_client.get_events(TOPIC) if msg["stage"] == "export"]
    assert {(msg["block"], msg["total"]) for msg in events} >= {(i, 4) for i in range(4)}


def _assert_same_chunks(path, reference, names) -> None:
    """The files' datasets ``names`` hold the same chunks, byte for byte, deflated as stored."""
    import h5py

    with h5py.File(path, "r") as f, h5py.File(reference, "r") as g:
        for name in names:
            assert f[name].chunks == g[name].chunks and f[name].shape == g[name].shape
            n_chunks = f[name].id.get_num_chunks()
            assert n_chunks == g[name].id.get_num_chunks() > 2, name
            for i in range(n_chunks):
                offset = f[name].id.get_chunk_info(i).chunk_offset
                assert f[name].id.read_direct_chunk(offset) == g[name].id.read_direct_chunk(
                    offset
                ), (name, offset)


def _failing(block):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize(
    ("existing", "on_cluster"),
    [(False, False), (True, False), pytest.param(False, True, marks=pytest.mark.cluster)],
)
def test_failure_leaves_nothing_at_path(dataset, tmp_path, fmt, existing, on_cluster, request):
    client = request.getfixturevalue("local_client") if on_cluster else None
    path = tmp_path / f"embedding{SUFFIX[fmt]}"
    if existing:
        with dask.config.set(scheduler="threads"):
            # a cell subset: the graph names cells by their place in the store, so it goes
            _write(fmt, dataset.isel(cell=slice(0, 50)).drop_vars(list(CELL_GRAPH)), path)
    counts = dataset["counts"].data.rechunk({0: CHUNK})
    # the third block fails after two were computed (and, for h5ad, written)
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
    with pytest.raises(RuntimeError, match="disk on fire"), dask.config.set(scheduler="threads"):
        _write(fmt, broken, path, block_cells=CHUNK, client=client)
    assert [p.name for p in tmp_path.iterdir()] == ([path.name] if existing else [])
    if existing:
        assert _read(fmt, path).n_obs == 50  # the older file, untouched


def test_zarr_failure_after_blocks_were_written_leaves_nothing(dataset, tmp_path, monkeypatch):
    import threading

    from distumap.io.writers import anndata_zarr

    # the nonzero count passes; the third block to build its CSR pieces fails, when others
    # have already written their chunks into the temporary folder
    calls, lock, build = [], threading.Lock(), anndata_zarr.csr_pieces

    def failing_third(counts):
        with lock:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk on fire")
        return build(counts)

    monkeypatch.setattr(anndata_zarr, "csr_pieces", failing_third)
    path = tmp_path / "embedding.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"), dask.config.set(scheduler="threads"):
        write_anndata_zarr(dataset, path, block_cells=100)
    assert len(calls) >= 3
    assert list(tmp_path.iterdir()) == []


def test_zarr_never_replaces_what_is_not_anndata(dataset, store, tmp_path):
    with pytest.raises(InputError, match="not a distumap anndata-zarr"):
        write_anndata_zarr(dataset, store)
    assert distumap.io.open_store(store, require="embed").sizes["cell"] == N_CELLS


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_missing_embedding_is_a_clear_error(dataset, tmp_path, fmt):
    with pytest.raises(IncompleteStoreError, match="X_umap"):
        _write(fmt, dataset.drop_vars("X_umap"), tmp_path / f"x{SUFFIX[fmt]}")
    assert list(tmp_path.iterdir()) == []


def test_h5ad_progress_lines(dataset, tmp_path, capsys):
    path = tmp_path / "embedding.h5ad"
    with dask.config.set(scheduler="threads"):
        write_h5ad(dataset, path, block_cells=600, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [
        "distumap export: embedding.h5ad: block 1/2 written",
        "distumap export: embedding.h5ad: block 2/2 written",
    ]
    assert lines[2].startswith(f"distumap export: {path} written in")


# scanpy 1.11 calls matplotlib's Colormap.set_bad, which matplotlib means to deprecate
@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_scanpy_reads_and_draws_it(dataset, tmp_path, fmt):
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (the test extra has it)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / f"embedding{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        _write(fmt, dataset, path)
    # scanpy reads h5ad itself; for zarr its users call anndata.read_zarr
    adata = sc.read_h5ad(path) if fmt == "h5ad" else _read(fmt, path)
    figure = sc.pl.umap(adata, color="subclass_label", show=False, return_fig=True)
    try:
        assert len(figure.axes[0].collections[0].get_offsets()) == N_CELLS
    finally:
        plt.close("all")


def _before_embed(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as the preprocess leaves it: no embedding, graph or embed record."""
    record = dict(ds.attrs["distumap"])
    record["stages"] = {k: v for k, v in record["stages"].items() if k != "embed"}
    embed = ["X_umap", "landmark", "knn_landmark", "knn_weight", *CELL_GRAPH]
    return ds.drop_vars([name for name in embed if name in ds]).assign_attrs(distumap=record)


@pytest.mark.cluster
def test_h5ad_x_first_then_the_embedding(dataset, tmp_path, local_client, capsys):
    """With ``embedded``, X and the layer are written from a store without an embedding while
    the embed runs; the file is the one written from the embedded store."""
    import threading
    import time
    from concurrent.futures import Future

    path, reference = tmp_path / "early.h5ad", tmp_path / "reference.h5ad"
    embedded: Future = Future()
    writer = threading.Thread(
        target=write_h5ad,
        args=(_before_embed(dataset), path),
        kwargs={"client": local_client, "embedded": embedded, "progress": True, "block_cells": 600},
    )
    writer.start()
    deadline = time.monotonic() + 30
    while "block 2/2 written" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "X was not written before the embedding"
    assert writer.is_alive() and not path.exists()  # waiting for the embedding, not done
    embedded.set_result(dataset)
    writer.join(timeout=60)
    assert not writer.is_alive()
    write_h5ad(dataset, reference, client=local_client, block_cells=600)
    adata = _read("h5ad", path)
    _assert_contents(adata, dataset)
    assert adata.uns["distumap"]["stages"]["embed"]["status"] == "complete"
    want = _arrays("h5ad", reference)
    for name, got in _arrays("h5ad", path).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)


@pytest.mark.cluster
def test_h5ad_of_a_failed_embed_leaves_no_file(dataset, tmp_path, local_client):
    from concurrent.futures import Future

    embedded: Future = Future()
    embedded.set_exception(RuntimeError("the embed failed"))
    with pytest.raises(RuntimeError, match="the embed failed"):
        write_h5ad(_before_embed(dataset), tmp_path / "early.h5ad", embedded=embedded)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the neighbour graph


def _embed_features(store: str, ds: xr.Dataset) -> np.ndarray:
    """Every cell's features as the embed computed them (the landmarks' PCA of log2(x+1))."""
    from distumap._format import MODEL_GROUP
    from distumap._store import read_group
    from distumap.tl import _model, _model_io

    model = _model_io.from_arrays(*read_group(store, MODEL_GROUP))
    return _model.project(model, distumap.pp.log2p1(ds).values).astype(np.float64)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_neighbor_graph_is_where_scanpy_keeps_it(dataset, tmp_path, fmt):
    path = tmp_path / f"graph{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        _write(fmt, dataset, path, block_cells=100)  # blocks that are not the store's chunks
    adata = _read(fmt, path)
    k = dataset.sizes["cell_knn"]
    record = adata.uns["neighbors"]
    assert record["connectivities_key"] == "connectivities"
    assert record["distances_key"] == "distances"
    params = dict(record["params"])
    assert params == {
        "n_neighbors": k + 1,  # scanpy counts the cell itself
        "method": "umap",
        "metric": "euclidean",
        "random_state": EMBED["seed"],
    }
    distances, connectivities = adata.obsp["distances"], adata.obsp["connectivities"]
    want_distances, want_connectivities = tl.neighbor_graph(dataset)
    for got, want in ((distances, want_distances), (connectivities, want_connectivities)):
        assert got.format == "csr" and got.dtype == np.float32
        assert got.shape == (N_CELLS, N_CELLS)
        for part in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(got, part), getattr(want, part))
    # distances: k per row (the cell itself left out), nearest first, as scanpy stores them
    np.testing.assert_array_equal(np.diff(distances.indptr), k)
    rows = distances.data.reshape(N_CELLS, k)
    assert (np.diff(rows, axis=1) >= 0).all()
    assert (distances.indices.reshape(N_CELLS, k) != np.arange(N_CELLS)[:, None]).all()
    np.testing.assert_array_equal(distances.indices, dataset["knn_cell"].values.ravel())
    # connectivities: symmetric fuzzy weights in (0, 1], every kNN edge among them
    assert (connectivities != connectivities.T).nnz == 0
    assert connectivities.has_sorted_indices
    assert (connectivities.data > 0).all() and (connectivities.data <= 1).all()
    assert (connectivities.diagonal() == 0).all()
    assert ((distances > 0).astype(bool) > (connectivities > 0).astype(bool)).nnz == 0


def test_neighbor_graph_recall_against_brute_force(dataset, store):
    """The refinement's graph, found through the landmarks, against the exact k nearest cells
    in the same features."""
    features = _embed_features(store, dataset)
    neighbors = dataset["knn_cell"].values
    k = neighbors.shape[1]
    squared = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    exact = np.argsort(squared, axis=1, kind="stable")[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(neighbors, exact, strict=True)])
    print(f"kNN recall of the graph of all cells: {recall:.4f}")
    assert recall >= RECALL_FLOOR
    found = np.sqrt(squared[np.arange(N_CELLS)[:, None], neighbors])
    np.testing.assert_allclose(dataset["knn_distance"].values, found, rtol=1e-5)


# scanpy 1.11's leiden announces that its default flavor will change: scanpy's note, not ours
@pytest.mark.filterwarnings("ignore:In the future, the default backend for leiden:FutureWarning")
# sc.tl.umap finds no X_pca in the export and fits scanpy's own PCA for its initialisation
@pytest.mark.filterwarnings("ignore:You.re trying to run this on:UserWarning")
def test_leiden_paga_and_umap_run_on_the_export(dataset, store, tmp_path):
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (the test extra has it)")
    pytest.importorskip("leidenalg", reason="leidenalg is not installed (the test extra has it)")
    from sklearn.metrics import adjusted_rand_score

    path = tmp_path / "embedding.h5ad"
    with dask.config.set(scheduler="threads"):
        write_h5ad(dataset, path)
    adata = _read("h5ad", path)
    sc.tl.leiden(adata, random_state=0)  # on the exported graph: no sc.pp.neighbors
    # the reference: scanpy's own neighbour graph of the same features, same k
    reference = adata.copy()
    reference.obsm["X_embed"] = _embed_features(store, dataset).astype(np.float32)
    k = adata.uns["neighbors"]["params"]["n_neighbors"]
    sc.pp.neighbors(reference, n_neighbors=k, use_rep="X_embed", random_state=0)
    sc.tl.leiden(reference, random_state=0)
    agreement = adjusted_rand_score(reference.obs["leiden"], adata.obs["leiden"])
    truth = adjusted_rand_score(adata.obs["subclass_label"], adata.obs["leiden"])
    print(f"leiden ARI vs sc.pp.neighbors: {agreement:.4f}, vs subclass_label: {truth:.4f}")
    assert agreement >= ARI_FLOOR
    sc.tl.paga(adata, groups="leiden")
    assert adata.uns["paga"]["connectivities"].shape[0] == adata.obs["leiden"].nunique()
    sc.tl.umap(adata, maxiter=10, random_state=0)
    assert adata.obsm["X_umap"].shape == (N_CELLS, 2) and np.isfinite(adata.obsm["X_umap"]).all()


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_without_the_graph_obsp_is_empty_and_says_so(dataset, tmp_path, capsys, fmt):
    path = tmp_path / f"plain{SUFFIX[fmt]}"
    with dask.config.set(scheduler="threads"):
        _write(fmt, dataset.drop_vars(list(CELL_GRAPH)), path, progress=True)
    adata = _read(fmt, path)
    assert len(adata.obsp) == 0 and "neighbors" not in adata.uns
    lines = [line for line in capsys.readouterr().err.splitlines() if "neighbour graph" in line]
    assert lines == [
        f"distumap export: {path.name}: no neighbour graph (the embed ran without refinement): "
        "obsp and uns['neighbors'] left empty"
    ]


def test_a_cell_subset_with_the_graph_is_refused(dataset, tmp_path):
    path = tmp_path / "subset.h5ad"
    with pytest.raises(InputError, match="subset"), dask.config.set(scheduler="threads"):
        write_h5ad(dataset.isel(cell=slice(0, 50)), path)
    assert list(tmp_path.iterdir()) == []

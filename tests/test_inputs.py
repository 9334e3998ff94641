"""Every input format through the ingest stage into the same store: exact contents, any chunk
size, several inputs at once, resume, and one real multi-process cluster."""

from __future__ import annotations

import dataclasses
import re
import warnings

import dask
import h5py
import numpy as np
import pandas as pd
import pytest
import zarr

from distumap import io
from distumap._errors import InputError
from distumap._format import NARROW_COUNTS, check_store
from distumap._store import mark_stage, progress_array, stage_record
from distumap.cli import main
from distumap.io._ingest import source_labels
from distumap.testing import (
    R_DIALECTS,
    synthetic_counts,
    write_10x_h5,
    write_anndata_zarr,
    write_h5ad,
    write_loom,
    write_matrix_csv,
    write_mex,
)

DATA = synthetic_counts(230, 37, seed=8, zero_cells=2, zero_genes=2)
WRITERS = {
    "10x-v3.h5": write_10x_h5,
    "10x-v2.h5": lambda p, d: write_10x_h5(p, d, version=2),
    "mex-gz": write_mex,
    "mex-plain": lambda p, d: write_mex(p, d, gzip=False),
    "csr.h5ad": write_h5ad,
    "csc.h5ad": lambda p, d: write_h5ad(p, d, x="csc"),
    "dense.h5ad": lambda p, d: write_h5ad(p, d, x="dense"),
    "anndata.zarr": write_anndata_zarr,
    "counts.loom": write_loom,
}
#: the formats that carry the cells' labels themselves
WITH_METADATA = {"csr.h5ad", "csc.h5ad", "dense.h5ad", "anndata.zarr", "counts.loom"}


def _threads():
    return dask.config.set(scheduler="threads", num_workers=2)


def _quiet_read(*args, **kwargs):
    """io.read, ignoring the readers' one-line notes (repeated gene names, dropped features)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return io.read(*args, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    return {name: write(folder / name, DATA) for name, write in WRITERS.items()}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_gives_the_same_store(files, name, tmp_path):
    stores = []
    for chunk in (64, 1000):
        with _threads():
            ds = _quiet_read(files[name], tmp_path / f"store-{chunk}.zarr", chunk_cells=chunk)
        assert check_store(ds) == []
        np.testing.assert_array_equal(ds["counts"].values, DATA.counts)
        assert ds["counts"].dtype == NARROW_COUNTS  # every count fits
        assert ds["cell"].values.tolist() == list(DATA.cell_names)
        assert ds["gene"].values.tolist() == list(DATA.gene_names)
        if name.startswith(("10x", "mex")):
            assert (
                "gene_ids" in ds.coords and len(set(ds["gene_ids"].values)) == DATA.counts.shape[1]
            )
        if name in WITH_METADATA:
            assert ds["subclass_label"].values.tolist() == DATA.metadata["subclass_label"].tolist()
        assert "source" not in ds.coords
        stores.append(ds)
    assert stores[0]["counts"].data.chunks[0][0] == 64


def test_several_inputs_concatenate_with_a_source_and_unique_names(files, tmp_path):
    with _threads(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = io.read(
            [files["10x-v3.h5"], files["csr.h5ad"], files["counts.loom"]],
            tmp_path / "store.zarr",
            chunk_cells=100,  # blocks that straddle the inputs' boundaries
        )
    assert check_store(ds) == []
    np.testing.assert_array_equal(ds["counts"].values, np.concatenate([DATA.counts] * 3))
    labels = source_labels([str(files[n]) for n in ("10x-v3.h5", "csr.h5ad", "counts.loom")])
    assert labels == ["10x-v3", "csr", "counts"]
    assert ds["source"].values.tolist() == [label for label in labels for _ in DATA.cell_names]
    # the same barcodes in every input: every name gets -<source>, with one warning
    assert ds["cell"].values.tolist() == [
        f"{cell}-{label}" for label in labels for cell in DATA.cell_names
    ]
    assert len([w for w in caught if "repeat across the inputs" in str(w.message)]) == 1
    # the 10x file has no labels: its cells get empty ones
    assert ds["subclass_label"].values[: len(DATA.cell_names)].tolist() == [""] * len(
        DATA.cell_names
    )


def test_genes_are_aligned_by_name_and_must_agree(tmp_path):
    import anndata

    order = np.random.default_rng(0).permutation(DATA.counts.shape[1])
    a = write_h5ad(tmp_path / "a.h5ad", DATA)
    b = tmp_path / "b.h5ad"
    anndata.read_h5ad(a)[:, order].copy().write_h5ad(b)  # the same genes, another order
    with _threads():
        ds = _quiet_read([a, b], tmp_path / "store.zarr", chunk_cells=90)
    np.testing.assert_array_equal(ds["counts"].values, np.concatenate([DATA.counts] * 2))

    fewer = synthetic_counts(50, 30, seed=1)
    c = write_h5ad(tmp_path / "c.h5ad", fewer)
    with _threads(), pytest.raises(InputError, match=r"c\.h5ad: its genes differ.*missing"):
        _quiet_read([a, c], tmp_path / "other.zarr")


def test_metadata_csv_joins_on_cell_names_for_binary_formats(files, tmp_path):
    meta = tmp_path / "meta.csv"
    pd.DataFrame(
        {"barcode": DATA.cell_names[::-1], "donor": [f"d{i % 4}" for i in range(230)]}
    ).to_csv(meta, index=False)
    with _threads():
        ds = _quiet_read(files["10x-v3.h5"], tmp_path / "store.zarr", metadata=meta)
    assert ds["donor"].values.tolist() == [f"d{(229 - i) % 4}" for i in range(230)]


@pytest.mark.parametrize("block", [7, 64])
def test_the_skeleton_writes_names_and_metadata_a_block_at_a_time(
    files, tmp_path, monkeypatch, block
):
    """The skeleton reads, checks and writes the names and joins the metadata in blocks that
    straddle the inputs and divide nothing: the store of one block holding every cell."""
    from distumap.io import _ingest_cells, _ingest_store

    inputs = [files["10x-v3.h5"], files["csr.h5ad"], files["mex-gz"], files["counts.loom"]]
    rng = np.random.default_rng(3)
    labels = ["10x-v3", "csr", "mex-gz", "counts"]
    names = [f"{cell}-{label}" for label in labels for cell in DATA.cell_names]
    kept = rng.permutation(len(names))[:-9]  # nine cells without a metadata row
    meta = tmp_path / "meta.csv"
    pd.DataFrame(
        {
            "sample_name": np.array(names)[kept],
            "donor": [f"d{i % 4}" for i in kept],
            "age": kept % 50,  # integers, NaN where a row is missing
            "flag": kept % 3 == 0,
        }
    ).to_csv(meta, index=False)
    stores = []
    for chunk in (block, _ingest_store.CELL_COORD_CHUNK):
        monkeypatch.setattr(_ingest_cells, "CELL_COORD_CHUNK", chunk)
        monkeypatch.setattr(_ingest_store, "CELL_COORD_CHUNK", chunk)
        with _threads():
            stores.append(
                _quiet_read(inputs, tmp_path / f"{chunk}.zarr", metadata=meta, chunk_cells=50)
            )
    ds, whole = stores
    assert ds["cell"].values.tolist() == names
    assert zarr.open_array(tmp_path / f"{block}.zarr" / "cell").chunks == (block,)
    for name in ["cell", "source", "subclass_label", "size_factor", "donor", "age", "flag"]:
        assert ds[name].dims == ("cell",) and name in ds.coords, name
        assert ds[name].dtype == whole[name].dtype, name
        np.testing.assert_array_equal(ds[name].values, whole[name].values)
    missing = np.setdiff1d(np.arange(len(names)), kept)
    assert np.isnan(ds["age"].values[missing]).all() and ds["age"].dtype == np.float64
    assert ds["donor"].values[missing].tolist() == [""] * 9
    assert ds["donor"].values[kept].tolist() == [f"d{i % 4}" for i in kept]


def test_a_cell_named_twice_is_refused_whatever_its_hash(tmp_path, monkeypatch):
    """Names are compared where their 64-bit hashes meet: a repeat in blocks far apart is
    found with both cells' numbers, and names whose hashes all meet are not repeats."""
    from distumap.io import _ingest_cells, _ingest_store

    monkeypatch.setattr(_ingest_cells, "CELL_COORD_CHUNK", 5)
    path = write_10x_h5(tmp_path / "twice.h5", DATA)
    with h5py.File(path, "r+") as file:
        file["matrix/barcodes"][117] = file["matrix/barcodes"][12]
    with pytest.raises(
        InputError, match=rf"cell '{DATA.cell_names[12]}' is named twice \(cells 12 and 117\)"
    ):
        _quiet_read(path, tmp_path / "twice.zarr")
    monkeypatch.setattr(_ingest_store, "hash", lambda name: 0, raising=False)  # every hash meets
    with pytest.raises(InputError, match=r"\(cells 12 and 117\)"):
        _quiet_read(path, tmp_path / "twice.zarr")
    once = [write_10x_h5(tmp_path / f"{name}.h5", DATA) for name in ("one", "other")]
    with h5py.File(once[1], "r+") as file:  # the same length, other names
        barcodes = file["matrix/barcodes"]
        barcodes[:] = np.char.replace(barcodes[:], b"LKTX", b"LKTY")
    with _threads(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "repeat across the inputs"
        ds = io.read(once, tmp_path / "once.zarr")
    others = [name.replace("LKTX", "LKTY") for name in DATA.cell_names]
    assert ds["cell"].values.tolist() == [*DATA.cell_names, *others]


def test_an_interrupted_read_resumes_only_the_missing_blocks(files, tmp_path, monkeypatch):
    store = tmp_path / "store.zarr"
    with _threads():
        _quiet_read(files["csr.h5ad"], store, chunk_cells=50)
    # as a kill leaves it: the stage started, two blocks unmarked, one of them torn
    record = stage_record(store, "ingest")
    mark_stage(store, "ingest", "started", record["params"])
    markers = progress_array(store, "ingest")
    markers[1], markers[3] = False, False
    import zarr

    zarr.open_array(str(store), path="counts", mode="r+")[50:100] = 7
    from distumap.io import _ingest as _read

    read_blocks: list[int] = []
    original = _read._read_block

    def counting(store, inputs, offsets, block, chunk_cells):
        read_blocks.append(block)
        return original(store, inputs, offsets, block, chunk_cells)

    monkeypatch.setattr(_read, "_read_block", counting)
    with _threads():
        ds = _quiet_read(files["csr.h5ad"], store, chunk_cells=50)
    assert sorted(read_blocks) == [1, 3]
    np.testing.assert_array_equal(ds["counts"].values, DATA.counts)


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f["matrix/indptr"].__setitem__(3, 10**6), r"indptr"),
        (lambda f: f["matrix/indices"].__setitem__(0, 10**6), r"indices|index"),
        (lambda f: f["matrix/data"].__setitem__(0, -5), r"negative"),
    ],
    ids=["indptr", "index", "negative"],
)
def test_bad_10x_files_exit_2_naming_file_and_dataset(tmp_path, damage, message, capsys):
    path = write_10x_h5(tmp_path / "bad.h5", DATA)
    with h5py.File(path, "r+") as f:
        damage(f)
    code = main(["ingest", str(path), str(tmp_path / "s.zarr"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "bad.h5" in error and re.search(message, error), error


@pytest.mark.cluster
def test_truncated_hdf5_exits_2(tmp_path, capsys):
    path = write_h5ad(tmp_path / "cut.h5ad", DATA)
    path.write_bytes(path.read_bytes()[:2000])
    assert main(["ingest", str(path), str(tmp_path / "s.zarr"), "--no-progress"]) == 2
    assert "cut.h5ad" in capsys.readouterr().err


@pytest.mark.cluster
def test_run_on_a_loopback_cluster_reads_an_h5_and_an_h5ad(files, tmp_path, loopback_cluster):
    import anndata

    out = tmp_path / "out"
    args = ["run", str(files["10x-v3.h5"]), str(files["dense.h5ad"]), "--out", str(out)]
    args += ["--chunk-cells", "64", "--landmarks", "150", "--pca", "5", "--no-progress"]
    args += ["--scheduler-file", str(loopback_cluster.scheduler_file)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(args) == 0
    ds = io.open_store(out / "store.zarr", require="embed")
    np.testing.assert_array_equal(ds["counts"].values, np.concatenate([DATA.counts] * 2))
    assert set(ds["source"].values) == {"10x-v3", "dense"}
    adata = anndata.read_h5ad(out / "embedding.h5ad")
    assert adata.n_obs == 2 * len(DATA.cell_names) and "source" in adata.obs


def test_a_float32_store_exports_its_values_unrounded(tmp_path):
    import anndata
    import loompy

    from distumap import pp, tl

    data = synthetic_counts(300, 40, seed=2)
    values = (data.counts * 0.5).astype(np.float32)  # normalised: halves are not counts
    path = tmp_path / "normalised.csv"
    pd.DataFrame(values, index=data.cell_names, columns=data.gene_names).to_csv(path)
    store = tmp_path / "store.zarr"
    with _threads():
        ds = io.read(path, store, dtype="float32", chunk_cells=128)
        assert ds["counts"].dtype == np.float32 and check_store(ds) == []
        np.testing.assert_array_equal(ds["counts"].values, values)
        pp.preprocess(str(store))
        ds = tl.umap(str(store), landmarks=150, pca=5, n_neighbors=10)
        io.write(ds, tmp_path / "e.loom")
        io.write(ds, tmp_path / "e.h5ad")
    selected = ds["selected"].values
    with loompy.connect(str(tmp_path / "e.loom"), "r") as loom:
        np.testing.assert_array_equal(loom[:, :], values[:, selected].T)
    adata = anndata.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_array_equal(adata.X.toarray(), values[:, selected])


# ------------------------------------------------------------------ CSV and TSV as R writes them

#: DATA with counts R writes as 1e+05 and 1.2e+07
R_DATA = dataclasses.replace(DATA, counts=DATA.counts.copy())
R_DATA.counts[3, 2], R_DATA.counts[200, 30] = 100_000, 12_000_000


@pytest.mark.parametrize("dialect", R_DIALECTS)
def test_every_r_dialect_gives_the_store_of_the_plain_csv(tmp_path, dialect):
    plain = write_matrix_csv(tmp_path / "plain.csv", R_DATA)
    path = write_matrix_csv(tmp_path / f"{dialect}.txt", R_DATA, dialect=dialect)
    for chunk in (64, 1000):
        with _threads():
            reference = io.read(plain, tmp_path / f"plain-{chunk}.zarr", chunk_cells=chunk)
            ds = io.read(path, tmp_path / f"store-{chunk}.zarr", chunk_cells=chunk)
        assert check_store(ds) == []
        for name in reference.variables:
            np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
        np.testing.assert_array_equal(ds["counts"].values, R_DATA.counts)
        assert ds["counts"].dtype == np.int32  # 12,000,000 does not fit uint16
        assert ds["cell"].values.tolist() == list(R_DATA.cell_names)
        assert ds["gene"].values.tolist() == list(R_DATA.gene_names)
        assert ds["counts"].data.chunks == reference["counts"].data.chunks


BAD_R = {
    # case: (file text, message)
    "write.table short line": (
        b'"A" "B" "C"\n"c1" 1 2 3\n"c2" 1 2 3\n"c3" 1 2\n',
        r"line 4: too few fields: found 3 of 4 \(a cell name and 3 values; read as R's "
        r"write\.table layout",
    ),
    "write.table-tsv long line": (
        b"A\tB\tC\nc1\t1\t2\t3\nc2\t1\t2\t3\t4\n",
        r"line 3, column 5: too many fields: lines hold a cell name and 3 values, found more",
    ),
    "write.csv NA": (
        b'"","A","B"\n"c1",1,NA\n',
        r"line 2, column 3 \(gene 'B'\): not an integer count: 'NA'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_R))
def test_bad_r_files_name_file_and_line(tmp_path, case):
    text, message = BAD_R[case]
    path = tmp_path / "bad.txt"
    path.write_bytes(text)
    with _threads(), pytest.raises(InputError, match=message) as error:
        io.read(path, tmp_path / "store.zarr")
    assert str(error.value).startswith(f"{path}: line ")


@pytest.mark.cluster
def test_a_bad_r_file_exits_2(tmp_path, capsys):
    text, message = BAD_R["write.table short line"]
    path = tmp_path / "bad.txt"
    path.write_bytes(text)
    assert main(["ingest", str(path), str(tmp_path / "cli.zarr"), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{path}: line 4" in last and re.search(message, last), last

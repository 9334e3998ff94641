"""The binary-format readers: every format, written the way the real tools write it, reads back
exactly; every broken input is an InputError that names the file and the place."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distumap._errors import InputError
from distumap.io.readers import FORMATS, MexReader, Reader, open_reader
from distumap.testing import (
    synthetic_counts,
    synthetic_gene_ids,
    write_10x_h5,
    write_anndata_zarr,
    write_h5ad,
    write_loom,
    write_mex,
)

N_CELLS, N_GENES = 157, 41
DATA = synthetic_counts(N_CELLS, N_GENES, seed=3, zero_cells=3, zero_genes=2)
METADATA_COLUMNS = ("class_label", "subclass_label", "subclass_color", "size_factor")


@dataclass(frozen=True)
class Case:
    """One way of writing the truth: a writer call and the reader options that read it back."""

    name: str
    format: str
    filename: str
    write: Any
    layer: str | None = None
    metadata: bool = False  # whether the format carries obs columns
    dropped: int = 0  # non-gene features the reader announces

    def make(self, directory: Path) -> Path:
        path = directory / self.filename
        self.write(path, DATA)
        return path


CASES = [
    Case("10x-v3", "10x-h5", "filtered.h5", write_10x_h5),
    Case(
        "10x-v3-antibodies",
        "10x-h5",
        "cite.h5",
        lambda p, d: write_10x_h5(p, d, antibody_features=4),
        dropped=4,
    ),
    Case("10x-v2", "10x-h5", "v2.h5", lambda p, d: write_10x_h5(p, d, version=2)),
    Case("mex-gzip", "mex", "mex_gz", write_mex),
    Case("mex-plain", "mex", "mex_plain", lambda p, d: write_mex(p, d, gzip=False)),
    Case("mex-v2", "mex", "mex_v2", lambda p, d: write_mex(p, d, gzip=False, version=2)),
    Case(
        "mex-antibodies-gzip",
        "mex",
        "mex_cite",
        lambda p, d: write_mex(p, d, antibody_features=3),
        dropped=3,
    ),
    Case(
        "mex-antibodies-plain",
        "mex",
        "mex_cite_plain",
        lambda p, d: write_mex(p, d, gzip=False, antibody_features=3),
        dropped=3,
    ),
    Case("h5ad-csr", "h5ad", "csr.h5ad", write_h5ad, metadata=True),
    Case("h5ad-csc", "h5ad", "csc.h5ad", lambda p, d: write_h5ad(p, d, x="csc"), metadata=True),
    Case(
        "h5ad-dense", "h5ad", "dense.h5ad", lambda p, d: write_h5ad(p, d, x="dense"), metadata=True
    ),
    Case(
        "h5ad-layer",
        "h5ad",
        "layer.h5ad",
        lambda p, d: write_h5ad(p, d, layer="counts"),
        layer="counts",
        metadata=True,
    ),
    Case(
        "h5ad-csc-layer",
        "h5ad",
        "csc_layer.h5ad",
        lambda p, d: write_h5ad(p, d, x="csc", layer="raw"),
        layer="raw",
        metadata=True,
    ),
    Case("zarr-v2-csr", "anndata-zarr", "csr.zarr", write_anndata_zarr, metadata=True),
    Case(
        "zarr-v3-csc",
        "anndata-zarr",
        "csc.zarr",
        lambda p, d: write_anndata_zarr(p, d, x="csc", zarr_format=3),
        metadata=True,
    ),
    Case(
        "zarr-v3-dense-layer",
        "anndata-zarr",
        "dense_layer.zarr",
        lambda p, d: write_anndata_zarr(p, d, x="dense", layer="counts", zarr_format=3),
        layer="counts",
        metadata=True,
    ),
    Case("loom", "loom", "cells.loom", write_loom, metadata=True),
    Case(
        "loom-layer",
        "loom",
        "layer.loom",
        lambda p, d: write_loom(p, d, layer="spliced"),
        layer="spliced",
        metadata=True,
    ),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Every case written once for the module."""
    directory = tmp_path_factory.mktemp("formats")
    return {case.name: case.make(directory) for case in CASES}


def _open(case: Case, path: Path, **options) -> Reader:
    return open_reader(path, layer=case.layer, **options)


def _genes(reader: Reader, case: Case) -> np.ndarray:
    if case.dropped:
        with pytest.warns(UserWarning, match=f"left out {case.dropped} features"):
            return reader.genes()
    return reader.genes()


def _by_blocks(reader: Reader, bounds: list[int]) -> np.ndarray:
    edges = [0, *sorted(bounds), reader.n_cells]
    blocks = [reader.read(a, b) for a, b in itertools.pairwise(edges)]
    for (a, b), block in zip(itertools.pairwise(edges), blocks, strict=True):
        assert block.shape == (b - a, reader.n_genes)
        assert block.dtype == reader.dtype
        assert block.flags.c_contiguous
    return np.concatenate(blocks)


# ---------------------------------------------------------------------------------------------
# every format reads back exactly


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("chunk", [1, 10, 64, N_CELLS])
def test_blocks_concatenate_to_the_counts(written, case, chunk):
    reader = _open(case, written[case.name])
    assert (reader.format, reader.n_cells, reader.n_genes) == (case.format, N_CELLS, N_GENES)
    assert reader.dtype == np.int32
    counts = _by_blocks(reader, list(range(chunk, N_CELLS, chunk)))
    np.testing.assert_array_equal(counts, DATA.counts)
    assert reader.rounded == 0
    assert reader.read(5, 5).shape == (0, N_GENES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bounds=st.lists(st.integers(0, N_CELLS), max_size=6))
def test_any_block_boundaries(written, case, bounds):
    reader = _open(case, written[case.name])
    np.testing.assert_array_equal(_by_blocks(reader, bounds), DATA.counts)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_iter_blocks_and_float32(written, case):
    reader = _open(case, written[case.name], dtype="float32")
    assert reader.dtype == np.float32
    pieces = list(reader.iter_blocks(50, start=7, stop=150))
    assert [(a, b) for a, b, _, _ in pieces] == [(7, 57), (57, 107), (107, 150)]
    counts = np.concatenate([block for _, _, block, _ in pieces])
    assert counts.dtype == np.float32
    np.testing.assert_array_equal(counts, DATA.counts[7:150])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_names_ids_and_metadata(written, case):
    reader = _open(case, written[case.name])
    cells = reader.cells()
    assert cells.dtype == object
    np.testing.assert_array_equal(cells, DATA.cell_names)
    genes = _genes(reader, case)
    assert genes.dtype == object
    np.testing.assert_array_equal(genes, DATA.gene_names)
    np.testing.assert_array_equal(reader.gene_ids(), synthetic_gene_ids(N_GENES))
    metadata = reader.metadata()
    if not case.metadata:
        assert metadata == {}
        return
    assert sorted(metadata) == sorted(METADATA_COLUMNS)
    for column in METADATA_COLUMNS:
        truth = DATA.metadata[column].to_numpy()
        if column == "size_factor":
            np.testing.assert_array_equal(metadata[column], truth.astype(np.float32))
        else:
            assert metadata[column].tolist() == truth.astype(str).tolist()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_pickles_small_and_fingerprints(written, case):
    reader = _open(case, written[case.name])
    blob = pickle.dumps(reader)
    assert len(blob) < 4096
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.read(20, 30), DATA.counts[20:30])
    fingerprint = reader.fingerprint()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["format"] == case.format
    assert all(entry["size"] > 0 for entry in fingerprint["files"])


def test_fingerprint_changes_with_the_file(tmp_path):
    path = write_10x_h5(tmp_path / "a.h5", DATA)
    before = open_reader(path).fingerprint()
    assert open_reader(path).fingerprint() == before
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    assert open_reader(path).fingerprint() != before


def test_csc_orientation_and_gene_blocks(written):
    reader = open_reader(written["h5ad-csc"])
    assert reader.orientation == "genes"
    assert open_reader(written["h5ad-csr"]).orientation == "cells"
    for g0, g1 in [(0, 1), (3, 17), (0, N_GENES), (40, 41), (9, 9)]:
        block = reader.read_genes(g0, g1)
        assert block.shape == (N_CELLS, g1 - g0)
        np.testing.assert_array_equal(block, DATA.counts[:, g0:g1])
    # the same method on row-oriented readers, for symmetry
    np.testing.assert_array_equal(
        open_reader(written["h5ad-dense"]).read_genes(5, 9), DATA.counts[:, 5:9]
    )


def test_csc_read_in_small_passes(written, monkeypatch):
    from distumap.io.readers import anndata as _readers

    monkeypatch.setattr(_readers, "CSC_ENTRIES_PER_PASS", 37)
    reader = open_reader(written["h5ad-csc"])
    np.testing.assert_array_equal(_by_blocks(reader, [13, 80, 81]), DATA.counts)


@pytest.mark.parametrize("block_bytes", [1, 64, 1000, 1 << 30])
def test_mex_index_in_any_byte_blocks(written, block_bytes):
    reader = MexReader(written["mex-plain"])
    assert not reader.indexed
    with ThreadPoolExecutor(4) as pool:
        reader.build_index(block_bytes=block_bytes, map=pool.map)
    assert reader.indexed
    np.testing.assert_array_equal(_by_blocks(reader, [1, 2, 50, 120]), DATA.counts)
    begin, end = reader.byte_range(0, N_CELLS)
    assert (begin, end) == (reader.data_start, os.path.getsize(reader.matrix_file))


def test_mex_reader_accepts_the_matrix_path(written):
    path = written["mex-gzip"] / "matrix.mtx.gz"
    reader = open_reader(path)
    assert reader.format == "mex"
    np.testing.assert_array_equal(reader.read(0, 9), DATA.counts[:9])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_detection_and_forced_format(written, case):
    path = written[case.name]
    assert _open(case, path).format == case.format
    assert open_reader(path, format=case.format, layer=case.layer).format == case.format


def test_detection_sniffs_hdf5_contents(written, tmp_path):
    for name, expected in [("h5ad-csr", "h5ad"), ("loom", "loom"), ("10x-v3", "10x-h5")]:
        renamed = tmp_path / f"{name}.h5"
        shutil.copy(written[name], renamed)
        assert open_reader(renamed).format == expected
        unnamed = tmp_path / f"{name}.bin"
        shutil.copy(written[name], unnamed)
        assert open_reader(unnamed).format == expected


def test_detection_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError, match=r"notes\.txt: cannot tell the format"):
        open_reader(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"missing\.h5: no such file"):
        open_reader(tmp_path / "missing.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: a folder that is neither"):
        open_reader(tmp_path / "empty")
    with pytest.raises(InputError, match="unknown format 'csv'"):
        open_reader(tmp_path / "notes.txt", format="csv")
    with pytest.raises(InputError, match="dtype must be"):
        open_reader(tmp_path / "notes.txt", format="loom", dtype="float64")
    assert set(FORMATS) == {"10x-h5", "mex", "h5ad", "anndata-zarr", "loom"}


def test_missing_layer_and_v2_genome(written):
    with pytest.raises(InputError, match=r"csr\.h5ad: no layer 'nope'"):
        open_reader(written["h5ad-csr"], layer="nope")
    with pytest.raises(InputError, match=r"cells\.loom: no layer 'nope'"):
        open_reader(written["loom"], layer="nope")
    with pytest.raises(InputError, match=r"v2\.h5: no genome group 'mm10'"):
        open_reader(written["10x-v2"], layer="mm10")
    assert open_reader(written["10x-v2"], layer="GRCh38").n_genes == N_GENES


# ---------------------------------------------------------------------------------------------
# names as the field writes them


def test_duplicate_gene_names_are_made_unique(tmp_path):
    path = write_10x_h5(tmp_path / "dup.h5", DATA)
    with h5py.File(path, "r+") as file:
        names = file["matrix/features/name"][()]
        names[[3, 7, 9]] = names[1]
        names[12] = names[1] + b"-1"  # a name already taken by the renaming scheme
        del file["matrix/features/name"]
        file["matrix/features/name"] = names
    with pytest.warns(UserWarning, match=r"dup\.h5: 3 gene names repeat"):
        genes = open_reader(path).genes()
    first = DATA.gene_names[1]
    assert genes[[1, 3, 7, 9, 12]].tolist() == [first, f"{first}-2", f"{first}-3", f"{first}-4",
                                                f"{first}-1"]  # fmt: skip
    assert len(set(genes)) == N_GENES


def test_loom_unescapes_xml_references(tmp_path):
    path = write_loom(tmp_path / "names.loom", DATA)
    with h5py.File(path, "r+") as file:
        cells = file["col_attrs/CellID"][()]
        cells[0] = b"caf&#xe9;-1"
        del file["col_attrs/CellID"]
        file["col_attrs/CellID"] = cells
    assert open_reader(path).cells()[0] == "café-1"


def test_anndata_07_categories_layout(tmp_path):
    """anndata 0.7 stored a categorical as integer codes that reference obs/__categories/NAME."""
    path = write_h5ad(tmp_path / "old.h5ad", DATA)
    with h5py.File(path, "r+") as file:
        obs = file["obs"]
        group = obs["class_label"]
        codes, categories = group["codes"][()], group["categories"].asstr()[()]
        del obs["class_label"]
        store = obs.require_group("__categories")
        store.create_dataset("class_label", data=np.array(categories, dtype=h5py.string_dtype()))
        obs.create_dataset("class_label", data=codes)
        obs["class_label"].attrs["categories"] = store["class_label"].ref
    metadata = open_reader(path).metadata()
    assert metadata["class_label"].tolist() == DATA.metadata["class_label"].tolist()


# ---------------------------------------------------------------------------------------------
# values: rounding near-integers, refusing fractions and negatives


def _replace(file: h5py.File, name: str, values: np.ndarray) -> None:
    attrs = dict(file[name].attrs)
    del file[name]
    file[name] = values
    file[name].attrs.update(attrs)


def test_near_integers_are_rounded_and_counted(tmp_path):
    path = write_h5ad(tmp_path / "near.h5ad", DATA)
    with h5py.File(path, "r+") as file:
        data = file["X/data"][()].astype(np.float64)
        data[::3] += 4e-7
        data[1::3] -= 1e-9
        _replace(file, "X/data", data)
        expected = int(np.count_nonzero(data != np.rint(data)))
    reader = open_reader(path)
    np.testing.assert_array_equal(_by_blocks(reader, [40, 41, 100]), DATA.counts)
    assert reader.rounded == expected > 0
    _block, rounded = reader.read_counted(0, N_CELLS)
    assert rounded == expected


def _first_entry(counts: np.ndarray, *, skip: int = 0) -> tuple[int, int]:
    cells, genes = np.nonzero(counts)
    return int(cells[skip]), int(genes[skip])


def test_fractional_counts_name_file_dataset_and_gene(tmp_path):
    path = write_h5ad(tmp_path / "frac.h5ad", DATA)
    with h5py.File(path, "r+") as file:
        data = file["X/data"][()].astype(np.float32)
        data[5] = 2.5
        _replace(file, "X/data", data)
    cell, gene = _first_entry(DATA.counts, skip=5)
    reader = open_reader(path)
    message = rf"frac\.h5ad: dataset /X/data: a fractional count \(2\.5\) for cell {cell}, gene "
    with pytest.raises(InputError, match=message + rf"'{DATA.gene_names[gene]}'.*--dtype float32"):
        reader.read(0, N_CELLS)
    block = open_reader(path, dtype="float32").read(cell, cell + 1)
    assert block[0, gene] == 2.5


@pytest.mark.parametrize("x", ["csc", "dense"])
def test_fractional_and_negative_in_csc_and_dense(tmp_path, x):
    counts = DATA.counts.astype(np.float32)
    cell, gene = _first_entry(DATA.counts, skip=11)
    path = write_h5ad(tmp_path / f"{x}.h5ad", DATA, x=x)
    with h5py.File(path, "r+") as file:
        if x == "dense":
            counts[cell, gene] = 0.25
            _replace(file, "X", counts)
        else:
            data = file["X/data"][()].astype(np.float32)
            indices, indptr = file["X/indices"][()], file["X/indptr"][()]
            k = indptr[gene] + int(
                np.flatnonzero(indices[indptr[gene] : indptr[gene + 1]] == cell)[0]
            )
            data[k] = 0.25
            _replace(file, "X/data", data)
    where = "/X" if x == "dense" else "/X/data"
    with pytest.raises(
        InputError,
        match=rf"{x}\.h5ad: dataset {where}: a fractional count \(0\.25\) for cell "
        rf"{cell}, gene '{DATA.gene_names[gene]}'",
    ):
        open_reader(path).read(0, N_CELLS)


def test_negative_counts_in_10x(tmp_path):
    path = write_10x_h5(tmp_path / "neg.h5", DATA)
    with h5py.File(path, "r+") as file:
        file["matrix/data"][7] = -3
    cell, gene = _first_entry(DATA.counts, skip=7)
    with pytest.raises(
        InputError,
        match=rf"neg\.h5: dataset /matrix/data: a negative count \(-3\) for cell {cell}, gene "
        rf"'{DATA.gene_names[gene]}'",
    ):
        open_reader(path).read(0, N_CELLS)
    # a block without the bad value reads fine
    np.testing.assert_array_equal(
        open_reader(path).read(cell + 1, N_CELLS), DATA.counts[cell + 1 :]
    )


def test_negative_counts_in_loom(tmp_path):
    path = write_loom(tmp_path / "neg.loom", DATA)
    cell, gene = _first_entry(DATA.counts, skip=2)
    with h5py.File(path, "r+") as file:
        file["matrix"][gene, cell] = -1
    with pytest.raises(InputError, match=r"neg\.loom: dataset /matrix: a negative count"):
        open_reader(path).read(0, N_CELLS)


# ---------------------------------------------------------------------------------------------
# broken HDF5 and zarr structure


@pytest.mark.parametrize("name", ["10x-v3", "h5ad-csr", "loom"])
def test_truncated_hdf5(written, tmp_path, name):
    source = written[name]
    path = tmp_path / f"truncated_{source.name}"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"truncated_{re.escape(source.name)}: not a readable"):
        open_reader(path, format=next(c.format for c in CASES if c.name == name)).read(0, 10)


def test_corrupt_chunk_is_named(tmp_path):
    path = write_10x_h5(tmp_path / "corrupt.h5", DATA)
    with h5py.File(path, "r") as file:
        offset = file["matrix/data"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"corrupt\.h5: dataset /matrix/data: cannot read"):
        open_reader(path).read(0, N_CELLS)


def _edit_10x(path: Path, edit) -> Path:
    with h5py.File(path, "r+") as file:
        edit(file)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda f: f["matrix/indptr"].__setitem__(5, 10**6),
            r"dataset /matrix/indptr: indptr is not monotone at position 6",
        ),
        (
            lambda f: f["matrix/indptr"].__setitem__(0, 1),
            r"dataset /matrix/indptr: indptr must start at 0",
        ),
        (
            lambda f: f["matrix/indptr"].__setitem__(-1, f["matrix/indptr"][-1] - 1),
            r"dataset /matrix/indptr: indptr ends at \d+, but data holds \d+ values",
        ),
        (
            lambda f: f["matrix/shape"].__setitem__(1, N_CELLS + 1),
            rf"dataset /matrix/barcodes has shape \({N_CELLS},\), expected {N_CELLS + 1} barcodes",
        ),
        (
            lambda f: f["matrix/shape"].__setitem__(0, N_GENES - 1),
            rf"dataset /matrix/features/name has shape \({N_GENES},\), expected {N_GENES - 1}",
        ),
        (lambda f: f["matrix"].__delitem__("indptr"), "missing dataset /matrix/indptr"),
        (
            lambda f: f["matrix/features"].__delitem__("name"),
            "missing dataset /matrix/features/name",
        ),
    ],
    ids=[
        "not-monotone",
        "not-from-0",
        "not-to-nnz",
        "barcodes",
        "features",
        "no-indptr",
        "no-name",
    ],
)
def test_broken_10x_structure(tmp_path, edit, message):
    path = _edit_10x(write_10x_h5(tmp_path / "broken.h5", DATA), edit)
    with pytest.raises(InputError, match=r"broken\.h5: " + message):
        open_reader(path).read(0, N_CELLS)


def test_10x_index_out_of_range(tmp_path):
    path = write_10x_h5(tmp_path / "index.h5", DATA)
    with h5py.File(path, "r+") as file:
        file["matrix/indices"][9] = N_GENES + 5
    cell, _ = _first_entry(DATA.counts, skip=9)
    reader = open_reader(path)
    with pytest.raises(
        InputError,
        match=rf"index\.h5: dataset /matrix/indices: index {N_GENES + 5} at position 9 is out of "
        rf"range \(0 to {N_GENES - 1}\)",
    ):
        reader.read(cell, cell + 1)


def test_10x_v2_shape_disagrees(tmp_path):
    path = write_10x_h5(tmp_path / "v2.h5", DATA, version=2)
    with h5py.File(path, "r+") as file:
        file["GRCh38/shape"][0] = N_GENES + 2
    with pytest.raises(InputError, match=r"v2\.h5: dataset /GRCh38/gene_names has shape"):
        open_reader(path)


def test_not_a_10x_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["something"] = np.arange(3)
    with pytest.raises(InputError, match=r"other\.h5: not a 10x Cell Ranger HDF5 file"):
        open_reader(path)


@pytest.mark.parametrize("x", ["csr", "csc"])
def test_broken_anndata_sparse(tmp_path, x):
    path = write_h5ad(tmp_path / f"{x}.h5ad", DATA, x=x)
    with h5py.File(path, "r+") as file:
        file["X/indices"][4] = 10**6
    minor = N_GENES if x == "csr" else N_CELLS
    pattern = (
        rf"{x}\.h5ad: dataset /X/indices: index 1000000 at position 4 is out of range "
        rf"\(0 to {minor - 1}\)"
    )
    with pytest.raises(InputError, match=pattern):
        open_reader(path).read(0, N_CELLS)
    with h5py.File(path, "r+") as file:
        file["X/indptr"][3] = 0
    with pytest.raises(InputError, match=rf"{x}\.h5ad: dataset /X/indptr: indptr is not monotone"):
        open_reader(path)


def test_anndata_shape_disagrees(tmp_path):
    path = write_h5ad(tmp_path / "shape.h5ad", DATA)
    with h5py.File(path, "r+") as file:
        file["X"].attrs["shape"] = np.array([N_CELLS, N_GENES + 1])
    with pytest.raises(InputError, match=r"shape\.h5ad: /X has shape .* but obs and var say"):
        open_reader(path)


def test_anndata_zarr_index_out_of_range(tmp_path):
    import zarr

    path = write_anndata_zarr(tmp_path / "bad.zarr", DATA, zarr_format=3)
    indices = zarr.open_array(path / "X" / "indices", mode="r+")
    indices[2] = -1
    with pytest.raises(InputError, match=r"bad\.zarr: dataset /X/indices: index -1 at position 2"):
        open_reader(path).read(0, N_CELLS)


def test_loom_names_disagree_with_matrix(tmp_path):
    path = write_loom(tmp_path / "short.loom", DATA)
    with h5py.File(path, "r+") as file:
        cells = file["col_attrs/CellID"][()]
        del file["col_attrs/CellID"]
        file["col_attrs/CellID"] = cells[:-1]
    with pytest.raises(
        InputError, match=rf"short\.loom: dataset /col_attrs/CellID has shape \({N_CELLS - 1},\)"
    ):
        open_reader(path)


# ---------------------------------------------------------------------------------------------
# broken MEX folders


HEADER_LINES = 3  # banner, %metadata_json, size line (as Cell Ranger writes them)


def _mex(tmp_path: Path, *, gzip_files: bool, name: str = "mex") -> Path:
    return write_mex(tmp_path / name, DATA, gzip=gzip_files)


def _matrix_path(folder: Path) -> Path:
    plain = folder / "matrix.mtx"
    return plain if plain.exists() else folder / "matrix.mtx.gz"


def _rewrite(folder: Path, edit) -> Path:
    """Apply ``edit`` to the list of matrix.mtx lines (without newlines) and write them back."""
    path = _matrix_path(folder)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        lines = file.read().decode().split("\n")[:-1]
    lines = edit(lines)
    with opener(path, "wb") as file:
        file.write(("\n".join(lines) + "\n").encode())
    return path


def _read_all(folder: Path, **options) -> np.ndarray:
    return open_reader(folder, **options).read(0, N_CELLS)


@pytest.fixture(params=[False, True], ids=["plain", "gzip"])
def gzip_files(request) -> bool:
    return request.param


def test_mex_missing_files(tmp_path, gzip_files):
    suffix = ".gz" if gzip_files else ""
    folder = _mex(tmp_path, gzip_files=gzip_files)
    (folder / f"features.tsv{suffix}").unlink()
    with pytest.raises(InputError, match=r"mex: missing features\.tsv\[\.gz\] or genes\.tsv"):
        open_reader(folder, format="mex")
    folder = _mex(tmp_path, gzip_files=gzip_files, name="mex2")
    (folder / f"barcodes.tsv{suffix}").unlink()
    with pytest.raises(InputError, match=r"mex2: missing barcodes\.tsv\[\.gz\]"):
        open_reader(folder, format="mex")
    (folder / f"matrix.mtx{suffix}").unlink()
    with pytest.raises(InputError, match=r"mex2: missing matrix\.mtx\[\.gz\]"):
        open_reader(folder, format="mex")


@pytest.mark.parametrize(
    "banner",
    [
        "%%MatrixMarket matrix coordinate pattern general",
        "%%MatrixMarket matrix array integer general",
        "%%MatrixMarket matrix coordinate integer symmetric",
        "gene cell count",
    ],
)
def test_mex_broken_header(tmp_path, gzip_files, banner):
    folder = _mex(tmp_path, gzip_files=gzip_files)
    path = _rewrite(folder, lambda lines: [banner, *lines[1:]])
    with pytest.raises(
        InputError,
        match=rf"{re.escape(path.name)}: line 1: expected the header '%%MatrixMarket matrix "
        r"coordinate integer\|real general'",
    ):
        open_reader(folder)


def test_mex_broken_size_line(tmp_path, gzip_files):
    folder = _mex(tmp_path, gzip_files=gzip_files)
    path = _rewrite(folder, lambda lines: [*lines[:2], "41 157", *lines[3:]])
    with pytest.raises(
        InputError, match=rf"{re.escape(path.name)}: line 3: expected the size line"
    ):
        open_reader(folder)


@pytest.mark.parametrize(("position", "what"), [(0, "genes"), (1, "cells")])
def test_mex_size_line_disagrees_with_names(tmp_path, gzip_files, position, what):
    folder = _mex(tmp_path, gzip_files=gzip_files)

    def edit(lines):
        sizes = lines[2].split()
        sizes[position] = str(int(sizes[position]) + 1)
        return [*lines[:2], " ".join(sizes), *lines[3:]]

    path = _rewrite(folder, edit)
    listed = "features.tsv" if what == "genes" else "barcodes.tsv"
    with pytest.raises(
        InputError,
        match=rf"{re.escape(path.name)}: line 3: the size line says \d+ {what}, .*{listed}",
    ):
        open_reader(folder)


def _entry_error(tmp_path, gzip_files, index: int, replace, message: str, **options):
    """Rewrite data line ``index`` with ``replace(fields)`` and expect ``message`` at its line."""
    folder = _mex(tmp_path, gzip_files=gzip_files)

    def edit(lines):
        k = HEADER_LINES + index
        lines[k] = replace(lines[k].split())
        return lines

    path = _rewrite(folder, edit)
    line = HEADER_LINES + index + 1
    with pytest.raises(InputError, match=rf"{re.escape(path.name)}: line {line}: {message}"):
        _read_all(folder, **options)
    return folder


def test_mex_negative_count(tmp_path, gzip_files):
    _entry_error(
        tmp_path, gzip_files, 20, lambda f: f"{f[0]} {f[1]} -{f[2]}",
        r"a negative count \(-\d+\) for cell \d+, gene '\w+'",
    )  # fmt: skip


def test_mex_fractional_count(tmp_path, gzip_files):
    folder = _mex(tmp_path, gzip_files=gzip_files)
    cell, gene = _first_entry(DATA.counts, skip=30)

    def edit(lines):
        lines[0] = lines[0].replace("integer", "real")
        fields = lines[HEADER_LINES + 30].split()
        lines[HEADER_LINES + 30] = f"{fields[0]} {fields[1]} 1.5"
        lines[-1] += ".0000000001"  # the last cell's: rounded, counted
        return lines

    path = _rewrite(folder, edit)
    with pytest.raises(
        InputError,
        match=rf"{re.escape(path.name)}: line {HEADER_LINES + 31}: a fractional count \(1\.5\) "
        rf"for cell {cell}, gene '{DATA.gene_names[gene]}'; .*--dtype float32",
    ):
        _read_all(folder)
    assert _read_all(folder, dtype="float32")[cell, gene] == 1.5
    reader = open_reader(folder)
    np.testing.assert_array_equal(reader.read(cell + 1, N_CELLS), DATA.counts[cell + 1 :])
    assert reader.rounded == 1


def test_mex_fraction_in_an_integer_file(tmp_path, gzip_files):
    _entry_error(
        tmp_path, gzip_files, 12, lambda f: f"{f[0]} {f[1]} 2.5", "2.5 in a file whose header"
    )


def test_mex_malformed_line(tmp_path, gzip_files):
    _entry_error(
        tmp_path, gzip_files, 40, lambda f: f"{f[0]} {f[1]} x{f[2]}",
        r"expected '<gene> <barcode> <value>', found '\d+ \d+ x\d+'",
    )  # fmt: skip
    _entry_error(
        tmp_path / "b", gzip_files, 3, lambda f: f"{f[0]}", r"expected '<gene> <barcode> <value>'"
    )


def test_mex_gene_out_of_range(tmp_path, gzip_files):
    _entry_error(
        tmp_path, gzip_files, 55, lambda f: f"{N_GENES + 1} {f[1]} {f[2]}",
        rf"gene \(row\) {N_GENES + 1} out of range 1 to {N_GENES}",
    )  # fmt: skip


def test_mex_cell_out_of_range(tmp_path, gzip_files):
    folder = _mex(tmp_path, gzip_files=gzip_files)

    def edit(lines):
        fields = lines[-1].split()
        lines[-1] = f"{fields[0]} {N_CELLS + 1} {fields[2]}"
        return lines

    path = _rewrite(folder, edit)
    line = HEADER_LINES + int(np.count_nonzero(DATA.counts))
    with pytest.raises(
        InputError, match=rf"{re.escape(path.name)}: line {line}: column \(barcode\).* out of range"
    ):
        _read_all(folder)


def test_mex_truncated(tmp_path, gzip_files):
    folder = _mex(tmp_path, gzip_files=gzip_files)
    path = _rewrite(folder, lambda lines: lines[:-5])
    with pytest.raises(
        InputError, match=rf"{re.escape(path.name)}: line 3: the size line says \d+ entries, the "
        r"file holds \d+ \(truncated\?\)"
    ):  # fmt: skip
        _read_all(folder)


def test_mex_truncated_gzip_stream(tmp_path):
    folder = _mex(tmp_path, gzip_files=True)
    path = folder / "matrix.mtx.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz: cannot read past line \d+"):
        _read_all(folder)


@pytest.mark.parametrize("block_bytes", [64, 1 << 30])
def test_mex_not_sorted_by_cell(tmp_path, gzip_files, block_bytes):
    folder = _mex(tmp_path, gzip_files=gzip_files)
    cells = np.nonzero(DATA.counts)[0]
    # move the first entry of the last cell up to data line 10
    moved = int(np.flatnonzero(cells == cells[-1])[0])

    def edit(lines):
        data = lines[HEADER_LINES:]
        data.insert(10, data.pop(moved))
        return lines[:HEADER_LINES] + data

    path = _rewrite(folder, edit)
    line = HEADER_LINES + 12  # the entry after the moved one goes back to an earlier cell
    reader = open_reader(folder)
    with pytest.raises(
        InputError,
        match=rf"{re.escape(path.name)}: line {line}: entries are not sorted by barcode "
        rf"\(column\): .*comes after column {cells[-1] + 1}",
    ):
        if gzip_files:
            reader.read(0, N_CELLS)
        else:
            reader.build_index(block_bytes=block_bytes)


# ---------------------------------------------------------------------------------------------
# empty cells at the edges, and URLs


def _with_empty_edges():
    from distumap.testing import SyntheticData

    counts = DATA.counts.copy()
    counts[:4] = 0
    counts[-5:] = 0
    counts[60:63] = 0
    return SyntheticData(DATA.spec, counts, DATA.cell_names, DATA.gene_names, DATA.metadata)


@pytest.mark.parametrize(
    "write",
    [
        write_10x_h5,
        lambda p, d: write_10x_h5(p, d, antibody_features=2),
        lambda p, d: write_mex(p, d, gzip=False),
        write_mex,
        lambda p, d: write_h5ad(p, d, x="csc"),
    ],
    ids=["10x", "10x-antibodies", "mex-plain", "mex-gzip", "h5ad-csc"],
)
def test_empty_cells_at_the_edges(tmp_path, write):
    data = _with_empty_edges()
    path = tmp_path / "edges"
    write(path, data)
    reader = open_reader(path)
    for bounds in ([], [2, 4, 5, 61, 62, 152, 155]):
        np.testing.assert_array_equal(_by_blocks(reader, bounds), data.counts)


def test_fsspec_urls(written):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for name in ("10x-v3", "h5ad-csr", "loom"):
        memory.pipe(f"/readers/{written[name].name}", written[name].read_bytes())
    for part in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
        memory.pipe(f"/readers/mex/{part}", (written["mex-plain"] / part).read_bytes())
    try:
        for name, expected in [
            ("filtered.h5", "10x-h5"),
            ("csr.h5ad", "h5ad"),
            ("cells.loom", "loom"),
            ("mex", "mex"),
        ]:
            reader = open_reader(f"memory://readers/{name}")
            assert reader.format == expected
            np.testing.assert_array_equal(_by_blocks(reader, [30, 100]), DATA.counts)
            np.testing.assert_array_equal(reader.cells(), DATA.cell_names)
            np.testing.assert_array_equal(
                np.concatenate(list(reader.cell_blocks(70))), DATA.cell_names
            )
            assert reader.fingerprint()["files"][0]["size"] > 0
    finally:
        memory.rm("/readers", recursive=True)


# ---------------------------------------------------------------------------------------------
# the fast paths: blocks into a reused buffer, CSC through one transposition, raw loom chunks


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_blocks_into_one_reused_buffer_leave_nothing_behind(written, case):
    """Every block overwrites all of the buffer it is given: what the previous block (or
    garbage) left there never shows through, whatever the sizes."""
    reader = _open(case, written[case.name])
    buffer = np.full(64 * N_GENES, 99, dtype=reader.dtype)
    for start, stop in [(0, 64), (100, 110), (3, 3), (60, 124), (150, 157), (0, 64)]:
        out = buffer[: (stop - start) * N_GENES].reshape(stop - start, N_GENES)
        block, rounded = reader.read_counted(start, stop, out=out)
        assert block is out and rounded == 0
        np.testing.assert_array_equal(block, DATA.counts[start:stop])
    bounds = []
    for i, (start, stop, block, _) in enumerate(
        reader.iter_blocks(40, start=5, buffers=[buffer, buffer.copy()])
    ):
        np.testing.assert_array_equal(block, DATA.counts[start:stop])  # valid until reused
        assert np.shares_memory(block, buffer) == (i % 2 == 0)
        bounds.append((start, stop))
    assert bounds == [(5, 45), (45, 85), (85, 125), (125, 157)]


def test_a_buffer_that_does_not_fit_is_refused(written):
    reader = open_reader(written["h5ad-csr"])
    for out in (
        np.empty((9, N_GENES), np.int32),
        np.empty((10, N_GENES), np.float32),
        np.empty((N_GENES, 10), np.int32).T,
    ):
        with pytest.raises(ValueError, match="out must be a C-contiguous int32 array"):
            reader.read_counted(0, 10, out=out)


@pytest.mark.parametrize("part", [1, 37, 1000, 1 << 20])
@pytest.mark.parametrize(("first_cell", "chunk"), [(0, 64), (90, 50), (3, 1000)])
def test_csc_entries_sorted_by_block_rebuild_every_block(written, part, first_cell, chunk):
    """The transposition's parts, whatever their size and wherever the input starts in the
    store, give each store block exactly its cells' entries (and rows of other inputs stay)."""
    reader = open_reader(written["h5ad-csc"])
    n_blocks = -(-(first_cell + N_CELLS) // chunk)
    parts = [
        reader.csc_entries(
            low, min(low + part, reader.nnz), first_cell=first_cell, chunk_cells=chunk,
            n_blocks=n_blocks,
        )
        for low in range(0, reader.nnz, part)
    ]  # fmt: skip
    assert (
        sum(packed.shape[0] for packed, _ in parts) == reader.nnz == np.count_nonzero(DATA.counts)
    )
    store = np.full((n_blocks * chunk, N_GENES), -1, dtype=np.int32)  # cells of other inputs
    for block in range(n_blocks):
        out = store[block * chunk : (block + 1) * chunk]
        lo, hi = max(first_cell, block * chunk), min(first_cell + N_CELLS, (block + 1) * chunk)
        if lo < hi:
            out[lo - block * chunk : hi - block * chunk] = 0
        entries = np.concatenate(
            [packed[offsets[block] : offsets[block + 1]] for packed, offsets in parts]
        )
        assert reader.fill_csc_entries(entries, out, first_cell=block * chunk - first_cell) == 0
    np.testing.assert_array_equal(store[first_cell : first_cell + N_CELLS], DATA.counts)
    assert (store[:first_cell] == -1).all() and (store[first_cell + N_CELLS :] == -1).all()


def test_csc_ingest_transposes_once_with_several_inputs(written, tmp_path, monkeypatch):
    """CSC inputs between others, genes in another order, parts of a few entries: the store
    is exact, no block task passes over the whole matrix, and the scratch is gone."""
    import anndata
    import dask
    import zarr

    from distumap import io
    from distumap.io.readers import anndata as _readers

    order = np.random.default_rng(1).permutation(N_GENES)
    shuffled = tmp_path / "shuffled.h5ad"
    anndata.read_h5ad(written["h5ad-csc"])[:, order].copy().write_h5ad(shuffled)
    monkeypatch.setattr(_readers, "CSC_ENTRIES_PER_PASS", 37)
    monkeypatch.setattr(
        _readers.AnnDataReader,
        "_fill_csc_cells",
        lambda *args: pytest.fail("a block task passed over the whole CSC matrix"),
    )
    store = tmp_path / "store.zarr"
    inputs = [written["h5ad-csc"], written["10x-v3"], shuffled]
    with dask.config.set(scheduler="threads", num_workers=2), pytest.warns(UserWarning):
        ds = io.read(inputs, store, chunk_cells=50)
    np.testing.assert_array_equal(ds["counts"].values, np.concatenate([DATA.counts] * 3))
    progress = zarr.open_group(str(store), mode="r")["_progress"]
    assert not [name for name in progress.keys() if name.startswith(("csc", "ingest_csc"))]


def test_csc_ingest_resumes_after_an_interruption(written, tmp_path, monkeypatch):
    import dask

    from distumap import io
    from distumap.io import _ingest as _read
    from distumap.io import _transposition
    from distumap.io.readers import anndata as _readers

    monkeypatch.setattr(_readers, "CSC_ENTRIES_PER_PASS", 100)
    original = _read._read_block
    calls = []

    def failing(*args):
        calls.append(args[3])
        if len(calls) == 3:
            raise RuntimeError("the worker went away")
        return original(*args)

    monkeypatch.setattr(_read, "_read_block", failing)
    store = tmp_path / "store.zarr"
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="went"):
        io.read(written["h5ad-csc"], store, chunk_cells=20)
    monkeypatch.setattr(_read, "_read_block", original)
    parts = []
    original_part = _transposition.transpose_part
    monkeypatch.setattr(
        _transposition,
        "transpose_part",
        lambda *args: parts.append(args[3]) or original_part(*args),
    )
    with dask.config.set(scheduler="synchronous"):
        ds = io.read(written["h5ad-csc"], store, chunk_cells=20)
    assert parts == []  # the transposition was done: only the blocks were left
    np.testing.assert_array_equal(ds["counts"].values, DATA.counts)


def test_csc_ingest_names_a_bad_value(tmp_path):
    import dask

    from distumap import io

    path = write_h5ad(tmp_path / "csc.h5ad", DATA, x="csc")
    counts = DATA.counts.astype(np.float32)
    gene, cell = 7, int(np.flatnonzero(counts[:, 7])[-1])
    with h5py.File(path, "r+") as file:
        indptr = file["X/indptr"][:]
        indices = file["X/indices"][indptr[gene] : indptr[gene + 1]]
        position = indptr[gene] + int(np.flatnonzero(indices == cell)[0])
        data = file["X/data"][:].astype(np.float32)
        data[position] = 2.5
        _replace(file, "X/data", data)
    with (
        dask.config.set(scheduler="synchronous"),
        pytest.raises(
            InputError,
            match=rf"csc\.h5ad: dataset /X/data: a fractional count \(2\.5\) for cell {cell}, "
            rf"gene '{DATA.gene_names[gene]}'",
        ),
    ):
        io.read(path, tmp_path / "store.zarr", chunk_cells=16)


@pytest.mark.parametrize(
    "options",
    [{"compression": "lzf"}, {"compression": "gzip", "shuffle": True}, {}],
    ids=["lzf", "gzip-shuffle", "contiguous"],
)
def test_loom_with_other_storage_reads_through_h5py(written, tmp_path, options):
    """loompy's gzip chunks are inflated directly; any other layout goes through h5py."""
    path = tmp_path / "other.loom"
    shutil.copy(written["loom"], path)
    with h5py.File(path, "r+") as file:
        matrix = file["matrix"][:]
        del file["matrix"]
        file.create_dataset("matrix", data=matrix, **options)
    np.testing.assert_array_equal(_by_blocks(open_reader(path), [7, 64, 65, 130]), DATA.counts)


def test_loom_refused_chunk_value_is_named(tmp_path):
    path = write_loom(tmp_path / "bad.loom", DATA)
    with h5py.File(path, "r+") as file:
        file["matrix"][3, 100] = -4  # genes x cells
    reader = open_reader(path)
    np.testing.assert_array_equal(reader.read(0, 64), DATA.counts[:64])
    with pytest.raises(InputError, match=r"bad\.loom: dataset /matrix: a negative count \(-4\)"):
        reader.read(64, 128)

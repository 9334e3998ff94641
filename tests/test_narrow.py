"""Counts stored narrow: uint16 when every count of the input fits, int32 when one does not
(decided while the blocks are written), exact either way, for every reader; a resume never mixes
the two; and what reads the counts computes in a wide type."""

from __future__ import annotations

import dataclasses
import warnings

import dask
import numpy as np
import pytest
import zarr

from distumap import io, pp
from distumap._format import NARROW_COUNTS, NONZERO, check_store
from distumap._store import mark_stage, progress_array, stage_record
from distumap.io import _ingest_store
from distumap.testing import (
    synthetic_counts,
    write_10x_h5,
    write_anndata_zarr,
    write_genes_by_cells_csv,
    write_h5ad,
    write_loom,
    write_matrix_csv,
    write_mex,
)

DATA = synthetic_counts(90, 23, seed=21, zero_cells=1, zero_genes=1)
CHUNK = 16
WIDE = 70_000  # a count of reads, not of molecules: above uint16's 65,535

#: every reader's input (file name: writer of distumap.testing), from the same matrix
WRITERS = {
    "matrix.csv": write_matrix_csv,
    "matrix.csv.gz": lambda p, d: write_matrix_csv(p, d, compression="gzip"),
    "genes-by-cells.csv": write_genes_by_cells_csv,
    "10x.h5": write_10x_h5,
    "mex": write_mex,
    "csr.h5ad": write_h5ad,
    "csc.h5ad": lambda p, d: write_h5ad(p, d, x="csc"),
    "anndata.zarr": write_anndata_zarr,
    "counts.loom": write_loom,
}


def _read(path, store, name: str):
    """io.read on two threads, ignoring the readers' one-line notes (dropped features...)."""
    orientation = "genes-by-cells" if name.startswith("genes-by-cells") else "cells-by-genes"
    with dask.config.set(scheduler="threads", num_workers=2), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return io.read(path, store, chunk_cells=CHUNK, orientation=orientation)


def _with(counts: np.ndarray):
    return dataclasses.replace(DATA, counts=counts)


def _assert_exact(ds, counts: np.ndarray, dtype) -> None:
    assert ds["counts"].dtype == dtype
    assert check_store(ds) == []
    np.testing.assert_array_equal(ds["counts"].values, counts)
    store = ds.encoding["distumap_store"]
    nonzero = zarr.open_array(store, path=NONZERO, mode="r")[:]
    np.testing.assert_array_equal(nonzero.sum(axis=0), np.count_nonzero(counts, axis=0))


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_reader_stores_counts_that_fit_as_uint16(name, tmp_path):
    assert DATA.counts.max() <= np.iinfo(np.uint16).max
    path = WRITERS[name](tmp_path / name, DATA)
    ds = _read(path, tmp_path / "store.zarr", name)
    _assert_exact(ds, DATA.counts, NARROW_COUNTS)
    codec = zarr.open_array(ds.encoding["distumap_store"], path="counts").compressors[0]
    assert codec.typesize == 2  # the shuffle works on the stored width


@pytest.mark.parametrize(
    "name", ["matrix.csv", "matrix.csv.gz", "genes-by-cells.csv", "csc.h5ad", "mex"]
)
def test_a_late_count_too_large_widens_counts_to_int32(name, tmp_path, capfd, monkeypatch):
    counts = DATA.counts.copy()
    counts[-3, 5] = WIDE  # in the last block, after the others were written narrow
    counts[-2, 6] = np.iinfo(np.int32).max
    path = WRITERS[name](tmp_path / name, _with(counts))
    written: list[tuple[int, np.dtype]] = []
    original = _ingest_store.narrowed

    def spying(values, dtype, first):
        written.append((first // CHUNK, np.dtype(dtype)))
        return original(values, dtype, first)

    monkeypatch.setattr(_ingest_store, "narrowed", spying)
    capfd.readouterr()
    with dask.config.set(scheduler="sync"):
        ds = _read(path, tmp_path / "store.zarr", name)
    _assert_exact(ds, counts, np.int32)
    lines = [line for line in capfd.readouterr().err.splitlines() if "65,535" in line]
    assert len(lines) == 1 and "int32" in lines[0], lines
    n_blocks = -(-len(counts) // CHUNK)
    if name.startswith("genes-by-cells"):  # pass 1 saw every count: no block written narrow
        assert written == [] and "again" not in lines[0]
    else:  # every block written narrow first (gzip: in file order, the last one last)
        assert sorted(block for block, _ in written) == list(range(n_blocks))
        assert f"{WIDE:,}" in lines[0]
    assert stage_record(ds.encoding["distumap_store"], "ingest")["status"] == "complete"


def _interrupt(store, blocks: list[int], value: int, dtype) -> None:
    """As a kill leaves a store: the stage started, ``blocks`` unmarked and torn."""
    record = stage_record(store, "ingest")
    mark_stage(store, "ingest", "started", record["params"])
    markers = progress_array(store, "ingest")
    counts = zarr.open_array(str(store), path="counts", mode="r+")
    assert counts.dtype == dtype
    for block in blocks:
        markers[block] = False
        counts[block * CHUNK : (block + 1) * CHUNK] = value


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "widened"])
def test_a_resume_keeps_the_type_the_interrupted_ingest_chose(wide, tmp_path, monkeypatch):
    counts = DATA.counts.copy()
    if wide:
        counts[-1, 0] = WIDE
    path = write_matrix_csv(tmp_path / "matrix.csv", _with(counts))
    store = tmp_path / "store.zarr"
    dtype = np.int32 if wide else NARROW_COUNTS
    _read(path, store, "matrix.csv")
    _interrupt(store, [1, 3], 7, dtype)
    narrowed: list[int] = []
    original = _ingest_store.narrowed
    monkeypatch.setattr(
        _ingest_store, "narrowed", lambda v, d, f: narrowed.append(f) or original(v, d, f)
    )
    ds = _read(path, store, "matrix.csv")
    _assert_exact(ds, counts, dtype)
    assert sorted(narrowed) == ([] if wide else [CHUNK, 3 * CHUNK])  # only the missing blocks


def test_a_resume_after_the_markers_were_cleared_but_before_counts_widened(tmp_path):
    counts = DATA.counts.copy()
    counts[CHUNK + 2, 4] = WIDE
    path = write_matrix_csv(tmp_path / "matrix.csv", _with(counts))
    store = tmp_path / "store.zarr"
    ds = _read(path, store, "matrix.csv")
    assert ds["counts"].dtype == np.int32
    # a kill between the two steps of the widening: every block pending, counts still narrow
    mark_stage(store, "ingest", "started", stage_record(store, "ingest")["params"])
    progress_array(store, "ingest")[:] = False
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group.create_array(
        "counts",
        shape=counts.shape,
        chunks=(CHUNK, counts.shape[1]),
        dtype=NARROW_COUNTS,
        fill_value=0,
        dimension_names=("cell", "gene"),
        overwrite=True,
    )
    _assert_exact(_read(path, store, "matrix.csv"), counts, np.int32)


def test_statistics_of_narrow_counts_are_computed_wide(tmp_path):
    """Counts at uint16's top: a gene whose sum passes 2**32, log2p1 at 65,535, zero fractions."""
    n_cells = 66_000  # 66,000 x 65,535 > 2**32
    counts = np.zeros((n_cells, 3), dtype=np.int32)
    counts[:, 0] = 65_535
    counts[::3, 1] = 65_534
    counts[::7, 2] = np.arange(0, n_cells, 7) % 65_536
    data = synthetic_counts(n_cells, 3, seed=1)
    path = write_h5ad(tmp_path / "big.h5ad", dataclasses.replace(data, counts=counts))
    with dask.config.set(scheduler="threads", num_workers=2), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = io.read(path, tmp_path / "store.zarr", chunk_cells=8_192)
    assert ds["counts"].dtype == NARROW_COUNTS
    wide = counts.astype(np.int64)
    assert int(ds["counts"].sum("cell")[0]) == int(wide[:, 0].sum()) > 2**32
    np.testing.assert_array_equal(ds["counts"].sum("cell").values, wide.sum(axis=0))
    np.testing.assert_array_equal(ds["counts"].mean("cell").values, wide.mean(axis=0))
    np.testing.assert_array_equal(ds["counts"].sum("gene").values, wide.sum(axis=1))
    expected = (counts == 0).sum(axis=0) / n_cells
    np.testing.assert_array_equal(pp.zero_fraction(ds).values, expected.astype(np.float32))
    logged = pp.log2p1(ds, genes=None).values
    np.testing.assert_array_equal(logged, np.log2(wide + 1.0).astype(np.float32))
    processed = pp.preprocess(ds, max_zero_fraction=1.0)
    assert processed["selected_counts"].dtype == NARROW_COUNTS
    np.testing.assert_array_equal(processed["selected_counts"].values, counts)


def test_the_does_not_fit_marker_travels_from_a_worker_intact():
    import pickle

    error = pickle.loads(pickle.dumps(_ingest_store.CountsDoNotFit(41, WIDE)))
    assert isinstance(error, _ingest_store.CountsDoNotFit)
    assert (error.cell, error.count) == (41, WIDE) and "70,000" in str(error)


def test_a_block_that_does_not_fit_writes_nothing(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    store = str(_read(path, tmp_path / "store.zarr", "matrix.csv").encoding["distumap_store"])
    block = np.zeros((CHUNK, DATA.counts.shape[1]), dtype=np.int32)
    block[3, 2] = WIDE
    with pytest.raises(_ingest_store.CountsDoNotFit, match=r"cell 19 .*70,000"):
        _ingest_store.write_block(store, 1, CHUNK, block)
    counts = zarr.open_array(store, path="counts", mode="r")
    np.testing.assert_array_equal(counts[CHUNK : 2 * CHUNK], DATA.counts[CHUNK : 2 * CHUNK])

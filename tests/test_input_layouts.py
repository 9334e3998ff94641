"""The layouts the field's tools wrote over the years, read as those tools read them: AnnData before
0.7 (compound obs/var, ``raw.X``) and 0.7's zarr, counts in ``.raw`` or a layer, loom names by
convention; and damaged files, which exit 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from distumap._errors import InputError
from distumap.cli import main
from distumap.io.readers import open_reader
from distumap.testing import (
    synthetic_counts,
    write_anndata_zarr,
    write_h5ad,
    write_legacy_anndata_zarr,
    write_legacy_h5ad,
    write_loom,
)

DATA = synthetic_counts(97, 23, seed=7, zero_cells=2, zero_genes=1)
SCANPY_LEGACY = (
    Path(sys.prefix) / "lib/python3.11/site-packages/scanpy/datasets/10x_pbmc68k_reduced.h5ad"
)


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def _quiet_open(path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return open_reader(path, **options)


def _assert_reads_as(reader, matrix, cells, genes, obs=None) -> None:
    np.testing.assert_array_equal(reader.read(0, reader.n_cells), _dense(matrix))
    assert reader.cells().tolist() == [str(c) for c in cells]
    # the names by range, as the ingest's skeleton reads them
    assert [name for block in reader.cell_blocks(7) for name in block] == [str(c) for c in cells]
    assert reader.genes().tolist() == [str(g) for g in genes]
    if obs is not None:
        metadata = reader.metadata()
        assert set(metadata) == set(obs.columns)
        for column in obs.columns:
            expected = obs[column]
            if expected.dtype == "category":
                expected = expected.astype(str)
            np.testing.assert_array_equal(metadata[column], expected.to_numpy())


def _error_lines(stderr: str) -> list[str]:
    """stderr's lines but the cluster's addresses (the scheduler and dashboard lines)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return [line for line in lines if not line.startswith(("distumap: Dask ", "distumap: stage "))]


def _anndata_read(path: Path):
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's OldFormatWarning
        return anndata.read_h5ad(path) if path.suffix == ".h5ad" else anndata.read_zarr(path)


# ---------------------------------------------------------------------------------------------
# AnnData before 0.7 (h5ad) and anndata 0.7's zarr, written with h5py and zarr


@pytest.mark.parametrize("x", ["csr", "csc", "dense"])
@pytest.mark.parametrize("writer", [write_legacy_h5ad, write_legacy_anndata_zarr])
def test_legacy_anndata_reads_as_anndata_does(tmp_path, writer, x):
    suffix = ".h5ad" if writer is write_legacy_h5ad else ".zarr"
    path = writer(tmp_path / f"old{suffix}", DATA, x=x)
    adata = _anndata_read(path)
    reader = open_reader(path)
    assert reader.format == ("h5ad" if suffix == ".h5ad" else "anndata-zarr")
    _assert_reads_as(reader, adata.X, adata.obs_names, adata.var_names, adata.obs)
    assert reader.gene_ids().tolist() == adata.var["gene_ids"].tolist()
    np.testing.assert_array_equal(reader.read(0, reader.n_cells), DATA.counts)


def _compound_zarr(path, data, **options):
    return write_legacy_anndata_zarr(path, data, compound=True, **options)


@pytest.mark.parametrize("x", ["csc", "dense"])
def test_compound_frames_in_zarr_read_as_anndata_does(tmp_path, x):
    """zarr frames as structured arrays (the layout before 0.7), as anndata still reads them."""
    path = _compound_zarr(tmp_path / "old.zarr", DATA, x=x)
    adata = _anndata_read(path)
    reader = open_reader(path)
    _assert_reads_as(reader, adata.X, adata.obs_names, adata.var_names, adata.obs)
    assert reader.gene_ids().tolist() == adata.var["gene_ids"].tolist()


@pytest.mark.parametrize("writer", [write_legacy_h5ad, write_legacy_anndata_zarr, _compound_zarr])
def test_legacy_raw_counts_are_found_and_named_by_raw_var(tmp_path, writer):
    suffix = ".h5ad" if writer is write_legacy_h5ad else ".zarr"
    path = writer(tmp_path / f"old{suffix}", DATA, raw=True)
    adata = _anndata_read(path)
    with pytest.warns(UserWarning, match=r"X holds fractional values.*raw[./]X \(--layer raw\)"):
        found = open_reader(path)
    assert found.layer == "raw"
    for reader in (found, open_reader(path, layer="raw"), open_reader(path, layer="raw/X")):
        _assert_reads_as(reader, adata.raw.X, adata.obs_names, adata.raw.var_names)
    kept = open_reader(path, dtype="float32")
    assert kept.layer is None
    np.testing.assert_allclose(kept.read(0, kept.n_cells), _dense(adata.X))


def test_scanpy_legacy_file_reads_as_anndata_does(tmp_path):
    """The real file of anndata < 0.7 that scanpy ships: compound obs with categoricals in uns,
    scaled X, log-normalised raw.X (CSR with h5sparse attributes)."""
    adata = _anndata_read(SCANPY_LEGACY)
    reader = open_reader(SCANPY_LEGACY, layer="raw", dtype="float32")
    _assert_reads_as(reader, adata.raw.X, adata.obs_names, adata.raw.var_names, adata.obs)
    with pytest.raises(InputError) as error:
        open_reader(SCANPY_LEGACY)
    assert str(error.value).endswith(
        "X holds negative values, and no matrix of the file holds integer counts: X (negative "
        "values), raw.X (fractional values); pick one with --layer NAME (--layer raw for raw "
        "counts), or keep X as it is with --dtype float32"
    )


def test_no_counts_in_x_or_a_layer_is_refused_listing_both(tmp_path):
    path = write_h5ad(tmp_path / "cells.h5ad", DATA, layer="counts")
    with h5py.File(path, "r+") as file:
        file["layers/counts/data"][0] = -1
    with pytest.raises(InputError) as error:
        open_reader(path)
    assert "cells.h5ad: X holds fractional values, and no matrix of the file holds integer " in str(
        error.value
    )
    assert "X (fractional values), layers/counts (negative values); pick one" in str(error.value)
    reader = open_reader(path, dtype="float32")  # X as it is
    assert reader.layer is None and reader.read(0, 5).dtype == np.float32


@pytest.mark.cluster
def test_no_counts_anywhere_exits_2_listing_the_matrices(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(SCANPY_LEGACY), str(store), "--no-progress"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "10x_pbmc68k_reduced.h5ad: X holds negative values" in err[0]
    assert "X (negative values), raw.X (fractional values)" in err[0]
    assert not store.exists()


# ---------------------------------------------------------------------------------------------
# counts in .raw or a layer, as anndata 0.12 writes them


@pytest.mark.parametrize("writer", [write_h5ad, write_anndata_zarr])
def test_raw_and_counts_layer_as_anndata_reads_them(tmp_path, writer):
    suffix = ".h5ad" if writer is write_h5ad else ".zarr"
    path = writer(tmp_path / f"cells{suffix}", DATA, layer="counts", raw=True)
    adata = _anndata_read(path)
    assert adata.n_vars == DATA.counts.shape[1] - 1  # raw keeps every gene
    with pytest.warns(UserWarning, match=rf"{path.name}: X holds fractional values.*raw/X"):
        found = open_reader(path)
    raw = open_reader(path, layer="raw")
    assert found.layer == raw.layer == "raw"
    for reader in (found, raw):
        _assert_reads_as(reader, adata.raw.X, adata.obs_names, adata.raw.var_names, adata.obs)
    counts = open_reader(path, layer="counts")
    _assert_reads_as(counts, adata.layers["counts"], adata.obs_names, adata.var_names)
    np.testing.assert_array_equal(found.read(0, found.n_cells), DATA.counts)


def test_a_counts_layer_is_found_without_raw(tmp_path):
    path = write_h5ad(tmp_path / "cells.h5ad", DATA, layer="counts", x="csc")
    with pytest.warns(UserWarning, match=r"read the integer counts in layers/counts"):
        reader = open_reader(path)
    assert reader.layer == "counts"
    np.testing.assert_array_equal(reader.read(0, reader.n_cells), DATA.counts)


def test_ingest_says_which_matrix_it_read(tmp_path):
    import dask

    from distumap import io

    path = write_h5ad(tmp_path / "cells.h5ad", DATA, raw=True)
    with dask.config.set(scheduler="threads", num_workers=2):
        with pytest.warns(UserWarning, match=r"cells.h5ad: X holds .*raw/X \(--layer raw\)"):
            ds = io.read(path, tmp_path / "s.zarr", chunk_cells=32)
    np.testing.assert_array_equal(ds["counts"].values, DATA.counts)
    assert ds["gene"].values.tolist() == list(DATA.gene_names)


# ---------------------------------------------------------------------------------------------
# loom names by convention, compared with loompy's reader


@pytest.mark.parametrize(
    ("cell_attr", "gene_attr", "accession"),
    [
        ("Cell", "Gene", True),  # loompy's own test file
        ("obs_names", "var_names", True),  # anndata's write_loom
        ("cell_names", "gene_names", False),
        ("CellID", None, True),  # genes named by Accession
    ],
)
def test_loom_names_by_convention(tmp_path, cell_attr, gene_attr, accession):
    import loompy

    path = write_loom(
        tmp_path / "c.loom", DATA, cell_attr=cell_attr, gene_attr=gene_attr, accession=accession
    )
    reader = open_reader(path)
    with loompy.connect(str(path), "r") as ds:
        genes = ds.ra[gene_attr or "Accession"]
        _assert_reads_as(reader, ds[:, :].T, ds.ca[cell_attr], genes)
        ids = None if not accession or gene_attr is None else ds.ra["Accession"].tolist()
    assert (None if reader.gene_ids() is None else reader.gene_ids().tolist()) == ids
    assert cell_attr not in reader.metadata() and "class_label" in reader.metadata()


def test_loom_without_names_names_by_index_with_one_warning(tmp_path):
    path = write_loom(tmp_path / "c.loom", DATA, cell_attr=None, gene_attr=None, accession=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = open_reader(path)
    assert len(caught) == 1
    assert "no cell names" in str(caught[0].message) and "no gene names" in str(caught[0].message)
    assert reader.cells().tolist() == [str(i) for i in range(DATA.counts.shape[0])]
    numbered = [name for block in reader.cell_blocks(7) for name in block]
    assert numbered == [str(i) for i in range(DATA.counts.shape[0])]
    assert reader.genes().tolist() == [str(i) for i in range(DATA.counts.shape[1])]


# ---------------------------------------------------------------------------------------------
# damaged files: exit 2 and one line naming the file, through the command in its own process


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _overwrite(path: Path, fraction: float, n: int = 256) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * fraction)
    data[at : at + n] = b"\xff" * len(data[at : at + n])
    path.write_bytes(bytes(data))


def _chunk(folder: Path, array: str) -> Path:
    return sorted((folder / array).glob("[0-9]*"))[0]


#: damage patterns: where each lands in these small files, the damaged part is read (an overwrite
#: that lands in free space, or in what no reader reads, leaves a readable file)
DAMAGES = {
    "h5ad-overwritten": (lambda p: write_h5ad(p / "x.h5ad", DATA), lambda f: _overwrite(f, 0.5)),
    "legacy-h5ad-cut": (lambda p: write_legacy_h5ad(p / "x.h5ad", DATA), lambda f: _cut(f, 0.9)),
    "loom-cut": (lambda p: write_loom(p / "x.loom", DATA), lambda f: _cut(f, 0.9)),
    "loom-overwritten": (lambda p: write_loom(p / "x.loom", DATA), lambda f: _overwrite(f, 0.6)),
    "zarr-chunk-overwritten": (
        lambda p: write_anndata_zarr(p / "x.zarr", DATA),
        lambda f: _overwrite(_chunk(f, "X/data"), 0.5, 64),
    ),
}


@pytest.mark.cluster
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file_exits_2_with_one_line(tmp_path, damage):
    write, spoil = DAMAGES[damage]
    path = write(tmp_path)
    spoil(path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "distumap.cli", "ingest", str(path), str(tmp_path / "s.zarr")]
    command += ["--no-progress", "--n-workers", "1", "--dashboard-address", ":0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    lines = _error_lines(done.stderr)
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"distumap: error: {path}"), done.stderr

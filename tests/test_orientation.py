"""--orientation genes-by-cells: a CSV or TSV with genes in rows gives exactly the store that the
same matrix written cells-by-genes gives, for any chunk and gene block; bad input is named by file,
line and cell; an interrupted ingest resumes without rewriting a block; the CLI and a real
multi-process cluster run it."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import dask
import numpy as np
import pandas as pd
import pytest

from distumap import io
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import NARROW_COUNTS, check_store
from distumap._stage import Stage
from distumap._store import progress_array, stage_record
from distumap.cli import main
from distumap.io import _transposition
from distumap.testing import (
    R_DIALECTS,
    SyntheticSpec,
    synthetic_counts,
    write_genes_by_cells_csv,
    write_matrix_csv,
    write_metadata_csv,
)

GBC = "genes-by-cells"

# 230 cells in chunks of 64 leave a ragged last chunk of 38; 37 genes in blocks of 5 leave 2
DATA = synthetic_counts(230, 37, seed=8, zero_cells=2, zero_genes=2)
DATA.counts[3, 4], DATA.counts[100, 30], DATA.counts[229, 36] = 2**31 - 1, 65_536, 12
CHUNK = 64
GENES_PER_BLOCK = 5


def _block_bytes(genes: int, n_cells: int = 230) -> dict:
    """The config that makes pass-1 blocks of ``genes`` genes (int32) of ``n_cells`` cells."""
    return {"distumap.gene-block-bytes": genes * n_cells * 4}


@pytest.fixture(autouse=True)
def _synchronous(request):
    """Single-threaded and small gene blocks by default; cluster tests bring their client."""
    settings = _block_bytes(GENES_PER_BLOCK)
    if "cluster" not in request.keywords:
        settings["scheduler"] = "synchronous"
    with dask.config.set(settings):
        yield


def _read(path, store, **options):
    options.setdefault("chunk_cells", CHUNK)
    return io.read(path, store, orientation=GBC, **options)


def _quiet(path, store, **options):
    """Read, recording warnings instead of raising them; returns (ds, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _read(path, store, **options)
    return ds, [str(w.message) for w in caught]


def _text(values: np.ndarray, rows, columns, *, sep: str = ",", eol: str = "\n") -> bytes:
    """A genes-by-cells file by hand: an empty first header cell, then one line per row."""
    lines = [sep.join(["", *columns])]
    lines += [sep.join([row, *map(str, line)]) for row, line in zip(rows, values, strict=True)]
    return (eol.join(lines) + eol).encode()


def assert_store_is(ds, counts, cells, genes, *, chunk_cells: int = CHUNK) -> None:
    """``ds`` holds exactly this matrix and these names, chunked by ``chunk_cells`` cells."""
    assert check_store(ds) == []
    narrow = counts.dtype.kind != "f" and counts.max(initial=0) <= 65_535
    assert ds["counts"].dtype == (NARROW_COUNTS if narrow else counts.dtype)
    np.testing.assert_array_equal(ds["counts"].values, counts)
    assert ds["cell"].values.tolist() == [str(c) for c in cells]
    assert ds["gene"].values.tolist() == [str(g) for g in genes]
    n = counts.shape[0]
    expected = (chunk_cells,) * (n // chunk_cells) + ((n % chunk_cells,) if n % chunk_cells else ())
    assert ds["counts"].chunks == (expected, (counts.shape[1],))
    store = ds.encoding["distumap_store"]
    assert stage_record(store, "ingest")["status"] == "complete"
    assert not os.path.exists(os.path.join(store, "_progress", "genes_by_cells"))


def _same_store(ds, reference) -> None:
    """Every variable and coordinate of ``ds`` equals ``reference``'s, chunks included."""
    assert set(ds.variables) == set(reference.variables)
    for name in reference.variables:
        assert ds[name].dtype == reference[name].dtype, name
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    assert ds["counts"].chunks == reference["counts"].chunks
    assert ds["counts"].encoding["chunks"] == reference["counts"].encoding["chunks"]


# ------------------------------------------------------------------ the writer


def test_writer_is_the_transpose_of_the_cells_by_genes_writer(tmp_path):
    spec = SyntheticSpec(230, 37, seed=8, zero_cells=2, zero_genes=2)
    streamed = write_genes_by_cells_csv(tmp_path / "spec.csv", spec, block_genes=4)
    in_memory = write_genes_by_cells_csv(tmp_path / "data.csv", spec.materialize())
    assert streamed.read_bytes() == in_memory.read_bytes()
    assert streamed.read_bytes().startswith(b"," + spec.cell_names()[0].encode())
    table = pd.read_csv(streamed, index_col=0)  # pandas reads it as it wrote df.T.to_csv()
    np.testing.assert_array_equal(table.to_numpy().T, spec.counts())
    assert table.columns.tolist() == spec.cell_names().tolist()
    assert table.index.tolist() == spec.gene_names().tolist()


# ------------------------------------------------------------------ the same store


VARIANTS = {
    "csv": ("genes.csv", {}),
    "tsv": ("genes.tsv", {"sep": "\t"}),
    "crlf-no-final-newline": ("genes.csv", {"line_ending": "\r\n", "final_newline": False}),
    "gzip": ("genes.csv", {"compression": "gzip"}),
    "tsv-gzip-crlf": ("genes.tsv", {"sep": "\t", "compression": "gzip", "line_ending": "\r\n"}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store of the cells-by-genes file of DATA, with its metadata."""
    folder = tmp_path_factory.mktemp("reference")
    matrix = write_matrix_csv(folder / "cells.csv", DATA)
    meta = write_metadata_csv(folder / "meta.csv", DATA, shuffle=True)
    with dask.config.set(scheduler="synchronous"):
        ds = io.read(matrix, folder / "store.zarr", metadata=meta, chunk_cells=CHUNK)
    return ds, meta


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_store_equals_the_cells_by_genes_store(tmp_path, variant, reference):
    expected, meta = reference
    name, options = VARIANTS[variant]
    path = write_genes_by_cells_csv(tmp_path / name, DATA, **options)
    ds, messages = _quiet(path, tmp_path / "store.zarr", metadata=meta)
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)
    _same_store(ds, expected)
    assert ds["class_label"].values.tolist() == DATA.metadata["class_label"].tolist()
    gzipped = [m for m in messages if "gzip-compressed" in m]
    assert len(gzipped) == ("gzip" in variant) and messages == gzipped
    record = stage_record(tmp_path / "store.zarr", "ingest")
    assert record["params"]["orientation"] == GBC and record["rounded"] == 0


@pytest.mark.parametrize("chunk_cells", [64, 1000])
@pytest.mark.parametrize("genes_per_block", [1, 5, 37, 100])
def test_any_chunk_and_gene_block_give_the_same_store(tmp_path, chunk_cells, genes_per_block):
    path = write_genes_by_cells_csv(tmp_path / "genes.csv", DATA)
    with dask.config.set(_block_bytes(genes_per_block)):
        ds = _read(path, tmp_path / "store.zarr", chunk_cells=chunk_cells)
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=chunk_cells)
    blocks = -(-37 // min(genes_per_block, 37))
    done = progress_array(tmp_path / "store.zarr", "ingest_genes", mode="r")[:]
    assert done.shape == (blocks,) and done.all()
    assert progress_array(tmp_path / "store.zarr", "ingest", mode="r")[:].all()


def test_float_written_counts_are_rounded_as_for_cells_by_genes(tmp_path):
    """pandas writes counts that went through float64 as ``3.0`` and ``2.000000000000001``."""
    rng = np.random.default_rng(0)
    noise = rng.choice([0.0, 1e-15, -1e-15, 1e-9], size=DATA.counts.shape) * (DATA.counts > 0)
    values = pd.DataFrame(
        DATA.counts.astype(np.float64) + noise, index=DATA.cell_names, columns=DATA.gene_names
    )
    values.to_csv(tmp_path / "cells.csv")
    values.T.to_csv(tmp_path / "genes.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _read(tmp_path / "genes.csv", tmp_path / "genes.zarr")
        cells = io.read(tmp_path / "cells.csv", tmp_path / "cells.zarr", chunk_cells=CHUNK)
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)
    moved = stage_record(tmp_path / "genes.zarr", "ingest")["rounded"]
    assert moved > 0 and moved == stage_record(tmp_path / "cells.zarr", "ingest")["rounded"]
    rounding = [str(w.message) for w in caught if "rounded" in str(w.message)]
    assert len(rounding) == 2 and f"{moved:,} counts" in rounding[0]
    assert rounding[0].startswith(f"{tmp_path / 'genes.csv'}: ")
    _same_store(ds, cells)


def test_float32_stores_normalised_values_exactly(tmp_path):
    values = (DATA.counts * 0.5 + 0.25).astype(np.float32)  # quarters and negatives: not counts
    values[:, 5] *= -1
    path = tmp_path / "normalised.csv"
    pd.DataFrame(values.T, index=DATA.gene_names, columns=DATA.cell_names).to_csv(path)
    ds = _read(path, tmp_path / "float.zarr", dtype="float32")
    assert_store_is(ds, values, DATA.cell_names, DATA.gene_names)
    with pytest.raises(InputError, match=r"line 2, column 2 \(cell '.*'\): .*--dtype float32"):
        _read(path, tmp_path / "int.zarr")


def test_duplicate_gene_names_made_unique_as_for_cells_by_genes(tmp_path):
    path = tmp_path / "genes.csv"
    path.write_bytes(b",c1,c2\nA,1,0\nB,2,0\nA,3,0\nA-1,4,0\nB,5,6\n")
    with pytest.warns(UserWarning, match=r"column 1: 2 duplicate gene names \(A, B\)"):
        ds = _read(path, tmp_path / "store.zarr")
    assert_store_is(
        ds, np.array([[1, 2, 3, 4, 5], [0, 0, 0, 0, 6]], dtype=np.int32), ["c1", "c2"],
        ["A", "B", "A-2", "A-1", "B-1"],
    )  # fmt: skip


# ------------------------------------------------------------------ files R writes

#: DATA with counts that R writes in scientific notation (1e+05, 1.2e+07) and one it does not
R_DATA = dataclasses.replace(DATA, counts=DATA.counts.copy())
R_DATA.counts[0, 5], R_DATA.counts[7, 6], R_DATA.counts[50, 7] = 100_000, 12_000_000, 120_000


@pytest.fixture(scope="module")
def r_reference(tmp_path_factory):
    """The store of the plain cells-by-genes CSV of R_DATA."""
    folder = tmp_path_factory.mktemp("r-reference")
    matrix = write_matrix_csv(folder / "cells.csv", R_DATA)
    with dask.config.set(scheduler="synchronous"):
        return io.read(matrix, folder / "store.zarr", chunk_cells=CHUNK)


def test_r_writer_writes_what_r_writes(tmp_path):
    """The writers' R dialects, byte for byte, on a 2 x 2 matrix (R's text written by hand)."""
    small = synthetic_counts(2, 2, seed=8)
    small.counts[:] = [[100_000, 0], [7, 12_000_000]]
    cell, gene = small.cell_names, small.gene_names
    expected = {
        "write.table": f'"{gene[0]}" "{gene[1]}"\n"{cell[0]}" 1e+05 0\n"{cell[1]}" 7 1.2e+07\n',
        "write.csv": f'"","{gene[0]}","{gene[1]}"\n"{cell[0]}",1e+05,0\n"{cell[1]}",7,1.2e+07\n',
        "write.table-tsv-unquoted": f"{gene[0]}\t{gene[1]}\n{cell[0]}\t1e+05\t0\n"
        f"{cell[1]}\t7\t1.2e+07\n",
        "write_csv": f"rowname,{gene[0]},{gene[1]}\n{cell[0]},100000,0\n{cell[1]},7,12000000\n",
    }
    for dialect, text in expected.items():
        path = write_matrix_csv(tmp_path / f"{dialect}.txt", small, dialect=dialect)
        assert path.read_text() == text, dialect
    genes = write_genes_by_cells_csv(tmp_path / "genes.txt", small, dialect="fwrite")
    assert genes.read_text() == (
        f"rn,{cell[0]},{cell[1]}\n{gene[0]},1e+05,7\n{gene[1]},0,1.2e+07\n"
    )
    with pytest.raises(ValueError, match=r"one of write\.table, "):
        write_matrix_csv(tmp_path / "x.txt", small, dialect="write.xlsx")


@pytest.mark.parametrize("orientation", ["cells-by-genes", GBC])
@pytest.mark.parametrize("dialect", R_DIALECTS)
def test_every_r_dialect_gives_the_store_of_the_plain_csv(
    tmp_path, dialect, orientation, r_reference
):
    writer = write_genes_by_cells_csv if orientation == GBC else write_matrix_csv
    path = writer(tmp_path / "matrix.txt", R_DATA, dialect=dialect)
    ds = io.read(path, tmp_path / "store.zarr", orientation=orientation, chunk_cells=CHUNK)
    assert_store_is(ds, R_DATA.counts, R_DATA.cell_names, R_DATA.gene_names)
    _same_store(ds, r_reference)
    record = stage_record(tmp_path / "store.zarr", "ingest")
    assert record["rounded"] == 0  # 1e+05 is exactly a count: nothing moved, nothing said
    assert record["dialect"]["r_header"] == dialect.startswith("write.table")


@pytest.mark.parametrize("orientation", ["cells-by-genes", GBC])
@pytest.mark.parametrize("dialect", ["write.table", "write.table-tsv-unquoted"])
def test_r_files_gzipped_with_crlf_and_no_final_newline(tmp_path, dialect, orientation):
    writer = write_genes_by_cells_csv if orientation == GBC else write_matrix_csv
    options = {"compression": "gzip", "line_ending": "\r\n", "final_newline": False}
    path = writer(tmp_path / "matrix.txt", R_DATA, dialect=dialect, **options)
    with pytest.warns(UserWarning, match="gzip-compressed"):
        ds = io.read(path, tmp_path / "store.zarr", orientation=orientation, chunk_cells=CHUNK)
    assert_store_is(ds, R_DATA.counts, R_DATA.cell_names, R_DATA.gene_names)


#: R's layout, decided from line 2, then a line with a field too many or too few
BAD_R = {
    # case: (file text, message)
    "short line": (
        b'"c1" "c2" "c3"\n"G1" 1 2 3\n"G2" 1 2\n',
        r"line 3: too few fields: found 3 of 4 \(a gene name and 3 values; read as R's "
        r"write.table layout",
    ),
    "long line": (
        b"c1\tc2\tc3\nG1\t1\t2\t3\n\nG2\t1\t2\t3\t4\n",
        r"line 4, column 5: too many fields: lines hold a gene name and 3 values, found more "
        r"\('4' after the last cell\); read as R's write.table layout",
    ),
    "NA": (b'"c1" "c2"\n"G1" 1 NA\n', r"line 2, column 3 \(cell 'c2'\): not an integer"),
    "duplicate cell": (b"c1\tc2\tc1\nG1\t1\t2\t3\n", r"line 1, column 3: duplicate cell.*column 1"),
    "empty cell name": (b'"c1" "" "c3"\n"G1" 1 2 3\n', r"line 1, column 2: empty cell name"),
}


@pytest.mark.parametrize("case", list(BAD_R))
def test_bad_r_files_name_file_line_and_column(tmp_path, case):
    text, message = BAD_R[case]
    path = tmp_path / "genes.txt"
    path.write_bytes(text)
    with pytest.raises(InputError) as error:
        _read(path, tmp_path / "store.zarr")
    assert str(error.value).startswith(f"{path}: line "), error.value
    assert re.search(message, str(error.value)), error.value


# ------------------------------------------------------------------ bad input

CELLS = ["c1", "c2", "c3"]
BAD = {
    # case: (file text, message, where the message must point)
    "fractional": (
        b",c1,c2,c3\nG1,1,2,3\nG2,1,3.5,3\n",
        r"line 3, column 3 \(cell 'c2'\): a fractional value.*'3\.5'.*--dtype float32",
    ),
    "short line": (
        b",c1,c2,c3\nG1,1,2,3\nG2,1,2\nG3,1,2,3\n",
        r"line 3: too few fields: found 3 of 4 \(the gene name and 3 cells\)",
    ),
    "long line": (b",c1,c2,c3\nG1,1,2,3,4\n", r"line 2, column 5: too many fields.*last cell"),
    "NA": (b",c1,c2,c3\r\nG1,1,2,3\r\nG2,NA,2,3\r\n", r"line 3, column 2 \(cell 'c1'\): not an"),
    "negative": (b",c1,c2,c3\nG1,1,-2,3\n", r"line 2, column 3 \(cell 'c2'\): a negative count"),
    "duplicate cell": (b",c1,c2,c1\nG1,1,2,3\n", r"line 1, column 4: duplicate cell name 'c1'"),
    "empty cell name": (b",c1,,c3\nG1,1,2,3\n", r"line 1, column 3: empty cell name"),
    "empty gene name": (b",c1,c2,c3\nG1,1,2,3\n,1,2,3\n", r"line 3, column 1: empty gene name"),
    "no cells": (b"gene\nG1\n", r"line 1: the header names no cell after the gene column"),
    "no genes": (b",c1,c2,c3\n\n", r"line 2: no gene lines after the header \(it names 3 cells"),
    "header only": (b",c1,c2,c3", r"line 1: the header is the whole file; there are no genes"),
    "empty": (b"", r"line 1: the file is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_line_and_cell(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / "genes.csv"
    path.write_bytes(text)
    with pytest.raises(InputError) as error:
        _read(path, tmp_path / "store.zarr")
    assert str(error.value).startswith(f"{path}: line "), error.value
    assert re.search(message, str(error.value)), error.value


def test_an_error_in_a_later_gene_block_names_its_line(tmp_path):
    """Line numbers are the file's, across gene blocks and blank lines; the earliest bad block
    is the one reported, and the failed ingest is not usable."""
    lines = [",".join(["", *CELLS])] + [f"G{i},{i},0,1" for i in range(40)]
    lines.insert(10, "")  # a blank line: line numbers still count it
    lines[31] = lines[31].replace(",0,", ",x,")  # gene G29, on line 32
    lines[38] = lines[38].replace(",0,", ",y,")
    path = tmp_path / "genes.csv"
    path.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store.zarr"
    with dask.config.set(_block_bytes(3, n_cells=3)), pytest.raises(InputError) as error:
        _read(path, store)
    message = r"genes\.csv: line 32, column 3 \(cell 'c2'\): not an integer count: 'x'"
    assert re.search(message, str(error.value)), error.value
    assert stage_record(store, "ingest")["status"] == "started"
    with pytest.raises(IncompleteStoreError):
        io.open_store(store)


def test_orientation_is_part_of_the_ingest_parameters(tmp_path):
    """A square file reads both ways: the other orientation is other input."""
    path = tmp_path / "square.csv"
    path.write_bytes(b",a,b,c\nx,1,2,3\ny,4,5,6\nz,7,8,9\n")
    store = tmp_path / "store.zarr"
    cells = io.read(path, store)
    np.testing.assert_array_equal(cells["counts"].values, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with pytest.raises(InputError, match=r"other input or with other parameters"):
        io.read(path, store, orientation=GBC)
    ds = io.read(path, store, orientation=GBC, overwrite=True)
    assert_store_is(
        ds, np.array([[1, 4, 7], [2, 5, 8], [3, 6, 9]], dtype=np.int32), "abc", "xyz",
        chunk_cells=1024,
    )  # fmt: skip
    assert io.read(path, store, orientation=GBC)["counts"].values[0].tolist() == [1, 4, 7]


def test_genes_by_cells_is_for_csv_only(tmp_path):
    from distumap.testing import write_h5ad

    path = write_h5ad(tmp_path / "cells.h5ad", synthetic_counts(20, 5, seed=1))
    with pytest.raises(InputError, match=r"cells\.h5ad: --orientation genes-by-cells is for CSV"):
        io.read(path, tmp_path / "store.zarr", orientation=GBC)


# ------------------------------------------------------------------ resume


def _chunk_mtimes(store, array: str) -> dict[str, int]:
    """Modification times of an array's chunk files, by chunk key (``"2/0"``)."""
    root = os.path.join(store, array, "c")
    times = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            times[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return times


_PARSE, _TRANSPOSE = _transposition.write_gene_rows, _transposition.transpose_block


class _Interrupt(RuntimeError):
    """What a killed worker leaves: a task that did not finish (not bad input)."""


def _counting(
    monkeypatch, *, fail_gene_block: int | None = None, fail_cell_block: int | None = None
):
    """Count the gene blocks parsed and the cell blocks transposed; fail one, as a kill would."""
    parsed, transposed = [], []
    parse, transpose = _PARSE, _TRANSPOSE

    def counting_parse(*args, block, **kwargs):
        if block == fail_gene_block:
            raise _Interrupt(f"gene block {block}")
        parsed.append(block)
        return parse(*args, block=block, **kwargs)

    def counting_transpose(store, block, chunk_cells):
        if block == fail_cell_block:
            raise _Interrupt(f"cell block {block}")
        transposed.append(block)
        return transpose(store, block, chunk_cells)

    monkeypatch.setattr(_transposition, "write_gene_rows", counting_parse)
    monkeypatch.setattr(_transposition, "transpose_block", counting_transpose)
    return parsed, transposed


@pytest.mark.parametrize("variant", ["csv", "gzip"])
def test_interrupted_while_parsing_resumes_the_missing_gene_blocks(tmp_path, monkeypatch, variant):
    options = {"compression": "gzip"} if variant == "gzip" else {}
    path = write_genes_by_cells_csv(tmp_path / "genes.csv", DATA, **options)
    store = tmp_path / "store.zarr"
    parsed, transposed = _counting(monkeypatch, fail_gene_block=4)
    with pytest.raises(_Interrupt):
        _quiet(path, store)
    done = progress_array(store, "ingest_genes", mode="r")[:]
    assert done.shape == (8,) and not done[4] and done.sum() >= 1 and transposed == []
    # a torn write: block 4's first chunk holds garbage
    torn = os.path.join(store, "_progress", "genes_by_cells", "c", "4", "0")
    os.makedirs(os.path.dirname(torn), exist_ok=True)
    with open(torn, "wb") as f:
        f.write(b"\x00garbage")

    parsed, transposed = _counting(monkeypatch)
    ds, _ = _quiet(path, store)
    assert sorted(parsed) == np.flatnonzero(~done).tolist()
    assert sorted(transposed) == [0, 1, 2, 3]
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)
    assert stage_record(store, "ingest")["rounded"] == 0


def test_interrupted_while_transposing_resumes_the_missing_cell_blocks(tmp_path, monkeypatch):
    path = write_genes_by_cells_csv(tmp_path / "genes.csv", DATA)
    store = tmp_path / "store.zarr"
    parsed, transposed = _counting(monkeypatch, fail_cell_block=2)
    with pytest.raises(_Interrupt):
        _read(path, store)
    assert sorted(parsed) == list(range(8))
    done = progress_array(store, "ingest", mode="r")[:]
    assert not done[2] and done.sum() == len(transposed) >= 1
    counts = {k: v for k, v in _chunk_mtimes(store, "counts").items() if done[int(k.split("/")[0])]}

    parsed, transposed = _counting(monkeypatch)
    ds = _read(path, store)
    assert parsed == []  # no gene block parsed twice
    assert sorted(transposed) == np.flatnonzero(~done).tolist()
    assert {k: v for k, v in _chunk_mtimes(store, "counts").items() if k in counts} == counts
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)
    # a finished ingest is skipped
    parsed, transposed = _counting(monkeypatch)
    _read(path, store)
    assert parsed == transposed == []


def _units(units: int) -> int:
    return units


def test_a_pass_runs_its_own_markers_under_the_stage_record(tmp_path):
    """Pass 1's markers are a pass of the ingest stage: its blocks run, skip and are checked
    against ``_progress/<pass>``; the stage's own markers and record are left alone."""
    path = write_genes_by_cells_csv(tmp_path / "genes.csv", DATA)
    store = tmp_path / "store.zarr"
    _read(path, store)
    record = stage_record(store, "ingest")
    stage = Stage(store, "ingest", record["params"])
    genes = stage.pass_("ingest_genes")
    assert genes.record is stage.record and genes.has_markers()
    genes.create_markers(3)
    assert genes.pending() == [0, 1, 2] and stage.pending() == []
    calls = {0: ((5,), {}), 2: ((7,), {})}
    with pytest.raises(RuntimeError, match=r"ingest \(ingest_genes\) blocks \[1\] were not"):
        genes.run_blocks(_units, calls, key="test-pass", label="test", total=12)
    assert progress_array(store, "ingest_genes", mode="r")[:].tolist() == [True, False, True]
    done = genes.run_blocks(_units, {1: ((3,), {}), 2: ((7,), {})}, key="t", label="t", total=12)
    assert done == 3  # block 2 was marked: skipped
    assert genes.pending() == [] and stage_record(store, "ingest") == record
    with pytest.raises(ValueError, match="markers of its own"):
        stage.pass_("ingest")


# ------------------------------------------------------------------ the command and a cluster


@pytest.mark.cluster
def test_cli_ingest_exits_0_and_2(tmp_path, loopback_cluster, capsys):
    path = write_genes_by_cells_csv(tmp_path / "genes.tsv", DATA, sep="\t")
    cluster = ["--no-progress", "--scheduler-file", str(loopback_cluster.scheduler_file)]
    args = ["ingest", str(path), str(tmp_path / "s.zarr"), "--orientation", GBC]
    assert main([*args, "--chunk-cells", "64", *cluster]) == 0, capsys.readouterr().err
    ds = io.open_store(tmp_path / "s.zarr")
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b",c1,c2,c3\nG1,1,2,3\nG2,1,3.5,3\n")
    assert main(["ingest", str(bad), str(tmp_path / "b.zarr"), "--orientation", GBC, *cluster]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{bad}: line 3, column 3 (cell 'c2'): a fractional value" in last


@pytest.mark.cluster
def test_on_a_loopback_cluster_both_passes_run_on_the_workers(tmp_path, loopback_cluster):
    from distributed import get_task_stream

    path = write_genes_by_cells_csv(tmp_path / "genes.csv", DATA)
    with loopback_cluster.client() as client:
        with get_task_stream(client) as stream:
            ds = _read(path, tmp_path / "store.zarr")
        workers = set(client.scheduler_info()["workers"])
    keys = [str(t["key"]) for t in stream.data]
    assert sum(k.startswith("parse-csv-gene-block") for k in keys) == 8
    assert sum(k.startswith("transpose-block") for k in keys) == 4
    assert {t["worker"] for t in stream.data} <= workers
    assert_store_is(ds, DATA.counts, DATA.cell_names, DATA.gene_names)

"""read_csv: the store equals the CSV exactly, for every nasty variant, on every scheduler;
malformed input is named by file, line and column; a killed ingest resumes without redoing
blocks; the parse kernel on bytes."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distumap.io as dio
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import NARROW_COUNTS
from distumap._store import mark_stage, progress_array, stage_record
from distumap.io.readers import _csv_kernels as _csv
from distumap.io.readers import csv as csv_reader
from distumap.testing import (
    SyntheticSpec,
    synthetic_counts,
    write_matrix_csv,
    write_metadata_csv,
)


def _nasty_data(n_cells: int, n_genes: int, seed: int):
    """Seeded counts with all-zero genes and cells, and counts of every width up to int32's
    largest scattered over the others (the parser has a fast path for one digit)."""
    data = synthetic_counts(n_cells, n_genes, seed=seed, zero_genes=2, zero_cells=2)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(data.counts.any(axis=1))
    cols = np.flatnonzero(data.counts.any(axis=0))
    wide = [10, 99, 100, 4_321, 65_536, 1_000_000, 2**31 - 1]
    for value in list(rng.integers(10, 2**31 - 1, size=2 * len(wide))) + wide:
        data.counts[rng.choice(rows), rng.choice(cols)] = value
    return data


# 23 cells in chunks of 5 leave a ragged last chunk of 3
DATA = _nasty_data(23, 11, seed=7)
CHUNK = 5


@pytest.fixture(autouse=True)
def _synchronous(request):
    """Single-threaded by default; the cluster tests bring their own client."""
    if "cluster" in request.keywords:
        yield
        return
    with dask.config.set(scheduler="synchronous"):
        yield


def csv_bytes(
    counts: np.ndarray,
    cells,
    genes,
    *,
    eol: bytes = b"\n",
    final_newline: bool = True,
    blank_lines: bool = False,
    quote: bool = False,
) -> bytes:
    """The matrix as CSV bytes, written by hand; blank lines go before the first cell, between
    cells and at the end, and ``quote`` wraps the header and the sample names in double quotes."""

    def name(text: str) -> bytes:
        return (f'"{text}"' if quote else text).encode()

    lines = [b",".join([name("sample_name"), *(name(g) for g in genes)])]
    if blank_lines:
        lines.append(b"")
    for i, (cell, row) in enumerate(zip(cells, counts, strict=True)):
        lines.append(b",".join([name(cell), *(str(int(v)).encode() for v in row)]))
        if blank_lines and i % 4 == 1:
            lines += [b""] * (1 + i % 3)
    if blank_lines:
        lines += [b"", b""]
    text = eol.join(lines)
    return text + eol if final_newline else text


def assert_store_equals(ds, counts, cells, genes, *, chunk_cells: int | None = None) -> None:
    np.testing.assert_array_equal(ds["counts"].values, counts)
    # narrow when every count fits (the ingest decides), int32 otherwise
    assert ds["counts"].dtype == (NARROW_COUNTS if counts.max(initial=0) <= 65_535 else np.int32)
    assert [str(c) for c in ds["cell"].values] == [str(c) for c in cells]
    assert [str(g) for g in ds["gene"].values] == [str(g) for g in genes]
    if chunk_cells is not None:
        n = counts.shape[0]
        expected = (chunk_cells,) * (n // chunk_cells) + (
            (n % chunk_cells,) if n % chunk_cells else ()
        )
        assert ds["counts"].chunks == (expected, (counts.shape[1],))
        assert ds["counts"].encoding["chunks"] == (chunk_cells, counts.shape[1])
    assert stage_record(ds.encoding["distumap_store"], "ingest")["status"] == "complete"


#: parse tasks of an ingest of DATA: one per block, twice over, since DATA's counts do not all
#: fit uint16 (the blocks are written narrow first, then again once counts is widened)
PARSE_TASKS = 2 * -(-len(DATA.cell_names) // CHUNK)


def ingest(path, store, **options):
    return dio.read_csv(path, store, chunk_cells=options.pop("chunk_cells", CHUNK), **options)


# ------------------------------------------------------------------ the store equals the CSV


def test_fixture_is_nasty():
    assert (DATA.counts.sum(axis=0) == 0).sum() >= 2  # all-zero genes
    assert (DATA.counts.sum(axis=1) == 0).sum() >= 2  # all-zero cells
    assert DATA.counts.shape[0] % CHUNK != 0  # a ragged last chunk
    assert DATA.counts.max() == 2**31 - 1  # counts of every width
    assert (DATA.counts[DATA.counts.any(axis=1)][:, DATA.counts.any(axis=0)] > 9).sum() >= 7


WRITER_VARIANTS = {
    "lf": {},
    "crlf": {"line_ending": "\r\n"},
    "no-final-newline": {"final_newline": False},
    "crlf-no-final-newline": {"line_ending": "\r\n", "final_newline": False},
}


@pytest.mark.parametrize("index_block_bytes", [7, 100, 1 << 20])
@pytest.mark.parametrize("variant", list(WRITER_VARIANTS))
def test_store_equals_csv(tmp_path, variant, index_block_bytes):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA, **WRITER_VARIANTS[variant])
    with dask.config.set({"distumap.index-block-bytes": index_block_bytes}):
        ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)


HAND_VARIANTS = {
    "blank-lines": {"blank_lines": True},
    "blank-lines-crlf": {"blank_lines": True, "eol": b"\r\n"},
    "blank-lines-crlf-no-final-newline": {
        "blank_lines": True,
        "eol": b"\r\n",
        "final_newline": False,
    },
    "quoted": {"quote": True},
    "quoted-crlf-blank-lines": {"quote": True, "eol": b"\r\n", "blank_lines": True},
}


@pytest.mark.parametrize("index_block_bytes", [7, 100])
@pytest.mark.parametrize("variant", list(HAND_VARIANTS))
def test_store_equals_handwritten_csv(tmp_path, variant, index_block_bytes):
    path = tmp_path / "matrix.csv"
    path.write_bytes(
        csv_bytes(DATA.counts, DATA.cell_names, DATA.gene_names, **HAND_VARIANTS[variant])
    )
    with dask.config.set({"distumap.index-block-bytes": index_block_bytes}):
        ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)


def test_single_line_and_odd_counts(tmp_path):
    """One cell, one gene, the int32 maximum, leading zeros, names with spaces and commas
    quoted away from the matrix."""
    path = tmp_path / "matrix.csv"
    path.write_bytes(b"sample_name,G\ncell one,2147483647")
    ds = ingest(path, tmp_path / "a.zarr")
    assert_store_equals(ds, np.array([[2**31 - 1]]), ["cell one"], ["G"], chunk_cells=CHUNK)

    path.write_bytes(b"sample_name,G,H\r\nc1,007,0\r\nc2,0,10\r\n")
    ds = ingest(path, tmp_path / "b.zarr", chunk_cells=1)
    assert_store_equals(ds, np.array([[7, 0], [0, 10]]), ["c1", "c2"], ["G", "H"], chunk_cells=1)


@pytest.mark.parametrize(
    "options", [{}, {"line_ending": "\r\n", "final_newline": False}], ids=["lf", "crlf-no-eol"]
)
def test_gzip_is_read_sequentially(tmp_path, options):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA, compression="gzip", **options)
    assert path.name == "matrix.csv.gz"
    with pytest.warns(UserWarning, match=r"gzip-compressed.*read sequentially") as record:
        ds = ingest(path, tmp_path / "store.zarr")
    assert sum("gzip" in str(w.message) for w in record) == 1
    assert str(path) in str(record[0].message)
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)


def test_gzip_with_blank_lines_and_small_pieces(tmp_path, monkeypatch):
    """The sequential index works in pieces; names and lines that straddle pieces stay whole."""
    path = tmp_path / "matrix.csv.gz"
    raw = csv_bytes(DATA.counts, DATA.cell_names, DATA.gene_names, blank_lines=True, eol=b"\r\n")
    path.write_bytes(gzip.compress(raw))
    original = csv_reader._index_stream
    monkeypatch.setattr(
        csv_reader,
        "_index_stream",
        lambda source, start, sep: original(source, start, sep, piece=13),
    )
    monkeypatch.setattr(_csv, "NAME_OVERHANG", 64)
    with pytest.warns(UserWarning, match="sequentially"):
        ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)


# ------------------------------------------------------------------ any block size, same store

_PROPERTY_DIR = Path(tempfile.mkdtemp(prefix="distumap-ingest-property-"))
_PROPERTY_DATA = _nasty_data(31, 9, seed=11)
_PROPERTY_FILES = {
    variant: write_matrix_csv(_PROPERTY_DIR / f"{variant}.csv", _PROPERTY_DATA, **options)
    for variant, options in WRITER_VARIANTS.items()
}


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunk_cells=st.integers(min_value=1, max_value=40),
    index_block_bytes=st.integers(min_value=2, max_value=700),
    variant=st.sampled_from(sorted(_PROPERTY_FILES)),
    scheduler=st.sampled_from(["synchronous", "threads"]),
)
def test_any_block_size_gives_the_same_store(chunk_cells, index_block_bytes, variant, scheduler):
    store = Path(tempfile.mkdtemp(dir=_PROPERTY_DIR)) / "store.zarr"
    try:
        with dask.config.set(
            {"distumap.index-block-bytes": index_block_bytes, "scheduler": scheduler}
        ):
            ds = dio.read_csv(_PROPERTY_FILES[variant], store, chunk_cells=chunk_cells)
        assert_store_equals(
            ds,
            _PROPERTY_DATA.counts,
            _PROPERTY_DATA.cell_names,
            _PROPERTY_DATA.gene_names,
            chunk_cells=chunk_cells,
        )
        done = progress_array(store, "ingest", mode="r")[:]
        assert done.shape == (-(-31 // chunk_cells),) and done.all()
    finally:
        shutil.rmtree(store.parent)


# ------------------------------------------------------------------ metadata and gene names


def test_metadata_joined_on_sample_name(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    meta = write_metadata_csv(tmp_path / "metadata.csv", DATA, shuffle=True)
    ds = ingest(path, tmp_path / "store.zarr", metadata=meta)
    expected = DATA.metadata
    for column in ["class_label", "subclass_label", "subclass_color"]:
        assert ds[column].dims == ("cell",)
        assert [str(v) for v in ds[column].values] == list(expected[column])
    np.testing.assert_allclose(
        ds["size_factor"].values, expected["size_factor"].to_numpy(), rtol=1e-6
    )
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names)


def test_cells_missing_from_metadata_warn_once(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    meta = write_metadata_csv(tmp_path / "metadata.csv", DATA, missing_cells=4)
    present = set(np.loadtxt(meta, delimiter=",", skiprows=1, usecols=0, dtype=str))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ingest(path, tmp_path / "store.zarr", metadata=meta)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert f"4 of {len(DATA.cell_names)} cells have no metadata row" in messages[0]
    assert str(meta) in messages[0]
    missing = np.array([name not in present for name in DATA.cell_names])
    assert missing.sum() == 4
    labels = np.array([str(v) for v in ds["subclass_label"].values])
    assert (labels[missing] == "").all()
    assert (labels[~missing] == DATA.metadata["subclass_label"].to_numpy()[~missing]).all()
    size = ds["size_factor"].values
    assert np.isnan(size[missing]).all() and not np.isnan(size[~missing]).any()


def test_metadata_without_sample_name_joins_on_its_first_column(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    meta = tmp_path / "metadata.csv"
    names = list(DATA.cell_names)
    meta.write_text(",label\n" + "".join(f"{n},L{i % 3}\n" for i, n in enumerate(names[::-1])))
    ds = ingest(path, tmp_path / "store.zarr", metadata=meta)
    expected = [f"L{(len(names) - 1 - i) % 3}" for i in range(len(names))]
    assert ds["label"].values.tolist() == expected


@pytest.mark.parametrize("rows", [3, 7])
def test_metadata_read_in_blocks_is_the_metadata_read_at_once(tmp_path, monkeypatch, rows):
    """The metadata file is parsed a few rows at a time and joined by hashes of the names: the
    columns, their types and the cells left without a row are those of one parse. Names are
    text: "007" and "7" are two cells."""
    from distumap.io import _ingest_store

    names = ["007", "7", "c3", "c4", "c5", "c6", "c7", "c8", "c9", "c10", "c11"]
    table = pd.DataFrame(
        {
            "count": [1, 2, 3, 4, 5, 6, 7, 8, 9, None, 11],  # NaN in one block only
            "ok": [True, False] * 5 + [True],
            "label": ["a", "b", "3", "", "c", None, "d", "e", "f", "g", "h"],
            "size": np.linspace(0.5, 1.5, 11),
        },
        index=pd.Index(names, name=None),
    ).iloc[::-1]
    table = table.drop(index="c3")  # one cell without a row
    meta = tmp_path / "meta.csv"
    table.to_csv(meta)  # pandas' index: the first column, with an empty header cell
    cells = [*names, "x"][::-1]  # "x" and "c3" have no row
    with pytest.warns(UserWarning, match="2 of 12 cells have no metadata row"):
        whole = dio.read_metadata(meta, cells)
    monkeypatch.setattr(_ingest_store, "METADATA_ROWS", rows)
    with pytest.warns(UserWarning, match="2 of 12 cells have no metadata row"):
        parts = dio.read_metadata(meta, cells)
    assert list(parts) == list(whole) == ["count", "ok", "label", "size"]
    for key in whole:
        assert parts[key].dtype == whole[key].dtype, key
        np.testing.assert_array_equal(parts[key], whole[key])
    by_name = dict(zip(cells, range(12), strict=True))
    assert parts["count"][by_name["007"]] == 1 and parts["count"][by_name["7"]] == 2
    assert np.isnan(parts["count"][by_name["c3"]]) and np.isnan(parts["count"][by_name["c10"]])
    assert parts["ok"].dtype == object and parts["ok"][by_name["c3"]] == ""
    assert parts["label"][by_name["c6"]] == "" and parts["label"][by_name["c4"]] == ""
    assert parts["label"][by_name["c3"]] == "" and parts["label"][by_name["c5"]] == "c"


def test_a_metadata_name_given_twice_names_its_line(tmp_path, monkeypatch):
    from distumap.io import _ingest_store

    monkeypatch.setattr(_ingest_store, "METADATA_ROWS", 2)
    meta = tmp_path / "meta.csv"
    meta.write_text("sample_name,x\na,1\nb,2\n,3\nc,4\n,5\nb,6\n")  # unnamed rows join nothing
    with pytest.raises(
        InputError, match=r"meta.csv: line 7, column sample_name: duplicate sample name 'b'"
    ):
        dio.read_metadata(meta, ["a", "b", "c"])


# ------------------------------------------------------------------ CSVs as people write them


def _pandas_style(counts: np.ndarray, cells, genes, *, sep: str, header: str, floats: bool):
    """The text pandas or R writes: any first header cell, floats with rounding noise."""
    rng = np.random.default_rng(0)
    rows = [sep.join([header, *genes])]
    for name, row in zip(cells, counts, strict=True):
        values = row.astype(np.float64)
        if floats:  # what a float64 round trip through normalisation leaves behind
            values = values + rng.choice([0.0, 1e-15, -1e-15, 1e-9], size=values.shape) * (
                values > 0
            )
            texts = [repr(float(v)) for v in values]
        else:
            texts = [str(int(v)) for v in row]
        rows.append(sep.join([f'"{name}"', *texts]))
    return ("\n".join(rows) + "\n").encode()


@pytest.mark.parametrize("header", ["", "cell", '"barcode"'])
@pytest.mark.parametrize("sep", [",", "\t"])
@pytest.mark.parametrize("floats", [False, True])
def test_csv_dialects_people_write(tmp_path, header, sep, floats):
    data = synthetic_counts(300, 40, seed=4)
    path = tmp_path / ("matrix.tsv" if sep == "\t" else "matrix.csv")
    path.write_bytes(
        _pandas_style(data.counts, data.cell_names, data.gene_names, sep=sep, header=header,
                      floats=floats)
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ingest(path, tmp_path / "store.zarr", chunk_cells=64)
    np.testing.assert_array_equal(ds["counts"].values, data.counts)
    assert ds["cell"].values.tolist() == list(data.cell_names)
    assert ds["gene"].values.tolist() == list(data.gene_names)
    rounding = [w for w in caught if "rounded" in str(w.message)]
    moved = ds.attrs["distumap"]["stages"]["ingest"]["rounded"]
    if floats:
        assert len(rounding) == 1 and moved > 0 and f"{moved:,} counts" in str(rounding[0].message)
    else:
        assert rounding == [] and moved == 0


def test_float32_stores_normalised_values_exactly(tmp_path):
    values = np.array([[0.0, 1.5, -2.25], [3.125e-3, 0.0, 7.0]], dtype=np.float32)
    path = tmp_path / "normalised.csv"
    path.write_text(",A,B,C\nc1,0,1.5,-2.25\nc2,3.125e-3,0.0,7\n")
    with pytest.raises(InputError, match=r"line 2, column 3 \(gene 'B'\).*--dtype float32"):
        ingest(path, tmp_path / "int.zarr")
    ds = ingest(path, tmp_path / "float.zarr", dtype="float32")
    assert ds["counts"].dtype == np.float32
    np.testing.assert_array_equal(ds["counts"].values, values)


def test_metadata_duplicate_sample_names(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    meta = tmp_path / "metadata.csv"
    first, second = DATA.cell_names[:2]
    meta.write_text(f"sample_name,label\n{first},a\n{second},b\n{first},c\n")
    with pytest.raises(InputError, match=rf"metadata\.csv: line 4, .*duplicate.*'{first}'"):
        ingest(path, tmp_path / "store.zarr", metadata=meta)


def test_duplicate_gene_names_made_unique(tmp_path):
    path = tmp_path / "matrix.csv"
    path.write_bytes(b"sample_name,A,B,A,A-1,B\nc1,1,2,3,4,5\nc2,0,0,0,0,6\n")
    with pytest.warns(UserWarning, match=r"line 1: 2 duplicate gene names \(A, B\)"):
        ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(
        ds,
        np.array([[1, 2, 3, 4, 5], [0, 0, 0, 0, 6]]),
        ["c1", "c2"],
        ["A", "B", "A-2", "A-1", "B-1"],
    )


# ------------------------------------------------------------------ bad input

HEADER = b"sample_name,Alpha,Beta,Gamma\n"
BAD_LINES = {
    # case: (bytes after the header, line, column, gene or None, message part)
    "too few fields": (b"c1,1,2,3\nc2,1,2\n", 3, None, None, r"too few fields: found 3 of 4"),
    "name only": (b"c1,1,2,3\n\nc2\n", 4, None, None, r"too few fields: found 1 of 4"),
    "too many fields": (b"c1,1,2,3,4\n", 2, 5, None, r"too many fields.*'4' after the last"),
    "trailing comma": (b"c1,1,2,3,\n", 2, 5, None, r"too many fields"),
    "decimal": (
        b"c1,1,2,3\nc2,1,3.5,3\n",
        3,
        3,
        "Beta",
        r"fractional value.*'3\.5'.*--dtype float32",
    ),
    "NA": (b"c1,NA,2,3\n", 2, 2, "Alpha", r"not an integer count: 'NA'"),
    "exponent without digits": (b"c1,1,2,1e\n", 2, 4, "Gamma", r"not an integer count: '1e'"),
    "lone point": (b"c1,1,.,3\n", 2, 3, "Beta", r"not an integer count: '\.'"),
    "space": (b"c1,1, 2,3\n", 2, 3, "Beta", r"not an integer count: ' 2'"),
    "negative": (b"c1,1,2,3\r\nc2,1,-2,3\r\n", 3, 3, "Beta", r"a negative count: '-2'"),
    "too large": (b"c1,2147483648,2,3\n", 2, 2, "Alpha", r"too large for int32: '2147483648'"),
    "huge": (b"c1,1,99999999999999999999999,3\n", 2, 3, "Beta", r"too large for int32"),
    "empty field": (b"c1,1,,3\n", 2, 3, "Beta", r"an empty field"),
    "empty last field crlf": (b"c1,1,2,\r\n", 2, 4, "Gamma", r"an empty field"),
    "stray carriage return": (b"c1,1,2\r,3\n", 2, 3, "Beta", r"not an integer count"),
}


@pytest.mark.parametrize("index_block_bytes", [5, 1 << 20])
@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_values_name_file_line_column_gene(tmp_path, case, index_block_bytes):
    body, line, column, gene, message = BAD_LINES[case]
    path = tmp_path / "matrix.csv"
    path.write_bytes(HEADER + body)
    with dask.config.set({"distumap.index-block-bytes": index_block_bytes}):
        with pytest.raises(InputError) as error:
            ingest(path, tmp_path / "store.zarr", chunk_cells=1)
    text = str(error.value)
    assert text.startswith(f"{path}: line {line}")
    if column is not None:
        assert f"line {line}, column {column}" in text
    if gene is not None:
        assert f"(gene '{gene}')" in text
    assert re.search(message, text), text


def test_error_line_numbers_count_blank_lines(tmp_path):
    """Line numbers are the file's (1-based, blank lines included), across index blocks."""
    rows = [f"cell{i},{i},0,1".encode() for i in range(40)]
    rows[33] = b"cell33,1,x,1"
    body = b"\r\n".join(row + (b"\r\n" if i % 3 == 0 else b"") for i, row in enumerate(rows))
    path = tmp_path / "matrix.csv"
    path.write_bytes(b"sample_name,A,B,C\r\n\r\n" + body + b"\r\n")
    expected = path.read_bytes()[: path.read_bytes().index(b"cell33,")].count(b"\n") + 1
    assert expected == 1 + 1 + 33 + 11 + 1  # header, blank, 33 cells, 11 blanks, this line
    for block_bytes in (3, 64, 1 << 20):
        with dask.config.set({"distumap.index-block-bytes": block_bytes}):
            with pytest.raises(InputError, match=rf"line {expected}, column 3 \(gene 'B'\).*'x'"):
                ingest(path, tmp_path / f"store-{block_bytes}.zarr")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"line 1: the file is empty"),
        (b"\n", r"line 1: the file is empty"),
        (b"sample_name\nc1\n", r"line 1: the header names no gene"),
        (b"sample_name,A,B\n", r"line 2: no cell lines after the header"),
        (b"sample_name,A,B\n\n\r\n\n", r"line 2: no cell lines after the header"),
        (b"sample_name,A,B", r"line 1: the header is the whole file; there are no cells"),
        (b"sample_name,A,,B\nc1,1,2,3\n", r"line 1, column 3: empty gene name"),
        (b"sample_name,A\n,1\n", r"line 2, column 1: empty sample name"),
    ],
    ids=[
        "empty",
        "blank",
        "no genes",
        "no cells",
        "only blank lines",
        "header only",
        "empty gene",
        "empty sample name",
    ],
)
def test_bad_structure(tmp_path, content, message):
    path = tmp_path / "matrix.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        ingest(path, tmp_path / "store.zarr")
    assert str(error.value).startswith(f"{path}: line ")


def test_duplicate_sample_names_name_both_lines(tmp_path):
    path = tmp_path / "matrix.csv"
    path.write_bytes(b'sample_name,A\nc1,1\nc2,2\n\n"c1",3\n')
    with dask.config.set({"distumap.index-block-bytes": 4}):
        with pytest.raises(
            InputError, match=r"line 5, column 1: duplicate sample name 'c1' \(first on line 2\)"
        ):
            ingest(path, tmp_path / "store.zarr")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: no such file"):
        ingest(tmp_path / "nope.csv", tmp_path / "store.zarr")


def test_failed_ingest_leaves_no_usable_store(tmp_path):
    path = tmp_path / "matrix.csv"
    good = csv_bytes(DATA.counts, DATA.cell_names, DATA.gene_names).splitlines(keepends=True)
    good[17] = good[17].replace(b",", b",-", 1)  # the first count of line 18 turns negative
    path.write_bytes(b"".join(good))
    store = tmp_path / "store.zarr"
    for _ in range(2):  # the re-run resumes and fails the same way
        with pytest.raises(InputError, match=r"line 18, column 2 .*a negative count"):
            ingest(path, store)
    assert stage_record(store, "ingest")["status"] == "started"
    with pytest.raises(IncompleteStoreError, match=r"ingest stage is incomplete"):
        dio.open_store(store)
    # the blocks before and after the bad one were written; the bad one was not
    done = progress_array(store, "ingest", mode="r")[:]
    assert not done[17 // CHUNK]


def test_rerun_skips_and_other_input_needs_overwrite(tmp_path):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    store = tmp_path / "store.zarr"
    ingest(path, store)
    record = stage_record(store, "ingest")
    ds = ingest(path, store)  # finished: nothing runs, the record stays as it was
    assert stage_record(store, "ingest") == record
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names)
    with pytest.raises(InputError, match="other parameters"):
        ingest(path, store, chunk_cells=CHUNK + 1)
    ds = ingest(path, store, chunk_cells=CHUNK + 1, overwrite=True)
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK + 1)
    (tmp_path / "empty").mkdir()  # an empty folder is a fine place for a store
    assert_store_equals(
        ingest(path, tmp_path / "empty"), DATA.counts, DATA.cell_names, DATA.gene_names
    )
    (tmp_path / "other").mkdir()  # a folder with a user's files is not overwritten
    (tmp_path / "other" / "notes.txt").write_text("precious")
    (tmp_path / "file.zarr").write_text("precious")
    for taken in ["other", "file.zarr"]:
        with pytest.raises(InputError, match="not a distumap store is already there"):
            ingest(path, tmp_path / taken)
    assert (tmp_path / "other" / "notes.txt").read_text() == "precious"
    assert (tmp_path / "file.zarr").read_text() == "precious"


def test_resume_when_killed_while_writing_the_skeleton(tmp_path):
    """The ingest record says "started" but the markers were never created: start over."""
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    store = tmp_path / "store.zarr"
    ingest(path, store)
    params = stage_record(store, "ingest")["params"]
    mark_stage(store, "ingest", "started", params)
    shutil.rmtree(store / "_progress" / "ingest")
    ds = ingest(path, store)
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)


# ------------------------------------------------------------------ resume after SIGKILL

_KILLED_CHILD = textwrap.dedent(
    """
    import sys, threading
    import dask
    import distumap.io as dio
    from distumap import _progress

    report, written = _progress.report, []

    def stall_after_five(stage, done, total, *, block=None):
        # the marker of `block` is set; after five blocks every parse thread stops here
        report(stage, done, total, block=block)
        written.append(block)
        if len(written) >= 5:
            threading.Event().wait()

    _progress.report = stall_after_five
    with dask.config.set(scheduler="threads", num_workers=2):
        dio.read_csv(sys.argv[1], sys.argv[2], chunk_cells=100)
    """
)


def _chunk_file(store: Path, block: int) -> Path:
    return store / "counts" / "c" / str(block) / "0"


@pytest.mark.slow
def test_resume_after_sigkill_parses_only_missing_blocks(tmp_path, monkeypatch):
    spec = SyntheticSpec(3_000, 5_000, seed=3)
    path = write_matrix_csv(tmp_path / "matrix.csv", spec, block_cells=500)
    store = tmp_path / "store.zarr"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(path), str(store)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120  # guards a hang; nothing asserts on time
        while True:
            assert child.poll() is None, "the ingest ended before it was killed"
            assert time.monotonic() < deadline, "no markers appeared"
            try:
                if progress_array(store, "ingest", mode="r")[:].sum() >= 5:
                    break
            except Exception:  # the skeleton or a marker is being written: try again
                pass
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    before = progress_array(store, "ingest", mode="r")[:]
    n_blocks = 30
    assert before.shape == (n_blocks,) and 5 <= before.sum() < n_blocks
    assert stage_record(store, "ingest")["status"] == "started"
    with pytest.raises(IncompleteStoreError):
        dio.open_store(store)
    written = np.flatnonzero(before)
    missing = np.flatnonzero(~before)
    stamps = {int(b): os.stat(_chunk_file(store, b)).st_mtime_ns for b in written}
    # a torn write: an unmarked block whose chunk file holds garbage
    torn = _chunk_file(store, int(missing[-1]))
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00garbage")

    parsed: list[int] = []
    original = csv_reader._parse_into_block

    def counting(*args, cells, **kwargs):
        parsed.append(cells[0] // 100)
        return original(*args, cells=cells, **kwargs)

    monkeypatch.setattr(csv_reader, "_parse_into_block", counting)
    with dask.config.set(scheduler="threads", num_workers=2):
        ds = dio.read_csv(path, store, chunk_cells=100)

    assert sorted(parsed) == missing.tolist()  # one parse per missing block, none for the rest
    assert {int(b): os.stat(_chunk_file(store, b)).st_mtime_ns for b in written} == stamps
    assert progress_array(store, "ingest", mode="r")[:].all()
    assert_store_equals(ds, spec.counts(), spec.cell_names(), spec.gene_names(), chunk_cells=100)


# ------------------------------------------------------------------ real clusters


@pytest.mark.cluster
def test_ingest_on_loopback_cluster(tmp_path, loopback_cluster):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA, line_ending="\r\n", final_newline=False)
    meta = write_metadata_csv(tmp_path / "metadata.csv", DATA, shuffle=True)
    with loopback_cluster.client() as client:
        from distributed import get_task_stream

        with dask.config.set({"distumap.index-block-bytes": 100}):
            with get_task_stream(client) as stream:
                ds = ingest(path, tmp_path / "store.zarr", metadata=meta)
        workers = set(client.scheduler_info()["workers"])
    # every index and parse task ran on the worker processes
    keys = [str(t["key"]) for t in stream.data]
    assert sum(k.startswith("parse-csv-block") for k in keys) == PARSE_TASKS
    assert any(k.startswith("index-csv-block") for k in keys)
    assert {t["worker"] for t in stream.data} <= workers
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)
    assert [str(v) for v in ds["class_label"].values] == list(DATA.metadata["class_label"])


@pytest.mark.cluster
def test_ingest_on_local_client(tmp_path, local_client):
    from distributed import get_task_stream

    path = write_matrix_csv(tmp_path / "matrix.csv", DATA)
    with dask.config.set({"distumap.index-block-bytes": 64}):
        with get_task_stream(local_client) as stream:
            ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(ds, DATA.counts, DATA.cell_names, DATA.gene_names, chunk_cells=CHUNK)
    keys = [str(t["key"]) for t in stream.data]
    assert sum(k.startswith("parse-csv-block") for k in keys) == PARSE_TASKS
    assert {t["worker"] for t in stream.data} <= set(local_client.scheduler_info()["workers"])

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sample_name,A,B\nc1,1,2\nc2,1,NA\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 3, column 3 \(gene 'B'\).*'NA'"):
        ingest(bad, tmp_path / "bad.zarr")


# ------------------------------------------------------------------ the parse kernel on bytes


def _parse(text: bytes, n_genes: int, starts=None):
    buf = np.frombuffer(text, dtype=np.uint8)
    if starts is None:
        starts = [0] + [i + 1 for i, b in enumerate(text[:-1]) if b == ord("\n")]
    return _csv.parse_block(buf, np.asarray(starts, dtype=np.int64), n_genes)


def test_kernel_values():
    counts, status, _ = _parse(b"a,0,12,2147483647\nb,007,1,0\r\nc,3,4,5", 3)
    assert status == _csv.OK
    np.testing.assert_array_equal(counts, [[0, 12, 2**31 - 1], [7, 1, 0], [3, 4, 5]])
    assert counts.dtype == np.int32


def test_kernel_skips_bytes_between_starts_and_fills_out():
    text = b"\n\nx,1,2\r\n\r\ny,3,4\n"
    out = np.full((2, 2), -1, dtype=np.int32)
    counts, status, _ = _csv.parse_block(
        np.frombuffer(text, np.uint8), np.array([2, 11], dtype=np.int64), 2, out=out
    )
    assert status == _csv.OK and counts is out
    np.testing.assert_array_equal(out, [[1, 2], [3, 4]])


def test_kernel_no_lines():
    counts, status, _ = _parse(b"", 4, starts=[])
    assert status == _csv.OK and counts.shape == (0, 4)


@pytest.mark.parametrize(
    ("text", "status", "error"),
    [
        # (line index, gene index, token start, token end)
        (b"a,1,2\nb,1\n", _csv.TOO_FEW, (1, 1, 9, 9)),
        (b"a,1,2\nbbb\n", _csv.TOO_FEW, (1, 0, 9, 9)),
        (b"a,1,2\nbbb", _csv.TOO_FEW, (1, 0, 9, 9)),
        (b"a,1,2,3\n", _csv.TOO_MANY, (0, 2, 6, 7)),
        (b"a,1,2,\n", _csv.TOO_MANY, (0, 2, 6, 6)),
        (b"a,1,x7\n", _csv.NOT_INTEGER, (0, 1, 4, 6)),
        (b"a,1,3.5\n", _csv.FRACTIONAL, (0, 1, 4, 7)),
        (b"a,1,1e-3\n", _csv.FRACTIONAL, (0, 1, 4, 8)),
        (b"a,1,1e\n", _csv.NOT_INTEGER, (0, 1, 4, 6)),
        (b"a,1,3e9\n", _csv.TOO_LARGE, (0, 1, 4, 7)),
        (b"a,NA,1\r\n", _csv.NOT_INTEGER, (0, 0, 2, 4)),
        (b"a,1,2\rx\n", _csv.NOT_INTEGER, (0, 1, 4, 7)),
        (b"a,-1,1\n", _csv.NEGATIVE, (0, 0, 2, 4)),
        (b"a,1,-\n", _csv.NOT_INTEGER, (0, 1, 4, 5)),
        (b"a,2147483648,1\n", _csv.TOO_LARGE, (0, 0, 2, 12)),
        (b"a,1,99999999999999999999\n", _csv.TOO_LARGE, (0, 1, 4, 24)),
        (b"a,,1\n", _csv.EMPTY_FIELD, (0, 0, 2, 2)),
        (b"a,1,\r\n", _csv.EMPTY_FIELD, (0, 1, 4, 5)),
        (b"a,1,", _csv.EMPTY_FIELD, (0, 1, 4, 4)),
    ],
)
def test_kernel_errors(text, status, error):
    _, got, where = _parse(text, 2)
    assert (got, tuple(int(v) for v in where[:4])) == (status, error)


def test_kernel_rounds_counts_written_as_floats_and_counts_them():
    text = b"a,1.0,2e0,0.999999999999999\nb,3.00000000000001,1E2,4.0000004\n"
    counts, status, error = _parse(text, 3)
    assert status == _csv.OK
    np.testing.assert_array_equal(counts, [[1, 2, 1], [3, 100, 4]])
    assert error[4] == 3  # 1.0, 2e0 and 1E2 are integers as written; three values moved


def test_kernel_float32_takes_any_number_and_tabs():
    text = b"a\t-1.5\t2.5e-3\t7\nb\t.25\t0\t-3\n"
    buf = np.frombuffer(text, np.uint8)
    values, status, _ = _csv.parse_block(
        buf, np.array([0, text.index(b"\n") + 1]), 3, sep=_csv.TAB, dtype="float32"
    )
    assert status == _csv.OK and values.dtype == np.float32
    np.testing.assert_array_equal(values, np.float32([[-1.5, 2.5e-3, 7], [0.25, 0, -3]]))


def test_kernel_error_message():
    text = b"a,1,2\nb,1,NA\n"
    _, status, error = _parse(text, 2)
    with pytest.raises(InputError) as raised:
        _csv.raise_parse_error(
            status,
            error,
            np.frombuffer(text, np.uint8),
            source="m.csv",
            line_numbers=np.array([7, 9]),
            genes=["G1", "G2"],
        )
    assert str(raised.value) == "m.csv: line 9, column 3 (gene 'G2'): not an integer count: 'NA'"


def test_index_block_lines_and_names():
    text = b'sample_name,A\n"x",1\n\r\ny,2\r\n\nz,3'
    data_start = text.index(b"\n") + 1
    whole = _csv.index_block(text[data_start - 1 :], data_start - 1, data_start, len(text) + 1)
    assert whole.names == ["x", "y", "z"]
    np.testing.assert_array_equal(whole.starts, [14, 22, 28])
    np.testing.assert_array_equal(whole.local_line, [1, 3, 5])  # +1 is the file's line number
    assert whole.newlines == 5
    # two ranges that split the file at every byte agree with the whole
    for cut in range(data_start + 1, len(text)):
        a = _csv.index_block(text[data_start - 1 :], data_start - 1, data_start, cut)
        b = _csv.index_block(text[cut - 1 :], cut - 1, cut, len(text) + 1)
        assert a.names + b.names == whole.names
        np.testing.assert_array_equal(np.concatenate([a.starts, b.starts]), whole.starts)
        np.testing.assert_array_equal(
            np.concatenate([a.local_line, b.local_line + a.newlines]), whole.local_line
        )


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(
        st.lists(
            st.one_of(st.integers(0, 9), st.integers(10, 2**31 - 1), st.just(0)),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=6,
    ),
    eol=st.sampled_from([b"\n", b"\r\n"]),
    final_newline=st.booleans(),
    zeros=st.integers(0, 2),
)
def test_kernel_parses_any_counts(counts, eol, final_newline, zeros):
    """Every width of count, with leading zeros, LF or CRLF, with or without a final newline:
    the one-digit fast path and the general path agree with Python's int()."""
    lines = [
        b"c%d," % i + b",".join(b"0" * zeros + str(v).encode() for v in row)
        for i, row in enumerate(counts)
    ]
    text = eol.join(lines) + (eol if final_newline else b"")
    starts, position = [], 0
    for line in lines:
        starts.append(position)
        position += len(line) + len(eol)
    parsed, status, _ = _parse(text, 3, starts=starts)
    assert status == _csv.OK
    np.testing.assert_array_equal(parsed, np.array(counts, dtype=np.int64))


# ------------------------------------------------------------------ R's layouts and quoted names


@pytest.mark.parametrize(
    ("header", "data", "sep", "r_header"),
    [
        (b"sample_name,A,B\n", b"c1,1,2\n", _csv.COMMA, False),
        (b',"A","B"\r\n', b'"c1",1,2\r\n', _csv.COMMA, False),  # pandas, write.csv
        (b'"A"\t"B"\n', b'"c1"\t1\t2\n', _csv.TAB, True),  # write.table(sep = "\t")
        (b"A\tB\n", b"c1\t1\t2\n", _csv.TAB, True),  # and quote = FALSE
        (b'"A" "B"\n', b'"c1" 1 2\n', _csv.SPACE, True),  # write.table's default
        (b"A B\n", b"c1 1 2\n", _csv.SPACE, True),
        (b'"gene A" "B,1"\n', b'"cell one" 1 2\n', _csv.SPACE, True),  # quoted separators
        (b'"A"\n', b'"c1" 5\n', _csv.SPACE, True),  # one gene: the data line decides
        (b"A\n", b"c1,5\n", _csv.COMMA, True),
        (b"A,B\n", None, _csv.COMMA, False),  # no data line: the usual layout
        # a data line with one field too many is an error on that line, not R's layout, when
        # the header names its row-name column or it ends in a separator
        (b"sample_name,A,B\n", b"c1,1,2,3\n", _csv.COMMA, False),
        (b",A,B\n", b"c1,1,2,3\n", _csv.COMMA, False),
        (b"V1,A,B\n", b"c1,1,2,3\n", _csv.COMMA, False),
        (b"A,B\n", b"c1,1,2,\n", _csv.COMMA, False),
    ],
)
def test_detect_dialect(header, data, sep, r_header):
    assert _csv.detect_dialect(header, data) == _csv.Dialect(sep, r_header=r_header)


def test_quoted_names_hold_separators_in_header_index_and_kernel():
    text = b'"gene A" "B"\n"cell one" 1 2\n"say ""hi"" 2" 3 4\n"c" 5 6'
    dialect = _csv.detect_dialect(*text.split(b"\n")[:2])
    assert dialect == _csv.Dialect(_csv.SPACE, r_header=True)
    header = text[: text.index(b"\n") + 1]
    genes = _csv.parse_header(header, "m.txt", dialect.sep, r_header=True)
    assert genes == ["gene A", "B"]
    start = len(header)
    index = _csv.index_block(text[start - 1 :], start - 1, start, len(text) + 1, dialect.sep)
    assert index.names == ["cell one", 'say "hi" 2', "c"]
    buf = np.frombuffer(text, np.uint8)
    counts, status, _ = _csv.parse_block(buf, index.starts, 2, sep=dialect.sep)
    assert status == _csv.OK
    np.testing.assert_array_equal(counts, [[1, 2], [3, 4], [5, 6]])


@pytest.mark.parametrize("header", ["V1", "rn", "rowname", '""'])
def test_data_table_and_readr_headers(tmp_path, header):
    """fwrite writes ``rn`` (``keep.rownames``) or ``V1`` (fread's name for a missing header
    field), readr ``rowname``, write.csv ``""``; counts of a double matrix as ``1e+05``."""
    path = tmp_path / "matrix.csv"
    path.write_text(f"{header},A,B\nc1,1e+05,0\nc2,3,1.2e+07\n")
    ds = ingest(path, tmp_path / "store.zarr")
    assert_store_equals(ds, np.array([[100_000, 0], [3, 12_000_000]]), ["c1", "c2"], ["A", "B"])
    assert stage_record(tmp_path / "store.zarr", "ingest")["rounded"] == 0


@pytest.mark.parametrize("orientation", ["cells-by-genes", "genes-by-cells"])
def test_warnings_name_the_line_that_called_read_or_read_csv(tmp_path, orientation):
    path = write_matrix_csv(tmp_path / "matrix.csv", DATA, compression="gzip")
    with pytest.warns(UserWarning, match="gzip-compressed") as caught:
        dio.read(path, tmp_path / "read.zarr", orientation=orientation, chunk_cells=CHUNK)
    assert {w.filename for w in caught} == {__file__}
    if orientation == "cells-by-genes":
        with pytest.warns(UserWarning, match="gzip-compressed") as caught:
            ingest(path, tmp_path / "read_csv.zarr")
        assert {w.filename for w in caught} == {__file__}


@pytest.mark.parametrize("dtype", ["int32", "float32", "int64", "uint16"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_nonzero_per_gene_is_count_nonzero(dtype, order):
    from distumap.io._ingest_store import nonzero_per_gene

    rng = np.random.default_rng(3)
    values = (rng.random((257, 131)) < 0.3) * rng.integers(1, 9, (257, 131))
    values = np.asarray(values, dtype=dtype, order=order)
    values[:, 7] = 0  # a gene no cell has
    if dtype == "float32":
        values[0, 0], values[1, 1], values[2, 2] = np.nan, -0.0, 1e-30
    got = nonzero_per_gene(values)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.count_nonzero(values, axis=0))
    assert got[7] == 0 and nonzero_per_gene(values[:0]).tolist() == [0] * 131

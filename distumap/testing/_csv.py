"""Text files of the synthetic counts: the tutorial's ``matrix.csv`` and ``metadata.csv``, the
transposed genes-by-cells layout of GEO files, and what R's writers make of both."""

from __future__ import annotations

import contextlib
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numba
import numpy as np

from distumap.testing._kernels import fill_gene_range, name_bytes
from distumap.testing._synthetic import (
    SyntheticData,
    SyntheticSpec,
    cell_populations,
    model_of,
    unpack,
)


@dataclass(frozen=True)
class _RWriter:
    """The text one R call writes for a matrix with row and column names."""

    sep: str
    quote: bool  # names in double quotes (numbers never are)
    first_cell: str | None  # the header's field above the row names; None: it has none
    scientific: bool  # whole numbers of a double matrix as R prints them: 100000 as 1e+05

    def name(self, text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if self.quote else text

    def header(self, names) -> bytes:
        first = [] if self.first_cell is None else [self.name(self.first_cell)]
        return self.sep.join([*first, *(self.name(str(n)) for n in names)]).encode()

    def lines(self, counts: np.ndarray, row_names: list[str], eol: str) -> bytes:
        values = _r_doubles(counts) if self.scientific else counts.astype(str)
        return "".join(
            self.sep.join([self.name(name), *row]) + eol
            for name, row in zip(row_names, values.tolist(), strict=True)
        ).encode()


def _r_doubles(counts: np.ndarray) -> np.ndarray:
    """Whole numbers as R writes a double: fixed notation unless scientific is shorter
    (``scipen = 0``: 100000 is ``1e+05``, 12000000 is ``1.2e+07``, 120000 stays)."""
    text = counts.astype(np.int64).astype(str)
    for index in zip(*np.nonzero((counts >= 100_000) & (counts % 10 == 0)), strict=True):
        fixed = text[index]
        digits = fixed.rstrip("0")
        mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
        scientific = f"{mantissa}e+{len(fixed) - 1:02d}"
        if len(scientific) < len(fixed):
            text[index] = scientific
    return text


#: what R writes for the count matrix ``m`` (cells or genes as row names; a double matrix, as R
#: keeps counts), by the call that writes it: the CSV writers' ``dialect``
_R_WRITERS = {
    # write.table(m, "x.txt"): space-separated, quoted names, no header field above the row names
    "write.table": _RWriter(" ", quote=True, first_cell=None, scientific=True),
    # write.table(m, "x.tsv", sep="\t")
    "write.table-tsv": _RWriter("\t", quote=True, first_cell=None, scientific=True),
    # write.table(m, "x.txt", sep="\t", quote=FALSE)
    "write.table-tsv-unquoted": _RWriter("\t", quote=False, first_cell=None, scientific=True),
    # write.csv(m, "x.csv"): a quoted empty field above the row names
    "write.csv": _RWriter(",", quote=True, first_cell="", scientific=True),
    # data.table::fwrite(as.data.table(m, keep.rownames = TRUE), "x.csv"): quotes where needed
    "fwrite": _RWriter(",", quote=False, first_cell="rn", scientific=True),
    # readr::write_csv(tibble::as_tibble(m, rownames = "rowname"), "x.csv"): readr (since
    # 1.2) writes whole doubles in fixed notation
    "write_csv": _RWriter(",", quote=False, first_cell="rowname", scientific=False),
}

#: the R dialects the CSV writers write (their ``dialect``), named by the R call that writes
#: them: ``write.table`` (R's default: space-separated, quoted, a header with no field above
#: the row names), ``write.table-tsv`` (``sep = "\t"``), ``write.table-tsv-unquoted`` (and
#: ``quote = FALSE``), ``write.csv``, ``fwrite`` (data.table) and ``write_csv`` (readr)
R_DIALECTS = tuple(_R_WRITERS)


def _r_dialect(dialect: str | None) -> _RWriter | None:
    if dialect is None:
        return None
    if dialect not in _R_WRITERS:
        raise ValueError(f"dialect must be None or one of {', '.join(R_DIALECTS)}, not {dialect!r}")
    return _R_WRITERS[dialect]


def write_matrix_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    block_cells: int = 256,
    dialect: str | None = None,
) -> Path:
    """Write the count matrix as the tutorial's ``matrix.csv``, streaming blocks of cells.

    Parameters
    ----------
    path
        Output file. With ``compression="gzip"`` a ``.gz`` suffix is added unless present.
    data
        A spec (generated block by block, for any size) or an in-memory dataset.
    line_ending
        ``"\\n"`` or ``"\\r\\n"`` (both are valid input).
    final_newline
        False leaves the last line unterminated (also valid input).
    compression
        None or ``"gzip"`` (level 1, no timestamp: the same data gives the same bytes).
    block_cells
        Cells per block; it bounds memory (~6 bytes per count) and does not change the output.
    dialect
        None (the tutorial's layout), or one of :data:`R_DIALECTS`: the text that R call
        writes for the same matrix (cells as row names), line ending and compression as asked.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    Header ``sample_name,<gene1>,...``, then ``<sample name>,<int>,...`` per cell. Formatting is a
    compiled kernel into a reused byte buffer; at the tutorial's size it writes ~100 KB per line.

    Examples
    --------
    >>> write_matrix_csv(tmp_path / "matrix.csv", SyntheticSpec(100, 30))  # doctest: +SKIP
    """
    _check_options(line_ending, compression, block_cells, "block_cells")
    r_dialect = _r_dialect(dialect)
    spec, counts_in_memory = unpack(data)
    path = _output_path(path, compression)
    eol = np.frombuffer(line_ending.encode(), dtype=np.uint8)
    header = ",".join(["sample_name", *spec.gene_names()]).encode()
    if r_dialect is not None:
        header = r_dialect.header(spec.gene_names())
    with _opened(path, compression) as sink:
        sink.write(header)
        if spec.n_cells == 0:
            if final_newline:
                sink.write(eol.tobytes())
            return path
        sink.write(eol.tobytes())
        lines = _Lines(line_ending, r_dialect)
        for start in range(0, spec.n_cells, block_cells):
            stop = min(start + block_cells, spec.n_cells)
            if counts_in_memory is None:
                block = spec.counts(start, stop)
            else:
                block = np.ascontiguousarray(counts_in_memory[start:stop], dtype=np.int32)
            names = name_bytes(start, stop, model_of(spec).seed_key)
            unterminated = stop == spec.n_cells and not final_newline
            sink.write(lines.format(block, names, unterminated=unterminated))
            del block  # before the next block is made: peak memory holds one block
    return path


def write_genes_by_cells_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    sep: Literal[",", "\t"] = ",",
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    block_genes: int = 256,
    dialect: str | None = None,
) -> Path:
    """Write the count matrix transposed, genes in rows, as most GEO supplementary files are.

    Parameters
    ----------
    path
        Output file. With ``compression="gzip"`` a ``.gz`` suffix is added unless present.
    data
        A spec (generated block by block, for any size) or an in-memory dataset.
    sep
        ``","`` (CSV) or ``"\\t"`` (TSV).
    line_ending
        ``"\\n"`` or ``"\\r\\n"`` (both are valid input).
    final_newline
        False leaves the last line unterminated (also valid input).
    compression
        None or ``"gzip"`` (level 1, no timestamp: the same data gives the same bytes).
    block_genes
        Genes per block; it bounds memory (~10 bytes per count of a block of genes x all cells)
        and does not change the output.
    dialect
        None (pandas' layout), or one of :data:`R_DIALECTS`: the text that R call writes for
        the transposed matrix (genes as row names), which brings its own separator (leave
        ``sep`` as it is).

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    The header is an empty first cell and then the cell names, as pandas writes
    ``df.T.to_csv()``; then one line ``<gene>,<count>,...`` per gene, in gene order. The counts
    are exactly :func:`write_matrix_csv`'s, transposed: ingested with
    ``orientation="genes-by-cells"`` they give the same store.

    Examples
    --------
    >>> write_genes_by_cells_csv(tmp_path / "genes.csv", SyntheticSpec(100, 30))  # doctest: +SKIP
    """
    if sep not in (",", "\t"):
        raise ValueError(f"sep must be ',' or '\\t', got {sep!r}")
    _check_options(line_ending, compression, block_genes, "block_genes")
    r_dialect = _r_dialect(dialect)
    if r_dialect is not None and sep != ",":
        raise ValueError(f"the {dialect} dialect brings its own separator: leave sep as it is")
    spec, counts_in_memory = unpack(data)
    path = _output_path(path, compression)
    eol = np.frombuffer(line_ending.encode(), dtype=np.uint8)
    header = sep.join(["", *spec.cell_names()]).encode()
    if r_dialect is not None:
        header = r_dialect.header(spec.cell_names())
    genes = spec.gene_names()
    draws = None if counts_in_memory is not None else cell_populations(spec, 0, spec.n_cells)
    with _opened(path, compression) as sink:
        sink.write(header + eol.tobytes())
        lines = _Lines(line_ending, r_dialect, sep=sep)
        for start in range(0, spec.n_genes, block_genes):
            stop = min(start + block_genes, spec.n_genes)
            rows = _gene_rows(spec, counts_in_memory, draws, start, stop)
            for offset, gene in enumerate(genes[start:stop]):
                name = np.frombuffer(str(gene).encode(), dtype=np.uint8)[None, :]
                unterminated = start + offset == spec.n_genes - 1 and not final_newline
                sink.write(lines.format(rows[offset : offset + 1], name, unterminated=unterminated))
            del rows  # before the next block is made: peak memory holds one block
    return path


def _gene_rows(spec: SyntheticSpec, counts, draws, start: int, stop: int) -> np.ndarray:
    """Genes ``start:stop`` of every cell, genes x cells int32: drawn for a spec (``draws``:
    its cells' populations and scales), sliced from ``counts`` in memory."""
    if counts is None:
        model = model_of(spec)
        population, scale = draws
        block = np.empty((spec.n_cells, stop - start), dtype=np.int32)
        fill_gene_range(block, start, model.seed_key, population, scale, model.means)
    else:
        block = counts[:, start:stop]
    return np.ascontiguousarray(block.T, dtype=np.int32)


def _check_options(line_ending: str, compression: str | None, block: int, name: str) -> None:
    if line_ending not in ("\n", "\r\n"):
        raise ValueError(f"line_ending must be '\\n' or '\\r\\n', got {line_ending!r}")
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
    if block < 1:
        raise ValueError(f"{name} must be positive")


def _output_path(path: str | os.PathLike, compression: str | None) -> Path:
    """``path``, with a ``.gz`` suffix added for gzip unless present."""
    path = Path(path)
    if compression == "gzip" and path.suffix != ".gz":
        path = path.with_name(path.name + ".gz")
    return path


@contextlib.contextmanager
def _opened(path: Path, compression: str | None):
    """The output file, through gzip when asked: level 1 and no timestamp, so the same data
    gives the same bytes."""
    with open(path, "wb") as raw:
        if compression != "gzip":
            yield raw
            return
        sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
        try:
            yield sink
        finally:
            sink.close()


class _Lines:
    """Text lines ``<name><sep><count>...``: by the compiled kernel into one reused buffer, or
    as an R dialect writes them."""

    def __init__(self, line_ending: str, r_dialect: _RWriter | None, sep: str = ",") -> None:
        self.line_ending = line_ending
        self.eol = np.frombuffer(line_ending.encode(), dtype=np.uint8)
        self.r_dialect = r_dialect
        self.sep = sep
        self.buffer = np.empty(0, dtype=np.uint8)

    def format(self, counts: np.ndarray, names: np.ndarray, *, unterminated: bool):
        """The lines of ``counts`` (int32, one row per line) named by ``names`` (one row of
        bytes per line); ``unterminated`` leaves the last line without its line ending."""
        if self.r_dialect is not None:
            row_names = [bytes(name).decode() for name in names]
            text = self.r_dialect.lines(counts, row_names, self.line_ending)
            return text[: -self.eol.size] if unterminated else text
        size = _text_size(counts, names.shape[1], self.eol.size)
        if self.buffer.size < size:
            self.buffer = np.empty(int(size * 1.25), dtype=np.uint8)
        written = _format_rows(counts, names, self.eol, self.buffer)
        if unterminated:
            written -= self.eol.size
        text = self.buffer[:written]
        if self.sep == "\t":  # the kernel writes commas; gene names hold none
            text[text == 44] = 9
        return memoryview(text)


def write_metadata_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    missing_cells: int = 0,
    shuffle: bool = False,
) -> Path:
    """Write the tutorial's ``metadata.csv``: ``sample_name`` plus labels, one row per cell.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or an in-memory dataset.
    missing_cells
        Leave out this many cells (seeded choice), to test the "cells missing from metadata" path.
    shuffle
        Write the rows in a seeded random order instead of the matrix's (a join must not care).

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> write_metadata_csv(tmp_path / "metadata.csv", spec, missing_cells=3)  # doctest: +SKIP
    """
    spec, _ = unpack(data)
    if not 0 <= missing_cells <= spec.n_cells:
        raise ValueError(f"missing_cells must be in 0..{spec.n_cells}, got {missing_cells}")
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    rng = np.random.default_rng([spec.seed, 0x4D455441])  # "META": a stream of its own
    keep = np.ones(spec.n_cells, dtype=bool)
    keep[rng.choice(spec.n_cells, size=missing_cells, replace=False)] = False
    order = np.flatnonzero(keep)
    if shuffle:
        order = rng.permutation(order)
    path = Path(path)
    metadata.iloc[order].to_csv(path, index=False)
    return path


def write_dataset(
    directory: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    missing_cells: int = 0,
    shuffle_metadata: bool = False,
    block_cells: int = 256,
) -> tuple[Path, Path]:
    """Write ``matrix.csv`` (or ``matrix.csv.gz``) and ``metadata.csv`` into ``directory``.

    Parameters
    ----------
    directory
        Created if missing.
    data
        A spec or an in-memory dataset.
    line_ending, final_newline, compression, block_cells
        As in :func:`write_matrix_csv`.
    missing_cells, shuffle_metadata
        ``missing_cells`` and ``shuffle`` of :func:`write_metadata_csv`.

    Returns
    -------
    tuple of Path
        ``(matrix_path, metadata_path)``.

    Examples
    --------
    >>> matrix, metadata = write_dataset(tmp_path, SyntheticSpec(500, 300))  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    matrix = write_matrix_csv(
        directory / "matrix.csv",
        data,
        line_ending=line_ending,
        final_newline=final_newline,
        compression=compression,
        block_cells=block_cells,
    )
    metadata = write_metadata_csv(
        directory / "metadata.csv", data, missing_cells=missing_cells, shuffle=shuffle_metadata
    )
    return matrix, metadata


@numba.njit(cache=True, nogil=True)
def _text_size(counts, name_width, eol_size):
    total = counts.shape[0] * (name_width + eol_size)
    for row in range(counts.shape[0]):
        for gene in range(counts.shape[1]):
            value = counts[row, gene]
            digits = 1
            while value >= 10:
                value //= 10
                digits += 1
            total += digits + 1
    return total


@numba.njit(cache=True, nogil=True)
def _format_rows(counts, names, eol, buffer):
    position = 0
    for row in range(counts.shape[0]):
        for j in range(names.shape[1]):
            buffer[position + j] = names[row, j]
        position += names.shape[1]
        for gene in range(counts.shape[1]):
            value = counts[row, gene]
            buffer[position] = 44  # ","
            position += 1
            if value < 10:
                buffer[position] = 48 + value
                position += 1
                continue
            digits = 1
            rest = value // 10
            while rest > 0:
                rest //= 10
                digits += 1
            for j in range(digits - 1, -1, -1):
                buffer[position + j] = 48 + value % 10
                value //= 10
            position += digits
        for j in range(eol.size):
            buffer[position + j] = eol[j]
        position += eol.size
    return position

"""CSV and TSV count matrices, cells by genes (a line per cell) or genes by cells (a line per
gene, as most GEO supplementary files are): :class:`CsvReader`.

General CSV readers collapse at 50,000 columns; this reader finds the lines itself and parses
their bytes with the compiled kernels of :mod:`distumap.io.readers._csv_kernels`:

1. The header gives the genes (genes by cells: the cells) and the file's dialect.
2. The index pass: byte ranges of the file are indexed in parallel (:meth:`CsvReader.index_block`)
   for every line start and the name in its first field, one offset and one name per line. A
   gzip file cannot be split: one task indexes it in order. The ingest keeps the line starts in
   the store, so a resumed ingest never indexes again (:meth:`CsvReader.persisted_index`).
3. Cells by genes: one cell range is one byte range, parsed straight into the caller's block.
   Genes by cells: one gene range is one byte range (:meth:`CsvReader.read_gene_rows`); the
   ingest transposes the gene blocks into cell chunks.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Container, Iterator
from typing import Any, ClassVar

import numpy as np

from distumap import _config
from distumap._errors import InputError, outside_stacklevel
from distumap._paths import is_gzip, open_stream, url_to_fs, view_range
from distumap.io.readers import _csv_kernels
from distumap.io.readers._base import Reader, buffer_view, unique_gene_names

__all__ = ["CsvReader", "first_lines", "read_header"]

CELLS_BY_GENES, GENES_BY_CELLS = "cells-by-genes", "genes-by-cells"


# ---------------------------------------------------------------- the header


def first_lines(source: str) -> tuple[bytes, bytes | None]:
    """The header line and the first data line (the first non-blank one after it; None when
    there is none): what the separator and the header's layout are decided from."""
    with open_stream(source) as f:
        line = f.readline()
        while True:
            data = f.readline()
            if not data:
                return line, None
            if data.rstrip(b"\n").rstrip(b"\r"):
                return line, data


def read_header(source: str, *, names: str = "gene") -> tuple[list[str], int, _csv_kernels.Dialect]:
    """The names in the header (genes; with ``names="cell"``, the cells of a genes-by-cells
    file), the offset where the data lines begin, and the file's dialect."""
    line, data_line = first_lines(source)
    dialect = _csv_kernels.detect_dialect(line, data_line)
    named = _csv_kernels.parse_header(
        line, source, dialect.sep, names=names, r_header=dialect.r_header
    )
    if not line.endswith(b"\n"):
        what = "cells" if names == "gene" else "genes"
        raise InputError(f"{source}: line 1: the header is the whole file; there are no {what}")
    return named, len(line), dialect


def _check_cell_header(cells: list[str], source: str, r_header: bool) -> None:
    first_column: dict[str, int] = {}
    for column, name in enumerate(cells, start=1 if r_header else 2):
        if name in first_column:
            raise InputError(
                f"{source}: line 1, column {column}: duplicate cell name {name!r} "
                f"(first in column {first_column[name]})"
            )
        first_column[name] = column


def _check_sample_names(names: list[str], lines: np.ndarray, source: str) -> None:
    first_seen: dict[str, int] = {}
    for name, line in zip(names, lines, strict=True):
        if not name:
            raise InputError(f"{source}: line {line}, column 1: empty sample name")
        if name in first_seen:
            raise InputError(
                f"{source}: line {line}, column 1: duplicate sample name {name!r} "
                f"(first on line {first_seen[name]})"
            )
        first_seen[name] = int(line)


def _check_gene_names(names: list[str], lines: np.ndarray, source: str) -> None:
    for name, line in zip(names, lines, strict=True):
        if not name:
            raise InputError(f"{source}: line {line}, column 1: empty gene name")


def unique_genes(genes: list[str], source: str, *, where: str) -> list[str]:
    """``genes`` with duplicates made unique (``A``, ``A-1``, ...), and one warning naming them
    (``where`` they are in the file: ``line 1``, or ``column 1`` of a genes-by-cells file)."""
    genes, duplicated = unique_gene_names(genes, source)
    if duplicated:
        shown = ", ".join(sorted(set(duplicated))[:5])
        warnings.warn(
            f"{source}: {where}: {len(duplicated)} duplicate gene names ({shown}"
            f"{', ...' if len(set(duplicated)) > 5 else ''}) were made unique "
            "by appending -1, -2, ...",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )
    return genes


# ---------------------------------------------------------------- the line index


def _index_task(source: str, begin: int, end: int, size: int, sep: int) -> _csv_kernels.BlockIndex:
    buf, offset = view_range(source, begin - 1, min(size, end + _csv_kernels.NAME_OVERHANG))
    return _csv_kernels.index_block(buf, offset, begin, end, sep)


def _index_stream(
    source: str, data_start: int, sep: int, piece: int = 64 << 20
) -> list[_csv_kernels.BlockIndex]:
    """Index a compressed file in one sequential pass (it cannot be split)."""
    blocks = []
    with open_stream(source) as f:
        f.seek(data_start - 1)  # gzip seeks forward by decompressing
        window, begin, eof = b"", data_start, False
        while True:
            while not eof and len(window) < piece + _csv_kernels.NAME_OVERHANG + 1:
                more = f.read(piece)
                eof = not more
                window += more
            if eof and len(window) <= piece + 1:  # the rest is the last block
                blocks.append(
                    _csv_kernels.index_block(window, begin - 1, begin, begin + len(window), sep)
                )
                return blocks
            end = begin + piece
            blocks.append(_csv_kernels.index_block(window, begin - 1, begin, end, sep))
            window, begin = window[end - begin :], end


def _stream_ranges(source: str, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
    """Successive byte ranges (increasing, non-overlapping) of a decompressed stream."""
    with open_stream(source) as f:
        position = 0
        for start, stop in ranges:
            if start > position:
                f.seek(start)  # gzip seeks forward by decompressing
                position = start
            data = f.read(stop - start) if stop >= 0 else f.read()
            position += len(data)
            yield data


# ---------------------------------------------------------------- parsing


def _parse_into_block(
    buf: np.ndarray,
    rel_starts: np.ndarray,
    *,
    cells: tuple[int, int],
    out: np.ndarray,
    reader: CsvReader,
) -> int:
    """Parse lines ``cells`` (their starts in ``buf``) into ``out``; the values rounded."""
    _, status, error = _csv_kernels.parse_block(
        buf, rel_starts, out.shape[1], out=out, sep=reader.dialect.sep
    )
    if status:
        _csv_kernels.raise_parse_error(
            status,
            error,
            buf,
            source=reader.source,
            line_numbers=reader.line_numbers[cells[0] : cells[1]],
            genes=reader.columns,
            integer=reader.dtype.kind == "i",
            columns="gene" if reader.orientation_name == CELLS_BY_GENES else "cell",
            r_header=reader.dialect.r_header,
        )
    return int(error[4])


class CsvReader(Reader):
    """A count-matrix CSV or TSV file, plain or gzip-compressed.

    The header is ``<cell column>,<gene>,...`` (any first cell: ``sample_name``, ``cell``, or
    empty as pandas writes it), or R's ``write.table`` header with no field above the row names;
    the separator (comma, tab or space) comes from it. Genes by cells, the header names the
    cells and each line is ``<gene>,<count>,...``. Rows are the file's lines: cells (cells by
    genes) or genes (genes by cells).

    Parameters
    ----------
    source
        Path or fsspec URL.
    layer
        Unused (a CSV holds one matrix).
    dtype
        ``"int32"`` or ``"float32"``.
    orientation
        ``"cells-by-genes"`` or ``"genes-by-cells"``.

    Notes
    -----
    The names along the lines (cells, or genes) are known after the index pass only:
    :meth:`index_ranges`, :meth:`index_block` and :meth:`set_index`, or :meth:`load_index` with
    what :meth:`persisted_index` gave.
    """

    format = "csv"
    suffixes = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
    order = 0  # asked first: a CSV is known by its name alone
    standalone = False
    concatenates = False
    orientations = (CELLS_BY_GENES, GENES_BY_CELLS)
    index_label = "ingest: index lines"

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        # by name only, before anything is read: a missing file is said by the ingest
        return cls.has_suffix(source)

    @classmethod
    def open(
        cls, source: str, *, layer: str | None = None, dtype: str = "int32", orientation: str
    ) -> CsvReader:
        return cls(source, dtype=dtype, orientation=orientation)

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        layer: str | None = None,
        dtype: str = "int32",
        orientation: str = CELLS_BY_GENES,
    ):
        super().__init__(source, dtype=dtype)
        self.orientation_name = orientation
        self.identity = self._identity()
        names = "gene" if orientation == CELLS_BY_GENES else "cell"
        header, self.data_start, self.dialect = read_header(self.source, names=names)
        self._header = header
        self._names: list[str] | None = None  # the first fields, from the index
        self._unique: list[str] | None = None
        self.line_starts: np.ndarray | None = None
        self.line_numbers: np.ndarray | None = None
        self._size: int | None = None
        if orientation == CELLS_BY_GENES:
            self.n_genes = len(header)
        else:
            _check_cell_header(header, self.source, self.dialect.r_header)
            self.n_cells = len(header)

    def _identity(self) -> dict[str, Any]:
        fs, path = url_to_fs(self.source)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise InputError(f"{self.source}: no such file") from None
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
        return {
            "matrix": self.source,
            "size": int(info["size"]),
            "mtime": str(mtime) if mtime is not None else None,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_names"] = None  # the tasks need the line starts, not every name
        return state

    # -- what the ingest asks --

    @property
    def genes_first(self) -> bool:
        return self.orientation_name == CELLS_BY_GENES

    @property
    def genes_known(self) -> bool:
        return self.genes_first  # genes by cells: the genes are the lines, found by the index

    @property
    def sequential(self) -> bool:
        return is_gzip(self.source)

    @property
    def needs_index(self) -> bool:
        return True

    @property
    def persists_index(self) -> bool:
        return True

    @property
    def transposition(self) -> str | None:
        return None if self.genes_first else "gene-rows"

    @property
    def index_key(self) -> str:  # type: ignore[override]
        return "index-csv-gzip" if self.sequential else "index-csv-block"

    @property
    def block_task(self) -> tuple[str, str]:
        if not self.genes_first:
            return "transpose-block", "ingest: transpose into cell chunks"
        return "parse-csv-block", "ingest: parse blocks"

    sequential_task: ClassVar[tuple[str, str]] = (
        "parse-csv-gzip",
        "ingest: parse (sequential, gzip)",
    )
    gene_rows_task: ClassVar[tuple[str, str]] = (
        "parse-csv-gene-block",
        "ingest: parse gene blocks",
    )
    gene_rows_sequential_task: ClassVar[tuple[str, str]] = (
        "parse-csv-gzip-genes",
        "ingest: parse gene lines (sequential, gzip)",
    )

    @classmethod
    def stage_params(
        cls, readers: list[Reader], *, metadata: str | None, dtype: str
    ) -> dict[str, Any]:
        (reader,) = readers
        params = {**reader.identity, "metadata": metadata, "chunk_cells": 0, "dtype": dtype}
        if reader.orientation_name == GENES_BY_CELLS:
            params["orientation"] = GENES_BY_CELLS
        return params

    @classmethod
    def stage_record(cls, readers: list[Reader]) -> dict[str, Any]:
        return {"dialect": readers[0].dialect.describe()}

    # -- the index pass --

    def index_ranges(self) -> list[tuple[int, int]]:
        if self.sequential:
            warnings.warn(
                f"{self.source} is gzip-compressed: it cannot be split, so it is read "
                "sequentially (twice: index, then parse). Decompress it first for a parallel "
                "ingest.",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
            return [(self.data_start, -1)]
        fs, path = url_to_fs(self.source)
        self._size = size = int(fs.size(path))
        block_bytes = int(_config.get("index-block-bytes"))
        return list(itertools.pairwise([*range(self.data_start, size, block_bytes), size + 1]))

    def index_block(self, begin: int, end: int) -> list[_csv_kernels.BlockIndex]:
        if self.sequential:
            return _index_stream(self.source, self.data_start, self.dialect.sep)
        return [_index_task(self.source, begin, end, self._size, self.dialect.sep)]

    def set_index(self, blocks: Any) -> None:
        starts, lines, names = [], [], []
        newlines_before = 0
        for block in itertools.chain.from_iterable(blocks):
            starts.append(block.starts)
            lines.append(block.local_line + newlines_before + 1)
            names.extend(block.names)
            newlines_before += block.newlines
        starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        lines = np.concatenate(lines) if lines else np.zeros(0, np.int64)
        if self.genes_first:
            if not names:
                raise InputError(
                    f"{self.source}: line 2: no cell lines after the header (it names "
                    f"{len(self._header)} genes)"
                )
            _check_sample_names(names, lines, self.source)
        else:
            if not names:
                raise InputError(
                    f"{self.source}: line 2: no gene lines after the header (it names "
                    f"{len(self._header)} cells)"
                )
            _check_gene_names(names, lines, self.source)
        self._names = names
        data_end = self._size if self._size is not None and not self.sequential else -1
        self.load_index(
            {"line_start": np.append(starts, data_end).astype(np.int64), "line_number": lines}
        )

    def persisted_index(self) -> dict[str, np.ndarray]:
        """What the ingest keeps in the store so that a resume need not index again."""
        return {
            "line_start": self.line_starts,
            "line_number": self.line_numbers.astype(np.int64),
        }

    def load_index(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back what :meth:`persisted_index` gave (a resumed ingest)."""
        self.line_starts = np.asarray(arrays["line_start"], dtype=np.int64)
        self.line_numbers = np.asarray(arrays["line_number"], dtype=np.int64)
        if self.genes_first:
            self.n_cells = self.line_starts.shape[0] - 1
        else:
            self.n_genes = self.line_starts.shape[0] - 1

    # -- names --

    def cells(self) -> np.ndarray:
        names = self._names if self.genes_first else self._header
        return np.asarray(names, dtype=object)

    def _raw_genes(self) -> np.ndarray:
        names = self._header if self.genes_first else self._names
        return np.asarray(names, dtype=object)

    def genes(self) -> np.ndarray:
        if self._unique is None:
            where = "line 1" if self.genes_first else "column 1"
            self._unique = unique_genes(list(self._raw_genes()), self.source, where=where)
        out = np.empty(len(self._unique), dtype=object)
        out[:] = self._unique
        return out

    @property
    def columns(self) -> list[str]:
        """The names of the fields after the first of a line: genes, or cells."""
        return list(self.genes()) if self.genes_first else list(self._header)

    # -- counts --

    def _parse_lines(self, first: int, last: int, out: np.ndarray) -> int:
        """Parse lines ``[first, last)`` (cells, or genes) into ``out``; the values rounded."""
        offsets = self.line_starts[first : last + 1]
        if self.sequential:
            stop = int(offsets[-1]) if last < self.line_starts.shape[0] - 1 else -1
            (data,) = _stream_ranges(self.source, [(int(offsets[0]), stop)])
            view, offset = data, int(offsets[0])
        else:
            view, offset = view_range(self.source, int(offsets[0]), int(offsets[-1]))
        return _parse_into_block(
            np.frombuffer(view, dtype=np.uint8),
            offsets[:-1] - offset,
            cells=(first, last),
            out=out,
            reader=self,
        )

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        return self._parse_lines(start, stop, out)

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        out = np.empty((stop - start, self.n_genes), dtype=self.dtype)
        return out, self._parse_lines(start, stop, out)

    def read_gene_rows(self, first: int, last: int, out: np.ndarray) -> int:
        """Genes ``[first, last)`` of a genes-by-cells file, as rows of ``out`` (genes x
        cells); the values rounded."""
        return self._parse_lines(first, last, out)

    def _stream_lines(
        self, per_block: int, n_lines: int, skip: Container[int], buffers: Any, columns: int
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``per_block`` lines in order, those in ``skip`` left out, in one pass over
        the decompressed file: ``(first, last, values, rounded)``."""
        todo = [b for b in range(-(-n_lines // per_block)) if b not in skip]
        bounds = [(b * per_block, min((b + 1) * per_block, n_lines)) for b in todo]
        starts = self.line_starts
        ranges = [(int(starts[f]), int(starts[la]) if la < n_lines else -1) for f, la in bounds]
        for i, ((first, last), data) in enumerate(
            zip(bounds, _stream_ranges(self.source, ranges), strict=True)
        ):
            out = buffer_view(buffers, i, last - first, columns)
            if out is None:
                out = np.empty((last - first, columns), dtype=self.dtype)
            rounded = _parse_into_block(
                np.frombuffer(data, dtype=np.uint8),
                starts[first:last] - starts[first],
                cells=(first, last),
                out=out,
                reader=self,
            )
            yield first, last, out, rounded

    def iter_blocks(
        self,
        chunk_cells: int,
        start: int = 0,
        stop: int | None = None,
        *,
        buffers: list[np.ndarray] | None = None,
        skip: Container[int] = (),
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``chunk_cells`` cells in order; a gzip file is decompressed once, and the
        blocks in ``skip`` (block numbers from cell 0) are decompressed but not parsed."""
        if not self.sequential or start != 0 or stop not in (None, self.n_cells):
            yield from super().iter_blocks(chunk_cells, start, stop, buffers=buffers, skip=skip)
            return
        yield from self._stream_lines(chunk_cells, self.n_cells, skip, buffers, self.n_genes)

    def iter_gene_rows(
        self,
        genes_per_block: int,
        *,
        skip: Container[int] = (),
        buffers: list[np.ndarray] | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``genes_per_block`` gene lines in order, in one pass (gzip), those in
        ``skip`` left out: ``(first, last, rows, rounded)``, rows genes x cells (views of
        ``buffers`` in turn, as :meth:`iter_blocks`)."""
        yield from self._stream_lines(genes_per_block, self.n_genes, skip, buffers, self.n_cells)

"""10x MEX folders (``matrix.mtx[.gz]``, ``features.tsv[.gz]``, ``barcodes.tsv[.gz]``):
:class:`MexReader`."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import numpy as np

from distumap._errors import InputError
from distumap._paths import (
    exists,
    is_local,
    isdir,
    join,
    local_path,
    open_stream,
    read_ahead,
    read_range,
    read_text_lines,
    url_to_fs,
    view_range,
)
from distumap.io.readers._base import (
    ACCEPTED,
    GENE_EXPRESSION,
    NO_MAP,
    REFUSED,
    Reader,
    as_strings,
    buffer_view,
    scatter_entries,
)
from distumap.io.readers._mex_kernels import (
    BANNER,
    EXPECTED_BANNER,
    MTX_BAD_LINE,
    MTX_OK,
    MTX_OUT_OF_RANGE,
    MTX_OVERHANG,
    MTX_STREAM_PIECE,
    MTX_UNSORTED,
    MexIndexBlock,
    mtx_fill,
    mtx_index_kernel,
    mtx_parse_kernel,
)


class MexReader(Reader):
    """A 10x MEX folder: ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` (or ``genes.tsv[.gz]``) and
    ``barcodes.tsv[.gz]``.

    ``matrix.mtx`` is Matrix Market coordinate (``%%MatrixMarket matrix coordinate integer|real
    general``), 1-based, genes x barcodes, one ``gene barcode value`` line per entry, sorted by
    barcode as Cell Ranger writes it.

    - Uncompressed: :meth:`build_index` finds, in byte blocks that can be indexed in parallel
      (:meth:`index_ranges`, :meth:`index_block`, :meth:`set_index`), the byte offset where each
      cell's entries start; :meth:`read` then reads exactly the block's bytes and parses them
      with a compiled kernel. The index is built on first use when nobody built it.
    - gzip: read sequentially; :meth:`iter_blocks` makes one pass for all blocks, :meth:`read`
      decompresses from the start up to the block (and stops there).

    A file not sorted by barcode is an InputError that names the line.

    Parameters
    ----------
    source
        The folder (or its ``matrix.mtx[.gz]``), path or fsspec URL.
    layer
        MEX has none; must be None.
    dtype
        ``"int32"`` or ``"float32"``.

    Examples
    --------
    >>> reader = MexReader("filtered_feature_bc_matrix")  # doctest: +SKIP
    >>> reader.build_index()  # doctest: +SKIP
    >>> reader.read(0, 500).shape  # doctest: +SKIP
    (500, 33538)
    """

    format = "mex"
    suffixes = (".mtx", ".mtx.gz")
    order = 20
    index_key = "index-mtx-block"
    sequential_task = ("read-mex-gzip", "ingest: read matrix.mtx.gz (sequential)")
    index_label = "ingest: index matrix.mtx"

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        if isdir(source):
            return exists(join(source, "matrix.mtx")) or exists(join(source, "matrix.mtx.gz"))
        return super().guess_can_open(source)

    @property
    def sequential(self) -> bool:
        return self.compressed

    @property
    def needs_index(self) -> bool:
        return not self.compressed

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        source = os.fspath(source)
        if re.search(r"matrix\.mtx(\.gz)?$", source) and not isdir(source):
            source = source.rsplit("/", 1)[0] if "/" in source else "."
        super().__init__(source, layer=layer, dtype=dtype)
        if layer is not None:
            raise InputError(f"{self.source}: a MEX folder has no layers (got {layer!r})")
        if not isdir(self.source):
            raise InputError(f"{self.source}: no such folder")
        self.matrix_file = self._find(("matrix.mtx", "matrix.mtx.gz"), "matrix.mtx[.gz]")
        self.features_file = self._find(
            ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
            "features.tsv[.gz] or genes.tsv[.gz]",
        )
        self.barcodes_file = self._find(("barcodes.tsv.gz", "barcodes.tsv"), "barcodes.tsv[.gz]")
        self.compressed = self.matrix_file.endswith(".gz")
        self._read_header()
        self._check_names()
        self._offsets: np.ndarray | None = None
        self._lines: np.ndarray | None = None

    def _find(self, names: tuple[str, ...], what: str) -> str:
        for name in names:
            path = join(self.source, name)
            if exists(path):
                return path
        raise InputError(f"{self.source}: missing {what} in the MEX folder")

    def _files(self) -> list[str]:
        return [self.matrix_file, self.features_file, self.barcodes_file]

    @property
    def _data_file(self) -> str:
        return self.matrix_file

    # -- header and names --

    def _read_header(self) -> None:
        matrix = self.matrix_file
        try:
            with open_stream(matrix) as stream:
                head = stream.read(4096)  # a truncated gzip file fails later, at its line
                while True:
                    lines = head.split(b"\n")
                    size_line = next(
                        (
                            i
                            for i, line in enumerate(lines[:-1])
                            if line.strip() and not line.startswith(b"%")
                        ),
                        None,
                    )
                    more = b"" if size_line is not None else stream.read(1 << 16)
                    if not more:
                        break
                    head += more
        except FileNotFoundError as exc:
            raise InputError(f"{matrix}: no such file") from exc
        except (OSError, EOFError) as exc:
            raise InputError(f"{matrix}: cannot read ({exc})") from exc
        if not lines or not BANNER.match(lines[0].rstrip(b"\r")):
            found = lines[0][:80].decode("utf-8", "replace") if lines else ""
            raise InputError(
                f"{matrix}: line 1: expected the header '{EXPECTED_BANNER}', found {found!r}"
            )
        self.field = BANNER.match(lines[0].rstrip(b"\r")).group(1).decode().lower()
        if size_line is None:
            raise InputError(f"{matrix}: the file ends before the size line (genes, cells, nnz)")
        fields = lines[size_line].split()
        try:
            n_rows, n_cols, nnz = (int(v) for v in fields)
        except ValueError:
            raise InputError(
                f"{matrix}: line {size_line + 1}: expected the size line '<genes> <cells> "
                f"<entries>', found {lines[size_line][:80].decode('utf-8', 'replace')!r}"
            ) from None
        self.header_lines = size_line + 1
        self.data_start = sum(len(line) + 1 for line in lines[: size_line + 1])
        self._n_rows, self.n_cells, self.nnz = n_rows, n_cols, nnz

    def _check_names(self) -> None:
        features = [line.split("\t") for line in read_text_lines(self.features_file)]
        if any(len(fields) < 2 for fields in features):
            bad = next(i for i, fields in enumerate(features) if len(fields) < 2)
            raise InputError(
                f"{self.features_file}: line {bad + 1}: expected '<id>\\t<name>[\\t<type>]'"
            )
        n_barcodes = len(read_text_lines(self.barcodes_file))
        where = f"{self.matrix_file}: line {self.header_lines}"
        if self._n_rows != len(features):
            raise InputError(
                f"{where}: the size line says {self._n_rows} genes, "
                f"{self.features_file} lists {len(features)}"
            )
        if self.n_cells != n_barcodes:
            raise InputError(
                f"{where}: the size line says {self.n_cells} cells, "
                f"{self.barcodes_file} lists {n_barcodes}"
            )
        keep = np.array(
            [len(fields) < 3 or fields[2] == GENE_EXPRESSION for fields in features], dtype=bool
        )
        self.n_genes = int(keep.sum())
        self._gene_map: np.ndarray | None = None
        if not keep.all():
            self.dropped_features = len(features) - self.n_genes
            self._gene_map = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        if self.n_genes == 0:
            raise InputError(f"{self.features_file}: no {GENE_EXPRESSION} features")

    def _features(self, column: int) -> np.ndarray:
        features = [line.split("\t") for line in read_text_lines(self.features_file)]
        values = as_strings([fields[column] for fields in features])
        return values if self._gene_map is None else values[self._gene_map >= 0]

    def cells(self) -> np.ndarray:
        return as_strings([line.split("\t")[0] for line in read_text_lines(self.barcodes_file)])

    def _raw_genes(self) -> np.ndarray:
        return self._features(1)

    def gene_ids(self) -> np.ndarray:
        return self._features(0)

    # -- the cell index (uncompressed files) --

    def _size(self) -> int:
        fs, path = url_to_fs(self.matrix_file)
        return int(fs.size(path))

    def index_ranges(self, block_bytes: int = 64 << 20) -> list[tuple[int, int]]:
        """Byte ranges tiling the data region, for :meth:`index_block` (one task each)."""
        if self.compressed:
            raise InputError(f"{self.matrix_file}: a gzip file has no byte index; read it in order")
        size = self._size()
        edges = [*range(self.data_start, size, max(1, int(block_bytes))), size]
        if len(edges) == 1:
            edges = [self.data_start, size]
        return list(itertools.pairwise(edges))

    def index_block(self, begin: int, end: int) -> MexIndexBlock:
        """Index the lines that start in ``[begin, end)``: where each column's entries start.

        Pure and independent of the other ranges, so ranges can be indexed in parallel; give the
        results, in order, to :meth:`set_index`.
        """
        offset = begin - 1 if begin > self.data_start else begin
        raw, shift = self._raw(offset, end + MTX_OVERHANG)
        buf = np.frombuffer(raw, dtype=np.uint8)[shift:] if len(raw) else np.zeros(0, np.uint8)
        if begin > self.data_start:
            newline = raw.find(b"\n", shift, shift + end - offset) - shift
            first = end - offset if newline < 0 else newline + 1
        else:
            first = 0
        stop = min(end - offset, buf.size)
        # a line with an entry takes at least 5 bytes ("1 1 1", the last one without "\n")
        capacity = min(self.n_cells, max(0, stop - first) // 5 + 1) + 1
        columns = np.empty(capacity, dtype=np.int64)
        offsets = np.empty(capacity, dtype=np.int64)
        lines = np.empty(capacity, dtype=np.int64)
        out = np.zeros(7, dtype=np.int64)
        mtx_index_kernel(buf, first, stop, self.n_cells, columns, offsets, lines, out)
        n, n_lines, n_entries, status = (int(v) for v in out[:4])
        error = None
        if status != MTX_OK:
            at = shift + int(out[5])
            text = bytes(raw[at : at + 200]).split(b"\n")[0]
            text = text[:80].decode("utf-8", "replace").rstrip("\r")
            error = (status, int(out[4]), text, int(out[6]))
        return MexIndexBlock(
            begin=begin,
            end=end,
            columns=columns[:n].copy(),
            offsets=offsets[:n] + offset,
            lines=lines[:n].copy(),
            n_lines=n_lines,
            n_entries=n_entries,
            error=error,
        )

    def set_index(self, blocks: Iterable[MexIndexBlock]) -> None:
        """Combine :meth:`index_block` results (in file order) into the cell index.

        Raises
        ------
        InputError
            A bad line, a column out of range, entries not sorted by column, or an entry count
            that disagrees with the size line; the message names the line.
        """
        blocks = list(blocks)
        first_line = self.header_lines + 1
        columns, offsets, lines = [], [], []
        previous, previous_line = 0, 0
        entries = 0
        for block in blocks:
            # a block's first line against the previous block's last, then the block's own error:
            # the earlier line in the file is the one reported
            if block.columns.size and block.columns[0] < previous:
                self._unsorted(
                    first_line + int(block.lines[0]), block.columns[0], previous, previous_line
                )
            if block.error is not None:
                status, line, text, before = block.error
                self._line_error(status, first_line + line, text, max(before, previous))
            if block.columns.size:
                previous = int(block.columns[-1])
                previous_line = first_line + int(block.lines[-1])
            columns.append(block.columns)
            offsets.append(block.offsets)
            lines.append(block.lines + first_line)
            first_line += block.n_lines
            entries += block.n_entries
        if entries != self.nnz:
            raise InputError(
                f"{self.matrix_file}: line {self.header_lines}: the size line says {self.nnz} "
                f"entries, the file holds {entries} (truncated?)"
            )
        columns = np.concatenate(columns) if columns else np.zeros(0, np.int64)
        offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        lines = np.concatenate(lines) if lines else np.zeros(0, np.int64)
        keep = np.concatenate([[True], columns[1:] != columns[:-1]]) if columns.size else []
        columns, offsets, lines = columns[keep] - 1, offsets[keep], lines[keep]
        end = blocks[-1].end if blocks else self.data_start
        # cell c starts at the first record whose column is >= c (empty cells: the next one's)
        where = np.searchsorted(columns, np.arange(self.n_cells + 1), side="left")
        self._offsets = np.append(offsets, end)[where]
        self._lines = np.append(lines, first_line)[where]

    def build_index(self, *, block_bytes: int = 64 << 20, map: Callable = map) -> None:
        """Index the whole file: :meth:`index_block` over :meth:`index_ranges`, then
        :meth:`set_index`. ``map`` may run the blocks in parallel (e.g. a thread pool's map).

        Notes
        -----
        Reads the whole file once. The index holds 16 bytes per cell and travels with the
        reader when it is pickled.
        """
        ranges = self.index_ranges(block_bytes)
        blocks = map(self.index_block, [r[0] for r in ranges], [r[1] for r in ranges])
        self.set_index(blocks)

    @property
    def indexed(self) -> bool:
        """Whether :meth:`read` knows each cell's byte range."""
        return self._offsets is not None

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """Bytes of ``matrix.mtx`` holding cells ``[start, stop)`` (builds the index if need be)."""
        if self._offsets is None:
            self.build_index()
        return int(self._offsets[start]), int(self._offsets[stop])

    # -- errors --

    def _line_error(self, status: int, line: int, text: str, previous: int) -> None:
        if status == MTX_UNSORTED:
            self._unsorted(line, None, previous, None, text=text)
        if status == MTX_OUT_OF_RANGE:
            raise InputError(
                f"{self.matrix_file}: line {line}: column (barcode) out of range 1 to "
                f"{self.n_cells}: {text!r}"
            )
        raise InputError(
            f"{self.matrix_file}: line {line}: expected '<gene> <barcode> <value>', found {text!r}"
        )

    def _unsorted(
        self, line: int, column: Any, previous: int, previous_line: Any, text: str | None = None
    ) -> None:
        what = f"{text!r}" if text is not None else f"column {int(column)}"
        raise InputError(
            f"{self.matrix_file}: line {line}: entries are not sorted by barcode (column): {what} "
            f"comes after column {int(previous)}; distumap reads MEX files in Cell Ranger's order "
            "(sort the entries by column, e.g. re-save with scipy.io.mmwrite of the CSC matrix)"
        )

    # -- parsing --

    def _parse(self, raw: bytes | np.ndarray, first_line: int) -> tuple[np.ndarray, ...]:
        """(rows, columns, values, lines) of the entries in ``raw``; lines are absolute."""
        buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else raw
        capacity = int(np.count_nonzero(buf == 10)) + 1
        rows = np.empty(capacity, dtype=np.int64)
        cols = np.empty(capacity, dtype=np.int64)
        values = np.empty(capacity, dtype=np.float64)
        lines = np.empty(capacity, dtype=np.int64)
        error = np.zeros(2, dtype=np.int64)
        n, status = mtx_parse_kernel(buf, rows, cols, values, lines, error)
        if status != MTX_OK:
            at = int(error[1])
            tail = bytes(buf[at : at + 80]).split(b"\n")[0]
            self._line_error(
                MTX_BAD_LINE, first_line + int(error[0]), tail.decode("utf-8", "replace"), 0
            )
        return rows[:n], cols[:n], values[:n], lines[:n] + first_line

    def _dense(
        self,
        start: int,
        stop: int,
        rows: np.ndarray,
        cols: np.ndarray,
        values: np.ndarray,
        lines: np.ndarray,
    ) -> tuple[np.ndarray, int]:
        """The block of cells ``[start, stop)`` from entries whose columns lie in it."""
        n_rows = self._n_rows
        if rows.size and (rows.min() < 1 or rows.max() > n_rows):
            bad = int(np.argmax((rows < 1) | (rows > n_rows)))
            raise InputError(
                f"{self.matrix_file}: line {int(lines[bad])}: gene (row) {int(rows[bad])} out of "
                f"range 1 to {n_rows}"
            )
        genes = rows - 1
        if self._gene_map is not None:
            genes = self._gene_map[genes]
            keep = genes >= 0
            genes, cols, values, lines = genes[keep], cols[keep], values[keep], lines[keep]
        if self.field == "integer":
            # the header promises integers: a fractional value is a broken file, not data
            fractional = values != np.rint(values)
            if fractional.any():
                bad = int(np.argmax(fractional))
                raise InputError(
                    f"{self.matrix_file}: line {int(lines[bad])}: {values[bad]:.9g} in a file "
                    "whose header says 'integer'"
                )

        def locate(bad: int) -> tuple[str, str, int]:
            return f"line {int(lines[bad])}", str(int(cols[bad]) - 1), int(genes[bad])

        values, rounded = self._convert(values, locate)
        out = np.zeros((stop - start, self.n_genes), dtype=self.dtype)
        if values.size:
            scatter_entries(cols - (1 + start), genes, values, out)
        return out, rounded

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        if start == stop:
            return np.zeros((0, self.n_genes), dtype=self.dtype), 0
        if self.compressed:
            with contextlib.closing(self._stream_blocks(stop - start, start, stop)) as blocks:
                _, _, block, rounded = next(blocks)
            return block, rounded
        begin, end = self.byte_range(start, stop)
        raw = bytes(read_range(self.matrix_file, begin, end))
        if len(raw) != end - begin:
            raise InputError(f"{self.matrix_file}: the file is shorter than its index (changed?)")
        rows, cols, values, lines = self._parse(raw, int(self._lines[start]))
        if cols.size and (cols.min() <= start or cols.max() > stop):
            bad = int(np.argmax((cols <= start) | (cols > stop)))
            raise InputError(
                f"{self.matrix_file}: line {int(lines[bad])}: column {int(cols[bad])} where the "
                "index expected another (the file changed since it was indexed?)"
            )
        return self._dense(start, stop, rows, cols, values, lines)

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        if self.compressed:
            blocks = self._stream_fill(stop - start, start, stop, [out])
            with contextlib.closing(blocks):
                _, _, _, rounded = next(blocks)
            return rounded
        begin, end = self.byte_range(start, stop)
        buf = self._bytes(begin, end)
        state = np.zeros(4, dtype=np.int64)
        _, status = self._fill(buf, 0, start, stop, out, state, strict=True)
        del buf
        if status != ACCEPTED:
            self._refused(start, stop)
        out[state[3] :] = 0
        return int(state[2])

    def _fill(
        self,
        buf: np.ndarray,
        pos: int,
        start: int,
        stop: int,
        out: np.ndarray,
        state: np.ndarray,
        *,
        strict: bool,
    ) -> tuple[int, int]:
        return mtx_fill(
            buf,
            pos,
            start,
            stop,
            self._n_rows,
            self.n_cells,
            NO_MAP if self._gene_map is None else self._gene_map,
            self.field == "integer",
            self.dtype == np.int32,
            strict,
            out,
            state,
        )

    def _bytes(self, begin: int, end: int) -> np.ndarray:
        """Bytes ``[begin, end)`` of ``matrix.mtx`` (see :meth:`_raw`)."""
        raw, shift = self._raw(begin, end)
        if len(raw) - shift != max(0, end - begin):
            raise InputError(f"{self.matrix_file}: the file is shorter than its index (changed?)")
        return np.frombuffer(raw, dtype=np.uint8)[shift:] if end > begin else np.zeros(0, np.uint8)

    def _raw(self, begin: int, end: int) -> tuple[Any, int]:
        """Bytes ``[begin, end)`` of ``matrix.mtx`` (fewer at its end) as ``(raw, shift)``: they
        are ``raw[shift:]``. A local file is memory-mapped (the page cache is parsed in place,
        with no copy and no fresh allocation), others are read."""
        if end <= begin:
            return b"", 0
        if is_local(self.matrix_file):
            end = min(end, os.path.getsize(local_path(self.matrix_file)))
            if end <= begin:
                return b"", 0
        view, offset = view_range(self.matrix_file, begin, end)
        return view, begin - offset

    def iter_blocks(
        self,
        chunk_cells: int,
        start: int = 0,
        stop: int | None = None,
        *,
        buffers: list[np.ndarray] | None = None,
        skip: Container[int] = (),
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``chunk_cells`` cells in order; a gzip file is decompressed and parsed once
        (``skip`` is ignored then)."""
        if chunk_cells < 1:
            raise ValueError("chunk_cells must be positive")
        stop = self.n_cells if stop is None else stop
        start, stop = self._check_range(start, stop, self.n_cells, "cells")
        if self.compressed:
            yield from self._stream_fill(chunk_cells, start, stop, buffers)
        else:
            yield from super().iter_blocks(chunk_cells, start, stop, buffers=buffers, skip=skip)

    def _stream_fill(
        self, chunk_cells: int, start: int, stop: int, buffers: list[np.ndarray] | None
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """One sequential pass: blocks of cells ``[start, stop)`` in order, parsed by the
        compiled kernel straight into the blocks (``buffers`` in turn, or new arrays). Whatever
        the kernel refuses, the checked pass (:meth:`_stream_blocks`) explains."""
        # last column seen, entries, rounded values, rows of the block zeroed
        state = np.zeros(4, dtype=np.int64)
        index = 0

        def block(begin: int) -> tuple[int, np.ndarray]:
            end = min(begin + chunk_cells, stop)
            view = buffer_view(buffers, index, end - begin, self.n_genes)
            state[3] = 0
            return end, self._output(end - begin, view)

        if start == stop:
            return
        block_start = start
        block_stop, out = block(block_start)
        try:
            for buf in self._pieces():
                pos = 0
                while True:
                    pos, status = self._fill(
                        buf, pos, block_start, block_stop, out, state, strict=False
                    )
                    if status == ACCEPTED:
                        break
                    if status == REFUSED:
                        self._refused_stream(chunk_cells, start, stop)
                    # a column past the block: the block is complete
                    out[state[3] :] = 0
                    yield block_start, block_stop, out, int(state[2])
                    state[2] = 0
                    if block_stop == stop:
                        return
                    index += 1
                    block_start = block_stop
                    block_stop, out = block(block_start)
        except (OSError, EOFError, gzip.BadGzipFile):
            self._refused_stream(chunk_cells, start, stop)
        if state[1] != self.nnz:
            self._refused_stream(chunk_cells, start, stop)
        while True:
            out[state[3] :] = 0
            yield block_start, block_stop, out, int(state[2])
            state[2] = 0
            if block_stop == stop:
                return
            index += 1
            block_start = block_stop
            block_stop, out = block(block_start)

    def _pieces(self) -> Iterator[np.ndarray]:
        """The data region, decompressed, in pieces of whole lines (the last one may lack its
        newline), as uint8 arrays."""
        carry = b""
        for chunk in read_ahead(self.matrix_file, self.data_start, MTX_STREAM_PIECE):
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield np.frombuffer(data, dtype=np.uint8, count=cut)
        if carry:
            yield np.frombuffer(carry, dtype=np.uint8)

    def _refused_stream(self, chunk_cells: int, start: int, stop: int) -> None:
        """The kernel refused a line of the gzip stream: the checked pass names it."""
        for _ in self._stream_blocks(chunk_cells, start, stop):
            pass
        raise RuntimeError(
            f"{self.matrix_file}: the compiled reader refused a line that the checked reader "
            "accepts (a distumap bug; please report it)"
        )

    def _stream(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The entries of the data region in file order, in pieces: (rows, cols, values, lines)."""
        line = self.header_lines + 1
        try:
            with open_stream(self.matrix_file) as stream:
                skipped = stream.read(self.data_start)
                if len(skipped) < self.data_start:
                    return
                carry = b""
                while True:
                    piece = stream.read(MTX_STREAM_PIECE)
                    data = carry + piece
                    if piece:
                        cut = data.rfind(b"\n") + 1
                        if cut == 0:
                            carry = data
                            continue
                        data, carry = data[:cut], data[cut:]
                    if data:
                        yield self._parse(data, line)
                        line += data.count(b"\n")
                    if not piece:
                        return
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{self.matrix_file}: cannot read past line {line} ({exc})") from exc

    def _stream_blocks(
        self, chunk_cells: int, start: int, stop: int
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """One sequential pass: blocks of cells ``[start, stop)`` in order."""
        block_start = start
        pending: list[tuple[np.ndarray, ...]] = []
        previous = 0  # last column seen (1-based)
        previous_line = 0
        entries = 0

        def emit(block_stop: int) -> tuple[int, int, np.ndarray, int]:
            nonlocal pending
            parts = (
                [np.concatenate(column) for column in zip(*pending, strict=True)]
                if pending
                else [np.zeros(0, np.int64)] * 2 + [np.zeros(0)] + [np.zeros(0, np.int64)]
            )
            rows, cols, values, lines = parts
            inside = cols <= block_stop
            rest = ~inside
            pending = [tuple(part[rest] for part in parts)] if rest.any() else []
            block, rounded = self._dense(
                block_start, block_stop, rows[inside], cols[inside], values[inside], lines[inside]
            )
            return block_start, block_stop, block, rounded

        for rows, cols, values, lines in self._stream():
            entries += cols.size
            if cols.size:
                if cols.min() < 1 or cols.max() > self.n_cells:
                    bad = int(np.argmax((cols < 1) | (cols > self.n_cells)))
                    raise InputError(
                        f"{self.matrix_file}: line {int(lines[bad])}: column (barcode) "
                        f"{int(cols[bad])} out of range 1 to {self.n_cells}"
                    )
                steps = np.diff(cols, prepend=previous)
                if steps.min() < 0:
                    bad = int(np.argmax(steps < 0))
                    before = previous if bad == 0 else int(cols[bad - 1])
                    self._unsorted(int(lines[bad]), cols[bad], before, previous_line)
                previous, previous_line = int(cols[-1]), int(lines[-1])
                selected = (cols > start) & (cols <= stop)
                if selected.any():
                    pending.append(
                        (rows[selected], cols[selected], values[selected], lines[selected])
                    )
            # every cell before the last column seen is complete
            while block_start < stop and min(block_start + chunk_cells, stop) < previous:
                block_stop = min(block_start + chunk_cells, stop)
                yield emit(block_stop)
                block_start = block_stop
            if previous > stop:
                break
        else:
            if entries != self.nnz:
                raise InputError(
                    f"{self.matrix_file}: line {self.header_lines}: the size line says "
                    f"{self.nnz} entries, the file holds {entries} (truncated?)"
                )
        while block_start < stop:
            block_stop = min(block_start + chunk_cells, stop)
            yield emit(block_stop)
            block_start = block_stop

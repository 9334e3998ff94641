"""Byte-level CSV parsing of count matrices: the header, the line index and the parse kernel.

General CSV readers collapse at 50,000 columns; this module reads the bytes itself. A matrix line is
``<sample name>,<count>,<count>,...`` with non-negative integer counts; CRLF line ends and a missing
final newline are accepted. A line of a genes-by-cells file, ``<gene>,<count>,...`` with one
count per cell, has the same shape and goes through the same kernel. Every function here works
on bytes that are already in memory: the I/O and the scheduling live in
:mod:`distumap.io.readers.csv` and the ingest stage (:mod:`distumap.io._ingest`).

The separator (comma, tab, or space as R's ``write.table`` writes by default) comes from the
header line. The header either has a field above the row names (``sample_name``, empty as
pandas and ``write.csv`` write it, ``rn``, ...) or, as R's ``write.table`` writes it, none: one
name fewer than the fields of a data line (:func:`detect_dialect` decides, once, from the first
data line). Names may be quoted (``"a,b"`` holds a separator); counts are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numba
import numpy as np

from distumap._errors import InputError
from distumap.io.readers._base import ROUNDING_TOLERANCE

#: bytes read past a block's end so that a sample name starting near the end is complete
NAME_OVERHANG = 1 << 16


# kernel status codes
OK, TOO_FEW, TOO_MANY, NOT_INTEGER, NEGATIVE, TOO_LARGE, EMPTY_FIELD, FRACTIONAL = range(8)
_PROBLEMS = {
    TOO_FEW: "too few fields",
    TOO_MANY: "too many fields",
    NOT_INTEGER: "not an integer count",
    NEGATIVE: "a negative count",
    TOO_LARGE: "a count too large for int32",
    EMPTY_FIELD: "an empty field",
    FRACTIONAL: "a fractional value where integer counts are expected",
}

COMMA, TAB, SPACE = ord(","), ord("\t"), ord(" ")

#: first header cells that name the row-name column, never a gene or a cell: a header that starts
#: with one has a field above the row names, whatever its first data line says (a line with one
#: field too many is then an error on that line, not R's layout)
ROW_NAME_COLUMNS = frozenset(
    {
        "sample_name", "sample", "cell", "cells", "cell_id", "cell_name", "cellid", "barcode",
        "barcodes", "gene", "genes", "gene_id", "gene_ids", "gene_name", "gene_symbol", "symbol",
        "feature", "features", "id", "index", "rn", "rowname", "rownames", "row.names", "v1",
        "unnamed: 0",
    }
)  # fmt: skip

#: a double-quoted field, with ``""`` for a quote inside it (an unrolled loop: linear time)
_QUOTED = re.compile(rb'"[^"]*(?:""[^"]*)*"')


@dataclass(frozen=True)
class Dialect:
    """How a matrix file is written: its separator, and whether its header lacks a field above
    the row names (``r_header``: R's ``write.table`` layout, one name per column of counts)."""

    sep: int = COMMA
    r_header: bool = False

    def describe(self) -> dict[str, str | bool]:
        """What the ingest record says was read: ``{"separator": "tab", "r_header": False}``."""
        names = {COMMA: "comma", TAB: "tab", SPACE: "space"}
        return {"separator": names.get(self.sep, chr(self.sep)), "r_header": self.r_header}


def _clean_name(raw: bytes) -> str:
    name = raw.rstrip(b"\r").decode("utf-8", errors="replace").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('""', '"')
    return name


def _strip_eol(line: bytes) -> bytes:
    return line.rstrip(b"\n").rstrip(b"\r")


def _outside_quotes(text: bytes) -> bytes:
    """``text`` with each double-quoted part as one ``_``: what separators are counted in."""
    return _QUOTED.sub(b"_", text) if b'"' in text else text


def _split_fields(text: bytes, sep: int) -> list[bytes]:
    """The fields of one line; a separator inside a double-quoted field belongs to the field."""
    pieces = text.split(bytes([sep]))
    if b'"' not in text:
        return pieces
    fields: list[bytes] = []
    open_field: bytes | None = None  # a quoted field whose closing quote is still to come
    for piece in pieces:
        odd = piece.count(b'"') % 2 == 1
        if open_field is not None:
            open_field += bytes([sep]) + piece
            if odd:
                fields.append(open_field)
                open_field = None
        elif odd and piece.lstrip().startswith(b'"'):
            open_field = piece
        else:
            fields.append(piece)
    if open_field is not None:  # never closed: as written
        fields.extend(open_field.split(bytes([sep])))
    return fields


def separator(line: bytes, data_line: bytes = b"") -> int:
    """The field separator of a file, from its header line (outside quoted names): a tab if it
    has more tabs than commas (TSV, as R and many GEO files write it), else a comma; a space if
    it has neither but spaces between names (R's ``write.table`` default). A header with one
    name and no separator leaves the choice to the first data line."""
    for text in (line, data_line):
        bare = _outside_quotes(_strip_eol(text))
        tabs, commas = bare.count(b"\t"), bare.count(b",")
        if tabs or commas:
            return TAB if tabs > commas else COMMA
        if b" " in bare.strip(b" "):
            return SPACE
    return COMMA


def detect_dialect(line: bytes, data_line: bytes | None) -> Dialect:
    """The separator and the header layout of a file, from its header line and its first data
    line (None if it has none).

    The header lacks the row names' field (R's ``write.table``: ``r_header``) when it has one
    field fewer than the first data line, and its first name is not one that names a row-name
    column (:data:`ROW_NAME_COLUMNS`) or empty, and the data line does not end in a separator.
    The decision is made once: every line is then checked against it.
    """
    sep = separator(line, data_line or b"")
    if data_line is None:
        return Dialect(sep)
    header, data = _strip_eol(line), _strip_eol(data_line)
    first = _clean_name(header[: _first_field_end(header, 0, len(header), bytes([sep]))])
    if not first or first.lower() in ROW_NAME_COLUMNS or data.endswith(bytes([sep])):
        return Dialect(sep)
    header_fields = _outside_quotes(header).count(bytes([sep])) + 1
    data_fields = _outside_quotes(data).count(bytes([sep])) + 1
    return Dialect(sep, r_header=data_fields == header_fields + 1)


def parse_header(
    line: bytes,
    source: str,
    sep: int = COMMA,
    *,
    names: str = "gene",
    r_header: bool = False,
) -> list[str]:
    """Gene names from the header line ``<cell column>,<gene>,...``; with ``names="cell"``, cell
    names from the header ``<gene column>,<cell>,...`` of a genes-by-cells file.

    The first header cell names the other column, whatever it says: ``sample_name``, ``cell``,
    or nothing at all, as pandas writes an index. With ``r_header`` (see
    :func:`detect_dialect`) there is no such cell: every field is a name.

    Raises
    ------
    InputError
        The header is empty, names nothing after its first cell, or has an empty name.
    """
    other = "gene" if names == "cell" else "cell"
    fields = [_clean_name(field) for field in _split_fields(_strip_eol(line), sep)]
    if fields == [""]:
        raise InputError(f"{source}: line 1: the file is empty (no header)")
    named = fields if r_header else fields[1:]
    if not named:
        raise InputError(
            f"{source}: line 1: the header names no {names} after the {other} column "
            f"({fields[0][:60]!r}); is the separator a comma or a tab?"
        )
    for column, name in enumerate(named, start=1 if r_header else 2):
        if not name:
            raise InputError(f"{source}: line 1, column {column}: empty {names} name")
    return named


@dataclass
class BlockIndex:
    """Line starts found in one byte range of the file's data region."""

    starts: np.ndarray  # int64 absolute offsets of non-blank lines that start in the range
    names: list[str]  # the first field of each of those lines
    local_line: np.ndarray  # int64 newlines counted from the range start to each line start
    newlines: int  # newlines in the range (shifted one byte back, see index_block)


def index_block(buf: bytes, offset: int, begin: int, end: int, sep: int = COMMA) -> BlockIndex:
    """Index the lines that start in ``[begin, end)`` of the file.

    ``buf`` (bytes, bytearray or mmap) holds the file's bytes from ``offset <= begin - 1`` up to
    ``end`` plus an overhang, so the byte before each candidate start is visible and names near
    the end are complete. Newlines are counted in ``[begin - 1, end - 1)``; ranges that tile the
    data region count each newline once.
    """
    starts: list[int] = []
    names: list[str] = []
    local: list[int] = []
    sep_byte = bytes([sep])
    stop = end - 1 - offset  # count newlines in buf[begin - 1 - offset : stop]
    count = 0
    pos = buf.find(b"\n", begin - 1 - offset, stop)
    while pos != -1:
        count += 1
        start = pos + 1  # a line starts after each newline
        first = buf[start : start + 2]
        blank = (
            start >= len(buf)  # the newline ends the file
            or first[:1] == b"\n"
            or first == b"\r\n"
            or (first == b"\r" and start + 1 >= len(buf))
        )
        if not blank:
            limit = _first_field_end(buf, start, min(len(buf), start + NAME_OVERHANG), sep_byte)
            newline = buf.find(b"\n", start, limit)
            starts.append(start + offset)
            names.append(_clean_name(buf[start : newline if newline != -1 else limit]))
            local.append(count)
        pos = buf.find(b"\n", start, stop)
    return BlockIndex(
        starts=np.asarray(starts, dtype=np.int64),
        names=names,
        local_line=np.asarray(local, dtype=np.int64),
        newlines=count,
    )


def _first_field_end(buf, start: int, stop: int, sep: bytes) -> int:
    """Where the first field of the line at ``start`` ends: at its separator (one inside a
    quoted name does not count), else at ``stop``; a line's end is the caller's to find."""
    pos = start
    if buf[start : start + 1] == b'"':
        pos = start + 1
        while True:
            quote = buf.find(b'"', pos, stop)
            if quote == -1 or buf.find(b"\n", pos, quote) != -1:
                pos = start  # not closed on this line: the first separator ends the name
                break
            if buf[quote + 1 : quote + 2] == b'"':
                pos = quote + 2
                continue
            pos = quote + 1
            break
    end = buf.find(sep, pos, stop)
    return end if end != -1 else stop


@numba.njit(nogil=True, cache=True, inline="always")
def _skip_name(buf, start, size, sep):  # pragma: no cover - compiled
    """The position of the separator (or line end) after the name at ``start``; a separator
    inside a double-quoted name is part of the name, as in :func:`_first_field_end`."""
    pos = start
    if pos < size and buf[pos] == 34:  # '"'
        pos += 1
        closed = False
        while pos < size and buf[pos] != 10:
            if buf[pos] == 34:
                if pos + 1 < size and buf[pos + 1] == 34:
                    pos += 2
                    continue
                pos += 1
                closed = True
                break
            pos += 1
        if not closed:
            pos = start
    while pos < size and buf[pos] != sep and buf[pos] != 10:
        pos += 1
    return pos


@numba.njit(nogil=True, cache=True, inline="always")
def _record_error(error, line, gene, token, buf, pos, scan, sep):  # pragma: no cover - compiled
    """Fill ``error`` for a bad field starting at ``token``; with ``scan``, the field runs to the
    next separator. Returns the end of the field."""
    if scan:
        size = buf.shape[0]
        while pos < size and buf[pos] != sep and buf[pos] != 10:
            pos += 1
    error[0] = line
    error[1] = gene
    error[2] = token
    error[3] = pos
    return pos


@numba.njit(nogil=True, cache=True, inline="always")
def _float_token(buf, pos, size, integer_part):  # pragma: no cover - compiled
    """Finish a number whose digits so far gave ``integer_part``: an optional fraction and
    exponent (``3.``, ``.5``, ``1.5e-3``, ``2E+2``). Returns (value, end, ok)."""
    value = float(integer_part)
    if pos < size and buf[pos] == 46:  # '.'
        pos += 1
        scale = 0.1
        while pos < size and 48 <= buf[pos] <= 57:
            value += (buf[pos] - 48) * scale
            scale *= 0.1
            pos += 1
    if pos < size and (buf[pos] == 101 or buf[pos] == 69):  # 'e' or 'E'
        pos += 1
        negative = False
        if pos < size and (buf[pos] == 45 or buf[pos] == 43):
            negative = buf[pos] == 45
            pos += 1
        if pos >= size or not 48 <= buf[pos] <= 57:
            return value, pos, False
        exponent = 0
        while pos < size and 48 <= buf[pos] <= 57:
            exponent = min(exponent * 10 + (buf[pos] - 48), 400)
            pos += 1
        value *= 10.0 ** (-exponent if negative else exponent)
    return value, pos, True


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _parse_kernel(buf, starts, n_genes, out, error, sep, integer, counters):  # pragma: no cover
    """Parse the lines at ``starts`` (offsets into ``buf``) into ``out`` (lines x genes).

    ``integer``: ``out`` holds counts (int32): a value written as a float is rounded when it is
    within ROUNDING_TOLERANCE of an integer (``counters[0]`` counts those that moved), and
    refused as FRACTIONAL otherwise. Else ``out`` is float32 and takes any finite number.
    Returns a status code; on error ``error`` holds
    (line index, gene index, token start, token end).
    """
    size = buf.shape[0]
    for i in range(starts.shape[0]):
        # the cell name: up to the first separator outside quotes
        pos = _skip_name(buf, starts[i], size, sep)
        if pos >= size or buf[pos] != sep:
            _record_error(error, i, 0, pos, buf, pos, False, sep)
            return TOO_FEW
        pos += 1
        j = 0
        last = n_genes - 1
        while True:
            # fast path for the common case, a one-digit count followed by the separator the
            # header asks for (',' or, after the last gene, '\n'): it stores what the general
            # path below would and moves on the same way, twice as fast on sparse counts
            if pos + 1 < size and 48 <= buf[pos] <= 57:
                follow = buf[pos + 1]
                if follow == sep and j < last:
                    out[i, j] = buf[pos] - 48
                    j += 1
                    pos += 2
                    continue
                if follow == 10 and j == last:
                    out[i, j] = buf[pos] - 48
                    j += 1
                    pos += 2
                    break
            token = pos
            negative = not integer and pos < size and buf[pos] == 45
            if negative:
                pos += 1
            value = 0
            digits = pos
            while pos < size:
                c = buf[pos]
                if c < 48 or c > 57:
                    break
                value = value * 10 + (c - 48)
                if value > 2147483647 and integer:
                    _record_error(error, i, j, token, buf, pos, True, sep)
                    return TOO_LARGE
                pos += 1
            c = buf[pos] if pos < size else 10
            number = 0.0
            is_float = c == 46 or ((c == 101 or c == 69) and pos > digits)
            if is_float:
                number, pos, ok = _float_token(buf, pos, size, value)
                c = buf[pos] if pos < size else 10
                if not ok or (pos == digits + 1 and buf[digits] == 46):  # "1e", a lone "."
                    c = 0
            ended = c == sep or c == 10 or (c == 13 and (pos + 1 >= size or buf[pos + 1] == 10))
            if pos == digits or not ended:
                pos = _record_error(error, i, j, token, buf, pos, True, sep)
                if j >= n_genes:
                    return TOO_MANY
                if token < size and buf[token] == 45 and token + 1 < pos:
                    return NEGATIVE
                if pos == token or (token < size and buf[token] == 13 and token + 1 == pos):
                    return EMPTY_FIELD
                return NOT_INTEGER
            if j >= n_genes:
                _record_error(error, i, j, token, buf, pos, False, sep)
                return TOO_MANY
            if not is_float:
                out[i, j] = -value if negative else value
            elif integer:
                nearest = np.floor(number + 0.5)
                if abs(number - nearest) > ROUNDING_TOLERANCE:
                    _record_error(error, i, j, token, buf, pos, False, sep)
                    return FRACTIONAL
                if nearest > 2147483647:
                    _record_error(error, i, j, token, buf, pos, False, sep)
                    return TOO_LARGE
                if nearest != number:
                    counters[0] += 1
                out[i, j] = nearest
            else:
                out[i, j] = -number if negative else number
            j += 1
            if c == sep:
                pos += 1
                continue
            break
        if j < n_genes:
            _record_error(error, i, j, pos, buf, pos, False, sep)
            return TOO_FEW
    return OK


def parse_block(
    buf: np.ndarray,
    starts: np.ndarray,
    n_genes: int,
    *,
    out: np.ndarray | None = None,
    sep: int = COMMA,
    dtype: np.dtype | str = np.int32,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Parse lines into an int32 (counts) or float32 array; returns ``(values, status, error)``.

    ``buf`` is a uint8 array of the block's bytes, ``starts`` the int64 offsets of its lines in
    ``buf``. A non-zero status is one of this module's codes, with ``error`` = (line index, gene
    index, token start, token end, values rounded); :func:`raise_parse_error` turns it into a
    message. ``error[4]`` also counts, on success, the float-written counts that were rounded.
    """
    dtype = np.dtype(out.dtype if out is not None else dtype)
    if out is None:
        out = np.empty((starts.shape[0], n_genes), dtype=dtype)
    error = np.zeros(5, dtype=np.int64)
    status = _parse_kernel(
        buf, starts, n_genes, out, error, np.uint8(sep), dtype.kind in "iu", error[4:]
    )
    return out, int(status), error


def raise_parse_error(
    status: int,
    error: np.ndarray,
    buf: np.ndarray,
    *,
    source: str,
    line_numbers: np.ndarray,
    genes: list[str] | np.ndarray,
    integer: bool = True,
    columns: str = "gene",
    r_header: bool = False,
) -> None:
    """Raise the :class:`InputError` that names the file, line, column and gene of a parse error.

    ``genes`` names the columns after the first; in a genes-by-cells file they are cells
    (``columns="cell"``) and each line is a gene's. With ``r_header`` the header has no field
    above the row names (R's ``write.table``), which a wrong field count explains.
    """
    line_index, gene_index, token_start, token_end = (int(v) for v in error[:4])
    line = int(line_numbers[line_index])
    token = bytes(buf[token_start : min(token_end, token_start + 40)]).decode("utf-8", "replace")
    token = token.rstrip("\r")
    n_genes = len(genes)
    first = "sample_name" if columns == "gene" else "the gene name"
    problem = _PROBLEMS[status] if integer or status != NOT_INTEGER else "not a number"
    # R's layout is said where a field count is wrong: the file may have meant the other one
    row = "cell" if columns == "gene" else "gene"
    layout = (
        f"; read as R's write.table layout, with no header field above the {row} names, since "
        "the first line after the header has one field more than the header"
    )
    if status == TOO_FEW:
        expected = (
            f"a {row} name and {n_genes} values{layout}"
            if r_header
            else f"{first} and {n_genes} {columns}s"
        )
        raise InputError(
            f"{source}: line {line}: {problem}: found {gene_index + 1} of {n_genes + 1} "
            f"({expected})"
        )
    if status == TOO_MANY:
        expected = (
            f"lines hold a {row} name and {n_genes} values"
            if r_header
            else f"the header has {n_genes + 1} columns"
        )
        raise InputError(
            f"{source}: line {line}, column {gene_index + 2}: {problem}: {expected}, found more "
            f"({token!r} after the last {columns}){layout if r_header else ''}"
        )
    gene = genes[gene_index]
    advice = (
        "; the matrix holds non-integer values (normalised data?): ingest it with --dtype float32"
        if status == FRACTIONAL
        else ""
    )
    raise InputError(
        f"{source}: line {line}, column {gene_index + 2} ({columns} {gene!r}): {problem}: "
        f"{token!r}{advice}"
    )

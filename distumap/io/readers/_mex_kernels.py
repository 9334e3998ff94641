"""The compiled Matrix Market kernels of the MEX reader: parse, fill a block, index byte ranges."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numba
import numpy as np

from distumap.io.readers._base import (
    ACCEPTED,
    REFUSED,
    accept,
)

BANNER = re.compile(
    rb"%%MatrixMarket\s+matrix\s+coordinate\s+(integer|real)\s+general\s*$", re.IGNORECASE
)
EXPECTED_BANNER = "%%MatrixMarket matrix coordinate integer|real general"
#: bytes read past an index block's end so that its last line's column number is complete
MTX_OVERHANG = 4096
#: decompressed bytes parsed at once when a MEX file is read sequentially
MTX_STREAM_PIECE = 16 << 20

# kernel status codes
MTX_OK, MTX_BAD_LINE, MTX_UNSORTED, MTX_OUT_OF_RANGE = range(4)


@numba.njit(nogil=True, cache=True, inline="always")
def _skip_blanks(buf, pos, size):  # pragma: no cover - compiled
    while pos < size and (buf[pos] == 32 or buf[pos] == 9):
        pos += 1
    return pos


@numba.njit(nogil=True, cache=True, inline="always")
def _parse_index(buf, pos, size):  # pragma: no cover - compiled
    """A 1-based index of at most 18 digits: (value, end), value -1 when there are none."""
    value = 0
    begin = pos
    while pos < size and 48 <= buf[pos] <= 57 and pos - begin < 18:
        value = value * 10 + (buf[pos] - 48)
        pos += 1
    if pos == begin:
        return -1, pos
    return value, pos


@numba.njit(nogil=True, cache=True, inline="always")
def _parse_value(buf, pos, size):  # pragma: no cover - compiled
    """A decimal number (sign, digits, fraction, exponent): (value, end, ok)."""
    negative = False
    if pos < size and (buf[pos] == 45 or buf[pos] == 43):
        negative = buf[pos] == 45
        pos += 1
    mantissa = 0
    exponent = 0
    digits = 0
    while pos < size and 48 <= buf[pos] <= 57:
        if mantissa < 100_000_000_000_000_000:
            mantissa = mantissa * 10 + (buf[pos] - 48)
        else:
            exponent += 1
        digits += 1
        pos += 1
    if pos < size and buf[pos] == 46:  # "."
        pos += 1
        while pos < size and 48 <= buf[pos] <= 57:
            if mantissa < 100_000_000_000_000_000:
                mantissa = mantissa * 10 + (buf[pos] - 48)
                exponent -= 1
            digits += 1
            pos += 1
    if digits == 0:
        return 0.0, pos, False
    if pos < size and (buf[pos] == 101 or buf[pos] == 69):  # "e", "E"
        pos += 1
        sign = 1
        if pos < size and (buf[pos] == 45 or buf[pos] == 43):
            sign = -1 if buf[pos] == 45 else 1
            pos += 1
        power = 0
        begin = pos
        while pos < size and 48 <= buf[pos] <= 57:
            if power < 10_000:
                power = power * 10 + (buf[pos] - 48)
            pos += 1
        if pos == begin:
            return 0.0, pos, False
        exponent += sign * power
    value = float(mantissa)
    if exponent > 0:
        value *= 10.0 ** min(exponent, 400)
    elif exponent < 0:
        value /= 10.0 ** min(-exponent, 400)
    return (-value if negative else value), pos, True


@numba.njit(nogil=True, cache=True, inline="always")
def _line_end(buf, pos, size):  # pragma: no cover - compiled
    """After the last field: blanks, an optional CR, then a newline or the end. (-1 if not.)"""
    pos = _skip_blanks(buf, pos, size)
    if pos < size and buf[pos] == 13:
        pos += 1
    if pos < size and buf[pos] != 10:
        return -1
    return pos + 1


@numba.njit(nogil=True, cache=True, inline="always")
def _blank_line(buf, pos, size):  # pragma: no cover - compiled
    """The start of the next line when the line at ``pos`` is blank, else -1."""
    p = _skip_blanks(buf, pos, size)
    if p < size and buf[p] == 13:
        p += 1
    if p >= size:
        return size
    if buf[p] == 10:
        return p + 1
    return -1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def mtx_parse_kernel(buf, rows, cols, values, lines, error):  # pragma: no cover - compiled
    """Parse every ``row col value`` line of ``buf``; returns (entries, status).

    ``lines[k]`` is the line (counted from 0 at the start of ``buf``) of entry ``k``; on error
    ``error`` holds (line, byte offset of the line).
    """
    size = buf.shape[0]
    pos = 0
    n = 0
    line = 0
    while pos < size:
        begin = pos
        # fast path for Cell Ranger's lines, "<digits> <digits> <digits>\n"; anything else
        # (blanks, CR, signs, fractions, exponents, errors) goes through the general path below
        row, p = _parse_index(buf, pos, size)
        if row >= 0 and p < size and buf[p] == 32:
            col, p = _parse_index(buf, p + 1, size)
            if col >= 0 and p < size and buf[p] == 32:
                whole, p = _parse_index(buf, p + 1, size)
                if whole >= 0 and p < size and buf[p] == 10:
                    rows[n] = row
                    cols[n] = col
                    values[n] = whole
                    lines[n] = line
                    n += 1
                    line += 1
                    pos = p + 1
                    continue
        after = _blank_line(buf, pos, size)
        if after >= 0:
            pos = after
            line += 1
            continue
        pos = _skip_blanks(buf, pos, size)
        row, pos = _parse_index(buf, pos, size)
        ok = row >= 0 and pos < size and (buf[pos] == 32 or buf[pos] == 9)
        col = -1
        value = 0.0
        if ok:
            pos = _skip_blanks(buf, pos, size)
            col, pos = _parse_index(buf, pos, size)
            ok = col >= 0 and pos < size and (buf[pos] == 32 or buf[pos] == 9)
        if ok:
            pos = _skip_blanks(buf, pos, size)
            value, pos, ok = _parse_value(buf, pos, size)
        if ok:
            pos = _line_end(buf, pos, size)
            ok = pos >= 0
        if not ok:
            error[0] = line
            error[1] = begin
            return n, MTX_BAD_LINE
        rows[n] = row
        cols[n] = col
        values[n] = value
        lines[n] = line
        n += 1
        line += 1
    return n, MTX_OK


#: kernel status: stopped before a line whose column lies past the block (the block is complete)
MTX_PAST = 2


@numba.njit(nogil=True, cache=True, boundscheck=False)
def mtx_fill(
    buf, pos, first_column, last_column, n_rows, n_cells, gene_map, integer_field, integer, strict,
    out, state,
):  # fmt: skip  # pragma: no cover - compiled
    """Parse the ``row col value`` lines of ``buf`` from ``pos`` straight into the block ``out``:
    an entry whose 1-based column ``c`` has ``first_column < c <= last_column`` goes to
    ``out[c - first_column - 1, gene]``. ``state`` holds (last column seen, entries, rounded
    values, rows of ``out`` zeroed so far) across calls: the lines are sorted by column, so a row
    is zeroed just before its first entry (in cache), and the caller zeroes the rows after the
    last one.

    Returns ``(pos, status)``: ACCEPTED at the end of ``buf``; MTX_PAST at the start of a line
    whose column is past ``last_column`` (not consumed); REFUSED at a line that the checked
    path must explain (malformed, out of range, not sorted, not a count). With ``strict`` every
    column must lie in the block (an indexed read); otherwise lines before it are checked and
    skipped (a sequential read).
    """
    size = buf.shape[0]
    mapped = gene_map.shape[0] > 0
    while pos < size:
        begin = pos
        # fast path for Cell Ranger's lines, "<digits> <digits> <digits>\n", written out here:
        # numba compiles the helpers' (value, position) returns into a much slower loop
        row = col = -1
        value = 0.0
        parsed = True
        p = pos
        for field in range(3):
            number = 0
            digits = 0
            while p < size:
                c = buf[p]
                if c < 48 or c > 57:
                    break
                number = number * 10 + (c - 48)
                p += 1
                digits += 1
            if digits == 0 or digits > 18 or p >= size or buf[p] != (10 if field == 2 else 32):
                parsed = False
                break
            if field == 0:
                row = number
            elif field == 1:
                col = number
            else:
                value = float(number)
            p += 1
        if parsed:
            pos = p
        else:
            after = _blank_line(buf, begin, size)
            if after >= 0:
                pos = after
                continue
            p = _skip_blanks(buf, begin, size)
            row, p = _parse_index(buf, p, size)
            ok = row >= 0 and p < size and (buf[p] == 32 or buf[p] == 9)
            col = -1
            if ok:
                p = _skip_blanks(buf, p, size)
                col, p = _parse_index(buf, p, size)
                ok = col >= 0 and p < size and (buf[p] == 32 or buf[p] == 9)
            if ok:
                p = _skip_blanks(buf, p, size)
                value, p, ok = _parse_value(buf, p, size)
            if ok:
                p = _line_end(buf, p, size)
                ok = p >= 0
            if not ok:
                return begin, REFUSED
            pos = p
        if col < 1 or col > n_cells or col < state[0]:
            return begin, REFUSED
        if col > last_column:
            return begin, (REFUSED if strict else MTX_PAST)
        state[0] = col
        state[1] += 1
        if col <= first_column:
            if strict:
                return begin, REFUSED
            continue
        if row < 1 or row > n_rows:
            return begin, REFUSED
        gene = row - 1
        if mapped:
            gene = gene_map[gene]
            if gene < 0:
                continue
        if integer_field and value != np.rint(value):
            return begin, REFUSED
        ok, moved, number = accept(value, integer)
        if not ok:
            return begin, REFUSED
        state[2] += moved
        row = col - first_column - 1
        while state[3] <= row:
            out[state[3], :] = 0
            state[3] += 1
        out[row, gene] = number
    return pos, ACCEPTED


@numba.njit(nogil=True, cache=True, boundscheck=False)
def mtx_index_kernel(
    buf, first, end, n_cells, rec_cols, rec_offsets, rec_lines, out
):  # pragma: no cover - compiled
    """Find where each column's entries start among the lines that start in ``[first, end)``.

    Records (column, offset in ``buf``, line) whenever the column changes. ``out`` receives
    (records, lines, entries, status, error line, error offset, column before the error); lines
    count from 0 at ``first``.
    """
    size = buf.shape[0]
    pos = first
    previous = -1
    n = 0
    line = 0
    entries = 0
    status = MTX_OK
    while pos < end:
        begin = pos
        # fast path: "<digits> <digits> " (see mtx_fill on why it is written out)
        p = pos
        row = col = -1
        for field in range(2):
            number = 0
            digits = 0
            while p < size:
                c = buf[p]
                if c < 48 or c > 57:
                    break
                number = number * 10 + (c - 48)
                p += 1
                digits += 1
            if digits == 0 or digits > 18 or p >= size or buf[p] != 32:
                row = col = -1
                break
            if field == 0:
                row = number
            else:
                col = number
            p += 1
        if col < 0:
            after = _blank_line(buf, pos, size)
            if after >= 0:
                pos = after
                line += 1
                continue
            p = _skip_blanks(buf, pos, size)
            row, p = _parse_index(buf, p, size)
            col = -1
            if row >= 0 and p < size and (buf[p] == 32 or buf[p] == 9):
                p = _skip_blanks(buf, p, size)
                col, p = _parse_index(buf, p, size)
        if col < 0:
            status = MTX_BAD_LINE
        elif col < 1 or col > n_cells:
            status = MTX_OUT_OF_RANGE
        elif col < previous:
            status = MTX_UNSORTED
        if status != MTX_OK:
            out[4] = line
            out[5] = begin
            out[6] = previous
            break
        if col != previous:
            rec_cols[n] = col
            rec_offsets[n] = begin
            rec_lines[n] = line
            n += 1
            previous = col
        entries += 1
        while p < size and buf[p] != 10:
            p += 1
        pos = p + 1
        line += 1
    out[0] = n
    out[1] = line
    out[2] = entries
    out[3] = status


@dataclass
class MexIndexBlock:
    """Where the columns (cells) change among the lines that start in one byte range.

    Attributes
    ----------
    begin, end
        The byte range of ``matrix.mtx``.
    columns, offsets, lines
        1-based column, absolute byte offset and line (counted from 0 at the range's first line)
        of each line whose column differs from the previous line's.
    n_lines, n_entries
        Lines (blank ones included) and entries that start in the range.
    error
        ``(status, line, text, previous column)`` of the first bad line, or None; raised by
        :meth:`MexReader.set_index`, which knows the line numbers.
    """

    begin: int
    end: int
    columns: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray
    n_lines: int
    n_entries: int
    error: tuple[int, int, str, int] | None = None

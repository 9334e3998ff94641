"""The ingest's skeleton, per cell: every input's cell names checked and handed out a block at
a time, and the per-cell coordinates (names, the inputs' own metadata, the metadata file's
joined on the final names, ``source``) the skeleton appends block by block. Nothing here holds
a name per cell: a 64-bit hash per cell for the checks, two per metadata row for the join."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

from distumap._errors import InputError, outside_stacklevel
from distumap._format import metadata_name
from distumap.io._ingest_store import CELL_COORD_CHUNK, MetadataTable, name_hash
from distumap.io.readers import Reader

__all__ = ["cell_columns", "check_cell_names", "name_blocks"]


def cell_columns(
    readers: list[Reader],
    labels: list[str],
    offsets: np.ndarray,
    suffixed: bool,
    table: MetadataTable | None,
) -> Iterator[dict[str, np.ndarray]]:
    """The store's per-cell coordinates a block at a time: ``cell``, the metadata (the inputs'
    own, then the metadata file's, joined on the final names) and ``source`` for several
    inputs."""
    own = _metadata(readers)
    keys: dict[str, tuple[bool, str]] = {}  # store name -> (the inputs' own?, column)
    for is_own, columns in ((True, list(own)), (False, list(table.kinds) if table else [])):
        for name in columns:
            keys[metadata_name(name, set(keys))] = (is_own, name)
    sources = np.array(labels, dtype=object)
    for start, cells in name_blocks(readers, labels, suffixed):
        stop = start + len(cells)
        aligned = table.aligned(cells) if table is not None else {}
        block = {"cell": cells}
        for key, (is_own, name) in keys.items():
            block[key] = own[name][start:stop] if is_own else aligned[name]
        if len(readers) > 1:
            block["source"] = sources[np.searchsorted(offsets, np.arange(start, stop), "right") - 1]
        yield block


def name_blocks(
    readers: list[Reader], labels: list[str], suffixed: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """Every input's cell names in store order, :data:`CELL_COORD_CHUNK` at a time (the last
    block may be shorter) with the first cell's number; each name gets ``-<label>`` of its input
    where ``suffixed``."""
    pending: list[np.ndarray] = []
    held = start = 0
    for reader, label in zip(readers, labels, strict=True):
        for part in reader.cell_blocks(CELL_COORD_CHUNK):
            if suffixed:
                part = np.array([f"{name}-{label}" for name in part], dtype=object)
            pending.append(part)
            held += len(part)
            while held >= CELL_COORD_CHUNK:
                merged = np.concatenate(pending)
                yield start, merged[:CELL_COORD_CHUNK]
                start += CELL_COORD_CHUNK
                pending, held = [merged[CELL_COORD_CHUNK:]], held - CELL_COORD_CHUNK
    if held:
        yield start, np.concatenate(pending)


def check_cell_names(readers: list[Reader], labels: list[str]) -> bool:
    """Refuse an input that names a cell twice; say whether names repeat across the inputs
    (then every name gets ``-<label>`` of its input, as ``anndata.concat(index_unique="-")``
    does). One pass over the names keeping a 64-bit hash per cell; the few names whose hashes
    meet are read again and compared."""
    hashes = []
    for reader, label in zip(readers, labels, strict=True):
        parts = [name_hash(names) for names in reader.cell_blocks(CELL_COORD_CHUNK)]
        own = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if len(own) != reader.n_cells:
            raise InputError(f"{reader.source}: {len(own)} cell names for {reader.n_cells} cells")
        first = _first_repeat([reader], [label], own)
        if first is not None:
            name, (i, j) = first
            raise InputError(f"{reader.source}: cell {name!r} is named twice (cells {i} and {j})")
        hashes.append(own)
    if len(readers) < 2:
        return False
    every = np.concatenate(hashes)
    del hashes
    if not _repeats_somewhere(readers, labels, every):
        return False
    repeats = len(every) - len(np.unique(every))
    warnings.warn(
        f"cell names repeat across the inputs ({repeats:,} of them); every cell name gets "
        "'-<source>' appended, as anndata.concat(index_unique='-') does",
        UserWarning,
        stacklevel=outside_stacklevel(),
    )
    return True


def _meeting(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells in hash order, and where in that order a cell's hash equals the next one's."""
    order = np.argsort(hashes, kind="stable")
    ranked = hashes[order]
    return order, np.flatnonzero(ranked[1:] == ranked[:-1])


def _names_at(readers: list[Reader], labels: list[str], cells: np.ndarray) -> dict[int, str]:
    """The names of ``cells`` (sorted cell numbers), from one pass over the names."""
    found: dict[int, str] = {}
    for start, block in name_blocks(readers, labels, suffixed=False):
        here = cells[(cells >= start) & (cells < start + len(block))]
        found.update((cell, block[cell - start]) for cell in here.tolist())
    return found


def _repeats_somewhere(readers: list[Reader], labels: list[str], hashes: np.ndarray) -> bool:
    """Whether two cells share a name: pairs of cells whose hashes meet are compared, 64 pairs
    a pass over the names, until one pair shares its name (nearly always the first pass). Where
    names repeat across inputs, nearly every cell is in such a pair: holding them all to find
    the first would hold every name."""
    order, meet = _meeting(hashes)
    for first in range(0, len(meet), 64):
        pairs = np.stack([order[meet[first : first + 64]], order[meet[first : first + 64] + 1]])
        names = _names_at(readers, labels, np.unique(pairs))
        if any(names[a] == names[b] for a, b in pairs.T.tolist()):
            return True
    return False


def _first_repeat(
    readers: list[Reader], labels: list[str], hashes: np.ndarray
) -> tuple[str, tuple[int, int]] | None:
    """The first cell whose name an earlier cell has, with both cells' numbers, or None;
    ``hashes`` of the names say where to look, the names themselves decide."""
    order, meet = _meeting(hashes)
    if not len(meet):
        return None
    candidates = np.unique(np.concatenate([order[meet], order[meet + 1]]))
    seen: dict[str, int] = {}
    for cell, name in sorted(_names_at(readers, labels, candidates).items()):
        if name in seen:
            return name, (seen[name], cell)
        seen[name] = cell
    return None


def _metadata(readers: list[Reader]) -> dict[str, np.ndarray]:
    """The inputs' own cell columns, concatenated; an input without a column gets empty values."""
    tables = [reader.metadata() for reader in readers]
    columns: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(name for table in tables for name in table):
        parts = [table.get(name) for table in tables]
        numeric = all(p is not None and np.asarray(p).dtype.kind in "iufb" for p in parts)
        if numeric:
            columns[name] = np.concatenate([np.asarray(p) for p in parts])
            continue
        pieces = []
        for part, reader in zip(parts, readers, strict=True):
            if part is None:
                part = np.full(reader.n_cells, "", dtype=object)
            pieces.append(np.array(["" if v is None else str(v) for v in part], dtype=object))
        columns[name] = np.concatenate(pieces)
    return columns

"""The ingest's transpositions: how cell blocks are made from an input whose cells are scattered
over the file. A reader declares which one it needs (``Reader.transposition``).

``"entries"`` (CSC AnnData): one pass sorts the matrix's entries by store block into a scratch
array (``transpose-csc-part`` tasks, one zarr shard each), so that each block task then reads only
its own entries instead of passing over the whole matrix.

``"gene-rows"`` (genes-by-cells CSV): a line holds one gene for every cell, so no cell chunk can
be read from one byte range. Pass 1 (``parse-csv-gene-block`` tasks, or one sequential task for
gzip) reads blocks of gene rows into an intermediate genes x cells array in the store, one zarr
chunk per gene block and store chunk of cells, a block holding at most
``distumap.gene-block-bytes`` of values. Pass 2 (``transpose-block`` tasks) reads each store
chunk's columns of the intermediate and writes them transposed. Both passes touch every count
once; that was faster, and bounded in memory, where ``dask.array.rechunk`` of the gene blocks
is not (see benchmarks/RESULTS.md).

Both keep their own markers (:meth:`distumap._stage.Stage.pass_`), so an interrupted ingest
resumes inside them too; the scratch is deleted when the ingest completes.
"""

from __future__ import annotations

import numba
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from distumap import _config
from distumap._format import PROGRESS_GROUP
from distumap._stage import Stage, StagePass, mark_block
from distumap._store import create_progress, progress_array
from distumap.io._ingest_store import block_buffer, write_block
from distumap.io.readers import Reader

__all__ = [
    "GENE_MARKERS",
    "INTERMEDIATE",
    "create_gene_rows",
    "drop_gene_rows",
    "drop_scratch",
    "gene_block",
    "gene_rows_max",
    "gene_rows_ready",
    "run_gene_rows",
    "scratch_entries",
    "transpose_block",
    "transpose_csc",
    "transpose_part",
    "write_gene_rows",
]

# ---------------------------------------------------------------- entries (CSC)

#: scratch of the transposition: small integers, compressed fast (it is read once, then deleted)
_SCRATCH_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=4)
#: scratch entries per zarr chunk inside a part's shard: a block reads a few of them per part
_SCRATCH_CHUNK = 1 << 17


def _scratch_names(index: int) -> tuple[str, str, str]:
    """The scratch arrays of CSC input ``index`` (entries, block offsets) and its markers."""
    return (
        f"{PROGRESS_GROUP}/csc{index}_entries",
        f"{PROGRESS_GROUP}/csc{index}_offsets",
        f"ingest_csc{index}",
    )


def transpose_part(
    store: str, reader: Reader, index: int, part: int, first_cell: int, chunk_cells: int
) -> int:
    """Transposition part ``part``: its CSC entries sorted by store block, into the scratch."""
    entries_path, offsets_path, _ = _scratch_names(index)
    entries = zarr.open_array(store, path=entries_path, mode="r+")
    table = zarr.open_array(store, path=offsets_path, mode="r+")
    size = int(entries.attrs["part_entries"])
    low, high = part * size, min((part + 1) * size, entries.shape[0])
    packed, offsets = reader.csc_entries(
        low, high, first_cell=first_cell, chunk_cells=chunk_cells, n_blocks=table.shape[1] - 1
    )
    entries[low:high] = packed
    table[part] = offsets
    return high - low


def transpose_csc(
    stage, reader: Reader, index: int, first_cell: int, chunk_cells: int
) -> tuple[str, int, np.ndarray]:
    """One pass over a CSC input (genes in columns) that sorts its entries by store block into
    a scratch array, so that each block task then reads only its own entries, instead of a pass
    over the whole matrix per block.

    Parts of ``reader.part_entries`` entries are transposed in parallel tasks (one zarr shard
    of the scratch each) with their own markers, so an interrupted ingest resumes here too.
    Returns what :func:`scratch_entries` needs: the scratch's path, the part size and the
    table of where each part's entries of each block start.
    """
    store = stage.store
    entries_path, offsets_path, markers = _scratch_names(index)
    n_blocks = -(-zarr.open_array(store, path="counts", mode="r").shape[0] // chunk_cells)
    nnz, words, size = reader.nnz, reader.packed_words, reader.part_entries
    n_parts = -(-nnz // size)
    try:
        fresh = int(zarr.open_array(store, path=entries_path, mode="r").attrs["part_entries"])
        fresh = fresh != size or progress_array(store, markers, mode="r").shape[0] != n_parts
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        fresh = True
    if fresh and nnz:
        inner = _SCRATCH_CHUNK if size % _SCRATCH_CHUNK == 0 else size
        group = zarr.open_group(store, mode="r+", use_consolidated=False)
        group = group.require_group(PROGRESS_GROUP)
        entries = group.create_array(
            entries_path.rsplit("/", 1)[1],
            shape=(nnz, words),
            dtype=np.uint32,
            chunks=(inner, words),
            shards=(size, words) if inner < size else None,
            compressors=[_SCRATCH_CODEC],
            fill_value=0,
            overwrite=True,
        )
        entries.attrs["part_entries"] = size
        group.create_array(
            offsets_path.rsplit("/", 1)[1],
            shape=(n_parts, n_blocks + 1),
            dtype=np.int64,
            chunks=(1, n_blocks + 1),
            fill_value=0,
            overwrite=True,
        )
        stage.pass_(markers).create_markers(n_parts)  # last
    if not nnz:
        return entries_path, size, np.zeros((0, n_blocks + 1), dtype=np.int64)
    parts = stage.pass_(markers)  # the parts' own markers; the stage's record is untouched
    parts.run_blocks(
        transpose_part,
        {p: ((store, reader, index, p, first_cell, chunk_cells), {}) for p in parts.pending()},
        key="transpose-csc-part",
        label="ingest: sort the CSC matrix by cell block",
        total=nnz,
        step="sort-csc",  # one row on the dashboard, whichever input's markers
    )
    return entries_path, size, zarr.open_array(store, path=offsets_path, mode="r")[:]


def scratch_entries(store: str, scratch: tuple[str, int, np.ndarray], block: int) -> np.ndarray:
    """Every entry of store block ``block`` in a CSC input's scratch, in the file's order."""
    path, size, table = scratch
    pieces = [
        (part * size + int(table[part, block]), part * size + int(table[part, block + 1]))
        for part in range(table.shape[0])
        if table[part, block] < table[part, block + 1]
    ]
    if not pieces:
        return np.zeros((0, 3), dtype=np.uint32)
    entries = zarr.open_array(store, path=path, mode="r")
    return np.concatenate([entries[low:high] for low, high in pieces])


def drop_scratch(store: str, index: int) -> None:
    entries, offsets, markers = _scratch_names(index)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    for name in (entries, offsets, f"{PROGRESS_GROUP}/{markers}"):
        try:
            del group[name]
        except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass


# ---------------------------------------------------------------- gene rows

#: the intermediate genes x cells array, under the group xarray does not show
INTERMEDIATE = f"{PROGRESS_GROUP}/genes_by_cells"

#: the intermediate lives for one ingest, so it is compressed for speed: lz4 level 1 with bit
#: shuffling, which writes and reads faster than the store's level and compresses nearly as well
INTERMEDIATE_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=4)

#: the markers (and progress events) of pass 1, one per gene block
GENE_MARKERS = "ingest_genes"
#: per gene block, its largest value: pass 1 sees every count, so the counts' type is known
#: before pass 2 writes a store chunk
_GENE_MAX = "ingest_genes_max"


def gene_block(n_cells: int, dtype: str | np.dtype, n_genes: int) -> int:
    """Genes per pass-1 block: as many as fit in ``distumap.gene-block-bytes`` (at least one).
    A block is read in memory, so this bounds a worker's memory whatever the file's size; more,
    smaller blocks share out better and need fewer fresh pages than a few large ones."""
    budget = int(_config.get("gene-block-bytes"))
    per_gene = max(1, n_cells) * np.dtype(dtype).itemsize
    return int(max(1, min(n_genes, budget // per_gene)))


def _intermediate(store: str) -> zarr.Array | None:
    try:
        return zarr.open_array(store, path=INTERMEDIATE, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return None


def gene_rows_ready(stage: Stage) -> bool:
    """Whether an interrupted ingest left the intermediate with its markers while any store
    chunk is unwritten (the stage's own markers are checked by the caller)."""
    if not stage.pending():
        return True
    return stage.pass_(GENE_MARKERS).has_markers() and _intermediate(stage.store) is not None


def create_gene_rows(stage: Stage, n_cells: int, n_genes: int, chunk_cells: int, dtype) -> None:
    """The intermediate, the per-gene-block rounding counts and pass 1's markers (last)."""
    store = stage.store
    per_block = gene_block(n_cells, dtype, n_genes)
    n_gene_blocks = -(-n_genes // per_block)
    # float-written counts rounded, per gene block (pass 1 reads the values)
    create_progress(store, "rounded", np.zeros(n_gene_blocks, dtype=np.int64), chunks=1)
    create_progress(store, _GENE_MAX, np.zeros(n_gene_blocks, dtype=np.float64), chunks=1)
    group = zarr.open_group(store, mode="r+", use_consolidated=False).require_group(PROGRESS_GROUP)
    group.create_array(
        INTERMEDIATE.rsplit("/", 1)[1],
        shape=(n_genes, n_cells),
        dtype=dtype,
        chunks=(per_block, min(chunk_cells, n_cells)),
        compressors=[INTERMEDIATE_CODEC],
        fill_value=0,
        overwrite=True,
    )
    stage.pass_(GENE_MARKERS).create_markers(n_gene_blocks)


def write_gene_rows(store: str, values: np.ndarray, rounded: int, *, block: int, first: int) -> int:
    """Write gene block ``block`` (its genes from ``first``) into the intermediate."""
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r+")
    intermediate[first : first + len(values)] = values
    progress_array(store, "rounded")[block] = rounded
    progress_array(store, _GENE_MAX)[block] = values.max(initial=0)
    return len(values)


def gene_rows_max(store: str) -> float:
    """The largest value pass 1 read (0 where an interrupted older ingest kept no record)."""
    try:
        return float(progress_array(store, _GENE_MAX, mode="r")[:].max(initial=0))
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return 0.0


def _gene_rows_task(store: str, reader: Reader, block: int, genes_per_block: int) -> int:
    """Read gene block ``block`` and write it into the intermediate."""
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    n_genes, n_cells = intermediate.shape
    first, last = block * genes_per_block, min((block + 1) * genes_per_block, n_genes)
    out = block_buffer((last - first, n_cells), intermediate.dtype)
    rounded = reader.read_gene_rows(first, last, out)
    return write_gene_rows(store, out, rounded, block=block, first=first)


def _gene_rows_sequential(store: str, reader: Reader, genes_per_block: int) -> int:
    """Every unwritten gene block of an input read in order, in one pass, marking each."""
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    n_genes, n_cells = intermediate.shape
    done = progress_array(store, GENE_MARKERS, mode="r")[:]
    buffers = [block_buffer((min(genes_per_block, n_genes), n_cells), intermediate.dtype)]
    skip = {int(b) for b in np.flatnonzero(done)}
    total = 0
    for first, last, values, rounded in reader.iter_gene_rows(
        genes_per_block, skip=skip, buffers=buffers
    ):
        block = first // genes_per_block
        write_gene_rows(store, values, rounded, block=block, first=first)
        mark_block(store, GENE_MARKERS, block, last - first, n_genes)
        total += last - first
    return total


def run_gene_rows(stage: Stage, reader: Reader) -> None:
    """Pass 1: every gene block not yet marked, read into the intermediate."""
    store = stage.store
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    genes_per_block = int(intermediate.chunks[0])
    genes_pass: StagePass = stage.pass_(GENE_MARKERS)
    if reader.sequential:
        key, label = reader.gene_rows_sequential_task
        genes_pass.run_sequential(
            _gene_rows_sequential, store, reader, genes_per_block, key=key, label=label
        )
        return
    key, label = reader.gene_rows_task
    genes_pass.run_blocks(
        _gene_rows_task,
        {b: ((store, reader, b, genes_per_block), {}) for b in genes_pass.pending()},
        key=key,
        label=label,
        total=intermediate.shape[0],
    )


#: side of the square tiles of the transpose kernel: a tile and its transpose stay in L1 cache,
#: where numpy's plain ``out[...] = a.T`` strides through memory
_TILE = 64


@numba.njit(nogil=True, cache=True)
def _transpose_into(source, out):  # pragma: no cover - compiled
    """``out[...] = source.T``, tile by tile."""
    n_rows, n_columns = source.shape
    for row0 in range(0, n_rows, _TILE):
        row1 = min(row0 + _TILE, n_rows)
        for column0 in range(0, n_columns, _TILE):
            column1 = min(column0 + _TILE, n_columns)
            for column in range(column0, column1):
                for row in range(row0, row1):
                    out[column, row] = source[row, column]


def transpose_block(store: str, block: int, chunk_cells: int) -> int:
    """Write store chunk ``block``: its cells' columns of the intermediate, transposed, read one
    intermediate chunk at a time (memory: the store chunk and one intermediate chunk)."""
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    n_genes, n_cells = intermediate.shape
    genes_per_block = intermediate.chunks[0]
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, n_cells)
    out = block_buffer((last - first, n_genes), intermediate.dtype)  # write_block narrows it
    for start in range(0, n_genes, genes_per_block):
        stop = min(start + genes_per_block, n_genes)
        _transpose_into(intermediate[start:stop, first:last], out[:, start:stop])
    write_block(store, block, first, out)
    return last - first


def drop_gene_rows(store: str) -> None:
    """Delete the intermediate (the ingest is complete)."""
    if _intermediate(store) is not None:
        del zarr.open_group(store, mode="r+", use_consolidated=False)[INTERMEDIATE]

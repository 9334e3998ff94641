"""What every export shares: a file that appears at its target only when whole, the deflate of
the HDF5 chunks, the genes written, and the block loop of a single writer that may run beside
the embed it takes the embedding from."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import xarray as xr
from isal import isal_zlib

from distumap import _config
from distumap._compute import results_in_order
from distumap._errors import IncompleteStoreError

#: deflate level of the HDF5 exports' chunks, in ISA-L's scale (0-3): level 1 compresses
#: counts as small as zlib's level 1 does at ~5x its speed (benchmarks/RESULTS.md, Export)
DEFLATE_LEVEL = 1


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL rather than a local path."""
    return "://" in path


def cells_per_block(ds: xr.Dataset, block_cells: int | None) -> int:
    """Cells per export task: ``block_cells``, else the store's own cell chunk (the variable's
    chunks: coordinates read from zarr may be chunked differently), else the setting."""
    if block_cells is None:
        counts = ds["counts"]
        chunks = counts.variable.chunks
        if chunks is not None:
            block_cells = int(chunks[counts.dims.index("cell")][0])
        else:
            block_cells = int(_config.get("chunk-cells"))
    if block_cells < 1:
        raise ValueError(f"block_cells must be positive, not {block_cells}")
    return int(block_cells)


def deflate(values: np.ndarray, *, shuffle: bool = False) -> bytes:
    """One HDF5 chunk as the ``gzip`` filter (with ``shuffle`` first, if asked) stores it.

    A zlib stream from ISA-L, which every zlib inflates, so any HDF5 reader reads the chunk
    written with ``write_direct_chunk``; it releases the GIL, so writer threads overlap."""
    values = np.ascontiguousarray(values)
    if shuffle:  # HDF5's shuffle filter: byte j of every element together, then byte j+1, ...
        values = values.view(np.uint8).reshape(-1, values.dtype.itemsize).T
    return isal_zlib.compress(np.ascontiguousarray(values), DEFLATE_LEVEL)


def require_variables(ds: xr.Dataset, names: tuple[str, ...]) -> None:
    """Refuse a dataset without ``names`` (a store before the stages that write them)."""
    missing = [name for name in names if name not in ds]
    if missing:
        raise IncompleteStoreError(
            f"the dataset lacks {', '.join(missing)}: run the preprocess and embed stages first"
        )


def selected_genes(ds: xr.Dataset) -> np.ndarray:
    """The indices of the genes an export writes: the selected ones, or every gene."""
    if "selected" not in ds:
        return np.arange(ds.sizes["gene"])
    gene_index = np.flatnonzero(np.asarray(ds["selected"].values, dtype=bool))
    if gene_index.size == 0:
        raise ValueError("no gene is selected: there is nothing to write")
    return gene_index


#: the task priority of an export's blocks while the embed runs: below the embed's tasks
#: (priority 0), so that they take the cores the embed leaves idle rather than delay it
BESIDE_THE_EMBED = -1


def export_blocks(
    blocks: list, *, stage: str, in_flight: int, client, embedded: Future | None
) -> Iterator:
    """The results of a single writer's block tasks, in order (``results_in_order``).

    While the embed that ``embedded`` waits for runs, the blocks run below its priority (they
    take the cores it leaves idle), and its failure stops them at the next block rather than
    after the last."""
    def stop_if_failed() -> None:
        if embedded is not None and embedded.done() and embedded.exception() is not None:
            raise embedded.exception()

    stop_if_failed()  # an embed that has already failed: no block is computed
    priority = BESIDE_THE_EMBED if embedded is not None else 0
    for result in results_in_order(
        blocks, stage=stage, in_flight=in_flight, client=client, priority=priority
    ):
        stop_if_failed()
        yield result


def embedded_store(ds: xr.Dataset, embedded: Future | None, gene_index: np.ndarray) -> xr.Dataset:
    """The store an export takes its embedding from: ``ds``, or ``embedded``'s result once the
    embed has finished; that must be the same cells and genes the export wrote from ``ds``."""
    if embedded is None:
        return ds
    final = embedded.result()
    require_variables(final, ("counts", "zero_fraction", "X_umap", "landmark"))
    if final.sizes["cell"] != ds.sizes["cell"] or (
        "selected" in final
        and not np.array_equal(np.flatnonzero(final["selected"].values), gene_index)
    ):
        raise ValueError("the embedded store has other cells or genes than the one exported")
    return final


def partial_name(target: str) -> str:
    """A hidden temporary name next to ``target`` (same file system, so renaming is atomic)."""
    directory, name = os.path.split(os.path.abspath(target))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def written_whole(target: str, *, progress: bool = False) -> Iterator[str]:
    """Yield a local path to write; on success it becomes ``target`` (renamed next to it, or
    uploaded once for an fsspec URL), on failure it is removed, so a failure never leaves a
    file at ``target`` and an older file there stays as it was."""
    url = is_url(target)
    workdir = tempfile.mkdtemp(prefix="distumap-export-") if url else None
    local = os.path.join(workdir, os.path.basename(target)) if url else partial_name(target)
    started = time.perf_counter()
    try:
        yield local
        if url:
            import fsspec

            # one upload of the finished file (a multipart upload on object stores)
            fs, remote = fsspec.core.url_to_fs(target)
            fs.put_file(local, remote)
        else:
            os.replace(local, target)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.exists(local):
            os.unlink(local)
    if progress:
        seconds = time.perf_counter() - started
        print(f"distumap export: {target} written in {seconds:.1f} s", file=sys.stderr, flush=True)


#: a single writer's progress lines per file, at most (and the last block's)
PROGRESS_LINES = 20


def block_written(path: str, i: int, n_blocks: int, progress: bool) -> None:
    """The progress line of a single writer that appended block ``i`` of ``n_blocks`` to
    ``path``: one every 5% of the blocks, so that a million cells print 20 lines, not 977."""
    step = max(1, n_blocks // PROGRESS_LINES)
    if progress and ((i + 1) % step == 0 or i + 1 == n_blocks):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        print(
            f"distumap export: {name}: block {i + 1}/{n_blocks} written",
            file=sys.stderr,
            flush=True,
        )

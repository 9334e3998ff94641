"""Write a finished store as AnnData (``.h5ad`` or AnnData zarr), block by block.

The files follow anndata's on-disk format (``encoding-type`` / ``encoding-version`` on every
element) and are written with h5py and zarr directly, so no cell block is ever gathered into one
``AnnData`` in memory. The cluster turns each cell block into the CSR pieces of ``X`` and of the
``log2p1`` layer; then

- h5ad: HDF5 takes one writer, so the client appends the blocks in cell order to resizable,
  chunked, deflated datasets, with a bounded number of blocks in flight;
- AnnData zarr: a first pass counts the nonzeros of every row, which fixes where each block's
  values go; the workers then write their own slices. Every zarr chunk has exactly one writer:
  a block writes the chunks that lie wholly inside its slice and hands the pieces of the (at
  most two) chunks it shares with its neighbours to one small task per shared chunk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from distumap._compute import current_client, run
from distumap._format import (
    ANNDATA_EMBEDDING,
    ANNDATA_GENE_IDS,
    ANNDATA_LANDMARK,
    ANNDATA_LAYER,
    ANNDATA_REQUIRED,
    ANNDATA_UNS_RECORD,
    ANNDATA_UNS_UMAP,
    ANNDATA_ZERO_FRACTION,
    ATTR,
    ENCODINGS,
    check_replaceable,
)
from distumap._progress import report
from distumap.io._files import (
    DEFLATE_LEVEL,
    block_written,
    cells_per_block,
    deflate,
    embedded_store,
    export_blocks,
    is_url,
    partial_name,
    require_variables,
    selected_genes,
    written_whole,
)
from distumap.pp import log2p1_values, selected_counts

#: umap-learn's default spread; with ``min_dist`` it fixes the curve parameters a and b
UMAP_SPREAD = 1.0

# -- how the files are written --------------------------------------------------------------

#: HDF5 chunk of the 1-D CSR datasets, in elements (1 MiB of int32)
H5AD_CHUNK = 2**18
#: threads that deflate the h5ad's chunks on the client (ISA-L releases the GIL)
DEFLATE_THREADS = 2
#: raw bytes of the blocks computed ahead of the h5ad writer, at most
IN_FLIGHT_RAW_BYTES = 2 * 2**30
#: zarr format of the AnnData zarr: v2 is what anndata 0.12 writes by default and what every
#: anndata since 0.7 (zarr-python 2 or 3) reads
ZARR_FORMAT = 2
#: bounds of the zarr chunk of the 1-D CSR arrays, in elements; within them a chunk is about a
#: quarter of a block's nonzeros, so most chunks lie inside one block and are written there
ZARR_CHUNK_MIN, ZARR_CHUNK_MAX = 2**14, 2**20
#: zarr chunk of the per-cell arrays (indptr, obs columns, obsm), in cells
ZARR_CELL_CHUNK = 2**18


def _zarr_compressor():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


# -- the blocks -------------------------------------------------------------------------------


def _csr_pieces(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A block of counts (cells x selected genes) as CSR: X's data, the layer's data, indices
    and the nonzeros of every row."""
    # counts stay int32; a float32 store (--dtype float32) keeps its values as they are
    counts = np.ascontiguousarray(counts)
    if counts.dtype.kind not in "f":
        counts = counts.astype(np.int32, copy=False)
    flat = np.flatnonzero(counts)
    data = counts.reshape(-1)[flat]
    indices = (flat % max(counts.shape[1], 1)).astype(np.int32)
    row_nnz = np.count_nonzero(counts, axis=1).astype(np.int64)
    return data, log2p1_values(data), indices, row_nnz


def _x_dtype(ds: xr.Dataset) -> np.dtype:
    """X holds the store's values: int32 counts, or float32 for a ``--dtype float32`` store."""
    return np.dtype(np.float32 if ds["counts"].dtype.kind == "f" else np.int32)


def _h5ad_block(counts: np.ndarray, index: int, n_blocks: int):
    pieces = _csr_pieces(counts)
    report("export", 1, n_blocks, block=index)
    return pieces


def _row_nnz(counts: np.ndarray) -> np.ndarray:
    return np.count_nonzero(counts, axis=1).astype(np.int64)


def _selected_counts(ds: xr.Dataset, gene_index: np.ndarray, block_cells: int) -> da.Array:
    return selected_counts(ds, gene_index).rechunk({0: block_cells, 1: -1})


# -- the small parts: obs, var, obsm, uns -----------------------------------------------------


def _key(name: Any) -> str:
    # "/" separates path components in HDF5 and zarr; a column "area/region" is "area_region"
    return str(name).replace("/", "_")


def _inputs(ds: xr.Dataset) -> dict[str, Any]:
    """The small arrays of the file, computed together (they are small and concrete)."""
    require_variables(ds, ANNDATA_REQUIRED)
    metadata = [
        name for name, coord in ds.coords.items() if coord.dims == ("cell",) and name != "cell"
    ]
    keys = [_key(name) for name in metadata]
    clashes = sorted(
        {key for key in keys if keys.count(key) > 1 or key in (ANNDATA_LANDMARK, "_index")}
    )
    if clashes:
        raise ValueError(f"metadata column(s) {clashes} clash with other obs columns")
    small = {
        "gene": ds["gene"].data,
        "zero_fraction": ds["zero_fraction"].data,
        "cell": ds["cell"].data,
        "X_umap": ds["X_umap"].transpose("cell", ...).data,
        "landmark": ds["landmark"].data,
        **{f"meta:{name}": ds.coords[name].data for name in metadata},
    }
    if ANNDATA_GENE_IDS in ds.coords and ds.coords[ANNDATA_GENE_IDS].dims == ("gene",):
        small["gene_ids"] = ds.coords[ANNDATA_GENE_IDS].data
    (small,) = dask.compute(small)
    small = {key: np.asarray(value) for key, value in small.items()}
    small["metadata"] = dict(zip(keys, metadata, strict=True))
    return small


def _text(values: np.ndarray) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values.tolist()], dtype=object)


def _categorical(values: np.ndarray) -> pd.Categorical:
    """Strings as anndata keeps them: a categorical of str, missing values as code -1."""
    series = pd.Series(values, dtype=object)
    missing = series.isna().to_numpy()
    text = series.astype(str).where(~missing)
    return pd.Categorical(text)


def _ab_params(min_dist: float, spread: float = UMAP_SPREAD) -> tuple[float, float]:
    """umap-learn's ``find_ab_params``: the curve 1 / (1 + a d^2b) fitted to the target
    membership (1 below ``min_dist``, exponential decay above). Same inputs, same fit; here to
    spare the export umap-learn's import (numba compiles for seconds)."""
    from scipy.optimize import curve_fit

    def curve(x, a, b):
        return 1.0 / (1.0 + a * x ** (2 * b))

    xv = np.linspace(0, spread * 3, 300)
    yv = np.zeros(xv.shape)
    yv[xv < min_dist] = 1.0
    yv[xv >= min_dist] = np.exp(-(xv[xv >= min_dist] - min_dist) / spread)
    params, _ = curve_fit(curve, xv, yv)
    return float(params[0]), float(params[1])


def _uns(ds: xr.Dataset, export_params: dict[str, Any]) -> dict[str, Any]:
    """``uns``: scanpy's UMAP record and the store's stage records with this export added."""
    record = json.loads(json.dumps(ds.attrs.get(ATTR, {}), default=str))
    if isinstance(record, str):
        record = json.loads(record)
    record.setdefault("stages", {})["export"] = {"status": "complete", "params": export_params}
    embed = record["stages"].get("embed", {}).get("params", {}) or {}
    # what scanpy.tl.umap keeps: the curve parameters and the seed
    umap_params: dict[str, Any] = {}
    if embed.get("min_dist") is not None:
        a, b = _ab_params(float(embed["min_dist"]))
        umap_params.update(a=a, b=b)
    if embed.get("seed") is not None:
        umap_params["random_state"] = int(embed["seed"])
    return {ANNDATA_UNS_UMAP: {"params": umap_params}, ANNDATA_UNS_RECORD: record}


# -- one writer per backend, one layout above them ----------------------------------------------


def _encode(node, kind: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = ENCODINGS[kind]


class _H5Elements:
    """anndata elements in an HDF5 file."""

    def __init__(self, root):
        self.root = root

    def group(self, parent, name: str, kind: str = "dict"):
        node = parent.create_group(name)
        _encode(node, kind)
        return node

    def array(self, parent, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        options = {}
        if values.size > 4096:
            options = dict(compression="gzip", compression_opts=DEFLATE_LEVEL, chunks=True)
        _encode(parent.create_dataset(name, data=values, **options), "array")

    def strings(self, parent, name: str, values: np.ndarray) -> None:
        import h5py

        node = parent.create_dataset(name, data=_text(values), dtype=h5py.string_dtype("utf-8"))
        _encode(node, "string-array")

    def scalar(self, parent, name: str, value) -> None:
        import h5py

        if isinstance(value, str):
            node = parent.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
            _encode(node, "string")
        else:
            _encode(parent.create_dataset(name, data=np.array(value)), "numeric-scalar")

    def string_list_attr(self, node, name: str, values: list[str]) -> None:
        import h5py

        node.attrs.create(name, values, dtype=h5py.string_dtype("utf-8"))


class _ZarrElements:
    """anndata elements in a zarr (format 2) group."""

    def __init__(self, root):
        self.root = root

    def group(self, parent, name: str, kind: str = "dict"):
        node = parent.create_group(name)
        _encode(node, kind)
        return node

    def empty(self, parent, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]):
        return parent.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=_zarr_compressor()
        )

    def array(self, parent, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        chunks = (max(1, min(len(values), ZARR_CELL_CHUNK)), *values.shape[1:])
        node = self.empty(parent, name, values.shape, values.dtype, chunks)
        node[...] = values
        _encode(node, "array")

    def strings(self, parent, name: str, values: np.ndarray) -> None:
        import numcodecs
        from zarr.core.dtype import VariableLengthUTF8

        values = _text(values)
        node = parent.create_array(
            name,
            shape=values.shape,
            chunks=(max(1, min(len(values), ZARR_CELL_CHUNK)),),
            dtype=VariableLengthUTF8(),
            filters=[numcodecs.VLenUTF8()],
            fill_value="",
            compressors=_zarr_compressor(),
        )
        node[...] = values
        _encode(node, "string-array")

    def scalar(self, parent, name: str, value) -> None:
        import numcodecs
        from zarr.core.dtype import VariableLengthUTF8

        if isinstance(value, str):
            node = parent.create_array(
                name,
                shape=(),
                dtype=VariableLengthUTF8(),
                filters=[numcodecs.VLenUTF8()],
                fill_value="",
                compressors=None,
            )
            node[...] = np.array(value, dtype=object)
            _encode(node, "string")
        else:
            value = np.array(value)
            node = parent.create_array(name, shape=(), dtype=value.dtype, compressors=None)
            node[...] = value
            _encode(node, "numeric-scalar")

    def string_list_attr(self, node, name: str, values: list[str]) -> None:
        node.attrs[name] = list(values)


def _dataframe(el, parent, name: str, index: np.ndarray, columns: dict[str, Any]) -> None:
    """A pandas DataFrame as anndata writes it: ``_index`` plus one element per column."""
    group = el.group(parent, name, "dataframe")
    group.attrs["_index"] = "_index"
    el.string_list_attr(group, "column-order", list(columns))
    el.strings(group, "_index", index)
    for key, values in columns.items():
        if isinstance(values, pd.Categorical):
            node = el.group(group, key, "categorical")
            node.attrs["ordered"] = bool(values.ordered)
            el.array(node, "codes", np.asarray(values.codes))
            el.strings(node, "categories", np.asarray(values.categories, dtype=object))
        elif np.asarray(values).dtype.kind in "OUST":
            el.strings(group, key, np.asarray(values))
        else:
            el.array(group, key, np.asarray(values))


def _mapping(el, parent, name: str, content: dict[str, Any]) -> None:
    """A nested dict as anndata's ``dict`` encoding; values other than numbers, bools and
    strings (lists, None) as JSON strings."""
    group = el.group(parent, name, "dict")
    for key, value in content.items():
        key = _key(key)
        if isinstance(value, dict):
            _mapping(el, group, key, value)
        elif isinstance(value, str | bool | int | float | np.number | np.bool_):
            el.scalar(group, key, value)
        else:
            el.scalar(group, key, json.dumps(value, sort_keys=True, default=str))


def _obs_columns(small: dict[str, Any]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for key, name in small["metadata"].items():
        values = small[f"meta:{name}"]
        if values.dtype.kind in "biuf":
            columns[key] = values
        else:
            columns[key] = _categorical(values)
    columns[ANNDATA_LANDMARK] = small["landmark"].astype(bool)
    return columns


def _var_columns(small: dict[str, Any], gene_index: np.ndarray) -> dict[str, Any]:
    columns: dict[str, Any] = {
        ANNDATA_ZERO_FRACTION: small["zero_fraction"][gene_index].astype(np.float32)
    }
    if "gene_ids" in small:
        columns[ANNDATA_GENE_IDS] = _text(small["gene_ids"][gene_index])
    return columns


def _write_annotations(el, small: dict[str, Any], gene_index: np.ndarray, uns: dict) -> None:
    """Everything but X and the layer: obs, var, obsm, uns and the empty groups."""
    root = el.root
    _encode(root, "anndata")
    _dataframe(el, root, "obs", small["cell"], _obs_columns(small))
    _dataframe(el, root, "var", small["gene"][gene_index], _var_columns(small, gene_index))
    obsm = el.group(root, "obsm")
    el.array(obsm, ANNDATA_EMBEDDING, small["X_umap"].astype(np.float32))
    for name in ("varm", "obsp", "varp"):
        el.group(root, name)
    _mapping(el, root, "uns", uns)


def _csr_group(el, parent, name: str, shape: tuple[int, int]):
    group = el.group(parent, name, "csr_matrix")
    group.attrs["shape"] = [int(n) for n in shape]
    return group


# -- h5ad -------------------------------------------------------------------------------------


class _Appendable:
    """A resizable 1-D HDF5 dataset that takes values block by block and stores them in whole
    chunks, each deflated here (ISA-L releases the GIL, unlike h5py's own filter) and written
    raw; the last, partly filled chunk goes in padded when :meth:`close` is called."""

    def __init__(self, group, name: str, dtype, shuffle: bool, pool: ThreadPoolExecutor):
        self.pool = pool  # deflates a block's chunks side by side
        self.dataset = group.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            dtype=dtype,
            chunks=(H5AD_CHUNK,),
            compression="gzip",
            compression_opts=DEFLATE_LEVEL,
            shuffle=shuffle,
        )
        self.shuffle = shuffle
        self.tail = np.empty(0, dtype=self.dataset.dtype)  # values after the last whole chunk

    def append(self, values: np.ndarray) -> None:
        values = np.concatenate([self.tail, np.asarray(values, dtype=self.dataset.dtype)])
        whole = len(values) - len(values) % H5AD_CHUNK
        self._write(values[:whole])
        self.tail = values[whole:]

    def close(self) -> None:
        padded = np.zeros(-len(self.tail) % H5AD_CHUNK, dtype=self.tail.dtype)
        self._write(np.concatenate([self.tail, padded]), len(self.tail))
        self.tail = self.tail[:0]

    def _write(self, values: np.ndarray, size: int | None = None) -> None:
        start = self.dataset.shape[0]
        if not len(values):
            return
        self.dataset.resize((start + (len(values) if size is None else size),))
        offsets = range(0, len(values), H5AD_CHUNK)
        chunks = self.pool.map(
            lambda offset: deflate(values[offset : offset + H5AD_CHUNK], shuffle=self.shuffle),
            offsets,
        )
        for offset, chunk in zip(offsets, chunks, strict=True):
            self.dataset.id.write_direct_chunk((start + offset,), chunk)


def _export_params(fmt: str, block_cells: int, **extra: Any) -> dict[str, Any]:
    return {"format": fmt, "block_cells": int(block_cells), **extra}


def write_h5ad(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    block_cells: int | None = None,
    progress: bool = False,
    client=None,
    embedded: Future | None = None,
) -> str:
    """Write the selected genes' counts, log2(x+1), the embedding and the metadata as h5ad.

    Parameters
    ----------
    ds
        A store after the embed stage (:func:`distumap.io.open_store` with ``require="embed"``),
        with ``counts``, ``zero_fraction``, ``selected``, ``X_umap``, ``landmark`` and metadata
        columns as ``cell`` coordinates. Without ``selected`` every gene is written.
    path
        The target file, a local path or an fsspec URL (``s3://bucket/embedding.h5ad``).
    block_cells
        Cells per task. Defaults to the store's cell chunk. The file's contents do not depend
        on it.
    progress
        Print a line per written block to stderr.
    client
        The ``distributed.Client`` to compute on; defaults to the current client if there is
        one, else dask's configured (threaded) scheduler.
    embedded
        A :class:`concurrent.futures.Future` of the embedded store (what
        :func:`distumap.tl.umap` returns), for a caller that embeds while this writes: ``ds``
        then need only be preprocessed, ``X`` and the layer are written from it first, and the
        rest once ``embedded`` has its result. If it fails instead, so does the export, at the
        next block, leaving nothing at ``path``.

    Returns
    -------
    str
        ``path``, as given.

    Notes
    -----
    This computes: the cluster reads every cell block, keeps the selected genes and turns them
    into CSR pieces of ``X`` (int32 counts) and ``layers["log2p1"]`` (float32, the same
    sparsity), one task per block (``h5ad-block``); the client appends them in cell order to
    resizable HDF5 datasets (chunks of 256 Ki elements, deflated on this process by two
    threads at ISA-L's level 1 and written raw, counts and indices byte-shuffled; the layer's
    ``indices`` and ``indptr`` are hard links to ``X``'s, its sparsity), keeping at most two
    blocks per worker thread (and 2 GiB of raw block data) in flight, so its memory does not
    grow with the number of cells. ``obs`` holds the cell
    names, every metadata column (strings as categoricals) and ``landmark``; ``var`` the
    selected genes with ``zero_fraction`` (and ``gene_ids`` where the store has them);
    ``obsm["X_umap"]`` the embedding; ``uns["umap"]["params"]`` what ``scanpy.tl.umap`` keeps
    (``a``, ``b``, ``random_state``) and ``uns["distumap"]`` the stage records. The file is
    written under a temporary name next to the target (or locally, for a URL) and renamed (or
    uploaded) once complete, so a failure leaves nothing at ``path``. ``anndata.read_h5ad``
    reads it with no arguments.

    Examples
    --------
    >>> ds = distumap.io.open_store("out/store.zarr", require="embed")  # doctest: +SKIP
    >>> distumap.io.write_h5ad(ds, "out/embedding.h5ad")  # doctest: +SKIP
    'out/embedding.h5ad'
    """
    import h5py

    target = os.fspath(path)
    check_replaceable(target, "h5ad")
    # refused before any block is computed: a store without what the export needs (or, without
    # ``embedded``, with clashing metadata columns)
    require_variables(ds, ("counts", "zero_fraction"))
    small = None if embedded else _inputs(ds)
    gene_index = selected_genes(ds)
    block_cells = cells_per_block(ds, block_cells)
    client = client if client is not None else current_client()
    threads = sum(client.nthreads().values()) if client is not None else (os.cpu_count() or 1)
    # dense raw size bounds a block's CSR pieces (12 bytes per nonzero at most)
    block_bytes = 12 * block_cells * gene_index.size
    in_flight = max(2, min(2 * threads, IN_FLIGHT_RAW_BYTES // block_bytes))
    params = _export_params("h5ad", block_cells, chunk=H5AD_CHUNK, compression="deflate-1")

    counts = _selected_counts(ds, gene_index, block_cells)
    pieces = counts.to_delayed().ravel()
    name = "h5ad-block-" + tokenize(counts)
    encode = dask.delayed(_h5ad_block, pure=True)
    blocks = [
        encode(piece, i, len(pieces), dask_key_name=(name, i)) for i, piece in enumerate(pieces)
    ]
    shape = (ds.sizes["cell"], int(gene_index.size))

    deflating = ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="h5ad-deflate")
    with written_whole(target, progress=progress) as local, deflating as pool:
        with h5py.File(local, "w", libver="earliest") as f:
            el = _H5Elements(f)
            x_group = _csr_group(el, f, "X", shape)
            layer_group = _csr_group(el, el.group(f, "layers"), ANNDATA_LAYER, shape)
            x_data = _Appendable(x_group, "data", _x_dtype(ds), True, pool)
            layer_data = _Appendable(layer_group, "data", np.float32, False, pool)
            indices = _Appendable(x_group, "indices", np.int32, True, pool)
            indptr = _Appendable(x_group, "indptr", np.int64, True, pool)
            # the layer has X's sparsity: its indices and indptr are the same two datasets (HDF5
            # hard links, which every reader follows), deflated once on this process, not twice
            layer_group["indices"], layer_group["indptr"] = indices.dataset, indptr.dataset
            offset = np.zeros(1, dtype=np.int64)
            indptr.append(offset)
            for i, (data, layer, block_indices, row_nnz) in enumerate(
                export_blocks(
                    blocks,
                    stage="export: h5ad blocks",
                    in_flight=in_flight,
                    client=client,
                    embedded=embedded,
                )
            ):
                x_data.append(data)
                layer_data.append(layer)
                ends = offset[-1] + np.cumsum(row_nnz, dtype=np.int64)
                indices.append(block_indices)
                indptr.append(ends)
                if ends.size:
                    offset = ends[-1:]
                block_written(path, i, len(blocks), progress)
            for dataset in (x_data, layer_data, indices, indptr):
                dataset.close()
            # the rest needs the embedding: the embedded store, once the embed has finished
            if small is None:
                ds = embedded_store(ds, embedded, gene_index)
                small = _inputs(ds)
            _write_annotations(el, small, gene_index, _uns(ds, params))
    return target


# -- AnnData zarr -----------------------------------------------------------------------------

#: the four 1-D arrays a block writes: (group, array) -> which of the block's pieces
_ZARR_SLICES = {
    ("X", "data"): 0,
    (f"layers/{ANNDATA_LAYER}", "data"): 1,
    ("X", "indices"): 2,
    (f"layers/{ANNDATA_LAYER}", "indices"): 2,
}


def _open_slices(root: str) -> dict[tuple[str, str], Any]:
    import zarr

    return {
        key: zarr.open_array(root, path=f"{key[0]}/{key[1]}", mode="r+", zarr_format=ZARR_FORMAT)
        for key in _ZARR_SLICES
    }


def _chunk_span(k: int, chunk: int, total: int) -> tuple[int, int]:
    return k * chunk, min((k + 1) * chunk, total)


def _shared_chunks(start: int, stop: int, chunk: int, total: int) -> list[int]:
    """Chunks that hold values of ``[start, stop)`` and of another block too."""
    if stop <= start:
        return []
    shared = []
    for k in sorted({start // chunk, (stop - 1) // chunk}):
        lo, hi = _chunk_span(k, chunk, total)
        if not (start <= lo and hi <= stop):
            shared.append(k)
    return shared


def _zarr_block(
    counts: np.ndarray,
    index: int,
    n_blocks: int,
    root: str,
    start: int,
    stop: int,
    chunk: int,
    total: int,
) -> dict[int, tuple[int, tuple[np.ndarray, ...]]]:
    """Write the chunks that lie inside this block's slice ``[start, stop)``; return the pieces
    of the shared ones as ``{chunk: (offset in chunk, (data, layer, indices))}``."""
    data, layer, indices, _ = _csr_pieces(counts)
    if data.size != stop - start:
        raise RuntimeError(
            f"block {index}: {data.size} nonzeros now, {stop - start} when they were counted; "
            "the store changed during the export"
        )
    pieces = (data, layer, indices)
    first = -(-start // chunk) * chunk
    last = (stop // chunk) * chunk if stop < total else total
    if first < last:
        arrays = _open_slices(root)
        for key, which in _ZARR_SLICES.items():
            arrays[key][first:last] = pieces[which][first - start : last - start]
    edges = {}
    for k in _shared_chunks(start, stop, chunk, total):
        lo, hi = _chunk_span(k, chunk, total)
        a, b = max(lo, start), min(hi, stop)
        edges[k] = (a - lo, tuple(piece[a - start : b - start] for piece in pieces))
    report("export", 1, n_blocks, block=index)
    return edges


def _zarr_shared_chunk(k: int, root: str, chunk: int, total: int, *edges: dict) -> int:
    """Assemble chunk ``k`` from its blocks' pieces and write it whole (its only writer)."""
    lo, hi = _chunk_span(k, chunk, total)
    buffers = [np.empty(0, np.int32), np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)]
    filled = 0
    for block_edges in edges:
        offset, pieces = block_edges[k]
        if buffers[0].size == 0:  # X's dtype is the store's: int32 counts or float32 values
            buffers[0] = np.empty(hi - lo, pieces[0].dtype)
        for buffer, piece in zip(buffers, pieces, strict=True):
            buffer[offset : offset + piece.size] = piece
        filled += pieces[0].size
    if filled != hi - lo:
        raise RuntimeError(f"zarr chunk {k}: {filled} of {hi - lo} values arrived")
    arrays = _open_slices(root)
    for key, which in _ZARR_SLICES.items():
        arrays[key][lo:hi] = buffers[which]
    return hi - lo


def _done(_edges: dict) -> int:
    return 1


def _zarr_chunk(total: int, block_nnz: np.ndarray) -> int:
    """A power of two near a quarter of the typical block's nonzeros, within the bounds."""
    typical = float(np.median(block_nnz[block_nnz > 0])) if (block_nnz > 0).any() else 0.0
    chunk = 2 ** int(np.floor(np.log2(max(typical / 4, 1))))
    return int(min(max(chunk, ZARR_CHUNK_MIN), ZARR_CHUNK_MAX, max(total, 1)))


def write_anndata_zarr(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    block_cells: int | None = None,
    progress: bool = False,
    client=None,
) -> str:
    """Write the selected genes' counts, log2(x+1), the embedding and the metadata as AnnData zarr.

    Parameters
    ----------
    ds
        A store after the embed stage (:func:`distumap.io.open_store` with ``require="embed"``);
        see :func:`write_h5ad`.
    path
        The target folder (``embedding.zarr``), on a file system the workers share with the
        client. An existing AnnData zarr there is replaced once the new one is complete; any
        other existing path is an error.
    block_cells
        Cells per task. Defaults to the store's cell chunk. The contents do not depend on it.
    progress
        Print a line per pass to stderr.
    client
        The ``distributed.Client`` to compute on; defaults to the current client if there is
        one, else dask's configured (threaded) scheduler.

    Returns
    -------
    str
        ``path``, as given.

    Notes
    -----
    This computes, in two passes over the counts. First the nonzeros of every cell among the
    selected genes (tasks ``anndata-zarr-nnz``), which fix ``indptr`` and where each block's
    values go. Then one task per block (``anndata-zarr-block``) builds the block's CSR pieces
    of ``X`` (int32) and ``layers["log2p1"]`` (float32) and writes them into the zarr arrays
    directly: the chunks that lie inside its slice itself, the (at most two) chunks it shares
    with a neighbour through one small task per shared chunk (``anndata-zarr-edge``), so every
    chunk has exactly one writer. The layout is the one :func:`write_h5ad` writes, in zarr
    format 2 (what anndata 0.12 writes by default; Blosc-zstd compressed, metadata
    consolidated). The folder is written under a temporary name next to the target and renamed
    once complete, so a failure leaves nothing at ``path``. ``anndata.read_zarr`` reads it with
    no arguments.

    Examples
    --------
    >>> ds = distumap.io.open_store("out/store.zarr", require="embed")  # doctest: +SKIP
    >>> distumap.io.write_anndata_zarr(ds, "out/embedding.zarr")  # doctest: +SKIP
    'out/embedding.zarr'
    """
    import zarr

    target = os.fspath(path)
    if is_url(target):
        raise ValueError(
            f"{target}: AnnData zarr is written to a file system path that the workers share"
        )
    check_replaceable(target, "anndata-zarr")
    small = _inputs(ds)
    gene_index = selected_genes(ds)
    block_cells = cells_per_block(ds, block_cells)
    client = client if client is not None else current_client()
    counts = _selected_counts(ds, gene_index, block_cells)
    token = tokenize(counts)
    n_cells = len(small["cell"])
    started = time.perf_counter()

    if progress:
        print("distumap export: counting nonzeros", file=sys.stderr, flush=True)
    row_nnz = counts.map_blocks(
        _row_nnz, drop_axis=1, dtype=np.int64, name=f"anndata-zarr-nnz-{token}"
    )
    row_nnz = np.asarray(
        client.compute(row_nnz).result() if client is not None else row_nnz.compute()
    )
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    total = int(indptr[-1])
    block_starts = [int(s) for s in np.cumsum((0, *counts.chunks[0]))]
    offsets = indptr[block_starts]
    chunk = _zarr_chunk(total, np.diff(offsets))
    params = _export_params("anndata-zarr", block_cells, chunk=chunk, compression="blosc-zstd-3")
    uns = _uns(ds, params)

    local = partial_name(target)
    try:
        root = zarr.open_group(local, mode="w", zarr_format=ZARR_FORMAT)
        el = _ZarrElements(root)
        _write_annotations(el, small, gene_index, uns)
        shape = (n_cells, int(gene_index.size))
        layers = el.group(root, "layers")
        for group, dtype in (
            (_csr_group(el, root, "X", shape), _x_dtype(ds)),
            (_csr_group(el, layers, ANNDATA_LAYER, shape), np.float32),
        ):
            el.empty(group, "data", (total,), dtype, (chunk,))
            el.empty(group, "indices", (total,), np.int32, (chunk,))
            el.empty(group, "indptr", (n_cells + 1,), np.int64, (ZARR_CELL_CHUNK,))[...] = indptr

        pieces = counts.to_delayed().ravel()
        n_blocks = len(pieces)
        write_block = dask.delayed(_zarr_block, pure=True)
        blocks = [
            write_block(
                piece,
                i,
                n_blocks,
                local,
                int(offsets[i]),
                int(offsets[i + 1]),
                chunk,
                total,
                dask_key_name=(f"anndata-zarr-block-{token}", i),
            )
            for i, piece in enumerate(pieces)
        ]
        sharing: dict[int, list[int]] = defaultdict(list)
        for i in range(n_blocks):
            for k in _shared_chunks(int(offsets[i]), int(offsets[i + 1]), chunk, total):
                sharing[k].append(i)
        write_edge = dask.delayed(_zarr_shared_chunk, pure=True)
        done = dask.delayed(_done, pure=True)
        tasks = [
            write_edge(
                k,
                local,
                chunk,
                total,
                *(blocks[i] for i in owners),
                dask_key_name=(f"anndata-zarr-edge-{token}", k),
            )
            for k, owners in sorted(sharing.items())
        ]
        # a tiny result per block, so that no block's pieces are kept as a final result
        tasks += [
            done(block, dask_key_name=(f"anndata-zarr-done-{token}", i))
            for i, block in enumerate(blocks)
        ]
        if progress:
            print(f"distumap export: writing {n_blocks} blocks", file=sys.stderr, flush=True)
        run(tasks, stage="export: anndata zarr blocks", client=client)
        zarr.consolidate_metadata(local, zarr_format=ZARR_FORMAT)
        if os.path.exists(target):
            old = partial_name(target) + ".old"
            os.replace(target, old)
            os.replace(local, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(local, target)
    finally:
        if os.path.exists(local):
            shutil.rmtree(local, ignore_errors=True)
    if progress:
        print(
            f"distumap export: {target} written in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return target

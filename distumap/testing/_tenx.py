"""10x Genomics files of the synthetic counts: Cell Ranger's HDF5 (v2 and v3) and the MEX
folder, optionally with CITE-seq antibody features that readers must leave out."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numba
import numpy as np

from distumap.testing._kernels import NAME_WIDTH, name_bytes
from distumap.testing._synthetic import (
    SyntheticData,
    SyntheticSpec,
    cell_blocks,
    model_of,
    synthetic_gene_ids,
    unpack,
)

#: Cell Ranger's HDF5 settings: gzip level 1 in chunks of 80,000 values
_TENX_CHUNK = 80_000
_TENX_COMPRESSION = 1
_ANTIBODY = "Antibody Capture"


def _antibody_counts(start: int, stop: int, n_antibodies: int) -> np.ndarray:
    cells = np.arange(start, stop, dtype=np.int64)[:, None]
    features = np.arange(n_antibodies, dtype=np.int64)[None, :]
    return ((cells * 7 + features * 3) % 11).astype(np.int32)


def _check_version(version: int, antibody_features: int) -> None:
    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3, got {version!r}")
    if antibody_features and version != 3:
        raise ValueError("antibody features need version 3")


def _feature_blocks(data: SyntheticSpec | SyntheticData, block_cells: int, antibody_features: int):
    """``(start, stop, counts)`` blocks of cells x features: the genes, then the antibodies."""
    for start, stop, block in cell_blocks(data, block_cells):
        if antibody_features:
            block = np.hstack([block, _antibody_counts(start, stop, antibody_features)])
        yield start, stop, block
        del block  # before the next block is made (a caller that deletes its own holds one)


def _features(spec: SyntheticSpec, antibody_features: int):
    """Names, ids and types of the features: the genes, then the antibodies."""
    antibodies = range(1, antibody_features + 1)
    names = np.concatenate([spec.gene_names(), [f"AB{j}_TotalSeqB" for j in antibodies]])
    ids = np.concatenate([synthetic_gene_ids(spec.n_genes), [f"AB{j}" for j in antibodies]])
    types = np.array(["Gene Expression"] * spec.n_genes + [_ANTIBODY] * antibody_features)
    return names, ids, types


def write_10x_h5(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    version: Literal[2, 3] = 3,
    genome: str = "GRCh38",
    antibody_features: int = 0,
    block_cells: int = 4096,
) -> Path:
    """Write a 10x Cell Ranger ``filtered_feature_bc_matrix.h5``, block by block.

    Parameters
    ----------
    path
        Output file.
    data
        A spec (generated block by block, with flat memory, for any size) or in-memory data.
    version
        3: ``/matrix`` with ``features/{name,id,feature_type,genome}``; 2: one group named
        ``genome`` with ``genes`` and ``gene_names``.
    genome
        The genome name (v2 group name, v3 ``features/genome``).
    antibody_features
        v3 only: this many ``Antibody Capture`` features after the genes, with small
        deterministic counts (a CITE-seq run), which readers must leave out.
    block_cells
        Cells per block; bounds memory and does not change the file.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    The layout is Cell Ranger's: CSC genes x barcodes (``indptr`` over barcodes), ``data``
    int32, ``indices`` and ``indptr`` int64, ``shape`` int32, fixed-width byte strings, gzip
    level 1 in chunks of 80,000 values, extendible datasets appended block by block.

    Examples
    --------
    >>> write_10x_h5(tmp_path / "filtered.h5", SyntheticSpec(1_000, 200))  # doctest: +SKIP
    """
    import h5py

    _check_version(version, antibody_features)
    spec, _ = unpack(data)
    path = Path(path)
    with h5py.File(path, "w") as file:
        file.attrs["filetype"] = "matrix"
        file.attrs["library_ids"] = np.array([b"LKTX"])
        file.attrs["chemistry_description"] = "Single Cell 3' v3"
        group = file.create_group("matrix" if version == 3 else genome)
        options = dict(compression="gzip", compression_opts=_TENX_COMPRESSION)
        columns = _csc_datasets(group, spec.n_cells, options)
        indptr = _append_blocks(columns, data, block_cells, antibody_features)
        group.create_dataset("indptr", data=indptr, **options)
        n_features = spec.n_genes + antibody_features
        group.create_dataset("shape", data=np.array([n_features, spec.n_cells], dtype=np.int32))
        _write_h5_features(group, spec, version, genome, antibody_features)
    return path


def _csc_datasets(group, n_cells: int, options: dict):
    """The extendible ``data`` and ``indices`` datasets of the features x barcodes CSC matrix,
    and ``barcodes``."""
    values = group.create_dataset(
        "data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_TENX_CHUNK,),
        **options,
    )  # fmt: skip
    indices = group.create_dataset(
        "indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_TENX_CHUNK,),
        **options,
    )  # fmt: skip
    barcodes = group.create_dataset("barcodes", shape=(n_cells,), dtype=f"S{NAME_WIDTH}", **options)
    return values, indices, barcodes


def _append_blocks(
    columns, data: SyntheticSpec | SyntheticData, block_cells: int, antibody_features: int
) -> np.ndarray:
    """Append the cells block by block to the ``columns`` of :func:`_csc_datasets`; returns
    ``indptr``."""
    values, indices, barcodes = columns
    spec, _ = unpack(data)
    indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
    nnz = 0
    for start, stop, block in _feature_blocks(data, block_cells, antibody_features):
        cells, features = np.nonzero(block)  # row-major: each cell's features in order
        values.resize((nnz + cells.size,))
        indices.resize((nnz + cells.size,))
        values[nnz:] = block[cells, features]
        indices[nnz:] = features
        indptr[start + 1 : stop + 1] = nnz + np.cumsum(np.bincount(cells, minlength=stop - start))
        nnz += cells.size
        barcodes[start:stop] = name_bytes(start, stop, model_of(spec).seed_key).view(
            f"S{NAME_WIDTH}"
        )[:, 0]
        del block, cells, features
    return indptr


def _write_h5_features(
    group, spec: SyntheticSpec, version: int, genome: str, antibody_features: int
) -> None:
    """v3: the ``features`` group; v2: ``genes`` (ids) and ``gene_names``."""
    names, ids, types = _features(spec, antibody_features)
    options = dict(compression="gzip", compression_opts=_TENX_COMPRESSION)
    as_bytes = np.char.encode
    if version == 3:
        features_group = group.create_group("features")
        features_group.create_dataset("name", data=as_bytes(names), **options)
        features_group.create_dataset("id", data=as_bytes(ids), **options)
        features_group.create_dataset("feature_type", data=as_bytes(types), **options)
        genomes = np.full(spec.n_genes + antibody_features, genome)
        features_group.create_dataset("genome", data=as_bytes(genomes), **options)
        features_group.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    else:
        group.create_dataset("genes", data=as_bytes(ids), **options)
        group.create_dataset("gene_names", data=as_bytes(names), **options)


@numba.njit(inline="always")
def _put_uint(buffer, position, value):
    digits = 1
    rest = value // 10
    while rest > 0:
        rest //= 10
        digits += 1
    for j in range(digits - 1, -1, -1):
        buffer[position + j] = 48 + value % 10
        value //= 10
    return position + digits


@numba.njit(cache=True, nogil=True)
def _format_triplets(first, second, third, buffer):
    # "<first> <second> <third>\n" per entry, all non-negative integers
    position = 0
    for k in range(first.size):
        position = _put_uint(buffer, position, first[k])
        buffer[position] = 32
        position = _put_uint(buffer, position + 1, second[k])
        buffer[position] = 32
        position = _put_uint(buffer, position + 1, third[k])
        buffer[position] = 10
        position += 1
    return position


def _mtx_lines(genes: np.ndarray, cells: np.ndarray, values: np.ndarray) -> memoryview:
    width = sum(len(str(int(part.max()))) if part.size else 1 for part in (genes, cells, values))
    buffer = np.empty(genes.size * (width + 3), dtype=np.uint8)
    written = _format_triplets(
        genes.astype(np.int64), cells.astype(np.int64), values.astype(np.int64), buffer
    )
    return memoryview(buffer)[:written]


def write_mex(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    gzip: bool = True,
    version: Literal[2, 3] = 3,
    antibody_features: int = 0,
    block_cells: int = 4096,
) -> Path:
    """Write a 10x MEX folder: ``matrix.mtx``, ``features.tsv`` or ``genes.tsv``, ``barcodes.tsv``.

    Parameters
    ----------
    folder
        Created if missing.
    data
        A spec or in-memory data. A spec is generated twice (the header needs the number of
        entries first), block by block.
    gzip
        Compress all three files (``.gz``), as Cell Ranger 3+ does.
    version
        3: ``features.tsv`` with ``id, name, Gene Expression``; 2: ``genes.tsv`` with ``id, name``.
    antibody_features
        Version 3: this many ``Antibody Capture`` features after the genes (see
        :func:`write_10x_h5`).
    block_cells
        Cells per block.

    Returns
    -------
    Path
        The folder.

    Notes
    -----
    ``%%MatrixMarket matrix coordinate integer general``, a ``%metadata_json`` comment, the size
    line ``genes cells entries``, then ``gene cell count`` lines (1-based) sorted by cell and
    gene within a cell: Cell Ranger's order.

    Examples
    --------
    >>> write_mex(tmp_path / "filtered", synthetic_counts(100, 30), gzip=False)  # doctest: +SKIP
    """
    import gzip as gzip_module

    _check_version(version, antibody_features)
    spec, _ = unpack(data)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzip else ""

    def sink(name: str):
        path = folder / (name + suffix)
        if gzip:
            return gzip_module.GzipFile(path, "wb", compresslevel=1, mtime=0)
        return open(path, "wb")

    blocks = functools.partial(_feature_blocks, data, block_cells, antibody_features)
    nnz = sum(int(np.count_nonzero(block)) for _, _, block in blocks())
    with sink("matrix.mtx") as out:
        _write_mtx(out, spec, blocks, nnz, antibody_features)
    names, ids, types = _features(spec, antibody_features)
    with sink("features.tsv" if version == 3 else "genes.tsv") as out:
        if version == 3:
            rows = zip(ids, names, types, strict=True)
            out.write("".join(f"{i}\t{n}\t{t}\n" for i, n, t in rows).encode())
        else:
            out.write("".join(f"{i}\t{n}\n" for i, n in zip(ids, names, strict=True)).encode())
    with sink("barcodes.tsv") as out:
        for start in range(0, spec.n_cells, max(1, block_cells)):
            stop = min(start + block_cells, spec.n_cells)
            out.write("".join(name + "\n" for name in spec.cell_names(start, stop)).encode())
    return folder


def _write_mtx(out, spec: SyntheticSpec, blocks, nnz: int, antibody_features: int) -> None:
    """The Matrix Market text: header, size line, then the entries of ``blocks()`` in order."""
    n_features = spec.n_genes + antibody_features
    out.write(b"%%MatrixMarket matrix coordinate integer general\n")
    out.write(b'%metadata_json: {"software_version": "cellranger-7.1.0", "format_version": 2}\n')
    out.write(f"{n_features} {spec.n_cells} {nnz}\n".encode())
    for start, _, block in blocks():
        cells, features = np.nonzero(block)
        out.write(_mtx_lines(features + 1, cells + start + 1, block[cells, features]))

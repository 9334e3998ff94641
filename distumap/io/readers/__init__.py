"""One reader per input format, each registered where it is defined.

A reader knows one format: how many cells and genes it holds, their names, the cells' metadata and
how to turn one cell range into a dense int32 (or float32) block (:class:`Reader`). Importing this
package imports every format's module, which registers its reader; :func:`names` (the CLI's
``--format`` choices), :data:`FORMATS`, :func:`detect_format` and :func:`open_reader` all come from
that one registry. A new format is one new module here, imported below.

Examples
--------
>>> reader = open_reader("pbmc_10k_v3.h5")  # doctest: +SKIP
>>> reader.format, reader.n_cells, reader.n_genes  # doctest: +SKIP
('10x-h5', 11769, 33538)
>>> block = reader.read(0, 1000)  # doctest: +SKIP
"""

from __future__ import annotations

import os

from distumap._errors import InputError
from distumap._paths import exists, isdir

# every format's module: importing it registers its reader
from distumap.io.readers import anndata, csv, loom, mex, tenx_h5
from distumap.io.readers._base import Reader, registered
from distumap.io.readers.anndata import AnnDataReader, AnnDataZarrReader
from distumap.io.readers.csv import CsvReader
from distumap.io.readers.loom import LoomReader
from distumap.io.readers.mex import MexIndexBlock, MexReader
from distumap.io.readers.tenx_h5 import TenxH5Reader

__all__ = [
    "FORMATS",
    "AnnDataReader",
    "AnnDataZarrReader",
    "CsvReader",
    "LoomReader",
    "MexIndexBlock",
    "MexReader",
    "Reader",
    "TenxH5Reader",
    "anndata",
    "csv",
    "detect_format",
    "loom",
    "mex",
    "names",
    "open_reader",
    "reader_class",
    "tenx_h5",
]


def names() -> tuple[str, ...]:
    """Every format the ingest reads, by the name ``--format`` takes."""
    return tuple(cls.format for cls in registered())


#: the formats :func:`open_reader` knows, by the name ``--format`` takes
FORMATS = tuple(cls.format for cls in registered(standalone=True))


def reader_class(source: str, format: str = "auto", *, standalone: bool = False) -> type[Reader]:
    """The reader class for ``source``: the one named by ``format``, or (``"auto"``) the first
    registered reader whose :meth:`~Reader.guess_can_open` says yes. With ``standalone``, only
    the readers :func:`open_reader` hands out."""
    candidates = registered(standalone=True) if standalone else registered()
    known = {cls.format: cls for cls in candidates}
    if format != "auto":
        if format not in known:
            raise InputError(f"unknown format {format!r}; expected one of {', '.join(known)}")
        return known[format]
    for cls in candidates:
        if cls.guess_can_open(source):
            return cls
    if isdir(source):
        raise InputError(
            f"{source}: a folder that is neither a 10x MEX folder (matrix.mtx[.gz]) nor an "
            "AnnData zarr group (encoding-type 'anndata', or X, obs and var)"
        )
    if not exists(source):
        raise InputError(f"{source}: no such file or folder")
    raise InputError(
        f"{source}: cannot tell the format from the name; pass --format with one of "
        f"{', '.join(FORMATS)} (CSV and TSV go through the CSV ingest)"
    )


def detect_format(source: str) -> str:
    """The reader format for ``source`` (see :func:`open_reader`)."""
    return reader_class(os.fspath(source), standalone=True).format


def open_reader(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    layer: str | None = None,
    dtype: str = "int32",
) -> Reader:
    """The reader for one input.

    Parameters
    ----------
    source
        File or folder, path or fsspec URL.
    format
        ``"auto"`` detects it: each registered reader is asked in turn whether the source looks
        like its format, by content first (a folder with ``matrix.mtx[.gz]`` is MEX, a zarr
        folder whose root says ``encoding-type: anndata`` or holds ``X``, ``obs`` and ``var`` is
        AnnData zarr, an HDF5 file that holds obs/var is AnnData, one with loom's attributes
        loom, any other 10x Cell Ranger),
        then by name (``.h5ad``, ``.loom``, ``.h5``, ``.mtx``). Or one of :data:`FORMATS`.
    layer
        A layer instead of the main matrix (AnnData, loom; a genome for 10x v2 files).
    dtype
        ``"int32"`` (counts) or ``"float32"``.

    Returns
    -------
    Reader

    Raises
    ------
    InputError
        The source is missing, its format unknown, or the file is broken.

    Examples
    --------
    >>> reader = open_reader("filtered_feature_bc_matrix")  # doctest: +SKIP
    >>> reader.format
    'mex'
    """
    source = os.fspath(source)
    return reader_class(source, format, standalone=True)(source, layer=layer, dtype=dtype)

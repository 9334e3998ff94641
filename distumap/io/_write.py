"""One entry point for every export format: the writer comes from the output's name."""

from __future__ import annotations

import os
from collections.abc import Callable

import xarray as xr

from distumap._errors import InputError
from distumap._format import EXPORT_FORMATS
from distumap.io._anndata import write_anndata_zarr, write_h5ad
from distumap.io._export import write_loom

#: the writer of each export kind (see ``distumap._format.EXPORT_FORMATS``)
WRITERS: dict[str, Callable[..., str]] = {
    "loom": write_loom,
    "h5ad": write_h5ad,
    "anndata-zarr": write_anndata_zarr,
}


def export_kind(path: str | os.PathLike) -> str:
    """The export kind that ``path``'s suffix names (``.loom``, ``.h5ad``, ``.zarr``).

    Raises
    ------
    InputError
        The suffix names no format distumap writes.
    """
    name = os.fspath(path).rstrip("/")
    for suffix, kind in EXPORT_FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise InputError(
        f"{name}: the export format comes from the name; use one of {', '.join(EXPORT_FORMATS)}"
    )


def write(ds: xr.Dataset, path: str | os.PathLike, *, progress: bool = False, **options) -> str:
    """Export a finished store in the format that ``path``'s name says.

    Parameters
    ----------
    ds
        A store after the embed stage (:func:`distumap.io.open_store` with ``require="embed"``).
    path
        ``*.loom`` (loom), ``*.h5ad`` (AnnData HDF5) or ``*.zarr`` (AnnData zarr); a local path
        or an fsspec URL.
    progress
        Report progress on stderr.
    **options
        Passed to the writer (``block_cells``, ``client``; ``embedded`` for loom and h5ad: a
        ``concurrent.futures.Future`` of the embedded store, ``ds`` then only preprocessed).

    Returns
    -------
    str
        ``path``.

    Notes
    -----
    This computes: see :func:`write_loom`, :func:`write_h5ad` and :func:`write_anndata_zarr`.

    Examples
    --------
    >>> distumap.io.write(ds, "out/embedding.h5ad")  # doctest: +SKIP
    'out/embedding.h5ad'
    """
    return WRITERS[export_kind(path)](ds, path, progress=progress, **options)

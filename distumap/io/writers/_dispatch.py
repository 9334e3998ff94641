"""One entry point for every export format: the writer comes from the output's name."""

from __future__ import annotations

import os

import xarray as xr

from distumap import _memory
from distumap._errors import InputError
from distumap._progress import report_status
from distumap.io.writers._base import Writer, registered_writers

# isort: off
# the formats register as they are imported, in the order the suffixes are listed to users
from distumap.io.writers import loom  # noqa: F401
from distumap.io.writers import h5ad  # noqa: F401
from distumap.io.writers import anndata_zarr  # noqa: F401

# isort: on


def export_suffixes() -> dict[str, str]:
    """Every output suffix a writer claims, and the name of that writer (``".loom": "loom"``)."""
    return {
        suffix: writer.name
        for writer in registered_writers().values()
        for suffix in writer.suffixes
    }


def writer_named(name: str) -> Writer:
    """The registered writer of export kind ``name`` (``"loom"``, ``"h5ad"``, ...)."""
    writers = registered_writers()
    if name not in writers:
        raise ValueError(f"no writer is named {name!r}; there are {', '.join(writers)}")
    return writers[name]


def export_kind(path: str | os.PathLike) -> str:
    """The export kind that ``path``'s suffix names (``.loom``, ``.h5ad``, ``.zarr``).

    Raises
    ------
    InputError
        The suffix names no format distumap writes.
    """
    name = os.fspath(path).rstrip("/")
    suffixes = export_suffixes()
    for suffix, kind in suffixes.items():
        if name.endswith(suffix):
            return kind
    raise InputError(
        f"{name}: the export format comes from the name; use one of {', '.join(suffixes)}"
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
        Passed to the writer (``block_cells``, ``client``; ``embedded`` for a writer that
        ``takes_embedded``, loom and h5ad: a ``concurrent.futures.Future`` of the embedded
        store, ``ds`` then only preprocessed).

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
    kind = export_kind(path)
    _memory.check_client(ds.sizes["cell"], "export")
    # the file's row on the dashboard runs from here to the end, after its last block too
    report_status("export", "started", step=kind)
    try:
        written = writer_named(kind).write(ds, path, progress=progress, **options)
    except BaseException:
        report_status("export", "failed", step=kind)
        raise
    report_status("export", "complete", step=kind)
    return written

"""The zarr store: opening it as an xarray Dataset, stage records, per-block markers, groups.

The layout itself is written down in :mod:`distumap._format`. Stage records live in the root
group's attributes; per-block markers live in the ``_progress`` subgroup, which xarray does not
show, so that a block written once is never written again and a half-written stage never looks
finished. Metadata is consolidated whenever a stage record changes, so that
``xarray.open_zarr(store)`` opens the store with no warning; distumap itself always reads the
live metadata.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from distumap import __name__ as _pkg
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import ATTR, FORMAT_VERSION, PROGRESS_GROUP, STAGE_ORDER, stages
from distumap._paths import absolute

_MISSING = (
    FileNotFoundError,
    zarr.errors.GroupNotFoundError,
    zarr.errors.NodeNotFoundError,
    KeyError,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_pkg)
    except PackageNotFoundError:  # a source tree
        return "0.0.0+unknown"


def store_url(store: str | os.PathLike) -> str:
    """The store's location as a string: an absolute local path or an fsspec URL."""
    return absolute(store)


def _open_group(store: str | os.PathLike, mode: str = "r") -> zarr.Group:
    # the live metadata, never the consolidated copy, which lags behind a stage's own writes
    return zarr.open_group(store_url(store), mode=mode, use_consolidated=False)


def read_attrs(store: str | os.PathLike) -> dict[str, Any]:
    """The store's root attributes (``{}`` if there is no store)."""
    try:
        return dict(_open_group(store).attrs)
    except _MISSING:
        return {}


def is_store(store: str | os.PathLike) -> bool:
    """Whether a distumap store is at ``store``: a zarr group carrying distumap's attribute."""
    return ATTR in read_attrs(store)


def occupied(location: str | os.PathLike) -> bool:
    """Whether a file or a non-empty folder is at ``location``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(store_url(location))
    try:
        return fs.isfile(path) or bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def consolidate(store: str | os.PathLike) -> None:
    """Consolidate the store's metadata, so ``xarray.open_zarr(store)`` opens it quietly."""
    with warnings.catch_warnings():
        # zarr: consolidated metadata is not (yet) part of the zarr 3 spec; xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store_url(store))


def stage_record(store: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The record of stage ``name`` in the store: ``{"status": ..., "params": ...}`` or None."""
    return stages(read_attrs(store)).get(name)


def mark_stage(
    store: str | os.PathLike, name: str, status: str, params: dict[str, Any], **info: Any
) -> None:
    """Record stage ``name`` as ``status`` ("started" or "complete") with its parameters.

    ``params`` decide whether a re-run may skip or resume the stage; ``info`` (timings, counts)
    is recorded beside them for provenance.

    Starting a stage invalidates the stages after it, since they were computed from older data.
    """
    group = _open_group(store, mode="r+")
    record = dict(group.attrs.get(ATTR, {}))
    record.setdefault("format", FORMAT_VERSION)
    record["version"] = _version()
    done = dict(record.get("stages", {}))
    done[name] = {"status": status, "params": params, **info}
    if status == "started" and name in STAGE_ORDER:
        for later in STAGE_ORDER[STAGE_ORDER.index(name) + 1 :]:
            done.pop(later, None)
    record["stages"] = done
    group.attrs[ATTR] = record
    consolidate(store)


def require_stage(store: str | os.PathLike, name: str, *, needed_by: str) -> None:
    """Raise :class:`IncompleteStoreError` unless stage ``name`` finished in ``store``."""
    attrs = read_attrs(store)
    if not attrs:
        raise InputError(f"{store_url(store)}: no distumap store here")
    if ATTR not in attrs:
        raise InputError(f"{store_url(store)}: not a distumap store (no {ATTR!r} attribute)")
    record = stages(attrs).get(name)
    if record is None or record.get("status") != "complete":
        state = "was not run" if record is None else "is incomplete"
        raise IncompleteStoreError(
            f"{store_url(store)}: the {name} stage {state}; {needed_by} needs it. "
            f"Run `distumap {name}` (it resumes where it stopped)."
        )


def progress_array(store: str | os.PathLike, name: str, mode: str = "r+") -> zarr.Array:
    """The per-block marker array ``_progress/<name>``."""
    return zarr.open_array(store_url(store), path=f"{PROGRESS_GROUP}/{name}", mode=mode)


def create_progress(
    store: str | os.PathLike, name: str, data: np.ndarray, *, chunks: int | None = None
) -> zarr.Array:
    """Create (or replace) ``_progress/<name>`` holding ``data``; markers use chunks of one."""
    group = _open_group(store, mode="r+")
    sub = group.require_group(PROGRESS_GROUP)
    array = sub.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(chunks or max(1, data.shape[0]),),
        fill_value=False if data.dtype == bool else 0,
        overwrite=True,
    )
    array[...] = data
    return array


def open_store(store: str | os.PathLike, *, require: str | None = "ingest") -> xr.Dataset:
    """Open a distumap store as an :class:`xarray.Dataset`.

    Parameters
    ----------
    store
        Path or fsspec URL of the zarr store.
    require
        A stage that must have finished (default ``"ingest"``); ``None`` opens anything.

    Returns
    -------
    xarray.Dataset
        Everything along ``cell`` stays lazy (dask, read block by block where it is used):
        the matrices, ``X_umap``, the cell names and the metadata coordinates, so that opening
        a store of ten million cells holds nothing per cell. The other one-dimensional
        variables (genes, per-gene statistics) are small and are loaded. ``gene`` carries an
        index (``ds.sel(gene="GAD1")``); ``cell`` carries none, since building it reads every
        cell's name: ``ds.set_xindex("cell")`` builds it when you need ``ds.sel(cell=...)``.

    Raises
    ------
    IncompleteStoreError
        The required stage did not finish.

    Examples
    --------
    >>> ds = distumap.io.open_store("out/store.zarr")  # doctest: +SKIP
    >>> ds.counts.shape  # doctest: +SKIP
    (76533, 50281)
    >>> ds.set_xindex("cell").sel(cell="AAACCCAAGGATTTCC-1")  # doctest: +SKIP
    """
    if require is not None:
        require_stage(store, require, needed_by="this step")
    url = store_url(store)
    ds = xr.open_zarr(url, consolidated=False, drop_variables=["cell"])
    # zarr 3 hands strings back as numpy's StringDType, which pandas, bokeh and h5py do not all
    # take yet; plain object strings work everywhere
    per_cell, small = {}, {}
    for name, variable in ds.variables.items():
        if "cell" in variable.dims:
            if variable.dtype.kind == "T":
                per_cell[name] = variable.copy(data=_lazy_text(variable.data))
        elif variable.ndim == 1:
            small[name] = variable
    # per-gene values: small reads, done here, never waiting on a cluster's workers
    with dask.config.set(scheduler="threads"):
        for variable in small.values():
            variable.load()
    text = {
        name: (var.dims, np.asarray(var.values, dtype=object), var.attrs)
        for name, var in small.items()
        if var.dtype.kind == "T"
    }
    ds = ds.assign_coords({k: v for k, v in text.items() if k in ds.coords})
    ds = ds.assign({k: v for k, v in per_cell.items() if k not in ds.coords})
    # the cell coordinates without an index: an index would read every name now (a store
    # without names is left for check_store to report)
    coords = {k: v for k, v in per_cell.items() if k in ds.coords}
    if "cell" in _open_group(url):
        names = da.from_zarr(zarr.open_array(url, path="cell", mode="r"))
        coords["cell"] = xr.Variable("cell", _lazy_text(names))
    ds = ds.assign_coords(xr.Coordinates(coords, indexes={}))
    ds.encoding["distumap_store"] = url
    return ds


def _text_block(block: np.ndarray) -> np.ndarray:
    return np.asarray(block, dtype=object)


def _lazy_text(data: da.Array) -> da.Array:
    """A per-cell text array, lazy, read as object strings block by block."""
    if data.dtype.kind == "O":
        return data
    return data.map_blocks(_text_block, dtype=object, name=f"open-store-text-{tokenize(data)}")


def cell_coords(ds: xr.Dataset) -> xr.Coordinates:
    """``ds``'s coordinates along ``cell`` (names and metadata), for a new array along ``cell``:
    lazy and index-free as :func:`open_store` opens them, so that building the array reads
    no cell's name (an index ``ds`` has on ``cell`` comes along)."""
    names = [name for name, coord in ds.coords.items() if coord.dims == ("cell",)]
    return ds.coords.to_dataset()[names].coords


def write_group(
    store: str | os.PathLike, path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]
) -> None:
    """Write a group of plain arrays and JSON attributes at ``path`` inside ``store`` (``""``:
    the root of a new zarr group there), replacing any group at ``path``.

    The attributes go in last, so a reader that finds them finds every array.
    """
    if path:
        group = zarr.open_group(store_url(store), mode="a", use_consolidated=False)
        sub = group.create_group(path, overwrite=True)
    else:
        sub = zarr.open_group(store_url(store), mode="w")
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        sub.create_array(name, shape=value.shape, dtype=value.dtype, chunks=value.shape or None)
        sub[name][...] = value
    sub.attrs.update(attrs)


def read_group(store: str | os.PathLike, path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and attributes of the subgroup ``path`` (raises FileNotFoundError if absent)."""
    try:
        sub = zarr.open_group(store_url(store), path=path, mode="r", use_consolidated=False)
    except (*_MISSING, zarr.errors.ContainsArrayError):
        raise FileNotFoundError(f"{store_url(store)}: no group {path!r}") from None
    arrays = {name: np.asarray(array[...]) for name, array in sub.arrays()}
    return arrays, dict(sub.attrs)


def store_of(ds: xr.Dataset, store: str | os.PathLike | None = None) -> str:
    """The store behind ``ds`` (as opened by :func:`open_store`), or ``store`` if given."""
    if store is not None:
        return store_url(store)
    try:
        return ds.encoding["distumap_store"]
    except KeyError:
        raise InputError(
            "this Dataset was not opened with distumap.io.open_store; pass store=..."
        ) from None


def write_variables(store: str | os.PathLike, variables: xr.Dataset, **to_zarr: Any) -> Any:
    """Add ``variables`` to the store (xarray's append mode) keeping the store's attributes,
    which xarray would otherwise replace with ``variables.attrs``."""
    variables = variables.copy()
    variables.attrs = read_attrs(store)
    written = variables.to_zarr(store_url(store), mode="a", consolidated=False, **to_zarr)
    consolidate(store)
    return written


def drop_arrays(store: str | os.PathLike, names: list[str]) -> None:
    """Delete the arrays ``names`` from the store where they exist."""
    group = zarr.open_group(store_url(store), mode="r+")
    removed = False
    for name in names:
        if name in group:
            del group[name]
            removed = True
    if removed:
        consolidate(store)


def codec_of(store: str | os.PathLike, name: str = "counts") -> dict[str, Any]:
    """The compressors of array ``name``, as an xarray ``encoding`` entry, so that an array
    derived from it (a cache of some of its genes) is compressed the same way."""
    return {"compressors": list(zarr.open_array(store_url(store), path=name, mode="r").compressors)}

"""HDF5 and zarr node access for the readers, with errors that name the file and the dataset."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from distumap._errors import InputError
from distumap._paths import is_local, local_path, open_raw
from distumap.io.readers._base import as_strings

#: the first bytes of every HDF5 file
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@contextlib.contextmanager
def open_hdf5(source: str) -> Iterator[h5py.File]:
    """The HDF5 file, read-only (a local path through h5py's own driver, a URL through fsspec)."""
    handle = None
    try:
        if is_local(source):
            file = h5py.File(local_path(source), "r")
        else:
            handle = open_raw(source)
            file = h5py.File(handle, "r")
    except FileNotFoundError as exc:
        raise InputError(f"{source}: no such file") from exc
    except (OSError, ValueError) as exc:
        if handle is not None:
            handle.close()
        raise InputError(
            f"{source}: not a readable HDF5 file (truncated or corrupt?): {exc}"
        ) from exc
    try:
        with damaged(source):
            yield file
    finally:
        file.close()
        if handle is not None:
            handle.close()


@contextlib.contextmanager
def damaged(source: str) -> Iterator[None]:
    """Turn what the storage library raises on a damaged file (h5py's KeyError for an object
    header overwritten, OSError for a chunk cut short, numcodecs' RuntimeError for a chunk that
    does not decompress) into an InputError that names the file: one line, exit 2."""
    try:
        yield
    except InputError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        message = str(exc).strip("'\"") or type(exc).__name__
        raise InputError(f"{source}: cannot read (damaged or truncated?): {message}") from exc


def node_name(node: Any) -> str:
    name = getattr(node, "name", None) or getattr(node, "path", "") or ""
    return name if name.startswith("/") else "/" + name


def is_group(node: Any) -> bool:
    return hasattr(node, "keys") and not hasattr(node, "shape")


def child(group: Any, key: str, source: str) -> Any:
    try:
        if key in group:
            return group[key]
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: {node_name(group)}/{key}: cannot read ({exc})") from exc
    where = node_name(group).rstrip("/")
    raise InputError(f"{source}: missing dataset {where}/{key}")


def load(node: Any, source: str, selection: Any = ()) -> np.ndarray:
    """``node[selection]`` as numpy; unreadable data (a truncated file) is an InputError."""
    try:
        return np.asarray(node[selection])
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{source}: dataset {node_name(node)}: cannot read ({exc})") from exc


def load_strings(
    node: Any, source: str, *, unescape: bool = False, part: slice | None = None
) -> np.ndarray:
    """A string dataset (or ``part`` of it) as an object array of ``str``."""
    selection = () if part is None else part
    if isinstance(node, h5py.Dataset) and h5py.check_string_dtype(node.dtype) is not None:
        try:
            values = node.asstr(errors="replace")[selection]
        except (OSError, ValueError) as exc:
            raise InputError(f"{source}: dataset {node_name(node)}: cannot read ({exc})") from exc
    else:
        values = load(node, source, selection)
    strings = as_strings(values)
    if unescape:  # loompy writes non-ASCII characters as XML character references
        for i, value in enumerate(strings):
            if "&#" in value:
                strings[i] = html.unescape(value)
    return strings


def attr(node: Any, key: str, default: Any = None) -> Any:
    value = node.attrs.get(key, default)
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value[()]
    return value


def check_length(node: Any, expected: int, what: str, source: str) -> None:
    if len(node.shape) != 1 or node.shape[0] != expected:
        raise InputError(
            f"{source}: dataset {node_name(node)} has shape {tuple(node.shape)}, expected "
            f"{expected} {what}"
        )


def check_indptr(indptr: np.ndarray, nnz: int, where: str, source: str) -> None:
    if indptr.size == 0 or indptr[0] != 0:
        raise InputError(f"{source}: dataset {where}: indptr must start at 0")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        position = int(np.argmax(steps < 0)) + 1
        raise InputError(
            f"{source}: dataset {where}: indptr is not monotone at position {position} "
            f"({int(indptr[position - 1])} then {int(indptr[position])})"
        )
    if indptr[-1] != nnz:
        raise InputError(
            f"{source}: dataset {where}: indptr ends at {int(indptr[-1])}, but data holds "
            f"{nnz} values"
        )


def major_slice(
    group: Any, start: int, stop: int, n_minor: int, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``indptr`` (from 0), minor indices and values of majors ``[start, stop)``; only that
    slice of ``data`` and ``indices`` is read."""
    indptr_node = child(group, "indptr", source)
    indptr = load(indptr_node, source, slice(start, stop + 1)).astype(np.int64)
    where = node_name(indptr_node)
    if indptr.size != stop - start + 1:
        raise InputError(f"{source}: dataset {where}: shorter than the matrix's shape says")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        position = start + int(np.argmax(steps < 0)) + 1
        raise InputError(
            f"{source}: dataset {where}: indptr is not monotone at position {position}"
        )
    low, high = int(indptr[0]), int(indptr[-1])
    data_node = child(group, "data", source)
    indices_node = child(group, "indices", source)
    if low < 0 or high > data_node.shape[0] or high > indices_node.shape[0]:
        raise InputError(
            f"{source}: dataset {where}: indptr points to [{low}, {high}), outside the "
            f"{data_node.shape[0]} stored values"
        )
    indices = load(indices_node, source, slice(low, high))
    values = load(data_node, source, slice(low, high))
    if indices.size and (indices.min() < 0 or indices.max() >= n_minor):
        bad = int(np.argmax((indices < 0) | (indices >= n_minor)))
        raise InputError(
            f"{source}: dataset {node_name(indices_node)}: index {int(indices[bad])} at "
            f"position {low + bad} is out of range (0 to {n_minor - 1})"
        )
    return indptr - low, indices.astype(np.int64, copy=False), values


# ---------------------------------------------------------------------------------------------
# what an HDF5 file holds, for the readers' detection


def is_hdf5(source: str) -> bool:
    """Whether ``source`` is a readable file that starts with HDF5's magic number."""
    try:
        with open_raw(source) as file:
            return file.read(8) == HDF5_MAGIC
    except (OSError, ValueError):
        return False


def hdf5_root(source: str) -> tuple[set[str], str | None] | None:
    """The root's member names and ``encoding-type`` attribute of an HDF5 file, None when
    ``source`` is no HDF5 file (a broken one raises, naming it)."""
    if not is_hdf5(source):
        return None
    with open_hdf5(source) as file:
        return set(file.keys()), attr(file, "encoding-type")


def anndata_layout(root: tuple[set[str], str | None]) -> bool:
    """Whether an HDF5 root (:func:`hdf5_root`) is AnnData's: its encoding says so, or it holds
    ``obs`` and ``var`` (as anndata before 0.7 wrote it)."""
    return root[1] == "anndata" or {"obs", "var"} <= root[0]


def loom_layout(root: tuple[set[str], str | None]) -> bool:
    """Whether an HDF5 root (:func:`hdf5_root`) is loom's: row and column attributes."""
    return {"row_attrs", "col_attrs"} <= root[0]

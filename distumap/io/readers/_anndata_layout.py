"""Where an AnnData file (``.h5ad`` or zarr) keeps its frames and matrices, in every layout anndata
wrote: the current encodings, anndata 0.7's (codes that point to ``__categories/NAME``, a zarr root
without ``encoding-type``) and the one before 0.7 (``obs`` and ``var`` as compound datasets,
categories under ``uns/<column>_categories``, ``raw.X`` and ``raw.var`` at the root).

It also says what each matrix holds, from a bounded sample of its stored values, so that an ingest
of counts can pick the matrix that holds them before it starts.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from distumap._errors import InputError
from distumap.io.readers._base import ROUNDING_TOLERANCE, as_strings
from distumap.io.readers._hdf5 import attr, child, is_group, load, load_strings, node_name

#: stored values of each matrix looked at to tell what it holds (integer counts, fractional...)
SAMPLE_VALUES = 4096
#: what ``--layer`` names the counts in ``.raw`` by (``raw`` and ``raw/X`` alike)
RAW_NAMES = ("raw", "raw/X")
#: what a matrix holds, from :func:`matrix_kind`
INTEGER, FRACTIONAL, NEGATIVE, NOT_NUMBERS = (
    "integer counts",
    "fractional values",
    "negative values",
    "values that are not finite numbers",
)


# ---------------------------------------------------------------------------------------------
# frames: obs and var


def is_compound(node: Any) -> bool:
    """Whether ``node`` is a frame written before anndata 0.7: one compound (structured) dataset."""
    dtype = getattr(node, "dtype", None)
    return not is_group(node) and dtype is not None and dtype.names is not None


def decode_column(node: Any, parent: Any, source: str) -> np.ndarray | None:
    """One obs/var column as a numpy array (categoricals decoded to strings), or None when it is
    not a 1-D column."""
    encoding = attr(node, "encoding-type")
    if is_group(node):
        if encoding == "categorical":
            codes = load(child(node, "codes", source), source).astype(np.int64)
            categories = decode_column(child(node, "categories", source), node, source)
            return categorical(codes, categories)
        if encoding in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            values = decode_column(child(node, "values", source), node, source)
            mask = load(child(node, "mask", source), source).astype(bool)
            if encoding == "nullable-integer":
                values = values.astype(np.float64)
                values[mask] = np.nan
            else:
                values = values.astype(object)
                values[mask] = "" if encoding == "nullable-string-array" else None
            return values
        return None
    if len(node.shape) != 1:
        return None
    kind = node.dtype.kind
    if kind in "SOUT" or h5py.check_string_dtype(node.dtype) is not None:
        values = load_strings(node, source)
    else:
        values = load(node, source)
    # anndata 0.7: integer codes whose attribute points to <frame>/__categories/<name> (an HDF5
    # object reference in h5ad, the path from the frame in zarr)
    reference = node.attrs.get("categories")
    if isinstance(reference, h5py.Reference):
        return categorical(values.astype(np.int64), load_strings(node.file[reference], source))
    if isinstance(reference, str):
        return categorical(
            values.astype(np.int64), load_strings(child(parent, reference, source), source)
        )
    return values


def categorical(codes: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Codes decoded to their categories' names (a negative code, a missing value, is empty)."""
    out = np.empty(codes.shape, dtype=object)
    valid = codes >= 0
    if valid.any() and codes[valid].max() >= len(categories):
        raise InputError(
            f"a category code ({int(codes[valid].max())}) is beyond the {len(categories)} "
            "categories"
        )
    out[valid] = as_strings(categories)[codes[valid]]
    out[~valid] = ""
    return out


def frame_index(frame: Any, source: str, part: slice | None = None) -> np.ndarray:
    """The names of an obs/var frame (cell or gene names), or ``part`` of them: ``_index``, or
    (before 0.7) the first field of the compound dataset, as anndata reads it."""
    if is_compound(frame):
        names = as_strings(_compound(frame, source)[frame.dtype.names[0]])
        return names if part is None else names[part]
    key = attr(frame, "_index", "_index")
    return load_strings(child(frame, key, source), source, part=part)


def frame_length(frame: Any, source: str) -> int:
    """Rows of an obs/var frame, from its index's shape (loading 100,000 names to count them
    took a tenth of a second)."""
    if is_compound(frame):
        return int(frame.shape[0]) if len(frame.shape) == 1 else 0
    node = child(frame, attr(frame, "_index", "_index"), source)
    shape = getattr(node, "shape", None)
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    return len(frame_index(frame, source))


def frame_columns(frame: Any, source: str, uns: Any = None) -> dict[str, np.ndarray]:
    """The 1-D columns of an obs/var frame other than its index, categoricals decoded. ``uns``
    holds the categories of a frame written before 0.7 (``uns/<column>_categories``)."""
    if is_compound(frame):
        return _compound_columns(frame, source, uns)
    index_key = attr(frame, "_index", "_index")
    order = attr(frame, "column-order")
    names = (
        list(order)
        if order is not None and len(order)
        else [key for key in frame.keys() if key not in (index_key, "__categories")]
    )
    columns = {}
    for name in names:
        name = str(name)
        if name == index_key or name not in frame:
            continue
        try:
            values = decode_column(frame[name], frame, source)
        except InputError as exc:
            raise InputError(f"{source}: {node_name(frame)}/{name}: {exc}") from exc
        if values is not None:
            columns[name] = values
    return columns


def _compound(frame: Any, source: str) -> np.ndarray:
    values = load(frame, source)
    if values.ndim != 1:
        raise InputError(f"{source}: dataset {node_name(frame)} is not a table of rows")
    return values


def _compound_columns(frame: Any, source: str, uns: Any) -> dict[str, np.ndarray]:
    """Columns of a compound frame: as anndata's legacy reader decodes them, a field whose
    ``uns/<name>_categories`` exists and covers its codes is categorical."""
    table = _compound(frame, source)
    columns = {}
    for name in frame.dtype.names[1:]:
        values = table[name]
        if values.ndim != 1:  # a multi-column field (anndata moved those to obsm)
            continue
        if values.dtype.kind in "SOU":
            columns[name] = as_strings(values)
            continue
        key = f"{name}_categories"
        if values.dtype.kind in "iu" and uns is not None and key in uns:
            categories = load_strings(uns[key], source)
            codes = values.astype(np.int64)
            if categories.ndim == 1 and (codes.size == 0 or codes.max() < len(categories)):
                columns[name] = categorical(codes, categories)
                continue
        columns[name] = values
    return columns


# ---------------------------------------------------------------------------------------------
# matrices: X, layers and raw


def raw_paths(root: Any) -> tuple[str, str] | None:
    """The paths of ``.raw``'s matrix and var frame: ``raw/X`` and ``raw/var``, or (before 0.7)
    ``raw.X`` and ``raw.var``; None when the file has no raw counts."""
    if "raw" in root and is_group(root["raw"]) and "X" in root["raw"]:
        return "raw/X", "raw/var"
    if "raw.X" in root:
        return "raw.X", "raw.var"
    return None


def matrices(root: Any) -> dict[str, str]:
    """Every matrix of the file by the ``--layer`` value that picks it (``""`` for X): X, each
    layer, raw; the values are their paths."""
    found = {"": "X"} if "X" in root else {}
    if "layers" in root and is_group(root["layers"]):
        found.update({str(name): f"layers/{name}" for name in root["layers"].keys()})
    raw = raw_paths(root)
    if raw is not None:
        found["raw"] = raw[0]
    return found


def sample_values(node: Any, source: str) -> np.ndarray:
    """Up to :data:`SAMPLE_VALUES` stored values of a matrix: the first rows of a dense one, the
    first entries of a sparse one."""
    if is_group(node):
        data = child(node, "data", source)
        return load(data, source, slice(0, min(SAMPLE_VALUES, data.shape[0])))
    shape = tuple(node.shape)
    if len(shape) != 2 or 0 in shape:
        return np.zeros(0)
    rows = max(1, min(shape[0], SAMPLE_VALUES // shape[1]))
    return load(node, source, slice(0, rows))


def matrix_kind(values: np.ndarray) -> str:
    """What sampled values hold: :data:`INTEGER`, :data:`FRACTIONAL`, :data:`NEGATIVE` or
    :data:`NOT_NUMBERS` (integers and values within the rounding tolerance of one are counts)."""
    kind = values.dtype.kind
    if values.size == 0 or kind in "bu":
        return INTEGER
    if kind not in "if":
        return NOT_NUMBERS
    if kind == "f" and not np.isfinite(values).all():
        return NOT_NUMBERS
    if values.min() < 0:
        return NEGATIVE
    if kind == "f" and np.abs(values - np.rint(values)).max() > ROUNDING_TOLERANCE:
        return FRACTIONAL
    return INTEGER

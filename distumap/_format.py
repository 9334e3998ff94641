"""The on-disk formats, written down once: the zarr store and the loom file.

Writers, readers, ``distumap info`` and the tests all use these tables and the ``check_*``
functions, which return a list of violations (empty when the object follows the layout).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr

FORMAT_VERSION = 1

#: store attribute that holds distumap's bookkeeping: version and finished stages
ATTR = "distumap"

#: the stages in order; each adds the variables listed for it
STAGE_ORDER = ("ingest", "preprocess", "embed", "export")

#: name -> (dims, dtype kind, the stage that writes it)
STORE_VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "counts": (("cell", "gene"), "int32", "ingest"),
    "zero_fraction": (("gene",), "float32", "preprocess"),
    "selected": (("gene",), "bool", "preprocess"),
    "X_umap": (("cell", "umap"), "float32", "embed"),
    "landmark": (("cell",), "bool", "embed"),
}

#: coordinates every store has; metadata columns come on top as extra ``cell`` coordinates
STORE_COORDS = {"cell": ("cell",), "gene": ("gene",)}

#: names a metadata column may not take, because the store uses them
RESERVED_NAMES = frozenset(STORE_VARIABLES) | {"cell", "gene", "umap"}

LOOM_SPEC_VERSION = "3.0.0"
#: loom datasets: path -> (dtype kind, orientation); genes are rows, cells are columns
LOOM_MATRIX = "/matrix"
LOOM_LAYERS = {"log2p1": "float32"}
LOOM_ROW_ATTRS = {"Gene": "str", "ZeroFraction": "float32"}
LOOM_COL_ATTRS = {"CellID": "str", "X_umap": "float32", "Landmark": "int"}
LOOM_GROUPS = ("/layers", "/row_attrs", "/col_attrs", "/row_graphs", "/col_graphs", "/attrs")


def _dtype_ok(dtype: np.dtype, kind: str) -> bool:
    dtype = np.dtype(dtype)
    if kind == "str":
        return dtype.kind in "OUS" or dtype.kind == "T"
    if kind == "int":
        return dtype.kind in "iu"
    return dtype == np.dtype(kind)


def _variable_length_string(dtype: np.dtype) -> bool:
    import h5py

    return dtype.kind == "O" and h5py.check_string_dtype(dtype) is not None


def stages(ds_or_attrs: xr.Dataset | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stage records of a store: ``{name: {"status": ..., "params": {...}}}``."""
    attrs = ds_or_attrs.attrs if isinstance(ds_or_attrs, xr.Dataset) else ds_or_attrs
    return dict(attrs.get(ATTR, {}).get("stages", {}))


def stage_complete(ds: xr.Dataset, name: str) -> bool:
    """Whether stage ``name`` finished in the store behind ``ds``."""
    return stages(ds).get(name, {}).get("status") == "complete"


def check_store(ds: xr.Dataset) -> list[str]:
    """Violations of the store layout by ``ds`` (an opened store), given the stages it finished.

    Returns
    -------
    list of str
        One sentence per violation; empty when ``ds`` follows the layout.
    """
    problems: list[str] = []
    if ATTR not in ds.attrs:
        return [f"attribute {ATTR!r} is missing: this is not a distumap store"]
    done = {name for name, record in stages(ds).items() if record.get("status") == "complete"}
    if "ingest" not in done:
        problems.append("the ingest stage is not complete")
    for name, dims in STORE_COORDS.items():
        if name not in ds.coords:
            problems.append(f"coordinate {name!r} is missing")
        elif ds[name].dims != dims:
            problems.append(f"coordinate {name!r} has dims {ds[name].dims}, expected {dims}")
        elif not _dtype_ok(ds[name].dtype, "str"):
            problems.append(f"coordinate {name!r} has dtype {ds[name].dtype}, expected strings")
    for name, (dims, kind, stage) in STORE_VARIABLES.items():
        if name not in ds.variables:
            if stage in done:
                problems.append(f"variable {name!r} is missing although stage {stage!r} is done")
            continue
        if ds[name].dims != dims:
            problems.append(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
        if not _dtype_ok(ds[name].dtype, kind):
            problems.append(f"variable {name!r} has dtype {ds[name].dtype}, expected {kind}")
    for name, coord in ds.coords.items():
        if name not in STORE_COORDS and coord.dims != ("cell",) and name != "umap":
            problems.append(f"metadata coordinate {name!r} has dims {coord.dims}, expected cell")
    return problems


def check_loom(path: str | os.PathLike) -> list[str]:
    """Violations of distumap's loom layout by the file at ``path``.

    This checks what loompy's validator leaves out (graph groups, our attributes and dtypes);
    run ``loompy.LoomValidator`` as well for the spec itself.

    Returns
    -------
    list of str
        One sentence per violation; empty when the file follows the layout.
    """
    import h5py

    problems: list[str] = []
    with h5py.File(path, "r") as f:
        for group in LOOM_GROUPS:
            if group not in f:
                problems.append(f"group {group} is missing")
        if LOOM_MATRIX not in f:
            return [*problems, f"dataset {LOOM_MATRIX} is missing"]
        n_genes, n_cells = f[LOOM_MATRIX].shape
        if f[LOOM_MATRIX].dtype != np.int32:
            problems.append(f"{LOOM_MATRIX} has dtype {f[LOOM_MATRIX].dtype}, expected int32")
        for layer, kind in LOOM_LAYERS.items():
            node = f.get(f"/layers/{layer}")
            if node is None:
                problems.append(f"layer {layer!r} is missing")
            elif node.shape != (n_genes, n_cells) or not _dtype_ok(node.dtype, kind):
                problems.append(f"layer {layer!r} is {node.shape} {node.dtype}")
        for where, table, length in (
            ("row_attrs", LOOM_ROW_ATTRS, n_genes),
            ("col_attrs", LOOM_COL_ATTRS, n_cells),
        ):
            for name, kind in table.items():
                node = f.get(f"/{where}/{name}")
                if node is None:
                    problems.append(f"{where} {name!r} is missing")
                elif node.shape[0] != length or not _dtype_ok(node.dtype, kind):
                    problems.append(f"{where} {name!r} is {node.shape} {node.dtype}")
                elif kind == "str" and not _variable_length_string(node.dtype):
                    # loom 3.0.0 requires variable-length strings; loompy's validator rejects 'S'
                    problems.append(f"{where} {name!r} holds fixed-length strings ({node.dtype})")
        if "X_umap" in f.get("/col_attrs", {}) and f["/col_attrs/X_umap"].shape[1:] != (2,):
            problems.append(f"col_attrs 'X_umap' has shape {f['/col_attrs/X_umap'].shape}")
        version = f.get("/attrs/LOOM_SPEC_VERSION")
        if version is None:
            problems.append("/attrs/LOOM_SPEC_VERSION is missing")
        else:
            value = version[()]
            value = value.decode() if isinstance(value, bytes) else str(value)
            if value != LOOM_SPEC_VERSION:
                problems.append(f"LOOM_SPEC_VERSION is {value!r}, expected {LOOM_SPEC_VERSION!r}")
    return problems

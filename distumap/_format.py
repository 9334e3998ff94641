"""The on-disk formats, written down once: the zarr store and the loom file.

Writers, readers, ``distumap info`` and the tests all use these tables and the ``check_*``
functions, which return a list of violations (empty when the object follows the layout).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from distumap._errors import InputError

if TYPE_CHECKING:  # the scheduler's dashboard imports this module and needs no xarray
    import xarray as xr

FORMAT_VERSION = 1

#: store attribute that holds distumap's bookkeeping: version and finished stages
ATTR = "distumap"

#: the stages in pipeline order, and the unit each one counts in progress reports
STAGES: dict[str, str] = {
    "ingest": "cells ingested",
    "preprocess": "genes kept",
    "embed": "cells embedded",
    "export": "blocks exported",
}
STAGE_ORDER = tuple(STAGES)

#: the type ``counts`` is stored in when every count of the input fits it (the ingest decides,
#: block by block, and falls back to int32 when one does not): half the bytes to compress
NARROW_COUNTS = np.dtype(np.uint16)

#: name -> (dims, dtype kind, the stage that writes it)
STORE_VARIABLES: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    # counts: uint16 when every count of the input fits, else int32; float32 when ingested with
    # --dtype float32 (normalised data)
    "counts": (("cell", "gene"), "stored values", "ingest"),
    "zero_fraction": (("gene",), "float32", "preprocess"),
    "selected": (("gene",), "bool", "preprocess"),
    # the scanpy recipe's (no stage requires them: the default recipe writes none): scanpy's
    # var columns of highly_variable_genes(flavor="seurat") and each cell's total over all genes
    "means": (("gene",), "float64", None),
    "dispersions": (("gene",), "float64", None),
    "dispersions_norm": (("gene",), "float32", None),
    "counts_per_cell": (("cell",), "float64", None),
    # the selected genes' counts (same dtype as counts), read by everything after preprocess; a
    # cache (no stage requires it: a store preprocessed before it existed reads counts instead)
    "selected_counts": (("cell", "selected_gene"), "stored values", None),
    "X_umap": (("cell", "umap"), "float32", "embed"),
    "landmark": (("cell",), "bool", "embed"),
    # each cell's k nearest landmarks (as cell indices, nearest first) and membership weights;
    # a landmark's are its k nearest other landmarks
    "knn_landmark": (("cell", "knn"), "int32", "embed"),
    "knn_weight": (("cell", "knn"), "float32", "embed"),
    # the refinement's graph of all cells (absent when the embed does not refine): each cell's
    # nearest other cells (cell indices, nearest first; -1 where fewer were found), their
    # euclidean distances in the embed's features (inf there) and umap-learn's membership
    # weights of these directed edges, before the fuzzy union that the exports' connectivities
    # and the refinement's epochs apply
    "knn_cell": (("cell", "cell_knn"), "int32", None),
    "knn_distance": (("cell", "cell_knn"), "float32", None),
    "knn_cell_weight": (("cell", "cell_knn"), "float32", None),
    # the embed's principal components (absent when it embeds the genes themselves): each
    # cell's coordinates (scanpy's obsm X_pca), every gene's loadings (0 for a gene not
    # selected, as scanpy's varm PCs with a mask), and the fitted cells' variance along each
    # component and its share of their total variance (scanpy's uns pca)
    "X_pca": (("cell", "pc"), "float32", None),
    "PCs": (("gene", "pc"), "float32", None),
    "pca_variance": (("pc",), "float32", None),
    "pca_variance_ratio": (("pc",), "float32", None),
    # a representation the input holds (an AnnData obsm array, read with --use-rep), as it is
    # but for float32; its attribute REP_KEY names the obsm key; no stage requires it
    "rep": (("cell", "rep_dim"), "float32", None),
}
#: the store variable of a representation read with ``--use-rep``, and its attribute that holds
#: the obsm key it came from (the exports write it back under that key)
REP = "rep"
REP_KEY = "obsm_key"
#: the variables a store ingested without counts (``--use-rep`` alone) lacks: the counts and
#: what the preprocess derives from them
COUNTS_DERIVED = ("counts", "zero_fraction", "selected")
#: the variables of the embed's principal components
PCA_VARIABLES = ("X_pca", "PCs", "pca_variance", "pca_variance_ratio")
#: the variables of the graph of all cells: a store has all of them or none
CELL_GRAPH = ("knn_cell", "knn_distance", "knn_cell_weight")

#: coordinates every store has; metadata columns come on top as extra ``cell`` coordinates
STORE_COORDS = {"cell": ("cell",), "gene": ("gene",)}

#: coordinates that some inputs add (feature ids, the input file of each cell)
OPTIONAL_COORDS = {"gene_ids": ("gene",), "source": ("cell",)}

#: the subgroup of the store that holds per-block markers and the line index
PROGRESS_GROUP = "_progress"
#: per store chunk and gene, the cells with a non-zero value (int32, blocks x genes, one chunk
#: per block), written by the ingest's block tasks while the block is in memory: the
#: preprocess sums it instead of decompressing every count once more for its statistics
NONZERO = f"{PROGRESS_GROUP}/nonzero"

#: the fitted UMAP model: a subgroup of plain float32 arrays and JSON attributes, never a pickle
MODEL_GROUP = "umap_model"
#: array -> (dims, where each dim's length comes from); pca_* only when PCA was used
MODEL_ARRAYS: dict[str, tuple[str, ...]] = {
    "landmark_features": ("landmark", "feature"),
    "landmark_embedding": ("landmark", "umap"),
    "pca_mean": ("gene",),
    "pca_components": ("feature", "gene"),
    "pca_variance": ("feature",),
    "pca_variance_ratio": ("feature",),
}
#: scalar attributes of the model and their types
MODEL_SCALARS: dict[str, type] = {
    "a": float,
    "b": float,
    "n_neighbors": int,
    "transform_epochs": int,
    "weight_reference": float,
    "mean_distance_reference": float,
    "seed": int,
    "negative_sample_rate": int,
    "repulsion_strength": float,
    "initial_alpha": float,
}

LOOM_SPEC_VERSION = "3.0.0"
#: loom datasets: path -> (dtype kind, orientation); genes are rows, cells are columns
LOOM_MATRIX = "/matrix"
LOOM_LAYER = "log2p1"
LOOM_LAYERS = {LOOM_LAYER: "float32"}
LOOM_GENE, LOOM_ZERO_FRACTION = "Gene", "ZeroFraction"
LOOM_CELL, LOOM_EMBEDDING, LOOM_LANDMARK = "CellID", "X_umap", "Landmark"
LOOM_ROW_ATTRS = {LOOM_GENE: "str", LOOM_ZERO_FRACTION: "float32"}
LOOM_COL_ATTRS = {LOOM_CELL: "str", LOOM_EMBEDDING: "float32", LOOM_LANDMARK: "int"}
#: where a loom file's cell and gene names are looked for, first found first (the conventions of
#: loompy, velocyto and scanpy's ``write_loom``); the gene ids are ``LOOM_ACCESSION``
LOOM_CELL_NAMES = (LOOM_CELL, "cell_names", "obs_names", "Cell")
LOOM_ACCESSION = "Accession"
LOOM_GENE_NAMES = (LOOM_GENE, "gene_names", "var_names", LOOM_ACCESSION)
#: the cells' kNN graph (``/col_graphs/KNN``: each cell's k nearest landmarks, weighted)
LOOM_KNN_GRAPH = "KNN"
LOOM_GROUPS = ("/layers", "/row_attrs", "/col_attrs", "/row_graphs", "/col_graphs", "/attrs")
#: the loom global attribute that holds the store's stage records (and marks our files)
LOOM_RECORD = "distumap"

#: AnnData export (``embedding.h5ad`` and AnnData zarr): anndata's on-disk format
#: the layer that holds log2(x + 1) of X
ANNDATA_LAYER = "log2p1"
#: ``obsm`` key of the embedding, where scanpy looks for it
ANNDATA_EMBEDDING = "X_umap"
#: ``obs`` column that marks the cells the UMAP model was fitted on
ANNDATA_LANDMARK = "landmark"
#: ``var`` columns
ANNDATA_ZERO_FRACTION = "zero_fraction"
ANNDATA_GENE_IDS = "gene_ids"
#: ``var`` columns from the scanpy recipe's store variables of the same names (with them,
#: ``highly_variable``: every exported gene is one)
ANNDATA_HVG_COLUMNS = ("means", "dispersions", "dispersions_norm")
#: ``uns`` keys: scanpy's UMAP record (``uns["umap"]["params"]``) and the store's stage records
ANNDATA_UNS_UMAP = "umap"
ANNDATA_UNS_RECORD = "distumap"
#: the embed's principal components where scanpy.pp.pca keeps them: obsm, varm and uns keys
ANNDATA_PCA = "X_pca"
ANNDATA_LOADINGS = "PCs"
ANNDATA_UNS_PCA = "pca"
#: the graph of all cells where scanpy keeps a neighbour graph: ``obsp`` keys (kNN distances,
#: symmetric fuzzy connectivities) and the ``uns`` record that names them
ANNDATA_DISTANCES = "distances"
ANNDATA_CONNECTIVITIES = "connectivities"
ANNDATA_UNS_NEIGHBORS = "neighbors"
#: the store variables the export needs
ANNDATA_REQUIRED = ("counts", "zero_fraction", "X_umap", "landmark")
#: anndata's element encodings and the versions that anndata 0.8 to 0.12 write and read
ENCODINGS = {
    "anndata": "0.1.0",
    "csr_matrix": "0.1.0",
    "dataframe": "0.2.0",
    "categorical": "0.2.0",
    "string-array": "0.2.0",
    "array": "0.2.0",
    "dict": "0.1.0",
    "numeric-scalar": "0.2.0",
    "string": "0.2.0",
}

#: names a metadata column may not take, because the store or an export uses them (loom's
#: column attributes and AnnData's obs are keyed by the same names, so one rule covers all)
RESERVED_NAMES = (
    frozenset(STORE_VARIABLES)
    | frozenset(STORE_COORDS)
    | frozenset(OPTIONAL_COORDS)
    | frozenset(LOOM_COL_ATTRS)
    | {"umap", "_index", PROGRESS_GROUP, MODEL_GROUP}
)


def metadata_name(name: str, taken: set[str]) -> str:
    """The store name of a metadata column called ``name``.

    A name the store or an export uses gets ``_metadata`` appended, and ``/`` (a path separator
    in zarr and HDF5) becomes ``_``; ``taken`` holds the names already given, which a renamed
    column never takes.
    """
    key = str(name).replace("/", "_")
    if key in RESERVED_NAMES or key in taken:
        base = f"{key}_metadata"
        key, n = base, 1
        while key in RESERVED_NAMES or key in taken:
            key, n = f"{base}{n}", n + 1
    return key


#: how distumap marks the files it writes, so that it only ever replaces its own: PNG files
#: carry it in their "Software" text chunk, HTML pages in a generator meta tag, HDF5 files
#: (loom, h5ad) and zarr groups in their attributes
OUTPUT_MARK = "distumap"
HTML_MARK = f'<meta name="generator" content="{OUTPUT_MARK}">'
_HEAD_BYTES = 1 << 16


def output_kind(path: str | os.PathLike) -> str | None:
    """What distumap output is at ``path`` (a local path or an fsspec URL): ``"store"``,
    ``"anndata-zarr"``, ``"loom"``, ``"h5ad"``, ``"png"`` or ``"html"``; None when nothing is
    there or what is there is not distumap's."""
    import fsspec

    location = os.fspath(path)
    fs, inner = fsspec.core.url_to_fs(location)
    if not fs.exists(inner):
        return None
    if fs.isdir(inner):
        import zarr

        try:
            group = zarr.open_group(location, mode="r", use_consolidated=False)
        except Exception:  # not a zarr group at all
            return None
        if ATTR in group.attrs:
            return "store"
        uns = group.get("uns")
        return "anndata-zarr" if uns is not None and ANNDATA_UNS_RECORD in uns else None
    with fs.open(inner, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith(b"\x89HDF"):
        import h5py

        try:
            with fs.open(inner, "rb") as raw, h5py.File(raw, "r") as h5:
                if f"attrs/{LOOM_RECORD}" in h5:
                    return "loom"
                return "h5ad" if f"uns/{ANNDATA_UNS_RECORD}" in h5 else None
        except OSError:
            return None
    if b"Software\x00" + OUTPUT_MARK.encode() in head:  # PNG tEXt chunk
        return "png"
    return "html" if HTML_MARK.encode() in head else None


def written_by_distumap(path: str | os.PathLike) -> bool:
    """Whether a distumap output (any kind) is at ``path``."""
    return output_kind(path) is not None


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """Raise :class:`~distumap._errors.InputError` unless ``path`` is free or holds a distumap
    output of ``kind``: distumap replaces only its own outputs, each by one of its kind."""
    import fsspec

    location = os.fspath(path)
    fs, inner = fsspec.core.url_to_fs(location)
    if not fs.exists(inner) or output_kind(location) == kind:
        return
    if fs.isdir(inner) and not fs.ls(inner, detail=False):
        return  # an empty folder holds nothing to lose
    raise InputError(
        f"{location}: something that is not a distumap {kind} is already there; distumap "
        "replaces only its own outputs: move it away or choose another path"
    )


def _dtype_ok(dtype: np.dtype, kind: str) -> bool:
    dtype = np.dtype(dtype)
    if kind == "str":
        return dtype.kind in "OUS" or dtype.kind == "T"
    if kind == "int":
        return dtype.kind in "iu"
    if kind == "values":
        return dtype in (np.dtype(np.int32), np.dtype(np.float32))
    if kind == "stored values":
        return dtype in (NARROW_COUNTS, np.dtype(np.int32), np.dtype(np.float32))
    return dtype == np.dtype(kind)


def _variable_length_string(dtype: np.dtype) -> bool:
    import h5py

    return dtype.kind == "O" and h5py.check_string_dtype(dtype) is not None


def stages(ds_or_attrs: xr.Dataset | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stage records of a store: ``{name: {"status": ..., "params": {...}}}``."""
    import xarray as xr  # here: the module's import stays free of xarray

    attrs = ds_or_attrs.attrs if isinstance(ds_or_attrs, xr.Dataset) else ds_or_attrs
    return dict(attrs.get(ATTR, {}).get("stages", {}))


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
    ingest_params = stages(ds).get("ingest", {}).get("params", {})
    # a store ingested with --use-rep alone holds the representation and no counts
    without_counts = ingest_params.get("counts", True) is False
    for name, dims in STORE_COORDS.items():
        if name not in ds.coords:
            problems.append(f"coordinate {name!r} is missing")
        elif ds[name].dims != dims:
            problems.append(f"coordinate {name!r} has dims {ds[name].dims}, expected {dims}")
        elif not _dtype_ok(ds[name].dtype, "str"):
            problems.append(f"coordinate {name!r} has dtype {ds[name].dtype}, expected strings")
    for name, (dims, kind, stage) in STORE_VARIABLES.items():
        if name not in ds.variables:
            if without_counts and name in COUNTS_DERIVED:
                continue
            if stage in done:
                problems.append(f"variable {name!r} is missing although stage {stage!r} is done")
            continue
        if ds[name].dims != dims:
            problems.append(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
        if not _dtype_ok(ds[name].dtype, kind):
            expected = "uint16, int32 or float32" if kind == "stored values" else kind
            problems.append(f"variable {name!r} has dtype {ds[name].dtype}, expected {expected}")
    if without_counts and REP not in ds.variables:
        problems.append(f"variable {REP!r} is missing from a store ingested without counts")
    if REP in ds.variables and not isinstance(ds[REP].attrs.get(REP_KEY), str):
        problems.append(f"variable {REP!r} lacks the attribute {REP_KEY!r} naming its obsm key")
    present = [name for name in CELL_GRAPH if name in ds.variables]
    if present and len(present) < len(CELL_GRAPH):
        missing = sorted(set(CELL_GRAPH) - set(present))
        problems.append(f"the graph of all cells lacks {', '.join(missing)}")
    for name, coord in ds.coords.items():
        if name in STORE_COORDS or name == "umap":
            continue
        expected = OPTIONAL_COORDS.get(name, ("cell",))
        if coord.dims != expected:
            problems.append(f"coordinate {name!r} has dims {coord.dims}, expected {expected}")
        elif name not in OPTIONAL_COORDS and name in RESERVED_NAMES:
            problems.append(f"metadata coordinate {name!r} takes a name distumap's outputs use")
    return problems


def check_model(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> list[str]:
    """Violations of the model layout (``umap_model/``) by its arrays and attributes.

    Checks that every array is there (the PCA pair together or not at all), float32, finite,
    with shapes that agree, and that every scalar attribute has its type and a finite value.

    Returns
    -------
    list of str
        One sentence per violation; empty when the model follows the layout.
    """
    problems: list[str] = []
    sizes: dict[str, int] = {}
    has_pca = [name in arrays for name in ("pca_mean", "pca_components")]
    if any(has_pca) and not all(has_pca):
        problems.append("pca_mean and pca_components must be present together")
    for name, dims in MODEL_ARRAYS.items():
        if name not in arrays:
            if name.startswith("pca_"):
                continue
            problems.append(f"array {name!r} is missing")
            continue
        value = arrays[name]
        if value.dtype != np.float32:
            problems.append(f"array {name!r} has dtype {value.dtype}, expected float32")
        if value.ndim != len(dims):
            problems.append(f"array {name!r} has {value.ndim} dims, expected {len(dims)}")
            continue
        if not np.isfinite(value).all():
            problems.append(f"array {name!r} holds values that are not finite")
        for dim, length in zip(dims, value.shape, strict=True):
            if sizes.setdefault(dim, length) != length:
                problems.append(f"array {name!r}: {dim} has length {length}, not {sizes[dim]}")
    if sizes.get("umap", 2) != 2:
        problems.append("the landmark embedding must have two columns")
    for name, kind in MODEL_SCALARS.items():
        value = attrs.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"attribute {name!r} is {value!r}, expected a number")
        elif kind is int and int(value) != value:
            problems.append(f"attribute {name!r} is {value!r}, expected an integer")
        elif not np.isfinite(value):
            problems.append(f"attribute {name!r} is not finite")
    n_neighbors, n_landmarks = attrs.get("n_neighbors"), sizes.get("landmark")
    if isinstance(n_neighbors, int) and n_landmarks is not None and n_neighbors >= n_landmarks:
        problems.append(f"n_neighbors={n_neighbors} needs more than {n_landmarks} landmarks")
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
        if not _dtype_ok(f[LOOM_MATRIX].dtype, "values"):
            problems.append(
                f"{LOOM_MATRIX} has dtype {f[LOOM_MATRIX].dtype}, expected int32 (or float32)"
            )
        for layer, kind in LOOM_LAYERS.items():
            node = f.get(f"/layers/{layer}")
            if node is None:
                problems.append(f"layer {layer!r} is missing")
            elif node.shape != (n_genes, n_cells) or not _dtype_ok(node.dtype, kind):
                problems.append(f"layer {layer!r} is {node.shape} {node.dtype}")
        for path in (LOOM_MATRIX, *(f"/layers/{layer}" for layer in LOOM_LAYERS)):
            # loompy's add_columns and combine grow the matrix and every layer along cells
            if path in f and f[path].maxshape[1:] != (None,):
                problems.append(f"{path} cannot grow along cells (maxshape {f[path].maxshape})")
        graph = f.get(f"/col_graphs/{LOOM_KNN_GRAPH}")
        if graph is not None:
            parts = [graph.get(name) for name in "abw"]
            if any(part is None for part in parts):
                problems.append(f"col_graphs {LOOM_KNN_GRAPH!r} lacks one of a, b, w")
            elif len({part.shape for part in parts}) != 1 or parts[0].ndim != 1:
                problems.append(f"col_graphs {LOOM_KNN_GRAPH!r}: a, b, w differ in shape")
            elif (
                not all(_dtype_ok(p.dtype, "int") for p in parts[:2]) or parts[2].dtype.kind != "f"
            ):
                problems.append(f"col_graphs {LOOM_KNN_GRAPH!r} needs integer a and b, float w")
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

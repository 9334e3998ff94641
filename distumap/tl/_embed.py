"""Embed: landmarks, a UMAP fit on them (on a worker), a parallel, batch-invariant transform,
and a chunk-invariant refinement of every cell over the kNN graph of all cells.

"Fit small, transform big": a seeded sample of cells (the landmarks) is gathered on one worker,
where umap-learn is fitted (task ``umap-fit``). The fitted model is written into the store once;
a worker plugin loads it on every worker (warming numba up there) and the ``umap-transform``
tasks, one per store chunk, read it by reference, never inside the task graph. Each task writes
its chunk of ``X_umap`` and of the kNN graph (``knn_landmark``, ``knn_weight``: each cell's k
nearest landmarks as cell indices, and their membership weights; a landmark's are its k nearest
other landmarks) and sets its marker, so a re-run resumes and no block is written twice.

Transformed cells sit worse than fitted ones, since the transform places each against the
landmarks alone. With ``refine_epochs`` (default ``distumap.refine-epochs``) every cell then
moves with UMAP's SGD over its nearest *cells* (:mod:`distumap.tl._refine_stage`, kernels in
:mod:`distumap.tl._refine`), in epochs that read only the previous epoch's positions, so that
the result stays independent of chunks and workers:
``umap-refine-knn`` tasks build the graph and ``umap-refine-epoch`` tasks run the epochs. The steps
before the last (the transform included) mark their tasks in ``_progress/embed-refine``; the last
epoch writes ``X_umap``, one task per store chunk, and sets the stage's own markers, which vouch for
``X_umap`` as when nothing is refined: each chunk of it is written once. The graph of all cells
that the refinement searches is a result too (``knn_cell``, ``knn_distance``, ``knn_cell_weight``):
the AnnData exports hand it to scanpy as its neighbour graph. ``knn_landmark`` and ``knn_weight``
stay the landmark graph.

The model is a group of plain arrays with JSON attributes (``umap_model/``, see
:mod:`distumap._format`), validated when it is loaded: a store is data, never code.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from distumap import _memory, _progress
from distumap._compute import current_client
from distumap._errors import InputError
from distumap._format import CELL_GRAPH, PCA_VARIABLES, REP, REP_KEY, stages
from distumap._stage import Stage
from distumap._store import (
    open_store,
    require_stage,
    store_of,
    write_variables,
)
from distumap._workers import SetupPlugin, fit_worker, prepare_fit_workers
from distumap.pp import features as recipe_features
from distumap.tl import _model, _model_io, _refine, _refine_stage
from distumap.tl._landmarks import landmarks
from distumap.tl._params import embed_params
from distumap.tl._pca import covariance_moments, pca_from_moments, total_variance

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the model, by reference


def _prepare_model_worker(store: str, token: str, transform: bool, refine: bool) -> None:
    """On each worker, once (the model plugin's setup): load the fitted model and compile the
    kernels the run will use there (the transform's when some cells are not landmarks, the
    refinement's when it runs), so the dashboard shows transform work, not compilation."""
    model = _model_io.load_fitted(store, token)
    if transform:
        _model.warm_up(model)
    if refine:
        _refine.warm_up()


def _release_model_worker() -> None:
    _model_io.load_fitted.cache_clear()
    _refine_stage.clear_caches()


def prepare_workers(client=None) -> None:
    """Have workers compile the UMAP fit's kernels now, in the background; the fit goes there.

    On a fresh install numba compiles umap-learn, pynndescent and the fit's kernels on first
    use, after the ingest and the preprocess. Called before them, the compilation overlaps
    them, on one or two workers (numba's on-disk cache shares the kernels), and :func:`umap`
    sends the fit to the worker that imported umap-learn, while it lives. With the cache warm
    it is a moment of loading.

    Parameters
    ----------
    client
        A ``distributed.Client``; default the current one. Without one (dask's local
        schedulers), or without workers yet, nothing happens: the fit compiles when it runs.

    Examples
    --------
    >>> distumap.tl.prepare_workers()  # doctest: +SKIP
    >>> ds = distumap.io.read("matrix.csv", "store.zarr")  # doctest: +SKIP
    """
    client = client if client is not None else current_client()
    if client is not None:
        # numba's cache is shared: importing umap-learn (pynndescent compiles) and distumap's
        # kernels go to two workers at once where there are two
        prepare_fit_workers(client, _model.warm_up_fit, ("umap", "kernels"), "all")


def _fit_task(
    features: np.ndarray, store: str, token: str, params: dict[str, Any], all_cells=None
) -> np.ndarray:
    # all_cells: the covariance moments of every cell and their number, for a PCA of all cells
    pca = None
    if all_cells is not None:
        mean, components, variance = pca_from_moments(*all_cells, params["pca"])
        pca = (mean, components, variance, variance / total_variance(*all_cells))
    model = _model.fit_landmark_model(
        features,
        n_pca=params["pca"],
        n_neighbors=params["n_neighbors"],
        min_dist=params["min_dist"],
        seed=params["seed"],
        transform_epochs=params["transform_epochs"],
        pca=pca,
    )
    _model_io.save_fitted(store, model, token)
    return model.landmark_embedding


def _transform_task(
    block: np.ndarray,
    first_cell: int,
    landmark_rows: np.ndarray,
    landmark_order: np.ndarray,
    landmark_cells: np.ndarray,
    *,
    store: str,
    token: str,
    n_cells: int,
    color: str | None = None,
    refine: bool = False,
) -> int:
    """Embed one store chunk of cells and write it, with each cell's nearest landmarks; send an
    even sample of its points to the dashboard page, coloured by the cell coordinate ``color``.
    With ``refine``, the coordinates are where the refinement starts, not the result: they go
    to ``_progress/refine-start`` with the cells' kNN features and nearest landmark, and
    ``X_umap`` is left to the refinement's last epoch. With a PCA, the cells' principal
    components go to ``X_pca``."""
    model = _model_io.load_fitted(store, token)
    cells = np.arange(first_cell, first_cell + block.shape[0], dtype=np.int64)
    coords = np.empty((block.shape[0], 2), dtype=np.float32)
    neighbors = np.empty((block.shape[0], model.n_neighbors), dtype=np.int64)
    weights = np.empty((block.shape[0], model.n_neighbors), dtype=np.float32)
    is_landmark = np.zeros(block.shape[0], dtype=bool)
    is_landmark[landmark_rows - first_cell] = True
    # landmarks keep their fitted coordinates; only the others are transformed
    coords[is_landmark] = model.landmark_embedding[landmark_order]
    neighbors[is_landmark], weights[is_landmark] = _model.landmark_knn(model, landmark_order)
    # the principal components are a result; the refinement searches all cells' kNN features
    features = None
    with_pca = model.pca_components is not None
    if refine or with_pca:
        features = np.empty((block.shape[0], model.landmark_features.shape[1]), np.float32)
        features[is_landmark] = model.landmark_features[landmark_order]
    if (~is_landmark).any():
        moved = None if features is None else np.empty_like(features[~is_landmark])
        coords[~is_landmark], neighbors[~is_landmark], weights[~is_landmark] = _model.transform(
            model, block[~is_landmark], cells[~is_landmark], return_knn=True, features_out=moved
        )
        if features is not None:
            features[~is_landmark] = moved
    rows = slice(first_cell, first_cell + len(cells))
    if refine:
        # a landmark's bucket is its own; another cell's is its nearest landmark's
        home = neighbors[:, 0].astype(np.int32)
        home[is_landmark] = landmark_order
        _refine_stage.write_scratch(store, rows, features=features, home=home, start=coords)
    zarr.open_array(store, path="knn_landmark", mode="r+")[rows] = landmark_cells[neighbors]
    zarr.open_array(store, path="knn_weight", mode="r+")[rows] = weights
    if with_pca:
        zarr.open_array(store, path="X_pca", mode="r+")[rows] = features
    if not refine:
        zarr.open_array(store, path="X_umap", mode="r+")[rows] = coords
    labels = None if color is None else zarr.open_array(store, path=color, mode="r")[rows]
    _progress.send_points("embed", first_cell, coords, labels, first_cell=first_cell, total=n_cells)
    return len(cells)


def umap(
    ds: xr.Dataset | str,
    *,
    landmarks: int | None = None,
    stratify: str | None = None,
    pca: int | None = None,
    n_neighbors: int | None = None,
    min_dist: float | None = None,
    seed: int | None = None,
    transform_epochs: int | None = None,
    refine_epochs: int | None = None,
    pca_fit: str | None = None,
    use_rep: str | None = None,
    color: str | None = None,
    store: str | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """The embed stage: fit UMAP on landmark cells, transform every other cell in parallel.

    Parameters
    ----------
    ds
        The preprocessed store (a Dataset from :func:`distumap.io.open_store`, or its path).
    landmarks, stratify
        How many landmark cells, and an optional cell coordinate to stratify them by (see
        :func:`landmarks`). Defaults: ``distumap.landmarks``, uniform.
    pca
        Principal components of the selected genes' log values (fitted on the landmarks) to
        embed from; 0 embeds from the genes themselves, as the tutorial does. Default
        ``distumap.pca``.
    n_neighbors, min_dist, seed
        umap-learn's parameters (defaults: the tutorial's 30, 0.25 and 999).
    transform_epochs
        SGD epochs for each transformed cell (default ``distumap.transform-epochs``, which
        when unset is 10 if the refinement follows and 30 if not).
    refine_epochs
        Epochs of UMAP's SGD over the kNN graph of *all* cells after the transform (default
        ``distumap.refine-epochs``; 0 keeps the transform's coordinates). Every cell moves
        towards its nearest cells, found through the landmarks; landmarks move too. Needs
        ``pca > 0``; with ``pca=0`` the default is 0. See :mod:`distumap.tl._refine`.
    pca_fit
        ``"landmarks"`` (default ``distumap.pca-fit``) fits the PCA on the landmarks;
        ``"all"`` on every cell, exactly, from a covariance summed over cell blocks.
    use_rep
        The obsm key of the representation the store holds (ingested with ``use_rep``):
        embed its ``rep`` as it is, with no gene filter and no PCA (``pca`` and ``pca_fit``
        must be left unset), refined as principal components are. Default: the genes'
        features, or the representation when the store holds no counts.
    color
        A cell coordinate (e.g. ``subclass_label``) that colours the embedding drawn live on the
        dashboard page; it does not change the result.
    store
        Where to write, if ``ds`` was not opened by :func:`distumap.io.open_store`.
    progress
        Show progress bars (with a distributed client).

    Returns
    -------
    xarray.Dataset
        The store reopened, with ``X_umap`` (cell, umap), ``landmark`` (cell), and
        ``knn_landmark`` (int32) and ``knn_weight`` (float32), both (cell, knn): each cell's
        ``n_neighbors`` nearest landmarks (their cell indices, nearest first) and membership
        weights. A landmark's neighbours are the nearest *other* landmarks (no self-loops).
        When it refines, the graph of all cells it searched (cell, cell_knn): ``knn_cell``
        (int32, nearest other cells first, -1 where fewer were found), ``knn_distance`` (float32,
        euclidean in the embed's features) and ``knn_cell_weight`` (float32, umap-learn's
        membership weights of these directed edges); without, none (an earlier run's go).

    Notes
    -----
    This computes. Features are the selected genes' values by the preprocess stage's recipe
    (log2(x+1), or log1p of the normalised counts: :func:`distumap.pp.features`), built lazily,
    or with ``use_rep`` the store's ``rep``, read in its store chunks.
    A cell's coordinates depend only on its own values, its index and the fitted model (and,
    when refined, on the previous epoch's coordinates of all cells), never on the chunk size or
    the number of workers. A finished stage with the same parameters is skipped; an
    interrupted one resumes with the blocks not yet written, the refinement with the epoch it
    was in.

    Examples
    --------
    >>> ds = distumap.tl.umap(ds, landmarks=20000, stratify="subclass_label")  # doctest: +SKIP
    """
    location = store_of(ds, store) if isinstance(ds, xr.Dataset) else str(ds)
    given = dict(
        landmarks=landmarks,
        stratify=stratify,
        pca=pca,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        seed=seed,
        transform_epochs=transform_epochs,
        refine_epochs=refine_epochs,
        pca_fit=pca_fit,
    )
    # bad parameters are refused before the store is read
    params = embed_params(use_rep=use_rep, **given)
    if (held := _representation_used(location, use_rep)) != use_rep:
        use_rep, params = held, embed_params(use_rep=held, **given)
    stage = Stage(location, "embed", params, requires="preprocess", progress=progress)
    if stage.finished:
        return open_store(location)
    ds = open_store(location, require="preprocess")
    if color is not None and (color not in ds.coords or ds[color].dims != ("cell",)):
        raise InputError(f"color {color!r}: no such cell coordinate")
    features = ds[REP].data if use_rep is not None else recipe_features(ds).data
    # the stages embed depends on, not embed's own record: a re-run must find the same token
    earlier = {k: v for k, v in stages(ds).items() if k in ("ingest", "preprocess")}
    token = tokenize(location, params, earlier)

    client = current_client()
    # before any heavy work: a block or a fit that cannot fit in a worker is refused (exit 2)
    _memory.check_blocks(client, "embed", max(features.chunks[0]), _block_width(ds, features))
    is_landmark, fit_seconds = _fit_or_resume(stage, ds, location, params, features, token, client)
    refining = _refine_stage.refine_epochs(params, is_landmark) > 0
    if client is not None:
        _register_model_plugin(client, location, token, is_landmark, refining)
    rows = np.flatnonzero(is_landmark)
    # every task maps landmark indices to cell indices: one shared key, not a copy per task
    landmark_cells = dask.delayed(rows.astype(np.int32), name=f"landmark-cells-{token}")
    bounds = np.cumsum((0, *features.chunks[0]))
    transform_seconds = _transform(
        stage, features, rows, landmark_cells, location, token, params, color, refining
    )
    refined = {}
    if refining:
        refined = _refine_stage.refine(
            stage, params, bounds, rows, landmark_cells, token=token, color=color
        )
    _write_components(location, ds, token)
    if refining:  # every epoch is done: the working arrays go before the store is consolidated
        _refine_stage.drop_scratch(location)
    stage.complete(
        landmarks_used=len(rows),
        fit_seconds=fit_seconds,
        transform_seconds=transform_seconds,
        transformed_cells=int(features.shape[0] - len(rows)),
        **refined,
    )
    return open_store(location)


def _write_components(location: str, ds: xr.Dataset, token: str) -> None:
    """The model's loadings, as every gene's (0 for those not selected), and its variances, as
    store variables beside the cells' ``X_pca``; nothing when the model has no PCA."""
    model = _model_io.load_fitted(location, token)
    if model.pca_components is None:
        return
    genes = np.flatnonzero(ds["selected"].values)
    if len(genes) != model.pca_components.shape[1]:
        raise RuntimeError("the fitted components do not match the selected genes")
    loadings = np.zeros((ds.sizes["gene"], len(model.pca_components)), dtype=np.float32)
    loadings[genes] = model.pca_components.T
    variables = {"PCs": (("gene", "pc"), loadings)}
    if model.pca_variance is not None:
        variables["pca_variance"] = ("pc", model.pca_variance)
        variables["pca_variance_ratio"] = ("pc", model.pca_variance_ratio)
    write_variables(location, xr.Dataset(variables))


def _representation_used(location: str, use_rep: str | None) -> str | None:
    """The obsm key of the representation to embed: ``use_rep``, which the store must hold, or
    (none given) the store's own when it holds no counts to take features from."""
    require_stage(location, "preprocess", needed_by="embed")
    ds = open_store(location, require=None)
    held = ds[REP].attrs.get(REP_KEY) if REP in ds else None
    if use_rep is None:
        return held if "counts" not in ds else None
    if use_rep != held:
        holds = f"it holds {held!r}" if held else "it holds none"
        raise InputError(
            f"{location}: --use-rep {use_rep}: the store holds no representation {use_rep!r} "
            f"({holds}); ingest the input again with --use-rep {use_rep}"
        )
    return use_rep


def _block_width(ds: xr.Dataset, features: da.Array) -> int:
    """The columns of the widest block an embed task holds: a block of counts, or without
    them of the features."""
    return ds.sizes["gene"] if "counts" in ds else int(features.shape[1])


def _fit_or_resume(
    stage: Stage,
    ds: xr.Dataset,
    location: str,
    params: dict[str, Any],
    features: da.Array,
    token: str,
    client,
) -> tuple[np.ndarray, float | None]:
    """The landmarks, and the fit's seconds: a resumed run keeps the interrupted run's
    landmarks and model (None seconds); any other starts the stage and fits."""
    if (
        stage.resumable(token=token)
        and _refine_stage.resumable(location, stage.record)
        and _model_io.fitted_saved(location, token)
    ):
        return ds["landmark"].values, None  # written when the interrupted run started
    chosen = landmarks(ds, params["landmarks"], stratify=params["stratify"], seed=params["seed"])
    is_landmark = chosen.values
    _memory.check_fit(
        client, int(is_landmark.sum()), features.shape[1], params["pca"], params["n_neighbors"]
    )
    if _refine_stage.refine_epochs(params, is_landmark):
        width = _refine_stage.n_features(params, features.shape[1])
        _memory.check_refine(client, len(is_landmark), width, _refine.RefineSettings.n_neighbors)
    _start(
        stage, ds, location, params, is_landmark, token,
        n_genes=features.shape[1], chunks=features.chunks[0],
    )  # fmt: skip
    return is_landmark, _fit(stage, features, is_landmark, location, token, params, client)


def _start(
    stage: Stage,
    ds: xr.Dataset,
    location: str,
    params: dict[str, Any],
    is_landmark: np.ndarray,
    token: str,
    *,
    n_genes: int,
    chunks: tuple[int, ...],
) -> None:
    """Start the stage: its record, the result arrays as placeholders (chunked as the store's
    cells, ``chunks``), ``landmark``, and when it refines, the refinement's markers and
    working arrays."""
    n_cells = ds.sizes["cell"]
    epochs = _refine_stage.refine_epochs(params, is_landmark)
    width = _refine_stage.n_features(params, n_genes)
    layout = (
        _refine_stage.refine_layout(len(chunks), chunks[0], epochs, n_cells, width)
        if epochs
        else {}
    )
    markers = layout.pop("refine_markers", 0)
    # a run id keys the workers' caches of whole arrays, so that no cache outlives its run
    stage.start(n_blocks=len(chunks), token=token, run=uuid.uuid4().hex, **layout)
    k = params["n_neighbors"]

    def placeholder(width: int, dtype: str, rows: Any = chunks) -> da.Array:
        return da.zeros((n_cells, width), chunks=(rows, width), dtype=dtype)

    placeholders = {
        "X_umap": (("cell", "umap"), placeholder(2, "f4")),
        "knn_landmark": (("cell", "knn"), placeholder(k, "i4")),
        "knn_weight": (("cell", "knn"), placeholder(k, "f4")),
    }
    if ds.sizes.get("knn", k) != k:  # a re-embed with another k: the old graph goes
        _drop_arrays(location, ["knn_landmark", "knn_weight"])
        ds = ds.drop_vars(["knn_landmark", "knn_weight"])
    n_pca = params["pca"] if 0 < params["pca"] < n_genes else 0  # as the model decides
    if n_pca:
        placeholders["X_pca"] = (("cell", "pc"), placeholder(n_pca, "f4"))
    if stale := [name for name in PCA_VARIABLES if name in ds and n_pca != ds.sizes["pc"]]:
        _drop_arrays(location, stale)  # an earlier run's components (another number, or none)
        ds = ds.drop_vars(stale)
    if epochs:
        # the graph in a chunk per refinement task: its steps read it whole, a task at a time
        rows = min(chunks[0] * layout["refine_chunks_per_task"], max(n_cells, 1))
        placeholders.update(_cell_graph_placeholders(placeholder, rows))
        stale = [name for name in CELL_GRAPH if name in ds and _zarr_rows(location, name) != rows]
    else:
        stale = [name for name in CELL_GRAPH if name in ds]  # an earlier run's graph goes
    if stale:
        _drop_arrays(location, stale)
        ds = ds.drop_vars(stale)
    write_variables(
        location,
        xr.Dataset({**placeholders, "landmark": ("cell", is_landmark)}),
        compute=False,
        # a re-embed with other parameters keeps the existing arrays (same chunks) and
        # rewrites every block; xarray refuses an encoding for a variable that exists
        encoding={
            name: {"chunks": (value[1].chunks[0][0], value[1].shape[1])}
            for name, value in placeholders.items()
            if name not in ds
        },
    )
    if epochs:
        stage.pass_(_refine_stage.REFINE_MARKERS).create_markers(markers)
        _refine_stage.create_scratch(
            location,
            n_cells,
            chunks[0],
            layout["refine_chunks_per_task"],
            width,
        )


def _cell_graph_placeholders(placeholder, rows: int) -> dict[str, tuple]:
    """The refinement's graph of all cells, as placeholders its kNN step fills, ``rows`` cells
    a chunk (a kNN task's)."""
    width = _refine.RefineSettings.n_neighbors
    dtypes = {"knn_cell": "i4", "knn_distance": "f4", "knn_cell_weight": "f4"}
    return {
        name: (("cell", "cell_knn"), placeholder(width, dtypes[name], rows)) for name in CELL_GRAPH
    }


def _zarr_rows(store: str, name: str) -> int:
    """Rows per chunk of the store's array ``name``."""
    return int(zarr.open_array(store, path=name, mode="r").chunks[0])


def _fit(
    stage: Stage,
    features: da.Array,
    is_landmark: np.ndarray,
    location: str,
    token: str,
    params: dict[str, Any],
    client,
) -> float:
    """Fit the model on the landmarks' features, on the worker that prepared the fit if one
    did, and write it into the store; return the seconds it took."""
    rows = np.flatnonzero(is_landmark)
    prepared = fit_worker(client)
    where = {"workers": [prepared], "allow_other_workers": True} if prepared else {}
    all_cells = None
    if params.get("pca_fit") == "all" and params["pca"] < features.shape[1]:
        all_cells = (covariance_moments(features), features.shape[0])
    with dask.annotate(**where):
        fit = dask.delayed(_fit_task, pure=False)(
            features[rows], location, token, params, all_cells, dask_key_name=f"umap-fit-{token}"
        )
    fit_started = time.perf_counter()
    stage.compute([fit], label="embed: fit UMAP on landmarks")
    return round(time.perf_counter() - fit_started, 3)


def _register_model_plugin(
    client, location: str, token: str, is_landmark: np.ndarray, refining: bool
) -> None:
    """The fitted model reaches every worker once, by reference
    (:func:`distumap.tl._model_io.load_fitted`)."""
    # with every cell a landmark (small data) nothing is transformed or refined: compiling
    # those kernels in every worker would be most of a small run's first time
    transforming = not is_landmark.all()
    plugin = SetupPlugin(
        "distumap-umap-model",
        _prepare_model_worker,
        (location, token, transforming, refining),
        teardown=_release_model_worker,
    )
    client.register_plugin(plugin)


def _transform(
    stage: Stage,
    features: da.Array,
    rows: np.ndarray,
    landmark_cells: Any,
    location: str,
    token: str,
    params: dict[str, Any],
    color: str | None,
    refining: bool,
) -> float:
    """Transform every store chunk not yet written (``umap-transform`` tasks); return the
    seconds it took."""
    n_cells = features.shape[0]
    bounds = np.cumsum((0, *features.chunks[0]))
    blocks = features.to_delayed().ravel()
    calls = {}
    # refining, the transform is a step before the result: its markers are the refinement's
    transform = _refine_stage.Steps(stage, 0, len(blocks)) if refining else stage
    for i in transform.pending():
        first, last = int(bounds[i]), int(bounds[i + 1])
        lo, hi = np.searchsorted(rows, [first, last])
        args = (blocks[i], first, rows[lo:hi], np.arange(lo, hi), landmark_cells)
        kwargs = {"store": location, "token": token, "n_cells": n_cells, "color": color}
        calls[i] = (args, {**kwargs, "refine": refining})
    transform_started = time.perf_counter()
    transform.run_blocks(
        _transform_task,
        calls,
        key="umap-transform",
        label="embed: transform cells",
        total=n_cells,
        step="transform",
    )
    return round(time.perf_counter() - transform_started, 3)


def _drop_arrays(store: str, names: list[str]) -> None:
    group = zarr.open_group(store, mode="r+")
    for name in names:
        if name in group:
            del group[name]

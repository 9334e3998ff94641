"""Embed: landmarks, a UMAP fit on them (on a worker), and a parallel, batch-invariant transform.

"Fit small, transform big": a seeded sample of cells (the landmarks) is gathered on one worker,
where umap-learn is fitted (task ``umap-fit``). The fitted model is written into the store once;
a worker plugin loads it on every worker (warming numba up there) and the ``umap-transform``
tasks, one per store chunk, read it by reference, never inside the task graph. Each task writes
its chunk of ``X_umap`` and of the kNN graph (``knn_landmark``, ``knn_weight``: each cell's k
nearest landmarks as cell indices, and their membership weights; a landmark's are its k nearest
other landmarks) and sets its marker, so a re-run resumes and no block is written twice.

The model is a group of plain arrays with JSON attributes (``umap_model/``, see
:mod:`distumap._format`), validated when it is loaded: a store is data, never code.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from distributed.diagnostics.plugin import WorkerPlugin

from distumap import _config, _memory, _progress
from distumap._compute import current_client
from distumap._errors import InputError
from distumap._format import MODEL_GROUP, stages
from distumap._stage import Stage
from distumap._store import open_store, read_group, store_of, write_group, write_variables
from distumap.pp import log2p1
from distumap.tl import _model


def landmarks(
    ds: xr.Dataset,
    n: int | None = None,
    *,
    stratify: str | None = None,
    seed: int | None = None,
    min_per_group: int | None = None,
) -> xr.DataArray:
    """Choose landmark cells: a seeded sample, uniform or stratified by a metadata column.

    Parameters
    ----------
    ds
        The store as a Dataset.
    n
        Number of landmarks (default ``distumap.landmarks``); all cells if ``n`` is not smaller.
    stratify
        A cell coordinate (e.g. ``subclass_label``). Each group gets
        ``min(group size, min_per_group)`` landmarks, and the rest are shared in proportion to
        group size, so rare populations are represented.
    seed
        Random seed (default ``distumap.seed``).
    min_per_group
        Landmarks guaranteed to each group when stratifying (default ``distumap.min-per-group``).

    Returns
    -------
    xarray.DataArray
        Boolean over ``cell``. Computes nothing but a sample of indices.

    Examples
    --------
    >>> is_landmark = distumap.tl.landmarks(ds, 20000, stratify="subclass_label")  # doctest: +SKIP
    """
    n_cells = ds.sizes["cell"]
    n = int(_config.get("landmarks", n))
    seed = int(_config.get("seed", seed))
    if n < 2:
        raise InputError(f"landmarks must be at least 2, not {n}")
    rng = np.random.default_rng(seed)
    if n >= n_cells:
        chosen = np.arange(n_cells)
    elif stratify is None:
        chosen = rng.choice(n_cells, size=n, replace=False)
    else:
        if stratify not in ds.coords:
            raise InputError(f"cannot stratify by {stratify!r}: no such cell coordinate")
        minimum = int(_config.get("min-per-group", min_per_group))
        chosen = _stratified(np.asarray(ds[stratify].values).astype(str), n, minimum, rng)
    mask = np.zeros(n_cells, dtype=bool)
    mask[chosen] = True
    return xr.DataArray(mask, dims=("cell",), coords={"cell": ds["cell"]}, name="landmark")


def _stratified(groups: np.ndarray, n: int, minimum: int, rng: np.random.Generator) -> np.ndarray:
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    quota = np.minimum(sizes, minimum)
    if quota.sum() > n:  # more groups than room: the smallest guarantees shrink evenly
        quota = np.minimum(sizes, max(1, n // len(names)))
    rest = n - quota.sum()
    spare = sizes - quota
    if rest > 0 and spare.sum() > 0:
        share = rest * spare / spare.sum()
        extra = np.floor(share).astype(np.int64)
        leftover = rest - extra.sum()
        extra[np.argsort(-(share - extra), kind="stable")[:leftover]] += 1
        quota = quota + np.minimum(extra, spare)
    chosen = []
    for group, k in enumerate(quota):
        members = np.flatnonzero(inverse == group)
        chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.concatenate(chosen)


# ---------------------------------------------------------------- the model, by reference


def _save_model(store: str, model: _model.LandmarkModel, token: str) -> None:
    arrays, attrs = _model.to_arrays(model)
    write_group(store, MODEL_GROUP, arrays, {**attrs, "token": token})


@lru_cache(maxsize=2)
def _load_model(store: str, token: str) -> _model.LandmarkModel:
    """The fitted model, read and validated once per process (and per fit, through ``token``)."""
    arrays, attrs = read_group(store, MODEL_GROUP)
    if attrs.get("token") != token:
        raise RuntimeError(f"{store}: the stored UMAP model is not the one this run fitted")
    model = _model.from_arrays(arrays, attrs, source=f"{store}/{MODEL_GROUP}")
    _model.warm_up(model)
    return model


def _model_saved(store: str, token: str) -> bool:
    """Whether the fit finished: the model of this run (``token``) is in the store."""
    try:
        return read_group(store, MODEL_GROUP)[1].get("token") == token
    except FileNotFoundError:
        return False


class ModelPlugin(WorkerPlugin):
    """Worker plugin: loads the fitted model on each worker once and compiles the kernels there,
    so the dashboard shows transform work, not compilation."""

    name = "distumap-umap-model"

    def __init__(self, store: str, token: str):
        self.store, self.token = store, token

    def setup(self, worker=None) -> None:
        _load_model(self.store, self.token)

    def teardown(self, worker=None) -> None:
        _load_model.cache_clear()


def _fit_task(features: np.ndarray, store: str, token: str, params: dict[str, Any]) -> np.ndarray:
    model = _model.fit_landmark_model(
        features,
        n_pca=params["pca"],
        n_neighbors=params["n_neighbors"],
        min_dist=params["min_dist"],
        seed=params["seed"],
        transform_epochs=params["transform_epochs"],
    )
    _save_model(store, model, token)
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
) -> int:
    """Embed one store chunk of cells and write it, with each cell's nearest landmarks; send an
    even sample of its points to the dashboard page, coloured by the cell coordinate ``color``."""
    model = _load_model(store, token)
    cells = np.arange(first_cell, first_cell + block.shape[0], dtype=np.int64)
    coords = np.empty((block.shape[0], 2), dtype=np.float32)
    neighbors = np.empty((block.shape[0], model.n_neighbors), dtype=np.int64)
    weights = np.empty((block.shape[0], model.n_neighbors), dtype=np.float32)
    is_landmark = np.zeros(block.shape[0], dtype=bool)
    is_landmark[landmark_rows - first_cell] = True
    # landmarks keep their fitted coordinates; only the others are transformed
    coords[is_landmark] = model.landmark_embedding[landmark_order]
    neighbors[is_landmark], weights[is_landmark] = _model.landmark_knn(model, landmark_order)
    if (~is_landmark).any():
        coords[~is_landmark], neighbors[~is_landmark], weights[~is_landmark] = _model.transform(
            model, block[~is_landmark], cells[~is_landmark], return_knn=True
        )
    rows = slice(first_cell, first_cell + len(cells))
    zarr.open_array(store, path="knn_landmark", mode="r+")[rows] = landmark_cells[neighbors]
    zarr.open_array(store, path="knn_weight", mode="r+")[rows] = weights
    zarr.open_array(store, path="X_umap", mode="r+")[rows] = coords
    labels = None if color is None else zarr.open_array(store, path=color, mode="r")[rows]
    _progress.send_points("embed", first_cell, coords, labels, first_cell=first_cell, total=n_cells)
    return len(cells)


def _embed_params(**given: Any) -> dict[str, Any]:
    names = {
        "landmarks": "landmarks",
        "pca": "pca",
        "n_neighbors": "n-neighbors",
        "min_dist": "min-dist",
        "seed": "seed",
        "transform_epochs": "transform-epochs",
    }
    params = {key: _config.get(option, given.get(key)) for key, option in names.items()}
    for key in ("landmarks", "pca", "n_neighbors", "seed", "transform_epochs"):
        params[key] = int(params[key])
    params["min_dist"] = float(params["min_dist"])
    params["stratify"] = given.get("stratify")
    if params["pca"] < 0 or params["n_neighbors"] < 2:
        raise InputError("pca must be >= 0 and n_neighbors >= 2")
    return params


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
        SGD epochs for each transformed cell (default ``distumap.transform-epochs``).
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

    Notes
    -----
    This computes. Features are log2(x+1) of the selected genes, built lazily from ``counts``.
    A cell's coordinates depend only on its own values, its index and the fitted model, never on
    the chunk size or the number of workers. A finished stage with the same parameters is
    skipped; an interrupted one resumes with the blocks not yet written.

    Examples
    --------
    >>> ds = distumap.tl.umap(ds, landmarks=20000, stratify="subclass_label")  # doctest: +SKIP
    """
    location = store_of(ds, store) if isinstance(ds, xr.Dataset) else str(ds)
    params = _embed_params(
        landmarks=landmarks,
        stratify=stratify,
        pca=pca,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        seed=seed,
        transform_epochs=transform_epochs,
    )
    stage = Stage(location, "embed", params, requires="preprocess", progress=progress)
    if stage.finished:
        return open_store(location)
    ds = open_store(location, require="preprocess")
    if color is not None and (color not in ds.coords or ds[color].dims != ("cell",)):
        raise InputError(f"color {color!r}: no such cell coordinate")
    features = log2p1(ds).data
    n_cells = ds.sizes["cell"]
    # the stages embed depends on, not embed's own record: a re-run must find the same token
    earlier = {k: v for k, v in stages(ds).items() if k in ("ingest", "preprocess")}
    token = tokenize(location, params, earlier)

    client = current_client()
    # before any heavy work: a block or a fit that cannot fit in a worker is refused (exit 2)
    _memory.check_blocks(client, "embed", max(ds["counts"].data.chunks[0]), ds.sizes["gene"])
    if stage.resumable(token=token) and _model_saved(location, token):
        is_landmark = ds["landmark"].values  # written when the interrupted run started
        fit_seconds = None  # fitted by the interrupted run
    else:
        is_landmark = _landmark_mask(ds, params)
        _memory.check_fit(
            client, int(is_landmark.sum()), features.shape[1], params["pca"], params["n_neighbors"]
        )
        chunks = ds["counts"].data.chunks[0]
        stage.start(n_blocks=len(chunks), token=token)
        k = params["n_neighbors"]

        def placeholder(width: int, dtype: str) -> da.Array:
            return da.zeros((n_cells, width), chunks=(chunks, width), dtype=dtype)

        placeholders = {
            "X_umap": (("cell", "umap"), placeholder(2, "f4")),
            "knn_landmark": (("cell", "knn"), placeholder(k, "i4")),
            "knn_weight": (("cell", "knn"), placeholder(k, "f4")),
        }
        if ds.sizes.get("knn", k) != k:  # a re-embed with another k: the old graph goes
            _drop_arrays(location, ["knn_landmark", "knn_weight"])
            ds = ds.drop_vars(["knn_landmark", "knn_weight"])
        write_variables(
            location,
            xr.Dataset({**placeholders, "landmark": ("cell", is_landmark)}),
            compute=False,
            # a re-embed with other parameters keeps the existing arrays (same chunks) and
            # rewrites every block; xarray refuses an encoding for a variable that exists
            encoding={
                name: {"chunks": (chunks[0], value[1].shape[1])}
                for name, value in placeholders.items()
                if name not in ds
            },
        )
        rows = np.flatnonzero(is_landmark)
        fit = dask.delayed(_fit_task, pure=False)(
            features[rows], location, token, params, dask_key_name=f"umap-fit-{token}"
        )
        fit_started = time.perf_counter()
        stage.compute([fit], label="embed: fit UMAP on landmarks")
        fit_seconds = round(time.perf_counter() - fit_started, 3)

    if client is not None:
        client.register_plugin(ModelPlugin(location, token))
    rows = np.flatnonzero(is_landmark)
    # every task maps landmark indices to cell indices: one shared key, not a copy per task
    landmark_cells = dask.delayed(rows.astype(np.int32), name=f"landmark-cells-{token}")
    bounds = np.cumsum((0, *features.chunks[0]))
    blocks = features.to_delayed().ravel()
    calls = {}
    for i in stage.pending():
        first, last = int(bounds[i]), int(bounds[i + 1])
        lo, hi = np.searchsorted(rows, [first, last])
        args = (blocks[i], first, rows[lo:hi], np.arange(lo, hi), landmark_cells)
        kwargs = {"store": location, "token": token, "n_cells": n_cells, "color": color}
        calls[i] = (args, kwargs)
    transform_started = time.perf_counter()
    stage.run_blocks(
        _transform_task, calls, key="umap-transform", label="embed: transform cells", total=n_cells
    )
    stage.complete(
        landmarks_used=len(rows),
        fit_seconds=fit_seconds,
        transform_seconds=round(time.perf_counter() - transform_started, 3),
        transformed_cells=int(n_cells - len(rows)),
    )
    return open_store(location)


def _drop_arrays(store: str, names: list[str]) -> None:
    group = zarr.open_group(store, mode="r+")
    for name in names:
        if name in group:
            del group[name]


def _landmark_mask(ds: xr.Dataset, params: dict[str, Any]) -> np.ndarray:
    return landmarks(
        ds, params["landmarks"], stratify=params["stratify"], seed=params["seed"]
    ).values

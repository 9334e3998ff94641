"""The preprocess stage: gene statistics by the chosen recipe, written to the store, and the
selected genes' counts copied into a cache that every later reader uses.

The recipes (see :mod:`distumap.pp._recipes`): ``log2p1``, the default, selects the genes with
fewer zeros than ``max_zero_fraction`` of cells; ``scanpy`` selects scanpy's highly variable genes
of the normalised, log1p data and also writes the per-cell totals that the embed normalises with.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from distumap import _config, _memory, _progress
from distumap._compute import current_client
from distumap._errors import InputError
from distumap._format import REP, REP_KEY
from distumap._stage import Stage
from distumap._store import codec_of, drop_arrays, open_store, store_of, write_variables
from distumap.pp._preprocess import (
    CACHE,
    ingested_zero_counts,
    max_zero_fraction_of,
    zero_counts,
)
from distumap.pp._recipes import HVG_VARIABLES, RECIPES, TOTALS, highly_variable_genes


def _select_task(store: str, first: int, last: int, gene_index: np.ndarray) -> int:
    """Copy the selected genes of cells ``first:last`` into the cache."""
    import zarr

    counts = zarr.open_array(store, path="counts", mode="r")
    # an orthogonal selection: zarr copies the selected genes out of each decoded chunk, where
    # counts[first:last][:, gene_index] would first copy the whole block into a new array,
    # freshly faulted in: several times slower a chunk (benchmarks/RESULTS.md)
    zarr.open_array(store, path=CACHE, mode="r+")[first:last] = counts.oindex[
        first:last, gene_index
    ]
    return last - first


def preprocess(
    ds: xr.Dataset | str,
    *,
    recipe: str | None = None,
    max_zero_fraction: float | None = None,
    n_top_genes: int | None = None,
    target_sum: float | None = None,
    store: str | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """The preprocess stage: compute the gene statistics on the workers and write them to the store.

    Parameters
    ----------
    ds
        The store (a Dataset from :func:`distumap.io.open_store`, or its path).
    recipe
        ``"log2p1"`` (default ``distumap.recipe``): genes with few zeros, embedded from
        log2(x+1) of their counts. ``"scanpy"``: scanpy's ``normalize_total``, ``log1p`` and
        ``highly_variable_genes(flavor="seurat")``; the embed uses log1p of the normalised counts
        of the highly variable genes.
    max_zero_fraction
        The ``log2p1`` recipe's threshold, see :func:`filter_genes`.
    n_top_genes, target_sum
        The ``scanpy`` recipe's highly variable genes to select (default
        ``distumap.n-top-genes``, 2000) and total per cell after normalisation (default
        ``distumap.target-sum``, 1e4).
    store
        Where to write, if ``ds`` was not opened by :func:`distumap.io.open_store`.
    progress
        Show a progress bar (with a distributed client).

    Returns
    -------
    xarray.Dataset
        The store reopened, with ``zero_fraction`` and ``selected``; with the ``scanpy`` recipe
        also ``means``, ``dispersions``, ``dispersions_norm`` (per gene, scanpy's ``var``
        columns; ``selected`` is ``highly_variable``) and ``counts_per_cell``.

    A store ingested with ``use_rep`` and without counts has nothing to preprocess: the stage
    is recorded (its embed uses the representation) and nothing is computed or written.

    Notes
    -----
    This computes: one pass over ``counts`` on the current scheduler (the ``log2p1`` recipe
    reads the ingest's per-block zero counts instead where it wrote them). Only per-gene and
    per-cell vectors travel back. The recipe and its settings are the stage's parameters: a
    finished stage with the same ones is skipped.

    Examples
    --------
    >>> ds = distumap.pp.preprocess("out/store.zarr")  # doctest: +SKIP
    >>> ds = distumap.pp.preprocess(ds, recipe="scanpy", n_top_genes=2000)  # doctest: +SKIP
    """
    location = store_of(ds, store) if isinstance(ds, xr.Dataset) else str(ds)
    params = stage_params(
        recipe=recipe,
        max_zero_fraction=max_zero_fraction,
        n_top_genes=n_top_genes,
        target_sum=target_sum,
    )
    stage = Stage(location, "preprocess", params, requires="ingest", progress=progress)
    if stage.finished:
        return open_store(location)
    if not isinstance(ds, xr.Dataset):
        ds = open_store(location)
    if "counts" not in ds:
        return _without_counts(stage, ds, location)
    counts = ds["counts"]
    chunks = counts.data.chunks[0]
    # the scanpy recipe holds float32 copies of a block beside its counts
    itemsize = counts.dtype.itemsize + (8 if "recipe" in params else 0)
    _memory.check_blocks(current_client(), "preprocess", max(chunks), ds.sizes["gene"], itemsize)
    if not (stage.resumable() and CACHE in ds):
        _gene_statistics(stage, ds, location, params)
    gene_index = _copy_selected(stage, location, chunks, ds.sizes["cell"])
    _progress.report("preprocess", len(gene_index), ds.sizes["gene"])
    stage.complete(genes_selected=len(gene_index))
    return open_store(location)


def _without_counts(stage: Stage, ds: xr.Dataset, location: str) -> xr.Dataset:
    """A store ingested with ``use_rep`` and no counts: there are no genes to filter, and the
    embed's features are the representation. The stage records that and computes nothing."""
    if REP not in ds:
        raise InputError(f"{location}: the store holds neither counts nor a representation")
    stage.start()
    stage.complete(genes_selected=0, features=f"obsm {ds[REP].attrs.get(REP_KEY)} (no counts)")
    return open_store(location)


def stage_params(
    *,
    recipe: str | None = None,
    max_zero_fraction: float | None = None,
    n_top_genes: int | None = None,
    target_sum: float | None = None,
) -> dict[str, Any]:
    """The preprocess stage's parameters. The default recipe's record is what it always was
    (``max_zero_fraction`` alone), so that stores preprocessed before recipes existed resume."""
    recipe = str(_config.get("recipe", recipe))
    if recipe not in RECIPES:
        raise InputError(f"recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    if recipe == "log2p1":
        return {"max_zero_fraction": max_zero_fraction_of(max_zero_fraction)}
    params = {
        "recipe": recipe,
        "n_top_genes": int(_config.get("n-top-genes", n_top_genes)),
        "target_sum": float(_config.get("target-sum", target_sum)),
    }
    if params["n_top_genes"] < 1 or not params["target_sum"] > 0:
        raise InputError("n_top_genes must be >= 1 and target_sum > 0")
    return params


def _gene_statistics(stage: Stage, ds: xr.Dataset, location: str, params: dict[str, Any]) -> None:
    """Start the stage: write the recipe's gene (and cell) variables, ``selected`` among them,
    then the empty cache of the selected genes' counts. Refuses (and writes nothing) when no
    gene is selected."""
    counts = ds["counts"]
    chunks = counts.data.chunks[0]
    # a cache, or another recipe's variables, left by a run with other parameters must not
    # pass for this run's
    drop_arrays(location, [CACHE, TOTALS, *HVG_VARIABLES])
    stage.start(n_blocks=len(chunks))
    if "recipe" in params:
        variables = _scanpy_statistics(stage, ds, params)
    else:
        variables = _zero_fraction_statistics(stage, ds, location, params["max_zero_fraction"])
    encoding = {TOTALS: {"chunks": (chunks[0],)}} if TOTALS in variables else None
    write_variables(location, variables, encoding=encoding)
    n_selected = int(variables["selected"].sum())
    # the cache's array last: with it, a resume knows the gene statistics are written
    placeholder = da.zeros(
        (ds.sizes["cell"], n_selected), chunks=(chunks, n_selected), dtype=counts.dtype
    )
    write_variables(
        location,
        xr.Dataset({CACHE: (("cell", "selected_gene"), placeholder)}),
        compute=False,
        encoding={CACHE: {"chunks": (chunks[0], n_selected), **codec_of(location)}},
    )


def _zero_fraction_statistics(
    stage: Stage, ds: xr.Dataset, location: str, threshold: float
) -> xr.Dataset:
    """The ``log2p1`` recipe: ``zero_fraction`` and ``selected``, from the ingest's per-block
    non-zero counts where it wrote them, else a pass over every count (an older store)."""
    stats = ingested_zero_counts(location, ds)
    stats = zero_counts(ds).data if stats is None else stats
    (zeros,) = stage.compute([stats], label="preprocess: gene statistics")
    n_cells = max(ds.sizes["cell"], 1)
    selected = (zeros / n_cells) < threshold
    if not selected.any():
        # refused before anything is written: the stage stays "started", so a re-run
        # refuses too
        raise InputError(
            f"{location}: no gene has a zero fraction below {threshold} "
            f"(the lowest is {zeros.min() / n_cells:.4f}); raise --max-zero-fraction"
        )
    return xr.Dataset(
        {
            "zero_fraction": ("gene", (zeros / n_cells).astype(np.float32)),
            "selected": ("gene", selected),
        }
    )


def _scanpy_statistics(stage: Stage, ds: xr.Dataset, params: dict[str, Any]) -> xr.Dataset:
    """The ``scanpy`` recipe: scanpy's highly variable genes (as ``selected``) and ``var``
    columns, ``zero_fraction``, and the per-cell totals, in one pass over the counts."""
    hvg = highly_variable_genes(
        ds, n_top_genes=params["n_top_genes"], target_sum=params["target_sum"]
    )
    names = [*HVG_VARIABLES, "highly_variable", "zero_fraction", TOTALS]
    values = stage.compute(
        [hvg[name].data for name in names], label="preprocess: highly variable genes"
    )
    variables = {name: (hvg[name].dims, value) for name, value in zip(names, values, strict=True)}
    variables["selected"] = variables.pop("highly_variable")
    return xr.Dataset(variables)


def _copy_selected(
    stage: Stage, location: str, chunks: tuple[int, ...], n_cells: int
) -> np.ndarray:
    """Copy the selected genes' counts into the cache, a task per store chunk not yet done;
    return the selected genes' indices."""
    gene_index = np.flatnonzero(open_store(location)["selected"].values)
    bounds = np.cumsum((0, *chunks))
    calls = {
        block: ((location, int(bounds[block]), int(bounds[block + 1]), gene_index), {})
        for block in stage.pending()
    }
    stage.run_blocks(
        _select_task,
        calls,
        key="select-genes",
        label="preprocess: copy the selected genes",
        total=n_cells,
        step="select",
    )
    return gene_index

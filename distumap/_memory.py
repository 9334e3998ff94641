"""What a task needs in memory, known from the shapes before the work starts.

A worker that runs out of memory is killed by its nanny and the task retried on another, until
Dask gives up minutes later with a message about the task, not the cause. So the stages ask
here first: a block that would not fit is made smaller where that cannot change the result (the
ingest's cells per chunk, when the user did not choose it), and anything else is refused with
exit 2, the numbers and the flag that fixes it.

The figures are measured (``benchmarks/memory.py``, recorded in ``benchmarks/RESULTS.md``):
resident memory of a process that has imported and warmed up umap-learn, and the peak above it
of :func:`distumap.tl._model.fit_landmark_model` over a grid of shapes. They are conservative
fits, not bounds; ``distumap.memory-check: false`` turns the check off.
"""

from __future__ import annotations

import math
import warnings

from distumap import _config
from distumap._errors import InputError

GIB = 2**30

#: a worker that has imported umap-learn and compiled its kernels (measured: see the module)
WARMED_WORKER = int(0.45 * GIB)
#: a worker running the block tasks of ingest and preprocess (numba kernels, zarr, h5py)
BLOCK_WORKER = int(0.35 * GIB)
#: the worker is killed at 95% of its limit (``distributed.worker.memory.terminate``); the
#: estimates are fits, so work is planned to stay under this share of the limit
USABLE_SHARE = 0.85
#: a block task holds about this many copies of its dense block: the block itself, its encoded
#: form and the codec's shuffle buffer (measured: see the module)
BLOCK_COPIES = 3
#: smallest block the ingest shrinks to before it refuses
MIN_CHUNK_CELLS = 64


def fit_bytes(n_landmarks: int, n_genes: int, n_pca: int, n_neighbors: int = 30) -> int:
    """Bytes the UMAP fit needs above a warmed-up worker, from the landmark matrix's shape.

    Parameters
    ----------
    n_landmarks, n_genes
        Shape of the float32 matrix the fit receives (landmarks x selected genes).
    n_pca
        Principal components (0: UMAP on the genes themselves).
    n_neighbors
        umap-learn's ``n_neighbors``.

    Returns
    -------
    int
        Estimated peak bytes above the worker's resident memory before the task.

    Notes
    -----
    Fitted to measurements over a grid of shapes (``benchmarks/memory.py``): with PCA the peak
    is the input, the centred copy PCA makes, a constant and a few KB per landmark (the kNN
    graph and the optimisation); without PCA umap-learn's nearest-neighbour descent on the genes
    themselves holds about three copies of the input.
    """
    matrix = n_landmarks * n_genes * 4
    graph = n_landmarks * n_neighbors * 100  # neighbours and weights, in the graph's copies
    if 0 < n_pca < n_genes:
        return int(0.16 * GIB + 2.0 * matrix + graph)
    return int(0.26 * GIB + 2.9 * matrix + graph)


#: margin on the refinement's arrays (:func:`refine_bytes`) for what else its tasks hold: with
#: it the estimate at 1,000,000 cells and 50 components (1.10 GiB with the warmed worker) lies
#: above the largest worker's peak measured there, whatever the stage (0.87-1.08 GiB;
#: benchmarks/RESULTS.md, "Atlas scale", "The client streams", "The graph by rows")
REFINE_MARGIN = 3.0
#: the process that runs a command (the client, with the embedded cluster's scheduler) holds
#: a code and an embedding row per cell while it draws, and a hash per cell in the ingest: its
#: peak is about CLIENT_BASE + CLIENT_PER_CELL x cells, above the atlas runs' client peaks
#: (0.52 GiB at 100,000 cells, 0.59 at 300,000, 0.60 at 1,000,000 since the skeleton streams
#: and the heap is bounded; benchmarks/RESULTS.md, "The client's heap")
CLIENT_BASE = int(0.6 * GIB)
CLIENT_PER_CELL = 400


def search_passes(n_cells: int, n_features: int) -> int:
    """Passes of the refinement's nearest-cell search over ``n_cells`` cells' features of
    ``n_features`` float32 each: enough that each holds at most ``distumap.search-pass-bytes``
    of them (256 MiB: one pass up to 1.3 million cells of 50 components)."""
    budget = max(int(_config.get("search-pass-bytes")), 1)
    return max(1, -(-n_cells * 4 * n_features // budget))


def refine_bytes(n_cells: int, n_features: int, n_neighbors: int = 15) -> int:
    """Bytes the embed's refinement holds on every worker above a warmed-up worker.

    Parameters
    ----------
    n_cells
        Cells of the store.
    n_features
        Width of the kNN features (principal components, or the representation's columns).
    n_neighbors
        Nearest cells per cell in the refinement's graph.

    Returns
    -------
    int
        The larger of its steps, times :data:`REFINE_MARGIN`: a pass of the nearest-cell search
        holds its buckets' cells' features with their order (and their sort while it is built;
        :func:`search_passes`) and every cell's bucket; the epochs hold two copies of every
        cell's position (and their own cells' rows of the graph, which do not grow with the
        cells; ``n_neighbors`` no longer counts).
    """
    held = -(-n_cells // search_passes(n_cells, n_features))
    search = (4 * n_features + 24) * held + 5 * n_cells
    epochs = 16 * n_cells
    return int(REFINE_MARGIN * max(search, epochs))


def client_bytes(n_cells: int) -> int:
    """Bytes the command's own process needs at its peak for ``n_cells`` cells (exports and
    pictures; see :data:`CLIENT_PER_CELL`)."""
    return CLIENT_BASE + CLIENT_PER_CELL * n_cells


def block_bytes(chunk_cells: int, n_genes: int, itemsize: int = 4) -> int:
    """Bytes one block task needs above its worker's resident memory."""
    return BLOCK_COPIES * chunk_cells * n_genes * itemsize


def workers(client) -> list[dict]:
    """Each worker's ``memory_limit`` (bytes, 0 for none), ``nthreads`` and resident memory."""
    if client is None:
        return []
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
    except Exception:  # an old scheduler, a closed client: no check rather than a failure
        return []
    return [
        {
            "address": address,
            "memory_limit": int(worker.get("memory_limit") or 0),
            "nthreads": int(worker.get("nthreads") or 1),
            "memory": int((worker.get("metrics") or {}).get("memory") or 0),
        }
        for address, worker in info.items()
    ]


def _limited(client) -> list[dict]:
    """The workers that have a memory limit, or none when the check is off."""
    if not _config.get("memory-check"):
        return []
    return [w for w in workers(client) if w["memory_limit"] > 0]


def gib(n: float) -> str:
    """``n`` bytes as a short GiB figure: ``1.2 GiB``."""
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


def _limit_flag(need: int) -> str:
    """A ``--memory-limit`` value (in tenths of a GiB) under which ``need`` fits."""
    return f"{math.ceil(need / USABLE_SHARE / GIB * 10) / 10:g}GiB"


def check_fit(client, n_landmarks: int, n_genes: int, n_pca: int, n_neighbors: int) -> None:
    """Refuse a UMAP fit that would not fit in the smallest worker's memory limit.

    Parameters
    ----------
    client
        The distributed client (None: nothing to check).
    n_landmarks, n_genes, n_pca, n_neighbors
        The fit's shape and parameters.

    Raises
    ------
    InputError
        With the estimate, the limit, and the ``--landmarks`` and ``--memory-limit`` values
        under which the fit would run.
    """
    limited = _limited(client)
    if not limited:
        return
    limit = min(w["memory_limit"] for w in limited)
    need = WARMED_WORKER + fit_bytes(n_landmarks, n_genes, n_pca, n_neighbors)
    if need <= USABLE_SHARE * limit:
        return
    fewer = n_landmarks
    while fewer > 2 * n_neighbors and (
        WARMED_WORKER + fit_bytes(fewer, n_genes, n_pca, n_neighbors) > USABLE_SHARE * limit
    ):
        fewer = int(fewer * 0.9)
    landmarks = (
        f"fit on fewer landmarks (--landmarks {fewer // 100 * 100})"
        if fewer > 2 * n_neighbors
        else "reduce the genes (--max-zero-fraction) or use --pca 50"
    )
    raise InputError(
        f"embed: the UMAP fit on {n_landmarks:,} landmarks x {n_genes:,} genes"
        f"{f' ({n_pca} PCs)' if 0 < n_pca < n_genes else ''} needs about {gib(need)} on one "
        f"worker, and the workers' memory limit is {gib(limit)}; give the workers more memory "
        f"(--memory-limit {_limit_flag(need)}) or {landmarks}"
    )


def check_refine(client, n_cells: int, n_features: int, n_neighbors: int = 15) -> None:
    """Refuse a refinement whose arrays of all cells would not fit in the smallest worker.

    Raises
    ------
    InputError
        With the estimate, the limit, and the ``--memory-limit`` under which it would run or
        ``--refine-epochs 0``.
    """
    limited = _limited(client)
    if not limited:
        return
    limit = min(w["memory_limit"] for w in limited)
    need = WARMED_WORKER + refine_bytes(n_cells, n_features, n_neighbors)
    if need <= USABLE_SHARE * limit:
        return
    raise InputError(
        f"embed: the refinement of {n_cells:,} cells needs about {gib(need)} on each worker "
        "(a share of the cells' features, every cell's position), and the workers' memory "
        f"limit is {gib(limit)}; give the workers more memory (--memory-limit {_limit_flag(need)}) "
        "or skip the refinement (--refine-epochs 0)"
    )


def check_client(n_cells: int, stage: str) -> None:
    """Refuse to export ``n_cells`` cells from a process whose machine cannot hold them.

    The need (:func:`client_bytes`) is compared with the memory this process may still take:
    what it holds now plus what the machine has available, and no more than the machine's or
    its container's limit (``distributed.system.MEMORY_LIMIT``, which reads cgroups).

    Raises
    ------
    InputError
        With the estimate and the memory there is.
    """
    if not _config.get("memory-check"):
        return
    import psutil
    from distributed.system import MEMORY_LIMIT

    need = client_bytes(n_cells)
    room = min(psutil.Process().memory_info().rss + psutil.virtual_memory().available, MEMORY_LIMIT)
    if need <= USABLE_SHARE * room:
        return
    raise InputError(
        f"{stage}: {n_cells:,} cells need about {gib(need)} in this process (it holds a "
        f"few values per cell while it ingests, exports and draws), and it has "
        f"{gib(room)}; run the command on a machine with more memory (the workers can stay: "
        "--scheduler ADDRESS)"
    )


def check_blocks(client, stage: str, chunk_cells: int, n_genes: int, itemsize: int = 4) -> None:
    """Refuse block tasks of ``chunk_cells`` x ``n_genes`` that would not fit in the workers.

    Raises
    ------
    InputError
        With the estimate, the limit, and the ``--chunk-cells`` (a re-ingest) and
        ``--memory-limit`` values that fit.
    """
    fitted = fit_chunk_cells(client, chunk_cells, n_genes, itemsize)
    if fitted == chunk_cells:
        return
    limited = _limited(client)
    worker = min(limited, key=lambda w: w["memory_limit"] / w["nthreads"])
    need = BLOCK_WORKER + worker["nthreads"] * block_bytes(chunk_cells, n_genes, itemsize)
    smaller = f"re-ingest with --chunk-cells {fitted}" if fitted else "use fewer threads per worker"
    raise InputError(
        f"{stage}: {worker['nthreads']} block task(s) of {chunk_cells:,} cells x {n_genes:,} "
        f"genes need about {gib(need)} per worker, and the workers' memory limit is "
        f"{gib(worker['memory_limit'])}; give the workers more memory (--memory-limit "
        f"{_limit_flag(need)}) or {smaller}"
    )


def fit_chunk_cells(client, chunk_cells: int, n_genes: int, itemsize: int = 4) -> int:
    """The largest number of cells per block, up to ``chunk_cells``, whose tasks fit in every
    worker (as many at once as it has threads); ``chunk_cells`` when nothing is known, 0 when
    not even :data:`MIN_CHUNK_CELLS` fit."""
    limited = _limited(client)
    if not limited:
        return chunk_cells
    fitted = chunk_cells
    for worker in limited:
        room = USABLE_SHARE * worker["memory_limit"] - BLOCK_WORKER
        per_task = room / worker["nthreads"]
        fitted = min(fitted, int(per_task // block_bytes(1, n_genes, itemsize)))
    if fitted >= chunk_cells:
        return chunk_cells
    if fitted < MIN_CHUNK_CELLS:
        return 0
    return fitted // MIN_CHUNK_CELLS * MIN_CHUNK_CELLS


def ingest_chunk_cells(client, chunk_cells: int | None, n_genes: int, itemsize: int = 4) -> int:
    """Cells per store chunk for an ingest of ``n_genes`` genes.

    Parameters
    ----------
    client
        The distributed client (None: nothing is known about the workers).
    chunk_cells
        What the user asked for: kept, or refused if its blocks cannot fit. None takes
        ``distumap.chunk-cells``, made smaller (with one warning) until a block fits every worker;
        the chunk size never changes a result, only the number of tasks.
    n_genes, itemsize
        The store's width and value size.

    Raises
    ------
    InputError
        When the asked-for blocks, or even the smallest, cannot fit.
    """
    if chunk_cells is not None:
        check_blocks(client, "ingest", chunk_cells, n_genes, itemsize)
        return chunk_cells
    default = int(_config.get("chunk-cells"))
    fitted = fit_chunk_cells(client, default, n_genes, itemsize)
    if fitted == 0:
        check_blocks(client, "ingest", MIN_CHUNK_CELLS, n_genes, itemsize)  # raises
    if fitted < default:
        warnings.warn(
            f"ingest: blocks of {default:,} cells x {n_genes:,} genes would not fit in the "
            f"workers' memory limit; using {fitted:,} cells per chunk (--chunk-cells)",
            UserWarning,
            stacklevel=3,
        )
    return fitted

"""Where distumap runs: an embedded local cluster by default, or an existing Dask scheduler."""

from __future__ import annotations

import os
import sys

from distributed import Client, LocalCluster


def connect(
    scheduler: str | None = None,
    *,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | None = "auto",
    dashboard_address: str | None = ":8787",
    quiet: bool = False,
) -> Client:
    """Connect to a Dask cluster, starting a local one of worker processes if none is named.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``). Defaults to the
        ``DASK_SCHEDULER_ADDRESS`` environment variable, which the dask-kubernetes operator sets
        in job pods.
    scheduler_file
        A scheduler file written by ``dask scheduler --scheduler-file``.
    n_workers, threads_per_worker, memory_limit
        Shape of the embedded ``LocalCluster`` (used only when no scheduler is named). Workers
        are processes; one thread each suits distumap's compiled, GIL-free kernels.
    dashboard_address
        Where the embedded cluster serves its dashboard; a busy port falls back to a free one.
    quiet
        Do not print the dashboard link.

    Returns
    -------
    distributed.Client
        The client, also set as the default for dask computations.

    Examples
    --------
    >>> client = distumap.connect(n_workers=2, memory_limit="4GiB")  # doctest: +SKIP
    """
    scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if scheduler_file:
        client = Client(scheduler_file=scheduler_file)
    elif scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=dashboard_address,
            # distumap's page on the dashboard: each stage's progress
            scheduler_kwargs={"preload": ["distumap.dashboard"]},
        )
        client = Client(cluster)
        client._distumap_owns_cluster = True  # closed with the client by close()
    page = None
    try:
        from distumap import dashboard

        page = dashboard.install(client) if client.cluster is None else dashboard.page_link(client)
    except Exception as error:  # a remote scheduler that cannot import distumap: no page
        if not quiet:
            print(f"distumap: no progress page on the dashboard ({error})", file=sys.stderr)
    if not quiet:
        address = client.scheduler.address if client.scheduler is not None else "?"
        print(f"distumap: Dask scheduler at {address}", file=sys.stderr, flush=True)
        print(f"distumap: Dask dashboard at {client.dashboard_link}", file=sys.stderr, flush=True)
        if page:
            print(f"distumap: stage progress at {page}", file=sys.stderr, flush=True)
    return client


#: seconds that closing the client or the embedded cluster may take, even when it is gone
CLOSE_TIMEOUT = 20


def close(client: Client) -> None:
    """Close ``client``, and the cluster too if :func:`connect` started it, in bounded time."""
    cluster = client.cluster if getattr(client, "_distumap_owns_cluster", False) else None
    try:
        client.close(timeout=CLOSE_TIMEOUT)
    finally:
        if cluster is not None:
            cluster.close(timeout=CLOSE_TIMEOUT)

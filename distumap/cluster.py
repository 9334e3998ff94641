"""Where distumap runs: an embedded local cluster by default, or an existing Dask scheduler."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import dask.config
from distributed import Client, LocalCluster


def connect(
    scheduler: str | None = None,
    *,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | None = "auto",
    dashboard_address: str | None = ":8787",
    processes: bool = True,
    quiet: bool = False,
) -> Client:
    """Connect to a Dask cluster, starting a local one if none is named.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``). Defaults to the
        ``DASK_SCHEDULER_ADDRESS`` environment variable, which the dask-kubernetes operator sets
        in job pods.
    scheduler_file
        A scheduler file written by ``dask scheduler --scheduler-file``.
    n_workers, threads_per_worker, memory_limit
        Shape of the embedded ``LocalCluster`` (used only when no scheduler is named). One
        thread per worker suits distumap's compiled, GIL-free kernels.
    dashboard_address
        Where the embedded cluster serves its dashboard; a busy port falls back to a free one.
    processes
        False: the embedded cluster's workers are threads of this process, with the thread
        settings (one BLAS and OpenMP thread) that worker processes get from their nanny. For
        small inputs, where starting worker processes would take most of the time.
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
        restore = None if processes else _one_thread_libraries()
        # threads of this process measure this process, the client's memory included: one that
        # paused above its share of the limit would never resume (no nanny restarts it). Their
        # limit stays for the estimates that refuse work before it starts (distumap._memory)
        fractions = () if processes else ("target", "spill", "pause")
        unmanaged = {f"distributed.worker.memory.{name}": False for name in fractions}
        with dask.config.set(unmanaged):
            cluster = LocalCluster(
                n_workers=n_workers or os.cpu_count() or 1,
                threads_per_worker=threads_per_worker,
                processes=processes,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address,
                # distumap's page on the dashboard: each stage's progress
                scheduler_kwargs={"preload": ["distumap.dashboard"]},
            )
        client = Client(cluster)
        client._distumap_owns_cluster = True  # closed with the client by close()
        client._distumap_restore = restore  # undone by close()
        if processes:
            from distumap._workers import quick_exit_plugin

            client.register_plugin(quick_exit_plugin())
    page = None
    try:
        from distumap import dashboard

        page = dashboard.install(client) if client.cluster is None else dashboard.page_link(client)
    except Exception as error:  # a remote scheduler that cannot import distumap: no page
        if not quiet:
            print(f"distumap: no progress page on the dashboard ({error})", file=sys.stderr)
    if not quiet:
        address = client.scheduler.address if client.scheduler is not None else "?"
        # a small input's workers are threads of this process: said on the same line
        threads = " (a small input: the workers are threads of this process)"
        in_process = not processes and client.cluster is not None
        print(
            f"distumap: Dask scheduler at {address}{threads if in_process else ''}",
            file=sys.stderr,
            flush=True,
        )
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
        try:
            if cluster is not None:
                cluster.close(timeout=CLOSE_TIMEOUT)
        finally:
            restore = getattr(client, "_distumap_restore", None)
            if restore is not None:
                restore()


def _one_thread_libraries() -> Callable[[], None]:
    """Give this process the thread settings that a nanny gives the worker processes it starts
    (``distributed.nanny.pre-spawn-environ``: one OpenMP, BLAS and MKL thread), so that tasks
    run as threads here compute what they compute in a worker process, to the bit (the number
    of BLAS threads changes the low bits of a PCA). Returns what undoes it."""
    import dask.config
    from threadpoolctl import threadpool_limits

    environ = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    names = [name for name in environ if name.endswith("_NUM_THREADS")]
    before = {name: os.environ.get(name) for name in names}
    for name in names:  # for the libraries loaded from now on
        os.environ[name] = str(environ[name])
    limits = threadpool_limits(limits=1)  # for the libraries loaded already

    def restore() -> None:
        limits.restore_original_limits()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore

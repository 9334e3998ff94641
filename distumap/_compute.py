"""Running named tasks on the current scheduler, with progress and clear failures."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import dask
from dask.utils import key_split


def current_client():
    """The distributed client dask would use now, or None (threaded or synchronous scheduler)."""
    scheduler = dask.config.get("scheduler", None)
    if scheduler not in (None, "dask.distributed", "distributed"):
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def run(
    tasks: Sequence[Any],
    *,
    stage: str,
    progress: bool = False,
    retries: int = 2,
) -> list[Any]:
    """Compute dask collections (delayed tasks or arrays) and return their results, in order.

    On a distributed client, failed tasks are retried ``retries`` times; when Dask gives up on a
    task whose workers kept dying (``KilledWorker``), the error names the stage and the block.
    """
    if not tasks:
        return []
    client = current_client()
    if client is None:
        return list(dask.compute(*tasks))
    from distributed import KilledWorker
    from distributed import progress as progress_bar

    futures = client.compute(list(tasks), retries=retries)
    try:
        if progress:
            print(f"distumap: {stage}", file=sys.stderr, flush=True)
            progress_bar(futures, notebook=False)
            print(file=sys.stderr, flush=True)
        return client.gather(futures)
    except KilledWorker as error:
        key = error.task if hasattr(error, "task") else error.args[0]
        raise RuntimeError(
            f"{stage}: Dask gave up on task {key!r} ({key_split(key)}) after its workers died "
            f"repeatedly; check the workers' memory limit and logs. Re-running the same command "
            f"resumes without redoing finished blocks."
        ) from error
    finally:
        for future in futures:
            future.release()

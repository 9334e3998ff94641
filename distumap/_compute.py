"""Running named tasks on the current scheduler: progress, clear failures, and never a hang.

Every wait on the cluster goes through :class:`Watchdog`: it polls the scheduler while futures
are pending, and when the cluster has had no worker for ``distumap.no-workers-timeout`` (or the
scheduler is gone), it raises :class:`~distumap._errors.ClusterError` naming the stage. Stages
mark their blocks as they write them, so the same command resumes once workers are back.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
from dask.utils import format_time, key_split, parse_timedelta

from distumap import _config
from distumap._errors import ClusterError

#: seconds between two looks at the scheduler while waiting
POLL_SECONDS = 1.0


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


def no_workers_timeout() -> float:
    """``distumap.no-workers-timeout`` in seconds (dask's time strings: ``20s``, ``5 minutes``)."""
    return float(parse_timedelta(_config.get("no-workers-timeout"), default="seconds"))


def _worker_count(client) -> int:
    """Workers the scheduler knows now; 0 when the scheduler cannot be reached."""
    if client.status != "running":
        return 0
    try:
        return len(client.sync(client.scheduler.ncores, callback_timeout=POLL_SECONDS * 10))
    except Exception:  # a lost connection, a timeout: no worker can be reached either way
        return 0


class Watchdog:
    """Raises :class:`ClusterError` once ``client``'s cluster has had no worker for too long."""

    def __init__(self, client, stage: str, timeout: float | None = None):
        self.client, self.stage = client, stage
        self.timeout = no_workers_timeout() if timeout is None else timeout
        self._alone_since: float | None = None

    def check(self) -> None:
        if _worker_count(self.client) > 0:
            self._alone_since = None
            return
        now = time.monotonic()
        if self._alone_since is None:
            self._alone_since = now
        elif now - self._alone_since >= self.timeout:
            gone = self.client.status != "running"
            raise ClusterError(
                f"{self.stage}: no Dask worker was available for {format_time(self.timeout)}"
                f"{' (the scheduler is unreachable)' if gone else ''}; the store is resumable: "
                "run the same command again once workers are back "
                "(setting distumap.no-workers-timeout)"
            )

    def wait(self, futures: Sequence[Any]) -> None:
        """Return once every future is finished (done, erred or cancelled)."""
        from distributed import wait

        pending = [f for f in futures if not f.done()]
        while pending:
            try:
                wait(pending, timeout=POLL_SECONDS)
            except TimeoutError:
                pass
            pending = [f for f in pending if not f.done()]
            if pending:
                self.check()


class _ProgressLine:
    """One line on stderr, redrawn in place: ``stage [#####-----] 12/27 blocks 0:00:14``."""

    WIDTH = 30

    def __init__(self, stage: str, total: int, enabled: bool):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.started = time.monotonic()
        self.drawn = -1

    def draw(self, done: int, *, final: bool = False) -> None:
        if not self.enabled or (done == self.drawn and not final):
            return
        self.drawn = done
        filled = self.WIDTH * done // max(self.total, 1)
        elapsed = format_time(time.monotonic() - self.started)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        end = "\n" if final else ""
        print(
            f"\rdistumap: {self.stage} [{bar}] {done}/{self.total} tasks {elapsed}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def _reraise(error: BaseException, stage: str, client) -> None:
    from distributed import KilledWorker

    if isinstance(error, KilledWorker):
        key = error.task if hasattr(error, "task") else error.args[0]
        raise RuntimeError(
            f"{stage}: Dask gave up on task {key!r} ({key_split(key)}) after its workers died "
            f"repeatedly; check the workers' memory limit and logs. Re-running the same command "
            f"resumes without redoing finished blocks."
        ) from error
    from asyncio import CancelledError

    if isinstance(error, CancelledError) and client.status != "running":
        raise ClusterError(
            f"{stage}: the connection to the Dask scheduler was lost; the store is resumable: "
            "run the same command again once the cluster is back"
        ) from error
    raise error


def run(
    tasks: Sequence[Any],
    *,
    stage: str,
    progress: bool = False,
    retries: int = 2,
    client=None,
) -> list[Any]:
    """Compute dask collections (delayed tasks or arrays) and return their results, in order.

    ``client`` defaults to the current distributed client (none: dask's local scheduler).

    On a distributed client, failed tasks are retried ``retries`` times; when Dask gives up on a
    task whose workers kept dying (``KilledWorker``), the error names the stage and the block.
    When the cluster has had no worker for ``distumap.no-workers-timeout``, or the scheduler is
    gone, :class:`~distumap._errors.ClusterError` names the stage.
    """
    if not tasks:
        return []
    client = client if client is not None else current_client()
    if client is None:
        return list(dask.compute(*tasks))
    from distributed import wait

    watchdog = Watchdog(client, stage)
    futures = client.compute(list(tasks), retries=retries)
    line = _ProgressLine(stage, len(futures), progress)
    try:
        pending = list(futures)
        while pending:
            # one look a second, not one per finished task: a FIRST_COMPLETED wait makes an
            # asyncio task for every pending future each time one finishes, O(tasks^2) on the
            # client (at a million cells, a third of a core while the workers need it)
            try:
                wait(pending, timeout=POLL_SECONDS)
            except TimeoutError:
                pass
            pending = [f for f in pending if not f.done()]
            line.draw(len(futures) - len(pending))
            failed = [f for f in futures if f.status in ("error", "cancelled")]
            if failed:
                break
            if pending:
                watchdog.check()
        line.draw(len(futures) - len(pending), final=True)
        try:
            return client.gather(futures)
        except BaseException as error:
            _reraise(error, stage, client)
            raise  # pragma: no cover  (_reraise always raises)
    finally:
        for future in futures:
            future.release()


def _glibc():
    """This process's glibc (ctypes), or None where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_memory() -> int:
    """Hand this process's free heap pages back to the system (glibc's ``malloc_trim``); 0
    where there is no glibc. Freed arrays of a few MB come from the heap, and without this a
    worker's resident memory stays at the high-water mark of the last stage."""
    libc = _glibc()
    return 0 if libc is None else int(libc.malloc_trim(0))


#: glibc's mallopt parameters (malloc.h) and what a command sets them to, by the environment
#: variable that, where set, wins
_MALLOPT = {"MALLOC_ARENA_MAX": (-8, 2), "MALLOC_TRIM_THRESHOLD_": (-1, 65536)}


def tune_allocator() -> dict[str, int]:
    """Bound glibc's heap in a command's own process (the client, and an embedded cluster's
    scheduler): two heap arenas instead of up to one per thread that allocates (each grows and
    keeps its own pages), and free heap above 64 KiB handed back at once, as distributed's
    nanny sets for its workers. A variable the environment sets (``MALLOC_ARENA_MAX``,
    ``MALLOC_TRIM_THRESHOLD_``) wins; without glibc, nothing changes. Returns what was set, by
    the name of its environment variable."""
    import os

    libc = _glibc()
    return {
        variable: value
        for variable, (option, value) in _MALLOPT.items()
        if libc is not None and variable not in os.environ and libc.mallopt(option, value) == 1
    }


def release_memory() -> None:
    """Collect this process's garbage, then hand its free heap back (:func:`trim_memory`): for
    the client once it drops something that held a few hundred bytes per cell."""
    import gc

    gc.collect()
    trim_memory()


def as_blocks(values, block: int | None = None):
    """``values`` as a dask array: as it is if it is one, else in blocks of ``block`` cells
    along the first axis (one block without ``block``), for code that reads a column block by
    block whether the Dataset holds it lazily or in memory."""
    import dask.array as da
    import numpy as np

    if isinstance(values, da.Array):
        return values
    values = np.asarray(values)
    rows = max(1, min(len(values), block or len(values)))
    return da.from_array(values, chunks=(rows, *values.shape[1:]))


async def _trim_memory_async() -> int:
    return trim_memory()


def on_workers_later(function, client=None) -> None:
    """Run ``function`` (a coroutine function: distributed runs only those without waiting) on
    every worker of ``client`` (default: the current one), without waiting for it: best effort,
    since a lost cluster has nothing left to do it on and must not hang the caller."""
    client = client if client is not None else current_client()
    if client is not None and client.status == "running":
        try:
            client.run(function, wait=False)
        except Exception:  # best effort: never the reason a stage fails
            pass


def release_worker_memory(client=None) -> None:
    """Have every worker of ``client`` (default: the current one) run :func:`trim_memory`."""
    on_workers_later(_trim_memory_async, client)


def own_graphs(tasks: Sequence[Any]) -> list[Any]:
    """``tasks`` (dask Delayed objects) each with only the part of the graph it needs.

    Delayed pieces of one dask array (``to_delayed``) all carry the array's whole graph; sent
    one at a time, each would pickle every task of it (at a million cells, 977 blocks x 2,900
    tasks: most of a single-writer export's time on the client). The union graph is built
    once and each task keeps its own dependencies. Anything else is returned as it is.
    """
    from dask.core import get_dependencies
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    if not tasks or not all(isinstance(task, Delayed) for task in tasks):
        return list(tasks)
    graph = dict(HighLevelGraph.merge(*(task.__dask_graph__() for task in tasks)))
    culled = []
    for task in tasks:
        needed, todo = {task.key}, [task.key]
        while todo:
            for dependency in get_dependencies(graph, todo.pop()):
                if dependency not in needed:
                    needed.add(dependency)
                    todo.append(dependency)
        culled.append(Delayed(task.key, {key: graph[key] for key in needed}))
    return culled


def results_in_order(
    tasks: Sequence[Any], *, stage: str, in_flight: int, client=None, priority: int = 0
) -> Iterator[Any]:
    """Yield the results of ``tasks`` in order, computing at most ``in_flight`` ahead.

    For single writers (HDF5): the cluster computes blocks ahead while the caller writes the
    previous ones, and memory stays bounded by ``in_flight`` results whatever the task count.
    ``client`` defaults to the current distributed client (none: dask's local scheduler);
    ``priority`` is its task priority (below 0: the workers run any other ready task first).
    """
    client = client if client is not None else current_client()
    if client is None:
        for start in range(0, len(tasks), in_flight):
            yield from dask.compute(*tasks[start : start + in_flight])
        return
    tasks = own_graphs(tasks)
    watchdog = Watchdog(client, stage)
    pending: deque = deque()
    upcoming = iter(tasks)
    try:
        for task in upcoming:
            pending.append(client.compute(task, retries=2, priority=priority))
            if len(pending) >= in_flight:
                break
        while pending:
            future = pending.popleft()
            watchdog.wait([future])
            try:
                result = future.result()
            except BaseException as error:
                _reraise(error, stage, client)
            future.release()
            for task in upcoming:
                pending.append(client.compute(task, retries=2, priority=priority))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()


def groups_in_order(
    tasks: Sequence[Any],
    *,
    group: int,
    summarize: Callable[[Any], Any],
    follow: Callable[[list[Any]], tuple[Callable[..., Any], tuple]],
    name: str,
    stage: str,
    in_flight: int,
    client,
    priority: int = 0,
) -> Iterator[tuple[list[Any], Any]]:
    """Yield, group by group in order, the summaries of ``group`` consecutive tasks' results
    and the result of a follow-up task on the workers that takes those results.

    For single writers whose work on a group depends on what came before it (where an HDF5
    chunk starts): each result stays on its worker, only ``summarize(result)`` reaches this
    process; once a group's summaries are here, ``follow(summaries)`` gives ``(function,
    args)`` and ``function(*args, *results)`` runs on a worker (key ``<name>-<group>``). At
    most ``in_flight`` results (and never fewer than two groups') are held at once; a lost
    worker's results are computed again. Needs a distributed ``client``.
    """
    tasks = own_graphs(tasks)
    watchdog = Watchdog(client, stage)
    limit = max(in_flight, 2 * group)
    held: deque = deque()  # (result, summary) futures not yet in a group
    groups: deque = deque()  # (follow-up future, summaries, the group's futures)
    upcoming = iter(enumerate(tasks))
    exhausted = False
    followed_groups = 0

    def top_up() -> None:
        nonlocal exhausted
        while not exhausted and len(held) + sum(len(g[2]) for g in groups) < limit:
            i, task = next(upcoming, (None, None))
            if task is None:
                exhausted = True
                return
            result = client.compute(task, retries=2, priority=priority)
            summary = client.submit(
                summarize, result, key=f"{name}-summary-{i}", retries=2, priority=priority
            )
            held.append((result, summary))

    def result_of(future) -> Any:
        watchdog.wait([future])
        try:
            return future.result()
        except BaseException as error:
            _reraise(error, stage, client)

    try:
        top_up()
        while held or groups:
            while held and len(groups) < 2 and (len(held) >= group or exhausted):
                members = [held.popleft() for _ in range(min(group, len(held)))]
                summaries = [result_of(summary) for _, summary in members]
                function, args = follow(summaries)
                followed = client.submit(
                    function,
                    *args,
                    *(result for result, _ in members),
                    key=f"{name}-{followed_groups}",
                    retries=2,
                    priority=priority,
                )
                followed_groups += 1
                groups.append((followed, summaries, members))
                top_up()
            followed, summaries, members = groups.popleft()
            value = result_of(followed)
            for future in (followed, *(f for pair in members for f in pair)):
                future.release()
            top_up()
            yield summaries, value
    finally:
        for future in [f for pair in held for f in pair] + [
            f for g in groups for f in (g[0], *(x for pair in g[2] for x in pair))
        ]:
            future.cancel()

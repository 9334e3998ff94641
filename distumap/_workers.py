"""Worker plumbing: plugins that run a given function on the workers, and where the fit goes.

A plugin carries the function it runs, pickled by reference (its module and name), and a worker
imports that module when it unpickles the plugin. So this module imports none of the namespaces
that use it: :mod:`distumap.tl` hands it its model loader and the warm-up of its kernels.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = [
    "BackgroundPlugin",
    "SetupPlugin",
    "WorkerCache",
    "fit_worker",
    "prepare_fit_workers",
    "quick_exit_plugin",
]

logger = logging.getLogger(__name__)


class WorkerCache:
    """The ``size`` most recent values built by key in a worker process: arrays that every task
    of a step reads whole, read once per process and shared by its tasks and threads."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:  # one reader per process; the others wait for its copy
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            # the oldest go before the new one is built: never both in memory at once
            while self._items and len(self._items) >= self.size:
                self._items.popitem(last=False)
            value = build()
            self._items[key] = value
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class SetupPlugin(WorkerPlugin):
    """Worker plugin: ``setup(*args)`` on each worker (and on every worker that joins later),
    ``teardown()`` when the plugin is removed or the worker closes."""

    def __init__(
        self,
        name: str,
        setup: Callable[..., None],
        args: tuple[Any, ...] = (),
        *,
        teardown: Callable[[], None] | None = None,
    ):
        self.name = name
        self.on_setup, self.args, self.on_teardown = setup, args, teardown

    def setup(self, worker=None) -> None:
        self.on_setup(*self.args)

    def teardown(self, worker=None) -> None:
        if self.on_teardown is not None:
            self.on_teardown()


class BackgroundPlugin(WorkerPlugin):
    """Worker plugin: starts ``run(part)`` in a background thread on the workers that ``parts``
    maps (address -> part); other workers run nothing. A failure is only logged: the work it
    prepares reports real problems itself, with their context, when it runs."""

    def __init__(self, name: str, run: Callable[[Any], None], parts: dict[str, Any], thread: str):
        self.name, self.run, self.parts, self.thread = name, run, parts, thread

    def setup(self, worker=None) -> None:
        part = self.parts.get(getattr(worker, "address", None))
        if part is not None:
            threading.Thread(
                target=_quietly, args=(self.run, part), name=self.thread, daemon=True
            ).start()


def quick_exit_plugin() -> SetupPlugin:
    """A plugin for the worker processes of an embedded cluster: when a worker closes, its
    process is about to end, and its objects are frozen out of the garbage collector so that
    the interpreter's exit does not walk them all in each of its collections (its nanny waits for
    that exit, and kills a worker that takes longer than its timeout)."""
    return SetupPlugin("distumap-quick-exit", _nothing, teardown=_freeze_if_worker_process)


def _nothing() -> None:
    pass


def _freeze_if_worker_process() -> None:
    import gc
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # never a process that goes on
        gc.freeze()


def _quietly(run: Callable[[Any], None], part: Any) -> None:
    try:
        run(part)
    except Exception:
        name = getattr(run, "__name__", run)
        logger.debug("%s(%r) on a worker failed", name, part, exc_info=True)


#: scheduler address -> the worker :func:`prepare_fit_workers` chose there, where the fit goes
_fit_workers: dict[str, str] = {}


def prepare_fit_workers(
    client, warm_up: Callable[[Any], None], parts: Sequence[Any], whole: Any
) -> None:
    """Have the first workers (by address) run ``warm_up(part)`` in the background, one part
    each, or the first one ``warm_up(whole)`` where there are fewer workers than parts; the
    first is where :func:`fit_worker` then sends the fit, as what it warmed up lives there.
    Without workers yet, nothing happens."""
    workers = sorted(client.scheduler_info()["workers"])
    if workers:
        if len(workers) >= len(parts) > 1:
            chosen = dict(zip(workers, parts, strict=False))
        else:
            chosen = {workers[0]: whole}
        plugin = BackgroundPlugin("distumap-fit-kernels", warm_up, chosen, "distumap-warm-up-fit")
        client.register_plugin(plugin)
        _fit_workers[client.scheduler.address] = workers[0]


def fit_worker(client) -> str | None:
    """The worker that :func:`prepare_fit_workers` chose on ``client``'s cluster, or None."""
    return _fit_workers.get(client.scheduler.address) if client is not None else None

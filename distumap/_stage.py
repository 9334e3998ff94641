"""One shape for every stage that writes into the store, written once.

A stage checks its record (finished with the same parameters: skip; started with them: resume),
marks itself started, runs one task per block that skips a block already marked, writes that
block's region and marks it, reports progress, and marks itself complete only once its result is
usable. The stages (:func:`distumap.io.read_csv`, :func:`distumap.pp.preprocess`,
:func:`distumap.tl.umap`) supply what one block does and what they record::

    stage = Stage(store, "embed", params, requires="preprocess", progress=True)
    if stage.finished:
        return open_store(store)
    stage.start(n_blocks=len(chunks))
    stage.run_blocks(transform_block, {i: (args, kwargs) for i in stage.pending()},
                     key="umap-transform", label="embed: transform cells", total=n_cells)
    stage.complete(seconds=...)

A stage that runs in passes (parse gene blocks, then transpose them into cell chunks) gives each
pass its own markers with :meth:`Stage.pass_`; only the stage itself is started and completed::

    genes = stage.pass_("ingest_genes")
    genes.create_markers(n_gene_blocks)
    genes.run_blocks(parse_gene_block, {i: (args, {}) for i in genes.pending()}, ...)

Block functions return the units they finished (cells, say) or raise
:class:`~distumap._errors.InputError` for bad input: that error comes back as a result instead of
being raised on the worker, so Dask does not retry a bad line and the user hears about the
earliest bad block of the input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import numpy as np
import zarr
from dask.base import tokenize

from distumap import _progress
from distumap._compute import current_client, release_worker_memory, run
from distumap._errors import InputError
from distumap._shared_paths import check_workers_see
from distumap._store import (
    create_progress,
    mark_stage,
    progress_array,
    require_stage,
    stage_record,
    store_url,
)

__all__ = ["Stage", "StagePass", "mark_block", "returning_input_errors", "run_block"]


def mark_block(
    store: str,
    stage: str,
    block: int,
    units: int,
    total: int,
    *,
    step: str | None = None,
    per_unit: int | None = None,
) -> None:
    """Mark ``block`` of ``stage`` written and report ``units`` of progress (of ``step``, when
    the markers serve several steps: see :func:`distumap._progress.report`)."""
    progress_array(store, stage)[block] = True
    named = {"step": step, "per_unit": per_unit}
    _progress.report(stage, units, total, block=block, **{k: v for k, v in named.items() if v})


def returning_input_errors(function: Callable[..., Any], *args, **kwargs) -> Any:
    """``function(*args, **kwargs)``, or the InputError it raised, returned instead."""
    try:
        return function(*args, **kwargs)
    except InputError as error:
        return error


def run_block(
    function: Callable[..., int],
    args: tuple,
    kwargs: dict[str, Any],
    *,
    store: str,
    stage: str,
    block: int,
    total: int,
    step: str | None = None,
    per_unit: int | None = None,
) -> int | InputError:
    """Run ``function(*args, **kwargs)`` as block ``block`` of ``stage``: skipped when its
    marker is set, marked once it has written."""
    if progress_array(store, stage, mode="r")[block]:
        return 0
    units = returning_input_errors(function, *args, **kwargs)
    if isinstance(units, InputError):
        return units
    mark_block(store, stage, block, int(units), total, step=step, per_unit=per_unit)
    return int(units)


class _Blocks:
    """What runs the blocks of one marker array, ``_progress/<markers>``: finding the pending
    blocks, one task per block that skips a marked block and marks it once written, and the check
    that every block was. :class:`Stage` adds the stage's record; :class:`StagePass` is one pass of
    a stage, with markers of its own."""

    store: str
    name: str  # the stage, whose record and parameters these blocks belong to
    markers: str  # the marker array (and the progress events' stage)
    params: dict[str, Any]
    record: dict[str, Any] | None
    progress: bool

    def has_markers(self) -> bool:
        """Whether the marker array exists (it is written last, so its skeleton can be trusted)."""
        try:
            progress_array(self.store, self.markers, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
            return False
        return True

    def pending(self) -> list[int]:
        """Blocks not yet marked written."""
        return [int(b) for b in np.flatnonzero(~progress_array(self.store, self.markers, "r")[:])]

    def compute(self, tasks: list, *, label: str) -> list[Any]:
        """Compute ``tasks`` on the current scheduler with this stage's progress and watchdog."""
        return run(tasks, stage=label, progress=self.progress)

    def _token(self) -> str:
        return tokenize(self.store, self.markers, self.params, self.record)

    def run_blocks(
        self,
        function: Callable[..., int],
        calls: Mapping[int, tuple[tuple, dict[str, Any]]],
        *,
        key: str,
        label: str,
        total: int,
        step: str | None = None,
        per_unit: int | None = None,
    ) -> int:
        """Run ``function(*args, **kwargs)`` for each ``block: (args, kwargs)`` in ``calls``.

        Each task is named ``<key>-<token>-<block>`` so the dashboard shows the stage; a block
        already marked is skipped on the worker. ``total``, ``step`` and ``per_unit`` are what
        each block's progress event says (:func:`distumap._progress.report`). Raises the
        earliest block's InputError, and RuntimeError if a block was left unmarked. Returns
        the units done.
        """
        token = self._token()
        tasks = [
            dask.delayed(run_block, pure=False)(
                function,
                args,
                kwargs,
                store=self.store,
                stage=self.markers,
                block=block,
                total=total,
                step=step,
                per_unit=per_unit,
                dask_key_name=f"{key}-{token}-{block}",
            )
            for block, (args, kwargs) in sorted(calls.items())
        ]
        return self._finish_blocks(self.compute(tasks, label=label))

    def run_sequential(
        self, function: Callable[..., int], *args, key: str, label: str, **kwargs
    ) -> int:
        """Run one task that writes every pending block in turn and marks each with
        :func:`mark_block` (an input that cannot be split, such as gzip)."""
        task = dask.delayed(returning_input_errors, pure=False)(
            function, *args, dask_key_name=f"{key}-{self._token()}", **kwargs
        )
        return self._finish_blocks(self.compute([task], label=label))

    def _finish_blocks(self, results: list[Any]) -> int:
        errors = [result for result in results if isinstance(result, InputError)]
        if errors:
            raise errors[0]
        self.require_all_blocks()
        return sum(results)

    def _what(self) -> str:
        return self.name if self.markers == self.name else f"{self.name} ({self.markers})"

    def require_all_blocks(self) -> None:
        """Raise RuntimeError unless every block of the stage is marked written."""
        missing = self.pending()
        if missing:
            raise RuntimeError(
                f"{self.store}: {self._what()} blocks {missing[:10]} were not written; "
                "run the same command again to resume"
            )


class Stage(_Blocks):
    """One run of stage ``name`` on ``store`` with ``params``.

    Parameters
    ----------
    store
        Path or fsspec URL of the store.
    name
        The stage (one of :data:`distumap._format.STAGES`); its block markers are
        ``_progress/<name>``.
    params
        What decides the result: a re-run with equal params skips a finished stage and resumes
        an interrupted one; other params start it again.
    requires
        A stage that must have finished first.
    reads
        Inputs its workers read (local paths or URLs), besides the store.
    progress
        Draw progress lines on stderr.

    Raises
    ------
    InputError
        ``requires`` did not finish, or a worker cannot see the store or an input
        (:func:`distumap._shared_paths.check_workers_see`): checked here, before any work.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        name: str,
        params: dict[str, Any],
        *,
        requires: str | None = None,
        reads: Sequence[str] = (),
        progress: bool = False,
    ):
        self.store, self.name, self.params, self.progress = store_url(store), name, params, progress
        if requires is not None:
            require_stage(self.store, requires, needed_by=name)
        check_workers_see(current_client(), reads=reads, store=self.store)
        self.record = stage_record(self.store, name)
        self.started = time.perf_counter()

    @property
    def markers(self) -> str:
        """The stage's block markers, ``_progress/<name>``."""
        return self.name

    @property
    def finished(self) -> bool:
        """Whether the stage finished with these parameters (nothing to do)."""
        return self._same_params and self.record.get("status") == "complete"

    @property
    def _same_params(self) -> bool:
        return self.record is not None and self.record.get("params") == self.params

    def resumable(self, **info: Any) -> bool:
        """Whether an interrupted run with these parameters (and ``info``) left blocks to reuse."""
        if not self._same_params or self.record.get("status") != "started":
            return False
        if any(self.record.get(key) != value for key, value in info.items()):
            return False
        return self.has_markers()

    def start(self, n_blocks: int | None = None, **info: Any) -> None:
        """Record the stage as started (later stages are invalidated) with fresh block markers."""
        mark_stage(self.store, self.name, "started", self.params, **info)
        if n_blocks is not None:
            create_progress(self.store, self.markers, np.zeros(n_blocks, dtype=bool), chunks=1)
        self.record = stage_record(self.store, self.name)
        _progress.report_status(self.name, "started")  # the page starts the stage's rows anew

    def pass_(self, markers: str) -> StagePass:
        """One pass of this stage, with its own block markers ``_progress/<markers>`` (and
        progress events of that name): see :class:`StagePass`."""
        return StagePass(self, markers)

    def complete(self, **info: Any) -> None:
        """Record the stage as complete: call only once its result is usable."""
        kept = {k: v for k, v in (self.record or {}).items() if k not in ("status", "params")}
        seconds = round(time.perf_counter() - self.started, 3)
        info = {**kept, **info, "seconds": seconds}
        mark_stage(self.store, self.name, "complete", self.params, **info)
        self.record = stage_record(self.store, self.name)
        _progress.report_status(self.name, "complete")
        release_worker_memory()  # the next stage starts from what the workers hold, not a peak


class StagePass(_Blocks):
    """One pass of a stage that runs in several (pass 1 parses gene blocks, pass 2 writes the
    cell chunks), made by :meth:`Stage.pass_`.

    It runs, skips, marks and checks its blocks as the stage does, against its own markers
    ``_progress/<markers>``, under the stage's record and parameters (its tasks' names change
    when the stage restarts). It records nothing: the stage is started and completed as a whole.
    """

    def __init__(self, stage: Stage, markers: str):
        if markers == stage.markers:
            raise ValueError(f"a pass of {stage.name!r} needs markers of its own, not {markers!r}")
        self.stage = stage
        self.store, self.name, self.params = stage.store, stage.name, stage.params
        self.progress, self.markers = stage.progress, markers

    @property
    def record(self) -> dict[str, Any] | None:
        """The stage's record, as it is now."""
        return self.stage.record

    def create_markers(self, n_blocks: int) -> None:
        """Fresh markers for the pass's ``n_blocks`` blocks, none written."""
        create_progress(self.store, self.markers, np.zeros(n_blocks, dtype=bool), chunks=1)

"""Errors that distumap reports to users. The CLI maps :class:`InputError` to exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """The input (a file, a store, an argument) is not what distumap accepts.

    The message names the file and, where it can, the line and the column.
    """


class IncompleteStoreError(InputError):
    """A stage needs a store whose earlier stage did not finish."""


class ClusterError(RuntimeError):
    """The Dask cluster cannot run the work: it has had no worker for too long, or it is gone.

    The store is left resumable: the same command picks up where it stopped once workers are back.
    """


def outside_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning name the first line outside distumap that led to
    it (the user's call of :func:`distumap.io.read`, say), however deep inside it was raised."""
    import sys

    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("distumap"):
        frame = frame.f_back
        level += 1
    return level

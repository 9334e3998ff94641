"""Where an export's output goes: a local path or an fsspec URL, written under a hidden name next
to the target and put there only when whole, so a failure never leaves a half-written output and
an older one stays as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

from distumap._paths import is_url


def partial_name(target: str) -> str:
    """A hidden temporary name next to ``target`` (same file system, so renaming is atomic)."""
    directory, name = os.path.split(os.path.abspath(target))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")


def report_written(target: str, started: float) -> None:
    """The progress line of an output that is whole at ``target``, started at ``started``
    (``time.perf_counter``)."""
    seconds = time.perf_counter() - started
    print(f"distumap export: {target} written in {seconds:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def written_whole(target: str, *, progress: bool = False) -> Iterator[str]:
    """Yield a local path to write; on success it becomes ``target`` (renamed next to it, or
    uploaded once for an fsspec URL), on failure it is removed, so a failure never leaves a
    file at ``target`` and an older file there stays as it was."""
    url = is_url(target)
    workdir = tempfile.mkdtemp(prefix="distumap-export-") if url else None
    local = os.path.join(workdir, os.path.basename(target)) if url else partial_name(target)
    started = time.perf_counter()
    try:
        yield local
        if url:
            import fsspec

            # one upload of the finished file (a multipart upload on object stores)
            fs, remote = fsspec.core.url_to_fs(target)
            fs.put_file(local, remote)
        else:
            os.replace(local, target)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.exists(local):
            os.unlink(local)
    if progress:
        report_written(target, started)


def replace_folder(local: str, target: str) -> None:
    """Put the finished folder ``local`` at ``target``, replacing what is there (which the
    caller has checked is replaceable) only once ``local`` is whole."""
    if os.path.exists(target):
        old = partial_name(target) + ".old"
        os.replace(target, old)
        os.replace(local, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(local, target)

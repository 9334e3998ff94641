"""The check that every worker sees the local paths a command reads and writes, before any work.

The workers read the inputs and read and write the store themselves. A local path on a cluster
whose workers do not share the client's file system would fail in a worker task, after the
client has begun a store there; :func:`check_workers_see` finds it first, in one round trip
(``client.run``), and refuses it in one line that names the path and the worker.

What a worker must see of each path:

- an input: it exists and can be read (a file: the size the client sees);
- an existing store: it exists, as a folder;
- a store (or output) to be made: the folder it goes in (the nearest one that exists) holds a
  file the client has just written there, and the worker can write there too (a file made and
  removed). A folder of the same name that is only the worker's own (a node's scratch disk, a
  private mount) is caught this way; a writable folder alone would not be.

Object-store URLs (``s3://``, ``gs://``, ...) are not checked: every worker reaches them over
the network. ``memory://`` is one process's memory: refused when a worker is another process.
Nothing is created at the paths themselves; the client's file is removed before this returns.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from dask.utils import parse_timedelta

from distumap import _config
from distumap._errors import ClusterError, InputError
from distumap._paths import absolute, is_local, local_path

__all__ = ["PROBE_PREFIX", "check_workers_see"]

#: the name (then a random part) of the files that show whether workers share a folder
PROBE_PREFIX = ".distumap-probe-"

_FIX = (
    "the workers read the inputs and the store themselves: put them on a file system that "
    "every worker shares (the same path on every machine), or use an object store URL "
    "(s3://, gs://, ...)"
)

#: one thing to look at on a worker: (kind, path shown to the user, path looked at, expected)
Look = tuple[str, str, str, Any]


def check_workers_see(
    client,
    *,
    reads: Sequence[str | os.PathLike] = (),
    store: str | os.PathLike | None = None,
    writes: Sequence[str | os.PathLike] = (),
    timeout: float | None = None,
) -> None:
    """Refuse, before any work, local paths that some worker of ``client``'s cluster cannot see.

    Parameters
    ----------
    client
        The ``distributed.Client`` whose workers will do the work; ``None`` (a threaded or
        synchronous scheduler, in this process) checks nothing.
    reads
        Inputs the workers read: each must exist and be readable on every worker.
    store
        The store: an existing one must exist on every worker; a new one is checked as a write.
    writes
        Files or folders to be made, by the workers too: every worker must share the folder
        each goes in, and be able to write there (as this process must).
    timeout
        Seconds the workers have to answer (default ``distumap.paths-check-timeout``).

    Raises
    ------
    InputError
        A worker cannot see a path (the message names the path, the worker and its host, and
        what to use instead), this process cannot write where a new path goes, or a
        ``memory://`` path would be used by workers in other processes.
    ClusterError
        The workers did not answer in time (a hung file system mount, say).

    Notes
    -----
    One ``client.run`` round trip, only when a local or ``memory://`` path is given; workers
    that join later are not asked.

    Examples
    --------
    >>> check_workers_see(
    ...     client, reads=["/data/matrix.csv"], store="/data/store.zarr"
    ... )  # doctest: +SKIP
    """
    if client is None:
        return
    paths = [absolute(path) for path in (*reads, *writes, *([store] if store else []))]
    memory = [path for path in paths if path.startswith("memory://")]
    probes: list[str] = []
    try:
        looks = _plan(reads, store, writes, probes)
        if not looks and not memory:
            return
        answers = _ask(client, looks, timeout)
    finally:
        for probe in probes:
            _remove(probe)
    _refuse_memory(memory, answers)
    _refuse_unseen(answers)


def _plan(reads, store, writes, probes: list[str]) -> list[Look]:
    """What the workers look at; for every new path, the file this process writes (and lists in
    ``probes``) in the folder it goes in."""
    looks: list[Look] = []
    for source in map(absolute, reads):
        if is_local(source):
            path = local_path(source)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            looks.append(("read", source, path, size))
    news = list(map(absolute, writes))
    if store is not None:
        store = absolute(store)
        if is_local(store) and os.path.exists(local_path(store)):
            looks.append(("store", store, local_path(store), None))
        else:
            news.append(store)
    for target in filter(is_local, news):
        folder = _existing_folder(local_path(target))
        probe = os.path.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            open(probe, "x").close()
        except OSError as error:
            raise InputError(
                f"{target}: cannot write in {folder} on this machine: {error.strerror or error}"
            ) from None
        probes.append(probe)
        looks.append(("write", target, folder, os.path.basename(probe)))
    return looks


def _existing_folder(path: str) -> str:
    """The nearest folder above ``path`` that exists here (where its missing folders go)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _ask(client, looks: list[Look], timeout: float | None) -> dict[str, dict[str, Any]]:
    """Every worker's answer (address -> ``_look_here``'s result), in one round trip."""
    if timeout is None:
        timeout = parse_timedelta(_config.get("paths-check-timeout"), default="seconds")
    try:
        answers = client.run(_look_here, looks, on_error="return", callback_timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"the workers did not say within {timeout:g} s whether they see "
            f"{', '.join(look[1] for look in looks) or 'the paths'} (a hung file system mount?); "
            "set distumap.paths-check-timeout to wait longer"
        ) from None
    # a worker that could not answer (gone as it was asked) does no work either: the work's
    # own watchdog and retries deal with workers that come and go
    return {address: answer for address, answer in answers.items() if isinstance(answer, dict)}


def _look_here(looks: list[Look]) -> dict[str, Any]:
    """On a worker: this process's host and id, and the paths of ``looks`` it cannot see, each
    with why (``[(shown path, why), ...]``)."""
    problems = []
    for kind, shown, path, expected in looks:
        why = _LOOKERS[kind](path, expected)
        if why:
            problems.append((shown, why))
    return {"host": socket.gethostname(), "pid": os.getpid(), "problems": problems}


def _unreadable(path: str, size: int | None) -> str | None:
    try:
        if os.path.isdir(path):
            os.listdir(path)
            return None
        with open(path, "rb") as file:
            file.read(1)
        seen = os.path.getsize(path)
    except FileNotFoundError:
        return "no such file or folder there"
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    if size is not None and seen != size:
        return f"another file is there: {seen:,} bytes, the client sees {size:,}"
    return None


def _no_store(path: str, _: None) -> str | None:
    return None if os.path.isdir(path) else "no such folder there"


def _unwritable(folder: str, probe: str) -> str | None:
    if not os.path.isdir(folder):
        return f"no folder {folder} there"
    if not os.path.exists(os.path.join(folder, probe)):
        return f"its {folder} is another folder: a file the client wrote there is missing"
    own = os.path.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        open(own, "x").close()
        os.remove(own)
    except OSError as error:
        return f"cannot write in {folder}: {error.strerror or error}"
    return None


_LOOKERS = {"read": _unreadable, "store": _no_store, "write": _unwritable}


def _worker(address: str, answer: dict[str, Any]) -> str:
    return f"worker {address} (host {answer['host']})"


def _refuse_memory(memory: list[str], answers: dict[str, dict[str, Any]]) -> None:
    here = (socket.gethostname(), os.getpid())
    elsewhere = [a for a, answer in answers.items() if (answer["host"], answer["pid"]) != here]
    if memory and elsewhere:
        first = elsewhere[0]
        raise InputError(
            f"{memory[0]}: memory:// is this process's memory, and {_worker(first, answers[first])}"
            f"{_more(len(elsewhere) - 1, 'worker')} runs in another process, where it is "
            f"empty; {_FIX}"
        )


def _refuse_unseen(answers: dict[str, dict[str, Any]]) -> None:
    failed = [(a, answer) for a, answer in sorted(answers.items()) if answer["problems"]]
    if not failed:
        return
    address, answer = failed[0]
    path, why = answer["problems"][0]
    others = {p for _, a in failed for p, _ in a["problems"]} - {path}
    raise InputError(
        f"{path}: {_worker(address, answer)}{_more(len(failed) - 1, 'worker')} cannot see it "
        f"({why}){_more(len(others), 'path')}; {_FIX}"
    )


def _more(count: int, what: str) -> str:
    return f" (and {count} other {what}{'s' if count > 1 else ''})" if count else ""

"""The one interface every export format implements, and the registry the formats join.

A writer registers itself where it is defined (subclassing :class:`Writer` is enough), so the
output suffixes, ``distumap.io.write``'s dispatch and the CLI's choice of what may start before
the embed all come from one list: the registry.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import ClassVar

import xarray as xr

from distumap._compute import current_client
from distumap._shared_paths import check_workers_see

#: every registered writer by name, in the order they registered
_REGISTRY: dict[str, Writer] = {}


class Writer(ABC):
    """A writer of one export format.

    Attributes
    ----------
    name
        The export kind, as :func:`distumap._format.check_replaceable` names it (``"loom"``).
    suffixes
        The output names it writes (``(".loom",)``): ``distumap.io.write`` picks it by them.
    takes_embedded
        Whether :meth:`write` accepts ``embedded=``, a future of the embedded store, so that a
        caller can start it before the embed ends and it adds the embedding last.
    workers_write
        Whether the workers write the output themselves (else only this process writes it).
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    takes_embedded: ClassVar[bool] = False
    workers_write: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls):
            return
        if cls.name in _REGISTRY:
            raise ValueError(f"a writer named {cls.name!r} is registered already")
        _REGISTRY[cls.name] = cls()

    @abstractmethod
    def write(
        self,
        ds: xr.Dataset,
        path: str | os.PathLike,
        *,
        progress: bool = False,
        embedded: Future | None = None,
        **options,
    ) -> str:
        """Write ``ds`` to ``path``; return ``path`` as given (see each format's function)."""

    def check_workers(self, ds: xr.Dataset, target: str, client=None) -> None:
        """Refuse, before any work, a store behind ``ds`` that some worker cannot see, and (for
        a writer whose workers write) a ``target`` they cannot write
        (:func:`distumap._shared_paths.check_workers_see`); ``client`` defaults to the current
        one."""
        check_workers_see(
            client if client is not None else current_client(),
            store=ds.encoding.get("distumap_store"),
            writes=[target] if self.workers_write else (),
        )

    def refuse_embedded(self, embedded: Future | None) -> None:
        """Raise for an ``embedded`` future given to a writer that cannot take it."""
        if embedded is not None and not self.takes_embedded:
            raise TypeError(
                f"the {self.name} writer needs the embedded store: it takes no embedded="
            )


def registered_writers() -> dict[str, Writer]:
    """Every registered writer by name, in the order they registered."""
    return dict(_REGISTRY)

"""Progress events that tasks send to the scheduler, for the dashboard page and the CLI.

A task calls :func:`report` with the stage, the units it finished and the stage's total; the
event lands in the scheduler's event log under :data:`TOPIC`, where the distumap dashboard page
(``distumap.dashboard``) sums it up. Outside a worker the call does nothing.
"""

from __future__ import annotations

from distumap._compute import current_client
from distumap._format import STAGES

__all__ = ["STAGES", "TOPIC", "report"]

TOPIC = "distumap-progress"


def report(stage: str, done: int, total: int, *, block: int | None = None) -> None:
    """Log that ``done`` more units of ``stage`` (out of ``total``) finished.

    From inside a task the event goes through the worker; elsewhere through the current
    distributed client, if there is one. Without either, nothing happens.
    """
    message = {"stage": stage, "done": int(done), "total": int(total), "block": block}
    try:
        from distributed import get_worker

        get_worker().log_event(TOPIC, message)
        return
    except (ImportError, ValueError):
        pass
    client = current_client()
    if client is not None:
        client.log_event(TOPIC, message)

"""The scheduler plugin: it keeps the progress (:class:`~distumap.dashboard._state.ProgressState`)
and, when the scheduler starts it, adds the page's routes."""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin

from distumap.dashboard._server import add_routes, remove_page
from distumap.dashboard._state import PLUGIN_NAME, ProgressState


class ProgressDashboard(ProgressState, SchedulerPlugin):
    """Scheduler plugin that sums distumap's events and serves them on the dashboard.

    Notes
    -----
    ``start`` catches up with what the scheduler still holds (:meth:`ProgressState.catch_up`:
    installing the page late loses nothing that the scheduler's bounded event log kept), then
    adds the page's routes; ``log_event`` and ``transition`` keep counting from there.
    """

    name = PLUGIN_NAME
    idempotent = True

    async def start(self, scheduler) -> None:
        if self.scheduler is scheduler:  # started already: do not count the event log twice
            return
        self.catch_up(scheduler)
        add_routes(scheduler)

    async def close(self) -> None:
        if self.scheduler is not None:
            remove_page(self.scheduler)

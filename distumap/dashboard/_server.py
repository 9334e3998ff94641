"""The routes on the scheduler's HTTP server: the Bokeh page at ``/distumap``, served as Dask
serves its own pages (or a plain HTML page where Dask serves none), and the JSON beside it."""

from __future__ import annotations

from typing import Any

from tornado import web

from distumap.dashboard._bokeh import page_doc
from distumap.dashboard._html import ROUTE, render_page
from distumap.dashboard._state import state_of


def add_routes(scheduler) -> None:
    app = getattr(scheduler, "http_application", None)
    if app is None or getattr(app, "_distumap_routes", False):
        return  # no dashboard server (--no-dashboard), or the routes are already there
    prefix = _http_prefix(app)
    kwargs = {"scheduler": scheduler}
    handlers = [(prefix + ROUTE + r"/progress\.json", _JSONHandler, kwargs)]
    page = _add_bokeh_page(scheduler, prefix)
    if page is None:  # Dask serves no Bokeh pages here: the plain page instead
        handlers.append((prefix + ROUTE + r"/?", _PageHandler, kwargs))
    app.add_handlers(r".*", handlers)
    app._distumap_routes = True
    app._distumap_page = page


def _http_prefix(app) -> str:
    """The dashboard's URL prefix (``dask scheduler --dashboard-prefix``), taken from Dask's
    own Bokeh server; ``""`` for none."""
    for child in getattr(app, "applications", []):
        prefix = getattr(child, "prefix", None)
        if isinstance(prefix, str) and hasattr(child, "app_paths"):
            return prefix.rstrip("/")
    return ""


def _add_bokeh_page(scheduler, prefix: str):
    """Serve the Bokeh page at ``ROUTE`` as Dask serves its own: the same Bokeh server factory,
    template and theme, added to the scheduler's HTTP application, and listed in the navigation
    bar of every dashboard page. None when Dask's dashboard (or Bokeh) is not there."""
    if not any(hasattr(child, "app_paths") for child in scheduler.http_application.applications):
        return None
    try:
        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop
    except ImportError:
        return None
    variables = template_variables(scheduler)
    page = BokehApplication(
        {ROUTE: page_doc}, scheduler, prefix=prefix, template_variables=variables
    )
    scheduler.http_application.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    # Dask memoizes these per scheduler and every page's navigation bar shares the list
    pages = variables.get("pages")
    if isinstance(pages, list) and ROUTE.strip("/") not in pages:
        pages.append(ROUTE.strip("/"))
    return page


def remove_page(scheduler) -> None:
    app = getattr(scheduler, "http_application", None)
    page = getattr(app, "_distumap_page", None)
    if page is None:
        return
    page.stop()
    if page in app.applications:
        app.applications.remove(page)
    app._distumap_page = None


class _Handler(web.RequestHandler):
    def initialize(self, scheduler) -> None:
        self.scheduler = scheduler

    def _snapshot(self) -> dict[str, Any]:
        return state_of(self.scheduler).snapshot()


class _JSONHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(self._snapshot())  # tornado serialises a dict as application/json


class _PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render_page(self._snapshot()))

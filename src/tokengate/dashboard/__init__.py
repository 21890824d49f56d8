"""The dashboard: a live web view of one coordinator, with operator controls.

``coordinator.serve_dashboard()`` serves it (``observability/_facade.py``); the parts are:

* ``_views.py``: what the page shows, built from the coordinator's public API at refresh time
  (plain data, JSON-ready; no web dependency, so it is tested without a server);
* ``_registry.py``: the recent tokens a page can look up by id, their failures' tracebacks and
  the task stream, kept by a middleware installed when the first page connects;
* ``_server.py``: the HTTP side (Starlette on uvicorn, server-sent events) and its security:
  loopback by default, an access token on every request, same-origin POSTs, bounded bodies;
* ``static/``: the page, its script and its style, shipped in the package (no build step, no
  network at run time).

Only ``_server.py`` imports the optional extra (``pip install 'tokengate[dashboard]'``), and only
when a dashboard is served: ``import tokengate`` never imports Starlette or uvicorn.
"""

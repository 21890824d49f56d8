"""The dashboard's HTTP server: Starlette on uvicorn, on a thread of its own.

Security, checked on every request before any route runs (:class:`_Guard`):

* it listens on loopback unless the caller passes another address explicitly;
* every request carries the access token (``?token=`` in the URL it prints, then an HttpOnly,
  SameSite=Strict cookie the first visit sets; or an ``X-TokenGate-Token`` header), compared
  in constant time; without it the answer is 403;
* on a loopback address the ``Host`` header must name loopback (a DNS-rebinding page cannot
  reach it under another name);
* a POST must come from the page's own origin (``Origin`` equal to the server's), carry JSON,
  and be at most ``MAX_BODY`` bytes; anything else is a clear 4xx and the server keeps serving;
* no CORS header is ever sent, and nothing from the network is unpickled or executed: a control
  is a name looked up in a fixed table, with JSON arguments.

Live views: ``/api/events`` streams a snapshot (``_views.snapshot``) every ``refresh`` seconds as
server-sent events while a page is open; nothing is sampled while none is. One snapshot per
refresh is built and serialized for every open page (:class:`_Feed`): a snapshot holds the GIL
while it reads the coordinator, so each extra page would otherwise delay running tasks again.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .._errors import TokenGateError
from ._registry import RecentTokens
from ._views import snapshot, snapshot_sections, stats_json, token_view

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator

__all__ = ["MAX_BODY", "REFRESH", "DashboardServer", "check_addr", "require"]

log = logging.getLogger("tokengate.dashboard")

MAX_BODY = 64 * 1024
"""The largest POST body accepted, in bytes (controls are a few hundred)."""
REFRESH = 0.9
"""Seconds between two snapshots of the live stream: what a page shows is at most a second old,
counting the snapshot's build and delivery; each snapshot costs the coordinator a few ms of the
GIL, so no more often than that."""
SNAPSHOT_WINDOWS = 1_000  # the live snapshots' build times kept: 15 min at one per 0.9 s
#: The server thread's name, its port after it. Its event loop builds the live stream's snapshots
#: and reads and answers every request (plain endpoints run on a small thread pool beside it), so
#: its CPU clock is what serving an open page costs (the DASH benchmark reads it).
THREAD_NAME = "tokengate-dashboard"
ABSORB_EVERY = 0.25
"""Seconds between two absorbs of the ended tokens recorded for the page: how long a token is
held for the page at most, and the period in which at most its share of ``SAMPLE_BUDGET`` runs
are recorded (dashboard/_registry.py)."""
IDLE_AFTER = 30.0
"""Seconds without a page streaming or a read after which ended tokens are no longer recorded
(the next look starts again)."""
SECTION_PAUSE = 0.0005
"""Seconds the live stream's snapshot pauses between its sections, so that tasks running
meanwhile get the GIL (``snapshot_sections``); a handful per snapshot, well inside a refresh."""

_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]  # fmt: skip
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def require() -> Any:
    """Import the extra's modules, or say how to install them."""
    try:
        import starlette
        import uvicorn
    except ImportError as exc:
        raise ImportError(
            f"the dashboard needs Starlette and uvicorn ({exc.name} is missing): "
            f"pip install 'tokengate[dashboard]'"
        ) from None
    return starlette, uvicorn


def check_addr(addr: object) -> str:
    """``addr`` if it is an IP address or ``localhost``; else a ValueError that says so."""
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr must be an IP address such as '127.0.0.1', got {addr!r}")
    if addr == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(
            f"addr must be an IP address such as '127.0.0.1' (loopback, the default) or "
            f"'0.0.0.0' (every interface: anyone who can reach it and has the URL's token can "
            f"use the controls), got {addr!r}"
        ) from None
    return addr


def is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """ASGI wrapper: the security checks of the module docstring, then the app."""

    def __init__(self, app: Any, server: DashboardServer) -> None:
        self.app = app
        self.server = server

    def _token_of(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        raw: bytes = scope.get("query_string", b"")
        query = parse_qs(raw.decode("latin-1"))
        if "token" in query:
            return query["token"][0]
        header = headers.get(b"x-tokengate-token")
        if header is not None:
            return header.decode("latin-1")
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.server.cookie:
                return value
        return ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        server = self.server
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        if server.loopback and _host_name(host) not in _LOOPBACK_NAMES:
            await _plain(send, 403, f"host {host!r} refused: this dashboard serves loopback only")
            return
        given = self._token_of(scope, headers).encode("utf-8", "replace")
        if not hmac.compare_digest(given, server.token.encode()):
            await _plain(
                send,
                403,
                "missing or wrong access token: open the URL that serve_dashboard() returned "
                "(it ends with ?token=...)",
            )
            return
        if scope["method"] not in ("GET", "HEAD", "POST"):
            await _plain(send, 405, f"method {scope['method']} not allowed")
            return
        if scope["method"] == "POST":
            origin = headers.get(b"origin", b"").decode("latin-1")
            if origin != f"http://{host}":
                await _plain(send, 403, f"cross-origin request refused (Origin {origin!r})")
                return
            kind = headers.get(b"content-type", b"").split(b";")[0].strip()
            if kind != b"application/json":
                await _plain(
                    send, 415, "controls take a JSON body (Content-Type: application/json)"
                )
                return
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                await _plain(send, 413, f"request body over {MAX_BODY} bytes refused")
                return
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_BODY:
                    await _plain(send, 413, f"request body over {MAX_BODY} bytes refused")
                    return
            scope["tokengate.body"] = bytes(body)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """``host`` without its port (``[::1]:8000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


class _Feed:
    """The live stream's snapshots: one built every ``refresh`` seconds while at least one page
    streams, and the same text sent to every page. Runs on the server's event loop only."""

    def __init__(
        self, build: Callable[[], Awaitable[str]], refresh: float, closing: threading.Event
    ) -> None:
        self._build = build
        self._refresh = refresh
        self._closing = closing
        self.clients = 0
        self._data = ""
        self._version = 0
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def stream(self) -> Any:
        """The text of each snapshot built while this page is open (the latest one first, if
        one was built less than a refresh ago), until the server closes."""
        self.clients += 1
        try:
            seen = 0  # a running producer's latest snapshot is less than a refresh old
            if self._task is None:  # no await since the producer's last check: no race
                seen = self._version  # the last one may be old: wait for a fresh one
                self._changed = asyncio.Event()
                self._task = asyncio.create_task(self._produce())
            while True:
                changed = self._changed
                assert changed is not None
                if self._version == seen:
                    await changed.wait()
                if self._closing.is_set() or self._version == seen:
                    return  # closing, or the producer failed: the page reconnects
                seen = self._version
                yield self._data
        finally:
            self.clients -= 1

    async def _produce(self) -> None:
        try:
            while self.clients > 0 and not self._closing.is_set():
                self._data = await self._build()
                self._version += 1
                changed, self._changed = self._changed, asyncio.Event()
                assert changed is not None
                changed.set()  # wakes every page waiting for this one
                await asyncio.sleep(self._refresh)
        except Exception:
            log.exception("the dashboard could not build a snapshot; open pages will reconnect")
        finally:
            self._task = None
            changed = self._changed
            assert changed is not None
            changed.set()  # the pages waiting see no new snapshot (or _closing) and end


class DashboardServer:
    """One dashboard of one coordinator: the app, its uvicorn server and the thread running it.

    ``controls`` maps a control's name to a function of (coordinator, arguments) returning a
    message for the page; it is fixed when the server is made. The dashboards of one
    coordinator share one ``registry`` and know each other (``peers``, this one included):
    ended tokens are recorded while any of them looks, and every one finds them.
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        port: int,
        addr: str,
        *,
        refresh: float = REFRESH,
        controls: dict[str, Callable[[Any, dict[str, Any]], str]] | None = None,
        registry: RecentTokens | None = None,
        peers: list[DashboardServer] | None = None,
    ) -> None:
        _, uvicorn = require()
        self.coordinator = coordinator
        self.addr = addr
        self.loopback = is_loopback(addr)
        self.refresh = refresh
        self.token = secrets.token_urlsafe(32)
        self.controls = controls or {}
        self.registry = RecentTokens() if registry is None else registry
        self.peers: list[DashboardServer] = [self] if peers is None else peers
        self.absorb_every = ABSORB_EVERY
        self.idle_after = IDLE_AFTER
        self._last_look = -math.inf
        self._keeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.samples = 0
        #: When the live stream's latest snapshots were built: (start, end) in
        #: ``time.perf_counter()`` seconds, so what they cost can be measured (``tokengate bench``).
        self.snapshot_windows: deque[tuple[float, float]] = deque(maxlen=SNAPSHOT_WINDOWS)
        self._closing = threading.Event()
        self._feed = _Feed(self._stream_snapshot, refresh, self._closing)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError:
            sock.close()
            raise
        sock.listen(64)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.cookie = f"tokengate-dashboard-{self.port}"
        config = uvicorn.Config(
            _Guard(self._app(), self),
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve, name=f"{THREAD_NAME}-{self.port}", daemon=True
        )
        self._closed = False
        self._thread.start()

    def _serve(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException:  # pragma: no cover - uvicorn logs its own errors first
            log.exception("the dashboard server on %s stopped with an error", self.url)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()  # before the first request can look
        await self._server.serve(sockets=[self._sock])

    @property
    def url(self) -> str:
        """The page's address, with the access token (give it only to whom may use it)."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/?token={self.token}"

    def touched(self) -> None:
        """A page or an API read looks (``/api/health`` does not count): ended tokens are
        recorded from now until nobody has looked, here or at a peer, for :attr:`idle_after`
        seconds."""
        registry = self.registry
        with registry.keeper_lock:
            self._last_look = time.monotonic()
            if registry.keeper is None and not self._closed and self._loop is not None:
                self._keep()

    def looking(self) -> bool:
        """Whether a page of this server streams, or one looked in the last ``idle_after`` s."""
        if self._closed:
            return False
        return self.clients > 0 or time.monotonic() - self._last_look <= self.idle_after

    def _keep(self) -> None:
        """Record ended tokens from now, this server's event loop running the cycles (called
        holding the registry's ``keeper_lock``, with the loop running)."""
        registry, loop = self.registry, self._loop
        assert loop is not None
        registry.attach(self.coordinator)
        registry.keeper = self
        loop.call_soon_threadsafe(self._start_keeper)

    def _start_keeper(self) -> None:
        self._keeper = asyncio.get_running_loop().create_task(self._keep_recording())

    async def _keep_recording(self) -> None:
        """While tokens are recorded: one :meth:`RecentTokens.cycle` every :attr:`absorb_every`
        seconds (runs recorded up to the period's share of the budget, then absorbed, so that
        no token is held longer), until nobody looks at this server or its peers."""
        registry = self.registry
        while not self._closing.is_set():
            for pause in registry.cycle(self.absorb_every):
                await asyncio.sleep(pause)
            with registry.keeper_lock:
                if registry.keeper is not self:  # handed on (this server is closing)
                    return
                if not any(peer.looking() for peer in self.peers):
                    registry.detach()
                    registry.keeper = None
                    self._keeper = None
                    return

    @property
    def clients(self) -> int:
        """Pages streaming now."""
        return self._feed.clients

    async def _stream_snapshot(self) -> str:
        self.samples += 1
        start = time.perf_counter()
        data: dict[str, Any] = {}
        for _ in snapshot_sections(self.coordinator, self.registry, data):
            await asyncio.sleep(SECTION_PAUSE)  # the loop's wait lets go of the GIL meanwhile
        text = json.dumps(data)
        self.snapshot_windows.append((start, time.perf_counter()))
        return text

    def close(self) -> None:
        """Stop serving: open pages see the stream end; waits up to 5 s for the thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._server.should_exit = True
        self._thread.join(5.0)
        self._sock.close()
        registry = self.registry
        with registry.keeper_lock:
            if registry.keeper is self:  # its cycles stopped with the loop: a peer that
                registry.keeper = None  # looks takes them on, or recording stops
                heir = next((p for p in self.peers if p.looking() and p._loop is not None), None)
                if heir is not None:
                    heir._keep()
            if registry.keeper is None:
                registry.detach()  # the coordinator holds no token for a closed page

    # -- the app --------------------------------------------------------------------------------
    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import (
            JSONResponse,
            PlainTextResponse,
            RedirectResponse,
            Response,
            StreamingResponse,
        )
        from starlette.routing import Route

        coordinator = self.coordinator
        files = importlib.resources.files(__package__).joinpath("static")

        def page(request: Request) -> Response:
            self.touched()
            if "token" in request.query_params:  # the printed URL: keep the token in a cookie
                response: Response = RedirectResponse("/", status_code=303)
                response.set_cookie(
                    self.cookie, self.token, httponly=True, samesite="strict", path="/"
                )
                return response
            html = files.joinpath("index.html").read_text(encoding="utf-8")
            return Response(html, media_type="text/html; charset=utf-8")

        def static(request: Request) -> Response:
            name = request.path_params["name"]
            kind = _STATIC.get(name)
            if kind is None:
                return PlainTextResponse(f"no static file {name!r}", status_code=404)
            return Response(files.joinpath(name).read_bytes(), media_type=kind)

        def view(request: Request) -> Response:
            self.touched()
            self.samples += 1
            return JSONResponse(snapshot(coordinator, self.registry))

        def health(request: Request) -> Response:
            return JSONResponse({"ok": True, "clients": self.clients, "samples": self.samples})

        async def events(request: Request) -> Response:
            self.touched()

            async def stream() -> Any:
                yield f"retry: 1000\ndata: {json.dumps({'hello': True})}\n\n"
                async for data in self._feed.stream():
                    yield f"data: {data}\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        def token(request: Request) -> Response:
            self.touched()
            found = self.registry.find(coordinator, request.path_params["token_id"])
            if found is None:
                return JSONResponse(
                    {
                        "error": f"no token {request.path_params['token_id']!r} among the "
                        f"running, queued, last {self.registry.capacity} ended and last "
                        f"{self.registry.failures} failed tokens"
                    },
                    status_code=404,
                )
            return JSONResponse(token_view(found))

        def stats(request: Request) -> Response:
            return JSONResponse(
                stats_json(coordinator),
                headers={"content-disposition": 'attachment; filename="tokengate-stats.json"'},
            )

        def trace(request: Request) -> Response:
            import tempfile
            from pathlib import Path

            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "trace.json"
                    coordinator.export_trace(path)
                    body = path.read_bytes()
            except TokenGateError as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            return Response(
                body,
                media_type="application/json",
                headers={"content-disposition": 'attachment; filename="tokengate-trace.json"'},
            )

        async def control(request: Request) -> Response:
            try:
                data = json.loads(request.scope.get("tokengate.body", b"") or b"null")
            except (ValueError, UnicodeDecodeError) as exc:
                return JSONResponse({"error": f"malformed JSON body: {exc}"}, status_code=400)
            if not isinstance(data, dict) or not isinstance(data.get("action"), str):
                return JSONResponse(
                    {"error": 'the body must be a JSON object with an "action" string'},
                    status_code=400,
                )
            action = data["action"]
            handler = self.controls.get(action)
            if handler is None:
                known = ", ".join(sorted(self.controls)) or "none"
                return JSONResponse(
                    {"error": f"unknown action {action!r}; known actions: {known}"},
                    status_code=400,
                )
            try:
                message = await run_in_threadpool(handler, coordinator, data)
            except (TokenGateError, ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            return JSONResponse({"ok": True, "message": message})

        return Starlette(
            routes=[
                Route("/", page),
                Route("/static/{name}", static),
                Route("/api/health", health),
                Route("/api/snapshot", view),
                Route("/api/events", events),
                Route("/api/token/{token_id}", token),
                Route("/api/stats", stats),
                Route("/api/trace", trace),
                Route("/api/control", control, methods=["POST"]),
            ]
        )

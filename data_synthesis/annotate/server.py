"""The annotation web server: a Starlette app served by uvicorn.

Input: an annotations database (``store.Store``) with tasks and annotators, a bind address and
extra allowed host names. Output: HTTP on that address:

* ``GET /`` the page (``page.html``); ``GET /?token=T`` checks T, sets it as an HttpOnly,
  SameSite=Strict cookie and redirects to ``/`` (so the token leaves the address bar);
* ``GET /api/next?skip=ID,ID`` the caller's next task, blind (``Store.next_task``);
* ``POST /api/submit`` one ranking (JSON); ``GET /api/stats`` counts.

Every ``/api`` call needs an annotator token (the cookie, or ``Authorization: Bearer T``); the
identity is the token's. Every request must carry an allowed ``Host`` (the bound host, the
loopback names when bound to loopback, and ``--allow-host`` names), which stops DNS rebinding;
a request with an ``Origin`` must come from this server's own origin, and a submission must be
``application/json``, which stop cross-site form posts. Malformed requests get a 4xx with a
one-line reason: uvicorn's HTTP parser answers broken framing (e.g. a non-numeric
Content-Length) with 400, the app answers oversized bodies with 413 and bad JSON or fields with 400.

Why uvicorn + Starlette, not ``http.server``: the standard-library server is documented as not
for production (basic checks only) and was measured refusing 28-62 of 50-100 simultaneous
connections (listen backlog 5); uvicorn listens with a backlog of 2048, parses HTTP with h11
and serves every connection from one event loop, while database work runs in Starlette's
thread pool.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import sqlite3
import threading
from importlib import resources
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from data_synthesis.annotate.store import Store, SubmissionError, load_tasks
from posttrain.core.errors import ConfigError, RecordError

log = logging.getLogger("posttrain.annotate")

MAX_BODY = 2_000_000  # bytes; a submission is a ranking and at most one edited response
DRAIN_LIMIT = 16_000_000  # an oversized body up to this size is read and dropped, so the client sees the 413
BACKLOG = 2048
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD = frozenset({"", "0.0.0.0", "::"})


def _error(code: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=code, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- Host and Origin checks

def parse_host(value: str | None) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6]:port`` of a Host header -> (lower-case name, port or None); None if malformed."""
    if not value:
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]/@\s]+)(?::(\d{1,5}))?", value.strip())
    if m is None:
        return None
    name, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return name.lower().rstrip("."), int(port) if port else None


def allowed_names(host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """Host names this server answers to: the bound host (all loopback names for a loopback bind;
    those and this machine's names for a wildcard bind) plus ``extra``."""
    names = {host.lower().strip("[]")}
    try:
        loop = host in LOOPBACK or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loop = False
    if loop:
        names |= LOOPBACK
    if host in WILDCARD:
        names |= LOOPBACK | {socket.gethostname().lower(), socket.getfqdn().lower()}
    for e in extra:
        parsed = parse_host(e)
        if parsed is None:
            raise ConfigError(f"--allow-host {e!r}: expected a host name or address")
        names.add(parsed[0])
    return frozenset(names - WILDCARD)


def origin_problem(headers: dict[str, str], allowed: frozenset[str]) -> tuple[int, str] | None:
    """Why a request must be refused for its Host or Origin header, as (status, reason); None if it may pass."""
    host = parse_host(headers.get("host"))
    if host is None:
        return 400, "Host header missing or malformed"
    if host[0] not in allowed:
        return 400, (f"Host {host[0]!r} is not served here (allowed: {', '.join(sorted(allowed))}; "
                     "serve --allow-host NAME adds one)")
    origin = headers.get("origin")
    if origin is None:  # browsers send Origin on every cross-origin request and on same-origin POSTs
        return None
    o = urlsplit(origin)
    try:
        o_port = o.port or {"http": 80, "https": 443}.get(o.scheme)
    except ValueError:
        o_port = None
    h_port = host[1] or {"http": 80, "https": 443}.get(o.scheme)
    if o.scheme not in ("http", "https") or (o.hostname or "").lower() != host[0] or o_port != h_port:
        return 403, f"Origin {origin[:100]!r} is not this server's own; cross-site requests are refused"
    return None


class OriginGuard:
    """ASGI middleware refusing requests with a foreign Host or a cross-site Origin (see ``origin_problem``)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the headers of an HTTP request, then hand it on."""
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = origin_problem(headers, self.allowed)
            if problem is not None:
                log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), problem[1])
                await _error(*problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- the app

def _csp(page: str) -> str:
    """A Content-Security-Policy that allows exactly the page's own inline script and style (by hash)."""
    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


async def _read_body(request: Request) -> bytes | Response:
    """The request body, or a 413 response when it exceeds MAX_BODY."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        return _error(413, f"body: larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break  # stop reading: the client may see the connection close before the 413
    if size > MAX_BODY:
        return _error(413, f"body: larger than {MAX_BODY} bytes")
    return b"".join(chunks)


def decode_json(raw: bytes) -> object:
    """Decode a JSON request body; SubmissionError with a one-line reason if it is not valid JSON."""
    def no_constant(name: str) -> None:
        raise SubmissionError(f"body: {name} is not JSON")
    if not raw.strip():
        raise SubmissionError("body: empty; expected a JSON object")
    try:
        return json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise SubmissionError("body: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise SubmissionError("body: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise SubmissionError(f"body: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise SubmissionError(f"body: invalid JSON ({str(e).splitlines()[0][:100]})") from None


def build_app(store: Store, allowed: frozenset[str], cookie: str) -> Starlette:
    """The Starlette app of the annotation page and API over ``store``."""
    page = resources.files("data_synthesis.annotate").joinpath("page.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": _csp(page), "Cache-Control": "no-store",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    async def who(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get(cookie)
        return await run_in_threadpool(store.annotator_for, token) if token else None

    def unauthorised() -> Response:
        return _error(401, "missing or unknown annotator token (open the link that "
                           "`posttrain annotate add-annotator` printed)")

    async def index(request: Request) -> Response:
        token = request.query_params.get("token")
        if token is None:
            return HTMLResponse(page, headers=page_headers)
        name = await run_in_threadpool(store.annotator_for, token)
        if name is None:
            return PlainTextResponse("annotation server: unknown token (ask for a new link: "
                                     "posttrain annotate add-annotator --rotate)\n", status_code=401)
        resp = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        resp.set_cookie(cookie, token, max_age=30 * 86400, httponly=True, samesite="strict", path="/")
        log.info("annotator %s signed in from %s", name, request.client.host if request.client else "?")
        return resp

    async def next_task(request: Request) -> Response:
        name = await who(request)
        if name is None:
            return unauthorised()
        skip = [s for s in request.query_params.get("skip", "").split(",") if s][:1000]
        return JSONResponse(await run_in_threadpool(store.next_task, name, skip), headers={"Cache-Control": "no-store"})

    async def stats(request: Request) -> Response:
        if await who(request) is None:
            return unauthorised()
        return JSONResponse(await run_in_threadpool(store.counts), headers={"Cache-Control": "no-store"})

    async def submit(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, f"Content-Type: expected application/json, got {ctype[:60]!r}")
        name = await who(request)
        if name is None:
            return unauthorised()
        raw = await _read_body(request)
        if isinstance(raw, Response):
            return raw

        def work() -> tuple[int, bool]:
            return store.submit(name, decode_json(raw))
        try:
            sid, retry = await run_in_threadpool(work)
        except SubmissionError as e:
            return _error(400, str(e))
        except sqlite3.OperationalError as e:  # locked for longer than the busy timeout, disk full, ...
            log.error("submission by %s not stored: %s", name, e)
            return _error(503, f"database busy or unavailable ({e}); submit again")
        log.info("submission %d by %s%s", sid, name, " (retry)" if retry else "")
        return JSONResponse({"ok": True, "submission": sid, "retry": retry})

    routes = [Route("/", index), Route("/index.html", index), Route("/api/next", next_task),
              Route("/api/stats", stats), Route("/api/submit", submit, methods=["POST"])]
    app = Starlette(routes=routes)
    app.add_middleware(OriginGuard, allowed=allowed)
    return app


# ---------------------------------------------------------------- the server

class AnnotationServer:
    """The annotation server: ``AnnotationServer(db, tasks, host, port).serve_forever()``, or
    ``.start()`` / ``.shutdown()`` to run it in a background thread. ``port=0`` picks a free port."""

    def __init__(self, db: str | os.PathLike, tasks: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 port: int = 8765, allow_hosts: tuple[str, ...] | list[str] = (), backlog: int = BACKLOG):
        self.store = Store(db)
        if tasks is not None:
            added = self.store.import_tasks(load_tasks(tasks))
            log.info("annotate: %d new tasks loaded from %s", added, tasks)
        if self.store.task_count() == 0:
            raise RecordError(f"{db}: no tasks (give a TASKS file)")
        self.allowed = allowed_names(host, allow_hosts)
        try:
            family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
            self.sock = socket.create_server((host, port), family=family, backlog=backlog)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        app = build_app(self.store, self.allowed, cookie=f"annotate_{self.port}")
        # h11 and asyncio (not httptools / uvloop) so that behaviour does not depend on optional extras
        config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                                backlog=backlog, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page address (a wildcard bind is shown as this machine's name)."""
        host = socket.gethostname() if self.host in WILDCARD else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/"

    def link(self, token: str) -> str:
        """The sign-in link of an annotator token."""
        return f"{self.url}?token={token}"

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or ``shutdown()``."""
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 60.0) -> "AnnotationServer":
        """Serve in a daemon thread; return once the server accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, name="annotate-server", daemon=True)
        self._thread.start()
        for _ in range(int(timeout * 20)):
            if self._server.started or not self._thread.is_alive():
                break
            self._thread.join(0.05)
        if not self._server.started:
            raise RuntimeError("annotation server did not start")
        return self

    def shutdown(self) -> None:
        """Stop serving (waits for open requests up to 5 s) and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.sock.close()

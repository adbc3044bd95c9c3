"""What the web server checks before gradio sees a request: attacks from the user's own browser,
and guessing the log-in. ASGI middlewares, installed by app.launch through gradio's
launch(app_kwargs=...).

RequestGuard
    Host: only the names the app listens on, loopback names and those the user added
    (FINETUNE_ALLOWED_HOSTS, e.g. a reverse proxy's) or the app learnt when it started (Colab's proxy
    of its port, the share link's host); anything else is answered 400. A web page
    that rebinds its own DNS name to 127.0.0.1 reaches the app under that name, so this is what
    keeps such a page from every route.
    Origin: a request that can change something (any method but GET, HEAD and OPTIONS) sent by a
    page of another origin (its Origin, or lacking one its Referer) is answered 403. Browsers send
    a cross-site multipart POST (an upload) without asking first (no CORS preflight), so answering
    only the preflight is not enough. A read with a foreign Origin (a script's cross-origin fetch)
    is refused too: gradio's CORS rules let any page on localhost, whatever its port, read the
    answers. Requests without Origin and Referer (gradio_client, curl) are not a browser's: they pass.

UploadQuota
    An upload (POST /gradio_api/upload) that would take the workspace over its quota is answered
    413 before gradio writes a byte: gradio's cache, where uploads land, is in the workspace.

LoginGuard
    The log-in (POST /login): after a few failures from one client, and after more from all
    clients together, further attempts are answered 429 with a Retry-After that doubles with
    each failure; they never reach the password check. Nothing sleeps: the server stays free.

No gradio here (starlette only), so the checks are tested without a server.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_INTERFACES = frozenset({"0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATHS = frozenset({"/login", "/login/"})  # gradio's log-in route (routes.py, App.create_app)
UPLOAD_PATHS = frozenset({"/gradio_api/upload", "/gradio_api/upload/"})  # gradio's upload route
MIN_PASSWORD_LENGTH = 8


def host_name(text: str) -> str | None:
    """The host of a Host header or of an address ("[::1]:7860" -> "::1", "Example.org." ->
    "example.org"); None when it is not one."""
    try:
        parts = urlsplit("//" + text.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".")
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return name


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedHosts:
    """The names under which a browser may address the app. `listen` is the address it listens on,
    `port` its port, `extra` the names added by the user (a proxy's, a DNS name of the machine) or
    learnt before the start (Colab's proxy of this port). `late` gives the addresses known only once
    the server runs (the share link, whose host gradio's share server picks): asked at each request,
    empty until then."""

    listen: str
    port: int
    extra: frozenset[str] = frozenset()
    late: Callable[[], Iterable[str]] | None = None
    names: frozenset[str] = field(init=False)

    def __post_init__(self):
        own = {self.listen.lower()}
        if self.listen in ALL_INTERFACES:
            own = {socket.gethostname().lower(), socket.getfqdn().lower()}
        object.__setattr__(self, "names", frozenset(own | LOOPBACK_NAMES | self.extra))

    @classmethod
    def of(
        cls, listen: str, port: int, extra: Iterable[str] = (), late: Callable[[], Iterable[str]] | None = None
    ) -> AllowedHosts:
        return cls(listen, port, frozenset(parse_host_list(extra)), late)

    def learnt(self) -> set[str]:
        """The host names of the `late` addresses (URLs or names) known now."""
        names = set()
        for address in self.late() if self.late is not None else ():
            if address:
                text = str(address).strip()
                name = host_name(urlsplit(text).netloc if "//" in text else text)
                if name is not None:
                    names.add(name.lower())
        return names

    def allows(self, name: str) -> bool:
        # On every interface any address of the machine is legitimate, and behind a port forward
        # (a container) the browser's address is not even the machine's own. An address typed as
        # such cannot be a rebinding: that needs a DNS name the attacker controls.
        return (
            name in self.names
            or (self.listen in ALL_INTERFACES and is_ip(name))
            or (self.late is not None and name in self.learnt())
        )

    def allows_origin(self, origin: str, host_header: str) -> bool:
        """Whether a page at `origin` (scheme://host[:port]) is this app's own page, for a request
        that came with `host_header` (already allowed)."""
        parts = urlsplit(origin.strip())
        name = host_name(parts.netloc) if parts.scheme in ("http", "https") else None
        if name is None:
            return False  # "null" (a sandboxed frame, a file), another scheme, garbage
        if parts.netloc.lower() == host_header.strip().lower():
            return True  # the very address this request went to: same origin
        if name in self.extra or (self.late is not None and name in self.learnt()):
            return True  # a reverse proxy the user named (Colab's, the share link's), whatever its port
        # this app under another loopback name (localhost vs 127.0.0.1): only on its own port
        return name in LOOPBACK_NAMES and (parts.port or {"http": 80, "https": 443}[parts.scheme]) == self.port


def parse_host_list(items: Iterable[str] | str | None) -> list[str]:
    """Host names from FINETUNE_ALLOWED_HOSTS / --allowed-hosts ("a.example, b.example:8443");
    ValueError naming the first that is not one."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    names = []
    for item in items:
        for text in item.replace(",", " ").split():
            name = host_name(text)
            if name is None:
                raise ValueError(f"not a host name: {text!r}")
            names.append(name.lower())
    return names


def _refuse(status: int, reason: str, headers: dict | None = None) -> PlainTextResponse:
    return PlainTextResponse(reason + "\n", status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware: the Host and Origin checks (see the module's docstring)."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts):
        self.app, self.hosts = app, hosts

    def refusal(self, scope: Scope) -> PlainTextResponse | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host_name(host)
        if name is None or not self.hosts.allows(name.lower()):
            return _refuse(
                400, "Invalid host header: this app does not answer to that name (see FINETUNE_ALLOWED_HOSTS)"
            )
        changes = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        origin = headers.get("origin")
        if origin is None and changes:  # a Referer alone also comes with links from other sites: fine to read
            origin = headers.get("referer")
        if origin is not None and not self.hosts.allows_origin(_origin_of(origin), host):
            return _refuse(403, "Cross-origin request refused: a page of another site may not change anything here")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        response = self.refusal(scope)
        if response is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            from starlette.websockets import WebSocketClose

            await WebSocketClose(code=1008)(scope, receive, send)
        else:
            await response(scope, receive, send)


def _origin_of(url: str) -> str:
    """scheme://netloc of an Origin or Referer ("null" stays "null")."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    until: float = 0.0  # refused until then


class Backoff:
    """Failed log-ins remembered per client and for all clients together. The `free`-th failure of a
    client (the `global_free`-th of all together) locks out for `delay` seconds, and each further
    one for twice as long as the one before, at most `max_delay`. A failure is counted when the attempt starts,
    so a burst of parallel attempts cannot all slip in before the first one fails; a success wipes
    the client's and the global count. Failures `forget` seconds old are forgotten; at most
    `max_clients` clients are remembered (the global count still sees the others)."""

    def __init__(
        self,
        free: int = 5,
        global_free: int = 30,
        delay: float = 1.0,
        max_delay: float = 300.0,
        forget: float = 3600.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.free, self.global_free, self.delay, self.max_delay = free, global_free, delay, max_delay
        self.forget, self.max_clients, self.clock = forget, max_clients, clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._all = _Failures()
        self._lock = threading.Lock()

    def _fresh(self, failures: _Failures | None, now: float) -> _Failures:
        if failures is None or now - failures.last > self.forget:
            return _Failures()
        return failures

    def _fail(self, failures: _Failures, free: int, now: float) -> None:
        failures.count += 1
        failures.last = now
        if failures.count >= free:
            failures.until = now + min(self.max_delay, self.delay * 2 ** min(failures.count - free, 64))

    def attempt(self, client: str) -> float:
        """Seconds the client must wait (the attempt is refused), or 0: the attempt goes ahead and
        counts as a failure until `succeeded` says otherwise."""
        now = self.clock()
        with self._lock:
            mine = self._fresh(self._clients.get(client), now)
            self._all = self._fresh(self._all, now)
            wait = max(mine.until, self._all.until) - now
            if wait > 0:
                return wait
            self._fail(mine, self.free, now)
            self._fail(self._all, self.global_free, now)
            self._clients[client] = mine
            self._clients.move_to_end(client)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return 0.0

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)
            self._all = _Failures()


class LoginGuard:
    """ASGI middleware: POST /login held to a Backoff (see the module's docstring)."""

    def __init__(self, app: ASGIApp, backoff: Backoff):
        self.app, self.backoff = app, backoff

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.backoff.attempt(client)
        if wait > 0:
            seconds = math.ceil(wait)
            response = _refuse(
                429, f"Too many failed log-ins: try again in {seconds} s", headers={"Retry-After": str(seconds)}
            )
            await response(scope, receive, send)
            return
        status = []

        async def watching(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watching)
        if status and 200 <= status[0] < 300:
            self.backoff.succeeded(client)


class UploadQuota:
    """ASGI middleware: `check_room(bytes)` (Workspace.check_room: raises with a one-line message
    when that much more would take the workspace over its quota) asked before an upload reaches
    gradio. The size is the request's Content-Length; an upload without one (chunked) is refused
    only when the workspace is full already."""

    def __init__(self, app: ASGIApp, check_room: Callable[[int], None]):
        self.app, self.check_room = app, check_room

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        need = int(length) if length.isdigit() else 0
        from starlette.concurrency import run_in_threadpool

        try:  # measuring the workspace walks it: not on the event loop
            await run_in_threadpool(self.check_room, need)
        except Exception as problem:  # noqa: BLE001 - FinetuneError: the quota's one line
            await _refuse(413, str(problem))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def middleware(
    hosts: AllowedHosts, backoff: Backoff | None = None, check_room: Callable[[int], None] | None = None
) -> list[Middleware]:
    """For launch(app_kwargs={"middleware": ...}): the Host and Origin checks, outermost, then the
    log-in back-off (when there is a log-in) and the upload quota (when there is one)."""
    stack = [Middleware(RequestGuard, hosts=hosts)]
    if backoff is not None:
        stack.append(Middleware(LoginGuard, backoff=backoff))
    if check_room is not None:
        stack.append(Middleware(UploadQuota, check_room=check_room))
    return stack

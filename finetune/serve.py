"""`finetune serve RUN`: a small HTTP service that answers other programs with a run's predictions.

    POST /predict   one or more images (multipart, any field name) -> JSON: per image the answer
                    ("unknown" below the run's threshold), the best guess, its confidence and the top-k
    GET  /info      classes, image size, calibration
    GET  /health    {"status": "ok"}

Concurrent requests are batched on the device: each decoded image joins a bounded queue, and one
thread takes up to `max_batch` of them at a time through the model. A full queue is answered 503 with
Retry-After, so memory stays bounded however many clients come (at most `queue_size` decoded images
wait, `decoders` more are being decoded, and an upload is at most `max_upload_mb`, counted as it
arrives, in at most `max_files` files). Slow clients cannot hold the service: at most
`max_connections` connections and requests at once (then 503), a request's head must arrive within
`read_timeout_s` (uvicorn itself only times out idle connections), and its body within that plus one
second per `min_upload_rate` bytes (then 408). The limits are serve_limits.ServeLimits.

A model output that is not finite (NaN, infinity: a broken or diverged model) is no answer: that
image's entry is an error, never a made-up label, and a request with nothing else is a 500 with JSON.

The studio's rules apply: images are opened as the engine opens any image (data.load_rgb: formats,
pixel limit, hostile structures), Host headers other than this machine's names are refused and so are
requests sent by another site's page (studio.guard.RequestGuard: the user's browser can reach a
service on localhost), and listening beyond loopback needs a token, which every request but /health
must then carry as `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request  # FastAPI reads the routes' annotations from this module

from .config import FinetuneError
from .data import load_rgb
from .device import decode_threads
from .predict import Predictor
from .serve_limits import ServeLimits

TOKEN_ENV = "FINETUNE_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_NAME = 200  # characters of a client's file name that are echoed back
RECENT_BATCHES = 1024  # batch sizes kept (a service runs for months: a list of all would grow forever)
logger = logging.getLogger("uvicorn.error")  # shown with uvicorn's own warnings

__all__ = ["ServeLimits", "create_app", "serve"]


class QueueFull(Exception):
    pass


class NotFinite(Exception):
    """The model's output for an image was NaN or infinite: no label can be read from it."""


class Batcher:
    """Images from many requests through the model together: `submit` queues one decoded image and
    returns a Future of its (top, unknown); a thread runs up to max_batch at a time."""

    def __init__(self, predictor: Predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.waiting: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)  # the latest batches' sizes (tests)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finetune-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: torch.Tensor, top_k: int, min_confidence: float | None) -> Future:
        done: Future = Future()
        try:
            self.waiting.put_nowait((image, top_k, min_confidence, done))
        except queue.Full:
            raise QueueFull from None
        return done

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)

    def _next_batch(self) -> list[tuple]:
        try:
            batch = [self.waiting.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = self.limits.max_wait_ms / 1000
        while len(batch) < self.limits.max_batch:
            try:
                batch.append(self.waiting.get(timeout=deadline) if deadline else self.waiting.get_nowait())
            except queue.Empty:
                break
        return batch

    def _answer(self, row: torch.Tensor, top_k: int, min_confidence: float | None, done: Future) -> None:
        if not bool(torch.isfinite(row).all()):  # softmax of a NaN is NaN: no label, no confidence
            done.set_exception(NotFinite())
            return
        threshold = self.predictor.min_confidence(min_confidence)
        [(top, unknown)] = self.predictor._answers(row[None], top_k, threshold)
        if not all(math.isfinite(p) for _, p in top):
            done.set_exception(NotFinite())
        else:
            done.set_result((top, unknown))

    def _run(self) -> None:
        while not self._closed.is_set():
            # A future marked running can no longer be cancelled (a client gone, a request refused as busy), so
            # setting its answer cannot raise and fail the rest of the batch; one cancelled before is left out.
            batch = [item for item in self._next_batch() if item[3].set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                logits = self.predictor.logits(torch.stack([item[0] for item in batch]))
                for row, (_, top_k, min_confidence, done) in zip(logits, batch, strict=True):
                    self._answer(row, top_k, min_confidence, done)
            except Exception as error:  # noqa: BLE001 - each waiting request gets the error, the service goes on
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(error)
            except BaseException:  # never a dead batcher with requests waiting on it
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(RuntimeError("the batcher stopped"))
                raise


def decode_upload(predictor: Predictor, data: bytes, name: str, folder: Path) -> torch.Tensor:
    """An upload's bytes -> the model's input tensor, through the engine's own image checks (a file:
    open_image refuses FIFOs, formats and sizes by what it reads from it). FinetuneError naming it."""
    path = folder / f"upload-{threading.get_ident()}-{os.urandom(4).hex()}"
    try:
        path.write_bytes(data)
        return predictor.transform(load_rgb(path, predictor.min_size))
    except Exception as error:  # noqa: BLE001 - whatever the decoder says about a stranger's file, one line
        raise FinetuneError(f"cannot read image {name!r}: {client_reason(error, path, folder)}") from None
    finally:
        path.unlink(missing_ok=True)


def client_reason(error: Exception, path: Path, folder: Path) -> str:
    """The decoder's first line for the client, with the upload's temporary file (a server path) said
    as "the file"; a message that still names the server's folder is replaced as a whole."""
    lines = str(error).splitlines()
    reason = (lines[0] if lines else "") or type(error).__name__
    for form in (repr(str(path)), repr(path), str(path)):
        reason = reason.replace(form, "the file")
    if str(folder) in reason or str(folder.resolve()) in reason:
        return "not a readable image"
    return reason


def client_name(filename: str | None) -> str:
    """An upload's name as the client gave it, for echoing back: control characters (new lines, escapes)
    dropped, at most MAX_NAME characters. JSON escapes the rest; the client's folders are its own."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable()).strip()
    return name[:MAX_NAME] or "image"


def answer_json(name: str, top: list[tuple[str, float]], unknown: bool) -> dict[str, Any]:
    guess, confidence = top[0]
    return {
        "filename": name,
        "label": "unknown" if unknown else guess,
        "unknown": unknown,
        "best_guess": guess,
        "confidence": confidence,
        "top": [{"label": label, "probability": p} for label, p in top],
    }


def info_json(predictor: Predictor, limits: ServeLimits) -> dict[str, Any]:
    from . import __version__

    return {
        "classes": predictor.classes,
        "arch": predictor.arch,
        "image_size": predictor.image_size,
        "calibration": {
            "temperature": predictor.temperature,
            "min_confidence": predictor.min_confidence(),
        },
        "device": str(predictor.device),
        "limits": {
            "max_upload_mb": limits.max_upload_mb,
            "max_files_per_request": limits.max_files,
            "queue_size": limits.queue_size,
            "max_batch": limits.max_batch,
        },
        "finetune_version": __version__,
    }


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyRefused(Exception):
    """Raised into the app from `receive` when a body breaks the limits; BodyLimit answers it."""


def framing_refusal(headers: list[tuple[bytes, bytes]], max_bytes: int) -> tuple[int, str] | None:
    """(status, message) for a request whose body framing is refused, before a byte of it is read: two
    framings of one body (several Content-Length headers, or one beside Transfer-Encoding) are how
    requests are smuggled past a proxy that reads the other one, so only one is taken."""
    lengths = [value for name, value in headers if name == b"content-length"]
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    if len(lengths) > 1:
        return 400, "several Content-Length headers: send one"
    if lengths and chunked:
        return 400, "both Content-Length and Transfer-Encoding: send one of them"
    if lengths and not lengths[0].strip().isdigit():
        return 400, "Content-Length is not a whole number"
    if lengths and int(lengths[0]) > max_bytes:
        return 413, f"request too large: {int(lengths[0]):,} bytes, over the limit of {max_bytes / 1e6:g} MB"
    return None


class CountedBody:
    """One request's `receive` and `send` as BodyLimit passes them on: the body's bytes counted as they
    come (over the limit: 413, whatever the headers said) against a deadline that grows with them (too
    slow: 408); a refused request's answer is the refusal, with the connection closed, whatever the app
    then sends."""

    def __init__(self, scope, receive, send, max_bytes: int, limits: ServeLimits):
        self.scope, self._receive, self._send = scope, receive, send
        self.max_bytes, self.rate = max_bytes, limits.min_upload_rate
        self.deadline = time.monotonic() + limits.read_timeout_s
        self.received, self.complete = 0, False
        self.refusal: tuple[int, str] | None = None
        self.app_started = self.answered = False

    async def receive(self):
        if self.refusal is not None:
            return {"type": "http.disconnect"}
        if self.complete:  # the body is in: what follows is the server telling of a disconnect
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise self.refuse(408, "the request's body came too slowly: send it at a steady pace") from None
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            self.received += size
            self.deadline += size / self.rate
            if self.received > self.max_bytes:
                limit = f"{self.max_bytes / 1e6:g} MB"
                raise self.refuse(413, f"request too large: over the limit of {limit} (cut at {self.received:,} bytes)")
            self.complete = not message.get("more_body", False)
        return message

    def refuse(self, status: int, message: str) -> BodyRefused:
        self.refusal = (status, message)
        return BodyRefused(message)

    async def send(self, message) -> None:
        if self.refusal is None or self.app_started:
            self.app_started = self.app_started or message["type"] == "http.response.start"
            await self._send(message)
        elif message["type"] == "http.response.start":  # the app's answer to a cut body (often a 500)
            await self.answer()

    async def answer(self) -> None:
        if self.refusal is not None and not self.answered and not self.app_started:
            self.answered = True
            status, text = self.refusal
            await _error(status, text, {"Connection": "close"})(self.scope, self._receive, self._send)


class BodyLimit:
    """ASGI middleware on every POST's body: its framing checked (framing_refusal), and its bytes
    counted as they arrive (CountedBody), so a body without Content-Length (chunked) is cut at the limit
    with 413, never read beyond it."""

    def __init__(self, app, max_bytes: int, limits: ServeLimits | None = None):
        self.app, self.max_bytes, self.limits = app, max_bytes, limits or ServeLimits()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refusal = framing_refusal(scope["headers"], self.max_bytes)
        if refusal is not None:
            await _error(*refusal, {"Connection": "close"})(scope, receive, send)
            return
        body = CountedBody(scope, receive, send, self.max_bytes, self.limits)
        try:
            await self.app(scope, body.receive, body.send)
        except BodyRefused:
            pass  # answered below, unless the app had started its own answer
        finally:
            await body.answer()


class Service:
    """The state the routes share: the predictor, the batcher, the decoding slots and the token."""

    def __init__(self, predictor: Predictor, limits: ServeLimits, token: str | None):
        self.predictor, self.limits, self.token = predictor, limits.check(), token
        self.batcher = Batcher(predictor, limits)
        self.decoding = threading.BoundedSemaphore(max(1, decode_threads()))
        self.folder = Path(tempfile.mkdtemp(prefix="finetune-serve-"))  # private (0700): uploads, briefly

    def authorised(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        with self.decoding:  # decoded images in flight stay bounded however many requests come
            return decode_upload(self.predictor, data, name, self.folder)

    def close(self) -> None:
        self.batcher.close()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def create_app(service: Service, host: str = "127.0.0.1", port: int = 8000, allowed_hosts=()):
    """The ASGI application: FastAPI routes inside the body limit and the studio's Host/Origin guard."""
    from fastapi import FastAPI

    from .studio.guard import AllowedHosts, RequestGuard

    api = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @api.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path != "/health" and not service.authorised(request.headers.get("authorization")):
            return _error(401, "a token is needed: Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    @api.get("/info")
    async def info():
        return info_json(service.predictor, service.limits)

    @api.post("/predict")
    async def predict(request: Request):
        return await predict_request(service, request)

    try:
        hosts = AllowedHosts.of(host, port, allowed_hosts)
    except ValueError as error:
        raise FinetuneError(f"--allowed-hosts: {error}") from None
    guarded = RequestGuard(api, hosts)
    return BodyLimit(guarded, int(service.limits.max_upload_mb * 1e6), service.limits)


def timed_protocol(head_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's head: uvicorn times out only a connection
    that is idle after a response, so a client sending its headers a byte at a time (slowloris) would
    hold its connection, and with max_connections the service, for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()  # the next request's head has the same time

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def arm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(head_timeout, self.head_late)

        def head_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request of it is being answered
                self.timeout_keep_alive_handler()  # closes the connection

    return TimedH11Protocol


def server_config(app, host: str, port: int, limits: ServeLimits):
    """uvicorn's settings for the service: its connections bounded and timed (see timed_protocol)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=timed_protocol(limits.read_timeout_s),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        timeout_graceful_shutdown=10,  # Ctrl-C is not held up by a slow client
    )


def _query_options(service: Service, request) -> tuple[int, float | None]:
    """top_k and min_confidence from the query string; FinetuneError for values that are not (a name
    given twice too: which one was meant?)."""
    params = request.query_params
    for name in ("top_k", "min_confidence"):
        if len(params.getlist(name)) > 1:
            raise FinetuneError(f"{name} is given {len(params.getlist(name))} times: give it once")
    try:
        top_k = int(params.get("top_k", service.limits.top_k))
        given = params.get("min_confidence")
        min_confidence = None if given is None else float(given)
    except ValueError:
        raise FinetuneError("top_k must be a whole number and min_confidence a number") from None
    if top_k < 1:
        raise FinetuneError(f"top_k must be at least 1, got {top_k}")
    if min_confidence is not None:
        service.predictor.min_confidence(min_confidence)  # the range check, in its words
    return min(top_k, len(service.predictor.classes)), min_confidence


async def read_form(service: Service, request):
    """The multipart form, at most max_files files and as many other fields; a JSONResponse refusing
    the request otherwise (413 for too many, 400 for a malformed body, in one line)."""
    from starlette.exceptions import HTTPException

    most = service.limits.max_files
    try:
        return await request.form(max_files=most, max_fields=most)
    except HTTPException as error:  # starlette's words for a multipart body it refused
        if str(error.detail).startswith("Too many"):
            return _error(413, f"too many files or fields in one request: at most {most} of each")
        return _error(400, f"cannot read the request: {error.detail}")
    except Exception as error:  # noqa: BLE001 - a malformed or cut body: one line for the client
        return _error(400, f"cannot read the request: {str(error).splitlines()[0] if str(error) else 'malformed'}")


async def predict_request(service: Service, request) -> Any:
    from fastapi.responses import JSONResponse

    try:
        top_k, min_confidence = _query_options(service, request)
    except FinetuneError as error:
        return _error(422, str(error))
    form = await read_form(service, request)
    if isinstance(form, JSONResponse):
        return form
    try:
        answers = await _predict_form(service, form, top_k, min_confidence)
    finally:
        await form.close()
    if isinstance(answers, JSONResponse):
        return answers
    if any("error" not in answer for answer, _ in answers):
        return {"predictions": [answer for answer, _ in answers]}
    # Nothing answered: the client's fault (422) unless every failure was the model's (500).
    status = 500 if all(server_fault for _, server_fault in answers) else 422
    return JSONResponse({"predictions": [answer for answer, _ in answers]}, status_code=status)


async def _predict_form(service: Service, form, top_k: int, min_confidence: float | None):
    """Each upload decoded and queued, then answered: [(answer, whether a failure was the service's)],
    or a JSONResponse (no image; the queue full, when this request's queued images are withdrawn)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not uploads:
        return _error(400, "no image in the request: send them as multipart files")
    results: list[Any] = []
    for upload in uploads:
        name = client_name(upload.filename)
        try:
            image = await run_in_threadpool(service.decode, await upload.read(), name)
            results.append((name, service.batcher.submit(image, top_k, min_confidence)))
        except FinetuneError as error:
            results.append({"filename": name, "error": str(error)})
        except QueueFull:
            for item in results:
                if isinstance(item, tuple):
                    item[1].cancel()  # a refused request's images take no place in the model's batches
            return _error(503, "busy: too many images are waiting; try again shortly", {"Retry-After": "1"})
    return [await _answer(item) for item in results]


async def _answer(item) -> tuple[dict[str, Any], bool]:
    if isinstance(item, dict):
        return item, False
    name, future = item
    try:
        top, unknown = await asyncio.wrap_future(future)
    except NotFinite:
        logger.warning("finetune serve: the model's output for %r is not finite (NaN or infinity)", name)
        message = "no prediction: the model's output for this image is not finite (NaN or infinity)"
        return {"filename": name, "error": message}, True
    except Exception as error:  # noqa: BLE001 - the model failed on this batch: said per image, detail in the log
        logger.warning("finetune serve: prediction failed for %r: %s", name, error)
        return {
            "filename": name,
            "error": "prediction failed: the model could not answer (see the service's log)",
        }, True
    return answer_json(name, top, unknown), False


def check_exposure(host: str, token: str | None) -> str | None:
    """The token to use: required (and long enough) when listening beyond loopback; one a header can carry."""
    from .studio.app import is_loopback

    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise FinetuneError(f"the token has {len(token)} characters: use at least {MIN_TOKEN_LENGTH}")
    # Headers arrive decoded as Latin-1 and the token is compared stripped: any other token never matches.
    if token is not None and not all("!" <= char <= "~" for char in token):
        raise FinetuneError(
            "the token must be printable ASCII without spaces (letters, digits, punctuation): "
            "a request's Authorization header could never carry it as it is"
        )
    if token is None and not is_loopback(host):
        raise FinetuneError(
            f"refusing to listen on {host} without a token: anyone who can reach this machine could use "
            f"the model. Set {TOKEN_ENV} (or --token, which `ps` shows to other users), or use --host 127.0.0.1"
        )
    return token


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "auto",
    limits: ServeLimits | None = None,
    allowed_hosts=(),
    log=print,
) -> None:
    """Load the model and answer until interrupted (uvicorn; Ctrl-C stops it)."""
    from .extras import require

    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module)  # one line naming the extra, before the model loads
    import uvicorn

    from .device import inference_device

    token = check_exposure(host, token if token is not None else (os.environ.get(TOKEN_ENV) or None))
    limits = (limits or ServeLimits()).check()
    from .rundir import training_here

    busy = training_here(Path(source).expanduser().parent) if Path(source).expanduser().is_dir() else None
    choice = inference_device(device, busy, doing="serving")
    if choice.note:
        log(choice.note)
    service = Service(Predictor.load(source, device=str(choice.device)), limits, token)
    log(
        f"serving {source} ({len(service.predictor.classes)} classes, {service.predictor.device}) on "
        f"http://{host}:{port}: POST /predict, GET /info, GET /health"
        + ("; requests need Authorization: Bearer TOKEN" if token else "")
    )
    try:
        uvicorn.Server(server_config(create_app(service, host, port, allowed_hosts), host, port, limits)).run()
    finally:
        service.close()

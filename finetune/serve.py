"""`finetune serve RUN`: a small HTTP service that answers other programs with a run's predictions.

    POST /predict   one or more images (multipart, any field name) -> JSON: per image the answer
                    ("unknown" below the run's threshold), the best guess, its confidence and the top-k
    GET  /info      classes, image size, calibration
    GET  /health    {"status": "ok"}

Concurrent requests are batched on the device: each decoded image joins a bounded queue, and one
thread takes up to `max_batch` of them at a time through the model. A full queue is answered 503 with
Retry-After, so memory stays bounded however many clients come (at most `queue_size` decoded images
wait, `decoders` more are being decoded, and an upload is at most `max_upload_mb`).

The studio's rules apply: images are opened as the engine opens any image (data.load_rgb: formats,
pixel limit, hostile structures), Host headers other than this machine's names are refused and so are
requests sent by another site's page (studio.guard.RequestGuard: the user's browser can reach a
service on localhost), and listening beyond loopback needs a token, which every request but /health
must then carry as `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import queue
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request  # FastAPI reads the routes' annotations from this module

from .config import FinetuneError
from .data import load_rgb
from .device import decode_threads
from .predict import Predictor

TOKEN_ENV = "FINETUNE_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_FILES_PER_REQUEST = 64


@dataclass(frozen=True)
class ServeLimits:
    max_upload_mb: float = 64.0  # the whole request body
    queue_size: int = 256  # decoded images waiting for the model
    max_batch: int = 32
    max_wait_ms: float = 5.0  # how long a batch waits for more images once it has one
    top_k: int = 5

    def check(self) -> ServeLimits:
        for name in ("max_upload_mb", "queue_size", "max_batch"):
            if getattr(self, name) <= 0:
                raise FinetuneError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise FinetuneError(f"max wait must be 0 or more milliseconds, got {self.max_wait_ms}")
        return self


class QueueFull(Exception):
    pass


class Batcher:
    """Images from many requests through the model together: `submit` queues one decoded image and
    returns a Future of its (top, unknown); a thread runs up to max_batch at a time."""

    def __init__(self, predictor: Predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.waiting: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.batch_sizes: list[int] = []  # what went through the model together (tests, /info)
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

    def _run(self) -> None:
        while not self._closed.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                logits = self.predictor.logits(torch.stack([item[0] for item in batch]))
                for row, (_, top_k, min_confidence, done) in zip(logits, batch, strict=True):
                    if done.cancelled():  # its client went away: the others still get their answers
                        continue
                    threshold = self.predictor.min_confidence(min_confidence)
                    [(top, unknown)] = self.predictor._answers(row[None], top_k, threshold)
                    done.set_result((top, unknown))
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
        raise FinetuneError(
            f"cannot read image {name!r}: {str(error).splitlines()[0] if str(error) else error}"
        ) from None
    finally:
        path.unlink(missing_ok=True)


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
            "max_files_per_request": MAX_FILES_PER_REQUEST,
            "queue_size": limits.queue_size,
            "max_batch": limits.max_batch,
        },
        "finetune_version": __version__,
    }


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a POST must say its length (Content-Length; the server holds the body to it),
    and one over the limit is answered 413 before a byte of it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length")
            if length is None or not length.isdigit():
                await _error(411, "send the request's Content-Length")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                limit = f"{self.max_bytes / 1e6:g} MB"
                await _error(413, f"request too large: {int(length):,} bytes, over the limit of {limit}")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


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
    return BodyLimit(guarded, int(service.limits.max_upload_mb * 1e6))


def _query_options(service: Service, request) -> tuple[int, float | None]:
    """top_k and min_confidence from the query string; FinetuneError for values that are not."""
    params = request.query_params
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


async def predict_request(service: Service, request) -> Any:
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    try:
        top_k, min_confidence = _query_options(service, request)
        form = await request.form(max_files=MAX_FILES_PER_REQUEST, max_fields=MAX_FILES_PER_REQUEST)
    except FinetuneError as error:
        return _error(422, str(error))
    except Exception as error:  # noqa: BLE001 - a malformed body, too many files: one line for the client
        return _error(400, f"cannot read the request: {error}")
    try:
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            return _error(400, "no image in the request: send them as multipart files")
        results: list[Any] = []
        for upload in uploads:
            name = (upload.filename or "image")[:200]
            try:
                image = await run_in_threadpool(service.decode, await upload.read(), name)
                results.append((name, service.batcher.submit(image, top_k, min_confidence)))
            except FinetuneError as error:
                results.append({"filename": name, "error": str(error)})
            except QueueFull:
                return _error(503, "busy: too many images are waiting; try again shortly", {"Retry-After": "1"})
        answers = [await _answer(item) for item in results]
    finally:
        await form.close()
    ok = any("error" not in answer for answer in answers)
    if not ok:
        from fastapi.responses import JSONResponse

        return JSONResponse({"predictions": answers}, status_code=422)
    return {"predictions": answers}


async def _answer(item) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    name, future = item
    try:
        top, unknown = await asyncio.wrap_future(future)
    except Exception as error:  # noqa: BLE001 - the model failed on this batch: said per image
        return {"filename": name, "error": f"prediction failed: {error}"}
    return answer_json(name, top, unknown)


def check_exposure(host: str, token: str | None) -> str | None:
    """The token to use: required (and long enough) when listening beyond loopback."""
    from .studio.app import is_loopback

    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise FinetuneError(f"the token has {len(token)} characters: use at least {MIN_TOKEN_LENGTH}")
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
        uvicorn.run(create_app(service, host, port, allowed_hosts), host=host, port=port, log_level="warning")
    finally:
        service.close()

"""`finetune serve`: predictions over HTTP, batched, bounded, and with the studio's security rules."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from finetune import serve
from finetune.cli import main
from finetune.config import FinetuneError
from finetune.model import build_model
from finetune.predict import Predictor

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (30, 30, 30)]


def png(colour, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model("resnet34", 3, "none")
    return Predictor(model, ["ant", "bee", "<b>wasp</b>"], "resnet34", image_size=32, device="cpu")


class Running:
    """The service on a free loopback port, in a thread (uvicorn.Server), for one test."""

    def __init__(self, service: serve.Service, token: str | None = None):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        app = serve.create_app(service, "127.0.0.1", self.port)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.service = service
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()


def post(url: str, files, headers=None, params=None) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=files, headers=headers, params=params, timeout=60)


def test_fifty_concurrent_requests_are_batched_and_each_gets_its_own_answer(predictor):
    expected = {k: predictor.predict_one(Image.open(io.BytesIO(png(c)))).top[0][0] for k, c in enumerate(COLOURS)}
    service = serve.Service(predictor, serve.ServeLimits(max_batch=16, max_wait_ms=20), token=None)
    with Running(service) as running:

        def ask(k: int) -> tuple[int, httpx.Response]:
            colour = k % len(COLOURS)
            return colour, post(running.url, [("file", (f"img{k}.png", png(COLOURS[colour]), "image/png"))])

        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(ask, range(50)))
        info = httpx.get(f"{running.url}/info").json()
        assert httpx.get(f"{running.url}/health").json() == {"status": "ok"}
    for colour, response in answers:
        assert response.status_code == 200, response.text
        [prediction] = response.json()["predictions"]
        assert prediction["best_guess"] == expected[colour]
        assert len(prediction["top"]) == 3 and abs(sum(t["probability"] for t in prediction["top"]) - 1) < 1e-4
    assert sum(service.batcher.batch_sizes) == 50
    assert max(service.batcher.batch_sizes) > 1  # concurrent requests went through the model together
    assert max(service.batcher.batch_sizes) <= 16
    assert info["classes"] == ["ant", "bee", "<b>wasp</b>"] and info["image_size"] == 32
    assert info["calibration"] == {"temperature": 1.0, "min_confidence": 0.0}


def test_several_images_in_one_request_and_a_bad_one_named(predictor):
    service = serve.Service(predictor, serve.ServeLimits(), token=None)
    with Running(service) as running:
        files = [
            ("a", ("red.png", png(COLOURS[0]), "image/png")),
            ("b", ("notes.png", b"not an image at all", "image/png")),
            ("c", ("green.png", png(COLOURS[1]), "image/png")),
        ]
        response = post(running.url, files, params={"top_k": 2, "min_confidence": 0.99})
        assert response.status_code == 200
        red, bad, green = response.json()["predictions"]
        assert red["filename"] == "red.png" and len(red["top"]) == 2
        assert red["unknown"] and red["label"] == "unknown" and red["best_guess"] in predictor.classes
        assert bad == {"filename": "notes.png", "error": bad["error"]} and "notes.png" in bad["error"]
        assert "\n" not in bad["error"]
        only_bad = post(running.url, [("f", ("x.jpg", b"\xff\xd8garbage", "image/jpeg"))])
        assert only_bad.status_code == 422 and "x.jpg" in only_bad.json()["predictions"][0]["error"]
        assert post(running.url, {"f": ("r.png", png(COLOURS[0]))}, params={"top_k": 0}).status_code == 422
        assert post(running.url, {"f": ("r.png", png(COLOURS[0]))}, params={"min_confidence": 2}).status_code == 422
        empty = httpx.post(f"{running.url}/predict", data={"x": "1"})
        assert empty.status_code == 400 and "no image" in empty.json()["error"]


def test_an_image_over_the_pixel_limit_is_refused_undecoded(predictor, monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_PIXELS", "1000")
    service = serve.Service(predictor, serve.ServeLimits(), token=None)
    with Running(service) as running:
        response = post(running.url, [("f", ("big.png", png(COLOURS[0], (100, 100)), "image/png"))])
    assert response.status_code == 422 and "too large" in response.json()["predictions"][0]["error"]


def test_limits_a_large_body_and_a_full_queue(predictor, monkeypatch):
    service = serve.Service(predictor, serve.ServeLimits(max_upload_mb=0.01, queue_size=1, max_batch=1), token=None)
    release = threading.Event()
    real = predictor.logits

    def slow(images):
        release.wait(20)
        return real(images)

    monkeypatch.setattr(predictor, "logits", slow)
    with Running(service) as running:
        big = post(running.url, [("f", ("big.png", b"\0" * 20_000, "image/png"))])
        assert big.status_code == 413 and "over the limit" in big.json()["error"]
        with ThreadPoolExecutor(max_workers=6) as pool:
            pending = [pool.submit(post, running.url, {"f": ("r.png", png(COLOURS[0]))}) for _ in range(6)]
            time.sleep(1.5)  # one in the model, one queued: the rest find the queue full
            release.set()
            codes = sorted(f.result().status_code for f in pending)
    assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}
    refused = next(f.result() for f in pending if f.result().status_code == 503)
    assert refused.headers["retry-after"] == "1"


def test_a_token_is_required_when_set_and_foreign_hosts_and_sites_are_refused(predictor):
    token = "s3cret-token-of-enough-length"
    service = serve.Service(predictor, serve.ServeLimits(), token=token)
    with Running(service) as running:
        files = {"f": ("r.png", png(COLOURS[0]))}
        assert post(running.url, files).status_code == 401
        assert (
            post(running.url, files, headers={"Authorization": "Bearer wrong-token-of-the-same-size"}).status_code
            == 401
        )
        assert httpx.get(f"{running.url}/info").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200  # for load balancers: says nothing
        good = {"Authorization": f"Bearer {token}"}
        assert post(running.url, files, headers=good).status_code == 200
        rebound = httpx.get(f"{running.url}/info", headers={**good, "Host": "attacker.example"})
        assert rebound.status_code == 400  # DNS rebinding: a page's own name pointed at 127.0.0.1
        cross = post(running.url, files, headers={**good, "Origin": "https://evil.example"})
        assert cross.status_code == 403  # another site's page, through the user's browser


def test_listening_beyond_loopback_needs_a_long_token():
    assert serve.check_exposure("127.0.0.1", None) is None
    with pytest.raises(FinetuneError, match="refusing to listen on 0.0.0.0 without a token"):
        serve.check_exposure("0.0.0.0", None)
    with pytest.raises(FinetuneError, match="at least 16"):
        serve.check_exposure("0.0.0.0", "short")
    assert serve.check_exposure("0.0.0.0", "x" * 16) == "x" * 16


def test_the_command_refuses_an_exposed_service_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without a token" in err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_cancelled_request_does_not_fail_the_others_of_its_batch(predictor):
    batcher = serve.Batcher(predictor, serve.ServeLimits(max_batch=8, max_wait_ms=200))
    try:
        image = torch.zeros(3, 32, 32)
        gone, kept = batcher.submit(image, 2, None), batcher.submit(image, 2, None)
        gone.cancel()  # a client that disconnected
        top, unknown = kept.result(timeout=30)
        assert len(top) == 2
    finally:
        batcher.close()

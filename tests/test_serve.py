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
        self.server = uvicorn.Server(serve.server_config(app, "127.0.0.1", self.port, service.limits))
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
    service = serve.Service(
        predictor, serve.ServeLimits(max_upload_mb=0.01, queue_size=1, max_batch=1, max_files=1), token=None
    )
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


def test_a_token_no_request_could_carry_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    for token in ("ünïcödé-token-123456", " padded-token-123456", "padded-token-123456\n", "two words-token-1234"):
        with pytest.raises(FinetuneError, match="printable ASCII without spaces") as caught:
            serve.check_exposure("0.0.0.0", token)
        assert token.strip() not in str(caught.value)  # a secret is not echoed
    assert serve.check_exposure("0.0.0.0", "Aa0!~-_.token-1234") == "Aa0!~-_.token-1234"
    monkeypatch.setenv(serve.TOKEN_ENV, "ünïcödé-token-123456")
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "printable ASCII" in err


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


def test_a_request_withdrawn_while_its_batch_is_answered_does_not_fail_the_others(predictor, monkeypatch):
    """A request refused as busy cancels its queued images: one cancelled between the batcher's look at it
    and its answer must not turn the other clients' answers in that batch into errors."""
    batcher = serve.Batcher(predictor, serve.ServeLimits(max_batch=2, max_wait_ms=5000))
    futures: list = []
    ready = threading.Event()
    real = predictor._answers

    def answers_while_withdrawn(*args):
        ready.wait(10)
        futures[0].cancel()  # the refused request's client, on the event loop, mid-batch
        return real(*args)

    monkeypatch.setattr(predictor, "_answers", answers_while_withdrawn)
    try:
        image = torch.zeros(3, 32, 32)
        futures += [batcher.submit(image, 2, None), batcher.submit(image, 2, None)]
        ready.set()
        top, _ = futures[1].result(timeout=30)
        assert len(top) == 2
        assert list(batcher.batch_sizes) == [2]
    finally:
        batcher.close()


def raw_exchange(port: int, head: bytes, chunks=(), pause: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send a request's bytes as given (the head, then each chunk), and read until the server closes:
    what a client that breaks the rules sees."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(head)
            for chunk in chunks:
                conn.sendall(chunk)
                time.sleep(pause)
        except OSError:  # the server cut us off: its answer is still there to read
            pass
        received = b""
        try:
            while data := conn.recv(65536):
                received += data
        except OSError:
            pass
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def test_slow_clients_are_cut_and_cannot_hold_the_service(predictor):
    limits = serve.ServeLimits(max_connections=3, read_timeout_s=0.5, min_upload_rate=1000)
    with Running(serve.Service(predictor, limits, token=None)) as running:
        slow = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(3)]
        for conn in slow:  # slowloris: a head that never ends
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.1)
        files = {"f": ("r.png", png(COLOURS[0]))}
        assert post(running.url, files).status_code == 503  # the connections are all taken...
        started = time.monotonic()
        for conn in slow:
            assert conn.recv(100) == b""  # ...until the head's deadline closes each of them
            conn.close()
        assert time.monotonic() - started < 3
        assert post(running.url, files).status_code == 200
        # A body that trickles: its deadline is read_timeout_s, plus 1 s per min_upload_rate bytes.
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        started = time.monotonic()
        trickle = [multipart_parts()[0]] + [b"\0" * 10] * 20  # a file's bytes, 10 every 0.1 s
        answer = raw_exchange(running.port, head + b"Content-Length: 5000\r\n\r\n", trickle, pause=0.1)
        assert status_of(answer) == 408 and b"too slowly" in answer
        assert time.monotonic() - started < 2.5  # cut, and the connection closed, not left open


def test_body_framing_is_refused_and_a_chunked_body_is_cut_at_the_limit(predictor):
    limits = serve.ServeLimits(max_upload_mb=0.01)  # 10,000 bytes
    with Running(serve.Service(predictor, limits, token=None)) as running:
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        two = raw_exchange(running.port, head + b"Content-Length: 10\r\nContent-Length: 20\r\n\r\n0123456789")
        assert status_of(two) == 400
        both = head + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert status_of(raw_exchange(running.port, both, [b"a\r\n0123456789\r\n0\r\n\r\n"])) == 400
        chunk = b"3e8\r\n" + b"\0" * 1000 + b"\r\n"  # 1,000 bytes a chunk, no Content-Length
        start = multipart_parts()[0]
        opening = f"{len(start):x}\r\n".encode() + start + b"\r\n"  # a file part whose bytes never end
        cut = raw_exchange(running.port, head + b"Transfer-Encoding: chunked\r\n\r\n", [opening] + [chunk] * 1000)
        assert status_of(cut) == 413 and b"over the limit of 0.01 MB" in cut
        counted = int(cut.split(b"cut at ")[1].split(b" bytes")[0].replace(b",", b""))
        # Read to the limit and what uvicorn had in hand then (it stops reading at 64 KiB): not all 1 MB.
        assert 10_000 < counted < 200_000
        small = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in multipart_parts()) + b"0\r\n\r\n"
        fine = raw_exchange(running.port, head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n", [small])
        assert status_of(fine) == 200 and b'"predictions"' in fine


def multipart_parts() -> list[bytes]:
    image = png(COLOURS[1])
    return [b'--x\r\nContent-Disposition: form-data; name="f"; filename="g.png"\r\n\r\n', image, b"\r\n--x--\r\n"]


def test_the_body_limit_refuses_two_framings_even_where_the_server_lets_them_through():
    """h11 merges identical Content-Length headers; behind another server the middleware still refuses."""
    limit = 1000
    assert serve.framing_refusal([(b"content-length", b"5"), (b"content-length", b"5")], limit)[0] == 400
    assert serve.framing_refusal([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], limit)[0] == 400
    assert serve.framing_refusal([(b"content-length", b"-5")], limit)[0] == 400
    assert serve.framing_refusal([(b"content-length", b"1001")], limit)[0] == 413
    assert serve.framing_refusal([(b"content-length", b"1000")], limit) is None
    assert serve.framing_refusal([(b"transfer-encoding", b"chunked")], limit) is None


def test_a_non_finite_model_output_is_an_error_in_json_never_a_label(predictor, monkeypatch):
    real = predictor.logits

    def broken_on_red(images):  # NaN for the reddish images, a proper answer for the others
        out = real(images).clone()
        out[images[:, 0].mean(dim=(1, 2)) > images[:, 2].mean(dim=(1, 2))] = float("nan")
        return out

    monkeypatch.setattr(predictor, "logits", broken_on_red)
    with Running(serve.Service(predictor, serve.ServeLimits(), token=None)) as running:
        only = post(running.url, [("f", ("red.png", png(COLOURS[0]), "image/png"))])
        assert only.status_code == 500  # the service's failure, not the client's: JSON all the same
        [entry] = only.json()["predictions"]
        assert entry == {"filename": "red.png", "error": entry["error"]} and "not finite" in entry["error"]
        mixed = post(running.url, [("a", ("red.png", png(COLOURS[0]))), ("b", ("blue.png", png(COLOURS[2])))])
        assert mixed.status_code == 200
        red, blue = mixed.json()["predictions"]
        assert "not finite" in red["error"] and "confidence" not in red
        assert blue["best_guess"] in predictor.classes and 0 <= blue["confidence"] <= 1
        again = post(running.url, [("f", ("r.png", png(COLOURS[0])))])  # the service goes on
        assert again.status_code == 500 and again.headers["content-type"] == "application/json"
        assert post(running.url, [("f", ("b.png", png(COLOURS[2])))]).status_code == 200


def test_errors_name_the_clients_file_and_never_a_server_path(predictor):
    service = serve.Service(predictor, serve.ServeLimits(), token=None)
    with Running(service) as running:
        name = b"../secret\t\x1b[31mnotes.png"  # sent raw: httpx would percent-encode what a hostile client need not
        for data in (b"not an image at all", b"GIF89a" + b"\0" * 30, b"\x89PNG\r\n\x1a\n" + b"x" * 40):
            body = b'--x\r\nContent-Disposition: form-data; name="f"; filename="' + name + b'"\r\n\r\n'
            body += data + b"\r\n--x--\r\n"
            response = httpx.post(
                f"{running.url}/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"}
            )
            assert response.status_code == 422
            [entry] = response.json()["predictions"]
            assert entry["filename"] == "../secret[31mnotes.png"  # control characters dropped
            assert str(service.folder) not in response.text and "upload-" not in response.text
            assert "/tmp" not in entry["error"] and "\n" not in entry["error"]
    assert serve.client_name("") == "image" and len(serve.client_name("a" * 1000)) == serve.MAX_NAME


def test_files_per_request_and_repeated_options_are_bounded(predictor):
    service = serve.Service(predictor, serve.ServeLimits(max_files=2), token=None)
    with Running(service) as running:
        three = [(f"f{k}", (f"{k}.png", png(COLOURS[k]))) for k in range(3)]
        refused = post(running.url, three)
        assert refused.status_code == 413 and "at most 2" in refused.json()["error"]
        assert post(running.url, three[:2]).status_code == 200
        twice = httpx.post(f"{running.url}/predict?top_k=1&top_k=2", files=three[:1])
        assert twice.status_code == 422 and "once" in twice.json()["error"]
        assert httpx.get(f"{running.url}/info").json()["limits"]["max_files_per_request"] == 2
    assert service.batcher.batch_sizes.maxlen == serve.RECENT_BATCHES  # a long-lived service keeps the latest


def test_the_commands_defaults_are_serve_limits():
    from finetune.cli import build_parser

    args = build_parser().parse_args(["serve", "RUN"])
    for name, value in vars(serve.ServeLimits()).items():
        assert getattr(args, name, value) == value
    assert args.max_files == serve.ServeLimits().max_files and args.read_timeout_s == 20.0
    with pytest.raises(FinetuneError, match="read timeout s must be positive"):
        serve.ServeLimits(read_timeout_s=0).check()


def test_limits_that_are_not_finite_or_cannot_be_met_are_refused_in_one_line(tmp_path, capsys):
    for name in ("max_upload_mb", "read_timeout_s", "max_wait_ms", "queue_size"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(FinetuneError, match=f"^{name.replace('_', ' ')} must be a finite number"):
                serve.ServeLimits(**{name: value}).check()
    with pytest.raises(FinetuneError, match=r"max files \(4\) is more than the queue size \(2\)"):
        serve.ServeLimits(queue_size=2, max_batch=1, max_files=4).check()
    assert serve.ServeLimits(queue_size=4, max_files=4).check().max_files == 4
    for option in ("--max-upload-mb", "--read-timeout-s"):
        for value in ("nan", "inf"):
            assert main(["serve", str(tmp_path), option, value]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "must be a finite number" in err
    assert main(["serve", str(tmp_path), "--queue-size", "2", "--max-files", "4"]) == 2
    assert "more than the queue size" in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python (torch's import: seconds)
def test_building_the_parser_does_not_load_the_web_stack():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from finetune.cli import build_parser\n"
        "build_parser().parse_args(['serve', 'RUN'])\n"
        "print(sorted(m for m in ('starlette', 'fastapi', 'uvicorn', 'finetune.serve') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

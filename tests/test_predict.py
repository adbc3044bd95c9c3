"""Prediction: class order from train to predict, classic files, any image mode, batching, CSV."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders, make_image, needs_fifo, run_within
from PIL import Image
from torchvision import models

from finetune.calibrate import MISS_RATE, fit_temperature, softmax, suggest_threshold
from finetune.config import FinetuneError, TrainConfig
from finetune.data import eval_transform, list_images, load_rgb
from finetune.predict import Predictor, read_class_indices, write_csv
from finetune.training import train

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A model trained from scratch to tell three colours apart.

    `last` rather than `head`: random (not pretrained) backbone features are huge (norms ~500), which a
    lone linear head learns from badly; the trainable layer4 BatchNorm rescales them.
    """
    data = make_class_folders(
        tmp_path_factory.mktemp("data") / "colours", classes=("red", "green", "blue"), per_class=8
    )
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(tmp_path_factory.mktemp("runs")),
        weights="none",
        strategy="last",
        epochs=6,
        lr=1e-3,
        batch_size=4,
        image_size=64,
        workers=0,
        seed=0,
        label_smoothing=0.0,
    )
    return train(cfg), data


def test_class_order_survives_from_training_folders_to_predictions(trained_run):
    run, data = trained_run
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.classes == ["blue", "green", "red"]  # sorted folder names, saved with the model
    assert read_class_indices(run / "class_indices.json") == predictor.classes
    split = json.loads((run / "split.json").read_text())
    for rel, label in split["train"] + split["val"]:  # the indices the model was trained on
        assert predictor.classes[label] == rel.split("/")[0], rel
    predictions = predictor.predict_paths(list_images([data]), top_k=3)
    assert all(p.error is None for p in predictions)
    # and what it learned comes back under the right names: most of each folder is predicted as it (a
    # shuffled order gets whole classes wrong). Not all of it: 5 seeds gave 22 to 24 of 24 right.
    for name in CLASSES:
        labels = [p.label for p in predictions if p.path.split("/")[-2] == name]
        assert labels.count(name) > len(labels) / 2, (name, labels)


def test_predictor_matches_a_plain_torchvision_forward(trained_run):
    run, data = trained_run
    predictor = Predictor.from_run(run, device="cpu")
    model = models.resnet34(num_classes=3)
    model.load_state_dict(torch.load(run / "model.pth", weights_only=True))
    model.eval()
    names = json.loads((run / "class_indices.json").read_text())
    paths = list_images([data])[:5]
    batch = torch.stack([eval_transform(64)(load_rgb(p)) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(model(batch), dim=1)
    for row, p in zip(probs, predictor.predict_paths(paths, top_k=3), strict=True):
        assert p.label == names[str(int(row.argmax()))]
        assert p.confidence == pytest.approx(float(row.max()), abs=1e-5)
        assert sum(prob for _, prob in p.top) == pytest.approx(1.0, abs=1e-5)


def test_classic_state_dict_and_class_file(tmp_path):
    """model.pth + class_indices.json as the classic scripts write them; the head picks index 2."""
    model = models.resnet34(num_classes=3)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "zebra", "1": "apple", "2": "mango"}, indent=4))
    image = make_image(tmp_path / "x.png")
    predictor = Predictor.load(tmp_path / "model.pth", arch="resnet34", device="cpu")
    assert predictor.classes == ["zebra", "apple", "mango"]  # the file's order, never re-sorted
    assert predictor.predict_image(image, top_k=1)[0][0] == "mango"

    (tmp_path / "two.json").write_text(json.dumps({"0": "a", "1": "b"}))
    with pytest.raises(FinetuneError, match="3-class head but the class list has 2 classes"):
        Predictor.load(tmp_path / "model.pth", classes=tmp_path / "two.json", arch="resnet34")
    with pytest.raises(FinetuneError, match="wrong --arch"):
        Predictor.load(tmp_path / "model.pth", arch="resnet50")
    with pytest.raises(FinetuneError, match="--arch"):
        Predictor.load(tmp_path / "model.pth")
    (tmp_path / "gaps.json").write_text(json.dumps({"0": "a", "2": "b", "3": "c"}))
    with pytest.raises(FinetuneError, match="without gaps"):
        Predictor.load(tmp_path / "model.pth", classes=tmp_path / "gaps.json", arch="resnet34")


def test_any_image_mode_predicts(trained_run, tmp_path):
    run, _ = trained_run
    predictor = Predictor.from_run(run, device="cpu")
    red = Image.new("RGB", (50, 40), (220, 40, 40))
    red.convert("RGBA").save(tmp_path / "rgba.png")
    red.convert("LA").save(tmp_path / "la.png")
    red.convert("L").save(tmp_path / "gray.jpg")
    red.convert("CMYK").save(tmp_path / "cmyk.jpg")
    red.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.gif")  # the colour itself, undithered
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(tmp_path / "gray16.png")
    predictions = predictor.predict_paths(list_images([tmp_path]), top_k=2)
    assert len(predictions) == 6
    assert all(p.error is None and len(p.top) == 2 for p in predictions)
    # the same picture in any mode is the same picture to the model: what the RGB one gets, whatever the
    # weights (comparing with "red" would test what 6 epochs learned, which some seeds barely do)
    expected = dict(predictor.predict_image(red, top_k=3))
    for image in (tmp_path / "rgba.png", tmp_path / "cmyk.jpg", tmp_path / "palette.gif", red.convert("RGBA")):
        assert dict(predictor.predict_image(image, top_k=3)) == pytest.approx(expected, abs=1e-5), image
    batched = {p.path.split("/")[-1]: p for p in predictions}
    for name in ("rgba.png", "cmyk.jpg", "palette.gif"):
        assert batched[name].confidence == pytest.approx(expected[batched[name].label], abs=1e-4)


def test_batches_include_the_last_partial_one_and_bad_files_become_rows(trained_run, tmp_path):
    run, data = trained_run
    predictor = Predictor.from_run(run, device="cpu")
    paths = list_images([data])[:7]
    shutil.copy(paths[0], tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = paths + [tmp_path / "broken.jpg"]
    small = predictor.predict_paths(paths, top_k=3, batch_size=3)
    whole = predictor.predict_paths(paths, top_k=3, batch_size=64)
    assert len(small) == 8 and [p.path for p in small] == [str(p) for p in paths]
    for a, b in zip(small[:7], whole[:7], strict=True):
        assert a.label == b.label and a.confidence == pytest.approx(b.confidence, abs=1e-5)
    assert small[7].error and "broken.jpg" in small[7].path and small[7].top == []

    out = write_csv(small, tmp_path / "predictions.csv", top_k=3)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "path",
        "prediction",
        "best_guess",
        "confidence",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
        "error",
    ]
    assert rows[0]["best_guess"] == small[0].label and rows[0]["prediction"] == small[0].answer
    assert float(rows[0]["confidence"]) == pytest.approx(small[0].confidence, abs=1e-6)
    assert rows[7]["prediction"] == "" and rows[7]["error"]


def test_malicious_model_file_in_a_run_is_refused(trained_run, tmp_path):
    import os

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"fc.weight": Exploit()}, copy / "model.pth")
    with pytest.raises(FinetuneError, match="refusing to load"):
        Predictor.from_run(copy)
    assert not (tmp_path / "pwned").exists()


@needs_fifo
def test_a_fifo_named_jpg_is_an_error_row_not_a_hang(trained_run, tmp_path, capsys):
    """A FIFO named x.jpg blocked batch prediction for ever, and the predictions queued behind it."""
    from finetune import cli

    run, _ = trained_run
    folder = tmp_path / "photos"
    make_image(folder / "a.png", (220, 40, 40))
    fifo = folder / "x.jpg"
    os.mkfifo(fifo)
    predictor = Predictor.from_run(run, device="cpu")
    rows = run_within(30, lambda: predictor.predict_paths(list_images([folder])), [fifo])
    assert [(Path(r.path).name, r.error) for r in rows] == [
        ("a.png", None),
        ("x.jpg", "not a regular file (a named pipe)"),
    ]
    with pytest.raises(FinetuneError, match=r"cannot read image \S*x.jpg: not a regular file \(a named pipe\)"):
        run_within(30, lambda: predictor.predict_image(fifo), [fifo])
    assert run_within(60, lambda: cli.main(["predict", str(run), str(folder), "--device", "cpu"]), [fifo]) == 1
    assert f"{fifo}: error: not a regular file (a named pipe)" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match=r"refusing class file \S*x.jpg: not a regular file"):
        run_within(10, lambda: read_class_indices(fifo), [fifo])


@needs_fifo
def test_the_json_files_a_user_names_are_read_alike(tmp_path):
    """A class file, a curation file and a config file: not JSON, or a FIFO (which would block the reader
    for ever), is one line naming what the file is and its path (fsutil.read_json)."""
    from finetune.curation import load_curation

    broken, fifo = tmp_path / "broken.json", tmp_path / "pipe.json"
    broken.write_text("{not json")
    os.mkfifo(fifo)
    for what, read in [
        ("class file", read_class_indices),
        ("curation file", load_curation),
        ("config file", TrainConfig.load),
    ]:
        with pytest.raises(FinetuneError, match=rf"^{what} \S*broken.json is not valid JSON: "):
            read(broken)
        with pytest.raises(FinetuneError, match=rf"^refusing {what} \S*pipe.json: not a regular file"):
            run_within(10, lambda read=read: read(fifo), [fifo])
        with pytest.raises(FinetuneError, match=rf"^{what} not found: \S*missing.json$"):
            read(tmp_path / "missing.json")


def with_calibration(run, tmp_path, temperature: float, suggested: float | None):
    """A copy of the run whose run.json says the given calibration."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["calibration"] = {"temperature": temperature, "suggested_min_confidence": suggested}
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def test_a_suggested_min_confidence_that_is_not_one_is_refused_at_load(trained_run, tmp_path):
    """Else the run loads, and `finetune serve` answers /info and every /predict without a threshold 500."""
    run, _ = trained_run
    for k, bad in enumerate([5, "0.5", True, -0.1, [0.5]]):
        copy = with_calibration(run, tmp_path / str(k), 1.0, bad)
        with pytest.raises(FinetuneError) as caught:
            Predictor.from_run(copy, device="cpu")
        message = str(caught.value)
        assert message.startswith(f"{copy / 'run.json'}: ") and "suggested_min_confidence" in message
        assert repr(bad) in message and "\n" not in message
    for k, good in enumerate([None, 1]):
        assert Predictor.from_run(with_calibration(run, tmp_path / f"ok{k}", 1.0, good), device="cpu")


def test_class_names_no_file_can_hold_or_that_cannot_be_told_apart_are_refused(trained_run, tmp_path):
    """A lone surrogate is valid JSON ("\\udcff") but no UTF-8 file: the CSV and the export would crash."""
    run, _ = trained_run
    for k, (classes, said) in enumerate(
        [
            (["blue", "\udcff", "red"], "class '\\udcff' is not valid UTF-8"),
            (["blue", "", "red"], "a class name is empty"),
            (["blue", "red", "red"], "class 'red' is named twice"),
        ]
    ):
        copy = tmp_path / str(k)
        shutil.copytree(run, copy)
        info = json.loads((copy / "run.json").read_text())
        (copy / "run.json").write_text(json.dumps({**info, "classes": classes}))
        (copy / "class_indices.json").write_text(json.dumps(dict(enumerate(classes))))
        with pytest.raises(FinetuneError) as caught:
            Predictor.from_run(copy, device="cpu")
        assert str(caught.value) == f"{copy / 'run.json'}: {said}"
        str(caught.value).encode("utf-8")  # the message itself can be printed


def test_the_runs_temperature_calibrates_every_probability(trained_run, tmp_path):
    run, data = trained_run
    assert json.loads((run / "run.json").read_text())["calibration"]["temperature"] > 0  # training fitted one
    paths = list_images([data])[:4]
    raw = Predictor.from_run(with_calibration(run, tmp_path, 1.0, None), device="cpu")
    batch = torch.stack([raw.transform(load_rgb(p)) for p in paths])
    with torch.no_grad():
        logits = raw.model(batch)
    hot = Predictor.from_run(with_calibration(run, tmp_path / "t", 3.0, None), device="cpu")
    expected = torch.softmax(logits / 3.0, dim=1)
    torch.testing.assert_close(hot.probabilities(batch), expected, atol=1e-5, rtol=0)
    for path, row, p in zip(paths, expected, hot.predict_paths(paths, top_k=3), strict=True):
        assert p.confidence == pytest.approx(float(row.max()), abs=1e-5)
        assert hot.predict_image(path, top_k=1)[0][1] == pytest.approx(float(row.max()), abs=1e-5)


def test_below_the_min_confidence_the_answer_is_unknown_with_the_best_guess(trained_run, tmp_path):
    run, data = trained_run
    predictor = Predictor.from_run(with_calibration(run, tmp_path, 1.0, 0.999999), device="cpu")
    assert predictor.min_confidence() == 0.999999 and predictor.min_confidence(0.0) == 0.0
    paths = list_images([data])[:6]
    default = predictor.predict_paths(paths, top_k=2)  # the run's suggestion applies by default
    assert all(p.unknown and p.answer == "unknown" and p.label in CLASSES for p in default)
    always = predictor.predict_paths(paths, top_k=2, min_confidence=0.0)
    assert not any(p.unknown for p in always) and [p.answer for p in always] == [p.label for p in default]
    answer, guess, confidence = predictor.answer(always[0].top, min_confidence=1.0)
    assert (answer, guess) == ("unknown", always[0].label) and confidence == always[0].confidence
    with pytest.raises(FinetuneError, match="min confidence must be between 0 and 1"):
        predictor.min_confidence(1.5)
    out = write_csv(default, tmp_path / "p.csv", top_k=2)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prediction"] for r in rows] == ["unknown"] * 6
    assert [r["best_guess"] for r in rows] == [p.label for p in default]


def test_the_threshold_is_the_validation_rule_and_below_it_every_answer_is_unknown(trained_run, tmp_path):
    """What holds for any trained weights, whatever a CPU's float kernels make of them (rates on a handful
    of images do not: 1 or 2 of 6 val images below the threshold is the same rule): the run's temperature
    and threshold are the calibration of its own validation logits, and prediction answers unknown exactly
    below the threshold, noise included, keeping the best guess."""
    run, data = trained_run
    predictor = Predictor.from_run(run, device="cpu")
    calibration = json.loads((run / "run.json").read_text())["calibration"]
    split = json.loads((run / "split.json").read_text())
    targets = np.array([label for _, label in split["val"]])
    val = predictor.predict_paths([data / rel for rel, _ in split["val"]], top_k=3, keep_logits=True)
    logits = np.array([p.logits for p in val])
    assert predictor.temperature == calibration["temperature"]
    assert predictor.temperature == pytest.approx(fit_temperature(logits, targets), rel=1e-2)
    threshold = predictor.min_confidence()
    assert threshold == calibration["suggested_min_confidence"]
    assert threshold == pytest.approx(suggest_threshold(softmax(logits, predictor.temperature), targets), abs=2e-3)
    confidences = np.array([p.confidence for p in val])
    right = np.array([p.label == predictor.classes[t] for p, t in zip(val, targets, strict=True)])
    # the rule on the confidences prediction gives (the training's differ in the last digits)
    rule = suggest_threshold(softmax(logits, predictor.temperature), targets)
    assert right.any() and confidences[right].max() >= rule  # the surest right answer is given
    assert (confidences[right] < rule).sum() <= math.ceil(MISS_RATE * right.sum())

    rng = np.random.default_rng(0)
    noise = [tmp_path / f"noise_{i}.png" for i in range(8)]
    for path in noise:
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    rows = val + predictor.predict_paths(noise, top_k=3)
    for p in rows:  # the run's threshold
        assert p.unknown == (p.confidence < threshold) and p.answer == ("unknown" if p.unknown else p.label)
    confidences = [p.confidence for p in rows]
    middle = (min(confidences) + max(confidences)) / 2  # a threshold with answers on both sides of it
    again = predictor.predict_paths([p.path for p in rows], top_k=3, min_confidence=middle)
    assert [p.unknown for p in again] == [p.confidence < middle for p in again]
    assert any(p.unknown for p in again) and not all(p.unknown for p in again)
    assert [p.label for p in again] == [p.label for p in rows]  # the best guess is kept


def test_a_run_whose_model_holds_nan_is_refused_in_one_line(tmp_path):
    """A diverged or damaged model.pth would answer every image with nan confidences: refused at load."""
    from torchvision import models

    from finetune.config import FinetuneError
    from finetune.rundir import class_indices_json

    run = tmp_path / "run"
    run.mkdir()
    state = models.resnet34(num_classes=2).state_dict()
    state["fc.bias"][1] = float("inf")
    torch.save(state, run / "model.pth")
    (run / "class_indices.json").write_text(class_indices_json(["a", "b"]))
    (run / "run.json").write_text(json.dumps({"arch": "resnet34", "classes": ["a", "b"], "status": "completed"}))
    with pytest.raises(FinetuneError) as caught:
        Predictor.from_run(run, device="cpu")
    assert str(caught.value) == (
        f"refusing the weights in {run / 'model.pth'}: fc.bias holds infinite values (a diverged or damaged model)"
    )


def test_one_image_gets_the_answer_a_batch_gives_it(trained_run, tmp_path):
    """predict_one (the API's and the studio's single image) applies the calibration and the minimum
    confidence exactly as predict_paths does, given or the run's suggestion, on both sides of the
    image's confidence; predict_image stays the threshold-free top list."""
    run, data = trained_run
    path = list_images([data])[0]
    # a hot temperature keeps the confidence well inside (0, 1), whatever the weights learned
    predictor = Predictor.from_run(with_calibration(run, tmp_path, 1000.0, None), device="cpu")
    confidence = predictor.predict_paths([path], top_k=3)[0].confidence
    assert 0.01 < confidence < 0.99
    for threshold in (confidence - 0.01, confidence + 0.01):
        for given, suggested in ((threshold, None), (None, threshold)):
            predictor.suggested_min_confidence = suggested
            [batched] = predictor.predict_paths([path], top_k=3, min_confidence=given)
            assert batched.unknown == (threshold > confidence)
            for image in (path, Image.open(path)):
                one = predictor.predict_one(image, top_k=3, min_confidence=given)
                assert (one.label, one.unknown, one.answer) == (batched.label, batched.unknown, batched.answer)
                assert one.confidence == pytest.approx(batched.confidence, abs=1e-6)
                assert [name for name, _ in one.top] == [name for name, _ in batched.top]
    assert dict(predictor.predict_image(path, top_k=3)) == pytest.approx(dict(batched.top), abs=1e-6)


def test_a_pipe_closed_early_still_gets_the_csv_and_the_heatmaps(trained_run, tmp_path, monkeypatch):
    """`finetune predict RUN DIR --csv F | head -1` exited 0 without writing F: the closed pipe ended the
    command before the files. Here stdout is a real pipe whose reader takes one line and closes it; long
    paths (about 3.6 kB a line) and a small pipe make the output outrun what the pipe and Python's buffer
    hold. In this process: a second start of python and torch would cost more than the test."""
    import fcntl
    import sys
    import threading

    from finetune import cli

    run, data = trained_run
    source = list_images([data])[0]
    folder = tmp_path.joinpath(*[letter * 250 for letter in "abcdefghijklmn"])
    folder.mkdir(parents=True)
    for i in range(5):  # 18 kB: more than the pipe (4 kB) and Python's buffer (8 kB) hold
        os.link(source, folder / f"{i:03d}.png")
    read_end, write_end = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux: 4 kB instead of 64
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    first: list[bytes] = []

    def head_1() -> None:
        with open(read_end, "rb", buffering=0) as pipe:  # unbuffered: exactly one line, as head -1 reads
            first.append(pipe.readline())

    reader = threading.Thread(target=head_1, daemon=True)
    reader.start()
    out_csv, heatmaps = tmp_path / "p.csv", tmp_path / "why"
    with open(write_end, "w", encoding="utf-8") as stdout:  # block-buffered, as a piped stdout is
        monkeypatch.setattr(sys, "stdout", stdout)
        code = run_within(
            120,
            lambda: cli.main(
                ["predict", str(run), str(folder), "--csv", str(out_csv), "--explain", str(heatmaps), "--device", "cpu"]
            ),
        )
        monkeypatch.undo()
    reader.join(10)
    assert code == 0 and first[0].startswith(b"min confidence ")
    with open(out_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["best_guess"] in CLASSES and not r["error"] for r in rows)
    assert len(list(heatmaps.glob("*.gradcam.png"))) == 5

"""Temperature scaling lowers the calibration error; images unlike any class are answered "unknown"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune.calibrate import (UNKNOWN, UNKNOWN_INDEX, apply_unknown, calibrate, calibrated_probs, coverage,
                                expected_calibration_error, fit_temperature, held_out_report, label_or_unknown,
                                logits_from_probs, softmax, suggest_threshold)
from finetune.data import eval_transform
from finetune.model import build_model


def overconfident_logits(n: int, classes: int, true_temperature: float, seed: int = 0):
    """Labels drawn from softmax(z); the model reports z * T, i.e. is T times too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    z[np.arange(n), rng.integers(0, classes, n)] += 2.0
    p = softmax(z)
    targets = np.array([rng.choice(classes, p=row) for row in p])
    return z * true_temperature, targets


def test_temperature_fitted_on_one_half_lowers_the_ece_on_the_other():
    logits, targets = overconfident_logits(2000, 5, true_temperature=3.0)
    fit, held = slice(0, 1000), slice(1000, 2000)
    temperature = fit_temperature(logits[fit], targets[fit])
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(logits[held]), targets[held])
    after = expected_calibration_error(softmax(logits[held], temperature), targets[held])
    assert before > 0.1 and after < before / 2
    # predictions never change, only how sure they are
    assert (softmax(logits[held], temperature).argmax(1) == logits[held].argmax(1)).all()


def test_underconfident_logits_get_a_temperature_below_one():
    logits, targets = overconfident_logits(1000, 4, true_temperature=0.4, seed=1)
    assert fit_temperature(logits, targets) == pytest.approx(0.4, rel=0.15)


def test_log_probabilities_serve_as_logits():
    logits, targets = overconfident_logits(500, 3, 2.0, seed=2)
    probs = softmax(logits)
    assert fit_temperature(logits_from_probs(probs), targets) == pytest.approx(fit_temperature(logits, targets),
                                                                               rel=1e-3)
    np.testing.assert_allclose(calibrated_probs(probs, 2.0), softmax(logits, 2.0), atol=1e-9)


def test_degenerate_inputs():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    assert fit_temperature(np.zeros((10, 3)), np.arange(10) % 3) == 1.0  # flat logits: nothing to scale
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0.0
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0  # sure and right
    assert expected_calibration_error(np.eye(3), (np.arange(3) + 1) % 3) == 1.0  # sure and wrong


def test_threshold_rule_and_unknown_semantics():
    probs = np.array([[0.9, 0.05, 0.05]] * 19 + [[0.5, 0.3, 0.2]] + [[0.2, 0.7, 0.1]])
    targets = np.array([0] * 20 + [0])  # the last one is wrong
    threshold = suggest_threshold(probs, targets)
    # 5% of the correct answers' confidences lie below it
    correct_conf = probs.max(1)[probs.argmax(1) == targets]
    assert np.mean(correct_conf < threshold) <= 0.05 + 1e-9 and 0.5 <= threshold <= 0.9
    assert suggest_threshold(np.full((4, 4), 0.25), np.zeros(4, dtype=int)) == 0.25  # never below 1/K
    assert suggest_threshold(np.eye(3), (np.arange(3) + 1) % 3) == 0.0  # nothing right: never unknown

    answers, best, confidence = apply_unknown(np.array([[0.6, 0.4], [0.3, 0.7], [0.45, 0.55]]), 0.6)
    assert answers.tolist() == [0, 1, UNKNOWN_INDEX] and best.tolist() == [0, 1, 1]
    assert confidence.tolist() == [0.6, 0.7, 0.55]
    assert label_or_unknown(["cat", "dog"], [0.45, 0.55], 0.6) == (UNKNOWN, "dog", 0.55)
    assert label_or_unknown(["cat", "dog"], [0.45, 0.55], 0.5) == ("dog", "dog", 0.55)


def test_calibrate_record_and_reliability_plot(tmp_path):
    logits, targets = overconfident_logits(400, 4, 2.5, seed=3)
    record = calibrate(logits, targets, tmp_path / "reliability.png")
    assert record["ece_after"] < record["ece_before"] and record["nll_after"] < record["nll_before"]
    assert record["temperature"] > 1.5 and not record["temperature_at_bound"]
    assert 0.25 <= record["suggested_min_confidence"] < 1.0 and "validation" in record["threshold_rule"]
    assert 0.9 <= record["at_suggested"]["answered"] <= 1.0
    assert record["plot"] == "reliability.png"
    with Image.open(tmp_path / "reliability.png") as image:
        assert image.format == "PNG" and image.width > 400


# ---------------------------------------------------------------------------------------------
# A real small model: uniform noise is answered unknown more often than validation images

PALETTE = np.array([(200, 40, 40), (40, 180, 60), (50, 60, 210), (210, 190, 40)], dtype=np.float32)
SIZE = 32


def colour_image(rng: np.random.Generator, label: int, size: int = 48) -> Image.Image:
    """A class colour (varied per image) with a smooth pattern and grain."""
    base = PALETTE[label] + rng.normal(0, 30, 3)
    low = np.asarray(Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize((size, size),
                                                                                          Image.BILINEAR), np.float32)
    pixels = base[None, None, :] * (0.7 + 0.6 * low[..., None] / 255) + rng.normal(0, 15, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def noise_image(rng: np.random.Generator, size: int = 224) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.slow
def test_noise_is_answered_unknown_more_often_than_validation_images():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    transform = eval_transform(SIZE)
    train_labels = np.arange(64) % 4
    val_images = np.arange(40) % 4
    # a realistic validation set: a tenth of its labels are wrong, so calibration has mistakes to see
    val_labels = np.where(np.arange(40) % 10 == 3, (val_images + 1) % 4, val_images)
    train = torch.stack([transform(colour_image(rng, c)) for c in train_labels])
    val = torch.stack([transform(colour_image(rng, c)) for c in val_images])
    noise = torch.stack([transform(noise_image(rng)) for _ in range(40)])

    model = build_model("resnet34", 4, "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    targets = torch.from_numpy(train_labels)
    model.train()
    for _ in range(40):  # the engine's loss: cross-entropy with label smoothing 0.1
        batch = torch.from_numpy(rng.integers(0, len(train), 32))
        loss = nn.functional.cross_entropy(model(train[batch]), targets[batch], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val_logits, noise_logits = model(val).numpy(), model(noise).numpy()
    assert (val_logits.argmax(1) == val_images).mean() >= 0.8  # it did learn the colours

    record = calibrate(val_logits, val_labels)
    temperature, threshold = record["temperature"], record["suggested_min_confidence"]
    assert not record["temperature_at_bound"] and 1 / 4 < threshold < 1
    val_unknown = (apply_unknown(softmax(val_logits, temperature), threshold)[0] == UNKNOWN_INDEX).mean()
    noise_unknown = (apply_unknown(softmax(noise_logits, temperature), threshold)[0] == UNKNOWN_INDEX).mean()
    assert val_unknown <= 0.2
    # Softmax confidence is a weak detector of the unfamiliar: this held for 4 of the 5 seeds tried
    # (a model from scratch on 64 images); the margin here is what seed 0 gives, with room to spare.
    assert noise_unknown >= val_unknown + 0.3, (val_unknown, noise_unknown, record)


def test_held_out_report_of_the_raw_and_the_calibrated_model():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (200, 4))
    targets = rng.integers(0, 4, 200)
    report = held_out_report(logits, targets, 2.5, 0.5)
    assert report["ece_raw"] == pytest.approx(expected_calibration_error(softmax(logits), targets), abs=1e-9)
    assert report["ece_calibrated"] == pytest.approx(expected_calibration_error(softmax(logits, 2.5), targets))
    assert report == {**report, **coverage(softmax(logits, 2.5), targets, 0.5)}


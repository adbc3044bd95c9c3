"""Temperature scaling lowers the calibration error; below the threshold from validation the answer is "unknown".

The data are drawn from a known model (seeded numpy), large enough that each bound holds for any seed:
the margins seen over 20 seeds are noted where they are tight."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune.calibrate import (
    MISS_RATE,
    UNKNOWN_INDEX,
    apply_unknown,
    calibrate,
    coverage,
    expected_calibration_error,
    fit_temperature,
    held_out_report,
    is_unknown,
    softmax,
    suggest_threshold,
)


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
    assert temperature == pytest.approx(3.0, rel=0.15)  # 20 seeds: within 0.07
    before = expected_calibration_error(softmax(logits[held]), targets[held])
    after = expected_calibration_error(softmax(logits[held], temperature), targets[held])
    assert before > 0.1 and after < before / 2  # 20 seeds: before >= 0.21, after <= 0.22 x before
    # predictions never change, only how sure they are
    assert (softmax(logits[held], temperature).argmax(1) == logits[held].argmax(1)).all()


def test_underconfident_logits_get_a_temperature_below_one():
    logits, targets = overconfident_logits(4000, 4, true_temperature=0.4, seed=1)
    assert fit_temperature(logits, targets) == pytest.approx(0.4, rel=0.15)  # 30 seeds: within 0.07


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
    # the one rule, for one confidence (a single prediction) as for arrays: at the threshold, still answered
    assert is_unknown(0.55, 0.6) and not is_unknown(0.55, 0.5) and not is_unknown(0.6, 0.6)
    assert is_unknown(np.array([0.59, 0.6, 0.61]), 0.6).tolist() == [True, False, False]


def test_calibrate_record_and_reliability_plot(tmp_path):
    logits, targets = overconfident_logits(400, 4, 2.5, seed=3)
    record = calibrate(logits, targets, tmp_path / "reliability.png")
    assert record["ece_after"] < record["ece_before"] and record["nll_after"] < record["nll_before"]
    assert record["temperature"] > 1.5 and not record["temperature_at_bound"]
    assert 0.25 <= record["suggested_min_confidence"] < 1.0 and "validation" in record["threshold_rule"]
    # the rule itself: at most MISS_RATE of the right answers (rounded up) are below the threshold
    confidence, right = softmax(logits, record["temperature"]).max(1), softmax(logits).argmax(1) == targets
    assert (confidence[right] < record["suggested_min_confidence"]).sum() <= np.ceil(MISS_RATE * right.sum())
    answered = np.mean(confidence >= record["suggested_min_confidence"])
    assert record["at_suggested"]["answered"] == pytest.approx(answered)
    assert record["plot"] == "reliability.png"
    with Image.open(tmp_path / "reliability.png") as image:
        assert image.format == "PNG" and image.width > 400


# ---------------------------------------------------------------------------------------------
# The threshold on images it was not fitted on


@pytest.mark.parametrize("seed", [0, 1])
def test_on_held_out_images_like_validation_about_95_percent_of_right_answers_are_given(seed):
    """The threshold is a quantile of validation confidences, so on other images from the same
    distribution about MISS_RATE of the right answers fall below it; flatter logits (what images unlike
    any class tend to get) fall below it far more often. Thousands of images: the binomial spread of the
    rate is ~0.006 (20 seeds gave 0.033 to 0.057), so the bounds hold for any seed and any machine."""
    logits, targets = overconfident_logits(6000, 5, true_temperature=2.0, seed=seed)
    fit, held = slice(0, 3000), slice(3000, 6000)
    record = calibrate(logits[fit], targets[fit])
    temperature, threshold = record["temperature"], record["suggested_min_confidence"]
    assert 1.5 < temperature < 2.5 and 1 / 5 < threshold < 1
    answers, best, _ = apply_unknown(softmax(logits[held], temperature), threshold)
    right = best == targets[held]
    missed = (answers[right] == UNKNOWN_INDEX).mean()
    assert MISS_RATE - 0.03 < missed < MISS_RATE + 0.04, missed
    flat = (apply_unknown(softmax(logits[held] / 4, temperature), threshold)[0] == UNKNOWN_INDEX).mean()
    assert flat > (answers == UNKNOWN_INDEX).mean() + 0.5  # 20 seeds: at least 0.74 more


def test_held_out_report_of_the_raw_and_the_calibrated_model():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (200, 4))
    targets = rng.integers(0, 4, 200)
    report = held_out_report(logits, targets, 2.5, 0.5)
    assert report["ece_raw"] == pytest.approx(expected_calibration_error(softmax(logits), targets), abs=1e-9)
    assert report["ece_calibrated"] == pytest.approx(expected_calibration_error(softmax(logits, 2.5), targets))
    assert report == {**report, **coverage(softmax(logits, 2.5), targets, 0.5)}

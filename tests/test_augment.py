"""--augment light|default|strong, --mixup, --cutmix: each part where it runs, with the caches it allows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_class_folders

from finetune import augment
from finetune.config import FinetuneError, TrainConfig
from finetune.syncs import count_syncs
from finetune.training import train


def test_colour_jitter_changes_each_image_by_its_own_bounded_factors():
    torch.manual_seed(0)
    images = torch.full((64, 3, 8, 8), 0.5)
    images[:, 0] = 0.7  # a colour, so saturation has something to change
    with count_syncs("cpu") as syncs:
        jittered = augment.colour_jitter(images)
    assert syncs.count == 0
    means = jittered.mean((1, 2, 3))
    assert means.std() > 0.01  # per image, not one draw for the batch
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert (means - images.mean((1, 2, 3))).abs().max() < 0.5 * 0.6  # "a little": within the factors' reach


def test_random_erasing_blanks_one_box_in_some_images_without_a_sync():
    torch.manual_seed(1)
    images = torch.ones(400, 3, 32, 32)
    with count_syncs("cpu") as syncs:
        erased = augment.random_erasing(images)
    assert syncs.count == 0
    blank = (erased == 0).all(1)  # [B, H, W]: pixels set to the mean in every channel
    touched = blank.flatten(1).any(1)
    assert 0.15 < touched.float().mean() < 0.35  # ERASING_P = 0.25
    shares = blank.flatten(1).float().mean(1)[touched]
    assert shares.max() <= 0.34 + 0.05 and shares.min() > 0  # ERASING_SCALE's areas (rounded to pixels)
    rows, cols = blank[touched][0].any(1), blank[touched][0].any(0)
    assert blank[touched][0].sum() == rows.sum() * cols.sum()  # one rectangle


def test_options_are_checked_in_one_line():
    with pytest.raises(FinetuneError, match="augment must be one of light, default, strong"):
        TrainConfig(data="d", augment="heavy").validate()
    with pytest.raises(FinetuneError, match="mixup and cutmix need strategy all or last"):
        TrainConfig(data="d", strategy="head", mixup=0.2).validate()
    with pytest.raises(FinetuneError, match="mixup and cutmix must be 0 or more"):
        TrainConfig(data="d", cutmix=-1).validate()


def run_json(tmp_path, name, **options):
    data = make_class_folders(tmp_path / "data", classes=("a", "b"), per_class=6, size=(40, 32))
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        weights="none",
        epochs=1,
        batch_size=4,
        image_size=32,
        workers=0,
        run_name=name,
        **options,
    )
    run = train(cfg)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    logs = [e["message"] for e in events if e["type"] == "log"]
    return json.loads((run / "run.json").read_text()), logs


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, pipeline, words",
    [
        (dict(strategy="all", augment="strong", cutmix=1.0), "decoded-pixel cache", "TrivialAugmentWide"),
        (dict(strategy="last", augment="strong", mixup=0.4), "streamed images", "random erasing"),
        (dict(strategy="head", augment="default", cache_views=3), "cached frozen features", "colour jitter"),
    ],
    ids=["all-strong-cutmix", "last-strong-streams", "head-default-views"],
)
def test_each_augmentation_trains_in_the_pipeline_it_allows(tmp_path, options, pipeline, words):
    info, logs = run_json(tmp_path, "aug", **options)
    assert info["status"] == "completed" and info["config"]["augment"] == options["augment"]
    assert any(words in line for line in logs if line.startswith("augmentation:"))
    [chosen] = [line for line in logs if line.startswith("data pipeline:")]
    assert pipeline in chosen
    if options["strategy"] == "last":  # the reason it streams, said where the pipeline is
        assert "strong augmentation draws new views every epoch" in chosen

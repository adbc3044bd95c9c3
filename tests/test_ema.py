"""--ema: an average of the trained weights, validated and saved as the model; no host sync per step."""

from __future__ import annotations

import threading

import torch
from conftest import make_class_folders

from finetune.config import TrainConfig
from finetune.ema import WeightsEMA
from finetune.syncs import count_syncs


def test_the_average_follows_the_weights_and_swaps_in_and_out_exactly():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightsEMA(module, decay=0.75)
    start = module[0].weight.detach().clone()
    with torch.no_grad():
        module[0].weight.add_(1.0)
    module.train()(torch.randn(8, 3))  # BatchNorm's statistics and its integer counter move too
    with count_syncs("cpu") as syncs:
        ema.update()
    assert syncs.count == 0
    expected = 0.75 * start + 0.25 * module[0].weight.detach()
    raw = {k: v.clone() for k, v in module.state_dict().items()}
    with ema.applied():
        torch.testing.assert_close(module[0].weight.detach(), expected)
        assert module[1].num_batches_tracked.item() == 1
    assert all(torch.equal(raw[k], v) for k, v in module.state_dict().items())  # its own weights back, bit for bit


def test_a_training_with_ema_saves_the_average_and_resumes_it(tmp_path):
    from finetune.training import train

    data = make_class_folders(tmp_path / "data", classes=("a", "b"), per_class=8, size=(40, 32))
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        weights="none",
        strategy="head",
        epochs=2,
        batch_size=4,
        image_size=32,
        workers=0,
        ema=0.9,
        run_name="ema",
        lr=0.05,
    )
    stop = threading.Event()

    def after_epoch_one(event):
        if event["type"] == "epoch":
            stop.set()

    run = train(cfg, on_event=after_epoch_one, stop=stop)
    last = torch.load(run / "last.pth", weights_only=True)
    saved = torch.load(run / "model.pth", weights_only=True)
    assert "ema" in last and last["ema"]["decay"] == 0.9
    # the saved head is the average, not the raw weights the optimizer left
    assert not torch.equal(saved["fc.weight"], last["model"]["fc.weight"])
    assert any(torch.equal(saved["fc.weight"], t) for t in last["ema"]["shadow"])
    resumed = train(TrainConfig.from_dict({**cfg.to_dict(), "run_name": None}), resume=run)
    assert resumed == run
    import json

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["config"]["ema"] == 0.9

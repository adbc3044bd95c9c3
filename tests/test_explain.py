"""Grad-CAM heatmaps: the image's size, a different map per target class, overlays at the original size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import FinetuneError
from finetune.data import eval_transform
from finetune.explain import crop_box, explain_image, explain_paths, gradcam, overlay, target_layer
from finetune.model import build_model
from finetune.predict import Predictor

CLASSES = ["a", "b", "c"]


def pattern(width: int, height: int, seed: int = 0) -> Image.Image:
    """A bright square on a dark textured background: something for the map to find."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 2 : 3 * width // 4] = (230, 200, 40)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet34", len(CLASSES), "none").eval()


def test_heatmap_has_the_input_size_and_changes_with_the_target_class(model):
    image = eval_transform(64)(pattern(90, 70))
    maps = [gradcam(model, image, target) for target in range(len(CLASSES))]
    for heatmap in maps:
        assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    differences = [np.abs(maps[i] - maps[j]).mean() for i in range(3) for j in range(i + 1, 3)]
    assert max(differences) > 0.05, differences
    predicted = gradcam(model, image, None)  # None: the predicted class
    with torch.no_grad():
        best = int(model(image.unsqueeze(0)).argmax())
    np.testing.assert_allclose(predicted, maps[best], atol=1e-5)
    wide = torch.randn(3, 64, 96)
    assert gradcam(model, wide).shape == (64, 96)
    assert all(p.grad is None for p in model.parameters())  # no gradients left on the model


def test_explain_paths_writes_overlays_at_the_original_size(model, tmp_path):
    predictor = Predictor(model, CLASSES, "resnet34", image_size=64, device="cpu")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    pattern(150, 90).save(tmp_path / "one" / "photo.png")
    pattern(80, 200, seed=1).convert("RGB").save(tmp_path / "two" / "photo.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    messages: list[str] = []
    written = explain_paths(
        predictor,
        [tmp_path / "one" / "photo.png", tmp_path / "broken.jpg", tmp_path / "two" / "photo.jpg"],
        tmp_path / "out",
        log=messages.append,
    )
    assert [p.name for p in written] == ["photo.gradcam.png", "photo-2.gradcam.png"]
    assert [Image.open(p).size for p in written] == [(150, 90), (80, 200)]
    assert any("skipped" in m and "broken.jpg" in m for m in messages)
    explained = explain_paths(
        predictor, [tmp_path / "one" / "photo.png"], tmp_path / "out_b", target_class="b", log=messages.append
    )
    assert len(explained) == 1 and "heatmap for b" in messages[-1]
    with pytest.raises(FinetuneError, match="unknown class 'zebra'"):
        explain_paths(predictor, [tmp_path / "one" / "photo.png"], tmp_path / "out_c", target_class="zebra")
    # the predictor still predicts as before (inference mode, no hooks left behind)
    assert predictor.predict_image(tmp_path / "one" / "photo.png", top_k=1)[0][0] in CLASSES


def test_explanation_of_one_pil_image(model):
    predictor = Predictor(model, CLASSES, "resnet34", image_size=64, device="cpu")
    image = pattern(120, 60).convert("L")  # any mode: explained as RGB
    explanation = explain_image(predictor, image, "c")
    assert explanation.target == "c" and explanation.predicted in CLASSES
    assert explanation.heatmap.shape == (64, 64) and explanation.overlay.size == (120, 60)
    assert 0.0 <= explanation.probability <= 1.0


@pytest.mark.parametrize("width, height", [(600, 400), (300, 300), (90, 250)])
def test_crop_box_is_where_the_centre_crop_lies(width, height):
    """Pixels that know their coordinates go through the eval transform's resize and crop."""
    from torchvision.transforms import v2

    from finetune.data import resize_size

    xs = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    ys = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    image = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).round().astype(np.uint8))
    size = 64
    crop = v2.Compose([v2.ToImage(), v2.Resize(resize_size(size), antialias=True), v2.CenterCrop(size)])(image)
    left, top, right, bottom = crop_box((width, height), size)
    step_x, step_y = 255 / (width - 1), 255 / (height - 1)
    # the crop's edge pixels are centred half a resized pixel inside the box
    half_x, half_y = (right - left) / size / 2, (bottom - top) / size / 2
    assert float(crop[0, :, 0].float().mean()) == pytest.approx((left + half_x - 0.5) * step_x, abs=3)
    assert float(crop[0, :, -1].float().mean()) == pytest.approx((right - half_x - 0.5) * step_x, abs=3)
    assert float(crop[1, 0, :].float().mean()) == pytest.approx((top + half_y - 0.5) * step_y, abs=3)
    assert float(crop[1, -1, :].float().mean()) == pytest.approx((bottom - half_y - 0.5) * step_y, abs=3)


def test_overlay_tints_only_the_box():
    grey = Image.new("RGB", (100, 50), (128, 128, 128))
    heat = np.ones((8, 8), dtype=np.float32)  # "everything matters": the hot end of the colormap
    result = np.asarray(overlay(grey, heat, alpha=0.5, box=(30, 10, 70, 40)))
    assert result.shape == (50, 100, 3)
    assert tuple(result[25, 50]) != (128, 128, 128) and result[25, 50, 0] > result[25, 50, 2]  # jet's red end
    assert tuple(result[5, 5]) == (128, 128, 128) and tuple(result[45, 90]) == (128, 128, 128)
    whole = np.asarray(overlay(grey, np.zeros((4, 4), dtype=np.float32), alpha=0.5))
    assert whole[0, 0, 2] > whole[0, 0, 0]  # cold: blue everywhere, no box


def test_the_gradcam_layer_comes_from_the_architecture_table(model):
    assert target_layer(model) is model.layer4[-1]
    with pytest.raises(FinetuneError, match=r"^cannot explain a Linear: it has no layer4 \(not a ResNet\)$"):
        target_layer(torch.nn.Linear(1, 1))

"""Grad-CAM heatmaps: which part of the image made the model say a class.

pytorch-grad-cam (the `grad-cam` package) computes the map on the layer the architectures table names
(a ResNet's last stage, `layer4`, whose 7x7 (at 224 px) cells still know where they are in the image).
The model sees the centre crop of the eval transform, so the map covers that crop; `overlay` puts it
back where the crop lies in the original picture, at the picture's own size, and leaves the
cropped-away border untinted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .architectures import layout_of
from .config import FinetuneError
from .data import load_rgb, resize_size, to_rgb

ALPHA = 0.45
COLORMAP = "jet"


def target_layer(model: nn.Module) -> nn.Module:
    """The layer the architectures table names for Grad-CAM (a torchvision ResNet's layer4[-1])."""
    return layout_of(model, "explain").gradcam_layer(model)


def class_index(classes: list[str], target: str | int | None) -> int | None:
    """A class name or index -> index (None: the predicted class); one-line error naming the choices."""
    if target is None or isinstance(target, int):
        if isinstance(target, int) and not 0 <= target < len(classes):
            raise FinetuneError(f"class index {target} out of range 0..{len(classes) - 1}")
        return target
    if target in classes:
        return classes.index(target)
    raise FinetuneError(f"unknown class {target!r} to explain: choose one of {', '.join(classes)}")


def gradcam(model: nn.Module, image_tensor: torch.Tensor, target_class: int | None = None) -> np.ndarray:
    """Heatmap [H, W] in [0, 1] at the input tensor's size, for `target_class` (None: the predicted one).

    `image_tensor` is one normalised image [3, H, W] (or [1, 3, H, W]). Runs in float32 with gradients,
    whatever the caller's inference or autocast context."""
    from .extras import require

    GradCAM = require("pytorch_grad_cam").GradCAM
    ClassifierOutputTarget = require("pytorch_grad_cam.utils.model_targets").ClassifierOutputTarget

    batch = image_tensor.unsqueeze(0) if image_tensor.dim() == 3 else image_tensor
    if batch.dim() != 4 or batch.shape[0] != 1:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image_tensor.shape)}")
    targets = None if target_class is None else [ClassifierOutputTarget(int(target_class))]
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        # a clone made outside inference mode: tensors from inference mode cannot enter autograd
        batch = batch.detach().clone().float().requires_grad_(True)
        try:
            with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
                heatmap = cam(input_tensor=batch, targets=targets)[0]
        finally:
            model.zero_grad(set_to_none=True)  # the backward pass left gradients on a model used for inference
    return np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)


def crop_box(original_size: tuple[int, int], image_size: int) -> tuple[float, float, float, float]:
    """Where eval_transform's centre crop lies in the original image: (left, top, right, bottom) pixels."""
    width, height = original_size
    scale = resize_size(image_size) / min(width, height)
    crop_w, crop_h = min(image_size / scale, width), min(image_size / scale, height)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    alpha: float = ALPHA,
    colormap: str = COLORMAP,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """The image with the heatmap blended over it, at the image's own size.

    `box`: the region the heatmap covers (e.g. `crop_box`); None: the whole image. Outside it the
    image stays as it is, with a thin outline around the region."""
    import matplotlib

    image = to_rgb(image)
    width, height = image.size
    left, top, right, bottom = box or (0, 0, width, height)
    left, top = int(round(left)), int(round(top))
    right, bottom = max(left + 1, int(round(right))), max(top + 1, int(round(bottom)))
    heat = np.asarray(heatmap, dtype=np.float32)
    resized = Image.fromarray(heat, mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(resized), 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    pixels = np.asarray(image, dtype=np.float32).copy()
    region = pixels[top:bottom, left:right]
    pixels[top:bottom, left:right] = (1 - alpha) * region + alpha * colours[: region.shape[0], : region.shape[1]]
    result = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if box is not None and (left, top, right, bottom) != (0, 0, width, height):
        ImageDraw.Draw(result).rectangle(
            (left, top, right - 1, bottom - 1), outline=(255, 255, 255), width=max(1, min(width, height) // 200)
        )
    return result


@dataclass
class Explanation:
    heatmap: np.ndarray  # [image_size, image_size] in [0, 1], over the centre crop
    overlay: Image.Image  # the original image with the heatmap, at its own size
    target: str  # the class explained
    predicted: str
    probability: float  # of the explained class (uncalibrated softmax)


def explain_image(predictor, image: Image.Image | str | Path, target_class: str | int | None = None) -> Explanation:
    """One image through a Predictor (or anything with model, transform, classes, image_size)."""
    if isinstance(image, (str, Path)):
        try:
            image = load_rgb(image)
        except Exception as error:  # noqa: BLE001 - any decoder failure: name the file
            raise FinetuneError(f"cannot read image {image}: {error}") from None
    image = to_rgb(image)
    target = class_index(predictor.classes, target_class)
    model = predictor.model
    tensor = predictor.transform(image).to(next(model.parameters()).device)
    with torch.inference_mode(), torch.autocast(tensor.device.type, enabled=False):
        probs = torch.softmax(model(tensor.unsqueeze(0)).float(), dim=1)[0].cpu()
    predicted = int(probs.argmax())
    explained = predicted if target is None else target
    heatmap = gradcam(model, tensor, explained)
    return Explanation(
        heatmap,
        overlay(image, heatmap, box=crop_box(image.size, predictor.image_size)),
        predictor.classes[explained],
        predictor.classes[predicted],
        float(probs[explained]),
    )


def _output_name(path: Path, used: set[str]) -> str:
    """<stem>.gradcam.png, made unique (two folders may hold a cat.jpg each) and safe as a file name."""
    stem = re.sub(r"[^\w.-]+", "_", path.stem) or "image"
    name, n = f"{stem}.gradcam.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.gradcam.png"
    used.add(name)
    return name


def explain_paths(
    predictor,
    paths: list[str | Path],
    out_dir: str | Path,
    target_class: str | int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """A heatmap overlay PNG per image in `out_dir` (created); unreadable images are skipped (and logged).
    Returns the written files in the order of `paths`."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FinetuneError(f"cannot create the explanation folder {out}: {error.strerror or error}") from None
    class_index(predictor.classes, target_class)  # a wrong class name fails before any work
    written: list[Path] = []
    used: set[str] = set()
    for given in paths:
        path = Path(given)
        try:
            explanation = explain_image(predictor, path, target_class)
        except FinetuneError as error:
            if log:
                log(f"skipped: {error}")
            continue
        target = out / _output_name(path, used)
        explanation.overlay.save(target)
        written.append(target)
        if log:
            log(
                f"{path}: heatmap for {explanation.target} (p={explanation.probability:.3f}, predicted "
                f"{explanation.predicted}) -> {target}"
            )
    return written

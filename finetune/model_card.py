"""The model card (README.md) of an exported model folder (hub.py): the front matter the Hugging Face Hub
reads, then the data, the training, the validation results, the calibration, how to use the model with
plain torchvision, and what it cannot do.

Class names and file names come from whoever made the data (folder names, a labels CSV): each is
written through `text`, so it shows as written and never acts as Markdown or HTML (`<img onerror=...>`,
`a|b` ending a table cell, `*bold*`). The card says nothing of the machine it was made on: no paths,
no data file names beyond the labels CSV's, only counts.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from .architectures import ARCHITECTURES

SNIPPET = """\
import json, torch, torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

cfg = json.load(open("config.json"))
model = torchvision.models.get_model(cfg["torchvision_model"], num_classes=len(cfg["classes"])).eval()
model.load_state_dict(load_file("model.safetensors"))
prep = v2.Compose([v2.ToImage(), v2.Resize(cfg["resize_size"]), v2.CenterCrop(cfg["image_size"]),
                   v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])])
probs = torch.softmax(model(prep(Image.open("photo.jpg").convert("RGB"))[None]).detach() / cfg["temperature"], 1)[0]
print(cfg["classes"][probs.argmax()], float(probs.max()))  # under cfg["min_confidence"]: say "unknown"
"""


def text(value: Any) -> str:
    """`value` as literal text in Markdown and HTML: letters, digits, spaces, commas and hyphens as they
    are, any other character as a numeric character reference (never markup, a link or the end of a
    table cell: `www.x.com` would be one), control characters (a newline in a folder name) as U+FFFD."""
    out = []
    for char in str(value):
        if char.isalnum() or char in " ,-":
            out.append(char)
        elif unicodedata.category(char).startswith("C"):
            out.append("&#xFFFD;")
        else:
            out.append(f"&#{ord(char)};")
    return "".join(out)


def number(value: Any, spec: str = ".3f") -> str:
    """A number from run.json or metrics.json (a run folder may come from anyone), or "?"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "?"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def front_matter(arch: str) -> str:
    """The YAML the Hub reads (library, task, tags, metrics); only fixed words and a checked arch name."""
    tags = ["image-classification", "pytorch", "torchvision", arch, "finetune-studio"]
    lines = ["---", "library_name: pytorch", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    return "\n".join([*lines, "metrics:", "- accuracy", "- f1", "---", ""])


def model_card(config: dict, info: dict, metrics: dict | None, split, images: list[str]) -> str:
    """The whole README.md. `config`: the folder's config.json; `info`: run.json; `metrics`: metrics.json
    (None when the run has no evaluation); `split`: the run's DatasetScan (None when unreadable);
    `images`: the PNG files copied into the folder."""
    arch = config["arch"]
    title = ARCHITECTURES[arch].title
    sections = [
        front_matter(arch),
        f"# {title} image classifier: {len(config['classes'])} classes",
        "",
        f"A torchvision {title} fine-tuned with [finetune-studio](https://pypi.org/project/finetune-studio/) "
        f"{text(config['finetune_version'])}. It answers one of the classes below for an image, with a "
        'calibrated confidence, or "unknown" when that confidence is under the threshold it came with.',
        "",
        *data_section(config["classes"], info, split),
        *training_section(info),
        *results_section(config["classes"], metrics, images),
        *calibration_section(info, images),
        *usage_section(),
        *limitations_section(config, info, metrics, split),
    ]
    return "\n".join(sections)


def data_section(classes: list[str], info: dict, split) -> list[str]:
    lines = ["## Data", ""]
    if split is None:
        return [*lines, "The run's split (split.json) could not be read: the images per class are unknown.", ""]
    counts = {part: [0] * len(classes) for part in ("train", "val", "test")}
    for part, numbers in counts.items():
        for _, label in getattr(split, part):
            if isinstance(label, int) and 0 <= label < len(classes):
                numbers[label] += 1
    total = sum(map(sum, counts.values()))
    lines += [f"{total} images: {text(split.layout_text())}.", ""]
    lines += ["| index | class | train | val | test |", "| ---: | --- | ---: | ---: | ---: |"]
    for index, name in enumerate(classes):
        lines.append(f"| {index} | {text(name)} | " + " | ".join(str(counts[p][index]) for p in counts) + " |")
    lines += ["", curation_line(_dict(info.get("curation")))]
    if split.skipped:
        lines.append(f"{len(split.skipped)} file(s) of the folder were skipped (unreadable, or not images).")
    return [*lines, ""]


def curation_line(curation: dict) -> str:
    if not curation:
        return "No curation file was applied: every readable image of the folder was used with its folder's label."
    leaks, added = curation.get("leaks_removed"), curation.get("added")
    return (
        f"Curated: {number(curation.get('excluded'), 'd')} image(s) excluded, "
        f"{number(curation.get('relabelled'), 'd')} relabelled, "
        f"{len(leaks) if isinstance(leaks, list) else 0} copy(ies) leaking between train and val taken out of val"
        + (
            f", {len(added)} unlabelled image(s) labelled and added to train."
            if isinstance(added, list) and added
            else "."
        )
    )


def weights_text(weights: Any) -> str:
    if weights in ("imagenet", "imagenet-v2"):
        return f"{weights} (torchvision's pretrained weights)"
    if weights in ("none", "", None):
        return "none: trained from scratch"
    return "a weights file of the user's"  # a path on their machine: not shown


def training_section(info: dict) -> list[str]:
    config = _dict(info.get("config"))
    best = _dict(info.get("best"))
    versions = _dict(info.get("versions"))
    rows = [
        ("architecture", text(info.get("arch", "?"))),
        ("strategy (what was trained)", text(info.get("strategy", "?"))),
        ("starting weights", weights_text(config.get("weights"))),  # finetune's words, never the user's path
        ("epochs", f"{number(info.get('epochs_done'), 'd')} of {number(config.get('epochs'), 'd')}"),
        ("best epoch (by val accuracy)", number(best.get("epoch"), "d")),
        ("batch size", number(config.get("batch_size"), "d")),
        ("learning rate", "per strategy (default)" if config.get("lr") is None else number(config.get("lr"), "g")),
        ("label smoothing", number(config.get("label_smoothing"), "g")),
        ("image size", f"{number(info.get('image_size'), 'd')} (short side {number(info.get('resize_size'), 'd')})"),
        ("status", text(info.get("status", "?"))),
        ("device", text(info.get("device", "?"))),
        ("training time", f"{number(info.get('seconds'), '.0f')} s"),
        ("torch / torchvision", f"{text(versions.get('torch', '?'))} / {text(versions.get('torchvision', '?'))}"),
    ]
    return ["## Training", "", "| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]


def results_section(classes: list[str], metrics: dict | None, images: list[str]) -> list[str]:
    lines = ["## Validation results", ""]
    if not metrics:
        return [*lines, "This run has no evaluation (metrics.json): it did not finish an epoch's evaluation.", ""]
    top_k = _dict(metrics.get("top_k_accuracy"))
    lines += [
        f"On {number(metrics.get('num_images'), 'd')} validation images, held out from training: accuracy "
        f"{number(metrics.get('accuracy'))}, balanced accuracy {number(metrics.get('balanced_accuracy'))}, "
        f"macro F1 {number(metrics.get('macro_f1'))}"
        + "".join(f", top-{text(k)} {number(v)}" for k, v in top_k.items() if k != "1")
        + ".",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    per_class = _dict(metrics.get("per_class"))
    for name in classes:
        row = _dict(per_class.get(name))
        scores = " | ".join(number(row.get(key)) for key in ("precision", "recall", "f1"))
        lines.append(f"| {text(name)} | {scores} | {number(row.get('support'), 'd')} |")
    lines.append("")
    if "confusion_matrix.png" in images:
        lines += ["![Confusion matrix (rows: true class, columns: predicted)](confusion_matrix.png)", ""]
    if "training_curves.png" in images:
        lines += ["![Loss and accuracy per epoch](training_curves.png)", ""]
    return lines


def calibration_section(info: dict, images: list[str]) -> list[str]:
    lines = ["## Calibration", ""]
    record = _dict(info.get("calibration"))
    if "temperature" not in record:
        return [*lines, "Not calibrated: the confidences are the plain softmax (temperature 1).", ""]
    answered = _dict(record.get("at_suggested"))
    lines += [
        f"Confidences are softmax(logits / T) with T = {number(record.get('temperature'))}, fitted on "
        f"{number(record.get('val_images'), 'd')} validation images (temperature scaling): expected calibration "
        f"error {number(record.get('ece_before'))} before, {number(record.get('ece_after'))} after.",
        "",
        f"Suggested minimum confidence: {number(record.get('suggested_min_confidence'), '.2f')} "
        f'(config.json `min_confidence`): below it the honest answer is "unknown". At that threshold '
        f"{number(answered.get('answered'), '.0%')} of the validation images were answered, "
        f"{number(answered.get('accuracy_answered'), '.0%')} of them correctly.",
        "",
    ]
    if "reliability.png" in images:
        lines += ["![Reliability before and after temperature scaling](reliability.png)", ""]
    return lines


def usage_section() -> list[str]:
    return [
        "## How to use",
        "",
        "With PyTorch and torchvision alone (and `pip install safetensors`), in this folder:",
        "",
        "```python",
        SNIPPET.rstrip(),
        "```",
        "",
        'With finetune-studio: `finetune predict . photo.jpg`, or `finetune.load(".").predict("photo.jpg")` '
        "in Python (the threshold applied, EXIF orientation honoured).",
        "",
    ]


def limitations_section(config: dict, info: dict, metrics: dict | None, split) -> list[str]:
    notes = []
    if _dict(info.get("config")).get("weights") in ("none", "", None):
        notes.append(
            "It was trained from scratch (no pretrained weights): expect far lower accuracy than a model "
            "fine-tuned from ImageNet weights on the same images."
        )
    val_images = metrics.get("num_images") if metrics else None
    if isinstance(val_images, int) and val_images < 100:
        step = f" (one image moves accuracy by {1 / val_images:.1%})" if val_images else ""
        notes.append(f"Its validation metrics come from only {val_images} images{step}: take them as rough.")
    if split is not None and split.train:
        fewest = min(sum(1 for _, label in split.train if label == i) for i in range(len(config["classes"])))
        if fewest < 50:
            notes.append(f"Its smallest class had {fewest} training images: rare looks of a class may be missed.")
    notes += [
        f"It knows only these {len(config['classes'])} classes: any other image still gets one of them. The "
        'threshold (min_confidence) turns unsure answers into "unknown", but an unfamiliar image can be '
        "answered with high confidence; the threshold was chosen on the validation images, not on your images.",
        "It expects photos like the ones it was trained on (lighting, framing, camera); check it on your own "
        "images before relying on it.",
    ]
    if info.get("status") not in (None, "completed"):
        notes.append(f"Its training did not complete (status: {text(info.get('status'))}).")
    return ["## Limitations", "", *(f"- {note}" for note in notes), ""]

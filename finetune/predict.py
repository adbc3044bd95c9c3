"""Load a trained model once and predict: one image (live, low latency) or many (batched, parallel decoding)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .calibrate import UNKNOWN, is_unknown
from .config import FinetuneError
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageTooLarge, eval_transform, load_rgb, resize_size, to_rgb
from .device import amp_dtype_for, channels_last_for, default_workers, non_blocking, pin_memory, resolve_device
from .fsutil import read_json
from .model import load_classifier, safe_load, state_dict_from
from .names import printable
from .rundir import RunDir


def read_class_indices(path: str | Path) -> list[str]:
    """Class names in index order from a classic class_indices.json ({"0": "daisy", ...})."""
    path = Path(path).expanduser()
    mapping = read_json(path, "class file")
    if isinstance(mapping, list) and all(isinstance(c, str) for c in mapping):
        return mapping
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise FinetuneError(f'{path} is not a class map like {{"0": "daisy", "1": "roses"}}')
    try:
        indices = sorted(int(k) for k in mapping)
    except ValueError:
        raise FinetuneError(f"{path}: keys must be class indices 0..N-1") from None
    if indices != list(range(len(mapping))):
        raise FinetuneError(f"{path}: keys must be the indices 0..{len(mapping) - 1} without gaps")
    return [mapping[str(i)] for i in range(len(mapping))]


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, calibrated probability), best first
    error: str | None = None
    unknown: bool = False  # the best guess's confidence is below the minimum confidence
    logits: list[float] | None = None  # the raw model output, when asked for (predict_paths keep_logits)

    @property
    def label(self) -> str | None:
        """The best guess (a class, even when the answer is unknown)."""
        return self.top[0][0] if self.top else None

    @property
    def answer(self) -> str | None:
        """What to tell the user: the best guess, or "unknown" below the minimum confidence."""
        return UNKNOWN if self.unknown and self.top else self.label

    @property
    def confidence(self) -> float | None:
        return self.top[0][1] if self.top else None


class _Files(Dataset):
    """Decodes in DataLoader workers; an unreadable file becomes an error row, not a crash."""

    def __init__(self, paths: list[Path], transform, min_size: int):
        self.paths, self.transform, self.min_size = paths, transform, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index], self.min_size)), index, None
        except (FinetuneError, ImageTooLarge) as error:  # refused unread: a FIFO, a bomb, too costly
            return None, index, str(error)
        except Exception as error:  # noqa: BLE001
            return None, index, f"cannot decode ({type(error).__name__}: {error})"


def _collate(batch):
    good = [(tensor, index) for tensor, index, _ in batch if tensor is not None]
    failed = [(index, error) for tensor, index, error in batch if tensor is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], failed


def check_run_fields(info: Mapping[str, Any], info_path: Path) -> None:
    """One line naming run.json and the field when what a model is loaded with is not what finetune
    writes there (a run folder may come from anyone): its arch, classes, image size, normalisation and
    calibration."""
    from .config import ARCHS

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks = [
        ("arch", info.get("arch") in ARCHS),
        ("classes", isinstance(info.get("classes"), list) and all(isinstance(c, str) for c in info["classes"])),
        ("image_size", isinstance(info.get("image_size", 224), int) and 32 <= info.get("image_size", 224) <= 1024),
        *(
            (
                key,
                isinstance(info.get(key, [0, 0, 0]), list)
                and len(info.get(key, [0, 0, 0])) == 3
                and all(number(v) for v in info.get(key, [0, 0, 0])),
            )
            for key in ("mean", "std")
        ),
        ("calibration", isinstance(info.get("calibration") or {}, dict)),
    ]
    for key, ok in checks:
        if not ok:
            raise FinetuneError(f"{info_path}: its {key!r} is not one finetune writes ({info.get(key)!r:.80})")
    if any(v <= 0 for v in info.get("std", [1, 1, 1])):
        raise FinetuneError(f"{info_path}: its 'std' must be positive")
    problem = class_names_problem(info["classes"])
    if problem is not None:
        raise FinetuneError(f"{info_path}: {problem}")
    suggested = (info.get("calibration") or {}).get("suggested_min_confidence")
    if suggested is not None and not (number(suggested) and 0 <= suggested <= 1):  # nan is in no range
        raise FinetuneError(
            f"{info_path}: its calibration's 'suggested_min_confidence' must be a number from 0 to 1 or null, "
            f"got {suggested!r:.80}"
        )


def class_names_problem(classes: list[str]) -> str | None:
    """Why a model's class names cannot be its labels, or None. Any text is a label (shown through
    names.printable), but each is written as UTF-8 (CSV, JSON, an export) and told apart by its name."""
    seen: set[str] = set()
    for name in classes:
        if not name:
            return "a class name is empty"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: valid in JSON as an escape, in no UTF-8 file
            return f"class '{printable(name)}' is not valid UTF-8"
        if name in seen:
            return f"class '{printable(name)}' is named twice"
        seen.add(name)
    return None


class Predictor:
    """A model kept loaded and warm, with its class names, preprocessing and calibration.

    Probabilities are calibrated: softmax(logits / temperature), the temperature fitted on the
    validation set after training (run.json "calibration"; 1.0 for plain weights files). Below
    `min_confidence` an answer is "unknown" (with the best guess kept); the default is the
    threshold suggested from validation (see finetune.calibrate), 0 means always answer."""

    def __init__(
        self,
        model: torch.nn.Module,
        classes: list[str],
        arch: str,
        image_size: int = 224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device: str | torch.device = "auto",
        source: str = "",
        temperature: float = 1.0,
        suggested_min_confidence: float | None = None,
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last_for(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype_for(self.device, True)
        self.classes, self.arch, self.image_size, self.source = list(classes), arch, image_size, source
        self.transform = eval_transform(image_size, mean, std)
        self.transform_mean, self.transform_std = tuple(mean), tuple(std)
        self.min_size = resize_size(image_size)
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise FinetuneError(f"{source or 'model'}: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.suggested_min_confidence = suggested_min_confidence

    def min_confidence(self, given: float | None = None) -> float:
        """The threshold in use: `given`, else the suggestion from validation, else 0 (always answer)."""
        value = given if given is not None else (self.suggested_min_confidence or 0.0)
        if not 0.0 <= value <= 1.0:
            raise FinetuneError(f"min confidence must be between 0 and 1, got {value}")
        return float(value)

    def answer(self, top: list[tuple[str, float]], min_confidence: float | None = None) -> tuple[str, str, float]:
        """(answer, best guess, confidence) for one image's top list: answer is "unknown" below the threshold."""
        guess, confidence = top[0]
        return (UNKNOWN if is_unknown(confidence, self.min_confidence(min_confidence)) else guess), guess, confidence

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", checkpoint: str = "model.pth") -> Predictor:
        run = RunDir(Path(run_dir).expanduser())
        info = run.require_trained(checkpoint)
        run_dir, info_path = run.path, run.info_path
        weights = run.path / checkpoint
        check_run_fields(info, info_path)
        state = state_dict_from(safe_load(weights, "model"), weights)
        classes = info["classes"]
        class_file = run.class_indices
        if class_file.is_file() and read_class_indices(class_file) != classes:
            raise FinetuneError(f"{class_file} does not match the classes in {info_path}")
        model = load_classifier(info["arch"], state, len(classes), str(weights))
        calibration = info.get("calibration") or {}
        return cls(
            model,
            classes,
            info["arch"],
            info.get("image_size", 224),
            info.get("mean", IMAGENET_MEAN),
            info.get("std", IMAGENET_STD),
            device,
            source=str(run_dir),
            temperature=calibration.get("temperature", 1.0),
            suggested_min_confidence=calibration.get("suggested_min_confidence"),
        )

    @classmethod
    def from_hf_folder(cls, folder: str | Path, device: str = "auto") -> Predictor:
        """A folder `finetune export --format hf` wrote (or one from the Hub): config.json, model.safetensors."""
        from .hub import WEIGHTS, read_hf_folder

        folder = Path(folder).expanduser()
        config, state = read_hf_folder(folder)
        classes = config["classes"]
        model = load_classifier(config["arch"], state, len(classes), str(folder / WEIGHTS))
        return cls(
            model,
            classes,
            config["arch"],
            config["image_size"],
            config["mean"],
            config["std"],
            device,
            source=str(folder),
            temperature=config.get("temperature", 1.0),
            suggested_min_confidence=config.get("min_confidence"),
        )

    @classmethod
    def from_files(
        cls, weights: str | Path, class_indices: str | Path, arch: str, image_size: int = 224, device: str = "auto"
    ) -> Predictor:
        """A plain state_dict + class_indices.json, as the classic train.py/predict.py scripts use."""
        classes = read_class_indices(class_indices)
        state = state_dict_from(safe_load(weights, "model"), Path(weights))
        model = load_classifier(arch, state, len(classes), str(weights))
        return cls(model, classes, arch, image_size, device=device, source=str(weights))

    @classmethod
    def load(
        cls,
        source: str | Path,
        classes: str | Path | None = None,
        arch: str | None = None,
        image_size: int = 224,
        device: str = "auto",
    ) -> Predictor:
        """A run folder, an exported model folder (`finetune export --format hf`), or a .pth file with a class
        file beside it (or given) and --arch."""
        source = Path(source).expanduser()
        if source.is_dir() and not (source / "run.json").is_file() and (source / "config.json").is_file():
            return cls.from_hf_folder(source, device)
        if source.is_dir():
            return cls.from_run(source, device)
        if not source.exists():
            raise FinetuneError(f"model not found: {source}")
        classes = Path(classes) if classes else source.with_name("class_indices.json")
        if arch is None:
            raise FinetuneError(f"{source} is a plain weights file: say which architecture with --arch")
        return cls.from_files(source, classes, arch, image_size, device)

    def _top(self, probs: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(top_k, len(self.classes)))
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist(), strict=True)]
            for vs, ix in zip(values, indices, strict=True)
        ]

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The raw model output, float32 on the CPU."""
        images = images.to(self.device, non_blocking=non_blocking(self.device))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.model(images).float().cpu()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated: softmax(logits / temperature)."""
        return torch.softmax(self.logits(images) / self.temperature, dim=1)

    def _answers(self, logits: torch.Tensor, top_k: int, threshold: float) -> list[tuple[list, bool]]:
        """(top, unknown) per row of logits: the one rule for a single image and for a batch."""
        tops = self._top(torch.softmax(logits / self.temperature, dim=1), top_k)
        return [(top, is_unknown(top[0][1], threshold)) for top in tops]

    def predict_one(
        self,
        image: Image.Image | str | Path,
        top_k: int = 5,
        min_confidence: float | None = None,
        keep_logits: bool = False,
    ) -> Prediction:
        """One image (a PIL image in any mode, or a path) answered as `predict_paths` answers it: calibrated,
        "unknown" below `min_confidence` (default: the run's suggestion) with the best guess kept. A path that
        cannot be read is a FinetuneError here, not an error row."""
        threshold = self.min_confidence(min_confidence)
        path = str(image) if isinstance(image, (str, Path)) else ""
        if isinstance(image, (str, Path)):
            try:
                image = load_rgb(image, self.min_size)
            except Exception as error:  # noqa: BLE001
                raise FinetuneError(f"cannot read image {image}: {error}") from None
        else:
            image = to_rgb(image)
        logits = self.logits(self.transform(image).unsqueeze(0))
        [(top, unknown)] = self._answers(logits, top_k, threshold)
        return Prediction(path, top, unknown=unknown, logits=logits[0].tolist() if keep_logits else None)

    def predict_image(self, image: Image.Image | str | Path, top_k: int = 5) -> list[tuple[str, float]]:
        """One image's calibrated [(class, probability)] best first, with no threshold applied (`predict_one`
        applies it; `answer` applies one to this list)."""
        return self.predict_one(image, top_k, min_confidence=0.0).top

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        top_k: int = 5,
        batch_size: int = 64,
        workers: int | None = None,
        on_progress=None,
        min_confidence: float | None = None,
        keep_logits: bool = False,
    ) -> list[Prediction]:
        """Batched (the last partial batch included), decoded in parallel; bad files become error rows;
        a confidence below `min_confidence` (default: the run's suggestion) marks the row unknown.
        `keep_logits`: each row also keeps the raw model output (for calibration reports)."""
        threshold = self.min_confidence(min_confidence)
        files = [Path(p) for p in paths]
        if workers is None:
            workers = min(default_workers(self.device), max(0, len(files) // batch_size))
        results: list[Prediction] = [Prediction(str(p)) for p in files]
        loader = DataLoader(
            _Files(files, self.transform, self.min_size),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin_memory(self.device),
        )
        done = 0
        for images, indices, failed in loader:
            for index, error in failed:
                results[index].error = error
            if images is not None:
                logits = self.logits(images)
                for index, (top, unknown), raw in zip(
                    indices, self._answers(logits, top_k, threshold), logits.tolist(), strict=True
                ):
                    results[index].top, results[index].unknown = top, unknown
                    results[index].logits = raw if keep_logits else None
            done += len(indices) + len(failed)
            if on_progress:
                on_progress(done, len(files))
        return results


def write_csv(predictions: list[Prediction], path: str | Path, top_k: int) -> Path:
    """One row per image: the answer ("unknown" below the minimum confidence) and the best guess beside it;
    names are escaped for spreadsheets (see csvfile), probabilities are numbers."""
    from .csvfile import number
    from .csvfile import write_csv as write_rows

    header = ["path", "prediction", "best_guess", "confidence"]
    for k in range(2, top_k + 1):
        header += [f"class_{k}", f"probability_{k}"]
    rows = []
    for p in predictions:
        row = [p.path, p.answer or "", p.label or "", number(p.top[0][1], ".6f") if p.top else ""]
        for k in range(1, top_k):
            row += [p.top[k][0], number(p.top[k][1], ".6f")] if k < len(p.top) else ["", ""]
        rows.append(row + [p.error or ""])
    return write_rows(path, header + ["error"], rows)

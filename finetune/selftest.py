"""`python -m finetune selftest`: prove on this machine (its GPU, its Mac, its CPU) that training,
caching, checkpoints, prediction and export are right, and print a report to paste into a bug report.

What the test suite checks on a CPU, checked here on the device the user trains on, with the
settings training uses there (mixed precision, channels_last, the caches):

* frozen parameters and BatchNorm buffers are bit-identical after training;
* cached frozen features give the same logits as the full model (within the dtype's tolerance);
* checkpoints hold CPU tensors and load with a plain `torch.load`, no map_location;
* prediction agrees with the evaluation written at the end of training;
* TorchScript and ONNX exports compute what PyTorch computes;
* with `--nproc N`: a short torchrun training leaves one normal run folder.

Exits 0 only when every check passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import architecture
from .config import STRATEGIES, TrainConfig, default_strategy
from .device import amp_choice, channels_last_for, describe_device, mps_available, resolve_device, usable_cores

# Relative tolerance of logits, cached path against the full model: float32 is exact up to summation
# order; a float16 layer3 cache and autocast on a GPU are not.
LOGIT_TOLERANCE = {None: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def run(self, name: str, function, *args) -> object:
        """Run one check; an exception is a failure with its message, never the end of the self-test."""
        started = time.perf_counter()
        try:
            passed, detail, value = function(*args)
        except Exception as error:  # noqa: BLE001 - every failure is reported, the rest still runs
            passed, detail, value = False, f"{type(error).__name__}: {error}", None
            if os.environ.get("FINETUNE_SELFTEST_TRACEBACK"):
                traceback.print_exc()
        check = Check(name, passed, detail, time.perf_counter() - started)
        self.checks.append(check)
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)
        return value

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check'.ljust(width)}  result  time     detail"]
        for c in self.checks:
            lines.append(f"{c.name.ljust(width)}  {'pass' if c.passed else 'FAIL'}    {c.seconds:6.1f}s  {c.detail}")
        return "\n".join(lines)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


# ---------------------------------------------------------------------------------------------
# The environment


def environment(device: torch.device, compile_model: bool) -> list[str]:
    import torchvision

    from .cache import available_memory_bytes

    amp_dtype, why = amp_choice(device, True)
    lines = [
        f"finetune selftest on {describe_device(device)}",
        f"  torch {torch.__version__}, torchvision {torchvision.__version__}, python {sys.version.split()[0]}",
        f"  CUDA {torch.version.cuda or '-'} (available: {torch.cuda.is_available()}, "
        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)), "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}, "
        f"MPS available: {mps_available()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"  GPU: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 1024**3:.1f} GiB"
        )
    lines.append(f"  mixed precision: {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'} ({why})")
    lines.append(
        f"  channels_last: {'on' if channels_last_for(device) else 'off'}; "
        f"torch.compile: {'on' if compile_model else 'off (--compile to test it)'}"
    )
    total = _total_memory_bytes()
    lines.append(
        f"  CPU: {usable_cores()} usable cores; RAM: {available_memory_bytes() / 1024**3:.1f} GiB available"
        + (f" of {total / 1024**3:.1f} GiB" if total else "")
    )
    return lines


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Checks


def standin_weights(arch: str, path: Path) -> Path:
    """Random 'pretrained' weights with BatchNorm statistics far from their defaults, so a frozen
    layer whose statistics moved cannot go unnoticed (ImageNet weights may not be on this machine)."""

    torch.manual_seed(7)
    model = architecture(arch).build()
    for module in model.modules():
        # track_running_stats is on in torchvision's ResNets: both buffers exist
        if (
            isinstance(module, torch.nn.BatchNorm2d)
            and module.running_mean is not None
            and module.running_var is not None
        ):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), path)
    return path


def check_training(cfg: TrainConfig):
    from .events import read_events
    from .training import train

    run = train(cfg)
    events = read_events(run)
    rates = [e["images_per_s"] for e in events if e["type"] == "batch"]
    start = next(e for e in events if e["type"] == "start")
    end: Mapping[str, object] = next((e for e in events if e["type"] == "end"), {})
    ok = end.get("status") == "completed"
    return (
        ok,
        (
            f"{end.get('status', 'no end event')}; {rates[-1] if rates else 0:.0f} images/s; "
            f"pipeline: {start['pipeline'].split(' (')[0]}"
        ),
        run,
    )


def check_frozen(run: Path, standin: Path, strategy: str, arch: str):

    before = torch.load(standin, weights_only=True)
    after = torch.load(run / "model.pth", weights_only=True)
    frozen_modules = architecture(arch).layout.frozen_modules(strategy)
    frozen = [k for k in after if k.split(".")[0] in frozen_modules]
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    if strategy == "all":
        moved = not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
        return moved, "every layer trained" if moved else "layer1 did not change", None
    return (
        not changed,
        (
            f"{len(frozen)} frozen tensors (weights and BatchNorm buffers) bit-identical"
            if not changed
            else f"{len(changed)} frozen tensors changed, e.g. {changed[0]}"
        ),
        None,
    )


def check_checkpoints(run: Path):
    """Every tensor on the CPU, and a plain torch.load (no map_location) works."""
    on_device: list[str] = []

    def walk(obj, name: str, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                on_device.append(f"{name}:{where} on {obj.device}")
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, name, f"{where}.{key}" if where else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, name, f"{where}[{i}]")

    for name in ("model.pth", "last.pth"):
        walk(torch.load(run / name, weights_only=True), name, "")
    return not on_device, "model.pth and last.pth hold CPU tensors only" if not on_device else on_device[0], None


def check_cached_logits(run: Path, cfg: TrainConfig, device: torch.device):
    """The trainable part on the cached inputs against the whole model on the images, on the device."""
    from torch.utils.data import DataLoader

    from . import cache
    from .data import ImageListDataset, eval_transform, resize_size
    from .device import amp_dtype_for
    from .model import build_model, split_model
    from .rundir import RunDir

    scan = RunDir(run).read_split()
    model = build_model(cfg.arch, len(scan.classes), "none")
    model.load_state_dict(torch.load(run / "model.pth", weights_only=True))
    model.eval()
    frozen, trainable = split_model(model, cfg.strategy or default_strategy(cfg.weights))  # as train() does
    memory_format = torch.channels_last if channels_last_for(device) else torch.preserve_format
    # Module.to takes a device and a memory format together; torch's overloads list them apart
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    amp_dtype = amp_dtype_for(device, cfg.amp)
    pipeline = cache.build_pipeline(cfg, scan, frozen, device, amp_dtype, memory_format, 0, lambda message: None)
    if pipeline.kind == "stream":
        return False, f"no cache was built ({pipeline.description})", None
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        cached = torch.cat(
            [
                trainable(pipeline.prepare_eval(x.to(device))).float().cpu()
                for x, _ in DataLoader(pipeline.val, batch_size=16)
            ]
        )
        images = ImageListDataset(scan.root, scan.val, eval_transform(cfg.image_size), resize_size(cfg.image_size))
        full = torch.cat(
            [
                model(x.to(device).contiguous(memory_format=memory_format)).float().cpu()
                for x, _ in DataLoader(images, batch_size=16)
            ]
        )
    scale = full.abs().max().clamp_min(1e-6)
    error = float((cached - full).abs().max() / scale)
    agree = float((cached.argmax(1) == full.argmax(1)).float().mean())
    tolerance = LOGIT_TOLERANCE[amp_dtype] if cfg.strategy != "last" else max(LOGIT_TOLERANCE[amp_dtype], 5e-2)
    ok = error <= tolerance and agree >= 0.9
    return (
        ok,
        (
            f"{pipeline.kind} cache: max relative logit difference {error:.1e} (tolerance {tolerance:.0e}), "
            f"same top-1 for {agree:.0%} of {len(full)} images"
        ),
        None,
    )


def check_predict_agrees(run: Path, device: torch.device):
    """Predictions for the val images against the misclassified list of metrics.json."""
    from .predict import Predictor
    from .rundir import RunDir

    rundir = RunDir(run)
    metrics = rundir.metrics()
    scan = rundir.read_split()
    predictor = Predictor.from_run(run, device=str(device))
    predictions = predictor.predict_paths([Path(scan.root) / rel for rel, _ in scan.val], top_k=1, workers=0)
    wrong_predict = {
        rel for (rel, label), p in zip(scan.val, predictions, strict=True) if p.label != scan.classes[label]
    }
    wrong_eval = {m["path"] for m in metrics.get("misclassified", [])}
    differ = len(wrong_predict ^ wrong_eval)
    allowed = max(1, round(0.05 * len(scan.val)))  # half-precision paths may flip a near tie
    return (
        differ <= allowed,
        (f"predict and evaluate disagree on {differ} of {len(scan.val)} images (allowed {allowed})"),
        None,
    )


def check_calibration_and_heatmaps(run: Path, device: torch.device):
    """run.json's calibration, and Grad-CAM on this device: the image's size, finite, and a different
    map for another class (backward passes through hooks on the device)."""
    import math

    import numpy as np
    from PIL import Image

    from .explain import explain_image
    from .predict import Predictor
    from .rundir import RunDir

    rundir = RunDir(run)
    calibration = rundir.info().get("calibration") or {}
    temperature = calibration.get("temperature")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return False, f"no usable temperature in run.json ({temperature!r})", None
    if not rundir.reliability.is_file():
        return False, "reliability.png missing", None
    scan = rundir.read_split()
    path = Path(scan.root) / scan.val[0][0]
    predictor = Predictor.from_run(run, device=str(device))
    first, second = (explain_image(predictor, path, name) for name in predictor.classes[:2])
    size = Image.open(path).size
    problems = []
    if first.overlay.size != size:
        problems.append(f"overlay {first.overlay.size} for an image of {size}")
    if first.heatmap.shape != (predictor.image_size, predictor.image_size) or not np.isfinite(first.heatmap).all():
        problems.append(f"heatmap {first.heatmap.shape}, finite: {bool(np.isfinite(first.heatmap).all())}")
    if np.array_equal(first.heatmap, second.heatmap):
        problems.append("the same heatmap for two classes")
    detail = (
        f"temperature {temperature:.3f}, ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}; "
        f"Grad-CAM on {device.type}"
    )
    return not problems, "; ".join(problems) or detail, None


def check_exports(run: Path):
    import numpy as np

    from .export import export
    from .predict import Predictor

    reference = Predictor.from_run(run, device="cpu")
    example = torch.randn(2, 3, reference.image_size, reference.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.model.float()(example.contiguous(memory_format=torch.channels_last)).numpy()
    scripted = torch.jit.load(str(export(run, "torchscript")))
    with torch.inference_mode():
        ts_error = float(np.abs(scripted(example).numpy() - expected).max())
    detail = f"TorchScript max difference {ts_error:.1e}"
    ok = ts_error < 1e-3
    onnx_path = export(run, "onnx")
    try:
        import onnxruntime
    except ImportError:
        return ok, detail + "; ONNX exported (onnxruntime not installed: not run)", None
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_error = float(np.abs(session.run(None, {"image": example.numpy()})[0] - expected).max())
    return ok and onnx_error < 1e-3, detail + f", ONNX {onnx_error:.1e}", None


def check_torchrun(data: Path, runs: Path, nproc: int, device: torch.device, arch: str, image_size: int):
    from .events import read_events
    from .rundir import RunDir

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "finetune",
        "train",
        "--weights",
        "none",
        "--arch",
        arch,
        "--strategy",
        "last",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        str(image_size),
        "--device",
        "cuda" if device.type == "cuda" else "cpu",
        "--runs-dir",
        str(runs),
        "--run-name",
        "ddp",
        "--quiet",
        "--",
        str(data),
    ]
    env = dict(
        os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        return False, f"torchrun exited with {done.returncode}: {tail[0]}", None
    run = RunDir(runs / "ddp")
    info = run.info()
    events = read_events(run.path)
    problems = [
        name
        for name in ("model.pth", "last.pth", "metrics.json", "class_indices.json", "split.json")
        if not (run.path / name).is_file()
    ]
    if info.get("status") != "completed" or info.get("world_size") != nproc:
        problems.append(f"status {info.get('status')}, world size {info.get('world_size')}")
    if sum(e["type"] == "start" for e in events) != 1:
        problems.append("events written more than once")
    metrics = json.loads((run.path / "metrics.json").read_text()) if (run.path / "metrics.json").is_file() else {}
    if metrics.get("num_images") != len(run.read_split().val):
        problems.append("not every val image evaluated once")
    return not problems, (f"{nproc} processes: one normal run folder" if not problems else "; ".join(problems)), None


# ---------------------------------------------------------------------------------------------


def run_selftest(
    device_name: str = "auto",
    arch: str = TrainConfig.arch,
    nproc: int = 0,
    image_size: int | None = None,
    epochs: int = 1,
    compile_model: bool = False,
    workdir: str | Path | None = None,
) -> Report:
    from .sample import make_sample_dataset

    device = resolve_device(device_name)
    # A 2-core CPU must finish in a few minutes; a GPU gets the real input size.
    image_size = image_size or (224 if device.type != "cpu" else 96)
    for line in environment(device, compile_model):
        print(line)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="finetune-selftest-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        data = make_sample_dataset(tmp / "data", per_class=24, seed=0)
        standin = standin_weights(arch, tmp / "standin.pth")
        print(
            f"data: the sample dataset (3 classes, 72 images) in {data}; image size {image_size}; {epochs} epoch(s) "
            f"per strategy",
            flush=True,
        )
        for strategy in STRATEGIES:
            cfg = TrainConfig(
                data=str(data),
                arch=arch,
                strategy=strategy,
                weights=str(standin),
                epochs=epochs,
                batch_size=16,
                image_size=image_size,
                device=str(device),
                compile=compile_model,
                runs_dir=str(tmp / "runs"),
                run_name=strategy,
                seed=0,
            ).validate()
            print(f"{strategy}:", flush=True)
            run = report.run(f"{strategy}: training", check_training, cfg)
            if run is None:
                continue
            report.run(f"{strategy}: frozen layers", check_frozen, run, standin, strategy, arch)
            report.run(f"{strategy}: cached = full model", check_cached_logits, run, cfg, device)
            report.run(f"{strategy}: checkpoints on CPU", check_checkpoints, run)
            report.run(f"{strategy}: predict = evaluate", check_predict_agrees, run, device)
            if strategy == "last":
                report.run(f"{strategy}: TorchScript/ONNX = PyTorch", check_exports, run)
                report.run(f"{strategy}: calibration, heatmaps", check_calibration_and_heatmaps, run, device)
        if nproc > 1:
            print(f"torchrun with {nproc} processes:", flush=True)
            report.run(f"DDP x{nproc}", check_torchrun, data, tmp / "ddp-runs", nproc, device, arch, image_size)
    return report


def main(args) -> int:
    architecture(args.arch)  # an unknown name: the one line naming the choices
    started = time.perf_counter()
    report = run_selftest(args.device, args.arch, args.nproc, args.image_size, args.epochs, args.compile)
    print()
    print(report.table())
    verdict = "all checks passed" if report.passed else f"{sum(not c.passed for c in report.checks)} check(s) FAILED"
    print(f"\n{verdict} in {time.perf_counter() - started:.0f} s")
    return 0 if report.passed else 1

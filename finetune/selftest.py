"""`python -m finetune selftest`: prove on this machine (its GPU, its Mac, its CPU) that training,
caching, checkpoints, prediction and export are right, and print a report to paste into a bug report.

What the test suite checks on a CPU, checked here on the device the user trains on, with the
settings training uses there (mixed precision, channels_last, the caches):

* the precision: bf16 only with bf16 units (compute capability 8.0+), fp16 with a gradient scaler
  below, float32 off CUDA (a rule of its own, not device.amp_choice asked again);
* no host-device sync in the training steps besides the throttled progress reads (counted with
  finetune.syncs, and on CUDA by torch itself, set_sync_debug_mode("warn"));
* frozen parameters and BatchNorm buffers are bit-identical after training, and every trained stage
  changed (when the gradient scaler skipped every step, nothing may change);
* cached frozen features give the same logits as the full model (within the dtype's tolerance), for
  ResNet-50's wider features too;
* the streaming pipeline (no cache) trains, and a stopped training resumes from last.pth; on CUDA
  it decodes the JPEGs with nvJPEG, whose crops agree with libjpeg's;
* checkpoints hold CPU tensors and load with a plain `torch.load`, no map_location;
* prediction agrees with the evaluation written at the end of training;
* TorchScript and ONNX exports compute what PyTorch computes, Grad-CAM works on the device (SKIP,
  not FAIL, without the optional onnx or grad-cam);
* images/s of the steady-state training steps (on a GPU, a run of SPEED_STEPS steps);
* with `--nproc N`: a short torchrun training leaves one normal run folder.

Exits 0 only when every check passes or is skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import architecture
from .config import STRATEGIES, FinetuneError, TrainConfig, default_strategy
from .device import amp_choice, channels_last_for, describe_device, mps_available, resolve_device, usable_cores
from .syncs import Syncs, SyncWarnings, count_syncs, cuda_sync_debug

# Relative tolerance of logits, cached path against the full model: float32 is exact up to summation
# order; a float16 layer3 cache and autocast on a GPU are not.
LOGIT_TOLERANCE = {None: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}

# Syncs allowed in a steady-state epoch's steps besides the progress reads: the DDP stop check (one
# per training.STOP_CHECK_EVERY steps) and this many more.
SYNCS_SPARE = 2
# nvJPEG's crops against libjpeg's (the same boxes) on the sample JPEGs: the mean absolute difference per image
GPU_DECODE_SAMPLE, GPU_DECODE_TOLERANCE = 12, 3.0
# A GPU's images/s: this many steady-state steps of this batch (a CPU reports its `all` training's).
SPEED_STEPS, SPEED_BATCH = 40, 32
INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale: each skipped step halves it


class Skip(Exception):
    """A check that cannot run here (an optional package is absent): SKIP with this one line."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0
    skipped: bool = False

    @property
    def verdict(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def run(self, name: str, function, *args) -> object:
        """Run one check; an exception is a failure with its message, never the end of the self-test."""
        started = time.perf_counter()
        skipped = False
        try:
            passed, detail, value = function(*args)
        except Skip as why:
            passed, detail, value, skipped = True, str(why), None, True
        except Exception as error:  # noqa: BLE001 - every failure is reported, the rest still runs
            passed, detail, value = False, f"{type(error).__name__}: {error}", None
            if os.environ.get("FINETUNE_SELFTEST_TRACEBACK"):
                traceback.print_exc()
        check = Check(name, passed, detail, time.perf_counter() - started, skipped)
        self.checks.append(check)
        print(f"  {check.verdict}  {name}: {detail}", flush=True)
        return value

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check'.ljust(width)}  result  time     detail"]
        for c in self.checks:
            lines.append(
                f"{c.name.ljust(width)}  {c.verdict.lower() if c.passed else 'FAIL':6}  {c.seconds:6.1f}s  {c.detail}"
            )
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


def standin_weights(arch: str, path: Path, classes: int | None = None) -> Path:
    """Random 'pretrained' weights with BatchNorm statistics far from their defaults, so a frozen
    layer whose statistics moved cannot go unnoticed (ImageNet weights may not be on this machine).
    `classes`: a head of that many outputs, which training keeps (model.build_model), so that the
    head's starting values are known too."""

    torch.manual_seed(7)
    spec = architecture(arch)
    model = spec.build()
    if classes is not None:
        setattr(model, spec.layout.head, torch.nn.Linear(spec.num_features, classes))
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


@dataclass
class Window:
    """One epoch's steady state: from its first batch event to its last (batch 1 has the warm-up)."""

    epoch: int
    steps: int
    seconds: float
    images: float
    syncs: int  # counted by finetune.syncs, the progress reads aside
    by_op: Counter[str]
    warned: int  # CUDA's own sync warnings, the progress reads aside (0 off CUDA)

    @property
    def allowed(self) -> float:
        from .training import STOP_CHECK_EVERY

        return self.steps / STOP_CHECK_EVERY + SYNCS_SPARE

    @property
    def judged(self) -> int:
        """What must stay within `allowed`: the ops counted, and from epoch 2 on torch's own warnings
        too (in epoch 1 cuDNN may autotune the last batches' new shapes, which may wait for the GPU)."""
        return max(self.syncs, self.warned) if self.epoch > 1 else self.syncs

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class StepTimer:
    """A training's event listener: for each epoch the steps between its first and last batch events,
    their time (each batch event reads the device's sums, so the clock has waited for the GPU) and
    the syncs the counters saw meanwhile."""

    def __init__(self, syncs: Syncs | None = None, warned: SyncWarnings | None = None):
        self.syncs, self.warned = syncs, warned
        self.windows: list[Window] = []
        self.start: Mapping[str, Any] = {}
        self._open: tuple | None = None

    def _snapshot(self) -> tuple:
        syncs, warned = self.syncs or Syncs(), self.warned or SyncWarnings()
        return time.perf_counter(), syncs.count, syncs.allowed, warned.count, Counter(syncs.by_op)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event["type"] == "start":
            self.start = event
        elif event["type"] == "batch" and event["batch"] == 1:
            self._open = (event["epoch"], self._snapshot())
        elif event["type"] == "batch" and event["batch"] == event["batches"] and self._open:
            epoch, (t0, count0, allowed0, warned0, ops0) = self._open
            t1, count1, allowed1, warned1, ops1 = self._snapshot()
            steps = event["batches"] - 1
            per_step = self.start.get("train_images", 0) / max(self.start.get("batches_per_epoch", 1), 1)
            # on CUDA each progress read (allowed) is also one of torch's warnings
            warned = max(0, (warned1 - warned0) - (allowed1 - allowed0))
            self.windows.append(Window(epoch, steps, t1 - t0, steps * per_step, count1 - count0, ops1 - ops0, warned))
            self._open = None


@dataclass
class Trained:
    """A training the checks look at: its run folder, what its steps did, and its last.pth."""

    run: Path
    cfg: TrainConfig
    timer: StepTimer
    checkpoint: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Optimizer steps over the run's life (a resumed run's first part too)."""
        return int(self.checkpoint.get("epoch", 0)) * int(self.timer.start.get("batches_per_epoch", 0))

    @property
    def skipped(self) -> int:
        """Steps the fp16 gradient scaler skipped (inf/nan gradients): each halved its scale. Exact
        below its growth interval (2000 steps without a skip), far above any run here."""
        scale = (self.checkpoint.get("scaler") or {}).get("scale")
        return max(0, round(math.log2(INITIAL_SCALE / scale))) if scale else 0


def check_training(cfg: TrainConfig, device: torch.device, resume: Path | None = None, stop_after: int = 0):
    """train() with its syncs counted; `stop_after`: stop once that epoch is done (a full last.pth)."""
    from .training import _Progress, train

    stop = threading.Event()
    # the progress reads (2 per batch event, at most BATCH_EVENTS_PER_SECOND) are the allowed syncs
    counting = count_syncs(device, allow=[_Progress.batch]) if not cfg.compile else contextlib.nullcontext(None)
    with counting as syncs, cuda_sync_debug(device) as warned:
        timer = StepTimer(syncs, warned)

        def on_event(event: Mapping[str, Any]) -> None:
            timer(event)
            if stop_after and event["type"] == "epoch" and event["epoch"] >= stop_after:
                stop.set()

        run = train(cfg, on_event=on_event, stop=stop, resume=resume)
    info = json.loads((run / "run.json").read_text())
    trained = Trained(run, cfg, timer, torch.load(run / "last.pth", weights_only=True))
    wanted = "stopped" if stop_after else "completed"
    rate = f"{timer.windows[-1].images_per_s:.0f} images/s; " if timer.windows else ""
    detail = f"{info.get('status')}; {rate}pipeline: {str(timer.start.get('pipeline', '?')).split(' (')[0]}"
    return info.get("status") == wanted, detail, trained


def check_syncs(trained: Trained):
    """Each epoch's steady-state steps: at most one sync per STOP_CHECK_EVERY steps and SYNCS_SPARE more."""
    if trained.timer.syncs is None:
        raise Skip("not counted under --compile (a TorchDispatchMode would change what torch.compile traces)")
    windows = trained.timer.windows
    if not windows:
        return False, "no steady-state steps to count (an epoch of fewer than 2 batches)", None
    worst = max(windows, key=lambda w: w.judged - w.allowed)
    ops = ", ".join(f"{name} {n}" for name, n in worst.by_op.most_common(4))
    detail = (
        f"{worst.syncs} in the {worst.steps} steady-state steps of epoch {worst.epoch} (allowed "
        f"{math.floor(worst.allowed)}; progress reads aside)" + (f": {ops}" if ops else "")
    )
    if trained.timer.warned is not None and trained.timer.warned.active:
        detail += f"; CUDA sync warnings: {worst.warned}" + ("" if worst.epoch > 1 else " (reported only in epoch 1)")
    return worst.judged <= worst.allowed, detail, None


def expected_precision(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The precision training must use here, decided apart from device.amp_choice: bf16 only where the
    GPU has bf16 units (compute capability 8.0+), fp16 (with a gradient scaler) below; float32 off CUDA."""
    if device.type != "cuda":
        return None, f"{device.type}: mixed precision on CUDA only"
    major, minor = torch.cuda.get_device_capability(device)
    return (torch.bfloat16 if major >= 8 else torch.float16), f"compute capability {major}.{minor}"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def check_precision(device: torch.device, trained: list[Trained]):
    """amp_choice against the capability rule, and a gradient scaler in each run's last.pth exactly
    when it is fp16 (a disabled GradScaler saves an empty state)."""
    expected, why = expected_precision(device)
    chosen, _ = amp_choice(device, True)
    problems = []
    if chosen != expected:
        problems.append(f"training would use {_dtype_name(chosen)}, expected {_dtype_name(expected)} ({why})")
    for t in trained:
        if bool(t.checkpoint.get("scaler")) != (expected == torch.float16):
            problems.append(f"{t.run.name}: gradient scaler {'on' if t.checkpoint.get('scaler') else 'off'}")
    detail = f"{_dtype_name(expected)} ({why})"
    scaled = [t for t in trained if t.checkpoint.get("scaler")]
    if expected == torch.float16 and scaled:
        detail += "; gradient scaler on, skipped " + ", ".join(f"{t.skipped}/{t.steps} ({t.run.name})" for t in scaled)
    return not problems, "; ".join(problems) or detail, None


def parameter_names(arch: str) -> set[str]:
    """The state_dict keys that are parameters, not buffers (a model on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return {name for name, _ in architecture(arch).build().named_parameters()}


def check_frozen(trained: Trained, standin: Path, strategy: str, arch: str):
    """Frozen tensors (weights and BatchNorm buffers) bit-identical in model.pth and last.pth, whatever
    was stepped; every trained stage changed once the optimizer stepped at all. A fp16 gradient
    scaler skips the first steps (inf/nan gradients at scale 65536): if it skipped them all, nothing
    may have changed, which is checked instead."""
    from .rundir import RunDir
    from .training import checkpoint_model_state

    before = torch.load(standin, weights_only=True)
    last = checkpoint_model_state(RunDir(trained.run), trained.checkpoint)
    frozen_modules = architecture(arch).layout.frozen_modules(strategy)
    changed = [
        f"{key} ({name})"
        for name, state in (("model.pth", torch.load(trained.run / "model.pth", weights_only=True)), ("last.pth", last))
        for key in state
        if key.split(".")[0] in frozen_modules and not torch.equal(before[key], state[key])
    ]
    if changed:
        return False, f"{len(changed)} frozen tensors changed, e.g. {changed[0]}", None
    frozen = sum(key.split(".")[0] in frozen_modules for key in last)
    names = parameter_names(arch)
    params = [key for key in last if key in names and key.split(".")[0] not in frozen_modules]
    stages = list(dict.fromkeys(key.split(".")[0] for key in params))
    moved = {key.split(".")[0] for key in params if not torch.equal(before[key], last[key])}
    stepped, skipped = trained.steps - trained.skipped, trained.skipped
    held = f"{frozen} frozen tensors bit-identical" if frozen else "nothing frozen"
    if stepped <= 0:
        ok = not moved
        return (
            ok,
            f"{held}; the gradient scaler skipped all {skipped} steps"
            + (", and nothing trained changed" if ok else f", yet {sorted(moved)[0]} changed"),
            None,
        )
    unmoved = [stage for stage in stages if stage not in moved]
    note = f" ({skipped} skipped by the gradient scaler)" if skipped else ""
    if unmoved:
        return False, f"{held}; {', '.join(unmoved)} did not change in {stepped} optimizer steps{note}", None
    return True, f"{held}; every trained stage changed ({', '.join(stages)}) in {stepped} steps{note}", None


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


def missing(module: str) -> str | None:
    """The one line naming what to install when the optional `module` is absent, else None."""
    from .extras import check_installed

    try:
        check_installed(module)
    except FinetuneError as error:
        return str(error)
    return None


def check_calibration(run: Path):
    """run.json's temperature, finite and positive, and the reliability diagram beside it."""
    from .rundir import RunDir

    rundir = RunDir(run)
    calibration = rundir.info().get("calibration") or {}
    temperature = calibration.get("temperature")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return False, f"no usable temperature in run.json ({temperature!r})", None
    if not rundir.reliability.is_file():
        return False, "reliability.png missing", None
    return (
        True,
        f"temperature {temperature:.3f}, ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}",
        None,
    )


def check_heatmaps(run: Path, device: torch.device):
    """Grad-CAM on this device: the image's size, finite, and a different map for another class
    (backward passes through hooks on the device)."""
    import numpy as np
    from PIL import Image

    from .explain import explain_image
    from .predict import Predictor
    from .rundir import RunDir

    absent = missing("pytorch_grad_cam")
    if absent:
        raise Skip(absent)
    scan = RunDir(run).read_split()
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
    return not problems, "; ".join(problems) or f"Grad-CAM on {device.type}", None


def _export_reference(run: Path):
    from .predict import Predictor

    reference = Predictor.from_run(run, device="cpu")
    example = torch.randn(2, 3, reference.image_size, reference.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.model.float()(example.contiguous(memory_format=torch.channels_last)).numpy()
    return example, expected


def check_torchscript(run: Path):
    import numpy as np

    from .export import export

    example, expected = _export_reference(run)
    scripted = torch.jit.load(str(export(run, "torchscript")))
    with torch.inference_mode():
        error = float(np.abs(scripted(example).numpy() - expected).max())
    return error < 1e-3, f"max difference {error:.1e}", None


def check_onnx(run: Path):
    import numpy as np

    from .export import export

    absent = missing("onnx")
    if absent:
        raise Skip(absent)
    example, expected = _export_reference(run)
    onnx_path = export(run, "onnx")
    try:
        import onnxruntime
    except ImportError:
        return True, "exported (onnxruntime not installed: not run)", None
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    error = float(np.abs(session.run(None, {"image": example.numpy()})[0] - expected).max())
    return error < 1e-3, f"onnxruntime max difference {error:.1e}", None


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


@dataclass
class Setup:
    """What every training of one selftest shares: the device, the sample data, the stand-in weights."""

    device: torch.device
    arch: str
    image_size: int
    epochs: int
    compile_model: bool
    tmp: Path
    data: Path
    standin: Path

    @property
    def small_size(self) -> int:
        """The image size of the extra trainings (streaming, ResNet-50): on a CPU the smallest there is
        (layer4 at 1x1), to stay quick."""
        return self.image_size if self.device.type != "cpu" else min(self.image_size, 32)

    def config(self, name: str, **changes) -> TrainConfig:
        values: dict = dict(
            data=str(self.data),
            arch=self.arch,
            weights=str(self.standin),
            epochs=self.epochs,
            batch_size=16,
            image_size=self.image_size,
            device=str(self.device),
            compile=self.compile_model,
            runs_dir=str(self.tmp / "runs"),
            run_name=name,
            seed=0,
        )
        return TrainConfig(**{**values, **changes}).validate()


def strategy_checks(report: Report, setup: Setup, strategy: str) -> Trained | None:
    """One strategy trained with the device's settings, and what its run folder must hold."""
    cfg = setup.config(strategy, strategy=strategy)
    print(f"{strategy}:", flush=True)
    trained = report.run(f"{strategy}: training", check_training, cfg, setup.device)
    if not isinstance(trained, Trained):
        return None
    run = trained.run
    report.run(f"{strategy}: syncs per step", check_syncs, trained)
    report.run(f"{strategy}: frozen layers", check_frozen, trained, setup.standin, strategy, setup.arch)
    report.run(f"{strategy}: cached = full model", check_cached_logits, run, cfg, setup.device)
    report.run(f"{strategy}: checkpoints on CPU", check_checkpoints, run)
    report.run(f"{strategy}: predict = evaluate", check_predict_agrees, run, setup.device)
    if strategy == "last":
        report.run("last: TorchScript = PyTorch", check_torchscript, run)
        report.run("last: ONNX = PyTorch", check_onnx, run)
        report.run("last: calibration", check_calibration, run)
        report.run("last: heatmaps", check_heatmaps, run, setup.device)
    return trained


def check_resume(first: Trained, device: torch.device):
    """The stopped streaming run resumed from its last.pth on the device, to its last epoch."""
    from .training import resume_config

    if "optimizer" not in first.checkpoint:
        return False, "the stopped run's last.pth holds no optimizer state", None
    cfg = resume_config(first.run, device=str(device))
    ok, detail, resumed = check_training(cfg, device, resume=first.run)
    problems = [] if ok else [detail]
    history = [record["epoch"] for record in json.loads((first.run / "run.json").read_text()).get("history", [])]
    if history != list(range(1, cfg.epochs + 1)):
        problems.append(f"run.json's history holds epochs {history}")
    if resumed.timer.start.get("start_epoch") != first.checkpoint["epoch"] + 1:
        problems.append(f"started at epoch {resumed.timer.start.get('start_epoch')}")
    pipeline = str(resumed.timer.start.get("pipeline", ""))
    if "stream" not in pipeline.lower():
        problems.append(f"not streamed: {pipeline}")
    summary = f"epochs {first.checkpoint['epoch'] + 1}-{cfg.epochs} with the optimizer, schedule and scaler of last.pth"
    return not problems, "; ".join(problems) or f"{summary}; {detail}", resumed


def streaming_checks(report: Report, setup: Setup) -> list[Trained]:
    """No cache (the frozen layers run every batch): stopped after epoch 1 (a full last.pth), resumed."""
    print(f"streaming (cache off), {setup.small_size} px, stopped after epoch 1, resumed from last.pth:", flush=True)
    cfg = setup.config("stream", strategy="last", cache="off", epochs=2, image_size=setup.small_size)
    first = report.run("stream: training, stopped after epoch 1", check_training, cfg, setup.device, None, 1)
    if not isinstance(first, Trained):
        return []
    resumed = report.run("stream: resume from last.pth", check_resume, first, setup.device)
    if not isinstance(resumed, Trained):
        return [first]
    report.run("stream: syncs per step", check_syncs, resumed)
    report.run("stream: frozen layers", check_frozen, resumed, setup.standin, "last", setup.arch)
    report.run("stream: JPEGs decoded on the GPU", check_gpu_decode, first, setup.data)
    return [first, resumed]


def check_gpu_decode(trained: Trained, data: Path):
    """On CUDA the streamed run decoded its JPEGs with nvJPEG (jpeg_decode auto), and the device path
    (nvJPEG, orientation, crop, resize, flip) gives libjpeg's crops on the CPU within a few levels for
    the same crop boxes: the decoders' IDCT and chroma upsampling round differently."""
    from .decode import EncodedImages, collate_encoded, decode_batch

    device = torch.device(trained.cfg.device)
    if device.type != "cuda":
        raise Skip("nvJPEG needs CUDA")
    pipeline = str(trained.timer.start.get("pipeline", ""))
    if "nvJPEG" not in pipeline:
        return False, f"not decoded on the GPU: {pipeline}", None
    files = sorted(data.rglob("*.jpg"))[:GPU_DECODE_SAMPLE]
    images = EncodedImages(data, [(f.relative_to(data).as_posix(), 0) for f in files], trained.cfg.image_size)
    batch, _ = collate_encoded([images[k] for k in range(len(files))])
    on_gpu = decode_batch(batch, trained.cfg.image_size, device).cpu().float()
    on_cpu = decode_batch(batch, trained.cfg.image_size, torch.device("cpu")).float()
    worst = float((on_gpu - on_cpu).abs().mean((1, 2, 3)).max())
    detail = (
        f"{len(files)} sample JPEGs cropped on the GPU: mean difference from libjpeg's crops at most "
        f"{worst:.2f} levels of 255"
    )
    return worst <= GPU_DECODE_TOLERANCE, detail, None


def resnet50_checks(report: Report, setup: Setup) -> list[Trained]:
    """ResNet-50's cache (1024-channel layer3 features, bottleneck blocks), when another arch is tested."""
    if setup.arch == "resnet50":
        return []  # the strategies above used it
    size = setup.small_size
    print(f"resnet50, strategy last, {size} px:", flush=True)
    # one cached view: the views are the same code as for the other architectures
    cfg = setup.config("resnet50", arch="resnet50", strategy="last", weights="none", image_size=size, cache_views=1)
    trained = report.run("resnet50 last: training", check_training, cfg, setup.device)
    if not isinstance(trained, Trained):
        return []
    report.run("resnet50 last: syncs per step", check_syncs, trained)
    report.run("resnet50 last: cached = full model", check_cached_logits, trained.run, cfg, setup.device)
    return [trained]


def speed_window(setup: Setup) -> tuple[Window, int]:
    """A GPU's steady state: strategy all for two epochs of SPEED_STEPS steps, timed in the second
    (the first autotunes cuDNN for every batch shape), without counting syncs."""
    from .sample import SAMPLE_CLASSES, make_sample_dataset
    from .training import train

    images = (SPEED_STEPS + 1) * SPEED_BATCH / (1 - TrainConfig.val_fraction)
    data = make_sample_dataset(setup.tmp / "speed-data", per_class=math.ceil(images / len(SAMPLE_CLASSES)), seed=1)
    cfg = setup.config("speed", data=str(data), strategy="all", batch_size=SPEED_BATCH, epochs=2)
    timer = StepTimer()
    train(cfg, on_event=timer)
    if not timer.windows:
        raise RuntimeError("no steady-state steps were timed")
    return timer.windows[-1], SPEED_BATCH


def check_speed(setup: Setup, trained_all: Trained | None):
    """images/s of steady-state steps of strategy all: a run of its own on a GPU, the `all`
    training's few steps on a CPU (with its syncs counted)."""
    if setup.device.type == "cpu":
        if trained_all is None or not trained_all.timer.windows:
            return False, "the all training gave no steady-state steps to time", None
        window, batch = trained_all.timer.windows[-1], trained_all.cfg.batch_size
    else:
        window, batch = speed_window(setup)
    precision = _dtype_name(amp_choice(setup.device, True)[0])
    return (
        True,
        (
            f"{window.images_per_s:,.0f} images/s over {window.steps} steady-state steps (strategy all, "
            f"{setup.arch}, batch {batch}, {setup.image_size} px, {precision})"
        ),
        None,
    )


def prepare(tmp: Path, device: torch.device, arch: str, image_size: int, epochs: int, compile_model: bool) -> Setup:
    from .sample import SAMPLE_CLASSES, make_sample_dataset

    data = make_sample_dataset(tmp / "data", per_class=24, seed=0)
    standin = standin_weights(arch, tmp / "standin.pth", classes=len(SAMPLE_CLASSES))
    print(
        f"data: the sample dataset (3 classes, 72 images) in {data}; image size {image_size}; {epochs} epoch(s) "
        f"per strategy",
        flush=True,
    )
    return Setup(device, arch, image_size, epochs, compile_model, tmp, data, standin)


def run_selftest(
    device_name: str = "auto",
    arch: str = TrainConfig.arch,
    nproc: int = 0,
    image_size: int | None = None,
    epochs: int = 1,
    compile_model: bool = False,
    workdir: str | Path | None = None,
) -> Report:
    device = resolve_device(device_name)
    # A 2-core CPU must finish in a few minutes; a GPU gets the real input size.
    image_size = image_size or (224 if device.type != "cpu" else 96)
    for line in environment(device, compile_model):
        print(line)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="finetune-selftest-", dir=workdir) as tmp_name:
        setup = prepare(Path(tmp_name), device, arch, image_size, epochs, compile_model)
        by_strategy = {strategy: strategy_checks(report, setup, strategy) for strategy in STRATEGIES}
        trained = [t for t in by_strategy.values() if t is not None]
        trained += streaming_checks(report, setup) + resnet50_checks(report, setup)
        print(f"{device.type}:", flush=True)
        report.run("precision", check_precision, device, trained)
        report.run("speed", check_speed, setup, by_strategy["all"])
        if nproc > 1:
            print(f"torchrun with {nproc} processes:", flush=True)
            report.run(
                f"DDP x{nproc}", check_torchrun, setup.data, setup.tmp / "ddp-runs", nproc, device, arch, image_size
            )
    return report


def main(args) -> int:
    architecture(args.arch)  # an unknown name: the one line naming the choices
    started = time.perf_counter()
    report = run_selftest(args.device, args.arch, args.nproc, args.image_size, args.epochs, args.compile)
    print()
    print(report.table())
    skipped = sum(c.skipped for c in report.checks)
    verdict = "all checks passed" if report.passed else f"{sum(not c.passed for c in report.checks)} check(s) FAILED"
    print(f"\n{verdict}{f' ({skipped} skipped)' if skipped else ''} in {time.perf_counter() - started:.0f} s")
    return 0 if report.passed else 1

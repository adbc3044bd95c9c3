"""Feeder bench: how fast each input pipeline delivers training batches, with a no-op model.

    python bench/feeder.py --data DIR [--batches N] [--image-size S] [--batch-size B] [--workers W]
                           [--arch resnet34] [--feature-strategy last] [--device auto] [--json OUT]
    python bench/feeder.py --generate phone|imagenet --count K [--data DIR] ...   (a synthetic dataset first)

Four pipelines, with the same batch size and worker count (each loader may use fewer workers where its
pipeline says so: the caches index memory in the main process on the CPU):

  classic    torchvision.datasets.ImageFolder (PIL, full decode) with RandomResizedCrop,
             RandomHorizontalFlip, ToTensor and Normalize (float32) in DataLoader workers, with the
             loader options training uses (pinned memory on CUDA, persistent workers, prefetch 4);
  streaming  finetune's streamed images: cache "off", strategy "all" (on CUDA, with auto, JPEGs are
             decoded there by nvJPEG; elsewhere by PIL in the workers);
  streaming_device  the same with --jpeg-decode device on CUDA (nvJPEG) and workers elsewhere: the
             other of the two decoders, side by side (on a CPU "device" means libjpeg in the main
             process, not a speed-up: it shows the cost of the path);
  pixels     finetune's decoded-pixel cache: cache "auto", strategy "all";
  features   finetune's frozen-feature cache: cache "auto", strategy --feature-strategy (weights none,
             a real frozen ResNet front, built once).

Ours are built by finetune.training.setup_session, the function training calls (cache.build_pipeline,
then make_loader), so the bench measures whatever those build. Timed per pipeline: moving each batch to
the device and the pipeline's prepare_train (the device-side conversion and normalisation), nothing
else (no model); the first `workers` batches (worker start-up) are not timed, and the clock stops after
a device synchronisation. A cache's build is timed separately (the epochs after it are what is timed).

Reported per pipeline: images/s, images/s per usable CPU core (finetune.device.usable_cores), and bytes
per image crossing processes (the inputs tensor of each batch as it leaves the DataLoader, numel x
element size / images in the batch: what workers send through shared memory and what crosses the bus;
labels, 8 bytes per image, not counted). Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: finetune is importable

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from finetune.config import TrainConfig  # noqa: E402
from finetune.data import IMAGENET_MEAN, IMAGENET_STD, DatasetScan, scan_dataset  # noqa: E402
from finetune.device import Distributed, describe_device, non_blocking, resolve_device, usable_cores  # noqa: E402
from finetune.training import to_device  # noqa: E402

PIPELINES = ("classic", "streaming", "streaming_device", "pixels", "features")
SIZES = {"phone": (4000, 3000), "imagenet": (500, 375)}  # a 12-megapixel phone photo; ImageNet's typical photo
CLASSES = ("circles", "squares")


# ---------------------------------------------------------------------------------------------
# A synthetic dataset


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int], shape: str) -> Image.Image:
    """A smooth colour gradient, one large shape (the class) and sensor-like noise: JPEG sizes like a
    photo's (about 3.5 MB at 4000x3000, 65 KB at 500x375, quality 90), unlike a flat test image."""
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    r = int(min(w, h) * rng.uniform(0.15, 0.3))
    cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if shape == "circles" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate_dataset(out: Path, kind: str, count: int, size: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """out/<class>/<class>_NNNN.jpg: `count` JPEGs over two classes, `size` (w, h) or the kind's size."""
    size = size or SIZES[kind]
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the synthetic dataset goes into a new or empty folder")
    jobs = [(i, CLASSES[i % len(CLASSES)]) for i in range(count)]
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)

    def write(job: tuple[int, str]) -> None:
        i, name = job
        rng = np.random.default_rng([seed, i])
        synthetic_photo(rng, size, name).save(out / name / f"{name}_{i:04d}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:  # numpy and PIL release the GIL
        list(pool.map(write, jobs))
    return out


def dataset_info(scan: DatasetScan) -> dict:
    """What the photos are: count, the most common size, mean file size."""
    root = Path(scan.root)
    files = [root / rel for rel, _ in scan.train + scan.val]
    sample = files[:: max(1, len(files) // 20)]
    sizes = []
    for path in sample:
        with Image.open(path) as image:
            sizes.append(image.size)
    w, h = max(set(sizes), key=sizes.count)
    return {
        "images": len(files),
        "train_images": len(scan.train),
        "classes": len(scan.classes),
        "typical_size": f"{w}x{h}",
        "mean_file_bytes": round(sum(p.stat().st_size for p in files) / max(1, len(files))),
    }


# ---------------------------------------------------------------------------------------------
# Timing a loader


def tensors_of(inputs) -> list[torch.Tensor]:
    """The tensors a batch's inputs are made of: one tensor, or a (named) tuple of them (cache.CropBatch)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return [t for part in inputs for t in tensors_of(part)]


def batch_bytes(inputs, images: int) -> float:
    """Bytes per image of a batch's inputs as they leave the loader (every tensor they are made of)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(inputs)) / max(1, images)


def describe(inputs) -> str:
    """dtype [shape] (and the device when not the CPU), for each tensor of the inputs."""

    def one(t: torch.Tensor) -> str:
        where = "" if t.device.type == "cpu" else f" on {t.device}"
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}{where}"

    if isinstance(inputs, torch.Tensor):
        return one(inputs)
    fields = getattr(inputs, "_fields", None)
    if fields is None:  # a plain list or tuple, e.g. one encoded image each: the first stands for them
        return f"{len(inputs)} x {describe(inputs[0])}" if len(inputs) else "nothing"
    parts = ", ".join(f"{name} {describe(part)}" for name, part in zip(fields, inputs, strict=True))
    return f"{type(inputs).__name__}({parts})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def endless(loader, set_epoch: Callable[[int], None]) -> Iterator:
    """The loader's batches epoch after epoch, each epoch announced as training does."""
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    epoch = 1
    while True:
        set_epoch(epoch)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(
    loader,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batches: int,
    warmup: int,
    set_epoch: Callable[[int], None] = lambda epoch: None,
) -> dict:
    """`warmup` untimed batches, then `batches` timed ones: to the device, prepare_train, nothing else."""
    copy_async = non_blocking(device)
    batches_of = endless(loader, set_epoch)
    per_image = []
    for _ in range(max(1, warmup)):
        inputs, targets = next(batches_of)
        per_image.append(batch_bytes(inputs, targets.numel()))
    synchronize(device)
    images, started = 0, time.perf_counter()
    prepared = None
    for _ in range(batches):
        inputs, targets = next(batches_of)
        per_image.append(batch_bytes(inputs, targets.numel()))
        prepared = prepare(to_device(inputs, device, copy_async))
        targets = targets.to(device, non_blocking=copy_async)
        images += targets.numel()
    synchronize(device)
    seconds = time.perf_counter() - started
    if getattr(loader, "images_crossed", 0):  # decode.DeviceDecoded: JPEG bytes crossed, not its pixels
        per_image = [loader.bytes_crossed / loader.images_crossed]
    described = describe(inputs)  # the last timed batch, as it left the loader (prepared: as it went on)
    del batches_of  # ends the loader's iteration (its workers stop with the loader)
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "images_per_s_per_core": images / seconds / usable_cores(),
        "bytes_per_image": sum(per_image) / len(per_image),
        "loader_batch": described,
        "device_batch": None if prepared is None else describe(prepared),
    }


# ---------------------------------------------------------------------------------------------
# The pipelines


def classic(cfg: TrainConfig, scan: DatasetScan, device: torch.device, batches: int) -> dict:
    """torchvision's ImageFolder with the classic float32 transforms, in DataLoader workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from finetune.device import pin_memory

    folder = Path(scan.root) / scan.split_dirs.get("train", "")
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(cfg.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    workers = cfg.workers or 0
    loader = DataLoader(
        datasets.ImageFolder(str(folder), transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin_memory(device),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    result = time_loader(loader, lambda images: images, device, batches, max(1, workers))
    return dict(result, workers=workers, pipeline="ImageFolder + PIL + float32 transforms", build_s=None)


def ours(cfg: TrainConfig, scan: DatasetScan, device: torch.device, batches: int, log: Callable[[str], None]) -> dict:
    """A finetune pipeline as training builds it (setup_session), timed without the model."""
    from finetune.events import Event
    from finetune.model import build_model
    from finetune.rundir import RunDir
    from finetune.training import setup_session

    def emit(event: Event) -> None:
        if event["type"] == "log":
            log(event["message"])

    model = build_model(cfg.arch, len(scan.classes), cfg.weights)
    with tempfile.TemporaryDirectory(prefix="feeder-run-") as run:  # setup_session writes nothing there
        session = setup_session(cfg, Distributed(), device, RunDir(run), scan, model, emit)
        pipeline = session.pipeline
        result = time_loader(
            session.train_loader,
            pipeline.prepare_train,
            device,
            batches,
            max(1, pipeline.workers),
            pipeline.set_epoch,
        )
    return dict(
        result,
        workers=pipeline.workers,
        pipeline=pipeline.description,
        kind=pipeline.kind,
        build_s=session.pipeline_seconds if pipeline.kind != "stream" else None,
    )


OURS = {  # name: (strategy, cache, the pipeline kind expected)
    "streaming": ("all", "off", "stream"),
    "streaming_device": ("all", "off", "stream"),
    "pixels": ("all", "auto", "pixels"),
    "features": (None, "auto", "features"),  # None: --feature-strategy
}


def run_pipeline(name: str, args: argparse.Namespace, scan: DatasetScan, device: torch.device) -> dict:
    cfg = TrainConfig(
        data=args.data,
        arch=args.arch,
        weights="none",
        strategy="all",
        batch_size=args.batch_size,
        image_size=args.image_size,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
    )
    if name == "classic":
        return classic(cfg, scan, device, args.batches)
    strategy, cache_mode, expected = OURS[name]
    cfg = dataclasses.replace(cfg, strategy=strategy or args.feature_strategy, cache=cache_mode)
    if name == "streaming_device":  # the decoder auto does not pick: nvJPEG's rival is PIL, and back
        cfg.jpeg_decode = "workers" if device.type == "cuda" else "device"
    cfg.validate()
    result = ours(cfg, scan, device, args.batches, lambda message: print(f"  [{name}] {message}", flush=True))
    if result["kind"] != expected:  # a cache that did not fit streams instead: say so, do not hide it
        result["fell_back"] = f"expected the {expected} pipeline, got {result['kind']}"
    return result


# ---------------------------------------------------------------------------------------------
# The report


def summary(results: dict[str, dict], args: argparse.Namespace, data: dict, device: torch.device) -> dict:
    """The flat keys (<pipeline>_images_per_s, ..._per_core, ..._bytes_per_image, ..._build_s) and the rest."""
    sys.path.insert(0, str(REPO / "bench"))
    from benchmark import machine

    out: dict = {}
    for name, r in results.items():
        out[f"{name}_images_per_s"] = r["images_per_s"]
        out[f"{name}_images_per_s_per_core"] = r["images_per_s_per_core"]
        out[f"{name}_bytes_per_image"] = r["bytes_per_image"]
        if name in ("pixels", "features"):
            out[f"{name}_build_s"] = r["build_s"]
    if "classic" in results and "streaming" in results:
        out["streaming_vs_classic"] = results["streaming"]["images_per_s"] / results["classic"]["images_per_s"]
    out["uint8_bytes_per_image"] = 3 * args.image_size * args.image_size
    out["settings"] = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": args.image_size,
        "timed_batches": args.batches,
        "arch": args.arch,
        "feature_strategy": args.feature_strategy,
    }
    out.update(data=data, cores=usable_cores(), device=describe_device(device), machine=machine(), code=code_state())
    out["timed"] = (
        "per pipeline: batches to the device + the pipeline's prepare_train, no model; the first `workers` "
        "batches and any cache build are not timed (cache builds: <name>_build_s)"
    )
    out["pipelines"] = results
    return out


def code_state() -> dict:
    """The commit measured, and the engine files changed since (numbers from a work in progress say so)."""
    import subprocess

    def git(*command: str) -> str:
        try:
            done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "finetune")  # "XY path" lines: the status, then the path
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "modified": [line[3:] for line in changed.splitlines()],
    }


def markdown(report: dict) -> str:
    data, s = report["data"], report["settings"]
    lines = [
        f"Feeder bench: {data['images']} JPEGs of {data['typical_size']} "
        f"(mean {data['mean_file_bytes'] / 1e3:,.0f} KB), crop {s['image_size']}, batch {s['batch_size']}, "
        f"{s['workers']} workers, {s['timed_batches']} timed batches; "
        f"{report['cores']} usable cores, {report['device']}"
        + (
            f"; load average {report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f}."
            if report.get("load_average")
            else "."
        ),
        "",
        "| pipeline | images/s | images/s per core | bytes/image leaving the loader | batch (loader -> device) | "
        "loader workers | cache build (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["pipelines"].items():
        build = "-" if r.get("build_s") is None else f"{r['build_s']:.1f}"
        note = f" ({r['fell_back']})" if r.get("fell_back") else ""
        lines.append(
            f"| {name}{note} | {r['images_per_s']:.1f} | {r['images_per_s_per_core']:.1f} | "
            f"{r['bytes_per_image']:,.0f} | {r['loader_batch']} -> {r['device_batch']} | {r['workers']} | {build} |"
        )
    code = report.get("code") or {}
    if code.get("commit"):
        changed = ", ".join(code["modified"])
        lines += [
            "",
            f"finetune at {code['commit']}" + (f", with uncommitted changes to {changed}." if changed else "."),
        ]
    if "streaming_vs_classic" in report:
        lines += ["", f"Streaming / classic: **{report['streaming_vs_classic']:.2f}x** images/s (same cores)."]
    lines.append(f"uint8 at {s['image_size']} px: {report['uint8_bytes_per_image']:,} bytes per image.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a folder of class folders (with --generate: where to write it)")
    parser.add_argument("--generate", choices=sorted(SIZES), help="write a synthetic dataset of JPEGs first")
    parser.add_argument("--count", type=int, default=64, help="images to generate (two classes)")
    parser.add_argument("--generate-size", help="WxH instead of the kind's size (tests)")
    parser.add_argument("--generate-only", action="store_true", help="write the dataset, print its path, stop")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per pipeline")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: finetune's default)")
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--feature-strategy", choices=("head", "last"), default="last")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not args.data and not args.generate:
        parser.error("--data DIR (or --generate KIND) is required")
    unknown = set(args.pipelines.split(",")) - set(PIPELINES)
    if unknown:
        parser.error(f"unknown pipelines {sorted(unknown)}: choose from {', '.join(PIPELINES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = None
    if args.generate:
        size = tuple(int(v) for v in args.generate_size.split("x")) if args.generate_size else None
        if not args.data:
            temporary = tempfile.mkdtemp(prefix=f"feeder-{args.generate}-")
            args.data = temporary
        started = time.perf_counter()
        generate_dataset(Path(args.data), args.generate, args.count, size, args.seed)  # type: ignore[arg-type]
        print(f"generated {args.count} {args.generate} JPEGs in {args.data} ({time.perf_counter() - started:.0f} s)")
        if args.generate_only:
            return 0
    try:
        return bench(args)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def bench(args: argparse.Namespace) -> int:
    from finetune.device import default_workers

    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = default_workers(device)
    scan = scan_dataset(args.data, val_fraction=0.1, seed=args.seed, check=False)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    data = dataset_info(scan)
    results = {}
    for name in args.pipelines.split(","):
        print(f"{name} ...", flush=True)
        results[name] = run_pipeline(name, args, scan, device)
        gc.collect()  # the loader and its persistent workers go before the next pipeline is timed
        r = results[name]
        print(f"  {r['images_per_s']:.1f} images/s, {r['bytes_per_image']:,.0f} bytes/image ({r['loader_batch']})")
    report = summary(results, args, data, device)
    # other work on the machine skews every number: say how busy it was (1-minute load, before and after)
    report["load_average"] = [load_before[0], os.getloadavg()[0]] if load_before else None
    table = markdown(report)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: finetune's engine against a classic fine-tuning loop (bench/baseline.py).

    python bench/benchmark.py [--data DIR] [--archs resnet50] [--strategies head,last,all]
                              [--epochs N] [--device cpu] [--weights none]

Every training run (ours or the baseline) runs in a fresh subprocess so its peak RSS is its own.
Prints a markdown table and writes JSON + markdown under bench/results/ (git-ignored). Epochs
default per strategy: 10 for head and last, 2 for all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: finetune is importable
RESULTS = REPO / "bench" / "results"
DEFAULT_EPOCHS = {"head": 10, "last": 10, "all": 2}


def peak_rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_workers_mb": round(children, 1)}


# ---------------------------------------------------------------------------------------------
# What a subprocess runs


def worker(kind: str, cfg_values: dict) -> dict:
    import torch

    from finetune.config import TrainConfig

    cfg = TrainConfig(**cfg_values) if kind in ("baseline", "ours") else None
    if kind == "baseline":
        sys.path.insert(0, str(REPO / "bench"))
        from baseline import run_baseline

        result = run_baseline(cfg)
    elif kind == "ours":
        from finetune.train import train

        events = []
        started = time.perf_counter()
        marks = {}

        def on_event(event):
            if event["type"] == "epoch" and "first_epoch_s" not in marks:
                marks["first_epoch_s"] = time.perf_counter() - started
            if event["type"] in ("start", "epoch", "end"):
                events.append(event)

        run = train(cfg, on_event=on_event)
        seconds = time.perf_counter() - started
        info = json.loads((run / "run.json").read_text())
        start = next(e for e in events if e["type"] == "start")
        result = {"seconds": seconds, "first_epoch_s": marks.get("first_epoch_s"), "best_val_acc": info["best"]["val_acc"],
                  "val_acc_history": [h["val_acc"] for h in info["history"]], "train_images": start["train_images"],
                  "val_images": start["val_images"], "pipeline": start["pipeline"], "run_dir": str(run),
                  "status": info["status"], "final_val_accuracy": (info.get("summary") or {}).get("accuracy")}
    elif kind == "predict":
        result = predict_worker(cfg_values["run_dir"], cfg_values["device"], cfg_values["images"])
    else:
        raise SystemExit(f"unknown worker kind {kind}")
    result.update(peak_rss_mb())
    result["torch_threads"] = torch.get_num_threads()
    return result


def predict_worker(run_dir: str, device: str, images: list[str]) -> dict:
    from finetune.predict import Predictor

    predictor = Predictor.from_run(run_dir, device=device)
    for path in images[:3]:  # warm up
        predictor.predict_image(path)
    latencies = []
    for path in images[:40]:
        t = time.perf_counter()
        predictor.predict_image(path)
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    t = time.perf_counter()
    predictions = predictor.predict_paths(images)
    folder_s = time.perf_counter() - t
    return {"latency_p50_ms": statistics.median(latencies),
            "latency_p95_ms": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "folder_images": len(images), "folder_seconds": folder_s,
            "folder_images_per_s": len(images) / folder_s, "folder_errors": sum(p.error is not None for p in predictions)}


def run_subprocess(kind: str, values: dict, timeout: float | None = None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        out_path = out.name
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_config", json.dumps(values),
               "--_out", out_path]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(command, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{completed.stderr[-3000:]}")
    result = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    return result


# ---------------------------------------------------------------------------------------------
# The table


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / 1024**2:.0f} GiB RAM"
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {cores} cores{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.platform()}")


def markdown(results: list[dict], predicts: list[dict]) -> str:
    lines = ["| arch | strategy | epochs | time base / ours (s) | speed-up | images/s base / ours | "
             "first epoch base / ours (s) | peak RSS base / ours (MB) | best val acc base / ours | ours: pipeline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, o = r["baseline"], r["ours"]
        lines.append(
            f"| {r['arch']} | {r['strategy']} | {r['epochs']} | {b['seconds']:.1f} / {o['seconds']:.1f} | "
            f"**{b['seconds'] / o['seconds']:.2f}x** | {b['images_per_s']:.1f} / {o['images_per_s']:.1f} | "
            f"{b['first_epoch_s']:.1f} / {o['first_epoch_s']:.1f} | {b['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} | "
            f"{b['best_val_acc']:.3f} / {o['best_val_acc']:.3f} | {o['pipeline'].split(' (')[0]} |")
    if predicts:
        lines += ["", "| arch | single-image predict p50 / p95 (ms) | folder predict (images/s) |", "|---|---|---|"]
        for p in predicts:
            lines.append(f"| {p['arch']} | {p['latency_p50_ms']:.1f} / {p['latency_p95_ms']:.1f} | "
                         f"{p['folder_images_per_s']:.1f} ({p['folder_images']} images) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every strategy (default: head 10, "
                        "last 10, all 2)")
    parser.add_argument("--archs", default="resnet50")
    parser.add_argument("--strategies", default="head,last,all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="none", help="imagenet, none or a state_dict path (none: offline)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_config", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        result = worker(args._worker, json.loads(args._config))
        Path(args._out).write_text(json.dumps(result))
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = RESULTS / "runs" / stamp
    results, predicts = [], []
    started = time.time()
    print(f"machine: {machine()}", flush=True)
    for arch in args.archs.split(","):
        for strategy in args.strategies.split(","):
            epochs = args.epochs or DEFAULT_EPOCHS[strategy]
            values = dict(data=args.data, arch=arch, strategy=strategy, weights=args.weights, epochs=epochs,
                          batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
                          device=args.device, runs_dir=str(runs_dir), run_name=f"{arch}-{strategy}")
            row = {"arch": arch, "strategy": strategy, "epochs": epochs}
            for kind in ("baseline", "ours"):
                print(f"[{time.time() - started:7.0f}s] {arch} {strategy} {kind} ({epochs} epochs) ...", flush=True)
                result = run_subprocess(kind, values)
                result["images_per_s"] = result["train_images"] * epochs / result["seconds"]
                row[kind] = result
                print(f"    {result['seconds']:.1f}s, best val acc {result['best_val_acc']:.3f}, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
            row["speedup"] = row["baseline"]["seconds"] / row["ours"]["seconds"]
            results.append(row)
            partial = {"machine": machine(), "args": vars(args), "results": results, "predict": predicts}
            (RESULTS / f"benchmark-{stamp}.json").write_text(json.dumps(partial, indent=2))
        if not args.skip_predict and results:
            run_dir = next(r["ours"]["run_dir"] for r in results if r["arch"] == arch)
            from finetune.data import scan_dataset

            scan = scan_dataset(args.data, check=False)
            images = [str(Path(scan.root) / rel) for rel, _ in scan.val]
            print(f"[{time.time() - started:7.0f}s] {arch} predict ...", flush=True)
            p = run_subprocess("predict", {"run_dir": run_dir, "device": args.device, "images": images})
            p["arch"] = arch
            predicts.append(p)
        partial = {"machine": machine(), "args": vars(args), "results": results, "predict": predicts}
        (RESULTS / f"benchmark-{stamp}.json").write_text(json.dumps(partial, indent=2))

    table = markdown(results, predicts)
    print()
    print(table)
    (RESULTS / f"benchmark-{stamp}.md").write_text(f"Machine: {machine()}\n\n{table}\n")
    print(f"\nwrote {RESULTS / f'benchmark-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: finetune's engine against a classic fine-tuning loop (bench/baseline.py).

    python bench/benchmark.py [--data DIR] [--archs resnet50] [--strategies head,last,all]
                              [--epochs N] [--device cpu] [--weights none] [--image-size 224]
                              [--no-like-for-like]

The baseline runs twice per arch and strategy:
  classic        the classic script: float32, NCHW layout;
  like-for-like  the same loop at the precision and memory layout finetune uses on this device
                 (autocast with finetune's dtype, bf16 or fp16 + GradScaler on CUDA, none on the CPU;
                 channels_last on CUDA and x86 CPUs), so the speed-up it gives is the engine's own;
and ours is finetune as shipped. --no-like-for-like skips the second baseline run; it is skipped
anyway where it would be the classic run again (e.g. on Apple MPS: fp32 and NCHW there).

Every training run runs in a fresh subprocess so its peak RSS is its own; on CUDA each also reports
its peak GPU memory (torch.cuda.max_memory_allocated, reset at its start). Prints a markdown table
and writes JSON (every field of every run) + markdown under bench/results/ (git-ignored). Epochs
default per strategy: 10 for head and last, 2 for all.

Timed alike: every run's "seconds" spans its start (scan, setup, any cache) to the end of its last
epoch (training and a validation pass each epoch). Ours' final evaluation and calibration, which the
baseline does not do, are left out of it (reported as final_evaluation_s; total_s has everything).
Both set cudnn.benchmark on CUDA.
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
    """One run in this process: "baseline" (cfg_values may hold baseline_options: amp, channels_last),
    "ours" or "predict". Adds peak RSS, torch threads and peak_gpu_mb (None off CUDA) to its result."""
    import torch

    from finetune.config import TrainConfig
    from finetune.device import amp_choice, channels_last_for, resolve_device

    cfg_values = dict(cfg_values)
    baseline_options = cfg_values.pop("baseline_options", None) or {}
    cfg = TrainConfig(**cfg_values) if kind in ("baseline", "ours") else None
    device = resolve_device(cfg.device if cfg else cfg_values.get("device", "auto"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "baseline":
        sys.path.insert(0, str(REPO / "bench"))
        from baseline import run_baseline

        result = run_baseline(
            cfg,
            amp=bool(baseline_options.get("amp", False)),
            channels_last=bool(baseline_options.get("channels_last", False)),
        )
    elif kind == "ours":
        from finetune.training import train

        events = []
        started = time.perf_counter()
        marks = {}

        def on_event(event):
            if event["type"] == "epoch" and "first_epoch_s" not in marks:
                marks["first_epoch_s"] = time.perf_counter() - started
            if event["type"] in ("start", "epoch", "end"):
                events.append(event)

        run = train(cfg, on_event=on_event)
        total = time.perf_counter() - started
        info = json.loads((run / "run.json").read_text())
        start = next(e for e in events if e["type"] == "start")
        # timed as the baseline is: to the end of the last epoch; the final evaluation and calibration,
        # which the baseline does not do, are reported apart
        evaluation = info["stages"]["evaluation"]
        result = {
            "seconds": total - evaluation,
            "timed": TIMED,
            "final_evaluation_s": evaluation,
            "total_s": total,
            "first_epoch_s": marks.get("first_epoch_s"),
            "best_val_acc": info["best"]["val_acc"],
            "val_acc_history": [h["val_acc"] for h in info["history"]],
            "train_images": start["train_images"],
            "val_images": start["val_images"],
            "pipeline": start["pipeline"],
            "run_dir": str(run),
            "status": info["status"],
            "final_val_accuracy": (info.get("summary") or {}).get("accuracy"),
        }
        amp_dtype, amp_reason = amp_choice(device, cfg.amp)  # what train chose (the same helpers)
        result.update(
            precision=precision_name(amp_dtype),
            amp_reason=amp_reason,
            grad_scaler=amp_dtype == torch.float16,
            memory_layout="channels_last" if channels_last_for(device, cfg.channels_last) else "NCHW",
            device=str(device),
        )
    elif kind == "predict":
        result = predict_worker(cfg_values["run_dir"], cfg_values["device"], cfg_values["images"])
    else:
        raise SystemExit(f"unknown worker kind {kind}")
    result.update(peak_rss_mb())
    result["torch_threads"] = torch.get_num_threads()
    result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if on_cuda else None
    return result


# the span both runs are timed over ("seconds"): the same for the baseline (bench/baseline.py)
TIMED = "start to the end of the last epoch (scan, setup, any cache, epochs: training + validation)"


def precision_name(amp_dtype) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))


CLASSIC = {"amp": False, "channels_last": False}


def like_for_like_options(device_name: str, amp: bool = True, channels_last: bool = True) -> dict | None:
    """The baseline options that match ours (TrainConfig's amp and channels_last) on this device, or
    None where they would change nothing (no autocast and NCHW there too: the classic run again)."""
    from finetune.device import amp_dtype_for, channels_last_for, resolve_device

    device = resolve_device(device_name)
    if amp_dtype_for(device, amp) is None and not channels_last_for(device, channels_last):
        return None
    return {"amp": amp, "channels_last": channels_last}


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
    return {
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "folder_images": len(images),
        "folder_seconds": folder_s,
        "folder_images_per_s": len(images) / folder_s,
        "folder_errors": sum(p.error is not None for p in predictions),
    }


def run_subprocess(kind: str, values: dict, timeout: float | None = None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        out_path = out.name
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        kind,
        "--_config",
        json.dumps(values),
        "--_out",
        out_path,
    ]
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
    return (
        f"{cpu}, {cores} cores{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.platform()}"
    )


VARIANTS = (("baseline", "classic"), ("like_for_like", "like-for-like"), ("ours", "ours"))


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _settings(result: dict | None) -> str:
    if not result:
        return "-"
    return f"{result.get('precision', 'fp32')}, {result.get('memory_layout', 'NCHW')}"


def markdown(results: list[dict], predicts: list[dict]) -> str:
    """The table: per arch and strategy, classic / like-for-like / ours for each measure (the
    like-for-like part only when some row has it), the speed-ups, and peak GPU memory ("-" off CUDA)."""
    with_lfl = any(r.get("like_for_like") for r in results)
    variants = [v for v in VARIANTS if with_lfl or v[0] != "like_for_like"]
    names = " / ".join(label for _, label in variants)

    def cells(row: dict, key: str, spec: str) -> str:
        values = [(row.get(v) or {}).get(key) for v, _ in variants]
        if all(value is None for value in values):
            return "-"
        return " / ".join(_num(value, spec) for value in values)

    def speedup(row: dict, against: str) -> str:
        base, ours = row.get(against), row["ours"]
        return f"**{base['seconds'] / ours['seconds']:.2f}x**" if base else "-"

    header = ["arch", "strategy", "epochs", f"time {names} (s)", "speed-up vs classic"]
    if with_lfl:
        header.append("speed-up vs like-for-like")
    header += [
        f"images/s {names}",
        f"first epoch {names} (s)",
        f"peak RSS {names} (MB)",
        f"peak GPU memory {names} (MB)",
        f"best val acc {names}",
        "ours: pipeline",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r["arch"], r["strategy"], str(r["epochs"]), cells(r, "seconds", ".1f"), speedup(r, "baseline")]
        if with_lfl:
            row.append(speedup(r, "like_for_like"))
        row += [
            cells(r, "images_per_s", ".1f"),
            cells(r, "first_epoch_s", ".1f"),
            cells(r, "peak_rss_mb", ".0f"),
            cells(r, "peak_gpu_mb", ".0f"),
            cells(r, "best_val_acc", ".3f"),
            r["ours"]["pipeline"].split(" (")[0],
        ]
        lines.append("| " + " | ".join(row) + " |")
    if results:
        legend = {}
        for v, label in variants:
            seen = sorted({_settings(r.get(v)) for r in results if r.get(v)})
            legend[label] = " or ".join(seen) or "not run"
        lines += [
            "",
            "Precision and memory layout: "
            + "; ".join(f"{label} ({how})" for label, how in legend.items())
            + ". Speed-up: the baseline's time / ours.",
        ]
        if not with_lfl:
            lines[-1] += " (like-for-like baseline not run.)"
        evaluations = [
            r["ours"]["final_evaluation_s"] for r in results if r["ours"].get("final_evaluation_s") is not None
        ]
        lines.append(
            f"Time: {TIMED}, for every run. Ours' final evaluation and calibration, which the baseline does not do, "
            "are not in it" + (f" ({min(evaluations):.1f}-{max(evaluations):.1f} s)." if evaluations else ".")
        )
    if predicts:
        lines += ["", "| arch | single-image predict p50 / p95 (ms) | folder predict (images/s) |", "|---|---|---|"]
        for p in predicts:
            lines.append(
                f"| {p['arch']} | {p['latency_p50_ms']:.1f} / {p['latency_p95_ms']:.1f} | "
                f"{p['folder_images_per_s']:.1f} ({p['folder_images']} images) |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs for every strategy (default: head 10, last 10, all 2)"
    )
    parser.add_argument("--archs", default="resnet50")
    parser.add_argument("--strategies", default="head,last,all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="none", help="imagenet, none or a state_dict path (none: offline)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument(
        "--no-like-for-like",
        action="store_true",
        help="run the baseline only as the classic script (fp32, NCHW), not also at our precision and memory layout",
    )
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
    from finetune.config import TrainConfig

    shipped = TrainConfig(data=args.data)
    lfl = None if args.no_like_for_like else like_for_like_options(args.device, shipped.amp, shipped.channels_last)
    if lfl is None and not args.no_like_for_like:
        print("like-for-like baseline skipped: on this device it would be the classic run (fp32, NCHW)", flush=True)
    runs = [("baseline", CLASSIC), ("like_for_like", lfl), ("ours", None)]
    for arch in args.archs.split(","):
        for strategy in args.strategies.split(","):
            epochs = args.epochs or DEFAULT_EPOCHS[strategy]
            values = dict(
                data=args.data,
                arch=arch,
                strategy=strategy,
                weights=args.weights,
                epochs=epochs,
                batch_size=args.batch_size,
                image_size=args.image_size,
                seed=args.seed,
                device=args.device,
                runs_dir=str(runs_dir),
                run_name=f"{arch}-{strategy}",
            )
            row = {"arch": arch, "strategy": strategy, "epochs": epochs}
            for name, options in runs:
                if name != "ours" and options is None:
                    row[name] = None
                    continue
                label = dict(VARIANTS)[name]
                print(f"[{time.time() - started:7.0f}s] {arch} {strategy} {label} ({epochs} epochs) ...", flush=True)
                if name == "ours":
                    result = run_subprocess("ours", values)
                else:
                    result = run_subprocess("baseline", dict(values, baseline_options=options))
                result["images_per_s"] = result["train_images"] * epochs / result["seconds"]
                result["baseline_options"] = options
                row[name] = result
                gpu = f", peak GPU {result['peak_gpu_mb']:.0f} MB" if result.get("peak_gpu_mb") is not None else ""
                print(
                    f"    {result['seconds']:.1f}s ({_settings(result)}), best val acc {result['best_val_acc']:.3f}, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB{gpu}",
                    flush=True,
                )
            row["speedup"] = row["baseline"]["seconds"] / row["ours"]["seconds"]
            row["speedup_vs_like_for_like"] = (
                row["like_for_like"]["seconds"] / row["ours"]["seconds"] if row["like_for_like"] else None
            )
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

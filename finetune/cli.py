"""`python -m finetune train|predict|evaluate|export|scan|sample-data`: the command line.

Every error the user can cause is one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from .config import ARCHS, DEFAULT_LR, STRATEGIES, STRATEGY_HELP, FinetuneError, TrainConfig

# ---------------------------------------------------------------------------------------------
# Terminal progress: one consumer of the training events


class TerminalProgress:
    """A tqdm bar per epoch (loss, accuracy, images/s, ETA) and a line per epoch."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.quiet = quiet

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr if self.quiet else sys.stdout)

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["type"]
        if kind == "log":
            self.write(event["message"])
        elif kind == "start":
            self.write(f"run folder: {event['run_dir']}")
            self.write(f"{event['arch']} / {event['strategy']} on {event['device']}"
                       f"{' x' + str(event['world_size']) if event['world_size'] > 1 else ''}: "
                       f"{event['train_images']} train / {event['val_images']} val images, "
                       f"{len(event['classes'])} classes, {event['trainable_params']:,} of "
                       f"{event['total_params']:,} parameters train")
        elif kind == "batch":
            if self.bar is None:
                self.bar = tqdm(total=event["batches"], desc=f"epoch {event['epoch']}/{event['epochs']}",
                                unit="batch", leave=False, dynamic_ncols=True, disable=self.quiet,
                                # tqdm's own rate would count throttled events: show the loop's instead
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}{postfix}]")
            self.bar.n = event["batch"]
            self.bar.set_postfix(loss=f"{event['loss']:.3f}", acc=f"{event['acc']:.3f}",
                                 img_s=f"{event['images_per_s']:.0f}", eta=_duration(event["eta_s"]),
                                 refresh=True)
        elif kind == "epoch":
            self._close_bar()
            self.write(f"epoch {event['epoch']:>3}: train loss {event['train_loss']:.4f} acc {event['train_acc']:.4f}"
                       f" | val loss {event['val_loss']:.4f} acc {event['val_acc']:.4f}"
                       f" | {event['seconds']:.1f}s{'  *best' if event['best'] else ''}")
        elif kind == "end":
            self._close_bar()
            self.write(f"{event['status']} in {_duration(event['seconds'])}; best epoch {event['best']['epoch']}")
            self.write(f"val: {event['summary']}")
            if event.get("metrics"):
                from .evaluate import per_class_table

                self.write(per_class_table(event["metrics"]))
        elif kind == "error":
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def install_stop_handlers(stop: threading.Event) -> None:
    """First Ctrl-C (or SIGTERM): finish the current batch and keep a usable run. Second: abort."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the current batch (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------------
# Commands


def dataset_folder(data: str, quiet: bool = False) -> str:
    """DATA as given, or, for a .zip, the folder it was safely extracted to (kept: runs refer to it)."""
    path = Path(data).expanduser()
    if path.suffix.lower() != ".zip" or not path.is_file():
        return data
    from .archive import extract_zip

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "datasets"
    root = extract_zip(path, Path(os.environ.get("FINETUNE_DATASETS", cache)))
    if not quiet:
        print(f"{path.name}: extracted to {root}", file=sys.stderr)
    return str(root)


def cmd_train(args) -> int:
    from .train import resume_config, train

    if args.resume:
        cfg = resume_config(args.resume, epochs=args.epochs, device=args.device)
    else:
        if not args.data:
            raise FinetuneError("give a DATA folder to train on (or --resume RUN)")
        args.data = dataset_folder(args.data, args.quiet)
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                  if f.name != "extra" and getattr(args, f.name, None) is not None}
        cfg = TrainConfig(**values)
    cfg.validate()
    stop = threading.Event()
    install_stop_handlers(stop)
    run_dir = train(cfg, on_event=TerminalProgress(quiet=args.quiet), stop=stop, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def cmd_predict(args) -> int:
    from .data import list_images
    from .predict import Predictor, write_csv

    predictor = Predictor.load(args.model, args.classes, args.arch, args.image_size, args.device)
    paths = list_images(args.images)
    if not paths:
        raise FinetuneError(f"no image files found in {', '.join(args.images)}")
    predictions = predictor.predict_paths(paths, top_k=args.top_k, batch_size=args.batch_size)
    for p in predictions:
        if p.error:
            print(f"{p.path}: error: {p.error}")
        else:
            print(f"{p.path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in p.top))
    if args.csv:
        print(f"wrote {write_csv(predictions, args.csv, args.top_k)}")
    return 0 if all(p.error is None for p in predictions) else 1


def cmd_evaluate(args) -> int:
    from .data import scan_labelled_folder
    from .evaluate import compute_metrics, per_class_table, summary_line, write_reports
    from .predict import Predictor

    predictor = Predictor.from_run(args.run, args.device)
    root, items, skipped = scan_labelled_folder(dataset_folder(args.data), predictor.classes)
    for rel, reason in skipped:
        print(f"skipped {rel}: {reason}")
    predictions = predictor.predict_paths([Path(root, rel) for rel, _ in items], top_k=len(predictor.classes),
                                          batch_size=args.batch_size)
    import numpy as np

    probs = np.zeros((len(items), len(predictor.classes)))
    index = {name: i for i, name in enumerate(predictor.classes)}
    for row, p in enumerate(predictions):
        for name, prob in p.top:
            probs[row, index[name]] = prob
    metrics = compute_metrics([label for _, label in items], probs, predictor.classes, [rel for rel, _ in items])
    metrics["data"] = root
    metrics["skipped"] = skipped
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{Path(root).name}-{datetime.now():%Y%m%d-%H%M%S}"
    write_reports(out, metrics)
    print(summary_line(metrics))
    print(per_class_table(metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    print(f"wrote {export(args.run, args.format, args.out)}")
    return 0


def cmd_scan(args) -> int:
    from .data import scan_dataset

    scan = scan_dataset(dataset_folder(args.data, args.json), args.val_fraction, args.seed)
    print(json.dumps(scan.to_dict(), indent=2) if args.json else scan.report())
    return 0


def cmd_sample_data(args) -> int:
    from .sample import make_sample_dataset

    out = make_sample_dataset(args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote sample dataset to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth reading (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is v for v in (None, False, True)) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune",
                                     description="Fine-tune an ImageNet ResNet on a folder of labelled images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model on an image folder",
                       formatter_class=DefaultsHelpFormatter,
                       description="Train on DATA: a folder of class subfolders, or with train/ and val/ "
                                   "(valid/, validation/; optional test/) of class subfolders.")
    d = TrainConfig()
    t.add_argument("data", nargs="?", help="image folder, or a .zip of one (extracted safely to "
                   "~/.cache/finetune/datasets, or $FINETUNE_DATASETS)")
    t.add_argument("--arch", choices=ARCHS, default=d.arch, help="ImageNet ResNet to fine-tune")
    t.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items()))
    t.add_argument("--weights", default=d.weights,
                   help="imagenet (torch hub cache, downloaded when online), none (from scratch), or a .pth path")
    t.add_argument("--epochs", type=int, default=None, help=f"epochs (default {d.epochs}; on --resume: as saved)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per training step")
    t.add_argument("--lr", type=float, default=None,
                   help="head learning rate (default per strategy: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    t.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale,
                   help="pretrained layers learn at lr x this (earlier stages less)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing")
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear learning-rate warmup, then cosine decay")
    t.add_argument("--image-size", type=int, default=d.image_size, help="crop size in pixels (train and eval)")
    t.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of each class held out for validation when DATA has no val/ folder")
    t.add_argument("--seed", type=int, default=d.seed, help="for the split, initialisation, augmentation")
    t.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto)")
    t.add_argument("--workers", type=int, default=None, help="data loader processes (default: sized to the cores)")
    t.add_argument("--class-weighted-loss", action="store_true", default=None,
                   help="weight the loss by inverse class frequency (for imbalanced classes)")
    t.add_argument("--early-stopping", type=int, default=d.early_stopping, metavar="PATIENCE",
                   help="stop after this many epochs without improvement (0: off)")
    t.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on CUDA")
    t.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep the NCHW memory layout (channels_last is faster on CUDA and x86 CPUs)")
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the trainable layers")
    t.add_argument("--cache", choices=("auto", "off"), default=d.cache,
                   help="auto: compute frozen layers once and decode images once when it fits in memory")
    t.add_argument("--cache-views", type=int, default=d.cache_views,
                   help="augmented views per image kept in a frozen-feature cache")
    t.add_argument("--memory-budget-gb", type=float, default=None, help="memory for caches (default: from free RAM)")
    t.add_argument("--runs-dir", default=d.runs_dir, help="where run folders are created")
    t.add_argument("--run-name", default=None, help="run folder name (default <time>-<arch>-<strategy>)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last completed epoch")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify images or folders with a trained model",
                       formatter_class=DefaultsHelpFormatter,
                       description="MODEL is a run folder, or a classic state_dict .pth (then --arch, and "
                                   "--classes unless class_indices.json lies beside it).")
    p.add_argument("model", help="run folder or .pth file")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    p.add_argument("--csv", help="also write the predictions to this CSV file")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--arch", choices=ARCHS, help="architecture of a plain .pth")
    p.add_argument("--classes", help="class_indices.json for a plain .pth")
    p.add_argument("--image-size", type=int, default=224, help="input size of a plain .pth")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="metrics and confusion matrix of a run on another labelled folder",
                       formatter_class=DefaultsHelpFormatter)
    e.add_argument("run", help="run folder")
    e.add_argument("data", help="folder (or .zip) of class subfolders (its test/ or val/ split if it has one)")
    e.add_argument("--out", help="report folder (default: RUN/eval-<data>-<time>)")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a run's model to TorchScript or ONNX",
                       formatter_class=DefaultsHelpFormatter)
    x.add_argument("run", help="run folder")
    x.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="file format")
    x.add_argument("--out", help="output file (default: in the run folder)")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("scan", help="check an image folder and show its classes, split and skipped files")
    s.add_argument("data", help="image folder or .zip")
    s.add_argument("--val-fraction", type=float, default=d.val_fraction)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_scan)

    g = sub.add_parser("sample-data", help="(re)generate the small bundled sample dataset")
    g.add_argument("out", nargs="?", default="data")
    g.add_argument("--per-class", type=int, default=24)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FinetuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("error: out of memory: try a smaller --batch-size or --image-size", file=sys.stderr)
        return 3
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            print("error: out of GPU memory: try a smaller --batch-size or --image-size", file=sys.stderr)
            return 3
        raise

#!/usr/bin/env python3
"""Finetune Studio: the browser UI over the `finetune` engine (layout and wiring only).

    python app.py                      # http://127.0.0.1:7860, sample data preselected
    python app.py --host 0.0.0.0 --auth user:password
    python app.py --runs-dir my-runs --port 7861

Training runs as its own process (`python -m finetune train ...`); this app follows the events it
writes to <run>/events.jsonl and sends it SIGINT to stop. Runs live in the runs folder (default
runs/), so they survive a restart of the app.
"""

from __future__ import annotations

import os

# No telemetry and nothing fetched from the internet: set before anything imports gradio.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data"
DEFAULT_WORKSPACE = REPO / "workspace"
sys.path.insert(0, str(REPO))

from finetune.config import DEFAULT_LR, STRATEGY_HELP, FinetuneError, TrainConfig  # noqa: E402

WEIGHT_CHOICES = [("ImageNet (pretrained, recommended)", "imagenet"),
                  ("A weights file I upload (.pth state_dict)", "file"),
                  ("None: train from scratch", "none")]
STRATEGY_CHOICES = [(f"{name}: {text}", name) for name, text in STRATEGY_HELP.items()]
ARCH_CHOICES = [("ResNet-34 (faster)", "resnet34"), ("ResNet-50 (more accurate, slower)", "resnet50")]
IMAGE_TYPES = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
THUMBS_PER_CLASS = 6
SERIES_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e"}  # named in the plot labels: blue, orange
MAX_MISCLASSIFIED = 60

CSS = """
.ft-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.ft-progress > div { height: 100%; background: var(--color-accent); transition: width 0.4s; }
.ft-progress.failed > div { background: #d33; }
.ft-status { margin-top: 6px; font-size: 0.95em; }
.ft-error { color: #b00020; font-weight: 600; }
"""


class Studio:
    """The app's state: where runs and uploads live, the one training job, loaded predictors."""

    def __init__(self, runs_dir: str | Path, workspace: str | Path, default_data: str | Path,
                 browse_root: str | Path | None = None):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.workspace = Path(workspace).expanduser().resolve()
        self.default_data = str(Path(default_data).expanduser())
        self.browse_root = str(Path(browse_root or Path.home()).expanduser().resolve())
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.job = None  # finetune.jobs.TrainingJob
        self.job_lock = threading.Lock()
        self.predictors: dict[str, tuple[float, object]] = {}
        self.predictor_lock = threading.Lock()

    def predictor(self, run_dir: Path):
        """A Predictor per run, kept loaded; reloaded when the run writes a better model.pth."""
        from finetune.predict import Predictor

        weights = run_dir / "model.pth"
        if not weights.is_file():
            raise FinetuneError(f"{run_dir.name} has no model yet (it has not finished an epoch)")
        stamp = weights.stat().st_mtime
        with self.predictor_lock:
            cached = self.predictors.get(str(run_dir))
            if cached and cached[0] == stamp:
                return cached[1]
            predictor = Predictor.from_run(run_dir, device="cpu" if self.training() else "auto")
            self.predictors[str(run_dir)] = (stamp, predictor)
            return predictor

    def training(self) -> bool:
        return self.job is not None and self.job.running()


# ---------------------------------------------------------------------------------------------
# UI


def build_app(studio: Studio):
    import gradio as gr
    import pandas as pd

    from finetune import jobs
    from finetune import rundir as runs

    def fail(error: Exception):
        """FinetuneError -> a message in the UI (and AppError for API clients)."""
        return gr.Error(str(error), print_exception=False)

    # ---- helpers shared by the tabs ---------------------------------------------------------

    def run_dropdown(usable_only: bool = True, value: str | None = None):
        choices = runs.run_choices(studio.runs_dir, usable_only=usable_only)
        paths = [path for _, path in choices]
        if value not in paths:
            value = paths[0] if paths else None
        return gr.Dropdown(choices=choices, value=value)

    def thumbnail(path: Path, size: int = 160):
        from finetune.data import load_rgb

        image = load_rgb(path, min_size=size)
        image.thumbnail((size, size))
        return image

    # ---- Data -------------------------------------------------------------------------------

    def scan(path: str | None = None):
        from finetune.data import scan_dataset

        path = (path or "").strip()
        if not path:
            raise gr.Error("Type a folder path on the server, pick one, or upload a .zip.")
        try:
            result = scan_dataset(path)
        except FinetuneError as error:
            raise fail(error) from None
        counts = result.counts()
        rows = [{"class": name, **{split: counts[split][name] for split in counts},
                 "total": sum(counts[split][name] for split in counts)} for name in result.classes]
        rows.append({"class": "total", **{split: sum(counts[split].values()) for split in counts},
                     "total": sum(sum(c.values()) for c in counts.values())})
        layout = ("its own train/ and val/ folders" if result.layout == "train-val" else
                  f"one folder per class; {round((result.val_fraction or 0) * 100)}% of each class held out "
                  f"for validation")
        summary = (f"**{len(result.classes)} classes** in `{result.root}` ({layout}): "
                   f"{len(result.train)} training and {len(result.val)} validation images"
                   + (f", {len(result.test)} test images" if result.test else "") + ".")
        if result.skipped:
            summary += f" {len(result.skipped)} file(s) skipped (listed below)."
        warnings = "\n\n".join(f"**Warning:** {w}" for w in result.warnings) or "No warnings: classes are balanced."
        gallery = []
        by_class: dict[int, list[str]] = {}
        for rel, label in result.train + result.val:
            by_class.setdefault(label, []).append(rel)
        for label, name in enumerate(result.classes):
            for rel in by_class.get(label, [])[:THUMBS_PER_CLASS]:
                try:
                    gallery.append((thumbnail(Path(result.root) / rel), name))
                except Exception:  # noqa: BLE001 - a thumbnail is not worth an error
                    continue
        skipped = pd.DataFrame(result.skipped or [], columns=["file", "reason"])
        ready = (f"Training data: `{result.root}` · {len(result.classes)} classes "
                 f"({', '.join(result.classes[:8])}{'…' if len(result.classes) > 8 else ''}) · "
                 f"{len(result.train)} train / {len(result.val)} val images")
        return (summary, pd.DataFrame(rows), gallery, gr.Dataframe(value=skipped, visible=bool(result.skipped)),
                warnings, ready)

    def upload_zip(file=None):
        from finetune.archive import extract_zip

        if not file:
            raise gr.Error("Drop a .zip file with one folder per class.")
        path = Path(file if isinstance(file, str) else file.name)
        try:
            root = extract_zip(path, studio.workspace / "uploads")
        except FinetuneError as error:
            raise fail(error) from None
        return (*scan(str(root)), str(root))  # the extracted folder becomes the chosen data

    def pick_folder(selected=None):
        if isinstance(selected, list):
            selected = selected[0] if selected else None
        if not selected:
            return gr.skip()
        path = Path(selected)
        return str(path if path.is_dir() else path.parent)

    # ---- Train ------------------------------------------------------------------------------

    def check_weights(arch: str = "resnet34", weights: str = "imagenet", weights_file=None, strategy: str = "all"):
        """Say before training whether the chosen weights can be had (and, offline, what to do)."""
        from finetune.model import imagenet_weights_path, weights_available

        imagenet_ok = weights_available(arch, "imagenet")[0]
        expected = imagenet_weights_path(arch)
        missing = (f"**ImageNet weights for {arch} are not on this machine.** The engine looks for "
                   f"`{expected}` and downloads it there on first use, which needs internet access. "
                   f"Offline, copy `{expected.name}` there, choose *A weights file I upload*, or choose "
                   f"*None: train from scratch* (works anywhere, but learns much less from small data).")
        if weights == "file":
            if not weights_file:
                return "**Upload a `.pth` file** holding a ResNet state_dict of the chosen architecture."
            ok, message = weights_available(arch, str(weights_file))
            return ("Ready: " if ok else "**Problem:** ") + message
        if weights == "imagenet":
            return f"Ready: ImageNet weights found at `{expected}`." if imagenet_ok else "**Warning:** " + missing
        note = "Ready: training from scratch (no pretrained weights)."
        if strategy != "all":
            note += (f" **Tip:** without pretrained weights the layers that strategy *{strategy}* freezes stay "
                     f"random, so it learns little; choose strategy *all* to train every layer.")
        return note if imagenet_ok else note + "\n\nNote: " + missing

    def default_weights(arch: str = "resnet34"):
        from finetune.model import weights_available

        return "imagenet" if weights_available(arch, "imagenet")[0] else "none"

    def strategy_lr(strategy: str):
        return DEFAULT_LR.get(strategy, 1e-3)

    def visible_gpus() -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def device_text():
        from finetune.device import describe_device, resolve_device

        count = visible_gpus()
        return (f"**Device:** {describe_device(resolve_device('auto'))}"
                + (f" ({count} GPUs visible)" if count > 1 else ""))

    def progress_html(view, error: str | None = None) -> str:
        percent = round(view.fraction() * 100) if view else 0
        failed = bool(error) or (view is not None and view.status == "failed")
        text = error or (view.progress_text() if view else "Not started: choose the settings and press Start training.")
        css = "ft-progress failed" if failed else "ft-progress"
        klass = "ft-status ft-error" if failed else "ft-status"
        from html import escape

        return (f'<div class="{css}"><div style="width:{percent}%"></div></div>'
                f'<div class="{klass}" id="train_status_text">{escape(text)}</div>')

    def start_training(data=None, arch="resnet34", strategy="last", weights="none", weights_file=None, epochs=5,
                       batch_size=32, lr=None, image_size=224, seed=0, gpus=1):
        from finetune.model import weights_available

        with studio.job_lock:
            if studio.training():
                view = studio.job.update()
                raise gr.Error(f"A training is already running ({Path(view.run_dir).name}: {view.progress_text()}). "
                               f"Wait for it to finish or press Stop first. One training at a time.")
            data = (data or "").strip()
            if not data:
                raise gr.Error("Choose the training data first (Data tab).")
            if not Path(data).expanduser().is_dir():
                raise gr.Error(f"data folder not found: {data} (choose the data on the Data tab)")
            weights_value = weights
            if weights == "file":
                if not weights_file:
                    raise gr.Error("Upload a weights file, or choose ImageNet or None.")
                weights_value = str(weights_file if isinstance(weights_file, str) else weights_file.name)
            ok, message = weights_available(arch, weights_value)
            if not ok and weights == "imagenet":
                # online, the engine downloads it; offline it fails fast with a one-line error (shown)
                gr.Warning(f"{message}. The training will try to download them.")
            elif not ok:
                raise gr.Error(message)
            try:
                cfg = TrainConfig(data=data, arch=arch, strategy=strategy, weights=weights_value,
                                  epochs=int(epochs), batch_size=int(batch_size), lr=float(lr) if lr else None,
                                  image_size=int(image_size), seed=int(seed), runs_dir=str(studio.runs_dir))
                cfg.validate()
                processes = max(1, min(int(gpus or 1), visible_gpus()))
                studio.job = jobs.TrainingJob(cfg, cwd=REPO, processes=processes)
            except FinetuneError as error:
                raise fail(error) from None
            except (TypeError, ValueError) as error:
                raise gr.Error(f"check the training settings: {error}") from None
        return progress_html(studio.job.view), f"Started {studio.job.run_dir.name}"

    def follow_training():
        """Stream the current (or last) training: progress, curves, log, result. Ends with the process."""
        job = studio.job
        if job is None:
            yield (gr.skip(),) * 6
            return
        last_key = None
        while True:
            view = job.update()
            key = (len(view.curves), len(view.log), view.status, view.batch, view.epoch)
            if key != last_key:
                last_key = key
                yield render_view(job, view)
            if job.finished():
                return
            time.sleep(0.4)

    def render_view(job, view):
        """Outputs for one state of a training. The plots fix their colour scale when first drawn,
        so every plot carries both series from the start (val as an empty point until epoch 1 ends)."""
        outputs = [progress_html(view, f"Training failed: {view.error}" if view.status == "failed" else None)]
        if view.curves:
            frame = pd.DataFrame(view.curves)
            x_lim = [0, max(1, view.epochs)]
            for metric in ("loss", "accuracy"):
                part = frame[frame.metric == metric][["epoch", "value", "series"]]
                if not len(part):
                    outputs.append(gr.skip())
                    continue
                missing = [{"epoch": 0.0, "value": float("nan"), "series": name} for name in ("train", "val")
                           if name not in set(part.series)]
                if missing:  # train first, so it keeps the first colour
                    part = pd.concat([part, pd.DataFrame(missing)], ignore_index=True)
                    part = part.astype({"epoch": float, "value": float})
                outputs.append(gr.LinePlot(value=part, x_lim=x_lim))
        else:
            outputs += [gr.skip(), gr.skip()]
        outputs.append("\n".join(view.log))
        result, matrix = "", None
        if view.status in ("completed", "stopped", "early-stopped"):
            name = Path(view.run_dir).name
            result = f"### {view.status.capitalize()}: {name}\n{view.summary}"
            if view.status == "stopped":
                result += "\n\nStopped on request; the best model so far was kept and can be used."
            matrix_path = Path(view.run_dir) / "confusion_matrix.png"
            matrix = str(matrix_path) if matrix_path.is_file() else None
        elif view.status == "failed":
            result = f"### Training failed\n{view.error}\n\nThe app still works: change the settings and start again."
        outputs += [result, gr.Image(value=matrix, visible=matrix is not None)]
        return tuple(outputs)

    def stop_training():
        if not studio.training():
            return "No training is running."
        studio.job.stop()
        return f"Stopping {studio.job.run_dir.name} after the current batch; the best model so far is kept."

    # ---- Evaluate ---------------------------------------------------------------------------

    def evaluate_run(run=None):
        if not run:  # no run yet (first start): a hint, not an error
            return ("No trained run yet: train one on the **2. Train** tab, then pick it here.", None, None, [],
                    "", None)
        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
            metrics = runs.read_metrics(run_dir)
        except FinetuneError as error:
            raise fail(error) from None
        info = runs.read_run(run_dir)
        if not metrics.get("num_images"):
            raise gr.Error(f"{run_dir.name} has no validation images to evaluate")
        topk = ", ".join(f"top-{k} {v:.1%}" for k, v in metrics["top_k_accuracy"].items())
        summary = (f"**{run_dir.name}** ({info.get('status', '?')}, {info.get('arch', '?')} / "
                   f"{info.get('strategy', '?')}): on {metrics['num_images']} validation images, "
                   f"accuracy **{metrics['accuracy']:.1%}**, balanced accuracy {metrics['balanced_accuracy']:.1%}, "
                   f"macro F1 {metrics['macro_f1']:.3f}; {topk}.")
        table = pd.DataFrame([{"class": name, "precision": round(m["precision"], 3), "recall": round(m["recall"], 3),
                               "f1": round(m["f1"], 3), "support": m["support"]}
                              for name, m in metrics["per_class"].items()])
        root = Path(_split_root(run_dir) or "")
        gallery = []
        for item in metrics.get("misclassified", [])[:MAX_MISCLASSIFIED]:
            caption = f"{item['true']} → {item['predicted']} ({item['confidence']:.0%})"
            try:
                gallery.append((thumbnail(root / item["path"], 200), caption))
            except Exception:  # noqa: BLE001 - the image may have moved since training
                continue
        wrong = len(metrics.get("misclassified", []))
        gallery_note = (f"{wrong} of {metrics['num_images']} validation images misclassified"
                        + (f" (showing {len(gallery)})" if wrong > len(gallery) else "") if wrong else
                        "Every validation image was classified correctly.")
        matrix = run_dir / "confusion_matrix.png"
        curves = run_dir / "training_curves.png"
        return (summary, str(matrix) if matrix.is_file() else None, table, gallery, gallery_note,
                str(curves) if curves.is_file() else None)

    def _split_root(run_dir: Path) -> str | None:
        import json

        try:
            return json.loads((run_dir / "split.json").read_text())["root"]
        except (OSError, KeyError, ValueError):
            return None

    # ---- Predict ----------------------------------------------------------------------------

    def predict_image(run=None, image=None, top_k=3):
        if image is None:
            return None
        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
            predictor = studio.predictor(run_dir)
            top = predictor.predict_image(image, top_k=int(top_k))
        except FinetuneError as error:
            raise fail(error) from None
        return {name: float(p) for name, p in top}

    def predict_batch(run=None, files=None, top_k=3, folder=None):
        from finetune.archive import extract_zip
        from finetune.data import is_image_file, list_images
        from finetune.predict import write_csv

        folder = (folder or "").strip()
        if not files and not folder:
            raise gr.Error("Drop image files or a .zip of images first (or give a folder on the server).")
        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
            predictor = studio.predictor(run_dir)
            paths, names = [], []
            if folder:
                root = Path(folder).expanduser()
                if not root.is_dir():
                    raise FinetuneError(f"folder not found: {folder}")
                for image in list_images([root]):
                    paths.append(image)
                    names.append(image.relative_to(root).as_posix())
            for file in files or []:
                path = Path(file if isinstance(file, str) else file.name)
                if path.suffix.lower() == ".zip":
                    root = extract_zip(path, studio.workspace / "predict")
                    for image in list_images([root]):
                        paths.append(image)
                        names.append(f"{path.name}/{image.relative_to(root).as_posix()}")
                elif is_image_file(path):
                    paths.append(path)
                    names.append(path.name)
                else:
                    raise FinetuneError(f"{path.name} is neither an image nor a .zip")
            if not paths:
                raise FinetuneError("no image files found in the upload" + (f" or in {folder}" if folder else ""))
            predictions = predictor.predict_paths(paths, top_k=int(top_k))
        except FinetuneError as error:
            raise fail(error) from None
        for prediction, name in zip(predictions, names):
            prediction.path = name
        rows = [{"file": p.path, "prediction": p.label or "", "confidence": round(p.confidence, 4) if p.top else None,
                 f"top {int(top_k)}": ", ".join(f"{n} {v:.2f}" for n, v in p.top), "error": p.error or ""}
                for p in predictions]
        out_dir = studio.workspace / "predictions"
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = write_csv(predictions, out_dir / f"predictions-{run_dir.name}-{datetime.now():%Y%m%d-%H%M%S-%f}.csv",
                             int(top_k))
        return pd.DataFrame(rows), str(csv_path)

    # ---- Export -----------------------------------------------------------------------------

    def export_files(run=None):
        """The files a run offers for download now (class map, weights, exports made so far)."""
        if not run:  # no run yet: buttons stay disabled
            return gr.DownloadButton(value=None, interactive=False), gr.DownloadButton(value=None, interactive=False), None
        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
        except FinetuneError as error:
            raise fail(error) from None
        classes = run_dir / "class_indices.json"
        model = run_dir / "model.pth"
        made = [str(p) for p in (run_dir / "model.torchscript.pt", run_dir / "model.onnx",
                                 studio.workspace / "exports" / f"{run_dir.name}.zip") if p.is_file()]
        return (gr.DownloadButton(value=str(classes) if classes.is_file() else None, interactive=classes.is_file()),
                gr.DownloadButton(value=str(model) if model.is_file() else None, interactive=model.is_file()),
                made or None)

    def export_model(run, fmt: str):
        from finetune.export import export

        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
            export(run_dir, fmt)
        except FinetuneError as error:
            raise fail(error) from None
        return export_files(run)[2]

    def export_torchscript(run=None):
        return export_model(run, "torchscript")

    def export_onnx(run=None):
        return export_model(run, "onnx")

    def export_zip(run=None):
        try:
            run_dir = runs.resolve_run(run, studio.runs_dir)
        except FinetuneError as error:
            raise fail(error) from None
        if studio.training() and studio.job.run_dir.resolve() == run_dir:
            raise gr.Error(f"{run_dir.name} is still training: zip it when it has finished")
        out = studio.workspace / "exports"
        out.mkdir(parents=True, exist_ok=True)
        shutil.make_archive(str(out / run_dir.name), "zip", root_dir=run_dir.parent, base_dir=run_dir.name)
        return export_files(run)[2]

    def refresh_runs(current_eval=None, current_predict=None, current_export=None):
        return (run_dropdown(True, current_eval), run_dropdown(True, current_predict),
                run_dropdown(True, current_export))

    def select_trained_run(current_eval=None, current_predict=None, current_export=None):
        """After a training: the new run in Evaluate, Predict and Export (when it has a model)."""
        trained = str(studio.job.run_dir.resolve()) if studio.job is not None else None
        paths = [path for _, path in runs.run_choices(studio.runs_dir, usable_only=True)]
        if trained not in paths:
            return refresh_runs(current_eval, current_predict, current_export)
        return tuple(run_dropdown(True, trained) for _ in range(3))

    def latest_runs():
        return refresh_runs()

    # ---- Layout -----------------------------------------------------------------------------

    with gr.Blocks(title="Finetune Studio", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown("# Finetune Studio\nTeach a ResNet your own image classes: **1. Data** → **2. Train** → "
                    "**3. Evaluate** → **4. Predict** → **5. Export**. The sample shapes dataset is already "
                    "selected: go to *Train* and press *Start training*.", elem_id="intro")
        with gr.Tabs(elem_id="tabs"):
            # -- Data
            with gr.Tab("1. Data", id="data", elem_id="tab_data") as tab_data:
                gr.Markdown("Images in **one folder per class** (`cats/…`, `dogs/…`), or with `train/` and `val/` "
                            "folders of class folders. Your files are only read, never changed.",
                            elem_id="data_help")
                with gr.Row():
                    with gr.Column(scale=3):
                        data_path = gr.Textbox(value=studio.default_data, label="Folder on this computer (server)",
                                               info="Type or paste a path, then press Enter or 'Use this folder'.",
                                               elem_id="data_path")
                        with gr.Row():
                            scan_btn = gr.Button("Use this folder", variant="primary", elem_id="scan_btn")
                            sample_btn = gr.Button("Use the sample data", elem_id="sample_btn")
                        with gr.Accordion("Browse folders on the server", open=False, elem_id="browse_acc"):
                            browser = gr.FileExplorer(root_dir=studio.browse_root, glob="**/", file_count="single",
                                                      ignore_glob="**/.*", label="Pick a folder (its path is "
                                                      "copied above)", elem_id="folder_browser", height=300)
                    with gr.Column(scale=2):
                        zip_in = gr.File(label="…or drop a .zip (one folder per class)", file_types=[".zip"],
                                         type="filepath", elem_id="zip_upload")
                data_summary = gr.Markdown(elem_id="data_summary")
                data_warnings = gr.Markdown(elem_id="data_warnings")
                with gr.Row():
                    counts = gr.Dataframe(label="Images per class and split", interactive=False,
                                          elem_id="class_counts", scale=2)
                    skipped = gr.Dataframe(label="Skipped files and why", interactive=False, visible=False,
                                           elem_id="skipped_files", scale=3)
                thumbs = gr.Gallery(label="A few images of each class", columns=8, height="auto",
                                    object_fit="contain", allow_preview=True, elem_id="class_thumbs")

            # -- Train
            with gr.Tab("2. Train", id="train", elem_id="tab_train") as tab_train:
                data_ready = gr.Markdown(elem_id="train_data")
                with gr.Row():
                    with gr.Column(scale=2):
                        arch = gr.Radio(ARCH_CHOICES, value="resnet34", label="Architecture", elem_id="arch")
                        strategy = gr.Radio(STRATEGY_CHOICES, value="last", label="What to train (strategy)",
                                            elem_id="strategy")
                        weights = gr.Radio(WEIGHT_CHOICES, value=default_weights(), label="Starting weights",
                                           elem_id="weights")
                        weights_file = gr.File(label="Weights file (.pth)", file_types=[".pth", ".pt"],
                                               type="filepath", visible=False, elem_id="weights_file")
                        weights_note = gr.Markdown(elem_id="weights_note")
                    with gr.Column(scale=1):
                        epochs = gr.Number(value=5, label="Epochs", minimum=1, maximum=1000, precision=0,
                                           elem_id="epochs")
                        batch_size = gr.Number(value=32, label="Batch size", minimum=1, maximum=4096, precision=0,
                                               elem_id="batch_size")
                        lr = gr.Number(value=DEFAULT_LR["last"], label="Learning rate (head; set per strategy)",
                                       minimum=0, elem_id="lr")
                        image_size = gr.Number(value=224, label="Image size (pixels)", minimum=32, maximum=1024,
                                               precision=0, elem_id="image_size")
                        seed = gr.Number(value=0, label="Seed", precision=0, elem_id="seed")
                        device = gr.Markdown(device_text(), elem_id="device")
                        # several GPUs: one training process per GPU (torchrun, DistributedDataParallel)
                        gpus = gr.Number(value=max(1, visible_gpus()), minimum=1, maximum=max(1, visible_gpus()),
                                         precision=0, label="GPUs to train on", visible=visible_gpus() > 1,
                                         elem_id="gpus")
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start_btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop_btn")
                train_message = gr.Markdown(elem_id="train_message")
                progress = gr.HTML(progress_html(None, None), elem_id="train_progress")
                result_md = gr.Markdown(elem_id="train_result")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Loss",
                                            x_title="epoch", y_title="loss", elem_id="loss_plot", height=260,
                                            color_map=SERIES_COLOURS, colors_in_legend=[],
                                            label="Loss: blue = training (running mean in the epoch), "
                                                  "orange = validation (end of each epoch)")
                    acc_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Accuracy",
                                           x_title="epoch", y_title="accuracy", y_lim=[0, 1], elem_id="acc_plot",
                                           height=260, color_map=SERIES_COLOURS, colors_in_legend=[],
                                           label="Accuracy: blue = training, orange = validation")
                train_matrix = gr.Image(label="Confusion matrix (validation, best epoch)", type="filepath",
                                        interactive=False, elem_id="train_matrix", buttons=["download"],
                                        visible=False, show_label=False, height=380)
                log = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, interactive=False,
                                 elem_id="train_log")

            # -- Evaluate
            with gr.Tab("3. Evaluate", id="evaluate", elem_id="tab_evaluate") as tab_evaluate:
                with gr.Row():
                    eval_run = gr.Dropdown(label="Run", elem_id="eval_run", scale=4, allow_custom_value=True)
                    eval_refresh = gr.Button("Refresh runs", elem_id="eval_refresh", scale=1)
                eval_summary = gr.Markdown(elem_id="eval_summary")
                gr.Markdown("#### Confusion matrix\nRows are the true classes, columns the predictions; left "
                            "counts, right the share of each true class.", elem_id="eval_matrix_help")
                eval_matrix = gr.Image(label="Confusion matrix", show_label=False, type="filepath",
                                       interactive=False, elem_id="eval_matrix", height=420)
                eval_table = gr.Dataframe(label="Per class", interactive=False, elem_id="eval_table")
                eval_note = gr.Markdown(elem_id="eval_note")
                eval_gallery = gr.Gallery(label="Misclassified validation images (true → predicted, confidence)",
                                          columns=5, height="auto", object_fit="contain", elem_id="eval_gallery")
                gr.Markdown("#### Training curves", elem_id="eval_curves_help")
                eval_curves = gr.Image(label="Training curves", show_label=False, type="filepath", interactive=False,
                                       elem_id="eval_curves", height=360)

            # -- Predict
            with gr.Tab("4. Predict", id="predict", elem_id="tab_predict") as tab_predict:
                with gr.Row():
                    predict_run = gr.Dropdown(label="Model (run)", elem_id="predict_run", scale=4, allow_custom_value=True)
                    top_k = gr.Slider(1, 10, value=3, step=1, label="Top classes shown", elem_id="top_k", scale=2)
                with gr.Row():
                    image_in = gr.Image(type="pil", sources=["upload", "clipboard", "webcam"],
                                        label="Drop, paste or take a picture", elem_id="predict_image", height=320)
                    label_out = gr.Label(label="Prediction", elem_id="predict_label")
                gr.Markdown("#### Many images at once", elem_id="batch_heading")
                with gr.Row():
                    with gr.Column():
                        batch_in = gr.File(label="Image files and/or .zip files of images", file_count="multiple",
                                           file_types=IMAGE_TYPES + [".zip"], type="filepath", elem_id="batch_files")
                        batch_folder = gr.Textbox(label="…and/or a folder on the server (searched recursively)",
                                                  placeholder="/path/to/images", elem_id="batch_folder")
                    with gr.Column():
                        batch_btn = gr.Button("Classify all", variant="primary", elem_id="batch_btn")
                        batch_csv = gr.File(label="Predictions as CSV", interactive=False, elem_id="batch_csv")
                batch_table = gr.Dataframe(label="Predictions", interactive=False, elem_id="batch_table",
                                           headers=["file", "prediction", "confidence"])

            # -- Export
            with gr.Tab("5. Export", id="export", elem_id="tab_export") as tab_export:
                export_run = gr.Dropdown(label="Run", elem_id="export_run", allow_custom_value=True)
                gr.Markdown("`class_indices.json` is the classic class map (`{\"0\": \"name\", …}`) that goes "
                            "with `model.pth` (a plain state_dict) in the classic `predict.py`.",
                            elem_id="export_help")
                with gr.Row():
                    dl_classes = gr.DownloadButton("Download class_indices.json", interactive=False,
                                                   elem_id="download_class_indices")
                    dl_model = gr.DownloadButton("Download model.pth", interactive=False, elem_id="download_model")
                with gr.Row():
                    ts_btn = gr.Button("Export TorchScript", elem_id="export_torchscript_btn")
                    onnx_btn = gr.Button("Export ONNX", elem_id="export_onnx_btn")
                    zip_btn = gr.Button("Zip the whole run folder", elem_id="export_zip_btn")
                exported = gr.File(label="Exported files (click a name to download)", file_count="multiple",
                                   interactive=False, elem_id="exported_files")

        # ---- Wiring -------------------------------------------------------------------------
        data_outputs = [data_summary, counts, thumbs, skipped, data_warnings, data_ready]
        scan_btn.click(scan, data_path, data_outputs, api_name="scan_folder")
        data_path.submit(scan, data_path, data_outputs, api_name="scan_folder_submit")
        sample_btn.click(lambda: studio.default_data, None, data_path, api_name="use_sample_data").then(
            scan, data_path, data_outputs, api_name="scan_sample")
        zip_in.upload(upload_zip, zip_in, data_outputs + [data_path], api_name="upload_zip")
        browser.change(pick_folder, browser, data_path, api_name="pick_folder")

        weights_inputs = [arch, weights, weights_file, strategy]
        weights.change(lambda w=None: gr.File(visible=w == "file"), weights, weights_file, api_name="weights_file_visible")
        for trigger, name in ((arch.change, "check_weights"), (weights.change, "check_weights_on_choice"),
                              (weights_file.change, "check_weights_file"), (strategy.change, "check_weights_strategy")):
            trigger(check_weights, weights_inputs, weights_note, api_name=name)
        strategy.change(strategy_lr, strategy, lr, api_name="strategy_lr")

        follow_outputs = [progress, loss_plot, acc_plot, log, result_md, train_matrix]
        start_btn.click(
            start_training, [data_path, arch, strategy, weights, weights_file, epochs, batch_size, lr, image_size,
                             seed, gpus], [progress, train_message], api_name="start_training",
            concurrency_id="train_start", concurrency_limit=1,
        ).success(
            follow_training, None, follow_outputs, api_name="follow_training", concurrency_limit=None,
            show_progress="hidden",
        ).then(select_trained_run, [eval_run, predict_run, export_run], [eval_run, predict_run, export_run],
               api_name="refresh_runs_after_training")
        stop_btn.click(stop_training, None, train_message, api_name="stop_training", concurrency_limit=None)

        run_list_outputs = [eval_run, predict_run, export_run]
        eval_refresh.click(refresh_runs, run_list_outputs, run_list_outputs, api_name="list_runs")
        for tab in (tab_evaluate, tab_predict, tab_export):
            tab.select(refresh_runs, run_list_outputs, run_list_outputs, api_name=False)
        eval_outputs = [eval_summary, eval_matrix, eval_table, eval_gallery, eval_note, eval_curves]
        eval_run.change(evaluate_run, eval_run, eval_outputs, api_name="evaluate_run")

        predict_kwargs = dict(concurrency_id="predict", concurrency_limit=2)
        image_in.change(predict_image, [predict_run, image_in, top_k], label_out, api_name="predict_image",
                        show_progress="minimal", **predict_kwargs)
        top_k.release(predict_image, [predict_run, image_in, top_k], label_out, api_name="predict_image_top_k",
                      **predict_kwargs)
        predict_run.change(predict_image, [predict_run, image_in, top_k], label_out, api_name="predict_image_run",
                           **predict_kwargs)
        batch_btn.click(predict_batch, [predict_run, batch_in, top_k, batch_folder], [batch_table, batch_csv],
                        api_name="predict_batch", **predict_kwargs)

        export_run.change(export_files, export_run, [dl_classes, dl_model, exported], api_name="export_files")
        ts_btn.click(export_torchscript, export_run, exported, api_name="export_torchscript",
                     concurrency_id="export", concurrency_limit=1)
        onnx_btn.click(export_onnx, export_run, exported, api_name="export_onnx",
                       concurrency_id="export", concurrency_limit=1)
        zip_btn.click(export_zip, export_run, exported, api_name="export_zip", concurrency_id="export",
                      concurrency_limit=1)

        # On page load: scan the preselected data, say whether the weights can be had, list runs,
        # and re-attach to a training that is still running (or show the last one).
        demo.load(scan, data_path, data_outputs, api_name="initial_scan").then(
            check_weights, weights_inputs, weights_note, api_name="initial_weights")
        demo.load(latest_runs, None, run_list_outputs, api_name="initial_runs")
        demo.load(follow_training, None, follow_outputs, api_name="attach_training", concurrency_limit=None,
                  show_progress="hidden")
    del tab_data, tab_train
    return demo


# ---------------------------------------------------------------------------------------------
# Command line


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth must look like user:password")
    return user, password


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Finetune Studio: train and use an image classifier in the browser.")
    parser.add_argument("--host", default=os.environ.get("FINETUNE_HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("FINETUNE_PORT", "7860")))
    parser.add_argument("--auth", default=os.environ.get("FINETUNE_AUTH"), metavar="USER:PASSWORD",
                        help="log-in required (also FINETUNE_AUTH); needed to listen beyond this computer")
    parser.add_argument("--runs-dir", default=os.environ.get("FINETUNE_RUNS_DIR", str(REPO / "runs")),
                        help="where runs are saved and listed (also FINETUNE_RUNS_DIR)")
    parser.add_argument("--workspace", default=os.environ.get("FINETUNE_WORKSPACE", str(DEFAULT_WORKSPACE)),
                        help="where uploads are extracted and exports written (also FINETUNE_WORKSPACE)")
    parser.add_argument("--data", default=os.environ.get("FINETUNE_DATA", str(DEFAULT_DATA)),
                        help="dataset folder preselected in the UI (default: the bundled sample data)")
    parser.add_argument("--browse-root", default=os.environ.get("FINETUNE_BROWSE_ROOT", str(Path.home())),
                        help="top folder of the server folder browser on the Data tab (default: home folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    if not is_loopback(args.host) and auth is None:
        print(f"error: refusing to listen on {args.host} without a log-in: anyone who can reach this machine "
              f"could train, read and download here. Add --auth user:password (or set FINETUNE_AUTH), or use "
              f"--host 127.0.0.1.", file=sys.stderr)
        return 2
    import signal

    import gradio as gr

    studio = Studio(args.runs_dir, args.workspace, args.data, args.browse_root)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, show_error=True,
                    allowed_paths=[str(studio.runs_dir), str(studio.workspace)], ssr_mode=False, pwa=False,
                    mcp_server=False, enable_monitoring=False, css=CSS, theme=gr.themes.Default(),
                    footer_links=["settings"], quiet=True, prevent_thread_lock=True)
        # SIGTERM (service managers, `kill`) ends the app like Ctrl-C: a running training is stopped
        # cleanly (its best checkpoint kept) instead of being left running on its own. Installed after
        # launch(), which sets handlers of its own.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        shown_host = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
        print(f"Finetune Studio is running: open http://{shown_host}:{args.port} in a browser"
              f"{' (log-in required)' if auth else ''}. Ctrl-C stops it.\n"
              f"  runs: {studio.runs_dir}\n  uploads and exports: {studio.workspace}", flush=True)
        demo.block_thread()
    except SystemExit:
        pass
    finally:
        if studio.job is not None:
            studio.job.kill()
        demo.close()  # stops the server thread, so the process can end
    return 0


if __name__ == "__main__":
    sys.exit(main())

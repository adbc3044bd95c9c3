"""4. Predict: one image (drop, paste, webcam), or many at once (files, zips, a server folder) into a
table and a CSV. Predictions run on the CPU while a training has the GPU.

Below the minimum confidence (by default the run's threshold suggested from validation) the answer
is "unknown", with the best guess beside it. "Why?" adds a Grad-CAM heatmap of the predicted class.
Uploaded images are decoded only by finetune.data.load_rgb (the accepted formats, the pixel limit)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from ..config import FinetuneError
from ..data import ACCEPTED_FORMATS, IMAGE_EXTENSIONS
from ..rundir import RunDir, resolve_run
from . import views
from .common import bind, output_list, user_errors, warning
from .components import answer_label, image_upload
from .inputs import gather_images
from .state import Studio

if TYPE_CHECKING:
    from PIL import Image

PREDICT: dict[str, Any] = dict(concurrency_id="predict", concurrency_limit=2)


@dataclass
class PredictTab:
    tab: gr.Tab
    run: gr.Dropdown
    top_k: gr.Slider
    min_conf: gr.Slider
    min_note: gr.Markdown
    why: gr.Checkbox
    image: gr.Image
    label: gr.Label
    heatmap: gr.Image
    files: gr.File
    folder: gr.Textbox
    batch_btn: gr.Button
    csv: gr.File
    table: gr.Dataframe


def build(studio: Studio) -> PredictTab:
    with gr.Tab("4. Predict", id="predict", elem_id="tab_predict") as tab:
        with gr.Row():
            run = gr.Dropdown(label="Model (run)", elem_id="predict_run", scale=4, allow_custom_value=True)
            top_k = gr.Slider(1, 10, value=3, step=1, label="Top classes shown", elem_id="top_k", scale=2)
            with gr.Column(scale=3):
                min_conf = gr.Slider(
                    0, 1, value=0, step=0.01, label="Minimum confidence (below it: unknown)", elem_id="min_conf"
                )
                min_note = gr.Markdown(elem_id="min_conf_note")
        with gr.Row():
            image = image_upload(
                sources=["upload", "clipboard", "webcam"],
                label="Drop, paste or take a picture",
                elem_id="predict_image",
                height=320,
            )
            with gr.Column():
                label = answer_label(label="Prediction", elem_id="predict_label")
                why = gr.Checkbox(
                    value=False, label="Why? Show where the model looked (Grad-CAM heatmap)", elem_id="predict_why"
                )
            heatmap = gr.Image(
                label="Why: the parts of the picture behind the prediction (red = most)",
                type="pil",
                interactive=False,
                visible=False,
                elem_id="predict_heatmap",
                height=320,
            )
        gr.Markdown(
            f"#### Many images at once\nAt most {studio.max_batch_images:,} images per request.",
            elem_id="batch_heading",
        )
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="Image files and/or .zip files of images",
                    file_count="multiple",
                    file_types=sorted(IMAGE_EXTENSIONS) + [".zip"],
                    type="filepath",
                    elem_id="batch_files",
                )
                folder = gr.Textbox(
                    label="…and/or a folder on the server (searched recursively)",
                    placeholder="/path/to/images",
                    elem_id="batch_folder",
                )
            with gr.Column():
                batch_btn = gr.Button("Classify all", variant="primary", elem_id="batch_btn")
                csv = gr.File(label="Predictions as CSV", interactive=False, elem_id="batch_csv")
        table = gr.Dataframe(
            label="Predictions",
            interactive=False,
            elem_id="batch_table",
            headers=["file", "prediction", "best guess", "confidence"],
        )
    return PredictTab(
        tab, run, top_k, min_conf, min_note, why, image, label, heatmap, files, folder, batch_btn, csv, table
    )


def read_upload(path) -> Image.Image:
    """An uploaded image decoded by load_rgb (accepted formats only, the pixel limit), or one clear line."""
    from PIL import Image

    from ..data import load_rgb

    name = Path(str(path)).name
    try:
        return load_rgb(path)
    except (Image.DecompressionBombError, FinetuneError) as problem:  # a bomb, too costly, not a regular file
        raise FinetuneError(f"{name}: {problem}") from None
    except Image.UnidentifiedImageError:
        raise FinetuneError(
            f"{name} is not an image this app reads: only {', '.join(ACCEPTED_FORMATS)} files are opened"
        ) from None
    except (OSError, ValueError, SyntaxError) as problem:
        raise FinetuneError(f"{name} could not be decoded ({type(problem).__name__}: {problem})") from None


def run_threshold(studio: Studio, run=None) -> dict:
    """The minimum confidence of a run: its suggestion from validation (0 when it has none)."""
    if not run:
        return {"min_conf": gr.skip(), "min_note": ""}
    try:
        info = RunDir(resolve_run(run, studio.runs_dir)).info()
    except FinetuneError:
        return {"min_conf": gr.skip(), "min_note": ""}
    suggested = (info.get("calibration") or {}).get("suggested_min_confidence")
    return {"min_conf": round(float(suggested or 0.0), 2), "min_note": views.threshold_note(suggested)}


def say_device_note(studio: Studio) -> None:
    """Why predictions run on the CPU now (a training holds the GPU), once per cause: a toast."""
    note = studio.device_notes.take()
    if note:
        warning(note)


def predict_image(studio: Studio, run=None, image=None, top_k=3, min_conf=None, why=False) -> dict:
    """One image: the answer ("unknown (best guess: ...)" below `min_conf`) and, with `why`, the
    Grad-CAM overlay of the predicted class at the picture's size."""
    if image is None:
        return {"label": None, "heatmap": gr.Image(value=None, visible=bool(why))}
    with user_errors():
        picture = read_upload(image)
        predictor = studio.predictor(resolve_run(run, studio.runs_dir))
        say_device_note(studio)
        lock = studio.model_lock(predictor)
        with lock.shared():
            prediction = predictor.predict_one(picture, int(top_k), None if min_conf is None else float(min_conf))
        answer, guess, confidence, top = prediction.answer, prediction.label, prediction.confidence, prediction.top
        overlay = None
        if why:
            from ..explain import explain_image

            with lock.exclusive():
                overlay = explain_image(predictor, picture).overlay
    label = {
        "label": views.answer_headline(answer, guess, confidence),
        "confidences": [(views.plain(name), float(p)) for name, p in top],
    }
    return {"label": label, "heatmap": gr.Image(value=overlay, visible=bool(why))}


def predict_batch(
    studio: Studio, run=None, files=None, top_k=3, folder=None, min_conf=None, progress=gr.Progress()
) -> dict:
    """Classify the images of uploaded files, zips and a server folder (at most max_batch_images);
    the zips are extracted into a temporary folder that is removed afterwards."""
    folder = (folder or "").strip()
    if not files and not folder:
        raise gr.Error("Drop image files or a .zip of images first (or give a folder on the server).")
    top_k = int(top_k)
    with user_errors():
        run_dir = resolve_run(run, studio.runs_dir)
        predictor = studio.predictor(run_dir)
        say_device_note(studio)
        with studio.workspace.temporary() as scratch, studio.model_lock(predictor).shared():
            progress((0, None), desc="Collecting the images", unit="images")
            batch = gather_images(
                files,
                studio.resolve_path(folder) if folder else None,
                studio.workspace,
                scratch,
                studio.max_batch_images,
                studio.max_scan_files,
            )
            if not batch.paths:
                raise FinetuneError("no image files found in the upload" + (f" or in {folder}" if folder else ""))
            predictions = predictor.predict_paths(
                batch.paths,
                top_k=top_k,
                min_confidence=None if min_conf is None else float(min_conf),
                on_progress=lambda done, total: progress((done, total), desc="Classifying", unit="images"),
            )
        for prediction, name in zip(predictions, batch.names, strict=True):
            prediction.path = name
        name = f"predictions-{run_dir.name}-{datetime.now():%Y%m%d-%H%M%S-%f}.csv"
        csv_path = studio.workspace.output("predictions", name, need=200 * len(predictions))
    from ..predict import write_csv

    write_csv(predictions, csv_path, top_k)
    if batch.truncated:
        warning(views.batch_limit_note(batch.limit))
    return {"table": pd.DataFrame(views.batch_rows(predictions, top_k)), "csv": str(csv_path)}


def wire(studio: Studio, c: PredictTab) -> None:
    shown = {"label": c.label, "heatmap": c.heatmap}
    predicting = bind(studio, predict_image, shown)
    inputs, outputs = [c.run, c.image, c.top_k, c.min_conf, c.why], output_list(shown)
    c.image.change(predicting, inputs, outputs, api_name="predict_image", show_progress="minimal", **PREDICT)
    c.top_k.release(predicting, inputs, outputs, api_name="predict_image_top_k", **PREDICT)
    c.min_conf.release(predicting, inputs, outputs, api_name="predict_image_min_confidence", **PREDICT)
    c.why.change(predicting, inputs, outputs, api_name="predict_image_why", **PREDICT)
    threshold = {"min_conf": c.min_conf, "min_note": c.min_note}
    c.run.change(bind(studio, run_threshold, threshold), c.run, output_list(threshold), api_name="run_threshold").then(
        predicting, inputs, outputs, api_name="predict_image_run", **PREDICT
    )
    batch = {"table": c.table, "csv": c.csv}
    c.batch_btn.click(
        bind(studio, predict_batch, batch),
        [c.run, c.files, c.top_k, c.folder, c.min_conf],
        output_list(batch),
        api_name="predict_batch",
        **PREDICT,
    )

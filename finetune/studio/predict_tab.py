"""4. Predict: one image (drop, paste, webcam), or many at once (files, zips, a server folder) into a
table and a CSV. Predictions run on the CPU while a training has the GPU."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import gradio as gr
import pandas as pd

from ..config import FinetuneError
from ..data import IMAGE_EXTENSIONS
from ..rundir import resolve_run
from . import views
from .common import bind, error, output_list, warning
from .inputs import gather_images
from .state import Studio

PREDICT = dict(concurrency_id="predict", concurrency_limit=2)


@dataclass
class PredictTab:
    tab: gr.Tab
    run: gr.Dropdown
    top_k: gr.Slider
    image: gr.Image
    label: gr.Label
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
        with gr.Row():
            image = gr.Image(type="pil", sources=["upload", "clipboard", "webcam"],
                             label="Drop, paste or take a picture", elem_id="predict_image", height=320)
            label = gr.Label(label="Prediction", elem_id="predict_label")
        gr.Markdown(f"#### Many images at once\nAt most {studio.max_batch_images:,} images per request.",
                    elem_id="batch_heading")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Image files and/or .zip files of images", file_count="multiple",
                                file_types=sorted(IMAGE_EXTENSIONS) + [".zip"], type="filepath", elem_id="batch_files")
                folder = gr.Textbox(label="…and/or a folder on the server (searched recursively)",
                                    placeholder="/path/to/images", elem_id="batch_folder")
            with gr.Column():
                batch_btn = gr.Button("Classify all", variant="primary", elem_id="batch_btn")
                csv = gr.File(label="Predictions as CSV", interactive=False, elem_id="batch_csv")
        table = gr.Dataframe(label="Predictions", interactive=False, elem_id="batch_table",
                             headers=["file", "prediction", "confidence"])
    return PredictTab(tab, run, top_k, image, label, files, folder, batch_btn, csv, table)


def predict_image(studio: Studio, run=None, image=None, top_k=3):
    if image is None:
        return None
    try:
        predictor = studio.predictor(resolve_run(run, studio.runs_dir))
        top = predictor.predict_image(image, top_k=int(top_k))
    except FinetuneError as problem:
        raise error(problem) from None
    return {name: float(p) for name, p in top}


def predict_batch(studio: Studio, run=None, files=None, top_k=3, folder=None, progress=gr.Progress()) -> dict:
    """Classify the images of uploaded files, zips and a server folder (at most max_batch_images);
    the zips are extracted into a temporary folder that is removed afterwards."""
    folder = (folder or "").strip()
    if not files and not folder:
        raise gr.Error("Drop image files or a .zip of images first (or give a folder on the server).")
    top_k = int(top_k)
    try:
        run_dir = resolve_run(run, studio.runs_dir)
        predictor = studio.predictor(run_dir)
        with studio.workspace.temporary() as scratch:
            progress((0, None), desc="Collecting the images", unit="images")
            batch = gather_images(files, studio.resolve_path(folder) if folder else None, studio.workspace, scratch,
                                  studio.max_batch_images, studio.max_scan_files)
            if not batch.paths:
                raise FinetuneError("no image files found in the upload" + (f" or in {folder}" if folder else ""))
            predictions = predictor.predict_paths(
                batch.paths, top_k=top_k,
                on_progress=lambda done, total: progress((done, total), desc="Classifying", unit="images"))
        for prediction, name in zip(predictions, batch.names):
            prediction.path = name
        name = f"predictions-{run_dir.name}-{datetime.now():%Y%m%d-%H%M%S-%f}.csv"
        csv_path = studio.workspace.output("predictions", name, need=200 * len(predictions))
    except FinetuneError as problem:
        raise error(problem) from None
    from ..predict import write_csv

    write_csv(predictions, csv_path, top_k)
    if batch.truncated:
        warning(views.batch_limit_note(batch.limit))
    return {"table": pd.DataFrame(views.batch_rows(predictions, top_k)), "csv": str(csv_path)}


def wire(studio: Studio, c: PredictTab) -> None:
    predicting = bind(studio, predict_image)
    inputs = [c.run, c.image, c.top_k]
    c.image.change(predicting, inputs, c.label, api_name="predict_image", show_progress="minimal", **PREDICT)
    c.top_k.release(predicting, inputs, c.label, api_name="predict_image_top_k", **PREDICT)
    c.run.change(predicting, inputs, c.label, api_name="predict_image_run", **PREDICT)
    outputs = {"table": c.table, "csv": c.csv}
    c.batch_btn.click(bind(studio, predict_batch, outputs), [c.run, c.files, c.top_k, c.folder], output_list(outputs),
                      api_name="predict_batch", **PREDICT)

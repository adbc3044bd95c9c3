"""3. Evaluate: a run's metrics on its validation images, confusion matrix, per-class table,
misclassified images (optionally with Grad-CAM heatmaps of what the model saw) and training curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..rundir import RunDir, resolve_run
from . import views
from .common import bind, error, output_list, thumbnail, user_errors
from .state import Studio

MAX_HEATMAPS = 12  # Grad-CAM costs ~0.3 s per image on a CPU (more with the decode)


@dataclass
class EvaluateTab:
    tab: gr.Tab
    run: gr.Dropdown
    refresh: gr.Button
    summary: gr.Markdown
    matrix: gr.Image
    table: gr.Dataframe
    note: gr.Markdown
    heatmaps: gr.Checkbox
    gallery: gr.Gallery
    calibration: gr.Markdown
    reliability: gr.Image
    curves: gr.Image


def build(studio: Studio) -> EvaluateTab:
    with gr.Tab("3. Evaluate", id="evaluate", elem_id="tab_evaluate") as tab:
        with gr.Row():
            run = gr.Dropdown(label="Run", elem_id="eval_run", scale=4, allow_custom_value=True)
            refresh = gr.Button("Refresh runs", elem_id="eval_refresh", scale=1)
        summary = gr.Markdown(elem_id="eval_summary")
        gr.Markdown(
            "#### Confusion matrix\nRows are the true classes, columns the predictions; left counts, right "
            "the share of each true class.",
            elem_id="eval_matrix_help",
        )
        matrix = gr.Image(
            label="Confusion matrix",
            show_label=False,
            type="filepath",
            interactive=False,
            elem_id="eval_matrix",
            height=420,
        )
        table = gr.Dataframe(label="Per class", interactive=False, elem_id="eval_table")
        note = gr.Markdown(elem_id="eval_note")
        heatmaps = gr.Checkbox(
            value=False,
            elem_id="eval_heatmaps",
            label=f"Heatmaps: where the model looked for its wrong answer (Grad-CAM; the first "
            f"{MAX_HEATMAPS} images, about a second each on a CPU)",
        )
        gallery = gr.Gallery(
            label="Misclassified validation images (true → predicted, confidence)",
            columns=5,
            height="auto",
            object_fit="contain",
            elem_id="eval_gallery",
        )
        gr.Markdown(
            "#### Calibration\nHow far the confidence can be trusted: accuracy against confidence, before "
            "and after temperature scaling (the diagonal is perfect).",
            elem_id="eval_calibration_help",
        )
        calibration = gr.Markdown(elem_id="eval_calibration")
        reliability = gr.Image(
            label="Reliability",
            show_label=False,
            type="filepath",
            interactive=False,
            elem_id="eval_reliability",
            height=320,
        )
        gr.Markdown("#### Training curves", elem_id="eval_curves_help")
        curves = gr.Image(
            label="Training curves",
            show_label=False,
            type="filepath",
            interactive=False,
            elem_id="eval_curves",
            height=360,
        )
    return EvaluateTab(
        tab, run, refresh, summary, matrix, table, note, heatmaps, gallery, calibration, reliability, curves
    )


def heatmap_thumbnail(studio: Studio, predictor, path: Path, size: int = 200):
    """The Grad-CAM overlay of the predicted class on one image (decoded small), as a thumbnail."""
    from ..data import load_rgb
    from ..explain import explain_image

    image = load_rgb(path, min_size=predictor.min_size)
    with studio.model_lock(predictor).exclusive():
        overlay = explain_image(predictor, image).overlay
    overlay.thumbnail((size, size))
    return overlay


def evaluate_run(studio: Studio, run: str | None = None, heatmaps: bool = False, progress=gr.Progress()) -> dict:
    if not run:  # no run yet (first start): a hint, not an error
        return {
            "summary": views.NO_RUN_YET,
            "matrix": None,
            "table": None,
            "gallery": [],
            "note": "",
            "calibration": "",
            "reliability": None,
            "curves": None,
        }
    with user_errors():
        run_dir = RunDir(resolve_run(run, studio.runs_dir))
        metrics = run_dir.metrics()
    if not metrics.get("num_images"):
        raise error(f"{run_dir.name} has no validation images to evaluate")
    root = Path(run_dir.data_root() or "")
    misclassified = metrics.get("misclassified", [])
    gallery, explained = [], 0
    predictor = None
    if heatmaps and misclassified:
        with user_errors():
            predictor = studio.predictor(run_dir.path)
    for item in misclassified[: views.MAX_MISCLASSIFIED]:
        try:
            if predictor is not None and explained < MAX_HEATMAPS:
                progress((explained, min(MAX_HEATMAPS, len(misclassified))), desc="Heatmaps", unit="images")
                picture = heatmap_thumbnail(studio, predictor, root / item["path"])
                explained += 1
                gallery.append((picture, views.misclassified_caption(item) + " · heatmap"))
            else:
                gallery.append((thumbnail(root / item["path"], 200), views.misclassified_caption(item)))
        except Exception:  # noqa: BLE001 - the image may have moved since training
            continue
    return {
        "summary": views.eval_summary(run_dir.name, run_dir.info(), metrics),
        "matrix": studio.serve_run_file(run_dir.confusion_matrix),
        "table": pd.DataFrame(views.eval_rows(metrics)),
        "gallery": gallery,
        "note": views.misclassified_note(len(misclassified), metrics["num_images"], len(gallery))
        + (f" · heatmaps on the first {explained}" if explained else ""),
        "calibration": views.calibration_text(run_dir.info()),
        "reliability": studio.serve_run_file(run_dir.reliability),
        "curves": studio.serve_run_file(run_dir.curves),
    }


def wire(studio: Studio, c: EvaluateTab) -> None:
    outputs = {
        "summary": c.summary,
        "matrix": c.matrix,
        "table": c.table,
        "gallery": c.gallery,
        "note": c.note,
        "calibration": c.calibration,
        "reliability": c.reliability,
        "curves": c.curves,
    }
    evaluating = bind(studio, evaluate_run, outputs)
    c.run.change(evaluating, [c.run, c.heatmaps], output_list(outputs), api_name="evaluate_run")
    c.heatmaps.change(
        evaluating,
        [c.run, c.heatmaps],
        output_list(outputs),
        api_name="evaluate_run_heatmaps",
        show_progress_on=[c.gallery],
    )

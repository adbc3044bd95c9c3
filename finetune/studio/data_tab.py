"""1. Data: choose the images (a server folder, the folder browser, the sample, or a .zip upload)
and see what the engine finds in them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from . import views
from .common import Cancelled, bind, output_list, run_cancellable, thumbnail, user_errors
from .state import Studio


@dataclass
class DataTab:
    tab: gr.Tab
    path: gr.Textbox
    scan_btn: gr.Button
    sample_btn: gr.Button
    cancel_btn: gr.Button
    browser: gr.FileExplorer
    zip_in: gr.File
    labels: gr.Textbox
    labels_in: gr.File
    summary: gr.Markdown
    warnings: gr.Markdown
    counts: gr.Dataframe
    skipped: gr.Dataframe
    thumbs: gr.Gallery


def build(studio: Studio) -> DataTab:
    with gr.Tab("1. Data", id="data", elem_id="tab_data") as tab:
        gr.Markdown(
            "Images in **one folder per class** (`cats/…`, `dogs/…`), or with `train/` and `val/` "
            "folders of class folders. Your files are only read, never changed.",
            elem_id="data_help",
        )
        with gr.Row():
            with gr.Column(scale=3):
                path = gr.Textbox(
                    value=studio.default_data,
                    label="Folder on this computer (server)",
                    info="Type or paste a path, then press Enter or 'Use this folder'. A relative "
                    f"path means a folder in {studio.base_dir}.",
                    elem_id="data_path",
                )
                with gr.Row():
                    scan_btn = gr.Button("Use this folder", variant="primary", elem_id="scan_btn")
                    sample_btn = gr.Button("Use the sample data", elem_id="sample_btn")
                    cancel_btn = gr.Button("Cancel scan", variant="secondary", elem_id="scan_cancel_btn")
                with gr.Accordion("Browse folders on the server", open=False, elem_id="browse_acc"):
                    browser = gr.FileExplorer(
                        root_dir=studio.browse_root,
                        glob="**/",
                        file_count="single",
                        ignore_glob="**/.*",
                        label="Pick a folder (its path is copied above)",
                        elem_id="folder_browser",
                        height=300,
                    )
            with gr.Column(scale=2):
                zip_in = gr.File(
                    label="…or drop a .zip (one folder per class; only its images are used)",
                    file_types=[".zip"],
                    type="filepath",
                    elem_id="zip_upload",
                )
                labels, labels_in = _labels_inputs()
        summary = gr.Markdown(elem_id="data_summary")
        warnings = gr.Markdown(elem_id="data_warnings")
        with gr.Row():
            counts = gr.Dataframe(
                label="Images per class and split", interactive=False, elem_id="class_counts", scale=2
            )
            skipped = gr.Dataframe(
                label="Skipped files and why", interactive=False, visible=False, elem_id="skipped_files", scale=3
            )
        thumbs = gr.Gallery(
            label="A few images of each class",
            columns=8,
            height="auto",
            object_fit="contain",
            allow_preview=True,
            elem_id="class_thumbs",
        )
    inputs = (path, scan_btn, sample_btn, cancel_btn, browser, zip_in, labels, labels_in)
    return DataTab(tab, *inputs, summary, warnings, counts, skipped, thumbs)


def _labels_inputs() -> tuple[gr.Textbox, gr.File]:
    """A labels CSV instead of class folders: a path on the server, or an upload."""
    labels = gr.Textbox(
        label="Labels file (optional): a CSV of path,label[,split] for a flat folder",
        info="On the server, or the name of one inside the folder; instead of class folders.",
        placeholder="labels.csv",
        elem_id="data_labels",
    )
    labels_in = gr.File(
        label="…or drop the labels CSV", file_types=[".csv", ".tsv", ".txt"], type="filepath", elem_id="labels_upload"
    )
    return labels, labels_in


# ---------------------------------------------------------------------------------------------
# Handlers: (studio, ...) -> {name: value}; "ready" is the data line on the Train tab


def scan(studio: Studio, path: str | None = None, labels: str | None = None, progress=gr.Progress()):
    """Scan a folder (relative paths: in the app's working directory) with progress; cancellable.
    `labels`: a labels CSV (labels_path) instead of class folders."""
    text = (path or "").strip()
    if not text:
        raise gr.Error("Type a folder path on the server, pick one, or upload a .zip.")
    root = studio.resolve_path(text)
    result = yield from _scan(studio, root, progress, labels=labels_path(studio, root, labels))
    yield result


def labels_path(studio: Studio, root: Path, labels: str | None) -> str | None:
    """The labels file: one of that name inside the data folder, else a path on the server (relative:
    in the app's working directory); None for none."""
    text = (labels or "").strip()
    if not text:
        return None
    inside = root / text
    return str(inside if not Path(text).is_absolute() and inside.is_file() else studio.resolve_path(text))


def _scan(studio: Studio, root: Path, progress, archive_skipped=(), labels: str | None = None):
    """Generator (cancellation points) returning the outputs of a scan of `root`."""
    from ..data import scan_dataset

    def work(report):
        return scan_dataset(root, max_files=studio.max_scan_files, on_progress=report, labels=labels)

    def show(stage, done, total):
        progress(
            (done, total or None),
            desc=views.scan_progress(stage, done, total),
            unit="images" if stage == "check" else "files",
        )

    with user_errors():
        try:
            result = yield from run_cancellable(work, show)
        except Cancelled:
            raise gr.Error("Scan cancelled.") from None
    studio.workspace.touch(result.root)
    return scan_outputs(result, list(archive_skipped))


def scan_outputs(result, archive_skipped: Sequence[tuple[str, str]] = ()) -> dict:
    gallery = []
    for rel, name in views.thumbnail_picks(result):
        try:
            gallery.append((thumbnail(Path(result.root) / rel), name))
        except Exception:  # noqa: BLE001 - a thumbnail is not worth an error
            continue
    skipped = views.skipped_rows(result, archive_skipped)
    return {
        "summary": views.data_summary(result, len(archive_skipped)),
        "counts": pd.DataFrame(views.counts_rows(result)),
        "thumbs": gallery,
        "skipped": gr.Dataframe(value=pd.DataFrame(skipped, columns=["file", "reason"]), visible=bool(skipped)),
        "warnings": views.data_warnings(result),
        "ready": views.data_ready(result),
    }


def same_labels(studio: Studio, text: str | None = None) -> str:
    """The Train tab's labels file follows the Data tab's."""
    return text or ""


def upload_labels(studio: Studio, file=None):
    """An uploaded labels CSV: its path goes into the labels box (which scans again and reaches the
    Train tab)."""
    if not file:
        return gr.skip()
    return str(file if isinstance(file, str) else file.name)


def upload_zip(studio: Studio, file=None, progress=gr.Progress()):
    """Extract an uploaded .zip (its images only; the rest is named as skipped) and scan it; the
    extracted folder becomes the chosen data."""
    if not file:
        raise gr.Error("Drop a .zip file with one folder per class.")
    path = Path(file if isinstance(file, str) else file.name)
    progress((0, None), desc=f"Extracting {views.plain(path.name)}", unit="files")
    with user_errors():
        extraction = studio.workspace.extract_dataset(path, keep=studio.in_use())
    result = yield from _scan(studio, extraction.root, progress, extraction.skipped)
    yield {**result, "path": str(extraction.root)}


def absolute_path(studio: Studio, path: str | None = None):
    """After a scan: the path box shows the absolute folder that was scanned (and that trains)."""
    text = (path or "").strip()
    return str(studio.resolve_path(text)) if text else gr.skip()


def pick_folder(studio: Studio, selected=None):
    if isinstance(selected, list):
        selected = selected[0] if selected else None
    if not selected:
        return gr.skip()
    path = Path(selected)
    return str(path if path.is_dir() else path.parent)


def sample_data(studio: Studio):
    return studio.default_data


# ---------------------------------------------------------------------------------------------
# Events


def wire(studio: Studio, c: DataTab, demo: gr.Blocks, ready: gr.Markdown) -> None:
    """`ready` is the data line on the Train tab. The page load scans the preselected folder."""
    outputs = {
        "summary": c.summary,
        "counts": c.counts,
        "thumbs": c.thumbs,
        "skipped": c.skipped,
        "warnings": c.warnings,
        "ready": ready,
    }
    scanning = bind(studio, scan, outputs)
    absolute = bind(studio, absolute_path)
    shown: dict[str, Any] = dict(show_progress_on=[c.summary])
    inputs = [c.path, c.labels]
    scans = [
        c.scan_btn.click(scanning, inputs, output_list(outputs), api_name="scan_folder", **shown),
        c.path.submit(scanning, inputs, output_list(outputs), api_name="scan_folder_submit", **shown),
        c.labels.submit(scanning, inputs, output_list(outputs), api_name="scan_with_labels", **shown),
    ]
    for event in scans:
        event.success(absolute, c.path, c.path, api_name=False, show_progress="hidden")
    scans.append(
        c.sample_btn.click(bind(studio, sample_data), None, c.path, api_name="use_sample_data").then(
            scanning, inputs, output_list(outputs), api_name="scan_sample", **shown
        )
    )
    scans.append(
        c.labels_in.upload(bind(studio, upload_labels), c.labels_in, c.labels, api_name="upload_labels").then(
            scanning, inputs, output_list(outputs), api_name="scan_uploaded_labels", **shown
        )
    )
    with_path = {**outputs, "path": c.path}
    scans.append(
        c.zip_in.upload(
            bind(studio, upload_zip, with_path), c.zip_in, output_list(with_path), api_name="upload_zip", **shown
        )
    )
    scans.append(demo.load(scanning, inputs, output_list(outputs), api_name="initial_scan", **shown))
    c.browser.change(bind(studio, pick_folder), c.browser, c.path, api_name="pick_folder")
    # Cancel ends a running scan: its thread stops at the next image it checks.
    c.cancel_btn.click(None, None, None, cancels=[*scans], api_visibility="private")

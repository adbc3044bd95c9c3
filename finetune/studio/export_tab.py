"""5. Export: download a run's class map and weights, export TorchScript or ONNX, zip the run folder,
or zip a Hugging Face model folder (`finetune export --format hf`). Every file handed out is a file of
the run (or a zip made of one or of an export), served from the workspace's served/ folder, never from
the runs folder itself; an hf folder is built in the workspace's inputs/ (never served, removed when
the zip is made) and nothing is written into the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ..archive import disk_usage
from ..rundir import RunDir, resolve_run
from .common import bind, error, output_list, user_errors
from .state import Studio

EXPORTS: dict[str, Any] = dict(concurrency_id="export", concurrency_limit=1)
EXPORTED_NAMES = ("model.torchscript.pt", "model.onnx")


@dataclass
class ExportTab:
    tab: gr.Tab
    run: gr.Dropdown
    classes: gr.DownloadButton
    model: gr.DownloadButton
    torchscript_btn: gr.Button
    onnx_btn: gr.Button
    zip_btn: gr.Button
    hf_btn: gr.Button
    files: gr.File


def build(studio: Studio) -> ExportTab:
    with gr.Tab("5. Export", id="export", elem_id="tab_export") as tab:
        run = gr.Dropdown(label="Run", elem_id="export_run", allow_custom_value=True)
        gr.Markdown(
            '`class_indices.json` is the classic class map (`{"0": "name", …}`) that goes with '
            "`model.pth` (a plain state_dict) in the classic `predict.py`.",
            elem_id="export_help",
        )
        with gr.Row():
            classes = gr.DownloadButton(
                "Download class_indices.json", interactive=False, elem_id="download_class_indices"
            )
            model = gr.DownloadButton("Download model.pth", interactive=False, elem_id="download_model")
        with gr.Row():
            torchscript_btn = gr.Button("Export TorchScript", elem_id="export_torchscript_btn")
            onnx_btn = gr.Button("Export ONNX", elem_id="export_onnx_btn")
            zip_btn = gr.Button("Zip the whole run folder", elem_id="export_zip_btn")
            hf_btn = gr.Button("Hugging Face model folder (zip)", elem_id="export_hf_btn")
        files = gr.File(
            label="Exported files (click a name to download)",
            file_count="multiple",
            interactive=False,
            elem_id="exported_files",
        )
    return ExportTab(tab, run, classes, model, torchscript_btn, onnx_btn, zip_btn, hf_btn, files)


def _run(studio: Studio, run: str | None) -> RunDir:
    with user_errors():
        return RunDir(resolve_run(run, studio.runs_dir))


def exported(studio: Studio, run: RunDir) -> list[str] | None:
    """The exports made so far for this run, ready to download."""
    made = [studio.serve_run_file(run.path / name) for name in EXPORTED_NAMES]
    for archive in (studio.workspace.served / "exports" / name for name in zip_names(run)):
        made.append(str(archive) if archive.is_file() else None)
    return [path for path in made if path] or None


def zip_names(run: RunDir) -> tuple[str, str]:
    """The names of the run folder's zip and of its hf folder's zip in served/exports/."""
    return f"{run.name}.zip", f"{run.name}-hf.zip"


def export_files(studio: Studio, run: str | None = None) -> dict:
    """The files a run offers for download now (class map, weights, exports made so far)."""
    if not run:  # no run yet: buttons stay disabled
        return {
            "classes": gr.DownloadButton(value=None, interactive=False),
            "model": gr.DownloadButton(value=None, interactive=False),
            "files": None,
        }
    run_dir = _run(studio, run)
    classes, model = studio.serve_run_file(run_dir.class_indices), studio.serve_run_file(run_dir.model)
    return {
        "classes": gr.DownloadButton(value=classes, interactive=classes is not None),
        "model": gr.DownloadButton(value=model, interactive=model is not None),
        "files": exported(studio, run_dir),
    }


def export_model(studio: Studio, run: str | None, fmt: str) -> list[str] | None:
    from ..export import export

    run_dir = _run(studio, run)
    with user_errors():
        export(run_dir.path, fmt)
    return exported(studio, run_dir)


def export_torchscript(studio: Studio, run: str | None = None):
    return export_model(studio, run, "torchscript")


def export_onnx(studio: Studio, run: str | None = None):
    return export_model(studio, run, "onnx")


def _not_training(studio: Studio, run_dir: RunDir, what: str) -> None:
    job = studio.running_job()
    if job is not None and job.run_dir.resolve() == run_dir.path:
        raise error(f"{run_dir.name} is still training: {what} it when it has finished")


def _zip_into(studio: Studio, name: str, root_dir: Path, base_dir: str, need: int) -> None:
    """root_dir/base_dir zipped into served/exports/name: a partial file of its own (two zips of one
    run may be made at once), renamed into place complete, so a download never gets half a zip."""
    with user_errors():
        target = studio.workspace.output("exports", name, need=need)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".zip")
    os.close(handle)
    try:
        shutil.make_archive(partial[: -len(".zip")], "zip", root_dir=root_dir, base_dir=base_dir)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def export_zip(studio: Studio, run: str | None = None):
    run_dir = _run(studio, run)
    _not_training(studio, run_dir, "zip")
    _zip_into(studio, zip_names(run_dir)[0], run_dir.path.parent, run_dir.name, disk_usage(run_dir.path))
    return exported(studio, run_dir)


def export_hf_zip(studio: Studio, run: str | None = None):
    """The run's Hugging Face model folder (weights, config.json, model card, class map, plots) as a
    zip whose one folder is RUN-hf: unzip it and upload it to the Hub as it is (huggingface-cli upload)."""
    from ..hub import export_hf

    run_dir = _run(studio, run)
    _not_training(studio, run_dir, "export")
    name = zip_names(run_dir)[1]
    with studio.workspace.temporary() as scratch:
        with user_errors():
            folder = export_hf(run_dir.path, scratch / name[: -len(".zip")])
        _zip_into(studio, name, scratch, folder.name, disk_usage(folder))
    return exported(studio, run_dir)


def wire(studio: Studio, c: ExportTab) -> None:
    outputs = {"classes": c.classes, "model": c.model, "files": c.files}
    c.run.change(bind(studio, export_files, outputs), c.run, output_list(outputs), api_name="export_files")
    c.torchscript_btn.click(bind(studio, export_torchscript), c.run, c.files, api_name="export_torchscript", **EXPORTS)
    c.onnx_btn.click(bind(studio, export_onnx), c.run, c.files, api_name="export_onnx", **EXPORTS)
    c.zip_btn.click(bind(studio, export_zip), c.run, c.files, api_name="export_zip", **EXPORTS)
    c.hf_btn.click(bind(studio, export_hf_zip), c.run, c.files, api_name="export_hf", **EXPORTS)

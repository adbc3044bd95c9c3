"""Runs: every run of the runs folder in one table (finetune.runtable, what `finetune runs` prints),
sorted as asked; two or more ticked runs compared (validation curves overlaid, per-class F1 side by
side); one run chosen for Evaluate, Predict and Export, or deleted after a confirmation, never while
it trains and only a folder directly inside the runs folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..config import FinetuneError
from ..names import printable
from ..rundir import RunDir, lock_names_run, resolve_run
from ..runtable import COLUMNS, UNREADABLE, RunRow, per_class_f1, runs_table, val_curve
from . import views
from .common import bind, error, output_list, run_dropdown, user_errors
from .state import Studio

# (choice shown, key of RunRow, largest first); "newest" is the table's own order
SORTS = {
    "newest first": ("created", True),
    "best val accuracy": ("best_val_acc", True),
    "macro F1": ("macro_f1", True),
    "calibrated ECE (lowest first)": ("ece", False),
    "images": ("images", True),
    "duration (longest first)": ("seconds", True),
    "name": ("name", False),
    "status": ("status", False),
}
MAX_COMPARED = 8  # curves beyond this many are a tangle
PLOTTED = 1e300  # the largest value a curve shows (two runs' -1e308 and 1e308 break the axis)


@dataclass
class RunsTab:
    tab: gr.Tab
    sort: gr.Dropdown
    refresh: gr.Button
    table: gr.Dataframe
    note: gr.Markdown
    compare: gr.CheckboxGroup
    curves: gr.Plot
    f1: gr.Dataframe
    compare_note: gr.Markdown
    run: gr.Dropdown
    use: gr.Button
    delete: gr.Button
    confirm: gr.Row
    confirm_text: gr.Markdown
    confirm_yes: gr.Button
    confirm_no: gr.Button
    pending: gr.State
    status: gr.Markdown


def build(studio: Studio) -> RunsTab:
    with gr.Tab("Runs", id="runs", elem_id="tab_runs") as tab:
        with gr.Row():
            sort = gr.Dropdown(list(SORTS), value="newest first", label="Sort by", elem_id="runs_sort", scale=3)
            refresh = gr.Button("Refresh", elem_id="runs_refresh", scale=1)
        table = gr.Dataframe(label="Runs", interactive=False, elem_id="runs_table")
        note = gr.Markdown(elem_id="runs_note")
        gr.Markdown("#### Compare\nTick two or more runs.", elem_id="runs_compare_help")
        compare = gr.CheckboxGroup(label="Runs to compare", elem_id="runs_compare")
        compare_note = gr.Markdown(elem_id="runs_compare_note")
        curves = gr.Plot(label="Validation curves", elem_id="runs_curves")
        f1 = gr.Dataframe(label="F1 per class", interactive=False, elem_id="runs_f1")
        gr.Markdown("#### One run", elem_id="runs_one_help")
        with gr.Row():
            run = gr.Dropdown(label="Run", elem_id="runs_run", scale=3)
            use = gr.Button("Use this run", variant="primary", elem_id="runs_use", scale=1)
            delete = gr.Button("Delete this run…", variant="stop", elem_id="runs_delete", scale=1)
        with gr.Row(visible=False, elem_id="runs_confirm") as confirm:
            confirm_text = gr.Markdown(elem_id="runs_confirm_text")
            confirm_yes = gr.Button("Yes, delete it", variant="stop", elem_id="runs_delete_yes")
            confirm_no = gr.Button("Cancel", elem_id="runs_delete_no")
        pending = gr.State(None)
        status = gr.Markdown(elem_id="runs_status")
    return RunsTab(
        tab, sort, refresh, table, note, compare, curves, f1, compare_note, run, use, delete, confirm,
        confirm_text, confirm_yes, confirm_no, pending, status,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The table


def sorted_rows(rows: list[RunRow], sort: str | None) -> list[RunRow]:
    """`rows` in the order `sort` names (SORTS); runs that do not have the value last."""
    key, largest_first = SORTS.get(sort or "", SORTS["newest first"])
    known = [row for row in rows if getattr(row, key) is not None]
    unknown = [row for row in rows if getattr(row, key) is None]
    return sorted(known, key=lambda row: getattr(row, key), reverse=largest_first) + unknown


NUMBERS = ("best_val_acc", "macro_f1", "ece", "images")  # numbers on the page: its header sort sorts them so


def table_frame(rows: list[RunRow]) -> pd.DataFrame:
    """The table as the page shows it: text (names through printable), and numbers where they are
    (None, an empty cell, where a run does not say)."""
    frame = pd.DataFrame([row.cells() for row in rows], columns=[key for key, _ in COLUMNS])
    for key in NUMBERS:
        values = [getattr(row, key) for row in rows]
        frame[key] = pd.Series([v if v is None or key == "images" else round(v, 3) for v in values], dtype=object)
    return frame.rename(columns=dict(COLUMNS))


def table_note(rows: list[RunRow], note: str) -> str:
    unreadable = [row for row in rows if row.status == UNREADABLE]
    lines = [f"{views.md(row.name)}: {views.md(row.problem or 'unreadable')}" for row in unreadable]
    return "  \n".join(lines + ([views.md(note)] if note else []))


def runs_view(studio: Studio, sort: str | None = None, picked: list[str] | None = None, run: str | None = None):
    """The table, its note, the runs to compare (those ticked that still exist stay ticked) and the
    run list (it keeps its run, else the newest)."""
    with user_errors():
        table = runs_table(studio.runs_dir)
    rows = sorted_rows(table.rows, sort)
    names = [row.name for row in table.rows if row.status != UNREADABLE]
    choices = [(printable(name), name) for name in names]
    every = [(printable(row.name), row.name) for row in table.rows]
    note = table_note(rows, table.note())
    if run not in [name for _, name in every]:
        run = every[0][1] if every else None
    return {
        "table": table_frame(rows) if rows else None,
        "note": note if rows else "  \n".join(filter(None, [views.NO_RUN_YET, note])),
        "compare": gr.CheckboxGroup(choices=choices, value=[name for name in picked or [] if name in names]),
        "run": gr.Dropdown(choices=every, value=run),
    }


# ---------------------------------------------------------------------------------------------
# Comparing


def curves_figure(runs: list[RunDir]):
    """Validation accuracy and loss per epoch of each run, side by side in one matplotlib figure."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, the figure goes with its event
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for axes, metric, label in (
        (accuracy_axes, "val_acc", "validation accuracy"),
        (loss_axes, "val_loss", "validation loss"),
    ):
        for run in runs:
            # a run.json may hold any finite number: past this, matplotlib's axis span overflows
            points = [(epoch, value) for epoch, value in val_curve(run, metric) if abs(value) <= PLOTTED]
            if points:
                epochs, values = zip(*points, strict=True)
                # a "$" would start mathtext in the legend: a name is shown as it is
                axes.plot(epochs, values, marker="o", label=printable(run.name).replace("$", r"\$"))
        axes.set(xlabel="epoch", ylabel=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    accuracy_axes.set_ylim(0, 1.02)
    if accuracy_axes.lines:
        accuracy_axes.legend(loc="best", fontsize="small")
    return figure


def f1_frame(runs: list[RunDir]) -> pd.DataFrame:
    """One row a class (every class of every run, in the first run's order), one column a run."""
    scores = {run.name: per_class_f1(run) for run in runs}
    classes: list[str] = []
    for per_class in scores.values():
        classes += [name for name in per_class if name not in classes]
    rows = [
        {"class": views.plain(name)}
        | {views.plain(run): (round(f1[name], 3) if name in f1 else None) for run, f1 in scores.items()}
        for name in classes
    ]
    return pd.DataFrame(rows, columns=["class"] + [views.plain(name) for name in scores])


def compare_runs(studio: Studio, picked: list[str] | None = None) -> dict:
    picked = list(picked or [])
    if len(picked) < 2:
        return {"curves": None, "f1": None, "compare_note": "Tick two or more runs to compare them."}
    if len(picked) > MAX_COMPARED:
        raise error(f"compare at most {MAX_COMPARED} runs at a time ({len(picked)} ticked)")
    with user_errors():
        runs = [RunDir(resolve_run(name, studio.runs_dir)) for name in picked]
    missing = [run.name for run in runs if not per_class_f1(run)]
    note = f"No validation results yet: {', '.join(views.md(n) for n in missing)}." if missing else ""
    return {"curves": curves_figure(runs), "f1": f1_frame(runs), "compare_note": note}


# ---------------------------------------------------------------------------------------------
# One run: use it, delete it


def use_run(studio: Studio, run: str | None = None):
    """The run chosen in Evaluate, Predict and Export (it must have a model)."""
    with user_errors():
        path = resolve_run(run, studio.runs_dir)
    if not RunDir(path).has_model():
        raise error(f"{path.name} has no model yet: nothing to evaluate, predict with or export")
    value = str(path)
    lists = tuple(run_dropdown(studio, value) for _ in range(3))
    return (*lists, f"Evaluate, Predict and Export now use {views.code(path.name)}.")


def deletable(studio: Studio, run: str | None) -> Path:
    """The folder of `run`, when it may be deleted: a run folder directly inside the runs folder (not
    a link), whose training has ended. FinetuneError saying why not, otherwise."""
    path = resolve_run(run, studio.runs_dir)
    named = studio.runs_dir / Path(str(run)).name
    if path.parent != studio.runs_dir or named.is_symlink() or path == studio.runs_dir:
        raise FinetuneError(f"only a run folder directly inside {studio.runs_dir} can be deleted here: {run}")
    job = studio.running_job()
    folder = RunDir(path)
    if (job is not None and job.run_dir.resolve() == path) or folder.status() == "running" or lock_names_run(folder):
        raise FinetuneError(f"{path.name} is training: stop it first (Train tab), then delete it")
    return path


def ask_delete(studio: Studio, run: str | None = None) -> dict:
    with user_errors():
        path = deletable(studio, run)
    return {
        "confirm": gr.Row(visible=True),
        "confirm_text": f"Delete {views.code(path.name)} and everything in it (its model too)? This cannot be undone.",
        "pending": path.name,
        "status": "",
    }


def confirm_delete(studio: Studio, pending: str | None = None) -> dict:
    """Delete the run asked about (checked again: a training may have started since)."""
    hidden = {"confirm": gr.Row(visible=False), "pending": None}
    if not pending:
        return hidden | {"status": ""}
    # under the job lock: this studio starts no training (a resume of this very run) meanwhile
    with studio.job_lock, user_errors():
        path = deletable(studio, pending)
        try:
            shutil.rmtree(path)
        except OSError as problem:
            raise FinetuneError(f"could not delete all of {path.name}: {problem.strerror or problem}") from None
    served = studio.workspace.served / "runs" / path.name  # the copies handed to the page
    if served.is_dir() and not served.is_symlink():
        shutil.rmtree(served, ignore_errors=True)
    return hidden | {"status": f"Deleted {views.code(path.name)}."}


def cancel_delete(studio: Studio) -> dict:
    return {"confirm": gr.Row(visible=False), "pending": None, "status": "Nothing was deleted."}


def wire(studio: Studio, c: RunsTab) -> gr.events.Dependency:
    """The tab's own events; returns the deletion's, which app.py follows with the other tabs' run lists."""
    view = {"table": c.table, "note": c.note, "compare": c.compare, "run": c.run}
    viewing = bind(studio, runs_view, view)
    inputs = [c.sort, c.compare, c.run]
    c.tab.select(viewing, inputs, output_list(view), api_visibility="private")
    c.refresh.click(viewing, inputs, output_list(view), api_name="runs_table")
    c.sort.change(viewing, inputs, output_list(view), api_name="runs_sorted")
    compared = {"curves": c.curves, "f1": c.f1, "compare_note": c.compare_note}
    c.compare.change(bind(studio, compare_runs, compared), c.compare, output_list(compared), api_name="compare_runs")
    asking = {"confirm": c.confirm, "confirm_text": c.confirm_text, "pending": c.pending, "status": c.status}
    c.delete.click(bind(studio, ask_delete, asking), c.run, output_list(asking), api_name="ask_delete_run")
    closing = {"confirm": c.confirm, "pending": c.pending, "status": c.status}
    c.confirm_no.click(bind(studio, cancel_delete, closing), None, output_list(closing), api_name="cancel_delete_run")
    deleted = c.confirm_yes.click(
        bind(studio, confirm_delete, closing), c.pending, output_list(closing), api_name="delete_run"
    )
    return deleted.then(viewing, inputs, output_list(view), api_visibility="private")

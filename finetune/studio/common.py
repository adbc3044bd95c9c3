"""What the tabs share: one-line errors, binding handlers to components, run lists, thumbnails, and
running a long engine call so that the event can be cancelled and shows progress."""

from __future__ import annotations

import html
import inspect
import threading
from pathlib import Path
from typing import Callable

import gradio as gr

from ..rundir import run_choices
from .state import Studio


def error(problem: Exception | str) -> gr.Error:
    """A user's problem (FinetuneError) as one line in the UI; API clients get AppError(message).
    Escaped: gradio renders the message as HTML, and it may name the user's files and folders."""
    return gr.Error(html.escape(str(problem), quote=False), print_exception=False)


def warning(message: str) -> None:
    gr.Warning(html.escape(message, quote=False))


def bind(studio: Studio, handler: Callable, outputs: dict | None = None) -> Callable:
    """handler(studio, *inputs) as an event function. With `outputs` ({name: component}), the
    handler returns (or yields) {name: value} and the event gets {component: value}: the order of
    an output list never matters. Generators stay generators, and gradio sees the handler's own
    parameters after `studio` (defaults, gr.Progress)."""

    def convert(result):
        if outputs is None or not isinstance(result, dict) or result == gr.skip():
            return result
        return {outputs[name]: value for name, value in result.items()}

    if inspect.isgeneratorfunction(handler):
        def event(*args, **kwargs):
            steps = handler(studio, *args, **kwargs)
            try:
                for result in steps:
                    yield convert(result)
            finally:
                steps.close()  # a cancelled event: the handler's own finally runs now
    else:
        def event(*args, **kwargs):
            return convert(handler(studio, *args, **kwargs))

    params = list(inspect.signature(handler).parameters.values())[1:]
    event.__signature__ = inspect.Signature(params)
    event.__name__ = event.__qualname__ = handler.__name__
    event.__doc__ = handler.__doc__
    return event


def output_list(outputs: dict) -> list:
    return list(outputs.values())


# ---------------------------------------------------------------------------------------------
# Runs


def run_dropdown(studio: Studio, value: str | None = None) -> gr.Dropdown:
    """The runs that have a model, newest first; `value` stays selected when it is one of them."""
    choices = run_choices(studio.runs_dir, usable_only=True)
    paths = [path for _, path in choices]
    if value not in paths:
        value = paths[0] if paths else None
    return gr.Dropdown(choices=choices, value=value)


def refresh_runs(studio: Studio, current_eval=None, current_predict=None, current_export=None):
    """The run lists of Evaluate, Predict and Export; each keeps its run when it still has a model."""
    return tuple(run_dropdown(studio, value) for value in (current_eval, current_predict, current_export))


def select_trained_run(studio: Studio, current_eval=None, current_predict=None, current_export=None):
    """After a training: the new run in all three lists (when it has a model to use)."""
    job = studio.job
    if job is not None and job.run_dir.joinpath("model.pth").is_file():
        current_eval = current_predict = current_export = str(job.run_dir.resolve())
    return refresh_runs(studio, current_eval, current_predict, current_export)


def latest_runs(studio: Studio):
    return refresh_runs(studio)


def thumbnail(path: Path, size: int = 160):
    from ..data import load_rgb

    image = load_rgb(path, min_size=size)
    image.thumbnail((size, size))
    return image


# ---------------------------------------------------------------------------------------------
# Long calls


class Cancelled(Exception):
    """Raised inside the engine's progress callback when the event was cancelled."""


def run_cancellable(work: Callable[[Callable], object], on_progress: Callable | None = None, poll: float = 0.25):
    """Generator: run `work(report)` in a thread, yield gr.skip() now and then (the points where
    gradio can cancel the event), and return its result (or raise its exception).

    `report(*progress)` is what the engine calls back; it passes the progress on to `on_progress`,
    and once the event is cancelled (the generator closed) it raises Cancelled, which ends the work.
    """
    cancelled = threading.Event()
    box: dict = {}

    def report(*progress):
        if cancelled.is_set():
            raise Cancelled()
        box["progress"] = progress

    def target():
        try:
            box["result"] = work(report)
        except BaseException as problem:  # noqa: BLE001 - handed to the event below
            box["error"] = problem

    thread = threading.Thread(target=target, daemon=True, name="studio-work")
    thread.start()
    try:
        while True:
            thread.join(poll)
            if on_progress is not None and "progress" in box:
                on_progress(*box["progress"])
            if not thread.is_alive():
                break
            yield gr.skip()
    finally:
        cancelled.set()
    if "error" in box:
        raise box["error"]
    return box["result"]

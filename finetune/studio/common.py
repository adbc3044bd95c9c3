"""What the tabs share: one-line errors, binding handlers to components, run lists, thumbnails, and
running a long engine call so that the event can be cancelled and shows progress."""

from __future__ import annotations

import html
import inspect
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from ..config import FinetuneError
from ..names import printable
from ..rundir import run_choices
from .state import Studio


def toast_text(message) -> str:
    """A message for a toast as text: gradio renders toasts as (sanitised) HTML, and a message may
    name the user's files and folders; control characters and bidi overrides shown escaped."""
    return html.escape(printable(message), quote=False)


def error(problem: Exception | str) -> gr.Error:
    """A user's problem (FinetuneError) as one line in the UI; API clients get AppError(message)."""
    return gr.Error(toast_text(problem), print_exception=False)


@contextmanager
def user_errors() -> Iterator[None]:
    """A user's problem (FinetuneError) raised inside becomes the event's one-line error (`error`);
    anything else passes on (to `bind`, which shows it as `unexpected`)."""
    try:
        yield
    except FinetuneError as problem:
        raise error(problem) from None


def warning(message: str) -> None:
    gr.Warning(toast_text(message))


def unexpected(problem: Exception) -> gr.Error:
    """An exception no handler expected (a bug, or an engine error without a FinetuneError): its
    traceback to the server's stderr (escaped: it may quote names), one escaped line to the page.
    Left to gradio, show_error would put str(problem) unescaped into the toast."""
    lines = "".join(traceback.format_exception(problem)).splitlines()
    print("\n".join(printable(line) for line in lines), file=sys.stderr, flush=True)
    return error(f"unexpected error: {type(problem).__name__}: {problem}")


def shielded(problem: Exception) -> Exception:
    """What an event raises for `problem`: gradio's own errors (messages the handlers made safe) as
    they are, anything else as `unexpected`."""
    return problem if isinstance(problem, gr.Error) else unexpected(problem)


def bind(studio: Studio, handler: Callable, outputs: dict | None = None) -> Callable:
    """handler(studio, *inputs) as an event function. With `outputs` ({name: component}), the
    handler returns (or yields) {name: value} and the event gets {component: value}: the order of
    an output list never matters. Generators stay generators, and gradio sees the handler's own
    parameters after `studio` (defaults, gr.Progress). Any exception but a gr.Error (whose message
    the handlers made safe) becomes `unexpected`: one escaped line on the page."""

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
            except Exception as problem:  # noqa: BLE001 - every exception reaches the page escaped
                raise shielded(problem) from None
            finally:
                steps.close()  # a cancelled event: the handler's own finally runs now
    else:

        def event(*args, **kwargs):
            try:
                return convert(handler(studio, *args, **kwargs))
            except Exception as problem:  # noqa: BLE001 - every exception reaches the page escaped
                raise shielded(problem) from None

    params = list(inspect.signature(handler).parameters.values())[1:]
    # function attributes mypy does not know of: `shielded` (its exceptions reach the page escaped; a test
    # checks every event of the app) and the signature gradio reads
    event.shielded = True  # type: ignore[attr-defined]
    event.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
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
    return gr.Dropdown(choices=[(printable(label), path) for label, path in choices], value=value)


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

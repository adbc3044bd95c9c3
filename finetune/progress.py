"""Progress on the screen: consumers of the training events (see finetune.events) for a terminal, a
captured log and a Jupyter notebook.

* `TerminalProgress`: the command line's, and a script's. A tqdm bar (per epoch while training, and
  for the scan before it) on stderr when stderr is a terminal; the events' own lines on stdout. In a
  captured log (stderr not a terminal) there is no bar, whose carriage returns would run into the
  lines, but a plain line now and then during a long epoch or scan.
* `NotebookProgress`: in a Jupyter kernel, a `tqdm.auto` bar (a widget) and the same lines.
* `for_environment()`: the one that fits where the code runs.

Every line goes through names.printable: a class or file name must not drive the terminal, and a
notebook renders ANSI sequences too.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .events import BatchEvent, Event, ProgressEvent, duration, format_event
from .names import printable


def shown(text) -> str:
    """`text` as the terminal gets it: each line through names.printable, so an ESC or BEL in a file,
    class or folder name (clear the screen, set the window title, write the clipboard with OSC 52)
    is shown escaped, never acted on; the line breaks the command itself puts between lines stay.
    Files written (CSV, JSON, reports) keep the real names."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Jupyter, JupyterLab, Colab, Kaggle, VS Code), however it was started:
    IPython's kernel shell is running. A terminal IPython, a script or a pipe is not a notebook."""
    if "IPython" not in sys.modules:  # a kernel has imported it long before any user code runs
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class TerminalProgress:
    """A tqdm bar per epoch (loss, accuracy, images/s, ETA) and for the scan, and the events' own lines.

    `quiet`: no bar and no progress lines; the events' lines go to stderr (the command line's --quiet).
    `bar`: draw the bar (default: when stderr, where it goes, is a terminal); without it, a plain
    progress line every `line_every_s` seconds of a long epoch or scan keeps a captured log alive."""

    line_every_s = 30.0

    def __init__(self, quiet: bool = False, bar: bool | None = None):
        self.quiet = quiet
        self.show_bar = not quiet and (is_terminal(sys.stderr) if bar is None else bar)
        self.bar: Any = None  # the open tqdm bar
        self.bar_for: tuple | None = None  # what the open bar counts: ("epoch", n) or ("progress", what)
        self.run_dir: str | None = None
        self.last_line = time.monotonic()

    # -- output
    def tqdm_class(self):
        from tqdm import tqdm

        return tqdm

    def lines_stream(self):
        return sys.stderr if self.quiet else sys.stdout

    def bar_stream(self):
        return sys.stderr

    def write(self, text: str) -> None:
        """A line (or lines) above the bar, never through it."""
        self.tqdm_class().write(shown(text), file=self.lines_stream())
        self.last_line = time.monotonic()

    def _open_bar(self, key: tuple, total: int | None, desc: str, unit: str):
        if self.bar_for != key:
            self._close_bar()
            # tqdm's own rate would count throttled events: show the loop's instead (in the postfix)
            self.bar = self.tqdm_class()(
                total=total or None,
                desc=desc,
                unit=unit,
                leave=False,
                dynamic_ncols=True,
                file=self.bar_stream(),
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
                if total
                else None,
            )
            self.bar_for = key
        return self.bar

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_for = None, None

    def close(self) -> None:
        """The bar taken off the screen: for work that ended without its last event (an exception)."""
        self._close_bar()

    def _now_and_then(self, text: str) -> None:
        """A plain progress line, at most every line_every_s seconds (none during short work)."""
        if not self.quiet and time.monotonic() - self.last_line >= self.line_every_s:
            self.write(text)

    # -- events
    def __call__(self, event: Event) -> None:
        if event["type"] == "batch":
            self._batch(event)
            return
        if event["type"] == "progress":
            self._progress(event)
            return
        self._close_bar()
        if event["type"] == "start":
            self.run_dir = event["run_dir"]
            self.write(f"run folder: {event['run_dir']}")
        if event["type"] == "error":
            return  # the caller says it once: the command line as "error: ...", the API by raising
        line = format_event(event)
        if line is not None:
            self.write(line)
        metrics = event.get("metrics") if event["type"] == "end" else None
        if metrics:
            from .evaluate import per_class_table

            self.write(per_class_table(metrics))

    def _batch(self, event: BatchEvent) -> None:
        stats = dict(
            loss=f"{event['loss']:.3f}",
            acc=f"{event['acc']:.3f}",
            img_s=f"{event['images_per_s']:.0f}",
            eta=duration(event["eta_s"]),
        )
        if self.show_bar:
            bar = self._open_bar(
                ("epoch", event["epoch"]), event["batches"], f"epoch {event['epoch']}/{event['epochs']}", "batch"
            )
            bar.n = event["batch"]
            bar.set_postfix(stats, refresh=True)
        else:
            self._now_and_then(
                f"epoch {event['epoch']}/{event['epochs']}: batch {event['batch']}/{event['batches']}, "
                + ", ".join(f"{k.replace('_', '/')} {v}" for k, v in stats.items())
            )

    def _progress(self, event: ProgressEvent) -> None:
        what, done, total = event.get("what") or event.get("stage", "working"), event["done"], event.get("total") or 0
        if self.show_bar:
            bar = self._open_bar(("progress", what), total, what, "image" if total else "file")
            bar.n = done
            bar.refresh()
        else:
            self._now_and_then(
                f"{what}: {done:,}/{total:,} ({100 * done // total}%)" if total else f"{what}: {done:,} so far"
            )


class NotebookProgress(TerminalProgress):
    """In a Jupyter kernel: a `tqdm.auto` bar (a widget that updates in place) per epoch and for the scan,
    and one printed line per epoch (and the run's other lines) in the cell's output."""

    def __init__(self):
        super().__init__(quiet=False, bar=True)

    def tqdm_class(self):
        try:
            import ipywidgets  # noqa: F401 - tqdm.notebook draws its bar as a widget
        except ImportError:  # a kernel without widgets: tqdm's text bar, which a cell's output redraws too
            from tqdm import tqdm
        else:
            from tqdm.auto import tqdm
        return tqdm

    def bar_stream(self):
        # a text bar in the same output stream as the lines: a cell shows stdout and stderr as separate blocks
        return sys.stdout


def for_environment(progress: bool = True) -> TerminalProgress | None:
    """The progress consumer for where this runs: a notebook's, a terminal's (or a captured log's), or
    None when `progress` is False."""
    if not progress:
        return None
    return NotebookProgress() if in_notebook() else TerminalProgress()

"""The Review tab's Label mode: which unlabelled images to label next (finetune.suggest), shown one at a
time and labelled with one click.

The user names a pool folder of unlabelled images (a path on the server, as on the Data tab, or an
uploaded .zip extracted into the workspace) and a run. `finetune.suggest` ranks the pool for that
run's model, most uncertain first, without near-copies and without images already in the run's data
or already decided. Each suggested image is shown with the model's best guesses and a few training
images of those classes, and one button per class (for a run of more than MAX_BUTTONS classes: its
likeliest, and a list of all), **Skip** and **None of these**.

Each decision goes at once to the curation file of the run's data folder (the Review tab's,
curation.default_curation_path): a class is an `add` decision (the pool-relative path, the class, the
resolved pool); "none of these" is an `exclude` decision about the pool's file, which training never
reads and `suggest` does not ask about again; Skip records nothing. The pool is only read. Images
reach the browser as PIL thumbnails (gradio's own cache), never as paths into the pool or the data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import FinetuneError
from ..curation import Curation, default_curation_path, load_or_new_curation, save_curation
from ..labels import file_inside
from ..rundir import RunDir, resolve_run
from . import views
from .common import Cancelled, bind, output_list, run_cancellable, run_dropdown, thumbnail, user_errors
from .state import Studio

MAX_BUTTONS = 12  # one button per class up to this many; beyond, buttons for the likeliest and a list
EXAMPLES_PER_CLASS = 3  # training images shown of each of the model's best guesses
GUESSES_SHOWN = 3
DEFAULT_N = 20
MAX_N = 500
THUMB = 360
SIDE_THUMB = 140
NONE_NOTE = "label: none of these classes"
SUGGEST: dict[str, Any] = dict(concurrency_id="suggest", concurrency_limit=1)


@dataclass
class LabelMode:
    run: gr.Dropdown
    pool: gr.Textbox
    pool_zip: gr.File
    n: gr.Number
    suggest_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    position: gr.Markdown
    image: gr.Image
    guesses: gr.Label
    details: gr.Markdown
    examples: gr.Gallery
    slots: list[gr.Button]
    other: gr.Dropdown
    label_btn: gr.Button
    prev_btn: gr.Button
    skip_btn: gr.Button
    none_btn: gr.Button
    state: gr.State
    shown: gr.Textbox  # hidden: the pool path of the image the page shows (a decision names what it was for)


def build(studio: Studio) -> LabelMode:
    """The Label mode's components (inside the Review tab's "Label new images" sub-tab)."""
    gr.Markdown(
        "**Which images should you label next?** Give a folder of unlabelled images (a *pool*) and a "
        "trained run: the run's model picks the images it is least sure about (no near-copies, none "
        "it trained on). Click the right class for each: it is saved at once to the curation file, "
        "and the next training on this data adds those images. The pool is never changed or copied.",
        elem_id="label_help",
    )
    with gr.Row():
        pool = gr.Textbox(
            label="Pool folder on this computer (server): unlabelled images",
            info=f"A relative path means a folder in {studio.base_dir}.",
            elem_id="label_pool",
            scale=4,
        )
        pool_zip = gr.File(
            label="…or drop a .zip of images",
            file_types=[".zip"],
            type="filepath",
            elem_id="label_pool_zip",
            scale=2,
            height=140,
        )
    with gr.Row():
        run = gr.Dropdown(label="Run (its model ranks the pool)", choices=[], elem_id="label_run", scale=4)
        n = gr.Number(value=DEFAULT_N, label="How many", precision=0, minimum=1, maximum=MAX_N, elem_id="label_n")
        suggest_btn = gr.Button("Suggest images to label", variant="primary", elem_id="label_suggest_btn")
        cancel_btn = gr.Button("Cancel", elem_id="label_cancel_btn")
    status = gr.Markdown(elem_id="label_status")
    position = gr.Markdown(elem_id="label_position")
    with gr.Row():
        image = gr.Image(
            label="Image to label", type="pil", interactive=False, elem_id="label_image", height=THUMB, scale=2
        )
        with gr.Column(scale=3):
            guesses = gr.Label(label="The model's best guesses", num_top_classes=GUESSES_SHOWN, elem_id="label_guesses")
            details = gr.Markdown(elem_id="label_details")
            examples = gr.Gallery(
                label="Training images of those classes",
                columns=EXAMPLES_PER_CLASS * 2,
                height=SIDE_THUMB + 60,
                object_fit="contain",
                allow_preview=False,
                elem_id="label_examples",
            )
    controls = _controls()
    shown = gr.Textbox(visible="hidden", elem_id="label_shown")
    return LabelMode(run, pool, pool_zip, n, suggest_btn, cancel_btn, status, position, image, guesses, details,
                     examples, *controls, gr.State(None), shown)  # fmt: skip


def _controls() -> tuple[list[gr.Button], gr.Dropdown, gr.Button, gr.Button, gr.Button, gr.Button]:
    """One button per class (filled in per run), a list of every class, and Previous, Skip, None of these."""
    with gr.Row(elem_id="label_classes"):
        slots = [
            gr.Button(visible=False, elem_id=f"label_class_{i}", min_width=100, variant="primary")
            for i in range(MAX_BUTTONS)
        ]
    with gr.Row():
        prev_btn = gr.Button("← Previous", elem_id="label_prev", interactive=False)
        other = gr.Dropdown(label="Any class", choices=[], elem_id="label_other", min_width=160)
        label_btn = gr.Button("Label as this class", elem_id="label_as", interactive=False)
        skip_btn = gr.Button("Skip", elem_id="label_skip", interactive=False)
        none_btn = gr.Button("None of these", variant="stop", elem_id="label_none", interactive=False)
    return slots, other, label_btn, prev_btn, skip_btn, none_btn


# ---------------------------------------------------------------------------------------------
# The session


@dataclass
class Labelling:
    """The Label mode's state between clicks (a gr.State, which copies it): the suggestions for one
    pool and run, where the user is among them, and the curation file the decisions go to."""

    run: str
    pool: str  # the pool folder, absolute and resolved (as curation decisions name it)
    data: str  # the run's data folder (the curation file is that folder's)
    classes: list[str]
    curation: str
    items: list[dict]  # {"path": pool-relative, "uncertainty", "top": [(class, probability), ...] every class}
    examples: dict[str, list[str]]  # a few training images of each class, absolute paths
    index: int = 0

    @property
    def item(self) -> dict:
        return self.items[self.index]

    def at(self, index: int) -> Labelling:
        """The same session showing item `index` (up to one past the last: all done)."""
        return replace(self, index=max(0, min(len(self.items), index)))

    @property
    def done(self) -> bool:
        return self.index >= len(self.items)

    def slot_classes(self) -> list[str]:
        """The classes of the class buttons: every class in the run's order, or for a run of more
        than MAX_BUTTONS classes, the likeliest for the image on show."""
        if len(self.classes) <= MAX_BUTTONS or self.done:
            return self.classes[:MAX_BUTTONS]
        return [name for name, _ in self.item["top"][:MAX_BUTTONS]]


def training_examples(scan, per_class: int = EXAMPLES_PER_CLASS) -> dict[str, list[str]]:
    """A few training images of each class of a run's split (absolute paths)."""
    examples: dict[str, list[str]] = {name: [] for name in scan.classes}
    root = Path(scan.root)
    for rel, label in scan.train:
        bucket = examples[scan.classes[label]]
        if len(bucket) < per_class:
            bucket.append(str(root / rel))
    return examples


def pool_folder(studio: Studio, text: str | None) -> Path:
    """The pool the user typed (relative: in the app's working directory), resolved; a folder."""
    text = (text or "").strip()
    if not text:
        raise FinetuneError("type the pool folder (unlabelled images) on the server, or drop a .zip of them")
    pool = studio.resolve_path(text)
    if not pool.is_dir():
        raise FinetuneError(f"pool folder not found: {pool}")
    return pool


def count(n: object) -> int:
    try:
        value = int(n)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise FinetuneError(f"how many images to suggest must be a whole number, got {n!r}") from None
    if not 1 <= value <= MAX_N:
        raise FinetuneError(f"how many images to suggest must be between 1 and {MAX_N}, got {value}")
    return value


def start_session(studio: Studio, run: str | None, pool_text: str | None, n: object) -> tuple[Labelling, dict]:
    """Everything a suggestion needs, checked before the model runs: (an empty session, suggest's
    arguments). The curation file is the run's data folder's."""
    run_dir = resolve_run(run, studio.runs_dir)
    pool = pool_folder(studio, pool_text)
    scan = RunDir(run_dir).read_split()
    path = default_curation_path(studio.runs_dir, scan.root)
    curation = load_or_new_curation(path, scan.root)
    session = Labelling(
        run=str(run_dir),
        pool=str(pool),
        data=str(scan.root),
        classes=list(scan.classes),
        curation=str(path),
        items=[],
        examples=training_examples(scan),
    )
    return session, {"run": run_dir, "pool": pool, "n": count(n), "curation": curation}


# ---------------------------------------------------------------------------------------------
# Handlers


def suggest_pool(studio: Studio, run: str | None = None, pool: str | None = None, n=DEFAULT_N, progress=gr.Progress()):
    """Rank the pool for the run's model (in a thread: cancellable, other tabs keep working), then
    show the first suggested image."""
    from ..suggest import suggest

    with user_errors():
        session, arguments = start_session(studio, run, pool, n)
    studio.workspace.touch(session.pool)
    lines: list[str] = []
    choice = studio.inference_choice("ranking the pool")
    if choice.note:
        lines.append(choice.note)

    def work(report):
        def log(line: str) -> None:
            lines.append(line)
            report()

        return suggest(**arguments, device=str(choice.device), top_k=len(session.classes), log=log)

    progress((0, None), desc="Scoring the pool with the run's model", unit="images")
    steps = run_cancellable(work)
    with user_errors():
        try:
            suggestions, skipped = yield from steps
        except Cancelled:
            raise gr.Error("Suggestion cancelled.") from None
    session.items = [{"path": s.path, "uncertainty": s.uncertainty, "top": list(s.top)} for s in suggestions]
    status = views.label_status(session.pool, session.run, len(session.items), lines, skipped)
    yield {"status": status, **render(session, arguments["curation"])}


def upload_pool(studio: Studio, file=None):
    """An uploaded .zip of unlabelled images, extracted into the workspace (its images only): its
    folder goes into the pool box."""
    if not file:
        return gr.skip()
    path = Path(file if isinstance(file, str) else file.name)
    with user_errors():
        extraction = studio.workspace.extract_dataset(path, keep=studio.in_use())
    return str(extraction.root)


def runs_list(studio: Studio, current: str | None = None) -> gr.Dropdown:
    """The runs with a model, newest first (refreshed when the tab is opened)."""
    return run_dropdown(studio, current)


def label_as(
    studio: Studio, session: Labelling | None = None, label: str | None = None, shown: str | None = None
) -> dict:
    """Save the image on show as an `add` of class `label` (at once), and show the next. `shown`: the
    image the page showed when clicked (see `current`)."""
    session = current(session, shown)
    if label not in session.classes:
        raise gr.Error("Choose one of the run's classes.")
    return record(studio, session, "add", label)


def label_slot(studio: Studio, session: Labelling | None = None, slot: int = 0, shown: str | None = None) -> dict:
    """A class button: the class shown on button `slot`."""
    classes = current(session, shown).slot_classes()
    if not 0 <= int(slot) < len(classes):
        raise gr.Error("That button has no class.")
    return label_as(studio, session, classes[int(slot)], shown)


def none_of_these(studio: Studio, session: Labelling | None = None, shown: str | None = None) -> dict:
    """The image is of none of the classes: an `exclude` of the pool's file (never trained on, never
    suggested again)."""
    return record(studio, current(session, shown), "exclude", None, NONE_NOTE)


def skip_image(studio: Studio, session: Labelling | None = None) -> dict:
    """Nothing is recorded: the next image (a later suggestion may show this one again)."""
    session = current(session)
    return render(session.at(session.index + 1))


def previous_image(studio: Studio, session: Labelling | None = None) -> dict:
    if not session or not session.items:
        return render(session)
    return render(session.at(session.index - 1))


def current(session: Labelling | None, shown: str | None = None) -> Labelling:
    """The session, with an image on show. `shown` (the page's hidden label_shown, None: not checked)
    must be that image: a second click before the page showed the next image (two buttons, the
    queue keeps them in order) would otherwise decide an image the user has not seen."""
    if not session or not session.items:
        raise gr.Error("Press 'Suggest images to label' first: there is no image to label yet.")
    if shown is not None and (session.done or shown != session.item["path"]):
        raise gr.Error("That click was for the image before: nothing saved. Decide the image on show.")
    if session.done:
        raise gr.Error("Every suggested image is done: suggest more, or go back with Previous.")
    return session


def record(studio: Studio, session: Labelling, action: str, label: str | None, note: str | None = None) -> dict:
    """One decision about the image on show, saved at once; then the next image. An uploaded pool is
    marked as used (the workspace keeps it a day from now)."""
    item = session.item
    if note is None:
        guess, probability = item["top"][0]
        note = f"label: model's guess {guess} ({probability:.0%}), uncertainty {item['uncertainty']:.2f}"
    with user_errors():
        curation = load_or_new_curation(session.curation, session.data)
        curation.set(item["path"], action, label, note, pool=session.pool)
        save_curation(curation, session.curation)
    studio.workspace.touch(session.pool)
    return {**render(session.at(session.index + 1), curation), "train_curation": session.curation}


# ---------------------------------------------------------------------------------------------
# Showing one image


def render(session: Labelling | None, curation: Curation | None = None) -> dict:
    """The outputs that show the session's current image, its guesses and its buttons."""
    if not session:
        return {**_empty(""), **_slots([]), "state": None, "other": gr.Dropdown(choices=[], value=None), "shown": ""}
    if curation is None:
        with user_errors():
            curation = load_or_new_curation(session.curation, session.data)
    decided = curation.of_pool(session.pool)
    total, done = len(session.items), sum(1 for i in session.items if i["path"] in decided)
    common = {
        "state": session,
        "other": _class_list(session.classes),
        "shown": "" if session.done else session.item["path"],
    }
    if session.done:
        message = views.label_finished(total, done, session.curation, session.data)
        return {**common, **_empty(message, back=total > 0), **_slots([])}
    item = session.item
    return {
        **common,
        "position": views.label_position(session.index, total, done),
        "image": _picture(session, item),
        "guesses": {views.plain(name): probability for name, probability in item["top"][:GUESSES_SHOWN]},
        "details": views.label_details(item, decided.get(item["path"]), session.curation),
        "examples": _examples(session, item),
        **_slots(session.slot_classes()),
        **_moves(session.index > 0, True),
    }


def _empty(position: str, back: bool = False) -> dict:
    return {"position": position, "image": None, "guesses": None, "details": "", "examples": [], **_moves(back, False)}


def _moves(back: bool, decide: bool) -> dict:
    return {
        "prev_btn": gr.Button(interactive=back),
        **{name: gr.Button(interactive=decide) for name in ("label_btn", "skip_btn", "none_btn")},
    }


def _slots(classes: list[str]) -> dict:
    """The class buttons: each shows its class as text; the rest hidden."""
    return {
        f"slot_{i}": gr.Button(value=views.plain(classes[i]), visible=True, interactive=True)
        if i < len(classes)
        else gr.Button(visible=False)
        for i in range(MAX_BUTTONS)
    }


def _class_list(classes: list[str]) -> gr.Dropdown:
    """Every class of the run: shown as text, its value the class's real name."""
    return gr.Dropdown(choices=[(views.plain(name), name) for name in classes], value=None)


def _picture(session: Labelling, item: dict):
    """The pool image as a thumbnail, when it may be read (inside the pool after links, a file)."""
    from .review_tab import enlarged

    pool = Path(session.pool)
    if file_inside(pool, item["path"], "the pool") is not None:
        return None
    try:
        return enlarged(thumbnail(pool / item["path"], THUMB), THUMB)
    except Exception:  # noqa: BLE001 - moved or unreadable since the suggestion: shown as no image
        return None


def _examples(session: Labelling, item: dict) -> list:
    """A few training images of each of the model's best guesses, captioned with the class."""
    shown = []
    for name, _ in item["top"][:GUESSES_SHOWN]:
        for path in session.examples.get(name, []):
            try:
                shown.append((thumbnail(Path(path), SIDE_THUMB), views.plain(name)))
            except Exception:  # noqa: BLE001 - a missing example is not worth an error
                continue
    return shown


# ---------------------------------------------------------------------------------------------
# Events


def outputs(c: LabelMode) -> dict:
    shown: dict[str, Any] = {
        "state": c.state,
        "position": c.position,
        "image": c.image,
        "guesses": c.guesses,
        "details": c.details,
        "examples": c.examples,
        "other": c.other,
        "prev_btn": c.prev_btn,
        "label_btn": c.label_btn,
        "skip_btn": c.skip_btn,
        "none_btn": c.none_btn,
        "shown": c.shown,
    }
    return {**shown, **{f"slot_{i}": button for i, button in enumerate(c.slots)}}


def wire(studio: Studio, c: LabelMode, tab: gr.Tab, train_curation: gr.Textbox) -> None:
    """`tab`: the sub-tab (opening it refreshes the runs); `train_curation`: the Train tab's curation
    field, set to the curation file once a decision is saved."""
    shown = outputs(c)
    suggesting = {**shown, "status": c.status}
    event = c.suggest_btn.click(
        bind(studio, suggest_pool, suggesting),
        [c.run, c.pool, c.n],
        output_list(suggesting),
        api_name="label_suggest",
        show_progress_on=[c.status],
        **SUGGEST,
    )
    c.cancel_btn.click(None, None, None, cancels=[event], api_visibility="private")
    c.pool_zip.upload(bind(studio, upload_pool), c.pool_zip, c.pool, api_name="label_upload_pool")
    c.prev_btn.click(bind(studio, previous_image, shown), c.state, output_list(shown), api_name="label_previous")
    c.skip_btn.click(bind(studio, skip_image, shown), c.state, output_list(shown), api_name="label_skip")
    deciding = {**shown, "train_curation": train_curation}
    decide: dict[str, Any] = dict(concurrency_id="review_decide", concurrency_limit=1)
    for button, handler, inputs, name in (
        (c.label_btn, label_as, [c.state, c.other, c.shown], "label_as"),
        (c.none_btn, none_of_these, [c.state, c.shown], "label_none_of_these"),
    ):
        button.click(bind(studio, handler, deciding), inputs, output_list(deciding), api_name=name, **decide)
    for slot, button in enumerate(c.slots):
        button.click(
            bind(studio, label_slot, deciding),
            [c.state, gr.State(slot), c.shown],
            output_list(deciding),
            api_visibility="private",
            **decide,
        )
    tab.select(bind(studio, runs_list), c.run, c.run, api_visibility="private", show_progress="hidden")

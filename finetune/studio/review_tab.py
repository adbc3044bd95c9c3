"""Review: the data doctor on the chosen folder, then its findings one at a time, each decided with
Keep, Exclude or Relabel. Decisions go straight to a curation file next to the runs (see
finetune.curation); the dataset folder is only read, never changed. Training applies the file
(the Train tab's curation field).

Order: likely label errors (most suspicious first), duplicate groups (those leaking between splits
first), then other problems of single images. An image kept once is not shown again on the next run.
Images reach the browser as PIL thumbnails (gradio's own cache), never as paths into the dataset.

Its second sub-tab, **Label new images**, is label_mode: the images of an unlabelled pool a run's
model would learn the most from, labelled one click each into the same curation file.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr

from ..architectures import architecture
from ..config import FinetuneError, TrainConfig
from ..curation import (
    SPLIT_ORDER,
    add_decisions,
    default_curation_path,
    leak_decisions,
    load_or_new_curation,
    save_curation,
)
from ..rundir import RunDir, resolve_run, run_choices
from . import label_mode, views
from .common import Cancelled, bind, output_list, run_cancellable, thumbnail, user_errors
from .state import Studio

IMAGE_SIZE: int | None = None  # the doctor's image size for ImageNet / random features (None: 224)
EXAMPLES_PER_CLASS = 4  # images of the suggested class shown beside a label issue
THUMB = 360
SIDE_THUMB = 160
DOCTOR: dict[str, Any] = dict(concurrency_id="doctor", concurrency_limit=1)


@dataclass
class ReviewTab:
    tab: gr.Tab
    data: gr.Textbox
    backbone: gr.Dropdown
    run_btn: gr.Button
    cancel_btn: gr.Button
    log: gr.Textbox
    summary: gr.Markdown
    curation: gr.Markdown
    leak_btn: gr.Button
    position: gr.Markdown
    image: gr.Image
    others: gr.Gallery
    details: gr.Markdown
    prev_btn: gr.Button
    next_btn: gr.Button
    keep_btn: gr.Button
    exclude_btn: gr.Button
    relabel_to: gr.Dropdown
    relabel_btn: gr.Button
    state: gr.State
    label_tab: gr.Tab  # the Label mode's sub-tab
    label: label_mode.LabelMode


def build(studio: Studio) -> ReviewTab:
    """Two modes, as sub-tabs: the doctor's findings, and labelling new images (label_mode)."""
    with gr.Tab("1b. Review", id="review", elem_id="tab_review") as tab, gr.Tabs(elem_id="review_modes"):
        with gr.Tab("Findings", id="review_findings", elem_id="review_findings_tab"):
            findings = _findings(studio)
        with gr.Tab("Label new images", id="review_label", elem_id="review_label_tab") as label_tab:
            label = label_mode.build(studio)
    return ReviewTab(tab=tab, label_tab=label_tab, label=label, **findings)


def _findings(studio: Studio) -> dict[str, Any]:
    """The doctor's mode: its inputs, progress, summary, the finding on show and the decisions (by
    their names in ReviewTab)."""
    gr.Markdown(
        "The **data doctor** looks for likely label errors, duplicates (and copies that leak from "
        "training into validation) and odd images. Decide each finding: your choices are saved as a "
        "curation file next to the runs, which training applies. Your folder is never changed.",
        elem_id="review_help",
    )
    with gr.Row():
        data = gr.Textbox(
            value=studio.default_data,
            label="Data folder (the one chosen on the Data tab)",
            elem_id="review_data",
            scale=4,
        )
        backbone = gr.Dropdown(
            backbone_choices(studio),
            value=default_backbone(studio),
            label="Features from",
            elem_id="review_backbone",
            scale=3,
        )
    with gr.Row():
        run_btn = gr.Button("Run doctor", variant="primary", elem_id="review_run_btn")
        cancel_btn = gr.Button("Cancel", elem_id="review_cancel_btn")
    log = gr.Textbox(label="Progress", lines=4, max_lines=8, autoscroll=True, interactive=False, elem_id="review_log")
    summary = gr.Markdown(elem_id="review_summary")
    with gr.Row():
        curation = gr.Markdown(elem_id="review_curation")
        leak_btn = gr.Button(
            "Exclude all leaking val copies", elem_id="review_leak_btn", interactive=False, scale=0, min_width=260
        )
    position, image, others, details = _finding()
    prev_btn, next_btn, keep_btn, exclude_btn, relabel_to, relabel_btn = _decisions()
    state = gr.State(None)
    return dict(
        data=data, backbone=backbone, run_btn=run_btn, cancel_btn=cancel_btn, log=log, summary=summary,
        curation=curation, leak_btn=leak_btn, position=position, image=image, others=others, details=details,
        prev_btn=prev_btn, next_btn=next_btn, keep_btn=keep_btn, exclude_btn=exclude_btn, relabel_to=relabel_to,
        relabel_btn=relabel_btn, state=state,
    )  # fmt: skip


def _finding() -> tuple[gr.Markdown, gr.Image, gr.Gallery, gr.Markdown]:
    """The finding on show: where it is in the list, the image, what is beside it (in ReviewTab's order)."""
    position = gr.Markdown(elem_id="review_position")
    with gr.Row():
        image = gr.Image(
            label="Flagged image", type="pil", interactive=False, elem_id="review_image", height=THUMB, scale=2
        )
        with gr.Column(scale=3):
            details = gr.Markdown(elem_id="review_details")
            others = gr.Gallery(
                label="Beside it",
                columns=4,
                height=SIDE_THUMB + 60,
                object_fit="contain",
                allow_preview=False,
                elem_id="review_others",
            )
    return position, image, others, details


def _decisions() -> tuple[gr.Button, gr.Button, gr.Button, gr.Button, gr.Dropdown, gr.Button]:
    """The decision buttons, in ReviewTab's order."""
    with gr.Row():
        prev_btn = gr.Button("← Previous", elem_id="review_prev", interactive=False)
        keep_btn = gr.Button("Keep", elem_id="review_keep", interactive=False)
        exclude_btn = gr.Button("Exclude", variant="stop", elem_id="review_exclude", interactive=False)
        relabel_to = gr.Dropdown(label="Relabel to", choices=[], elem_id="review_relabel_to", min_width=160)
        relabel_btn = gr.Button("Relabel", elem_id="review_relabel", interactive=False)
        next_btn = gr.Button("Next →", elem_id="review_next", interactive=False)
    return prev_btn, next_btn, keep_btn, exclude_btn, relabel_to, relabel_btn


# ---------------------------------------------------------------------------------------------
# The backbone


def imagenet_ready(arch: str = TrainConfig.arch) -> bool:
    from ..model import weights_available

    return weights_available(arch, "imagenet")[0]


def backbone_choices(studio: Studio) -> list[tuple[str, str]]:
    imagenet = f"ImageNet {architecture(TrainConfig.arch).title} "
    imagenet += "(recommended)" if imagenet_ready() else "(weights not on this machine)"
    return [(imagenet, "imagenet"), ("None: random features (rough; works offline)", "none")] + [
        (f"Run: {views.plain(label)}", path) for label, path in run_choices(studio.runs_dir, usable_only=True)
    ]


def default_backbone(studio: Studio) -> str:
    return "imagenet" if imagenet_ready() else "none"


def refresh_backbones(studio: Studio, current: str | None = None) -> gr.Dropdown:
    choices = backbone_choices(studio)
    values = [value for _, value in choices]
    return gr.Dropdown(choices=choices, value=current if current in values else default_backbone(studio))


# ---------------------------------------------------------------------------------------------
# Findings -> items to review


def review_items(report: dict, examples: dict[str, list[str]], kept: AbstractSet[str] = frozenset()) -> list[dict]:
    """The findings in review order, one item per flagged image (a duplicate group: one item, shown on
    the copy that would go); items whose image was kept in an earlier review are left out."""
    items = []
    for issue in sorted(report["label_issues"], key=lambda i: i["score"]):
        items.append(
            {
                "kind": "label",
                "path": issue["path"],
                "split": issue["split"],
                "given": issue["given"],
                "suggested": issue["suggested"],
                "score": issue["score"],
                "probability": issue["suggested_probability"],
                "others": [(p, issue["suggested"]) for p in examples.get(issue["suggested"], []) if p != issue["path"]][
                    :EXAMPLES_PER_CLASS
                ],
            }
        )
    for group in sorted(report["duplicate_groups"], key=lambda g: not g["leak"]):
        members = list(zip(group["paths"], group["splits"], group["classes"], strict=True))
        focus = duplicate_focus(group)
        path, split, name = members[focus]
        items.append(
            {
                "kind": "duplicate",
                "path": path,
                "split": split,
                "given": name,
                "group_kind": group["kind"],
                "leak": group["leak"],
                "conflict": group["conflict"],
                "others": [(p, f"{s} · {c}") for i, (p, s, c) in enumerate(members) if i != focus],
            }
        )
    for issue in report["other_issues"]:
        if issue.get("path"):  # a class-level problem (a small class) is in the summary, not an image to decide
            items.append(
                {
                    "kind": "other",
                    "path": issue["path"],
                    "split": issue["split"],
                    "given": issue["class"],
                    "problem": issue["problem"],
                    "detail": issue["detail"],
                    "others": [],
                }
            )
    return [item for item in items if item["path"] not in kept]


@dataclass
class Review:
    """The tab's state between clicks (a gr.State, which copies it): the doctor's findings on one folder
    as items to decide, where the user is among them, and the curation file the decisions go to."""

    data: str  # the folder's root
    classes: list[str]
    curation: str  # the curation file
    items: list[dict]  # review_items
    index: int = 0  # the item shown
    groups: list[dict] = field(default_factory=list)  # the duplicate groups (to exclude every leak at once)
    leaks: int = 0  # groups that leak between splits
    kept_before: int = 0  # flagged images kept in an earlier review, left out of the items

    @classmethod
    def of(cls, scan, found: dict, curation: Path, kept: set[str]) -> Review:
        """The review of a doctor's report (`found`: its to_dict()) on `scan`; images in `kept` are not shown."""
        flagged = {i["path"] for i in found["label_issues"]}
        groups = found["duplicate_groups"]
        return cls(
            data=str(scan.root),
            classes=list(scan.classes),
            curation=str(curation),
            items=review_items(found, class_examples(scan, flagged), kept),
            groups=groups,
            leaks=sum(g["leak"] for g in groups),
            kept_before=len(kept & _flagged_paths(found)),
        )

    @property
    def item(self) -> dict:
        return self.items[self.index]

    def at(self, index: int) -> Review:
        """The same review showing item `index` (kept within the items)."""
        return replace(self, index=max(0, min(len(self.items) - 1, index)))


def duplicate_focus(group: dict) -> int:
    """The member a decision is about: the first copy outside the earliest split (a leak), else the second."""
    splits = group["splits"]
    first = min(splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))
    outside = [i for i, s in enumerate(splits) if s != first]
    return outside[0] if outside else min(1, len(splits) - 1)


def class_examples(scan, flagged: set[str], per_class: int = EXAMPLES_PER_CLASS) -> dict[str, list[str]]:
    """A few training images of each class (not themselves flagged), to show beside a label issue."""
    examples: dict[str, list[str]] = {name: [] for name in scan.classes}
    for rel, label in list(scan.train) + list(scan.val):
        bucket = examples[scan.classes[label]]
        if len(bucket) < per_class and rel not in flagged:
            bucket.append(rel)
    return examples


# ---------------------------------------------------------------------------------------------
# The curation file


def curation_path(studio: Studio, root: str | Path) -> Path:
    return default_curation_path(studio.runs_dir, root)


def curation_for(studio: Studio, data: str | None) -> str:
    """The Review tab's curation file for `data` when it holds decisions for that folder, else ""."""
    text = (data or "").strip()
    if not text:
        return ""
    root = studio.resolve_path(text)
    path = curation_path(studio, root)
    try:
        curation = load_or_new_curation(path, root)
    except FinetuneError:
        return ""
    same = Path(curation.data).expanduser().resolve() == root
    return str(path) if same and curation.decisions and path.is_file() else ""


# ---------------------------------------------------------------------------------------------
# Handlers


def run_review(studio: Studio, data: str | None = None, backbone: str | None = "imagenet", progress=gr.Progress()):
    """Scan the folder and run the doctor (in a thread: cancellable, other tabs keep working); stream its
    progress lines, then show the summary and the first finding."""
    text = (data or "").strip()
    if not text:
        raise gr.Error("Choose a data folder first (Data tab, or type it here).")
    root = studio.resolve_path(text)
    lines: list[str] = []

    def work(report):
        def log(line: str) -> None:
            lines.append(line)
            report("log", 0, 0)

        return doctor_folder(studio, root, backbone or "imagenet", log, report)

    def show(stage, done, total):
        if stage != "log":
            progress(
                (done, total or None),
                desc=views.scan_progress(stage, done, total),
                unit="images" if stage == "check" else "files",
            )

    steps = run_cancellable(work, show)
    shown = 0
    with user_errors():
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as finished:
                    scan, report = finished.value
                    break
                if len(lines) != shown:
                    shown = len(lines)
                    yield {"log": "\n".join(map(views.plain, lines))}
                else:
                    yield gr.skip()
        except Cancelled:
            raise gr.Error("Review cancelled.") from None
        finally:
            steps.close()
    studio.workspace.touch(scan.root)
    path = curation_path(studio, scan.root)
    with user_errors():
        curation = load_or_new_curation(path, scan.root)
    review = Review.of(scan, report.to_dict(), path, kept={d.path for d in curation.decisions if d.action == "keep"})
    lines.append(f"done: {len(review.items)} finding(s) to review")
    yield {
        "log": "\n".join(map(views.plain, lines)),
        "summary": views.review_summary(report, review.kept_before),
        **render(review, curation),
    }


def doctor_folder(studio: Studio, root: Path, backbone: str, log, report):
    """The scan of `root` and the doctor's report on it, with features from `backbone` ("imagenet",
    "none" or a run folder; a run's split is the one it trained on)."""
    from ..data import scan_dataset
    from ..data_doctor import default_cache_dir, run_doctor

    run_dir = None
    split: dict = {}  # without a run: scan_dataset's defaults, which are training's (TrainConfig)
    if backbone not in ("imagenet", "none"):
        run_dir = resolve_run(backbone, studio.runs_dir)
        config = RunDir(run_dir).info().get("config") or {}
        split = {key: config[key] for key in ("val_fraction", "seed") if key in config}
    log(f"scanning {root}")
    scan = scan_dataset(root, **split, max_files=studio.max_scan_files, on_progress=report)
    choice = studio.inference_choice("computing the image features")
    if choice.note:  # the GPU is a training's: said in this review's log
        log(choice.note)
    result = run_doctor(
        scan,
        run=run_dir,
        weights="imagenet" if run_dir else backbone,
        image_size=None if run_dir else IMAGE_SIZE,
        device=str(choice.device),
        cache_dir=default_cache_dir(),
        log=log,
    )
    return scan, result


def _flagged_paths(found: dict) -> set[str]:
    paths = {i["path"] for i in found["label_issues"]} | {i["path"] for i in found["other_issues"] if i.get("path")}
    for group in found["duplicate_groups"]:
        paths.add(group["paths"][duplicate_focus(group)])
    return paths


def render(review: Review | None, curation=None) -> dict:
    """The outputs that show the current item (and the curation file line) of `review`."""
    if not review:
        return {
            "state": None,
            "curation": "",
            "position": "",
            "image": None,
            "others": [],
            "details": "",
            "relabel_to": gr.Dropdown(choices=[], value=None),
            **_buttons(False, False, False),
        }
    if curation is None:
        curation = load_or_new_curation(review.curation, review.data)
    decisions = curation.by_path()
    items, index = review.items, review.index
    outputs = {
        "state": review,
        "curation": views.curation_line(review.curation, len(curation.decisions)),
        "leak_btn": gr.Button(interactive=review.leaks > 0),
    }
    if not items:
        return {
            **outputs,
            "position": views.NOTHING_TO_REVIEW,
            "image": None,
            "others": [],
            "details": "",
            "relabel_to": class_dropdown(review.classes),
            **_buttons(False, False, False),
        }
    item = review.item
    root = Path(review.data)
    done = sum(1 for i in items if i["path"] in decisions)
    others = []
    for rel, caption in item["others"]:
        try:
            others.append((thumbnail(root / rel, SIDE_THUMB), views.plain(caption)))
        except Exception:  # noqa: BLE001 - a missing neighbour is not worth an error
            continue
    try:
        picture = enlarged(thumbnail(root / item["path"], THUMB), THUMB)
    except Exception as problem:  # noqa: BLE001 - moved, or unreadable (which may be the finding itself)
        picture = None
        item = {**item, "unreadable": f"{type(problem).__name__}: {problem}"}
    relabel = item.get("suggested") if item["kind"] == "label" else item.get("given")
    return {
        **outputs,
        "position": views.review_position(index, len(items), item, done),
        "image": picture,
        "others": others,
        "details": views.review_details(item, decisions.get(item["path"])),
        "relabel_to": class_dropdown(review.classes, relabel),
        **_buttons(index > 0, index < len(items) - 1, True),
    }


def class_dropdown(classes: list[str], value: str | None = None) -> gr.Dropdown:
    """The classes to relabel to: each shown as text, its value the class's real name."""
    return gr.Dropdown(choices=[(views.plain(name), name) for name in classes], value=value)


def enlarged(image, size: int):
    """A small image scaled up (by whole pixels) to about `size`, so that it can be looked at."""
    factor = size // max(image.size)
    if factor < 2:
        return image
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _buttons(back: bool, forward: bool, decide: bool) -> dict:
    return {
        "prev_btn": gr.Button(interactive=back),
        "next_btn": gr.Button(interactive=forward),
        **{name: gr.Button(interactive=decide) for name in ("keep_btn", "exclude_btn", "relabel_btn")},
    }


def step(studio: Studio, review: Review | None = None, delta: int = 1) -> dict:
    if not review or not review.items:
        return render(review)
    return render(review.at(review.index + int(delta)))


def previous_item(studio: Studio, review: Review | None = None) -> dict:
    return step(studio, review, -1)


def next_item(studio: Studio, review: Review | None = None) -> dict:
    return step(studio, review, 1)


def decide(studio: Studio, review: Review | None = None, action: str = "keep", label: str | None = None) -> dict:
    """Record a decision about the current item's image in the curation file (at once), and move on."""
    if not review or not review.items:
        raise gr.Error("Run the doctor first: there is nothing to decide yet.")
    item = review.item
    note = views.decision_note(item)
    with user_errors():
        if action == "relabel":
            if label not in review.classes:
                raise FinetuneError(f"choose the class to relabel {item['path']} to")
            if label == item["given"]:
                action, label = "keep", None  # the class it already has
        curation = load_or_new_curation(review.curation, review.data)
        curation.set(item["path"], action, label, note)
        save_curation(curation, review.curation)
    return {**render(review.at(review.index + 1), curation), "train_curation": review.curation}


def keep_item(studio: Studio, review: Review | None = None) -> dict:
    return decide(studio, review, "keep")


def exclude_item(studio: Studio, review: Review | None = None) -> dict:
    return decide(studio, review, "exclude")


def relabel_item(studio: Studio, review: Review | None = None, label: str | None = None) -> dict:
    return decide(studio, review, "relabel", label)


def exclude_leaks(studio: Studio, review: Review | None = None) -> dict:
    """Exclude the val/test copy of every group that leaks between splits (curation.leak_decisions)."""
    if not review:
        raise gr.Error("Run the doctor first.")
    decisions = leak_decisions(review.groups)
    if not decisions:
        raise gr.Error("No duplicates leak between the splits.")
    with user_errors():
        curation = add_decisions(load_or_new_curation(review.curation, review.data), decisions)
        save_curation(curation, review.curation)
    gr.Info(f"Excluded {len(decisions)} leaking cop{'y' if len(decisions) == 1 else 'ies'} from validation/test.")
    return {**render(review, curation), "train_curation": review.curation}


def follow_data(studio: Studio, path: str | None = None):
    """The Data tab's folder, mirrored here."""
    return path if (path or "").strip() else gr.skip()


# ---------------------------------------------------------------------------------------------
# Events


def item_outputs(c: ReviewTab) -> dict:
    return {
        "state": c.state,
        "curation": c.curation,
        "leak_btn": c.leak_btn,
        "position": c.position,
        "image": c.image,
        "others": c.others,
        "details": c.details,
        "relabel_to": c.relabel_to,
        "prev_btn": c.prev_btn,
        "next_btn": c.next_btn,
        "keep_btn": c.keep_btn,
        "exclude_btn": c.exclude_btn,
        "relabel_btn": c.relabel_btn,
    }


def wire(studio: Studio, c: ReviewTab, data_path: gr.Textbox, train_curation: gr.Textbox) -> None:
    """`data_path`: the Data tab's folder box (followed); `train_curation`: the Train tab's curation
    field (set to this tab's file once a decision is saved)."""
    shown = item_outputs(c)
    running = {**shown, "log": c.log, "summary": c.summary}
    review = c.run_btn.click(
        bind(studio, run_review, running),
        [c.data, c.backbone],
        output_list(running),
        api_name="run_doctor",
        show_progress_on=[c.summary],
        **DOCTOR,
    )
    c.cancel_btn.click(None, None, None, cancels=[review], api_visibility="private")
    c.prev_btn.click(bind(studio, previous_item, shown), c.state, output_list(shown), api_name="review_previous")
    c.next_btn.click(bind(studio, next_item, shown), c.state, output_list(shown), api_name="review_next")
    deciding = {**shown, "train_curation": train_curation}
    for button, handler, inputs in (
        (c.keep_btn, keep_item, [c.state]),
        (c.exclude_btn, exclude_item, [c.state]),
        (c.relabel_btn, relabel_item, [c.state, c.relabel_to]),
        (c.leak_btn, exclude_leaks, [c.state]),
    ):
        button.click(
            bind(studio, handler, deciding),
            inputs,
            output_list(deciding),
            api_name=f"review_{handler.__name__}",
            concurrency_id="review_decide",
            concurrency_limit=1,
        )
    data_path.change(bind(studio, follow_data), data_path, c.data, api_visibility="private", show_progress="hidden")
    c.tab.select(bind(studio, refresh_backbones), c.backbone, c.backbone, api_visibility="private")
    label_mode.wire(studio, c.label, c.label_tab, train_curation)

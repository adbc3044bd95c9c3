"""Pure formatting for the studio: text, HTML and table rows from engine results. No gradio here
and no events: each function takes values and returns text or rows."""

from __future__ import annotations

import re
from collections.abc import Sequence
from html import escape
from pathlib import Path

from ..names import printable
from ..rundir import RunInfo

THUMBS_PER_CLASS = 6
MAX_MISCLASSIFIED = 60
SERIES_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e"}  # named in the plot labels: blue, orange
USABLE_STATUSES = ("completed", "stopped", "early-stopped")

CSS = """
.ft-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.ft-progress > div { height: 100%; background: var(--color-accent); transition: width 0.4s; }
.ft-progress.failed > div { background: #d33; }
.ft-status { margin-top: 6px; font-size: 0.95em; }
.ft-error { color: #b00020; font-weight: 600; }
"""


# ---------------------------------------------------------------------------------------------
# Text that came from users (folder, file, class and run names, messages that quote them) is shown
# as text, never rendered. First names.printable: control characters (a newline would end a code
# span or start a heading), bidi overrides and separators become visible escapes, so the text is one
# line. Then, for Markdown, backslash escapes (CommonMark and marked, gradio's renderer, show an
# escaped punctuation character as itself) for what marked and gradio act on inside a line, and for
# what starts a block at the start of one.

# Escapes, code, emphasis, strikethrough, links and images, raw HTML and entities, tables; "$" for
# gradio's LaTeX ($$...$$ goes to KaTeX, found even inside a code span) and "%%" for the
# placeholders it puts in their place.
_INLINE = re.compile(r"[\\`*_~\[\]<>&|$]|%(?=%)")
# GFM autolinks in plain text: marked links "www.x.y", "http://x" and "a@b.c"; "www\.x.y", "http\://x"
# and "a\@b.c" stay text.
_AUTOLINK = re.compile(r"(?i)(?<=www)\.|:(?=//)|@")
# At the start of a line: headings, list items, thematic breaks and setext underlines.
_LEADING = re.compile(r"^(\s*(?:\d+(?=[.)]))?)([#+=.)-])")


def md(text) -> str:
    """`text` as literal text inside gradio's Markdown, on one line, wherever it is put."""
    text = _AUTOLINK.sub(lambda m: "\\" + m[0], _INLINE.sub(lambda m: "\\" + m[0], printable(text)))
    return _LEADING.sub(r"\1\\\2", text, count=1)


def code(text) -> str:
    """`text` in a code span (shown literally), on one line. A backtick would end the span, and
    gradio finds $$ (KaTeX) and its %% placeholders even inside one: such text is escaped instead."""
    text = printable(text)
    return md(text) if "`" in text or "$" in text or "%%" in text else f"`{text}`"


def plain(text) -> str:
    """`text` for a component that shows text as it is (table cells, captions, labels, choices)."""
    return printable(text)


# ---------------------------------------------------------------------------------------------
# Data


def data_summary(scan, archive_skipped: int = 0) -> str:
    held_out = f"{round((scan.val_fraction or 0) * 100)}% of each class held out for validation"
    if scan.labels_file:
        given = "the split given in it" if scan.val_fraction is None else held_out
        layout = f"labels from {code(Path(scan.labels_file).name)}; {given}"
    elif scan.layout == "train-val":
        layout = "its own train/ and val/ folders"
    else:
        layout = f"one folder per class; {held_out}"
    text = (
        f"**{len(scan.classes)} classes** in {code(scan.root)} ({layout}): "
        f"{len(scan.train)} training and {len(scan.val)} validation images"
        + (f", {len(scan.test)} test images" if scan.test else "")
        + "."
    )
    skipped = len(scan.skipped) + archive_skipped
    if skipped:
        text += f" {skipped} file(s) skipped (listed below)."
    return text


def counts_rows(scan) -> list[dict]:
    """One row per class with its images per split and in total, then a total row."""
    counts = scan.counts()
    rows = [
        {
            "class": plain(name),
            **{split: counts[split][name] for split in counts},
            "total": sum(counts[split][name] for split in counts),
        }
        for name in scan.classes
    ]
    rows.append(
        {
            "class": "total",
            **{split: sum(counts[split].values()) for split in counts},
            "total": sum(sum(c.values()) for c in counts.values()),
        }
    )
    return rows


def skipped_rows(scan, archive_skipped: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(file, reason): files of an uploaded zip that were not extracted, then images that do not decode."""
    rows = [(name, f"{why}: not extracted from the zip") for name, why in archive_skipped] + list(scan.skipped)
    return [(plain(name), plain(why)) for name, why in rows]


def data_warnings(scan) -> str:
    return (
        "\n\n".join(f"**Warning:** {md(option_names(w))}" for w in scan.warnings)
        or "No warnings: classes are balanced."
    )


def option_names(text: str) -> str:
    """The engine's messages name options as the command line spells them (--class-weighted-loss); on the
    page they are named as the Train tab labels them."""
    from ..config import cli_flag, studio_fields, studio_label

    for f in studio_fields():
        where = "Train tab, Advanced" if f.metadata["studio"] == "advanced" else "Train tab"
        text = re.sub(rf"(?<![\w-]){re.escape(cli_flag(f))}(?![\w-])", f'"{studio_label(f)}" ({where})', text)
    return text


def data_ready(scan) -> str:
    names = ", ".join(md(name) for name in scan.classes[:8]) + ("…" if len(scan.classes) > 8 else "")
    return (
        f"Training data: {code(scan.root)} · {len(scan.classes)} classes ({names}) · "
        f"{len(scan.train)} train / {len(scan.val)} val images"
    )


def thumbnail_picks(scan, per_class: int = THUMBS_PER_CLASS) -> list[tuple[str, str]]:
    """(relative path, class name as shown): the first few images of each class."""
    by_class: dict[int, list[str]] = {}
    for rel, label in scan.train + scan.val:
        by_class.setdefault(label, []).append(rel)
    return [
        (rel, plain(name)) for label, name in enumerate(scan.classes) for rel in by_class.get(label, [])[:per_class]
    ]


def scan_progress(stage: str, done: int, total: int) -> str:
    if stage == "walk":
        return f"Looking for images: {done:,} files so far"
    return f"Checking images: {done:,} of {total:,}"


# ---------------------------------------------------------------------------------------------
# Train


def device_text(description: str, gpus: int) -> str:
    return f"**Device:** {description}" + (f" ({gpus} GPUs visible)" if gpus > 1 else "")


def progress_html(view, error: str | None = None) -> str:
    """The progress bar and one status line for a training view (None: not started)."""
    percent = round(view.fraction() * 100) if view else 0
    failed = bool(error) or (view is not None and view.status == "failed")
    text = error or (view.progress_text() if view else "Not started: choose the settings and press Start training.")
    bar = "ft-progress failed" if failed else "ft-progress"
    line = "ft-status ft-error" if failed else "ft-status"
    return (
        f'<div class="{bar}"><div style="width:{percent}%"></div></div>'
        f'<div class="{line}" id="train_status_text">{escape(printable(text))}</div>'
    )


def training_progress(view) -> str:
    return progress_html(view, f"Training failed: {view.error}" if view.status == "failed" else None)


def curve_frame(view, metric: str):
    """The curve of one metric as a DataFrame with both series (train first, so it keeps the first
    colour; val as an empty point until the first epoch ends), or None while there is none."""
    import pandas as pd

    if not view.curves:
        return None
    frame = pd.DataFrame(view.curves)
    part = frame[frame.metric == metric][["epoch", "value", "series"]]
    if not len(part):
        return None
    missing = [
        {"epoch": 0.0, "value": float("nan"), "series": name}
        for name in ("train", "val")
        if name not in set(part.series)
    ]
    if missing:
        part = pd.concat([part, pd.DataFrame(missing)], ignore_index=True).astype({"epoch": float, "value": float})
    return part


def training_result(view) -> tuple[str, Path | None]:
    """(markdown, confusion matrix file or None) once a training has ended; ("", None) before."""
    if view.status in USABLE_STATUSES:
        name = Path(view.run_dir).name
        text = f"### {view.status.capitalize()}: {md(name)}\n{md(view.summary)}"
        if view.status == "stopped":  # on request, or because the loss diverged (its error says so)
            text += (
                f"\n\n{md(view.error)}"
                if view.error
                else "\n\nStopped on request; the best model so far was kept and can be used."
            )
        matrix = Path(view.run_dir) / "confusion_matrix.png"
        return text, matrix if matrix.is_file() else None
    if view.status == "failed":
        return (
            f"### Training failed\n{md(view.error)}\n\nThe app still works: change the settings and start again."
        ), None
    return "", None


# ---------------------------------------------------------------------------------------------
# Evaluate


def eval_summary(name: str, info: RunInfo, metrics: dict) -> str:
    topk = ", ".join(f"top-{k} {v:.1%}" for k, v in metrics["top_k_accuracy"].items())
    return (
        f"**{md(name)}** ({md(info.get('status', '?'))}, {md(info.get('arch', '?'))} / "
        f"{md(info.get('strategy', '?'))}): "
        f"on {metrics['num_images']} validation images, accuracy **{metrics['accuracy']:.1%}**, "
        f"balanced accuracy {metrics['balanced_accuracy']:.1%}, macro F1 {metrics['macro_f1']:.3f}; {topk}."
    )


def eval_rows(metrics: dict) -> list[dict]:
    return [
        {
            "class": plain(name),
            "precision": round(m["precision"], 3),
            "recall": round(m["recall"], 3),
            "f1": round(m["f1"], 3),
            "support": m["support"],
        }
        for name, m in metrics["per_class"].items()
    ]


def misclassified_caption(item: dict) -> str:
    return f"{plain(item['true'])} → {plain(item['predicted'])} ({item['confidence']:.0%})"


def misclassified_note(wrong: int, total: int, shown: int) -> str:
    if not wrong:
        return "Every validation image was classified correctly."
    return f"{wrong} of {total} validation images misclassified" + (f" (showing {shown})" if wrong > shown else "")


def calibration_text(info: RunInfo) -> str:
    """What the run's temperature scaling did on its validation images (run.json "calibration")."""
    c = info.get("calibration")
    if not c:
        return (
            "This run has no calibration (trained before finetune calibrated its runs, or without "
            "validation images): its probabilities are the raw model's, and it always answers."
        )
    at = c.get("at_suggested", {})
    return (
        f"**Calibration** on {c['val_images']} validation images: temperature {c['temperature']:.3f}, "
        f"calibration error (ECE) {c['ece_before']:.3f} before, **{c['ece_after']:.3f}** after. "
        f"Suggested minimum confidence **{c['suggested_min_confidence']:.2f}**: "
        f"{at.get('answered', 0):.0%} of validation answered, {at.get('accuracy_answered', 0):.1%} of those "
        f"right; below it Predict says *unknown*."
        + (
            " (The temperature is at its bound: validation could not pin it down.)"
            if c.get("temperature_at_bound")
            else ""
        )
    )


NO_RUN_YET = "No trained run yet: train one on the **2. Train** tab, then pick it here."


# ---------------------------------------------------------------------------------------------
# Predict


def batch_rows(predictions, top_k: int) -> list[dict]:
    """One row per image: the answer ("unknown" below the minimum confidence), the best guess beside it."""
    return [
        {
            "file": plain(p.path),
            "prediction": plain(p.answer or ""),
            "best guess": plain(p.label or ""),
            "confidence": round(p.confidence, 4) if p.top else None,
            f"top {top_k}": ", ".join(f"{plain(n)} {v:.2f}" for n, v in p.top),
            "error": plain(p.error or ""),
        }
        for p in predictions
    ]


def answer_headline(answer: str, guess: str, confidence: float) -> str:
    """The label's headline: the class, or "unknown (best guess: roses, 41%)" below the threshold."""
    return plain(answer if answer == guess else f"{answer} (best guess: {guess}, {confidence:.0%})")


def threshold_note(suggested: float | None) -> str:
    if suggested is None:
        return (
            "This run has no calibration (trained before calibration existed): every image gets an answer "
            "unless you raise the minimum."
        )
    return f"Suggested from validation: {suggested:.2f} (below it the answer is *unknown*, with the best guess)."


def batch_limit_note(limit: int) -> str:
    return (
        f"Only the first {limit:,} images were classified: at most {limit:,} per request. "
        f"Classify the rest in another request (a smaller folder or fewer files), or use "
        f"`python -m finetune predict` in a terminal, which has no limit."
    )


# ---------------------------------------------------------------------------------------------
# Review

NOTHING_TO_REVIEW = "**Nothing to review:** the doctor flagged no image (or every flagged one was kept before)."
KINDS = {"label": "Likely label error", "duplicate": "Duplicate", "other": "Odd image"}


def review_summary(report, kept_before: int = 0) -> str:
    """The doctor's findings in a few lines (report: a finetune.data_doctor.DoctorReport)."""
    s = report.summary
    check = s.get("label_check", {})
    accuracy = check.get("out_of_sample_accuracy")
    groups = report.duplicate_groups
    problems = s.get("other_issues", {})
    lines = [
        f"**{s['images']} images, {len(report.classes)} classes** in {code(report.data)}; features from "
        f"{md(report.backbone)}.",
        f"- **{len(report.label_issues)}** likely label errors"
        + (
            f" (a linear probe on the features gets {accuracy:.0%} right out of sample)" if accuracy is not None else ""
        ),
        f"- **{len(groups)}** duplicate groups ({sum(g['kind'] == 'exact' for g in groups)} exact, "
        f"{sum(g['kind'] == 'near' for g in groups)} near): **{s.get('leak_groups', 0)}** leak between "
        f"splits, {s.get('conflict_groups', 0)} span classes",
        "- other problems: " + (", ".join(f"{n} {md(p)}" for p, n in sorted(problems.items())) or "none"),
    ]
    small = [i for i in report.other_issues if not i.get("path")]
    lines += [f"- {md(i['problem'])}: class {md(i['class'])} ({md(i['detail'])})" for i in small[:5]]
    if kept_before:
        lines.append(f"- {kept_before} flagged image(s) you kept in an earlier review are not shown again")
    lines += [f"\n*Note: {md(note)}*" for note in report.notes]
    return "\n".join(lines)


def curation_line(path, decisions: int) -> str:
    return (
        f"Decisions are saved at once to {code(path)} ({decisions} so far). Training uses them when this file "
        f"is given on the Train tab; the data folder itself is never changed."
    )


def review_position(index: int, total: int, item: dict, decided: int) -> str:
    return f"### {KINDS[item['kind']]} · {index + 1} of {total}  \n{decided} of {total} decided"


def review_details(item: dict, decision=None) -> str:
    lines = [f"**{code(item['path'])}** ({md(item['split'])}, class **{md(item['given'])}**)"]
    if item["kind"] == "label":
        lines.append(
            f"Suggested class: **{md(item['suggested'])}** (probability {item['probability']:.0%}; label "
            f"quality {item['score']:.3f}, lower is more suspicious). Beside it: images of "
            f"{md(item['suggested'])}."
        )
    elif item["kind"] == "duplicate":
        flags = [
            text
            for flag, text in (
                ("leak", "**leaks between splits**: the model is validated on a picture it trained on"),
                ("conflict", "**the copies are in different classes**"),
            )
            if item[flag]
        ]
        lines.append(f"An {md(item['group_kind'])} duplicate; beside it, its copies. " + "; ".join(flags))
    else:
        lines.append(f"{md(item['problem'])}: {md(item['detail'])}")
    if item.get("unreadable"):
        lines.append(f"(cannot show it: {md(item['unreadable'])})")
    if decision is not None:
        what = {"keep": "kept", "exclude": "excluded"}.get(decision.action, f"relabelled to {md(decision.label)}")
        lines.append(f"✔ **Decided: {what}**")
    return "\n\n".join(lines)


def decision_note(item: dict) -> str:
    if item["kind"] == "label":
        return f"review: given {item['given']}, doctor suggested {item['suggested']} ({item['score']:.3f})"
    if item["kind"] == "duplicate":
        return f"review: {item['group_kind']} duplicate" + (" (leak)" if item["leak"] else "")
    return f"review: {item['problem']}"


# ---------------------------------------------------------------------------------------------
# Label mode (the Review tab's "Label new images")


def label_status(pool: str, run: str, suggested: int, lines: Sequence[str], skipped: Sequence) -> str:
    """What the suggestion found: how many images, from which pool, for which run."""
    text = [
        f"**{suggested}** image(s) of {code(pool)} to label, most uncertain first, for the model of "
        f"{code(Path(run).name)}."
    ]
    text += [f"- {md(line)}" for line in lines]
    if skipped:
        named = ", ".join(f"{code(path)} ({md(reason)})" for path, reason in list(skipped)[:5])
        text.append(f"- {len(skipped)} pool file(s) skipped: {named}" + (" …" if len(skipped) > 5 else ""))
    if not suggested:
        text.append("- Nothing to suggest: every pool image is in the run's data already, or decided.")
    return "\n".join(text)


def label_position(index: int, total: int, decided: int) -> str:
    return f"### Image {index + 1} of {total}  \n{decided} of {total} decided"


def label_details(item: dict, decision, curation: str) -> str:
    guess, probability = item["top"][0]
    lines = [
        f"**{code(item['path'])}** (in the pool)",
        f"The model's best guess: **{md(guess)}** ({probability:.0%}); uncertainty {item['uncertainty']:.2f} "
        "(1 is a tie). Beside it: training images of its best guesses.",
    ]
    if decision is not None:
        what = f"labelled {md(decision.label)}" if decision.action == "add" else "none of these"
        lines.append(f"✔ **Decided: {what}** (in {code(curation)}; click another class to change it)")
    return "\n\n".join(lines)


def label_finished(total: int, decided: int, curation: str, data: str) -> str:
    if not total:
        return ""
    return (
        f"**All {total} suggested image(s) seen; {decided} decided.** The decisions are in {code(curation)}: "
        f"train on {code(data)} with that curation file (the Train tab's curation field) to add them, or "
        "suggest more."
    )

"""The doctor's findings: the report, its summary text, and its JSON and CSV files (never inside the data)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FinetuneError
from ..fsutil import write_text_atomic

DOCTOR_FORMAT = "finetune-doctor/1"


@dataclass
class DoctorReport:
    data: str
    classes: list[str]
    backbone: str
    label_issues: list[dict] = field(default_factory=list)
    duplicate_groups: list[dict] = field(default_factory=list)
    other_issues: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "format": DOCTOR_FORMAT,
            "data": self.data,
            "classes": self.classes,
            "backbone": self.backbone,
            "summary": self.summary,
            "notes": self.notes,
            "label_issues": self.label_issues,
            "duplicate_groups": self.duplicate_groups,
            "other_issues": self.other_issues,
        }

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """How IPython and Jupyter show a report: its summary (names through names.printable), not every finding."""
        from ..names import printable

        printer.text("\n".join(printable(line) for line in self.summary_text().split("\n")))

    def summary_text(self, limit: int = 10) -> str:
        s = self.summary
        lines = [
            f"Data doctor: {self.data}",
            f"  {s['images']} images, {len(self.classes)} classes; features from {self.backbone}",
        ]
        check = s.get("label_check", {})
        accuracy = check.get("out_of_sample_accuracy")
        lines.append(
            f"Likely label errors: {len(self.label_issues)}"
            + (
                f" (linear probe on the features, {check['folds']}-fold: {accuracy:.1%} out-of-sample accuracy)"
                if accuracy is not None
                else ""
            )
        )
        for issue in self.label_issues[:limit]:
            lines.append(
                f"  {issue['path']}  given {issue['given']}, suggested {issue['suggested']} "
                f"(label quality {issue['score']:.3f})"
            )
        if len(self.label_issues) > limit:
            lines.append(f"  ... {len(self.label_issues) - limit} more (--json / --csv for all)")
        groups = self.duplicate_groups
        kinds = Counter(g["kind"] for g in groups)
        lines.append(
            f"Duplicate groups: {len(groups)} ({kinds.get('exact', 0)} exact, {kinds.get('near', 0)} near); "
            f"{sum(g['leak'] for g in groups)} span splits (leak), "
            f"{sum(g['conflict'] for g in groups)} span classes (conflict)"
        )
        for group in groups[:limit]:
            flags = [f for f in ("leak", "conflict") if group[f]]
            members = ", ".join(f"{p} [{s}]" for p, s in zip(group["paths"][:4], group["splits"][:4], strict=True))
            more = f" +{len(group['paths']) - 4}" if len(group["paths"]) > 4 else ""
            marks = " " + " ".join(f.upper() for f in flags) if flags else ""
            lines.append(f"  {group['kind']}{marks}: {members}{more}")
        if len(groups) > limit:
            lines.append(f"  ... {len(groups) - limit} more groups")
        problems = Counter(i["problem"] for i in self.other_issues)
        lines.append("Other problems: " + (", ".join(f"{n} {p}" for p, n in sorted(problems.items())) or "none"))
        for issue in self.other_issues[:limit]:
            lines.append(f"  {issue['problem']}: {issue['path'] or issue['class']} ({issue['detail']})")
        if len(self.other_issues) > limit:
            lines.append(f"  ... {len(self.other_issues) - limit} more")
        timing = s.get("seconds", {})
        if timing:
            lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)


def _outside_data(path: str | Path, data_root: str) -> Path:
    path = Path(path).expanduser()
    root = Path(data_root).resolve()
    target = path.resolve()
    if target == root or root in target.parents:
        raise FinetuneError(f"refusing to write {path} inside the dataset folder {root}: choose a path outside it")
    return path


def write_json(report: DoctorReport, path: str | Path) -> Path:
    path = _outside_data(path, report.data)
    try:
        write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")  # writers may run at once
    except OSError as error:
        raise FinetuneError(f"cannot write {path}: {error.strerror or error}") from None
    return path


CSV_HEADER = ["finding", "path", "split", "class", "suggested", "score", "group", "detail"]


def csv_rows(report: DoctorReport) -> list[list]:
    """One row per finding: label issues, every member of every duplicate group, other problems."""
    from ..csvfile import number

    rows = [
        [
            "label issue",
            i["path"],
            i["split"],
            i["given"],
            i["suggested"],
            number(i["score"], ".6f"),
            "",
            f"p(suggested) {i['suggested_probability']:.3f}",
        ]
        for i in report.label_issues
    ]
    for g in report.duplicate_groups:
        flags = " ".join(f for f in ("leak", "conflict") if g[f])
        for path, split, name in zip(g["paths"], g["splits"], g["classes"], strict=True):
            rows.append(
                [
                    f"{g['kind']} duplicate",
                    path,
                    split,
                    name,
                    "",
                    "",
                    number(g["group"]),
                    " ".join(filter(None, [flags, "by " + "+".join(g["methods"])])),
                ]
            )
    rows += [[i["problem"], i["path"], i["split"], i["class"], "", "", "", i["detail"]] for i in report.other_issues]
    return rows


def write_csv(report: DoctorReport, path: str | Path) -> Path:
    from ..csvfile import write_csv as write_safe_csv

    path = _outside_data(path, report.data)
    try:
        return write_safe_csv(path, CSV_HEADER, csv_rows(report))
    except OSError as error:
        raise FinetuneError(f"cannot write {path}: {error.strerror or error}") from None

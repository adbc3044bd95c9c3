"""The data doctor finds planted problems: mislabeled files, duplicates, leaks, odd images."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tree_digest
from PIL import Image

from finetune.config import FinetuneError, TrainConfig
from finetune.data import scan_dataset
from finetune.data_doctor import (
    Backbone,
    DoctorReport,
    compute_embeddings,
    find_label_issues,
    hamming,
    load_backbone,
    near_hash_pairs,
    phash,
    records_of,
    run_doctor,
    similar_pairs,
    write_csv,
    write_json,
)

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 215)}
SIZE = 56


def textured(colour, seed: int, size: int = SIZE) -> Image.Image:
    """A plain colour with a smooth random pattern of its own: distinct hashes, the same colour class."""
    rng = np.random.default_rng(seed)
    low = np.asarray(
        Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32
    )
    pixels = np.asarray(colour, np.float32)[None, None, :] * (0.55 + 0.9 * low[..., None] / 255)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


MOVED = [f"train/green/moved_red_{k}.png" for k in range(3)]


def make_problem_dataset(root: Path) -> Path:
    """train/ and val/ of three colour classes, with problems planted (see the names)."""
    seed = 0
    for name, colour in COLOURS.items():
        for split, count in (("train", 20), ("val", 5)):
            for i in range(count):
                seed += 1
                save(textured(colour, seed), root / split / name / f"img_{i}.png")
    for k, rel in enumerate(MOVED):  # red pictures filed as green
        save(textured(COLOURS["red"], 1000 + k), root / rel)
    shutil.copyfile(root / "train/blue/img_0.png", root / "train/blue/exact_copy.png")
    shutil.copyfile(root / "train/red/img_1.png", root / "val/red/leaked_copy.png")
    smaller = Image.open(root / "train/green/img_2.png").resize((44, 44), Image.BICUBIC)
    save(smaller, root / "val/green/resized_copy.jpg", quality=90)
    shutil.copyfile(root / "train/blue/img_3.png", root / "train/red/conflicting_copy.png")
    save(Image.new("RGB", (SIZE, SIZE), (120, 120, 120)), root / "train/blue/flat.png")
    save(textured(COLOURS["blue"], 2000, size=20), root / "train/blue/tiny.png")
    wide = textured(COLOURS["green"], 2001).resize((250, 50))
    save(wide, root / "train/green/wide.png")
    return root


@pytest.fixture(scope="module")
def problem_data(tmp_path_factory) -> Path:
    return make_problem_dataset(tmp_path_factory.mktemp("doctor") / "data")


@pytest.fixture(scope="module")
def doctored(problem_data, tmp_path_factory) -> tuple[DoctorReport, Path, float]:
    before = tree_digest(problem_data)
    cache = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    report = run_doctor(problem_data, arch="resnet34", weights="none", image_size=64, device="cpu", cache_dir=cache)
    seconds = time.perf_counter() - started
    assert tree_digest(problem_data) == before  # the doctor only reads
    return report, cache, seconds


def test_mislabeled_files_are_among_the_top_issues(problem_data, doctored):
    """The probe ranks the planted errors among the least plausible labels, with red as the likelier class,
    for any fold split: over 5 texture seeds x 5 fold seeds they were among the 6 lowest of 96 (bound: the
    10 lowest; a probe that saw its own images, or shuffled labels, puts them anywhere). Which of them cleanlab's
    per-class thresholds then list varies with the seed (1 to 3 of the 3), so the report is checked for
    what it always holds: at least one, each with red suggested."""
    from finetune.data_doctor import out_of_sample_probs

    report, cache, _ = doctored
    scan = scan_dataset(problem_data)
    records = records_of(scan)
    features = compute_embeddings(scan, load_backbone(None, "resnet34", "none", 64), "cpu", cache_dir=cache)
    labels = np.array([r.label for r in records])
    moved = [i for i, r in enumerate(records) if r.path in MOVED]
    red = scan.classes.index("red")
    for fold_seed in (0, 1):
        probs = out_of_sample_probs(features, labels, 5, fold_seed)
        quality = probs[np.arange(len(labels)), labels]
        ranks = np.argsort(np.argsort(quality))[moved]
        assert ranks.max() < 10 and all(probs[i].argmax() == red for i in moved), (fold_seed, ranks)

    listed = [issue for issue in report.label_issues if issue["path"] in MOVED]
    assert listed and all(
        issue == {**issue, "split": "train", "given": "green", "suggested": "red"} for issue in listed
    )
    assert all(0.0 <= issue["score"] < 0.5 for issue in listed)
    scores = [issue["score"] for issue in report.label_issues]
    assert scores == sorted(scores)  # most suspicious (lowest label quality) first


def _group_with(report: DoctorReport, path: str) -> dict:
    groups = [g for g in report.duplicate_groups if path in g["paths"]]
    assert len(groups) == 1, f"{path} in {len(groups)} groups: {report.duplicate_groups}"
    return groups[0]


def test_exact_duplicates_and_leaks_and_conflicts(doctored):
    report, _, _ = doctored
    copy = _group_with(report, "train/blue/exact_copy.png")
    assert copy["kind"] == "exact" and set(copy["paths"]) == {"train/blue/img_0.png", "train/blue/exact_copy.png"}
    assert not copy["leak"] and not copy["conflict"] and "sha256" in copy["methods"]

    leak = _group_with(report, "val/red/leaked_copy.png")
    assert leak["kind"] == "exact" and leak["leak"] and not leak["conflict"]
    assert sorted(zip(leak["paths"], leak["splits"], strict=True)) == [
        ("train/red/img_1.png", "train"),
        ("val/red/leaked_copy.png", "val"),
    ]

    conflict = _group_with(report, "train/red/conflicting_copy.png")
    assert conflict["conflict"] and sorted(conflict["classes"]) == ["blue", "red"]
    # leaks and conflicts come first
    flagged = [g["leak"] or g["conflict"] for g in report.duplicate_groups]
    assert flagged == sorted(flagged, reverse=True)


def test_resized_reencoded_copy_is_a_near_duplicate(doctored):
    report, _, _ = doctored
    near = _group_with(report, "val/green/resized_copy.jpg")
    assert near["kind"] == "near" and near["leak"] and near["methods"] == ["phash"]
    assert set(near["paths"]) == {"train/green/img_2.png", "val/green/resized_copy.jpg"}
    planted = {"exact_copy", "leaked_copy", "resized_copy", "conflicting_copy"}
    assert len(report.duplicate_groups) == len(planted), report.duplicate_groups  # no false alarms


def test_other_problems(doctored):
    report, _, _ = doctored
    found = {(i["path"], i["problem"]) for i in report.other_issues}
    assert ("train/blue/flat.png", "near-constant") in found
    assert ("train/blue/tiny.png", "tiny") in found
    assert ("train/green/wide.png", "aspect ratio") in found
    assert not any(i["problem"] == "small class" for i in report.other_issues)


def test_report_json_csv_and_summary(doctored, tmp_path):
    report, _, seconds = doctored
    data = json.loads(write_json(report, tmp_path / "doctor.json").read_text())
    assert data["format"] == "finetune-doctor/1"
    assert {"label_issues", "duplicate_groups", "other_issues", "summary"} <= set(data)
    assert set(data["label_issues"][0]) >= {"path", "given", "suggested", "score"}
    assert set(data["duplicate_groups"][0]) >= {"paths", "splits", "classes", "kind", "leak", "conflict"}
    with open(write_csv(report, tmp_path / "doctor.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["finding"] for r in rows} >= {"label issue", "exact duplicate", "near duplicate", "tiny"}
    text = report.summary_text()
    assert "Likely label errors" in text and "LEAK" in text and "CONFLICT" in text
    assert seconds < 150  # ~27 s on 2 cores; a bound for a pass that went quadratic, not for this CPU
    with pytest.raises(FinetuneError, match="inside the dataset"):
        write_json(report, Path(report.data) / "doctor.json")
    with pytest.raises(FinetuneError, match="inside the dataset"):
        write_csv(report, Path(report.data) / "train" / "doctor.csv")


def test_csv_cells_that_look_like_formulas_are_escaped(tmp_path):
    report = DoctorReport(
        str(tmp_path / "data"),
        ["a", "=b"],
        "test",
        label_issues=[
            {
                "path": '=HYPERLINK("http://x")',
                "split": "train",
                "given": "a",
                "suggested": "=b",
                "score": 0.1,
                "suggested_probability": 0.8,
            }
        ],
    )
    with open(write_csv(report, tmp_path / "out.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[1][1].startswith("'=") and rows[1][4] == "'=b" and rows[1][5] == "0.100000"


def test_feature_cache_reuses_unchanged_files(tmp_path):
    root = tmp_path / "data"
    paths = [f"a/{i}.png" for i in range(4)]
    for i, rel in enumerate(paths):
        save(textured((200, 50, 50), i), root / rel)
    backbone = load_backbone(None, "resnet34", "none", 32)
    messages: list[str] = []
    first = compute_embeddings((root, paths), backbone, "cpu", cache_dir=tmp_path / "cache", log=messages.append)
    assert first.shape == (4, 512) and first.dtype == np.float32
    assert len(list((tmp_path / "cache").glob("resnet34-*.npz"))) == 1
    save(textured((10, 200, 50), 99), root / paths[2])  # changed content: a new size or mtime
    messages.clear()
    second = compute_embeddings((root, paths), backbone, "cpu", cache_dir=tmp_path / "cache", log=messages.append)
    assert any("3 of 4 images from" in m for m in messages), messages
    np.testing.assert_allclose(second[[0, 1, 3]], first[[0, 1, 3]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(second[2], first[2])
    # the same weights again (seeded random init): the same features
    again = compute_embeddings((root, paths), load_backbone(None, "resnet34", "none", 32), "cpu")
    np.testing.assert_allclose(again, second, rtol=1e-4, atol=1e-5)


def test_backbone_from_a_run_folder(tmp_path):
    from finetune.model import build_model

    run = tmp_path / "run"
    run.mkdir()
    model = build_model("resnet34", 3, "none")
    torch.save(model.state_dict(), run / "model.pth")
    (run / "run.json").write_text(
        json.dumps(
            {"arch": "resnet34", "classes": ["a", "b", "c"], "image_size": 48, "config": {"weights": "imagenet"}}
        )
    )
    backbone = load_backbone(run)
    assert isinstance(backbone, Backbone) and backbone.image_size == 48 and backbone.pretrained
    assert backbone.identity.startswith("run:")
    with torch.no_grad():
        x = torch.randn(2, 3, 48, 48)
        model.eval()
        expected = torch.flatten(
            model.avgpool(
                model.layer4(
                    model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
                )
            ),
            1,
        )
        np.testing.assert_allclose(backbone.module(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    (run / "model.pth").unlink()
    with pytest.raises(FinetuneError, match="no model.pth"):
        load_backbone(run)
    with pytest.raises(FinetuneError, match="not a run folder"):
        load_backbone(tmp_path)


def test_label_ranking_on_given_features():
    """K-fold + cleanlab alone, on features where the planted errors are known."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    centres = rng.normal(0, 1, (3, 16)) * 4
    features = (centres[labels] + rng.normal(0, 1, (90, 16))).astype(np.float32)
    given = labels.copy()
    given[[0, 31, 62]] = [1, 2, 0]
    from finetune.data_doctor import Record

    records = [Record(f"{i}.png", "train", int(g)) for i, g in enumerate(given)]
    issues, info = find_label_issues(features, records, ["a", "b", "c"], folds=5)
    assert [i["path"] for i in issues[:3]] and {i["path"] for i in issues[:3]} == {"0.png", "31.png", "62.png"}
    assert {(i["path"], i["suggested"]) for i in issues[:3]} == {("0.png", "a"), ("31.png", "b"), ("62.png", "c")}
    assert info["folds"] == 5 and info["out_of_sample_accuracy"] > 0.9


def test_small_class_and_tiny_classes_in_the_label_check(tmp_path):
    rng = np.random.default_rng(1)
    from finetune.data_doctor import Record, other_issues

    records = [Record(f"{i}.png", "train", 0) for i in range(20)] + [Record("s.png", "train", 1)]
    features = rng.normal(size=(21, 8)).astype(np.float32)
    issues, info = find_label_issues(features, records, ["big", "small"])
    assert issues == [] and info["classes"] == 1  # one class with >= 2 images: nothing to compare
    found = other_issues(records, [None] * len(records), ["big", "small"], [("x.png", "truncated image")])
    assert {
        "path": None,
        "split": None,
        "class": "small",
        "problem": "small class",
        "detail": "1 image; the other classes have 20 (median)",
    } in found
    assert any(i["problem"] == "unreadable" and i["path"] == "x.png" for i in found)


def test_perceptual_hash_blocking_finds_exactly_the_close_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    # plant close relatives: flip a few bits of some hashes
    close = base.copy()
    for i in range(0, 300, 7):
        bits = rng.choice(64, size=rng.integers(0, 10), replace=False)
        close[i] = base[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    hashes = np.concatenate([base, close[::7]])
    for distance in (0, 4, 8, 12):
        d = hamming(hashes[:, None], hashes[None, :])
        brute = {(i, j) for i, j in zip(*np.nonzero(d <= distance), strict=True) if i < j}
        assert near_hash_pairs(hashes, distance, chunk_bytes=4096) == brute
    with pytest.raises(FinetuneError):
        near_hash_pairs(hashes, 40)


def test_phash_survives_resizing_and_jpeg(tmp_path):
    image = textured((90, 140, 200), 5, size=200)
    small = image.resize((70, 70), Image.BICUBIC)
    save(small, tmp_path / "small.jpg", quality=80)
    other = textured((90, 140, 200), 6, size=200)
    h = np.asarray([phash(image), phash(Image.open(tmp_path / "small.jpg")), phash(other)], dtype=np.uint64)
    assert hamming(h[0], h[1]) <= 4 < 16 <= hamming(h[0], h[2])


def test_embedding_similarity_chunked_equals_full():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 32)).astype(np.float32)
    features[60] = features[3] * 2 + 0.01  # same direction: cosine ~1
    features[90] = features[10] + rng.normal(0, 0.05, 32)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    full = {(i, j) for i, j in zip(*np.nonzero(sims > 0.97), strict=True) if i < j}
    assert full == {(3, 60), (10, 90)}
    assert similar_pairs(features, 0.97, chunk_bytes=4 * 120 * 7) == full  # 7 rows at a time
    eligible = np.ones(120, dtype=bool)
    eligible[60] = False
    assert similar_pairs(features, 0.97, eligible=eligible) == {(10, 90)}


def test_second_run_uses_the_feature_cache_and_embedding_similarity(problem_data, doctored, monkeypatch):
    from finetune import cache as feature_cache

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("features computed again: the cache was not used")

    monkeypatch.setattr(feature_cache, "compute_features", no_forward_pass)  # not a time bound: any CPU
    report, cache, _ = doctored
    messages: list[str] = []
    again = run_doctor(
        problem_data,
        weights="none",
        image_size=64,
        device="cpu",
        cache_dir=cache,
        use_embeddings=True,
        similarity=0.9999,
        log=messages.append,
    )
    assert any(f"{again.summary['images']} of {again.summary['images']} images from" in m for m in messages)
    assert again.label_issues == report.label_issues
    leak = _group_with(again, "val/red/leaked_copy.png")  # identical pixels: identical features
    assert leak["methods"] == ["embedding", "phash", "sha256"]


def test_scan_given_directly_and_user_errors(problem_data):
    scan = scan_dataset(problem_data)
    assert len(records_of(scan)) == len(scan.train) + len(scan.val)
    with pytest.raises(FinetuneError, match="folds"):
        run_doctor(scan, weights="none", folds=1)
    with pytest.raises(FinetuneError, match="unknown architecture"):
        run_doctor(scan, arch="vgg", weights="none")
    with pytest.raises(FinetuneError, match="not found"):
        run_doctor(problem_data / "missing", weights="none")


def test_the_split_defaults_are_training_s():
    """Without a run, the doctor (and the scan, finetune.scan, the Review tab through scan_dataset) splits a
    folder as training does: a leak it reports is one against the split a run would make."""
    import inspect

    from finetune import api

    trained = TrainConfig()
    for function in (scan_dataset, run_doctor, api.scan):
        given = inspect.signature(function).parameters
        assert (given["val_fraction"].default, given["seed"].default) == (trained.val_fraction, trained.seed), function


# ---------------------------------------------------------------------------------------------
# Grouping near pairs: look-alikes that each resemble the next must not chain into one group


def _flip(value: int, bits) -> int:
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def _groups_of(hashes: list[int], splits: list[str], labels: list[int], exact=(), max_distance: int = 8):
    from finetune.data_doctor import Record, duplicate_groups, hash_closeness

    records = [Record(f"{k}.png", split, label) for k, (split, label) in enumerate(zip(splits, labels, strict=True))]
    array = np.asarray(hashes, dtype=np.uint64)
    pairs = near_hash_pairs(array, max_distance)
    groups = duplicate_groups(
        records, ["a", "b"], [list(g) for g in exact], {"phash": hash_closeness(array, pairs, max_distance)}
    )
    return groups, pairs, [[int(p.split(".")[0]) for p in g["paths"]] for g in groups]


def test_a_chain_of_look_alikes_is_not_one_group_but_a_cluster_of_copies_is():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    bits = rng.permutation(64)
    chain = [_flip(0, bits[: 2 * k]) for k in range(26)]  # 0..25, A..Z: 2 more bits a step, A to Z 50 bits
    base = int(rng.integers(0, 2**62))
    cluster = [_flip(base, rng.choice(64, size=3, replace=False)) for _ in range(5)]  # 26..30: pairwise <= 6
    original = int(rng.integers(0, 2**62))
    hashes = chain + cluster + [cluster[2]] + [original, _flip(original, bits[:3])]
    splits = ["train"] * 33 + ["val"]  # 31: a byte copy of 28 in another class; 33: a val copy of 32
    labels = [0] * 31 + [1] + [0, 0]
    groups, pairs, members = _groups_of(hashes, splits, labels, exact=[(28, 31)])
    array = np.asarray(hashes, dtype=np.uint64)
    distance = hamming(array[:, None], array[None, :]).astype(int)
    assert distance[0, 25] >= 30 and all(distance[k, k + 1] <= 8 for k in range(25))
    edges = np.array(sorted(pairs)).T  # the chain is connected: joining pairs transitively puts A with Z
    graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(len(hashes),) * 2)
    assert len(set(connected_components(graph, directed=False)[1][:26])) == 1

    for indices in members:  # every two members are near copies (so within 2x the limit of each other)
        assert distance[np.ix_(indices, indices)].max() <= 8, (indices, distance[np.ix_(indices, indices)])
    assert not any(0 in m and 25 in m for m in members)
    assert sorted(sum(members, [])) == sorted(set(sum(members, [])))  # nobody in two groups
    by_member = {i: g for g, m in zip(groups, members, strict=True) for i in m}
    assert sorted(members[groups.index(by_member[26])]) == [26, 27, 28, 29, 30, 31]  # the 5, and 28's twin
    assert by_member[26]["kind"] == "near" and by_member[26]["methods"] == ["phash", "sha256"]
    assert by_member[26]["conflict"] and not by_member[26]["leak"]
    assert by_member[33]["leak"] and by_member[33]["paths"] == ["32.png", "33.png"] and by_member[33]["group"] == 1


def test_embedding_look_alikes_do_not_chain_and_near_copies_of_one_picture_group():
    from finetune.data_doctor import Record, duplicate_groups, embedding_closeness

    rng = np.random.default_rng(1)
    step = 0.1  # radians: adjacent cosine 0.995, two steps 0.980, three 0.955 (< 0.97)
    angles = step * np.arange(26)  # A..Z turn by 2.5 radians: cosine -0.80 between A and Z
    chain = np.zeros((26, 32))
    chain[:, 0], chain[:, 1] = np.cos(angles), np.sin(angles)
    copies = rng.normal(size=32) + rng.normal(0, 0.03, (5, 32))  # one picture, five near copies
    leak = rng.normal(size=32) + rng.normal(0, 0.03, (2, 32))
    features = np.vstack([chain, copies, leak]).astype(np.float32)
    records = [Record(f"{k}.png", "val" if k == 32 else "train", 0) for k in range(len(features))]
    pairs = similar_pairs(features, 0.97)
    groups = duplicate_groups(records, ["a"], [], {"embedding": embedding_closeness(features, pairs, 0.97)})
    members = [[int(p.split(".")[0]) for p in g["paths"]] for g in groups]
    assert {(k, k + 1) for k in range(25)} <= pairs  # each resembles the next
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for indices in members:
        assert (unit[indices] @ unit[indices].T).min() > 0.97, indices
    assert not any(0 in m and 25 in m for m in members)
    assert [26, 27, 28, 29, 30] in members and [31, 32] in members
    assert groups[members.index([31, 32])]["leak"] and groups[0]["methods"] == ["embedding"]
    # without closeness (plain pairs) the same bound holds
    plain = duplicate_groups(records, ["a"], [], {"embedding": pairs})
    for group in plain:
        indices = [int(p.split(".")[0]) for p in group["paths"]]
        assert (unit[indices] @ unit[indices].T).min() > 0.97, indices

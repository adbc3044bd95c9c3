"""model.safetensors in the run folder, `finetune export --format hf` (a folder anyone can use: weights,
config.json, a model card the Hub reads), predicting from that folder, and `finetune push` (the Hub
call itself replaced: the tests run offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders, tree_digest

from finetune.cli import main
from finetune.config import FinetuneError
from finetune.hub import FILES, HF_FORMAT, export_hf, read_hf_folder
from finetune.model import load_safetensors
from finetune.predict import Predictor
from finetune.rundir import class_indices_json

# folder names are a stranger's: markup, a table cell's end, emphasis, a link
HOSTILE = "<img src=x onerror=alert(1)>|*x*"
CLASSES = ("cats", HOSTILE, "www.example.com")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with hostile class names, and its data folder."""
    from finetune.config import TrainConfig
    from finetune.training import train

    base = tmp_path_factory.mktemp("hf")
    data = make_class_folders(base / "photos", classes=CLASSES, per_class=4)
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(base / "runs"),
        weights="none",
        strategy="last",
        epochs=1,
        batch_size=4,
        image_size=32,
        workers=0,
        device="cpu",
        seed=0,
    )
    return train(cfg), data


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory) -> Path:
    return export_hf(trained[0], tmp_path_factory.mktemp("export") / "model")


def images_of(data: Path) -> list[Path]:
    return sorted(data.rglob("*.png"))


def test_every_run_folder_has_model_safetensors_beside_model_pth(trained):
    run, _ = trained
    classic = torch.load(run / "model.pth", map_location="cpu", weights_only=True)
    tensors = load_safetensors(run / "model.safetensors")
    assert tensors.keys() == classic.keys()
    assert all(torch.equal(tensors[key], classic[key]) for key in classic)


def test_the_folder_holds_weights_config_card_and_class_map(trained, folder):
    run, _ = trained
    assert {p.name for p in folder.iterdir()} == set(FILES)  # the run has all three plots
    config = json.loads((folder / "config.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert config["format"] == HF_FORMAT and config["arch"] == info["arch"] == "resnet34"
    assert config["classes"] == info["classes"] and sorted(config["classes"]) == sorted(CLASSES)
    assert (config["image_size"], config["resize_size"]) == (32, info["resize_size"])
    assert config["mean"] == info["mean"] and config["std"] == info["std"]
    assert config["temperature"] == info["calibration"]["temperature"]
    assert config["min_confidence"] == info["calibration"]["suggested_min_confidence"]
    assert config["finetune_version"]
    assert (folder / "class_indices.json").read_text() == class_indices_json(info["classes"])
    assert (folder / "class_indices.json").read_text().startswith('{\n    "0": ')
    weights = load_safetensors(folder / "model.safetensors")
    classic = torch.load(run / "model.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(weights[key], classic[key]) for key in classic)
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (folder / name).read_bytes() == (run / name).read_bytes()


def test_the_card_has_front_matter_the_hub_reads_and_the_runs_numbers(trained, folder):
    from huggingface_hub import ModelCard

    run, _ = trained
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.library_name == "pytorch" and card.data.pipeline_tag == "image-classification"
    assert {"image-classification", "resnet34", "finetune-studio"} <= set(card.data.tags)
    assert {"accuracy", "f1"} <= set(card.data.metrics)
    metrics = json.loads((run / "metrics.json").read_text())
    text = card.text
    assert f"accuracy {metrics['accuracy']:.3f}" in text and f"macro F1 {metrics['macro_f1']:.3f}" in text
    assert "trained from scratch" in text and "only 3 images" in text  # val: one image per class
    assert "](confusion_matrix.png)" in text and "](reliability.png)" in text
    assert str(trained[1]) not in text and str(run) not in text  # nothing of this machine's paths


def test_class_names_in_the_card_are_text_never_markup(folder):
    markdown_it = pytest.importorskip("markdown_it")
    card = (folder / "README.md").read_text()
    assert HOSTILE not in card and "<img" not in card
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card.split("---\n", 2)[2])
    tags = re.findall(r"<[^>]*>", html)
    assert not [tag for tag in tags if "onerror" in tag] and "<em>x</em>" not in html
    assert set(re.findall(r'<img src="([^"]*)"', html)) == {
        "confusion_matrix.png",
        "reliability.png",
        "training_curves.png",
    }
    assert [tag for tag in tags if tag.startswith("<a ")] == ['<a href="https://pypi.org/project/finetune-studio/">']
    assert "&lt;img src=x onerror=alert(1)&gt;|*x*" in html  # shown as written
    tables = re.findall(r"<table>.*?</table>", html, re.S)
    for table in tables:  # the | of a name did not add a cell: every row has its header's width
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        assert len({len(re.findall(r"<t[hd][ >]", row)) for row in rows}) == 1


def test_the_cards_torchvision_snippet_answers_as_finetune_predict(trained, folder, monkeypatch):
    _, data = trained
    image = images_of(data)[0]
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(code.replace('"photo.jpg"', repr(str(image))), namespace)
    expected = dict(Predictor.from_run(trained[0], device="cpu").predict_image(image, top_k=len(CLASSES)))
    classes = json.loads((folder / "config.json").read_text())["classes"]
    got = dict(zip(classes, namespace["probs"].tolist(), strict=True))
    assert got.keys() == expected.keys()
    assert all(abs(got[name] - expected[name]) < 1e-4 for name in classes)


def test_predict_and_load_take_the_folder_and_answer_as_the_run(trained, folder, capsys):
    import finetune

    run, data = trained
    outputs = []
    for model in (run, folder):
        assert main(["predict", str(model), str(data), "--top-k", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == len(images_of(data)) + 1
    from_run, from_folder = finetune.load(run), finetune.load(folder)
    assert from_folder.classes == from_run.classes and from_folder.arch == "resnet34"
    assert from_folder.predictor.temperature == from_run.predictor.temperature
    assert from_folder.predictor.min_confidence() == from_run.predictor.min_confidence()
    for a, b in zip(from_run.predict(data), from_folder.predict(data), strict=True):
        assert (a.answer, a.label) == (b.answer, b.label) and abs(a.confidence - b.confidence) < 1e-6


def test_export_never_writes_into_a_folder_of_the_users(trained, tmp_path, capsys):
    run, _ = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    before = tree_digest(mine)
    assert main(["export", str(run), "--format", "hf", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other files" in err and "Traceback" not in err
    assert tree_digest(mine) == before
    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "a-file")]) == 2
    assert (tmp_path / "a-file").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_export_replaces_an_earlier_export_and_into_an_empty_folder(trained, tmp_path, capsys):
    run, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), "--format", "hf", "--out", str(empty)]) == 0
    assert f"wrote {empty}" in capsys.readouterr().out
    card = (empty / "README.md").read_text()
    (empty / "README.md").write_text("stale")
    (empty / "extra.txt").write_text("kept")  # not one of the export's files: left alone
    assert main(["export", str(run), "--format", "hf", "--out", str(empty)]) == 0
    assert (empty / "README.md").read_text() == card and (empty / "extra.txt").read_text() == "kept"
    assert main(["export", str(run), "--format", "hf", "--half"]) == 2  # half is for the graph formats
    assert "--half" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"not tensors"), "not a safetensors file"),
        (lambda f: patch_config(f, arch="evil"), "'arch'"),
        (lambda f: patch_config(f, format="other/1"), "not a finetune model folder"),
        (lambda f: patch_config(f, min_confidence=3), "min_confidence"),
        (lambda f: patch_config(f, temperature=-1), "temperature"),
        (lambda f: (f / "class_indices.json").write_text('{"0": "a", "1": "b", "2": "c"}'), "does not match"),
    ],
)
def test_a_damaged_folder_is_one_line(folder, tmp_path, damage, message):
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    damage(copy)
    with pytest.raises(FinetuneError, match=message):
        Predictor.load(copy, device="cpu")
    assert read_hf_folder(folder)[0]["format"] == HF_FORMAT  # the original still reads


def patch_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---------------------------------------------------------------------------------------------
# finetune push (never the network here: HF_HUB_OFFLINE=1, and the upload replaced)


def test_push_offline_says_so_in_one_line(trained, capsys):
    assert main(["push", str(trained[0]), "someone/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err


def test_push_without_a_token_says_how_to_log_in(trained, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # whatever login this machine has
    assert main(["push", str(trained[0]), "someone/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf auth login" in err
    assert main(["push", str(trained[0]), "not a repo id!"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err


def test_push_uploads_the_export_with_the_users_token(trained, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls: dict = {}

    def create_repo(self, repo_id, **options):
        calls["create"] = (repo_id, options, self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **options):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, options, self.token)
        calls["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        calls["predicts"] = Predictor.load(folder, device="cpu").classes

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run, data = trained
    assert main(["push", str(run), "someone/model", "--private"]) == 0
    assert "https://huggingface.co/someone/model" in capsys.readouterr().out
    assert calls["create"][0] == "someone/model" and calls["create"][1]["private"] is True
    assert calls["create"][2] == calls["upload"][2] == "hf_test_token"
    assert calls["upload"][1]["repo_type"] == "model"
    assert (
        set(calls["files"]) == set(FILES) and calls["predicts"] == json.loads((run / "run.json").read_text())["classes"]
    )
    for name in ("README.md", "config.json"):
        assert str(data).encode() not in calls["files"][name] and str(run).encode() not in calls["files"][name]


def test_a_strangers_run_leaks_nothing_into_the_folder(trained, tmp_path):
    """A linked plot is not followed (the folder may be pushed), a weights path of the user's machine
    is not written, and a run without metrics, split or calibration still gets an honest card."""
    from conftest import copy_run

    run = copy_run(trained[0], tmp_path)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n private")
    (run / "reliability.png").unlink()
    (run / "reliability.png").symlink_to(secret)
    for name in ("metrics.json", "split.json"):
        (run / name).unlink()
    info = json.loads((run / "run.json").read_text())
    info["config"]["weights"] = "/home/alice/private/start.pth"
    del info["calibration"]
    (run / "run.json").write_text(json.dumps(info))
    out = export_hf(run, tmp_path / "out")
    assert "reliability.png" not in {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "alice" not in card and "reliability.png" not in card and "private" not in card
    assert "no evaluation" in card and "Not calibrated" in card and "could not be read" in card
    assert Predictor.load(out, device="cpu").temperature == 1.0


@pytest.mark.slow
def test_a_resumed_run_ends_with_model_safetensors_of_its_model_pth(trained, tmp_path):
    from conftest import copy_run

    from finetune.training import resume_config, train

    run = copy_run(trained[0], tmp_path)
    seen = []

    def on_event(event):  # after each epoch's checkpoint: never a model.safetensors of another epoch
        if event["type"] == "epoch" and (run / "model.safetensors").is_file():
            seen.append(load_safetensors(run / "model.safetensors")["fc.weight"])
            assert torch.equal(seen[-1], torch.load(run / "model.pth", weights_only=True)["fc.weight"])

    assert train(resume_config(run, epochs=3), on_event=on_event, resume=run) == run
    classic = torch.load(run / "model.pth", map_location="cpu", weights_only=True)
    tensors = load_safetensors(run / "model.safetensors")
    assert all(torch.equal(tensors[key], classic[key]) for key in classic)

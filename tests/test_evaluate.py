"""evaluate.evaluate_run: a trained run on another labelled folder, and the images it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_class_folders
from test_archive import zip_folder

from finetune.archive import dataset_folder
from finetune.config import FinetuneError, TrainConfig
from finetune.evaluate import evaluate_run
from finetune.predict import Predictor
from finetune.training import train


@pytest.fixture(scope="module")
def zipped_run(tmp_path_factory):
    """A run trained on a .zip holding train/ and val/ (as the command line takes it): (run, zip, root)."""
    base = tmp_path_factory.mktemp("evaluate")
    photos = base / "photos"
    make_class_folders(photos / "train", per_class=4)
    make_class_folders(photos / "val", per_class=2)
    archive = zip_folder(photos, base / "photos.zip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_DATASETS", str(base / "first"))
        root = dataset_folder(archive)
    cfg = TrainConfig(
        data=root,
        runs_dir=str(base / "runs"),
        weights="none",
        strategy="head",
        epochs=1,
        batch_size=4,
        image_size=32,
        workers=0,
        device="cpu",
    )
    return train(cfg), archive, Path(root)


def test_the_training_images_are_counted_and_held_out_only_refuses_them(zipped_run, tmp_path):
    run, _, root = zipped_run
    evaluation = evaluate_run(run, root / "train", device="cpu", out=tmp_path / "train")
    assert evaluation.overlap == 8 == evaluation.metrics["num_images"]
    assert evaluation.warning == "warning: all 8 images were in this run's training split: the score is not held out"
    assert evaluation.summary_text().splitlines()[0] == evaluation.warning
    written = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert written["training_overlap"] == 8 and written["held_out_only"] is False
    assert evaluation.confusion_matrix == tmp_path / "train" / "confusion_matrix.png"
    assert evaluation.confusion_matrix.is_file()
    with pytest.raises(FinetuneError, match=r"all 8 images of \S+ were in the training split of .*none are held out"):
        evaluate_run(run, root / "train", device="cpu", out=tmp_path / "none", held_out_only=True)
    assert not (tmp_path / "none").exists()

    # the run's own data folder, with train/ and val/ inside: its val/ split, none of it trained on
    own = evaluate_run(run, root, device="cpu", out=tmp_path / "own")
    assert own.overlap == 0 and own.warning is None and own.metrics["num_images"] == 4
    assert "warning" not in own.summary_text()
    with pytest.raises(FinetuneError, match="refusing to write the report into the data folder"):
        evaluate_run(run, root, device="cpu", out=root / "val" / "report")
    assert not (root / "val" / "report").exists()


def test_the_same_zip_extracted_again_is_known_as_the_training_data(zipped_run, tmp_path, monkeypatch):
    """Matched by the archive's hash, not the folder: another extraction (the studio's workspace, another
    cache), even once the one the run was trained on is gone."""
    run, archive, root = zipped_run
    monkeypatch.setenv("FINETUNE_DATASETS", str(tmp_path / "second"))
    lines: list[str] = []
    predictor = Predictor.from_run(run, device="cpu")
    again = evaluate_run(run, archive, out=tmp_path / "zip", log=lines.append, predictor=predictor)
    assert Path(again.data).is_relative_to(tmp_path / "second") and lines[0].startswith("photos.zip: extracted to")
    assert again.overlap == 0 and again.metrics["num_images"] == 4  # its val/ split
    elsewhere = Path(again.data) / "train"
    assert evaluate_run(run, elsewhere, out=tmp_path / "e", predictor=predictor).overlap == 8

    # the run's extraction removed since: its folder name (the archive's name and hash) still says which zip
    gone = tmp_path / "gone-run"
    gone.mkdir()
    split = json.loads((run / "split.json").read_text())
    split["root"] = str(tmp_path / "removed" / root.relative_to(root.parent.parent))
    (gone / "split.json").write_text(json.dumps(split))
    assert evaluate_run(gone, elsewhere, out=tmp_path / "g", predictor=predictor).overlap == 8
    # and a run without a split.json: unknown, never a guess
    (gone / "split.json").unlink()
    unknown = evaluate_run(gone, elsewhere, out=tmp_path / "u", predictor=predictor)
    assert unknown.overlap is None and unknown.warning is None
    with pytest.raises(FinetuneError, match="no readable split.json"):
        evaluate_run(gone, elsewhere, out=tmp_path / "u2", predictor=predictor, held_out_only=True)


def test_an_out_that_is_the_data_through_a_link_a_run_folder_or_a_file_is_refused(zipped_run, tmp_path):
    from finetune.predict import Predictor

    run, _, root = zipped_run
    predictor = Predictor.from_run(run, "cpu")
    link = tmp_path / "into-data"
    link.symlink_to(root / "val")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    metrics_before = (run / "metrics.json").read_bytes()
    refusals = {
        link / "report": "into the data folder",
        run: "into the run folder",
        a_file: "is a file, not a folder",
        a_file / "sub": "cannot write the report to",
    }
    for out, message in refusals.items():
        with pytest.raises(FinetuneError, match=message) as refused:
            evaluate_run(run, root, out=out, predictor=predictor)
        assert "\n" not in str(refused.value)
    assert (run / "metrics.json").read_bytes() == metrics_before and a_file.read_text() == "mine"
    assert not (root / "val" / "report").exists()

"""The studio's Export tab: the Hugging Face model folder as a zip (handler level, as test_studio.py)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_class_folders, tree_digest

gr = pytest.importorskip("gradio")

from finetune.config import TrainConfig  # noqa: E402
from finetune.studio import export_tab  # noqa: E402
from finetune.studio.state import Studio  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from finetune.training import train

    base = tmp_path_factory.mktemp("studio-hf")
    data = make_class_folders(base / "photos", per_class=4)
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(base / "runs"),
        arch="resnet18",
        weights="none",
        strategy="last",
        epochs=1,
        batch_size=4,
        image_size=32,
        workers=0,
        device="cpu",
        seed=0,
    )
    return Path(train(cfg))


def test_the_hf_folder_is_offered_as_a_zip_built_in_the_workspace(trained, tmp_path):
    studio = Studio(trained.parent, tmp_path / "ws", trained.parent, browse_root=tmp_path, base_dir=tmp_path)
    before = tree_digest(trained)
    files = export_tab.export_hf_zip(studio, str(trained))
    zipped = studio.workspace.served / "exports" / f"{trained.name}-hf.zip"
    assert str(zipped) in files and zipped.is_file()
    with zipfile.ZipFile(zipped) as z:
        names = set(z.namelist())
        top = f"{trained.name}-hf/"
        for name in ("model.safetensors", "config.json", "README.md", "class_indices.json"):
            assert top + name in names
        assert all(name.startswith(top) for name in names)  # one folder, no stray paths
        config = json.loads(z.read(top + "config.json"))
    assert config["classes"] == ["cats", "dogs"] and config["image_size"] == 32
    assert tree_digest(trained) == before  # nothing written into the run (no RUN/hf)
    assert not any(studio.workspace.inputs.iterdir())  # the staging folder is gone
    assert not [p for p in zipped.parent.iterdir() if p.name.startswith(".")]  # no partial zip left
    assert str(zipped) in export_tab.export_files(studio, str(trained))["files"]  # listed from now on
    studio.job = SimpleNamespace(run_dir=trained, running=lambda: True)
    studio.running_job = lambda: studio.job  # type: ignore[method-assign]
    with pytest.raises(gr.Error, match="still training"):
        export_tab.export_hf_zip(studio, str(trained))


def test_an_hf_export_of_a_broken_run_is_one_line(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "run.json").write_text("{}")
    studio = Studio(runs, tmp_path / "ws", tmp_path, browse_root=tmp_path, base_dir=tmp_path)
    with pytest.raises(gr.Error) as caught:
        export_tab.export_hf_zip(studio, str(runs / "r1"))
    assert "\n" not in str(caught.value)
    assert not (studio.workspace.served / "exports" / "r1-hf.zip").exists()

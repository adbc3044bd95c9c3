"""examples/quickstart.ipynb, executed in a real Jupyter kernel as a new user would run it."""

from __future__ import annotations

import pytest
from conftest import REPO, execute_notebook, notebook_text


@pytest.mark.slow
def test_the_quickstart_notebook_runs_in_a_kernel(tmp_path):
    nb = execute_notebook(
        REPO / "examples" / "quickstart.ipynb",
        tmp_path,
        timeout=600,
        env={
            "QUICKSTART_EPOCHS": "1",
            "QUICKSTART_IMAGE_SIZE": "32",
            "QUICKSTART_WEIGHTS": "none",
            "FINETUNE_RUNS_DIR": str(tmp_path / "runs"),
        },
    )
    text = notebook_text(nb)
    assert "epoch   1: train loss" in text and "circle_00.jpg" in text  # the epoch line, a prediction
    assert "Data:" in text and "calibration" in text  # the scan's report, the evaluation's
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "model.pth").is_file() and (run / "model.onnx").is_file()
    assert next(run.glob("eval-*/metrics.json")).is_file()
    shown = [output["data"] for cell in nb.cells for output in cell.get("outputs", []) if "data" in output]
    summary = next(
        data["text/html"] for data in shown if "text/html" in data and "confusion matrix" in data["text/html"]
    )
    assert run.name in summary and "<img src='data:image/png;base64," in summary
    assert any("image/png" in data for data in shown)  # the Grad-CAM overlay
    assert "Traceback" not in text

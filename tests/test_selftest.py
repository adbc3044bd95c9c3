"""`finetune selftest --device cpu`: what users run on their own machine passes here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_selftest_on_the_cpu_passes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "selftest", "--device", "cpu", "--image-size", "64"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert "mixed precision: off" in out and "channels_last: on" in out
    for strategy in ("head", "last", "all"):
        assert f"{strategy}: frozen layers" in out and f"{strategy}: cached = full model" in out
    assert "last: calibration, heatmaps" in out and "Grad-CAM on cpu" in out
    assert "FAIL" not in out and "all checks passed" in out


def test_selftest_reports_a_failure_and_exits_1(monkeypatch, capsys):
    from finetune import selftest

    def broken(*args):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(selftest, "check_training", broken)
    report = selftest.run_selftest("cpu", image_size=32)
    assert not report.passed and "simulated device fault" in report.table()
    assert "FAIL" in capsys.readouterr().out

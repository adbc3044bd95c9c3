"""Installed with `pip install -e .` (as `make` does), the commands work from any folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def installed(command: str) -> str:
    path = shutil.which(command, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{command} is not installed next to {sys.executable} (run `make setup` or `pip install -e .`)")
    return path


def test_finetune_command_works_from_another_folder(tmp_path, sample_data):
    done = subprocess.run([installed("finetune"), "scan", str(sample_data)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 classes" in done.stdout
    done = subprocess.run([sys.executable, "-m", "finetune", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "selftest" in done.stdout


def test_studio_command_is_installed(tmp_path):
    done = subprocess.run([installed("finetune-studio"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--host" in done.stdout

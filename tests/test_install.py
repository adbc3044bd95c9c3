"""The package as users install it: the commands from any folder (`pip install -e .`, as `make` does),
the declared dependencies and extras, the one line of a missing extra, the default folders, and a
wheel built and installed into a fresh environment (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def installed(command: str) -> str:
    path = shutil.which(command, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{command} is not installed next to {sys.executable} (run `make setup` or `pip install -e .`)")
    return path


@pytest.mark.slow
def test_finetune_command_works_from_another_folder(tmp_path, sample_data):
    done = subprocess.run(
        [installed("finetune"), "scan", str(sample_data)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "3 classes" in done.stdout
    done = subprocess.run([sys.executable, "-m", "finetune", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "selftest" in done.stdout


def test_studio_command_is_installed(tmp_path):
    done = subprocess.run(
        [installed("finetune-studio"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--host" in done.stdout


# ---------------------------------------------------------------------------------------------
# The package: its dependencies, extras, default folders, command names, and a wheel installed elsewhere

DISTRIBUTION = "finetune-studio"
# Imported only inside a try, each with a fallback (a notebook's, Colab's, a faster check): not dependencies.
OPTIONAL_PROBES = {"IPython", "google", "psutil", "onnxruntime", "ipywidgets"}
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "pytorch_grad_cam": "grad-cam",
    "mlflow": "mlflow-skinny",
}


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements(lines) -> dict:
    """{canonical name: specifier} of requirement lines (comments and blank lines left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement.specifier
    return found


def declared_extras() -> dict[str, dict]:
    """Each extra's requirements, [all] with its references to the other extras expanded."""
    from packaging.requirements import Requirement

    extras = {}
    for name, lines in project()["optional-dependencies"].items():
        expanded = []
        for line in lines:
            requirement = Requirement(line)
            if requirement.name == DISTRIBUTION:
                expanded += [
                    item for extra in sorted(requirement.extras) for item in project()["optional-dependencies"][extra]
                ]
            else:
                expanded.append(line)
        extras[name] = requirements(expanded)
    return extras


def test_requirements_txt_is_the_core_and_every_extra_with_honest_bounds():
    assert project()["name"] == DISTRIBUTION
    core, extras = requirements(project()["dependencies"]), declared_extras()
    assert {"studio", "doctor", "explain", "onnx", "serve", "tensorboard", "mlflow", "all"} <= set(extras)
    each = {name: spec for extra, reqs in extras.items() if extra != "all" for name, spec in reqs.items()}
    assert extras["all"] == each
    assert requirements((REPO / "requirements.txt").read_text().splitlines()) == {**core, **each}
    # the studio calls gradio 6 APIs; the versions this project is tested with are inside the ranges
    assert "5.50.0" not in each["gradio"] and "6.0.0" in each["gradio"] and "7.0.0" not in each["gradio"]
    assert "2.14.1" in core["torch"] and "0.29.1" in core["torchvision"] and "2.5.1" not in core["torch"]
    assert all(str(spec) for spec in {**core, **each}.values()), "every requirement has bounds"


def test_every_library_finetune_imports_is_declared():
    import ast

    declared = {**requirements(project()["dependencies"]), **declared_extras()["all"]}
    imported: dict[str, str] = {}
    for path in sorted((REPO / "finetune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.partition(".")[0], path.relative_to(REPO).as_posix())
    third_party = {
        top: where
        for top, where in imported.items()
        if top not in sys.stdlib_module_names and top not in OPTIONAL_PROBES | {"finetune", "__future__"}
    }
    undeclared = {
        top: where
        for top, where in third_party.items()
        if DISTRIBUTION_OF.get(top, top).lower().replace("_", "-") not in declared
    }
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def hide(monkeypatch, module: str) -> None:
    """As if `module` (and its submodules) were not installed: an import of it raises ImportError."""
    for name in [name for name in sys.modules if name == module or name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_a_missing_extra_is_one_line_naming_what_to_install(monkeypatch, tmp_path):
    import torch

    from finetune.config import FinetuneError
    from finetune.data_doctor import run_doctor
    from finetune.explain import gradcam
    from finetune.export import _export_onnx, read_metadata
    from finetune.studio.app import launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINETUNE_RUNS_DIR", raising=False)
    monkeypatch.setenv("FINETUNE_AUTH", "")
    hide(monkeypatch, "gradio")
    with pytest.raises(FinetuneError) as raised:
        launch()
    assert str(raised.value) == "the studio needs gradio: pip install 'finetune-studio[studio]'"
    assert not any(tmp_path.iterdir()), "no folder made before the check"
    hide(monkeypatch, "cleanlab")
    with pytest.raises(
        FinetuneError, match=r"^the data doctor needs cleanlab: pip install 'finetune-studio\[doctor\]'$"
    ):
        run_doctor(tmp_path)
    hide(monkeypatch, "pytorch_grad_cam")
    with pytest.raises(FinetuneError, match=r"^Grad-CAM needs grad-cam: pip install 'finetune-studio\[explain\]'$"):
        gradcam(torch.nn.Linear(1, 1), torch.zeros(3, 32, 32))
    hide(monkeypatch, "onnx")
    for call in (
        lambda: read_metadata(tmp_path / "model.onnx"),
        lambda: _export_onnx(torch.nn.Linear(1, 1), torch.zeros(1, 1), tmp_path / "model.onnx", {}),
    ):
        with pytest.raises(FinetuneError, match=r"^ONNX export needs onnx: pip install 'finetune-studio\[onnx\]'$"):
            call()


def test_the_commands_say_a_missing_extra_in_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from finetune.cli import main

    hide(monkeypatch, "cleanlab")
    assert main(["doctor", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: the data doctor needs cleanlab: pip install 'finetune-studio[doctor]'\n"
    # the finetune-studio command, in a process of its own without gradio
    env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_AUTH", "FINETUNE_RUNS_DIR")}
    code = "import sys; sys.modules['gradio'] = None; from finetune.studio.app import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: the studio needs gradio: pip install 'finetune-studio[studio]'\n"
    assert not any(tmp_path.iterdir()), "no runs folder or workspace made"


def test_default_folders_are_where_the_user_is_for_the_cli_the_api_and_the_studio(monkeypatch, tmp_path):
    import finetune
    from finetune.cli import build_parser, config_from_args
    from finetune.config import TrainConfig
    from finetune.paths import default_runs_dir, default_workspace, sample_data
    from finetune.studio.app import parse_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINETUNE_WORKSPACE", raising=False)
    monkeypatch.delenv("FINETUNE_DATA", raising=False)
    monkeypatch.delenv("FINETUNE_RUNS_DIR", raising=False)
    assert default_runs_dir() == tmp_path / "runs" and default_workspace() == tmp_path / "runs-workspace"
    assert TrainConfig().runs_dir == str(tmp_path / "runs")
    for runs in ("my-runs", str(tmp_path / "abs")):
        monkeypatch.setenv("FINETUNE_RUNS_DIR", runs)
        expected = str(tmp_path / runs)  # an absolute one stays as it is
        assert TrainConfig().runs_dir == expected == TrainConfig.from_dict({"runs_dir": None}).runs_dir
        assert config_from_args(build_parser().parse_args(["train", "photos"])).runs_dir == expected
        studio = parse_args([])
        assert (studio.runs_dir, studio.workspace) == (expected, expected + "-workspace")
    assert TrainConfig(runs_dir="given").runs_dir == "given"
    assert parse_args(["--runs-dir", "r", "--workspace", "w"]).workspace == "w"
    # $FINETUNE_WORKSPACE is the same default for finetune-studio and finetune.studio.launch()
    monkeypatch.setenv("FINETUNE_WORKSPACE", "ws")
    assert default_workspace("r") == tmp_path / "ws" and parse_args([]).workspace == str(tmp_path / "ws")
    # the sample data is part of the package, wherever it is installed
    assert sample_data().parent == Path(finetune.__file__).resolve().parent
    assert sorted(p.name for p in sample_data().iterdir()) == ["circle", "square", "triangle"]
    assert parse_args([]).data == str(sample_data())


def test_version_and_usage_lines_name_the_command_typed(tmp_path):
    import finetune

    version = f"finetune-studio {finetune.__version__}"
    for command in (
        [installed("finetune")],
        [sys.executable, "-m", "finetune"],
        [installed("finetune-studio")],
        [sys.executable, "-m", "finetune.studio"],
    ):
        done = subprocess.run([*command, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout.strip()) == (0, version), command
    for command, typed in (
        ([installed("finetune"), "train"], "finetune train"),
        ([sys.executable, "-m", "finetune", "train"], "python -m finetune train"),
        ([installed("finetune-studio")], "finetune-studio"),
        ([sys.executable, "-m", "finetune.studio"], "python -m finetune.studio"),
    ):
        done = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {typed} ["), (command, done.stdout[:80])


NEVER_PACKAGED = {
    ".git",
    ".venv",
    "runs",
    "workspace",
    "runs-workspace",
    "test-artifacts",
    "__pycache__",
    "tests",
    ".pytest_cache",
    "bench",
}


def source_tree(target: Path) -> Path:
    """A copy of what a clone holds (git's tracked and not-ignored files, as they are now), so the build
    writes its egg-info and build/ there, not into the checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the project's")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
def test_the_wheel_installs_elsewhere_and_trains_into_the_current_folder_without_extras(tmp_path):
    import tarfile
    import zipfile

    import finetune
    from finetune.paths import sample_data

    pytest.importorskip("build")
    src, dist = source_tree(tmp_path / "src"), tmp_path / "dist"
    # sdist first, then the wheel built from the sdist: a file the sdist lacks breaks the wheel
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    assert wheel.name.startswith(f"finetune_studio-{finetune.__version__}-")

    with tarfile.open(sdist) as archive:  # nothing but the project's own files, nothing large
        members = [m for m in archive.getmembers() if m.isfile()]
    in_sdist = {m.name.partition("/")[2]: m.size for m in members}
    generated = {name for name in in_sdist if name in ("PKG-INFO", "setup.cfg") or ".egg-info/" in name}
    assert set(in_sdist) - generated <= {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert not {part for name in in_sdist for part in Path(name).parts[:-1]} & NEVER_PACKAGED
    assert max(in_sdist.values()) < 1_000_000 and sum(in_sdist.values()) < 5_000_000

    with zipfile.ZipFile(wheel) as archive:
        in_wheel = archive.namelist()
        metadata = archive.read(next(n for n in in_wheel if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {name.split("/")[0] for name in in_wheel} == {"finetune", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not {part for name in in_wheel for part in name.split("/")[:-1]} & NEVER_PACKAGED
    shipped = sorted(n for n in in_wheel if n.startswith("finetune/sample_data/") and n.endswith(".jpg"))
    assert len(shipped) == len(list(sample_data().rglob("*.jpg"))) > 0
    assert "Name: finetune-studio" in metadata
    assert {line.split(": ")[1] for line in metadata.splitlines() if line.startswith("Provides-Extra:")} == {
        "studio",
        "doctor",
        "explain",
        "onnx",
        "serve",
        "hub",
        "tensorboard",
        "mlflow",
        "all",
    }
    assert "finetune = finetune.cli:console" in entry_points
    assert "finetune-studio = finetune.studio.app:main" in entry_points

    # a fresh environment that borrows this one's libraries (no torch download), with the wheel installed
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import sysconfig

    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(where, "borrowed.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    installed_wheel = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed_wheel.returncode == 0, installed_wheel.stderr[-3000:]
    site = Path(where)
    # as installed without extras (`pip install finetune-studio`): every optional library hidden at start-up
    hidden = ", ".join(
        repr(module) for module in ("gradio", "cleanlab", "pytorch_grad_cam", "onnx", "tensorboard", "mlflow")
    )
    Path(where, "zz_no_extras.pth").write_text(f"import sys; sys.modules.update(dict.fromkeys([{hidden}]))\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") and k != "PYTHONPATH"}

    def run(*args, timeout=120):
        return subprocess.run(
            [str(a) for a in args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout
        )

    where_code = "import finetune, finetune.paths; print(finetune.__file__); print(finetune.paths.sample_data())"
    package, data = run(python, "-c", where_code).stdout.split()
    assert Path(package).parent == site / "finetune" and Path(data) == site / "finetune" / "sample_data"
    version = run(fresh / "bin" / "finetune", "--version")
    assert version.stdout.strip() == f"finetune-studio {finetune.__version__}", version.stderr
    assert run(fresh / "bin" / "finetune-studio", "--help").returncode == 0
    studio = run(fresh / "bin" / "finetune-studio")
    assert (studio.returncode, studio.stderr) == (
        2,
        "error: the studio needs gradio: pip install 'finetune-studio[studio]'\n",
    )

    trained = run(
        fresh / "bin" / "finetune",
        "train",
        data,
        "--weights",
        "none",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--quiet",
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (elsewhere / "runs").iterdir()
    assert (run_dir / "model.pth").is_file()
    assert not [p for p in (site / "finetune").rglob("*") if p.name in ("runs", "runs-workspace", "workspace")]

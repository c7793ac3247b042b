"""The package as a user installs it: a wheel built from this tree, installed (not editable) into a
new virtual environment, run from a folder outside the checkout. Presets, the shipped teacher and the
detector come from inside the package; the teacher-output cache lands in the run folder."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(stepdistill console script, its python, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build with this environment's setuptools where it has one (else pip fetches it from the index)
    local = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *local,
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("stepdistill-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, diffusers, ...) from this environment; its .pth files (the editable
    # install of this checkout among them) are not read from a plain path entry
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin" / "stepdistill", py, work


def _run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_the_package_not_the_checkout(installed):
    _, py, work = installed
    out = _run([py, "-c", "import stepdistill, stepdistill.resources as r; print(stepdistill.__file__); "
                          "print(r.TEACHERS / 'digits16' / 'stepdistill.json'); print(r.DETECTORS)"], work)
    assert out.returncode == 0, out.stderr
    module, teacher_meta, detectors = out.stdout.split()
    assert not module.startswith(str(ROOT)) and Path(module).is_file()
    assert Path(teacher_meta).is_file() and (Path(detectors) / "digits.safetensors").is_file()


def test_presets_train_and_sample_from_any_folder(installed):
    exe, _, work = installed
    listed = _run([exe, "presets"], work)
    assert listed.returncode == 0, listed.stderr
    assert "digits/dmd2" in listed.stdout and "accelerate/fsdp" in listed.stdout and "digits16" in listed.stdout
    path = _run([exe, "presets", "--path", "accelerate/fsdp"], work).stdout.strip()
    assert Path(path).is_file() and not path.startswith(str(ROOT))

    run = _run([exe, "train", "digits/dmd", "max_steps=1", "batch_size=4", "objective.cache_num=8",
                "objective.cache_steps=4", "output_dir=run", "progress=false", "preview_every=null",
                "collapse_every=null"], work)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "run" / "teacher_cache").is_dir()  # the cache lives with its run ...
    assert (work / "run" / "checkpoints" / "step-00000001").is_dir()
    assert not (work / "runs").exists()  # ... not in a cwd-relative runs/digits/cache

    sample = _run([exe, "sample", "digits16", "--num", "2", "--steps", "2", "--out", "s.png"], work)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert (work / "s.png").is_file()

    missing = _run([exe, "train", "digits/nope"], work)
    assert missing.returncode == 2 and "stepdistill presets" in missing.stderr


def test_names_resolve_to_shipped_files_and_a_users_own_path_wins(tmp_path, monkeypatch):
    from stepdistill import resources
    from stepdistill.train.setup import resolve

    monkeypatch.chdir(tmp_path)
    shipped = resources.PRESETS / "digits" / "dmd2.yaml"
    for name in ("digits/dmd2", "digits/dmd2.yaml", "configs/digits/dmd2.yaml"):  # the last: pre-packaging docs
        assert resources.preset(name) == shipped
    for name in ("digits16", "assets/teachers/digits16"):
        assert resources.teacher(name) == str(resources.TEACHERS / "digits16")
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "dmd2.yaml").write_text("max_steps: 3\n")
    (tmp_path / "digits16").mkdir()
    assert resources.preset("digits/dmd2.yaml") == Path("digits/dmd2.yaml")  # a file of that name here
    assert resources.teacher("digits16") == "digits16"
    assert resources.teacher("org/model") == "org/model"  # a hub name passes through
    # the regression cache defaults into the run folder; a folder the user names is kept
    cfg, _ = resolve(str(shipped), ["output_dir=somewhere/run"])
    assert cfg.objective.cache == str(Path("somewhere/run") / "teacher_cache")
    cfg, _ = resolve(str(shipped), ["output_dir=somewhere/run", "objective.cache=shared/pairs"])
    assert cfg.objective.cache == "shared/pairs"


def test_eval_takes_a_shipped_teacher_by_name(tmp_path, monkeypatch):
    """`stepdistill eval digits16_edm`: a shipped teacher's name, not a 'digits*' data spec."""
    from stepdistill.eval.sources import load_source

    monkeypatch.chdir(tmp_path)
    assert load_source("digits16_edm").num_classes == 10

"""Every bad input a careless or hostile user tried, through the CLI: exit code 2, one line on stderr
that names the problem and the fix, no traceback, and no file changed, added or removed (a failed
start leaves no empty output_dir behind)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import trainer_toy  # noqa: F401  (registers the toy objectives)
from stepdistill.resources import PRESETS
from stepdistill.cli import main
from stepdistill.runfolder import FolderClaim

CONFIG = str(PRESETS / "digits" / "teacher.yaml")


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def _train_args(teacher, data, out, *extra) -> list[str]:
    return ["train", f"teacher={teacher}", f"data={data}", f"output_dir={out}", "cpu=true", "batch_size=4",
            "max_steps=2", "checkpoint_every=2", "log_every=1", "preview_every=null", "progress=false",
            "objective.name=toy-regress", *extra]


@pytest.fixture(scope="module")
def trained(tiny_teacher_dir, tiny_data_npz, tmp_path_factory):
    """A finished 2-step run and its export."""
    root = tmp_path_factory.mktemp("trained")
    assert main(_train_args(tiny_teacher_dir, tiny_data_npz, root / "run")) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _labels_npz(path: Path, labels) -> Path:
    labels = np.asarray(labels)
    np.savez(path, images=np.zeros((len(labels), 8, 8, 1), np.uint8), labels=labels)
    return path


def _pickled_teacher(w) -> Path:
    """A copy of the tiny teacher whose weights are only a pickle (.bin)."""
    from conftest import tiny_teacher

    path = w["tmp"] / "pickled"
    shutil.copytree(w["teacher"], path)
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny_teacher().backbone.save_pretrained(path / "unet", safe_serialization=False)
    return path


def _replaced_teacher_run(w) -> list[str]:
    """A run trained on a copy of the teacher, whose weights are then replaced under the same path."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file, save_file

    teacher, run = w["tmp"] / "teacher", w["tmp"] / "run-t"
    shutil.copytree(w["teacher"], teacher)
    assert main(_train_args(teacher, w["data"], run)) == 0
    AcceleratorState._reset_state(True)
    f = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    tensors = {k: v + 1e-3 if i == 0 else v for i, (k, v) in enumerate(sorted(tensors.items()))}
    save_file(tensors, f)
    return _train_args(teacher, w["data"], run, "max_steps=4")


# (case, setup(w) -> argv, what the one line must say); `w` is a dict of paths inside the test's folder
CASES = [
    ("pretrain into a folder of the user's", lambda w: (
        (w["tmp"] / "thesis").mkdir(), (w["tmp"] / "thesis" / "thesis.tex").write_text("years of work"),
        ["pretrain", CONFIG, f"output_dir={w['tmp'] / 'thesis'}"])[-1], "is not empty"),
    ("pretrain: negative warmup_steps", lambda w: ["pretrain", CONFIG, "warmup_steps=-1",
                                                   f"output_dir={w['tmp'] / 'new'}"], "warmup_steps must be >= 0"),
    ("pretrain: unknown lr_schedule", lambda w: ["pretrain", CONFIG, "lr_schedule=cosine_warm",
                                                 f"output_dir={w['tmp'] / 'new'}"], "is not a diffusers schedule"),
    ("train: negative lr", lambda w: _train_args(w["teacher"], w["data"], w["new"], "optim.student.lr=-1e-4"),
     "optim.student.lr must be a positive number"),
    ("train: NaN lr", lambda w: _train_args(w["teacher"], w["data"], w["new"], "optim.student.lr=nan"),
     "optim.student.lr must be a positive number"),
    ("train: unknown lr_schedule", lambda w: _train_args(w["teacher"], w["data"], w["new"],
                                                         "optim.student.lr_schedule=cosine_warm"),
     "lr_schedule 'cosine_warm' is not a diffusers schedule"),
    ("train: Adam beta1 out of range", lambda w: _train_args(w["teacher"], w["data"], w["new"],
                                                             "optim.student.beta1=1.5"),
     "optim.student.beta1 must be in [0, 1)"),
    ("train: negative warmup_steps", lambda w: _train_args(w["teacher"], w["data"], w["new"],
                                                           "optim.student.warmup_steps=-3"),
     "optim.student.warmup_steps must be >= 0"),
    ("train: labels beyond the teacher's classes", lambda w: _train_args(
        w["teacher"], _labels_npz(w["tmp"] / "five.npz", [0, 1, 5, 1]), w["new"]), "has label 5, out of range"),
    ("train: labels equal to the null class", lambda w: _train_args(
        w["teacher"], _labels_npz(w["tmp"] / "null.npz", [0, 1, 2, 1]), w["new"]), "label 2, its null class"),
    ("train: an .npz that is not an npz", lambda w: (
        (w["tmp"] / "fake.npz").write_text("just text"),
        _train_args(w["teacher"], w["tmp"] / "fake.npz", w["new"]))[-1], "is not an .npz file (no zip header)"),
    ("train: a teacher with only pickled weights", lambda w: _train_args(_pickled_teacher(w), w["data"], w["new"]),
     "training reads safetensors only"),
    ("train: resume on a replaced teacher", _replaced_teacher_run, "has changed since checkpoint"),
    ("train: resume with another seed", lambda w: _train_args(w["teacher"], w["data"], w["run"], "seed=5",
                                                              "max_steps=4"), "seed: 0 -> 5"),
    ("train: a folder another process holds", lambda w: (
        w.__setitem__("claim", FolderClaim(w["run"])),
        _train_args(w["teacher"], w["data"], w["run"], "max_steps=4"))[-1], "is in use by another stepdistill process"),
    ("export: a checkpoint the run does not have", lambda w: [
        "export", str(w["run"]), "--out", str(w["tmp"] / "e"), "--checkpoint", "step-99999999"],
     "has no checkpoint 'step-99999999'; it has step-00000002"),
    ("export: another run's checkpoint", lambda w: (
        shutil.copytree(w["run"], w["tmp"] / "other"),
        ["export", str(w["run"]), "--out", str(w["tmp"] / "e"), "--checkpoint",
         str(w["tmp"] / "other" / "checkpoints" / "step-00000002")])[-1], "is not a checkpoint of run"),
    ("export: onto an export holding the user's notes", lambda w: (
        (w["export"] / "notes.txt").write_text("mine"),
        ["export", str(w["run"]), "--out", str(w["export"])])[-1], "notes.txt"),
    ("export: onto an export whose model card was edited", lambda w: (
        (w["export"] / "README.md").write_text("my own card"),
        ["export", str(w["run"]), "--out", str(w["export"])])[-1], "README.md"),
    ("sample: --out onto the run's config.yaml", lambda w: [
        "sample", str(w["run"]), "--num", "2", "--out", str(w["run"] / "config.png")], "would overwrite config.yaml"),
    ("eval: --json onto the run's config.yaml", lambda w: [
        "eval", str(w["run"]), "--ref", "digits-test", "--num", "2", "--json", str(w["run"] / "config.yaml")],
     "would overwrite config.yaml"),
    ("eval: --plot onto a run's preview", lambda w: (
        (w["run"] / "previews").mkdir(), (w["run"] / "previews" / "step-00000002.png").write_bytes(b"png"),
        ["eval", str(w["run"]), "--ref", "digits-test", "--num", "2", "--plot",
         str(w["run"] / "previews" / "step-00000002.png")])[-1], "would overwrite previews/step-00000002.png"),
    ("sample: --out with no image suffix", lambda w: [
        "sample", str(w["teacher"]), "--num", "2", "--out", str(w["tmp"] / "grid.txt")], "is not an image format"),
    ("train: xformers where it cannot run (no package or no CUDA)", lambda w: _train_args(
        w["teacher"], w["data"], w["new"], "attention=xformers"), "attention=xformers"),
    ("train: unknown attention kernel", lambda w: _train_args(w["teacher"], w["data"], w["new"], "attention=flash"),
     "attention 'flash' is not one of auto, sdpa, xformers"),
    ("plot: a folder that is not a run", lambda w: ["plot", str(w["tmp"]), "--out", str(w["tmp"] / "c.png")],
     "has no metrics.jsonl"),
]


@pytest.mark.parametrize("case,setup,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, setup, needle, trained, tiny_teacher_dir, tiny_data_npz,
                                                   tmp_path, capsys):
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "export", tmp_path / "export")
    w = {"tmp": tmp_path, "run": tmp_path / "run", "export": tmp_path / "export", "teacher": tiny_teacher_dir,
         "data": tiny_data_npz, "new": tmp_path / "new-run"}
    argv = [str(a) for a in setup(w)]
    before, teacher_before = snapshot(tmp_path), snapshot(Path(tiny_teacher_dir))
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case, err)
    assert needle in err, err
    assert "\n" not in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before, case
    assert snapshot(Path(tiny_teacher_dir)) == teacher_before
    if "claim" in w:
        w["claim"].release()


def test_sample_jpg_holds_jpeg(tiny_teacher_dir, tmp_path):
    assert main(["sample", str(tiny_teacher_dir), "--steps", "2", "--num", "2", "--out", str(tmp_path / "g.jpg")]) == 0
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's SOI marker, not PNG's signature
    assert main(["sample", str(tiny_teacher_dir), "--steps", "2", "--num", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_may_rewrite_its_own_grid_in_a_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    for _ in range(2):  # the README's quickstart writes runs/.../grid.png; re-running it is fine
        assert main(["sample", str(run), "--num", "2", "--out", str(run / "grid.png")]) == 0


def test_reexport_onto_an_untouched_export_replaces_it(trained, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(trained / "export", out, copy_function=shutil.copy2)
    assert main(["export", str(trained / "run"), "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file() and not (out / "notes.txt").exists()


def test_export_by_path_to_its_own_checkpoint(trained, tmp_path):
    ck = trained / "run" / "checkpoints" / "step-00000002"
    assert main(["export", str(trained / "run"), "--out", str(tmp_path / "e"), "--checkpoint", str(ck)]) == 0

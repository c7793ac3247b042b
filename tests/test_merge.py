"""``stepdistill merge`` (SwiftBrush v2's weight merging, Dao et al., 2024, sec. 3.3): the exported
weights are (1 - alpha) A + alpha B of the two runs' EMA students (LoRA adapters fused), and students
that differ in network or sampling are refused with one line."""
from __future__ import annotations

import pytest
import torch

from stepdistill.cli import main
from stepdistill.errors import UserError
from test_export import _train


@pytest.fixture(scope="module")
def two_runs(tiny_teacher_dir, tiny_data_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = _train(tiny_teacher_dir, tiny_data_npz, root / "a", **{"student.steps": 2})
    b = _train(tiny_teacher_dir, tiny_data_npz, root / "b", **{"student.steps": 2, "seed": 3, "optim.student.lr": 5e-2})
    lora = _train(tiny_teacher_dir, tiny_data_npz, root / "lora", **{"student.steps": 2, "student.lora_rank": 2})
    four = _train(tiny_teacher_dir, tiny_data_npz, root / "four", **{"student.steps": 4})
    return {"a": a, "b": b, "lora": lora, "four": four}


def test_merged_export_is_the_weight_interpolation(two_runs, tmp_path):
    from stepdistill.export.lora import merged_copy
    from stepdistill.loaders import load_for_sampling, load_run

    assert main(["merge", str(two_runs["a"]), str(two_runs["b"]), "--alpha", "0.25", "--out", str(tmp_path / "m")]) == 0
    merged = load_for_sampling(tmp_path / "m").student
    a, _ = load_run(two_runs["a"])
    b, _ = load_run(two_runs["b"])
    wm, wa, wb = (s.denoiser.backbone.state_dict() for s in (merged, a, b))
    moved = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert moved > 1e-3  # the two students differ, so the interpolation is visible
    for k in wa:
        torch.testing.assert_close(wm[k], 0.75 * wa[k] + 0.25 * wb[k], rtol=1e-6, atol=1e-7)
    # a LoRA student merges as its fused weights
    assert main(["merge", str(two_runs["a"]), str(two_runs["lora"]), "--out", str(tmp_path / "l")]) == 0
    lora, _ = load_run(two_runs["lora"])
    wl = merged_copy(lora.denoiser.backbone).state_dict()
    wm = load_for_sampling(tmp_path / "l").student.denoiser.backbone.state_dict()
    for k in wa:
        torch.testing.assert_close(wm[k], 0.5 * wa[k] + 0.5 * wl[k], rtol=1e-6, atol=1e-7)


def test_students_that_sample_differently_are_refused(two_runs, tmp_path):
    from stepdistill.export.merge import merge_runs

    with pytest.raises(UserError, match="sample differently"):
        merge_runs(two_runs["a"], two_runs["four"], tmp_path / "x")
    with pytest.raises(UserError, match="alpha"):
        merge_runs(two_runs["a"], two_runs["b"], tmp_path / "y", alpha=1.5)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

"""tools/gpu_bench.py: the GPU measurement's own code path, run on CPU with tiny UNets (--tiny), so a
broken script is found here and not on a lent GPU."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import load_tool

OBJECTIVES = ("dmd2", "sid", "consistency")


@pytest.fixture(scope="module")
def gpu_bench():
    return load_tool("gpu_bench")


@pytest.fixture(scope="module")
def rows(gpu_bench, tmp_path_factory):
    """The table of one tiny run: {(model, objective, attention): step-time cell}."""
    out = tmp_path_factory.mktemp("bench") / "gpu.md"
    assert gpu_bench.main(["--objectives", ",".join(OBJECTIVES), "--tiny", "--device", "cpu", "--iters", "1",
                           "--batch", "2", "--out", str(out)]) == 0
    cells = {}
    for line in out.read_text().splitlines():
        c = [x.strip() for x in line.strip("|").split("|")]
        if len(c) == 10 and c[0] != "model" and not c[0].startswith("-"):
            cells[(c[0], c[1], c[4])] = c[7]
            assert c[8] == "n/a on CPU"
    return cells


def _finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell)) and float(cell) > 0
    except ValueError:
        return False


def test_one_row_per_objective_and_attention(gpu_bench, rows):
    sd15 = gpu_bench.TINY["sd15"].label
    for obj in OBJECTIVES:
        assert _finite(rows[(sd15, obj, "sdpa")]), rows[(sd15, obj, "sdpa")]
        assert rows[(sd15, obj, "xformers")].startswith("xformers unavailable")


def test_sdxl_lora_row_with_gradient_checkpointing(gpu_bench, rows):
    assert _finite(rows[(gpu_bench.TINY["sdxl"].label, "dmd2", "sdpa")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_full_size_without_cuda(gpu_bench, tmp_path):
    with pytest.raises(SystemExit, match="--tiny --device cpu"):
        gpu_bench.main(["--out", str(tmp_path / "gpu.md")])
    assert not (tmp_path / "gpu.md").exists()

"""tools/memory_table.py: the activation formula against the tensors autograd actually saves, and
parameter counting on the meta device against a real instantiation (tiny models, CPU, a few seconds)."""
from __future__ import annotations


import pytest
import torch

from conftest import load_tool



@pytest.fixture(scope="module")
def mt():
    return load_tool("memory_table")


# The formula leaves out per-token terms (norm statistics, attention log-sum-exp, modulation vectors),
# a few percent at these widths; 5 % would flag a missed tensor of block size (1/21 to 1/28 of a block).
TOLERANCE = 0.05


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_saved_tensors(mt, name, checkpointing):
    torch.manual_seed(0)
    model = mt.build(name, mt.TINY[name], device="cpu")
    measured = mt.saved_bytes(model, mt.forward_inputs(model, mt.TINY_HW, mt.TINY_TOKENS, device="cpu"),
                              checkpointing)
    act = mt.activations(model, mt.TINY_HW, mt.TINY_TOKENS)
    predicted = 4 * (act.stored if checkpointing else act.full)  # fp32
    assert predicted == pytest.approx(measured, rel=TOLERANCE)
    if checkpointing:
        assert act.recompute < act.full and act.stored < act.full / 4


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "SD3Transformer2DModel"])
def test_meta_parameter_count_matches_real_model(mt, name):
    real = mt.build(name, mt.TINY[name], device="cpu")
    meta = mt.build(name, mt.TINY[name])
    assert next(meta.parameters()).is_meta
    assert mt.count(meta) == mt.count(real)
    assert mt.count(real)[0] == sum(p.numel() for p in real.parameters())


def test_lora_count_matches_peft_on_a_real_model(mt):
    from peft import LoraConfig, inject_adapter_in_model

    cfg = mt.TINY["UNet2DConditionModel"]
    real = mt.build("UNet2DConditionModel", cfg, device="cpu")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=mt.UNET_LORA), real)
    expected = sum(p.numel() for n, p in real.named_parameters() if "lora_" in n)
    assert mt.lora_count(mt.build("UNet2DConditionModel", cfg), mt.UNET_LORA, 4) == expected > 0


def test_recipe_arithmetic(mt):
    act = mt.Activations(stored=1000, recompute=500, full=10_000)
    s = mt.Sizes(params=1_000_000, lora=10_000, head=100, ladd_head=10, act=act)
    m = mt.recipe("consistency", s, False, None, batch=2, cfg_passes=2, ema=False)
    # teacher bf16 + fp32 student + fp32 EMA target; AdamW moments + grads; 2 samples x (stored + recompute) bf16
    assert m["weights"] == 1_000_000 * (2 + 4 + 4)
    assert m["optim"] == 1_000_000 * (8 + 4)
    assert m["act"] == 2 * 2 * (1000 + 500)
    lora = mt.recipe("dmd2", s, True, True, batch=1, cfg_passes=2, ema=True)
    assert lora["weights"] == 1_000_000 * 2 * 2 + 10_000 * 4 * 3 + 100 * 4  # teacher + student base, 3 fp32 sets
    assert lora["phase"] == "critic"  # three fake-score graphs at once


def test_scm_peak_is_the_larger_of_graph_and_jvp(mt):
    """sCM: no target network; the JVP's transient (4 attention matrices and one block with tangents)
    replaces the graph phase when it is larger, and is not added to it."""
    small = mt.Sizes(params=1000, lora=100, head=10, ladd_head=10,
                     act=mt.Activations(stored=1000, recompute=500, full=10_000, attention=100))
    m = mt.recipe("scm", small, False, None, batch=2, cfg_passes=2, ema=False)
    assert m["weights"] == 1000 * (2 + 4) and m["phase"] == "generator"
    # graph phase: grads 4,000 B + 2 x 2 x (1000 + 500) = 10,000 B > JVP: 2 x 2 x (400 + 1000) = 5,600 B
    assert m["act"] == 2 * 2 * (1000 + 500) and m["optim"] == 1000 * (8 + 4)
    big = mt.Sizes(params=1000, lora=100, head=10, ladd_head=10,
                   act=mt.Activations(stored=1000, recompute=500, full=10_000, attention=10_000))
    m = mt.recipe("scm", big, False, None, batch=2, cfg_passes=2, ema=False)
    assert m["phase"] == "generator (JVP)" and m["act"] == 2 * 2 * (4 * 10_000 + 2 * 500)
    assert m["optim"] == 1000 * 8  # no gradients are alive during the JVP


def test_largest_attention_is_traced(mt):
    """SD1.5 at 512 px: the largest attention is self-attention on the 64 x 64 latent, 8 heads."""
    from diffusers import UNet2DConditionModel  # noqa: F401  (the class the tool builds on meta)

    s, _ = mt.sizes("sd15", 4)
    assert s.act.attention == 8 * 4096 * 4096

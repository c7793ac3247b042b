"""Predicted peak GPU memory of each distillation recipe at SD1.5, SDXL, SD3-medium and FLUX.1-dev sizes.

    python tools/memory_table.py [--batch N] [--lora-rank 64] [--precision amp|bf16] [--no-ema] [--ddp]
                                 [--out assets/benchmarks/memory_table.md]

Nothing is downloaded and nothing big runs: each backbone is built from its published config on
the meta device (parameter counts are exact), and its activations come from a formula over the
shapes of its blocks (traced on the meta device), validated on CPU against the tensors autograd
actually saves in small models of the same classes (printed with the table).

Assumptions (also written into the output):
* Text encoders and the VAE are offloaded after their caches are built: 0 GPU memory. Cached text
  embeddings and latents of one batch are negligible and not counted.
* The frozen teacher is held in bf16 (2 B/param, no grads). Every trained network follows
  accelerate's mixed precision (``--precision amp``, this trainer's ``mixed_precision: bf16``):
  fp32 weights, which are also the master copy (4 B), fp32 grads (4 B, only while that network's
  phase runs: the trainer sets them to None after each step) and AdamW's two fp32 moments (8 B).
  Autocast's bf16 copies of trained weights live until the forward ends and are smaller than the
  gradients that follow, so they never set the peak. ``--precision bf16`` instead holds trained
  weights, grads and AdamW moments in bf16 (2 + 2 + 4 B), which is what torch's AdamW does on bf16
  parameters.
* Student: a full copy (all parameters train) or a LoRA of rank r on its own bf16 copy of the base
  weights (``build_student`` deep-copies the teacher's backbone). Student EMA: one copy of the
  trainable parameters in the trained dtype (on by default, as ``ema.decay`` is; ``--no-ema``).
* Fake score (dmd, dmd2, sid): a full trainable copy, or LoRA adapters on the frozen teacher's own
  weights (one copy of the weights). dmd2's discriminator head is the toolkit's ``DiscHead`` on the
  fake score's bottleneck; LADD's on the teacher's (64 hidden channels).
* consistency: a full student keeps LCM's EMA target network (a copy of the student); a LoRA student
  uses the stop-gradient student as its target (LCM-LoRA, ``target_ema: 0``). progressive: the
  round's frozen teacher is a copy of the student.
* Activations: bf16, gradient checkpointing on every network a graph runs through (diffusers
  checkpoints each resnet and transformer block). Per sample: the block-boundary tensors checkpoint
  keeps, plus the non-checkpointed layers (norms, projections, up/down-samplers), plus one block's
  full activations recomputed during backward. Norm statistics, attention log-sum-exp, timestep
  embeddings and fp32 outputs of autocast's norm layers are left out (a few percent).
* Phases (peak = max over them): each phase holds the gradients of the networks it trains and the
  graphs of every pass whose loss it backpropagates at once (no-grad teacher/fake evaluations hold
  no graph): progressive/consistency: the student; adversarial (LADD): student + frozen teacher
  (features), the head's critic step is negligible; dmd: critic = fake score, generator = student +
  student on regression pairs; dmd2: critic = fake score x3 (denoising loss, GAN logits of real and
  of fake images), generator = student + fake score (GAN term); sid: critic = fake score, generator
  = student + teacher (x2 with CFG, whose cond/uncond passes both keep graphs) + fake score.
  A frozen network's pass is counted like a trained one (it saves slightly less).
* One process per GPU without sharding (``--ddp`` adds DDP's gradient buckets, one grads-sized
  buffer per trained network); "fits" means total + 2 GiB (CUDA context, allocator slack, no-grad
  forward working sets) <= 24 GiB / 80 GiB. The last column is the fewest 80 GB GPUs that fit
  under FSDP full sharding (weights, grads and optimizer states divided over the GPUs, activations
  not); it ignores FSDP's all-gathered block parameters and communication buffers, so it is a lower
  bound.
* scm (sCM): a full or LoRA student, no target network (theta^- is the student under stop-gradient) and a
  negligible weighting network. Its tangent is a forward-mode JVP without a graph, taken before the
  student's forward with one, so the peak is the larger of the two: the graph as consistency's, or the
  JVP's transient, one block's activations with their tangents plus the largest attention's scores and
  softmax with their tangents (4 x heads x queries x keys per sample, bf16), which SDPA's math kernel
  materialises because the fused kernels have no forward-mode rule (a JVP attention kernel, as rCM's,
  removes that term).
* The toolkit's trainer enables gradient checkpointing only on the networks it trains. A frozen
  network that a loss backpropagates through (sid's teacher next to a full fake score; the LADD
  teacher) then keeps its full activations, the "no ckpt" column of the backbone table, per sample
  and per pass, instead of the checkpointed figure used here.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RESERVE_GIB = 2.0  # CUDA context, allocator slack, no-grad forward working sets

# -- the four backbones: published configs (diffusers' unet/transformer config.json of each model) -----
SD15 = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD3 = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192)
FLUX = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))

# LoRA targets: the UNet list of LCM-LoRA and DMD2 (diffusers train_lcm_distill_lora_sd_wds.py,
# tianweiy/DMD2 main/sd_unified_model.py); for the MMDiTs diffusers' default FLUX/SD3 LoRA layers
# (train_dreambooth_lora_flux.py): both streams' attention projections and feed-forwards.
UNET_LORA = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
DIT_LORA = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@dataclass(frozen=True)
class Backbone:
    label: str
    cls: str            # diffusers class name
    config: dict
    latent_hw: int      # latent side (1024 px / 8 = 128)
    text_tokens: int    # conditioning sequence length
    batch: int          # default batch per GPU
    cfg_passes: int     # teacher passes under classifier-free guidance (FLUX-dev: guidance is embedded)
    lora: tuple
    published: str


BACKBONES = {
    "sd15": Backbone("SD1.5 UNet, 512 px, 4x64x64", "UNet2DConditionModel", SD15, 64, 77, 2, 2, tuple(UNET_LORA),
                     "860M"),
    "sdxl": Backbone("SDXL UNet, 1024 px, 4x128x128", "UNet2DConditionModel", SDXL, 128, 77, 1, 2,
                     tuple(UNET_LORA), "2.6B"),
    # 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline's max_sequence_length default)
    "sd3": Backbone("SD3-medium MMDiT, 1024 px, 16x128x128", "SD3Transformer2DModel", SD3, 128, 333, 1, 2,
                    tuple(DIT_LORA), "2B"),
    # 512 T5 tokens (FluxPipeline's max_sequence_length for FLUX.1-dev)
    "flux": Backbone("FLUX.1-dev, 1024 px, 16x128x128 packed", "FluxTransformer2DModel", FLUX, 128, 512, 1, 1,
                     tuple(DIT_LORA), "11.9B"),
}


def build(cls_name: str, config: dict, device="meta"):
    import diffusers

    with torch.device(device):
        return getattr(diffusers, cls_name).from_config(config)


def count(model) -> tuple[int, int]:
    """(parameters, buffer elements)."""
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def lora_count(model, targets, rank: int) -> int:
    """Parameters of peft LoRA adapters of `rank` on `targets`, injected into a meta copy."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        m = build(type(model).__name__, dict(model.config))
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), m)
    return sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)


def forward_inputs(model, hw: int, tokens: int, device="meta", batch: int = 1) -> dict:
    """Keyword inputs of one forward at latent side `hw` with `tokens` text tokens."""
    c, name = model.config, type(model).__name__

    def z(*s):
        return torch.randn(*s, device=device)

    t = torch.full((batch,), 500.0, device=device)
    if name == "UNet2DConditionModel":
        out = dict(sample=z(batch, c.in_channels, hw, hw), timestep=t,
                   encoder_hidden_states=z(batch, tokens, c.cross_attention_dim))
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            out["added_cond_kwargs"] = dict(text_embeds=z(batch, pooled), time_ids=z(batch, 6))
        return out
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=z(batch, c.in_channels, hw, hw), timestep=t,
                    encoder_hidden_states=z(batch, tokens, c.joint_attention_dim),
                    pooled_projections=z(batch, c.pooled_projection_dim))
    if name == "FluxTransformer2DModel":
        from diffusers import FluxPipeline

        n = (hw // 2) ** 2  # 2x2 patches packed into channels (FluxPipeline._pack_latents)
        return dict(hidden_states=z(batch, n, c.in_channels), timestep=t / 1000,
                    encoder_hidden_states=z(batch, tokens, c.joint_attention_dim),
                    pooled_projections=z(batch, c.pooled_projection_dim),
                    txt_ids=torch.zeros(tokens, 3, device=device),
                    img_ids=FluxPipeline._prepare_latent_image_ids(batch, hw // 2, hw // 2, device, torch.float32),
                    guidance=torch.full((batch,), 3.5, device=device) if c.guidance_embeds else None)
    raise ValueError(f"no inputs for {name}")


# -- activations: a formula over block shapes ------------------------------------------------------------
# Per-sample elements that autograd saves inside one block, counted op by op on diffusers 0.42
# (a view keeps its whole storage alive, so it counts once):
#   ResnetBlock2D        3 C_in HW (norm1 input, SiLU input, conv1 input) + 3 C_out HW (same for norm2, conv2)
#   BasicTransformerBlock per token x channel: self-attn 6 (norm input and output, q, k, v, attention output),
#                        cross-attn 4 (norm input and output, q, output; k, v are text-sized), GEGLU
#                        feed-forward 18 (norm input and output, 8C projection, 4C GELU, 4C product) = 28
#   JointTransformerBlock (SD3) per stream 16 (adaLN: input, norm, modulated 3; gate 1; norm2 3; 4C
#                        GELU input and output 8; gate 1) + joint attention 5 (concatenated q, k, v,
#                        output, and the copy its head reshape makes) = 21 over image + text tokens;
#                        the last block (context_pre_only) keeps only adaLN-continuous (3) of the text stream
#   FluxTransformerBlock 16 per stream as SD3 + 4 for the RMS-normalised q, k + joint attention 4
#                        (no reshape copy) = 24
#   FluxSingleTransformerBlock 21: input, norm, modulated 3; 4C MLP input 4; RMS q, k 4; q, k, v,
#                        output 4; the [attention, MLP] concatenation 5; gated output 1
# Not checkpointed (the same with and without checkpointing): the UNet mid block's first resnet (as a
# whole block); Transformer2DModel's GroupNorm, proj_in and proj_out inputs (3 C HW); Downsample2D's conv
# input (C HW); Upsample2D's conv input (4 C HW at its input resolution); top level: conv_in / patch
# embedding / x_embedder input, context_embedder input, and 3x the input of conv_norm_out / norm_out
# (norm, SiLU or modulation, output projection); FLUX's rotary cos and sin, shared by all blocks.
CHECKPOINTED = {"ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
                "FluxSingleTransformerBlock"}
UNCHECKPOINTED = {"mid_block.resnets.0"}  # UNetMidBlock2DCrossAttn runs its first resnet outside checkpoint
TWO_STREAM = {"JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"}  # image + text inputs
STATIC = {"Transformer2DModel": 3, "Downsample2D": 1, "Upsample2D": 4}
TOP = {"conv_in": 1, "pos_embed.proj": 1, "x_embedder": 1, "context_embedder": 1, "conv_norm_out": 3, "norm_out": 3}


def _size(shape) -> int:
    return math.prod(shape[1:])  # per sample


def block_elements(kind: str, module, shapes) -> int:
    """Elements one block saves for backward (per sample), from its input shapes."""
    if kind == "ResnetBlock2D":
        cin = _size(shapes[0])
        return 3 * cin + 3 * cin // shapes[0][1] * module.conv2.out_channels
    if kind == "BasicTransformerBlock":
        return 28 * _size(shapes[0])
    img, txt = _size(shapes[0]), _size(shapes[1])
    if kind == "JointTransformerBlock":
        return 16 * img + 3 * txt + 5 * (img + txt) if module.context_pre_only else 21 * (img + txt)
    if kind == "FluxTransformerBlock":
        return 24 * (img + txt)
    if kind == "FluxSingleTransformerBlock":
        return 21 * (img + txt)
    raise ValueError(kind)


@dataclass
class Activations:
    stored: int     # elements per sample kept between forward and backward under checkpointing
    recompute: int  # the largest checkpointed block's own activations, recomputed during backward
    full: int       # elements per sample kept without checkpointing
    attention: int = 0  # the largest attention score matrix per sample, heads x queries x keys


def activations(model, hw: int, tokens: int) -> Activations:
    """Trace block input shapes with a forward on the meta device and apply the per-block formulas."""
    meta = build(type(model).__name__, dict(model.config))
    seen: list[tuple[str, torch.nn.Module, list]] = []
    hooks = []
    scores = [0]
    for name, m in meta.named_modules():
        kind = type(m).__name__
        if kind.endswith("Attention") and hasattr(m, "heads"):  # heads x queries x keys; MMDiT joint attention
            # sees both streams (Attention, FluxAttention)
            def attn(mod, args, kwargs):
                ts = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.ndim == 3]
                q = ts[0].shape[1]
                ctx = ts[1].shape[1] if len(ts) > 1 else 0
                joint = getattr(mod, "add_q_proj", None) is not None
                n_q, n_k = (q + ctx, q + ctx) if joint else (q, ctx or q)
                scores[0] = max(scores[0], mod.heads * n_q * n_k)
            hooks.append(m.register_forward_pre_hook(attn, with_kwargs=True))
        if kind in CHECKPOINTED or kind in STATIC or name in TOP:
            def pre(mod, args, kwargs, kind=kind, name=name):
                ts = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
                label = name if name in TOP else kind if name not in UNCHECKPOINTED else "unchecked " + kind
                seen.append((label, mod, [tuple(a.shape) for a in ts]))
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            meta(**forward_inputs(meta, hw, tokens))
    finally:
        for h in hooks:
            h.remove()
    stored = full = recompute = 0
    for kind, mod, shapes in seen:
        if kind in CHECKPOINTED:
            inner = block_elements(kind, mod, shapes)
            # the checkpoint keeps its inputs: hidden states (+ the text stream of an MMDiT block)
            boundary = _size(shapes[0]) + (_size(shapes[1]) if kind in TWO_STREAM else 0)
            stored, full, recompute = stored + boundary, full + inner, max(recompute, inner)
        elif kind.startswith("unchecked "):
            n = block_elements(kind.split()[1], mod, shapes)
            stored, full = stored + n, full + n
        else:
            n = (STATIC.get(kind) or TOP[kind]) * _size(shapes[0])
            stored, full = stored + n, full + n
    if type(model).__name__ == "FluxTransformer2DModel":
        rope = 2 * ((hw // 2) ** 2 + tokens) * model.config.attention_head_dim  # cos and sin, shared by all blocks
        stored, full = stored + rope, full + rope
    return Activations(stored, recompute, full, scores[0])


# -- validation: the formula against what autograd saves in small models -----------------------------
TINY = {
    "UNet2DConditionModel": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                 attention_head_dim=16, norm_num_groups=16),
    "SD3Transformer2DModel": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                  caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=32),
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
TINY_HW, TINY_TOKENS = 32, 16


def saved_bytes(model, inputs: dict, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward (parameters
    excluded): tensors saved by ops (``saved_tensors_hooks``) plus the inputs that each non-reentrant
    checkpoint keeps to recompute its block. Runs the backward as well, to check that it works."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def note(t):
        if isinstance(t, (tuple, list)):  # e.g. FLUX's rotary (cos, sin) handed to every checkpoint
            for u in t:
                note(u)
        elif torch.is_tensor(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                held[s.data_ptr()] = s.nbytes()
        return t

    def checkpoint(module, *args):
        for a in args:
            note(a)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        model.disable_gradient_checkpointing()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        out = model(**inputs).sample
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(held.values())


def validate() -> list[dict]:
    """Predicted vs measured saved activations (fp32, so 4 B/element) in small CPU models."""
    rows = []
    for name, cfg in TINY.items():
        torch.manual_seed(0)
        model = build(name, cfg, device="cpu")
        inputs = forward_inputs(model, TINY_HW, TINY_TOKENS, device="cpu")
        act = activations(model, TINY_HW, TINY_TOKENS)
        for ckpt, predicted in ((False, act.full), (True, act.stored)):
            measured = saved_bytes(model, inputs, ckpt)
            rows.append(dict(model=name, checkpointing=ckpt, measured=measured, predicted=4 * predicted,
                             ratio=4 * predicted / measured))
    return rows


# -- the memory model ------------------------------------------------------------------------------------
OBJECTIVES = ("progressive", "consistency", "adversarial", "dmd", "dmd2", "sid", "scm")
FAKE = {"dmd", "dmd2", "sid"}


@dataclass
class Sizes:
    params: int        # backbone parameters (+ buffers, which are held like weights)
    lora: int          # LoRA adapter parameters at the chosen rank
    head: int          # dmd2 discriminator head on the fake score's bottleneck
    ladd_head: int     # LADD head on the teacher's bottleneck
    act: Activations


def head_params(model, hidden=None) -> int:
    """Parameters of the toolkit's DiscHead on the backbone's features: the UNet mid block's [C, h, w],
    an MMDiT block's image tokens as a [C, h, w] map (its size does not change the count)."""
    from stepdistill.fake_score import DiscHead

    cfg = model.config
    c = cfg.block_out_channels[-1] if "block_out_channels" in cfg else cfg.num_attention_heads * cfg.attention_head_dim
    return sum(p.numel() for p in DiscHead((c, 8, 8), hidden).parameters())


def sizes(key: str, rank: int) -> tuple[Sizes, int]:
    bb = BACKBONES[key]
    model = build(bb.cls, bb.config)
    params, buffers = count(model)
    return Sizes(params + buffers, lora_count(model, bb.lora, rank), head_params(model), head_params(model, 64),
                 activations(model, bb.latent_hw, bb.text_tokens)), params


def recipe(objective: str, s: Sizes, student_lora: bool, fake_lora: bool | None, *, batch: int, cfg_passes: int,
           precision: str = "amp", ema: bool = True, ddp: bool = False) -> dict:
    """Bytes held at the peak phase of one recipe (one process, one GPU)."""
    wb, gb, ob = (4, 4, 8) if precision == "amp" else (2, 2, 4)  # trained weights, grads, AdamW moments (B/param)
    P, A = s.params, s.lora
    student_w = P * 2 + A * wb if student_lora else P * wb
    trains = {"student": A if student_lora else P}
    weights = P * 2 + student_w                    # teacher (bf16) + student
    if objective in FAKE:
        trains["fake_score"] = A if fake_lora else P
        weights += A * wb if fake_lora else P * wb  # LoRA: adapters on the teacher's own weights
    if objective == "dmd2":
        trains["disc"] = s.head
    if objective == "adversarial":
        trains["disc"] = s.ladd_head
    weights += sum(trains[n] * wb for n in trains if n == "disc")
    if objective == "consistency" and not student_lora:
        weights += student_w                       # LCM's EMA target network
    if objective == "progressive":
        weights += student_w                       # the round's frozen teacher
    if ema:
        weights += trains["student"] * wb
    optim = sum(t * ob for t in trains.values()) + (sum(t * gb for t in trains.values()) if ddp else 0)
    # phases: (networks trained, graphs alive at the backward)
    phases = {
        "progressive": [("generator", ["student"], 1)],
        "consistency": [("generator", ["student"], 1)],
        "adversarial": [("generator", ["student"], 2), ("critic", ["disc"], 0)],
        "dmd": [("critic", ["fake_score"], 1), ("generator", ["student"], 2)],
        "dmd2": [("critic", ["fake_score", "disc"], 3), ("generator", ["student"], 2)],
        "sid": [("critic", ["fake_score"], 1), ("generator", ["student"], 2 + cfg_passes)],
        "scm": [("generator", ["student"], 1)],
    }[objective]
    best = None
    for name, nets, graphs in phases:
        grads = sum(trains[n] * gb for n in nets)
        act = batch * 2 * (graphs * s.act.stored + (s.act.recompute if graphs else 0))
        if best is None or grads + act > best[1] + best[2]:
            best = (name, grads, act)
    phase, grads, act = best
    if objective == "scm":
        # the JVP runs without a graph before the student's forward with one: forward mode carries each
        # tensor with its tangent, and SDPA's math kernel (the fused kernels have no forward-mode rule)
        # materialises the scores and softmax of the largest attention with their tangents (4 matrices, bf16)
        jvp = batch * 2 * (4 * s.act.attention + 2 * s.act.recompute)
        if jvp > grads + act:
            phase, grads, act = "generator (JVP)", 0, jvp
    total = weights + optim + grads + act
    shardable = weights + optim + grads
    fsdp = next((n for n in (1, 2, 4, 8, 16, 32, 64) if shardable / n + act + RESERVE_GIB * GIB <= 80 * GIB), None)
    return dict(trainable=sum(trains.values()), weights=weights, optim=optim + grads, act=act, total=total,
                phase=phase, fsdp=fsdp)


# -- output ------------------------------------------------------------------------------------------------
def _g(b: float) -> str:
    return f"{b / GIB:.1f}"


def _n(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def fits(total: float, cap: int) -> str:
    return "yes" if total + RESERVE_GIB * GIB <= cap * GIB else "no"


def report(args) -> str:
    lines = ["# Predicted peak GPU memory per distillation recipe", "",
             f"Command: `{' '.join(['python', 'tools/memory_table.py'] + sys.argv[1:])}`  ", "",
             "Predicted by arithmetic and a validated activation formula, not measured on a GPU. "
             "See the assumptions below.", "", "## Backbones", "",
             "| model | parameters (meta device) | published | buffers | LoRA r=%d params | activations/sample, "
             "no ckpt | with ckpt (stored + 1 block) |" % args.lora_rank, "|---|---|---|---|---|---|---|"]
    all_sizes = {}
    for key, bb in BACKBONES.items():
        s, params = sizes(key, args.lora_rank)
        all_sizes[key] = s
        full, stored, rec = (2 * n / GIB for n in (s.act.full, s.act.stored, s.act.recompute))  # bf16
        lines.append(f"| {bb.label} | {params:,} | {bb.published} | {s.params - params:,} | {s.lora:,} | "
                     f"{full:.2f} GiB | {stored:.2f} + {rec:.2f} GiB |")
    lines += ["", "## Activation formula vs autograd's saved tensors (small CPU models, fp32)", "",
              "| model | checkpointing | measured | predicted | predicted / measured |", "|---|---|---|---|---|"]
    for r in validate():
        lines.append(f"| tiny {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['measured'] / 2**20:.2f} MiB "
                     f"| {r['predicted'] / 2**20:.2f} MiB | {r['ratio']:.3f} |")
    lines += ["", f"Measured: the distinct storages autograd keeps after one forward (``saved_tensors_hooks``) plus "
              f"the inputs each non-reentrant checkpoint keeps to recompute its block, parameters excluded; "
              f"{TINY_HW}x{TINY_HW} latents, {TINY_TOKENS} text tokens, fp32, classes and block code as at full size. "
              "The no-checkpointing rows test the per-block formulas (the sum over all blocks), the checkpointing "
              "rows the boundary bookkeeping. What the formula leaves out (norm statistics, attention "
              "log-sum-exp, modulation vectors) grows with tokens, not tokens x channels, so its share is smaller "
              "at full width than here.", ""]
    for key, bb in BACKBONES.items():
        s = all_sizes[key]
        b = args.batch or bb.batch
        lines += [f"## {bb.label}, batch {b} per GPU", "",
                  "| objective | student | fake score | trainable | weights GiB | grads+optim GiB | activations GiB "
                  "| total GiB | peak phase | 24 GB | 80 GB | 80 GB GPUs, FSDP |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for obj in OBJECTIVES:
            for sl in (False, True):
                for fl in ((False, True) if obj in FAKE else (None,)):
                    m = recipe(obj, s, sl, fl, batch=b, cfg_passes=bb.cfg_passes, precision=args.precision,
                               ema=args.ema, ddp=args.ddp)
                    fake = "—" if fl is None else ("LoRA" if fl else "full")
                    lines.append(f"| {obj} | {'LoRA' if sl else 'full'} | {fake} | {_n(m['trainable'])} | "
                                 f"{_g(m['weights'])} | {_g(m['optim'])} | {_g(m['act'])} | {_g(m['total'])} | "
                                 f"{m['phase']} | {fits(m['total'], 24)} | {fits(m['total'], 80)} | "
                                 f"{m['fsdp'] or '> 64'} |")
        lines.append("")
    dmd2_xl = recipe("dmd2", all_sizes["sdxl"], False, False, batch=1, cfg_passes=2)
    sid_15 = recipe("sid", all_sizes["sd15"], False, False, batch=1, cfg_passes=2, precision="bf16", ema=False)
    lines += ["## Against what the authors report", "",
              f"* DMD2, SDXL, full UNet student and fake score (the 4-step recipe), batch 1: {_g(dmd2_xl['total'])} "
              f"GiB on one GPU, {dmd2_xl['fsdp']} GPUs under FSDP. tianweiy/DMD2 issue #19: a single A100 runs out "
              "of memory; the answer was to use at least 2 GPUs with FSDP.",
              f"* SiD, SD1.5, full student and fake score, bf16 weights and optimizer, no EMA, batch 1: "
              f"{_g(sid_15['total'])} GiB. The SiD-LSG README: `--ema 0 --fp16 1` fits a 24 GB GPU.",
              "* SiD, FLUX.1-dev at 1024 px, full networks: the FSDP column says 8 x 80 GB; the SiD author reports "
              "that 8 x 80 GB fits FLUX only at 512 px (SiD-LSG issue #8). The column is a lower bound (no FSDP "
              "buffers, every pass checkpointed); treat the full FLUX recipes as multi-node.", ""]
    lines += ["## Assumptions", "", __doc__.split("Assumptions (also written into the output):")[1]
              .strip(), "", f"Options: batch per GPU {BATCH_NOTE if args.batch is None else args.batch}, LoRA rank "
              f"{args.lora_rank}, precision {args.precision}, student EMA {'on' if args.ema else 'off'}, "
              f"DDP buckets {'counted' if args.ddp else 'not counted'}.", "",
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
              f"diffusers {__import__('diffusers').__version__}."]
    return "\n".join(lines) + "\n"


BATCH_NOTE = "2 for SD1.5 (512 px), 1 for SDXL, SD3 and FLUX (1024 px)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help=f"batch per GPU for every model (default: {BATCH_NOTE})")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--precision", choices=("amp", "bf16"), default="amp")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="no student EMA")
    p.add_argument("--ddp", action="store_true", help="count DDP's gradient buckets")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args()
    torch.set_num_threads(1)
    text = report(args)
    print(text)
    if args.out:
        out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

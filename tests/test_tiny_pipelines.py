"""The tiny pipelines of tiny_pipelines.py save, reload with plain diffusers, and generate finite,
deterministic, prompt-dependent 16x16 images; their prompt embeddings fit their denoisers."""
from __future__ import annotations

import pytest
import torch

from tiny_pipelines import CLIP_MAX_LENGTH, build_tiny_pipeline

PROMPTS = ["a cat", "a dog"]
CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
           "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def generate(pipe, kind, prompts):
    extra = {"guidance_scale": 3.5} if kind == "flux" else {}
    return pipe(prompts, num_inference_steps=2, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0), **extra).images


def check_prompt_embeddings(pipe, kind):
    """encode_prompt's outputs have the shapes the unet / transformer consumes."""
    if kind == "sd":
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        assert cond.shape == uncond.shape == (2, CLIP_MAX_LENGTH, pipe.unet.config.cross_attention_dim)
    elif kind == "sdxl":
        cond, uncond, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu")
        assert cond.shape == uncond.shape == (2, CLIP_MAX_LENGTH, pipe.unet.config.cross_attention_dim)
        time_dim = 6 * pipe.unet.config.addition_time_embed_dim
        assert pooled.shape[-1] + time_dim == pipe.unet.config.projection_class_embeddings_input_dim
        assert pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
    elif kind == "sd3":
        cond, uncond, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu")
        config = pipe.transformer.config
        assert cond.shape == uncond.shape == (2, CLIP_MAX_LENGTH + 256, config.joint_attention_dim)
        assert pooled.shape == (2, config.pooled_projection_dim)
    else:
        cond, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
        config = pipe.transformer.config
        assert cond.shape == (2, 512, config.joint_attention_dim)
        assert pooled.shape == (2, config.pooled_projection_dim) and text_ids.shape == (512, 3)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_tiny_pipeline_round_trip_and_generation(kind, tmp_path):
    from diffusers import DiffusionPipeline

    path = build_tiny_pipeline(kind, tmp_path / kind)
    assert (path / "model_index.json").exists()
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 5e6
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == CLASSES[kind]
    check_prompt_embeddings(pipe, kind)

    images = generate(pipe, kind, PROMPTS)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, generate(pipe, kind, PROMPTS))
    swapped = generate(pipe, kind, PROMPTS[::-1])  # same noise per row, other prompt
    assert not torch.allclose(images, swapped, atol=1e-4)

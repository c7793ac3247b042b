"""Tiny, randomly initialised but complete diffusers text-to-image pipelines, built in code (no
downloads) and saved as ordinary pipeline folders that `DiffusionPipeline.from_pretrained` reloads.

Each kind mirrors the layout of a released model at toy size (16x16 RGB images, a VAE with one
downsampling, so 8x8 latents):

- "sd"   (SD1.5): UNet2DConditionModel on 4x8x8 latents cross-attending to one CLIPTextModel's last
  hidden states [B, 16, 32]; DDIM, scaled_linear betas, epsilon prediction, trailing spacing.
- "sdxl" (SDXL): a text_time UNet cross-attending to the penultimate hidden states of two CLIP
  encoders concatenated ([B, 16, 32 + 48]), with the second encoder's projected pooled embedding
  [B, 48] and the six size/crop time ids as added conditions; Euler discrete, epsilon prediction.
- "sd3"  (SD3-medium): an MMDiT SD3Transformer2DModel on 16x8x8 latents. Two CLIPTextModelWithProjection
  give the pooled embedding (32 + 48) and penultimate hidden states that, zero-padded to the T5 width,
  precede the T5 encoder's tokens; flow matching with shift 3.
- "flux" (FLUX.1-dev): a FluxTransformer2DModel (one double and one single stream block, guidance
  embedding) on 16x8x8 latents packed into 2x2 patches (16 tokens of 64 channels); CLIPTextModel's pooled
  output and T5 hidden states condition it; flow matching with FLUX.1-dev's resolution-dependent shift.

SD3 and Flux VAEs have 16 latent channels, no quant convs and their released scaling/shift factors.
The tokenizers are real CLIPTokenizer / T5Tokenizer objects over a ~100-word lowercase vocabulary
(CLIP: BPE whose merges spell each word as one token, 16 tokens; T5: unigram, 32 tokens), so unknown
words fall back to characters. Note that the SD3 and Flux pipelines pad T5 prompts to their own
`max_sequence_length` (256 and 512 by default), not to the tokenizer's model_max_length.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 32
WORDS = """a an the of in on at with and or by to from for under over near behind its his her their
photo painting drawing sketch render portrait landscape closeup picture illustration style art
cat dog bird horse fish cow sheep fox lion tiger bear rabbit mouse owl frog person man woman child
car bus train boat plane bicycle house tree flower forest mountain river lake sea beach city street
road sky cloud sun moon star snow rain field garden table chair cup book lamp window door apple
red green blue yellow black white orange purple pink brown grey gold silver
big small tall old young happy cute dark bright sunny night day morning evening
sitting running flying standing sleeping""".split()
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = string.ascii_lowercase + string.digits + ".,!?'-"
# CLIP-L-like and CLIP-G-like encoders differ in width so their concatenations are recognisable.
CLIP_L = dict(hidden_size=32, intermediate_size=37, projection_dim=32)
CLIP_G = dict(hidden_size=48, intermediate_size=64, projection_dim=48)
T5_DIM = 96  # >= 32 + 48: SD3 pads the concatenated CLIP states to the T5 width


# -- tokenizers ---------------------------------------------------------------------------------
def _bpe(pieces: list[str], ranks: dict) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word's pieces."""
    pieces = list(pieces)
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == float("inf"):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A CLIPTokenizer over single characters plus merges that spell every word in WORDS as one token
    (bos/eos last, as in CLIP; pad = unk = eos)."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    merges, ranks = [], {}
    for word in WORDS:
        start = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces := _bpe(start, ranks)) > 1:  # add the merge the word is missing, last in rank
            ranks[pieces[0], pieces[1]] = len(merges)
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A unigram T5Tokenizer: <pad>=0, </s>=1, <unk>=2, whole words, then characters as fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# -- text encoders ------------------------------------------------------------------------------
def _clip_config(tokenizer, dims: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **dims)


def clip_text_model(tokenizer, dims: dict = CLIP_L, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_clip_config(tokenizer, dims)).eval()


def t5_encoder(tokenizer, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


# -- VAE, denoisers, schedulers -----------------------------------------------------------------
def tiny_vae(latent_channels: int = 4, flow: str | None = None, seed: int = 0):
    """AutoencoderKL with one downsampling (16x16 images <-> 8x8 latents). `flow` = "sd3" / "flux"
    drops the quant convs and uses that model's scaling and shift factors."""
    from diffusers import AutoencoderKL

    factors = {None: dict(scaling_factor=0.18215),
               "sdxl": dict(scaling_factor=0.13025),
               "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
               "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False)}[flow]
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, latent_channels=latent_channels, sample_size=16, **factors).eval()


def tiny_unet(cross_attention_dim: int, sdxl_pooled_dim: int | None = None, seed: int = 0):
    """UNet2DConditionModel on 4x8x8 latents; `sdxl_pooled_dim` adds SDXL's text_time conditioning."""
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl_pooled_dim is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
                     projection_class_embeddings_input_dim=sdxl_pooled_dim + 6 * 8)
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, **extra).eval()


def _ddpm_betas():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing")


# -- pipelines ----------------------------------------------------------------------------------
def _sd(seed):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed), text_encoder=clip_text_model(tok, seed=seed), tokenizer=tok,
        unet=tiny_unet(CLIP_L["hidden_size"], seed=seed),
        scheduler=DDIMScheduler(**_ddpm_betas(), clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(seed):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok_2 = clip_tokenizer(), clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(flow="sdxl", seed=seed), text_encoder=clip_text_model(tok, CLIP_L, seed=seed),
        text_encoder_2=clip_text_model(tok_2, CLIP_G, projection=True, seed=seed), tokenizer=tok, tokenizer_2=tok_2,
        unet=tiny_unet(CLIP_L["hidden_size"] + CLIP_G["hidden_size"], sdxl_pooled_dim=CLIP_G["projection_dim"],
                       seed=seed),
        scheduler=EulerDiscreteScheduler(**_ddpm_betas(), interpolation_type="linear"))


def _sd3(seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], pos_embed_max_size=16).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(16, flow="sd3", seed=seed),
        text_encoder=clip_text_model(tok, CLIP_L, projection=True, seed=seed), tokenizer=tok,
        text_encoder_2=clip_text_model(tok_2, CLIP_G, projection=True, seed=seed), tokenizer_2=tok_2,
        text_encoder_3=t5_encoder(tok_3, seed=seed), tokenizer_3=tok_3)


def _flux(seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_L["hidden_size"],
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(16, flow="flux", seed=seed),
                        text_encoder=clip_text_model(tok, CLIP_L, seed=seed), tokenizer=tok,
                        text_encoder_2=t5_encoder(tok_2, seed=seed), tokenizer_2=tok_2)


BUILDERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def build_tiny_pipeline(kind: str, path, seed: int = 0) -> Path:
    """Build the tiny `kind` pipeline ("sd", "sdxl", "sd3" or "flux") with random weights from `seed`
    and save it (safetensors) to `path`, which is returned."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {sorted(BUILDERS)}")
    path = Path(path)
    BUILDERS[kind](seed).save_pretrained(path, safe_serialization=True)
    return path

"""CLIP detector and CLIP score on a tiny random CLIPModel built from a config (no download); the
reference is the model's own forward pass, whose logits are exp(logit_scale) * cosine."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    text = dict(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_clip_score_equals_model_forward(clip_dir):
    from stepdistill.eval.detectors import get_detector

    det = get_detector(f"clip:{clip_dir}")
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    texts = ["a cat", "dog", "red car", "x"]
    ours = det.clip_score(images, texts)

    pix = det.processor(images=list(images), return_tensors="pt")["pixel_values"]
    tok = det.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = det.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    cos = out.logits_per_image.diag().double() / det.model.logit_scale.exp().double()
    assert ours == pytest.approx(float((100 * cos).clamp_min(0).mean()), rel=1e-5, abs=1e-4)
    # the cosines themselves, before the clamp (a random model may give every pair a negative one)
    a = torch.nn.functional.normalize(det.features(images).double(), dim=-1)
    b = torch.nn.functional.normalize(det.text_features(texts).double(), dim=-1)
    torch.testing.assert_close((a * b).sum(-1), cos, rtol=1e-4, atol=1e-5)
    assert det.features(images).shape == (4, 16) and det.protocol()["feature_dim"] == 16
    assert len(det.protocol()["detector_weights_sha256"]) == 64

"""SwiftBrush (Nguyen & Tran, 2024): the generator's VSD gradient and the LoRA teacher's loss against
a transcription of the authors' training loop (VinAIResearch/SwiftBrush train_swiftbrush.py: the
"VSD loss" and "LoRA loss" blocks) on fixed tensors, computed from the backbone's raw outputs."""
from __future__ import annotations

import torch

from conftest import tiny_teacher
from stepdistill.fake_score import adapters_disabled, noise_grid
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.swiftbrush import SwiftBrush
from stepdistill.train.randomness import BatchRandom

LABELS = torch.tensor([0, 1, 0, 1])


def _setup(**cfg):
    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, StudentConfig(steps=1))
    obj = SwiftBrush(SwiftBrush.Config(**cfg))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # the LoRA away from zero, so the fake score differs from the teacher
        for name, p in nets.fake_score.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return obj, nets


def _eps(backbone, schedule, x_t, t, labels):
    """eps from the v-prediction backbone (Salimans & Ho, 2022): eps = alpha v + sigma x_t."""
    v = backbone(x_t, t.float(), class_labels=labels).sample
    a, s = (z.reshape(-1, 1, 1, 1).float() for z in schedule.alpha_sigma(t))
    return a * v + s * x_t


def test_generator_gradient_is_sigma2_times_the_eps_difference():
    obj, nets = _setup(guidance=1.0)
    x0 = torch.zeros(4, 1, 8, 8)
    batch = {"x0": x0, "cond": {"class_labels": LABELS}, "rng": BatchRandom(3, 4, slice(0, 4))}
    # the objective's draws in its order: generator noise, the time index, the noise of x_t
    rng = BatchRandom(3, 4, slice(0, 4))
    z = rng.randn_like(x0)
    idx = rng.randint(20, 981)
    eps = rng.randn_like(x0)
    sched = nets.teacher.schedule
    t = noise_grid(sched)[idx]
    with torch.no_grad():
        x = nets.student(z, {"class_labels": LABELS})
        a, s = (v.reshape(-1, 1, 1, 1).float() for v in sched.alpha_sigma(t))
        x_t = a * x + s * eps
        with adapters_disabled(nets.teacher.backbone):  # the LoRA teacher shares the teacher's weights
            eps_teacher = _eps(nets.teacher.backbone, sched, x_t, t, LABELS)
        fake = nets.fake_score(x_t, t, {"class_labels": LABELS})
        eps_lora = (x_t - a * fake) / s
        expected = s**2 * (eps_teacher - eps_lora)                # score_gradient
    out = obj.generator_loss(nets, batch)
    torch.testing.assert_close(out["_vsd_grad_norm"], expected.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-3  # the LoRA teacher differs from the teacher
    # the loss is 0.5 mean((x - sg(x - g))^2) = 0.5 mean(g^2) at the sample
    torch.testing.assert_close(out["vsd"], 0.5 * expected.pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-8)


def test_lora_loss_is_the_alpha_weighted_eps_loss():
    obj, nets = _setup(cond_drop=0.5)
    x0 = torch.zeros(4, 1, 8, 8)
    batch = {"x0": x0, "cond": {"class_labels": LABELS}, "rng": BatchRandom(5, 4, slice(0, 4))}
    rng = BatchRandom(5, 4, slice(0, 4))
    z = rng.randn_like(x0)
    idx = rng.randint(0, 1000)
    eps = rng.randn_like(x0)
    drop = rng.rand(dtype=torch.float64) < 0.5
    sched = nets.teacher.schedule
    t = noise_grid(sched)[idx]
    labels = torch.where(drop, torch.full_like(LABELS, 2), LABELS)  # class 2 is the tiny teacher's null class
    with torch.no_grad():
        x = nets.student(z, {"class_labels": LABELS})
        a, s = (v.reshape(-1, 1, 1, 1).float() for v in sched.alpha_sigma(t))
        x_t = a * x + s * eps
        fake = nets.fake_score(x_t, t, {"class_labels": labels})
        eps_lora = (x_t - a * fake) / s
        expected = (a * eps_lora - a * eps).pow(2).flatten(1).mean(1)  # mse(alpha lora_pred, alpha noise)
        got = obj.critic_loss(nets, batch)["fake_eps"]
    assert drop.any() and not drop.all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


# -- SwiftBrush v2's clamped CLIP loss (Dao et al., 2024, eq. 5) -----------------------------------------
def _tiny_clip(folder):
    """A random-weight CLIPModel (32 x 32 images, projection 16) with the tiny pipelines' tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from tiny_pipelines import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clamped_clip_loss_is_eq5_with_its_weight_falling_to_zero():
    """max(0, tau - cos) on hand-picked embeddings: an image already past the margin gets no loss and no
    gradient; one at cosine 0 gets tau. The weight: 0.1 at the start, half-way 0.05, 0 at the end."""
    from stepdistill.objectives.clip_loss import clamped_clip_loss, clip_weight

    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[0.6, 0.8], [3.0, 0.0], [-1.0, -1.0]])
    loss = clamped_clip_loss(img, txt, 0.35)
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.35, 1.35]))  # cos 0.6, 0, -1
    loss.sum().backward()
    assert img.grad[0].abs().sum() == 0 and img.grad[1].abs().sum() > 0
    assert [clip_weight(0.1, f) for f in (0.0, 0.5, 1.0, 1.5)] == [0.1, 0.05, 0.0, 0.0]


def test_clip_image_path_is_clips_own_preprocessing_with_gradient(tmp_path):
    """At CLIP's resolution the image path is CLIP's own normalisation of (x + 1) / 2; larger images
    are resized on the short side and centre-cropped; the embedding has a gradient to the pixels."""
    from stepdistill.objectives.clip_loss import CLIP_MEAN, CLIP_STD, CLIPScorer

    scorer = CLIPScorer(str(_tiny_clip(tmp_path / "clip")))
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    want = scorer.model.get_image_features(pixel_values=((x.detach() + 1) / 2 - mean) / std)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    got = scorer.image_features(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert x.grad.abs().sum() > 0
    wide = torch.rand(1, 3, 64, 96) * 2 - 1  # short side 64 -> 32, width 96 -> 48, centre 32 columns
    import torch.nn.functional as F
    small = F.interpolate(wide, size=(32, 48), mode="bicubic", align_corners=False, antialias=True)[..., 8:40]
    torch.testing.assert_close(scorer.image_features(wide), scorer.image_features(small), rtol=1e-5, atol=1e-5)
    assert scorer.text_features(["a red cat", "a blue dog"]).shape == (2, 16)


def test_clip_loss_trains_a_text_to_image_student_and_is_refused_without_prompts(tmp_path):
    """On a tiny SD pipeline the generator's losses gain the CLIP term (logged, finite, weighted by the
    falling lambda), and it changes the student's update; a class-conditional teacher is refused."""
    import json

    import pytest
    from accelerate.state import AcceleratorState

    from stepdistill.errors import UserError
    from stepdistill.train.setup import resolve
    from stepdistill.train.trainer import Trainer
    from tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd", tmp_path / "sd")
    clip = _tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\na small house\n")

    def run(name, **obj):
        o = {"teacher": str(pipe), "data": str(prompts), "output_dir": str(tmp_path / name), "cpu": True,
             "batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "preview_every": "null", "progress": False,
             "log_every": 1, "text.max_sequence_length": 8, "text.cache": str(tmp_path / "text_cache"),
             "resolution": 16, "objective.name": "swiftbrush", "objective.fake_lora_rank": 2}
        o.update({f"objective.{k}": v for k, v in obj.items()})
        try:
            trainer = Trainer(*resolve(None, [f"{k}={v}" for k, v in o.items()]))
            trainer.train()
        finally:
            AcceleratorState._reset_state(True)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return trainer, [x["losses"] for x in lines if "losses" in x]

    with_clip, logged = run("clip", clip_model=str(clip), clip_margin=1.0)  # margin 1: every image is pushed
    assert len(logged) == 2 and all("generator/clip" in x for x in logged)
    assert 0 < logged[0]["generator/clip"] < 2 * 0.1  # relu(1 - cos) <= 2, times lambda = 0.1 at the start
    assert logged[1]["generator/clip"] < 2 * 0.05 + 1e-9  # half-way through the 2 steps: lambda = 0.05
    without, logged0 = run("plain")
    assert all("generator/clip" not in x for x in logged0)
    zero, _ = run("zero", clip_model=str(clip), clip_weight=0.0)  # CLIP loaded, weight 0: the plain update
    a, z = dict(with_clip.student.named_parameters()), dict(zero.student.named_parameters())
    assert all(torch.equal(p, z[n]) for n, p in without.student.named_parameters())
    assert any(not torch.equal(p, a[n]) for n, p in without.student.named_parameters())  # the CLIP term moved it
    with pytest.raises(UserError, match="text-to-image teacher"):
        SwiftBrush(SwiftBrush.Config(clip_model=str(clip))).build(tiny_teacher(), None, None)
    from stepdistill.commands.train import _dry_run  # `stepdistill train --dry-run` builds it with the prompts

    o = {"teacher": str(pipe), "data": str(prompts), "output_dir": str(tmp_path / "dry"), "cpu": True,
         "text.max_sequence_length": 8, "text.cache": str(tmp_path / "text_cache"), "resolution": 16,
         "objective.name": "swiftbrush", "objective.fake_lora_rank": 2, "objective.clip_model": str(clip)}
    assert _dry_run(*resolve(None, [f"{k}={v}" for k, v in o.items()])) == 0

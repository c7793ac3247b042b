"""SANA-Sprint's (StyleGAN-T's) discriminator head, token_head.py: local batch norm against torch's own
batch norm on each virtual batch, spectral normalisation of every convolution, one logit per token,
and the generator phase leaving the heads' power-iteration state alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import build_student
from stepdistill.objectives.adversarial import Adversarial
from stepdistill.objectives.base import Nets
from stepdistill.token_head import BatchNormLocal, TokenHead
from stepdistill.train.randomness import BatchRandom


def test_local_batch_norm_is_batch_norm_within_each_group_of_eight():
    torch.manual_seed(0)
    bn = BatchNormLocal(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(20, 5, 7) * 3 + 1   # 20 samples: ceil(20 / 8) = 3 groups of 7, 7, 6
    got = bn(x)
    want = torch.cat([F.batch_norm(g, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
                      for g in (x[:7], x[7:14], x[14:])])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(bn.eval()(x), got)  # no running statistics: the same in evaluation


def test_every_convolution_is_spectrally_normalised_and_each_token_gets_a_logit():
    torch.manual_seed(0)
    head = TokenHead((6, 4, 4))
    x = torch.randn(16, 6, 4, 4)
    for _ in range(50):  # one power iteration per training forward
        out = head(x)
    assert out.shape == (16, 16)
    convs = [head.first[0], head.residual[0], head.out]
    assert head.residual[0].kernel_size == (9,) and head.residual[0].padding_mode == "circular"
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-2, float(sigma)
    assert TokenHead((6, 2, 2)).residual[0].kernel_size == (3,)  # 4 tokens: the kernel fits the sequence
    assert TokenHead((6,))(torch.randn(8, 6)).shape == (8, 1)


def test_sana_sprint_heads_train_and_the_generator_leaves_their_power_iterations_alone():
    from stepdistill.fake_score import DiscHeads

    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=1)
    obj = Adversarial(Adversarial.Config(feature_module="down_blocks.0,mid_block", per_location=True,
                                         disc_arch="stylegan_t", distill="none", disc_proposal=[-0.6, 1.0]))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    assert isinstance(nets.disc, DiscHeads) and all(isinstance(h, TokenHead) for h in nets.disc.heads)
    assert not any("embed" in n for n, _ in nets.disc.named_parameters())  # no class projection
    batch = {"x0": torch.randn(8, 1, 8, 8), "cond": {"class_labels": torch.arange(8) % 2},
             "rng": BatchRandom(2, 8, slice(0, 8))}

    def power_state():
        return [b.clone() for n, b in nets.disc.named_buffers() if n.endswith("_u")]

    before = power_state()
    g = obj.generator_loss(nets, batch)
    g["gan_g"].mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, power_state()))
    assert nets.disc.training  # its mode is restored
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    d = obj.disc_loss(nets, batch)
    d["gan_d"].mean().backward()
    assert not all(torch.equal(a, b) for a, b in zip(before, power_state()))
    assert all(p.grad is not None for p in nets.disc.parameters())


def test_unknown_head_forms_are_refused():
    with pytest.raises(UserError, match="disc_arch"):
        Adversarial(Adversarial.Config(disc_arch="mlp"))
    with pytest.raises(UserError, match="disc=pixels"):
        Adversarial(Adversarial.Config(disc="pixels", disc_arch="stylegan_t"))
    with pytest.raises(UserError, match="per_location=true"):
        Adversarial(Adversarial.Config(disc_arch="stylegan_t"))
    with pytest.raises(UserError, match="r1_weight=0"):
        Adversarial(Adversarial.Config(disc_arch="stylegan_t", per_location=True, r1_weight=1.0))


def test_a_head_restored_from_its_state_continues_bit_for_bit():
    """The power-iteration vectors are buffers in the state dict: a head restored from a checkpoint
    gives the same logits in training mode as the one it was saved from (exact resume)."""
    torch.manual_seed(0)
    head, x = TokenHead((6, 4, 4)), torch.randn(8, 6, 4, 4)
    for _ in range(3):
        head(x)
    assert any(k.endswith("_u") for k in head.state_dict())
    torch.manual_seed(1)
    again = TokenHead((6, 4, 4))
    again.load_state_dict(head.state_dict())
    for _ in range(2):
        assert torch.equal(head(x), again(x))

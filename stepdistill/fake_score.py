"""The fake score: a trainable denoiser initialised from the teacher that tracks the student's
distribution (DMD, Yin et al., 2024, sec. 3.2; DMD2; SiD's f_psi; VSD), with an optional
discriminator head on bottleneck features (DMD2, sec. 4.3) or on the teacher's (LADD).

Two layouts:
* full copy -- a deep copy of the teacher (any ``Denoiser``), all weights trainable;
* LoRA      -- peft adapters added to the teacher's own backbone module (base weights frozen and
  stored once); the real score is the same module with adapters switched off (``real_score``).

The fake score is trained by denoising score matching on detached student samples, in the
teacher's own parameterisation (``schedule.x0_to_raw`` target), so it learns exactly what the
teacher learnt, only on the student's distribution.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from torch import nn

from .denoisers import Cond, Denoiser
from .errors import UserError
from .lora_targets import matching_targets
from .noise_grid import noise_grid, sample_times, time_indices  # noqa: F401  (this module's names too)
from .schedules import Schedule

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


# -- LoRA on a shared backbone ------------------------------------------------------------------------
def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Run the base weights of a module that carries peft adapters (peft's ``disable_adapter``
    idea, for any module the adapters were injected into)."""
    layers = _tuner_layers(module)
    # peft's enable_adapters(True) also sets requires_grad on the adapters; keep what the caller
    # had (inside `frozen(...)` the generator phase must not train the fake score's adapters)
    trainable = {id(p): p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m in layers:
            m.enable_adapters(True)
            for p in m.parameters():
                p.requires_grad_(trainable[id(p)])


class AdaptersOff(Denoiser):
    """The teacher as it was: its denoiser evaluated with the fake score's adapters switched off."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        object.__setattr__(self, "_inner", denoiser)  # not a submodule: the weights belong to the teacher
        self.schedule = denoiser.schedule

    @property
    def is_conditional(self) -> bool:
        return self._inner.is_conditional

    def null_cond(self, cond):
        return self._inner.null_cond(cond)

    def forward(self, x, t, cond=None):
        # gradient checkpointing would recompute these blocks during backward, when the adapters
        # are back on: with a graph to keep, this evaluation stores its activations instead
        with adapters_disabled(self._inner), _no_checkpointing(self._inner, torch.is_grad_enabled()):
            return self._inner(x, t, cond)


@contextlib.contextmanager
def _no_checkpointing(module: nn.Module, active: bool = True):
    """Switch diffusers' per-block gradient checkpointing off inside the block (then back)."""
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)] if active else []
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def evaluating(*modules: nn.Module | None):
    """These modules in evaluation mode, their modes restored after: the generator phase reads the
    discriminator heads without moving their spectral norms' power-iteration state, which only the
    discriminator's own updates advance (SANA-Sprint runs its heads in eval mode for the generator)."""
    mods = [m for m in modules if m is not None]
    modes = [[(x, x.training) for x in m.modules()] for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for pairs in modes:
            for x, mode in pairs:
                x.train(mode)


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Build a graph that reaches these modules' inputs but not their weights (the generator
    phase differentiates through the fake score and the discriminator without training them).
    The trainer already freezes every network a phase does not train, for the forward *and* the
    backward (gradient checkpointing replays forwards during backward); this keeps objectives
    correct when called outside the trainer."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# -- the fake score -------------------------------------------------------------------------------
class FakeScore(Denoiser):
    """A trainable x0-denoiser on the teacher's schedule: ``forward(x, t, cond) -> x0``."""

    def __init__(self, teacher: Denoiser, *, lora_rank: int = 0, lora_alpha: float | None = None,
                 target_modules: Sequence[str] = DEFAULT_LORA_TARGETS):
        super().__init__()
        self.schedule = teacher.schedule
        self.shared = lora_rank > 0
        if self.shared:
            backbone = getattr(teacher, "backbone", None)
            if backbone is None:
                raise UserError(f"a LoRA fake score needs a diffusers backbone; {type(teacher).__name__} has none "
                                "(set fake_lora_rank=0 for a full copy)")
            _add_adapter(backbone, lora_rank, lora_alpha, target_modules)
            self.denoiser = teacher  # one copy of the base weights; only the adapters train
        else:
            self.denoiser = copy.deepcopy(teacher).float()  # trained in float32 (a bf16 teacher stays bf16)
            self.denoiser.requires_grad_(True)
            self.denoiser.train()

    @property
    def is_conditional(self) -> bool:
        return self.denoiser.is_conditional

    def null_cond(self, cond):
        return self.denoiser.null_cond(cond)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x, t, cond: Cond = None):
        return self.denoiser(x, t, cond)

    def real_score(self, teacher: Denoiser) -> Denoiser:
        """The teacher's score: with adapters on its own backbone, the same module with them off."""
        return AdaptersOff(teacher) if self.shared else teacher


def real_score(nets) -> Denoiser:
    """The real (teacher) score of a ``Nets`` bag, correct for a LoRA fake score sharing its weights."""
    fake = nets.get("fake_score")
    return fake.real_score(nets.teacher) if isinstance(fake, FakeScore) else nets.teacher


def _add_adapter(backbone: nn.Module, rank: int, alpha: float | None, targets: Sequence[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    use = matching_targets(backbone, targets)
    if not use:
        raise UserError(f"fake_target_modules {list(targets)} match no module of {type(backbone).__name__}; "
                        "name some of its layers (e.g. to_q, conv1)")
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), target_modules=use, init_lora_weights=True)
    backbone.requires_grad_(False)
    inject_adapter_in_model(cfg, backbone, adapter_name="fake_score")
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


# -- denoising score matching ----------------------------------------------------------------------
def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, cond: Cond = None, *, space: str = "raw",
                   t: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DSM loss on clean samples x0 at t ~ the teacher's training times.

    space="raw": MSE between the backbone's own outputs (eps, v, EDM's F, velocity), i.e. the
    teacher's training loss (Ho et al., 2020, eq. 14; Karras et al., 2022, eq. 8). space="x0":
    unweighted x0 MSE. Mean over pixels."""
    sched = denoiser.schedule
    if t is None:
        t = sched.sample_t(x0.shape[0]).to(x0.device)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    return dsm_error(sched, denoiser(x_t, t, cond), x0, x_t, t, space)


def dsm_error(schedule: Schedule, pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t, space: str = "raw"):
    """Per-sample squared error of an x0 prediction at x_t, in the backbone's own parameterisation
    (space="raw") or in x0 (space="x0"); mean over pixels."""
    if space == "raw":
        diff = schedule.x0_to_raw(pred, x_t, t) - schedule.x0_to_raw(x0, x_t, t)
    elif space == "x0":
        diff = pred - x0
    else:
        raise UserError(f"fake_loss {space!r} is not supported; use 'raw' (the teacher's parameterisation) or 'x0'")
    return diff.pow(2).flatten(1).mean(1)


def dsm_weight(schedule: Schedule, t, like: torch.Tensor, space: str = "raw") -> torch.Tensor:
    """Per-sample weight of the x0 error in ``dsm_error``: the squared x0 coefficient of the raw target
    (1 / sigma^2 for v on VP, SNR for eps, EDM's lambda(sigma) for its F; Karras et al., 2022, eq. 8),
    or 1 in x0 space."""
    if space == "x0":
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    one, zero = torch.ones_like(like), torch.zeros_like(like)
    return (schedule.x0_to_raw(one, zero, t) - schedule.x0_to_raw(zero, zero, t)).flatten(1)[:, 0].pow(2)


# -- features and a discriminator head -----------------------------------------------------------
class _FeaturesCaught(Exception):
    """Raised by the feature hook to stop a forward pass whose output is not needed."""


def forward_with_features(denoiser: Denoiser, module, x, t, cond: Cond = None, *, need_x0: bool = True):
    """(x0, features): one denoiser evaluation, with `module`'s output caught by a forward hook
    (DMD2 puts its classifier on the UNet's mid-block output, sec. 4.3). With ``need_x0=False``
    the pass stops once every module has run (x0 is None): a classifier on the bottleneck never runs
    the decoder, as DMD2's classify mode returns after the mid block. ``module`` may be a list (LADD's
    heads on several blocks, SANA-Sprint's ladd_multi_scale): the features are then a list, in its order."""
    modules = list(module) if isinstance(module, (list, tuple)) else [module]
    caught: dict[int, torch.Tensor] = {}

    def hook_for(i):
        def hook(m, _inp, out):
            caught[i] = image_features(m, out)
            if not need_x0 and len(caught) == len(modules):
                raise _FeaturesCaught
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    x0 = None
    try:
        x0 = denoiser(x, t, cond)
    except _FeaturesCaught:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [type(m).__name__ for i, m in enumerate(modules) if i not in caught]
    if missing:
        raise UserError(f"the feature module {', '.join(missing)} was not run by the denoiser; choose a module "
                        "on its forward path (e.g. mid_block)")
    feats = [caught[i].float() for i in range(len(modules))]
    return x0, (feats if isinstance(module, (list, tuple)) else feats[0])


def feature_modules(denoiser: Denoiser, names: str):
    """The module a classifier reads, or a list of them for comma-separated names ("down_blocks.1,mid_block")."""
    found = [find_module(denoiser, n.strip()) for n in str(names).split(",") if n.strip()]
    if not found:
        raise UserError(f"feature_module {names!r} names no module; name one (e.g. mid_block) or several, "
                        "comma-separated")
    return found[0] if len(found) == 1 else found


#: MMDiT blocks (SD3, FLUX) return (text tokens, image tokens)
JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def image_features(module: nn.Module, out) -> torch.Tensor:
    """A module's output as image features: the image half of a joint block's output; tokens
    [B, N, D] of a square image (row-major patches, as SD3 and FLUX order them) as a [B, D, h, w] map."""
    if isinstance(out, (tuple, list)):
        out = out[1] if type(module).__name__ in JOINT_BLOCKS else out[0]
    if out.ndim == 3:
        b, n, d = out.shape
        s = int(round(n ** 0.5))
        if s * s == n:
            out = out.transpose(1, 2).reshape(b, d, s, s)
    return out


def find_module(denoiser: Denoiser, name: str) -> nn.Module:
    """`name` inside the denoiser's backbone (or the denoiser itself), with a clear error. ``"auto"``:
    a UNet's mid block (DMD2, sec. 4.3), or a transformer's middle block."""
    root = getattr(denoiser, "backbone", denoiser)
    if isinstance(denoiser, FakeScore):
        root = getattr(denoiser.denoiser, "backbone", denoiser.denoiser)
    base = getattr(getattr(root, "base_model", None), "model", root)  # under peft wrappers
    if name == "encoder":  # SiDA's return_flag='encoder': the UNet encoder's last block (sida_networks.py)
        if getattr(base, "down_blocks", None) is None:
            raise UserError(f"feature_module 'encoder' reads a UNet's last down block; {type(base).__name__} has "
                            "no down_blocks: name a module (e.g. transformer_blocks.N)")
        name = f"down_blocks.{len(base.down_blocks) - 1}"
    if name == "auto":
        if getattr(base, "mid_block", None) is not None:
            name = "mid_block"
        elif getattr(base, "transformer_blocks", None) is not None:
            name = f"transformer_blocks.{len(base.transformer_blocks) // 2}"
        else:
            raise UserError(f"feature_module 'auto' finds no mid_block or transformer_blocks in {type(base).__name__}; "
                            "name a module")
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_children()]
        raise UserError(f"feature module {name!r} not found in {type(root).__name__}; children: {', '.join(names)}") \
            from None


def sample_shape(teacher: Denoiser) -> tuple[int, ...]:
    """(C, H, W) of the teacher's data, from its meta, its backbone config or `sample_shape`."""
    if getattr(teacher, "sample_shape", None) is not None:
        return tuple(teacher.sample_shape)
    meta = dict(getattr(teacher, "meta", None) or {})
    cfg = getattr(getattr(teacher, "backbone", None), "config", None)
    c = meta.get("in_channels") or (cfg.get("in_channels") if cfg is not None else None)
    s = meta.get("sample_size") or (cfg.get("sample_size") if cfg is not None else None)
    if c is None or s is None:
        raise UserError(f"cannot tell the data shape of {type(teacher).__name__}; give it in_channels and "
                        "sample_size in its stepdistill.json")
    hw = (s, s) if isinstance(s, int) else tuple(s)
    return (int(c), *map(int, hw))


@torch.no_grad()
def feature_shape(denoiser: Denoiser, module, shape: Sequence[int]):
    """The per-sample shape of `module`'s output (a list of shapes for a list of modules), from one dummy
    evaluation at the noisiest time."""
    x = torch.zeros(1, *shape, device=next(denoiser.parameters()).device)
    cond = None
    null = getattr(denoiser, "null_class", None) or getattr(getattr(denoiser, "denoiser", None), "null_class", None)
    text = getattr(denoiser, "null_text", None) or getattr(getattr(denoiser, "denoiser", None), "null_text", None)
    if null is not None:
        cond = {"class_labels": torch.full((1,), int(null), dtype=torch.long, device=x.device)}
    elif text:  # text-to-image: the empty prompt's condition
        cond = {k: v.to(x.device) for k, v in text.items()}
    t = torch.full((1,), denoiser.schedule.t_max, dtype=torch.float64)
    feats = forward_with_features(denoiser, module, x, t, cond, need_x0=False)[1]
    return [tuple(f.shape[1:]) for f in feats] if isinstance(feats, list) else tuple(feats.shape[1:])


class DiscHead(nn.Module):
    """A small classifier on features ([B, C, h, w] or [B, C]) -> logits [B]; with `num_classes`,
    a projection term <embed(y), phi> (Miyato & Koyama, 2018) makes it class-aware. ``per_location``:
    one logit per feature location, [B, h*w] (SANA-Sprint's heads give one per token), unpooled."""

    def __init__(self, feature_shape: Sequence[int], hidden: int | None = None, num_classes: int | None = None,
                 per_location: bool = False):
        super().__init__()
        c = int(feature_shape[0])
        h = int(hidden or max(c, 16))
        self.spatial = len(feature_shape) == 3
        self.per_location = per_location and self.spatial
        if self.spatial:
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and h % g == 0)
            self.body = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, h, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(h, h, 3, padding=1), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.Linear(c, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        self.out = nn.Linear(h, 1)
        self.embed = nn.Embedding(num_classes, h) if num_classes else None

    def forward(self, feats: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        # contiguous: torch's CPU GroupNorm backward crashes on channels-last strides (UNet mid-block output)
        phi = self.body(feats.float().contiguous())
        if self.per_location:
            phi = phi.flatten(2).transpose(1, 2)        # [B, h*w, hidden]: each location its own logit
        elif self.spatial:
            phi = phi.mean(dim=(2, 3))
        logit = self.out(phi).squeeze(-1)
        labels = None if cond is None else cond.get("class_labels")
        if self.embed is not None and labels is not None:
            e = self.embed(labels.clamp(0, self.embed.num_embeddings - 1))
            logit = logit + ((e[:, None] * phi).sum(-1) if self.per_location else (e * phi).sum(1))
        return logit


class DiscHeads(nn.Module):
    """One ``DiscHead`` per feature module (SANA-Sprint's LADD: heads on several blocks): a list of logits,
    [B, N_h] per head; the GAN losses (gan.py) average each head over its locations, then the heads, so a
    16x16 block's head weighs no more than a 4x4 one's."""

    def __init__(self, heads: Sequence[DiscHead]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, feats: Sequence[torch.Tensor], cond: Cond = None) -> list[torch.Tensor]:
        return [head(f, cond).reshape(f.shape[0], -1) for head, f in zip(self.heads, feats)]


class ChannelMean(nn.Module):
    """SiDA's discriminator (Zhou et al., 2025b; sida_networks.py, ``return_flag='encoder'``): the fake
    score's encoder output averaged over channels, one logit per location, [B, h*w]; no weights of its
    own: the fake score's encoder is the classifier, trained by the DSM and the BCE alike."""

    def forward(self, feats: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return feats.float().mean(dim=1).flatten(1)


#: discriminator head forms: "conv" (``DiscHead``, class projection) | "stylegan_t" (SANA-Sprint's
#: ``token_head.TokenHead``: spectral-norm 1-D convolutions over tokens, local batch norm, no projection)
DISC_ARCHS = ("conv", "stylegan_t")


def build_disc_head(denoiser: Denoiser, module_name: str, teacher: Denoiser, hidden: int | None = None,
                    per_location: bool = False, arch: str = "conv"):
    """The classifier on ``module_name``'s features (``DiscHeads`` for comma-separated names)."""
    module = feature_modules(denoiser, module_name)
    shape = feature_shape(denoiser, module, sample_shape(teacher))
    if arch == "stylegan_t":  # a logit per token, full feature width (per_location: the losses average them)
        from .token_head import TokenHead

        return DiscHeads([TokenHead(s) for s in shape]) if isinstance(shape, list) else TokenHead(shape)
    if arch != "conv":
        raise UserError(f"disc_arch {arch!r} is not supported; use one of {', '.join(DISC_ARCHS)}")
    meta = dict(getattr(teacher, "meta", None) or {})
    classes = meta.get("num_classes")
    null = getattr(teacher, "null_class", None)
    n_embed = (max(int(classes or 0), int(null) + 1 if null is not None else 0)) or None
    if isinstance(shape, list):
        return DiscHeads([DiscHead(s, hidden, n_embed, per_location) for s in shape])
    return DiscHead(shape, hidden, n_embed, per_location)


__all__ = ["FakeScore", "frozen", "evaluating", "DISC_ARCHS", "AdaptersOff", "adapters_disabled", "real_score", "denoising_loss", "dsm_error",
           "dsm_weight", "sample_times", "time_indices", "noise_grid", "forward_with_features", "find_module",
           "feature_modules", "DiscHead", "DiscHeads", "ChannelMean", "build_disc_head", "sample_shape", "feature_shape"]

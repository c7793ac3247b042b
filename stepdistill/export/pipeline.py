"""A few-step distilled image generator as a diffusers pipeline.

This file is copied verbatim into exported folders, where diffusers loads it through its
custom-pipeline mechanism (``model_index.json``: ``"_class_name": ["pipeline",
"StepDistillPipeline"]``). It imports only torch, numpy, diffusers and (for LoRA) peft:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2]).images          # the trained step count by default

Sampling is the scheduler's own loop: the exported scheduler (``LCMScheduler`` for VP models,
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` for flow models) predicts x0 at each
of its timesteps and re-noises it with fresh noise from ``generator`` to the next one, the
multi-step consistency sampler (Song et al., 2023, Alg. 1); a deterministic student's
``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler`` steps from that x0 by DDIM instead. EDM
models: ``EDMEulerScheduler`` gives the sigmas and the preconditioning, and the loop here takes x0
and re-noises it (``renoise``) or takes the Euler step (Karras et al., 2022). A TCD student's
``TCDScheduler`` takes TCD's strategic stochastic step with ``eta`` = the trained gamma by default.
A guidance-distilled student (Meng et al., 2023) has a ``guidance_embedding`` component that feeds the
CFG scale to the unet: ``pipe(class_labels=..., guidance_scale=w)`` runs it in one pass per step.
A student trained at times of its own (sCM's 2-step sampler) has them in ``trained_timesteps``: at the
trained step count they are passed to the scheduler (``set_student_timesteps``); other counts run the
scheduler's own grid.
"""
from __future__ import annotations

import json

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the file header


def set_student_timesteps(scheduler, steps: int, times=None, device=None) -> None:
    """``scheduler.set_timesteps(steps)``, or with the student's own ``times`` (the scheduler's timestep
    units): LCMScheduler takes them as ``timesteps``; FlowMatchEulerDiscreteScheduler as ``sigmas`` =
    t / num_train_timesteps, given before its shift s, which it applies: u = sigma / (s - (s - 1) sigma)
    maps to s u / (1 + (s - 1) u) = sigma."""
    if not times:
        scheduler.set_timesteps(steps, device=device)
        return
    name = type(scheduler).__name__
    if name == "LCMScheduler":
        scheduler.set_timesteps(timesteps=[int(t) for t in times], device=device)
    elif name == "FlowMatchEulerDiscreteScheduler":
        n, s = float(scheduler.config.num_train_timesteps), float(scheduler.config.shift)
        sigmas = [float(t) / n for t in times]
        scheduler.set_timesteps(sigmas=[x / (s - (s - 1.0) * x) for x in sigmas], device=device)
    else:
        raise ValueError(f"{name} cannot take a student's own timesteps; re-export the model")


class StepDistillPipeline(DiffusionPipeline):
    """unet: a UNet2DModel (class-conditional when its config has num_class_embeds);
    scheduler: the student's scheduler; trained_steps: the step count the student was trained for."""

    model_cpu_offload_seq = "guidance_embedding->unet->unet_2->unet_3->unet_4"
    _optional_components = ["unet_2", "unet_3", "unet_4", "guidance_embedding"]

    def __init__(self, unet, scheduler, trained_steps: int = 1, renoise: bool = True, gamma: float = 0.3,
                 unet_2=None, unet_3=None, unet_4=None, expert_bounds=None, guidance_embedding=None,
                 guidance_scale: float = 1.0, trained_timesteps=None):
        """``unet_2``..``unet_4``: the later experts of a mixture-of-experts student (Phased DMD); expert
        k + 1 runs at the timesteps t <= ``expert_bounds[k - 1]`` (in the loop's units: the scheduler's
        timesteps, EDM's sigmas), ``unet`` at the times above them. ``guidance_embedding``: the class
        and CFG-scale input of a guidance-distilled unet (``class_embed_type="identity"``), run at
        ``guidance_scale`` by default. ``trained_timesteps``: the student's own sampling times at
        ``trained_steps`` (None: the scheduler's grid)."""
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, unet_2=unet_2, unet_3=unet_3, unet_4=unet_4,
                              guidance_embedding=guidance_embedding)
        self.register_to_config(trained_steps=int(trained_steps), renoise=bool(renoise), gamma=float(gamma),
                                expert_bounds=[float(b) for b in (expert_bounds or [])],
                                guidance_scale=float(guidance_scale),
                                trained_timesteps=[float(t) for t in (trained_timesteps or [])])

    def _unet_at(self, t):
        """The expert for time t: the number of bounds b with t <= b picks unet, unet_2, ..."""
        experts = [self.unet] + [u for u in (self.unet_2, self.unet_3, self.unet_4) if u is not None]
        bounds = list(self.config.get("expert_bounds") or [])
        if len(bounds) != len(experts) - 1:
            raise ValueError(f"{len(experts)} unets but expert_bounds {bounds}; re-export the model")
        return experts[sum(float(t) <= b for b in bounds)]

    @property
    def num_classes(self) -> int:
        owner = self.guidance_embedding if self.guidance_embedding is not None else self.unet
        n = owner.config.get("num_class_embeds") or 0
        return max(int(n) - 1, 0)  # the last embedding is the "no class" label of CFG training

    def _class_input(self, labels, guidance_scale):
        """What the unet takes as class_labels: the labels, or for a guidance-distilled student the
        guidance embedding of (labels, w) (Meng et al., 2023, sec. 3: one pass at any w)."""
        if self.guidance_embedding is None:
            if guidance_scale is not None and float(guidance_scale) != 1.0:
                raise ValueError("this model has no guidance input (its guidance, if any, was distilled in at a fixed "
                                 "scale); call it without guidance_scale")
            return labels
        w = float(self.config.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
        emb = self.guidance_embedding
        return emb(labels, emb.w_features(torch.full((len(labels),), w))).to(self.unet.dtype)

    def _labels(self, class_labels, batch_size):
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional; call it without class_labels")
            return None, int(batch_size or 1)
        if class_labels is None:
            raise ValueError(f"this model is class-conditional; pass class_labels (ints in 0..{self.num_classes - 1})")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels, dtype=torch.long)
        labels = labels.reshape(-1)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"class_labels must be ints in 0..{self.num_classes - 1}, got {labels.tolist()}")
        if batch_size is not None and int(batch_size) != len(labels):
            raise ValueError(f"batch_size={batch_size} but {len(labels)} class_labels were given; pass one")
        return labels.to(self._execution_device), len(labels)

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, eta: float | None = None,
                 guidance_scale: float | None = None):
        """Generate images. ``num_inference_steps`` defaults to the trained step count; ``eta``: TCD's
        gamma for a TCDScheduler (default: the trained one); ``guidance_scale``: the CFG scale w of a
        guidance-distilled student (default: the exported one; 1 = the conditional model, no guidance).
        ``output_type``: "pil", "np" (floats in [0, 1], NHWC), "pt" (floats in [0, 1], NCHW) or
        "latent" (the raw samples in [-1, 1] data units, unclipped)."""
        labels, b = self._labels(class_labels, batch_size)
        labels = self._class_input(labels, guidance_scale)
        steps = int(num_inference_steps or self.config.trained_steps)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (b, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if type(self.scheduler).__name__ == "EDMEulerScheduler":
            x = self._edm(latents.to(self._execution_device), labels, steps, generator)
        else:
            x = self._scheduler_loop(latents.to(self._execution_device), labels, steps, generator, eta)
        if output_type == "latent":
            images = x
        else:
            images = (x.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _own_times(self, steps):
        """The student's own sampling times where it runs its trained step count, else None."""
        times = list(self.config.get("trained_timesteps") or [])
        return times if times and steps == int(self.config.trained_steps) else None

    def _edm(self, latents, labels, steps, generator):
        """EDM (Karras et al., 2022): the scheduler's preconditioning (Table 1) at each of its sigmas
        (or the student's own, then 0); x0, then fresh noise at the next sigma (``renoise``), or the
        Euler (DDIM) step to it."""
        own = self._own_times(steps)
        if own:
            sigmas = torch.tensor([*own, 0.0], dtype=torch.float32).to(self._execution_device)
        else:
            self.scheduler.set_timesteps(steps, device=self._execution_device)
            sigmas = self.scheduler.sigmas.to(self._execution_device)
        x = latents * sigmas[0]
        for i in self.progress_bar(range(steps)):
            s, s_next = sigmas[i], sigmas[i + 1]
            out = self._unet_at(s)(self.scheduler.precondition_inputs(x, s), self.scheduler.precondition_noise(s),
                                   class_labels=labels).sample
            x0 = self.scheduler.precondition_outputs(x, out, s)
            if self.config.renoise:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x0 + s_next * noise
            else:
                x = x0 + s_next * (x - x0) / s
        return x

    def _scheduler_loop(self, latents, labels, steps, generator, eta=None):
        # the prior's scale at the first timestep (1 for LCMScheduler; flow schedulers define none: 1)
        x = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        set_student_timesteps(self.scheduler, steps, self._own_times(steps), self._execution_device)
        kw = {}
        if type(self.scheduler).__name__ == "TCDScheduler":
            kw["eta"] = float(self.config.get("gamma", 0.3) if eta is None else eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._unet_at(t)(x, t, class_labels=labels).sample
            x = self.scheduler.step(out, t, x, generator=generator, **kw).prev_sample
        return x

    # -- LoRA (Hu et al., 2022) in peft's format --------------------------------------------------
    def load_lora_weights(self, path: str, adapter_name: str = "default") -> None:
        """Add the LoRA adapters in ``path`` (a folder holding pytorch_lora_weights.safetensors, or
        the file) to the unet. Keys are peft's, prefixed "unet."; the LoraConfig is in the header."""
        import os

        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = os.path.join(path, LORA_WEIGHT_NAME) if os.path.isdir(path) else path
        with safe_open(file, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
        cfg = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
        if not cfg:
            raise ValueError(f"{file} has no LoRA config in its header ({LORA_METADATA_KEY}); re-export it")
        cfg = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
        state = {k[len("unet."):]: v for k, v in load_file(file).items() if k.startswith("unet.")}
        inject_adapter_in_model(LoraConfig(**cfg), self.unet, adapter_name=adapter_name)
        result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"LoRA weights in {file} do not fit this unet (e.g. {unexpected[0]})")

    def fuse_lora(self) -> None:
        """Merge the loaded adapters into the base weights (W + scale * B A), then drop them."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        _unload(self.unet)


def _unload(model: torch.nn.Module) -> None:
    """Replace every merged peft layer by its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())

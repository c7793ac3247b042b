"""How closely a cached-trajectory consistency student fits its targets, and how much high-frequency
energy (|x - 3x3 box blur|, a pixel mean) its samples and its teacher's carry:

    python tools/consistency_fit.py RUN TEACHER

RUN: a run of a consistency preset with objective.cache in RUN/teacher_cache; TEACHER: its teacher.
Prints the student's RMS distance to the cache's own 32-step solutions (the noises it trained on) and
to fresh 32-step DPM-Solver++(2M) solutions, and the high-frequency energy of each and of 4-step DDIM."""
import sys

import torch
import torch.nn.functional as F

from stepdistill.loaders import load_for_sampling
from stepdistill.cache import load_cache
from stepdistill.teachers import load_teacher
from stepdistill.sampling import sample

torch.manual_seed(0)
run, teacher_path = sys.argv[1], sys.argv[2]
m = load_for_sampling(run)
pairs = load_cache(f"{run}/teacher_cache")
teacher = load_teacher(teacher_path)
N = 500
def hf(x):  # high-frequency energy: |x - 3x3 box blur|, mean over pixels
    return (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean().item()
@torch.no_grad()
def student(noise, labels):
    return torch.cat([m.generate(noise[i:i+250], m.make_cond(labels[i:i+250]), 4, "ddim", 1.0) for i in range(0, len(noise), 250)])
@torch.no_grad()
def teach(noise, labels, steps, sampler):
    return torch.cat([sample(teacher, noise[i:i+250], steps, sampler=sampler, cond={"class_labels": labels[i:i+250]})
                      for i in range(0, len(noise), 250)])
nz, x0, lab = pairs.noise[:N], pairs.x0[:N], pairs.cond["class_labels"][:N]
s_tr = student(nz, lab)
print(f"train noises: student vs cache x0 rmse {(s_tr - x0).square().mean().sqrt():.4f}; hf student {hf(s_tr):.4f} cache x0 {hf(x0):.4f}")
g = torch.Generator().manual_seed(123)
fz = torch.randn(nz.shape, generator=g)
t32 = teach(fz, lab, 32, "dpmpp2m")
s_f = student(fz, lab)
t4 = teach(fz, lab, 4, "ddim")
print(f"fresh noises: student vs teacher32 rmse {(s_f - t32).square().mean().sqrt():.4f}; hf student {hf(s_f):.4f} teacher32 {hf(t32):.4f}")
print(f"teacher 4-step ddim vs teacher32 rmse {(t4 - t32).square().mean().sqrt():.4f}; hf {hf(t4):.4f}")

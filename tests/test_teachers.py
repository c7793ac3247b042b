"""Teacher folders: save/load round trip, diffusers compatibility, pickled weights refused,
clear errors, and the shipped digits teacher."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_teacher, tiny_unet2d

from stepdistill.resources import TEACHERS
from stepdistill.errors import UserError
from stepdistill.teachers import META_FILE, load_teacher, save_teacher

DIGITS16 = TEACHERS / "digits16"


def _probe(den):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 0.0], dtype=torch.float64)
    return den(x, t, {"class_labels": torch.tensor([0, 1, 2, 1])})


def test_round_trip_is_exact_and_frozen(tiny_teacher_dir):
    ref = tiny_teacher()
    den = load_teacher(tiny_teacher_dir)
    assert torch.equal(_probe(den), _probe(ref))
    assert not any(p.requires_grad for p in den.parameters()) and not den.training
    assert den.null_class == 2 and den.meta["num_classes"] == 2 and den.meta["kind"] == "class-conditional"
    assert den.meta["sample_size"] == 8 and den.meta["in_channels"] == 1
    assert den.schedule.prediction_type == "v"
    assert torch.equal(den.schedule.timesteps(4), ref.schedule.timesteps(4))
    assert torch.equal(den.schedule.alphas_cumprod, ref.schedule.alphas_cumprod)


def test_folder_loads_in_plain_diffusers(tiny_teacher_dir):
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(tiny_teacher_dir / "unet", use_safetensors=True)
    sched = DDIMScheduler.from_pretrained(tiny_teacher_dir / "scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    ref = tiny_teacher().backbone
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 1])
    assert torch.equal(unet(x, 10, class_labels=labels).sample, ref(x, 10, class_labels=labels).sample)
    assert {p.name for p in (tiny_teacher_dir / "unet").iterdir()} == {"config.json",
                                                                      "diffusion_pytorch_model.safetensors"}


def test_dtype_is_applied(tiny_teacher_dir):
    den = load_teacher(tiny_teacher_dir, dtype=torch.float64)
    assert den.dtype == torch.float64
    assert _probe(den).dtype == torch.float32  # the interface stays float32


def test_pickled_weights_need_the_trust_flag(tmp_path, tiny_teacher_dir):
    import shutil

    path = tmp_path / "pickled"
    shutil.copytree(tiny_teacher_dir, path)
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny_teacher().backbone.save_pretrained(path / "unet", safe_serialization=False)
    assert (path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UserError, match="training reads safetensors only"):
        load_teacher(path)
    den = load_teacher(path, trust_pickle=True)
    assert torch.equal(_probe(den), _probe(tiny_teacher()))


def test_save_replaces_atomically_and_keeps_old_folder_on_failure(tmp_path):
    path = tmp_path / "t"
    save_teacher(tiny_teacher(seed=0), path, {"kind": "class-conditional", "num_classes": 2, "null_class": 2})

    def broken(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_teacher(tiny_teacher(seed=1), path, {"kind": "class-conditional", "num_classes": 2, "null_class": 2},
                     extras=broken)
    assert torch.equal(_probe(load_teacher(path)), _probe(tiny_teacher(seed=0)))
    save_teacher(tiny_teacher(seed=1), path, {"kind": "class-conditional", "num_classes": 2, "null_class": 2},
                 extras=lambda f: (f / "note.txt").write_text("hi"))
    assert torch.equal(_probe(load_teacher(path)), _probe(tiny_teacher(seed=1)))
    assert (path / "note.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary folders left


def test_plain_diffusers_pipeline_folder_loads(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = tiny_unet2d(num_class_embeds=None)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="epsilon")).save_pretrained(tmp_path / "p")
    den = load_teacher(tmp_path / "p")
    assert den.meta["kind"] == "unconditional" and den.null_class is None
    assert den.schedule.prediction_type == "eps"
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(den(x, 500.0, None), den.schedule.raw_to_x0(unet(x, 500.0).sample, x,
                                                                      torch.tensor(500.0)))


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("empty", "stepdistill.json, unet/"),
    ("backbone", "'VQModel' in"),
    ("text", "text-to-image"),
    ("noweights", "holds no weights"),
    ("version", "format_version 99"),
])
def test_errors_name_the_problem_and_the_fix(tmp_path, tiny_teacher_dir, case, needle):
    import shutil

    path = tmp_path / "t"
    if case == "file":
        path.write_text("x")
    elif case == "empty":
        path.mkdir()
    elif case == "text":
        path.mkdir()
        (path / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    elif case != "missing":
        shutil.copytree(tiny_teacher_dir, path)
        if case == "backbone":
            cfg = json.loads((path / "unet" / "config.json").read_text())
            (path / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "VQModel"}))
        elif case == "noweights":
            (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        elif case == "version":
            meta = json.loads((path / META_FILE).read_text())
            (path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError) as err:
        load_teacher(path)
    assert needle in str(err.value)


def test_shipped_digits_teacher():
    den = load_teacher(DIGITS16)
    m = den.meta
    assert (m["kind"], m["num_classes"], m["null_class"], m["sample_size"], m["in_channels"]) == \
        ("class-conditional", 10, 10, 16, 1)
    assert den.schedule.prediction_type == "v" and den.schedule.config["timestep_spacing"] == "trailing"
    assert den.schedule.config["beta_schedule"] == "scaled_linear"
    files = [p for p in DIGITS16.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    assert m["training"]["data"] == "digits-train"


def test_shipped_digits_teacher_draws_the_requested_digits():
    """An independent judge: a 3-nearest-neighbour classifier on the real training digits' pixels
    (97-98 % on the held-out writers) must read the requested class in 20-step DDIM samples."""
    from sklearn.neighbors import KNeighborsClassifier

    from stepdistill.data import load_images
    from stepdistill.sampling import sample

    train = load_images("digits-train")
    knn = KNeighborsClassifier(3).fit(train.images.flatten(1).numpy(), train.labels.numpy())
    den = load_teacher(DIGITS16)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    x = sample(den, torch.randn(100, 1, 16, 16, generator=g), 20, cond={"class_labels": labels})
    assert x.abs().max() < 2  # near the data range [-1, 1]: no blow-up
    assert knn.score(x.flatten(1).numpy(), labels.numpy()) >= 0.9


@pytest.mark.parametrize("name, kind", [("digits16", "vp"), ("digits16_edm", "edm"), ("digits16_flow", "flow")])
def test_shipped_teachers_of_every_kind_load_by_name(name, kind):
    """The three shipped digits teachers (one backbone, data and training length; stepdistill pretrain
    digits/teacher[_edm|_flow]) load by name with their schedule and denoise to finite values."""
    from stepdistill.teachers import load_teacher

    den = load_teacher(name)
    assert den.schedule.kind == kind and den.meta["num_classes"] == 10 and den.meta["sample_size"] == 16
    x = torch.randn(2, 1, 16, 16)
    t = den.schedule.timesteps(4)[1:3]
    out = den(x, t, {"class_labels": torch.tensor([3, 7])})
    assert out.shape == x.shape and torch.isfinite(out).all()

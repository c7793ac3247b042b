"""Datasets: the digits splits and their resampling, folders and .npz round trips, content hashes,
errors, and the seeded batch order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data import ImageSet, load_images, make_loader, save_npz
from stepdistill.errors import UserError
from stepdistill.images import to_uint8


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Half-pixel-centre linear interpolation weights (edge clamped), written out by hand."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        lo = int(np.floor(src))
        frac = src - lo
        for j, wt in ((lo, 1 - frac), (lo + 1, frac)):
            w[i, min(max(j, 0), n_in - 1)] += wt
    return w


def test_digits_splits_are_fixed_and_disjoint():
    from sklearn.datasets import load_digits

    full, train, test = load_images("digits"), load_images("digits-train"), load_images("digits-test")
    assert (len(full), len(train), len(test)) == (1797, 1400, 397)
    assert torch.equal(torch.cat([train.images, test.images]), full.images)
    assert torch.equal(test.labels, torch.from_numpy(load_digits().target[1400:]).long())
    assert full.images.shape[1:] == (1, 16, 16) and full.images.dtype == torch.float32
    assert full.num_classes == 10 and sorted(set(train.labels.tolist())) == list(range(10))
    assert len({full.sha256, train.sha256, test.sha256}) == 3
    assert torch.equal(load_images("digits", split="test").images, test.images)


def test_digits_are_the_bilinear_upsampling_of_sklearn_digits_on_the_uint8_grid():
    from sklearn.datasets import load_digits

    raw = load_digits().images[:50] / 16.0                       # [50, 8, 8] in [0, 1]
    w = _bilinear_matrix(8, 16)
    ref = np.einsum("ij,njk,lk->nil", w, raw, w) * 2 - 1         # separable bilinear, mapped to [-1, 1]
    ref_u8 = np.clip(np.round((ref + 1) * 127.5), 0, 255)
    got = load_images("digits").images[:50, 0]
    assert torch.equal(to_uint8(got).float() / 127.5 - 1, got)  # exactly on the uint8 grid
    assert np.abs(to_uint8(got).numpy().astype(float) - ref_u8).max() <= 1  # float rounding of ties only
    assert got.min() == -1 and got.max() == 1                    # the full range is used


def test_npz_round_trip_keeps_pixels_labels_and_hash(tmp_path):
    data = load_images("digits-test")
    path = save_npz(tmp_path / "d.npz", data.images, data.labels)
    with np.load(path) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (397, 16, 16, 1)
    back = load_images(str(path))
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
    assert back.sha256 == data.sha256


def test_hash_changes_with_one_pixel_or_one_label(tmp_path):
    data = load_images("digits-test")
    u8 = to_uint8(data.images).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "a.npz", images=u8, labels=data.labels.numpy())
    u8b = u8.copy()
    u8b[5, 3, 3, 0] ^= 1
    np.savez(tmp_path / "b.npz", images=u8b, labels=data.labels.numpy())
    lab = data.labels.numpy().copy()
    lab[0] = (lab[0] + 1) % 10
    np.savez(tmp_path / "c.npz", images=u8, labels=lab)
    np.savez(tmp_path / "d.npz", images=u8)
    hashes = [load_images(str(tmp_path / f"{k}.npz")).sha256 for k in "abcd"]
    assert hashes[0] == data.sha256 and len(set(hashes)) == 4


def test_folder_round_trip_with_class_subfolders(tmp_path):
    data = load_images("digits-test")
    u8 = to_uint8(data.images)[:30]
    for i in range(30):
        d = tmp_path / f"class_{int(data.labels[i])}"
        d.mkdir(exist_ok=True)
        Image.fromarray(u8[i, 0].numpy()).save(d / f"{i:03d}.png")
    back = load_images(str(tmp_path))
    names = sorted({f"class_{int(y)}" for y in data.labels[:30]})
    assert back.class_names == names
    # files are read in sorted path order: class folder first, then file name
    order = sorted(range(30), key=lambda i: (f"class_{int(data.labels[i])}", i))
    assert torch.equal(back.images, data.images[:30][order])
    assert [names[y] for y in back.labels.tolist()] == [f"class_{int(data.labels[i])}" for i in order]


def test_flat_rgb_folder_has_no_labels(tmp_path):
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    back = load_images(str(tmp_path))
    assert back.labels is None and back.num_classes == 0 and back.channels == 3
    assert torch.equal(to_uint8(back.images).permute(0, 2, 3, 1), torch.from_numpy(arrs))


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("sizes", "differ"),
    ("modes", "differ"),
    ("alpha", "alpha channel"),
    ("no_images_key", "no 'images' array"),
    ("float", "dtype float32"),
    ("ndim", "expected [N, H, W, C]"),
    ("labels_len", "3 labels for 4 images"),
    ("pickled", "pickled"),
    ("txt", "not an .npz"),
])
def test_bad_data_is_refused_with_a_fix(tmp_path, case, needle):
    gray = np.zeros((8, 8), np.uint8)
    if case == "missing":
        spec = tmp_path / "nope"
    elif case == "empty":
        spec = tmp_path / "empty"
        spec.mkdir()
        (spec / "notes.txt").write_text("x")
    elif case in ("sizes", "modes", "alpha"):
        spec = tmp_path / "imgs"
        spec.mkdir()
        Image.fromarray(gray).save(spec / "a.png")
        other = {"sizes": Image.fromarray(np.zeros((9, 8), np.uint8)),
                 "modes": Image.fromarray(np.zeros((8, 8, 3), np.uint8)),
                 "alpha": Image.fromarray(np.zeros((8, 8, 4), np.uint8))}[case]
        other.save(spec / "b.png")
    else:
        spec = tmp_path / "d.npz"
        imgs = np.zeros((4, 8, 8, 1), np.uint8)
        arrays = {"no_images_key": {"pixels": imgs}, "float": {"images": imgs.astype(np.float32)},
                  "ndim": {"images": imgs[..., 0]}, "labels_len": {"images": imgs, "labels": np.arange(3)},
                  "pickled": {"images": np.array([{"a": 1}], dtype=object)}}.get(case)
        if case == "txt":
            spec = tmp_path / "d.txt"
            spec.write_text("hello")
        else:
            np.savez(spec, **arrays)
    with pytest.raises(UserError, match=None) as err:
        load_images(str(spec))
    assert needle in str(err.value)


def test_split_is_only_for_digits(tmp_path):
    with pytest.raises(UserError, match="only defined for 'digits'"):
        load_images(str(tmp_path), split="train")


def _tiny_set(n=10):
    x = torch.linspace(-1, 1, n).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSet(x, torch.arange(n), "tiny", "-")


def test_loader_order_is_seeded_and_each_epoch_is_a_permutation():
    def epochs(seed, k=3):
        loader = make_loader(_tiny_set(), 5, seed)
        out = []
        for e in range(k):
            loader.sampler.set_epoch(e)
            out.append(torch.cat([b["cond"]["class_labels"] for b in loader]))
        return out

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])
    assert all(sorted(e.tolist()) == list(range(10)) for e in a)
    batch = next(iter(make_loader(_tiny_set(), 4, 0)))
    assert batch["x0"].shape == (4, 1, 2, 2)
    assert torch.equal(batch["x0"][:, 0, 0, 0], _tiny_set().images[batch["cond"]["class_labels"], 0, 0, 0])


def test_loader_resumes_mid_epoch():
    loader = make_loader(_tiny_set(), 2, 7)
    loader.sampler.set_epoch(4)
    full = torch.cat([b["cond"]["class_labels"] for b in loader])
    loader.sampler.set_epoch(4, start=6)
    assert torch.equal(torch.cat([b["cond"]["class_labels"] for b in loader]), full[6:])

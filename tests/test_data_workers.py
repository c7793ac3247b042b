"""Batches read by DataLoader workers: the same rows as read in the main process, from any draw on
(a resume), and image folders read from disk per batch equal the in-memory set."""
from __future__ import annotations

import pytest
import torch

from stepdistill.data import load_images
from stepdistill.disk_data import FolderImages
from stepdistill.train.batches import BatchStream


def test_folder_read_per_batch_equals_the_folder_in_memory(tiny_data_folder):
    lazy, eager = FolderImages(tiny_data_folder), load_images(str(tiny_data_folder))
    assert len(lazy) == len(eager) == 40 and lazy.sample_shape == eager.sample_shape == (1, 8, 8)
    assert lazy.class_names == eager.class_names == ["0", "1"] and torch.equal(lazy.labels, eager.labels)
    idx = torch.tensor([5, 0, 39, 17])
    (x, c), (xe, ce) = lazy.rows(idx), eager.rows(idx)
    assert torch.equal(x, xe) and torch.equal(c["class_labels"], ce["class_labels"])


@pytest.mark.parametrize("start", [0, 7])
def test_workers_yield_the_draws_the_main_process_reads(tiny_data_folder, start):
    data = FolderImages(tiny_data_folder)
    plain = BatchStream(data, 16, seed=3, rank=0, world=1)
    read = BatchStream(data, 16, seed=3, rank=0, world=1, workers=2)
    for d in range(start, start + 6):  # crosses epochs (40 images, 16 per draw); a resume starts at 7
        (x, c), (xw, cw) = plain.read(d), read.read(d)
        assert torch.equal(x, xw) and torch.equal(c["class_labels"], cw["class_labels"]), d
    assert torch.equal(read.read(2)[0], plain.read(2)[0])  # asked out of order: the reader restarts there
    read.close()


def test_saved_hf_dataset_reads_per_batch_as_the_same_images(tiny_data_hf, tiny_data_npz, tmp_path):
    """A datasets.Dataset saved with save_to_disk: rows decoded from its Arrow files equal the .npz it
    was built from; labels and class names from its ClassLabel column; workers read the same draws."""
    import datasets

    from stepdistill.errors import UserError
    from stepdistill.hf_data import HFDiskImages

    lazy, eager, npz = HFDiskImages(tiny_data_hf), load_images(str(tiny_data_hf)), load_images(str(tiny_data_npz))
    assert len(lazy) == len(eager) == 40 and lazy.sample_shape == (1, 8, 8)
    assert lazy.class_names == eager.class_names == ["zero", "one"] and torch.equal(lazy.labels, npz.labels)
    idx = torch.tensor([5, 0, 39, 17])
    (x, c), (xn, cn) = lazy.rows(idx), npz.rows(idx)
    assert torch.equal(x, xn) and torch.equal(c["class_labels"], cn["class_labels"])
    assert torch.equal(eager.images, npz.images)
    plain = BatchStream(lazy, 16, seed=3, rank=0, world=1)
    read = BatchStream(lazy, 16, seed=3, rank=0, world=1, workers=2)
    for d in (0, 3):
        assert torch.equal(plain.read(d)[0], read.read(d)[0]), d
    read.close()
    # a DatasetDict names its splits; a dataset without an Image column says how to cast one
    datasets.DatasetDict({"train": lazy.ds, "test": lazy.ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"splits \['train', 'test'\]"):
        load_images(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(UserError, match="no Image column"):
        load_images(str(tmp_path / "noimg"))

"""The preprocessed store: prepared once from real full-size NIH PNGs, the same pixels as the
PNG path, resumable, never used when partial or stale, and training runs from either path."""
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, make_data_dir, run_script
from dataset import (ChestXray14, DataError, StoreDataset, collate, open_store, prepare_store,
                     to_model_input)


@pytest.fixture
def prepared(nih_data_dir):
    prepare_store(nih_data_dir, 256, workers=2, progress=False)
    return nih_data_dir, open_store(nih_data_dir, 256)


def test_prepare_writes_a_complete_store(prepared):
    data_dir, store = prepared
    assert store.count == 30 and store.size == 256
    assert store.array.shape == (30, 256, 256) and store.array.dtype == np.uint8
    proc = run_script("dataset.py", "prepare", "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr
    assert "30 images at 256x256 (0 decoded now" in proc.stdout  # up to date: nothing redone


@pytest.mark.parametrize("mode", ["ten_crop", "center"])
def test_store_and_png_give_the_model_the_same_pixels(prepared, mode):
    data_dir, store = prepared
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}_list.txt"
        png = ChestXray14(data_dir, path, mode=mode)  # float, normalised on the CPU
        raw = ChestXray14(data_dir, path, mode=mode, raw=True)
        stored = StoreDataset(store, path, mode=mode)
        for i in range(len(png)):
            from_store = stored[i][0]
            assert from_store.dtype == torch.uint8
            # Same resize, same crops: the uint8 pixels are identical ...
            assert torch.equal(from_store, raw[i][0])
            # ... and the device-side finish matches the CPU normalisation.
            x = to_model_input(from_store[None])[0]
            assert x.shape == png[i][0].shape
            assert torch.allclose(x, png[i][0], atol=1e-5)


def test_store_training_batches_are_cropped_on_the_device(prepared):
    data_dir, store = prepared
    train = StoreDataset(store, data_dir / "train_list.txt", mode="train", crop=224, seed=1)
    batch = collate([train[i] for i in range(4)])
    images, labels, names, boxes = batch
    assert images.shape == (4, 1, 256, 256) and images.dtype == torch.uint8
    assert boxes.shape == (4, 5)
    x = to_model_input(images, boxes, crop=224)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    # Seeded by (seed, epoch, index), as the PNG path.
    assert torch.equal(train[0][3], train[0][3])
    train.set_epoch(1)
    assert not all(torch.equal(train[i][3], batch[3][i]) for i in range(4))


def test_training_runs_from_store_and_from_pngs(prepared, tmp_path):
    data_dir, _ = prepared
    args = ["main.py", "--data-dir", data_dir, "--pretrained", "none", "--resize", "256",
            "--crop-size", "64", "--batch-size", "4", "--workers", "1", "--epochs", "1"]
    from_store = run_script(*args, "--out-dir", tmp_path / "store")
    assert from_store.returncode == 0, from_store.stderr
    assert "reading the preprocessed store" in from_store.stdout
    from_png = run_script(*args, "--no-store", "--out-dir", tmp_path / "png")
    assert from_png.returncode == 0, from_png.stderr
    assert "preprocessed store" not in from_png.stdout
    for run in ("store", "png"):
        assert (tmp_path / run / "last.pt").is_file()


def test_interrupted_prepare_resumes(tmp_path, nih_images):
    """An unreadable image stops preparation part-way; once it is fixed, the next run decodes
    only what is left, and the result equals a store prepared in one go."""
    image_dir, table = nih_images
    names = sorted(p.name for p in image_dir.iterdir())[:130]
    data_dir = make_data_dir(tmp_path / "data", image_dir, table, names)
    last = data_dir / "images" / names[-1]
    original = last.read_bytes()
    last.write_bytes(original[:1000])  # truncated
    with pytest.raises(DataError, match=names[-1]):
        prepare_store(data_dir, 64, workers=2, progress=False)
    with pytest.raises(DataError, match="incomplete store"):
        open_store(data_dir, 64)
    last.write_bytes(original)
    _, written = prepare_store(data_dir, 64, workers=2, progress=False)
    assert 0 < written < 130  # only the chunk that failed
    resumed = np.array(open_store(data_dir, 64).array)
    shutil.rmtree(data_dir / "store")
    prepare_store(data_dir, 64, workers=2, progress=False)
    assert np.array_equal(resumed, np.array(open_store(data_dir, 64).array))


def test_stale_or_partial_store_is_never_used_silently(prepared, tmp_path):
    data_dir, _ = prepared
    extra = data_dir / "images" / "99999999_000.png"
    shutil.copy(next((data_dir / "images").iterdir()), extra)
    args = ["main.py", "--data-dir", data_dir, "--pretrained", "none", "--epochs", "1",
            "--out-dir", tmp_path / "run"]
    assert_clean_error(run_script(*args), "stale store", "dataset.py prepare")
    extra.unlink()
    (data_dir / "store" / "256" / "meta.json").unlink()
    assert_clean_error(run_script(*args), "incomplete store", "--no-store")


def test_store_crop_boxes_follow_random_resized_crop():
    from dataset import random_resized_crop_box
    areas = []
    for i in range(500):
        top, left, h, w = random_resized_crop_box(256, 256, (0.08, 1.0), np.random.default_rng(i))
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 256
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        areas.append(h * w / 256 ** 2)
    assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.3 < np.mean(areas) < 0.7
    # Same seed, same box; scale (1, 1) on a square image: the whole image (the fallback).
    assert random_resized_crop_box(256, 256, (1.0, 1.0), np.random.default_rng(0)) == (0, 0, 256, 256)

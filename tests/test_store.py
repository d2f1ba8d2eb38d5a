"""The preprocessed store: prepared once from real full-size NIH PNGs (several sizes from one
decode), the same pixels as the PNG path for evaluation and training crops, resumable, never
used when partial, damaged or stale, and training runs from either path."""
import json
import shutil

import numpy as np
import pytest
import torch

from common import DataError
from conftest import assert_clean_error, make_data_dir, run_main, run_script
from dataset import XrayDataset, collate
from store import open_store, prepare_store


@pytest.fixture
def prepared(nih_data_dir):
    prepare_store(nih_data_dir, (256, 512), workers=2, progress=False)
    return nih_data_dir, {size: open_store(nih_data_dir, size) for size in (256, 512)}


@pytest.mark.integration
def test_prepare_writes_complete_stores(prepared):
    data_dir, stores = prepared
    for size, store in stores.items():
        assert store.count == 30 and store.size == size
        assert store.array.shape == (30, size, size) and store.array.dtype == np.uint8
    proc = run_script("dataset.py", "prepare", "--data-dir", data_dir)  # default: 256 and 512
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("0 images decoded now") == 2  # up to date: nothing redone


@pytest.mark.parametrize("mode,size", [("ten_crop", 256), ("center", 256), ("train", 512)])
def test_store_and_png_give_the_model_the_same_pixels(prepared, mode, size):
    """Evaluation crops and training crops (same seed, same epoch) are byte-identical."""
    data_dir, stores = prepared
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}_list.txt"
        png = XrayDataset(data_dir, path, mode=mode, size=size, seed=4)
        stored = XrayDataset(data_dir, path, mode=mode, size=size, seed=4, store=stores[size])
        png.set_epoch(2)
        stored.set_epoch(2)
        for i in range(len(png)):
            assert stored[i][0].dtype == torch.uint8
            assert torch.equal(stored[i][0], png[i][0])


def test_store_training_batches_are_ready_crops(prepared):
    data_dir, stores = prepared
    train = XrayDataset(data_dir, data_dir / "train_list.txt", "train", 512, crop=224, seed=1,
                        store=stores[512])
    images, labels, names = collate([train[i] for i in range(4)])
    assert images.shape == (4, 1, 224, 224) and images.dtype == torch.uint8
    assert torch.equal(train[0][0], images[0])  # seeded by (seed, epoch, index)
    train.set_epoch(1)
    assert not all(torch.equal(train[i][0], images[i]) for i in range(4))


@pytest.mark.integration
def test_training_runs_from_store_and_from_pngs(prepared, tmp_path, capsys):
    data_dir, _ = prepared
    args = ["--data-dir", data_dir, "--pretrained", "none", "--crop-size", "64",
            "--batch-size", "4", "--workers", "0", "--epochs", "1", "--limit", "12"]
    from_store = run_main(capsys, *args, "--out-dir", tmp_path / "store")
    assert from_store.returncode == 0, from_store.stderr
    assert "store/512/" in from_store.stdout and "store/256/" in from_store.stdout
    from_png = run_main(capsys, *args, "--no-store", "--out-dir", tmp_path / "png")
    assert from_png.returncode == 0, from_png.stderr
    assert "preprocessed store" not in from_png.stdout
    # The same pixels, the same seed: the same weights from both paths.
    a = torch.load(tmp_path / "store" / "last.pt")["model"]
    b = torch.load(tmp_path / "png" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
        prepare_store(data_dir, (64, 32), workers=2, progress=False)
    with pytest.raises(DataError, match="incomplete store"):
        open_store(data_dir, 64)
    last.write_bytes(original)
    state = data_dir / "store" / "32" / "done.partial"
    state.write_bytes(np.random.default_rng(0).integers(0, 256, state.stat().st_size,
                                                         np.uint8).tobytes())  # damaged
    done = prepare_store(data_dir, (64, 32), workers=2, progress=False)
    assert done[32][1] == 130  # its damaged progress file: prepared anew, not trusted
    assert 0 < done[64][1] < 130  # only the chunk that failed
    resumed = {s: np.array(open_store(data_dir, s).array) for s in (64, 32)}
    shutil.rmtree(data_dir / "store")
    prepare_store(data_dir, (64, 32), workers=2, progress=False)
    for size in (64, 32):
        assert np.array_equal(resumed[size], np.array(open_store(data_dir, size).array))


@pytest.mark.integration
def test_prepare_can_skip_unreadable_images(nih_data_dir, tmp_path, capsys):
    bad = sorted((nih_data_dir / "images").iterdir())[3]
    bad.write_bytes(b"not a png")
    proc = run_main(capsys, "prepare", "--data-dir", nih_data_dir, "--size", "64",
                    "--skip-bad-images", module="dataset")
    assert proc.returncode == 0, proc.stderr
    assert "1 unreadable left out" in proc.stdout and bad.name in proc.stderr
    store = open_store(nih_data_dir, 64)
    assert store.skipped == {bad.name}
    split = next(p for p in nih_data_dir.glob("*_list.txt") if bad.name in p.read_text())
    with pytest.raises(DataError, match="skipped when"):
        XrayDataset(nih_data_dir, split, "center", 64, crop=56, store=store)
    ds = XrayDataset(nih_data_dir, split, "center", 64, crop=56, store=store, skip_bad_images=True)
    assert sum(item is None for item in (ds[i] for i in range(len(ds)))) == 1
    # The image is fixed: the next prepare decodes it and takes it back into the store.
    shutil.copy(next(p for p in sorted((nih_data_dir / "images").iterdir()) if p != bad), bad)
    proc = run_main(capsys, "prepare", "--data-dir", nih_data_dir, "--size", "64",
                    module="dataset")
    assert "1 images decoded now" in proc.stdout and "left out" not in proc.stdout
    assert open_store(nih_data_dir, 64).skipped == set()


@pytest.mark.integration
def test_stale_damaged_or_partial_store_is_never_used_silently(prepared, tmp_path, capsys):
    data_dir, _ = prepared
    extra = data_dir / "images" / "99999999_000.png"
    shutil.copy(next((data_dir / "images").iterdir()), extra)
    args = ["--data-dir", data_dir, "--pretrained", "none", "--epochs", "1",
            "--out-dir", tmp_path / "run"]
    assert_clean_error(run_main(capsys, *args), "stale store", "dataset.py prepare")
    extra.unlink()
    meta = data_dir / "store" / "256" / "meta.json"
    for damage in ("", "{not json", json.dumps({"count": 30})):
        meta.write_text(damage)
        assert_clean_error(run_main(capsys, *args), "store/256/meta.json", "damaged store",
                           "to repair it")
    # prepare repairs what it reported.
    assert prepare_store(data_dir, (256,), workers=2, progress=False)[256][1] == 30
    assert open_store(data_dir, 256).count == 30
    meta.unlink()
    assert_clean_error(run_main(capsys, *args), "incomplete store", "--no-store")

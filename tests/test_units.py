"""Fast unit tests of the numerical core: training boxes and crops, the ten-crop geometry,
the epoch order and its slicing by rank and by images seen, the learning-rate warm-up,
de-duplication of padded DDP evaluation, image decoding and the weight loader."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pre_041_state
from images import (crop_gray, draw_train_box, fit_square, load_gray, ten_crop_boxes,
                    train_crop, train_rng)


# ---- training boxes and crops -------------------------------------------------------------

def test_boxes_follow_torchvision_random_resized_crop():
    """Area fraction and aspect ratio have torchvision's distribution (same algorithm, drawn
    in fractions of the image)."""
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    image = torch.zeros(1, 1024, 1024)
    tv = np.array([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                   for _ in range(4000)], dtype=float)  # (top, left, h, w) pixels
    ours = np.array([draw_train_box(np.random.default_rng(i))[0] for i in range(4000)])
    for area_tv, area_ours in ((tv[:, 2] * tv[:, 3] / 1024 ** 2, ours[:, 2] * ours[:, 3]),):
        assert abs(area_tv.mean() - area_ours.mean()) < 0.02
        assert abs(np.median(area_tv) - np.median(area_ours)) < 0.03
    ratio_tv, ratio_ours = np.log(tv[:, 3] / tv[:, 2]), np.log(ours[:, 3] / ours[:, 2])
    assert abs(ratio_tv.mean() - ratio_ours.mean()) < 0.02 and abs(ratio_tv.std() - ratio_ours.std()) < 0.02
    assert ((ours[:, 0] >= 0) & (ours[:, 0] + ours[:, 2] <= 1 + 1e-9)).all()
    assert ((ours[:, 1] >= 0) & (ours[:, 1] + ours[:, 3] <= 1 + 1e-9)).all()
    flips = [draw_train_box(np.random.default_rng(i))[1] for i in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_whole_image_box_and_fallback():
    box, _ = draw_train_box(np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.allclose(box, (0, 0, 1, 1))
    # A tall image (width/height 0.5) with scale 1: the fallback clamps to ratio 3/4.
    box, _ = draw_train_box(np.random.default_rng(0), aspect=0.5, scale=(1.0, 1.0))
    assert np.allclose(box[2:], (0.5 / 0.75, 1.0))


def test_same_seed_gives_the_same_region_at_every_resolution():
    """A crop from the 512 copy and from the 1024 original come from the same part of the image:
    on a smooth image (a ramp) they agree to a grey level or two."""
    yy, xx = np.mgrid[:1024, :1024]
    ramp = Image.fromarray(((xx + 2 * yy) * 255 / (3 * 1023)).astype(np.uint8))
    for index in range(20):
        crops = []
        for size in (1024, 512, 256):
            box, flip = draw_train_box(train_rng(3, 1, index))
            crops.append(train_crop(fit_square(ramp, size), box, flip, 224).astype(int))
        assert np.abs(crops[0] - crops[1]).max() <= 3
        assert np.abs(crops[0] - crops[2]).max() <= 6


def test_train_crop_flip_and_scale():
    gray = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # left dark, right bright
    whole = train_crop(gray, (0, 0, 1, 1), False, 64)
    assert whole.shape == (64, 64) and whole[:, 0].mean() < whole[:, -1].mean()
    flipped = train_crop(gray, (0, 0, 1, 1), True, 64)
    assert np.array_equal(flipped, whole[:, ::-1])
    # The right half of the image, upsampled: only bright values.
    right = train_crop(gray, (0, 0.5, 1, 0.5), False, 64)
    assert right.min() >= 126


# ---- ten-crop geometry --------------------------------------------------------------------

def test_ten_crop_boxes_say_where_each_crop_came_from():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (256, 300), dtype=np.uint8)
    crops = crop_gray(gray, 224)
    for crop, (top, left, flipped) in zip(crops, ten_crop_boxes(256, 300, 224)):
        patch = gray[top:top + 224, left:left + 224]
        assert np.array_equal(crop, patch[:, ::-1] if flipped else patch)


# ---- epoch order and sharding -------------------------------------------------------------

def test_rank_indices_equal_distributed_sampler_batches():
    from fitting import epoch_order, rank_indices
    n, world, batch, seed, epoch = 103, 3, 4, 7, 2
    order = epoch_order(n, seed, epoch)
    for rank in range(world):
        sampler = torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=True,
                                                      seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        batches = list(torch.utils.data.DataLoader(list(sampler), batch_size=batch,
                                                   drop_last=True))
        expected = [int(i) for b in batches for i in b]
        assert rank_indices(order, 0, world, rank, batch) == expected


def test_resume_by_images_seen_with_another_world_size():
    """Stopped after 5 global batches of 2 x 4, resumed on 3 ranks of 5: every image of the
    epoch is used once, none twice."""
    from fitting import epoch_order, rank_indices
    n = 100
    order = epoch_order(n, 0, 0)
    first = [rank_indices(order, 0, 2, r, 4)[:5 * 4] for r in range(2)]
    seen = 5 * 2 * 4
    assert sorted(sum(first, [])) == sorted(order[:seen])
    rest = [rank_indices(order, seen, 3, r, 5) for r in range(3)]
    used = sum(first, []) + sum(rest, [])
    assert len(used) == len(set(used)) == seen + (n - seen) // 15 * 15


def test_learning_rate_scaling_and_warmup():
    from fitting import LearningRate
    from main import get_args
    args = get_args([])
    assert args.lr == 1e-4 and args.weight_decay == 1e-5 and args.patience == 5
    lr = LearningRate(args.lr, 128, 1000)  # 8 GPUs x 16
    assert lr.peak == pytest.approx(1e-4 * 8 ** 0.5) and lr.warmup == 500
    assert lr.at(0) == pytest.approx(1e-4 + (lr.peak - 1e-4) / 500)
    assert lr.at(499) == pytest.approx(lr.peak) and lr.at(500) is None
    assert LearningRate(args.lr, 128, 100).warmup == 100  # never longer than an epoch
    assert LearningRate(args.lr, 16, 1000).warmup == 0
    assert get_args(["--no-lr-scaling"]).no_lr_scaling
    off = LearningRate(args.lr, 128, 1000, scaling=False)  # what --no-lr-scaling runs
    assert off.peak == 1e-4 and off.warmup == 0
    chexnet = get_args(["--recipe", "chexnet"])
    assert chexnet.lr == 1e-3 and chexnet.crop_scale == 1.0 and chexnet.patience == 1
    assert get_args(["--recipe", "chexnet", "--lr", "3e-4"]).lr == 3e-4


# ---- decoding -------------------------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_clipped(nih_images, tmp_path):
    image_dir, _ = nih_images
    original = np.asarray(Image.open(sorted(image_dir.iterdir())[0]).convert("L"))
    path = tmp_path / "16bit.png"
    Image.fromarray(original.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert np.array_equal(np.asarray(load_gray(path)), original)
    # A 12-bit image stored in 16 bits keeps its contrast (scaled, not saturated).
    Image.fromarray(original.astype(np.uint16) * 16).save(path)
    decoded = np.asarray(load_gray(path)).astype(int)
    assert decoded.max() < 70 and np.corrcoef(decoded.ravel(), original.ravel())[0, 1] > 0.99


# ---- weights ------------------------------------------------------------------------------

def test_pre_041_files_load(tmp_path):
    import torchvision
    from model import build_model
    tv = torchvision.models.densenet121(weights=None)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(pre_041_state(tv), path, _use_new_zipfile_serialization=False)
    model = build_model(weights=path)
    assert torch.equal(model.features.conv0.weight, tv.features.conv0.weight)
    assert int(model.features.norm0.num_batches_tracked) == 0


def test_non_finite_weights_are_refused(tmp_path):
    from model import CheckpointError, build_model
    state = build_model(pretrained="none").state_dict()
    state["features.denseblock2.denselayer3.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="denselayer3.conv1.weight holds non-finite"):
        build_model(weights=tmp_path / "nan.pt")


def test_metrics_jsonl_is_strict_json(tmp_path):
    import json
    from checkpoint import write_metrics
    write_metrics(tmp_path, [{"epoch": 1, "val_mean_auc": float("nan"),
                              "val_auc": {"Hernia": float("nan"), "Mass": 0.5}}])
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text
    assert json.loads(text)["val_auc"] == {"Hernia": None, "Mass": 0.5}


def test_argument_errors_are_one_line():
    from common import ArgumentParser, positive_int
    p = ArgumentParser(prog="x.py")
    p.add_argument("--n", type=positive_int)
    err = io.StringIO()
    import contextlib
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    assert err.getvalue() == "error: argument --n: must be a positive integer, got '0' (see x.py --help)\n"

"""Class activation maps: the CAM identity in torch and in the exported OpenVINO models, the
ten-crop geometry, heatmap overlays in every mode, box parsing and scoring, and a model that
learned where a blob is localizes it far better than the baselines."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cam import (SHIPPED_BOXES, Tally, blend_jet, heatmap_boxes, iobb, iou, normalise,
                 read_boxes, score_boxes, tencrop_heatmap)
from conftest import BLOCK_TORCH, REPO, assert_clean_error, run_main, run_script
from images import crop_gray, eval_input
from labels import NIH_CLASSES, write_list
from model import WithCAM, build_model, with_sigmoid


def test_cam_mean_is_the_logit_in_torch():
    torch.manual_seed(0)
    for arch in ("densenet121", "resnet50"):
        model = build_model(arch, pretrained="none").eval()
        x = torch.randn(2, 3, 96, 96)  # any size: the identity holds on a 3x3 map as on 7x7
        with torch.no_grad():
            probs, maps = WithCAM(model)(x)
            logits = model(x)
        assert maps.shape == (2, 14, 3, 3)
        assert torch.allclose(maps.mean((2, 3)), logits, atol=1e-5)
        assert torch.allclose(probs, with_sigmoid(model)(x), atol=1e-6)


@pytest.mark.integration
def test_cam_output_of_the_exported_models(full_size_model, nih_dir):
    """FP32: the maps' mean is the logit of the probabilities it outputs; INT8 maps stay close
    to FP32's on real NIH images."""
    from backends import OpenVINOModel
    crops = np.concatenate([eval_input(nih_dir / "images" / n)
                            for n in ("00000100_000.png", "00001369_000.png")])
    out = {}
    for mode in ("fp32", "int8"):
        model = OpenVINOModel(full_size_model / "models" / f"chexnet_{mode}.xml", 224, len(crops), NIH_CLASSES)
        assert model.has_cams
        model.run_all([(0, crops)], lambda k, o, mode=mode: out.update({mode: o}), cams=True)
    probs, maps = out["fp32"]
    assert maps.shape == (20, 14, 7, 7)
    logits = np.log(probs / (1 - probs))
    assert np.abs(maps.mean((2, 3)) - logits).max() < 2e-4
    int8 = out["int8"][1]
    assert np.corrcoef(int8.ravel(), maps.ravel())[0, 1] > 0.98
    assert np.abs(int8 - maps).mean() < 0.1 * np.abs(maps).mean()


def test_ten_crop_maps_go_back_where_the_crops_came_from():
    """A smooth map known in image coordinates, cut into the ten crops (mirrored ones
    mirrored), each crop's map pooled to 7x7 as the network's stride does: put back, it is the
    map again (left and right never swapped)."""
    yy, xx = np.mgrid[:256, :300].astype(np.float32)
    truth = np.stack([xx / 300, np.exp(-((yy - 60) ** 2 + (xx - 220) ** 2) / 2000)])  # (2, H, W)
    crops = np.stack([crop_gray(t, 224) for t in truth], 1)  # (10, 2, 224, 224)
    pooled = crops.reshape(10, 2, 7, 32, 7, 32).mean((3, 5))
    back = tencrop_heatmap(pooled, (256, 300), 224)
    assert back.shape == (2, 256, 300)
    assert np.abs(back - truth).mean() < 0.02
    assert back[0, :, :40].mean() < 0.2 < 0.8 < back[0, :, -40:].mean()  # not mirrored
    peak = np.unravel_index(np.argmax(back[1]), back[1].shape)
    assert abs(peak[0] - 60) < 16 and abs(peak[1] - 220) < 16
    big = tencrop_heatmap(pooled, (256, 300), 224, (1024, 1200))
    assert big.shape == (2, 1024, 1200)


def test_ten_crop_maps_as_matrix_products_are_each_crop_resized_and_placed():
    """tencrop_heatmap (two matrix products) gives what resizing each crop's map with Pillow,
    mirroring, feathering and placing it does, for square and oblong images, 7x7 and 1x1 maps
    and a crop the size of the image."""
    from PIL import Image

    from cam import feather, resize_maps
    from images import ten_crop_boxes
    rng = np.random.default_rng(0)
    for (height, width), crop, (h, w), k in (((256, 300), 224, (7, 7), 3),
                                             ((300, 256), 224, (7, 7), 14),
                                             ((225, 301), 224, (7, 9), 2),
                                             ((64, 80), 56, (1, 1), 1), ((256, 256), 256, (8, 8), 2)):
        maps = rng.standard_normal((10, k, h, w)).astype(np.float32)
        total, weight = np.zeros((k, height, width)), np.zeros((height, width))
        for (top, left, flipped), cam in zip(ten_crop_boxes(height, width, crop), maps):
            window = np.outer(feather(top, crop, height), feather(left, crop, width))
            up = resize_maps(cam, (crop, crop), Image.BICUBIC)
            total[:, top:top + crop, left:left + crop] += (up[:, :, ::-1] if flipped else up) * window
            weight[top:top + crop, left:left + crop] += window
        heat = tencrop_heatmap(maps, (height, width), crop)
        assert heat.shape == (k, height, width) and heat.dtype == np.float32
        assert np.abs(heat - total / weight).max() < 1e-6 * np.abs(total / weight).max()


def test_ten_crop_maps_leave_no_gap_in_an_oblong_image():
    """An image over 1.75 times as long as wide has pixels no crop saw: they take the value of
    the nearest pixel a crop saw (never NaN, which would blank the overlay); so do those
    between the crops of an image 4 crops long, and of one where the crop is under half the
    shorter side."""
    maps = np.random.default_rng(0).standard_normal((10, 2, 7, 7)).astype(np.float32)
    heat = tencrop_heatmap(maps, (256, 640), 224)
    assert np.isfinite(heat).all()
    # rows 0-15 of columns 224-415: above the centre crop, between the corner crops
    assert np.array_equal(heat[:, :16, 320], np.repeat(heat[:, 16:17, 320], 16, 1))
    assert np.array_equal(heat[:, 0, 225], heat[:, 0, 223])
    long = tencrop_heatmap(maps, (1000, 256), 224)  # rows 224-387, 612-775: between crops
    assert np.isfinite(long).all()
    assert np.array_equal(long[:, 224:306], np.repeat(long[:, 223:224], 82, 1))
    assert np.array_equal(long[:, 306:388, 16:240], np.repeat(long[:, 388:389, 16:240], 82, 1))
    wide = tencrop_heatmap(maps, (700, 700), 224)  # whole rows and columns no crop saw
    assert np.isfinite(wide).all()


def test_the_node_s_overlay_scales_colours_not_floats():
    """registered_overlay of the 256x256 map (its colour-map entries scaled to the X-ray's
    1024x1024, as the node draws it) is the overlay of the map scaled first, within a few levels
    of 255, with the title band on top."""
    from cam import registered_overlay, resize_maps
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    maps = rng.standard_normal((10, 1, 7, 7)).astype(np.float32) + np.linspace(
        -2, 2, 49, dtype=np.float32).reshape(7, 7)
    heat = tencrop_heatmap(maps, (256, 256), 224)[0]
    small = registered_overlay(gray, heat, "Effusion p = 0.5 RESEARCH USE ONLY")
    full = registered_overlay(gray, resize_maps(heat[None], gray.shape)[0], "Effusion p = 0.5 "
                              "RESEARCH USE ONLY")
    assert small.shape == full.shape == (1024, 1024, 3) and small.dtype == np.uint8
    diff = np.abs(small.astype(int) - full)
    assert diff.max() <= 8 and diff.mean() < 0.5
    band = small[:30]
    assert band.max() == 255 and np.median(band) == 0  # white title on black
    # a source under 256 pixels: its map is scaled down as floats (binned first, peaks would
    # average away)
    tiny = gray[:100, :90]
    assert np.array_equal(registered_overlay(tiny, heat, "t"),
                          registered_overlay(tiny, resize_maps(heat[None], (100, 90))[0], "t"))


def test_the_node_s_overlay_lookup_is_the_colour_map_blend():
    """blend_jet (a table per grey level and colour-map entry) gives the bytes of blending
    matplotlib's jet colours of the normalised map over the X-ray, for float32 and float64
    maps, a constant map and one of tiny range."""
    from matplotlib import colormaps
    rng = np.random.default_rng(0)
    for shape in ((600, 900), (7, 5), (1, 1)):
        gray = rng.integers(0, 256, shape, dtype=np.uint8)
        for heat in (rng.random(shape).astype(np.float32), rng.random(shape),
                     np.zeros(shape, np.float32), (rng.random(shape) * 1e-4).astype(np.float32)):
            colour = colormaps["jet"](normalise(heat))[..., :3]
            base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
            blend = ((0.6 * base + 0.4 * colour) * 255).clip(0, 255).astype(np.uint8)
            assert np.array_equal(blend_jet(gray, heat), blend)


def test_boxes_from_heatmaps_and_their_scores():
    heat = np.zeros((100, 100), np.float32)
    heat[10:30, 20:60] = 1.0
    heat[70:80, 70:90] = 0.6
    assert sorted(heatmap_boxes(heat, 0.5)) == [(20, 10, 40, 20), (70, 70, 20, 10)]
    assert heatmap_boxes(heat, 0.9) == [(20, 10, 40, 20)]
    assert iobb((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(0.5)
    assert iobb((0, 0, 10, 10), (0, 0, 100, 100)) == 1.0  # inside the truth: IoBB 1, IoU small
    assert iou((0, 0, 10, 10), (0, 0, 100, 100)) == pytest.approx(0.01)
    found, false = score_boxes([(0, 0, 10, 10), (50, 50, 5, 5)], [(0, 0, 20, 20)])
    assert found["iobb"][:, 0].tolist() == [True] * 5  # IoBB 1 beats every T
    assert found["iou"][:, 0].tolist() == [True, True, False, False, False, False, False]
    assert false["iobb"].tolist() == [1] * 5  # the second box matches nothing
    tally = Tally()
    tally.add("Mass", heat, [(20, 10, 40, 20)], 1.0)
    table = tally.table(0.5)
    assert table["Mass"]["pointing"] == 1.0 and table["Mass"]["iobb"]["0.5"][0] == 1.0


def test_nih_box_file_parses():
    boxes = read_boxes(SHIPPED_BOXES)
    assert len(boxes) == 880
    assert sum(len(b) for image in boxes.values() for b in image.values()) == 984
    assert {d for image in boxes.values() for d in image} == {
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
        "Pneumonia", "Pneumothorax"}  # 'Infiltrate' in the file


@pytest.mark.parametrize("text,fragment", [
    ("Image Index,Finding Label\nx.png,Mass\n", "not a box file"),
    ("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Mass,1,2,3\n", ":2: expected an image"),
    ("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Flu,1,2,3,4\n", ":2: unknown disease 'Flu'"),
    ("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Mass,1,2,-3,4\n", "is not a box"),
])
def test_bad_box_files(tmp_path, text, fragment):
    from common import DataError
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        read_boxes(tmp_path / "b.csv")


@pytest.mark.integration
def test_heatmaps_of_an_image_in_every_mode(full_size_model, nih_dir, tmp_path):
    """--cam on a full-size NIH image: overlays the size of the original, in each mode; the
    OpenVINO ones with torch unimportable."""
    image = nih_dir / "images" / "00001369_000.png"
    for mode, python in (("torch", ()), ("fp32", ("-c", BLOCK_TORCH)), ("int8", ("-c", BLOCK_TORCH))):
        out = tmp_path / mode
        proc = run_script(*python, "infer.py", "--mode", mode, "--model-dir",
                          full_size_model / "models", "--checkpoint", full_size_model / "random.pt",
                          "--image", image, "--cam", out)
        assert proc.returncode == 0, proc.stderr
        overlays = sorted(out.glob("00001369_000_*.png"))
        assert len(overlays) == 4  # the 3 likeliest (no thresholds yet) and the grid
        for path in overlays:
            with Image.open(path) as im:
                assert im.format == "PNG"
                if not path.name.endswith("_all.png"):  # the X-ray and the overlay, each
                    assert im.size[0] > 2 * 1024 and im.size[1] > 1024  # at full resolution


@pytest.mark.integration
def test_grad_cam_plus_plus(small_model, nih_dir, tmp_path, capsys):
    image = REPO / "sample" / "images" / "00000284_000.png"
    proc = run_main(capsys, "--mode", "torch", "--checkpoint", small_model[0] / "run" / "best.pt",
                    "--model-dir", small_model[0] / "models", "--image", image, "--cam", tmp_path,
                    "--cam-method", "gradcam++", module="infer")
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("00000284_000_*.png"))) == 4
    overlay = next(p for p in tmp_path.glob("00000284_000_*.png") if not p.stem.endswith("_all"))
    with Image.open(overlay) as im:  # the 256x256 X-ray and its overlay, each enlarged to 512
        assert im.size[0] > 2 * 512 and im.size[1] > 512
    assert "Grad-CAM++: 14/14 classes" in proc.stderr  # progress, not minutes of silence


def blob_data_dir(root, n_train=96, n_val=48, n_test=48, size=128, seed=0):
    """Images whose only label, Atelectasis, is a bright disc at a random place; the box file
    holds the discs of the val and test images (the model never sees a box), in NIH's frame:
    the released 1024x1024 image, of which these are resized copies."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    names, labels, rows = [], np.zeros((n_train + n_val + n_test, 14), np.uint8), []
    for i in range(len(labels)):
        img = rng.normal(90, 20, (size, size))
        name = f"{i:08d}_000.png"
        if i % 2:
            labels[i, 0] = 1
            r = rng.uniform(14, 20)
            cx, cy = rng.uniform(r, size - r, 2)
            img += 110 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
            if i >= n_train:
                x, y, w = (v * 1024 / size for v in (cx - r, cy - r, 2 * r))
                rows.append(f"{name},Atelectasis,{x:.1f},{y:.1f},{w:.1f},{w:.1f}")
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name)
        names.append(name)
    a, b = n_train, n_train + n_val
    write_list(root / "train_list.txt", names[:a], labels[:a])
    write_list(root / "val_list.txt", names[a:b], labels[a:b])
    write_list(root / "test_list.txt", names[b:], labels[b:])
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                              + "\n".join(rows) + "\n")
    return root


@pytest.mark.integration
def test_a_model_that_learned_the_blob_localizes_it(tmp_path, capsys):
    data = blob_data_dir(tmp_path / "blobs")
    size = ["--resize", "128", "--crop-size", "128"]
    trained = run_main(capsys, "--data-dir", data, "--pretrained", "none", *size,
                       "--train-size", "128", "--crop-scale", "0.6", "--batch-size", "16",
                       "--lr", "1e-3", "--workers", "0", "--epochs", "3", "--out-dir", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    proc = run_main(capsys, "--mode", "torch", "--checkpoint", tmp_path / "run" / "best.pt",
                    "--data-dir", data, *size, "--localize", "--model-dir", tmp_path / "m",
                    module="infer")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m" / "localization_torch.json").read_text())
    test = {m: r["test"]["overall"] for m, r in result["methods"].items()}
    assert test["model"]["boxes"] == 24
    assert test["model"]["pointing"] >= test["random"]["pointing"] + 0.4, proc.stdout
    assert test["model"]["pointing"] >= test["centre"]["pointing"] + 0.3, proc.stdout
    for measure, t in (("iou", "0.1"), ("iou", "0.3")):
        assert test["model"][measure][t][0] >= test["random"][measure][t][0] + 0.25, proc.stdout
        assert test["model"][measure][t][0] >= test["centre"][measure][t][0] + 0.25, proc.stdout
    assert "CXR8 0.1" in proc.stdout and "random" in proc.stdout


@pytest.mark.integration
def test_localization_bad_input(tmp_path, capsys, small_model):
    data = blob_data_dir(tmp_path / "blobs", n_train=4, n_val=4, n_test=4, size=64)
    args = ["--mode", "torch", "--checkpoint", small_model[0] / "run" / "best.pt", "--data-dir",
            data, "--localize", "--model-dir", tmp_path / "m"]
    boxes = data / "BBox_List_2017.csv"
    rows = boxes.read_text().splitlines()
    boxes.write_text("\n".join(rows[:1] + [rows[1].rsplit(",", 1)[0]] + rows[2:]) + "\n")
    assert_clean_error(run_main(capsys, *args, module="infer"), "BBox_List_2017.csv:2",
                       "an image, a disease and 4 numbers")
    boxes.write_text("\n".join(rows[:1] + [",".join(rows[1].split(",")[:2] + ["1000", "1000", "60", "60"])] + rows[2:]) + "\n")
    assert_clean_error(run_main(capsys, *args, module="infer"), "is outside the 64x64 image")
    boxes.write_text(rows[0] + "\n" + "\n".join(r for r in rows[1:] if int(r[:8]) >= 8) + "\n")
    assert_clean_error(run_main(capsys, *args, module="infer"), "val_list.txt: none of its images has a box")

"""Edge inference and evaluation: infer.sh exports OpenVINO FP32 and INT8 (calibrated and
checked on disjoint val images); infer.py evaluates torch (batched, under torchrun too), fp32
and int8 on real NIH images, from PNGs or the store, in resumable chunks; the OpenVINO path
runs without torch."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import BLOCK_TORCH, REPO, assert_clean_error, run_main, run_script
from images import eval_input
from labels import NIH_CLASSES, read_list
from model import build_model



def read_csv(path):
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["Image Index", *NIH_CLASSES]
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


@pytest.mark.integration
def test_infer_sh_writes_fp32_int8_and_a_manifest(small_model, nih_dir):
    work, export = small_model
    models = work / "models"
    for name in ("chexnet_fp32", "chexnet_int8"):
        assert (models / f"{name}.xml").is_file() and (models / f"{name}.bin").is_file()
    assert "60 val images for calibration" in export.stdout
    assert ("INT8 vs FP32 on 40 held-out val images (the val images not calibrated on; ten "
            "crops of 56 from images resized to 64): mean AUC") in export.stdout
    xml = (models / "chexnet_fp32.xml").read_text()
    assert 'element_type="f16"' not in xml  # FP32 weights, not compressed to FP16
    params = sum(p.numel() for p in build_model(pretrained="none").parameters())
    assert (models / "chexnet_fp32.bin").stat().st_size >= 4 * params * 0.99
    assert (models / "chexnet_int8.bin").stat().st_size < (models / "chexnet_fp32.bin").stat().st_size / 2
    meta = json.loads((models / "chexnet.json").read_text())
    assert meta["calibration"]["images"] == 60 and meta["calibration"]["held_out_images"] == 40
    assert set(meta["files"]) == {"chexnet_fp32.xml", "chexnet_fp32.bin", "chexnet_int8.xml",
                                  "chexnet_int8.bin"}
    assert not list(models.glob(".export-*"))


@pytest.mark.integration
def test_fp32_matches_pytorch_and_int8_stays_close(full_size_model, nih_dir):
    from backends import OpenVINOModel, TorchModel
    names = read_list(nih_dir / "test_list.txt")[0]
    rgba = "00000100_000.png"  # an RGBA original
    crops = np.concatenate([eval_input(nih_dir / "images" / n) for n in (names[0], names[1], rgba)])
    reference = TorchModel(full_size_model / "random.pt")(crops)
    fp32 = OpenVINOModel(full_size_model / "models" / "chexnet_fp32.xml", 224, len(crops), NIH_CLASSES)
    int8 = OpenVINOModel(full_size_model / "models" / "chexnet_int8.xml", 224, len(crops), NIH_CLASSES)
    results = {}
    for label, model in (("fp32", fp32), ("int8", int8)):
        model.run_all([(0, crops)], lambda key, out, label=label: results.update({label: out}))
    assert results["fp32"].shape == reference.shape == (30, 14)
    assert np.abs(results["fp32"] - reference).max() < 1e-4
    assert np.abs(results["int8"] - results["fp32"]).max() < 0.02


def _run_infer(mode, small_model, nih_dir, *extra, python=(), figures=False):
    work, _ = small_model
    return run_script(*python, "infer.py", "--mode", mode, "--model-dir", work / "models",
                      "--data-dir", nih_dir, *extra, *([] if figures else ["--no-figures"]))


def _mean_auc(stdout):
    return float(next(ln for ln in stdout.splitlines() if ln.startswith("mean")).split()[1])


@pytest.mark.integration
def test_int8_keeps_auc_and_reports_with_operating_points_from_val(small_model, nih_dir):
    """fp32 and int8 on the 340 test images; int8 first on val, which chooses the operating
    points that the test report then applies unchanged."""
    models = small_model[0] / "models"
    val = _run_infer("int8", small_model, nih_dir, "--part", "val", "--n-boot", "200")
    assert val.returncode == 0, val.stderr
    assert "operating points (thresholds by rule, Platt calibration) chosen on these 100 val" in val.stdout
    points = json.loads((models / "operating_points.json").read_text())["int8"]
    assert points["chosen_on"] == str(nih_dir / "val_list.txt") and points["images"] == 100
    fp32 = _run_infer("fp32", small_model, nih_dir, "--n-boot", "200")
    int8 = _run_infer("int8", small_model, nih_dir, "--n-boot", "200", figures=True)
    assert fp32.returncode == 0 and int8.returncode == 0, fp32.stderr + int8.stderr
    assert abs(_mean_auc(fp32.stdout) - _mean_auc(int8.stdout)) < 0.01
    for out in (fp32, int8):
        assert "340 test images" in out.stdout and "images/s" in out.stdout and "95% CI" in out.stdout
        assert "predicted 340/340 images" in out.stderr and "ETA" in out.stderr  # not a tty
        for disease in NIH_CLASSES:
            assert disease in out.stdout
    assert "no operating points for --mode fp32" in fp32.stdout
    names, probs = read_csv(models / "predictions_int8.csv")
    assert names == read_list(nih_dir / "test_list.txt")[0]
    assert probs.shape == (340, 14) and (probs >= 0).all() and (probs <= 1).all()
    assert not list(models.glob("*.partial"))
    # The test report applies val's thresholds: not the ones test itself would choose.
    from metrics import choose_thresholds
    report = json.loads((models / "predictions_int8_report.json").read_text())
    labels = read_list(nih_dir / "test_list.txt")[1]
    on_test = choose_thresholds(labels, probs)["youden"]
    used = [report["diseases"][d]["thresholds"]["youden"]["threshold"] for d in NIH_CLASSES]
    assert used == points["thresholds"]["youden"]
    assert any(abs(u - t) > 1e-3 for u, t in zip(used, on_test) if u is not None)
    for d, name in enumerate(NIH_CLASSES):  # sensitivity and specificity: a direct count
        t = report["diseases"][name]["thresholds"]["youden"]
        positive = probs[:, d] >= np.float64(t["threshold"]) - 5e-7  # float32 rounding of the thresholds
        if t["sensitivity"][0] is not None:
            assert t["sensitivity"][0] == pytest.approx(positive[labels[:, d] == 1].mean(), abs=0.02)
            assert t["specificity"][0] == pytest.approx((~positive)[labels[:, d] == 0].mean(), abs=0.02)
    assert "| Disease | Prevalence (positives) | AUROC (95% CI) |" in (models / "predictions_int8_report.md").read_text()
    from PIL import Image
    for figure in ("roc", "pr", "reliability"):
        with Image.open(models / f"predictions_int8_{figure}.png") as im:
            assert im.format == "PNG" and im.size[0] > 800


@pytest.mark.system
def test_torch_batched_equals_one_image_path_and_torchrun(small_model, nih_dir, tmp_path):
    """Batched through loader workers, and under torchrun with 2 processes on an odd number of
    images: the one-image CPU path's probabilities (to 2e-6: float summation order), each image once, in list order."""
    from backends import TorchModel
    work, _ = small_model
    checkpoint = work / "run" / "best.pt"
    args = ["--checkpoint", checkpoint, "--limit", "7"]  # sizes: the checkpoint's own, 64 and 56
    batched = _run_infer("torch", small_model, nih_dir, *args, "--workers", "2",
                         "--batch-size", "3", "--out-csv", tmp_path / "batched.csv")
    assert batched.returncode == 0, batched.stderr
    names, probs = read_csv(tmp_path / "batched.csv")
    one = TorchModel(checkpoint)
    expected = np.stack([one(eval_input(nih_dir / "images" / n, 64, 56)).mean(0) for n in names])
    assert names == read_list(nih_dir / "test_list.txt")[0][:7]
    assert np.abs(probs - expected).max() <= 2e-6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "infer.py", "--mode", "torch", "--model-dir", work / "models", "--data-dir", nih_dir,
           "--no-figures",
           *args, "--workers", "1", "--batch-size", "2", "--out-csv", tmp_path / "ddp.csv"]
    ddp = subprocess.run(list(map(str, cmd)), cwd=REPO, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("mode torch: 7 test images") == 1  # rank 0 alone reports
    ddp_names, ddp_probs = read_csv(tmp_path / "ddp.csv")
    assert ddp_names == names and np.abs(ddp_probs - probs).max() <= 2e-6


@pytest.mark.system
def test_killed_evaluation_resumes_to_the_same_csv(small_model, nih_dir, tmp_path):
    work, _ = small_model
    common = ["--limit", "60", "--chunk-size", "6", "--workers", "1"]
    whole = _run_infer("int8", small_model, nih_dir, *common, "--out-csv", tmp_path / "whole.csv")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed.csv"
    cmd = [sys.executable, "infer.py", "--mode", "int8", "--model-dir", work / "models",
           "--data-dir", nih_dir, *common, "--no-figures", "--out-csv", out]
    job = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed.csv.partial"
    deadline = time.time() + 120
    while len(list(partial.glob("chunk-*.npz"))) < 3:
        assert job.poll() is None and time.time() < deadline, "no chunks appeared"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert 3 <= done < 10 and not out.exists()
    again = _run_infer("int8", small_model, nih_dir, *common, "--out-csv", out)
    assert again.returncode == 0, again.stderr
    assert f"continuing after {6 * done} images already predicted" in again.stdout
    assert "predicted 60/60 images" in again.stderr
    assert f"{60 - 6 * done} images predicted now" in again.stdout  # the rest, not all again
    assert out.read_text() == (tmp_path / "whole.csv").read_text() and not partial.exists()
    # A different list never mixes with old chunks.
    job = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    while len(list(partial.glob("chunk-*.npz"))) < 2:
        assert job.poll() is None, "no chunks appeared"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    other = _run_infer("int8", small_model, nih_dir, "--limit", "12", "--chunk-size", "6",
                       "--out-csv", out)
    assert other.returncode == 0, other.stderr
    assert "starting afresh" in other.stdout and "12 test images" in other.stdout


@pytest.mark.integration
def test_store_fed_evaluation_equals_png_fed(small_model, nih_dir, tmp_path):
    from store import prepare_store
    prepare_store(nih_dir, (64,), workers=2, progress=False)
    try:
        from_png = _run_infer("fp32", small_model, nih_dir, "--limit", "30", "--no-store",
                              "--out-csv", tmp_path / "png.csv")
        from_store = _run_infer("fp32", small_model, nih_dir, "--limit", "30",
                                "--out-csv", tmp_path / "store.csv")
        assert from_png.returncode == 0 and from_store.returncode == 0, from_store.stderr
        assert "preprocessed store" in from_store.stdout and "preprocessed" not in from_png.stdout
        assert (tmp_path / "png.csv").read_text() == (tmp_path / "store.csv").read_text()
    finally:
        import shutil
        shutil.rmtree(nih_dir / "store")


@pytest.mark.integration
def test_int8_runs_without_torch(small_model, nih_dir):
    proc = _run_infer("int8", small_model, nih_dir, "--limit", "40", python=("-c", BLOCK_TORCH),
                      figures=True)
    assert proc.returncode == 0, proc.stderr
    assert "mean" in proc.stdout
    blocked = _run_infer("torch", small_model, nih_dir, "--limit", "4", python=("-c", BLOCK_TORCH))
    assert_clean_error(blocked, "--mode torch needs PyTorch")


@pytest.mark.integration
def test_image_mode_prints_sorted_probabilities_and_decisions(small_model, nih_dir):
    images = [nih_dir / "images" / "00000100_000.png", REPO / "sample" / "images" / "00000284_000.png"]
    proc = _run_infer("fp32", small_model, nih_dir, "--image", *images)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split(":\n")
    assert len(blocks) == 3
    values = [float(ln.split()[1]) for ln in blocks[1].splitlines()[:14]]
    assert len(values) == 14 and values == sorted(values, reverse=True)
    assert "positive" not in proc.stdout and "--part val" in proc.stdout
    val = _run_infer("fp32", small_model, nih_dir, "--part", "val", "--limit", "60", "--n-boot", "100")
    assert val.returncode == 0, val.stderr
    proc = _run_infer("fp32", small_model, nih_dir, "--image", *images, "--rule", "f1")
    lines = proc.stdout.split(":\n")[1].splitlines()[:14]
    assert all(("positive (threshold" in ln) != ("negative (threshold" in ln) for ln in lines)
    assert ("thresholds: f1 rule (the threshold with the largest F1; --rule chooses another), "
            "chosen on 60 val images") in proc.stdout
    # 60 val images of the sample: every class has fewer than 10 positives, and it says so
    note = next(ln for ln in proc.stdout.splitlines() if ln.startswith("note: fewer than 10"))
    assert note.endswith(": those decisions are rough") and "Hernia (" in note


@pytest.mark.integration
def test_accuracy_controlled_quantization_validates_on_other_images(small_model, nih_dir, tmp_path):
    work, _ = small_model
    proc = subprocess.run(
        ["bash", "infer.sh", work / "run" / "best.pt", "--model-dir", tmp_path / "models",
         "--data-dir", nih_dir, "--calibration-size", "30", "--validation-size", "30",
         "--max-auc-drop", "0.5"],  # validated once: no layer reverted
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Accuracy drop" in proc.stdout + proc.stderr  # NNCF validated the quantized model
    meta = json.loads((tmp_path / "models" / "chexnet.json").read_text())
    assert meta["calibration"]["images"] == 30 and meta["calibration"]["held_out_images"] == 30
    assert meta["calibration"]["max_auc_drop"] == 0.5


@pytest.mark.integration
def test_device_errors(small_model, nih_dir, capsys):
    if not torch.cuda.is_available():
        assert_clean_error(run_main(capsys, "--mode", "torch", "--device", "cuda", "--checkpoint",
                                    small_model[0] / "run" / "best.pt", "--data-dir", nih_dir,
                                    module="infer"), "--device cuda", "no CUDA GPU")
    assert_clean_error(run_main(capsys, "--mode", "torch", "--hpu", "--checkpoint",
                                small_model[0] / "run" / "best.pt", "--data-dir", nih_dir,
                                module="infer"), "--hpu", "habana_frameworks")
    assert_clean_error(run_main(capsys, "--mode", "int8", "--device", "cuda", module="infer"),
                       "--device", "--mode torch")


SIGNAL_PROBE = """
import gc, signal, subprocess, sys
sys.path.insert(0, {repo!r})
import numpy as np, openvino as ov
from openvino import opset13 as ops
from backends import OpenVINOModel
x = ops.parameter([-1, 3, 8, 8], np.float32)
weights = ops.constant(np.ones((2, 3, 8, 8), np.float32) / 192)
logits = ops.reshape(ops.convolution(x, weights, [1, 1], [0, 0], [0, 0], [1, 1]), [-1, 2], False)
ov.save_model(ov.Model([ops.sigmoid(logits)], [x]), {xml!r}, compress_to_fp16=False)
first = OpenVINOModel({xml!r}, 8, 10, ["a", "b"])
second = OpenVINOModel({xml!r}, 8, 10, ["a", "b"])
del first; gc.collect()  # released before the later one, as a garbage collector may
del second; gc.collect()
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader sets for its workers
subprocess.run(["true"])
print("alive")
"""


@pytest.mark.integration
def test_models_released_in_any_order_leave_signal_handling_working(tmp_path):
    """Two models loaded and released, the first first, then a signal with a Python handler
    arrives (a child exiting under torch's SIGCHLD handler; Ctrl-C): the process lives. With a
    Core per model, OpenVINO's CPU plugin left a freed alternate signal stack installed and the
    process died of SIGSEGV (the whole suite did, in CI)."""
    probe = tmp_path / "probe.py"
    probe.write_text(SIGNAL_PROBE.format(repo=str(REPO), xml=str(tmp_path / "tiny.xml")))
    proc = run_script(probe)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", (proc.returncode, proc.stderr)

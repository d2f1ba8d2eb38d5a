"""Edge inference: infer.sh exports OpenVINO FP32 and INT8; infer.py evaluates torch, fp32 and
int8 on real NIH images; the OpenVINO path runs without torch; bad inputs."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, assert_clean_error, run_script
from dataset import CLASS_NAMES, eval_input, read_label_table, read_list, write_list
from model import build_model


@pytest.fixture(scope="module")
def nih_dir(tmp_path_factory, nih_images):
    """The 480 full-size NIH images (linked, not copied): val = first 100, test = the rest."""
    image_dir, table = nih_images
    root = tmp_path_factory.mktemp("nih")
    os.symlink(image_dir, root / "images")
    names, _, labels = read_label_table(table)
    (root / "Data_Entry_2017_v2020.csv").write_bytes(table.read_bytes())
    write_list(root / "train_list.txt", names[:100], labels[:100])
    write_list(root / "val_list.txt", names[:100], labels[:100])
    write_list(root / "test_list.txt", names[100:], labels[100:])
    return root


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, nih_dir):
    """A small model trained briefly on 56x56 crops, exported by infer.sh."""
    work = tmp_path_factory.mktemp("small")
    proc = run_script("main.py", "--data-dir", REPO / "sample", "--pretrained", "none",
                      "--resize", "64", "--crop-size", "56", "--batch-size", "8", "--workers", "0",
                      "--epochs", "2", "--out-dir", work / "run")
    assert proc.returncode == 0, proc.stderr
    export = subprocess.run(
        ["bash", "infer.sh", work / "run" / "best.pt", "--model-dir", work / "models",
         "--data-dir", nih_dir, "--calibration-size", "100"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert export.returncode == 0, export.stdout + export.stderr
    return work, export


@pytest.fixture(scope="module")
def full_size_model(tmp_path_factory, nih_dir):
    """A random DenseNet-121 at the real 224x224, exported (calibrated on 4 val images)."""
    work = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    torch.save(build_model(pretrained="none").state_dict(), work / "random.pt")
    proc = run_script("infer.py", "--export", "--checkpoint", work / "random.pt", "--model-dir",
                      work / "models", "--data-dir", nih_dir, "--calibration-size", "4")
    assert proc.returncode == 0, proc.stderr
    return work


def test_infer_sh_writes_fp32_and_int8(small_model):
    work, export = small_model
    models = work / "models"
    for name in ("chexnet_fp32", "chexnet_int8"):
        assert (models / f"{name}.xml").is_file() and (models / f"{name}.bin").is_file()
    assert "wrote" in export.stdout and "MB) in" in export.stdout and "100 val images" in export.stdout
    xml = (models / "chexnet_fp32.xml").read_text()
    assert 'element_type="f16"' not in xml  # FP32 weights, not compressed to FP16
    params = sum(p.numel() for p in build_model(pretrained="none").parameters())
    assert (models / "chexnet_fp32.bin").stat().st_size >= 4 * params * 0.99
    assert (models / "chexnet_int8.bin").stat().st_size < (models / "chexnet_fp32.bin").stat().st_size / 2
    assert "FakeQuantize" in (models / "chexnet_int8.xml").read_text() or "i8" in (
        models / "chexnet_int8.xml").read_text()


def test_fp32_matches_pytorch_and_int8_stays_close(full_size_model, nih_dir):
    from infer import OpenVINOModel, TorchModel
    names = read_list(nih_dir / "test_list.txt")[0]
    rgba = "00000100_000.png"  # an RGBA original
    crops = np.concatenate([eval_input(nih_dir / "images" / n) for n in (names[0], names[1], rgba)])
    reference = TorchModel(full_size_model / "random.pt")(crops)
    fp32 = OpenVINOModel(full_size_model / "models" / "chexnet_fp32.xml", 224, len(crops))
    int8 = OpenVINOModel(full_size_model / "models" / "chexnet_int8.xml", 224, len(crops))
    results = {}
    for label, model in (("fp32", fp32), ("int8", int8)):
        model.run_all([(0, crops)], lambda key, out, label=label: results.update({label: out}))
    assert results["fp32"].shape == reference.shape == (30, 14)
    assert np.abs(results["fp32"] - reference).max() < 1e-4
    assert np.abs(results["int8"] - results["fp32"]).max() < 0.02


def _run_infer(mode, small_model, nih_dir, *extra, python=()):
    work, _ = small_model
    return run_script(*python, "infer.py", "--mode", mode, "--model-dir", work / "models",
                      "--data-dir", nih_dir, *extra)


def _mean_auc(stdout):
    return float(next(ln for ln in stdout.splitlines() if ln.startswith("mean")).split()[1])


def test_int8_keeps_auc_and_writes_predictions(small_model, nih_dir):
    fp32 = _run_infer("fp32", small_model, nih_dir)
    int8 = _run_infer("int8", small_model, nih_dir)
    assert fp32.returncode == 0 and int8.returncode == 0, fp32.stderr + int8.stderr
    assert abs(_mean_auc(fp32.stdout) - _mean_auc(int8.stdout)) < 0.01
    for line in (fp32.stdout, int8.stdout):
        assert "380 test images" in line and "images/s" in line and "crops/s" in line
        for disease in CLASS_NAMES:
            assert disease in line
    rows = list(csv.reader(open(small_model[0] / "models" / "predictions_int8.csv")))
    assert rows[0] == ["Image Index", *CLASS_NAMES]
    assert [r[0] for r in rows[1:]] == read_list(nih_dir / "test_list.txt")[0]
    probs = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert probs.shape == (380, 14) and (probs >= 0).all() and (probs <= 1).all()


def test_torch_mode_and_limit(small_model, nih_dir):
    proc = _run_infer("torch", small_model, nih_dir, "--limit", "20")
    assert proc.returncode == 0, proc.stderr
    assert "20 test images" in proc.stdout and "n/a" in proc.stdout  # single-class diseases


# `python -c CODE infer.py ARGS`: `import torch` made to fail, then infer.py run as a script.
BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path("infer.py", run_name="__main__")
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "nncf")]
"""


def test_int8_runs_without_torch(small_model, nih_dir):
    proc = _run_infer("int8", small_model, nih_dir, "--limit", "40", python=("-c", BLOCK_TORCH))
    assert proc.returncode == 0, proc.stderr
    assert "mean" in proc.stdout
    blocked = _run_infer("torch", small_model, nih_dir, "--limit", "4", python=("-c", BLOCK_TORCH))
    assert_clean_error(blocked, "--mode torch needs PyTorch")


def test_image_mode_prints_sorted_probabilities(small_model, nih_dir):
    images = [nih_dir / "images" / "00000100_000.png", REPO / "sample" / "images" / "00000284_000.png"]
    proc = _run_infer("int8", small_model, nih_dir, "--image", *images)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split(":\n")
    assert len(blocks) == 3
    values = [float(ln.split()[-1]) for ln in blocks[1].splitlines()[:14]]
    assert len(values) == 14 and values == sorted(values, reverse=True)


def test_accuracy_controlled_quantization(small_model, nih_dir, tmp_path):
    work, _ = small_model
    proc = subprocess.run(
        ["bash", "infer.sh", work / "run" / "best.pt", "--model-dir", tmp_path / "models",
         "--data-dir", nih_dir, "--calibration-size", "40", "--max-auc-drop", "0.01"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Accuracy drop" in proc.stdout + proc.stderr  # NNCF validated the quantized model
    meta = json.loads((tmp_path / "models" / "chexnet.json").read_text())
    assert meta["calibration"] == {"split": str(nih_dir / "val_list.txt"), "images": 40,
                                   "max_auc_drop": 0.01}
    assert (tmp_path / "models" / "chexnet_int8.xml").is_file()


def test_bad_inputs(small_model, nih_dir, tmp_path):
    work, _ = small_model
    proc = run_script("infer.py", "--mode", "int8", "--model-dir", tmp_path / "none",
                      "--data-dir", nih_dir)
    assert_clean_error(proc, "chexnet_int8.xml not found", "infer.sh")
    proc = _run_infer("fp32", small_model, nih_dir, "--crop-size", "224", "--limit", "2")
    assert_clean_error(proc, "chexnet_fp32.xml", "does not take 3x224x224")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_clean_error(_run_infer("fp32", small_model, nih_dir, "--image", bad), str(bad),
                       "unreadable image")
    # A model with the wrong number of classes.
    import openvino as ov
    wrong = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 15))
    ov_model = ov.convert_model(wrong, example_input=torch.zeros(1, 3, 56, 56),
                                input=[(-1, 3, 56, 56)])
    (tmp_path / "m").mkdir()
    ov.save_model(ov_model, tmp_path / "m" / "chexnet_fp32.xml")
    proc = run_script("infer.py", "--mode", "fp32", "--model-dir", tmp_path / "m",
                      "--data-dir", nih_dir, "--crop-size", "56", "--resize", "64")
    assert_clean_error(proc, "outputs 15", "expected 14 classes")
    proc = subprocess.run(["bash", "infer.sh", tmp_path / "missing.pt"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert_clean_error(proc, "missing.pt", "not found")

"""Training: one process, DDP with torchrun on CPU (gloo), resume, fault tolerance, learning,
checkpoint formats and device errors. Small images and few steps: the same code as a real run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from conftest import REPO, assert_clean_error, run_script
from dataset import CLASS_NAMES, write_list
from model import build_model, load_file, with_sigmoid

# Small and fast: 64x64 resize, 56x56 crops, random init, no loader workers.
TINY = ["--data-dir", REPO / "sample", "--pretrained", "none", "--resize", "64",
        "--crop-size", "56", "--batch-size", "8", "--workers", "0"]


def torchrun(*args, nproc=2, extra=(), env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *extra, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def weights(path):
    return load_file(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_one_process_run_writes_checkpoints_and_metrics(tmp_path):
    proc = run_script("main.py", *TINY, "--epochs", "2", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {"last.pt", "best.pt", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "val_loss", "val_mean_auc", "seconds", "images_per_s", "batches"):
        assert np.isfinite(records[0][key]), key
    assert set(records[0]["val_auc"]) == set(CLASS_NAMES)
    epoch_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "val mean AUC" in epoch_lines[0] and "img/s" in epoch_lines[0]
    ckpt = load_file(tmp_path / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["class_names"] == CLASS_NAMES
    assert ckpt["args"]["arch"] == "densenet121"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "scaler", "best_auc", "step"} <= ckpt.keys()
    assert not list(tmp_path.glob(".*.tmp"))


PROBE = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import main
seen = []
make_loader = main.make_loader
def spy(dataset, indices, args, rt, train):
    if train:
        seen.append([dataset.names[i] for i in indices])
    return make_loader(dataset, indices, args, rt, train)
main.make_loader = spy
model = main.main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
torch.save(model.state_dict(), os.path.join({out!r}, f"rank{{rank}}.pt"))
json.dump(seen, open(os.path.join({out!r}, f"names{{rank}}.json"), "w"))
"""


def test_torchrun_two_processes_disjoint_shards_identical_weights(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO), out=str(tmp_path)))
    proc = torchrun(probe, *TINY, "--epochs", "2", "--out-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 x cpu" in proc.stdout
    assert proc.stdout.count("epoch 1/2") == 1  # rank 0 alone prints
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), weights(tmp_path / "run" / "last.pt"))
    shards = [json.loads((tmp_path / f"names{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(2):
        a, b = set(shards[0][epoch]), set(shards[1][epoch])
        assert a and b and not a & b
        assert len(a) == len(b) == 60  # 120 train images, half each
    assert shards[0][0] != shards[0][1]  # reshuffled every epoch


def test_stop_and_resume_gives_the_same_weights(tmp_path):
    args = [*TINY, "--epochs", "2", "--seed", "5"]
    whole = run_script("main.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    # Stopped mid-epoch 1 (step 4 of 15), then mid-epoch 2, then run to the end.
    for max_steps in ("4", "20", "0"):
        part = run_script("main.py", *args, "--out-dir", tmp_path / "parts",
                          "--max-steps", max_steps)
        assert part.returncode == 0, part.stderr
    assert "resuming from" in part.stdout and "epoch 15, step" not in part.stdout
    assert_same_weights(weights(tmp_path / "whole" / "last.pt"),
                        weights(tmp_path / "parts" / "last.pt"))
    assert load_file(tmp_path / "parts" / "last.pt")["epoch"] == 2


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_torchrun_max_restarts_survives_a_killed_worker(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "main.py", *map(str, TINY), "--batch-size", "4",
           "--epochs", "2", "--save-every", "2", "--out-dir", str(out)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    deadline = time.time() + 300
    while not (out / "last.pt").is_file():
        assert job.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim = next(p for p in _children(job.pid) if _rank_of(p) == 1)
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    assert "resuming from" in output
    ckpt = load_file(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0


def _synthetic_data_dir(root, n_train=192, n_val=64):
    """64x64 images whose labels are visible in the pixels: class 0 makes the image bright,
    1 adds horizontal stripes, 2 vertical stripes, 3 a checkerboard (all survive crops and
    flips); the other ten diseases are never present (AUC n/a, left out of the mean)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[:64, :64]
    patterns = [None, (yy // 8) % 2, (xx // 8) % 2, (yy // 8 + xx // 8) % 2]
    names, labels = [], np.zeros((n_train + n_val, 14), np.uint8)
    for i in range(n_train + n_val):
        labels[i, :4] = rng.integers(0, 2, 4)
        img = rng.normal(70 + 110 * labels[i, 0], 12, (64, 64))
        for k in (1, 2, 3):
            if labels[i, k]:
                img += 45 * (patterns[k] - 0.5)
        name = f"{i:08d}_000.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name)
        names.append(name)
    write_list(root / "train_list.txt", names[:n_train], labels[:n_train])
    write_list(root / "val_list.txt", names[n_train:], labels[n_train:])
    write_list(root / "test_list.txt", names[n_train:], labels[n_train:])
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    return root


def test_the_loop_learns_labels_visible_in_the_pixels(tmp_path):
    data = _synthetic_data_dir(tmp_path / "synthetic")
    proc = run_script("main.py", "--data-dir", data, "--pretrained", "none", "--resize", "64",
                      "--crop-size", "56", "--crop-scale", "0.5", "--batch-size", "16",
                      "--workers", "0", "--epochs", "5", "--out-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert max(r["val_mean_auc"] for r in records) > 0.95, proc.stdout


def test_freeze_backbone_trains_only_the_head(tmp_path):
    proc = run_script("main.py", *TINY, "--epochs", "1", "--freeze-backbone", "--seed", "3",
                      "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(3)  # main.py seeds the same way before building the model
    initial = build_model(pretrained="none").state_dict()
    trained = weights(tmp_path / "last.pt")
    assert torch.equal(trained["features.conv0.weight"], initial["features.conv0.weight"])
    assert torch.equal(trained["features.denseblock4.denselayer16.conv2.weight"],
                       initial["features.denseblock4.denselayer16.conv2.weight"])
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])


# ---- checkpoints and weights ----------------------------------------------------------------

def _old_names(model, prefix=""):
    """A DenseNet-121 state dict with the old torchvision key names (denselayer1.norm.1, as in
    torchvision's own ImageNet file and the original CheXNet checkpoints), plus a prefix."""
    old = {}
    for key, value in model.state_dict().items():
        for layer in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{layer}{i}.", f".{layer}.{i}.")
        old[prefix + key] = value
    return old


def test_legacy_chexnet_checkpoint_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.densenet121(weights=None)
    original.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    original.eval()
    # The original CheXNet: DataParallel prefix, a `densenet121` wrapper attribute, old names,
    # classifier = Sequential(Linear, Sigmoid).
    state = _old_names(original, prefix="module.densenet121.")
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    assert "module.densenet121.features.denseblock1.denselayer1.conv.2.weight" in state
    assert "module.densenet121.classifier.0.weight" in state
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "state_dict": state, "best_loss": 0.15}, path,
               _use_new_zipfile_serialization=False)  # as torch 0.x wrote it
    from model import model_from_checkpoint
    model, _ = model_from_checkpoint(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(with_sigmoid(model)(x), original(x), atol=1e-6)
    # It also initialises training (main.py --weights).
    trained = build_model(weights=path)
    assert torch.equal(trained.classifier.weight, original.classifier[0].weight)


def test_pickled_object_that_is_not_a_state_dict_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save(torch.nn.Linear(2, 2), evil)  # a pickled module, not a state dict
    proc = run_script("main.py", *TINY, "--epochs", "1", "--weights", evil,
                      "--out-dir", tmp_path / "run")
    assert_clean_error(proc, str(evil), "not a loadable weights file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"\x00" * 100)
    proc = run_script("main.py", *TINY, "--epochs", "1", "--out-dir", tmp_path / "run")
    assert_clean_error(proc, "last.pt", "not a loadable checkpoint")


def test_checkpoint_of_another_architecture_or_class_count(tmp_path):
    resnet = tmp_path / "resnet.pt"
    torch.save(build_model("resnet50", pretrained="none").state_dict(), resnet)
    proc = run_script("main.py", *TINY, "--epochs", "1", "--weights", resnet,
                      "--out-dir", tmp_path / "a")
    assert_clean_error(proc, str(resnet), "does not fit densenet121 with 14 classes")
    fifteen = tmp_path / "fifteen.pt"
    torch.save(build_model(num_classes=15, pretrained="none").state_dict(), fifteen)
    proc = run_script("main.py", *TINY, "--epochs", "1", "--weights", fifteen,
                      "--out-dir", tmp_path / "b")
    assert_clean_error(proc, str(fifteen), "classifier.weight has shape (15, 1024)")


def test_imagenet_weights_from_torch_cache_offline_and_clear_error(tmp_path):
    """The real weights API: a file in the torch cache is used as is; without it, offline,
    a message saying both ways out instead of a network traceback."""
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    # torchvision's own file has the old DenseNet key names; ours must read them.
    tv = torchvision.models.densenet121(weights=None)
    torch.save(_old_names(tv), hub / "densenet121-a639ec97.pth")
    probe = ("import sys; sys.path.insert(0, %r); import torch; from model import build_model; "
             "m = build_model(); print(m.features.conv0.weight.sum().item())" % str(REPO))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")})
    assert proc.returncode == 0, proc.stderr
    assert abs(float(proc.stdout) - tv.features.conv0.weight.sum().item()) < 1e-3
    proc = run_script("main.py", "--data-dir", REPO / "sample", "--epochs", "1",
                      "--out-dir", tmp_path / "run", env={"TORCH_HOME": str(tmp_path / "empty")})
    assert_clean_error(proc, "cannot download the ImageNet weights", "--weights",
                       "--pretrained none")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_script("main.py", *TINY, "--epochs", "2", "--lr", "1e30", "--save-every", "1",
                      "--out-dir", tmp_path)
    line = assert_clean_error(proc, "epoch 1 step", "keeps the last good weights")
    assert "loss is nan" in line or "loss is inf" in line or "non-finite" in line
    failed_step = int(line.split(" step ", 1)[1].split(";")[0])
    ckpt = load_file(tmp_path / "last.pt")  # every checkpoint written holds finite weights
    assert ckpt["step"] < failed_step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_device_errors():
    assert_clean_error(run_script("main.py", "--hpu", "--data-dir", "sample"),
                       "--hpu", "habana_frameworks", "Gaudi")
    if not torch.cuda.is_available():
        assert_clean_error(run_script("main.py", "--device", "cuda", "--data-dir", "sample"),
                           "--device cuda")
    proc = run_script("main.py", "--device", "tpu")
    assert proc.returncode == 2 and "invalid choice: 'tpu'" in proc.stderr


# ---- run.sh -----------------------------------------------------------------------------------

def _run_sh(*args, env=None, path_prefix=None):
    venv = Path(sys.prefix)  # this interpreter's environment: run.sh installs nothing new
    full_env = {**os.environ, "VENV": str(venv), **(env or {})}
    if path_prefix:
        full_env["PATH"] = f"{path_prefix}:{full_env['PATH']}"
    return subprocess.run(["bash", "run.sh", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=full_env, timeout=600)


def test_run_sh_without_data_runs_the_sample_demo(tmp_path):
    tiny = [a for a in TINY if a not in ("--data-dir", REPO / "sample")]
    proc = _run_sh(*tiny, "--epochs", "1", "--out-dir", tmp_path,
                   env={"DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"no ChestX-ray14 in {tmp_path / 'data'}/" in proc.stdout
    assert "demonstration on the bundled 200-image sample with 1 x cpu" in proc.stdout
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_run_sh_trains_on_the_data_dir_and_finds_gpus(tmp_path, nih_data_dir):
    tiny = [a for a in TINY if a not in ("--data-dir", REPO / "sample")]
    proc = _run_sh(*tiny, "--epochs", "1", "--batch-size", "4", "--out-dir", tmp_path / "run",
                   env={"DATA_DIR": str(nih_data_dir), "MAX_RESTARTS": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"training on {nih_data_dir} with 1 x cpu" in proc.stdout
    # Two (pretend) NVIDIA GPUs: one process each, on CUDA.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100'\necho 'GPU 1: H100'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _run_sh("--epochs", "1", path_prefix=fake, env={"DATA_DIR": str(tmp_path / "none")})
    assert "with 2 x cuda" in proc.stdout
    assert "--nproc_per_node=2" in proc.stderr and "--device cuda" in proc.stderr

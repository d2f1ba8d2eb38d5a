"""Training: one process, DDP with torchrun on CPU (gloo) on one node and on two, resume
(exact, and by images seen after a world-size change), fault tolerance, learning, frozen
backbones, checkpoint formats, ImageNet weights from the torch cache, device errors, run.sh.
The tiny configuration: the same code as a real run on small images."""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, TINY, assert_clean_error, pre_041_state, run_main
from dataset import XrayDataset
from fitting import epoch_order, evaluate, make_loader
from labels import NIH_CLASSES, read_list, write_list
from model import build_model, load_file, with_sigmoid
from runtime import default_precision, setup


def weights(path):
    return load_file(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.integration
def test_one_process_run_writes_checkpoints_and_metrics(tmp_path, capsys):
    proc = run_main(capsys, *TINY, "--epochs", "2", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "global batch 8 (8 x 1)" in proc.stdout and "lr 7.07e-05" in proc.stdout
    assert {"last.pt", "best.pt", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "val_loss", "val_mean_auc", "seconds", "images_per_s", "batches"):
        assert np.isfinite(records[0][key]), key
    assert set(records[0]["val_auc"]) == set(NIH_CLASSES) and records[0]["global_batch"] == 8
    epoch_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "val mean AUC" in epoch_lines[0] and "img/s" in epoch_lines[0]
    ckpt = load_file(tmp_path / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["class_names"] == NIH_CLASSES and ckpt["history"] == records
    assert ckpt["args"]["arch"] == "densenet121" and ckpt["args"]["recipe"] == "zoogzog"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "scaler", "best_auc", "best_epoch", "step"} <= ckpt.keys()
    assert load_file(tmp_path / "best.pt")["epoch"] == ckpt["best_epoch"]
    assert not list(tmp_path.glob(".*.tmp"))


PROBE = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import main
seen, evaluated = [], []
make_loader, evaluate = main.make_loader, main.evaluate
def spy_loader(dataset, indices, batch_size, workers, rt, train):
    if train:
        seen.append([dataset.names[i] for i in indices])
    return make_loader(dataset, indices, batch_size, workers, rt, train)
def spy_evaluate(*a, **k):
    out = evaluate(*a, **k)
    evaluated.append({{"names": list(out["names"]), "probs": out["probs"].tolist()}})
    return out
main.make_loader, main.evaluate = spy_loader, spy_evaluate
model = main.main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
torch.save(model.state_dict(), os.path.join({out!r}, f"rank{{rank}}.pt"))
json.dump({{"seen": seen, "evaluated": evaluated}}, open(os.path.join({out!r}, f"probe{{rank}}.json"), "w"))
"""


def torchrun(*args, extra=(), env=None, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, *map(str, args)]
    # Two "nodes" share this machine's cores: one thread each (torchrun sets this itself only
    # for several processes per node), or their threads fight and run 6x slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.system
def test_torchrun_resumes_a_one_process_run_by_images_seen(tmp_path, capsys):
    """One process (global batch 8) stops 2 steps into epoch 2; torchrun with 2 processes
    (global batch 16) finishes epoch 2 and runs epoch 3. Ranks get disjoint shards, every image
    of epoch 2 is used once, both ranks end with the same weights, and the padded, odd-sized
    DDP validation gives exactly the one-process predictions, in list order."""
    import main
    out = tmp_path / "run"
    args = [*TINY, "--limit", "39", "--epochs", "3", "--out-dir", out]
    first = run_main(capsys, *args, "--max-steps", "6")  # epoch 1: 4 steps of 8
    assert first.returncode == 0, first.stderr
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO), out=str(tmp_path)))
    proc = torchrun(probe, *args, extra=["--standalone", "--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 x cpu" in proc.stdout and "global batch 16 (8 x 2)" in proc.stdout
    assert "global batch 8 -> 16: the epoch continues after the 16 images" in proc.stdout
    assert proc.stdout.count("epoch 3/3") == 1  # rank 0 alone prints
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_same_weights(ranks[0], ranks[1])
    assert_same_weights(ranks[0], weights(out / "last.pt"))
    probes = [json.loads((tmp_path / f"probe{r}.json").read_text()) for r in (0, 1)]
    train_names = read_list(REPO / "sample" / "train_list.txt")[0][:39]
    order = epoch_order(39, 0, 1)
    before = {train_names[i] for i in order[:16]}  # epoch 2 as far as the one process got
    after = probes[0]["seen"][0] + probes[1]["seen"][0]
    assert len(set(after)) == len(after) == 16 and not before & set(after)
    for epoch3 in zip(probes[0]["seen"][1], probes[1]["seen"][1]):
        assert epoch3[0] != epoch3[1]
    assert not set(probes[0]["seen"][1]) & set(probes[1]["seen"][1])
    # Validation: 39 images over 2 ranks (one padded), gathered, de-duplicated, in list order.
    val_names = read_list(REPO / "sample" / "val_list.txt")[0][:39]
    ddp = probes[0]["evaluated"][-1]
    assert ddp["names"] == val_names and probes[1]["evaluated"][-1]["names"] == val_names
    rt = setup("cpu")
    margs = main.get_args([str(a) for a in args])
    model = build_model(pretrained="none")
    model.load_state_dict(ranks[0])
    val_set = XrayDataset(REPO / "sample", REPO / "sample" / "val_list.txt", "center",
                          margs.resize, crop=margs.crop_size, limit=margs.limit)
    precision, _, _ = default_precision("cpu", margs.amp, margs.channels_last, margs.amp_dtype)
    alone = evaluate(model, make_loader(val_set, None, margs.batch_size, margs.workers, rt,
                                        False), rt, precision)
    assert list(alone["names"]) == val_names
    assert np.allclose(alone["probs"], ddp["probs"], atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(probe, args, restarts=0):
    """Two torchrun launchers as two nodes of one process each, c10d rendezvous on 127.0.0.1."""
    extra = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=test",
             "--local-addr=127.0.0.1", f"--max-restarts={restarts}"]
    return [torchrun(probe, *args, extra=extra, wait=False) for _ in range(2)]


@pytest.mark.system
def test_two_nodes_train_identical_weights(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO), out=str(tmp_path)))
    nodes = _two_nodes(probe, [*TINY, "--limit", "32", "--epochs", "1", "--out-dir", tmp_path / "run"])
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    assert "2 x cpu" in "".join(outputs)
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), weights(tmp_path / "run" / "last.pt"))


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


@pytest.mark.system
def test_two_nodes_survive_a_killed_worker(tmp_path):
    """One node's worker is killed after the first checkpoint: with --max-restarts both nodes'
    workers restart, resume from last.pt and finish with the same weights."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO), out=str(tmp_path)))
    out = tmp_path / "run"
    nodes = _two_nodes(probe, [*TINY, "--batch-size", "4", "--limit", "48", "--epochs", "2",
                               "--save-every", "2", "--out-dir", out], restarts=1)
    deadline = time.time() + 300
    while not (out / "last.pt").is_file():
        assert all(n.poll() is None for n in nodes) and time.time() < deadline, "no checkpoint"
        time.sleep(0.05)
    victim = _children(nodes[1].pid)[0]
    os.kill(victim, signal.SIGKILL)
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    assert "resuming from" in "".join(outputs)
    ckpt = load_file(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["epoch_images"] == 0
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    assert_same_weights(torch.load(tmp_path / "rank0.pt"), ckpt["model"])


@pytest.mark.integration
def test_stop_and_resume_gives_the_same_weights(tmp_path, capsys):
    """Stopped mid-epoch 1 (step 2 of 6), then mid-epoch 2 at step 8, but rolled back to the
    checkpoint of step 2, as if killed before the checkpoint of step 8 was written while
    TensorBoard had its events up to step 8; then run to the end. The weights and the
    TensorBoard curves are the uninterrupted run's: no step twice, none missing."""
    from test_observe import assert_curves_continue, event_scalars
    args = [*TINY, "--limit", "48", "--epochs", "2", "--seed", "5", "--log-every", "2"]
    whole = run_main(capsys, *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    parts = tmp_path / "parts"
    for max_steps in ("2", "8", "0"):
        part = run_main(capsys, *args, "--out-dir", parts, "--max-steps", max_steps)
        assert part.returncode == 0, part.stderr
        if max_steps == "2":
            at_step_2 = (parts / "last.pt").read_bytes()
        if max_steps == "8":
            assert max(s for s, _ in event_scalars(parts)["train/loss"]) == 8
            (parts / "last.pt").write_bytes(at_step_2)
            # and the kill cut TensorBoard's last record short
            events = max((parts / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime)
            os.truncate(events, events.stat().st_size - 7)
    assert "resuming from" in part.stdout and "step 2" in part.stdout
    assert_same_weights(weights(tmp_path / "whole" / "last.pt"),
                        weights(tmp_path / "parts" / "last.pt"))
    expected, got = event_scalars(tmp_path / "whole"), event_scalars(parts)
    assert_curves_continue(got)
    assert expected.keys() == got.keys()
    for tag in expected:
        assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]], tag
        if not tag.startswith("perf/"):  # times differ; the numbers of the model do not
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected[tag]],
                                                             rel=1e-5), tag
    assert load_file(tmp_path / "parts" / "last.pt")["epoch"] == 2
    assert ((tmp_path / "whole" / "metrics.jsonl").read_text().count("epoch")
            == (tmp_path / "parts" / "metrics.jsonl").read_text().count("epoch"))


def _synthetic_data_dir(root, n_train=192, n_val=128):
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
    half = n_train + n_val // 2
    write_list(root / "val_list.txt", names[n_train:half], labels[n_train:half])
    write_list(root / "test_list.txt", names[half:], labels[half:])
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    return root


@pytest.mark.integration
def test_the_loop_learns_labels_visible_in_the_pixels(tmp_path, capsys):
    data = _synthetic_data_dir(tmp_path / "synthetic")
    proc = run_main(capsys, "--data-dir", data, "--pretrained", "none", "--resize", "64",
                    "--train-size", "64", "--crop-size", "56", "--crop-scale", "0.5",
                    "--batch-size", "16", "--lr", "1e-3", "--workers", "0", "--epochs", "4",
                    "--out-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert max(r["val_mean_auc"] for r in records) > 0.95, proc.stdout


@pytest.mark.integration
def test_freeze_backbone_trains_only_the_head(tmp_path, capsys):
    proc = run_main(capsys, *TINY, "--limit", "24", "--epochs", "1", "--freeze-backbone",
                    "--seed", "3", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(3)  # main.py seeds the same way before building the model
    initial = build_model(pretrained="none").state_dict()
    trained = weights(tmp_path / "last.pt")
    changed = [k for k in initial if not torch.equal(trained[k], initial[k])]
    # BatchNorm running statistics included: the frozen features do not move at all.
    assert changed == ["classifier.weight", "classifier.bias"]
    assert_clean_error(run_main(capsys, *TINY, "--epochs", "2", "--out-dir", tmp_path),
                       "last.pt", "trained with --freeze-backbone", "--weights")


# ---- checkpoints and weights ----------------------------------------------------------------

def test_legacy_chexnet_checkpoint_gives_identical_outputs(tmp_path):
    """arnoweng's model.pth.tar as torch 0.3 wrote it: DataParallel prefix, a `densenet121`
    wrapper attribute, old layer names, no num_batches_tracked, classifier = Linear + Sigmoid."""
    torch.manual_seed(0)
    original = torchvision.models.densenet121(weights=None)
    original.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    original.eval()
    state = pre_041_state(original, prefix="module.densenet121.")
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    assert not any("num_batches_tracked" in k for k in state)
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "state_dict": state, "best_loss": 0.15}, path,
               _use_new_zipfile_serialization=False)
    from checkpoint import load_for_inference
    model, classes, _ = load_for_inference(path)
    assert classes == NIH_CLASSES  # the 2017 format has no class names: NIH's 14 outputs
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(with_sigmoid(model)(x), original(x), atol=1e-6)
    trained = build_model(weights=path)  # it also initialises training (main.py --weights)
    assert torch.equal(trained.classifier.weight, original.classifier[0].weight)


class _Exploit:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.integration
def test_imagenet_weights_come_from_the_torch_cache_safely(tmp_path, capsys, monkeypatch):
    """torchvision's own file (pre-0.4.1 names and buffers) in the torch cache is used as it
    is; a pickle with code there is refused without running; a corrupt one is named corrupt;
    without it, offline, the message says both ways out."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    cache.parent.mkdir(parents=True)
    tv = torchvision.models.densenet121(weights=None)
    torch.save(pre_041_state(tv), cache, _use_new_zipfile_serialization=False)
    assert torch.equal(build_model().features.conv0.weight, tv.features.conv0.weight)
    marker = tmp_path / "pwned"
    with open(cache, "wb") as f:
        pickle.dump({"features.conv0.weight": _Exploit(marker)}, f, protocol=2)  # as torch.save
    args = [*TINY, "--pretrained", "imagenet", "--epochs", "1", "--out-dir", tmp_path / "run"]
    assert_clean_error(run_main(capsys, *args), str(cache), "refused", "posix.system")
    assert not marker.exists()
    cache.write_bytes(b"PK\x03\x04 truncated")
    assert_clean_error(run_main(capsys, *args), str(cache), "corrupt", "delete it")
    cache.unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert_clean_error(run_main(capsys, *args), "cannot download the ImageNet weights",
                       "--weights", "--pretrained none")


@pytest.mark.integration
def test_resume_from_another_run_into_a_new_out_dir_offline(tmp_path, capsys, monkeypatch):
    """--resume FILE --out-dir NEW continues that run in NEW; a resumed run takes its weights
    from the checkpoint, so it needs no ImageNet download (offline here)."""
    first = run_main(capsys, *TINY, "--limit", "16", "--epochs", "1", "--out-dir", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    args = [a for a in TINY if a not in ("--pretrained", "none")]
    again = run_main(capsys, *args, "--limit", "16", "--epochs", "2", "--resume",
                     tmp_path / "a" / "last.pt", "--out-dir", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert load_file(tmp_path / "b" / "last.pt")["epoch"] == 2
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2]
    assert (tmp_path / "b" / "best.pt").is_file()


@pytest.mark.integration
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    proc = run_main(capsys, *TINY, "--epochs", "2", "--lr", "1e30", "--save-every", "1",
                    "--out-dir", tmp_path)
    line = assert_clean_error(proc, "epoch 1 step", "keeps the last good weights")
    assert "non-finite" in line
    failed_step = int(line.split(" step ", 1)[1].split(";")[0])
    ckpt = load_file(tmp_path / "last.pt")  # every checkpoint written holds finite weights
    assert ckpt["step"] < failed_step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.integration
def test_weights_that_diverge_at_the_end_of_an_epoch(tmp_path, capsys):
    """One step with a huge lr: the loss was finite, the validation outputs are not."""
    proc = run_main(capsys, *TINY, "--batch-size", "120", "--epochs", "1", "--lr", "1e30",
                    "--out-dir", tmp_path)
    assert_clean_error(proc, "validation outputs are non-finite", "epoch 1", "nothing saved")


@pytest.mark.integration
def test_device_errors(capsys):
    assert_clean_error(run_main(capsys, "--hpu", "--data-dir", "sample"),
                       "--hpu", "habana_frameworks", "Gaudi")
    if not torch.cuda.is_available():
        assert_clean_error(run_main(capsys, "--device", "cuda", "--data-dir", "sample"),
                           "--device cuda")
    proc = run_main(capsys, "--device", "tpu")
    assert proc.returncode == 2 and "invalid choice: 'tpu'" in proc.stderr


# ---- run.sh -----------------------------------------------------------------------------------

def _run_sh(*args, env=None, path_prefix=None):
    venv = Path(sys.prefix)  # this interpreter's environment: run.sh installs nothing new
    full_env = {**os.environ, "VENV": str(venv), **(env or {})}
    if path_prefix:
        full_env["PATH"] = f"{path_prefix}:{full_env['PATH']}"
    return subprocess.run(["bash", "run.sh", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=full_env, timeout=600)


@pytest.mark.system
def test_run_sh_without_data_runs_the_sample_demo(tmp_path):
    tiny = [a for a in TINY if a not in ("--data-dir", REPO / "sample")]
    proc = _run_sh(*tiny, "--epochs", "1", "--limit", "16", "--out-dir", tmp_path,
                   env={"DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"no ChestX-ray14 in {tmp_path / 'data'}/" in proc.stdout
    assert "demonstration on the bundled 200-image sample with 1 x cpu" in proc.stdout
    assert "ok: 16 train / 16 val images" in proc.stdout  # the one-process check, then training
    # one CPU process, nothing to restart: no launcher (torchrun's rendezvous only warned)
    assert "torch.distributed.run" not in proc.stdout and "keep-alive" not in proc.stderr
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.system
def test_run_sh_finds_gpus_and_stops_bad_input_once(tmp_path, nih_data_dir):
    """Two (pretend) NVIDIA GPUs: one process each on CUDA; an error is one line, shown once,
    before torchrun (which would restart a failing job MAX_RESTARTS times)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100'\necho 'GPU 1: H100'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _run_sh("--epochs", "1", path_prefix=fake, env={"DATA_DIR": str(nih_data_dir)})
    assert f"training on {nih_data_dir} with 2 x cuda" in proc.stdout
    assert "--nproc_per_node=2 --max-restarts=3 main.py --device cuda" in proc.stdout
    if not torch.cuda.is_available():
        assert_clean_error(proc, "--device cuda: no CUDA GPU")
        assert "Traceback" not in proc.stdout + proc.stderr and "torch.distributed" not in proc.stderr

"""Faults: kill -9 at the instants where a unit of output is half-written (a training epoch's
last.pt / best.pt / metrics.jsonl, an export's set of files), two runs on one directory, a
file-size limit (what a full disk does to a write), Ctrl-C."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, assert_clean_error, run_main, run_script
from model import load_file
from test_observe import assert_curves_continue, assert_points, event_scalars


# Runs a script with os.replace patched to die like kill -9 (os._exit: no cleanup at all)
# right after the rename that KILL_AFTER names: "<file name>:<condition>".
KILLER = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
target, condition = os.environ["KILL_AFTER"].split(":")
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if os.path.basename(str(dst)) == target:
        if condition == "always" or (condition == "improved" and _improved(dst)):
            os._exit(9)
def _improved(path):
    import torch
    ckpt = torch.load(path, weights_only=True)
    return ckpt.get("best_epoch") == ckpt.get("epoch") and ckpt.get("epoch_images") == 0
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(tmp_path, kill_after, *args):
    probe = tmp_path / "killer.py"
    probe.write_text(KILLER.format(repo=str(REPO)))
    return run_script(probe, *args, env={"KILL_AFTER": kill_after})


def assert_consistent_run(out):
    """last.pt is the record; best.pt holds its best epoch; metrics.jsonl one line per epoch."""
    last = load_file(out / "last.pt")
    best = load_file(out / "best.pt")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, last["epoch"] + 1))
    assert best["epoch"] == last["best_epoch"]
    assert best["best_auc"] == max(r["val_mean_auc"] for r in records)
    assert not list(out.glob(".*.tmp"))
    # TensorBoard, read by its own reader: one point per epoch, at the step it ended
    scalars = event_scalars(out)
    assert_curves_continue(scalars)
    assert_points(scalars["val/mean_auc"], [(r["steps"], r["val_mean_auc"]) for r in records])


@pytest.mark.system
@pytest.mark.parametrize("kill_after", ["last.pt:improved", "best.pt:always"])
def test_kill_at_the_checkpoint_set_boundary(tmp_path, kill_after, capsys):
    """Killed right after last.pt of an improved epoch (before best.pt and metrics.jsonl), or
    right after best.pt (before metrics.jsonl): the same command repairs and finishes."""
    out = tmp_path / "run"
    args = [*TINY, "--limit", "16", "--epochs", "2", "--out-dir", out]
    killed = run_killed(tmp_path, kill_after, "main.py", *args)
    assert killed.returncode == 9, killed.stderr
    assert load_file(out / "last.pt")["epoch"] == 1
    again = run_main(capsys, *args)
    assert again.returncode == 0, again.stderr
    assert_consistent_run(out)
    done = load_file(out / "last.pt")
    assert done["epoch"] == 2
    assert f"best val mean AUC {done['best_auc']:.4f} (epoch {done['best_epoch']};" in again.stdout


def _perturbed(checkpoint, path):
    ckpt = torch.load(checkpoint)
    ckpt["model"]["classifier.bias"] += 0.5
    torch.save(ckpt, path)
    return path


@pytest.mark.system
def test_kill_during_export_never_mixes_models(tmp_path, small_model, nih_dir, capsys):
    """An export killed while moving its files in: the model whose files were replaced is
    refused in one line, the other still works; the next export repairs the set. A killed
    export's staging directory is cleaned up."""
    work, _ = small_model
    models = tmp_path / "models"
    shutil.copytree(work / "models", models, ignore=shutil.ignore_patterns("predictions*"))
    new = _perturbed(work / "run" / "best.pt", tmp_path / "new.pt")
    export = ["infer.py", "--export", "--checkpoint", new, "--model-dir", models,
              "--data-dir", nih_dir, "--calibration-size", "4", "--validation-size", "2"]
    killed = run_killed(tmp_path, "chexnet_fp32.bin:always", *export)
    assert killed.returncode == 9, killed.stderr
    evaluate = ["--model-dir", models, "--data-dir", nih_dir, "--limit", "4", "--no-figures"]
    assert_clean_error(run_main(capsys, *evaluate, "--mode", "fp32", module="infer"),
                       "chexnet_fp32.bin: does not belong to the export")
    old = run_main(capsys, *evaluate, "--mode", "int8", module="infer")
    assert old.returncode == 0, old.stderr  # still the old, whole set
    again = run_script(*export)
    assert again.returncode == 0, again.stderr
    assert not list(models.glob(".export-*"))
    assert json.loads((models / "chexnet.json").read_text())["checkpoint"] == str(new)
    for mode in ("fp32", "int8"):
        proc = run_main(capsys, *evaluate, "--mode", mode, module="infer")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.system
def test_two_runs_on_one_directory(tmp_path, small_model, nih_dir, capsys):
    """A second training in the same --out-dir, or a second export into the same --model-dir,
    stops with one line while the first goes on."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "main.py", *map(str, TINY), "--epochs", "50",
                              "--out-dir", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").is_file() and (out / ".lock").read_text().strip()):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_main(capsys, *TINY, "--epochs", "1", "--out-dir", out)
        assert_clean_error(second, str(out), f"in use by another training (pid {first.pid})",
                           "another --out-dir")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # An export in progress holds the model directory's lock (held here by a small process,
    # so the test does not wait for a whole export).
    models = tmp_path / "models"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(models / ".export.lock")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        export = ["--export", "--checkpoint", small_model[0] / "run" / "best.pt",
                  "--model-dir", models, "--data-dir", nih_dir]
        assert_clean_error(run_main(capsys, *export, module="infer"), str(models),
                           f"in use by another export (pid {holder.pid})")
        assert not (models / "chexnet.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Two evaluations into one predictions file would share its chunks.
    out = tmp_path / "p.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".p.csv.lock")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_clean_error(run_main(capsys, "--mode", "int8", "--model-dir",
                                    small_model[0] / "models", "--data-dir", nih_dir, "--out-csv",
                                    out, module="infer"), f"in use by another evaluation (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import sys, time
from common import exclusive_lock
with exclusive_lock(sys.argv[1], "another export", "wait"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _file_size_limit(megabytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (megabytes << 20, megabytes << 20))
    return limit


def run_limited(megabytes, *args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, preexec_fn=_file_size_limit(megabytes),
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.system
def test_a_full_disk_costs_nothing_already_written(tmp_path, small_model, nih_dir,
                                                   nih_data_dir, capsys):
    """Writes that fail for lack of space (here a file-size limit: the same error to the
    program) end in one line, remove their temp files and leave earlier files as they were."""
    out = tmp_path / "run"
    first = run_main(capsys, *TINY, "--limit", "16", "--epochs", "1", "--out-dir", out)
    assert first.returncode == 0, first.stderr
    before = (out / "last.pt").read_bytes()
    proc = run_limited(40, "main.py", *TINY, "--limit", "16", "--epochs", "2", "--out-dir", out)
    assert_clean_error(proc, "last.pt: cannot write checkpoint (File too large)", "untouched")
    assert (out / "last.pt").read_bytes() == before and not list(out.glob(".*.tmp"))
    proc = run_limited(1, "dataset.py", "prepare", "--data-dir", nih_data_dir, "--size", "256")
    assert_clean_error(proc, "cannot reserve", "256x256 store (File too large)")
    models = tmp_path / "models"
    shutil.copytree(small_model[0] / "models", models, ignore=shutil.ignore_patterns("pred*"))
    def files():
        return {p.name: p.read_bytes() for p in models.iterdir() if p.suffix != ".lock"}
    kept = files()
    proc = run_limited(5, "infer.py", "--export", "--checkpoint", _perturbed(
        small_model[0] / "run" / "best.pt", tmp_path / "new.pt"), "--model-dir", models,
        "--data-dir", nih_dir, "--calibration-size", "4", "--validation-size", "2")
    assert_clean_error(proc, f"{models}: cannot write the export", "untouched")
    assert files() == kept
    assert not list(models.glob(".export-*"))


@pytest.mark.system
def test_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "main.py", *map(str, TINY), "--epochs", "50",
                            "--save-every", "1", "--out-dir", str(out)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # as from a terminal: a suite started in the background (`&`)
                           # passes SIGINT on ignored, and Python then never raises Ctrl-C
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "last.pt").is_file():
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130 and "Traceback" not in err
    assert f"interrupted: run the same command to resume from {out / 'last.pt'}" in err

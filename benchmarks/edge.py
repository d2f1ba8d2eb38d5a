"""The README's edge section followed to the letter, each command timed: a fresh virtual
environment from requirements-edge.txt (its install time and size), then every edge command run
in it on full-size NIH images with a DenseNet-121 exported in this (the full) environment.

    python benchmarks/edge.py                          # builds a fresh edge environment
    python benchmarks/edge.py --python .venv-edge/bin/python   # times an existing one

Without --checkpoint a random-weights DenseNet-121 is exported at 224x224 (the AUCs are ~0.5;
only the times mean anything). The images: --val and --test of the 480 in shared/data's
nih_sample (one per patient), whose boxed ones --localize scores.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from labels import write_list  # noqa: E402
from tables import read_label_table  # noqa: E402


def timed(cmd, log):
    """Runs cmd in the repository; returns its wall time in seconds, or exits with its output."""
    start = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    return seconds


def du(path):
    out = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout
    return out.split()[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default=None,
                   help="an existing edge environment's python (default: build a fresh one)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample"))
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    a = p.parse_args()

    import torch

    from dicom_files import write_dicom
    from model import build_model
    work = Path(tempfile.mkdtemp(prefix="chexnet-edge-bench-"))
    log = open(work / "commands.log", "w")
    rows = []
    if a.python is None:  # the README: python3 -m venv + pip install -r requirements-edge.txt
        venv = work / "venv-edge"
        seconds = timed(["python3", "-m", "venv", venv], log)
        seconds += timed([venv / "bin/pip", "install", "-q", "-r", "requirements-edge.txt"], log)
        rows.append(("pip install -r requirements-edge.txt (fresh venv)", seconds, du(venv)))
        python = venv / "bin" / "python"
    else:
        python = Path(a.python).absolute()
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0:
        sys.exit(f"{python}: this environment has torch; an edge environment must not")

    # The data: full-size NIH PNGs, disjoint val and test (one image per patient)
    data = work / "data"
    data.mkdir()
    table = Path(a.images) / "Data_Entry_2017_v2020_sample.csv"
    os.symlink((Path(a.images) / "images").resolve(), data / "images")
    shutil.copy(table, data / "Data_Entry_2017_v2020.csv")
    names, _, labels = read_label_table(table)
    parts = {"val": slice(0, a.val), "test": slice(a.val, a.val + a.test),
             "train": slice(a.val + a.test, None)}
    for part, s in parts.items():
        write_list(data / f"{part}_list.txt", names[s], labels[s])
    checkpoint = a.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = work / "random.pt"
        torch.save(build_model(pretrained="none").state_dict(), checkpoint)
    models = work / "models"
    timed([sys.executable, "infer.py", "--export", "--checkpoint", checkpoint, "--model-dir",
           models, "--data-dir", data, "--calibration-size", "50", "--validation-size", "20"], log)

    png = data / "images" / names[parts["test"]][0]
    jpeg = work / "x.jpg"
    from PIL import Image
    Image.open(png).convert("L").save(jpeg, quality=95)
    dicom = write_dicom(png, work / "IM000001", "jpeg2000")

    m = ["--model-dir", models]
    md = m + ["--data-dir", data]
    commands = [
        ("infer.py --mode int8 --image x.png", ["infer.py", "--mode", "int8", *m, "--image", png]),
        ("infer.py --mode int8 --image x.jpg", ["infer.py", "--mode", "int8", *m, "--image", jpeg]),
        ("infer.py --mode int8 --image IM000001 (DICOM, JPEG 2000)",
         ["infer.py", "--mode", "int8", *m, "--image", dicom]),
        ("infer.py --mode int8 --image x.png --cam",
         ["infer.py", "--mode", "int8", *m, "--image", png, "--cam", work / "cams"]),
        (f"infer.py --mode fp32 --part val ({a.val} images)",
         ["infer.py", "--mode", "fp32", "--part", "val", *md]),
        (f"infer.py --mode int8 --part val ({a.val} images)",
         ["infer.py", "--mode", "int8", "--part", "val", *md]),
        (f"infer.py --mode fp32 ({a.test} test images)", ["infer.py", "--mode", "fp32", *md]),
        (f"infer.py --mode int8 ({a.test} test images)", ["infer.py", "--mode", "int8", *md]),
        (f"infer.py --mode int8 --calibrated ({a.test} test images)",
         ["infer.py", "--mode", "int8", "--calibrated", "--out-csv", work / "calibrated.csv", *md]),
        ("infer.py --mode int8 --localize (the boxed val and test images)",
         ["infer.py", "--mode", "int8", "--localize", *md]),
        ("report.py models/predictions_int8.csv",
         ["report.py", models / "predictions_int8.csv", "--data-dir", data]),
        ("report.py compare predictions_fp32.csv predictions_int8.csv",
         ["report.py", "compare", models / "predictions_fp32.csv",
          models / "predictions_int8.csv", "--data-dir", data]),
        ("stats.py", ["stats.py"]),
        ("stats.py --plot", ["stats.py", "--plot", work / "plots"]),
    ]
    for label, cmd in commands:
        rows.append((label, timed([python, *cmd], log), ""))
        print(f"{label}: {rows[-1][1]:.1f} s", flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "CPU")
    print(f"\n{os.cpu_count()} cores ({cpu}); edge environment {python} "
          f"({du(Path(python).parents[1])}); "
          f"DenseNet-121 at 224, ten-crop, 1024x1024 NIH PNGs; outputs and log in {work}")
    print(f"| {'command':<62} | seconds |")
    print(f"| {'-' * 62} | ------- |")
    for label, seconds, size in rows:
        print(f"| {label + (f', {size}' if size else ''):<62} | {seconds:7.1f} |")


if __name__ == "__main__":
    main()

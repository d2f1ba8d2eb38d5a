"""Inference speed and AUC of PyTorch, OpenVINO FP32 and OpenVINO INT8, in one process on the
same full-size NIH images, with OpenVINO's benchmark_app for comparison.

    python benchmarks/inference.py [--checkpoint best.pt] [--n 48]

Without --checkpoint a random-weights DenseNet-121 is exported (AUCs are then ~0.5 and only
the speeds mean anything). End to end = `infer.py --mode MODE` on the test list: decode PNG ->
Resize(256) -> TenCrop(224) -> normalise -> model -> mean of the 10 crops; the torch mode runs
batched on --device (a GPU when there is one), the OpenVINO modes on the CPU. Model only = the
same crops already in memory, on the CPU.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import infer  # noqa: E402
from backends import TorchModel, data_defaults, load_openvino, read_metadata  # noqa: E402
from images import eval_input  # noqa: E402
from labels import write_list  # noqa: E402
from tables import read_label_table  # noqa: E402
from model import build_model  # noqa: E402
from runtime import setup  # noqa: E402


def model_only(backend, crops, repeats):
    """Crops per second through the back end, inputs already decoded."""
    backend.run_all(((i, crops) for i in range(2)), lambda *a: None)  # warm-up
    start = time.perf_counter()
    backend.run_all(((i, crops) for i in range(repeats)), lambda *a: None)
    return repeats * len(crops) / (time.perf_counter() - start)


def benchmark_app(xml, batch, seconds):
    """benchmark_app's throughput (crops/s) for the model at batch x 3 x 224 x 224."""
    cmd = ["benchmark_app", "-m", str(xml), "-d", "CPU", "-hint", "throughput",
           "-shape", f"[{batch},3,224,224]", "-t", str(seconds), "-infer_precision", "f32"]
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}).stdout
    match = re.search(r"Throughput:\s+([\d.]+) FPS", out)
    return float(match.group(1)) if match else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample"))
    p.add_argument("--n", type=int, default=48, help="images evaluated by every mode")
    p.add_argument("--calibration-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="--mode torch: auto, cpu, cuda or hpu")
    p.add_argument("--batch-size", default=None,
                   help="--mode torch: images per batch (default: infer.py's, 1 on a CPU)")
    a = p.parse_args()

    image_dir = Path(a.images) / "images"
    names, _, labels = read_label_table(Path(a.images) / "Data_Entry_2017_v2020_sample.csv")
    work = Path(tempfile.mkdtemp(prefix="chexnet-infer-bench-"))
    os.symlink(image_dir.resolve(), work / "images")
    (work / "Data_Entry_2017_v2020.csv").write_bytes(
        (Path(a.images) / "Data_Entry_2017_v2020_sample.csv").read_bytes())
    # Calibration (val) and evaluation (test) images are disjoint (one image per patient).
    cal = slice(0, a.calibration_size)
    test = slice(a.calibration_size, a.calibration_size + a.n)
    rest = slice(a.calibration_size + a.n, None)
    write_list(work / "train_list.txt", names[rest], labels[rest])
    write_list(work / "val_list.txt", names[cal], labels[cal])
    write_list(work / "test_list.txt", names[test], labels[test])

    checkpoint = a.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = work / "random.pt"
        torch.save(build_model(pretrained="none").state_dict(), checkpoint)
    infer.main(["--export", "--checkpoint", str(checkpoint), "--model-dir", str(work / "models"),
                "--data-dir", str(work), "--calibration-size", str(a.calibration_size),
                "--validation-size", "1"])
    crop = data_defaults(read_metadata(work / "models")).crop_size  # the export's

    crops = eval_input(image_dir / names[test][0])
    rows, device, batch = {}, None, None
    for mode in ("torch", "fp32", "int8"):
        argv = ["--mode", mode, "--model-dir", str(work / "models"), "--checkpoint",
                str(checkpoint), "--out-csv", str(work / f"{mode}.csv")]
        if mode == "torch":
            argv += ["--device", a.device] + (["--batch-size", a.batch_size] if a.batch_size else [])
        args = infer.get_args(argv)
        rt = setup(args.device) if mode == "torch" else None
        if rt is not None:
            device = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
                      else f"{rt.device.type}, {torch.get_num_threads()} threads")
        result = infer.main(argv)  # loads the model first; times the predictions
        batch = (args.batch_size or (1 if rt.device.type == "cpu" else 32)) if mode == "torch" \
            else batch  # TorchPredictor's default
        backend = (TorchModel(checkpoint) if mode == "torch"
                   else load_openvino(args.model_dir, mode, read_metadata(args.model_dir),
                                      crop, args.images_per_request, args.streams))
        rows[mode] = {"e2e": len(result["names"]) / result["seconds"],
                      "model": model_only(backend, crops, 3 if mode == "torch" else 20),
                      "auc": result["mean_auc"]}
        print(f"{mode}: done", flush=True)
    bench = benchmark_app(work / "models" / "chexnet_int8.xml", 10, 15)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "CPU")
    print(f"\n{a.n} NIH images (1024x1024 PNG), ten-crop 224; {os.cpu_count()} cores ({cpu}); "
          f"torch mode on {device}, batch {batch}; OpenVINO on the CPU, 10 crops per "
          "request")
    print(f"{'mode':<8}{'e2e img/s':>11}{'e2e crops/s':>13}{'model crops/s':>15}{'mean AUC':>10}")
    for mode, r in rows.items():
        print(f"{mode:<8}{r['e2e']:>11.2f}{10 * r['e2e']:>13.1f}{r['model']:>15.1f}{r['auc']:>10.4f}")
    print(f"speed-up end to end: fp32/torch {rows['fp32']['e2e'] / rows['torch']['e2e']:.1f}x, "
          f"int8/fp32 {rows['int8']['e2e'] / rows['fp32']['e2e']:.1f}x; model only (CPU): "
          f"fp32/torch {rows['fp32']['model'] / rows['torch']['model']:.1f}x, int8/fp32 "
          f"{rows['int8']['model'] / rows['fp32']['model']:.1f}x")
    print(f"benchmark_app int8 [10,3,224,224]: {bench:.1f} crops/s; infer.py int8 end to end "
          f"reaches {10 * rows['int8']['e2e'] / bench:.0%} of it")
    print(f"AUC cost of INT8: {rows['fp32']['auc'] - rows['int8']['auc']:+.4f}")


if __name__ == "__main__":
    main()

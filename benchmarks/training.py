"""Training throughput (images/s) of main.py's training step at 224x224.

    python benchmarks/training.py [--steps 6] [--batch-size 16] [--device auto]

Runs main.train_one_epoch on in-memory batches (so the number is the model's, not the data
loader's) for fp32, channels_last, bf16 autocast and both, and prints one table.
On CUDA the same variants run with --amp; add --compile to also try torch.compile.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402
from model import build_model  # noqa: E402

VARIANTS = {"fp32": [], "channels_last": ["--channels-last"], "bf16 autocast": ["--amp"],
            "bf16 + channels_last": ["--amp", "--channels-last"]}


def throughput(flags, rt, steps, batch_size, crop):
    args = main.get_args(["--batch-size", str(batch_size), "--crop-size", str(crop), *flags])
    torch.manual_seed(0)
    model = build_model(pretrained="none").to(rt.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=False)
    criterion = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch_size, 3, crop, crop)
    y = (torch.rand(batch_size, 14) < 0.1).float()
    batches = [(x, y, ["synthetic"] * batch_size)]

    def run(n):
        sync()
        start = time.perf_counter()
        main.train_one_epoch(net, batches * n, criterion, optimizer, scaler, rt, args, 0, 0,
                             lambda *a: None)
        sync()
        return time.perf_counter() - start

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    run(2 if rt.device.type == "cpu" else 10)  # warm-up (and compilation)
    return steps * batch_size / run(steps)


def main_():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    p.add_argument("--compile", action="store_true", help="also measure torch.compile variants")
    a = p.parse_args()
    rt = main.setup(a.device)
    name = (torch.cuda.get_device_name() if rt.device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"DenseNet-121 training step, {a.crop_size}x{a.crop_size}, batch {a.batch_size}, {name}, "
          f"torch {torch.__version__}")
    variants = dict(VARIANTS)
    if a.compile:
        variants.update({f"{k} + compile": v + ["--compile"] for k, v in VARIANTS.items()})
    print(f"{'variant':<28}{'images/s':>10}")
    for label, flags in variants.items():
        print(f"{label:<28}{throughput(flags, rt, a.steps, a.batch_size, a.crop_size):>10.1f}",
              flush=True)


if __name__ == "__main__":
    main_()

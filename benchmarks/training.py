"""Training throughput (images/s) of main.py's training step at 224x224.

    python benchmarks/training.py [--steps 6] [--batch-size 16] [--device auto]
    python benchmarks/training.py --data-dir DIR [--steps 200] [--workers 8]

The first form runs fitting.train_one_epoch on in-memory batches (the model's number, not the
data loader's) for fp32, channels_last, bf16 autocast and both, and prints one table; add
--compile to also try torch.compile. The second trains for real with main.py (--amp
--channels-last) on DIR, once decoding PNGs and once from the preprocessed store (prepared
first if missing), and reports images/s and, on NVIDIA GPUs, the mean GPU utilisation.
"""
import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fitting  # noqa: E402
import main  # noqa: E402
from benchmarks.data_loading import cpu_name  # noqa: E402
from fitting import StepSettings  # noqa: E402
from model import build_model  # noqa: E402
from runtime import Precision, setup  # noqa: E402

# Explicit both ways: main.py's defaults depend on the CPU (bf16 + channels_last with AMX).
VARIANTS = {"fp32": ["--no-amp", "--no-channels-last"],
            "channels_last": ["--no-amp", "--channels-last"],
            "bf16 autocast": ["--amp", "--no-channels-last"],
            "bf16 + channels_last": ["--amp", "--channels-last"]}


def throughput(flags, rt, steps, batch_size, crop, warmup=None):
    """Images/s of fitting.train_one_epoch on in-memory batches, after `warmup` steps."""
    args = main.get_args(["--batch-size", str(batch_size), "--crop-size", str(crop), *flags])
    # the flags are explicit both ways (VARIANTS): no CPU default to resolve
    settings = StepSettings(Precision(args.amp, args.amp_dtype, args.channels_last))
    torch.manual_seed(0)
    model = build_model(pretrained="none").to(rt.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = (torch.compile(model, backend="hpu_backend" if rt.device.type == "hpu" else "inductor")
           if args.compile else model)  # as main.py compiles
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=False)
    criterion = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch_size, 3, crop, crop)
    y = (torch.rand(batch_size, 14) < 0.1).float()
    batches = [(x, y, ["synthetic"] * batch_size)]

    def run(n):
        sync()
        start = time.perf_counter()
        fitting.train_one_epoch(net, batches * n, criterion, optimizer, scaler, rt, settings,
                                0, 0, lambda *a: None)
        sync()
        return time.perf_counter() - start

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        elif rt.device.type == "hpu":
            torch.hpu.synchronize()

    run(warmup if warmup is not None else 2 if rt.device.type == "cpu" else 10)  # and compile
    return steps * batch_size / run(steps)


class GpuUtilisation:
    """Mean utilisation.gpu that nvidia-smi reports, sampled every half second."""

    def __init__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self.stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def end_to_end(a):
    """main.py for --steps steps from PNGs, then from the store; images/s of the training loop."""
    from store import open_store, prepare_store
    if open_store(a.data_dir, 256) is None:
        prepare_store(a.data_dir, 256)
    results = {}
    train_one_epoch = fitting.train_one_epoch  # main.py's name for it is timed below
    for path, flags in (("PNG", ["--no-store"]), ("store", [])):
        epochs = []

        def timed(*args, **kwargs):
            stats = train_one_epoch(*args, **kwargs)
            epochs.append(stats)
            return stats

        main.train_one_epoch = timed
        argv = ["--data-dir", a.data_dir, "--pretrained", "none", "--amp", "--channels-last",
                "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--epochs", "1000",
                "--max-steps", str(a.steps), "--device", a.device,
                "--out-dir", tempfile.mkdtemp(prefix="chexnet-bench-"), *flags]
        with GpuUtilisation() as gpu:
            main.main(argv)
        images = sum(e["images"] for e in epochs)
        seconds = sum(e["seconds"] for e in epochs)
        results[path] = (images / seconds, gpu.mean)
    main.train_one_epoch = train_one_epoch
    print(f"\nmain.py --amp --channels-last, batch {a.batch_size}, {a.workers} workers, "
          f"{a.steps} steps on {a.data_dir}")
    print(f"{'path':<8}{'images/s':>10}{'GPU util %':>12}")
    for path, (rate, util) in results.items():
        print(f"{path:<8}{rate:>10.1f}{util:>12.0f}")
    print(f"store / PNG: {results['store'][0] / results['PNG'][0]:.1f}x")


def main_():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    p.add_argument("--compile", action="store_true", help="also measure torch.compile variants")
    p.add_argument("--data-dir", default=None, help="train for real on this data directory")
    p.add_argument("--workers", type=int, default=8, help="loader workers (with --data-dir)")
    a = p.parse_args()
    if a.data_dir:
        return end_to_end(a)
    rt = setup(a.device)
    name = (torch.cuda.get_device_name() if rt.device.type == "cuda"
            else f"{cpu_name()}, {torch.get_num_threads()} threads" if rt.device.type == "cpu"
            else rt.device.type)
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

"""Training throughput (images/s) of main.py's training step at 224x224.

    python benchmarks/training.py [--steps 6] [--batch-size 16] [--device auto]
    python benchmarks/training.py --data-dir DIR [--steps 200] [--workers 8]

The first form runs fitting.train_one_epoch on in-memory batches (the model's number, not the
data loader's) for fp32, channels_last, bf16 autocast and both, and prints one table with the
variant main.py picks by default on this device marked, and why (runtime.decide_precision; a
default that is none of the four, fp16 on a GPU without bf16, gets its own row); add
--compile to also try torch.compile. The second trains for real with main.py (its default
precision) on DIR, once decoding PNGs and once from the preprocessed store (prepared first if
missing), and reports images/s and, on NVIDIA GPUs, the mean GPU utilisation.
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
from fitting import StepSettings  # noqa: E402
from model import build_model  # noqa: E402
from runtime import decide_precision, device_type, probe_hardware, setup  # noqa: E402

# Explicit every way: main.py's defaults depend on the hardware (runtime.decide_precision).
VARIANTS = {"fp32": ["--no-amp", "--no-channels-last"],
            "channels_last": ["--no-amp", "--channels-last"],
            "bf16 autocast": ["--amp", "--amp-dtype", "bf16", "--no-channels-last"],
            "bf16 + channels_last": ["--amp", "--amp-dtype", "bf16", "--channels-last"]}


def precision_of(flags, device_type):
    """The Precision main.py trains in with these flags on this machine's `device_type`."""
    args = main.get_args([*flags])
    return decide_precision(probe_hardware(device_type), args.amp, args.channels_last,
                            args.amp_dtype).precision


def default_variant(device_type):
    """(label, flags, Decision): the variant main.py picks by default here; a default that is
    none of VARIANTS (fp16 on a GPU without bf16) is labelled by its precision."""
    decision = decide_precision(probe_hardware(device_type))
    label = next((k for k, v in VARIANTS.items()
                  if precision_of(v, device_type) == decision.precision), None)
    if label is None:
        return str(decision.precision), [], decision
    return label, VARIANTS[label], decision


def throughput(flags, rt, steps, batch_size, crop, warmup=None):
    """Images/s of fitting.train_one_epoch on in-memory batches, after `warmup` steps; flags
    left out take main.py's default on this device."""
    args = main.get_args(["--batch-size", str(batch_size), "--crop-size", str(crop), *flags])
    precision = decide_precision(probe_hardware(rt.device.type), args.amp, args.channels_last,
                                 args.amp_dtype).precision
    settings = StepSettings(precision)
    torch.manual_seed(0)
    model = build_model(pretrained="none").to(rt.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = (torch.compile(model, backend="hpu_backend" if rt.device.type == "hpu" else "inductor")
           if args.compile else model)  # as main.py compiles
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(rt.device.type if rt.device.type != "hpu" else "cpu",
                                  enabled=precision.uses_scaler)  # as main.py's
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
        argv = ["--data-dir", a.data_dir, "--pretrained", "none",
                "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--epochs", "1000",
                "--max-steps", str(a.steps), "--device", a.device,
                "--out-dir", tempfile.mkdtemp(prefix="chexnet-bench-"), *flags]
        with GpuUtilisation() as gpu:
            main.main(argv)
        images = sum(e["images"] for e in epochs)
        seconds = sum(e["seconds"] for e in epochs)
        results[path] = (images / seconds, gpu.mean)
    main.train_one_epoch = train_one_epoch
    print(f"\nmain.py in its default precision here, {precision_of([], device_type(a.device))}, "
          f"batch {a.batch_size}, {a.workers} workers, {a.steps} steps on {a.data_dir}")
    print(f"{'path':<8}{'images/s':>10}{'GPU util %':>12}")
    for path, (rate, util) in results.items():
        print(f"{path:<8}{rate:>10.1f}{util:>12.0f}")
    print(f"store / PNG: {results['store'][0] / results['PNG'][0]:.1f}x")


def main_(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    p.add_argument("--compile", action="store_true", help="also measure torch.compile variants")
    p.add_argument("--data-dir", default=None, help="train for real on this data directory")
    p.add_argument("--workers", type=int, default=8, help="loader workers (with --data-dir)")
    a = p.parse_args(argv)
    if a.data_dir:
        return end_to_end(a)
    rt = setup(a.device)
    hw = probe_hardware(rt.device.type)
    name = (f"{hw.name}, compute capability {'.'.join(map(str, hw.cuda_capability))}"
            if rt.device.type == "cuda" else
            f"{hw.name}, {torch.get_num_threads()} threads; AMX {'yes' if hw.amx else 'no'}, "
            f"AVX512-BF16 {'yes' if hw.avx512_bf16 else 'no'}" if rt.device.type == "cpu"
            else rt.device.type)
    print(f"DenseNet-121 training step, {a.crop_size}x{a.crop_size}, batch {a.batch_size}, {name}, "
          f"torch {torch.__version__}")
    chosen, chosen_flags, decision = default_variant(rt.device.type)
    variants = dict(VARIANTS)
    if chosen not in variants:
        variants[chosen] = chosen_flags
    if a.compile:
        variants.update({f"{k} + compile": v + ["--compile"] for k, v in list(variants.items())})
    print(f"{'variant':<28}{'images/s':>10}")
    rates = {}
    for label, flags in variants.items():
        rates[label] = throughput(flags, rt, a.steps, a.batch_size, a.crop_size)
        print(f"{label:<28}{rates[label]:>10.1f}" + ("  <- main.py's default here"
                                                    if label == chosen else ""), flush=True)
    print(f"main.py's default here: {chosen} ({decision.reason}); "
          f"{rates[chosen] / rates['fp32']:.2f}x fp32's images/s")
    return rates


if __name__ == "__main__":
    main_()

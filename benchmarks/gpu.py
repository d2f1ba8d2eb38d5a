"""Measure an accelerator in one command, in at most 8 minutes: a Markdown table to paste.

    python benchmarks/gpu.py                  # the first CUDA GPU
    python benchmarks/gpu.py --hpu            # an Intel Gaudi (inside its PyTorch container)
    python benchmarks/gpu.py --tiny           # a toy-sized run (automatic on a CPU): tests use it

Rows: DenseNet-121 training images/s at 224x224 (fitting.train_one_epoch on in-memory batches,
forward + backward + Adam) in fp32, bf16 autocast, bf16 + channels_last and bf16 +
channels_last + torch.compile, each at the largest batch of --batch-sizes that fits, and
main.py's default precision on this device against fp32 (a note: the gain, or that there is
none; a row of its own where the default is none of these, fp16 on a GPU without bf16); the
training loader's images/s (main.py's default workers) decoding PNGs and reading the 512 store
(is the loader faster than the step?); ten-crop evaluation images/s of `infer.py --mode torch`
(a random-weights checkpoint, PNGs decoded by its workers); and each row's peak device memory.
The table goes to stdout and to --out (default gpu_benchmark.md). The training code is
benchmarks/training.py's, the loader code benchmarks/data_loading.py's.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import data_loading  # noqa: E402
import training  # noqa: E402

from common import atomic_write_text  # noqa: E402
from runtime import setup  # noqa: E402

# torch.OutOfMemoryError from torch 2.5; torch.cuda's before (a Gaudi container may be older)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
BUDGET_S = 480  # the whole command, the 8 minutes
BF16 = ["--amp", "--amp-dtype", "bf16"]
TRAIN = {"fp32": ["--no-amp", "--no-channels-last"],
         "AMP bf16": [*BF16, "--no-channels-last"],
         "AMP bf16 + channels_last": [*BF16, "--channels-last"],
         "AMP bf16 + channels_last + torch.compile": [*BF16, "--channels-last", "--compile"]}


class Device:
    """Peak memory and synchronisation of the device under test."""

    def __init__(self, rt):
        self.rt, self.type = rt, rt.device.type
        self.api = {"cuda": getattr(torch, "cuda", None),
                    "hpu": getattr(torch, "hpu", None)}.get(self.type)

    @property
    def name(self):
        if self.type == "cuda":
            return torch.cuda.get_device_name(self.rt.device)
        if self.type == "hpu":
            try:
                return f"Intel Gaudi ({torch.hpu.get_device_name()})"
            except (AttributeError, RuntimeError):
                return "Intel Gaudi"
        return f"{data_loading.cpu_name()}, {torch.get_num_threads()} threads"

    def reset_peak(self):
        if self.api is not None and hasattr(self.api, "reset_peak_memory_stats"):
            self.api.reset_peak_memory_stats()

    def peak_gib(self):
        if self.api is None or not hasattr(self.api, "max_memory_allocated"):
            return None
        return self.api.max_memory_allocated() / 2 ** 30

    def free(self):
        import gc
        gc.collect()
        if self.type == "cuda":
            torch.cuda.empty_cache()

    def out_of_memory(self, exc):
        return isinstance(exc, OUT_OF_MEMORY) or "out of memory" in str(exc).lower()


def train_row(device, flags, batch_sizes, steps, crop):
    """(batch, images/s, peak GiB) at the largest batch that fits, or a reason for none."""
    for batch in batch_sizes:
        device.free()
        device.reset_peak()
        try:
            rate = training.throughput(flags, device.rt, steps, batch, crop,
                                       warmup=2 if device.type == "cpu" else 5)
            return batch, rate, device.peak_gib()
        except (RuntimeError, OUT_OF_MEMORY) as e:
            if not device.out_of_memory(e):
                raise
    return None, None, None


def default_row(device, rows, batch_sizes, steps, crop):
    """(rows, note): main.py's default precision on this device against fp32. The default is
    one of the training rows, or (fp16 on a GPU without bf16) a row of its own after them."""
    label, _, decision = training.default_variant(device.type)
    precision = decision.precision
    index = next((i for i, (name, flags) in enumerate(TRAIN.items()) if "--compile" not in flags
                  and training.precision_of(flags, device.type) == precision), None)
    if index is None:
        batch, rate, peak = train_row(device, [], batch_sizes, steps, crop)
        rows = rows[:len(TRAIN)] + [(f"train, {precision} (main.py's default)", batch, rate,
                                     peak)] + rows[len(TRAIN):]
        index = len(TRAIN)
    fp32, default = rows[0], rows[index]
    says = f"main.py's default here: {default[0].removeprefix('train, ')} ({decision.reason})"
    if index == 0:
        return rows, f"{says}: fp32 itself, nothing to gain over it on this device"
    if fp32[2] is None or default[2] is None:
        return rows, f"{says}: not compared, a row did not run"
    gain = default[2] / fp32[2]
    return rows, (f"{says}: {gain:.2f}x fp32's images/s (batch {default[1]} vs {fp32[1]})"
                  + ("" if gain >= 1.05 else ": no gain over fp32 here"))


def sample_paths(images, n):
    """The PNGs to load: --images (NIH's 1024x1024 sample) if there, else the bundled 256x256
    sample, enough times over to make n."""
    found = sorted(Path(images).glob("*.png")) if images else []
    source = "NIH 1024x1024 PNGs"
    if not found:
        found, source = sorted((REPO / "sample" / "images").glob("*.png")), "256x256 sample PNGs"
    return found[:n], source


def loader_rows(paths, workers, crop, passes):
    """Training-loader images/s from the PNGs and from the 512 store (prepared here)."""
    from dataset import XrayDataset
    from store import open_store, prepare_store
    torch.set_num_threads(1)  # what each loader worker gets; restored by the caller
    root = data_loading.throwaway_data_dir(paths)
    prepare_store(root, (512,), progress=False)
    rates = {}
    for label, store in (("PNG", None), ("store 512", open_store(root, 512))):
        ds = XrayDataset(root, root / "list.txt", "train", 512, crop=crop, store=store)
        rates[label] = data_loading.loader_throughput(ds, workers,
                                                      passes=passes if store else 1)
    return root, rates


def eval_row(device, root, crop, resize, batch, workers, n, flags=("--amp", "--channels-last"),
             probs=None):
    """Ten-crop images/s of infer.py --mode torch on root's images (random weights); the
    probabilities go to the list `probs` if given."""
    import infer
    from dataset import ImageList
    from labels import NIH_CLASSES
    from model import build_model
    torch.manual_seed(0)
    checkpoint = root / "random.pt"
    torch.save({"model": build_model(pretrained="none").state_dict(),
                "class_names": list(NIH_CLASSES)}, checkpoint)
    args = infer.get_args(["--mode", "torch", "--checkpoint", str(checkpoint), "--data-dir",
                           str(root), "--batch-size", str(batch), "--workers", str(workers),
                           "--resize", str(resize), "--crop-size", str(crop), *flags])
    images = ImageList(root, root / "list.txt", resize, None, False, None)
    from backends import TorchPredictor
    from runtime import autocast
    predictor = TorchPredictor(checkpoint, images, device.rt, crop, batch, workers,
                               args.channels_last,
                               lambda: autocast(device.rt.device.type, args.amp, args.amp_dtype))
    indices = list(range(min(n, len(images))))
    predictor(indices[:batch])  # warm-up
    device.reset_peak()
    start = time.perf_counter()
    out, _ = predictor(indices)
    seconds = time.perf_counter() - start
    if probs is not None:
        probs.append(out)
    return len(indices) / seconds, device.peak_gib()


def markdown(device, rows, notes):
    lines = [f"Device: **{device.name}**; torch {torch.__version__}; {os.cpu_count()} host cores.",
             "", "| measurement | batch | images/s | peak memory GiB |", "| --- | --- | --- | --- |"]
    for label, batch, rate, peak in rows:
        lines.append(f"| {label} | {batch if batch is not None else '-'} | "
                     f"{'-' if rate is None else f'{rate:.1f}'} | "
                     f"{'-' if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv=None):
    import main as training_main
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    p.add_argument("--hpu", action="store_true", help="shorthand for --device hpu")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes (automatic on a CPU): checks the command, measures nothing")
    p.add_argument("--batch-sizes", default="256,128,64,32,16",
                   help="training batches tried, largest first, until one fits")
    p.add_argument("--eval-batch", type=int, default=32, help="images (10 crops each) per batch")
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample/images"))
    p.add_argument("--n", type=int, default=240, help="images for the loader and evaluation rows")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds; torch.compile is left out when too little is left for it")
    p.add_argument("--out", default="gpu_benchmark.md")
    a = p.parse_args(argv)
    started = time.perf_counter()
    if a.hpu:
        a.device = "hpu"
    rt = setup(a.device)
    device = Device(rt)
    tiny = a.tiny or rt.device.type == "cpu"
    crop, resize = (32, 36) if tiny else (224, 256)
    batch_sizes = [2] if tiny else [int(b) for b in a.batch_sizes.split(",")]
    steps, n = (1, 4) if tiny else (20, a.n)
    workers = training_main.get_args([]).workers  # main.py's default
    notes = [f"training: {steps} timed steps at {crop}x{crop} after a warm-up, in-memory "
             "batches (benchmarks/training.py); the largest batch of "
             f"{','.join(map(str, batch_sizes))} that fits"]
    if tiny:
        notes.insert(0, "TINY run (toy sizes, a check of the command): these numbers measure "
                        "nothing")
    rows = []
    print(f"{device.name}: measuring (budget {a.budget:.0f} s)", flush=True)
    for label, flags in TRAIN.items():
        left = a.budget - (time.perf_counter() - started)
        if "--compile" in flags and (tiny or left < 180):
            why = "a tiny run" if tiny else f"{left:.0f} s of the budget left"
            notes.append(f"{label}: left out, {why} (compiling DenseNet-121 takes minutes)")
            rows.append((f"train, {label}", None, None, None))
            continue
        batch, rate, peak = train_row(device, flags, batch_sizes, steps, crop)
        rows.append((f"train, {label}", batch, rate, peak))
        print(f"  {rows[-1]}", flush=True)
    rows, note = default_row(device, rows, batch_sizes, steps, crop)
    notes.append(note)
    paths, source = sample_paths(a.images, n)
    threads = torch.get_num_threads()
    root, rates = loader_rows(paths, workers, crop, passes=1 if tiny else 5)
    torch.set_num_threads(threads)
    rows += [(f"loader, {label} ({workers} workers)", 16, rate, None)
             for label, rate in rates.items()]
    notes.append(f"loader: main.py's training loader, batch 16, {len(paths)} {source}; the "
                 "store row reads the 512x512 store `python dataset.py prepare --size 512` "
                 "writes; compare with the training rows: the slower of the two sets the pace")
    eval_batch = 2 if tiny else a.eval_batch
    rate, peak = eval_row(device, root, crop, resize, eval_batch, workers, n)
    rows.append((f"ten-crop eval, --mode torch --amp --channels-last ({workers} workers)",
                 eval_batch, rate, peak))
    notes.append(f"ten-crop eval: infer.py's TorchPredictor on {len(paths)} {source}, decode + "
                 f"Resize({resize}) + TenCrop({crop}) + model; a random-weights checkpoint")
    notes.append(f"measured in {time.perf_counter() - started:.0f} s: "
                 f"`python benchmarks/gpu.py{' --hpu' if rt.device.type == 'hpu' else ''}`")
    table = markdown(device, rows, notes)
    print("\n" + table)
    atomic_write_text(a.out, table, "benchmark table")
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()

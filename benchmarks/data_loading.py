"""Data-loading throughput of the training transform from full-size NIH PNGs.

    python benchmarks/data_loading.py [--images ../shared/data/nih_sample/images] [--n 240]

Prints images/s for 0, 1 and 2 DataLoader workers (batch 16, RandomResizedCrop 224 + flip,
the training path of main.py). The baseline that the preprocessed store is measured against.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dataset import ChestXray14, collate  # noqa: E402


def loader_throughput(dataset, workers, batch_size=16):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, shuffle=False)
    start, seen = time.perf_counter(), 0
    for images, _, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def png_dataset(image_dir, n, crop):
    """A throwaway data directory linking to the PNGs, with a list file of the first n."""
    names = sorted(p.name for p in Path(image_dir).glob("*.png"))[:n]
    root = Path(tempfile.mkdtemp(prefix="chexnet-bench-"))
    os.symlink(Path(image_dir).resolve(), root / "images")
    (root / "list.txt").write_text("".join(f"{n} " + "0 " * 13 + "0\n" for n in names))
    return ChestXray14(root, root / "list.txt", mode="train", crop=crop)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample/images"))
    parser.add_argument("--n", type=int, default=240, help="images per measurement")
    parser.add_argument("--crop-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each loader worker gets
    dataset = png_dataset(args.images, args.n, args.crop_size)
    with Image.open(dataset.image_dir / dataset.names[0]) as first:
        size = "x".join(map(str, first.size))
    print(f"{len(dataset)} PNGs of {size}, training transform, batch 16, {os.cpu_count()} cores")
    print(f"{'workers':>8} {'images/s':>10}")
    for workers in (0, 1, 2):
        print(f"{workers:>8} {loader_throughput(dataset, workers):>10.1f}")


if __name__ == "__main__":
    main()

"""Data-loading throughput: decoding full-size NIH PNGs versus the preprocessed store.

    python benchmarks/data_loading.py [--images ../shared/data/nih_sample/images] [--n 240]

Prints images/s of main.py's training loader (batch 16) with 0, 1 and 2 workers, from PNGs
(decode 1024x1024 -> RandomResizedCrop 224 + flip, uint8) and from the store that
`python dataset.py prepare` writes (a memmap row of 256x256 uint8 + a crop box; the crop,
resize and normalisation run on the accelerator). The last column runs that device-side
finish on this CPU too, as an upper bound of its cost where there is no accelerator.
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
from dataset import (ChestXray14, StoreDataset, collate, open_store, prepare_store,  # noqa: E402
                     to_model_input)


def loader_throughput(dataset, workers, finish=None, passes=1, batch_size=16):
    """images/s over `passes` passes of the dataset (the store needs many to time)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate,
                                         sampler=list(range(len(dataset))) * passes)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        if finish is not None:
            finish(batch)
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample/images"))
    parser.add_argument("--n", type=int, default=240, help="images per measurement")
    parser.add_argument("--crop-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each loader worker gets

    # A throwaway data directory: links to the first n PNGs and a list file of them.
    names = sorted(p.name for p in Path(args.images).glob("*.png"))[:args.n]
    root = Path(tempfile.mkdtemp(prefix="chexnet-bench-"))
    (root / "images").mkdir()
    for n in names:
        os.symlink(Path(args.images).resolve() / n, root / "images" / n)
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    (root / "list.txt").write_text("".join(f"{n} " + "0 " * 13 + "0\n" for n in names))
    start = time.perf_counter()
    prepare_store(root, 256, progress=False)
    prepare_seconds = time.perf_counter() - start
    store = open_store(root, 256)

    png = ChestXray14(root, root / "list.txt", mode="train", crop=args.crop_size, raw=True)
    stored = StoreDataset(store, root / "list.txt", mode="train", crop=args.crop_size)

    def finish(batch):
        to_model_input(batch[0], batch[3], args.crop_size)

    with Image.open(png.image_dir / names[0]) as first:
        size = "x".join(map(str, first.size))
    print(f"{len(names)} NIH PNGs of {size}, training loader, batch 16, {os.cpu_count()} cores; "
          f"store prepared in {prepare_seconds:.1f} s ({len(names) / prepare_seconds:.0f} images/s)")
    print(f"{'workers':>8}{'PNG img/s':>12}{'store img/s':>13}{'ratio':>8}{'store+finish img/s':>20}")
    for workers in (0, 1, 2):
        a = loader_throughput(png, workers)
        b = loader_throughput(stored, workers, passes=20)
        c = loader_throughput(stored, workers, finish, passes=2)
        print(f"{workers:>8}{a:>12.1f}{b:>13.1f}{b / a:>7.1f}x{c:>20.1f}", flush=True)


if __name__ == "__main__":
    main()

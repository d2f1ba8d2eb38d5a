"""Training crops: what each source resolution keeps of the image, and how fast each path
loads them.

    python benchmarks/data_loading.py [--images ../shared/data/nih_sample/images] [--n 240]

Table 1, detail: RandomResizedCrop(224) boxes (torchvision's distribution, scale 0.08-1) drawn
once and cut from the image at 256, 512 and 1024 (the NIH original). For each source size: the
share of crops that are upsampled (the box is smaller than 224 pixels on a side), the median
and largest scale factor, and against the crop from the original: PSNR and the share of
high-frequency energy kept (mean squared Laplacian).

Table 2, speed: images/s of main.py's training loader (batch 16) with 0, 1 and 2 workers,
decoding PNGs (1024x1024 -> resize to the train size -> crop) versus reading the store that
`python dataset.py prepare` writes (a memmap row -> crop), and the cost of one crop.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dataset import XrayDataset, collate  # noqa: E402
from images import draw_train_box, fit_square, load_gray, train_crop, train_rng  # noqa: E402
from store import open_store, prepare_store  # noqa: E402


def cpu_name():
    return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                 if ln.startswith("model name")), "CPU")


def psnr(a, b):
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 10 * np.log10(255 ** 2 / mse) if mse else 99.0


def high_frequency(a):
    a = a.astype(float)
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return (lap ** 2).mean()


def detail_table(paths, crops_per_image=20, crop=224):
    sources = {s: [] for s in (256, 512, 1024)}
    for p in paths:
        image = load_gray(p)
        for s in sources:
            sources[s].append(fit_square(image, s))
    rows = {s: {"psnr": [], "hf": [], "up": [], "scale": []} for s in sources}
    for i in range(len(paths)):
        for k in range(crops_per_image):
            box, flip = draw_train_box(train_rng(0, k, i))
            reference = train_crop(sources[1024][i], box, flip, crop)
            for s in sources:
                c = train_crop(sources[s][i], box, flip, crop)
                rows[s]["psnr"].append(psnr(c, reference))
                rows[s]["hf"].append(high_frequency(c) / max(high_frequency(reference), 1e-9))
                rows[s]["scale"].append(crop / (min(box[2], box[3]) * s))
    print(f"\nTraining crops of {len(paths)} NIH images x {crops_per_image} boxes, "
          f"RandomResizedCrop({crop}, scale 0.08-1):")
    print(f"{'source':>8}{'upsampled':>11}{'median x':>10}{'max x':>8}{'PSNR dB':>9}"
          f"{'HF kept':>9}{'crop ms':>9}")
    for s, r in rows.items():
        scale = np.array(r["scale"])
        t = time.perf_counter()
        for i in range(len(paths)):
            box, flip = draw_train_box(train_rng(0, 0, i))
            train_crop(sources[s][i], box, flip, crop)
        ms = 1e3 * (time.perf_counter() - t) / len(paths)
        quality = ("-", "100%") if s == 1024 else (f"{np.median(r['psnr']):.1f}",
                                                     f"{np.median(r['hf']):.0%}")
        print(f"{s:>8}{np.mean(scale > 1):>10.0%} {np.median(scale):>9.2f}{scale.max():>8.2f}"
              f"{quality[0]:>9}{quality[1]:>9}{ms:>9.2f}")


def throwaway_data_dir(paths):
    """A temporary data directory: links to the PNGs and list.txt naming them (no labels)."""
    root = Path(tempfile.mkdtemp(prefix="chexnet-bench-"))
    (root / "images").mkdir()
    for p in paths:
        os.symlink(Path(p).resolve(), root / "images" / Path(p).name)
    (root / "list.txt").write_text("".join(f"{Path(p).name} " + "0 " * 13 + "0\n" for p in paths))
    return root


def loader_throughput(dataset, workers, passes=1, batch_size=16):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate,
                                         sampler=list(range(len(dataset))) * passes)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample/images"))
    parser.add_argument("--n", type=int, default=240, help="images per measurement")
    parser.add_argument("--crop-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each loader worker gets

    paths = sorted(Path(args.images).glob("*.png"))[:args.n]
    print(f"{os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}")
    detail_table(paths[:60])

    root = throwaway_data_dir(paths)
    start = time.perf_counter()
    prepare_store(root, (256, 512), progress=False)
    prepare_seconds = time.perf_counter() - start
    print(f"\nTraining loader, batch 16, {len(paths)} NIH PNGs (1024x1024); stores of 256 and 512 "
          f"prepared in {prepare_seconds:.1f} s ({len(paths) / prepare_seconds:.0f} images/s)")
    print(f"{'workers':>8}{'PNG->512':>10}{'store 512':>11}{'store 256':>11}  images/s")
    for workers in (0, 1, 2):
        rates = []
        for size, store in ((512, None), (512, open_store(root, 512)), (256, open_store(root, 256))):
            ds = XrayDataset(root, root / "list.txt", "train", size, crop=args.crop_size,
                             store=store)
            rates.append(loader_throughput(ds, workers, passes=1 if store is None else 5))
        print(f"{workers:>8}{rates[0]:>10.1f}{rates[1]:>11.1f}{rates[2]:>11.1f}", flush=True)


if __name__ == "__main__":
    main()

"""ChestX-ray14 for PyTorch: the Dataset (from PNGs or the preprocessed store), batches, and the
data command line.

    python dataset.py split --data-dir data --split random --split-seed 0
        writes a fresh patient-level split and prints where the lists are;
    python dataset.py check --data-dir data [--decode]
        checks every listed image is there (and decodes) before a long run;
    python dataset.py prepare --data-dir data [--size 256 512]
        decodes every image once into data/store/<size>/, which main.py then reads.

Importing this file needs only numpy and Pillow; torch is imported where used.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import ArgumentParser, DataError, add_split_args, one_line, os_reason, positive_int
from images import (CROP_RATIO, CROP_SCALE, crop_gray, draw_train_box, fit_square, load_gray,
                    normalize_gray, resize_shorter, train_crop, train_rng)
from labels import evaluation_labels, list_header, read_list, training_targets
from splitting import Data
from store import is_image, open_store
from tables import HOW_TO_GET_DATA, detect_dataset, find_label_table

# Where training crops come from: the image resized to TRAIN_SIZE (512: see the README's
# "Training crops" table; 1024 is the NIH original), evaluation crops from EVAL_SIZE.
TRAIN_SIZE, EVAL_SIZE = 512, 256


def check_data_dir(data_dir, dataset=None):
    """Fail fast, before any long work, on a data directory that cannot be used. dataset: the
    kind of data set it holds where the caller knows it (Data.dataset); detected otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir}/ not found: {HOW_TO_GET_DATA}")
    dataset = dataset or detect_dataset(data_dir)
    if dataset != "nih":  # CheXpert, MIMIC: their lists name every image
        return
    image_dir = data_dir / "images"
    try:
        pngs = image_dir.is_dir() and any(is_image(image_dir / n) for n in os.listdir(image_dir))
    except OSError as e:
        raise DataError(f"{image_dir}/: cannot list images ({os_reason(e)})") from None
    if not pngs:
        raise DataError(f"{image_dir}/: no images (PNG, JPEG or DICOM); {HOW_TO_GET_DATA}")
    find_label_table(data_dir)


def check_images_present(image_dir, names, list_path):
    """Every listed image is there: one directory listing for NIH's flat images/, a look
    per file for the nested layouts of CheXpert and MIMIC."""
    flat = [n for n in names if "/" not in n]
    try:
        present = set(os.listdir(image_dir)) if flat else set()
    except OSError as e:
        raise DataError(f"{image_dir}/: cannot list images ({os_reason(e)})") from None
    missing = [n for n in names if (n not in present if "/" not in n
                                    else not os.path.isfile(image_dir / n))]
    if missing:
        raise DataError(f"{list_path}: {len(missing)} of {len(names)} listed images are missing "
                        f"from {image_dir}/, e.g. {', '.join(missing[:3])}")


class ImageList:
    """The images of one list file, read from a store (a store.Store of `size`) when given,
    else decoded from the PNGs: the same pixels either way. Torch-free: infer.py's OpenVINO
    modes read their evaluation crops through it too.

    skip_bad_images: an unreadable image raises SkippedImage (a warning is printed) instead
    of DataError, and the caller leaves it out."""

    def __init__(self, data_dir, list_path, size=EVAL_SIZE, store=None, skip_bad_images=False,
                 limit=None):
        self.class_names, images = list_header(list_path)
        self.image_dir = Path(data_dir) / images
        self.names, self.raw_labels = read_list(list_path)
        if limit:
            self.names, self.raw_labels = self.names[:limit], self.raw_labels[:limit]
        # (N, K): NIH's uint8 0/1, else float32 with NaN where an uncertain label is left out
        self.labels = evaluation_labels(self.raw_labels)
        self.size, self.store, self.skip_bad_images = size, store, skip_bad_images
        if store is None:
            check_images_present(self.image_dir, self.names, list_path)
            return
        if store.size != size:
            raise ValueError(f"store of {store.size} for images of {size}")
        missing = [n for n in self.names if n not in store.row]
        if missing:
            raise DataError(f"{list_path}: {len(missing)} listed images are not in the store "
                            f"{store.dir}/, e.g. {', '.join(missing[:3])}")
        unreadable = [n for n in self.names if n in store.skipped]
        if unreadable and not skip_bad_images:
            raise DataError(f"{self.image_dir / unreadable[0]}: unreadable image (skipped when "
                            f"{store.dir}/ was prepared; {len(unreadable)} in {list_path}); "
                            "fix it and run `python dataset.py prepare` again, or pass "
                            "--skip-bad-images to skip them")

    def __len__(self):
        return len(self.names)

    def source(self, index, square):
        """The (H, W) uint8 image crops are taken from: a store row (a view of the memmap) or
        the decoded PNG resized to `size` (with square, centre-cropped to a square, as the
        store holds it)."""
        name = self.names[index]
        if self.store is not None:
            if name in self.store.skipped:
                self._unreadable(DataError(f"{self.image_dir / name}: unreadable image (skipped "
                                           "when the store was prepared)"))
            return self.store.array[self.store.row[name]]
        image = self.load(index)
        return fit_square(image, self.size) if square else np.asarray(resize_shorter(image, self.size))

    def load(self, index):
        """The original image (8-bit grayscale PIL image) of the list's image `index`; an
        unreadable one raises DataError, or SkippedImage with a warning under skip_bad_images."""
        try:
            return load_gray(self.image_dir / self.names[index])
        except DataError as e:
            self._unreadable(e)

    def _unreadable(self, error):
        if not self.skip_bad_images:
            raise error
        print(f"warning: skipping {error}", file=sys.stderr, flush=True)
        raise SkippedImage(str(error)) from None

    def eval_crops(self, index, crop, ten_crop=True):
        """(10 or 1, crop, crop) uint8: Resize(size) -> TenCrop / CenterCrop."""
        return crop_gray(self.source(index, square=False), crop, ten_crop)


def split_images(data, part, use_store=True, skip_bad_images=False, limit=None, log=None):
    """(list path, ImageList) of one part of the resolved split of `data` (splitting.Data):
    evaluation's and export's images at data.resize, from the store of that size where
    `dataset.py prepare` made one."""
    store = open_store(data.data_dir, data.resize, dataset=data.dataset) if use_store else None
    if store is not None and log is not None:
        log(f"reading the preprocessed store {store.dir}/")
    path = data.lists[part]
    return path, ImageList(data.data_dir, path, data.resize, store, skip_bad_images, limit)


class SkippedImage(DataError):
    """An unreadable image left out under --skip-bad-images."""


class XrayDataset(ImageList):
    """Map-style dataset over one list file: item = (image, labels float32 [14], name).

    mode 'train': RandomResizedCrop + flip from the image at `size` (--train-size);
    'ten_crop' / 'center': Resize(size) (--resize) -> TenCrop / CenterCrop. Items are uint8,
    one channel: (1, crop, crop), or (10, 1, crop, crop) for ten-crop, 12x less to copy than
    float RGB; `to_model_input` finishes them on the device. normalize=True gives the float32
    3-channel ImageNet-normalised tensors instead (the CPU reference).

    From the store or the PNGs, the same pixels, and the same training crops from the same
    seed: crops are drawn as fractions of the image from (seed, epoch, index) alone.

    skip_bad_images: an unreadable image is skipped with a warning. In training it is replaced
    by the next readable image of the list, so every batch stays full and every DDP rank takes
    the same steps; in evaluation the item is None (dropped by `collate`).
    """

    def __init__(self, data_dir, list_path, mode="train", size=EVAL_SIZE, crop=224, seed=0,
                 skip_bad_images=False, limit=None, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO,
                 store=None, normalize=False, uncertain="ones"):
        if mode not in ("train", "ten_crop", "center"):
            raise ValueError(f"unknown mode {mode!r}")
        super().__init__(data_dir, list_path, size, store, skip_bad_images, limit)
        if mode == "train":  # NaN: an entry the loss ignores (--uncertain ignore)
            self.labels = training_targets(self.raw_labels, uncertain)
        self.mode, self.crop, self.normalize = mode, crop, normalize
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        import torch
        drawn = index
        for _ in range(len(self)):
            try:
                gray = self.source(index, square=self.mode == "train")
                break
            except SkippedImage:
                if self.mode != "train":
                    return None
                index = (index + 1) % len(self)
        else:
            raise DataError(f"{self.image_dir}/: no readable image in the list")
        labels = torch.from_numpy(self.labels[index].astype(np.float32))
        if self.mode == "train":
            h, w = gray.shape
            box, flip = draw_train_box(train_rng(self.seed, self.epoch, drawn), w / h,
                                       self.crop_scale, self.crop_ratio)
            crops = train_crop(gray, box, flip, self.crop)[None]  # (1, crop, crop)
        else:
            crops = crop_gray(gray, self.crop, self.mode == "ten_crop")  # (10 or 1, crop, crop)
        x = torch.from_numpy(normalize_gray(crops) if self.normalize
                             else np.array(crops)[:, None])  # a writable copy
        return (x[0] if self.mode != "ten_crop" else x), labels, self.names[index]


def collate(batch):
    """default_collate without the images skipped as unreadable (None); None if all were."""
    from torch.utils.data import default_collate
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


_NORMALISATION = {}  # device -> (255 * mean, 255 * std) as (3, 1, 1): made once, kept there


def to_model_input(x):
    """On the device: uint8 single-channel images -> ImageNet-normalised 3-channel float.
    x: (B, 1, H, W) or (B, 10, 1, h, w) uint8; a float tensor is returned as it is."""
    import torch

    from images import IMAGENET_MEAN, IMAGENET_STD
    if x.dtype != torch.uint8:
        return x
    if x.device not in _NORMALISATION:
        _NORMALISATION[x.device] = tuple(
            torch.from_numpy(255.0 * v).view(3, 1, 1).to(x.device)
            for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORMALISATION[x.device]
    return (x.float() - mean) / std  # (..., 1, H, W) broadcast to (..., 3, H, W)


def add_data_args(parser):
    """The data flags of the scripts that read images: the split's, then the crops'."""
    add_split_args(parser)
    parser.add_argument("--resize", type=positive_int, default=EVAL_SIZE,
                        help=f"evaluation resize (default {EVAL_SIZE})")
    parser.add_argument("--crop-size", type=positive_int, default=224, help="crop size (default 224)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use the first N images of a split")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images with a warning instead of stopping")


def check(data, decode=False, workers=None, skip_bad_images=False):
    """Check a data directory against its resolved split (splitting.Data) before a long run:
    every listed image present and, with decode, every one decodable. Returns {split: image
    count}."""
    check_data_dir(data.data_dir, data.dataset)
    counts = {}
    for split, path in data.lists.items():
        image_dir = Path(data.data_dir) / list_header(path)[1]
        names, _ = read_list(path)
        check_images_present(image_dir, names, path)
        counts[split] = len(names)
        if decode:
            from concurrent.futures import ProcessPoolExecutor
            paths = [image_dir / n for n in names]
            with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
                bad = [msg for msg in pool.map(_decode_error, paths, chunksize=64) if msg]
            if bad and not skip_bad_images:
                raise DataError(f"{bad[0]} ({len(bad)} unreadable image(s) in {path})")
            for msg in bad:
                print(f"warning: skipping {msg}", file=sys.stderr)
            counts[split] -= len(bad)
    return counts


def _decode_error(path):
    try:
        load_gray(path).load()
    except DataError as e:
        return str(e)
    return None


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    split = sub.add_parser("split", help="write a split's list files and print where they are")
    add_data_args(split)
    check_cmd = sub.add_parser("check", help="check that every listed image is present "
                               "(and with --decode, readable) before a long run")
    add_data_args(check_cmd)
    check_cmd.add_argument("--decode", action="store_true", help="decode every image too")
    check_cmd.add_argument("--workers", type=positive_int, default=None)
    prepare = sub.add_parser("prepare", help="decode every image once into the preprocessed "
                             "store that training and evaluation read (resumable)")
    prepare.add_argument("--data-dir", default="data")
    prepare.add_argument("--size", type=positive_int, nargs="+", default=[EVAL_SIZE, TRAIN_SIZE],
                         help=f"stored resolutions: main.py's --resize ({EVAL_SIZE}) and "
                              f"--train-size ({TRAIN_SIZE}) by default")
    prepare.add_argument("--workers", type=positive_int, default=None,
                         help="processes (default: all cores)")
    prepare.add_argument("--skip-bad-images", action="store_true",
                         help="leave unreadable images out of the store with a warning")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from store import prepare_store
            data = Data(args.data_dir)
            check_data_dir(data.data_dir, data.dataset)
            start = time.perf_counter()
            done = prepare_store(data.data_dir, args.size, args.workers,
                                 progress=sys.stderr.isatty(),
                                 skip_bad_images=args.skip_bad_images, dataset=data.dataset)
            for size, (directory, written, skipped) in sorted(done.items()):
                print(f"{directory}/: {size}x{size}, {written} images decoded now"
                      + (f", {len(skipped)} unreadable left out" if skipped else "")
                      + f" ({time.perf_counter() - start:.1f} s)")
            return
        data = Data(args.data_dir, args.split, args.split_seed, args.keep_laterals, args.resize,
                    args.crop_size).resolved()
        if args.command == "split":
            for s, path in data.lists.items():
                print(f"{s:<5} {len(read_list(path)[0]):>7} images  {path}")
        else:
            counts = check(data, args.decode, args.workers, args.skip_bad_images)
            print(f"{args.data_dir}: ok, " + ", ".join(f"{n} {s}" for s, n in counts.items())
                  + (" images decoded" if args.decode else " images present"))
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to continue")


if __name__ == "__main__":
    main()

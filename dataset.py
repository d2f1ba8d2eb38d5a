"""NIH ChestX-ray14: labels, patient-level splits, decoding, transforms and the Dataset.

Importing this file needs only numpy and Pillow: pandas (label tables) and torch (the
Dataset) are imported where used, so the OpenVINO edge path in infer.py shares the exact
evaluation preprocessing without torch installed, and stats.py starts fast.

Command line:
    python dataset.py split --data-dir data --split random --split-seed 0
        writes a fresh patient-level split and prints where the lists are;
    python dataset.py check --data-dir data [--decode]
        checks every listed image is there (and decodes) before a long run;
    python dataset.py prepare --data-dir data [--size 256]
        decodes every image once into data/store/256/, which main.py then reads.
"""
import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "test")
REPO_DIR = Path(__file__).resolve().parent
SHIPPED_SPLIT_DIR = REPO_DIR / "splits" / "chexnet"  # the published CheXNet lists
SHIPPED_LABEL_TABLE = REPO_DIR / "nih" / "Data_Entry_2017_v2020.csv.gz"
# Both NIH revisions, newest first; either may be gzipped.
LABEL_TABLE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
                     "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
HOW_TO_GET_DATA = ("run `bash batch_download.sh` to fetch ChestX-ray14 (42 GB), "
                   "or pass --data-dir sample to use the bundled 200-image sample")


class DataError(Exception):
    """Bad input data; the message is one line naming the file (and line) at fault."""


def one_line(exc):
    """The last line of an error message: DataLoader workers re-raise errors with the worker's
    traceback folded into the message, and the user needs only the original line."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    # The worker's traceback ends with "dataset.DataError: <message>".
    return re.sub(rf"^([\w.]*\.)?{type(exc).__name__}: ", "", last)


def atomic_write_text(path, text):
    """Write a file so that a crash never leaves it half-written (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from the rest of the team
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def patient_of(name):
    """NIH image names are <8-digit patient id>_<3-digit follow-up>.png."""
    return int(name.split("_", 1)[0])


# ---------------------------------------------------------------------------------------------
# Label table (Data_Entry_2017.csv / Data_Entry_2017_v2020.csv)

def find_label_table(data_dir):
    for name in LABEL_TABLE_NAMES:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise DataError(f"{data_dir}: no label table (expected {LABEL_TABLE_NAMES[0]} or "
                    f"{LABEL_TABLE_NAMES[1]}); {HOW_TO_GET_DATA}")


def read_label_table(path):
    """Returns (names, patient_ids int64 [N], labels uint8 [N, 14]) in file order.

    The 2017 file ends every line with a comma (pandas sees an extra 'Unnamed: 11' column);
    the 2020 revision does not. Only the three columns used here are required.
    """
    import pandas as pd

    needed = ["Image Index", "Finding Labels", "Patient ID"]
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read label table ({one_line(e)})") from None
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(f"{path}: label table lacks column(s) {', '.join(map(repr, missing))}")
    findings = table["Finding Labels"].str.split("|")
    known = set(CLASS_NAMES) | {"No Finding"}
    labels = np.zeros((len(table), NUM_CLASSES), dtype=np.uint8)
    column = {c: i for i, c in enumerate(CLASS_NAMES)}
    for row, diseases in enumerate(findings):
        for disease in diseases:
            if disease not in known:
                raise DataError(f"{path}:{row + 2}: unknown disease {disease!r} in Finding Labels "
                                f"(expected {', '.join(CLASS_NAMES)} or 'No Finding')")
            if disease != "No Finding":
                labels[row, column[disease]] = 1
    try:
        patients = table["Patient ID"].astype(np.int64).to_numpy()
    except ValueError:
        bad = next(i for i, p in enumerate(table["Patient ID"]) if not p.strip().isdigit())
        raise DataError(f"{path}:{bad + 2}: Patient ID {table['Patient ID'][bad]!r} "
                        "is not a number") from None
    return table["Image Index"].tolist(), patients, labels


# ---------------------------------------------------------------------------------------------
# List files: "<image name> <14 space-separated 0/1>", one line per image

def read_list(path):
    """Returns (names, labels uint8 [N, 14])."""
    names, rows = [], []
    try:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != NUM_CLASSES + 1 or not all(v in ("0", "1") for v in fields[1:]):
                    raise DataError(f"{path}:{line_no}: expected an image name and {NUM_CLASSES} "
                                    f"labels of 0/1, got {line.strip()[:80]!r}")
                names.append(fields[0])
                rows.append(fields[1:])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({e})") from None
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names, np.array(rows, dtype=np.uint8).reshape(-1, NUM_CLASSES)


def write_list(path, names, labels):
    """Write a list file atomically; an identical file is left untouched (a split made again
    from the same table and seed does not change its files' times)."""
    path = Path(path)
    text = "".join(f"{n} {' '.join(map(str, row))}\n" for n, row in zip(names, labels.tolist()))
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Splits

def patient_split(patients, fractions=(0.7, 0.1, 0.2), seed=0):
    """Assign whole patients to train/val/test so each split holds ~fractions of the images.

    Deterministic: patients are shuffled by a seeded generator from their sorted ids, then
    filled into train until it holds fractions[0] of the images, then val, then test.
    Returns {split: sorted image indices}.
    """
    patients = np.asarray(patients)
    unique, counts = np.unique(patients, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    cum = np.cumsum(counts[order])
    # A patient goes to the first split whose image quota is not yet filled when it starts.
    start = cum - counts[order]
    bounds = np.cumsum(fractions)[:-1] * len(patients)
    which = np.searchsorted(bounds, start, side="right")
    split_of_patient = dict(zip(unique[order].tolist(), which.tolist()))
    assignment = np.array([split_of_patient[p] for p in patients.tolist()])
    return {s: np.flatnonzero(assignment == i) for i, s in enumerate(SPLITS)}


def make_random_split(data_dir, seed=0, fractions=(0.7, 0.1, 0.2)):
    """A fresh patient-level split of the data directory's label table, written (atomically,
    only where it changed) to <data-dir>/splits/random-seed<seed>/."""
    table = find_label_table(data_dir)
    names, patients, labels = read_label_table(table)
    tag = "" if tuple(fractions) == (0.7, 0.1, 0.2) else "-" + "-".join(
        f"{round(100 * f)}" for f in fractions)
    out = Path(data_dir) / "splits" / f"random-seed{seed}{tag}"
    order = np.argsort(names, kind="stable")
    names, patients, labels = [names[i] for i in order], patients[order], labels[order]
    for split, idx in patient_split(patients, fractions, seed).items():
        write_list(out / f"{split}_list.txt", [names[i] for i in idx], labels[idx])
    return out


def make_official_split(data_dir, seed=0, val_fraction=0.125):
    """NIH's own train_val_list.txt / test_list.txt, with val carved out of train_val by patient
    (1/8 of train_val by default, which makes the whole ~70/10/20)."""
    data_dir = Path(data_dir)
    table = find_label_table(data_dir)
    names, patients, labels = read_label_table(table)
    row_of = {n: i for i, n in enumerate(names)}
    official = {}
    for part in ("train_val", "test"):
        path = data_dir / f"{part}_list.txt"
        if not path.is_file():
            raise DataError(f"{path}: not found (NIH's official split lists ship with the data; "
                            "`bash batch_download.sh` fetches them)")
        with open(path) as f:
            listed = [ln.strip() for ln in f if ln.strip()]
        unknown = [n for n in listed if n not in row_of]
        if unknown:
            raise DataError(f"{path}: {len(unknown)} image(s) not in {table.name}, "
                            f"e.g. {', '.join(unknown[:3])}")
        official[part] = np.array(sorted(row_of[n] for n in listed), dtype=np.int64)
    trainval = official["train_val"]
    carve = patient_split(patients[trainval], (1 - val_fraction, val_fraction, 0.0), seed)
    out = data_dir / "splits" / f"official-seed{seed}"
    rows = {"train": trainval[carve["train"]], "val": trainval[carve["val"]],
            "test": official["test"]}
    for split, idx in rows.items():
        write_list(out / f"{split}_list.txt", [names[i] for i in idx], labels[idx])
    return out


def resolve_split(split="auto", data_dir=None, seed=0):
    """Where the list files of a split live: {'train': Path, 'val': Path, 'test': Path}.

    split:
      auto     the data directory's own lists (<data-dir>/train_list.txt ...) if it has them
               (the bundled sample does), else the shipped CheXNet split
      chexnet  the published CheXNet lists shipped in splits/chexnet/
      random   a fresh seeded patient-level 70/10/20 split of <data-dir>'s label table
      official NIH's train_val_list.txt / test_list.txt, val carved out by patient
      DIR      a directory holding train_list.txt, val_list.txt, test_list.txt
    """
    if split == "auto":
        own = data_dir is not None and all((Path(data_dir) / f"{s}_list.txt").is_file()
                                           for s in SPLITS)
        directory = Path(data_dir) if own else SHIPPED_SPLIT_DIR
    elif split == "chexnet":
        directory = SHIPPED_SPLIT_DIR
    elif split in ("random", "official"):
        if data_dir is None or not Path(data_dir).is_dir():
            raise DataError(f"--split {split} needs a data directory with the label table "
                            f"({data_dir} not found); {HOW_TO_GET_DATA}")
        make = make_random_split if split == "random" else make_official_split
        directory = make(data_dir, seed=seed)
    else:
        directory = Path(split)
        if not directory.is_dir():
            raise DataError(f"--split {split}: not auto, chexnet, random, official "
                            "or a directory of list files")
    lists = {s: directory / f"{s}_list.txt" for s in SPLITS}
    for path in lists.values():
        if not path.is_file():
            raise DataError(f"{path}: list file not found")
    return lists


# ---------------------------------------------------------------------------------------------
# Images and preprocessing

def check_data_dir(data_dir):
    """Fail fast, before any long work, on a data directory that cannot be used."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir}/ not found: {HOW_TO_GET_DATA}")
    image_dir = data_dir / "images"
    if not image_dir.is_dir() or not any(n.endswith(".png") for n in os.listdir(image_dir)):
        raise DataError(f"{image_dir}/: no PNG images; {HOW_TO_GET_DATA}")
    find_label_table(data_dir)


def check_images_present(image_dir, names, list_path):
    present = set(os.listdir(image_dir))
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(f"{list_path}: {len(missing)} of {len(names)} listed images are missing "
                        f"from {image_dir}/, e.g. {', '.join(missing[:3])}")


def load_gray(path):
    """Decode an image as 8-bit single-channel (H, W). NIH ships 8-bit grayscale PNGs and a few
    RGBA ones whose colour channels are equal and alpha opaque, so one channel loses nothing;
    it is replicated to the 3 channels the ImageNet-initialised model expects at the end."""
    try:
        with Image.open(path) as im:
            return im.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({one_line(e)})") from None


def resize_shorter(img, size):
    """torchvision.transforms.Resize(int) on a PIL image: shorter side to `size`, bilinear."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


def normalize_gray(gray_u8):
    """(..., H, W) uint8 -> (..., 3, H, W) float32, ImageNet-normalised per channel."""
    x = gray_u8.astype(np.float32)[..., None, :, :] / 255.0
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def crop_gray(gray, crop, ten_crop=True):
    """Crops of a resized (H, W) uint8 array, as torchvision's TenCrop / CenterCrop take them.

    Returns (10, crop, crop) uint8 for ten-crop (corners and centre of the image, then of its
    mirror image) or (1, crop, crop) for the centre crop.
    """
    h, w = gray.shape
    if h < crop or w < crop:
        raise ValueError(f"crop {crop} is larger than the resized image {w}x{h}")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    centre = gray[top:top + crop, left:left + crop]
    if not ten_crop:
        return centre[None]
    five = [gray[:crop, :crop], gray[:crop, w - crop:], gray[h - crop:, :crop],
            gray[h - crop:, w - crop:], centre]
    return np.stack(five + [c[:, ::-1] for c in (five[1], five[0], five[3], five[2], five[4])])


def eval_input(path, resize=256, crop=224, ten_crop=True):
    """The evaluation protocol for one image file: Resize(resize) -> TenCrop(crop) (or centre
    crop) -> ImageNet normalisation. Returns (10 or 1, 3, crop, crop) float32."""
    gray = np.asarray(resize_shorter(load_gray(path), resize))
    return normalize_gray(crop_gray(gray, crop, ten_crop))


def train_transform(crop=224, crop_scale=0.08, raw=False):
    """Random resized crop + horizontal flip on the single-channel PIL image, then
    (3, crop, crop) float32 normalised, or with raw (1, crop, crop) uint8."""
    from torchvision import transforms
    steps = [transforms.RandomResizedCrop(crop, scale=(crop_scale, 1.0)),
             transforms.RandomHorizontalFlip(),
             transforms.PILToTensor()]  # (1, crop, crop) uint8
    return transforms.Compose(steps if raw else steps + [_GrayToNormalizedRGB()])


class _GrayToNormalizedRGB:
    def __call__(self, gray_u8):
        import torch
        return torch.from_numpy(normalize_gray(gray_u8.numpy()[0]))


@contextmanager
def _seeded(seed, epoch, index):
    """Augmentation randomness from (seed, epoch, image index) alone, not from the global
    generator, so workers, restarts and resumed runs draw exactly the same crops."""
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF)
        yield


class ChestXray14:
    """Map-style dataset over one list file, decoding PNGs: item = (image, labels float32 [14],
    name).

    mode 'train': random resized crop + flip -> (3, crop, crop); 'ten_crop': (10, 3, crop, crop);
    'center': (3, crop, crop), float32 ImageNet-normalised. With raw=True the same pixels come
    as single-channel uint8, (1, crop, crop) or (10, 1, crop, crop): 12x less to copy to the
    device, where `to_model_input` finishes them (main.py's path).
    Random augmentation is seeded from (seed, epoch, index) so a resumed run sees exactly the
    pixels an uninterrupted one would.
    With skip_bad_images an unreadable image yields None (dropped by `collate`) and a warning.
    """

    def __init__(self, data_dir, list_path, mode="train", resize=256, crop=224, seed=0,
                 skip_bad_images=False, limit=None, crop_scale=0.08, raw=False):
        self.image_dir = Path(data_dir) / "images"
        self.names, self.labels = read_list(list_path)
        if limit:
            self.names, self.labels = self.names[:limit], self.labels[:limit]
        check_images_present(self.image_dir, self.names, list_path)
        if mode not in ("train", "ten_crop", "center"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.resize, self.crop, self.raw = mode, resize, crop, raw
        self.transform = train_transform(crop, crop_scale, raw) if mode == "train" else None
        self.seed, self.epoch = seed, 0
        self.skip_bad_images = skip_bad_images

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        import torch
        path = self.image_dir / self.names[index]
        try:
            img = load_gray(path)
        except DataError as e:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping {e}")
            return None
        labels = torch.from_numpy(self.labels[index].astype(np.float32))
        if self.mode == "train":
            with _seeded(self.seed, self.epoch, index):
                x = self.transform(img)
        else:
            gray = np.asarray(resize_shorter(img, self.resize))
            x = _eval_tensor(crop_gray(gray, self.crop, self.mode == "ten_crop"), self.mode,
                             self.raw)
        return x, labels, self.names[index]


def _eval_tensor(crops_u8, mode, raw):
    """(n, crop, crop) uint8 crops -> the evaluation item of `mode`."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(crops_u8)[:, None] if raw else normalize_gray(crops_u8))
    return x[0] if mode == "center" else x


# ---------------------------------------------------------------------------------------------
# The preprocessed store: every image decoded once, resized, kept as one uint8 memmap

class Store:
    """<data-dir>/store/<size>/: images.u8 (N, size, size) uint8, names.txt (row order) and
    meta.json, written last, which marks the store complete."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.size, self.count = self.meta["size"], self.meta["count"]
        self.names = (self.dir / "names.txt").read_text().split()
        self.row = {n: i for i, n in enumerate(self.names)}
        self._array = None

    @property
    def array(self):
        # Opened lazily, so each loader worker maps the file itself instead of pickling it.
        if self._array is None:
            self._array = np.memmap(self.dir / "images.u8", np.uint8, "r",
                                    shape=(self.count, self.size, self.size))
        return self._array


def store_dir(data_dir, size):
    return Path(data_dir) / "store" / str(size)


def open_store(data_dir, size):
    """The complete store for this image size, None if there is none, or a DataError when one
    is there but partial or stale: a store is never used silently."""
    directory = store_dir(data_dir, size)
    if not directory.is_dir():
        return None
    how = f"run `python dataset.py prepare --data-dir {data_dir} --size {size}`"
    if not (directory / "meta.json").is_file():
        raise DataError(f"{directory}/: incomplete store (preparation was interrupted); {how} "
                        "to finish it, or pass --no-store to read the PNGs")
    store = Store(directory)
    expected = store.count * size * size
    if (len(store.names) != store.count or not (directory / "images.u8").is_file()
            or (directory / "images.u8").stat().st_size != expected):
        raise DataError(f"{directory}/: damaged store (sizes do not match meta.json); "
                        f"delete it and {how}")
    pngs = sorted(n for n in os.listdir(Path(data_dir) / "images") if n.endswith(".png"))
    if pngs != store.names:
        raise DataError(f"{directory}/: stale store ({store.count} images, {data_dir}/images/ "
                        f"has {len(pngs)} different ones); {how} to bring it up to date")
    return store


def _store_rows(job):
    """Loader-pool work: decode, resize and write rows [(row, path)] of the partial store."""
    partial, count, size, rows = job
    array = np.memmap(partial, np.uint8, "r+", shape=(count, size, size))
    for row, path in rows:
        gray = resize_shorter(load_gray(path), size)
        w, h = gray.size  # NIH images are square; others are centre-cropped to a square
        left, top = (w - size) // 2, (h - size) // 2
        array[row] = np.asarray(gray.crop((left, top, left + size, top + size)))
    array.flush()
    return [row for row, _ in rows]


def prepare_store(data_dir, size=256, workers=None, progress=True):
    """Decode every PNG of <data-dir>/images once, in parallel, into the store. Resumable: rows
    already written are kept (done.partial) when the same images are prepared again; the
    store only counts as complete once meta.json is written (atomically, last)."""
    from multiprocessing import Pool
    from tqdm import tqdm

    check_data_dir(data_dir)
    image_dir = Path(data_dir) / "images"
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    directory = store_dir(data_dir, size)
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / "meta.json"
    if meta.is_file():
        if (directory / "names.txt").read_text().split() == names:
            return directory, 0
        meta.unlink()  # stale: the images changed; prepare anew
    partial, done_path = directory / "images.u8.partial", directory / "done.partial"
    names_path = directory / "names.txt.partial"
    same = names_path.is_file() and names_path.read_text().split() == names
    if not same or not partial.is_file() or not done_path.is_file():
        for path in (partial, done_path):
            path.unlink(missing_ok=True)
        atomic_write_text(names_path, "\n".join(names) + "\n")
        np.memmap(partial, np.uint8, "w+", shape=(len(names), size, size)).flush()
        np.zeros(len(names), np.uint8).tofile(done_path)
    done = np.fromfile(done_path, np.uint8)
    todo = np.flatnonzero(done == 0)
    chunk = 64
    jobs = [(str(partial), len(names), size,
             [(int(r), str(image_dir / names[r])) for r in todo[i:i + chunk]])
            for i in range(0, len(todo), chunk)]
    last_save = time.monotonic()

    def save_done():
        tmp = done_path.with_suffix(".tmp")
        done.tofile(tmp)
        os.replace(tmp, done_path)

    with Pool(workers or os.cpu_count()) as pool, tqdm(
            total=len(names), initial=len(names) - len(todo), unit="img",
            desc=f"store {size}x{size}", disable=not progress) as bar:
        try:
            for rows in pool.imap_unordered(_store_rows, jobs):
                done[rows] = 1
                bar.update(len(rows))
                if time.monotonic() - last_save > 5:
                    save_done()
                    last_save = time.monotonic()
        finally:
            save_done()
    os.replace(partial, directory / "images.u8")
    os.replace(names_path, directory / "names.txt")
    atomic_write_text(meta, json.dumps({"size": size, "count": len(names),
                                        "source": str(image_dir)}) + "\n")
    done_path.unlink()
    return directory, len(todo)


class StoreDataset:
    """ChestXray14 read from the store: uint8 items, finished on the device by
    `to_model_input`. mode 'train' -> ((1, size, size) image, labels, name, crop box
    int64 [top, left, height, width, flip]); 'center' / 'ten_crop' -> the same crops the PNG
    path takes, as (1, crop, crop) / (10, 1, crop, crop) uint8."""

    def __init__(self, store, list_path, mode="train", crop=224, seed=0, limit=None,
                 crop_scale=0.08):
        self.store = store
        self.names, self.labels = read_list(list_path)
        if limit:
            self.names, self.labels = self.names[:limit], self.labels[:limit]
        missing = [n for n in self.names if n not in store.row]
        if missing:
            raise DataError(f"{list_path}: {len(missing)} listed images are not in the store "
                            f"{store.dir}/, e.g. {', '.join(missing[:3])}")
        self.rows = [store.row[n] for n in self.names]
        self.mode, self.crop, self.crop_scale = mode, crop, crop_scale
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        import torch
        gray = self.store.array[self.rows[index]]  # (size, size) uint8, a view of the memmap
        labels = torch.from_numpy(self.labels[index].astype(np.float32))
        if self.mode != "train":
            return _eval_tensor(crop_gray(gray, self.crop, self.mode == "ten_crop"), self.mode,
                                True), labels, self.names[index]
        # numpy's generator, seeded per image: far cheaper than forking torch's global one,
        # which is what lets one loader worker feed a GPU.
        rng = np.random.default_rng([self.seed, self.epoch, index])
        box = random_resized_crop_box(*gray.shape, (self.crop_scale, 1.0), rng)
        flip = int(rng.random() < 0.5)
        return (torch.from_numpy(np.array(gray))[None], labels, self.names[index],
                torch.tensor([*box, flip]))


def random_resized_crop_box(height, width, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawn from a numpy Generator:
    (top, left, crop height, crop width)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback, as torchvision: the whole image, clamped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_model_input(x, boxes=None, crop=None):
    """On the device: uint8 single-channel images -> ImageNet-normalised 3-channel float.

    x: (B, 1, H, W) or (B, 10, 1, h, w) uint8 (already float and 3-channel: returned as is).
    boxes (store training batches): (B, 5) [top, left, height, width, flip] per image: each box
    is cropped, resized to crop x crop (bilinear, antialiased, as PIL does) and maybe flipped.
    """
    import torch
    import torch.nn.functional as F
    if x.dtype != torch.uint8:
        return x
    x = x.float().div_(255.0)
    if boxes is not None:
        out = torch.empty(x.shape[0], 1, crop, crop, device=x.device)
        for b, (top, left, height, width, flip) in enumerate(boxes.tolist()):
            patch = F.interpolate(x[b:b + 1, :, top:top + height, left:left + width],
                                  size=(crop, crop), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            out[b] = patch.flip(-1) if flip else patch
        x = out
    mean = torch.as_tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std  # (..., 1, H, W) broadcast to (..., 3, H, W)


def roc_aucs(labels, probs):
    """Per-disease ROC-AUC (float64 [14]); NaN where the images hold a single class, for
    which AUC is undefined. labels, probs: [N, 14]."""
    from sklearn.metrics import roc_auc_score
    labels, probs = np.asarray(labels), np.asarray(probs)
    return np.array([roc_auc_score(labels[:, k], probs[:, k])
                     if 0 < labels[:, k].sum() < len(labels) else np.nan
                     for k in range(labels.shape[1])])


def mean_auc(aucs):
    """Mean over the diseases whose AUC is defined (NaN if none is)."""
    aucs = np.asarray(aucs)
    return float(aucs[~np.isnan(aucs)].mean()) if (~np.isnan(aucs)).any() else float("nan")


def collate(batch):
    """default_collate without the images skipped as unreadable (None); None if all were."""
    from torch.utils.data import default_collate
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def add_data_args(parser):
    """The data flags every script shares."""
    parser.add_argument("--data-dir", default="data",
                        help="ChestX-ray14 directory: images/ and the label table (default: data)")
    parser.add_argument("--split", default="auto",
                        help="auto | chexnet | random | official | DIR with the three list files "
                             "(default auto: the data dir's own lists, else the CheXNet split)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the random/official patient-level split")
    parser.add_argument("--resize", type=int, default=256, help="evaluation resize (default 256)")
    parser.add_argument("--crop-size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of a split")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images with a warning instead of stopping")


def check(data_dir, lists, decode=False, workers=None, skip_bad_images=False):
    """Check a data directory against a split before a long run: every listed image present
    and, with decode, every one decodable. Returns {split: image count}."""
    check_data_dir(data_dir)
    image_dir = Path(data_dir) / "images"
    counts = {}
    for split, path in lists.items():
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="write a split's list files and print where they are")
    add_data_args(split)
    check_cmd = sub.add_parser("check", help="check that every listed image is present "
                               "(and with --decode, readable) before a long run")
    add_data_args(check_cmd)
    check_cmd.add_argument("--decode", action="store_true", help="decode every image too")
    check_cmd.add_argument("--workers", type=int, default=None)
    prepare = sub.add_parser("prepare", help="decode every image once into the preprocessed "
                             "store that training and evaluation read (resumable)")
    prepare.add_argument("--data-dir", default="data")
    prepare.add_argument("--size", type=int, default=256,
                         help="stored resolution; must equal main.py's --resize (256, or 512)")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            start = time.perf_counter()
            directory, written = prepare_store(args.data_dir, args.size, args.workers,
                                               progress=sys.stderr.isatty())
            store = open_store(args.data_dir, args.size)
            print(f"{directory}/: {store.count} images at {args.size}x{args.size} "
                  f"({written} decoded now, {time.perf_counter() - start:.1f} s)")
            return
        lists = resolve_split(args.split, args.data_dir, args.split_seed)
        if args.command == "split":
            for s, path in lists.items():
                print(f"{s:<5} {len(read_list(path)[0]):>7} images  {path}")
        else:
            counts = check(args.data_dir, lists, args.decode, args.workers, args.skip_bad_images)
            print(f"{args.data_dir}: ok, " + ", ".join(f"{n} {s}" for s, n in counts.items())
                  + (" images decoded" if args.decode else " images present"))
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()

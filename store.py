"""The preprocessed store: every image decoded once, resized, kept as one uint8 memmap.

<data-dir>/store/<size>/
    images.u8    (N, size, size) uint8: images.fit_square(image, size) of every image
    names.txt    the N image names, row order (sorted)
    meta.json    {"size", "count", "source", "skipped"}, written last: it marks the store complete

`python dataset.py prepare` writes it (resumable, several sizes from one decode); training reads
its training crops from the store of --train-size and its validation crops from the store of
--resize, the same pixels as from the PNGs.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import DataError, atomic_write_text, is_disk_full, os_reason
from images import IMAGE_SUFFIXES, fit_square, is_dicom, load_gray
from tables import detect_dataset

DONE, SKIPPED = 1, 2  # states of a row in done.partial (0: still to do)


class Store:
    def __init__(self, directory, meta, names):
        self.dir = Path(directory)
        self.size, self.count = meta["size"], meta["count"]
        self.names = names
        self.skipped = set(meta.get("skipped", []))  # unreadable when prepared (--skip-bad-images)
        self.row = {n: i for i, n in enumerate(names)}
        self._array = None

    @property
    def array(self):
        # Opened lazily, so each loader worker maps the file itself instead of pickling it.
        if self._array is None:
            self._array = np.memmap(self.dir / "images.u8", np.uint8, "r",
                                    shape=(self.count, self.size, self.size))
        return self._array

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def store_dir(data_dir, size):
    return Path(data_dir) / "store" / str(size)


def source_dir(data_dir, dataset=None):
    """Where the images are: NIH's flat images/, or the data directory itself for the nested
    layouts of CheXpert (train/patient*/...) and MIMIC-CXR-JPG (files/p*/...). dataset: the
    kind of data set, where the caller knows it (splitting.Data.dataset); detected otherwise."""
    dataset = dataset or detect_dataset(data_dir)
    return Path(data_dir) / "images" if dataset == "nih" else Path(data_dir)


def is_image(path):
    """A name the store takes: .png/.jpg/.jpeg/.dcm/.dicom, or a DICOM whatever its name
    (its DICM marker read only for names without one of those suffixes)."""
    name = str(path).lower()
    if name.endswith(IMAGE_SUFFIXES):
        return True
    return not name.endswith((".csv", ".txt", ".gz", ".json", ".md")) and is_dicom(path)


def _one_line(name):
    """A name with a line break, or bytes that are not UTF-8, can be in no list file and no
    names.txt: not an image here."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\n" not in name and "\r" not in name


def image_names(data_dir, dataset=None):
    """Every image of the data set, as the list files name it (relative to source_dir)."""
    image_dir = source_dir(data_dir, dataset)
    try:
        if image_dir.name == "images":
            return sorted(n for n in os.listdir(image_dir)
                          if _one_line(n) and is_image(image_dir / n))
        names = []
        for top in sorted(os.listdir(image_dir)):
            if top in ("store", "splits") or not (image_dir / top).is_dir():
                continue
            for root, dirs, files in os.walk(image_dir / top):
                dirs.sort()
                rel = Path(root).relative_to(image_dir).as_posix()
                names += [f"{rel}/{f}" for f in sorted(files)
                          if _one_line(f"{rel}/{f}") and is_image(Path(root) / f)]
        return names
    except OSError as e:
        raise DataError(f"{image_dir}/: cannot list images ({os_reason(e)})") from None


def read_names(path):
    """names.txt: one name per line, read back exactly (a name may hold spaces: never split on
    whitespace). The one reader of the file; write_names is its one writer."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else (text.split("\n") if text else [])


def names_text(names):
    return "".join(f"{n}\n" for n in names)


def _read_meta(directory):
    """meta.json as a dict, or None when it is missing, unreadable or lacks a key."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        skipped = meta.get("skipped", []) if isinstance(meta, dict) else None
        if (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("count"), int) and isinstance(skipped, list)
                and all(isinstance(n, str) for n in skipped)):
            return meta
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        pass
    return None


def open_store(data_dir, size, names=None, dataset=None):
    """The complete store for this image size, None if there is none, or a DataError when one
    is there but partial, damaged or stale: a store is never used silently.
    names: the sorted PNG names of <data-dir>/images (listed here if not given); dataset: as
    source_dir's."""
    directory = store_dir(data_dir, size)
    if not directory.is_dir():
        return None
    how = f"run `python dataset.py prepare --data-dir {data_dir} --size {size}`"
    if not (directory / "meta.json").exists():
        raise DataError(f"{directory}/: incomplete store (preparation was interrupted); {how} "
                        "to finish it, or pass --no-store to read the PNGs")
    meta = _read_meta(directory)
    if meta is None or meta["size"] != size:
        raise DataError(f"{directory}/meta.json: damaged store metadata; {how} to repair it")
    try:
        stored = read_names(directory / "names.txt")
        nbytes = (directory / "images.u8").stat().st_size
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{directory}/: damaged store ({os_reason(e)}); {how} to repair it") from None
    if len(stored) != meta["count"] or nbytes != meta["count"] * size * size:
        raise DataError(f"{directory}/: damaged store (sizes do not match meta.json); {how} "
                        "to repair it")
    names = image_names(data_dir, dataset) if names is None else names
    if names != stored:
        raise DataError(f"{directory}/: stale store ({len(stored)} images, {data_dir}/images/ "
                        f"has {len(names)} different ones); {how} to bring it up to date")
    return Store(directory, meta, stored)


# ---------------------------------------------------------------------------------------------
# Preparation

def _store_rows(job):
    """Loader-pool work: decode each image once and write its row into every size that still
    needs it. Returns (rows done, [(row, error message)] for unreadable images)."""
    targets, rows, skip_bad = job
    files = {size: os.open(path, os.O_WRONLY) for size, path in targets.items()}
    done, bad = [], []
    try:
        for row, path, sizes in rows:
            try:
                image = load_gray(path)
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append((row, str(e)))
                continue
            for size in sizes:
                data = fit_square(image, size).tobytes()
                os.pwrite(files[size], data, row * size * size)
            done.append(row)
    finally:
        for fd in files.values():
            os.close(fd)
    return done, bad


class _Partial:
    """One size's preparation state: images.u8.partial (rows written with pwrite, so a full
    disk is an error, never a SIGBUS from a memory map), done.partial (0 to do, 1 done,
    2 skipped as unreadable) and names.txt.partial."""

    def __init__(self, directory, size, names):
        self.dir, self.size, self.names = directory, size, names
        self.data = directory / "images.u8.partial"
        self.done_path = directory / "done.partial"
        names_path = directory / "names.txt.partial"
        nbytes = len(names) * size * size
        try:
            same = (names_path.is_file() and read_names(names_path) == names
                    and self.data.is_file() and self.done_path.is_file()
                    and self.done_path.stat().st_size == len(names)
                    # each row's state is 0, 1 or 2: anything else is a damaged file
                    and np.fromfile(self.done_path, np.uint8).max(initial=0) <= SKIPPED)
        except (OSError, ValueError):
            same = False
        try:
            if not same:
                for path in (self.data, self.done_path):
                    path.unlink(missing_ok=True)
                self.data.touch()
                np.zeros(len(names), np.uint8).tofile(self.done_path)
                atomic_write_text(names_path, names_text(names), "store names")
            # Reserve the disk space now: a full disk fails here, before any decoding.
            fd = os.open(self.data, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            if not same:  # a file of nothing but the failed reservation: give the space back
                for path in (self.data, self.done_path, names_path):
                    path.unlink(missing_ok=True)
            raise DataError(f"{self.data}: cannot reserve {nbytes / 1e9:.2f} GB for the "
                            f"{size}x{size} store ({os_reason(e)})") from None
        self.done = np.fromfile(self.done_path, np.uint8)

    def save_done(self):
        tmp = self.done_path.with_suffix(".tmp")
        self.done.tofile(tmp)
        os.replace(tmp, self.done_path)

    def finish(self, source):
        skipped = [self.names[i] for i in np.flatnonzero(self.done == SKIPPED)]
        os.replace(self.data, self.dir / "images.u8")
        os.replace(self.dir / "names.txt.partial", self.dir / "names.txt")
        atomic_write_text(self.dir / "meta.json", json.dumps(
            {"size": self.size, "count": len(self.names), "source": str(source),
             "skipped": skipped}) + "\n", "store metadata")
        self.done_path.unlink()
        return skipped


MAX_SIZE = 8192


def retry_skipped(store, image_dir):
    """Images a complete store left out as unreadable are tried again (they may have been
    fixed): readable ones get their rows and leave meta.json's list. Returns (images decoded
    now, names still skipped)."""
    fixed = []
    for name in sorted(store.skipped):
        try:
            row = fit_square(load_gray(image_dir / name), store.size)
        except DataError:
            continue
        with open(store.dir / "images.u8", "r+b") as f:
            f.seek(store.row[name] * store.size * store.size)
            f.write(row.tobytes())
        fixed.append(name)
    if fixed:  # the rows are written first: until meta.json changes they are never read
        meta = json.loads((store.dir / "meta.json").read_text())
        meta["skipped"] = sorted(store.skipped - set(fixed))
        atomic_write_text(store.dir / "meta.json", json.dumps(meta) + "\n", "store metadata")
    return len(fixed), sorted(store.skipped - set(fixed))


def prepare_store(data_dir, sizes=(256,), workers=None, progress=True, skip_bad_images=False,
                  dataset=None):
    """Decode every image (PNG, JPEG, DICOM) of <data-dir>/images once, in parallel, into the store of each size.
    Resumable: rows already written are kept when the same images are prepared again; a store
    only counts as complete once its meta.json is written (atomically, last). A complete store
    of the same images is left alone; a stale or damaged one is prepared anew.
    Returns {size: (directory, images decoded now, names skipped as unreadable)}. dataset: as
    source_dir's."""
    from multiprocessing import Pool

    from tqdm import tqdm

    dataset = dataset or detect_dataset(data_dir)  # once, for both
    image_dir = source_dir(data_dir, dataset)
    names = image_names(data_dir, dataset)
    if not names:
        raise DataError(f"{image_dir}/: no images (PNG, JPEG or DICOM)")
    for size in sizes:
        if size > MAX_SIZE:
            raise DataError(f"--size {size}: larger than {MAX_SIZE} (NIH's images are 1024x1024)")
    result, partials, todo_sizes = {}, {}, []
    for size in sorted(set(sizes)):
        directory = store_dir(data_dir, size)
        complete = None
        if _read_meta(directory) is not None:
            try:
                complete = open_store(data_dir, size, names)
            except DataError:
                complete = None
        if complete is not None:
            result[size] = (directory, *retry_skipped(complete, image_dir))
        else:
            todo_sizes.append(size)
    # Room for every store still to prepare, before anything is written.
    need = 0
    for size in todo_sizes:
        partial = store_dir(data_dir, size) / "images.u8.partial"
        have = partial.stat().st_blocks * 512 if partial.is_file() else 0
        need += max(0, len(names) * size * size - have)
    root = Path(data_dir)
    free = shutil.disk_usage(root).free + sum(  # stale stores about to be replaced
        (store_dir(data_dir, s) / "images.u8").stat().st_blocks * 512 for s in todo_sizes
        if (store_dir(data_dir, s) / "images.u8").is_file())
    if need > free:
        raise DataError(f"{root / 'store'}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed "
                        f"for the {', '.join(f'{s}x{s}' for s in todo_sizes)} store; free some "
                        "space or prepare fewer or smaller sizes (--size)")
    for size in todo_sizes:
        directory = store_dir(data_dir, size)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{directory}: cannot create the store ({os_reason(e)})") from None
        (directory / "meta.json").unlink(missing_ok=True)  # stale or damaged: prepare anew
        for stale in ("images.u8", "names.txt"):
            (directory / stale).unlink(missing_ok=True)
        partials[size] = _Partial(directory, size, names)
    if not partials:
        return result

    need = np.zeros(len(names), bool)
    todo_of = {}
    for size, p in partials.items():
        need |= p.done == 0
        todo_of[size] = p.done == 0  # rows this run decodes
    todo = np.flatnonzero(need)
    chunk = 64
    targets = {size: str(p.data) for size, p in partials.items()}
    jobs = [(targets, [(int(r), str(image_dir / names[r]),
                        [s for s, p in partials.items() if p.done[r] == 0])
                       for r in todo[i:i + chunk]], skip_bad_images)
            for i in range(0, len(todo), chunk)]
    last_save = time.monotonic()

    def save_all():
        for p in partials.values():
            p.save_done()

    label = "+".join(f"{s}x{s}" for s in partials)
    try:
        with Pool(workers or os.cpu_count()) as pool, tqdm(
                total=len(names), initial=len(names) - len(todo), unit="img",
                desc=f"store {label}", disable=not progress) as bar:
            try:
                for rows, bad in pool.imap_unordered(_store_rows, jobs):
                    for p in partials.values():
                        p.done[rows] = DONE
                        p.done[[r for r, _ in bad]] = SKIPPED
                    for _, message in bad:
                        print(f"warning: skipping {message}", file=sys.stderr)
                    bar.update(len(rows) + len(bad))
                    if time.monotonic() - last_save > 5:
                        save_all()
                        last_save = time.monotonic()
            finally:
                save_all()
    except OSError as e:
        if is_disk_full(e):
            raise DataError(f"{store_dir(data_dir, next(iter(partials)))}: cannot write the store "
                            f"({os_reason(e)}); free space and run prepare again to resume"
                            ) from None
        raise
    for size, p in partials.items():
        skipped = p.finish(image_dir)
        result[size] = (p.dir, int((todo_of[size] & (p.done == DONE)).sum()), skipped)
    return result

"""Patient-level splits: made from a data set's table (random, official), shipped (CheXNet's)
or a directory of list files; resolved from --split, and checked so that no image and no
patient is in two splits. `Data`: the data an entry point works on, its split resolved once.

    split         three list files, train_list.txt, val_list.txt, test_list.txt
"""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common import REPO_DIR, DataError, one_line, os_reason
from labels import check_disjoint, list_header, write_list
from tables import (CHEXPERT_CLASSES, HOW_TO_GET_DATA, detect_dataset, find_label_table,
                    read_chexpert, read_label_table, read_mimic)

SPLITS = ("train", "val", "test")
# arnoweng/CheXNet's published 70/10/20 split (Stanford never released the paper's own).
SHIPPED_SPLIT_DIR = REPO_DIR / "splits" / "chexnet"


@dataclass(frozen=True)
class Data:
    """The facts about the data an entry point works on, resolved once from its flags and
    passed down: the directory, the kind of data set it holds ('nih', 'chexpert' or 'mimic':
    detected once, when this is made), the split (--split, --split-seed, --keep-laterals; once
    resolved(), its three list files and the classes they label), and the evaluation sizes
    (--resize, --crop-size; None where the entry point crops nothing: stats.py, report.py).
    data_dir stays as given: messages name it as the user wrote it."""
    data_dir: object = "data"
    split: str = "auto"
    split_seed: int = 0
    keep_laterals: bool = False
    resize: object = None
    crop_size: object = None
    dataset: str = None
    list_files: tuple = None  # (train, val, test) list paths, once resolved
    classes: tuple = None  # the classes they label, once resolved

    def __post_init__(self):
        if self.dataset is None:
            object.__setattr__(self, "dataset", dataset_of(self.data_dir))

    @property
    def lists(self):
        """{'train': Path, 'val': Path, 'test': Path}: the resolved split's list files."""
        if self.list_files is None:
            raise ValueError("the split is not resolved yet: Data.resolved() first")
        return dict(zip(SPLITS, self.list_files))

    def resolved(self):
        """A copy with the split resolved (resolve_split: made and written where it is made
        from the data set's tables, checked for leaks) and its classes read."""
        lists = resolve_split(self.split, self.data_dir, self.split_seed, self.keep_laterals,
                              self.dataset)
        return replace(self, list_files=tuple(lists[s] for s in SPLITS),
                       classes=tuple(list_header(lists["train"])[0]))


def dataset_of(data_dir):
    """The kind of data set a data directory holds (tables.detect_dataset); 'nih' where there
    is no such directory (the shipped split needs none)."""
    return detect_dataset(data_dir) if data_dir is not None and Path(data_dir).is_dir() else "nih"


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


def _write_split(out, rows, names, labels, flag):
    try:
        for split, idx in rows.items():
            write_list(out / f"{split}_list.txt", [names[i] for i in idx], labels[idx])
    except DataError as e:
        raise DataError(f"--split {flag}: {one_line(e)}; make the data directory writable or "
                        "write the lists elsewhere and pass --split DIR") from None
    return out


def make_random_split(data_dir, seed=0, fractions=(0.7, 0.1, 0.2)):
    """A fresh patient-level split of the data directory's label table, written (atomically,
    only where it changed) to <data-dir>/splits/random-seed<seed>/."""
    names, patients, labels = read_label_table(find_label_table(data_dir))
    tag = "" if tuple(fractions) == (0.7, 0.1, 0.2) else "-" + "-".join(
        f"{round(100 * f)}" for f in fractions)
    out = Path(data_dir) / "splits" / f"random-seed{seed}{tag}"
    order = np.argsort(names, kind="stable")
    names, patients, labels = [names[i] for i in order], patients[order], labels[order]
    return _write_split(out, patient_split(patients, fractions, seed), names, labels, "random")


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
            raise DataError(f"{path}: not found (NIH's official split lists ship with the data "
                            "on NIH's download page)")
        try:
            listed = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({os_reason(e)})") from None
        unknown = [n for n in listed if n not in row_of]
        if unknown:
            raise DataError(f"{path}: {len(unknown)} image(s) not in {table.name}, "
                            f"e.g. {', '.join(unknown[:3])}")
        if len(set(listed)) != len(listed):
            raise DataError(f"{path}: lists some images twice")
        official[part] = np.array(sorted(row_of[n] for n in listed), dtype=np.int64)
    if np.intersect1d(official["train_val"], official["test"]).size:
        raise DataError(f"{data_dir}/test_list.txt: shares images with train_val_list.txt")
    trainval = official["train_val"]
    carve = patient_split(patients[trainval], (1 - val_fraction, val_fraction, 0.0), seed)
    rows = {"train": trainval[carve["train"]], "val": trainval[carve["val"]],
            "test": official["test"]}
    return _write_split(data_dir / "splits" / f"official-seed{seed}", rows, names, labels,
                        "official")


def resolve_split(split="auto", data_dir=None, seed=0, keep_laterals=False, dataset=None):
    """Where the list files of a split live: {'train': Path, 'val': Path, 'test': Path}.

    split:
      auto     the data directory's own lists (<data-dir>/train_list.txt ...) if it has them
               (the bundled sample does); else for CheXpert and MIMIC-CXR their official
               split, for ChestX-ray14 the shipped CheXNet split
      chexnet  arnoweng/CheXNet's published lists, shipped in splits/chexnet/
      random   a fresh seeded patient-level 70/10/20 split of <data-dir>'s labels
      official the data set's own split (NIH's train_val_list.txt / test_list.txt, val carved
               out by patient; CheXpert's train.csv / valid.csv; MIMIC's split file)
      DIR      a directory holding train_list.txt, val_list.txt, test_list.txt
    The lists are checked to share no image and no patient. CheXpert and MIMIC lists hold
    frontal views only unless keep_laterals. dataset: the kind of data set data_dir holds,
    where the caller knows it (Data.dataset); detected here otherwise.
    """
    if dataset is None:
        dataset = dataset_of(data_dir)
    if split == "auto":
        present = [s for s in SPLITS if data_dir is not None
                   and (Path(data_dir) / f"{s}_list.txt").exists()]
        if present and len(present) < len(SPLITS):  # never fall back silently to another split
            missing = next(s for s in SPLITS if s not in present)
            raise DataError(f"{Path(data_dir) / f'{missing}_list.txt'}: not found, while "
                            f"{Path(data_dir) / f'{present[0]}_list.txt'} is there: a data "
                            "directory's own split needs all three lists (or pass --split)")
        if present:
            directory = Path(data_dir)
        elif dataset != "nih":
            directory = make_split(dataset, data_dir, "official", seed, keep_laterals)
        else:
            directory = SHIPPED_SPLIT_DIR
    elif split in ("random", "official") and dataset != "nih":
        directory = make_split(dataset, data_dir, split, seed, keep_laterals)
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
            raise DataError(f"{path}: list file not found" if not path.exists()
                            else f"{path}: not a list file (a directory?)")
    check_disjoint(lists)
    return lists


def make_split(dataset, data_dir, split="official", seed=0, keep_laterals=False,
               fractions=(0.7, 0.1, 0.2), val_fraction=0.1):
    """Write a patient-level split of CheXpert or MIMIC-CXR-JPG to
    <data-dir>/splits/<split>-seed<seed>[-laterals]/ and return that directory.

    official  CheXpert: train.csv into train and val (val_fraction of its patients), valid.csv
              (234 images, radiologist consensus) as test. MIMIC: its own train/validate/test.
    random    every image, patients shuffled into 70/10/20 (CheXpert: train.csv and valid.csv
              pooled)."""
    data_dir = Path(data_dir)
    if dataset == "chexpert":
        parts = read_chexpert(data_dir, keep_laterals)
        train, valid = parts["train.csv"], parts["valid.csv"]
        names = train[0] + valid[0]
        patients = np.concatenate([train[1], valid[1]])
        labels = np.concatenate([train[2], valid[2]])
        official = np.array(["trainval"] * len(train[0]) + ["test"] * len(valid[0]))
    else:
        names, patients, labels, official = read_mimic(data_dir, keep_laterals)
    if not names:
        raise DataError(f"{data_dir}: no {'images' if keep_laterals else 'frontal images'} "
                        f"in the {dataset} tables")
    if split == "random":
        rows = patient_split(patients, fractions, seed)
    elif dataset == "chexpert":
        trainval = np.flatnonzero(official == "trainval")
        carve = patient_split(patients[trainval], (1 - val_fraction, val_fraction, 0.0), seed)
        rows = {"train": trainval[carve["train"]], "val": trainval[carve["val"]],
                "test": np.flatnonzero(official == "test")}
    else:
        rows = {s: np.flatnonzero(official == s) for s in ("train", "val", "test")}
    tag = f"{dataset}-{split}" + (f"-seed{seed}" if split == "random" or dataset == "chexpert"
                                  else "") + ("-laterals" if keep_laterals else "")
    out = data_dir / "splits" / tag
    header = {"classes": CHEXPERT_CLASSES, "images": "."}
    try:
        for part, idx in rows.items():
            if not len(idx):
                raise DataError(f"{data_dir}: the {split} split of {dataset} leaves {part} empty")
            write_list(out / f"{part}_list.txt", [names[i] for i in idx], labels[idx], header)
    except DataError as e:
        raise DataError(f"--split {split}: {one_line(e)}") from None
    return out

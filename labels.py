"""ChestX-ray14 labels and splits: NIH's label table, list files, patient-level splits.

    label table   Data_Entry_2017_v2020.csv (or the 2017 file), one row per image
    list file     "<image name> <14 space-separated 0/1>", one line per image; lists of other
                  data sets (datasets.py) start with "# classes: A,B,..." and "# images: DIR"
                  headers and may hold -1 (uncertain) and . (not mentioned)
    split         three list files, train_list.txt, val_list.txt, test_list.txt

No patient is ever in two splits: every split made here is patient-level, and every split
read is checked for images or patients shared between its lists.
"""
import gzip
import re
import zlib
from pathlib import Path

import numpy as np

from common import DataError, atomic_write_text, one_line, os_reason

CLASS_NAMES = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "test")
REPO_DIR = Path(__file__).resolve().parent
# arnoweng/CheXNet's published 70/10/20 split (Stanford never released the paper's own).
SHIPPED_SPLIT_DIR = REPO_DIR / "splits" / "chexnet"
SHIPPED_LABEL_TABLE = REPO_DIR / "nih" / "Data_Entry_2017_v2020.csv.gz"
# Both NIH revisions, newest first; either may be gzipped.
LABEL_TABLE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
                     "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz")
HOW_TO_GET_DATA = ("run `bash batch_download.sh` to fetch ChestX-ray14 (42 GB), "
                   "or pass --data-dir sample to use the bundled 200-image sample")


def patient_of(name):
    """The patient of an image name: NIH's <8-digit patient id>_<3-digit follow-up>.png,
    CheXpert's .../patientNNNNN/..., MIMIC-CXR's .../pNNNNNNNN/sNNNNNNNN/...; None for others."""
    if "/" in name:
        found = re.search(r"(?:^|/)patient(\d+)/", name) or re.search(r"(?:^|/)p(\d+)/s\d+/", name)
        return int(found.group(1)) if found else None
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() and "_" in name else None


# ---------------------------------------------------------------------------------------------
# Label table

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
    table = read_table(path, ["Image Index", "Finding Labels", "Patient ID"], "label table")
    duplicated = table["Image Index"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{path}:{row + 2}: image {table['Image Index'][row]!r} is listed twice")
    labels = np.zeros((len(table), NUM_CLASSES), dtype=np.uint8)
    column = {c: i for i, c in enumerate(CLASS_NAMES)}
    for row, findings in enumerate(table["Finding Labels"]):
        for disease in findings.split("|"):
            if disease == "No Finding":
                continue
            if disease not in column:
                what = f"unknown disease {disease!r}" if disease else "an empty entry"
                raise DataError(f"{path}:{row + 2}: {what} in Finding Labels (expected "
                                f"{', '.join(CLASS_NAMES)} or 'No Finding'; a truncated file?)")
            labels[row, column[disease]] = 1
    ids = table["Patient ID"].str.strip()
    bad = ~ids.str.fullmatch(r"\d{1,18}")  # int64 holds every 18-digit number
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}:{row + 2}: Patient ID {table['Patient ID'][row]!r} is not a "
                        "number of at most 18 digits")
    return table["Image Index"].tolist(), ids.astype(np.int64).to_numpy(), labels


# ---------------------------------------------------------------------------------------------
# List files

LABEL_TEXT = {"1": 1.0, "0": 0.0, "-1": -1.0, ".": np.nan}


def read_table(path, needed, what="table"):
    """A CSV (gzipped or not) as strings, blanks kept as '', with the `needed` columns and at
    least one row, or a one-line DataError naming the file."""
    from optional import pandas
    pd = pandas(f"{path}: reading the {what}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: {what} is empty") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError, zlib.error,
            gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read {what} ({one_line(e)})") from None
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(f"{path}: {what} lacks column(s) {', '.join(map(repr, missing))}")
    if table.empty:
        raise DataError(f"{path}: {what} has no rows")
    return table


def read_list(path):
    """Returns (names, labels [N, K]). Every image at most once. NIH lists (no header, 0/1)
    give uint8 labels for NIH's 14 classes; a list with a `# classes:` header gives float32
    labels with 1, 0, -1 (uncertain) and NaN (not mentioned) for its own classes."""
    header = _read_header(path)
    classes = list_classes_from(header, path)
    allowed = LABEL_TEXT if "classes" in header else ("0", "1")
    values = "1/0/-1/." if "classes" in header else "0/1"
    names, rows, line_of = [], [], {}
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of a name
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields or line.startswith("#"):
                    continue
                if len(fields) != len(classes) + 1 or not all(v in allowed for v in fields[1:]):
                    raise DataError(f"{path}:{line_no}: expected an image name and "
                                    f"{len(classes)} labels of {values}, got "
                                    f"{line.strip()[:80]!r}")
                if fields[0] in line_of:
                    raise DataError(f"{path}:{line_no}: image {fields[0]} is listed twice "
                                    f"(first on line {line_of[fields[0]]})")
                line_of[fields[0]] = line_no
                names.append(fields[0])
                rows.append(fields[1:])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({os_reason(e)})") from None
    if not names:
        raise DataError(f"{path}: list file is empty")
    k = len(classes)
    if "classes" not in header:
        return names, np.array(rows, dtype=np.uint8).reshape(-1, k)
    return names, np.array([[LABEL_TEXT[v] for v in row] for row in rows],
                           dtype=np.float32).reshape(-1, k)


def list_classes_from(header, path):
    if "classes" not in header:
        return CLASS_NAMES
    classes = [c.strip() for c in header["classes"].split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
        raise DataError(f"{path}: '# classes:' header must name distinct classes, comma-separated")
    return classes


def list_header(path):
    """(class names, image directory relative to the data directory) of a list file."""
    header = _read_header(path)
    return list_classes_from(header, path), header.get("images", "images")


def _read_header(path):
    """The `# key: value` lines at the top of a list file, as a dict."""
    header = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                if ":" in line:
                    key, value = line[1:].split(":", 1)
                    header[key.strip()] = value.strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({os_reason(e)})") from None
    return header


def write_list(path, names, labels, header=None):
    """Write a list file atomically; an identical file is left untouched (a split made again
    from the same table and seed does not change its files' times). header: {'classes':
    [...], 'images': DIR} for the lists of other data sets (labels 1/0/-1/NaN)."""
    path = Path(path)
    lines = []
    if header:
        lines = [f"# classes: {','.join(header['classes'])}\n", f"# images: {header['images']}\n"]
        text_of = {1.0: "1", 0.0: "0", -1.0: "-1"}
        rows = [" ".join("." if np.isnan(v) else text_of[float(v)] for v in row)
                for row in np.asarray(labels, dtype=np.float32)]
    else:
        rows = [" ".join(map(str, row)) for row in labels.tolist()]
    text = "".join(lines) + "".join(f"{n} {row}\n" for n, row in zip(names, rows))
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text, "split list")


UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def training_targets(labels, policy="ones"):
    """The targets training fits, float32 [N, K]; NaN marks an entry the loss ignores.
    ones (U-Ones): uncertain -> 1; zeros (U-Zeros): uncertain -> 0; not mentioned -> 0 for
    both. ignore (U-Ignore): uncertain and not mentioned are both masked out of the loss.
    NIH's 0/1 labels come back as they are."""
    if labels.dtype == np.uint8:
        return labels
    if policy not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain {policy!r}: choose from {', '.join(UNCERTAIN_POLICIES)}")
    out = labels.astype(np.float32).copy()
    uncertain, blank = out == -1, np.isnan(out)
    if policy == "ignore":
        out[uncertain] = np.nan
    else:
        out[uncertain] = 1.0 if policy == "ones" else 0.0
        out[blank] = 0.0
    return out


def evaluation_labels(labels):
    """What evaluation scores against: uncertain entries (-1) are left out (NaN), not
    mentioned counts as negative, as in the CheXpert and MIMIC-CXR evaluations. NIH's 0/1
    labels come back as they are."""
    if labels.dtype == np.uint8:
        return labels
    out = np.nan_to_num(labels.astype(np.float32), nan=0.0)
    out[labels == -1] = np.nan
    return out


# The same finding under another name in another data set, for evaluating a model on a data
# set it was not trained on: ChestX-ray14's name -> the CheXpert labeler's (CheXpert, MIMIC).
SAME_FINDING = {"Effusion": "Pleural Effusion"}


def shared_classes(model_classes, list_classes, mapping=None):
    """[(model column, list column)] for every class of the model that the list labels: by
    the same name, else through `mapping` (SAME_FINDING by default) in either direction."""
    if mapping is not None:  # the user's own: every name must exist, each list class once
        for model_name, list_name in mapping.items():
            if model_name not in model_classes:
                raise DataError(f"--class-map: the model has no class {model_name!r} "
                                f"(it has {', '.join(model_classes)})")
            if list_name not in list_classes:
                raise DataError(f"--class-map: the list labels no class {list_name!r} "
                                f"(it labels {', '.join(list_classes)})")
        twice = [v for v in mapping.values() if list(mapping.values()).count(v) > 1]
        if twice:
            raise DataError(f"--class-map: {twice[0]!r} is mapped from several classes; one "
                            "model class per label")
    explicit = mapping is not None
    mapping = SAME_FINDING if mapping is None else mapping
    both_ways = {**mapping, **{v: k for k, v in mapping.items()}}
    column = {c: j for j, c in enumerate(list_classes)}
    pairs, used = [], set()
    for i, name in enumerate(model_classes):
        if explicit and name in mapping:  # the user's pair wins over a same-named class
            j = column.get(mapping[name])
        else:
            j = column.get(name, column.get(both_ways.get(name)))
        if j is not None and j not in used:
            pairs.append((i, j))
            used.add(j)
    return pairs


def check_disjoint(lists):
    """A leak between splits is an error: no image, and no patient, in two lists. The lists
    of a split label the same classes."""
    seen, patients = {}, {}
    classes = {path: list_header(path)[0] for path in lists.values()}
    first = next(iter(lists.values()))
    for path, names in classes.items():
        if names != classes[first]:
            raise DataError(f"{path}: labels other classes than {first} ({', '.join(names[:3])}"
                            f"... vs {', '.join(classes[first][:3])}...)")
    for split, path in lists.items():
        for name in read_list(path)[0]:
            if name in seen:
                raise DataError(f"{path}: image {name} is also in {seen[name]}: the splits leak "
                                "into each other")
            seen[name] = path
            patient = patient_of(name)
            if patient is not None:
                first = patients.setdefault(patient, (path, name))
                if first[0] != path:
                    raise DataError(f"{path}: patient {patient} ({name}) is also in {first[0]} "
                                    f"({first[1]}): images of one patient must stay in one split")


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


def resolve_split(split="auto", data_dir=None, seed=0, keep_laterals=False):
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
    frontal views only unless keep_laterals.
    """
    from datasets import detect_dataset, make_split
    dataset = detect_dataset(data_dir) if data_dir is not None and Path(data_dir).is_dir() \
        else "nih"
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

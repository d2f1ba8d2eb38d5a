"""List files and class sets: the format every script reads, whatever data set it came from.

    list file     "<image name> <K labels>", one line per image. NIH's lists have no header and
                  0/1 for NIH's 14 classes; lists made from other data sets (tables.py) start
                  with "# classes: A,B,..." and "# images: DIR" and may hold -1 (uncertain) and
                  . (not mentioned)

A model's class names come from the list it was trained on and travel with it (checkpoint,
export metadata, prediction files); NIH_CLASSES is only what a header-less NIH list means.
"""
import re
from pathlib import Path

import numpy as np

from common import DataError, atomic_write_text, os_reason

NIH_CLASSES = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]


def patient_of(name):
    """The patient of an image name: NIH's <8-digit patient id>_<3-digit follow-up>.png,
    CheXpert's .../patientNNNNN/..., MIMIC-CXR's .../pNNNNNNNN/sNNNNNNNN/...; None for others."""
    if "/" in name:
        found = re.search(r"(?:^|/)patient(\d+)/", name) or re.search(r"(?:^|/)p(\d+)/s\d+/", name)
        return int(found.group(1)) if found else None
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() and "_" in name else None


# ---------------------------------------------------------------------------------------------
# Image names: every path made from a table or a list stays inside the data directory

def name_problem(name):
    """Why `name` (an image name from a data set's table or a list file, joined onto the data
    directory to make a path) cannot be used, or None. Names are relative paths with '/'
    between folders: never absolute, never a '..' folder (the path would leave the data
    directory), never a space, tab or line break (a list file separates its fields by
    whitespace: such a name would come back as another name). The one check: the tables'
    readers (tables.py), read_list and list_header all ask it."""
    if not name:
        return "is empty"
    if any(c.isspace() for c in name) or "\0" in name:
        return "holds whitespace (list files separate fields by whitespace); rename the file"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[/\\]", name):
        return "is an absolute path: image names are relative to the data directory"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' folder: it would leave the data directory"
    return None


def check_name(name, where):
    """A DataError naming `where` (file:line) when the image name cannot be used."""
    problem = name_problem(name)
    if problem:
        raise DataError(f"{where}: image name {name[:120]!r} {problem}")


# ---------------------------------------------------------------------------------------------
# List files

LABEL_TEXT = {"1": 1.0, "0": 0.0, "-1": -1.0, ".": np.nan}


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
                check_name(fields[0], f"{path}:{line_no}")
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
        return NIH_CLASSES
    classes = [c.strip() for c in header["classes"].split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
        raise DataError(f"{path}: '# classes:' header must name distinct classes, comma-separated")
    return classes


def list_header(path):
    """(class names, image directory relative to the data directory) of a list file."""
    header = _read_header(path)
    images = header.get("images", "images")
    problem = name_problem(images.replace(" ", "_"))  # a folder with a space is fine here
    if problem:
        raise DataError(f"{path}: '# images: {images[:80]}' {problem}")
    return list_classes_from(header, path), images


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


def parse_class_map(text):
    """'A=B,C=D' -> {'A': 'B', 'C': 'D'} (--class-map), each model class and each list class
    named once: a dict would keep the last of two pairs for one class without a word (the
    model's Effusion scored as Edema, a column gone). DataError saying which."""
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise DataError(f"{text!r}: expected 'MODEL NAME=LIST NAME,...'")
    pairs = [(a.strip(), b.strip()) for a, b in pairs]
    for side, what in ((0, "model class"), (1, "list class")):
        names = [pair[side] for pair in pairs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"{text!r}: the {what} {twice[0]!r} is named twice; each class once")
    return dict(pairs)


def shared_classes(model_classes, list_classes, mapping=None):
    """[(model column, list column)] for every class of the model that the list labels: by
    the same name, else through `mapping` (SAME_FINDING by default) in either direction."""
    if mapping is not None:  # the user's own (parse_class_map's): every name must exist
        for model_name, list_name in mapping.items():
            if model_name not in model_classes:
                raise DataError(f"--class-map: the model has no class {model_name!r} "
                                f"(it has {', '.join(model_classes)})")
            if list_name not in list_classes:
                raise DataError(f"--class-map: the list labels no class {list_name!r} "
                                f"(it labels {', '.join(list_classes)})")
        targets = list(mapping.values())  # a dict given here, not parsed: one label, one class
        twice = [v for v in targets if targets.count(v) > 1]
        if twice:
            raise DataError(f"--class-map: {twice[0]!r} is mapped from several classes; one "
                            "model class per label")
    explicit = mapping is not None
    mapping = SAME_FINDING if mapping is None else mapping
    both_ways = {**mapping, **{v: k for k, v in mapping.items()}}
    column = {c: j for j, c in enumerate(list_classes)}
    # the user's pairs first: each wins over a same-named class, whatever the order of the
    # model's classes (model Effusion must not take the list's Effusion that
    # 'Pneumonia=Effusion' gave model Pneumonia)
    chosen = {}
    if explicit:
        chosen = {model_classes.index(m): column[t] for m, t in mapping.items()}
    used = set(chosen.values())
    for i, name in enumerate(model_classes):
        if i in chosen or (explicit and name in mapping):
            continue
        j = column.get(name, column.get(both_ways.get(name)))
        if j is not None and j not in used:
            chosen[i] = j
            used.add(j)
    return sorted(chosen.items())


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

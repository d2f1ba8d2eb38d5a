"""Readers of the other public chest X-ray data sets: CheXpert and MIMIC-CXR-JPG, turned into
the list files every script reads (ChestX-ray14 is labels.py's).

    CheXpert v1.0 (or -small)   <data-dir>/train.csv, valid.csv, train/patient*/study*/view*.jpg
    MIMIC-CXR-JPG 2.0.0         <data-dir>/mimic-cxr-2.0.0-{chexpert,split,metadata}.csv.gz,
                                <data-dir>/files/p10/p10000032/s50414267/<dicom_id>.jpg

Both label the same 14 observations with the CheXpert labeler: 1 positive, 0 negative, -1
uncertain, blank not mentioned. A list file of theirs says so in its header:

    # classes: No Finding,Enlarged Cardiomediastinum,...,Support Devices
    # images: .
    train/patient00001/study1/view1_frontal.jpg 1 . . . . . . . . 0 . . . 1

with `.` for not mentioned; image names are relative to <data-dir>/<images>. Splits are
patient-level, frontal views only unless --keep-laterals.
"""
import gzip
from pathlib import Path

import numpy as np

from common import DataError, one_line

CHEXPERT_CLASSES = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
# The CheXpert competition's five tasks, the usual summary on valid.csv.
CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                        "Pleural Effusion"]
MIMIC_FILES = {part: f"mimic-cxr-2.0.0-{part}.csv.gz" for part in ("chexpert", "split", "metadata")}
FRONTAL_VIEWS = ("PA", "AP")
DATASETS = ("nih", "chexpert", "mimic")


def detect_dataset(data_dir):
    """'chexpert', 'mimic' or 'nih' from the files the data directory holds."""
    data_dir = Path(data_dir)
    if (data_dir / "train.csv").is_file() or (data_dir / "valid.csv").is_file():
        return "chexpert"  # one of them missing is then named by read_chexpert
    if any((data_dir / name).is_file() for name in MIMIC_FILES.values()):
        return "mimic"
    return "nih"


def _read_csv(path, needed):
    from labels import read_table
    if not Path(path).is_file():
        raise DataError(f"{path}: not found")
    table = read_table(path, needed)
    # pandas fills a short row's missing fields with '' (a blank label): count them instead
    import csv
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="") as f:
        rows = csv.reader(f)
        width = len(next(rows))
        for line, row in enumerate(rows, 2):
            if row and len(row) < width:
                raise DataError(f"{path}:{line}: fewer fields than the header has (a truncated "
                                "file?)")
    return table


def label_values(table, path, first_row=2):
    """The 14 observation columns of a CheXpert-labeler table as float32 [N, 14]: 1, 0, -1
    (uncertain) and NaN (blank: not mentioned)."""
    out = np.full((len(table), len(CHEXPERT_CLASSES)), np.nan, np.float32)
    for k, name in enumerate(CHEXPERT_CLASSES):
        column = table[name].str.strip()
        for text, value in (("1", 1), ("1.0", 1), ("0", 0), ("0.0", 0), ("-1", -1),
                            ("-1.0", -1)):
            out[(column == text).to_numpy(), k] = value
        bad = ~column.isin(["", "1", "1.0", "0", "0.0", "-1", "-1.0"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}:{row + first_row}: {name} is {table[name].iloc[row]!r} "
                            "(expected 1.0, 0.0, -1.0 or blank)")
    return out


def read_chexpert(data_dir, keep_laterals=False):
    """{'train.csv': (names, patients, labels), 'valid.csv': (...)}: names relative to the data
    directory (the CSV's leading 'CheXpert-v1.0-small/' dropped, whatever the folder is
    called now), patient ids from the patientNNNNN folder."""
    out = {}
    needed = ["Path", "Frontal/Lateral", *CHEXPERT_CLASSES]
    for part in ("train.csv", "valid.csv"):
        path = Path(data_dir) / part
        table = _read_csv(path, needed)
        paths = table["Path"].str.strip()
        # 'CheXpert-v1.0-small/train/...': the folder as it was called when the CSV was made;
        # paths already relative to the data directory ('train/...') are kept as they are
        names = paths.where(paths.str.match(r"(?:train|valid|test)/"),
                            paths.str.partition("/")[2])
        if (names == "").any():
            row = int(np.flatnonzero((names == "").to_numpy())[0])
            raise DataError(f"{path}:{row + 2}: Path {paths.iloc[row]!r} is not "
                            "'CheXpert-v1.0.../train/patientNNNNN/studyN/viewN_....jpg'")
        patients = names.str.extract(r"(?:^|/)patient(\d+)/", expand=False)
        if patients.isna().any():
            row = int(np.flatnonzero(patients.isna().to_numpy())[0])
            raise DataError(f"{path}:{row + 2}: no patientNNNNN folder in Path "
                            f"{paths.iloc[row]!r}")
        labels = label_values(table, path)
        frontal = (table["Frontal/Lateral"].str.strip() == "Frontal").to_numpy()
        keep = np.ones(len(table), bool) if keep_laterals else frontal
        out[part] = (names[keep].tolist(), patients[keep].astype(np.int64).to_numpy(),
                     labels[keep])
    return out


def mimic_path(subject_id, study_id, dicom_id):
    """MIMIC-CXR-JPG's layout: files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg"""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def read_mimic(data_dir, keep_laterals=False):
    """(names, patients, labels, official split per image) of MIMIC-CXR-JPG: labels are per
    study (every image of a study shares them), views from the metadata's ViewPosition.
    Images whose study has no row in the labels file are left out."""
    data_dir = Path(data_dir)
    ids = ["subject_id", "study_id"]
    labels_table = _read_csv(data_dir / MIMIC_FILES["chexpert"], [*ids, *CHEXPERT_CLASSES])
    split = _read_csv(data_dir / MIMIC_FILES["split"], ["dicom_id", *ids, "split"])
    meta = _read_csv(data_dir / MIMIC_FILES["metadata"], ["dicom_id", *ids, "ViewPosition"])
    for table in (labels_table, split, meta):
        for c in ("dicom_id", *ids):
            if c in table:
                table[c] = table[c].str.strip()
    unknown = ~split["split"].isin(["train", "validate", "test"])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{data_dir / MIMIC_FILES['split']}:{row + 2}: split "
                        f"{split['split'].iloc[row]!r} (expected train, validate or test)")
    bad = ~labels_table["subject_id"].str.fullmatch(r"\d{3,18}")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{data_dir / MIMIC_FILES['chexpert']}:{row + 2}: subject_id "
                        f"{labels_table['subject_id'].iloc[row]!r} is not a number")
    if labels_table.duplicated(ids).any():
        row = int(np.flatnonzero(labels_table.duplicated(ids).to_numpy())[0])
        raise DataError(f"{data_dir / MIMIC_FILES['chexpert']}:{row + 2}: study "
                        f"{labels_table['study_id'].iloc[row]} is listed twice")
    values = label_values(labels_table, data_dir / MIMIC_FILES["chexpert"])
    row_of_study = {key: i for i, key in enumerate(zip(labels_table["subject_id"],
                                                       labels_table["study_id"]))}
    view = dict(zip(meta["dicom_id"], meta["ViewPosition"].str.strip()))
    names, patients, rows, official = [], [], [], []
    for dicom, subject, study, part in zip(split["dicom_id"], split["subject_id"],
                                           split["study_id"], split["split"]):
        row = row_of_study.get((subject, study))
        if row is None or not (keep_laterals or view.get(dicom) in FRONTAL_VIEWS):
            continue
        names.append(mimic_path(subject, study, dicom))
        patients.append(int(subject))
        rows.append(row)
        official.append({"train": "train", "validate": "val", "test": "test"}[part])
    return (names, np.array(patients, np.int64), values[np.array(rows, np.int64)].reshape(
        -1, len(CHEXPERT_CLASSES)), np.array(official))


def make_split(dataset, data_dir, split="official", seed=0, keep_laterals=False,
               fractions=(0.7, 0.1, 0.2), val_fraction=0.1):
    """Write a patient-level split of CheXpert or MIMIC-CXR-JPG to
    <data-dir>/splits/<split>-seed<seed>[-laterals]/ and return that directory.

    official  CheXpert: train.csv into train and val (val_fraction of its patients), valid.csv
              (234 images, radiologist consensus) as test. MIMIC: its own train/validate/test.
    random    every image, patients shuffled into 70/10/20 (CheXpert: train.csv and valid.csv
              pooled)."""
    from labels import patient_split, write_list
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

"""The data sets' own label tables, read into (image names, patient ids, labels):
NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG. splitting.py turns them into list files.

    ChestX-ray14                <data-dir>/Data_Entry_2017_v2020.csv (or the 2017 file),
                                <data-dir>/images/*.png
    CheXpert v1.0 (or -small)   <data-dir>/train.csv, valid.csv, train/patient*/study*/view*.jpg
    MIMIC-CXR-JPG 2.0.0         <data-dir>/mimic-cxr-2.0.0-{chexpert,split,metadata}.csv.gz,
                                <data-dir>/files/p10/p10000032/s50414267/<dicom_id>.jpg

CheXpert and MIMIC label the same 14 observations with the CheXpert labeler: 1 positive, 0
negative, -1 uncertain, blank not mentioned. A list file of theirs says so in its header:

    # classes: No Finding,Enlarged Cardiomediastinum,...,Support Devices
    # images: .
    train/patient00001/study1/view1_frontal.jpg 1 . . . . . . . . 0 . . . 1

with `.` for not mentioned; image names are relative to <data-dir>/<images>.
"""
import csv
import gzip
import zlib
from pathlib import Path

import numpy as np

from common import REPO_DIR, DataError, one_line
from labels import NIH_CLASSES, name_problem

SHIPPED_LABEL_TABLE = REPO_DIR / "nih" / "Data_Entry_2017_v2020.csv.gz"
# Both NIH revisions, newest first; either may be gzipped.
LABEL_TABLE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
                     "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz")
HOW_TO_GET_DATA = ("run `bash batch_download.sh` to fetch ChestX-ray14 (42 GB), "
                   "or pass --data-dir sample to use the bundled 200-image sample")
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


def read_table(path, needed, what="table"):
    """A CSV (gzipped or not) as strings, blanks kept as '', with the `needed` columns and at
    least one row, or a one-line DataError naming the file."""
    from optional import pandas  # heavy, and only commands that read a data set's table need it
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


def _read_csv(path, needed):
    if not Path(path).is_file():
        raise DataError(f"{path}: not found")
    table = read_table(path, needed)
    # pandas fills a short row's missing fields with '' (a blank label): count them instead
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="") as f:
        rows = csv.reader(f)
        width = len(next(rows))
        for line, row in enumerate(rows, 2):
            if row and len(row) < width:
                raise DataError(f"{path}:{line}: fewer fields than the header has (a truncated "
                                "file?)")
    return table


def check_names(names, path, column, first_row=2):
    """Every image name made from a table stays inside the data directory (labels.name_problem):
    else a DataError naming the table, its line and the column the name came from."""
    for row, name in enumerate(names):
        problem = name_problem(name)
        if problem:
            raise DataError(f"{path}:{row + first_row}: {column} gives the image name "
                            f"{name[:120]!r}, which {problem}")


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
        check_names(paths.tolist(), path, "Path")  # as written: absolute, '..', whitespace
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
    split_path = data_dir / MIMIC_FILES["split"]
    for column in ("subject_id", "study_id"):  # digits: they become folder names
        bad = ~split[column].str.fullmatch(r"\d{1,18}")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{split_path}:{row + 2}: {column} {split[column].iloc[row][:40]!r} "
                            "is not a number")
    check_names(split["dicom_id"].tolist(), split_path, "dicom_id")
    bad = split["dicom_id"].str.contains("/", regex=False)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{split_path}:{row + 2}: dicom_id {split['dicom_id'].iloc[row][:80]!r} "
                        "holds a '/': it is a file name, not a path")
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


# ---------------------------------------------------------------------------------------------
# ChestX-ray14

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
    check_names(table["Image Index"].tolist(), path, "Image Index")
    labels = np.zeros((len(table), len(NIH_CLASSES)), dtype=np.uint8)
    column = {c: i for i, c in enumerate(NIH_CLASSES)}
    for row, findings in enumerate(table["Finding Labels"]):
        for disease in findings.split("|"):
            if disease == "No Finding":
                continue
            if disease not in column:
                what = f"unknown disease {disease!r}" if disease else "an empty entry"
                raise DataError(f"{path}:{row + 2}: {what} in Finding Labels (expected "
                                f"{', '.join(NIH_CLASSES)} or 'No Finding'; a truncated file?)")
            labels[row, column[disease]] = 1
    ids = table["Patient ID"].str.strip()
    bad = ~ids.str.fullmatch(r"\d{1,18}")  # int64 holds every 18-digit number
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}:{row + 2}: Patient ID {table['Patient ID'][row]!r} is not a "
                        "number of at most 18 digits")
    return table["Image Index"].tolist(), ids.astype(np.int64).to_numpy(), labels

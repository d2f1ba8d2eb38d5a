"""CheXpert and MIMIC-CXR-JPG layouts built from real NIH images (re-encoded as JPEG), with
their tables exactly as the data sets ship them: every label value (1.0, 0.0, -1.0, blank),
lateral views, and for MIMIC the three gzipped CSVs."""
import csv
import gzip
import io
from pathlib import Path

from PIL import Image

from tables import CHEXPERT_CLASSES

VALUES = ("1.0", "0.0", "-1.0", "")
# One row spelled out, to check the parser by hand (CheXpert train.csv, first row).
FIRST_ROW = {"No Finding": "", "Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0",
             "Atelectasis": "1.0", "Support Devices": ""}


def _jpeg(png, target, size=128):
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as im:
        im.convert("L").resize((size, size), Image.BILINEAR).save(target, quality=90)


def _values(r):
    """A deterministic mix of every label value, different for each row and class."""
    return {c: VALUES[(r * 3 + k * 5 + r // 4) % 4] for k, c in enumerate(CHEXPERT_CLASSES)}


def make_chexpert(root, pngs, n_train=40, n_valid=10, folder="CheXpert-v1.0-small"):
    """<root>/<folder>/ with train.csv, valid.csv and train/, valid/ JPEGs: one patient per
    frontal image; every third patient also has a lateral view. Returns the data directory."""
    data = Path(root) / folder
    pngs = list(pngs)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CLASSES]
    i = 0
    for part, count, first_patient in (("train", n_train, 1), ("valid", n_valid, 64541)):
        rows = []
        for p in range(count):
            patient = f"patient{first_patient + p:05d}"
            views = [("view1_frontal.jpg", "Frontal", "PA" if p % 2 else "AP")]
            if p % 3 == 0:
                views.append(("view2_lateral.jpg", "Lateral", ""))
            for file, kind, appa in views:
                rel = f"{part}/{patient}/study1/{file}"
                _jpeg(pngs[i % len(pngs)], data / rel)
                values = FIRST_ROW if (part, p, kind) == ("train", 0, "Frontal") else _values(i)
                values = {c: values.get(c, "") for c in CHEXPERT_CLASSES}
                rows.append([f"{folder}/{rel}", "Female" if p % 2 else "Male", str(40 + p),
                             kind, appa, *(values[c] for c in CHEXPERT_CLASSES)])
                i += 1
        with open(data / f"{part}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return data


def _gz_csv(path, header, rows):
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    with gzip.open(path, "wt", newline="") as f:
        f.write(text.getvalue())


def make_mimic(root, pngs, n_subjects=30):
    """<root>/mimic/ in MIMIC-CXR-JPG 2.0.0's layout. Subjects 0..: train, every fifth
    validate, every sixth test; each has one or two studies of a PA or AP image, every other
    study a LATERAL too; the last study has no labels row (left out)."""
    data = Path(root) / "mimic"
    pngs = list(pngs)
    labels, split, meta, i = [], [], [], 0
    for s in range(n_subjects):
        subject = str(10000032 + 1000 * s)
        part = "test" if s % 6 == 5 else "validate" if s % 5 == 4 else "train"
        for st in range(1 + s % 2):
            study = str(50000000 + 100 * s + st)
            views = ["PA" if (s + st) % 2 else "AP"] + (["LATERAL"] if st % 2 == 0 and s % 2 else [])
            for view in views:
                dicom = f"{s:04x}{st:04x}-{len(meta):08x}"
                rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
                _jpeg(pngs[i % len(pngs)], data / rel)
                i += 1
                split.append([dicom, study, subject, part])
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "Erect", "1024",
                             "1024"])
            if not (s == n_subjects - 1 and st == s % 2):  # the very last study: unlabelled
                values = _values(len(labels))
                labels.append([subject, study, *(values[c] for c in sorted(CHEXPERT_CLASSES))])
    _gz_csv(data / "mimic-cxr-2.0.0-chexpert.csv.gz",
            ["subject_id", "study_id", *sorted(CHEXPERT_CLASSES)], labels)
    _gz_csv(data / "mimic-cxr-2.0.0-split.csv.gz",
            ["dicom_id", "study_id", "subject_id", "split"], split)
    _gz_csv(data / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
             "ViewPosition", "PatientOrientationCodeSequence_CodeMeaning", "Rows", "Columns"],
            meta)
    return data

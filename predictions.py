"""Prediction files: infer.py's CSV of every image's probabilities, and beside it
<stem>_source.json, the record of what the evaluation knew (its data directory and split, the
model, the operating points it applied, raw or calibrated probabilities), so that report.py can
make the evaluation's own report again from the file alone."""
import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from common import DataError, atomic_write_text, os_reason, strict_json

# The record's fields and the types they must have (a hand-edited record is a one-line error,
# never a traceback or a string "false" read as True). Absent fields are simply not known.
RECORD_FIELDS = {"made_by": str, "mode": str, "part": str, "list": str, "protocol": str,
                 "notice": str, "calibrated": bool, "data_dir": str, "split": str,
                 "split_seed": int, "keep_laterals": bool, "model_dir": str, "model": str,
                 "operating_points": dict, "patients_table": str, "no_subgroups": bool,
                 "predictions": str, "sha256": str}


def write_predictions(path, names, class_names, probs, source=None):
    """The predictions CSV: 'Image Index' and the class names, then a row per image, each
    probability to every digit; quoted where a name needs it (a comma in a file name), so
    read_predictions reads it back exactly.
    source: what the evaluation knew, written beside it (<stem>_source.json, read_source)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Image Index", *class_names])
    # every digit (the shortest text that reads back as the same float): a report made again
    # from the file (report.py) is the evaluation's, not one of rounded probabilities whose
    # new ties moved the AUROC in its 4th decimal
    writer.writerows([name, *(repr(float(p)) for p in row)] for name, row in zip(names, probs))
    atomic_write_text(path, text.getvalue(), "predictions")
    if source is not None:
        record = {**source, "predictions": str(path),
                  "sha256": hashlib.sha256(text.getvalue().encode("utf-8")).hexdigest()}
        atomic_write_text(source_path(path), json.dumps(strict_json(record), indent=1) + "\n",
                          "predictions record")


def source_path(csv_path):
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}_source.json")


def read_source(csv_path):
    """(record, note): what the evaluation that wrote this predictions file knew
    (write_predictions' source), or ({}, why not) where there is no record, an unreadable one,
    or one of another version of the file (its SHA-256 differs); why is None where there is
    simply none. A record of this very file with a field of the wrong type is a DataError."""
    path = source_path(csv_path)
    if not path.exists():
        return {}, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return {}, f"{path} cannot be read ({os_reason(e)}); not used"
    if not isinstance(record, dict):
        return {}, f"{path} is not a predictions record (not a JSON object); not used"
    if record.get("sha256") != digest:
        return {}, f"{path} is the record of another version of {csv_path}; not used"
    for field, kind in RECORD_FIELDS.items():
        value = record.get(field)
        if value is not None and (not isinstance(value, kind) or kind is int and
                                  isinstance(value, bool)):
            raise DataError(f"{path}: {field} is not a {kind.__name__} ({value!r}); the record "
                            f"was edited: delete it, or run infer.py again to write it")
    return record, None


def read_predictions(path):
    """(names, probs [N, K], class names) from a predictions CSV, checked: the header, exactly
    one name and K numbers in [0, 1] per row. The classes are the header's columns after
    'Image Index'."""
    if not Path(path).exists():
        made_by = re.fullmatch(r"predictions_(torch|fp32|int8)(_val)?(_on_\w+)?\.csv", Path(path).name)
        how = (f"; `python infer.py --mode {made_by[1]}" + (" --part val" if made_by[2] else "")
               + "` writes it" if made_by else "")
        raise DataError(f"{path}: no such predictions file{how}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark is no name
            reader = csv.reader(f)
            rows, lines = [], []
            start = 1
            for row in reader:  # a row's line: where it starts (a quoted field may span lines)
                rows.append(row)
                lines.append(start)
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read predictions ({os_reason(e)})") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num + 1}: not CSV ({e})") from None
    if not rows or rows[0][:1] != ["Image Index"]:
        raise DataError(f"{path}: not a predictions file (its first column must be 'Image Index')")
    classes = rows[0][1:]
    if not classes or len(set(classes)) != len(classes) or not all(classes):
        raise DataError(f"{path}: its header must name each class once after 'Image Index'")
    columns = list(range(1, len(classes) + 1))
    names, probs = [], []
    for line, row in zip(lines[1:], rows[1:]):
        if not row:
            continue
        try:
            if len(row) != len(classes) + 1:
                raise ValueError(len(row))
            values = [float(row[c]) for c in columns]
        except (ValueError, IndexError):
            raise DataError(f"{path}:{line}: expected an image name and {len(classes)} "
                            f"probabilities, got {len(row)} fields") from None
        if not all(0 <= v <= 1 for v in values):  # NaN fails this too
            raise DataError(f"{path}:{line}: probabilities must be numbers in [0, 1]")
        names.append(row[0])
        probs.append(values)
    if not names:
        raise DataError(f"{path}: no predictions")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: an image is listed twice")
    return names, np.array(probs), classes

"""Prediction files: infer.py's CSV of every image's probabilities, and beside it
<stem>_source.json, the record of what the evaluation knew (its data directory and split, the
model, the operating points it applied, raw or calibrated probabilities), so that report.py can
make the evaluation's own report again from the file alone. While an evaluation runs, its
predictions are saved in chunks (<out-csv>.partial/) as they are made: a killed evaluation
continues after the last complete chunk."""
import csv
import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from common import (DataError, Progress, atomic_path, atomic_write_text, one_line, os_reason,
                    strict_json)

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


# ---------------------------------------------------------------------------------------------
# Predictions in chunks: written as they are made, resumed after a kill

class Chunks:
    """<out-csv>.partial/: key.json (what is being predicted) and chunk-NNNNN.npz files, each
    the probabilities of `size` consecutive images, written atomically. The same command after a
    kill continues after the last complete chunk; a different model, list or protocol starts
    afresh. Removed once the CSV is written.

    Each chunk proves which images it holds: its index range (start, stop), the SHA-256 of
    those images' names and its row count are saved in it and checked when the evaluation
    resumes. A chunk copied over another, truncated, of the wrong length or unreadable is
    predicted again (with a note), never merged."""

    def __init__(self, out_csv, key, size, names, log):
        self.dir = Path(f"{out_csv}.partial")
        self.size, self.names = size, list(names)
        self.count = -(-len(self.names) // size)
        old = None
        try:
            old = json.loads((self.dir / "key.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        if old != key:
            if self.dir.exists():
                log(f"note: {self.dir}/ holds predictions of another model, list or protocol: "
                    "starting afresh")
                shutil.rmtree(self.dir, ignore_errors=True)
            atomic_write_text(self.dir / "key.json", json.dumps(key) + "\n", "predictions")
        self.done, width = 0, None
        while self.done < self.count and self.path(self.done).is_file():
            problem, width = self.problem(self.done, width)
            if problem:
                log(f"note: {self.path(self.done)}: {problem}; predicting its images again")
                for later in range(self.done, self.count):
                    self.path(later).unlink(missing_ok=True)
                break
            self.done += 1

    def path(self, index):
        return self.dir / f"chunk-{index:05d}.npz"

    def proof(self, index):
        """(start, stop, SHA-256 of the names) of the images chunk `index` holds."""
        start, stop = index * self.size, min(len(self.names), (index + 1) * self.size)
        digest = hashlib.sha256("\n".join(self.names[start:stop]).encode()).hexdigest()
        return start, stop, digest

    def write(self, index, probs, readable):
        start, stop, digest = self.proof(index)
        if len(probs) != stop - start or len(readable) != stop - start:
            raise ValueError(f"chunk {index}: {len(probs)} rows for images {start}..{stop}")
        with atomic_path(self.path(index), "predictions") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, probs=probs, readable=readable, start=start, stop=stop,
                         names_sha256=digest)

    def _load(self, index):
        with np.load(self.path(index), allow_pickle=False) as z:
            return {k: z[k] for k in ("probs", "readable", "start", "stop", "names_sha256")}

    def problem(self, index, width=None):
        """(None or why chunk `index` cannot be used, its number of classes)."""
        try:
            z = self._load(index)
        except Exception as e:  # OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError...
            return f"unreadable ({type(e).__name__}: {one_line(e)[:80]})", width
        start, stop, digest = self.proof(index)
        probs, readable = z["probs"], z["readable"]
        if (int(z["start"]), int(z["stop"])) != (start, stop) or str(z["names_sha256"]) != digest:
            return (f"holds images {int(z['start'])}..{int(z['stop'])} or other names, not "
                    f"images {start}..{stop} of this list (a copied chunk?)"), width
        if (probs.ndim != 2 or len(probs) != stop - start or readable.shape != (stop - start,)
                or readable.dtype != bool or (width is not None and probs.shape[1] != width)):
            return (f"holds {probs.shape} probabilities for {stop - start} images (a truncated "
                    "or damaged chunk?)"), width
        return None, probs.shape[1]

    def read(self, index):
        problem, _ = self.problem(index)
        if problem:  # changed while this run was using it
            raise DataError(f"{self.path(index)}: {problem}; run the same command again to "
                            "predict it again")
        z = self._load(index)
        return z["probs"], z["readable"]

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def predict_in_chunks(predictor, n, chunk_size, chunks, rt, log):
    """Every image's probabilities, a chunk at a time, each chunk saved as it is made (rank 0
    holds `chunks`; under torchrun every rank predicts its share and rank 0 gathers). Returns
    (probs, readable, (images predicted now, seconds)) on rank 0, (None, None, timing)
    elsewhere."""
    is_main = chunks is not None
    n_chunks = -(-n // chunk_size)
    done = chunks.done if is_main else 0
    if rt is not None and rt.distributed:  # rank 0 alone knows what is saved
        import torch.distributed as dist
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    if done and is_main:  # only rank 0 holds the chunks (and prints)
        log(f"continuing after {min(done * chunk_size, n)} images already predicted "
            f"({chunks.dir}/)")
    progress = Progress(n, min(done * chunk_size, n), is_main)
    start = time.perf_counter()
    for c in range(done, n_chunks):
        indices = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
        probs, readable = predictor(indices)
        if is_main:
            chunks.write(c, probs, readable)
        progress.update(len(indices))
    progress.close()
    timing = (n - min(done * chunk_size, n), time.perf_counter() - start)
    if not is_main:
        return None, None, timing
    parts = [chunks.read(c) for c in range(n_chunks)]
    return (np.concatenate([p for p, _ in parts]), np.concatenate([r for _, r in parts]),
            timing)

"""The operating points stored in a model directory (operating_points.json): read and checked
field by field, this model's for a mode, and applied: the thresholds of a rule, the Platt
calibration. Chosen and written by report.py (infer.py --part val); read by infer.py and the
DICOM node (node/pipeline.py)."""
import json
from pathlib import Path

import numpy as np

from common import DataError, one_line
from labels import NIH_CLASSES
from metrics import RULES, apply_platt

OPERATING_POINTS = "operating_points.json"


def read_operating_points(model_dir):
    """operating_points.json as {mode: entry}: strict JSON (no NaN), an object of objects, or a
    one-line DataError naming the file. Entries are checked by check_operating_points."""
    path = Path(model_dir) / OPERATING_POINTS
    if not path.exists():
        return {}

    def constant(name):  # json.loads takes NaN and Infinity, which json.dumps never wrote here
        raise ValueError(f"{name} is not a JSON number")
    try:
        points = json.loads(path.read_text(), parse_constant=constant)
        if not isinstance(points, dict):
            raise ValueError("not a JSON object")
        for mode, entry in points.items():
            if not isinstance(entry, dict):
                raise ValueError(f"entry {mode!r} is a {type(entry).__name__}, not an object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: damaged ({one_line(e)[:160]}); delete it and run `python "
                        "infer.py --part val` to choose the operating points again") from None
    return points


def check_operating_points(points, mode, path):
    """A stored entry, checked field by field (a hand-edited or damaged file is an error here,
    before any image is predicted, never a crash after): a one-line DataError naming the file,
    the entry and the field."""
    def bad(field, problem):
        raise DataError(f"{path}: entry {mode!r}: {field} {problem}; delete the entry (or the "
                        f"file) and run `python infer.py --mode {mode.split('_on_')[0]} --part "
                        "val` to choose the operating points again")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if not isinstance(points.get("model"), str):
        bad("model", "is missing or not a string")
    names = points.get("class_names", NIH_CLASSES)
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        bad("class_names", "is not a list of class names")
    k = len(names)
    if not (isinstance(points.get("images"), int) and not isinstance(points["images"], bool)
            and points["images"] >= 1):
        bad("images", "is not a positive whole number")
    if not isinstance(points.get("chosen_on", ""), str):
        bad("chosen_on", "is not a string")
    positives = points.get("positives", [0] * k)  # absent in files written before 2026-12
    if not (isinstance(positives, list) and len(positives) == k and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in positives)):
        bad("positives", f"is not a list of {k} counts (one per class)")
    thresholds = points.get("thresholds")
    if not isinstance(thresholds, dict):
        bad("thresholds", "is missing or not an object")
    for rule in RULES:
        t = thresholds.get(rule)
        if not isinstance(t, list) or len(t) != k:
            bad(f"thresholds.{rule}", f"is not a list of {k} thresholds (one per class)")
        if not all(v is None or (number(v) and 0 <= v <= 1) for v in t):
            bad(f"thresholds.{rule}", "holds a value that is neither a number in [0, 1] nor null")
    platt = points.get("platt")
    if not isinstance(platt, dict):
        bad("platt", "is missing or not an object")
    for key in ("a", "b"):
        v = platt.get(key)
        if not isinstance(v, list) or len(v) != k or not all(number(x) for x in v):
            bad(f"platt.{key}", f"is not a list of {k} finite numbers")
    if not all(x > 0 for x in platt["a"]):
        bad("platt.a", "holds a slope <= 0: that map would reverse the ranking")
    if not isinstance(platt.get("identity", {}), dict):
        bad("platt.identity", "is not an object")


def operating_points_for(model_dir, mode, model_id, class_names):
    """This model's operating points for this mode, or (None, why not: none chosen yet, or
    chosen for another model or other classes). A damaged entry is a DataError."""
    path = Path(model_dir) / OPERATING_POINTS
    points = read_operating_points(model_dir).get(mode)
    how = f"run `python infer.py --mode {mode.split('_on_')[0]} --part val` to choose them on the val split"
    if points is None:
        return None, f"no operating points for --mode {mode} in {model_dir}/; {how}"
    check_operating_points(points, mode, path)
    if points["model"] != model_id:
        return None, f"the operating points in {model_dir}/ are for another model; {how}"
    # Operating points written before class names were recorded are all of NIH's 14.
    if points.get("class_names", NIH_CLASSES) != list(class_names):
        return None, (f"the operating points in {model_dir}/ are for other classes "
                      f"(chosen on another data set); {how}")
    return points, None


def thresholds_of(points, rule):
    return np.array([np.nan if t is None else t for t in points["thresholds"][rule]], float)


def calibrate(probs, points):
    return apply_platt(probs, points["platt"]["a"], points["platt"]["b"])

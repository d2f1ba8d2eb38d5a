"""The evaluation report: AUROC with patient-level 95% bootstrap intervals, AUPRC beside each
disease's prevalence, operating points chosen on validation and scored on test, calibration,
figures; and the paired comparison of two prediction files.

    python report.py compare A.csv B.csv [--data-dir data --split auto]
        AUC(B) - AUC(A) per disease and for the mean, with a paired patient-level bootstrap
        interval, on the images both files hold (they must hold the same ones);
    python report.py PREDICTIONS.csv [--data-dir data --split auto]
        the full report of an existing predictions file.

infer.py writes a report beside every evaluation's predictions: <csv stem>_report.json (every
number), <stem>_report.md (a table to paste), <stem>_roc.png, _pr.png and _reliability.png.
Torch-free: matplotlib (Agg, no display) for the figures, numpy and scikit-learn for the rest.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np

from common import (ArgumentParser, DataError, add_split_args, atomic_path, atomic_write_text,
                    one_line, os_reason, seed, strict_json)
from labels import (NIH_CLASSES, evaluation_labels, list_header, patient_of, read_list,
                    shared_classes)
from metrics import (N_BOOT, N_BOOT_RANGE, RULES, apply_platt, at_threshold, auprcs, bootstrap_aucs,
                     calibration_errors, choose_thresholds, fit_platt_monotone, interval, known, mean_auc,
                     paired_auc_difference, reliability, roc_aucs)
from splitting import resolve_split

OPERATING_POINTS = "operating_points.json"
STATS = ("sensitivity", "specificity", "ppv", "npv", "f1")


def patient_groups(names):
    """Bootstrap groups: NIH's patient id, or each image on its own for other names."""
    ids = [patient_of(n) for n in names]
    return np.array([f"p{p}" if p is not None else f"i{i}" for i, p in enumerate(ids)])


# ---------------------------------------------------------------------------------------------
# Operating points: chosen on val, stored in the model directory, applied to test

def choose_operating_points(labels, probs, model_id, source, class_names,
                            target_sensitivity=0.9):
    """Thresholds by each rule and Platt parameters, from validation predictions."""
    thresholds = choose_thresholds(labels, probs, target_sensitivity)
    a, b, refused = fit_platt_monotone(labels, probs)
    return {"model": model_id, "chosen_on": str(source), "images": int(len(labels)),
            "target_sensitivity": target_sensitivity, "class_names": list(class_names),
            "thresholds": {rule: thresholds[rule].tolist() for rule in RULES},
            "platt": {"a": a.tolist(), "b": b.tolist(),
                      # fitted slope <= 0 (it would reverse the ranking): identity kept
                      "identity": {class_names[d]: slope for d, slope in refused}}}


def platt_notes(points):
    """The note to print for each disease whose Platt map was refused when it was fitted."""
    return [f"note: Platt calibration of {name}: the slope fitted on val is {slope:.3g} (not "
            "increasing: it would reverse the ranking); --calibrated leaves its probabilities "
            "as they are" for name, slope in points["platt"].get("identity", {}).items()]


def save_operating_points(model_dir, mode, points):
    path = Path(model_dir) / OPERATING_POINTS
    stored = read_operating_points(model_dir)
    stored[mode] = points
    atomic_write_text(path, json.dumps(strict_json(stored), indent=1, allow_nan=False) + "\n",
                      "operating points")
    return path


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


# ---------------------------------------------------------------------------------------------
# The report

def build_report(names, labels, probs, class_names, points=None, n_boot=N_BOOT, seed=0,
                 calibrated=False, **context):
    """Every number of one evaluation, as a JSON-ready dict. points: operating points chosen
    on val (None: no thresholds are reported)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    groups = patient_groups(names)
    aucs = roc_aucs(labels, probs)
    boot, boot_mean = bootstrap_aucs(labels, probs, groups, n_boot, seed)
    lo, hi = interval(boot)
    mlo, mhi = interval(boot_mean[:, None])
    ap = auprcs(labels, probs)
    ece = calibration_errors(labels, probs)
    report = {**context, "calibrated": bool(calibrated), "images": int(len(names)), "patients": int(len(set(groups))),
              "bootstrap": {"resamples": n_boot, "seed": seed, "by": "patient", "interval": 0.95},
              "mean": {"auc": mean_auc(aucs), "auc_ci": [float(mlo[0]), float(mhi[0])]},
              "diseases": {}}
    if points is not None:
        report["operating_points"] = {"chosen_on": points["chosen_on"],
                                      "images": points["images"]}
        stats = {rule: at_threshold(labels, probs, thresholds_of(points, rule), groups, n_boot,
                                    seed) for rule in RULES}
        if calibrated:
            ece_cal = calibration_errors(labels, calibrate(probs, points))
    for d, name in enumerate(class_names):
        y = known(labels[:, d])[0]  # without the uncertain labels
        entry = {"prevalence": float(y.mean()), "positives": int(y.sum()),
                 "auc": aucs[d], "auc_ci": [lo[d], hi[d]], "auprc": ap[d], "ece": ece[d]}
        if points is not None:
            entry["thresholds"] = {}
            for rule in RULES:
                entry["thresholds"][rule] = {
                    "threshold": thresholds_of(points, rule)[d],
                    **{s: [stats[rule][s][0][d], stats[rule][s][1][d], stats[rule][s][2][d]]
                       for s in STATS}}
            if calibrated:
                entry["ece_calibrated"] = ece_cal[d]
        report["diseases"][name] = entry
    return strict_json(_floats(report))


def _floats(value):
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_floats(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _f(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(pair, digits=3):
    lo, hi = pair
    return "n/a" if lo is None or hi is None else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def summary(report):
    """The short stdout table: AUC with its interval, AUPRC beside the prevalence."""
    lines = [f"{'disease':<20}{'AUC':>8}  {'95% CI':<16}{'AUPRC':>7}{'prev':>7}"]
    for name, e in report["diseases"].items():
        lines.append(f"{name:<20}{_f(e['auc']):>8}  {_ci(e['auc_ci']):<16}{_f(e['auprc'], 3):>7}"
                     f"{e['prevalence']:>7.3f}")
    m = report["mean"]
    lines.append(f"{'mean':<20}{_f(m['auc']):>8}  {_ci(m['auc_ci']):<16}")
    return "\n".join(lines)


def markdown(report, rule="youden"):
    """A table to paste into a paper or a README."""
    b = report["bootstrap"]
    head = (f"{report['images']} images, {report['patients']} patients; 95% intervals from "
            f"{b['resamples']} bootstrap resamples of patients (seed {b['seed']}).")
    cols = ["Disease", "Prevalence", "AUROC (95% CI)", "AUPRC", "ECE"]
    points = report.get("operating_points")
    if points:
        head += (f" Thresholds: {rule} rule, chosen on {points['images']} val images "
                 f"({points['chosen_on']}).")
        cols += ["Threshold", "Sensitivity", "Specificity", "PPV", "NPV"]
    rows = [f"| {' | '.join(cols)} |", "|" + " --- |" * len(cols)]
    for name, e in report["diseases"].items():
        cells = [name, f"{e['prevalence']:.3f}", f"{_f(e['auc'], 3)} {_ci(e['auc_ci'])}",
                 _f(e["auprc"], 3), _f(e["ece"], 3)]
        if points:
            t = e["thresholds"][rule]
            cells += [_f(t["threshold"], 3)] + [f"{_f(t[s][0], 3)} {_ci(t[s][1:])}"
                                                 for s in ("sensitivity", "specificity", "ppv", "npv")]
        rows.append("| " + " | ".join(cells) + " |")
    m = report["mean"]
    rows.append(f"| **Mean** | | **{_f(m['auc'], 3)}** {_ci(m['auc_ci'])} |" + " |" * (len(cols) - 3))
    return head + "\n\n" + "\n".join(rows) + "\n"


def write_report(csv_path, report, labels, probs, class_names, points=None, calibrated=False,
                 log=print, figures=True):
    """<stem>_report.json, <stem>_report.md and the figures, beside the predictions."""
    csv_path = Path(csv_path)
    stem = csv_path.with_suffix("")
    atomic_write_text(f"{stem}_report.json",
                      json.dumps(report, indent=1, allow_nan=False) + "\n", "report")
    atomic_write_text(f"{stem}_report.md", markdown(report), "report")
    pngs = (write_figures(stem, labels, probs, class_names, points, calibrated, log)
            if figures else [])
    return [f"{stem}_report.json", f"{stem}_report.md", *pngs]


# ---------------------------------------------------------------------------------------------
# Figures

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _grid(plt, title, n):
    rows = max(1, -(-n // 5))
    fig, axes = plt.subplots(rows, 5, figsize=(17, 3.5 * rows), layout="constrained",
                             squeeze=False)
    fig.suptitle(title)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _save(fig, path):
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)


def write_figures(stem, labels, probs, class_names, points=None, calibrated=False, log=print):
    """ROC and precision-recall curves (14 panels each, operating points marked) and the
    reliability diagram. Needs matplotlib; without it, a note and no figures."""
    plt = _pyplot()
    if plt is None:
        log("note: `pip install matplotlib` for the ROC, PR and reliability figures")
        return []
    from sklearn.metrics import precision_recall_curve, roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs)
    marks = {rule: thresholds_of(points, rule) for rule in RULES} if points else {}
    style = {"youden": "o", "f1": "s", "sensitivity": "^"}
    n = len(class_names)
    roc, roc_axes = _grid(plt, "ROC curves (markers: operating points chosen on val)", n)
    pr, pr_axes = _grid(plt, "Precision-recall curves (dashed: prevalence)", n)
    for d, name in enumerate(class_names):
        y, p = known(labels[:, d], probs[:, d])
        for ax in (roc_axes[d], pr_axes[d]):
            ax.set_title(name, fontsize=10)
        if not 0 < y.sum() < len(y):
            for ax in (roc_axes[d], pr_axes[d]):
                ax.text(0.5, 0.5, "n/a: one class", ha="center", va="center")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        roc_axes[d].plot(fpr, tpr, lw=1.2)
        roc_axes[d].plot([0, 1], [0, 1], "k:", lw=0.6)
        roc_axes[d].set_xlabel("1 - specificity", fontsize=8)
        roc_axes[d].set_ylabel("sensitivity", fontsize=8)
        precision, recall, _ = precision_recall_curve(y, p)
        pr_axes[d].plot(recall, precision, lw=1.2)
        pr_axes[d].axhline(y.mean(), color="k", ls="--", lw=0.6)
        pr_axes[d].set_xlabel("recall", fontsize=8)
        pr_axes[d].set_ylabel("precision", fontsize=8)
        for rule, t in marks.items():
            if np.isnan(t[d]):
                continue
            pos = p >= t[d]
            sens, fp = pos[y == 1].mean(), pos[y == 0].mean()
            prec = y[pos].mean() if pos.any() else 1.0
            roc_axes[d].plot(fp, sens, style[rule], ms=6, label=rule)
            pr_axes[d].plot(sens, prec, style[rule], ms=6, label=rule)
    if marks:
        roc_axes[0].legend(fontsize=7)
        pr_axes[0].legend(fontsize=7)
    paths = [f"{stem}_roc.png", f"{stem}_pr.png", f"{stem}_reliability.png"]
    _save(roc, paths[0])
    _save(pr, paths[1])
    rel, rel_axes = _grid(plt, "Reliability (fraction positive against mean predicted "
                               "probability, 15 bins)", n)
    series = [("predicted", probs)]
    if calibrated and points:
        series.append(("Platt-calibrated", calibrate(probs, points)))
    for d, name in enumerate(class_names):
        ax = rel_axes[d]
        ax.plot([0, 1], [0, 1], "k:", lw=0.6)
        for label, values in series:
            r = reliability(labels[:, d], values[:, d])
            ax.plot(r["mean_predicted"], r["fraction_positive"], "o-", ms=3,
                    label=f"{label} (ECE {r['ece']:.3f})")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=6)
    _save(rel, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------
# Prediction files

def write_predictions(path, names, class_names, probs):
    """The predictions CSV: 'Image Index' and the class names, then a row per image; quoted
    where a name needs it (a comma in a file name), so read_predictions reads it back exactly."""
    import io
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Image Index", *class_names])
    writer.writerows([name, *(f"{p:.6f}" for p in row)] for name, row in zip(names, probs))
    atomic_write_text(path, text.getvalue(), "predictions")


def read_predictions(path):
    """(names, probs [N, K], class names) from a predictions CSV, checked: the header, exactly
    one name and K numbers in [0, 1] per row. The classes are the header's columns after
    'Image Index'."""
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


def labels_for(names, lists, what, classes):
    """The evaluation labels [N, len(classes)] of these images (NaN: uncertain, left out), from
    whichever list of the split holds them, the list's columns matched to `classes` by name
    (or as the same finding under another data set's name)."""
    list_classes = list_header(lists["train"])[0]
    pairs = shared_classes(classes, list_classes)
    if len(pairs) != len(classes):
        unknown = [c for c in classes if c not in {classes[i] for i, _ in pairs}]
        raise DataError(f"{what}: class {unknown[0]!r} is not labelled in {lists['train']}")
    columns = [j for _, j in pairs]
    table = {}
    for path in lists.values():
        ns, ls = read_list(path)
        table.update(zip(ns, evaluation_labels(ls)[:, columns]))
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{what}: {len(missing)} image(s) are in no list of the split "
                        f"{lists['train'].parent} (e.g. {missing[0]}); pass the --data-dir and "
                        "--split they were predicted on")
    return np.stack([table[n] for n in names])


def compare(args):
    names_a, probs_a, classes = read_predictions(args.a)
    names_b, probs_b, classes_b = read_predictions(args.b)
    if classes_b != classes:
        missing = [c for c in classes if c not in classes_b] or [c for c in classes_b
                                                                 if c not in classes]
        detail = f"no column {missing[0]!r}: " if missing else "its columns in another order: "
        raise DataError(f"{args.b}: {detail}it predicts other classes than {args.a}")
    if set(names_a) != set(names_b):
        only = sorted(set(names_a) ^ set(names_b))
        raise DataError(f"{args.b}: not the images of {args.a} ({len(only)} differ, e.g. "
                        f"{only[0]}): a paired comparison needs the same images")
    order = {n: i for i, n in enumerate(names_b)}
    probs_b = probs_b[[order[n] for n in names_a]]
    lists = resolve_split(args.split, args.data_dir, args.split_seed,
                          getattr(args, "keep_laterals", False))
    labels = labels_for(names_a, lists, args.a, classes)
    result = paired_auc_difference(labels, probs_a, probs_b, patient_groups(names_a),
                                   args.n_boot, args.boot_seed)
    print(f"{len(names_a)} images, {len(set(patient_groups(names_a)))} patients; "
          f"B = {args.b}, A = {args.a}; paired bootstrap of patients, {args.n_boot} resamples")
    print(f"{'disease':<20}{'AUC A':>8}{'AUC B':>8}{'B - A':>9}  {'95% CI':<18}")
    for d, name in enumerate(classes):
        if np.isnan(result["a"][d]):
            print(f"{name:<20}{'n/a':>8}{'n/a':>8}")
            continue
        lo, hi = result["lo"][d], result["hi"][d]
        verdict = "" if np.isnan(lo) else ("significant" if lo > 0 or hi < 0 else "not significant")
        print(f"{name:<20}{result['a'][d]:>8.4f}{result['b'][d]:>8.4f}{result['diff'][d]:>+9.4f}"
              f"  {_ci((lo, hi), 4):<20} {verdict}")
    diff, lo, hi = result["mean"]
    verdict = "significant" if lo > 0 or hi < 0 else "not significant"
    print(f"{'mean':<20}{mean_auc(result['a']):>8.4f}{mean_auc(result['b']):>8.4f}{diff:>+9.4f}"
          f"  {_ci((lo, hi), 4):<20} {verdict}")
    return result


def report_file(args):
    names, probs, classes = read_predictions(args.predictions)
    lists = resolve_split(args.split, args.data_dir, args.split_seed,
                          getattr(args, "keep_laterals", False))
    labels = labels_for(names, lists, args.predictions, classes)
    report = build_report(names, labels, probs, classes, n_boot=args.n_boot, seed=args.boot_seed,
                          predictions=str(args.predictions))
    print(summary(report))
    for path in write_report(args.predictions, report, labels, probs, classes,
                             figures=not args.no_figures):
        print(f"wrote {path}")
    return report


def n_boot(text):
    """--n-boot (argparse type): a whole number in N_BOOT_RANGE, checked before any work."""
    import argparse
    low, high = N_BOOT_RANGE
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {low} to {high}, got {text!r} (a 95% interval is the "
            f"2.5th to 97.5th percentile of the resamples: fewer than {low} cannot place it; more "
            f"than {high} only cost memory and time)")
    return value


def add_report_args(parser):
    """--n-boot, --boot-seed: the report's bootstrap (report.py and infer.py)."""
    parser.add_argument("--n-boot", type=n_boot, default=N_BOOT,
                        help=f"bootstrap resamples of patients for the 95%% intervals "
                             f"({N_BOOT_RANGE[0]} to {N_BOOT_RANGE[1]}, default {N_BOOT})")
    parser.add_argument("--boot-seed", type=seed, default=0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    if argv[:1] == ["compare"]:
        parser.add_argument("command")
        parser.add_argument("a", help="predictions CSV of model A (the reference)")
        parser.add_argument("b", help="predictions CSV of model B, same images")
    else:
        parser.add_argument("predictions", help="a predictions CSV written by infer.py")
    add_split_args(parser, "CheXpert, MIMIC-CXR: the split with lateral views")
    if argv[:1] != ["compare"]:
        parser.add_argument("--no-figures", action="store_true",
                            help="the report's JSON and Markdown only")
    add_report_args(parser)
    args = parser.parse_args(argv)
    try:
        return compare(args) if argv[:1] == ["compare"] else report_file(args)
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()

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

from common import (ArgumentParser, DataError, atomic_path, atomic_write_text, one_line, os_reason,
                    positive_int, seed, strict_json)
from labels import (CLASS_NAMES, evaluation_labels, list_header, patient_of, read_list,
                    resolve_split, shared_classes)
from metrics import (N_BOOT, RULES, apply_platt, at_threshold, auprcs, bootstrap_aucs,
                     calibration_errors, choose_thresholds, fit_platt, interval, known, mean_auc,
                     paired_auc_difference, reliability, roc_aucs)
from subgroups import (add_subgroup_args, demographics_for, markdown_section, subgroup_section,
                       summary_lines, write_figure)

OPERATING_POINTS = "operating_points.json"
STATS = ("sensitivity", "specificity", "ppv", "npv", "f1")


def patient_groups(names):
    """Bootstrap groups: NIH's patient id, or each image on its own for other names."""
    ids = [patient_of(n) for n in names]
    return np.array([f"p{p}" if p is not None else f"i{i}" for i, p in enumerate(ids)])


# ---------------------------------------------------------------------------------------------
# Operating points: chosen on val, stored in the model directory, applied to test

def choose_operating_points(labels, probs, model_id, source, target_sensitivity=0.9,
                            class_names=CLASS_NAMES):
    """Thresholds by each rule and Platt parameters, from validation predictions."""
    thresholds = choose_thresholds(labels, probs, target_sensitivity)
    a, b = fit_platt(labels, probs)
    return {"model": model_id, "chosen_on": str(source), "images": int(len(labels)),
            "target_sensitivity": target_sensitivity, "class_names": list(class_names),
            "thresholds": {rule: thresholds[rule].tolist() for rule in RULES},
            "platt": {"a": a.tolist(), "b": b.tolist()}}


def save_operating_points(model_dir, mode, points):
    path = Path(model_dir) / OPERATING_POINTS
    stored = read_operating_points(model_dir)
    stored[mode] = points
    atomic_write_text(path, json.dumps(strict_json(stored), indent=1, allow_nan=False) + "\n",
                      "operating points")
    return path


def read_operating_points(model_dir):
    path = Path(model_dir) / OPERATING_POINTS
    if not path.exists():
        return {}
    try:
        points = json.loads(path.read_text())
        if not isinstance(points, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: damaged ({one_line(e)}); run `python infer.py --part val` "
                        "again to choose the operating points") from None
    return points


def operating_points_for(model_dir, mode, model_id, class_names=CLASS_NAMES):
    """This model's operating points for this mode, or (None, why not)."""
    points = read_operating_points(model_dir).get(mode)
    how = f"run `python infer.py --mode {mode} --part val` to choose them on the val split"
    if points is None:
        return None, f"no operating points for --mode {mode} in {model_dir}/; {how}"
    if points.get("model") != model_id:
        return None, f"the operating points in {model_dir}/ are for another model; {how}"
    if points.get("class_names", CLASS_NAMES) != list(class_names):
        return None, (f"the operating points in {model_dir}/ are for other classes "
                      f"(chosen on another data set); {how}")
    try:
        for rule in RULES:
            if len(points["thresholds"][rule]) != len(class_names):
                raise ValueError(rule)
        np.asarray(points["platt"]["a"], float), np.asarray(points["platt"]["b"], float)
    except (KeyError, TypeError, ValueError):
        return None, f"{Path(model_dir) / OPERATING_POINTS}: damaged entry for {mode}; {how}"
    return points, None


def thresholds_of(points, rule):
    return np.array([np.nan if t is None else t for t in points["thresholds"][rule]], float)


def calibrate(probs, points):
    return apply_platt(probs, points["platt"]["a"], points["platt"]["b"])


# ---------------------------------------------------------------------------------------------
# The report

def build_report(names, labels, probs, points=None, n_boot=N_BOOT, seed=0, calibrated=False,
                 class_names=CLASS_NAMES, demographics=None, **context):
    """Every number of one evaluation, as a JSON-ready dict. points: operating points chosen
    on val (None: no thresholds are reported). demographics: subgroups.Demographics of the
    images (None: no subgroup section)."""
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
    if demographics is not None:  # by sex and age band (subgroups.py)
        report["subgroups"] = subgroup_section(
            names, labels, probs, groups, demographics,
            {rule: thresholds_of(points, rule) for rule in RULES} if points else None, n_boot,
            seed, class_names, points["chosen_on"] if points else None)
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
    if report.get("subgroups"):
        lines += summary_lines(report["subgroups"])
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
    text = head + "\n\n" + "\n".join(rows) + "\n"
    if report.get("subgroups"):
        text += markdown_section(report["subgroups"], rule)
    return text


def write_report(csv_path, report, labels, probs, points=None, calibrated=False, log=print,
                 figures=True, class_names=CLASS_NAMES):
    """<stem>_report.json, <stem>_report.md and the figures, beside the predictions."""
    csv_path = Path(csv_path)
    stem = csv_path.with_suffix("")
    atomic_write_text(f"{stem}_report.json",
                      json.dumps(report, indent=1, allow_nan=False) + "\n", "report")
    atomic_write_text(f"{stem}_report.md", markdown(report), "report")
    pngs = (write_figures(stem, labels, probs, points, calibrated, log, class_names)
            if figures else [])
    if figures and report.get("subgroups") and pngs:
        pngs += [p for p in [write_figure(f"{stem}_subgroups.png", report["subgroups"])] if p]
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


def write_figures(stem, labels, probs, points=None, calibrated=False, log=print,
                  class_names=CLASS_NAMES):
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

def read_predictions(path):
    """(names, probs [N, K], class names) from a predictions CSV, checked: the header, numbers
    in [0, 1]. The classes are the header's columns after 'Image Index'."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read predictions ({os_reason(e)})") from None
    if not rows or rows[0][:1] != ["Image Index"]:
        raise DataError(f"{path}: not a predictions file (its first column must be 'Image Index')")
    classes = rows[0][1:]
    if not classes or len(set(classes)) != len(classes) or not all(classes):
        raise DataError(f"{path}: its header must name each class once after 'Image Index'")
    columns = list(range(1, len(classes) + 1))
    names, probs = [], []
    for line, row in enumerate(rows[1:], 2):
        try:
            values = [float(row[c]) for c in columns]
        except (ValueError, IndexError):
            raise DataError(f"{path}:{line}: expected {len(classes)} probabilities") from None
        if not all(0 <= v <= 1 for v in values):  # NaN fails this too
            raise DataError(f"{path}:{line}: probabilities must be numbers in [0, 1]")
        names.append(row[0])
        probs.append(values)
    if not names:
        raise DataError(f"{path}: no predictions")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: an image is listed twice")
    return names, np.array(probs), classes


def labels_for(names, lists, what, classes=CLASS_NAMES):
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
    points = None
    if args.val_predictions is not None:  # operating points chosen on val, never on test
        val_names, val_probs, val_classes = read_predictions(args.val_predictions)
        if val_classes != classes:
            raise DataError(f"--val-predictions {args.val_predictions}: predicts other classes "
                            f"than {args.predictions}")
        shared = set(val_names) & set(names)
        if shared:
            raise DataError(f"--val-predictions {args.val_predictions}: shares {len(shared)} "
                            f"image(s) with {args.predictions} (e.g. {sorted(shared)[0]}): "
                            "thresholds must be chosen on other images (val)")
        val_labels = labels_for(val_names, lists, args.val_predictions, classes)
        points = choose_operating_points(val_labels, val_probs, None, args.val_predictions,
                                         class_names=classes)
    demographics = demographics_for(args.data_dir, args.no_subgroups, args.patients_table)
    report = build_report(names, labels, probs, points, n_boot=args.n_boot, seed=args.boot_seed,
                          class_names=classes, demographics=demographics,
                          predictions=str(args.predictions))
    print(summary(report))
    for path in write_report(args.predictions, report, labels, probs, points,
                             class_names=classes, figures=not args.no_figures):
        print(f"wrote {path}")
    return report


def add_report_args(parser):
    parser.add_argument("--n-boot", type=positive_int, default=N_BOOT,
                        help="bootstrap resamples (patients drawn with replacement)")
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
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--split", default="auto", help="the split the images come from")
    parser.add_argument("--split-seed", type=seed, default=0)
    parser.add_argument("--keep-laterals", action="store_true",
                        help="CheXpert, MIMIC-CXR: the split with lateral views")
    if argv[:1] != ["compare"]:
        parser.add_argument("--no-figures", action="store_true",
                            help="the report's JSON and Markdown only")
        parser.add_argument("--val-predictions", default=None, metavar="CSV",
                            help="the same model's predictions on val: operating points (and "
                                 "the subgroups' TPR/FPR) at thresholds chosen there")
        add_subgroup_args(parser)
    add_report_args(parser)
    args = parser.parse_args(argv)
    try:
        return compare(args) if argv[:1] == ["compare"] else report_file(args)
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()

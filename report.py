"""The evaluation report: AUROC with patient-level 95% bootstrap intervals, AUPRC beside each
disease's prevalence, operating points chosen on validation and scored on test, calibration,
figures; and the paired comparison of two prediction files.

    python report.py compare A.csv B.csv [--data-dir DIR --split SPLIT]
        AUC(B) - AUC(A) per disease and for the mean, with a paired patient-level bootstrap
        interval, on the images both files hold (they must hold the same ones);
    python report.py PREDICTIONS.csv [--data-dir DIR --split SPLIT]
        the full report of an existing predictions file.
The data directory and split default to what the (first) file's record says.

infer.py writes a report beside every evaluation's predictions: <csv stem>_report.json (every
number), <stem>_report.md (a table to paste), <stem>_roc.png, _pr.png and _reliability.png;
and <stem>_source.json, what the evaluation knew (its data directory and split, the model and
its operating points, raw or calibrated probabilities). `report.py PREDICTIONS.csv` reads that
record, so that its report is the evaluation's own again, and writes under its own name,
<stem>_rerun_*: an evaluation's report is never replaced by another tool's.
Torch-free: matplotlib (Agg, no display) for the figures, numpy and scikit-learn for the rest.
"""
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

from common import (SAMPLE_NOTICE, ArgumentParser, DataError, add_split_args, atomic_path,
                    atomic_write_text, one_line, seed, strict_json, trained_on_sample)
from labels import (NIH_CLASSES, evaluation_labels, list_header, patient_of, read_list,
                    shared_classes)
from metrics import (N_BOOT, N_BOOT_RANGE, RULE_MEANING, RULES, at_threshold,
                     auc_collapsed, auprcs, bootstrap_aucs, calibration_errors,
                     choose_thresholds, fit_platt_monotone, interval, known, mean_auc,
                     paired_auc_difference, reliability, roc_aucs)
from operating_points import (OPERATING_POINTS, calibrate, check_operating_points,
                              read_operating_points, thresholds_of)
from predictions import read_predictions, read_source, source_path
from splitting import Data
from optional import MissingPackage, pyplot
from subgroups import (add_subgroup_args, demographics_for, markdown_section, subgroup_section,
                       summary_lines, write_figure)

STATS = ("sensitivity", "specificity", "ppv", "npv", "f1")
FEW_POSITIVES = 10  # fewer positives than this: intervals too wide to mean much (flagged)
FEW_MARK = "\u2020"  # the dagger that flags them
FEW_NOTE = (f"{FEW_MARK} fewer than {FEW_POSITIVES} positives: the interval rests on too few "
            "cases to mean much")
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
    positives = (np.asarray(labels, float) == 1).sum(axis=0).tolist()  # NaN (uncertain): no
    return {"model": model_id, "chosen_on": str(source), "images": int(len(labels)),
            "positives": positives,  # per class: how much each threshold rests on
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


def thresholds_note(points, rule):
    """The lines that say where the decisions come from: the rule, what it chooses, the val
    images it was chosen on, and the classes whose threshold rests on few positives."""
    lines = [f"thresholds: {rule} rule ({RULE_MEANING[rule]}; --rule chooses another), chosen "
             f"on {points['images']} val images"
             + (f" ({points['chosen_on']})" if points.get("chosen_on") else "")]
    if "positives" in points:
        names = points.get("class_names", NIH_CLASSES)  # absent: an NIH model's old file
        few = sorted((n, name) for n, name in zip(points["positives"], names)
                     if n < FEW_POSITIVES)
        if few:
            lines.append(f"note: fewer than {FEW_POSITIVES} val positives behind the threshold "
                         "of " + ", ".join(f"{name} ({n})" for n, name in few)
                         + ": those decisions are rough")
    return lines


def on_calibrated(points):
    """The operating points as they apply to probabilities already Platt-calibrated with
    them: each threshold mapped through its class's calibration (the map is increasing, so
    every decision is the one the raw probability and its raw threshold give, except within
    1e-7 of 0 or 1, where the logit is clipped and the map flat), and no calibration left to
    apply."""
    k = len(points["platt"]["a"])
    thresholds = {rule: [None if t is None else float(calibrate(np.full((1, k), t), points)[0, d])
                         for d, t in enumerate(values)]
                  for rule, values in points["thresholds"].items()}
    return {**points, "thresholds": thresholds,
            "platt": {"a": [1.0] * k, "b": [0.0] * k, "identity": {}},
            "calibrated": True}


# What the probabilities of a report are, in its words (None: a predictions file without the
# record that says, e.g. written before records were; never guessed raw)
PROBABILITIES = {False: "raw (as the model gives them)",
                 True: "Platt-calibrated (the calibration fitted on val)",
                 None: "not recorded (raw or calibrated: no <stem>_source.json beside the file)"}
PROBABILITIES_SHORT = {False: "raw probabilities", True: "Platt-calibrated probabilities",
                       None: "probabilities not recorded as raw or calibrated"}


# ---------------------------------------------------------------------------------------------
# The report

def build_report(names, labels, probs, class_names, points=None, n_boot=N_BOOT, seed=0,
                 calibrated=False, demographics=None, **context):
    """Every number of one evaluation, as a JSON-ready dict. points: operating points chosen
    on val, as they apply to `probs` (on_calibrated's where those are calibrated; None: no
    thresholds are reported). calibrated: whether `probs` are Platt-calibrated (the report
    says which, everywhere; None: not known). demographics: subgroups.Demographics of the
    images (None: no subgroup section)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    groups = patient_groups(names)
    aucs = roc_aucs(labels, probs)
    boot, boot_mean = bootstrap_aucs(labels, probs, groups, n_boot, seed)
    lo, hi = auc_collapsed(interval(boot), aucs, *patients_by_class(labels, groups))
    mlo, mhi = interval(boot_mean[:, None])
    ap = auprcs(labels, probs)
    ece = calibration_errors(labels, probs)
    calibrated = None if calibrated is None else bool(calibrated)
    report = {**context, "calibrated": calibrated, "probabilities": PROBABILITIES[calibrated],
              "images": int(len(names)), "patients": int(len(set(groups))),
              "bootstrap": {"resamples": n_boot, "seed": seed, "by": "patient", "interval": 0.95},
              "mean": {"auc": mean_auc(aucs), "auc_ci": [float(mlo[0]), float(mhi[0])]},
              "diseases": {}}
    if points is not None:
        report["operating_points"] = {"chosen_on": points["chosen_on"],
                                      "images": points["images"]}
        stats = {rule: at_threshold(labels, probs, thresholds_of(points, rule), groups, n_boot,
                                    seed) for rule in RULES}
    for d, name in enumerate(class_names):
        y = known(labels[:, d])[0]  # without the uncertain labels
        entry = {"prevalence": float(y.mean()), "positives": int(y.sum()),
                 "few_positives": bool(y.sum() < FEW_POSITIVES),
                 "auc": aucs[d], "auc_ci": [lo[d], hi[d]], "auprc": ap[d], "ece": ece[d]}
        if points is not None:
            entry["thresholds"] = {}
            for rule in RULES:
                entry["thresholds"][rule] = {
                    "threshold": thresholds_of(points, rule)[d],
                    **{s: [stats[rule][s][0][d], stats[rule][s][1][d], stats[rule][s][2][d]]
                       for s in STATS}}
        report["diseases"][name] = entry
    if demographics is not None:  # by sex and age band (subgroups.py)
        report["subgroups"] = subgroup_section(
            names, labels, probs, groups, demographics,
            {rule: thresholds_of(points, rule) for rule in RULES} if points else None, n_boot,
            seed, class_names, points["chosen_on"] if points else None)
    return strict_json(_floats(report))


def patients_by_class(labels, groups):
    """(patients with a positive, patients with a negative) of each class [K], uncertain
    labels left out."""
    labels = np.asarray(labels, dtype=np.float64)
    counts = []
    for value in (1, 0):
        counts.append(np.array([len(set(groups[labels[:, d] == value]))
                                for d in range(labels.shape[1])]))
    return counts


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
    lines = [f"{'disease':<20}{'AUC':>8}  {'95% CI':<16}{'AUPRC':>7}{'prev':>7}{'pos':>6}"]
    for name, e in report["diseases"].items():
        lines.append(f"{name:<20}{_f(e['auc']):>8}  {_ci(e['auc_ci']):<16}{_f(e['auprc'], 3):>7}"
                     f"{e['prevalence']:>7.3f}{e['positives']:>6}{_few(e)}")
    m = report["mean"]
    lines.append(f"{'mean':<20}{_f(m['auc']):>8}  {_ci(m['auc_ci']):<16}")
    if any(_few(e) for e in report["diseases"].values()):
        lines.append(FEW_NOTE)
    if report.get("notice"):
        lines.append(report["notice"])
    if report.get("subgroups"):
        lines += summary_lines(report["subgroups"])
    return "\n".join(lines)


def _few(entry):
    """The footnote mark of a class with too few positives for its intervals to mean much."""
    return FEW_MARK if entry["positives"] < FEW_POSITIVES else ""


def markdown(report, rule="youden"):
    """A table to paste into a paper or a README."""
    b = report["bootstrap"]
    head = (f"{report['images']} images, {report['patients']} patients; 95% intervals from "
            f"{b['resamples']} bootstrap resamples of patients (seed {b['seed']}). "
            f"Probabilities: {report.get('probabilities', PROBABILITIES[False])}.")
    if report.get("protocol"):
        head += f" Protocol: {report['protocol']}."
    if report.get("made_by"):
        head += f" Made by {report['made_by']}."
    if report.get("notice"):
        head = f"**{report['notice']}**\n\n" + head
    cols = ["Disease", "Prevalence (positives)", "AUROC (95% CI)", "AUPRC", "ECE"]
    points = report.get("operating_points")
    if points:
        head += (f" Thresholds: {rule} rule, chosen on {points['images']} val images "
                 f"({points['chosen_on']}).")
        cols += ["Threshold", "Sensitivity", "Specificity", "PPV", "NPV"]
    rows = [f"| {' | '.join(cols)} |", "|" + " --- |" * len(cols)]
    for name, e in report["diseases"].items():
        cells = [f"{name}{_few(e)}", f"{e['prevalence']:.3f} ({e['positives']})",
                 f"{_f(e['auc'], 3)} {_ci(e['auc_ci'])}",
                 _f(e["auprc"], 3), _f(e["ece"], 3)]
        if points:
            t = e["thresholds"][rule]
            cells += [_f(t["threshold"], 3)] + [f"{_f(t[s][0], 3)} {_ci(t[s][1:])}"
                                                 for s in ("sensitivity", "specificity", "ppv", "npv")]
        rows.append("| " + " | ".join(cells) + " |")
    m = report["mean"]
    rows.append(f"| **Mean** | | **{_f(m['auc'], 3)}** {_ci(m['auc_ci'])} |" + " |" * (len(cols) - 3))
    few = any(_few(e) for e in report["diseases"].values())
    text = head + "\n\n" + "\n".join(rows) + "\n" + (f"\n{FEW_NOTE}.\n" if few else "")
    if report.get("subgroups"):
        text += markdown_section(report["subgroups"], rule)
    return text


def write_report(stem, report, labels, probs, class_names, points=None, log=print,
                 figures=True, platt=None):
    """<stem>_report.json, <stem>_report.md and the figures <stem>_*.png (stem: the
    predictions file's path without .csv, infer.py's; report.py's own ends in _rerun). platt:
    operating points chosen on val whose calibration the reliability diagram also draws
    (raw probabilities only)."""
    atomic_write_text(f"{stem}_report.json",
                      json.dumps(report, indent=1, allow_nan=False) + "\n", "report")
    atomic_write_text(f"{stem}_report.md", markdown(report), "report")
    pngs = (write_figures(stem, labels, probs, class_names, points, log, report, platt)
            if figures else [])
    if figures and report.get("subgroups") and pngs:
        pngs += [p for p in [write_figure(f"{stem}_subgroups.png", report["subgroups"],
                                          notice=report.get("notice"))] if p]
    return [f"{stem}_report.json", f"{stem}_report.md", *pngs]


# ---------------------------------------------------------------------------------------------
# Figures

def panel_grid(plt, title, n, strips=False):
    """A figure of n panels, 5 a row, titled; returns (figure, the n axes). strips: under
    each panel a strip a third of its height sharing its x axis; returns (figure, the n
    panels, their n strips)."""
    rows = max(1, -(-n // 5))
    if strips:
        fig = plt.figure(figsize=(17, 4.4 * rows), layout="constrained")
        grid = fig.add_gridspec(2 * rows, 5, height_ratios=[3, 1] * rows)
        axes, below = [], []
        for d in range(n):  # each strip right after its panel, in fig.axes too
            axes.append(fig.add_subplot(grid[2 * (d // 5), d % 5]))
            below.append(fig.add_subplot(grid[2 * (d // 5) + 1, d % 5], sharex=axes[-1]))
        fig.suptitle(title)
        return fig, axes, below
    fig, axes = plt.subplots(rows, 5, figsize=(17, 3.5 * rows), layout="constrained",
                             squeeze=False)
    fig.suptitle(title)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def save_figure(fig, path):
    """The figure as a PNG, written as a unit, then closed."""
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    pyplot().close(fig)


# Markers drawn largest first, so that the smaller ones stay visible on top of them (the rules
# often choose the same point): sensitivity under f1 under Youden.
MARKERS = {"sensitivity": dict(marker="^", ms=12, color="tab:red", zorder=3),
           "f1": dict(marker="s", ms=9, color="tab:green", zorder=4),
           "youden": dict(marker="o", ms=6, color="tab:orange", zorder=5)}
def pr_curve(y, p):
    """(recall, precision) at every threshold of the data, the highest first (recall never
    decreasing), led by the first threshold's precision at recall 0: drawn as steps up to each
    point ('steps-pre'), the curve passes through every operating point (a precision that
    drops while recall stays is a vertical step) and encloses the average precision, the
    report's AUPRC. Not scikit-learn's appended point (recall 0, precision 1), which no
    threshold gives and which drew a spike at recall 0. With one positive it is still a curve."""
    from sklearn.metrics import precision_recall_curve
    precision, recall, _ = precision_recall_curve(y, p)
    recall, precision = recall[-2::-1], precision[-2::-1]  # without the appended point
    return np.r_[0.0, recall], np.r_[precision[0], precision]


def _figure_title(what, report):
    """'ROC curves, int8, test: 340 images' from the report's context, when it has one."""
    if not report:
        return what
    where = [str(report[k]) for k in ("mode", "part") if report.get(k)]
    where.append(PROBABILITIES_SHORT[report.get("calibrated", False)])
    return f"{what}, {', '.join(where)}: {report['images']} images" + (
        f"\n{report['notice']}" if report.get("notice") else "")


def _panel_title(name, entry, curve="roc"):
    """'Cardiomegaly\\nAUC 0.88 [0.77, 0.97], 2 pos.†' (the dagger: few positives) on a ROC
    panel; 'AUPRC 0.30 (prevalence 0.05), 2 pos.' on a precision-recall one."""
    if entry is None:
        return name
    if curve == "pr":
        auc = ("AUPRC n/a" if entry["auprc"] is None else
               f"AUPRC {entry['auprc']:.2f} (prevalence {entry['prevalence']:.2f})")
    else:
        auc = ("AUC n/a" if entry["auc"] is None else
               f"AUC {entry['auc']:.2f} {_ci(entry['auc_ci'], 2)}")
    few = FEW_MARK if entry["positives"] < FEW_POSITIVES else ""
    return f"{name}\n{auc}, {entry['positives']} pos.{few}"


def write_figures(stem, labels, probs, class_names, points=None, log=print, report=None,
                  platt=None):
    """<stem>_roc.png, _pr.png, _reliability.png: ROC and precision-recall curves (a panel per
    class, with AUC, its interval and the positives; the operating points of `points` marked)
    and the reliability diagram (with the Platt-calibrated curve when `platt`, operating points
    chosen on val, is given). report: the build_report dict of these predictions (titles: what
    they are, raw or calibrated). Needs matplotlib; without it, a note and no figures."""
    try:
        plt = pyplot("drawing the ROC, PR and reliability figures")
    except MissingPackage as e:
        log(f"note: {e}")
        return []
    from sklearn.metrics import roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs)
    marks = {rule: thresholds_of(points, rule) for rule in MARKERS} if points else {}
    entries = (report or {}).get("diseases", {})
    n = len(class_names)
    few = any(e["positives"] < FEW_POSITIVES for e in entries.values())
    roc, roc_axes = panel_grid(plt, _figure_title("ROC curves", report), n)
    pr, pr_axes = panel_grid(plt, _figure_title("Precision-recall curves", report), n)
    for d, name in enumerate(class_names):
        y, p = known(labels[:, d], probs[:, d])
        for ax, curve in ((roc_axes[d], "roc"), (pr_axes[d], "pr")):
            ax.set_title(_panel_title(name, entries.get(name), curve), fontsize=9)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
        roc_axes[d].set_xlabel("1 - specificity", fontsize=8)
        roc_axes[d].set_ylabel("sensitivity", fontsize=8)
        pr_axes[d].set_xlabel("recall (sensitivity)", fontsize=8)
        pr_axes[d].set_ylabel("precision (PPV)", fontsize=8)
        if not 0 < y.sum() < len(y):
            for ax in (roc_axes[d], pr_axes[d]):
                ax.text(0.5, 0.5, "n/a: one class", ha="center", va="center")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        roc_axes[d].plot([0, 1], [0, 1], "k:", lw=0.6, zorder=1)
        roc_axes[d].plot(fpr, tpr, lw=1.4, color="tab:blue", zorder=2)
        recall, precision = pr_curve(y, p)
        pr_axes[d].axhline(y.mean(), color="k", ls="--", lw=0.6, zorder=1)
        # steps-pre: each threshold's precision over the recall it adds; the area under the
        # steps is the average precision (the AUPRC of the report)
        pr_axes[d].plot(recall, precision, lw=1.4, color="tab:blue", drawstyle="steps-pre",
                        zorder=2)
        for rule, t in marks.items():
            if np.isnan(t[d]):
                continue
            pos = p >= t[d]
            sens, fp = pos[y == 1].mean(), pos[y == 0].mean()
            style = dict(ls="none", mec="white", mew=0.8, **MARKERS[rule])
            roc_axes[d].plot(fp, sens, label=rule, **style)
            if pos.any():  # no precision where nothing is called positive
                pr_axes[d].plot(sens, y[pos].mean(), label=rule, **style)
    from matplotlib.lines import Line2D
    for fig, curve in ((roc, "ROC"), (pr, "precision-recall")):
        handles = [Line2D([], [], color="tab:blue", lw=1.4, label=f"{curve} curve")]
        handles.append(Line2D([], [], color="k", ls=":" if fig is roc else "--", lw=0.8,
                              label="chance" if fig is roc else "prevalence (chance)"))
        handles += [Line2D([], [], ls="none", mec="white", label=f"{rule} threshold",
                           **MARKERS[rule]) for rule in marks]
        note = ("markers: operating points chosen on "
                f"{points['images']} val images, applied here" if marks else "")
        note += ("; " if note and few else "") + (FEW_NOTE if few else "")
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9,
                   title=note or None, title_fontsize=9, frameon=False)
    paths = [f"{stem}_roc.png", f"{stem}_pr.png", f"{stem}_reliability.png"]
    save_figure(roc, paths[0])
    save_figure(pr, paths[1])
    save_figure(reliability_figure(plt, labels, probs, class_names, report, platt), paths[2])
    return paths


FEW_IN_BIN = 10  # a reliability point resting on fewer images is drawn hollow


def reliability_figure(plt, labels, probs, class_names, report=None, platt=None, bins=15):
    """Per class, fraction positive against mean predicted probability per bin, and under it a
    strip of the images per bin of each curve (log scale: where a curve rests on data at all);
    the Platt-calibrated curve too when `platt` is given. A point of fewer than FEW_IN_BIN
    images is hollow: a swing there is noise, not a fault."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    series = [("as predicted", probs, "tab:blue")]
    if platt is not None:
        series.append(("Platt-calibrated (fitted on val)", calibrate(probs, platt), "tab:red"))
    fig, axes, strips = panel_grid(
        plt, _figure_title(f"Reliability ({bins} equal-width bins)", report), len(class_names),
        strips=True)
    width = 1 / bins
    for d, name in enumerate(class_names):
        ax, strip = axes[d], strips[d]
        ax.plot([0, 1], [0, 1], "k:", lw=0.6)
        eces, top = [], 1
        for i, (label, values, colour) in enumerate(series):
            r = reliability(labels[:, d], values[:, d], bins)
            ax.plot(r["mean_predicted"], r["fraction_positive"], "-", lw=1.2, color=colour)
            few = r["count"] < FEW_IN_BIN
            ax.plot(r["mean_predicted"][~few], r["fraction_positive"][~few], "o", ms=3.5,
                    color=colour)
            ax.plot(r["mean_predicted"][few], r["fraction_positive"][few], "o", ms=3.5,
                    color=colour, mfc="white")
            eces.append(f"{r['ece']:.3f}")
            y, p = known(labels[:, d], values[:, d])
            hist = np.histogram(p, bins=bins, range=(0, 1))[0]
            share = width / len(series)  # each curve's images side by side in its bin
            strip.bar(np.arange(bins) * width + i * share, hist, share, align="edge",
                      color="0.75" if i == 0 else colour, alpha=1 if i == 0 else 0.5,
                      edgecolor="0.45", lw=0.4)
            top = max(top, hist.max())
        strip.set_yscale("symlog", linthresh=1)
        strip.set_ylim(0, 10 ** np.ceil(np.log10(top + 1)))
        strip.set_yticks([t for t in (1, 10, 100, 1000, 10 ** 4, 10 ** 5) if t <= top] or [1])
        strip.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
        strip.yaxis.set_minor_locator(plt.NullLocator())
        strip.set_ylabel("images", fontsize=8)
        strip.set_xlabel("mean predicted probability", fontsize=8)
        strip.tick_params(labelsize=7)
        ax.tick_params(labelsize=7, labelbottom=False)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("fraction positive", fontsize=8)
        ax.set_title(f"{name}\nECE {' / '.join(eces)}", fontsize=9)
    handles = [Line2D([], [], color=c, marker="o", ms=4, label=label) for label, _, c in series]
    handles += [Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", ms=4,
                       label=f"a bin of fewer than {FEW_IN_BIN} images"),
                Line2D([], [], color="k", ls=":", label="perfect calibration"),
                Patch(facecolor="0.75", edgecolor="0.45",
                      label="images per bin (log scale)" + (
                          "; red: after calibration" if len(series) > 1 else ""))]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10,
               frameon=False, title="ECE in the titles: " + " / ".join(s[0] for s in series),
               title_fontsize=10)
    return fig


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


def recorded_split(args, csv_path):
    """(the record of csv_path, the splitting.Data of its split, resolved): --data-dir,
    --split, --split-seed, --keep-laterals where given, else what the record says, else the
    defaults; said before the split is read (an error then names what the record said)."""
    source, note = read_source(csv_path)
    if note:
        print(f"note: {note}")
    given = {"data_dir": args.data_dir, "split": args.split, "split_seed": args.split_seed,
             "keep_laterals": args.keep_laterals}

    def setting(name, default):  # the flag where given, else the record's, else the default
        return given[name] if given[name] is not None else source.get(name, default)
    data_dir, split = setting("data_dir", "data"), setting("split", "auto")
    if source:
        print(f"using what {source.get('made_by', 'the evaluation')} recorded in "
              f"{source_path(csv_path)}: data {data_dir}, split {split}")
    return source, Data(data_dir, split, setting("split_seed", 0),
                        bool(setting("keep_laterals", False))).resolved()


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
    _, data = recorded_split(args, args.a)
    labels = labels_for(names_a, data.lists, args.a, classes)
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


def rerun_stem(csv_path):
    """<stem>_rerun, else <stem>_rerun2, 3, ...: the first name no earlier rerun's files hold
    (a rerun with other flags never replaces another's report, nor leaves its figures beside
    a new JSON they do not match). The name is claimed by creating its report JSON (O_EXCL):
    two reruns at once get two names; write_report then replaces the empty claim."""
    stem = Path(csv_path).with_suffix("")
    for n in range(1, 10_000):
        name = f"{stem.name}_rerun{n if n > 1 else ''}"
        if any(stem.parent.glob(f"{glob.escape(name)}_*")):
            continue
        try:
            os.close(os.open(stem.with_name(f"{name}_report.json"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # another rerun claimed it between the two calls
            continue
        return stem.with_name(name)
    raise DataError(f"{stem}: 9,999 reruns already; delete some")


def report_file(args):
    """report.py PREDICTIONS.csv: the report again, from what the evaluation recorded beside
    the predictions (read_source: its data directory, split, the operating points it applied,
    raw or calibrated), flags given here winning; written as <stem>_rerun* (never over
    infer.py's own report, nor over an earlier rerun)."""
    names, probs, classes = read_predictions(args.predictions)
    source, data = recorded_split(args, args.predictions)
    lists = data.lists
    labels = labels_for(names, lists, args.predictions, classes)
    calibrated = source.get("calibrated")  # None: not recorded, the report says so
    points = None
    if args.val_predictions is not None:  # operating points chosen on val, never on test
        if calibrated:
            raise DataError(f"--val-predictions: {args.predictions} holds calibrated "
                            "probabilities; choose thresholds on the raw ones (run report.py "
                            "on the predictions without --calibrated)")
        val_names, val_probs, val_classes = read_predictions(args.val_predictions)
        if val_classes != classes:
            raise DataError(f"--val-predictions {args.val_predictions}: predicts other classes "
                            f"than {args.predictions}")
        val_source, _ = read_source(args.val_predictions)
        if val_source.get("calibrated"):
            raise DataError(f"--val-predictions {args.val_predictions}: holds calibrated "
                            "probabilities; thresholds are chosen on the raw ones")
        if None not in (val_source.get("model"), source.get("model")) and \
                val_source["model"] != source["model"]:
            raise DataError(f"--val-predictions {args.val_predictions}: predicted by another "
                            f"model than {args.predictions} (their records say so)")
        shared = set(val_names) & set(names)
        if shared:
            raise DataError(f"--val-predictions {args.val_predictions}: shares {len(shared)} "
                            f"image(s) with {args.predictions} (e.g. {sorted(shared)[0]}): "
                            "thresholds must be chosen on other images (val)")
        val_labels = labels_for(val_names, lists, args.val_predictions, classes)
        points = choose_operating_points(val_labels, val_probs, None, args.val_predictions,
                                         classes)
        print(f"operating points chosen on the {points['images']} images of "
              f"{args.val_predictions}")
    elif source.get("operating_points"):  # those the evaluation applied, as it applied them
        points = source["operating_points"]
        check_operating_points(points, source.get("mode", "?"), source_path(args.predictions))
        if points.get("class_names", classes) != classes:
            raise DataError(f"{source_path(args.predictions)}: its operating points are for "
                            f"other classes than {args.predictions}'s columns")
        if calibrated:
            points = on_calibrated(points)
    no_subgroups = args.no_subgroups or bool(source.get("no_subgroups"))
    table = (args.patients_table if args.patients_table is not None or no_subgroups
             else source.get("patients_table"))
    demographics = demographics_for(data.data_dir, no_subgroups, table, dataset=data.dataset)
    notice = {"notice": SAMPLE_NOTICE} if source.get("notice") or trained_on_sample(
        _exported_from(Path(args.predictions).parent)) else {}
    context = {k: source[k] for k in ("mode", "part", "list", "protocol") if k in source}
    report = build_report(names, labels, probs, classes, points, n_boot=args.n_boot,
                          seed=args.boot_seed, calibrated=calibrated, demographics=demographics,
                          predictions=str(args.predictions), made_by="report.py", **context,
                          **notice)
    # what these AUCs are, as infer.py says it before its own (a rerun's stdout alone says so)
    print(f"{report['images']} images, {PROBABILITIES_SHORT[calibrated]}"
          + (f", {report['protocol']}" if report.get("protocol") else ", protocol not recorded"))
    print(summary(report))
    stem = rerun_stem(args.predictions)
    try:
        written = write_report(stem, report, labels, probs, classes, points,
                               figures=not args.no_figures, platt=None if calibrated else points)
    except BaseException:  # no empty claim left behind to push the next rerun to another name
        claim = Path(f"{stem}_report.json")
        if claim.exists() and claim.stat().st_size == 0:
            claim.unlink()
        raise
    for path in written:
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
def _exported_from(model_dir):
    """The training data directory that the export in model_dir records (None: no export
    there, or an unreadable record: the report then says nothing about it)."""
    try:
        meta = json.loads((Path(model_dir) / "chexnet.json").read_text())
        return meta.get("trained_on", meta.get("data_dir")) if isinstance(meta, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def add_report_args(parser):
    """--n-boot, --boot-seed: the report's bootstrap (report.py and infer.py)."""
    parser.add_argument("--n-boot", type=n_boot, default=N_BOOT,
                        help=f"bootstrap resamples of patients for the 95%% intervals "
                             f"({N_BOOT_RANGE[0]} to {N_BOOT_RANGE[1]}, default {N_BOOT})")
    parser.add_argument("--boot-seed", type=seed, default=0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(description=__doc__)
    if argv[:1] == ["compare"]:
        parser.add_argument("command")
        parser.add_argument("a", help="predictions CSV of model A (the reference)")
        parser.add_argument("b", help="predictions CSV of model B, same images")
    else:
        parser.add_argument("predictions", help="a predictions CSV written by infer.py")
    add_split_args(parser, "CheXpert, MIMIC-CXR: the split with lateral views", recorded=True)
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

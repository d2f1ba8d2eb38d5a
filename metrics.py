"""Evaluation metrics shared by main.py, infer.py, export.py and report.py: numpy and
scikit-learn only, no torch.

Uncertainty comes from a bootstrap that resamples *patients*, not images: a patient's images
move together (NIH has up to 184 per patient), so their correlation widens the interval as it
should. Each resample is a count per patient (how many times it was drawn), and every statistic is
computed for many resamples at once from those counts: AUROC from the cumulative weight of the
sorted negatives, counts at a threshold as one matrix product.

Labels are 0/1 [N, K]; a NaN label (an uncertain CheXpert/MIMIC label) is left out of its
disease's statistics, the image still counting for the others.
"""
import warnings
from contextlib import contextmanager

import numpy as np

N_BOOT = 2000  # resamples, by default
# --n-boot's range. Fewer than 100 resamples cannot place a 95% interval: its bounds are the
# 2.5th and 97.5th percentiles, which 1 or 10 resamples do not have (an interval of one
# resample excludes its own estimate and reads as "significant"). More than 100,000 hold
# (resamples x classes) AUCs in memory and take hours for no change in the interval.
N_BOOT_RANGE = (100, 100_000)
CHUNK = 200  # resamples held in memory at once: (CHUNK, images) float64


def known(y, *arrays):
    """(y, *arrays) without the images whose label y is NaN (left out: uncertain)."""
    y = np.asarray(y)
    if y.dtype.kind != "f":
        return (y, *arrays)
    keep = ~np.isnan(y)
    return (y[keep], *(None if a is None else np.asarray(a)[keep] for a in arrays))


def roc_aucs(labels, probs):
    """Per-disease ROC-AUC (float64 [K]); NaN where the images hold a single class, for
    which AUC is undefined. labels, probs: [N, K]."""
    from sklearn.metrics import roc_auc_score
    labels, probs = np.asarray(labels), np.asarray(probs)
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        y, p = known(labels[:, k], probs[:, k])
        if 0 < y.sum() < len(y):
            out[k] = roc_auc_score(y, p)
    return out


def mean_auc(aucs):
    """Mean over the diseases whose AUC is defined (NaN if none is)."""
    aucs = np.asarray(aucs, dtype=np.float64)
    return float(aucs[~np.isnan(aucs)].mean()) if (~np.isnan(aucs)).any() else float("nan")


def auprcs(labels, probs):
    """Per-disease average precision (area under the precision-recall curve); NaN without
    positives. Read it against the disease's prevalence, which is what a random score gets."""
    from sklearn.metrics import average_precision_score
    labels, probs = np.asarray(labels), np.asarray(probs)
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        y, p = known(labels[:, k], probs[:, k])
        if y.any():
            out[k] = average_precision_score(y, p)
    return out


@contextmanager
def quiet():
    """All-NaN slices (a resample without positives) are expected: no warnings for them."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ---------------------------------------------------------------------------------------------
# The bootstrap

def bootstrap_counts(groups, n_boot=N_BOOT, seed=0, chunk=CHUNK):
    """(inverse (N,), blocks): `inverse` maps each image to its group (patient); each block is
    (b, G) float64, b <= chunk, n_boot rows in all: how many times each group was drawn in one
    resample of the G groups with replacement. groups: (N,) any labels; np.arange(N) resamples
    images."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)

    def blocks():
        for start in range(0, n_boot, chunk):
            yield rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups),
                                  size=min(chunk, n_boot - start)).astype(np.float64)
    return inverse, blocks()


def weighted_aucs(y, scores, counts, inverse=None):
    """ROC-AUC of one disease under each resample: the weighted probability that a positive
    scores above a negative, ties counting half (roc_auc_score with sample_weight). counts
    (b, G) weights of the groups, inverse (N,) the group of each image (None: one image per
    group, counts are then per-image weights). NaN where a resample lacks a class.

    Sorted once, weighted by patients as one sparse product: the negatives fall into buckets
    between the positives' distinct scores (or tie with one), the positives onto their score;
    a (buckets x groups) table of image counts times the (groups x b) weights gives every
    bucket's weight in every resample, and a cumulative sum over the buckets the weight of
    the negatives below each positive score. O(N b) multiply-adds, no (b x N) intermediate."""
    from scipy.sparse import csr_matrix  # scipy is a dependency of scikit-learn
    inverse = np.arange(len(y)) if inverse is None else inverse
    y, scores, inverse = known(y, scores, inverse)
    y = y.astype(bool)
    distinct, pos_at = np.unique(scores[y], return_inverse=True)  # the positives' scores
    m = len(distinct)
    neg_scores, neg_groups = scores[~y], inverse[~y]
    below = np.searchsorted(distinct, neg_scores, "left")  # distinct scores under each negative
    tied = np.zeros(len(neg_scores), bool)
    if m:
        tied = (below < m) & (distinct[np.minimum(below, m - 1)] == neg_scores)
    # Rows 0..m: a negative counts below every positive score from row (below + tied) on;
    # rows m+1..2m: negatives tied with positive score k; rows 2m+1..3m: positives at score k.
    rows = np.concatenate([below + tied, m + 1 + below[tied], 2 * m + 1 + pos_at.ravel()])
    cols = np.concatenate([neg_groups, neg_groups[tied], inverse[y]])
    table = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(3 * m + 1, counts.shape[1]))
    sums = table @ np.ascontiguousarray(np.asarray(counts, dtype=np.float64).T)  # (rows, b)
    wins = np.cumsum(sums[:m], axis=0) + 0.5 * sums[m + 1:2 * m + 1]
    positives = sums[2 * m + 1:]
    total_pos, total_neg = positives.sum(0), sums[:m + 1].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (positives * wins).sum(0) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def interval(samples, alpha=0.05):
    """Percentile interval of bootstrap samples along axis 0, ignoring NaN (undefined
    resamples); NaN where fewer than half the resamples are defined."""
    samples = np.asarray(samples, dtype=np.float64)
    defined = np.isfinite(samples).mean(0)
    with quiet():
        lo = np.nanpercentile(samples, 100 * alpha / 2, axis=0)
        hi = np.nanpercentile(samples, 100 * (1 - alpha / 2), axis=0)
    bad = defined < 0.5
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson(p, n, z=Z95):
    """Wilson's score interval (lo, hi) of a proportion p observed on n units (arrays). Valid
    at 0 and 1, where a percentile bootstrap collapses to a point (14 of 14 resamples to
    [1, 1]): with n = 14 it is [0.785, 1]. NaN where n is 0."""
    p, n = np.asarray(p, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with quiet():
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        # 0 and 1 exactly where p is (rounding left 1e-17 there)
        return (np.where(p <= 0, 0.0, np.clip(centre - half, 0, 1)),
                np.where(p >= 1, 1.0, np.clip(centre + half, 0, 1)))


def newcombe(p1, ci1, p2, ci2):
    """The interval of p1 - p2 from each proportion's interval (Newcombe's hybrid score method,
    1998, with Wilson's intervals: valid at 0 and 1)."""
    (l1, u1), (l2, u2) = ci1, ci2
    d = np.asarray(p1, dtype=np.float64) - p2
    with quiet():
        return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2
                                                                           + (p2 - l2) ** 2)


def at_least(ci, floor):
    """A bootstrap interval widened to contain `floor` (a score interval): a patient-level
    percentile bootstrap is never narrower than Wilson's interval on the patients, so a
    proportion at 0 or 1, or on a few patients, never gets an interval of zero width. Wilson's
    interval is not symmetric, so away from the edges too an end may move a little outward
    (p = 0.8 on 200 patients: 0.745 -> 0.739): slightly conservative, never narrower. NaN
    stays NaN (too few defined resamples)."""
    (lo, hi), (flo, fhi) = ci, floor
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return (np.where(np.isnan(lo), np.nan, np.fmin(lo, flo)),
            np.where(np.isnan(hi), np.nan, np.fmax(hi, fhi)))


def auc_collapsed(ci, auc, positives, negatives):
    """An AUROC's bootstrap interval where it has width, else (a perfect or inverted ranking:
    every resample gives 1, or 0) a score interval valid there: Wilson's for the AUROC as a
    proportion of min(positives, negatives) units (the patients of the rarer class), whose
    variance bounds the AUROC's (van Dantzig, 1951: var <= A(1 - A) / min(m, n)). 1.000
    [1.000, 1.000] on 14 positives becomes [0.785, 1]."""
    lo, hi = (np.asarray(v, dtype=np.float64) for v in ci)
    flo, fhi = wilson(auc, np.minimum(positives, negatives))
    flat = np.isfinite(lo) & np.isfinite(hi) & (hi - lo <= 1e-12)
    return np.where(flat, flo, lo), np.where(flat, fhi, hi)


def bootstrap_aucs(labels, probs, groups, n_boot=N_BOOT, seed=0):
    """(n_boot, K) resampled per-disease AUCs and (n_boot,) mean AUCs over the diseases whose
    AUC is defined on the whole set."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    k = labels.shape[1]
    defined = ~np.isnan(roc_aucs(labels, probs))
    inverse, resamples = bootstrap_counts(groups, n_boot, seed)
    blocks = []
    for counts in resamples:
        block = np.full((len(counts), k), np.nan)
        for d in np.flatnonzero(defined):
            block[:, d] = weighted_aucs(labels[:, d], probs[:, d], counts, inverse)
        blocks.append(block)
    aucs = np.concatenate(blocks)
    with quiet():
        means = np.nanmean(aucs[:, defined], axis=1) if defined.any() else np.full(n_boot, np.nan)
    return aucs, means


# ---------------------------------------------------------------------------------------------
# Operating points

RULES = ("youden", "f1", "sensitivity")
# What each rule chooses, for the lines that print a decision
RULE_MEANING = {"youden": "the threshold with the largest sensitivity + specificity",
                "f1": "the threshold with the largest F1",
                "sensitivity": "the highest threshold reaching the target sensitivity"}


def choose_thresholds(labels, probs, target_sensitivity=0.9):
    """Per-disease thresholds from (validation) predictions: Youden's J (max sensitivity +
    specificity - 1), the best F1, and the highest threshold whose sensitivity reaches the
    target. NaN for a disease with one class. A probability >= threshold is positive."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs)
    out = {rule: np.full(labels.shape[1], np.nan) for rule in RULES}
    for d in range(labels.shape[1]):
        y, p = known(labels[:, d], probs[:, d])
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, thr = roc_curve(y, p)
        finite = np.isfinite(thr)
        j = np.argmax(np.where(finite, tpr - fpr, -np.inf))
        out["youden"][d] = thr[j]
        reach = np.flatnonzero(finite & (tpr >= target_sensitivity))
        out["sensitivity"][d] = thr[reach[0]] if reach.size else np.nan
        precision, recall, pr_thr = precision_recall_curve(y, p)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        out["f1"][d] = pr_thr[np.argmax(f1)]
    return out


def confusion_stats(tp, fp, fn, tn):
    """Sensitivity, specificity, PPV, NPV and F1 from counts (arrays of any shape)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn), "f1": 2 * tp / (2 * tp + fp + fn)}


def at_threshold(labels, probs, thresholds, groups, n_boot=N_BOOT, seed=0):
    """The confusion statistics at fixed per-disease thresholds: point values, 95% bootstrap
    intervals (patients resampled; a proportion's never narrower than Wilson's interval on
    the patients of its denominator: see at_least) and the counts.
    {stat: (value [K], lo [K], hi [K])}."""
    labels = np.asarray(labels, dtype=np.float64)
    counted = (~np.isnan(labels)).astype(np.float64)  # an uncertain label counts nowhere
    labels = np.nan_to_num(labels)
    positive = (np.asarray(probs) >= np.asarray(thresholds)[None]).astype(np.float64)
    parts = {"tp": labels * positive, "fp": (1 - labels) * positive,
             "fn": labels * (1 - positive), "tn": (1 - labels) * (1 - positive)}
    parts = {k: v * counted for k, v in parts.items()}
    counts = {k: v.sum(0) for k, v in parts.items()}
    point = confusion_stats(**counts)
    samples = {stat: [] for stat in point}
    inverse, resamples = bootstrap_counts(groups, n_boot, seed)
    # Each group's own counts (G, K): a resample's counts are then one matrix product.
    per_group = {k: np.stack([np.bincount(inverse, v[:, d], minlength=inverse.max() + 1)
                              for d in range(v.shape[1])], 1) for k, v in parts.items()}
    for w in resamples:
        resampled = confusion_stats(**{k: w @ v for k, v in per_group.items()})
        for stat, value in resampled.items():
            samples[stat].append(value)
    undefined = np.isnan(np.asarray(thresholds, dtype=np.float64))
    # each proportion's denominator in patients: its interval is at least Wilson's on them
    has = {k: v > 0 for k, v in per_group.items()}
    patients = {"sensitivity": has["tp"] | has["fn"], "specificity": has["tn"] | has["fp"],
                "ppv": has["tp"] | has["fp"], "npv": has["tn"] | has["fn"]}
    result = {}
    for stat, value in point.items():
        lo, hi = interval(np.concatenate(samples[stat]))
        if stat in patients:
            lo, hi = at_least((lo, hi), wilson(value, patients[stat].sum(0)))
        result[stat] = tuple(np.where(undefined, np.nan, a) for a in (value, lo, hi))
    result["counts"] = {k: v.astype(int).tolist() for k, v in counts.items()}
    return result


# ---------------------------------------------------------------------------------------------
# Calibration

def reliability(y, p, bins=15):
    """Equal-width bins of predicted probability: (mean predicted, fraction positive, count)
    per non-empty bin, and the expected calibration error (count-weighted |gap|)."""
    y, p = known(y, p)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, p, minlength=bins)
    frac = np.bincount(which, y.astype(np.float64), minlength=bins)
    keep = count > 0
    mean_p, frac, count = mean_p[keep] / count[keep], frac[keep] / count[keep], count[keep]
    ece = float((count * np.abs(mean_p - frac)).sum() / count.sum()) if count.sum() else np.nan
    return {"mean_predicted": mean_p, "fraction_positive": frac, "count": count, "ece": ece}


def calibration_errors(labels, probs, bins=15):
    return np.array([reliability(labels[:, d], probs[:, d], bins)["ece"]
                     for d in range(labels.shape[1])])


def fit_platt(labels, probs):
    """Per-disease Platt scaling fitted on validation predictions: p' = sigmoid(a logit(p) + b).
    Returns (a [K], b [K]); identity (1, 0) for a disease with one class, and for one whose
    fitted slope is not positive (see fit_platt_monotone)."""
    a, b, _ = fit_platt_monotone(labels, probs)
    return a, b


def fit_platt_monotone(labels, probs):
    """fit_platt, and the diseases where the fitted map was refused: (a [K], b [K], refused
    [(disease index, fitted slope)]). A calibration map must be increasing (it must not change
    any ranking, so every AUROC stays what it was): a slope a <= 0, which a small or odd val
    set can give (the model ranks val's positives below its negatives), would reverse or
    flatten the disease's ranking; that disease keeps the identity map instead."""
    from sklearn.linear_model import LogisticRegression
    logits = _logit(probs)
    a, b = np.ones(labels.shape[1]), np.zeros(labels.shape[1])
    refused = []
    for d in range(labels.shape[1]):
        y, x = known(labels[:, d], logits[:, d:d + 1])
        if 0 < y.sum() < len(y):
            fit = LogisticRegression(C=1e6, max_iter=1000).fit(x, y)
            slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
            if slope > 0 and np.isfinite(slope) and np.isfinite(intercept):
                a[d], b[d] = slope, intercept
            else:
                refused.append((d, slope))
    return a, b, refused


def apply_platt(probs, a, b):
    return 1.0 / (1.0 + np.exp(-(np.asarray(a) * _logit(probs) + np.asarray(b))))


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------
# Two models on the same images

def paired_auc_difference(labels, probs_a, probs_b, groups, n_boot=N_BOOT, seed=0):
    """AUC(B) - AUC(A) per disease and for the mean, with a paired bootstrap: both models are
    scored on the same resampled patients, so what they share cancels. Returns
    {"diff": [K], "lo": [K], "hi": [K], "mean": (d, lo, hi)}; a difference is significant when
    its interval excludes 0."""
    labels = np.asarray(labels)
    a, b = roc_aucs(labels, probs_a), roc_aucs(labels, probs_b)
    defined = ~np.isnan(a)
    diffs, means = [], []
    inverse, resamples = bootstrap_counts(groups, n_boot, seed)
    for w in resamples:
        block = np.full((len(w), labels.shape[1]), np.nan)
        for d in np.flatnonzero(defined):
            block[:, d] = (weighted_aucs(labels[:, d], probs_b[:, d], w, inverse)
                           - weighted_aucs(labels[:, d], probs_a[:, d], w, inverse))
        diffs.append(block)
        with quiet():
            means.append(np.nanmean(block[:, defined], axis=1) if defined.any()
                         else np.full(len(w), np.nan))
    diffs, means = np.concatenate(diffs), np.concatenate(means)
    lo, hi = interval(diffs)
    mlo, mhi = interval(means[:, None])
    return {"a": a, "b": b, "diff": b - a, "lo": lo, "hi": hi,
            "mean": (mean_auc(b) - mean_auc(a), float(mlo[0]), float(mhi[0]))}

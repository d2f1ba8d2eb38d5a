"""Evaluation metrics shared by main.py, infer.py and the comparison command: numpy and
scikit-learn only, no torch."""
import numpy as np


def roc_aucs(labels, probs):
    """Per-disease ROC-AUC (float64 [K]); NaN where the images hold a single class, for
    which AUC is undefined. labels, probs: [N, K]."""
    from sklearn.metrics import roc_auc_score
    labels, probs = np.asarray(labels), np.asarray(probs)
    return np.array([roc_auc_score(labels[:, k], probs[:, k])
                     if 0 < labels[:, k].sum() < len(labels) else np.nan
                     for k in range(labels.shape[1])])


def mean_auc(aucs):
    """Mean over the diseases whose AUC is defined (NaN if none is)."""
    aucs = np.asarray(aucs, dtype=np.float64)
    return float(aucs[~np.isnan(aucs)].mean()) if (~np.isnan(aucs)).any() else float("nan")

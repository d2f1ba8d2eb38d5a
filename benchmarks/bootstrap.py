"""Time of the evaluation report's bootstrap at the size of the full test split.

    python benchmarks/bootstrap.py [--n 22433] [--patients 6187] [--resamples 2000]

Synthetic labels (NIH's prevalences, images spread over patients as in the test split) and
scores; prints the seconds for the per-disease and mean AUROC intervals, for sensitivity /
specificity / PPV / NPV / F1 intervals at fixed thresholds, and for a paired comparison.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import at_threshold, bootstrap_aucs, interval, paired_auc_difference  # noqa: E402

# Percent of the shipped test split with each disease (python stats.py).
PREVALENCE = [10.8, 2.6, 12.1, 18.3, 5.4, 6.0, 1.3, 4.7, 4.3, 2.0, 2.3, 1.5, 3.1, 0.2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=22433)
    p.add_argument("--patients", type=int, default=6187)
    p.add_argument("--resamples", type=int, default=2000)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    labels = (rng.random((a.n, 14)) < np.array(PREVALENCE) / 100).astype(np.uint8)
    probs = 1 / (1 + np.exp(-rng.normal(-2 + 1.5 * labels, 1.0)))
    patients = np.sort(rng.integers(0, a.patients, a.n))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "CPU")
    print(f"{a.n} images x 14 diseases, {len(set(patients))} patients, {a.resamples} resamples; "
          f"{os.cpu_count()} cores ({cpu})")
    t = time.perf_counter()
    aucs, means = bootstrap_aucs(labels, probs, patients, a.resamples)
    lo, hi = interval(means[:, None])
    print(f"AUROC intervals (14 diseases + mean): {time.perf_counter() - t:.1f} s "
          f"(mean AUC interval [{lo[0]:.4f}, {hi[0]:.4f}])")
    t = time.perf_counter()
    at_threshold(labels, probs, np.full(14, 0.3), patients, a.resamples)
    print(f"sensitivity, specificity, PPV, NPV, F1 intervals at thresholds: "
          f"{time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    paired_auc_difference(labels, probs, np.clip(probs + rng.normal(0, 0.01, probs.shape), 0, 1),
                          patients, a.resamples)
    print(f"paired comparison of two models: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()

"""Time of the report's subgroup section at the size of the full test split.

    python benchmarks/subgroups.py [--n 22433] [--patients 6187] [--resamples 2000]

Synthetic labels (NIH's test prevalences, images spread over patients as in the test split),
scores, sex (44% female, NIH's share) and age bands per patient; thresholds for the three rules
of the report. Prints a table: the subgroup section (2 attributes, every subgroup's AUROC, TPR
and FPR intervals and the paired TPR/FPR gaps), and for scale the report's own AUROC intervals.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import RULES, bootstrap_aucs  # noqa: E402
from subgroups import AGE_BANDS, subgroup_statistics  # noqa: E402

# Percent of the shipped test split with each disease (python stats.py).
PREVALENCE = [10.8, 2.6, 12.1, 18.3, 5.4, 6.0, 1.3, 4.7, 4.3, 2.0, 2.3, 1.5, 3.1, 0.2]
AGE_SHARE = [0.05, 0.22, 0.38, 0.31, 0.04]  # roughly ChestX-ray14's, by band


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=22433)
    p.add_argument("--patients", type=int, default=6187)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    labels = (rng.random((a.n, 14)) < np.array(PREVALENCE) / 100).astype(np.uint8)
    probs = 1 / (1 + np.exp(-rng.normal(-2 + 1.5 * labels, 1.0)))
    patients = np.sort(rng.integers(0, a.patients, a.n))
    sex = np.where(rng.random(a.patients) < 0.44, "female", "male").astype(object)[patients]
    bands = np.array([b[2] for b in AGE_BANDS], dtype=object)
    age = bands[rng.choice(5, a.patients, p=AGE_SHARE)][patients]
    age[rng.random(a.n) < 0.001] = "unknown"
    thresholds = {rule: np.full(14, 0.3) for rule in RULES}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "CPU")
    print(f"{a.n} images x 14 diseases, {len(set(patients))} patients, {a.resamples} resamples; "
          f"{os.cpu_count()} cores ({cpu})\n")
    rows = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        subgroup_statistics(labels, probs, patients, {"sex": sex, "age": age}, thresholds,
                            a.resamples, 0)
        rows.append(("subgroup section: sex + age bands, 3 rules", time.perf_counter() - t))
        t = time.perf_counter()
        subgroup_statistics(labels, probs, patients, {"sex": sex}, thresholds, a.resamples, 0)
        rows.append(("subgroup section: sex only", time.perf_counter() - t))
        t = time.perf_counter()
        bootstrap_aucs(labels, probs, patients, a.resamples)
        rows.append(("report's AUROC intervals (14 diseases + mean)", time.perf_counter() - t))
    print("| what | seconds |\n| --- | --- |")
    for what in dict(rows):
        times = [f"{s:.1f}" for w, s in rows if w == what]
        print(f"| {what} | {', '.join(times)} |")


if __name__ == "__main__":
    main()

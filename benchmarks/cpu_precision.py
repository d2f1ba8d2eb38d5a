"""Ten-crop evaluation (infer.py --mode torch) on this CPU in fp32, bf16 autocast and bf16 +
channels_last: images/s, and how far bf16's probabilities and AUCs are from fp32's.

    python benchmarks/cpu_precision.py [--n 48] [--batch-size 1]

A random-weights DenseNet-121 on --n full-size NIH images (the sample's labels): the AUCs mean
nothing as such; their differences between precisions show what bf16 changes in the ranking.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import data_loading  # noqa: E402
import gpu  # noqa: E402

from metrics import mean_auc, roc_aucs  # noqa: E402
from runtime import cpu_has_amx, cpu_has_avx512_bf16, setup  # noqa: E402

VARIANTS = {"fp32": [], "bf16 autocast": ["--amp"],
            "bf16 + channels_last": ["--amp", "--channels-last"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample"))
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1, help="infer.py's default on a CPU")
    p.add_argument("--workers", type=int, default=1, help="infer.py's default on a CPU")
    a = p.parse_args()
    from tables import read_label_table
    names, _, labels = read_label_table(Path(a.images) / "Data_Entry_2017_v2020_sample.csv")
    paths = [Path(a.images) / "images" / nm for nm in names[:a.n]]
    root = data_loading.throwaway_data_dir(paths)
    labels = labels[:a.n]
    device = gpu.Device(setup("cpu"))
    print(f"{device.name}; AMX: {cpu_has_amx()}; AVX512-BF16: {cpu_has_avx512_bf16()}; torch "
          f"{torch.__version__}; {a.n} NIH images, ten-crop 224 from Resize(256), batch "
          f"{a.batch_size}, {a.workers} loader workers")
    probs, rows = [], {}
    for label, flags in VARIANTS.items():
        rate, _ = gpu.eval_row(device, root, 224, 256, a.batch_size, a.workers, a.n, flags, probs)
        rows[label] = rate
    print(f"{'variant':<24}{'images/s':>9}{'max |dp|':>10}{'mean AUC':>10}{'max |dAUC|':>12}")
    ref_auc = roc_aucs(labels, probs[0])
    for (label, rate), pr in zip(rows.items(), probs):
        auc = roc_aucs(labels, pr)
        print(f"{label:<24}{rate:>9.2f}{np.abs(pr - probs[0]).max():>10.4f}"
              f"{mean_auc(auc):>10.4f}{np.nanmax(np.abs(auc - ref_auc)):>12.4f}")


if __name__ == "__main__":
    main()

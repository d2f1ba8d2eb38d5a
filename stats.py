"""Per-disease percentage of images in every split, with image and patient counts.

    python stats.py                                  # the shipped CheXNet split, no data needed
    python stats.py --data-dir data --split random   # a fresh seeded 70/10/20 patient split
Needs only the list files (and, for random/official splits, the label table); no images.
"""
import sys

import numpy as np

from common import ArgumentParser, DataError, nonnegative_int, one_line
from labels import CLASS_NAMES, patient_of, read_list, resolve_split


def split_stats(lists):
    """{split: {'images': n, 'patients': n, 'percent': float64 [14]}} from list-file paths."""
    stats = {}
    for split, path in lists.items():
        names, labels = read_list(path)
        patients = {patient_of(n) for n in names}
        stats[split] = {"images": len(names),
                        # None: a name that is not NIH's <patient>_<follow-up>.png
                        "patients": None if None in patients else len(patients),
                        "percent": 100.0 * labels.mean(axis=0, dtype=np.float64)}
    return stats


def format_table(stats):
    lines = [f"{'':<18}" + "".join(f"{s:>8}" for s in stats)]
    for i, disease in enumerate(CLASS_NAMES):
        lines.append(f"{disease:<18}" + "".join(f"{st['percent'][i]:8.3f}" for st in stats.values()))
    for count in ("images", "patients"):
        lines.append(f"{count:<18}" + "".join(
            f"{st[count]:8d}" if st[count] is not None else f"{'n/a':>8}" for st in stats.values()))
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="data directory (default: data)")
    parser.add_argument("--split", default="auto",
                        help="auto | chexnet | random | official | DIR (see dataset.py)")
    parser.add_argument("--split-seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    try:
        lists = resolve_split(args.split, args.data_dir, args.split_seed)
        stats = split_stats(lists)
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")
    print(f"split: {lists['train'].parent}")
    print(format_table(stats))  # resolve_split refused any image or patient in two splits


if __name__ == "__main__":
    main()

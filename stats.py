"""Per-disease percentage of images in every split, with image and patient counts.

    python stats.py                                  # the shipped CheXNet split, no data needed
    python stats.py --data-dir data --split random   # a fresh seeded 70/10/20 patient split
    python stats.py --plot                           # also the figures, into plots/
Needs only the list files (and, for random/official splits, the label table); no images.
--plot draws the per-split prevalence of each disease and the 14x14 co-occurrence of the
diseases in the label table (the data directory's, else the one shipped in nih/).
"""
import sys

import numpy as np

from common import ArgumentParser, DataError, one_line, seed
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


def plot(stats, lists, data_dir, out_dir):
    """stats_prevalence.png and stats_cooccurrence.png in out_dir; returns their paths."""
    from pathlib import Path

    from labels import SHIPPED_LABEL_TABLE, find_label_table, read_label_table
    from report import _pyplot, _save
    plt = _pyplot()
    if plt is None:
        raise DataError("--plot needs matplotlib (pip install matplotlib)")
    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(stats)
    x = np.arange(len(CLASS_NAMES))
    for i, (split, st) in enumerate(stats.items()):
        ax.bar(x + (i - (len(stats) - 1) / 2) * width, st["percent"], width,
               label=f"{split} ({st['images']} images)")
    ax.set_xticks(x, CLASS_NAMES, rotation=45, ha="right")
    ax.set_ylabel("% of images")
    ax.set_title(f"Disease prevalence per split ({lists['train'].parent})")
    ax.legend()
    paths = [out_dir / "stats_prevalence.png", out_dir / "stats_cooccurrence.png"]
    _save(fig, paths[0])
    try:
        table = find_label_table(data_dir)
    except DataError:
        table = SHIPPED_LABEL_TABLE
    _, _, labels = read_label_table(table)
    labels = labels.astype(np.int64)
    both = labels.T @ labels  # (14, 14): images with both diseases; the diagonal: with each
    fig, ax = plt.subplots(figsize=(9, 8))
    image = ax.imshow(np.log10(both + 1), cmap="viridis")
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            ax.text(j, i, str(both[i, j]), ha="center", va="center", fontsize=6, color="w")
    ax.set_xticks(x, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(x, CLASS_NAMES)
    ax.set_title(f"Images with both diseases, {table.name} ({len(labels)} images)")
    fig.colorbar(image, label="log10(images + 1)")
    _save(fig, paths[1])
    return paths


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="data directory (default: data)")
    parser.add_argument("--split", default="auto",
                        help="auto | chexnet | random | official | DIR (see dataset.py)")
    parser.add_argument("--split-seed", type=seed, default=0)
    parser.add_argument("--plot", nargs="?", const="plots", default=None, metavar="DIR",
                        help="also write the prevalence and co-occurrence figures (to plots/)")
    args = parser.parse_args(argv)
    try:
        lists = resolve_split(args.split, args.data_dir, args.split_seed)
        stats = split_stats(lists)
        print(f"split: {lists['train'].parent}")
        print(format_table(stats))  # resolve_split refused any image or patient in two splits
        if args.plot:
            for path in plot(stats, lists, args.data_dir, args.plot):
                print(f"wrote {path}")
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()

"""Per-disease percentage of images in every split, with image and patient counts.

    python stats.py                                  # the shipped CheXNet split, no data needed
    python stats.py --data-dir data --split random   # a fresh seeded 70/10/20 patient split
    python stats.py --plot                           # also the figures, into plots/
    python stats.py --data-dir CheXpert-v1.0-small   # CheXpert (or MIMIC-CXR-JPG) official split
Needs only the list files (and, for random/official splits, the label table); no images.
Other data sets: % positive, and the % of uncertain labels in a second table.
--plot draws the per-split prevalence of each disease and the 14x14 co-occurrence of the
diseases in the label table (the data directory's, else the one shipped in nih/).
"""
import sys

import numpy as np

from common import ArgumentParser, DataError, add_split_args, one_line
from labels import list_header, patient_of, read_list
from splitting import resolve_split
from tables import SHIPPED_LABEL_TABLE, find_label_table, read_label_table


def split_stats(lists):
    """{split: {'images': n, 'patients': n, 'percent': float64 [K], 'uncertain': [K] or None,
    'classes': [...]}} from list-file paths: % positive (and % uncertain) per class."""
    stats = {}
    for split, path in lists.items():
        names, labels = read_list(path)
        uncertain = None if labels.dtype == np.uint8 else 100.0 * (labels == -1).mean(0)
        labels = (labels == 1).astype(np.float64)
        patients = {patient_of(n) for n in names}
        stats[split] = {"images": len(names),
                        # None: a name that is not NIH's <patient>_<follow-up>.png
                        "patients": None if None in patients else len(patients),
                        "percent": 100.0 * labels.mean(axis=0, dtype=np.float64),
                        "uncertain": uncertain, "classes": list_header(path)[0]}
    return stats


def format_table(stats):
    first = next(iter(stats.values()))
    classes = first["classes"]
    width = 18 if max(map(len, classes)) <= 18 else max(map(len, classes)) + 2
    lines = [f"{'':<{width}}" + "".join(f"{s:>8}" for s in stats)]
    for i, disease in enumerate(classes):
        lines.append(f"{disease:<{width}}" + "".join(f"{st['percent'][i]:8.3f}"
                                                     for st in stats.values()))
    for count in ("images", "patients"):
        lines.append(f"{count:<{width}}" + "".join(
            f"{st[count]:8d}" if st[count] is not None else f"{'n/a':>8}" for st in stats.values()))
    if first["uncertain"] is not None:
        lines.append(f"\n{'% uncertain (-1)':<{width}}" + "".join(f"{s:>8}" for s in stats))
        for i, disease in enumerate(classes):
            lines.append(f"{disease:<{width}}" + "".join(f"{st['uncertain'][i]:8.3f}"
                                                         for st in stats.values()))
    return "\n".join(lines)


def plot(stats, lists, data_dir, out_dir):
    """stats_prevalence.png and stats_cooccurrence.png in out_dir; returns their paths."""
    from pathlib import Path

    from optional import pyplot
    from report import save_figure
    plt = pyplot("--plot")
    # Everything read before the first figure is drawn: a bad table (or no pandas to read it
    # with) is one line and no figure, not the first figure without the second.
    if next(iter(stats.values()))["uncertain"] is None:  # NIH: the whole label table
        try:
            table = find_label_table(data_dir)
        except DataError:
            table = SHIPPED_LABEL_TABLE
        _, _, labels = read_label_table(table)
        source = table.name
    else:  # other data sets: the positives of the split's lists
        labels = np.concatenate([read_list(p)[1] == 1 for p in lists.values()])
        source = _shown(lists["train"].parent)
    labels = labels.astype(np.int64)
    out_dir = Path(out_dir)
    classes = next(iter(stats.values()))["classes"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(stats)
    x = np.arange(len(classes))
    for i, (split, st) in enumerate(stats.items()):
        bars = ax.bar(x + (i - (len(stats) - 1) / 2) * width, st["percent"], width,
                      label=f"{split} ({st['images']} images)")
        # the value on each bar: a log axis keeps Hernia's 0.2 % visible beside Infiltration's
        # 18 %, and the numbers say what the eye cannot read off a log axis
        ax.bar_label(bars, [f"{v:.2g}" for v in st["percent"]], fontsize=6, rotation=90,
                     padding=2)
    ax.set_yscale("log")
    ax.set_ylim(max(0.01, min(v for st in stats.values() for v in st["percent"] if v > 0) / 3),
                max(v for st in stats.values() for v in st["percent"]) * 4)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylabel("% of images (log scale)")
    ax.set_title(f"Disease prevalence per split (split: {_shown(lists['train'].parent)})")
    ax.legend(loc="upper right")
    paths = [out_dir / "stats_prevalence.png", out_dir / "stats_cooccurrence.png"]
    save_figure(fig, paths[0])
    both = labels.T @ labels  # (14, 14): images with both diseases; the diagonal: with each
    fig, ax = plt.subplots(figsize=(9, 8))
    shade = np.log10(both + 1)
    image = ax.imshow(shade, cmap="viridis")
    for i in range(len(classes)):
        for j in range(len(classes)):  # dark text on the bright cells (the diagonal)
            bright = shade[i, j] > 0.6 * shade.max()
            ax.text(j, i, str(both[i, j]), ha="center", va="center", fontsize=7,
                    color="black" if bright else "white",
                    fontweight="bold" if i == j else "normal")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_yticks(x, classes)
    ax.set_title(f"Images with both findings (diagonal: with each)\n{source}, "
                 f"{len(labels)} images")
    fig.colorbar(image, label="log10(images + 1)")
    save_figure(fig, paths[1])
    return paths


def _shown(path):
    """A directory as a title shows it: relative to the current directory when inside it (the
    repository's splits/chexnet), else its last two parts; never a machine's absolute path."""
    from pathlib import Path
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*path.parts[-2:]))


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_split_args(parser, "CheXpert, MIMIC-CXR: count lateral views too")
    parser.add_argument("--plot", nargs="?", const="plots", default=None, metavar="DIR",
                        help="also write the prevalence and co-occurrence figures (to plots/)")
    args = parser.parse_args(argv)
    try:
        lists = resolve_split(args.split, args.data_dir, args.split_seed,
                          getattr(args, "keep_laterals", False))
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

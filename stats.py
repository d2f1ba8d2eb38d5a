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
from splitting import Data
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
    paths = [out_dir / "stats_prevalence.png", out_dir / "stats_cooccurrence.png"]
    save_figure(prevalence_figure(plt, stats, classes, _shown(lists["train"].parent)), paths[0])
    save_figure(cooccurrence_figure(plt, labels, classes, source), paths[1])
    return paths


def prevalence_figure(plt, stats, classes, split_name):
    """Per disease (most prevalent on top), each split's share of images as a bar on a linear
    axis (a bar's length is its value; on the log axis it was not), the value at its end."""
    order = np.argsort(-np.asarray(next(iter(stats.values()))["percent"]), kind="stable")
    height = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * len(classes) * max(1, len(stats) / 2)))
    y = np.arange(len(classes))
    top = max(v for st in stats.values() for v in st["percent"])
    for i, (split, st) in enumerate(stats.items()):
        values = np.asarray(st["percent"])[order]
        bars = ax.barh(y + (i - (len(stats) - 1) / 2) * height, values, height,
                       label=f"{split} ({st['images']} images)")
        ax.bar_label(bars, [f"{v:.1f}%" if v >= 1 else f"{v:.2f}%" for v in values],
                     fontsize=9, padding=3)
    ax.set_yticks(y, [classes[k] for k in order], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("% of images with the finding")
    ax.set_title(f"Disease prevalence per split (split: {split_name})")
    ax.legend(loc="lower right")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    return fig


def cooccurrence_figure(plt, labels, classes, source):
    """Below the diagonal, for each pair of findings: how much more (or less) often they come
    together than if they were independent (observed / expected images, a log colour scale
    centred on 1: raw counts mostly showed prevalence), with the observed count in the cell;
    on the diagonal each finding's own count. Each pair once."""
    from matplotlib.colors import LogNorm
    n, k = len(labels), len(classes)
    both = labels.T @ labels  # (K, K): images with both findings; the diagonal: with each
    each = np.diag(both).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = both * n / np.outer(each, each)
    lower = np.tril(np.ones((k, k), bool), -1) & np.isfinite(ratio) & (ratio > 0)
    shown = np.ma.masked_where(~lower, ratio)
    # the colour scale spans what the pairs hold (at least 1/2 to 2), symmetric about 1
    spread = float(np.abs(np.log10(ratio[lower])).max()) if lower.any() else 0.0
    bound = min(max(10 ** spread, 2.0), 100.0)
    fig, ax = plt.subplots(figsize=(10, 9))
    image = ax.imshow(shown, cmap="RdBu_r", norm=LogNorm(1 / bound, bound))
    colours = image.cmap(image.norm(ratio.clip(1 / bound, bound)))
    for i in range(k):
        for j in range(i + 1):
            if i == j:
                ax.text(j, i, f"{both[i, i]}", ha="center", va="center", fontsize=8,
                        fontweight="bold", color="0.15")
                continue
            if both[i, j] == 0 or not lower[i, j]:
                ax.text(j, i, "0" if both[i, j] == 0 else "", ha="center", va="center",
                        fontsize=7, color="0.5")
                continue
            dark = 0.299 * colours[i, j, 0] + 0.587 * colours[i, j, 1] + 0.114 * colours[i, j, 2]
            ax.text(j, i, f"{both[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if dark < 0.45 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_title(f"Findings together: observed / expected if independent (colour), images with "
                 f"both (number)\n{source}, {n} images; the diagonal: images with each")
    bar = fig.colorbar(image, shrink=0.8)
    ticks = [2.0 ** e for e in range(-7, 8) if 1 / bound <= 2.0 ** e <= bound]
    bar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    bar.minorticks_off()
    bar.set_label("observed / expected images (1: as if independent)")
    return fig


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
        data = Data(args.data_dir, args.split, args.split_seed, args.keep_laterals).resolved()
        lists = data.lists
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

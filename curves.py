"""The curves of a training run: live in TensorBoard while main.py trains, and afterwards as
one PNG drawn from metrics.jsonl, readable without TensorBoard.

    python curves.py runs/chexnet              # -> runs/chexnet/curves.png
    python curves.py                           # the newest run under runs/ (the Quick start's)
    tensorboard --logdir runs/chexnet/tensorboard

main.py (rank 0) writes the TensorBoard event files under OUT_DIR/tensorboard/ (off with
--no-tensorboard): train loss and lr every --log-every steps, and per epoch the val loss,
mean AUC and every class's AUC, images/s, the share of time spent waiting for the data loader
and, on a GPU, peak memory. The x axis is the optimizer step, which the checkpoint holds: a
resumed run (after --max-steps, Ctrl-C or kill -9) first purges the events beyond its
checkpoint's step, so every curve continues without duplicate or backward steps.
Evaluation reports (report.py) and data-set statistics (stats.py) are other concerns.
"""
import json
import math
import re
import sys
from pathlib import Path

from common import (SAMPLE_NOTICE, ArgumentParser, DataError, atomic_path, one_line, os_reason,
                    trained_on_sample)
from images import CENTRE_CROP

TENSORBOARD_DIR = "tensorboard"


def tag(name):
    """A TensorBoard tag from a class name ('No Finding' -> 'No_Finding'): the characters
    TensorBoard would replace with a warning, replaced here silently."""
    return re.sub(r"[^-/\w.]", "_", name)


class Board:
    """TensorBoard scalars of one run, or nothing (disabled, not rank 0, no tensorboard
    package). purge_step: the first step this process will write; events of an earlier,
    killed process at steps >= purge_step are dropped by every TensorBoard reader."""

    def __init__(self, out_dir, purge_step, enabled, log=print):
        self.writer = None
        if not enabled:
            return
        try:  # optional: only the tensorboard package's event writer is needed
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: the tensorboard package is not installed: no TensorBoard curves "
                "(pip install tensorboard, or --no-tensorboard; metrics.jsonl is written anyway)")
            return
        self.log = log
        self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def _failed(self, exc):
        """A write that fails (a full disk) ends the curves, not the training: the checkpoint
        that follows says in one line what is wrong with the disk."""
        self.log(f"note: TensorBoard files stop here ({os_reason(exc)}); training goes on")
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001  the same failure again
            pass
        self.writer = None

    def scalars(self, step, values):
        """values: {tag: number}; non-finite numbers (an AUC without positives) are left out."""
        if self.writer is None:
            return
        try:
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)
        except OSError as e:
            self._failed(e)

    def epoch(self, step, record, peak_memory=None):
        """The epoch's record (metrics.jsonl's line) at the step it ended."""
        values = {"val/loss": record["val_loss"], "val/mean_auc": record["val_mean_auc"],
                  "train/epoch_loss": record["train_loss"],
                  "perf/images_per_s": record["images_per_s"],
                  "perf/loader_wait_share": record["loader_wait_share"]}
        values.update({f"val_auc/{tag(k)}": v for k, v in record["val_auc"].items()})
        if peak_memory is not None:
            values["perf/peak_memory_gib"] = peak_memory / 2 ** 30
        self.scalars(step, values)

    def flush(self):
        """On disk before a checkpoint: what a kill loses is then only what the resumed run
        writes again."""
        if self.writer is not None:
            try:
                self.writer.flush()
            except OSError as e:
                self._failed(e)

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._failed(e)
            self.writer = None


# ---------------------------------------------------------------------------------------------
# The PNG of a run, from metrics.jsonl

def read_metrics(path):
    """The records of metrics.jsonl, one per epoch; a clear one-line error for a damaged file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({os_reason(e)})") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            for key in ("epoch", "train_loss", "val_loss", "val_mean_auc"):
                if key not in record:
                    raise ValueError(f"no {key!r}")
                value = record[key]
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not (number or (value is None and key != "epoch")):
                    raise ValueError(f"{key} is {value!r}, not a number")
        except ValueError as e:
            raise DataError(f"{path}:{i}: not a metrics.jsonl record of main.py ({one_line(e)})") from None
        records.append(record)
    if not records:
        raise DataError(f"{path}: no epochs yet (main.py writes a line after each epoch)")
    return records


def _number(value):
    return float("nan") if value is None else float(value)


def write_figure(out_dir, path=None):
    """OUT_DIR/curves.png (or path): train and val loss, and val mean AUC, per epoch."""
    out_dir = Path(out_dir)
    records = read_metrics(out_dir / "metrics.jsonl")
    path = Path(path) if path else out_dir / "curves.png"
    import matplotlib  # plotting only here: main.py's training does not need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    marker = "o" if len(records) <= 30 else None
    loss_ax.plot(epochs, [_number(r["train_loss"]) for r in records], marker=marker,
                 label="train")
    loss_ax.plot(epochs, [_number(r["val_loss"]) for r in records], marker=marker, label="val")
    loss_ax.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    loss_ax.legend()
    aucs = [_number(r["val_mean_auc"]) for r in records]
    auc_ax.plot(epochs, aucs, marker=marker, color="C2", label="val")
    finite = [(a, -e) for a, e in zip(aucs, epochs) if math.isfinite(a)]
    if finite:
        best, at = max(finite)  # the first epoch of the best AUC, as best.pt keeps
        auc_ax.plot([-at], [best], "*", color="C3", markersize=12, linestyle="none",
                    label=f"best {best:.3f} (epoch {-at}: best.pt)")
    # chance (0.5) always on the axis, with the line drawn: a gain of 0.01 over a few epochs
    # does not look steep on an axis cropped around it
    auc_ax.axhline(0.5, color="0.4", ls=":", lw=1, label="chance (0.5)")
    auc_ax.legend()
    auc_ax.set(xlabel="epoch", ylabel="mean ROC-AUC over classes",
               title=f"Val mean AUC ({CENTRE_CROP} per image)")
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.margins(x=0.05, y=0.1)
    top = max([a for a in aucs if math.isfinite(a)] + [0.5])
    auc_ax.set_ylim(min(0.45, min([a for a in aucs if math.isfinite(a)] + [0.5]) - 0.02),
                    min(1.0, top + max(0.05, (top - 0.5) * 0.15)))
    batch = records[-1].get("global_batch")
    title = f"{out_dir}: {len(records)} epochs" + (f", global batch {batch}" if batch else "")
    if trained_on_sample(records[-1].get("data_dir")):  # older runs do not record it
        title += f"\n{SAMPLE_NOTICE}"
    fig.suptitle(title)
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def newest_run(runs=Path("runs")):
    """The training run under runs/ whose metrics.jsonl was written last."""
    found = sorted(runs.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DataError(f"no {runs}/*/metrics.jsonl: train first (bash run.sh), or name the "
                        "run: python curves.py OUT_DIR")
    print(f"curves.py: the last training run: {found[-1].parent}")
    return found[-1].parent


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("out_dir", nargs="?", default=None,
                   help="a training's --out-dir (holding metrics.jsonl; default: the run under "
                        "runs/ whose metrics.jsonl was written last)")
    p.add_argument("--out", default=None, help="the PNG to write (default: OUT_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        print(f"wrote {write_figure(args.out_dir or newest_run(), args.out)}")
    except DataError as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()

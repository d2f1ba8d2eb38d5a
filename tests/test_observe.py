"""Watching a training run: the loader-wait share of the training loop, progress lines in a
non-terminal log, TensorBoard event files read back with TensorBoard's own reader, the PNG of
the run (the precision defaults: tests/test_precision.py)."""
import json
import time

import pytest
import torch

from conftest import TINY, assert_clean_error, run_main, run_script


def event_scalars(out_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows them (its reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_points(points, expected):
    """TensorBoard's (step, value) points: these steps, these values (float32 in the file)."""
    assert [s for s, _ in points] == [s for s, _ in expected]
    assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)


def assert_curves_continue(scalars):
    """Every curve's steps strictly increase: nothing written twice, nothing backwards."""
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)


# ---------------------------------------------------------------------------------------------
# The loader-wait share

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 14)

    def forward(self, x):
        return self.linear(x.flatten(1))


class SlowLoader:
    """Yields the same in-memory batches, each after `delay` seconds (a starved device)."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def one_epoch(loader, log_every=50, lr=1e-3, **kwargs):
    """fitting.train_one_epoch with a tiny model on the CPU."""
    from fitting import StepSettings, train_one_epoch
    from runtime import Runtime
    torch.manual_seed(0)
    model = TinyNet()
    return train_one_epoch(model, loader, torch.nn.BCEWithLogitsLoss(),
                           torch.optim.Adam(model.parameters(), lr=lr),
                           torch.amp.GradScaler(enabled=False), Runtime(torch.device("cpu")),
                           StepSettings(log_every=log_every), 0, 0, **kwargs)


def batches(n=20):
    x = torch.randn(4, 3, 8, 8)
    y = (torch.rand(4, 14) < 0.2).float()
    return [(x, y, ["x"] * 4)] * n


def test_loader_wait_share_is_near_zero_in_memory_and_large_when_starved():
    fast = one_epoch(batches())
    assert fast["batches"] == 20 and fast["loader_wait_share"] < 0.05, fast
    slow = one_epoch(SlowLoader(batches(10), 0.1))  # 0.1 s a batch: starved on a busy machine too
    assert slow["loader_wait_share"] > 0.7, slow
    assert slow["loader_wait"] >= 10 * 0.1


def test_train_loss_reaches_the_log_at_each_interval():
    logged = []
    stats = one_epoch(batches(10), log_every=3, lr=0.01,
                      on_log=lambda step, values: logged.append((step, values)))
    assert stats["step"] == 10 and stats["images"] == 40
    assert [s for s, _ in logged] == [3, 6, 9]
    assert all(set(v) == {"train/loss", "train/lr"} and v["train/lr"] == 0.01 for _, v in logged)
    # Each value is its own window's mean loss (not the epoch's so far): it learns
    assert logged[0][1]["train/loss"] > logged[1][1]["train/loss"] > logged[2][1]["train/loss"]


# ---------------------------------------------------------------------------------------------
# Progress lines when stderr is not a terminal (a batch job's log)

@pytest.mark.integration
def test_training_prints_progress_lines_into_a_log(tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_script("main.py", *TINY, "--limit", "32", "--epochs", "1", "--out-dir", out,
                      "--progress-every", "0.01", "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epoch 1 ")]
    assert len(lines) >= 2, proc.stderr  # 4 steps of 8 images, a line after each
    first = lines[0].split()
    assert first[2].endswith("/32") and "images/s" in lines[0] and "ETA" in lines[0]
    assert "step 1 " in lines[0] and "loss " in lines[0] and "loader wait " in lines[0]
    epoch_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("epoch 1/1"))
    assert "loader wait " in epoch_line and "img/s" in epoch_line
    assert not (out / "tensorboard").exists()
    # The default (30 s) keeps a short run's log to the epoch lines.
    again = run_main(capsys, *TINY, "--limit", "32", "--epochs", "2", "--out-dir", out)
    assert again.returncode == 0, again.stderr
    assert not [ln for ln in again.stderr.splitlines() if ln.startswith("epoch ")]


# ---------------------------------------------------------------------------------------------
# TensorBoard and the PNG of the run

@pytest.mark.integration
def test_tensorboard_curves_and_the_figure_of_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_main(capsys, *TINY, "--limit", "24", "--epochs", "2", "--log-every", "2",
                    "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    scalars = event_scalars(out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    from curves import tag
    assert_points(scalars["val/loss"], [(3, records[0]["val_loss"]), (6, records[1]["val_loss"])])
    assert_points(scalars["val/mean_auc"], [(3, records[0]["val_mean_auc"]),
                                            (6, records[1]["val_mean_auc"])])
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    assert [s for s, _ in scalars["train/lr"]] == [2, 4, 6]
    for cls, auc in records[0]["val_auc"].items():
        if auc is not None:
            assert_points(scalars[f"val_auc/{tag(cls)}"][:1], [(3, auc)])
    for name in ("perf/images_per_s", "perf/loader_wait_share", "train/epoch_loss"):
        assert [s for s, _ in scalars[name]] == [3, 6]
    assert 0 <= scalars["perf/loader_wait_share"][0][1] <= 1
    assert "perf/peak_memory_gib" not in scalars  # a GPU's only
    assert_curves_continue(scalars)
    # The PNG, written at the end of the run and by `python curves.py OUT_DIR`
    assert f"curves: {out / 'curves.png'}" in proc.stdout
    from PIL import Image
    assert Image.open(out / "curves.png").size[0] > 500
    (out / "curves.png").unlink()
    again = run_script("curves.py", out)
    assert again.returncode == 0 and (out / "curves.png").is_file(), again.stderr


@pytest.mark.integration
def test_curves_of_damaged_metrics_are_one_line_errors(tmp_path):
    assert_clean_error(run_script("curves.py", tmp_path), "metrics.jsonl: cannot read",
                       "No such file")
    (tmp_path / "metrics.jsonl").write_text("")
    assert_clean_error(run_script("curves.py", tmp_path), "no epochs yet")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, '
                                            '"val_mean_auc": null}\n{"epoch": 2, "train_lo')
    assert_clean_error(run_script("curves.py", tmp_path), "metrics.jsonl:2: not a metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n")
    assert_clean_error(run_script("curves.py", tmp_path), "metrics.jsonl:1:", "not a JSON object")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": "low", "val_loss": 0.4, '
                                            '"val_mean_auc": 0.5}\n')
    assert_clean_error(run_script("curves.py", tmp_path), "metrics.jsonl:1:",
                       "train_loss is 'low', not a number")
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\n")
    assert_clean_error(run_script("curves.py", tmp_path), "metrics.jsonl: cannot read")
    # An epoch whose AUC is undefined (null) is drawn as a gap, not an error
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_mean_auc": null}\n'
        '{"epoch": 2, "train_loss": 0.4, "val_loss": 0.3, "val_mean_auc": 0.6}\n')
    proc = run_script("curves.py", tmp_path, "--out", tmp_path / "x.png")
    assert proc.returncode == 0 and (tmp_path / "x.png").is_file(), proc.stderr


TENSORBOARD_MISSING = """
import runpy, sys
sys.path.insert(0, ".")
class NoTensorBoard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorboard" or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTensorBoard())
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.integration
def test_without_the_tensorboard_package_training_goes_on(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(TENSORBOARD_MISSING)
    out = tmp_path / "run"
    proc = run_script(probe, *TINY, "--limit", "16", "--epochs", "1", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note:")
             and "tensorboard" in ln.lower()]
    assert len(notes) == 1 and notes[0].startswith("note: the tensorboard package is not"), notes
    assert (out / "metrics.jsonl").is_file()
    assert not list(out.glob("tensorboard/*"))  # the directory --check made, empty
